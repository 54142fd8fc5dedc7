//! The agent's own drop reasons: frames the pipeline did not drop but the worker's I/O could not
//! deliver. Shaped like the pipeline's `DropReason` (a fieldless `repr(u8)` enum with one stable
//! label per variant); they index the counters after it, from `DropReason::COUNT`.

use sluice_dataplane::verdict::DropReason;

macro_rules! agent_drops {
    ($( $(#[doc = $doc:literal])* $name:ident = $label:literal, )*) => {
        /// Why the worker's I/O dropped a frame.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum AgentDrop {
            $( $(#[doc = $doc])* $name, )*
        }
        impl AgentDrop {
            /// Every reason, in counter order.
            pub const ALL: &'static [AgentDrop] = &[$(AgentDrop::$name,)*];
            /// The number of reasons.
            pub const COUNT: usize = Self::ALL.len();
            /// A short stable name (metrics label, counters file).
            pub fn as_str(self) -> &'static str {
                match self { $(AgentDrop::$name => $label,)* }
            }
        }
    };
}

agent_drops! {
    /// The frame belongs to another worker but this one has no handoff rings (see `handoff`).
    HandoffUnsupported = "handoff_unsupported",
    /// The verdict named a port no worker has a socket for.
    NoSocket = "no_socket",
    /// The pipeline said pass to the kernel, the frame was already redirected to userspace and
    /// there is no punt link to give it back.
    PassAfterRedirect = "pass_after_redirect",
    /// The TX queue of the destination socket was full.
    TxFull = "tx_full",
    /// The handoff ring to the owning worker was full (every buffer of the pair in flight).
    HandoffFull = "handoff_full",
    /// A frame too large for a handoff buffer, or for the destination's UMEM chunks.
    TooLarge = "too_large",
}

impl AgentDrop {
    /// Its index in a worker's drop counters (after the pipeline's reasons).
    pub fn index(self) -> u8 {
        u8::try_from(DropReason::COUNT + self as usize).unwrap_or(u8::MAX)
    }
}

/// Counts of the agent's drops, one slot per reason (a worker tallies a round, then adds them to
/// its shared counters once).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentDropCounts([u64; AgentDrop::COUNT]);

impl AgentDropCounts {
    /// Count one drop.
    #[inline]
    pub fn add(&mut self, reason: AgentDrop) {
        self.0[reason as usize] += 1;
    }

    /// The reasons counted at least once, with their counts.
    pub fn nonzero(&self) -> impl Iterator<Item = (AgentDrop, u64)> + '_ {
        AgentDrop::ALL
            .iter()
            .zip(self.0)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (*r, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_follow_the_pipelines_and_are_distinct() {
        for (i, r) in AgentDrop::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert_eq!(usize::from(r.index()), DropReason::COUNT + i);
        }
        let mut names: Vec<_> = AgentDrop::ALL.iter().map(|r| r.as_str()).collect();
        names.extend(DropReason::ALL.iter().map(|r| r.as_str()));
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "labels are unique across both lists");
        assert!(DropReason::COUNT + AgentDrop::COUNT <= usize::from(u8::MAX));
    }

    #[test]
    fn counts_add_up_by_reason() {
        let mut c = AgentDropCounts::default();
        assert_eq!(c.nonzero().count(), 0);
        c.add(AgentDrop::TxFull);
        c.add(AgentDrop::TxFull);
        c.add(AgentDrop::NoSocket);
        let got: Vec<_> = c.nonzero().collect();
        assert_eq!(got, [(AgentDrop::NoSocket, 1), (AgentDrop::TxFull, 2)]);
    }
}
