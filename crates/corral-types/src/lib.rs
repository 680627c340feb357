//! The vocabulary every corral crate shares, defined once: a replica's mode
//! in its volume, and the two counters the consistency protocol orders
//! membership records by — the [`Epoch`] of the engine that wrote a record
//! and the record's [`Generation`]. Records order by (epoch, generation).
//!
//! Nothing here does I/O; the store persists these (as plain JSON numbers
//! and names), the engine decides with them, and `corral-proto` converts
//! them to and from the wire.

use serde::{Deserialize, Serialize};

/// A replica's mode in its volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplicaMode {
    /// Up to date: serves reads, takes writes.
    Rw,
    /// Being rebuilt: takes writes, serves no reads.
    Wo,
    /// Out of the I/O path.
    Err,
}

impl ReplicaMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            ReplicaMode::Rw => "RW",
            ReplicaMode::Wo => "WO",
            ReplicaMode::Err => "ERR",
        }
    }
}

impl std::fmt::Display for ReplicaMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The epoch of an engine: each engine that opens a volume takes one higher
/// than any its replicas have seen, and replicas refuse older ones.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

/// The generation of a membership record: every change of the RW set
/// records the next one.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

macro_rules! counter {
    ($t:ident) => {
        impl $t {
            /// The one after this.
            pub fn next(self) -> $t {
                $t(self.0.saturating_add(1))
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<u64> for $t {
            fn from(v: u64) -> Self {
                $t(v)
            }
        }

        impl From<$t> for u64 {
            fn from(v: $t) -> u64 {
                v.0
            }
        }
    };
}

counter!(Epoch);
counter!(Generation);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn they_persist_as_the_store_always_wrote_them() {
        // The store's JSON record predates these types: plain numbers and
        // the variant names.
        assert_eq!(serde_json::to_string(&Epoch(7)).unwrap(), "7");
        assert_eq!(serde_json::to_string(&Generation(3)).unwrap(), "3");
        assert_eq!(serde_json::to_string(&ReplicaMode::Wo).unwrap(), "\"Wo\"");
        let m: ReplicaMode = serde_json::from_str("\"Err\"").unwrap();
        assert_eq!(m, ReplicaMode::Err);
        assert!((Epoch(2), Generation(1)) > (Epoch(1), Generation(9)));
        assert_eq!(Generation(4).next(), Generation(5));
    }
}
