//! Shared pieces of corral's fuzz targets (`fuzz_targets/`): the input
//! formats every target reads (so the seed writer, `examples/write_seeds.rs`,
//! produces inputs the targets understand), an in-memory [`MemDevice`] for
//! the SCSI target, and the fixed configurations the targets run against.
//!
//! Every input format is "a few header bytes, then records" and tolerates
//! any byte string: a truncated record ends the input, it is never an error.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use corral_block::{BlockDevice, BlockResult, check_range};

/// Reads the fields of an input front to back; reads past the end yield
/// zeroes / empty slices, so a target never has to handle "too short".
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
}

/// Split `data` into pieces whose sizes cycle through `sizes` (each at least
/// one byte): the same bytes delivered as a socket might deliver them.
pub fn pieces<'a>(data: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let want = sizes.get(i % sizes.len().max(1)).copied().unwrap_or(255);
        let n = usize::from(want.max(1)).min(rest.len());
        let (head, tail) = rest.split_at(n);
        out.push(head);
        rest = tail;
        i += 1;
    }
    out
}

/// A block device in memory for the SCSI target. `Small` keeps every byte
/// (so COMPARE AND WRITE, VERIFY and the like see real data); `Huge`
/// reports a 1 PiB device whose reads return zeroes and whose writes are
/// dropped, to reach the size and range arithmetic of big LBAs.
pub struct MemDevice {
    size: u64,
    block_size: u32,
    data: Option<Mutex<Vec<u8>>>,
    reservations: Mutex<Option<Bytes>>,
}

impl MemDevice {
    /// A device of `size` bytes kept in memory.
    pub fn small(size: u64, block_size: u32) -> Arc<Self> {
        Arc::new(MemDevice {
            size,
            block_size,
            data: Some(Mutex::new(vec![0; size as usize])),
            reservations: Mutex::new(None),
        })
    }

    /// A 1 PiB device that keeps nothing.
    pub fn huge(block_size: u32) -> Arc<Self> {
        Arc::new(MemDevice {
            size: 1 << 50,
            block_size,
            data: None,
            reservations: Mutex::new(None),
        })
    }

    fn store(&self, offset: u64, src: Option<&[u8]>, len: u64) {
        if let Some(data) = &self.data {
            let mut d = data.lock().unwrap_or_else(|p| p.into_inner());
            let range = offset as usize..(offset + len) as usize;
            match src {
                Some(src) => d[range].copy_from_slice(src),
                None => d[range].fill(0),
            }
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        check_range(offset, u64::from(len), self.size)?;
        Ok(match &self.data {
            Some(data) => {
                let d = data.lock().unwrap_or_else(|p| p.into_inner());
                Bytes::copy_from_slice(&d[offset as usize..offset as usize + len as usize])
            }
            None => Bytes::from(vec![0; len as usize]),
        })
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> BlockResult<()> {
        check_range(offset, data.len() as u64, self.size)?;
        self.store(offset, Some(&data), data.len() as u64);
        Ok(())
    }
    async fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    async fn unmap(&self, offset: u64, len: u64) -> BlockResult<()> {
        check_range(offset, len, self.size)?;
        self.store(offset, None, len);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> BlockResult<()> {
        check_range(offset, len, self.size)?;
        self.store(offset, None, len);
        Ok(())
    }
    async fn load_reservations(&self) -> BlockResult<Option<Bytes>> {
        Ok(self
            .reservations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }
    async fn save_reservations(&self, state: Bytes) -> BlockResult<()> {
        *self.reservations.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
        Ok(())
    }
}

/// The iSCSI login target's portal: one target without CHAP, one with
/// one-way CHAP and one with mutual CHAP.
pub mod login {
    use std::sync::Arc;

    use corral_iscsi::login::{ChapConfig, LoginConfig, TargetEntry};

    pub const OPEN_TARGET: &str = "iqn.2026-11.io.corral:open";
    pub const CHAP_TARGET: &str = "iqn.2026-11.io.corral:chap";
    pub const MUTUAL_TARGET: &str = "iqn.2026-11.io.corral:mutual";
    pub const CHAP_USER: &str = "alice";
    pub const CHAP_SECRET: &str = "secretsecret";
    pub const MUTUAL_USER: &str = "target";
    pub const MUTUAL_SECRET: &str = "targetsecret";
    /// A CHAP_R value the target replaces with the right answer to its
    /// challenge, so the fuzzer gets past authentication.
    pub const AUTO_RESPONSE: &str = "auto";

    pub fn config() -> Arc<LoginConfig> {
        Arc::new(LoginConfig {
            targets: vec![
                TargetEntry {
                    name: OPEN_TARGET.into(),
                    alias: Some("open".into()),
                    chap: None,
                },
                TargetEntry {
                    name: CHAP_TARGET.into(),
                    alias: None,
                    chap: Some(ChapConfig {
                        user: CHAP_USER.into(),
                        secret: CHAP_SECRET.into(),
                        mutual: None,
                    }),
                },
                TargetEntry {
                    name: MUTUAL_TARGET.into(),
                    alias: None,
                    chap: Some(ChapConfig {
                        user: CHAP_USER.into(),
                        secret: CHAP_SECRET.into(),
                        mutual: Some((MUTUAL_USER.into(), MUTUAL_SECRET.into())),
                    }),
                },
            ],
            limits: corral_iscsi::Limits::default(),
            portal_group: 1,
        })
    }
}

/// The replica target's volume geometry.
pub mod replica {
    /// Volume size: four 1 MiB write-intent regions.
    pub const SIZE: u64 = 4 << 20;
    pub const BLOCK_SIZE: u32 = 512;
    pub const CHUNK_SIZE: u32 = 64 << 10;
    /// The epoch the replica is opened at; requests carrying epoch 0 are
    /// given this one (so most inputs get past fencing), others keep theirs.
    pub const EPOCH: u64 = 7;
}
