//! Keeps the benchmark harness working: `corral-bench fio --quick` runs
//! every system and every job for a second. No timing is asserted; only
//! that every row is there and every job moved data.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use corral_tests::{corral_bin, run_bounded};

#[test]
fn the_fio_matrix_runs_every_system_and_job() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bench = corral_bin().with_file_name("corral-bench");
    assert!(
        bench.exists(),
        "{} is missing: cargo build --workspace --bins",
        bench.display()
    );
    let out = run_bounded(
        Command::new(&bench)
            .args(["fio", "--quick"])
            .current_dir(&root)
            .env("CORRAL_BIN", corral_bin()),
        Duration::from_secs(900),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "corral-bench failed:\n{stderr}");
    let systems = [
        "disk (fio on a file)",
        "nbdkit file (NBD)",
        "corral serve-file (NBD)",
        "corral serve-file (iSCSI)",
        "tgt (iSCSI)",
        "corral volume, 1 replica(s) (NBD)",
        "corral volume, 1 replica(s) (iSCSI)",
        "corral volume, 3 replica(s) (NBD)",
        "corral volume, 3 replica(s) (iSCSI)",
        "corral serve-file, TLS (NBD)",
        "corral volume, 3 replica(s), TLS on every hop (NBD)",
    ];
    let jobs = [
        "randread-4k-qd32",
        "randread-4k-qd1",
        "randwrite-4k-qd32",
        "randwrite-4k-qd1",
        "seqwrite-1m-qd8",
        "seqread-1m-qd8",
    ];
    for job in jobs {
        assert!(
            stdout.contains(&format!("### {job}")),
            "table for {job} missing:\n{stdout}"
        );
    }
    for system in systems {
        let rows: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with(&format!("| {system} |")))
            .collect();
        assert_eq!(
            rows.len(),
            jobs.len(),
            "{system}: one row per job:\n{stdout}"
        );
        for row in rows {
            let iops: f64 = row.split('|').nth(2).unwrap().trim().parse().unwrap();
            assert!(iops > 0.0, "{system} moved no data: {row}");
        }
    }
}
