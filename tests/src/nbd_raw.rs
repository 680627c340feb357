//! A deliberately minimal NBD client for tests that must send what real
//! clients never send: garbage, out-of-range requests. It negotiates with
//! NBD_OPT_GO (fixed newstyle) and then speaks simple requests and replies.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Result, bail};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;

/// A connection in the transmission phase.
pub struct RawNbd {
    pub stream: TcpStream,
    pub size: u64,
}

fn read_u16(s: &mut TcpStream) -> Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut TcpStream) -> Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut TcpStream) -> Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl RawNbd {
    /// Connect and negotiate export `name` with NBD_OPT_GO.
    pub fn connect(addr: SocketAddr, name: &str) -> Result<Self> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        if read_u64(&mut s)? != NBDMAGIC || read_u64(&mut s)? != IHAVEOPT {
            bail!("not an NBD newstyle server");
        }
        let _flags = read_u16(&mut s)?;
        s.write_all(&1u32.to_be_bytes())?; // FIXED_NEWSTYLE
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        let data_len = 4 + name.len() + 2;
        opt.extend_from_slice(&(data_len as u32).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let mut size = None;
        loop {
            if read_u64(&mut s)? != OPT_REPLY_MAGIC {
                bail!("bad option reply magic");
            }
            let _opt = read_u32(&mut s)?;
            let kind = read_u32(&mut s)?;
            let len = read_u32(&mut s)? as usize;
            if len > 1 << 16 {
                bail!("option reply too long");
            }
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload)?;
            if kind == REP_ACK {
                break;
            }
            if kind & 0x8000_0000 != 0 {
                bail!("server refused NBD_OPT_GO: reply type {kind:#x}");
            }
            // NBD_REP_INFO with NBD_INFO_EXPORT: u16 type, u64 size, u16 flags.
            if payload.len() >= 12 && payload[0..2] == [0, 0] {
                let mut b = [0u8; 8];
                b.copy_from_slice(&payload[2..10]);
                size = Some(u64::from_be_bytes(b));
            }
        }
        let Some(size) = size else {
            bail!("server sent no export size");
        };
        Ok(RawNbd { stream: s, size })
    }

    /// Send one request header (plus payload for writes).
    pub fn send(
        &mut self,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<()> {
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&cookie.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        self.stream.write_all(&req)?;
        Ok(())
    }

    /// Read one simple reply: (cookie, error). For a successful read, `data_len` bytes follow
    /// and are returned.
    pub fn reply(&mut self, data_len: usize) -> Result<(u64, u32, Vec<u8>)> {
        if read_u32(&mut self.stream)? != SIMPLE_REPLY_MAGIC {
            bail!("bad reply magic");
        }
        let error = read_u32(&mut self.stream)?;
        let cookie = read_u64(&mut self.stream)?;
        let mut data = Vec::new();
        if error == 0 && data_len > 0 {
            data = vec![0u8; data_len];
            self.stream.read_exact(&mut data)?;
        }
        Ok((cookie, error, data))
    }

    /// Read `len` bytes at `offset`: Ok(data) or Err(errno).
    pub fn read(&mut self, offset: u64, len: u32) -> Result<std::result::Result<Vec<u8>, u32>> {
        self.send(CMD_READ, 1, offset, len, &[])?;
        let (_, error, data) = self.reply(len as usize)?;
        Ok(if error == 0 { Ok(data) } else { Err(error) })
    }

    /// Write `data` at `offset`: Ok(()) or Err(errno).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<std::result::Result<(), u32>> {
        self.send(CMD_WRITE, 2, offset, data.len() as u32, data)?;
        let (_, error, _) = self.reply(0)?;
        Ok(if error == 0 { Ok(()) } else { Err(error) })
    }

    /// Flush: Ok(()) or Err(errno).
    pub fn flush(&mut self) -> Result<std::result::Result<(), u32>> {
        self.send(CMD_FLUSH, 3, 0, 0, &[])?;
        let (_, error, _) = self.reply(0)?;
        Ok(if error == 0 { Ok(()) } else { Err(error) })
    }
}
