//! iSCSI text key=value pairs (RFC 7143 §6): NUL-separated `key=value`
//! strings in the data segment of Login and Text PDUs.

/// Text parameters, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextParams {
    pub pairs: Vec<(String, String)>,
}

/// Malformed text data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("text pair without '=': {0:?}")]
    NoEquals(String),
    #[error("text data is not UTF-8")]
    NotUtf8,
    #[error("key {0:?} is repeated")]
    Repeated(String),
}

/// Longest key we accept (RFC 7143: 63 bytes).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value we accept.
pub const MAX_VALUE_LEN: usize = 8192;

impl TextParams {
    /// Parse NUL-separated pairs; trailing padding NULs are ignored.
    pub fn parse(data: &[u8]) -> Result<Self, TextError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for item in data.split(|&b| b == 0) {
            if item.is_empty() {
                continue;
            }
            let s = std::str::from_utf8(item).map_err(|_| TextError::NotUtf8)?;
            let Some((k, v)) = s.split_once('=') else {
                return Err(TextError::NoEquals(s.chars().take(64).collect()));
            };
            if k.is_empty() || k.len() > MAX_KEY_LEN || v.len() > MAX_VALUE_LEN {
                return Err(TextError::NoEquals(s.chars().take(64).collect()));
            }
            if pairs.iter().any(|(pk, _)| pk == k) {
                return Err(TextError::Repeated(k.to_string()));
            }
            pairs.push((k.to_string(), v.to_string()));
        }
        Ok(TextParams { pairs })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn push(&mut self, key: &str, value: impl Into<String>) {
        self.pairs.push((key.to_string(), value.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Encode as `key=value\0` pairs.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        for (k, val) in &self.pairs {
            v.extend_from_slice(k.as_bytes());
            v.push(b'=');
            v.extend_from_slice(val.as_bytes());
            v.push(0);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_encode() {
        let t = TextParams::parse(b"A=1\0B=x=y\0\0\0").unwrap();
        assert_eq!(t.get("A"), Some("1"));
        assert_eq!(t.get("B"), Some("x=y"));
        assert_eq!(TextParams::parse(&t.encode()).unwrap(), t);
        assert!(TextParams::parse(b"A\0").is_err());
        assert!(TextParams::parse(b"A=1\0A=2\0").is_err());
    }
}
