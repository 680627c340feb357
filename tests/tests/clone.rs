//! Clones end to end, through the command line: a snapshot taken while a
//! writer overwrites the volume over NBD, one block after another, holds a
//! prefix of the pass under way over the previous pass; a clone of it (`corral engine
//! --clone-from ENGINE --clone-snapshot NAME`) reads back bit-exact the
//! snapshot's data at once and after its fill, while the source's head
//! moves on to a third generation; `corral volume clone status --wait`
//! reports the fill done and the clone's replicas verify identical; a clone
//! of that clone (no snapshot named: it takes one of its source and deletes
//! it when filled) holds the same data, and that snapshot is gone once the
//! second clone is filled. Bad flags get clear errors.

use std::process::Command;
use std::time::Duration;

use corral_tests::{Cluster, EngineSpec};
use serde_json::Value;

const SIZE: usize = 24 << 20;
const BLOCK: usize = 4096;

/// Generation `g` of the volume: every block says its generation and index.
fn generation(g: u8) -> Vec<u8> {
    let mut v = vec![g; SIZE];
    for (i, block) in v.chunks_mut(BLOCK).enumerate() {
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    v
}

fn ok_json(out: std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "corral failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// The snapshot's view as the source engine serves it to clones.
fn read_snapshot(control: &str, name: &str) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = corral_client::EngineControl::connect(control, Duration::from_secs(30))
            .await
            .expect("connect to the source engine");
        // Past the end: refused as out of range, not taken for an outage.
        match c.read_snapshot(name, SIZE as u64 - 4096, 8192).await {
            Err(corral_client::ClientError::Refused { code, message, .. }) => {
                assert_eq!(code, tonic::Code::OutOfRange, "{message}");
                assert!(message.contains("outside the device"), "{message}");
            }
            other => panic!("a read past the end: {other:?}"),
        }
        let mut out = Vec::with_capacity(SIZE);
        for at in (0..SIZE).step_by(1 << 20) {
            out.extend_from_slice(
                &c.read_snapshot(name, at as u64, 1 << 20)
                    .await
                    .expect("read snapshot"),
            );
        }
        out
    })
}

#[test]
fn a_snapshot_under_load_read_back_bit_exact_through_a_clone_and_a_clone_of_it() {
    let mut c = Cluster::with_replicas(9).expect("cluster");
    let src = c
        .start_engine(&EngineSpec::new("src", "24MiB", &[0, 1, 2]))
        .expect("source engine");
    let src_control = c.engines[src].control.to_string();
    let old = generation(1);
    let new = generation(2);
    let old_file = c.path().join("gen1");
    let new_file = c.path().join("gen2");
    std::fs::write(&old_file, &old).unwrap();
    std::fs::write(&new_file, &new).unwrap();
    c.write_flushed(src, &old_file).unwrap();

    // Generations 2 and 1 go in, over and over, while the snapshot is taken.
    let uri = c.engines[src].nbd_uri();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = std::sync::Arc::clone(&stop);
        let files = [new_file.clone(), old_file.clone()];
        let uri = uri.clone();
        std::thread::spawn(move || {
            for pass in 0..40 {
                if pass > 0 && stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return pass;
                }
                // One 4 KiB request at a time, in order: a snapshot taken
                // mid-pass holds a prefix of the pass.
                let file = files[pass % 2].display().to_string();
                corral_tests::tools::run_ok(
                    "nbdcopy",
                    &[
                        "--connections=1",
                        "--requests=1",
                        "--request-size=4096",
                        &file,
                        &uri,
                    ],
                    Duration::from_secs(120),
                )
                .expect("the writer's nbdcopy");
            }
            40
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let out = c
        .corral(&[
            "volume",
            "--engine",
            &src_control,
            "--json",
            "snapshot",
            "create",
            "mid",
        ])
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    ok_json(out);
    let passes = writer.join().expect("the writer");
    eprintln!("the writer made {passes} passes");
    let snap = read_snapshot(&src_control, "mid");
    let (mut from_old, mut from_new, mut switches) = (0, 0, 0);
    let mut previous = None;
    for (i, block) in snap.chunks(BLOCK).enumerate() {
        let which = if block == &old[i * BLOCK..(i + 1) * BLOCK] {
            from_old += 1;
            1
        } else if block == &new[i * BLOCK..(i + 1) * BLOCK] {
            from_new += 1;
            2
        } else {
            panic!("snapshot block {i} is neither generation: torn or foreign data");
        };
        if previous.is_some_and(|p| p != which) {
            switches += 1;
        }
        previous = Some(which);
    }
    assert!(
        switches <= 1,
        "the snapshot is not one pass's prefix over the previous pass ({switches} switches)"
    );
    eprintln!("snapshot: {from_old} blocks of generation 1, {from_new} of generation 2");

    // Clone it; the source's head moves on to generation 3 meanwhile.
    let clone = c
        .start_engine(
            &EngineSpec::new("copy", "24MiB", &[3, 4, 5])
                .arg("--clone-from", &src_control)
                .arg("--clone-snapshot", "mid"),
        )
        .expect("clone engine");
    let clone_control = c.engines[clone].control.to_string();
    let third = c.path().join("gen3");
    std::fs::write(&third, generation(3)).unwrap();
    let mut mover = Command::new("nbdcopy")
        .args(["--flush", &third.display().to_string(), &uri])
        .spawn()
        .expect("nbdcopy");
    let seen = c.read_back(clone, SIZE).unwrap();
    assert!(seen == snap, "the clone, read at once, is not the snapshot");
    let moved =
        corral_tests::wait_exit(&mut mover, Duration::from_secs(120), "the source's writer")
            .expect("the source's writer ends");
    assert!(moved.success());
    let status = ok_json(
        c.corral(&[
            "volume",
            "--engine",
            &clone_control,
            "--json",
            "clone",
            "status",
            "--wait",
            "60s",
        ])
        .unwrap(),
    );
    assert_eq!(status["done"], true, "{status}");
    assert_eq!(status["snapshot"], "mid", "{status}");
    assert_eq!(status["total_bytes"], SIZE as u64, "{status}");
    let seen = c.read_back(clone, SIZE).unwrap();
    assert!(seen == snap, "the filled clone is not the snapshot");
    let verify = c
        .corral(&["volume", "--engine", &clone_control, "verify"])
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    // A named snapshot stays on the source.
    let listed = ok_json(
        c.corral(&[
            "volume",
            "--engine",
            &src_control,
            "--json",
            "snapshot",
            "ls",
        ])
        .unwrap(),
    );
    assert_eq!(listed["snapshots"][0]["name"], "mid", "{listed}");

    // A clone of the clone: of the whole volume, so it takes a snapshot.
    let second = c
        .start_engine(
            &EngineSpec::new("copy2", "24MiB", &[6, 7, 8]).arg("--clone-from", &clone_control),
        )
        .expect("second clone engine");
    let seen = c.read_back(second, SIZE).unwrap();
    assert!(seen == snap, "the clone of the clone");
    let second_control = c.engines[second].control.to_string();
    ok_json(
        c.corral(&[
            "volume",
            "--engine",
            &second_control,
            "--json",
            "clone",
            "status",
            "--wait",
            "60s",
        ])
        .unwrap(),
    );
    c.wait_until(
        Duration::from_secs(20),
        "the snapshot taken for the second clone to be deleted",
        |c| {
            c.corral(&[
                "volume",
                "--engine",
                &clone_control,
                "--json",
                "snapshot",
                "ls",
            ])
            .ok()
            .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
            .is_some_and(|v| v["snapshots"].as_array().is_some_and(Vec::is_empty))
        },
    )
    .unwrap();

    // Bad flags: one clear line each.
    let out = c
        .corral(&[
            "engine",
            "--volume",
            "x",
            "--size",
            "1MiB",
            "--replica",
            "127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--clone-snapshot",
            "mid",
        ])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--clone-from"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c
        .corral(&["volume", "--engine", &src_control, "clone", "status"])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a clone"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
