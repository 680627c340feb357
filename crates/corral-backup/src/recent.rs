//! Objects a process put or read lately, kept so that the next backup of
//! the same volume need not read them back from the target
//! ([`RecentObjects`], decision 67): the pages a backup wrote are the
//! pages the next one starts from, and the manifest it wrote names them.
//!
//! A page is named by the BLAKE3 of its bytes and checked against it when
//! decoded, so a kept copy is the object whatever happened on the target
//! since. A manifest is named by its backup, and a backup removed and made
//! again could take the name: a kept manifest is used only while the
//! target still lists the object with the size and the modification time
//! (to the second: an S3 listing gives milliseconds, a HEAD whole seconds)
//! recorded when it was kept.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

use crate::target::{ObjectInfo, Target};

/// Bytes kept by default: a few GiBs' pages (about 1.2 MiB each when the
/// GiB is fully written) and manifests.
pub const DEFAULT_RECENT_BYTES: usize = 8 << 20;

/// Target URL and object name.
type Key = (String, String);

#[derive(Clone)]
struct Kept {
    bytes: Bytes,
    /// For a manifest: the listing it is valid for (size, modified second).
    listed: Option<(u64, u64)>,
}

/// A bounded set of objects, the oldest dropped first.
pub struct RecentObjects {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    bytes: usize,
    order: VecDeque<Key>,
    kept: HashMap<Key, Kept>,
}

impl RecentObjects {
    pub fn new(max_bytes: usize) -> Self {
        RecentObjects {
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn key(target: &Target, name: &str) -> Key {
        (target.url().to_string(), name.to_string())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::lock(&self.inner)
    }

    fn keep(&self, key: Key, kept: Kept) {
        let len = kept.bytes.len();
        if len > self.max_bytes {
            return;
        }
        let mut inner = self.lock();
        if let Some(old) = inner.kept.insert(key.clone(), kept) {
            inner.bytes -= old.bytes.len();
            inner.order.retain(|k| *k != key);
        }
        inner.bytes += len;
        inner.order.push_back(key);
        while inner.bytes > self.max_bytes {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(k) = inner.kept.remove(&oldest) {
                inner.bytes -= k.bytes.len();
            }
        }
    }

    /// Page object `name` (content-addressed), if kept.
    pub fn page(&self, target: &Target, name: &str) -> Option<Bytes> {
        let inner = self.lock();
        inner
            .kept
            .get(&Self::key(target, name))
            .map(|k| k.bytes.clone())
    }

    /// Keeps page object `name`.
    pub fn keep_page(&self, target: &Target, name: &str, bytes: Bytes) {
        self.keep(
            Self::key(target, name),
            Kept {
                bytes,
                listed: None,
            },
        );
    }

    /// The manifest object `listed`, if kept for the same size and time.
    pub fn manifest(&self, target: &Target, listed: &ObjectInfo) -> Option<Bytes> {
        let inner = self.lock();
        let kept = inner.kept.get(&Self::key(target, &listed.name))?;
        (kept.listed == Some(as_listed(listed))).then(|| kept.bytes.clone())
    }

    /// Keeps a manifest as the target lists it.
    pub fn keep_manifest(&self, target: &Target, listed: &ObjectInfo, bytes: Bytes) {
        self.keep(
            Self::key(target, &listed.name),
            Kept {
                bytes,
                listed: Some(as_listed(listed)),
            },
        );
    }
}

fn as_listed(o: &ObjectInfo) -> (u64, u64) {
    (o.size, o.modified_unix_ms / 1000)
}

impl std::fmt::Debug for RecentObjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("RecentObjects")
            .field("objects", &inner.kept.len())
            .field("bytes", &inner.bytes)
            .finish()
    }
}

impl Default for RecentObjects {
    fn default() -> Self {
        Self::new(DEFAULT_RECENT_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::file_target;

    fn listed(name: &str, size: u64, modified_unix_ms: u64) -> ObjectInfo {
        ObjectInfo {
            name: name.into(),
            size,
            modified_unix_ms,
        }
    }

    #[test]
    fn pages_are_kept_up_to_the_bound_oldest_dropped_first() {
        let tmp = tempfile::tempdir().unwrap();
        let t = file_target(tmp.path());
        let r = RecentObjects::new(10);
        r.keep_page(&t, "p1", Bytes::from_static(b"aaaa"));
        r.keep_page(&t, "p2", Bytes::from_static(b"bbbb"));
        assert_eq!(r.page(&t, "p1").as_deref(), Some(&b"aaaa"[..]));
        r.keep_page(&t, "p3", Bytes::from_static(b"cccc"));
        assert_eq!(r.page(&t, "p1"), None, "the oldest goes past 10 bytes");
        assert!(r.page(&t, "p2").is_some() && r.page(&t, "p3").is_some());
        r.keep_page(&t, "big", Bytes::from(vec![0u8; 11]));
        assert_eq!(r.page(&t, "big"), None, "larger than the bound");
        std::fs::create_dir(tmp.path().join("other")).unwrap();
        let other = file_target(&tmp.path().join("other"));
        assert_eq!(r.page(&other, "p2"), None, "another target");
    }

    #[test]
    fn a_manifest_is_used_only_while_listed_as_it_was_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let t = file_target(tmp.path());
        let r = RecentObjects::default();
        let m = listed("volumes/db/backups/b1", 5, 1000);
        r.keep_manifest(&t, &m, Bytes::from_static(b"hello"));
        assert_eq!(r.manifest(&t, &m).as_deref(), Some(&b"hello"[..]));
        let same_second = listed("volumes/db/backups/b1", 5, 1999);
        assert!(r.manifest(&t, &same_second).is_some(), "HEAD's precision");
        let remade = listed("volumes/db/backups/b1", 5, 2000);
        assert_eq!(r.manifest(&t, &remade), None, "made again later");
        let resized = listed("volumes/db/backups/b1", 6, 1000);
        assert_eq!(r.manifest(&t, &resized), None);
    }
}
