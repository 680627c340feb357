//! The live normal sessions of a server, by target and initiator port (the
//! initiator name and ISID of an I_T nexus), and the TSIHs given to new
//! sessions. A login whose initiator port matches a live session of the
//! same target reinstates it (RFC 7143 §6.3.5): the registry hands back
//! the old session for the caller to close.
//!
//! Generic over the handle kept per session (the server keeps what it
//! needs to close the old session and wait for it), so that it holds no
//! I/O.

use std::collections::HashMap;

use crate::reservation::Nexus;

/// A registered session.
#[derive(Debug)]
pub struct Registered<H> {
    pub tsih: u16,
    pub handle: H,
}

/// Live normal sessions by (target index, initiator port).
#[derive(Debug)]
pub struct SessionRegistry<H> {
    sessions: HashMap<(usize, Nexus), Registered<H>>,
    next_tsih: u16,
}

impl<H> Default for SessionRegistry<H> {
    fn default() -> Self {
        SessionRegistry {
            sessions: HashMap::new(),
            next_tsih: 1,
        }
    }
}

impl<H> SessionRegistry<H> {
    /// The TSIH of a new session (discovery or normal): counts up from 1,
    /// wrapping, never 0 (0 means "new session" in a login request).
    pub fn allocate_tsih(&mut self) -> u16 {
        loop {
            let t = self.next_tsih;
            self.next_tsih = self.next_tsih.wrapping_add(1);
            if t != 0 {
                return t;
            }
        }
    }

    /// Register a normal session of `target` from `nexus`. Returns the
    /// session it reinstates (same target, same initiator port), which the
    /// caller closes.
    pub fn register(
        &mut self,
        target: usize,
        nexus: Nexus,
        tsih: u16,
        handle: H,
    ) -> Option<Registered<H>> {
        self.sessions
            .insert((target, nexus), Registered { tsih, handle })
    }

    /// The session `tsih` of `target` from `nexus` ended: forget it, unless
    /// a newer session has already taken its place. Returns whether it was
    /// forgotten.
    pub fn ended(&mut self, target: usize, nexus: &Nexus, tsih: u16) -> bool {
        let key = (target, nexus.clone());
        if self.sessions.get(&key).is_some_and(|e| e.tsih == tsih) {
            self.sessions.remove(&key);
            true
        } else {
            false
        }
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, isid: u8) -> Nexus {
        Nexus {
            initiator: name.into(),
            isid: [0x80, 0, 0, 0, 0, isid],
        }
    }

    #[test]
    fn tsihs_count_up_and_skip_zero() {
        let mut r = SessionRegistry::<()>::default();
        assert_eq!((r.allocate_tsih(), r.allocate_tsih()), (1, 2));
        r.next_tsih = u16::MAX;
        assert_eq!(r.allocate_tsih(), u16::MAX);
        assert_eq!(r.allocate_tsih(), 1);
    }

    #[test]
    fn a_login_from_the_same_initiator_port_reinstates_the_session() {
        let mut r = SessionRegistry::default();
        assert!(r.register(0, port("iqn.a", 1), 1, "first").is_none());
        let old = r.register(0, port("iqn.a", 1), 2, "second").unwrap();
        assert_eq!((old.tsih, old.handle), (1, "first"));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn other_isids_initiators_and_targets_are_other_sessions() {
        let mut r = SessionRegistry::default();
        assert!(r.register(0, port("iqn.a", 1), 1, ()).is_none());
        assert!(r.register(0, port("iqn.a", 2), 2, ()).is_none());
        assert!(r.register(0, port("iqn.b", 1), 3, ()).is_none());
        assert!(r.register(1, port("iqn.a", 1), 4, ()).is_none());
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn a_reinstated_session_ending_leaves_its_successor_registered() {
        let mut r = SessionRegistry::default();
        r.register(0, port("iqn.a", 1), 1, ());
        r.register(0, port("iqn.a", 1), 2, ());
        assert!(!r.ended(0, &port("iqn.a", 1), 1));
        assert_eq!(r.len(), 1);
        assert!(r.ended(0, &port("iqn.a", 1), 2));
        assert!(r.is_empty());
    }
}
