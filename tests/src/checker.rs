//! A verifying writer: writes self-describing blocks over NBD, remembers
//! which writes the engine acknowledged, and later reads the whole volume
//! back to prove that no acknowledged write was lost.
//!
//! Every 4 KiB block a writer writes holds a header (magic, the block's
//! index, the write's tag — a number unique to that write) and a body
//! derived from both, so a block read back names the write it came from and
//! a torn or misplaced block is caught. Per block the [`Checker`] keeps the
//! last acknowledged tag and the tags of writes whose outcome is unknown
//! (in flight when a connection died, or answered with an error): when
//! verifying, a block must hold its last acknowledged write or one of those
//! later unknown ones — never an older write, never garbage, never zeroes
//! once a write to it was acknowledged.
//!
//! Writers pipeline requests (`depth` in flight) over the raw NBD client
//! ([`crate::nbd_raw`]). Several writers may share a checker (even through
//! different engines) as long as they write disjoint *lanes*: the volume is
//! cut into 64 KiB stripes and writer `lane` of `lanes` writes only stripes
//! `s` with `s % lanes == lane`. Within a writer, no two writes in flight
//! touch the same stripe, so the order of a block's writes is the order in
//! which they were sent.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};

use crate::nbd_raw::{CMD_FLUSH, CMD_WRITE, RawNbd};

/// The unit of checking.
pub const BLOCK: u64 = 4096;
/// Blocks per stripe; a write stays inside one stripe.
pub const STRIPE_BLOCKS: u64 = 16;
const STRIPE: u64 = BLOCK * STRIPE_BLOCKS;
const MAGIC: [u8; 8] = *b"corralck";
/// Cookies of flush requests have this bit set (write cookies are tags).
const FLUSH_COOKIE: u64 = 1 << 63;

/// The content a write of tag `tag` puts in block `block`.
pub fn pattern(block: u64, tag: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len() as u64, BLOCK);
    out[0..8].copy_from_slice(&MAGIC);
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..24].copy_from_slice(&tag.to_le_bytes());
    let mut x =
        (block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ tag.wrapping_mul(0xD1B5_4A32_D192_ED03)) | 1;
    for piece in out[24..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        piece.copy_from_slice(&x.to_le_bytes()[..piece.len()]);
    }
}

/// Which write block `block`'s content `data` came from: Ok(0) for zeroes
/// (never written), Ok(tag), or what is wrong with it.
pub fn parse(block: u64, data: &[u8]) -> std::result::Result<u64, String> {
    if data.iter().all(|b| *b == 0) {
        return Ok(0);
    }
    if data[0..8] != MAGIC {
        return Err("garbage (no write's header)".into());
    }
    let at = u64::from_le_bytes(data[8..16].try_into().unwrap());
    let tag = u64::from_le_bytes(data[16..24].try_into().unwrap());
    if at != block {
        return Err(format!("holds write #{tag} meant for block {at}"));
    }
    let mut expected = vec![0u8; BLOCK as usize];
    pattern(block, tag, &mut expected);
    if expected != data {
        return Err(format!("torn or corrupt copy of write #{tag}"));
    }
    Ok(tag)
}

#[derive(Clone, Default)]
struct BlockState {
    /// Tag of the last acknowledged write (0: none).
    acked: u64,
    /// Tag of the last write acknowledged before a flush that was
    /// acknowledged too (0: none): what survives even a power loss.
    flushed: u64,
    /// Tags of later writes whose outcome is unknown.
    pending: Vec<u64>,
}

struct Model {
    blocks: Vec<BlockState>,
}

/// The record of every write to one volume, shared by its writers.
#[derive(Clone)]
pub struct Checker {
    size: u64,
    model: Arc<Mutex<Model>>,
    next_tag: Arc<AtomicU64>,
}

/// What a writer writes.
#[derive(Clone, Debug)]
pub struct Load {
    /// This writer writes stripes `s` with `s % lanes == lane`.
    pub lane: u64,
    pub lanes: u64,
    /// Requests in flight.
    pub depth: usize,
    /// Largest write in blocks (1..=16).
    pub max_blocks: u64,
    /// Send a flush after this many writes (0: never).
    pub flush_every: u32,
    /// Random stripes (seeded), or every stripe of the range in order with
    /// whole-stripe writes.
    pub sequential: bool,
    /// Byte range written (stripe aligned); `None`: the whole volume.
    pub range: Option<(u64, u64)>,
    pub seed: u64,
    /// Stop once this many bytes were sent (`None`: until stopped; a
    /// sequential load stops at the end of its range anyway).
    pub limit_bytes: Option<u64>,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            lane: 0,
            lanes: 1,
            depth: 4,
            max_blocks: STRIPE_BLOCKS,
            flush_every: 32,
            sequential: false,
            range: None,
            seed: 1,
            limit_bytes: None,
        }
    }
}

impl Load {
    /// Random writes of 4–64 KiB in lane `lane` of `lanes`.
    pub fn lane(lane: u64, lanes: u64) -> Self {
        Load {
            lane,
            lanes,
            seed: 1 + lane,
            ..Default::default()
        }
    }

    /// Write every stripe of `offset..offset+len` once, in order.
    pub fn fill(offset: u64, len: u64) -> Self {
        Load {
            sequential: true,
            range: Some((offset, offset + len)),
            depth: 8,
            ..Default::default()
        }
    }

    /// Stop after `bytes` were sent.
    pub fn bytes(mut self, bytes: u64) -> Self {
        self.limit_bytes = Some(bytes);
        self
    }
}

/// Live counters of one writer.
#[derive(Default)]
pub struct Stats {
    sent_writes: AtomicU64,
    sent_bytes: AtomicU64,
    acked_writes: AtomicU64,
    acked_bytes: AtomicU64,
    failed_writes: AtomicU64,
    flushes: AtomicU64,
    failed_flushes: AtomicU64,
    disconnected: AtomicBool,
    last_error: Mutex<Option<String>>,
}

/// A writer's counters at one moment.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub sent_writes: u64,
    pub sent_bytes: u64,
    pub acked_writes: u64,
    pub acked_bytes: u64,
    /// Writes answered with an error.
    pub failed_writes: u64,
    pub flushes: u64,
    pub failed_flushes: u64,
    /// Writes (and flushes) answered with an error, or lost with the connection.
    pub errors: u64,
    pub last_error: Option<String>,
    /// The connection broke (the writer stopped).
    pub disconnected: bool,
}

impl Stats {
    fn summary(&self) -> Summary {
        let g = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let disconnected = self.disconnected.load(Ordering::SeqCst);
        Summary {
            sent_writes: g(&self.sent_writes),
            sent_bytes: g(&self.sent_bytes),
            acked_writes: g(&self.acked_writes),
            acked_bytes: g(&self.acked_bytes),
            failed_writes: g(&self.failed_writes),
            flushes: g(&self.flushes),
            failed_flushes: g(&self.failed_flushes),
            errors: g(&self.failed_writes) + g(&self.failed_flushes) + u64::from(disconnected),
            last_error: lock(&self.last_error).clone(),
            disconnected,
        }
    }

    fn error(&self, what: String) {
        *lock(&self.last_error) = Some(what);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What [`Checker::verify`] found.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub blocks: u64,
    /// Blocks with at least one acknowledged write.
    pub acked_blocks: u64,
    /// Blocks holding a write whose outcome was unknown (not an error).
    pub unknown_outcome_blocks: u64,
}

impl Checker {
    /// A checker for a volume of `size` bytes that nobody has written yet.
    pub fn new(size: u64) -> Self {
        Checker {
            size,
            model: Arc::new(Mutex::new(Model {
                blocks: vec![BlockState::default(); (size / BLOCK) as usize],
            })),
            next_tag: Arc::new(AtomicU64::new(1)),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Run `load` against `addr`/`export` in this thread until it is done
    /// (its byte limit or range). Errors only if the connection fails to open.
    pub fn write(&self, addr: SocketAddr, export: &str, load: Load) -> Result<Summary> {
        let stats = Arc::new(Stats::default());
        let never = AtomicBool::new(false);
        let mut w = Writer::connect(self.clone(), addr, export, load, Arc::clone(&stats))?;
        w.run(&never);
        Ok(stats.summary())
    }

    /// Like [`Checker::write`], but fail unless every write was acknowledged.
    pub fn write_ok(&self, addr: SocketAddr, export: &str, load: Load) -> Result<Summary> {
        let s = self.write(addr, export, load)?;
        if s.errors > 0 {
            bail!("writes failed: {s:?}");
        }
        Ok(s)
    }

    /// Run `load` in a background thread until stopped (or done).
    pub fn start(&self, addr: SocketAddr, export: &str, load: Load) -> Result<Background> {
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut w = Writer::connect(self.clone(), addr, export, load, Arc::clone(&stats))?;
        let handle = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("checker-writer".into())
                .spawn(move || w.run(&stop))?
        };
        Ok(Background {
            stop,
            stats,
            handle: Some(handle),
        })
    }

    /// The content block `block` must have now, if that is known (its last
    /// write was acknowledged and no later one is of unknown outcome).
    pub fn expected(&self, block: u64) -> Option<Vec<u8>> {
        let model = lock(&self.model);
        let st = &model.blocks[block as usize];
        if !st.pending.is_empty() {
            return None;
        }
        let mut out = vec![0u8; BLOCK as usize];
        if st.acked != 0 {
            pattern(block, st.acked, &mut out);
        }
        Some(out)
    }

    /// Blocks whose last write was acknowledged (and nothing since is unknown).
    pub fn acked_blocks(&self) -> Vec<u64> {
        let model = lock(&self.model);
        (0..model.blocks.len() as u64)
            .filter(|b| {
                let st = &model.blocks[*b as usize];
                st.acked != 0 && st.pending.is_empty()
            })
            .collect()
    }

    /// Read the whole volume through `addr`/`export` and check every block:
    /// an error lists the blocks that lost an acknowledged write.
    pub fn verify(&self, addr: SocketAddr, export: &str) -> Result<VerifyReport> {
        let mut nbd = RawNbd::connect(addr, export).context("checker: connect to verify")?;
        if nbd.size != self.size {
            bail!("export size {} != checked size {}", nbd.size, self.size);
        }
        const PIECE: u64 = 1 << 20;
        let mut report = VerifyReport::default();
        let mut problems = Vec::new();
        let mut offset = 0;
        while offset < self.size {
            let len = PIECE.min(self.size - offset);
            let data = match nbd.read(offset, len as u32)? {
                Ok(d) => d,
                Err(errno) => {
                    bail!("checker: read of {len} bytes at {offset} failed: errno {errno}")
                }
            };
            let model = lock(&self.model);
            self.check_blocks(&model, offset, &data, &mut report, &mut problems);
            offset += len;
        }
        if !problems.is_empty() {
            let n = problems.len();
            problems.truncate(20);
            bail!(
                "{n} block(s) lost acknowledged writes:\n{}",
                problems.join("\n")
            );
        }
        Ok(report)
    }

    /// Send one NBD flush through `addr`/`export` and wait for it.
    pub fn flush(&self, addr: SocketAddr, export: &str) -> Result<()> {
        let mut nbd = RawNbd::connect(addr, export).context("checker: connect to flush")?;
        match nbd.flush()? {
            Ok(()) => Ok(()),
            Err(errno) => bail!("flush failed: errno {errno}"),
        }
    }

    /// Check every block of a replica's data file read directly from its
    /// disk (`head.img`, with the daemon stopped): the same rules as
    /// [`Checker::verify`], without any engine choosing which copy to read.
    pub fn verify_image(&self, path: &std::path::Path) -> Result<VerifyReport> {
        use std::io::Read;
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("checker: open {}", path.display()))?;
        let len = file.metadata()?.len();
        if len != self.size {
            bail!(
                "{}: {len} bytes, checked size {}",
                path.display(),
                self.size
            );
        }
        let mut report = VerifyReport::default();
        let mut problems = Vec::new();
        let mut data = vec![0u8; 1 << 20];
        let mut offset = 0;
        while offset < self.size {
            let n = (1u64 << 20).min(self.size - offset) as usize;
            file.read_exact(&mut data[..n])?;
            let model = lock(&self.model);
            self.check_blocks(&model, offset, &data[..n], &mut report, &mut problems);
            offset += n as u64;
        }
        if !problems.is_empty() {
            let n = problems.len();
            problems.truncate(20);
            bail!(
                "{}: {n} block(s) lost acknowledged writes:\n{}",
                path.display(),
                problems.join("\n")
            );
        }
        Ok(report)
    }

    /// Check the blocks of `data`, read at `offset`, against the model.
    fn check_blocks(
        &self,
        model: &Model,
        offset: u64,
        data: &[u8],
        report: &mut VerifyReport,
        problems: &mut Vec<String>,
    ) {
        for (i, block_data) in data.chunks_exact(BLOCK as usize).enumerate() {
            let block = offset / BLOCK + i as u64;
            let st = &model.blocks[block as usize];
            report.blocks += 1;
            if st.acked != 0 {
                report.acked_blocks += 1;
            }
            match parse(block, block_data) {
                Ok(tag) if tag == st.acked => {}
                Ok(tag) if st.pending.contains(&tag) => report.unknown_outcome_blocks += 1,
                Ok(tag) => problems.push(format!(
                    "block {block} (offset {}): holds {}, but write #{} was acknowledged (later writes of unknown outcome: {:?})",
                    block * BLOCK,
                    if tag == 0 { "zeroes".to_string() } else { format!("write #{tag}") },
                    st.acked,
                    st.pending
                )),
                Err(why) => problems.push(format!(
                    "block {block} (offset {}): {why}; expected write #{} (or one of {:?})",
                    block * BLOCK,
                    st.acked,
                    st.pending
                )),
            }
        }
    }

    /// Check one block read back now, by the rules of [`Checker::verify`].
    pub fn check_block(&self, block: u64, data: &[u8]) -> std::result::Result<(), String> {
        let model = lock(&self.model);
        let mut report = VerifyReport::default();
        let mut problems = Vec::new();
        self.check_blocks(&model, block * BLOCK, data, &mut report, &mut problems);
        match problems.pop() {
            None => Ok(()),
            Some(p) => Err(p),
        }
    }

    /// A flush was acknowledged: the writes `acked` (block, tag),
    /// acknowledged before it was sent, are durable.
    pub(crate) fn flushed(&self, acked: &[(u64, u64)]) {
        let mut model = lock(&self.model);
        for (block, tag) in acked {
            let st = &mut model.blocks[*block as usize];
            st.flushed = st.flushed.max(*tag);
        }
    }

    /// Blocks whose last acknowledged write is also flushed, of those with one.
    pub fn flushed_share(&self) -> (u64, u64) {
        let model = lock(&self.model);
        let acked = model.blocks.iter().filter(|b| b.acked != 0);
        let total = acked.clone().count() as u64;
        (acked.filter(|b| b.flushed == b.acked).count() as u64, total)
    }

    pub(crate) fn tag(&self) -> u64 {
        self.next_tag.fetch_add(1, Ordering::SeqCst)
    }

    pub(crate) fn sent(&self, first: u64, count: u64, tag: u64) {
        let mut model = lock(&self.model);
        for b in first..first + count {
            model.blocks[b as usize].pending.push(tag);
        }
    }

    pub(crate) fn acked(&self, first: u64, count: u64, tag: u64) {
        let mut model = lock(&self.model);
        for b in first..first + count {
            let st = &mut model.blocks[b as usize];
            st.acked = tag;
            // Earlier writes of unknown outcome are overwritten by this one
            // (a chunk's writes are applied in order); later ones may still land.
            st.pending.retain(|t| *t > tag);
        }
    }
}

/// A writer running in the background.
pub struct Background {
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    handle: Option<JoinHandle<()>>,
}

impl Background {
    /// The counters now.
    pub fn stats(&self) -> Summary {
        self.stats.summary()
    }

    /// Has the writer stopped (done, or its connection broke)?
    pub fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Wait until at least `bytes` were acknowledged in all.
    pub fn wait_acked(&self, bytes: u64, limit: Duration) -> Result<Summary> {
        crate::poll(limit, &format!("{bytes} bytes acknowledged"), || {
            let s = self.stats();
            if s.acked_bytes >= bytes {
                return Ok(Some(s));
            }
            if self.finished() {
                bail!(
                    "writer stopped having acknowledged {} of {bytes} bytes: {s:?}",
                    s.acked_bytes
                );
            }
            Ok(None)
        })
        .with_context(|| format!("{:?}", self.stats()))
    }

    /// Wait until `bytes` more than now were acknowledged.
    pub fn wait_more(&self, bytes: u64, limit: Duration) -> Result<Summary> {
        let now = self.stats().acked_bytes;
        self.wait_acked(now + bytes, limit)
    }

    /// Stop after the requests in flight are answered; the final counters.
    pub fn stop(mut self) -> Summary {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.stats.summary()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

enum InFlight {
    Write { first: u64, count: u64, stripe: u64 },
    Flush,
}

struct Writer {
    checker: Checker,
    nbd: RawNbd,
    load: Load,
    rng: rand::rngs::StdRng,
    stats: Arc<Stats>,
    inflight: HashMap<u64, InFlight>,
    busy_stripes: HashSet<u64>,
    since_flush: u32,
    cursor: u64,
    flush_seq: u64,
}

impl Writer {
    fn connect(
        checker: Checker,
        addr: SocketAddr,
        export: &str,
        load: Load,
        stats: Arc<Stats>,
    ) -> Result<Self> {
        assert!(load.lanes >= 1 && load.lane < load.lanes);
        assert!((1..=STRIPE_BLOCKS).contains(&load.max_blocks));
        let nbd = RawNbd::connect(addr, export).context("checker: connect to write")?;
        if nbd.size != checker.size {
            bail!("export size {} != checked size {}", nbd.size, checker.size);
        }
        let (start, _) = load.range.unwrap_or((0, checker.size));
        Ok(Writer {
            rng: rand::rngs::StdRng::seed_from_u64(load.seed),
            checker,
            nbd,
            stats,
            inflight: HashMap::new(),
            busy_stripes: HashSet::new(),
            since_flush: 0,
            cursor: start / STRIPE,
            flush_seq: 0,
            load,
        })
    }

    /// Stripes of this writer's lane inside its range: (first stripe, end stripe).
    fn stripes(&self) -> (u64, u64) {
        let (start, end) = self.load.range.unwrap_or((0, self.checker.size));
        (start / STRIPE, end.min(self.checker.size) / STRIPE)
    }

    /// The next write: (first block, block count), or None when done/busy.
    fn pick(&mut self) -> Option<(u64, u64, u64)> {
        let (lo, hi) = self.stripes();
        let (lane, lanes) = (self.load.lane, self.load.lanes);
        if self.load.sequential {
            while self.cursor < hi && self.cursor % lanes != lane {
                self.cursor += 1;
            }
            if self.cursor >= hi {
                return None;
            }
            let s = self.cursor;
            self.cursor += 1;
            return Some((s, s * STRIPE_BLOCKS, STRIPE_BLOCKS));
        }
        for _ in 0..16 {
            let s = self.rng.random_range(lo..hi);
            let s = s - s % lanes + lane;
            if s < lo || s >= hi || self.busy_stripes.contains(&s) {
                continue;
            }
            let count = self.rng.random_range(1..=self.load.max_blocks);
            let first_in = self.rng.random_range(0..=STRIPE_BLOCKS - count);
            return Some((s, s * STRIPE_BLOCKS + first_in, count));
        }
        None
    }

    fn done(&self) -> bool {
        self.load
            .limit_bytes
            .is_some_and(|l| self.stats.sent_bytes.load(Ordering::SeqCst) >= l)
    }

    /// Send writes and read replies until stopped or done; a broken
    /// connection ends it (what was in flight stays of unknown outcome).
    fn run(&mut self, stop: &AtomicBool) {
        let mut exhausted = false;
        loop {
            while !stop.load(Ordering::SeqCst)
                && !self.done()
                && !exhausted
                && self.inflight.len() < self.load.depth
            {
                let sent = if self.load.flush_every > 0 && self.since_flush >= self.load.flush_every
                {
                    self.since_flush = 0;
                    self.send_flush()
                } else {
                    match self.pick() {
                        Some((stripe, first, count)) => self.send_write(stripe, first, count),
                        None => {
                            // A sequential load is at the end of its range; a
                            // random one found only busy stripes: read a reply.
                            exhausted = self.load.sequential;
                            break;
                        }
                    }
                };
                if let Err(e) = sent {
                    self.broke(format!("send: {e:#}"));
                    return;
                }
            }
            if self.inflight.is_empty() {
                if exhausted || stop.load(Ordering::SeqCst) || self.done() {
                    return;
                }
                continue;
            }
            match self.nbd.reply(0) {
                Ok((cookie, error, _)) => self.answered(cookie, error),
                Err(e) => {
                    self.broke(format!("reply: {e:#}"));
                    return;
                }
            }
        }
    }

    fn send_write(&mut self, stripe: u64, first: u64, count: u64) -> Result<()> {
        let tag = self.checker.tag();
        let mut data = vec![0u8; (count * BLOCK) as usize];
        for (i, b) in data.chunks_exact_mut(BLOCK as usize).enumerate() {
            pattern(first + i as u64, tag, b);
        }
        self.checker.sent(first, count, tag);
        self.inflight.insert(
            tag,
            InFlight::Write {
                first,
                count,
                stripe,
            },
        );
        self.busy_stripes.insert(stripe);
        self.stats.sent_writes.fetch_add(1, Ordering::SeqCst);
        self.stats
            .sent_bytes
            .fetch_add(count * BLOCK, Ordering::SeqCst);
        self.since_flush += 1;
        self.nbd
            .send(CMD_WRITE, tag, first * BLOCK, data.len() as u32, &data)
    }

    fn send_flush(&mut self) -> Result<()> {
        self.flush_seq += 1;
        let cookie = FLUSH_COOKIE | self.flush_seq;
        self.inflight.insert(cookie, InFlight::Flush);
        self.nbd.send(CMD_FLUSH, cookie, 0, 0, &[])
    }

    fn answered(&mut self, cookie: u64, error: u32) {
        match self.inflight.remove(&cookie) {
            Some(InFlight::Write {
                first,
                count,
                stripe,
            }) => {
                self.busy_stripes.remove(&stripe);
                if error == 0 {
                    self.checker.acked(first, count, cookie);
                    self.stats.acked_writes.fetch_add(1, Ordering::SeqCst);
                    self.stats
                        .acked_bytes
                        .fetch_add(count * BLOCK, Ordering::SeqCst);
                } else {
                    self.stats.failed_writes.fetch_add(1, Ordering::SeqCst);
                    self.stats.error(format!(
                        "write of {} bytes at {} failed: errno {error}",
                        count * BLOCK,
                        first * BLOCK
                    ));
                    // Do not spin on a volume that refuses writes.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Some(InFlight::Flush) => {
                if error == 0 {
                    self.stats.flushes.fetch_add(1, Ordering::SeqCst);
                } else {
                    self.stats.failed_flushes.fetch_add(1, Ordering::SeqCst);
                    self.stats.error(format!("flush failed: errno {error}"));
                }
            }
            None => {
                self.stats
                    .error(format!("reply to a request never sent (cookie {cookie})"));
            }
        }
    }

    fn broke(&mut self, why: String) {
        self.stats.disconnected.store(true, Ordering::SeqCst);
        self.stats.error(format!(
            "connection lost with {} request(s) in flight: {why}",
            self.inflight.len()
        ));
        self.inflight.clear();
        self.busy_stripes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_name_their_write() {
        let mut b = vec![0u8; BLOCK as usize];
        assert_eq!(parse(7, &b), Ok(0));
        pattern(7, 42, &mut b);
        assert_eq!(parse(7, &b), Ok(42));
        assert!(parse(8, &b).is_err(), "a block written elsewhere is caught");
        b[1000] ^= 1;
        assert!(parse(7, &b).is_err(), "a flipped bit is caught");
    }
}
