//! Warnings about conditions a misbehaving peer can repeat at will (a full
//! flow table, a flood of control connections): logged at most once per
//! period, with how many occurrences the line stands for, so the log stays
//! readable and a count is there to alert on.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

pub struct Throttle {
    period: Duration,
    last: Option<Instant>,
    pending: u64,
}

impl Throttle {
    pub const fn new(period: Duration) -> Throttle {
        Throttle {
            period,
            last: None,
            pending: 0,
        }
    }

    /// Counts an occurrence at `now`; `Some(n)` when a warning is due, `n`
    /// being the occurrences since the last one (this one included).
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.pending += 1;
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < self.period)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_once_per_period_with_the_count() {
        let mut t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.hit(t0), Some(1), "the first occurrence is told at once");
        assert_eq!(t.hit(t0 + Duration::from_secs(1)), None);
        assert_eq!(t.hit(t0 + Duration::from_secs(9)), None);
        assert_eq!(
            t.hit(t0 + Duration::from_secs(10)),
            Some(3),
            "the next line counts the two held back and itself"
        );
        assert_eq!(t.hit(t0 + Duration::from_secs(11)), None);
    }
}
