//! Backups (issue 12): backup and restore throughput against what the
//! object store itself takes and gives, in one run on this machine.
//!
//! - **ceilings**: raw `object_store` PUTs of 64 MiB objects of random
//!   bytes to an s3s-fs on loopback (three at once, as a backup uploads
//!   packs), and ranged 8 MiB GETs of them (four at once, as a restore
//!   reads ahead);
//! - **full backup**: a 3-replica volume filled with random bytes, backed up
//!   with `corral volume backup create` to the same s3s-fs; objects put per
//!   GiB and requests;
//! - **incremental backups**: after a 1% change as contiguous 1 MiB
//!   writes, and after a 1% change as 4 KiB random writes (which touch
//!   about 15% of the 64 KiB blocks), each timed against the full one;
//! - **restore**: `corral engine --from-backup` into a new volume on three
//!   other replica daemons, until filled, against the raw GET rate.
//!
//! The machine's speed drifts by tens of percent within minutes (a shared
//! VM), so the ceilings and what they bound are measured side by side, in
//! `--rounds` rounds: raw PUTs and raw GETs, then a full backup to a prefix
//! of its own and a restore of it. Each round's ratios are its own, and the
//! summary is their median. Every timed phase starts after a `sync`, so
//! none of them pays for writing back what the phase before it left in the
//! page cache.
//!
//! Both PUT phases write into page-cache pages just freed: the raw PUTs
//! into those of the round before's backup (or of the volume's fill data),
//! the backup into those of the raw objects, deleted right before it. This
//! VM reports free pages to its host (virtio-balloon free page reporting),
//! and the first write to a page the host has taken back costs a fault on
//! the host: s3s-fs spent 46% of its time copying the backup's packs into
//! the page cache against 13% for the raw objects when only the raw PUTs
//! had fresh pages — a cost of the machine, not of either client.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use clap::Args;
use corral_backup::target::Target;
use corral_tests::s3::S3Server;
use corral_tests::tools::{fio_nbd, random_file};
use corral_tests::{Cluster, EngineSpec, poll};
use serde_json::Value;

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Volume size (and raw PUT/GET volume) in MiB.
    #[arg(long, default_value_t = 2048)]
    size_mib: u64,
    /// Rounds of (raw PUTs, raw GETs, full backup, restore).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

const OBJECT: usize = 64 << 20;
const SPAN: u64 = 8 << 20;

/// Writes every dirty page back before a timed phase, so each phase starts
/// from the same state: no phase pays for the writeback of the one before
/// (the raw objects, the volume's fill, the backups' packs), which on this
/// one disk otherwise lands on whichever phase comes next.
fn settle() -> Result<()> {
    corral_tests::tools::run_ok("sync", &[], Duration::from_secs(300))?;
    Ok(())
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn raw_objects(total: u64) -> usize {
    (total as usize).div_ceil(OBJECT)
}

/// The raw PUT rate (MiB/s): `total` bytes as 64 MiB objects under `raw/`,
/// three at once. The objects stay for [`raw_get`].
fn raw_put(rt: &tokio::runtime::Runtime, target: &Target, total: u64) -> Result<f64> {
    use futures::StreamExt;
    let mut base = vec![0u8; OBJECT];
    rand::Rng::fill(&mut rand::rng(), &mut base[..]);
    let base = Bytes::from(base);
    let n = raw_objects(total);
    settle()?;
    rt.block_on(async {
        let start = Instant::now();
        let puts = futures::stream::iter(0..n)
            .map(|i| {
                let mut obj = base.to_vec();
                obj[..8].copy_from_slice(&(i as u64).to_be_bytes());
                async move { target.put_new(&format!("raw/{i}"), Bytes::from(obj)).await }
            })
            .buffer_unordered(3)
            .collect::<Vec<_>>()
            .await;
        for p in puts {
            p?;
        }
        Ok(mib_s((n * OBJECT) as u64, start.elapsed()))
    })
}

/// The raw GET rate (MiB/s) of what [`raw_put`] left, in 8 MiB ranges, four
/// at once; then deletes it.
fn raw_get(rt: &tokio::runtime::Runtime, target: &Target, total: u64) -> Result<f64> {
    use futures::StreamExt;
    let n = raw_objects(total);
    let spans: Vec<(usize, u64)> = (0..n)
        .flat_map(|i| (0..OBJECT as u64 / SPAN).map(move |s| (i, s * SPAN)))
        .collect();
    settle()?;
    rt.block_on(async {
        let start = Instant::now();
        let gets = futures::stream::iter(spans)
            .map(
                |(i, at)| async move { target.get_range(&format!("raw/{i}"), at..at + SPAN).await },
            )
            .buffer_unordered(4)
            .collect::<Vec<_>>()
            .await;
        let mut got = 0u64;
        for g in gets {
            got += g?.len() as u64;
        }
        let get = mib_s(got, start.elapsed());
        for i in 0..n {
            target.delete(&format!("raw/{i}")).await?;
        }
        Ok(get)
    })
}

/// The median of `values` (the upper one of an even count).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The write bandwidth fio's text output reports, in MiB/s.
fn fio_write_mib_s(text: &str) -> Result<f64> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("WRITE: bw="))
        .ok_or_else(|| anyhow::anyhow!("no WRITE line in fio's output:\n{text}"))?;
    let bw = line.trim_start().trim_start_matches("WRITE: bw=");
    let end = bw
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .unwrap_or(bw.len());
    let value: f64 = bw[..end].parse()?;
    let unit = &bw[end..];
    Ok(if unit.starts_with("GiB") {
        value * 1024.0
    } else if unit.starts_with("KiB") {
        value / 1024.0
    } else {
        value
    })
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() { count_files(&p) } else { 1 }
        })
        .sum()
}

/// Backs the volume up as `name` under `prefix` of the bench's bucket.
fn backup(
    c: &Cluster,
    control: &str,
    s3: &S3Server,
    prefix: &str,
    name: &str,
) -> Result<(Duration, Value)> {
    let url = s3.url(prefix);
    let endpoint = s3.endpoint();
    settle()?;
    let start = Instant::now();
    let out = c.corral(&[
        "volume",
        "--engine",
        control,
        "--json",
        "backup",
        "create",
        "--target",
        &url,
        "--s3-endpoint",
        &endpoint,
        "--name",
        name,
    ])?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("backup {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((took, serde_json::from_slice(&out.stdout)?))
}

/// Restores `from` into a new volume `name` on daemons 3, 4 and 5, until
/// filled; how long that took from the engine's start.
fn restore(
    c: &mut Cluster,
    s3: &S3Server,
    size_arg: &str,
    name: &str,
    from: &str,
) -> Result<(usize, Duration)> {
    settle()?;
    let start = Instant::now();
    let r = c.spawn_engine(
        &EngineSpec::new(name, size_arg, &[3, 4, 5])
            .arg("--from-backup", from)
            .arg("--s3-endpoint", &s3.endpoint()),
    )?;
    // One `clone status --wait` (polling twice a second, waiting out the
    // engine's open), not a `volume info` per poll: the bench's own load
    // stays off the measurement.
    poll(
        Duration::from_secs(60),
        "the restore engine to answer",
        || {
            if let Some(status) = c.engines[r].process.exited() {
                bail!(
                    "the restore engine exited: {status}\n{}",
                    c.engines[r].process.log_text()
                );
            }
            Ok(c.volume_info(r).ok().map(|_| ()))
        },
    )?;
    let r_control = c.engines[r].control.to_string();
    let out = c.corral(&[
        "volume", "--engine", &r_control, "--json", "clone", "status", "--wait", "1800s",
    ])?;
    if !out.status.success() {
        bail!(
            "the restore did not finish: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let took = start.elapsed();
    for line in c.engines[r].process.log_text().lines() {
        if line.contains("clone fill") || line.contains("restored from a backup") {
            eprintln!("{line}");
        }
    }
    Ok((r, took))
}

/// One round's measurements (MiB/s and seconds).
struct Round {
    raw_put: f64,
    full: Duration,
    raw_get: f64,
    restore: Duration,
}

pub fn run(args: &BackupArgs) -> Result<()> {
    let size = args.size_mib << 20;
    let rounds = args.rounds.max(1);
    let s3 = S3Server::start()?;
    // The engines read the keys from their environment (never the command
    // line); they inherit this process's.
    // SAFETY: set before any thread of this process is started.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", s3.access_key());
        std::env::set_var("AWS_SECRET_ACCESS_KEY", s3.secret_key());
        std::env::set_var("AWS_REGION", "us-east-1");
    }
    let rt = tokio::runtime::Runtime::new()?;
    let target = Target::open(&s3.url("raw-ceiling"), &s3.settings()?)?;

    let mut c = Cluster::with_replicas(6)?;
    let size_arg = format!("{}MiB", args.size_mib);
    let e = c.start_engine(&EngineSpec::new("bk", &size_arg, &[0, 1, 2]))?;
    let control = c.engines[e].control.to_string();
    let data = c.path().join("data");
    random_file(&data, size as usize, 12)?;
    c.write_flushed(e, &data)?;
    std::fs::remove_file(&data)?;

    let mut measured = Vec::new();
    let mut full = Value::Null;
    let mut objects = 0;
    let mut restored: Option<usize> = None;
    for k in 1..=rounds {
        // The round before's restored volume is idle; its engine goes.
        if let Some(r) = restored.take() {
            c.engines[r].process.terminate(Duration::from_secs(20))?;
        }
        // The round before's backup goes too: the raw PUTs then write into
        // the pages it frees, as the backup writes into those the raw
        // objects free (see the module docs).
        if k > 1 {
            std::fs::remove_dir_all(s3.bucket_dir().join(format!("round-{}", k - 1)))?;
        }
        let raw_put = raw_put(&rt, &target, size)?;
        let raw_get = raw_get(&rt, &target, size)?;
        let prefix = format!("round-{k}");
        let (full_t, stats) = backup(&c, &control, &s3, &prefix, "full")?;
        eprintln!(
            "round {k}: raw PUT {raw_put:.0} MiB/s, raw GET {raw_get:.0} MiB/s, full backup {full_t:?} {stats}"
        );
        if k == 1 {
            full = stats;
            objects = count_files(&s3.bucket_dir().join(&prefix));
        }
        let from = format!("{}/bk/full", s3.url(&prefix));
        let (r, restore_t) = restore(&mut c, &s3, &size_arg, &format!("restored-{k}"), &from)?;
        eprintln!("round {k}: restore {restore_t:?}");
        restored = Some(r);
        measured.push(Round {
            raw_put,
            full: full_t,
            raw_get,
            restore: restore_t,
        });
    }
    // Incremental backups of the last round's full one, in its prefix.
    let last = format!("round-{rounds}");
    let uri = c.engines[e].nbd_uri();
    let one_pct = format!("--io_size={}k", size / 100 / 1024);
    fio_nbd(
        &uri,
        "contiguous",
        &["--rw=randwrite", "--bs=1m", &one_pct, "--randrepeat=0"],
        Duration::from_secs(300),
    )?;
    let (inc_t, inc) = backup(&c, &control, &s3, &last, "inc-contiguous")?;
    eprintln!("incremental (1 MiB writes): {inc_t:?} {inc}");
    fio_nbd(
        &uri,
        "scattered",
        &[
            "--rw=randwrite",
            "--bs=4k",
            &one_pct,
            "--iodepth=32",
            "--randrepeat=0",
        ],
        Duration::from_secs(300),
    )?;
    let (inc4_t, inc4) = backup(&c, &control, &s3, &last, "inc-scattered")?;
    for line in c.engines[e].process.log_text().lines() {
        if line.contains("backup written") || line.contains("snapshot created") {
            eprintln!("{line}");
        }
    }
    eprintln!("incremental (4 KiB writes): {inc4_t:?} {inc4}");

    // What the restore writes through: the replicated write path's own
    // sequential rate, on the last restored volume, in this run.
    let r = restored.ok_or_else(|| anyhow::anyhow!("no round ran"))?;
    let text = fio_nbd(
        &c.engines[r].nbd_uri(),
        "sequential",
        &[
            "--rw=write",
            "--bs=1m",
            "--iodepth=8",
            "--runtime=8",
            "--time_based",
            "--end_fsync=1",
        ],
        Duration::from_secs(120),
    )?;
    let seq_write = fio_write_mib_s(&text)?;
    // The disk's own durable sequential writes, in the replicas' directory:
    // a restore writes three copies to it on this one machine.
    let file = c.path().join("disk-seq.fio");
    let out = corral_tests::tools::run_ok(
        "fio",
        &[
            "--name=disk",
            &format!("--filename={}", file.display()),
            "--ioengine=psync",
            "--rw=write",
            "--bs=1m",
            "--size=1024m",
            "--end_fsync=1",
        ],
        Duration::from_secs(300),
    )?;
    let disk = fio_write_mib_s(&String::from_utf8_lossy(&out.stdout))?;
    let _ = std::fs::remove_file(&file);

    let gib = size as f64 / (1u64 << 30) as f64;
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let backup_ratios: Vec<f64> = measured
        .iter()
        .map(|m| mib_s(size, m.full) / m.raw_put)
        .collect();
    let restore_ratios: Vec<f64> = measured
        .iter()
        .map(|m| mib_s(size, m.restore) / m.raw_get)
        .collect();
    let full_s: Vec<f64> = measured.iter().map(|m| m.full.as_secs_f64()).collect();
    let restore_rates: Vec<f64> = measured.iter().map(|m| mib_s(size, m.restore)).collect();
    println!("| round | raw PUT | full backup | ÷ raw PUT | raw GET | restore | ÷ raw GET |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (k, m) in measured.iter().enumerate() {
        println!(
            "| {} | {:.0} MiB/s | {:.1} s, {:.0} MiB/s | {:.2}× | {:.0} MiB/s | {:.1} s, {:.0} MiB/s | {:.2}× |",
            k + 1,
            m.raw_put,
            m.full.as_secs_f64(),
            mib_s(size, m.full),
            backup_ratios[k],
            m.raw_get,
            m.restore.as_secs_f64(),
            mib_s(size, m.restore),
            restore_ratios[k],
        );
    }
    println!();
    let full_median = median(&full_s);
    let restore_rate = median(&restore_rates);
    println!("| measure | value | ceiling (same run) | ratio |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| full backup of {} MiB of random data, each round against its own raw PUT | median {full_median:.1} s | | median {:.2}× |",
        args.size_mib,
        median(&backup_ratios)
    );
    println!(
        "| restore into 3 new replicas, each round against its own raw GET | median {:.1} s | | median {:.2}× |",
        median(
            &measured
                .iter()
                .map(|m| m.restore.as_secs_f64())
                .collect::<Vec<_>>()
        ),
        median(&restore_ratios)
    );
    println!(
        "| restore vs the volume's own writes | {restore_rate:.0} MiB/s (median) | fio 1 MiB sequential writes to a 3-replica volume, QD8 (page cache): {seq_write:.0} MiB/s | {:.2}× |",
        restore_rate / seq_write
    );
    println!(
        "| restore vs the disk (3 durable copies on one disk) | {restore_rate:.0} MiB/s ({:.0} MiB/s to the disk) | fio 1 MiB sequential writes + fsync to a file: {disk:.0} MiB/s | {:.2}× |",
        3.0 * restore_rate,
        3.0 * restore_rate / disk
    );
    println!(
        "| incremental after 1% as 1 MiB writes | {:.2} s, {} blocks read, {:.1} MiB put | full backup {full_median:.1} s (median) | {:.1}% |",
        inc_t.as_secs_f64(),
        n(&inc, "blocks_read"),
        n(&inc, "bytes_put") as f64 / (1 << 20) as f64,
        100.0 * inc_t.as_secs_f64() / full_median
    );
    println!(
        "| incremental after 1% as 4 KiB writes | {:.2} s, {} blocks read, {:.1} MiB put | full backup {full_median:.1} s (median) | {:.1}% |",
        inc4_t.as_secs_f64(),
        n(&inc4, "blocks_read"),
        n(&inc4, "bytes_put") as f64 / (1 << 20) as f64,
        100.0 * inc4_t.as_secs_f64() / full_median
    );
    println!(
        "| objects after the full backup | {objects} ({:.1} per GiB: {} packs, {} pages, 1 manifest) | Longhorn: 512 per GiB | |",
        objects as f64 / gib,
        n(&full, "packs_put"),
        n(&full, "pages_put")
    );
    println!(
        "| PUT requests of the full backup | {} (+ 2 lease puts, 1 per pack to record it in the lease) | | |",
        n(&full, "packs_put") + n(&full, "pages_put") + 1
    );
    Ok(())
}
