//! When file I/O may run on the async thread that asked for it.
//!
//! Handing every small `pread`/`pwrite` to tokio's blocking pool costs more
//! than the I/O itself when the page cache serves it: a pool thread is woken,
//! and then it wakes a runtime worker (two futex round trips and one or two
//! context switches per I/O, measured in docs/benchmarks.md). Running the
//! call inline is cheap but must not park a runtime worker on the disk.
//!
//! Two tools here keep both properties:
//! - [`pread_nowait`]: a positional read with `RWF_NOWAIT`, which the kernel
//!   serves only from the page cache and otherwise refuses with `EAGAIN`
//!   (the caller then goes to the pool);
//! - [`InlineGate`]: for writes, which Linux filesystems mostly cannot do
//!   with `RWF_NOWAIT` when buffered, an adaptive rule: small writes run
//!   inline, and one that blocked — the thread gave up the CPU while in the
//!   call (dirty page throttling, a page read for a partial write, a lock
//!   held by a flush), counted by the kernel as a voluntary context switch —
//!   sends every caller of that gate to the pool for [`OFFLOAD_FOR`]. A
//!   stall therefore costs a runtime worker once per back-off period, not
//!   once per I/O. Being preempted (an involuntary switch, common on a busy
//!   machine) is not blocking and does not close the gate.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a gate stays closed after an inline call blocked.
pub const OFFLOAD_FOR: Duration = Duration::from_millis(200);
/// Writes larger than this always go to the pool (copying them into the page
/// cache alone takes tens of microseconds).
pub const MAX_INLINE_BYTES: usize = 128 << 10;

/// Decides, per device, whether an I/O may run inline now.
#[derive(Debug)]
pub struct InlineGate {
    origin: Instant,
    /// Nanoseconds after `origin` before which I/O goes to the pool.
    closed_until: AtomicU64,
}

impl Default for InlineGate {
    fn default() -> Self {
        InlineGate {
            origin: Instant::now(),
            closed_until: AtomicU64::new(0),
        }
    }
}

impl InlineGate {
    fn now_nanos(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// True when an I/O of `bytes` may run inline now.
    pub fn allows(&self, bytes: usize) -> bool {
        bytes <= MAX_INLINE_BYTES && self.now_nanos() >= self.closed_until.load(Ordering::Relaxed)
    }

    /// Close the gate for [`OFFLOAD_FOR`] from now.
    pub fn close(&self) {
        let until = self
            .now_nanos()
            .saturating_add(OFFLOAD_FOR.as_nanos() as u64);
        self.closed_until.fetch_max(until, Ordering::Relaxed);
    }

    /// Run `f` inline on this thread; close the gate if it blocked.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        let before = voluntary_switches();
        let out = f();
        if before.is_none() || voluntary_switches() != before {
            self.close();
        }
        out
    }
}

/// Voluntary context switches of the calling thread so far (times it waited
/// for something). `None` where the kernel cannot tell; the gate then treats
/// every inline call as having blocked, which keeps the pool's behaviour.
fn voluntary_switches() -> Option<i64> {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into `usage`, which we own.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    if rc == 0 {
        Some(usage.ru_nvcsw as i64)
    } else {
        None
    }
}

/// Read exactly `buf.len()` bytes at `offset` from the page cache only.
/// `Ok(false)` means the data is not (all) cached, or the kernel or
/// filesystem does not support `RWF_NOWAIT`: read it the blocking way.
pub fn pread_nowait(file: &File, buf: &mut [u8], offset: u64) -> io::Result<bool> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Ok(false);
    };
    // SAFETY: `iov` describes `buf`, which is valid for writes of its length
    // for the whole call; the descriptor is owned by `file`.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN)
            | Some(libc::EOPNOTSUPP)
            | Some(libc::ENOSYS)
            | Some(libc::EINVAL) => Ok(false),
            _ => Err(err),
        };
    }
    // A short read is a partly cached range (or end of file): not done.
    Ok(n as usize == buf.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn cached_reads_succeed_inline() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[5u8; 8192]).unwrap();
        let mut buf = [0u8; 4096];
        // Just written, so in the page cache (or unsupported: then false).
        if pread_nowait(&f, &mut buf, 4096).unwrap() {
            assert_eq!(buf, [5u8; 4096]);
        }
        // Past the end of the file: never a full read.
        assert!(!pread_nowait(&f, &mut buf, 1 << 20).unwrap());
    }

    #[test]
    fn a_call_that_blocks_closes_the_gate_for_a_while() {
        let gate = InlineGate::default();
        assert!(gate.allows(4096));
        assert!(!gate.allows(MAX_INLINE_BYTES + 1));
        // Pure computation does not give up the CPU voluntarily.
        let sum = gate.run(|| (0..1000u64).sum::<u64>());
        assert_eq!(sum, 499_500);
        assert!(gate.allows(4096));
        // Sleeping does.
        gate.run(|| std::thread::sleep(Duration::from_millis(2)));
        assert!(!gate.allows(4096));
    }
}
