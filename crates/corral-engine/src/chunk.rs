//! Chunks: the volume's address space cut into fixed, power-of-two pieces.
//!
//! Every I/O is split at chunk boundaries. The chunk is the unit of ordering
//! (all requests for one chunk travel on the same data stream) and, later, of
//! dirty tracking and rebuild.

/// One piece of a request that lies inside a single chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Index of the chunk.
    pub chunk: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Length in bytes (never 0, never crossing a chunk boundary).
    pub len: u64,
    /// Offset of this piece inside the original request.
    pub request_offset: u64,
}

/// The chunk geometry of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMap {
    shift: u32,
}

impl ChunkMap {
    /// `chunk_size` must be a power of two of at least 4 KiB.
    pub fn new(chunk_size: u32) -> Option<Self> {
        (chunk_size.is_power_of_two() && chunk_size >= 4096).then(|| ChunkMap {
            shift: chunk_size.trailing_zeros(),
        })
    }

    pub fn chunk_size(&self) -> u64 {
        1 << self.shift
    }

    pub fn chunk_of(&self, offset: u64) -> u64 {
        offset >> self.shift
    }

    /// Split `[offset, offset+len)` at chunk boundaries.
    pub fn split(&self, offset: u64, len: u64) -> impl Iterator<Item = Segment> + '_ {
        let size = self.chunk_size();
        let end = offset.saturating_add(len);
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let chunk = self.chunk_of(at);
            let chunk_end = (chunk + 1).saturating_mul(size);
            let seg_end = chunk_end.min(end);
            let seg = Segment {
                chunk,
                offset: at,
                len: seg_end - at,
                request_offset: at - offset,
            };
            at = seg_end;
            Some(seg)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_boundaries() {
        let map = ChunkMap::new(4096).unwrap();
        let segs: Vec<_> = map.split(4000, 5000).collect();
        assert_eq!(
            segs,
            vec![
                Segment {
                    chunk: 0,
                    offset: 4000,
                    len: 96,
                    request_offset: 0
                },
                Segment {
                    chunk: 1,
                    offset: 4096,
                    len: 4096,
                    request_offset: 96
                },
                Segment {
                    chunk: 2,
                    offset: 8192,
                    len: 808,
                    request_offset: 4192
                },
            ]
        );
        assert_eq!(map.split(0, 0).count(), 0);
        assert!(ChunkMap::new(3000).is_none());
        assert!(ChunkMap::new(2048).is_none());
    }

    #[test]
    fn segments_cover_the_request_exactly() {
        let map = ChunkMap::new(65536).unwrap();
        for (offset, len) in [
            (0u64, 1u64),
            (65535, 2),
            (12345, 1 << 20),
            (1 << 40, 300_000),
        ] {
            let segs: Vec<_> = map.split(offset, len).collect();
            assert_eq!(segs.iter().map(|s| s.len).sum::<u64>(), len);
            assert_eq!(segs[0].offset, offset);
            for pair in segs.windows(2) {
                assert_eq!(pair[0].offset + pair[0].len, pair[1].offset);
                assert_ne!(pair[0].chunk, pair[1].chunk);
            }
        }
    }
}

/// A set of chunk indices as a bitmap: which chunks a member may differ in.
/// One bit per chunk (a 1 TiB volume in 256 KiB chunks: 512 KiB).
#[derive(Clone, Debug)]
pub struct ChunkBitmap {
    words: Vec<u64>,
    chunks: u64,
    count: u64,
}

impl ChunkBitmap {
    pub fn new(chunks: u64) -> Self {
        ChunkBitmap {
            words: vec![0; chunks.div_ceil(64) as usize],
            chunks,
            count: 0,
        }
    }

    /// Make room for `chunks` chunks (the volume grew); a smaller count
    /// changes nothing. The new chunks are unmarked.
    pub fn grow(&mut self, chunks: u64) {
        if chunks <= self.chunks {
            return;
        }
        self.words.resize(chunks.div_ceil(64) as usize, 0);
        self.chunks = chunks;
    }

    /// Mark chunk `c` (ignored when out of range).
    pub fn insert(&mut self, c: u64) {
        if c >= self.chunks {
            return;
        }
        let (w, b) = ((c / 64) as usize, c % 64);
        if self.words[w] & (1 << b) == 0 {
            self.words[w] |= 1 << b;
            self.count += 1;
        }
    }

    /// Unmark chunk `c`.
    pub fn remove(&mut self, c: u64) {
        if c >= self.chunks {
            return;
        }
        let (w, b) = ((c / 64) as usize, c % 64);
        if self.words[w] & (1 << b) != 0 {
            self.words[w] &= !(1 << b);
            self.count -= 1;
        }
    }

    pub fn contains(&self, c: u64) -> bool {
        c < self.chunks && self.words[(c / 64) as usize] & (1 << (c % 64)) != 0
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The marked chunks in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(w, word)| {
            let word = *word;
            (0..64u64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| w as u64 * 64 + b)
        })
    }
}

#[cfg(test)]
mod bitmap_tests {
    use super::ChunkBitmap;

    #[test]
    fn marks_counts_and_lists_in_order() {
        let mut m = ChunkBitmap::new(130);
        for c in [129, 3, 64, 3, 200] {
            m.insert(c);
        }
        assert_eq!(m.len(), 3);
        assert!(m.contains(64) && !m.contains(65) && !m.contains(200));
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![3, 64, 129]);
        m.remove(64);
        m.remove(64);
        m.remove(500);
        assert_eq!(m.len(), 2);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![3, 129]);
    }

    #[test]
    fn grows_keeping_what_is_marked() {
        let mut m = ChunkBitmap::new(60);
        m.insert(59);
        m.insert(100);
        assert!(!m.contains(100));
        m.grow(130);
        m.grow(10);
        m.insert(100);
        m.insert(129);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![59, 100, 129]);
        assert_eq!(m.len(), 3);
    }
}
