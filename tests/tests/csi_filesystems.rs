//! The filesystems the node plugin makes: ext4 and xfs, each made on the
//! blank volume the first time it is staged and never again — a volume
//! unstaged and staged again (a pod rescheduled on the same node) keeps
//! its files.

use anyhow::{Context, Result, ensure};
use corral_tests::csi::{CsiCluster, storage_class};
use corral_tests::ext4::assert_root;

/// The filesystem type mounted at `path`, from the mount table.
fn mounted_type(path: &std::path::Path) -> Option<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.display().to_string();
    table.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (left.split(' ').nth(4)? == want).then(|| right.split(' ').next().map(str::to_string))?
    })
}

fn made_once_and_kept(c: &mut CsiCluster, fs: &str) -> Result<()> {
    let name = format!("pvc-{fs}");
    // xfs needs at least 300 MiB; the replicas are sparse.
    let params = storage_class(&[("fsType", fs), ("numberOfReplicas", "2")]);
    let volume = c.create_volume(&name, 320 << 20, params, None)?;
    let id = volume.volume_id.clone();
    let ctx = c.publish(&volume, 0)?;
    let pod = c.mount_for_pod(&volume, 0, ctx.clone(), "app-0")?;
    ensure!(
        mounted_type(&pod).as_deref() == Some(fs),
        "{} is not {fs}: {:?}",
        pod.display(),
        mounted_type(&pod)
    );
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(pod.join("kept.dat"), &data)?;
    std::fs::File::open(pod.join("kept.dat"))?.sync_all()?;
    std::fs::File::open(&pod)?.sync_all()?;

    // The pod goes and comes back on the same node: unstaged, staged again.
    c.unmount_for_pod(&id, 0, "app-0")?;
    ensure!(
        mounted_type(&pod).is_none(),
        "{} still mounted",
        pod.display()
    );
    let pod = c.mount_for_pod(&volume, 0, ctx, "app-0")?;
    let back = std::fs::read(pod.join("kept.dat")).context("the file after restaging")?;
    ensure!(
        back == data,
        "the {fs} file changed: the volume was formatted again?"
    );

    c.unmount_for_pod(&id, 0, "app-0")?;
    c.unpublish(&id, 0)?;
    c.delete_volume(&id)?;
    Ok(())
}

#[test]
fn ext4_and_xfs_are_made_once_and_kept_across_restaging() {
    assert_root();
    let mut c = CsiCluster::start(2).expect("start the cluster");
    for fs in ["ext4", "xfs"] {
        if let Err(e) = made_once_and_kept(&mut c, fs) {
            panic!("{fs}: {e:#}");
        }
    }
}
