//! CDB decoding: big-endian fields, the CDB length an opcode's group code
//! implies, and the LBA/length/flags layout shared by the READ/WRITE-family
//! CDBs of 6, 10, 12 and 16 bytes.

pub(super) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub(super) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(super) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The CDB length the group code (the top three bits) of `opcode` implies
/// (SAM-5 5.2); reserved and vendor-specific groups count as 16 bytes.
pub(super) const fn group_cdb_len(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

/// A CDB of up to 16 bytes, zero-padded so that every field can be read.
pub(super) fn padded(cdb: &[u8]) -> [u8; 16] {
    let mut full = [0u8; 16];
    let n = cdb.len().min(16);
    full[..n].copy_from_slice(&cdb[..n]);
    full
}

/// The LBA, transfer length and byte-1 flags of a READ/WRITE-family CDB
/// (also VERIFY, PRE-FETCH, SYNCHRONIZE CACHE, WRITE SAME, ORWRITE).
pub(super) struct BlockRange {
    pub lba: u64,
    pub blocks: u64,
    pub flags: u8,
}

impl BlockRange {
    /// Decode by the CDB's length: 6 bytes (READ(6)/WRITE(6): 21-bit LBA,
    /// 0 blocks meaning 256), 10, 12 or 16 bytes.
    pub fn decode(cdb: &[u8; 16]) -> BlockRange {
        match group_cdb_len(cdb[0]) {
            6 => {
                let lba = u64::from(be32(&[0, cdb[1] & 0x1f, cdb[2], cdb[3]]));
                let blocks = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
                BlockRange {
                    lba,
                    blocks,
                    flags: 0,
                }
            }
            10 => BlockRange {
                lba: u64::from(be32(&cdb[2..6])),
                blocks: u64::from(be16(&cdb[7..9])),
                flags: cdb[1],
            },
            12 => BlockRange {
                lba: u64::from(be32(&cdb[2..6])),
                blocks: u64::from(be32(&cdb[6..10])),
                flags: cdb[1],
            },
            _ => BlockRange {
                lba: be64(&cdb[2..10]),
                blocks: u64::from(be32(&cdb[10..14])),
                flags: cdb[1],
            },
        }
    }
}
