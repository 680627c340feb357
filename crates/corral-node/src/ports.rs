//! The engine port range (`--engine-ports 10000-10999`) and how ports are
//! handed out of it: an engine gets its control port and one per frontend,
//! the lowest ones that no recorded engine holds and that bind now.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, TcpListener};
use std::str::FromStr;

/// An inclusive range of TCP ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// The range `first..=last`; `None` unless `0 < first <= last`.
    pub fn new(first: u16, last: u16) -> Option<Self> {
        (first > 0 && first <= last).then_some(PortRange { first, last })
    }

    pub fn first(&self) -> u16 {
        self.first
    }

    pub fn last(&self) -> u16 {
        self.last
    }

    /// How many ports it holds.
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Never empty (kept for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// The `count` lowest ports of the range that are not `taken` and for
    /// which `usable` holds (it is asked about each candidate once, in
    /// ascending order, until enough are found); `None` if there are not
    /// that many.
    pub fn allocate(
        &self,
        count: usize,
        taken: &BTreeSet<u16>,
        mut usable: impl FnMut(u16) -> bool,
    ) -> Option<Vec<u16>> {
        let mut chosen = Vec::with_capacity(count);
        for port in self.first..=self.last {
            if chosen.len() == count {
                break;
            }
            if !taken.contains(&port) && usable(port) {
                chosen.push(port);
            }
        }
        (chosen.len() == count).then_some(chosen)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `FIRST-LAST` (inclusive), e.g. `10000-10999`; a single port `P` is `P-P`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid port range {s:?}: {why}");
        let (first, last) = match s.trim().split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (s.trim(), s.trim()),
        };
        let port = |t: &str| {
            t.parse::<u16>().map_err(|_| {
                bad("expected FIRST-LAST with ports from 1 to 65535, e.g. 10000-10999")
            })
        };
        let (first, last) = (port(first)?, port(last)?);
        if first == 0 {
            return Err(bad("port 0 is not a port"));
        }
        PortRange::new(first, last).ok_or_else(|| bad("the first port is above the last"))
    }
}

/// Whether a TCP listener can be bound on `ip:port` now (it is closed
/// again at once; an engine binds it moments later).
pub fn bindable(ip: IpAddr, port: u16) -> bool {
    TcpListener::bind((ip, port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_parse() {
        assert_eq!(
            "10000-10999".parse(),
            Ok(PortRange::new(10000, 10999).unwrap())
        );
        assert_eq!(" 7 - 9 ".parse(), Ok(PortRange::new(7, 9).unwrap()));
        assert_eq!("8080".parse(), Ok(PortRange::new(8080, 8080).unwrap()));
        let range: PortRange = "10000-10999".parse().unwrap();
        assert_eq!(range.len(), 1000);
        assert_eq!(range.to_string(), "10000-10999");
    }

    #[test]
    fn bad_ranges_say_why() {
        for (bad, why) in [
            ("", "expected FIRST-LAST"),
            ("abc", "expected FIRST-LAST"),
            ("10-", "expected FIRST-LAST"),
            ("1-70000", "expected FIRST-LAST"),
            ("2000-1000", "above the last"),
            ("0-10", "port 0"),
            ("-5", "expected FIRST-LAST"),
        ] {
            let e = bad.parse::<PortRange>().unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn allocation_takes_the_lowest_free_usable_ports() {
        let range = PortRange::new(100, 109).unwrap();
        let taken: BTreeSet<u16> = [100, 102].into();
        let got = range.allocate(3, &taken, |p| p != 103);
        assert_eq!(got, Some(vec![101, 104, 105]));
    }

    #[test]
    fn allocation_fails_when_the_range_is_used_up() {
        let range = PortRange::new(100, 103).unwrap();
        let taken: BTreeSet<u16> = [100, 101].into();
        assert_eq!(range.allocate(3, &taken, |_| true), None);
        assert_eq!(range.allocate(2, &taken, |_| true), Some(vec![102, 103]));
        assert_eq!(range.allocate(1, &taken, |_| false), None);
    }

    #[test]
    fn a_port_in_use_does_not_bind() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        assert!(!bindable("127.0.0.1".parse().unwrap(), port));
        drop(held);
        assert!(bindable("127.0.0.1".parse().unwrap(), port));
    }

    proptest! {
        #[test]
        fn allocated_ports_are_distinct_free_usable_and_in_range(
            first in 1u16..60000,
            len in 1u16..200,
            taken in proptest::collection::btree_set(1u16..61000, 0..100),
            unusable in proptest::collection::btree_set(1u16..61000, 0..100),
            count in 0usize..8,
        ) {
            let range = PortRange::new(first, first + len - 1).unwrap();
            match range.allocate(count, &taken, |p| !unusable.contains(&p)) {
                Some(ports) => {
                    prop_assert_eq!(ports.len(), count);
                    let distinct: BTreeSet<u16> = ports.iter().copied().collect();
                    prop_assert_eq!(distinct.len(), count);
                    for p in ports {
                        prop_assert!(range.contains(p));
                        prop_assert!(!taken.contains(&p) && !unusable.contains(&p));
                    }
                }
                None => {
                    let free = (range.first()..=range.last())
                        .filter(|p| !taken.contains(p) && !unusable.contains(p))
                        .count();
                    prop_assert!(free < count, "{} free ports, {} asked", free, count);
                }
            }
        }
    }
}
