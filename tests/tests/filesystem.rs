//! A real ext4 filesystem on a corral volume: nbdfuse exposes the NBD
//! export as a file, losetup makes it a block device, then mkfs, mount,
//! write, unmount, fsck, and read everything back after a remount.
//! Needs root (loop devices, mount), as the README's test command has.

use corral_tests::ext4::{Ext4OnNbd, assert_root};
use corral_tests::{Cluster, EngineSpec};

#[test]
fn ext4_on_a_three_replica_volume() {
    assert_root();
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&EngineSpec::new("fs", "256MiB", &[0, 1, 2]))
        .unwrap();
    let uri = cluster.engines[e].nbd_uri();

    let mut fs = Ext4OnNbd::attach(cluster.path(), &uri, 256 << 20).unwrap();
    fs.mkfs_write_fsck_and_read_back(100).unwrap();
    drop(fs);

    let info = cluster.volume_info(e).unwrap();
    assert_eq!(info["replicas_rw"], 3, "{info}");
    assert_eq!(
        info["generation"], 1,
        "no replica failed along the way: {info}"
    );
}
