//! Leases: an in-progress backup or restore says so on the target
//! (`volumes/V/leases/ID`), so that garbage collection — in this cluster or
//! another sharing the target — leaves the volume's packs and pages alone
//! until it is done ([`crate::catalog::collect_garbage`]).
//!
//! A lease names who holds it and until when. It is put before the first
//! object is read or written, renewed (overwritten: the one object of the
//! format that is) every third of its time to live while the work goes on,
//! and deleted at the end. A holder that dies leaves a lease that simply
//! expires.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::target::{Target, TargetError};
use crate::{layout, lock};

/// How long a lease lives unless renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(10 * 60);

/// What a lease is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseKind {
    Backup,
    Restore,
}

/// A lease as stored (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub kind: LeaseKind,
    /// The backup being written or read.
    pub backup: String,
    /// Who holds it: host and process, for an operator.
    pub holder: String,
    pub since_unix_ms: u64,
    pub until_unix_ms: u64,
    /// A backup's packs put so far (hex): a backup run again after this
    /// one was interrupted reuses them.
    #[serde(default)]
    pub packs: Vec<String>,
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host} pid {}", std::process::id())
}

/// A lease this process holds; renewed until released or dropped (then it
/// expires on its own).
#[derive(Debug)]
pub struct HeldLease {
    target: Target,
    object: String,
    ttl: Duration,
    lease: Arc<Mutex<Lease>>,
    renew: tokio::task::JoinHandle<()>,
}

fn encode(l: &Lease) -> Bytes {
    Bytes::from(serde_json::to_vec(l).unwrap_or_default())
}

impl HeldLease {
    /// Puts a lease on `volume` for `kind` work on `backup`, living `ttl`
    /// and renewed every third of it.
    pub async fn take(
        target: &Target,
        volume: &str,
        kind: LeaseKind,
        backup: &str,
        ttl: Duration,
    ) -> Result<Self, TargetError> {
        let since = now_unix_ms();
        let id = crate::BlockHash::of(format!("{volume}/{backup}/{since}/{}", holder()).as_bytes());
        let object = layout::lease(volume, &id.to_hex()[..32]);
        let lease = Lease {
            kind,
            backup: backup.to_string(),
            holder: holder(),
            since_unix_ms: since,
            until_unix_ms: since + ttl.as_millis() as u64,
            packs: Vec::new(),
        };
        target.put_overwrite(&object, encode(&lease)).await?;
        let lease = Arc::new(Mutex::new(lease));
        let renew = {
            let target = target.clone();
            let object = object.clone();
            let lease = Arc::clone(&lease);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    let bytes = {
                        let mut l = lock(&lease);
                        l.until_unix_ms = now_unix_ms() + ttl.as_millis() as u64;
                        encode(&l)
                    };
                    // A failed renewal is tried again at the next tick; the
                    // lease still has two thirds of its time.
                    if let Err(e) = target.put_overwrite(&object, bytes).await {
                        tracing::warn!(lease = %object, error = %e, "renewing a backup lease failed");
                    }
                }
            })
        };
        Ok(HeldLease {
            target: target.clone(),
            object,
            ttl,
            lease,
            renew,
        })
    }

    /// Records a pack the backup has put (and renews the lease with it). A
    /// failure only costs a later run the reuse of that pack.
    pub async fn record_pack(&self, pack: crate::BlockHash) {
        let bytes = {
            let mut l = lock(&self.lease);
            l.packs.push(pack.to_hex());
            l.until_unix_ms = now_unix_ms() + self.ttl.as_millis() as u64;
            encode(&l)
        };
        if let Err(e) = self.target.put_overwrite(&self.object, bytes).await {
            tracing::warn!(lease = %self.object, error = %e, "recording a pack in the backup's lease failed");
        }
    }

    /// Stops renewing and deletes the lease.
    pub async fn release(self) -> Result<(), TargetError> {
        self.renew.abort();
        self.target.delete(&self.object).await
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        self.renew.abort();
    }
}

/// The leases on `volume` that have not expired at `now_ms` (object name
/// and lease). An unreadable lease object counts as live: garbage
/// collection errs on the side of keeping data.
/// The packs that backups of `volume` put and recorded in their leases,
/// live or expired: a backup that was interrupted left them, named by no
/// manifest. (A live lease may be another backup still running: its packs
/// are immutable once put, so reusing them is as safe.)
pub async fn recorded_packs(
    target: &Target,
    volume: &str,
) -> Result<Vec<crate::BlockHash>, TargetError> {
    let mut out = Vec::new();
    for object in target.list(&format!("volumes/{volume}/leases/")).await? {
        let Ok(bytes) = target.get(&object).await else {
            continue;
        };
        if let Ok(l) = serde_json::from_slice::<Lease>(&bytes)
            && l.kind == LeaseKind::Backup
        {
            out.extend(
                l.packs
                    .iter()
                    .filter_map(|h| crate::BlockHash::from_hex(h).ok()),
            );
        }
    }
    Ok(out)
}

pub async fn live_leases(
    target: &Target,
    volume: &str,
    now_ms: u64,
) -> Result<Vec<(String, Option<Lease>)>, TargetError> {
    let mut out = Vec::new();
    for object in target.list(&format!("volumes/{volume}/leases/")).await? {
        let bytes = match target.get(&object).await {
            Ok(b) => b,
            Err(TargetError::NotFound { .. }) => continue, // released meanwhile
            Err(e) => return Err(e),
        };
        match serde_json::from_slice::<Lease>(&bytes) {
            Ok(l) if l.until_unix_ms <= now_ms => {}
            Ok(l) => out.push((object, Some(l))),
            Err(_) => out.push((object, None)),
        }
    }
    Ok(out)
}
