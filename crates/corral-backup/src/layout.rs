//! Object names under a target's prefix (docs/backups.md, "Objects under
//! the target's prefix"). Volume and backup names are checked before they
//! become part of a path.

use crate::{BlockHash, FormatError};

/// The object that says which format a target holds.
pub const MARKER: &str = "corral-backup.json";

/// A volume or backup name that may be part of an object path: 1 to 64
/// bytes of letters, digits, `.`, `_`, `-`, not starting with `.` or `-`.
pub fn check_name(what: &'static str, name: &str) -> Result<(), FormatError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(FormatError::Invalid {
            what,
            why: format!(
                "{name:?}: 1 to 64 of letters, digits, '.', '_', '-', not starting with '.' or '-'"
            ),
        })
    }
}

pub fn pack(volume: &str, id: &BlockHash) -> String {
    format!("volumes/{volume}/packs/{}", id.to_hex())
}

pub fn page(volume: &str, id: &BlockHash) -> String {
    format!("volumes/{volume}/pages/{}", id.to_hex())
}

/// Where a volume's manifests are (listed to find its backups).
pub fn backups(volume: &str) -> String {
    format!("volumes/{volume}/backups/")
}

pub fn manifest(volume: &str, backup: &str) -> String {
    format!("volumes/{volume}/backups/{backup}.manifest")
}

pub fn lease(volume: &str, id: &str) -> String {
    format!("volumes/{volume}/leases/{id}")
}

/// The backup a manifest's object name belongs to, if it is one.
pub fn backup_of_manifest(volume: &str, object: &str) -> Option<String> {
    let rest = object.strip_prefix(&backups(volume))?;
    let name = rest.strip_suffix(".manifest")?;
    check_name("backup", name).ok()?;
    Some(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_paths_only_when_safe() {
        for good in ["db", "pvc-1a2b", "daily.2026-12-01_10"] {
            assert!(check_name("volume", good).is_ok(), "{good}");
        }
        for bad in ["", "../x", "a/b", ".hidden", "-x", "a b", &"n".repeat(65)] {
            assert!(check_name("volume", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_manifest_name_maps_back_to_its_backup() {
        let m = manifest("db", "daily-1");
        assert_eq!(m, "volumes/db/backups/daily-1.manifest");
        assert_eq!(backup_of_manifest("db", &m).as_deref(), Some("daily-1"));
        assert_eq!(backup_of_manifest("db", "volumes/db/backups/x.tmp"), None);
        assert_eq!(backup_of_manifest("other", &m), None);
        let h = BlockHash::of(b"p");
        assert!(pack("db", &h).starts_with("volumes/db/packs/"));
        assert!(page("db", &h).ends_with(&h.to_hex()));
        assert_eq!(lease("db", "l1"), "volumes/db/leases/l1");
    }
}
