//! The iSCSI PDU and its codec (RFC 7143 §11): the 48-byte Basic Header
//! Segment, Additional Header Segments, the data segment with its padding to
//! four bytes, and the optional CRC32C HeaderDigest and DataDigest.
//!
//! [`PduCodec::decode`] is check-then-parse: it returns `Ok(None)` until a
//! whole PDU is buffered, then consumes exactly that PDU. Malformed input is
//! a typed [`PduError`], never a panic. [`Pdu`] keeps the BHS as raw bytes
//! with typed accessors, so every opcode-specific field is available without
//! a struct per opcode.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// The reserved tag value ("no tag").
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Opcodes an initiator sends.
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT_REQUEST: u8 = 0x02;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const TEXT_REQUEST: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const SNACK_REQUEST: u8 = 0x10;
    /// Opcodes a target sends.
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Why bytes could not be decoded into a PDU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// The data segment is longer than we agreed to receive.
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    DataSegmentTooLong { len: u32, max: u32 },
    /// The header digest does not match.
    #[error("header digest mismatch")]
    HeaderDigest,
    /// The data digest does not match (the header is still usable).
    #[error("data digest mismatch")]
    DataDigest { bhs: Box<[u8; BHS_LEN]> },
    /// An opcode no initiator may send.
    #[error("opcode {0:#04x} is not an initiator opcode")]
    BadOpcode(u8),
}

/// One iSCSI PDU: raw BHS plus AHS and data segment (without padding).
#[derive(Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Bytes,
    pub data: Bytes,
}

impl std::fmt::Debug for Pdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pdu")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("itt", &format_args!("{:#x}", self.itt()))
            .field("ahs", &self.ahs.len())
            .field("data", &self.data.len())
            .finish()
    }
}

impl Pdu {
    /// A PDU with a zeroed BHS carrying `opcode` (and the final bit set).
    pub fn new(opcode: u8) -> Self {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode & 0x3f;
        bhs[1] = 0x80;
        Pdu {
            bhs,
            ahs: Bytes::new(),
            data: Bytes::new(),
        }
    }

    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }
    pub fn set_immediate(&mut self, on: bool) {
        if on {
            self.bhs[0] |= 0x40;
        } else {
            self.bhs[0] &= !0x40;
        }
    }
    /// Byte 1: the final bit and opcode-specific flags.
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }
    pub fn final_bit(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }
    pub fn total_ahs_len(&self) -> usize {
        usize::from(self.bhs[4]) * 4
    }
    /// DataSegmentLength as written in the BHS.
    pub fn data_segment_len(&self) -> u32 {
        u32::from_be_bytes([0, self.bhs[5], self.bhs[6], self.bhs[7]])
    }
    pub fn lun_raw(&self) -> u64 {
        self.u64_at(8)
    }
    pub fn set_lun_raw(&mut self, lun: u64) {
        self.bhs[8..16].copy_from_slice(&lun.to_be_bytes());
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    pub fn set_itt(&mut self, v: u32) {
        self.set_u32(16, v);
    }
    pub fn u8_at(&self, i: usize) -> u8 {
        self.bhs[i]
    }
    pub fn u16_at(&self, i: usize) -> u16 {
        u16::from_be_bytes([self.bhs[i], self.bhs[i + 1]])
    }
    pub fn u32_at(&self, i: usize) -> u32 {
        u32::from_be_bytes([
            self.bhs[i],
            self.bhs[i + 1],
            self.bhs[i + 2],
            self.bhs[i + 3],
        ])
    }
    pub fn u64_at(&self, i: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bhs[i..i + 8]);
        u64::from_be_bytes(b)
    }
    pub fn set_u16(&mut self, i: usize, v: u16) {
        self.bhs[i..i + 2].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_u32(&mut self, i: usize, v: u32) {
        self.bhs[i..i + 4].copy_from_slice(&v.to_be_bytes());
    }

    /// The bytes this PDU occupies on the wire with the given digests.
    pub fn wire_len(&self, digests: Digests) -> usize {
        let mut n = BHS_LEN + self.ahs.len() + pad4(self.data.len());
        if digests.header {
            n += 4;
        }
        if digests.data && !self.data.is_empty() {
            n += 4;
        }
        n
    }
}

/// Round up to a multiple of four.
pub fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// Which CRC32C digests are in use on a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// Encoder/decoder of PDUs for one connection.
#[derive(Clone, Debug)]
pub struct PduCodec {
    pub digests: Digests,
    /// Largest data segment we accept (our MaxRecvDataSegmentLength, or
    /// the login limit during login).
    pub max_recv_data_segment: u32,
}

impl PduCodec {
    pub fn new(max_recv_data_segment: u32) -> Self {
        PduCodec {
            digests: Digests::default(),
            max_recv_data_segment,
        }
    }

    /// Decode one PDU from the front of `buf`: `Ok(None)` when more bytes
    /// are needed (nothing is consumed). On error the PDU's bytes are
    /// consumed when their extent is known (a digest error), so the caller
    /// may answer with a Reject and go on.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Pdu>, PduError> {
        if buf.len() < BHS_LEN {
            return Ok(None);
        }
        let ahs_len = usize::from(buf[4]) * 4;
        let dsl = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]);
        let opcode = buf[0] & 0x3f;
        if !matches!(opcode, 0x00..=0x06 | 0x10) {
            return Err(PduError::BadOpcode(opcode));
        }
        if dsl > self.max_recv_data_segment {
            return Err(PduError::DataSegmentTooLong {
                len: dsl,
                max: self.max_recv_data_segment,
            });
        }
        let hd = if self.digests.header { 4 } else { 0 };
        let dd = if self.digests.data && dsl > 0 { 4 } else { 0 };
        let header_end = BHS_LEN + ahs_len;
        let data_len = dsl as usize;
        let total = header_end + hd + pad4(data_len) + dd;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        if hd > 0 {
            let want = crc32c::crc32c(&buf[..header_end]);
            let got = u32::from_le_bytes([
                buf[header_end],
                buf[header_end + 1],
                buf[header_end + 2],
                buf[header_end + 3],
            ]);
            if want != got {
                // The extent may itself be corrupt: the connection must go.
                return Err(PduError::HeaderDigest);
            }
        }
        let mut frame = buf.split_to(total).freeze();
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&frame[..BHS_LEN]);
        frame.advance(BHS_LEN);
        let ahs = frame.split_to(ahs_len);
        frame.advance(hd);
        let padded = frame.split_to(pad4(data_len));
        if dd > 0 {
            let want = crc32c::crc32c(&padded);
            let got = frame.get_u32_le();
            if want != got {
                return Err(PduError::DataDigest { bhs: Box::new(bhs) });
            }
        }
        let data = padded.slice(..data_len);
        Ok(Some(Pdu { bhs, ahs, data }))
    }

    /// Append the header part of `pdu` (BHS, AHS, header digest) to `out`,
    /// filling in TotalAHSLength and DataSegmentLength. The data segment is
    /// written by [`PduCodec::encode_data_trailer`] after the payload, so large
    /// payloads can be sent from their own buffer.
    pub fn encode_header(&self, pdu: &Pdu, out: &mut BytesMut) {
        let mut bhs = pdu.bhs;
        bhs[4] = (pad4(pdu.ahs.len()) / 4).min(255) as u8;
        let dsl = (pdu.data.len() as u32).min(0x00ff_ffff);
        bhs[5..8].copy_from_slice(&dsl.to_be_bytes()[1..]);
        let start = out.len();
        out.extend_from_slice(&bhs);
        out.extend_from_slice(&pdu.ahs);
        out.put_bytes(0, pad4(pdu.ahs.len()) - pdu.ahs.len());
        if self.digests.header {
            let crc = crc32c::crc32c(&out[start..]);
            out.put_u32_le(crc);
        }
    }

    /// The padding and data digest that follow `data` on the wire.
    pub fn encode_data_trailer(&self, data: &[u8], out: &mut BytesMut) {
        if data.is_empty() {
            return;
        }
        let pad = pad4(data.len()) - data.len();
        out.put_bytes(0, pad);
        if self.digests.data {
            let crc = crc32c::crc32c_append(crc32c::crc32c(data), &[0u8; 3][..pad]);
            out.put_u32_le(crc);
        }
    }

    /// Append the whole PDU to `out`.
    pub fn encode(&self, pdu: &Pdu, out: &mut BytesMut) {
        self.encode_header(pdu, out);
        out.extend_from_slice(&pdu.data);
        self.encode_data_trailer(&pdu.data, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(data: &[u8]) -> Pdu {
        let mut p = Pdu::new(op::SCSI_COMMAND);
        p.set_itt(0x1234);
        p.set_u32(24, 7);
        p.data = Bytes::copy_from_slice(data);
        p
    }

    #[test]
    fn round_trip_with_and_without_digests() {
        for (h, d) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut codec = PduCodec::new(1 << 20);
            codec.digests = Digests { header: h, data: d };
            for len in [0usize, 1, 3, 4, 5, 4096] {
                let p = sample(&vec![0xab; len]);
                let mut wire = BytesMut::new();
                codec.encode(&p, &mut wire);
                assert_eq!(wire.len(), p.wire_len(codec.digests));
                // Every strict prefix needs more.
                for cut in 0..wire.len() {
                    let mut part = BytesMut::from(&wire[..cut]);
                    assert_eq!(codec.decode(&mut part), Ok(None));
                }
                let mut whole = wire.clone();
                let got = codec.decode(&mut whole).unwrap().unwrap();
                assert!(whole.is_empty());
                assert_eq!(got.data, p.data);
                assert_eq!(got.itt(), 0x1234);
                assert_eq!(got.data_segment_len() as usize, len);
            }
        }
    }

    #[test]
    fn digest_errors_are_typed() {
        let mut codec = PduCodec::new(1 << 20);
        codec.digests = Digests {
            header: true,
            data: true,
        };
        let p = sample(b"hello");
        let mut wire = BytesMut::new();
        codec.encode(&p, &mut wire);
        let mut bad = wire.clone();
        bad[2] ^= 1;
        assert_eq!(codec.decode(&mut bad), Err(PduError::HeaderDigest));
        let mut bad = wire.clone();
        bad[BHS_LEN + 4] ^= 1;
        assert!(matches!(
            codec.decode(&mut bad),
            Err(PduError::DataDigest { .. })
        ));
        assert!(bad.is_empty(), "a data digest error consumes the PDU");
    }

    #[test]
    fn oversized_segment_and_bad_opcode() {
        let codec = PduCodec::new(8192);
        let mut p = sample(&[]);
        p.bhs[5..8].copy_from_slice(&[0, 0x40, 0]);
        let mut wire = BytesMut::from(&p.bhs[..]);
        assert!(matches!(
            codec.decode(&mut wire),
            Err(PduError::DataSegmentTooLong { .. })
        ));
        let mut wire = BytesMut::from(&[0x3fu8; 48][..]);
        assert_eq!(codec.decode(&mut wire), Err(PduError::BadOpcode(0x3f)));
    }
}
