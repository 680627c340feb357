//! NOP-In keepalive of one connection (RFC 7143 §11.19): after an idle
//! interval with nothing from the initiator, ping it with a NOP-In that
//! asks for an answer (a target transfer tag of ours); if that ping is not
//! answered in time, give up on the connection.
//!
//! Sans-IO: the caller reports bytes received and pings answered, sleeps
//! until [`Keepalive::deadline`], then asks [`Keepalive::on_deadline`] what
//! is due.

use std::time::{Duration, Instant};

use crate::pdu::{Pdu, RESERVED_TAG, op};

/// The first of the target transfer tags of our pings (the tags of R2Ts
/// count up from 1, well below).
const FIRST_PING_TTT: u32 = 0x4000_0000;

/// What is due at the deadline.
#[derive(Debug)]
pub enum KeepaliveStep {
    /// Nothing yet (the initiator spoke since).
    Wait,
    /// Send this NOP-In ping.
    Ping(Pdu),
    /// The ping was not answered in time: drop the connection.
    TimedOut,
}

/// Keepalive state of one connection.
#[derive(Debug)]
pub struct Keepalive {
    /// Idle time before a ping.
    interval: Duration,
    /// Time the initiator has to answer a ping.
    timeout: Duration,
    last_received: Instant,
    /// The outstanding ping: its TTT and when it was sent.
    ping: Option<(u32, Instant)>,
    last_ttt: u32,
}

impl Keepalive {
    pub fn new(now: Instant, interval: Duration, timeout: Duration) -> Self {
        Keepalive {
            interval,
            timeout,
            last_received: now,
            ping: None,
            last_ttt: FIRST_PING_TTT,
        }
    }

    /// Bytes arrived from the initiator.
    pub fn received(&mut self, now: Instant) {
        self.last_received = now;
    }

    /// The initiator answered a ping with `ttt` (a NOP-Out with ITT
    /// 0xffffffff); only our outstanding one counts.
    pub fn answered(&mut self, ttt: u32) {
        if self.ping.is_some_and(|(t, _)| t == ttt) {
            self.ping = None;
        }
    }

    /// When to call [`Keepalive::on_deadline`]: the end of the ping's
    /// timeout while one is outstanding, else the end of the idle interval.
    pub fn deadline(&self) -> Instant {
        match self.ping {
            Some((_, sent)) => sent + self.timeout,
            None => self.last_received + self.interval,
        }
    }

    /// What is due at `now`.
    pub fn on_deadline(&mut self, now: Instant) -> KeepaliveStep {
        if let Some((_, sent)) = self.ping {
            return if now >= sent + self.timeout {
                KeepaliveStep::TimedOut
            } else {
                KeepaliveStep::Wait
            };
        }
        if now < self.last_received + self.interval {
            return KeepaliveStep::Wait;
        }
        self.last_ttt = self.last_ttt.wrapping_add(1);
        if self.last_ttt == RESERVED_TAG {
            self.last_ttt = FIRST_PING_TTT;
        }
        let mut p = Pdu::new(op::NOP_IN);
        p.set_itt(RESERVED_TAG);
        p.set_u32(20, self.last_ttt);
        self.ping = Some((self.last_ttt, now));
        KeepaliveStep::Ping(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(15);
    const TIMEOUT: Duration = Duration::from_secs(5);

    fn ping_ttt(step: KeepaliveStep) -> u32 {
        match step {
            KeepaliveStep::Ping(p) => {
                assert_eq!(p.opcode(), op::NOP_IN);
                assert_eq!(p.itt(), RESERVED_TAG);
                p.u32_at(20)
            }
            other => panic!("expected a ping, got {other:?}"),
        }
    }

    #[test]
    fn an_idle_initiator_is_pinged_after_the_interval() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0, INTERVAL, TIMEOUT);
        assert_eq!(k.deadline(), t0 + INTERVAL);
        assert!(matches!(
            k.on_deadline(t0 + INTERVAL / 2),
            KeepaliveStep::Wait
        ));
        let ttt = ping_ttt(k.on_deadline(t0 + INTERVAL));
        assert_eq!(ttt, FIRST_PING_TTT + 1);
        assert_eq!(k.deadline(), t0 + INTERVAL + TIMEOUT);
    }

    #[test]
    fn traffic_postpones_the_ping() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0, INTERVAL, TIMEOUT);
        k.received(t0 + Duration::from_secs(10));
        assert_eq!(k.deadline(), t0 + Duration::from_secs(25));
        assert!(matches!(k.on_deadline(t0 + INTERVAL), KeepaliveStep::Wait));
    }

    #[test]
    fn an_unanswered_ping_times_out_even_with_other_traffic() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0, INTERVAL, TIMEOUT);
        let ttt = ping_ttt(k.on_deadline(t0 + INTERVAL));
        k.received(t0 + INTERVAL + Duration::from_secs(1));
        // An answer with another tag is not the answer.
        k.answered(ttt + 1);
        assert!(matches!(
            k.on_deadline(t0 + INTERVAL + TIMEOUT),
            KeepaliveStep::TimedOut
        ));
    }

    #[test]
    fn an_answered_ping_rearms_the_interval_with_a_new_tag() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0, INTERVAL, TIMEOUT);
        let first = ping_ttt(k.on_deadline(t0 + INTERVAL));
        let t1 = t0 + INTERVAL + Duration::from_secs(1);
        k.received(t1);
        k.answered(first);
        assert_eq!(k.deadline(), t1 + INTERVAL);
        let second = ping_ttt(k.on_deadline(t1 + INTERVAL));
        assert_eq!(second, first + 1);
    }

    #[test]
    fn ping_tags_never_use_the_reserved_tag() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0, INTERVAL, TIMEOUT);
        k.last_ttt = RESERVED_TAG - 1;
        let ttt = ping_ttt(k.on_deadline(t0 + INTERVAL));
        assert_eq!(ttt, FIRST_PING_TTT);
    }
}
