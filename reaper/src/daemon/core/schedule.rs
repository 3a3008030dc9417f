//! The schedule: everything due at an instant of the boot clock, earliest
//! first. One timer serves all of it: after every operation the core arms
//! the kernel's timer for `next()` (see `Core::settle`), so nothing is ever
//! found by polling.

#![forbid(unsafe_code)]

use std::collections::BTreeSet;

/// Something the timer must do at a given boot time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Due {
    /// A session's absolute deadline.
    Deadline(u64),
    /// Time to look at a session's activity.
    IdleCheck(u64),
    /// A fenced flow's grace window is over (by socket cookie).
    Fence(u64),
    /// Time to see whether a forwarded flow's packets stopped after its
    /// RSTs (by check id), and write its audit event.
    RstCheck(u64),
    /// Time to forget forwarded flows nobody uses any more.
    ForwardGc,
    /// Time to see whether the node is cut off from the fleet (its lease
    /// unrenewed for `fleet.grace`).
    FleetGrace,
    /// Time to stop expecting an ended session's connections (by session
    /// id).
    EndedExpect(u64),
}

/// Bits of a packed `Due` that hold its id (the top three say which kind).
const ID_BITS: u32 = 61;

impl Due {
    /// The entry in 8 bytes instead of 16 (a schedule holds one per
    /// session). Kinds and ids sort as the enum does: by kind, then id.
    /// Ids are session and check ids the daemon counts from 1, and socket
    /// cookies the kernel counts from 1: none comes near 2^61.
    fn pack(self) -> u64 {
        let (kind, id) = match self {
            Due::Deadline(id) => (0, id),
            Due::IdleCheck(id) => (1, id),
            Due::Fence(cookie) => (2, cookie),
            Due::RstCheck(id) => (3, id),
            Due::ForwardGc => (4, 0),
            Due::FleetGrace => (5, 0),
            Due::EndedExpect(id) => (6, id),
        };
        assert!(id < 1 << ID_BITS, "schedule id {id} out of range");
        (kind << ID_BITS) | id
    }

    fn unpack(packed: u64) -> Due {
        let id = packed & ((1 << ID_BITS) - 1);
        match packed >> ID_BITS {
            0 => Due::Deadline(id),
            1 => Due::IdleCheck(id),
            2 => Due::Fence(id),
            3 => Due::RstCheck(id),
            4 => Due::ForwardGc,
            5 => Due::FleetGrace,
            _ => Due::EndedExpect(id),
        }
    }
}

#[derive(Default)]
pub(super) struct Schedule {
    /// (when, packed `Due`).
    queue: BTreeSet<(u64, u64)>,
}

impl Schedule {
    pub fn push(&mut self, at: u64, due: Due) {
        self.queue.insert((at, due.pack()));
    }

    pub fn cancel(&mut self, at: u64, due: Due) {
        self.queue.remove(&(at, due.pack()));
    }

    /// Moves an entry from `old` to `new`.
    pub fn reschedule(&mut self, old: u64, new: u64, due: Due) {
        self.cancel(old, due);
        self.push(new, due);
    }

    /// The earliest entry due at or before `now`, taken off the schedule.
    pub fn pop_due(&mut self, now: u64) -> Option<(u64, Due)> {
        let &(at, _) = self.queue.first()?;
        if at > now {
            return None;
        }
        self.queue
            .pop_first()
            .map(|(at, packed)| (at, Due::unpack(packed)))
    }

    /// When the earliest entry is due: what the timer is armed for.
    pub fn next(&self) -> Option<u64> {
        self.queue.first().map(|(at, _)| *at)
    }

    /// Session ids in deadline order.
    pub fn deadlines(&self) -> impl Iterator<Item = u64> + '_ {
        self.queue
            .iter()
            .filter_map(|(_, packed)| match Due::unpack(*packed) {
                Due::Deadline(id) => Some(id),
                _ => None,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_only_what_is_due_in_time_order() {
        let mut s = Schedule::default();
        s.push(30, Due::Deadline(1));
        s.push(10, Due::Fence(7));
        s.push(20, Due::IdleCheck(1));
        assert_eq!(s.next(), Some(10));
        assert_eq!(s.pop_due(15), Some((10, Due::Fence(7))));
        assert_eq!(s.pop_due(15), None, "20 is not due at 15");
        s.reschedule(30, 5, Due::Deadline(1));
        assert_eq!(s.pop_due(15), Some((5, Due::Deadline(1))));
        s.cancel(20, Due::IdleCheck(1));
        assert_eq!(s.next(), None);
    }

    #[test]
    fn packed_entries_come_back_as_they_went_in_and_sort_as_the_enum() {
        let dues = [
            Due::Deadline(1),
            Due::Deadline((1 << ID_BITS) - 1),
            Due::IdleCheck(7),
            Due::Fence(u64::from(u32::MAX) + 5),
            Due::RstCheck(3),
            Due::ForwardGc,
        ];
        for due in dues {
            assert_eq!(Due::unpack(due.pack()), due);
        }
        for pair in dues.windows(2) {
            assert_eq!(pair[0].cmp(&pair[1]), pair[0].pack().cmp(&pair[1].pack()));
        }
    }
}
