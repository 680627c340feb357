//! The record of the engines that should run on this node: each one's spec,
//! addresses and last pid, kept in one small JSON file in the data dir
//! (`DATA_DIR/.engines/engines.json`) and rewritten whole, atomically
//! (temp file, fsync, rename, fsync of the directory), at every change.
//! A restarted daemon reads it to bring its engines back.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::NodeError;
use crate::spec::{EngineAddresses, EngineSpec};

/// The format version this daemon writes and reads.
pub const RECORD_VERSION: u32 = 1;

/// One engine that should run on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineRecord {
    pub spec: EngineSpec,
    pub addresses: EngineAddresses,
    /// The last engine process started (or adopted) for it.
    pub pid: Option<u32>,
    /// The epoch that engine opened the volume at, once it served: a
    /// replica at a higher epoch means another engine has taken the
    /// volume over since, and this one must not come back.
    #[serde(default)]
    pub epoch: Option<u64>,
    /// Started for one call (a snapshot of a volume attached nowhere) and
    /// stopped after it: a restarted daemon stops it instead of bringing it
    /// back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transient: bool,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    engines: Vec<EngineRecord>,
}

/// The engines record file.
#[derive(Clone, Debug)]
pub struct RecordFile {
    path: PathBuf,
}

impl RecordFile {
    pub fn new(path: PathBuf) -> Self {
        RecordFile { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn bad(&self, why: impl std::fmt::Display) -> NodeError {
        NodeError::Record {
            path: self.path.clone(),
            why: format!(
                "{why}; it is not a record this daemon can trust: move it aside to start without it (the engines it names are then neither supervised nor restarted)"
            ),
        }
    }

    /// The recorded engines by volume; none when the file does not exist.
    pub fn load(&self) -> Result<BTreeMap<String, EngineRecord>, NodeError> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(NodeError::io(&self.path, e)),
        };
        let on_disk: OnDisk = serde_json::from_slice(&text)
            .map_err(|e| self.bad(format_args!("unreadable ({e})")))?;
        if on_disk.version != RECORD_VERSION {
            return Err(self.bad(format_args!(
                "format version {} (this daemon reads {RECORD_VERSION})",
                on_disk.version
            )));
        }
        let mut engines = BTreeMap::new();
        for record in on_disk.engines {
            // The same checks as a request's spec: an edited record gets no
            // further than a bad request would.
            EngineSpec::from_pb(&record.spec.to_pb()).map_err(|e| self.bad(e))?;
            let volume = record.spec.volume.clone();
            if engines.insert(volume.clone(), record).is_some() {
                return Err(self.bad(format_args!("volume {volume:?} is recorded twice")));
            }
        }
        Ok(engines)
    }

    /// Replace the record with `engines`, atomically and durably.
    pub fn save(&self, engines: &BTreeMap<String, EngineRecord>) -> Result<(), NodeError> {
        let on_disk = OnDisk {
            version: RECORD_VERSION,
            engines: engines.values().cloned().collect(),
        };
        let mut text = serde_json::to_vec_pretty(&on_disk).map_err(|e| NodeError::Record {
            path: self.path.clone(),
            why: format!("cannot encode: {e}"),
        })?;
        text.push(b'\n');
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| NodeError::io(dir, e))?;
        let mut temp_name = self.path.clone().into_os_string();
        temp_name.push(".tmp");
        let temp = PathBuf::from(temp_name);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&temp)?;
            f.write_all(&text)?;
            f.sync_all()
        };
        write().map_err(|e| NodeError::io(&temp, e))?;
        std::fs::rename(&temp, &self.path).map_err(|e| NodeError::io(&self.path, e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| NodeError::io(dir, e))
    }
}

/// The record in memory and on disk: every change is written through
/// before it counts (changes are serialised; a failed write is undone).
pub struct EngineBook {
    file: RecordFile,
    engines: tokio::sync::Mutex<BTreeMap<String, EngineRecord>>,
}

impl EngineBook {
    /// Load the record at `file` (none: empty).
    pub fn open(file: RecordFile) -> Result<Self, NodeError> {
        let engines = file.load()?;
        Ok(EngineBook {
            file,
            engines: tokio::sync::Mutex::new(engines),
        })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The recorded engines now.
    pub async fn engines(&self) -> BTreeMap<String, EngineRecord> {
        self.engines.lock().await.clone()
    }

    /// Change the record with `change` and write it; if the write fails,
    /// the change is undone and the error returned. `change` may refuse
    /// (`Err`): then nothing is written.
    pub async fn update<R>(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, EngineRecord>) -> Result<R, NodeError>,
    ) -> Result<R, NodeError> {
        let mut engines = self.engines.lock().await;
        let mut next = engines.clone();
        let result = change(&mut next)?;
        if next == *engines {
            return Ok(result);
        }
        let file = self.file.clone();
        let written = next.clone();
        tokio::task::spawn_blocking(move || file.save(&written))
            .await
            .map_err(|e| NodeError::Task(e.to_string()))??;
        *engines = next;
        Ok(result)
    }

    /// Record the epoch `volume`'s engine serves at.
    pub async fn set_epoch(&self, volume: &str, epoch: u64) -> Result<(), NodeError> {
        self.update(|engines| {
            if let Some(r) = engines.get_mut(volume) {
                r.epoch = Some(epoch);
            }
            Ok(())
        })
        .await
    }

    /// Forget `volume`'s engine.
    pub async fn remove(&self, volume: &str) -> Result<(), NodeError> {
        self.update(|engines| {
            engines.remove(volume);
            Ok(())
        })
        .await
    }

    /// Record `pid` as `volume`'s process (nothing if it is not recorded).
    pub async fn set_pid(&self, volume: &str, pid: u32) -> Result<(), NodeError> {
        self.update(|engines| {
            if let Some(r) = engines.get_mut(volume) {
                r.pid = Some(pid);
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::v1 as pb;

    fn record(volume: &str, port: u16, pid: Option<u32>) -> EngineRecord {
        let spec = EngineSpec::from_pb(&pb::EngineSpec {
            volume: volume.into(),
            size: 1 << 30,
            replicas: vec!["10.0.0.1:9500".into(), "10.0.0.2:9500".into()],
            write_policy: "quorum".into(),
            nbd: true,
            iscsi: true,
            ..Default::default()
        })
        .unwrap();
        let addresses = EngineAddresses::assign(
            "10.0.0.1".parse().unwrap(),
            &spec,
            &[port, port + 1, port + 2],
        )
        .unwrap();
        EngineRecord {
            epoch: None,
            spec,
            addresses,
            pid,
            transient: false,
        }
    }

    #[test]
    fn a_record_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let file = RecordFile::new(dir.path().join("sub").join("engines.json"));
        assert!(file.load().unwrap().is_empty(), "no file: no engines");
        let engines: BTreeMap<String, EngineRecord> = [
            ("a".to_string(), record("a", 10000, Some(42))),
            ("b".to_string(), record("b", 10003, None)),
        ]
        .into();
        file.save(&engines).unwrap();
        assert_eq!(file.load().unwrap(), engines);
        // Rewritten whole: a smaller record replaces it.
        let fewer: BTreeMap<String, EngineRecord> =
            [("b".to_string(), record("b", 10003, Some(7)))].into();
        file.save(&fewer).unwrap();
        assert_eq!(file.load().unwrap(), fewer);
        assert!(
            !dir.path().join("sub").join("engines.json.tmp").exists(),
            "the temp file was renamed"
        );
    }

    fn load_text(text: &[u8]) -> NodeError {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engines.json");
        std::fs::write(&path, text).unwrap();
        RecordFile::new(path).load().unwrap_err()
    }

    #[test]
    fn a_torn_or_garbage_record_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = RecordFile::new(dir.path().join("engines.json"));
        file.save(&[("a".to_string(), record("a", 10000, Some(1)))].into())
            .unwrap();
        let whole = std::fs::read(file.path()).unwrap();
        for text in [&whole[..whole.len() / 2], b"\x00\x00garbage", b"", b"[]"] {
            let e = load_text(text).to_string();
            assert!(e.contains("engines.json"), "names the file: {e}");
            assert!(e.contains("unreadable"), "{e}");
            assert!(e.contains("move it aside"), "says what to do: {e}");
        }
    }

    #[tokio::test]
    async fn the_book_writes_changes_through_and_keeps_refused_ones_out() {
        let dir = tempfile::tempdir().unwrap();
        let file = RecordFile::new(dir.path().join("engines.json"));
        let book = EngineBook::open(file.clone()).unwrap();
        book.update(|e| {
            e.insert("a".into(), record("a", 10000, None));
            Ok(())
        })
        .await
        .unwrap();
        book.set_pid("a", 42).await.unwrap();
        book.set_pid("unknown", 43).await.unwrap();
        let refused = book
            .update(|e| {
                e.clear();
                Err::<(), _>(NodeError::NotFound("x".into()))
            })
            .await;
        assert!(refused.is_err());
        let on_disk = file.load().unwrap();
        assert_eq!(on_disk, book.engines().await);
        assert_eq!(on_disk.len(), 1);
        assert_eq!(on_disk["a"].pid, Some(42));
        // A second book (a restarted daemon) reads the same.
        assert_eq!(EngineBook::open(file).unwrap().engines().await, on_disk);
    }

    #[test]
    fn an_unknown_version_or_a_bad_spec_is_refused() {
        let e = load_text(br#"{"version": 9, "engines": []}"#).to_string();
        assert!(e.contains("format version 9"), "{e}");
        let mut bad = record("a", 10000, None);
        bad.spec.size = 0;
        let text = serde_json::to_vec(&OnDisk {
            version: RECORD_VERSION,
            engines: vec![bad],
        })
        .unwrap();
        let e = load_text(&text).to_string();
        assert!(e.contains("size"), "{e}");
        let twice = serde_json::to_vec(&OnDisk {
            version: RECORD_VERSION,
            engines: vec![record("a", 10000, None), record("a", 10003, None)],
        })
        .unwrap();
        assert!(load_text(&twice).to_string().contains("recorded twice"));
    }
}
