//! The replica's metadata database, `meta.redb`.
//!
//! Owns the redb file: table `meta` maps string keys to JSON values (volume identity and
//! geometry, epoch, membership, layer chain, clean flag); table `dirty` holds the indices of
//! the write-intent regions that are marked dirty (`u64 -> ()`). Every commit is durable
//! (redb's default, `Durability::Immediate`) except one that only clears dirty regions
//! (`Durability::None`: lost with power, the regions stay dirty). The store above decides
//! *when* to commit.

use std::path::{Path, PathBuf};

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{Database, ReadableDatabase, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Result, StoreError, io_err, redb_err};
use crate::index::{self, Extent, LayerId};
use crate::{CloneRecord, LayerInfo, Membership, ReservationRecord};

/// File name of the metadata database inside the replica directory.
pub(crate) const META_FILE: &str = "meta.redb";
/// Name used while `create` builds the database, renamed to [`META_FILE`] when complete.
pub(crate) const META_TMP_FILE: &str = "meta.redb.tmp";

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const DIRTY: TableDefinition<u64, ()> = TableDefinition::new("dirty");
/// Layer id → that read-only layer's extent list (module `index`).
const EXTENTS: TableDefinition<u32, &[u8]> = TableDefinition::new("extents");

/// Version of the on-disk format this code writes. Version 2 tells "never written" from
/// "discarded" in the checksum files (module `entry`).
pub(crate) const FORMAT_VERSION: u64 = 2;
/// Oldest version this code opens; [`crate::ReplicaStore::open`] upgrades it.
pub(crate) const OLDEST_FORMAT_VERSION: u64 = 1;

/// redb keeps a page cache per database; a replica's metadata is tiny, and a daemon hosts
/// many replicas, so keep it small.
const CACHE_BYTES: usize = 4 << 20;

mod key {
    pub const FORMAT: &str = "format";
    pub const VOLUME: &str = "volume";
    pub const SIZE: &str = "size";
    pub const BLOCK_SIZE: &str = "block_size";
    pub const CHUNK_SIZE: &str = "chunk_size";
    pub const REGION_SIZE: &str = "region_size";
    pub const INSTANCE_ID: &str = "instance_id";
    pub const EPOCH: &str = "epoch";
    pub const MEMBERSHIP: &str = "membership";
    pub const LAYERS: &str = "layers";
    pub const CLEAN: &str = "clean";
    pub const RESERVATIONS: &str = "reservations";
    pub const CLONE: &str = "clone";
}

/// Everything recorded in the `meta` table.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub volume: String,
    pub size: u64,
    pub block_size: u32,
    pub chunk_size: u32,
    pub region_size: u64,
    pub instance_id: String,
    pub epoch: corral_types::Epoch,
    pub membership: Membership,
    pub layers: Vec<LayerInfo>,
    pub clean: bool,
    /// Absent until the first save (and in stores from before reservations were kept).
    pub reservations: Option<ReservationRecord>,
    /// Absent unless the volume is a clone.
    pub clone: Option<CloneRecord>,
}

/// An open `meta.redb`.
///
/// redb fails every operation after one I/O error ("previous I/O error")
/// until the database is closed and opened again; a commit that ran out of
/// space would leave the metadata unwritable, even once space is freed,
/// until the daemon restarts. So after any failed operation the database is
/// closed and opened again before the next one (redb recovers its last
/// commit; what failed is not recorded, as the caller was told).
pub(crate) struct MetaDb {
    /// None only while a reopen fails (the next call tries again).
    db: RwLock<Option<Database>>,
    /// An operation failed: reopen before the next.
    failed: AtomicBool,
    path: PathBuf,
    /// The format version recorded in the file.
    format: u64,
}

impl std::fmt::Debug for MetaDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaDb").field("path", &self.path).finish()
    }
}

fn json<T: Serialize + ?Sized>(key: &str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Metadata(format!("encoding key `{key}`: {e}")))
}

impl MetaDb {
    /// Writes a complete new database for `rec` in `dir`: built under a temporary name,
    /// committed, closed, then renamed into place and the directory synced, so a crash
    /// during `create` never leaves a half-initialised `meta.redb` behind.
    pub(crate) fn create(dir: &Path, rec: &Record) -> Result<Self> {
        let tmp = dir.join(META_TMP_FILE);
        let path = dir.join(META_FILE);
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing stale {}", tmp.display()), e)),
        }
        {
            let db = builder()
                .create(&tmp)
                .map_err(|e| redb_err(format!("creating {}", tmp.display()), e))?;
            let this = MetaDb::with(db, &tmp);
            let mut kv = vec![(key::FORMAT, json(key::FORMAT, &FORMAT_VERSION)?)];
            kv.extend(Self::record_kv(rec)?);
            this.put(&kv)?;
            // Make sure the dirty table exists so that readers never see it missing.
            this.update_dirty(&[], &[], false)?;
            this.into_db()?
                .close()
                .map_err(|e| redb_err(format!("closing {}", tmp.display()), e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| {
            io_err(
                format!("renaming {} to {}", tmp.display(), path.display()),
                e,
            )
        })?;
        sync_dir(dir)?;
        Self::open_file(&path)
    }

    fn record_kv(rec: &Record) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![
            (key::VOLUME, json(key::VOLUME, &rec.volume)?),
            (key::SIZE, json(key::SIZE, &rec.size)?),
            (key::BLOCK_SIZE, json(key::BLOCK_SIZE, &rec.block_size)?),
            (key::CHUNK_SIZE, json(key::CHUNK_SIZE, &rec.chunk_size)?),
            (key::REGION_SIZE, json(key::REGION_SIZE, &rec.region_size)?),
            (key::INSTANCE_ID, json(key::INSTANCE_ID, &rec.instance_id)?),
            (key::EPOCH, json(key::EPOCH, &rec.epoch)?),
            (key::MEMBERSHIP, json(key::MEMBERSHIP, &rec.membership)?),
            (key::LAYERS, json(key::LAYERS, &rec.layers)?),
            (key::CLEAN, json(key::CLEAN, &rec.clean)?),
        ])
    }

    fn with(db: Database, path: &Path) -> Self {
        MetaDb {
            db: RwLock::new(Some(db)),
            failed: AtomicBool::new(false),
            path: path.to_path_buf(),
            format: FORMAT_VERSION,
        }
    }

    fn open_file(path: &Path) -> Result<Self> {
        Ok(Self::with(Self::open_db(path)?, path))
    }

    /// The database, for closing it.
    fn into_db(self) -> Result<Database> {
        let ctx = self.ctx("closing");
        self.db
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(|| StoreError::Metadata(format!("{ctx}: the database is not open")))
    }

    /// Runs `f` on the database, reopening it first if an operation failed
    /// since (see [`MetaDb`]). `f` must not call back into `self`.
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        if self.failed.load(Ordering::Acquire) {
            self.reopen()?;
        }
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        let Some(open) = db.as_ref() else {
            self.failed.store(true, Ordering::Release);
            return Err(StoreError::Metadata(
                self.ctx("not open (reopening it after an I/O error failed)"),
            ));
        };
        let r = f(open);
        if r.is_err() {
            self.failed.store(true, Ordering::Release);
        }
        r
    }

    /// Closes the database and opens it again (after a failed operation).
    fn reopen(&self) -> Result<()> {
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        if !self.failed.load(Ordering::Acquire) {
            return Ok(()); // another caller did it
        }
        drop(db.take());
        *db = Some(Self::open_db(&self.path)?);
        self.failed.store(false, Ordering::Release);
        tracing::info!(path = %self.path.display(), "metadata database reopened after a failed operation");
        Ok(())
    }

    fn open_db(path: &Path) -> Result<Database> {
        #[cfg(test)]
        if crate::powercut::watched(path) {
            // The power-cut model journals what redb writes and syncs.
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| io_err(format!("opening {}", path.display()), e))?;
            let backend = crate::powercut::JournaledBackend::new(file, path)
                .map_err(|e| redb_err(format!("opening {}", path.display()), e))?;
            return builder()
                .create_with_backend(backend)
                .map_err(|e| redb_err(format!("opening {}", path.display()), e));
        }
        builder()
            .open(path)
            .map_err(|e| redb_err(format!("opening {}", path.display()), e))
    }

    /// Opens `dir/meta.redb` and reads the record and the dirty region indices.
    pub(crate) fn open(dir: &Path) -> Result<(Self, Record, Vec<u64>)> {
        let mut this = Self::open_file(&dir.join(META_FILE))?;
        let (format, rec, dirty) = this.load()?;
        this.format = format;
        Ok((this, rec, dirty))
    }

    fn ctx(&self, what: &str) -> String {
        format!("{}: {what}", self.path.display())
    }

    /// The format version recorded in the file.
    pub(crate) fn format(&self) -> u64 {
        self.format
    }

    /// Records that the directory is now in the current format.
    pub(crate) fn set_current_format(&mut self) -> Result<()> {
        self.put_value(key::FORMAT, &FORMAT_VERSION)?;
        self.format = FORMAT_VERSION;
        Ok(())
    }

    fn load(&self) -> Result<(u64, Record, Vec<u64>)> {
        self.with_db(|db| {
            let txn = db.begin_read()
                .map_err(|e| redb_err(self.ctx("beginning a read transaction"), e))?;
            let meta = txn
                .open_table(META)
                .map_err(|e| redb_err(self.ctx("opening table `meta`"), e))?;
            let get = |k: &str| -> Result<String> {
                let v = meta
                    .get(k)
                    .map_err(|e| redb_err(self.ctx(&format!("reading key `{k}`")), e))?
                    .ok_or_else(|| StoreError::Metadata(self.ctx(&format!("key `{k}` is missing"))))?;
                Ok(v.value().to_string())
            };
            let format: u64 = self.decode(key::FORMAT, &get(key::FORMAT)?)?;
            if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&format) {
                return Err(StoreError::Metadata(self.ctx(&format!(
                    "unsupported format version {format} (this build reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})"
                ))));
            }
            let rec = Record {
                volume: self.decode(key::VOLUME, &get(key::VOLUME)?)?,
                size: self.decode(key::SIZE, &get(key::SIZE)?)?,
                block_size: self.decode(key::BLOCK_SIZE, &get(key::BLOCK_SIZE)?)?,
                chunk_size: self.decode(key::CHUNK_SIZE, &get(key::CHUNK_SIZE)?)?,
                region_size: self.decode(key::REGION_SIZE, &get(key::REGION_SIZE)?)?,
                instance_id: self.decode(key::INSTANCE_ID, &get(key::INSTANCE_ID)?)?,
                epoch: self.decode(key::EPOCH, &get(key::EPOCH)?)?,
                membership: self.decode(key::MEMBERSHIP, &get(key::MEMBERSHIP)?)?,
                layers: self.decode(key::LAYERS, &get(key::LAYERS)?)?,
                clean: self.decode(key::CLEAN, &get(key::CLEAN)?)?,
                reservations: match meta
                    .get(key::RESERVATIONS)
                    .map_err(|e| redb_err(self.ctx("reading key `reservations`"), e))?
                {
                    Some(v) => Some(self.decode(key::RESERVATIONS, v.value())?),
                    None => None,
                },
                clone: match meta
                    .get(key::CLONE)
                    .map_err(|e| redb_err(self.ctx("reading key `clone`"), e))?
                {
                    Some(v) => Some(self.decode(key::CLONE, v.value())?),
                    None => None,
                },
            };
            let dirty_table = txn
                .open_table(DIRTY)
                .map_err(|e| redb_err(self.ctx("opening table `dirty`"), e))?;
            let mut dirty = Vec::new();
            for entry in dirty_table
                .range::<u64>(..)
                .map_err(|e| redb_err(self.ctx("listing dirty regions"), e))?
            {
                let (k, _) = entry.map_err(|e| redb_err(self.ctx("listing dirty regions"), e))?;
                dirty.push(k.value());
            }
            Ok((format, rec, dirty))
        })
    }

    fn decode<T: DeserializeOwned>(&self, key: &str, raw: &str) -> Result<T> {
        serde_json::from_str(raw).map_err(|e| {
            StoreError::Metadata(self.ctx(&format!("decoding key `{key}` ({raw:?}): {e}")))
        })
    }

    /// Durably stores key/value pairs in one transaction.
    pub(crate) fn put(&self, kv: &[(&str, String)]) -> Result<()> {
        self.with_db(|db| {
            let txn = db
                .begin_write()
                .map_err(|e| redb_err(self.ctx("beginning a write transaction"), e))?;
            {
                let mut t = txn
                    .open_table(META)
                    .map_err(|e| redb_err(self.ctx("opening table `meta`"), e))?;
                for (k, v) in kv {
                    t.insert(*k, v.as_str())
                        .map_err(|e| redb_err(self.ctx(&format!("writing key `{k}`")), e))?;
                }
            }
            txn.commit()
                .map_err(|e| redb_err(self.ctx("committing metadata"), e))
        })
    }

    /// Durably stores one typed value.
    pub(crate) fn put_value<T: Serialize + ?Sized>(&self, k: &str, v: &T) -> Result<()> {
        self.put(&[(k, json(k, v)?)])
    }

    pub(crate) fn set_epoch(&self, epoch: corral_types::Epoch) -> Result<()> {
        self.put_value(key::EPOCH, &epoch)
    }

    pub(crate) fn set_membership(&self, m: &Membership) -> Result<()> {
        self.put_value(key::MEMBERSHIP, m)
    }

    pub(crate) fn set_reservations(&self, r: &ReservationRecord) -> Result<()> {
        self.put_value(key::RESERVATIONS, r)
    }

    pub(crate) fn set_clone(&self, r: &CloneRecord) -> Result<()> {
        self.put_value(key::CLONE, r)
    }

    pub(crate) fn set_clean(&self, clean: bool) -> Result<()> {
        self.put_value(key::CLEAN, &clean)
    }

    /// In one durable transaction: marks `set` dirty, clears `clear`, and if `clear_all`
    /// empties the table first.
    pub(crate) fn update_dirty(&self, set: &[u64], clear: &[u64], clear_all: bool) -> Result<()> {
        self.with_db(|db| {
            let mut txn = db
                .begin_write()
                .map_err(|e| redb_err(self.ctx("beginning a write transaction"), e))?;
            if set.is_empty() && !clear.is_empty() {
                // Clearing only: no sync of its own. Lost with power, the regions are merely
                // dirty a while longer; the next durable commit (a mark) persists it.
                txn.set_durability(redb::Durability::None)
                    .map_err(|e| StoreError::Metadata(self.ctx(&format!("durability: {e}"))))?;
            }
            {
                let mut t = txn
                    .open_table(DIRTY)
                    .map_err(|e| redb_err(self.ctx("opening table `dirty`"), e))?;
                if clear_all {
                    t.retain(|_, _| false)
                        .map_err(|e| redb_err(self.ctx("clearing dirty regions"), e))?;
                }
                for r in clear {
                    t.remove(*r).map_err(|e| {
                        redb_err(self.ctx(&format!("clearing dirty region {r}")), e)
                    })?;
                }
                for r in set {
                    t.insert(*r, ())
                        .map_err(|e| redb_err(self.ctx(&format!("marking region {r} dirty")), e))?;
                }
            }
            txn.commit()
                .map_err(|e| redb_err(self.ctx("committing dirty regions"), e))
        })
    }

    /// Every read-only layer's extent list, by layer id.
    pub(crate) fn load_extents(&self) -> Result<std::collections::HashMap<LayerId, Vec<Extent>>> {
        self.with_db(|db| {
            let txn = db
                .begin_read()
                .map_err(|e| redb_err(self.ctx("beginning a read transaction"), e))?;
            let mut out = std::collections::HashMap::new();
            let table = match txn.open_table(EXTENTS) {
                Ok(t) => t,
                // A store that never took a snapshot has no such table.
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(out),
                Err(e) => return Err(redb_err(self.ctx("opening table `extents`"), e)),
            };
            for entry in table
                .range::<u32>(..)
                .map_err(|e| redb_err(self.ctx("listing extents"), e))?
            {
                let (k, v) = entry.map_err(|e| redb_err(self.ctx("listing extents"), e))?;
                let list = index::decode(v.value()).ok_or_else(|| {
                    StoreError::Metadata(
                        self.ctx(&format!("extent list of layer {} is malformed", k.value())),
                    )
                })?;
                out.insert(k.value(), list);
            }
            Ok(out)
        })
    }

    /// One layer's extent list (empty if none is stored).
    pub(crate) fn layer_extents(&self, id: LayerId) -> Result<Vec<Extent>> {
        self.with_db(|db| {
            let txn = db
                .begin_read()
                .map_err(|e| redb_err(self.ctx("beginning a read transaction"), e))?;
            let table = match txn.open_table(EXTENTS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(redb_err(self.ctx("opening table `extents`"), e)),
            };
            match table
                .get(id)
                .map_err(|e| redb_err(self.ctx(&format!("reading extents of layer {id}")), e))?
            {
                Some(v) => index::decode(v.value()).ok_or_else(|| {
                    StoreError::Metadata(
                        self.ctx(&format!("extent list of layer {id} is malformed")),
                    )
                }),
                None => Ok(Vec::new()),
            }
        })
    }

    /// In one durable transaction: the layer chain, extent lists stored and
    /// removed, and (if given) the volume size.
    pub(crate) fn commit_chain(
        &self,
        layers: &[LayerInfo],
        put: &[(LayerId, &[Extent])],
        delete: &[LayerId],
        size: Option<u64>,
    ) -> Result<()> {
        self.with_db(|db| {
            let txn = db
                .begin_write()
                .map_err(|e| redb_err(self.ctx("beginning a write transaction"), e))?;
            {
                let mut m = txn
                    .open_table(META)
                    .map_err(|e| redb_err(self.ctx("opening table `meta`"), e))?;
                let chain = json(key::LAYERS, layers)?;
                m.insert(key::LAYERS, chain.as_str())
                    .map_err(|e| redb_err(self.ctx("writing key `layers`"), e))?;
                if let Some(size) = size {
                    let v = json(key::SIZE, &size)?;
                    m.insert(key::SIZE, v.as_str())
                        .map_err(|e| redb_err(self.ctx("writing key `size`"), e))?;
                }
                let mut x = txn
                    .open_table(EXTENTS)
                    .map_err(|e| redb_err(self.ctx("opening table `extents`"), e))?;
                for (id, list) in put {
                    let raw = index::encode(list);
                    x.insert(*id, raw.as_slice()).map_err(|e| {
                        redb_err(self.ctx(&format!("writing extents of layer {id}")), e)
                    })?;
                }
                for id in delete {
                    x.remove(*id).map_err(|e| {
                        redb_err(self.ctx(&format!("removing extents of layer {id}")), e)
                    })?;
                }
            }
            txn.commit()
                .map_err(|e| redb_err(self.ctx("committing the layer chain"), e))
        })
    }

    /// Durably marks the store cleanly shut down and empties the dirty table.
    pub(crate) fn close_clean(self) -> Result<()> {
        self.with_db(|db| {
            let txn = db
                .begin_write()
                .map_err(|e| redb_err(self.ctx("beginning a write transaction"), e))?;
            {
                let mut d = txn
                    .open_table(DIRTY)
                    .map_err(|e| redb_err(self.ctx("opening table `dirty`"), e))?;
                d.retain(|_, _| false)
                    .map_err(|e| redb_err(self.ctx("clearing dirty regions"), e))?;
                let mut m = txn
                    .open_table(META)
                    .map_err(|e| redb_err(self.ctx("opening table `meta`"), e))?;
                m.insert(key::CLEAN, "true")
                    .map_err(|e| redb_err(self.ctx("writing key `clean`"), e))?;
            }
            txn.commit()
                .map_err(|e| redb_err(self.ctx("committing clean shutdown"), e))
        })?;
        let ctx = self.ctx("closing");
        self.into_db()?.close().map_err(|e| redb_err(ctx, e))
    }
}

fn builder() -> redb::Builder {
    let mut b = Database::builder();
    b.set_cache_size(CACHE_BYTES);
    b
}

/// fsync of a directory, so that file creations and renames in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(format!("fsync directory {}", dir.display()), e))
}
