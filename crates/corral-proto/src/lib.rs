//! Generated gRPC code for corral's services (see `proto/corral/v1/`).
//!
//! Nothing hand-written lives here except what both sides must agree on:
//! the metadata key naming a data stream's volume, the one marking a
//! fenced caller, the message-size limits, and the codec (prost's, with
//! each message's buffer reserved before it is encoded).

#![allow(clippy::all, missing_docs)]

pub mod codec;

/// corral.v1: replica control + data stream, engine control.
pub mod v1 {
    tonic::include_proto!("corral.v1");
}

/// The Container Storage Interface, spec v1.12.0 (see `proto/csi/v1/csi.proto`):
/// what the Kubernetes CSI sidecars and the kubelet speak to corral's plugin.
pub mod csi {
    /// csi.v1: Identity, Controller, GroupController, SnapshotMetadata, Node.
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

/// A replica mode on the wire.
impl From<corral_types::ReplicaMode> for v1::ReplicaMode {
    fn from(mode: corral_types::ReplicaMode) -> Self {
        match mode {
            corral_types::ReplicaMode::Rw => v1::ReplicaMode::Rw,
            corral_types::ReplicaMode::Wo => v1::ReplicaMode::Wo,
            corral_types::ReplicaMode::Err => v1::ReplicaMode::Err,
        }
    }
}

/// A replica mode from the wire (`None`: unspecified or unknown).
pub fn replica_mode(wire: i32) -> Option<corral_types::ReplicaMode> {
    match v1::ReplicaMode::try_from(wire).ok()? {
        v1::ReplicaMode::Rw => Some(corral_types::ReplicaMode::Rw),
        v1::ReplicaMode::Wo => Some(corral_types::ReplicaMode::Wo),
        v1::ReplicaMode::Err => Some(corral_types::ReplicaMode::Err),
        v1::ReplicaMode::Unspecified => None,
    }
}

/// gRPC metadata key carrying the volume name of a data stream.
pub const VOLUME_METADATA_KEY: &str = "corral-volume";

/// gRPC metadata key carrying the open session a data stream belongs to
/// (`ReplicaInfo.open_session` as the engine's open returned it).
pub const OPEN_SESSION_METADATA_KEY: &str = "corral-open-session";

/// Largest gRPC message either side accepts (a batch of requests or replies).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Cap the engine's batcher keeps below `MAX_MESSAGE_BYTES`.
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// Most requests the engine packs into one batch.
pub const MAX_BATCH_REQUESTS: usize = 32;

/// The unit of integrity on the data stream: a replica stores, checks and
/// reports (`ChecksumsOp`) one CRC32C per block of this many bytes.
pub const CHECKSUM_BLOCK: u64 = 4096;

/// The CRC32C of [`CHECKSUM_BLOCK`] zero bytes: what a replica reports for a
/// block that reads as zeroes, whether it was written with zeroes, never
/// written, or discarded — so replicas compare by content, not history.
pub const ZERO_BLOCK_CRC: u32 = 0x98f9_4189;

/// gRPC metadata key a replica daemon sets on a `FAILED_PRECONDITION` that
/// means "a newer engine owns this volume" (value [`FENCED`]), so that
/// callers tell fencing from any other refusal without reading messages.
pub const ERROR_METADATA_KEY: &str = "corral-error";
/// The value of [`ERROR_METADATA_KEY`] for a fenced caller.
pub const FENCED: &str = "fenced";

/// Whether `status` says the caller has been fenced by a newer engine.
pub fn is_fenced(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && status
            .metadata()
            .get(ERROR_METADATA_KEY)
            .is_some_and(|v| v.as_bytes() == FENCED.as_bytes())
}

/// A `FAILED_PRECONDITION` marked as fencing the caller.
pub fn fenced_status(message: impl Into<String>) -> tonic::Status {
    let mut status = tonic::Status::failed_precondition(message);
    status.metadata_mut().insert(
        ERROR_METADATA_KEY,
        tonic::metadata::MetadataValue::from_static(FENCED),
    );
    status
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::csi::v1 as csi;
    #[test]
    fn the_zero_block_crc_is_the_crc32c_of_a_zero_block() {
        let zeroes = vec![0u8; super::CHECKSUM_BLOCK as usize];
        assert_eq!(crc32c::crc32c(&zeroes), super::ZERO_BLOCK_CRC);
    }

    // The CSI messages must match the spec byte for byte, or the sidecars
    // and kubelet would silently drop fields. The bytes below are written by
    // hand from the spec's field numbers, not produced by our own encoder.

    #[test]
    fn a_csi_create_volume_request_has_the_spec_s_field_numbers() {
        let mut expected = vec![0x0a, 4]; // 1: name
        expected.extend_from_slice(b"pv-1");
        // 2: capacity_range { 1: required_bytes = 1 GiB }
        expected.extend_from_slice(&[0x12, 6, 0x08, 0x80, 0x80, 0x80, 0x80, 0x04]);
        // 4: parameters, one map entry { 1: key, 2: value }
        expected.extend_from_slice(&[0x22, 21, 0x0a, 16]);
        expected.extend_from_slice(b"numberOfReplicas");
        expected.extend_from_slice(&[0x12, 1, b'3']);
        // 8: mutable_parameters, one map entry
        expected.extend_from_slice(&[0x42, 6, 0x0a, 1, b'k', 0x12, 1, b'v']);

        let request = csi::CreateVolumeRequest {
            name: "pv-1".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            parameters: [("numberOfReplicas".to_string(), "3".to_string())].into(),
            mutable_parameters: [("k".to_string(), "v".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(request.encode_to_vec(), expected);
        assert_eq!(
            csi::CreateVolumeRequest::decode(&expected[..]).unwrap(),
            request
        );
    }

    #[test]
    fn a_csi_volume_capability_decodes_from_the_spec_s_encoding() {
        // 2: mount { 1: fs_type = "ext4", 2: mount_flags = ["noatime"] }
        // 3: access_mode { 1: mode = SINGLE_NODE_WRITER (1) }
        let mut bytes = vec![0x12, 15, 0x0a, 4];
        bytes.extend_from_slice(b"ext4");
        bytes.extend_from_slice(&[0x12, 7]);
        bytes.extend_from_slice(b"noatime");
        bytes.extend_from_slice(&[0x1a, 2, 0x08, 1]);
        let cap = csi::VolumeCapability::decode(&bytes[..]).unwrap();
        let Some(csi::volume_capability::AccessType::Mount(mount)) = &cap.access_type else {
            panic!("expected a mount capability, got {cap:?}");
        };
        assert_eq!(mount.fs_type, "ext4");
        assert_eq!(mount.mount_flags, ["noatime"]);
        assert_eq!(
            cap.access_mode.unwrap().mode(),
            csi::volume_capability::access_mode::Mode::SingleNodeWriter
        );
        // 1: block {} is the other arm of the oneof.
        let block = csi::VolumeCapability::decode(&[0x0a, 0][..]).unwrap();
        assert!(matches!(
            block.access_type,
            Some(csi::volume_capability::AccessType::Block(_))
        ));
    }

    #[test]
    fn csi_node_requests_have_the_spec_s_field_numbers() {
        // NodePublishVolumeRequest: 1 volume_id, 3 staging_target_path,
        // 4 target_path, 6 readonly, 8 volume_context.
        let mut bytes = vec![0x0a, 1, b'v', 0x1a, 1, b's', 0x22, 1, b't', 0x30, 1];
        bytes.extend_from_slice(&[0x42, 6, 0x0a, 1, b'a', 0x12, 1, b'b']);
        let publish = csi::NodePublishVolumeRequest::decode(&bytes[..]).unwrap();
        assert_eq!(publish.volume_id, "v");
        assert_eq!(publish.staging_target_path, "s");
        assert_eq!(publish.target_path, "t");
        assert!(publish.readonly);
        assert_eq!(
            publish.volume_context.get("a").map(String::as_str),
            Some("b")
        );

        // NodeGetInfoResponse: 1 node_id, 2 max_volumes_per_node,
        // 3 accessible_topology { 1: segments }.
        let info = csi::NodeGetInfoResponse {
            node_id: "n".into(),
            max_volumes_per_node: 7,
            accessible_topology: Some(csi::Topology {
                segments: [("z".to_string(), "1".to_string())].into(),
            }),
        };
        assert_eq!(
            info.encode_to_vec(),
            [
                0x0a, 1, b'n', 0x10, 7, 0x1a, 8, 0x0a, 6, 0x0a, 1, b'z', 0x12, 1, b'1'
            ]
        );
    }

    #[test]
    fn csi_wrappers_and_timestamps_are_the_well_known_types() {
        // ProbeResponse.ready is a google.protobuf.BoolValue { 1: value }.
        let ready = csi::ProbeResponse { ready: Some(true) };
        assert_eq!(ready.encode_to_vec(), [0x0a, 2, 0x08, 1]);
        // Snapshot: 4 creation_time { 1: seconds, 2: nanos }, 5 ready_to_use.
        let snapshot = csi::Snapshot {
            creation_time: Some(prost_types::Timestamp {
                seconds: 5,
                nanos: 6,
            }),
            ready_to_use: true,
            ..Default::default()
        };
        assert_eq!(
            snapshot.encode_to_vec(),
            [0x22, 4, 0x08, 5, 0x10, 6, 0x28, 1]
        );
        // GetCapacityResponse.maximum_volume_size is an Int64Value at 2.
        let capacity = csi::GetCapacityResponse {
            available_capacity: 1,
            maximum_volume_size: Some(3),
            minimum_volume_size: None,
        };
        assert_eq!(capacity.encode_to_vec(), [0x08, 1, 0x12, 2, 0x08, 3]);
    }

    #[test]
    fn csi_capability_enums_have_the_spec_s_values() {
        use csi::controller_service_capability::rpc::Type as Ctrl;
        use csi::node_service_capability::rpc::Type as Node;
        use csi::plugin_capability::service::Type as Plugin;
        use csi::volume_capability::access_mode::Mode;
        assert_eq!(Plugin::ControllerService as i32, 1);
        assert_eq!(Plugin::VolumeAccessibilityConstraints as i32, 2);
        assert_eq!(Ctrl::CreateDeleteVolume as i32, 1);
        assert_eq!(Ctrl::PublishUnpublishVolume as i32, 2);
        assert_eq!(Ctrl::CreateDeleteSnapshot as i32, 5);
        assert_eq!(Ctrl::ExpandVolume as i32, 9);
        assert_eq!(Ctrl::ModifyVolume as i32, 14);
        assert_eq!(Ctrl::GetSnapshot as i32, 15);
        assert_eq!(Node::StageUnstageVolume as i32, 1);
        assert_eq!(Node::GetVolumeStats as i32, 2);
        assert_eq!(Node::ExpandVolume as i32, 3);
        assert_eq!(Node::VolumeMountGroup as i32, 6);
        assert_eq!(Mode::MultiNodeMultiWriter as i32, 5);
        assert_eq!(Mode::SingleNodeMultiWriter as i32, 7);
        // Enum names as the spec spells them (what the sidecars log).
        assert_eq!(
            Ctrl::ListVolumesPublishedNodes.as_str_name(),
            "LIST_VOLUMES_PUBLISHED_NODES"
        );
        assert_eq!(Mode::SingleNodeWriter.as_str_name(), "SINGLE_NODE_WRITER");
    }

    #[test]
    fn csi_services_have_the_spec_s_grpc_paths() {
        // The full method path is what travels on the wire; a misspelt
        // package, service or method would be UNIMPLEMENTED at the sidecar.
        let generated = include_str!(concat!(env!("OUT_DIR"), "/csi.v1.rs"));
        for path in [
            "/csi.v1.Identity/GetPluginInfo",
            "/csi.v1.Identity/Probe",
            "/csi.v1.Controller/CreateVolume",
            "/csi.v1.Controller/ControllerPublishVolume",
            "/csi.v1.Controller/CreateSnapshot",
            "/csi.v1.Controller/ControllerExpandVolume",
            "/csi.v1.Node/NodeStageVolume",
            "/csi.v1.Node/NodePublishVolume",
            "/csi.v1.Node/NodeGetInfo",
        ] {
            assert!(
                generated.contains(&format!("\"{path}\"")),
                "no gRPC method {path}"
            );
        }
    }
}
