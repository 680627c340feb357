//! CPU per I/O split by stage, from `perf` (issue 13, item 1).
//!
//! [`Profile::record`] runs `perf record -g` on one process for a while;
//! [`split`] reads the profile's self time per symbol (`perf report
//! --no-children --sort symbol`) and files each symbol under the first
//! stage whose pattern it matches: the kernel's page-cache writes, its
//! loopback TCP, its wake-ups and sleeps, tokio, gRPC (prost, tonic, h2,
//! hyper), copies, CRC32C, the allocator, corral's own crates, and so on.
//! The grouping is by name, so it is approximate (an inlined function is
//! counted where it was inlined), but it is the same grouping before and
//! after a change, which is what a comparison needs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// A stage's name and the symbol fragments that put a symbol in it. The
/// first stage with a matching fragment wins; kernel stages match only
/// kernel symbols (`[k]`), by prefix once leading underscores are dropped
/// (`__tcp_push` is `tcp_`), the others only user-space ones, anywhere in
/// the (Rust path) name.
const STAGES: &[(&str, bool, &[&str])] = &[
    (
        "kernel: page-cache writes (ext4, folios)",
        true,
        &[
            "ext4_",
            "filemap_",
            "xas_",
            "folio",
            "block_",
            "mark_buffer",
            "copy_folio",
            "generic_perform_write",
            "balance_dirty",
            "file_update_time",
            "xa_",
            "find_get",
            "create_empty_buffers",
            "mark_inode",
            "jbd2",
            "iomap",
            "submit_bio",
            "blk_",
        ],
    ),
    (
        "kernel: loopback TCP",
        true,
        &[
            "tcp_",
            "skb",
            "sock_",
            "ip_",
            "net_",
            "inet_",
            "copy_from_iter",
            "copy_to_iter",
            "dev_",
            "loopback",
            "netif",
            "process_backlog",
            "napi",
            "sk_",
            "kmem_cache",
            "kmalloc",
            "kfree",
            "check_object_size",
            "virt_addr_valid",
            "check_heap_object",
            "alloc_skb",
            "consume_skb",
            "lock_sock",
            "release_sock",
            "handle_softirqs",
            "local_bh",
            "ipv4",
            "validate_xmit",
            "x64_sys_sendmsg",
            "sys_",
            "do_iter",
            "rw_verify",
            "import_iovec",
            "iov_iter",
        ],
    ),
    (
        "kernel: wake-ups, sleeps, epoll",
        true,
        &[
            "raw_spin",
            "finish_task_switch",
            "schedule",
            "try_to_wake_up",
            "ttwu",
            "futex",
            "ep_",
            "do_epoll",
            "epoll",
            "wake_up",
            "pick_next",
            "enqueue",
            "dequeue",
            "update_",
            "select_task_rq",
            "hrtimer",
            "psi_",
            "switch_mm",
            "switch_to",
            "native_",
            "set_next",
            "put_prev",
            "sched_",
            "x64_sys_futex",
            "x64_sys_epoll",
            "reweight",
            "avg_vruntime",
            "vruntime",
            "check_preempt",
            "resched",
            "wake_",
            "cpuacct",
            "cgroup",
        ],
    ),
    ("kernel: other", true, &[""]),
    ("CRC32C", false, &["crc32c"]),
    ("copies (memmove, memcpy)", false, &["memmove", "memcpy"]),
    ("allocator", false, &["mi_", "malloc", "free", "alloc::"]),
    (
        "gRPC: prost, tonic, h2, hyper",
        false,
        &[
            "prost",
            "tonic",
            "h2::",
            "hyper",
            "http_body",
            "http::",
            "tower",
        ],
    ),
    (
        "tokio: scheduler, channels, timers, semaphores",
        false,
        &[
            "tokio",
            "mio::",
            "futures_",
            "clock_gettime",
            "__vdso",
            "epoll_wait",
            "Instant",
        ],
    ),
    (
        "corral: frontends",
        false,
        &["corral_nbd", "corral_iscsi", "corral_block"],
    ),
    ("corral: engine", false, &["corral_engine"]),
    (
        "corral: replica daemon and store",
        false,
        &["corral_replica", "corral_store"],
    ),
    ("corral: metrics", false, &["corral_metrics"]),
    ("bytes reference counts", false, &["bytes::"]),
    (
        "libc system call wrappers",
        false,
        &[
            "__libc", "__GI", "pthread", "syscall", "writev", "recv", "send", "pwrite", "pread",
        ],
    ),
];

/// What no stage claimed.
const OTHER: &str = "other user code";

/// The stage of one `perf report` symbol column (`[k] name` or `[.] name`).
pub fn stage_of(symbol: &str) -> &'static str {
    let (kernel, name) = match symbol.split_once("] ") {
        Some((tag, name)) => (tag.ends_with("[k"), name),
        None => (false, symbol),
    };
    let bare = name.trim_start_matches('_');
    let matches = |f: &&str| {
        if kernel {
            bare.starts_with(f)
        } else {
            name.contains(f)
        }
    };
    STAGES
        .iter()
        .find(|(_, k, fragments)| *k == kernel && fragments.iter().any(matches))
        .map_or(OTHER, |(stage, _, _)| stage)
}

/// Percent of samples per stage, largest first, from `perf report --stdio`
/// text (lines such as `    12.34%  [k] ext4_block_write_begin`).
pub fn split_report(text: &str) -> Vec<(&'static str, f64)> {
    let mut totals: Vec<(&'static str, f64)> = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        let Some((pct, symbol)) = line.split_once('%') else {
            continue;
        };
        let Ok(pct) = pct.trim().parse::<f64>() else {
            continue;
        };
        let stage = stage_of(symbol.trim());
        match totals.iter_mut().find(|(s, _)| *s == stage) {
            Some((_, t)) => *t += pct,
            None => totals.push((stage, pct)),
        }
    }
    totals.sort_by(|a, b| b.1.total_cmp(&a.1));
    totals
}

/// The stage split of a recorded profile.
pub fn split(data: &Path) -> Result<Vec<(&'static str, f64)>> {
    let out = Command::new("perf")
        .arg("report")
        .arg("-i")
        .arg(data)
        .args(["--no-children", "--sort", "symbol", "-g", "none", "--stdio"])
        .stderr(Stdio::null())
        .output()
        .context("running perf report")?;
    if !out.status.success() {
        bail!("perf report -i {} failed", data.display());
    }
    let split = split_report(&String::from_utf8_lossy(&out.stdout));
    if split.is_empty() {
        bail!("perf report -i {} has no samples", data.display());
    }
    Ok(split)
}

/// A `perf record` running on one process.
pub struct Profile {
    child: Child,
    pub data: PathBuf,
}

impl Profile {
    /// Sample `pid` with call graphs at 999 Hz for `seconds`, into `data`.
    pub fn record(pid: i32, seconds: u64, data: PathBuf) -> Result<Profile> {
        let child = Command::new("perf")
            .args(["record", "-F", "999", "-g", "-p", &pid.to_string(), "-o"])
            .arg(&data)
            .args(["--", "sleep", &seconds.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record (is `perf` installed?)")?;
        Ok(Profile { child, data })
    }

    /// Wait for the recording to end.
    pub fn finish(mut self) -> Result<PathBuf> {
        let status = self.child.wait().context("waiting for perf record")?;
        if !status.success() {
            bail!("perf record into {} failed", self.data.display());
        }
        Ok(self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_land_in_their_stage() {
        assert_eq!(
            stage_of("[k] ext4_block_write_begin"),
            "kernel: page-cache writes (ext4, folios)"
        );
        assert_eq!(stage_of("[k] tcp_sendmsg_locked"), "kernel: loopback TCP");
        assert_eq!(
            stage_of("[k] finish_task_switch.isra.0"),
            "kernel: wake-ups, sleeps, epoll"
        );
        assert_eq!(
            stage_of("[k] __tcp_push_pending_frames"),
            "kernel: loopback TCP"
        );
        // By prefix: `finish_task_switch` holds "sk_" but is no socket work.
        assert_eq!(
            stage_of("[k] _raw_spin_unlock_irqrestore"),
            "kernel: wake-ups, sleeps, epoll"
        );
        assert_eq!(stage_of("[k] do_syscall_64"), "kernel: other");
        assert_eq!(
            stage_of("[.] crc32c::hw_x86_64::crc_u64_parallel3"),
            "CRC32C"
        );
        assert_eq!(
            stage_of("[.] corral_engine::volume::Volume::send_round::{{closure}}"),
            "corral: engine"
        );
        // A user-space symbol never lands in a kernel stage.
        assert_eq!(stage_of("[.] tcp_helper_in_user_space"), OTHER);
    }

    #[test]
    fn a_report_is_summed_by_stage_largest_first() {
        let text = "# comment\n\
            \x20   40.00%  [k] ext4_block_write_begin\n\
            \x20   10.00%  [k] xas_load\n\
            \x20   30.00%  [.] crc32c::crc32c\n\
            \x20   20.00%  [.] something_else\n";
        let split = split_report(text);
        assert_eq!(
            split,
            vec![
                ("kernel: page-cache writes (ext4, folios)", 50.0),
                ("CRC32C", 30.0),
                (OTHER, 20.0)
            ]
        );
    }
}
