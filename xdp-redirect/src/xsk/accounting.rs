//! Frame accounting: each chunk is at any time in exactly one of: the free
//! list, a fill ring or the kernel's rx path, a user batch or a fresh tx
//! buffer ([`super::TxBuffers`]), a tx queue/ring awaiting completion, lent
//! to another thread ([`super::LentChunk`], [`super::LentFrame`]), or lost
//! with a closed socket.
//!
//! [`Xsk::accounting`] counts them (cheap, any time);
//! [`Xsk::audit_quiescent`] checks chunk by chunk when nothing is in flight.

use std::sync::atomic::Ordering;

use super::Xsk;
use super::ring;

/// Where the UMEM's chunks are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameAccounting {
    /// All chunks of the UMEM.
    pub total: u64,
    /// On the free list.
    pub free: u64,
    /// Given to fill rings, not yet received back.
    pub fill: u64,
    /// Held in user batches, or lent as fresh tx buffers
    /// ([`super::TxBuffers`]) not yet queued.
    pub held: u64,
    /// Queued or on tx rings, not yet completed.
    pub tx: u64,
    /// Left in the rings of closed sockets.
    pub lost: u64,
    /// Lent to another thread ([`Xsk::lend`]), not taken back yet.
    pub lent: u64,
    /// Of `lent`: dropped by their borrower without being given back (its
    /// thread died): lost for good, never reused.
    pub lent_dropped: u64,
}

impl FrameAccounting {
    /// True when every chunk is somewhere.
    pub fn is_balanced(&self) -> bool {
        self.free + self.fill + self.held + self.tx + self.lost + self.lent == self.total
    }
}

impl Xsk {
    /// Where the chunks are now.
    pub fn accounting(&self) -> FrameAccounting {
        let mut a = FrameAccounting {
            total: u64::from(self.cfg.frame_count),
            free: self.free.len() as u64,
            held: self.claims.held() as u64,
            lost: self.lost,
            lent: self.claims.lent() as u64,
            lent_dropped: self.mem.lent_dropped.load(Ordering::Relaxed),
            ..FrameAccounting::default()
        };
        for s in self.sockets.iter().flatten() {
            a.fill += s.fill_out;
            a.tx += s.tx_out;
        }
        a
    }

    /// With no traffic in flight (tx completed, nothing held): checks chunk
    /// by chunk that the free list, the unconsumed fill ring entries and the
    /// lent chunks hold every chunk exactly once, and that no lent chunk was
    /// dropped by its borrower. Returns the accounting on success, or a
    /// description of the first discrepancy.
    pub fn audit_quiescent(&mut self) -> Result<FrameAccounting, String> {
        for sock in self.sockets.iter_mut().flatten() {
            ring::reap(sock, &self.mem, &mut self.free);
        }
        let acc = self.accounting();
        if !acc.is_balanced() {
            return Err(format!("unbalanced: {acc:?}"));
        }
        if acc.held != 0 || acc.tx != 0 || acc.lost != 0 {
            return Err(format!("not quiescent: {acc:?}"));
        }
        let mut seen = vec![false; self.cfg.frame_count as usize];
        let mut mark = |addr: u64, whence: &str| -> Result<(), String> {
            let i = (addr / self.mem.frame_size) as usize;
            match seen.get_mut(i) {
                Some(s) if !*s => {
                    *s = true;
                    Ok(())
                }
                Some(_) => Err(format!("chunk {i} twice (again in {whence})")),
                None => Err(format!("address {addr:#x} outside the UMEM ({whence})")),
            }
        };
        for a in &self.free {
            mark(*a, "free list")?;
        }
        for i in self.claims.lent_chunks() {
            mark(i as u64 * self.mem.frame_size, "lent")?;
        }
        for s in self.sockets.iter().flatten() {
            let entries = ring::fill_ring_entries(&s.fill);
            if entries.len() as u64 != s.fill_out {
                return Err(format!(
                    "{}: {} chunks in the fill ring, {} given and not received",
                    s.ifname,
                    entries.len(),
                    s.fill_out
                ));
            }
            for a in entries {
                mark(a, "fill ring")?;
            }
        }
        if let Some(i) = seen.iter().position(|s| !*s) {
            return Err(format!("chunk {i} is nowhere"));
        }
        if acc.lent_dropped != 0 {
            return Err(format!(
                "{} lent chunks were dropped by their borrower without being given back \
                 (lost for good, they stay lent): {acc:?}",
                acc.lent_dropped
            ));
        }
        Ok(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounting_balances_only_when_every_chunk_is_somewhere() {
        let mut a = FrameAccounting {
            total: 10,
            free: 4,
            fill: 3,
            held: 1,
            tx: 2,
            lost: 0,
            lent: 0,
            lent_dropped: 0,
        };
        assert!(a.is_balanced());
        a.free -= 1;
        assert!(!a.is_balanced());
        a.lent = 1;
        a.lent_dropped = 1;
        assert!(a.is_balanced(), "a dropped lent chunk is still lent");
    }
}
