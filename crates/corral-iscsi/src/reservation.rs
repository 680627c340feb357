//! Reservations of a logical unit: SPC-2 RESERVE/RELEASE(6/10) and SPC-5
//! persistent reservations (PERSISTENT RESERVE IN/OUT).
//!
//! Pure state: the SCSI layer asks [`Reservations::conflicts`] before a
//! command runs, and hands PR IN/OUT parameter data to the methods here,
//! which return the response data or a [`PrError`]. The persistent part
//! ([`PersistentReservations`]: registrations, the reservation, the PR
//! generation) encodes to bytes the device keeps beyond the engine (on the
//! replicas, see `BlockDevice::save_reservations`), so that an engine
//! restart or a failover to another engine keeps them; SPC-2 reservations
//! end with the I_T nexus and are not kept.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::sense::Sense;

/// An I_T nexus: the initiator port (name + ISID) on our single target port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nexus {
    pub initiator: String,
    pub isid: [u8; 6],
}

impl Nexus {
    /// The iSCSI initiator port name, `<name>,i,0x<isid>`.
    pub fn port_name(&self) -> String {
        let mut s = format!("{},i,0x", self.initiator);
        for b in self.isid {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

/// Persistent reservation types (SPC-5 Table 14).
pub mod pr_type {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
    pub const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;
    pub const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
    pub const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 8;
}

/// How a command touches the medium, for conflict checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Allowed under any reservation (INQUIRY, REPORT LUNS, PR IN/OUT, …).
    Always,
    /// Reads data or state (READ, VERIFY, MODE SENSE, …).
    Read,
    /// Changes data or state (WRITE, UNMAP, SYNCHRONIZE CACHE, …).
    Write,
}

/// Why a persistent reservation request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrError {
    Conflict,
    Sense(Sense),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Persistent {
    nexus: Nexus,
    kind: u8,
}

/// All reservation state of one logical unit.
#[derive(Default, Debug)]
pub struct Reservations {
    /// SPC-2 reservation holder.
    legacy: Option<Nexus>,
    persistent: PersistentReservations,
}

/// The persistent reservation state of a logical unit: what PERSISTENT
/// RESERVE OUT changes, and what outlives the engine.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct PersistentReservations {
    registrations: BTreeMap<Nexus, u64>,
    reservation: Option<Persistent>,
    generation: u32,
}

fn all_registrants(kind: u8) -> bool {
    matches!(
        kind,
        pr_type::WRITE_EXCLUSIVE_ALL_REGISTRANTS | pr_type::EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    )
}

fn valid_type(kind: u8) -> bool {
    matches!(kind, 1 | 3 | 5 | 6 | 7 | 8)
}

impl Reservations {
    /// Would a command with `access` from `nexus` conflict? SPC-2 reserve
    /// conflicts are reported by `legacy` (RELEASE from a non-holder is GOOD).
    pub fn conflicts(&self, nexus: &Nexus, access: Access, is_legacy_cmd: bool) -> bool {
        if let Some(holder) = &self.legacy {
            if holder != nexus && access != Access::Always && !is_legacy_cmd {
                return true;
            }
            if holder != nexus && is_legacy_cmd {
                // RESERVE from another nexus conflicts; RELEASE does not.
                return access == Access::Write;
            }
        }
        let pr = &self.persistent;
        if is_legacy_cmd && pr.reservation.is_some() {
            // RESERVE/RELEASE(6) while a persistent reservation exists.
            return true;
        }
        let Some(r) = &pr.reservation else {
            return false;
        };
        if access == Access::Always || pr.holds(nexus) {
            return false;
        }
        let registered = pr.registrations.contains_key(nexus);
        match r.kind {
            pr_type::WRITE_EXCLUSIVE => access == Access::Write,
            pr_type::EXCLUSIVE_ACCESS => true,
            pr_type::WRITE_EXCLUSIVE_REGISTRANTS_ONLY
            | pr_type::WRITE_EXCLUSIVE_ALL_REGISTRANTS => !registered && access == Access::Write,
            pr_type::EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
            | pr_type::EXCLUSIVE_ACCESS_ALL_REGISTRANTS => !registered,
            _ => false,
        }
    }

    /// The persistent part.
    pub fn persistent(&self) -> &PersistentReservations {
        &self.persistent
    }

    /// Replace the persistent part (after a PR OUT was applied to a copy
    /// and saved, or with the state found at start).
    pub fn set_persistent(&mut self, p: PersistentReservations) {
        self.persistent = p;
    }

    /// RESERVE(6/10).
    pub fn legacy_reserve(&mut self, nexus: &Nexus) -> bool {
        match &self.legacy {
            Some(h) if h != nexus => false,
            _ => {
                self.legacy = Some(nexus.clone());
                true
            }
        }
    }

    /// RELEASE(6/10): only the holder releases; others get GOOD.
    pub fn legacy_release(&mut self, nexus: &Nexus) {
        if self.legacy.as_ref() == Some(nexus) {
            self.legacy = None;
        }
    }

    /// A reset (LUN or target) or I_T nexus loss clears the SPC-2 reservation.
    pub fn reset(&mut self) {
        self.legacy = None;
    }

    /// The nexus is gone (session closed): drop an SPC-2 reservation it held.
    pub fn nexus_lost(&mut self, nexus: &Nexus) {
        if self.legacy.as_ref() == Some(nexus) {
            self.legacy = None;
        }
    }
}

/// How [`PersistentReservations`] is kept: JSON, versioned, names spelled
/// out, so that a record read back by a later release stays readable.
#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    generation: u32,
    registrations: Vec<SavedRegistration>,
    reservation: Option<SavedReservation>,
}

#[derive(Serialize, Deserialize)]
struct SavedRegistration {
    initiator: String,
    isid: [u8; 6],
    key: u64,
}

#[derive(Serialize, Deserialize)]
struct SavedReservation {
    initiator: String,
    isid: [u8; 6],
    kind: u8,
}

const SAVED_VERSION: u32 = 1;

/// Saved reservation state that cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("saved reservation state is not readable: {0}")]
    Malformed(String),
    #[error("saved reservation state has version {0}; this build reads version 1")]
    Version(u32),
    #[error("saved reservation state names an invalid reservation type {0}")]
    Type(u8),
}

impl PersistentReservations {
    /// The bytes the device keeps.
    pub fn encode(&self) -> Vec<u8> {
        let saved = Saved {
            version: SAVED_VERSION,
            generation: self.generation,
            registrations: self
                .registrations
                .iter()
                .map(|(n, key)| SavedRegistration {
                    initiator: n.initiator.clone(),
                    isid: n.isid,
                    key: *key,
                })
                .collect(),
            reservation: self.reservation.as_ref().map(|r| SavedReservation {
                initiator: r.nexus.initiator.clone(),
                isid: r.nexus.isid,
                kind: r.kind,
            }),
        };
        // Serialising plain strings and integers cannot fail.
        serde_json::to_vec(&saved).unwrap_or_default()
    }

    /// Reads back what [`PersistentReservations::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, RestoreError> {
        let saved: Saved =
            serde_json::from_slice(bytes).map_err(|e| RestoreError::Malformed(e.to_string()))?;
        if saved.version != SAVED_VERSION {
            return Err(RestoreError::Version(saved.version));
        }
        let nexus = |initiator: String, isid: [u8; 6]| Nexus { initiator, isid };
        let reservation = match saved.reservation {
            Some(r) if !valid_type(r.kind) => return Err(RestoreError::Type(r.kind)),
            Some(r) => Some(Persistent {
                nexus: nexus(r.initiator, r.isid),
                kind: r.kind,
            }),
            None => None,
        };
        Ok(PersistentReservations {
            registrations: saved
                .registrations
                .into_iter()
                .map(|r| (nexus(r.initiator, r.isid), r.key))
                .collect(),
            reservation,
            generation: saved.generation,
        })
    }

    fn holds(&self, nexus: &Nexus) -> bool {
        match &self.reservation {
            Some(r) if all_registrants(r.kind) => self.registrations.contains_key(nexus),
            Some(r) => &r.nexus == nexus,
            None => false,
        }
    }

    /// PERSISTENT RESERVE IN; `Err` carries sense for a bad service action.
    pub fn pr_in(&self, service_action: u8, nexus: &Nexus) -> Result<Vec<u8>, Sense> {
        let mut v = Vec::new();
        v.extend_from_slice(&self.generation.to_be_bytes());
        match service_action {
            0 => {
                // READ KEYS
                v.extend_from_slice(&((self.registrations.len() * 8) as u32).to_be_bytes());
                for key in self.registrations.values() {
                    v.extend_from_slice(&key.to_be_bytes());
                }
            }
            1 => {
                // READ RESERVATION
                match &self.reservation {
                    Some(r) => {
                        v.extend_from_slice(&16u32.to_be_bytes());
                        let key = if all_registrants(r.kind) {
                            0
                        } else {
                            self.registrations.get(&r.nexus).copied().unwrap_or(0)
                        };
                        v.extend_from_slice(&key.to_be_bytes());
                        v.extend_from_slice(&[0, 0, 0, 0, 0, r.kind & 0xf, 0, 0]);
                    }
                    None => v.extend_from_slice(&0u32.to_be_bytes()),
                }
            }
            2 => {
                // REPORT CAPABILITIES
                v.clear();
                v.extend_from_slice(&8u16.to_be_bytes());
                v.push(0x10); // CRH: RESERVE/RELEASE(6) vs PR handled per SPC-5 5.14.3
                v.push(0x80 | 0x10); // TMV, ALLOW COMMANDS = 001b
                v.push(0x80 | 0x40 | 0x20 | 0x08 | 0x02);
                v.push(0x01);
                v.extend_from_slice(&[0, 0]);
            }
            3 => {
                // READ FULL STATUS
                let mut body = Vec::new();
                for (n, key) in &self.registrations {
                    let holder = self.holds(n);
                    let mut tid = Vec::new();
                    tid.push(0x40 | 0x05); // format 01b (with ISID), protocol iSCSI
                    tid.push(0);
                    let name = n.port_name();
                    let mut name_bytes = name.into_bytes();
                    name_bytes.push(0);
                    while name_bytes.len() % 4 != 0 {
                        name_bytes.push(0);
                    }
                    tid.extend_from_slice(&(name_bytes.len() as u16).to_be_bytes());
                    tid.extend_from_slice(&name_bytes);
                    body.extend_from_slice(&key.to_be_bytes());
                    body.extend_from_slice(&[0, 0, 0, 0]);
                    body.push(if holder { 0x01 } else { 0 });
                    let kind = match &self.reservation {
                        Some(r) if holder => r.kind & 0xf,
                        _ => 0,
                    };
                    body.push(kind);
                    body.extend_from_slice(&[0, 0, 0, 0]);
                    body.extend_from_slice(&1u16.to_be_bytes()); // relative target port
                    body.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    body.extend_from_slice(&tid);
                }
                let _ = nexus;
                v.extend_from_slice(&(body.len() as u32).to_be_bytes());
                v.extend_from_slice(&body);
            }
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        }
        Ok(v)
    }

    /// PERSISTENT RESERVE OUT with its 24-byte parameter list.
    /// Returns the nexuses whose registration was preempted (for unit attentions).
    pub fn pr_out(
        &mut self,
        service_action: u8,
        kind: u8,
        params: &[u8],
        nexus: &Nexus,
    ) -> Result<Vec<Nexus>, PrError> {
        if params.len() < 24 {
            return Err(PrError::Sense(Sense::PARAM_LIST_LENGTH_ERROR));
        }
        let key = u64::from_be_bytes(params[0..8].try_into().unwrap_or([0; 8]));
        let sa_key = u64::from_be_bytes(params[8..16].try_into().unwrap_or([0; 8]));
        let flags = params[20];
        if flags & 0x08 != 0 || flags & 0x04 != 0 {
            // SPEC_I_PT and ALL_TG_PT are not supported.
            return Err(PrError::Sense(Sense::INVALID_FIELD_IN_PARAM_LIST));
        }
        let current = self.registrations.get(nexus).copied();
        match service_action {
            0 | 6 => {
                // REGISTER / REGISTER AND IGNORE EXISTING KEY
                let ignore = service_action == 6;
                match current {
                    None => {
                        if !ignore && key != 0 {
                            return Err(PrError::Conflict);
                        }
                        if sa_key != 0 {
                            self.registrations.insert(nexus.clone(), sa_key);
                        }
                    }
                    Some(k) => {
                        if !ignore && k != key {
                            return Err(PrError::Conflict);
                        }
                        if sa_key == 0 {
                            self.unregister(nexus);
                        } else {
                            self.registrations.insert(nexus.clone(), sa_key);
                        }
                    }
                }
                self.generation = self.generation.wrapping_add(1);
                Ok(Vec::new())
            }
            1 => {
                // RESERVE
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                if !valid_type(kind) {
                    return Err(PrError::Sense(Sense::INVALID_FIELD_IN_CDB));
                }
                match &self.reservation {
                    None => {
                        self.reservation = Some(Persistent {
                            nexus: nexus.clone(),
                            kind,
                        });
                        Ok(Vec::new())
                    }
                    Some(r) if self.holds(nexus) && r.kind == kind => Ok(Vec::new()),
                    Some(_) => Err(PrError::Conflict),
                }
            }
            2 => {
                // RELEASE
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                match &self.reservation {
                    Some(r) if self.holds(nexus) => {
                        if r.kind != kind {
                            return Err(PrError::Sense(Sense::INVALID_RELEASE_OF_PR));
                        }
                        self.reservation = None;
                        Ok(Vec::new())
                    }
                    _ => Ok(Vec::new()),
                }
            }
            3 => {
                // CLEAR
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                let others: Vec<Nexus> = self
                    .registrations
                    .keys()
                    .filter(|n| *n != nexus)
                    .cloned()
                    .collect();
                self.registrations.clear();
                self.reservation = None;
                self.generation = self.generation.wrapping_add(1);
                Ok(others)
            }
            4 | 5 => {
                // PREEMPT / PREEMPT AND ABORT
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                if !valid_type(kind) {
                    return Err(PrError::Sense(Sense::INVALID_FIELD_IN_CDB));
                }
                let holder_key = self.reservation.as_ref().map(|r| {
                    if all_registrants(r.kind) {
                        0
                    } else {
                        self.registrations.get(&r.nexus).copied().unwrap_or(0)
                    }
                });
                let ar = self
                    .reservation
                    .as_ref()
                    .is_some_and(|r| all_registrants(r.kind));
                let preempted;
                if ar && sa_key == 0 {
                    // Remove every other registrant and take the reservation.
                    preempted = self
                        .registrations
                        .keys()
                        .filter(|n| *n != nexus)
                        .cloned()
                        .collect();
                    self.registrations.retain(|n, _| n == nexus);
                    self.reservation = Some(Persistent {
                        nexus: nexus.clone(),
                        kind,
                    });
                } else {
                    if sa_key == 0 {
                        return Err(PrError::Sense(Sense::INVALID_FIELD_IN_PARAM_LIST));
                    }
                    let victims: Vec<Nexus> = self
                        .registrations
                        .iter()
                        .filter(|(n, k)| **k == sa_key && *n != nexus)
                        .map(|(n, _)| n.clone())
                        .collect();
                    let self_match = self.registrations.get(nexus) == Some(&sa_key);
                    if victims.is_empty() && !self_match {
                        return Err(PrError::Conflict);
                    }
                    for v in &victims {
                        self.registrations.remove(v);
                    }
                    if holder_key == Some(sa_key) {
                        self.reservation = Some(Persistent {
                            nexus: nexus.clone(),
                            kind,
                        });
                    }
                    preempted = victims;
                }
                self.generation = self.generation.wrapping_add(1);
                Ok(preempted)
            }
            _ => Err(PrError::Sense(Sense::INVALID_FIELD_IN_CDB)),
        }
    }

    fn unregister(&mut self, nexus: &Nexus) {
        self.registrations.remove(nexus);
        let release = match &self.reservation {
            Some(r) if all_registrants(r.kind) => self.registrations.is_empty(),
            Some(r) => &r.nexus == nexus,
            None => false,
        };
        if release {
            self.reservation = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nx(i: u8) -> Nexus {
        Nexus {
            initiator: format!("iqn.test:{i}"),
            isid: [0, 0, 0, 0, 0, i],
        }
    }

    fn params(key: u64, sa: u64) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa.to_be_bytes());
        p
    }

    #[test]
    fn register_reserve_conflict_release() {
        let mut r = Reservations::default();
        let (a, b) = (nx(1), nx(2));
        r.persistent.pr_out(0, 0, &params(0, 0xa), &a).unwrap();
        r.persistent.pr_out(0, 0, &params(0, 0xb), &b).unwrap();
        r.persistent
            .pr_out(1, pr_type::EXCLUSIVE_ACCESS, &params(0xa, 0), &a)
            .unwrap();
        assert!(r.conflicts(&b, Access::Read, false));
        assert!(!r.conflicts(&a, Access::Write, false));
        assert_eq!(
            r.persistent
                .pr_out(1, pr_type::EXCLUSIVE_ACCESS, &params(0xb, 0), &b),
            Err(PrError::Conflict)
        );
        r.persistent
            .pr_out(4, pr_type::WRITE_EXCLUSIVE, &params(0xb, 0xa), &b)
            .unwrap();
        assert!(r.conflicts(&a, Access::Write, false));
        assert!(!r.conflicts(&a, Access::Read, false));
    }

    proptest::proptest! {
        /// Whatever PR OUT commands made the state, it reads back as it was
        /// saved; and no byte string makes decoding panic.
        #[test]
        fn saved_state_reads_back(
            ops in proptest::collection::vec((0u8..7, 0u8..9, 0u64..4, 0u64..4, 1u8..4), 0..24),
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let mut r = Reservations::default();
            for (sa, kind, key, sa_key, who) in ops {
                let _ = r.persistent.pr_out(sa, kind, &params(key, sa_key), &nx(who));
            }
            let back = PersistentReservations::decode(&r.persistent().encode()).unwrap();
            proptest::prop_assert_eq!(&back, r.persistent());
            let _ = PersistentReservations::decode(&junk);
        }
    }
}
