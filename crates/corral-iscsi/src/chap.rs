//! CHAP (RFC 1994) as iSCSI uses it (RFC 7143 §12.1.3): MD5 over
//! identifier, secret and challenge; values in hex (`0x…`) or base64 (`0b…`).
//! MD5 is implemented here from RFC 1321 (it is only used for CHAP).

/// MD5 digest of `data` (RFC 1321).
pub fn md5(data: &[u8]) -> [u8; 16] {
    const S: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5,
        9, 14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10,
        15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
    ];
    let k: Vec<u32> = (0..64)
        .map(|i| ((i as f64 + 1.0).sin().abs() * 4_294_967_296.0) as u32)
        .collect();
    let mut a0: u32 = 0x6745_2301;
    let mut b0: u32 = 0xefcd_ab89;
    let mut c0: u32 = 0x98ba_dcfe;
    let mut d0: u32 = 0x1032_5476;
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_le_bytes());
    for chunk in msg.chunks(64) {
        let mut m = [0u32; 16];
        for (i, w) in m.iter_mut().enumerate() {
            *w = u32::from_le_bytes([
                chunk[4 * i],
                chunk[4 * i + 1],
                chunk[4 * i + 2],
                chunk[4 * i + 3],
            ]);
        }
        let (mut a, mut b, mut c, mut d) = (a0, b0, c0, d0);
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let f = f.wrapping_add(a).wrapping_add(k[i]).wrapping_add(m[g]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(f.rotate_left(S[i]));
        }
        a0 = a0.wrapping_add(a);
        b0 = b0.wrapping_add(b);
        c0 = c0.wrapping_add(c);
        d0 = d0.wrapping_add(d);
    }
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&a0.to_le_bytes());
    out[4..8].copy_from_slice(&b0.to_le_bytes());
    out[8..12].copy_from_slice(&c0.to_le_bytes());
    out[12..16].copy_from_slice(&d0.to_le_bytes());
    out
}

/// The CHAP response: MD5(id || secret || challenge).
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut v = Vec::with_capacity(1 + secret.len() + challenge.len());
    v.push(id);
    v.extend_from_slice(secret);
    v.extend_from_slice(challenge);
    md5(&v)
}

/// `0x`-prefixed lowercase hex.
pub fn to_hex(data: &[u8]) -> String {
    let mut s = String::from("0x");
    for b in data {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Decode a CHAP binary value: `0x` hex or `0b` base64.
pub fn decode_binary(value: &str) -> Option<Vec<u8>> {
    if let Some(h) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        if h.is_empty() || h.len() % 2 != 0 || h.len() > 2048 {
            return None;
        }
        // Byte-wise: the value is untrusted and need not be ASCII.
        let digit = |b: u8| char::from(b).to_digit(16);
        h.as_bytes()
            .chunks_exact(2)
            .map(|p| Some(((digit(p[0])? << 4) | digit(p[1])?) as u8))
            .collect()
    } else if let Some(b) = value
        .strip_prefix("0b")
        .or_else(|| value.strip_prefix("0B"))
    {
        decode_base64(b)
    } else {
        None
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if out.is_empty() { None } else { Some(out) }
}

/// Constant-time-ish comparison of digests.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_test_vectors() {
        assert_eq!(to_hex(&md5(b"")), "0xd41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(to_hex(&md5(b"abc")), "0x900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            to_hex(&md5(
                b"12345678901234567890123456789012345678901234567890123456789012345678901234567890"
            )),
            "0x57edf4a22be3c955ac49da2e2107b67a"
        );
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode_binary("0x0aff"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(decode_binary("0x0"), None);
        assert_eq!(decode_binary("12"), None);
    }

    /// Found by the `iscsi_login` fuzz target: a CHAP_R or CHAP_C value with
    /// a multi-byte character panicked (a str sliced inside a character),
    /// before the initiator was authenticated.
    #[test]
    fn non_ascii_and_signed_hex_values_are_refused() {
        assert_eq!(decode_binary("0x0123456789abcdef012345678ǡbcdef"), None);
        assert_eq!(decode_binary("0xǡǡ"), None);
        assert_eq!(decode_binary("0x+f"), None);
        assert_eq!(decode_binary("0xAbCd"), Some(vec![0xab, 0xcd]));
    }
}
