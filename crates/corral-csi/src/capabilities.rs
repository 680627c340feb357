//! What the plugin advertises — exactly what works — and the volume
//! capabilities it accepts: one node at a time (a volume has one engine),
//! as a filesystem (ext4, xfs) or a raw block device.

use corral_proto::csi::v1 as csi;
use csi::volume_capability::access_mode::Mode;

use crate::params::FILESYSTEMS;

/// Access modes a corral volume supports: single-node ones.
const MODES: [Mode; 4] = [
    Mode::SingleNodeWriter,
    Mode::SingleNodeReaderOnly,
    Mode::SingleNodeSingleWriter,
    Mode::SingleNodeMultiWriter,
];

/// Check every capability; the error says which one fails and why.
pub fn check_capabilities(caps: &[csi::VolumeCapability]) -> Result<(), String> {
    for cap in caps {
        let mode = cap
            .access_mode
            .as_ref()
            .ok_or("volume capability without an access_mode")?
            .mode;
        let mode = Mode::try_from(mode).map_err(|_| format!("unknown access mode {mode}"))?;
        if !MODES.contains(&mode) {
            return Err(format!(
                "access mode {}: a corral volume is attached to one node at a time",
                mode.as_str_name()
            ));
        }
        match &cap.access_type {
            Some(csi::volume_capability::AccessType::Mount(m)) => {
                if !m.fs_type.is_empty() && !FILESYSTEMS.contains(&m.fs_type.as_str()) {
                    return Err(format!("fs_type {:?}: use ext4 or xfs", m.fs_type));
                }
            }
            Some(csi::volume_capability::AccessType::Block(_)) => {}
            None => return Err("volume capability without an access_type".into()),
        }
    }
    Ok(())
}

pub fn controller_capabilities() -> Vec<csi::ControllerServiceCapability> {
    use csi::controller_service_capability::rpc::Type;
    [
        Type::CreateDeleteVolume,
        Type::PublishUnpublishVolume,
        Type::ListVolumes,
        Type::ListVolumesPublishedNodes,
        Type::GetCapacity,
        Type::SingleNodeMultiWriter,
        Type::ExpandVolume,
        Type::CreateDeleteSnapshot,
        Type::ListSnapshots,
        Type::GetSnapshot,
        Type::CloneVolume,
    ]
    .into_iter()
    .map(|t| csi::ControllerServiceCapability {
        r#type: Some(csi::controller_service_capability::Type::Rpc(
            csi::controller_service_capability::Rpc { r#type: t as i32 },
        )),
    })
    .collect()
}

pub fn node_capabilities() -> Vec<csi::NodeServiceCapability> {
    use csi::node_service_capability::rpc::Type;
    [
        Type::StageUnstageVolume,
        Type::GetVolumeStats,
        Type::VolumeCondition,
        Type::SingleNodeMultiWriter,
        Type::ExpandVolume,
    ]
    .into_iter()
    .map(|t| csi::NodeServiceCapability {
        r#type: Some(csi::node_service_capability::Type::Rpc(
            csi::node_service_capability::Rpc { r#type: t as i32 },
        )),
    })
    .collect()
}

/// The plugin's services: the controller's only when it runs one; and
/// online volume expansion (a volume grows while its engine runs; a
/// detached one through a transient engine).
pub fn plugin_capabilities(controller: bool) -> Vec<csi::PluginCapability> {
    use csi::plugin_capability::service::Type;
    use csi::plugin_capability::volume_expansion::Type as Expansion;
    let mut types = vec![Type::VolumeAccessibilityConstraints];
    if controller {
        types.insert(0, Type::ControllerService);
    }
    types
        .into_iter()
        .map(|t| csi::PluginCapability {
            r#type: Some(csi::plugin_capability::Type::Service(
                csi::plugin_capability::Service { r#type: t as i32 },
            )),
        })
        .chain(std::iter::once(csi::PluginCapability {
            r#type: Some(csi::plugin_capability::Type::VolumeExpansion(
                csi::plugin_capability::VolumeExpansion {
                    r#type: Expansion::Online as i32,
                },
            )),
        }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(mode: Mode, fs: Option<&str>) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
            access_type: Some(match fs {
                Some(fs) => {
                    csi::volume_capability::AccessType::Mount(csi::volume_capability::MountVolume {
                        fs_type: fs.into(),
                        ..Default::default()
                    })
                }
                None => csi::volume_capability::AccessType::Block(
                    csi::volume_capability::BlockVolume {},
                ),
            }),
        }
    }

    #[test]
    fn single_node_mounts_and_blocks_are_accepted_and_multi_node_refused() {
        assert!(check_capabilities(&[cap(Mode::SingleNodeWriter, Some("ext4"))]).is_ok());
        assert!(check_capabilities(&[cap(Mode::SingleNodeWriter, Some(""))]).is_ok());
        assert!(check_capabilities(&[cap(Mode::SingleNodeReaderOnly, None)]).is_ok());
        let err = check_capabilities(&[cap(Mode::MultiNodeMultiWriter, None)]).unwrap_err();
        assert!(err.contains("one node"), "{err}");
        let err = check_capabilities(&[cap(Mode::SingleNodeWriter, Some("btrfs"))]).unwrap_err();
        assert!(err.contains("btrfs"), "{err}");
        let mut no_type = cap(Mode::SingleNodeWriter, None);
        no_type.access_type = None;
        assert!(check_capabilities(&[no_type]).is_err());
    }

    #[test]
    fn expansion_is_advertised_online_by_controller_node_and_plugin() {
        use csi::controller_service_capability::rpc::Type as C;
        use csi::node_service_capability::rpc::Type as N;
        let controller: Vec<i32> = controller_capabilities()
            .iter()
            .filter_map(|c| c.r#type.as_ref())
            .map(|csi::controller_service_capability::Type::Rpc(r)| r.r#type)
            .collect();
        assert!(controller.contains(&(C::ExpandVolume as i32)));
        let node: Vec<i32> = node_capabilities()
            .iter()
            .filter_map(|c| c.r#type.as_ref())
            .map(|csi::node_service_capability::Type::Rpc(r)| r.r#type)
            .collect();
        assert!(node.contains(&(N::ExpandVolume as i32)));
        for with_controller in [true, false] {
            let expansion: Vec<i32> = plugin_capabilities(with_controller)
                .iter()
                .filter_map(|c| match &c.r#type {
                    Some(csi::plugin_capability::Type::VolumeExpansion(e)) => Some(e.r#type),
                    _ => None,
                })
                .collect();
            assert_eq!(
                expansion,
                [csi::plugin_capability::volume_expansion::Type::Online as i32]
            );
        }
    }
}
