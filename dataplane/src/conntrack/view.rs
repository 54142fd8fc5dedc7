//! [`CtView`]: a read-only view of a worker's table that answers like the table would, for a
//! trace (`pipeline::trace`).
//!
//! The view borrows the table shared (`&ConnTrack`), so it cannot change it: lookups go through
//! [`ConnTrack::peek`] (an expired entry is a miss, as for [`ConnTrack::lookup`], but is not
//! removed), and whatever the pipeline would change (an entry's state and counters after a
//! packet, a new entry, an entry ended by a reopening SYN) is kept in the view instead, so the
//! rest of the same packet's way sees it as it would have in the table. A view holds the changes
//! of one packet: at most [`CtView::CAPACITY`] entries of its own (one packet makes at most one
//! new entry and changes at most one).
//!
//! Where the view cannot answer exactly as the table: an insert into a full table evicts an entry
//! there (so it never fails for lack of room short of a probe window full of entries the insert
//! itself holds); the view never evicts and never answers [`CtError::Full`] for room, only when
//! its own few slots are used up (not reachable by one packet).

use super::{ConnTrack, CtEntry, CtError, CtHandle, CtState, FlowDir, FlowKey};

const OWN: usize = 4;

/// A table seen through a trace: reads from the table, changes kept here.
#[derive(Debug)]
pub struct CtView<'a, V: Copy> {
    base: &'a ConnTrack<V>,
    /// Entries of the view: changed copies of table entries (under their table handle) and new
    /// ones (scratch handles).
    own: [Option<(CtHandle, CtEntry<V>)>; OWN],
    /// Table entries the view has removed.
    removed: [Option<CtHandle>; OWN],
    next_scratch: u32,
}

impl<'a, V: Copy> CtView<'a, V> {
    /// Entries a view holds of its own (and table entries it can remove).
    pub const CAPACITY: usize = OWN;

    /// A view of `base` with no change of its own.
    pub fn new(base: &'a ConnTrack<V>) -> Self {
        Self {
            base,
            own: [None; OWN],
            removed: [None; OWN],
            next_scratch: 0,
        }
    }

    fn is_removed(&self, h: CtHandle) -> bool {
        self.removed.contains(&Some(h))
    }

    fn own(&self, h: CtHandle) -> Option<&CtEntry<V>> {
        self.own
            .iter()
            .flatten()
            .find(|(oh, _)| *oh == h)
            .map(|(_, e)| e)
    }

    /// [`ConnTrack::lookup`] as seen by the view (expired entries are misses, and stay).
    pub fn lookup(&self, key: &FlowKey, now: u64) -> Option<(CtHandle, FlowDir)> {
        for (h, e) in self.own.iter().flatten() {
            if e.is_expired(now) {
                continue;
            }
            for dir in [FlowDir::Original, FlowDir::Reply] {
                if e.key(dir) == key {
                    return Some((*h, dir));
                }
            }
        }
        self.base
            .peek(key, now)
            .filter(|(h, _)| !self.is_removed(*h) && self.own(*h).is_none())
    }

    /// [`ConnTrack::get`] as seen by the view.
    pub fn get(&self, h: CtHandle) -> Option<&CtEntry<V>> {
        if let Some(e) = self.own(h) {
            return Some(e);
        }
        if self.is_removed(h) || h.is_scratch() {
            return None;
        }
        self.base.get(h)
    }

    /// [`ConnTrack::on_packet`] on the view's copy of the entry.
    pub fn on_packet(
        &mut self,
        h: CtHandle,
        dir: FlowDir,
        tcp_flags: Option<u8>,
        bytes: u32,
        now: u64,
    ) -> Option<CtState> {
        let mut e = *self.get(h)?;
        let state = e.on_packet(dir, tcp_flags, bytes, now, self.base.timeouts());
        self.put(h, e).ok()?;
        Some(state)
    }

    /// [`ConnTrack::remove`] in the view.
    pub fn remove(&mut self, h: CtHandle) {
        if self.get(h).is_none() {
            return;
        }
        for slot in &mut self.own {
            if slot.is_some_and(|(oh, _)| oh == h) {
                *slot = None;
            }
        }
        if !h.is_scratch()
            && let Some(slot) = self.removed.iter_mut().find(|s| s.is_none())
        {
            *slot = Some(h);
        }
    }

    /// [`ConnTrack::insert`] in the view: [`CtError::Exists`] when a live entry (of the table or
    /// the view) holds either key, as the table answers.
    pub fn insert(
        &mut self,
        orig: FlowKey,
        reply: FlowKey,
        value: V,
        now: u64,
    ) -> Result<CtHandle, CtError> {
        if self.lookup(&orig, now).is_some() || self.lookup(&reply, now).is_some() {
            return Err(CtError::Exists);
        }
        let h = CtHandle::scratch(self.next_scratch);
        let e = CtEntry::new(orig, reply, value, now, self.base.timeouts());
        self.put(h, e)?;
        self.next_scratch += 1;
        Ok(h)
    }

    fn put(&mut self, h: CtHandle, e: CtEntry<V>) -> Result<(), CtError> {
        if let Some(slot) = self.own.iter_mut().flatten().find(|(oh, _)| *oh == h) {
            slot.1 = e;
            return Ok(());
        }
        let slot = self
            .own
            .iter_mut()
            .find(|s| s.is_none())
            .ok_or(CtError::Full)?;
        *slot = Some((h, e));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn a_view_answers_like_the_table_and_changes_nothing() {
        let mut ct = table(16);
        let k = tcp(1);
        let h = open(&mut ct, k, 0);
        let before = format!("{:?} {:?}", ct.stats(), ct.get(h).map(|e| e.state()));

        let mut v = CtView::new(&ct);
        assert_eq!(v.lookup(&k, 1), Some((h, O)));
        assert_eq!(v.lookup(&k.reversed(), 1), Some((h, R)));
        assert_eq!(
            v.on_packet(h, R, Some(SYN | ACK), 60, 1),
            Some(CtState::TcpSynRecv)
        );
        assert_eq!(v.get(h).map(|e| e.state()), Some(CtState::TcpSynRecv));
        // The same key cannot be inserted twice; another can, and is found.
        assert_eq!(v.insert(k, k.reversed(), 1, 1), Err(CtError::Exists));
        let k2 = tcp(2);
        let h2 = v.insert(k2, k2.reversed(), 1, 1).unwrap();
        assert_eq!(v.lookup(&k2.reversed(), 1), Some((h2, R)));
        assert!(ct.get(h2).is_none(), "a view's entry is no table's");
        v.remove(h);
        assert_eq!(v.lookup(&k, 1), None);
        assert!(v.get(h).is_none());

        assert_eq!(
            before,
            format!("{:?} {:?}", ct.stats(), ct.get(h).map(|e| e.state()))
        );
        assert_eq!(ct.lookup(&k, 1), Some((h, O)));
        assert_eq!(ct.lookup(&k2, 1), None);
    }

    #[test]
    fn expired_entries_are_misses_and_stay_in_the_table() {
        let mut ct = table(16);
        let k = udp(1);
        ct.insert(k, k.reversed(), 7, 0).unwrap();
        let late = ct.timeouts().udp_unreplied + 1;
        let mut v = CtView::new(&ct);
        assert_eq!(v.lookup(&k, late), None);
        // As in the table, an expired entry does not block a new one.
        assert!(v.insert(k, k.reversed(), 8, late).is_ok());
        assert_eq!(ct.len(), 1, "peek removes nothing");
        assert_eq!(ct.peek(&k, late), None);
        assert!(ct.peek(&k, 1).is_some());
    }
}
