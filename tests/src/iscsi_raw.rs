//! A minimal iSCSI initiator over a blocking socket, for what real
//! initiators never send (the end-to-end tests' malformed and edge-case
//! PDUs) and for load shapes fio's libiscsi engine cannot make (the
//! durable-writes bench's SYNCHRONIZE CACHE after each write). It logs in
//! straight to the full feature phase and runs one command at a time;
//! every failure panics, as test helpers do.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A minimal initiator for what real ones never send.
pub struct RawInitiator {
    pub stream: TcpStream,
    /// CmdSN of the next command, ITT of the next task.
    cmd_sn: u32,
    itt: u32,
}

pub fn bhs(opcode: u8, flags: u8) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0] = opcode;
    b[1] = flags;
    b
}

pub fn with_data(mut header: [u8; 48], data: &[u8]) -> Vec<u8> {
    let len = data.len() as u32;
    header[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    let mut v = header.to_vec();
    v.extend_from_slice(data);
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
    v
}

impl RawInitiator {
    pub fn connect(portal: SocketAddr) -> Self {
        let stream = TcpStream::connect(portal).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        RawInitiator {
            stream,
            cmd_sn: 0,
            itt: 0x100,
        }
    }

    /// Log in straight to the full feature phase (no security stage).
    pub fn login(portal: SocketAddr, volume: &str, isid_tail: u8) -> Self {
        Self::login_as(portal, volume, "iqn.2026-11.test:raw", isid_tail)
    }

    /// Log in as initiator `name` with ISID tail `isid_tail` (one I_T
    /// nexus per pair).
    pub fn login_as(portal: SocketAddr, volume: &str, name: &str, isid_tail: u8) -> Self {
        let mut me = Self::connect(portal);
        let mut h = bhs(0x43, 0x80 | (1 << 2) | 3);
        h[8..14].copy_from_slice(&[0x80, 0, 0, 0x12, 0x34, isid_tail]);
        h[16..20].copy_from_slice(&1u32.to_be_bytes());
        let keys = format!(
            "InitiatorName={name}\0SessionType=Normal\0TargetName=iqn.2026-11.io.corral:{volume}\0HeaderDigest=None\0DataDigest=None\0MaxRecvDataSegmentLength=65536\0"
        );
        me.stream.write_all(&with_data(h, keys.as_bytes())).unwrap();
        let (resp, _) = me.read_pdu().unwrap();
        assert_eq!(resp[0] & 0x3f, 0x23, "login response");
        assert_eq!((resp[36], resp[37]), (0, 0), "login status");
        assert_eq!(resp[1] & 0x83, 0x83, "full feature phase");
        me.cmd_sn = u32::from_be_bytes([resp[28], resp[29], resp[30], resp[31]]);
        me
    }

    /// Run one SCSI command on LUN 0: `data_out` goes as immediate data,
    /// up to `read_len` bytes may come back. Returns (status, Data-In).
    pub fn command(&mut self, cdb: &[u8], data_out: &[u8], read_len: u32) -> (u8, Vec<u8>) {
        let (status, data_in, _) = self.command_sense(cdb, data_out, read_len);
        (status, data_in)
    }

    /// Like [`RawInitiator::command`], also returning the sense data of a
    /// CHECK CONDITION (empty otherwise): (status, Data-In, sense).
    pub fn command_sense(
        &mut self,
        cdb: &[u8],
        data_out: &[u8],
        read_len: u32,
    ) -> (u8, Vec<u8>, Vec<u8>) {
        let mut flags = 0x80 | 0x01; // final, simple task attribute
        if read_len > 0 {
            flags |= 0x40;
        }
        if !data_out.is_empty() {
            flags |= 0x20;
        }
        let mut h = bhs(0x01, flags);
        self.itt += 1;
        h[16..20].copy_from_slice(&self.itt.to_be_bytes());
        let edtl = if data_out.is_empty() {
            read_len
        } else {
            data_out.len() as u32
        };
        h[20..24].copy_from_slice(&edtl.to_be_bytes());
        h[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        h[32..32 + cdb.len()].copy_from_slice(cdb);
        self.stream.write_all(&with_data(h, data_out)).unwrap();
        let mut data_in = Vec::new();
        loop {
            let (resp, data) = self.read_pdu().unwrap();
            match resp[0] & 0x3f {
                // Data-In; with the S bit it carries the status too.
                0x25 => {
                    data_in.extend_from_slice(&data);
                    if resp[1] & 0x01 != 0 {
                        return (resp[3], data_in, Vec::new());
                    }
                }
                // SCSI Response: sense data behind a 2-byte length.
                0x21 => {
                    let sense = if data.len() >= 2 {
                        let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
                        data[2..(2 + n).min(data.len())].to_vec()
                    } else {
                        Vec::new()
                    };
                    return (resp[3], data_in, sense);
                }
                // NOP-In pings and asynchronous messages are not ours.
                0x20 | 0x32 => continue,
                other => panic!("unexpected PDU opcode {other:#04x} in reply to a command"),
            }
        }
    }

    pub fn read_pdu(&mut self) -> std::io::Result<([u8; 48], Vec<u8>)> {
        let mut h = [0u8; 48];
        self.stream.read_exact(&mut h)?;
        let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
        let mut data = vec![0u8; (len + 3) & !3];
        self.stream.read_exact(&mut data)?;
        data.truncate(len);
        Ok((h, data))
    }

    /// Is the connection closed by the target (EOF or reset) within the timeout?
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }
}
