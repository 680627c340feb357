//! Manifests: one per backup, put last (create-if-absent), so that a
//! manifest exists only once everything it names does. JSON, small (a
//! page name per GiB), readable by an operator with any S3 tool.

use serde::{Deserialize, Serialize};

use crate::block::BLOCK_SIZE;
use crate::page::PAGE_BLOCKS;
use crate::{BlockHash, FormatError};

/// The format a manifest follows; a reader refuses any other.
pub const FORMAT: &str = "corral-backup/1";

/// One backup of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub volume: String,
    /// The backup's name, unique within the volume.
    pub name: String,
    /// The volume's size in bytes when the snapshot was taken.
    pub size: u64,
    pub block_size: u32,
    /// The snapshot backed up, and when it was taken.
    pub snapshot: String,
    pub created_unix_ms: u64,
    /// The backup this one was made against (None: a full backup).
    pub parent: Option<String>,
    /// Per GiB of the volume, the name of its page (hex); None: all zero.
    pub pages: Vec<Option<String>>,
}

impl Manifest {
    /// Pages a volume of `size` bytes has.
    pub fn pages_for(size: u64) -> usize {
        let page_bytes = (PAGE_BLOCKS * BLOCK_SIZE) as u64;
        size.div_ceil(page_bytes) as usize
    }

    /// Blocks of page `index` (the last page of a volume may hold fewer).
    pub fn blocks_in_page(&self, index: usize) -> usize {
        let blocks = self.size.div_ceil(BLOCK_SIZE as u64) as usize;
        blocks.saturating_sub(index * PAGE_BLOCKS).min(PAGE_BLOCKS)
    }

    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and integers always serializes.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Parses and checks a manifest read from a target.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "manifest";
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| FormatError::Invalid {
            what: WHAT,
            why: e.to_string(),
        })?;
        let invalid = |why: String| FormatError::Invalid { what: WHAT, why };
        if m.format != FORMAT {
            return Err(invalid(format!("format {:?}, not {FORMAT:?}", m.format)));
        }
        if m.block_size as usize != BLOCK_SIZE {
            return Err(invalid(format!("block size {}", m.block_size)));
        }
        if m.pages.len() != Self::pages_for(m.size) {
            return Err(invalid(format!(
                "{} pages for {} bytes, {} expected",
                m.pages.len(),
                m.size,
                Self::pages_for(m.size)
            )));
        }
        for p in m.pages.iter().flatten() {
            BlockHash::from_hex(p)?;
        }
        Ok(m)
    }

    /// Page `index`'s name, if it is not all zero.
    pub fn page(&self, index: usize) -> Result<Option<BlockHash>, FormatError> {
        match self.pages.get(index) {
            Some(Some(hex)) => Ok(Some(BlockHash::from_hex(hex)?)),
            Some(None) => Ok(None),
            None => Err(FormatError::Invalid {
                what: "manifest",
                why: format!("no page {index} in {} pages", self.pages.len()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(size: u64) -> Manifest {
        let pages = Manifest::pages_for(size);
        Manifest {
            format: FORMAT.into(),
            volume: "db".into(),
            name: "b-1".into(),
            size,
            block_size: BLOCK_SIZE as u32,
            snapshot: "backup-1".into(),
            created_unix_ms: 1_764_000_000_000,
            parent: None,
            pages: (0..pages)
                .map(|i| (i % 2 == 0).then(|| BlockHash::of(&[i as u8]).to_hex()))
                .collect(),
        }
    }

    #[test]
    fn a_manifest_round_trips_and_counts_its_pages() {
        let gib = 1u64 << 30;
        let m = sample(2 * gib + 4096);
        assert_eq!(m.pages.len(), 3);
        assert_eq!(m.blocks_in_page(0), PAGE_BLOCKS);
        assert_eq!(m.blocks_in_page(2), 1, "4 KiB past 2 GiB: one block");
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.page(1).unwrap(), None);
        assert!(m.page(0).unwrap().is_some());
        assert!(m.page(3).is_err());
    }

    #[test]
    fn a_manifest_that_does_not_add_up_is_refused() {
        let m = sample(1 << 30);
        let mut wrong = m.clone();
        wrong.pages.push(None);
        assert!(Manifest::decode(&wrong.encode()).is_err(), "page count");
        let mut wrong = m.clone();
        wrong.format = "corral-backup/9".into();
        assert!(Manifest::decode(&wrong.encode()).is_err(), "format");
        let mut wrong = m.clone();
        wrong.pages[0] = Some("not-a-hash".into());
        assert!(Manifest::decode(&wrong.encode()).is_err(), "page name");
        assert!(Manifest::decode(b"{").is_err());
    }
}
