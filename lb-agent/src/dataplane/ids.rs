//! Allocation of ids (services, backend sets, backends) and of Maglev table ranges.
//!
//! Freed ids and ranges are reused as late as possible: a flow in conntrack or a packet in
//! flight may still hold an old id or table offset for a moment, so fresh ones are handed out
//! first and freed ones in the order they were freed.

use std::collections::{BTreeMap, HashSet, VecDeque};

#[derive(Clone, Debug)]
pub struct IdAllocator {
    next: u32,
    limit: u32,
    used: HashSet<u32>,
    free: VecDeque<u32>,
}

impl IdAllocator {
    /// Ids in `first..limit`.
    pub fn new(first: u32, limit: u32) -> Self {
        Self { next: first, limit, used: HashSet::new(), free: VecDeque::new() }
    }

    pub fn alloc(&mut self) -> Option<u32> {
        while self.next < self.limit {
            let id = self.next;
            self.next += 1;
            if self.used.insert(id) {
                return Some(id);
            }
        }
        while let Some(id) = self.free.pop_front() {
            if self.used.insert(id) {
                return Some(id);
            }
        }
        None
    }

    /// Takes a specific id (adopting one found in pinned maps); false if it is taken or out of
    /// range.
    pub fn claim(&mut self, id: u32) -> bool {
        id < self.limit && self.used.insert(id)
    }

    pub fn release(&mut self, id: u32) {
        if self.used.remove(&id) {
            self.free.push_back(id);
        }
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

/// Free ranges of `LB_MAGLEV`, best fit, coalesced on release. Released ranges wait in
/// quarantine until [`MaglevSpace::flush`] (the end of the next change), so a packet that read
/// an old table offset never lands in a table that was rebuilt meanwhile.
#[derive(Clone, Debug)]
pub struct MaglevSpace {
    /// offset -> length
    free: BTreeMap<u32, u32>,
    quarantine: Vec<(u32, u32)>,
    capacity: u32,
    used: u64,
}

impl MaglevSpace {
    pub fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self { free, quarantine: Vec::new(), capacity, used: 0 }
    }

    pub fn alloc(&mut self, size: u32) -> Option<u32> {
        let (&offset, &len) =
            self.free.iter().filter(|(_, l)| **l >= size).min_by_key(|(_, l)| **l)?;
        self.free.remove(&offset);
        if len > size {
            self.free.insert(offset + size, len - size);
        }
        self.used += size as u64;
        Some(offset)
    }

    /// Takes a specific range (a table adopted from pinned maps); false if it is not free (or
    /// not a range at all: pinned maps may hold anything).
    pub fn claim(&mut self, offset: u32, size: u32) -> bool {
        let Some((&start, &len)) = self.free.range(..=offset).next_back() else { return false };
        if offset.checked_add(size).is_none_or(|end| end > start + len) {
            return false;
        }
        self.free.remove(&start);
        if offset > start {
            self.free.insert(start, offset - start);
        }
        if start + len > offset + size {
            self.free.insert(offset + size, start + len - offset - size);
        }
        self.used += size as u64;
        true
    }

    pub fn release(&mut self, offset: u32, size: u32) {
        self.quarantine.push((offset, size));
    }

    /// Returns quarantined ranges to the free space.
    pub fn flush(&mut self) {
        for (offset, size) in std::mem::take(&mut self.quarantine) {
            self.used -= size as u64;
            let mut start = offset;
            let mut len = size;
            if let Some((&s, &l)) = self.free.range(..offset).next_back()
                && s + l == offset
            {
                self.free.remove(&s);
                start = s;
                len += l;
            }
            if let Some(&l) = self.free.get(&(offset + size)) {
                self.free.remove(&(offset + size));
                len += l;
            }
            self.free.insert(start, len);
        }
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fresh_first_then_reused_in_release_order() {
        let mut ids = IdAllocator::new(1, 5);
        assert_eq!((ids.alloc(), ids.alloc()), (Some(1), Some(2)));
        ids.release(2);
        ids.release(1);
        assert_eq!((ids.alloc(), ids.alloc()), (Some(3), Some(4)));
        assert_eq!((ids.alloc(), ids.alloc(), ids.alloc()), (Some(2), Some(1), None));
        ids.release(4);
        assert!(ids.claim(4));
        assert!(!ids.claim(4), "taken");
        assert!(!ids.claim(9), "out of range");
    }

    #[test]
    fn maglev_ranges_best_fit_quarantine_and_coalesce() {
        let mut m = MaglevSpace::new(1000);
        let a = m.alloc(251).unwrap();
        let b = m.alloc(509).unwrap();
        let c = m.alloc(200).unwrap();
        assert_eq!((a, b, c), (0, 251, 760));
        assert_eq!(m.alloc(100), None, "only 40 left");
        m.release(b, 509);
        assert_eq!(m.alloc(251), None, "quarantined until flush");
        m.flush();
        assert_eq!(m.alloc(251), Some(251));
        m.release(a, 251);
        m.release(251, 251);
        m.flush();
        assert_eq!(m.alloc(760), Some(0), "neighbours coalesced");
        assert_eq!(m.used(), 960);
        let mut m = MaglevSpace::new(1000);
        assert!(m.claim(300, 251));
        assert!(!m.claim(400, 10));
        assert_eq!(m.alloc(300), Some(0));
        assert_eq!(m.alloc(449), Some(551));
    }
}
