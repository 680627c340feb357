//! Block commands (SBC-4) of the logical unit: READ CAPACITY(10/16), GET
//! LBA STATUS, READ, WRITE, WRITE AND VERIFY, VERIFY, ORWRITE, COMPARE AND
//! WRITE, WRITE SAME, UNMAP, SYNCHRONIZE CACHE, PRE-FETCH, START STOP UNIT,
//! PREVENT ALLOW MEDIUM REMOVAL and READ DEFECT DATA; and how device errors
//! map onto sense data.

use bytes::{Bytes, BytesMut};
use corral_block::{BlockDevice, BlockError};
use tracing::{debug, warn};

use crate::sense::{Sense, status};

use super::cdb::{BlockRange, be16, be32, be64};
use super::{
    CmdResult, Fail, MAX_COMPARE_AND_WRITE_BLOCKS, MAX_TRANSFER_BYTES, MAX_UNMAP_DESCRIPTORS,
    MAX_WRITE_SAME_BYTES, ScsiLun, ScsiResult,
};

/// Map a device error onto sense data.
fn device_sense(e: &BlockError, write: bool) -> Sense {
    match e {
        BlockError::OutOfRange { .. } => Sense::LBA_OUT_OF_RANGE,
        BlockError::Invalid(_) => Sense::INVALID_FIELD_IN_CDB,
        BlockError::NoSpace(_) => Sense::SPACE_ALLOCATION_FAILED,
        BlockError::Integrity(_) => Sense::UNRECOVERED_READ,
        BlockError::Unavailable(_) => Sense::NOT_READY_UNAVAILABLE,
        BlockError::Io(_) if write => Sense::WRITE_ERROR,
        BlockError::Io(_) => Sense::UNRECOVERED_READ,
    }
}

fn read_failed(e: BlockError) -> Fail {
    Fail::Check(device_sense(&e, false))
}

fn write_failed(e: BlockError) -> Fail {
    Fail::Check(device_sense(&e, true))
}

impl<D: BlockDevice> ScsiLun<D> {
    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Fail> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks() => Ok(()),
            _ => Err(Sense::LBA_OUT_OF_RANGE.into()),
        }
    }

    fn check_transfer(&self, blocks: u64) -> Result<(), Fail> {
        if blocks * u64::from(self.block_size) > MAX_TRANSFER_BYTES {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        Ok(())
    }

    pub(super) fn read_capacity_10(&self, cdb: &[u8; 16]) -> CmdResult {
        let pmi = cdb[8] & 0x01 != 0;
        if !pmi && be32(&cdb[2..6]) != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        let last = self.blocks().saturating_sub(1);
        let mut v = Vec::with_capacity(8);
        v.extend_from_slice(&(last.min(0xffff_ffff) as u32).to_be_bytes());
        v.extend_from_slice(&self.block_size.to_be_bytes());
        Ok(ScsiResult::data(v, 8))
    }

    pub(super) fn read_capacity_16(&self, cdb: &[u8; 16]) -> CmdResult {
        let alloc = be32(&cdb[10..14]) as usize;
        let mut v = vec![0u8; 32];
        v[0..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
        v[8..12].copy_from_slice(&self.block_size.to_be_bytes());
        v[14] = 0x80 | 0x40; // LBPME, LBPRZ
        Ok(ScsiResult::data(v, alloc))
    }

    pub(super) async fn get_lba_status(&self, cdb: &[u8; 16]) -> CmdResult {
        let lba = be64(&cdb[2..10]);
        let alloc = be32(&cdb[10..14]) as usize;
        let blocks = self.blocks();
        if lba >= blocks {
            return Err(Sense::LBA_OUT_OF_RANGE.into());
        }
        // The device cannot tell us what is allocated; report runs of
        // all-zero blocks as deallocated (LBPRZ: they read as zeroes either
        // way), scanning at most 1 MiB.
        let bs = u64::from(self.block_size);
        let span = ((1u64 << 20) / bs).min(blocks - lba);
        let data = self
            .device
            .read(lba * bs, (span * bs) as u32)
            .await
            .map_err(read_failed)?;
        let max_desc = (alloc.saturating_sub(8) / 16).max(1);
        let mut descs: Vec<(u64, u64, u8)> = Vec::new();
        for i in 0..span {
            let off = (i * bs) as usize;
            let blk = &data[off..off + bs as usize];
            let state = if blk.iter().all(|&b| b == 0) { 1 } else { 0 };
            match descs.last_mut() {
                Some(d) if d.2 == state => d.1 += 1,
                _ => {
                    if descs.len() == max_desc {
                        break;
                    }
                    descs.push((lba + i, 1, state));
                }
            }
        }
        // The last run extends to the end of the device when we stopped at
        // the scan limit, rather than at a state change.
        let mut v = vec![0u8; 8];
        for (start, len, state) in &descs {
            v.extend_from_slice(&start.to_be_bytes());
            v.extend_from_slice(&(*len as u32).to_be_bytes());
            v.extend_from_slice(&[*state, 0, 0, 0]);
        }
        let plen = (v.len() - 4) as u32;
        v[0..4].copy_from_slice(&plen.to_be_bytes());
        Ok(ScsiResult::data(v, alloc))
    }

    pub(super) async fn read(&self, cdb: &[u8; 16]) -> CmdResult {
        let rw = BlockRange::decode(cdb);
        if rw.flags & 0xe0 != 0 {
            // RDPROTECT without protection information.
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        self.check_range(rw.lba, rw.blocks)?;
        self.check_transfer(rw.blocks)?;
        if rw.blocks == 0 {
            return Ok(ScsiResult::good());
        }
        let bs = u64::from(self.block_size);
        let len = rw.blocks * bs;
        let data = self
            .device
            .read(rw.lba * bs, len as u32)
            .await
            .map_err(read_failed)?;
        if data.len() as u64 != len {
            warn!(want = len, got = data.len(), "device returned a short read");
            return Err(Sense::UNRECOVERED_READ.into());
        }
        Ok(ScsiResult {
            status: status::GOOD,
            sense: None,
            data_in: data,
            transfer_len: len,
        })
    }

    /// The data-out bytes a command needs, or sense: fewer whole blocks
    /// than asked are written (the transport reports the overflow), a
    /// partial block is refused.
    fn take_blocks(&self, data: &Bytes, blocks: u64) -> Result<(u64, Bytes), Sense> {
        let bs = u64::from(self.block_size);
        let want = blocks * bs;
        if data.len() as u64 >= want {
            return Ok((blocks, data.slice(..want as usize)));
        }
        if !(data.len() as u64).is_multiple_of(bs) {
            return Err(Sense::INVALID_FIELD_IN_IU);
        }
        let n = data.len() as u64 / bs;
        Ok((n, data.clone()))
    }

    /// WRITE, and WRITE AND VERIFY (`verify`: written through before status).
    pub(super) async fn write(&self, cdb: &[u8; 16], data: Bytes, verify: bool) -> CmdResult {
        let rw = BlockRange::decode(cdb);
        if rw.flags & 0xe0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        self.check_range(rw.lba, rw.blocks)?;
        self.check_transfer(rw.blocks)?;
        let bs = u64::from(self.block_size);
        let transfer_len = rw.blocks * bs;
        if rw.blocks == 0 {
            return Ok(ScsiResult::good());
        }
        let (blocks, payload) = match self.take_blocks(&data, rw.blocks) {
            Ok(x) => x,
            Err(s) => return self.check_after_transfer(transfer_len, s),
        };
        if blocks > 0 {
            // WRITE AND VERIFY and FUA make the data durable before status;
            // so does a disabled write cache.
            let fua = verify || rw.flags & 0x08 != 0 || !self.lock().mode.write_cache;
            let _shared = self.atomic.read().await;
            self.device
                .write(rw.lba * bs, payload, fua)
                .await
                .map_err(write_failed)?;
        }
        Ok(ScsiResult {
            transfer_len,
            ..ScsiResult::good()
        })
    }

    pub(super) async fn verify(&self, cdb: &[u8; 16], data: Bytes) -> CmdResult {
        let rw = BlockRange::decode(cdb);
        if rw.flags & 0xe0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        let bytchk = (rw.flags >> 1) & 0x03;
        self.check_range(rw.lba, rw.blocks)?;
        self.check_transfer(rw.blocks)?;
        if bytchk == 2 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        let bs = u64::from(self.block_size);
        if rw.blocks == 0 {
            return Ok(ScsiResult::good());
        }
        let stored = self
            .device
            .read(rw.lba * bs, (rw.blocks * bs) as u32)
            .await
            .map_err(read_failed)?;
        let transfer_len = match bytchk {
            0 => 0,
            1 => rw.blocks * bs,
            _ => bs,
        };
        if bytchk == 0 {
            return Ok(ScsiResult::good());
        }
        let expect_len = transfer_len as usize;
        if data.len() < expect_len {
            return self.check_after_transfer(transfer_len, Sense::INVALID_FIELD_IN_IU);
        }
        let mismatch = if bytchk == 1 {
            stored.iter().zip(data.iter()).position(|(a, b)| a != b)
        } else {
            stored
                .iter()
                .enumerate()
                .position(|(i, a)| *a != data[i % bs as usize])
        };
        if let Some(pos) = mismatch {
            let sense = Sense::MISCOMPARE_VERIFY.with_information(pos as u64);
            return self.check_after_transfer(transfer_len, sense);
        }
        Ok(ScsiResult {
            transfer_len,
            ..ScsiResult::good()
        })
    }

    pub(super) async fn orwrite(&self, cdb: &[u8; 16], data: Bytes) -> CmdResult {
        let rw = BlockRange::decode(cdb);
        if rw.flags & 0xe0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        self.check_range(rw.lba, rw.blocks)?;
        self.check_transfer(rw.blocks)?;
        let bs = u64::from(self.block_size);
        let transfer_len = rw.blocks * bs;
        if rw.blocks == 0 {
            return Ok(ScsiResult::good());
        }
        if (data.len() as u64) < transfer_len {
            return self.check_after_transfer(transfer_len, Sense::INVALID_FIELD_IN_IU);
        }
        let _excl = self.atomic.write().await;
        let stored = self
            .device
            .read(rw.lba * bs, transfer_len as u32)
            .await
            .map_err(read_failed)?;
        let mut out = BytesMut::with_capacity(stored.len());
        out.extend(stored.iter().zip(data.iter()).map(|(a, b)| a | b));
        let fua = rw.flags & 0x08 != 0;
        self.device
            .write(rw.lba * bs, out.freeze(), fua)
            .await
            .map_err(write_failed)?;
        Ok(ScsiResult {
            transfer_len,
            ..ScsiResult::good()
        })
    }

    pub(super) async fn synchronize_cache(&self, cdb: &[u8; 16]) -> CmdResult {
        let range = BlockRange::decode(cdb);
        self.check_range(range.lba, range.blocks)?;
        // A real flush, whatever the range (the device flushes everything).
        self.device.flush().await.map_err(write_failed)?;
        Ok(ScsiResult::good())
    }

    pub(super) fn pre_fetch(&self, cdb: &[u8; 16]) -> CmdResult {
        let range = BlockRange::decode(cdb);
        self.check_range(range.lba, range.blocks)?;
        Ok(ScsiResult::good())
    }

    pub(super) async fn write_same(&self, cdb: &[u8; 16], data: Bytes) -> CmdResult {
        let BlockRange { lba, blocks, flags } = BlockRange::decode(cdb);
        let unmap = flags & 0x08 != 0;
        let anchor = flags & 0x10 != 0;
        // NDOB (no Data-Out: write zeroes) exists in WRITE SAME(16) only.
        let ndob = cdb[0] != super::opcode::WRITE_SAME_10 && flags & 0x01 != 0;
        if flags & 0xe0 != 0 || anchor {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        self.check_range(lba, blocks)?;
        let bs = u64::from(self.block_size);
        if blocks == 0 {
            // WSNZ: zero blocks is not supported.
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        if blocks * bs > MAX_WRITE_SAME_BYTES {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        let transfer_len = if ndob { 0 } else { bs };
        let pattern = if ndob {
            Bytes::from(vec![0u8; bs as usize])
        } else {
            if data.len() as u64 != bs {
                // Exactly one logical block of Data-Out.
                return self.check_after_transfer(transfer_len, Sense::INVALID_FIELD_IN_CDB);
            }
            data.slice(..bs as usize)
        };
        let zero = pattern.iter().all(|&b| b == 0);
        let _shared = self.atomic.read().await;
        let r = if zero && unmap {
            self.device.unmap(lba * bs, blocks * bs).await
        } else if zero {
            self.device.write_zeroes(lba * bs, blocks * bs, false).await
        } else {
            // Write the pattern in chunks of up to 1 MiB.
            let per = ((1u64 << 20) / bs).max(1);
            let mut chunk = BytesMut::with_capacity((per.min(blocks) * bs) as usize);
            for _ in 0..per.min(blocks) {
                chunk.extend_from_slice(&pattern);
            }
            let chunk = chunk.freeze();
            let mut done = 0u64;
            let mut res = Ok(());
            while done < blocks {
                let n = per.min(blocks - done);
                res = self
                    .device
                    .write((lba + done) * bs, chunk.slice(..(n * bs) as usize), false)
                    .await;
                if res.is_err() {
                    break;
                }
                done += n;
            }
            res
        };
        r.map_err(write_failed)?;
        Ok(ScsiResult {
            transfer_len,
            ..ScsiResult::good()
        })
    }

    pub(super) async fn unmap(&self, cdb: &[u8; 16], data: Bytes) -> CmdResult {
        if cdb[1] & 0x01 != 0 {
            // ANCHOR: not supported (ANC_SUP = 0).
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        let plen = usize::from(be16(&cdb[7..9]));
        if plen == 0 {
            return Ok(ScsiResult::good());
        }
        let transfer_len = plen as u64;
        let fail = |s: Sense| self.check_after_transfer(transfer_len, s);
        if plen < 8 || data.len() < plen {
            return fail(Sense::PARAM_LIST_LENGTH_ERROR);
        }
        let p = &data[..plen];
        let desc_len = usize::from(be16(&p[2..4]));
        if desc_len % 16 != 0 || 8 + desc_len > plen {
            return fail(Sense::PARAM_LIST_LENGTH_ERROR);
        }
        let count = desc_len / 16;
        if count as u32 > MAX_UNMAP_DESCRIPTORS {
            return fail(Sense::INVALID_FIELD_IN_PARAM_LIST);
        }
        let bs = u64::from(self.block_size);
        let mut ranges = Vec::with_capacity(count);
        for i in 0..count {
            let d = &p[8 + i * 16..8 + (i + 1) * 16];
            let lba = be64(&d[0..8]);
            let n = u64::from(be32(&d[8..12]));
            if let Err(Fail::Check(s)) = self.check_range(lba, n) {
                return fail(s);
            }
            if n * bs > MAX_WRITE_SAME_BYTES {
                return fail(Sense::INVALID_FIELD_IN_PARAM_LIST);
            }
            if n > 0 {
                ranges.push((lba * bs, n * bs));
            }
        }
        let _shared = self.atomic.read().await;
        for (off, len) in ranges {
            if let Err(e) = self.device.unmap(off, len).await {
                return fail(device_sense(&e, true));
            }
        }
        Ok(ScsiResult {
            transfer_len,
            ..ScsiResult::good()
        })
    }

    pub(super) async fn compare_and_write(&self, cdb: &[u8; 16], data: Bytes) -> CmdResult {
        let lba = be64(&cdb[2..10]);
        let blocks = u64::from(cdb[13]);
        if cdb[1] & 0xe0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        self.check_range(lba, blocks)?;
        if blocks > u64::from(MAX_COMPARE_AND_WRITE_BLOCKS) {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        let bs = u64::from(self.block_size);
        let len = blocks * bs;
        let transfer_len = 2 * len;
        if data.len() as u64 != transfer_len {
            // The Data-Out must be exactly the verify and write data.
            return self.check_after_transfer(transfer_len, Sense::INVALID_FIELD_IN_CDB);
        }
        if blocks == 0 {
            return Ok(ScsiResult::good());
        }
        let verify = data.slice(..len as usize);
        let write = data.slice(len as usize..transfer_len as usize);
        let _excl = self.atomic.write().await;
        let stored = self
            .device
            .read(lba * bs, len as u32)
            .await
            .map_err(read_failed)?;
        if let Some(pos) = stored.iter().zip(verify.iter()).position(|(a, b)| a != b) {
            debug!(lba, pos, "COMPARE AND WRITE miscompare");
            let sense = Sense::MISCOMPARE_VERIFY.with_information(pos as u64);
            return self.check_after_transfer(transfer_len, sense);
        }
        let fua = cdb[1] & 0x08 != 0;
        self.device
            .write(lba * bs, write, fua)
            .await
            .map_err(write_failed)?;
        Ok(ScsiResult {
            transfer_len,
            ..ScsiResult::good()
        })
    }

    pub(super) fn start_stop_unit(&self, cdb: &[u8; 16]) -> CmdResult {
        // Power conditions other than START_VALID (0) and the
        // LOEJ bit on a non-removable unit are not supported.
        let pc = cdb[4] >> 4;
        if !matches!(pc, 0 | 1 | 2 | 3 | 5 | 7 | 0xa | 0xb) {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        Ok(ScsiResult::good())
    }

    pub(super) fn prevent_allow_medium_removal(&self, cdb: &[u8; 16]) -> CmdResult {
        if cdb[4] & 0x03 > 1 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        Ok(ScsiResult::good())
    }

    /// READ DEFECT DATA(10): a virtual disk has no defects, so an empty
    /// list in the format asked for.
    pub(super) fn read_defect_data_10(&self, cdb: &[u8; 16]) -> CmdResult {
        let alloc = usize::from(be16(&cdb[7..9]));
        let flags = cdb[2] & 0x1f;
        Ok(ScsiResult::data(vec![0, flags, 0, 0], alloc))
    }

    /// READ DEFECT DATA(12): an empty list, as for the 10-byte form.
    pub(super) fn read_defect_data_12(&self, cdb: &[u8; 16]) -> CmdResult {
        let alloc = be32(&cdb[6..10]) as usize;
        let flags = cdb[1] & 0x1f;
        Ok(ScsiResult::data(vec![0, flags, 0, 0, 0, 0, 0, 0], alloc))
    }
}
