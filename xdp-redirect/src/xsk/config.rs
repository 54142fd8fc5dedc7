//! What a worker's UMEM and sockets are made with: [`XskConfig`] and its
//! checks, done before any syscall.

use super::{KERNEL_TX_BATCH, XDP_PACKET_HEADROOM, XskError};

/// Copy or zero-copy bind. All sockets on one UMEM share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BindMode {
    /// `XDP_COPY`: works on every driver (veth).
    #[default]
    Copy,
    /// `XDP_ZEROCOPY`: the NIC DMAs into the UMEM; fails where unsupported.
    ZeroCopy,
}

/// Busy polling on the sockets (`SO_PREFER_BUSY_POLL`, `SO_BUSY_POLL`,
/// `SO_BUSY_POLL_BUDGET`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusyPoll {
    /// `SO_BUSY_POLL` in microseconds.
    pub usecs: u32,
    /// `SO_BUSY_POLL_BUDGET`: packets per busy-poll round.
    pub budget: u32,
}

/// UMEM and socket settings of one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XskConfig {
    /// Chunks in the UMEM.
    pub frame_count: u32,
    /// Chunk size: a power of two, 2048..=65536 (aligned mode).
    pub frame_size: u32,
    /// UMEM frame headroom, in front of the kernel's 256 bytes.
    pub headroom: u32,
    /// Fill ring size (power of two).
    pub fill_size: u32,
    /// Completion ring size (power of two).
    pub comp_size: u32,
    /// RX ring size (power of two).
    pub rx_size: u32,
    /// TX ring size (power of two).
    pub tx_size: u32,
    /// Packets per [`super::Xsk::recv`].
    pub batch_size: usize,
    /// Copy or zero-copy.
    pub bind_mode: BindMode,
    /// Bind with `XDP_USE_SG` (frames spanning several chunks).
    pub multi_buffer: bool,
    /// Bind with `XDP_USE_NEED_WAKEUP`.
    pub need_wakeup: bool,
    /// Busy polling, if wanted.
    pub busy_poll: Option<BusyPoll>,
    /// Copy mode: how many tx descriptors one kick (`sendto`) may turn into
    /// skbs, `32..=tx_size` (`XDP_MAX_TX_SKB_BUDGET`, Linux 6.17+; the
    /// kernel's fixed 32 before, and when `None`). A kernel without the
    /// option keeps 32 and the socket opens anyway; see
    /// [`super::Xsk::tx_skb_budget`].
    pub tx_skb_budget: Option<u32>,
    /// Register the UMEM with room for AF_XDP tx metadata in front of every
    /// tx descriptor's data, for checksum offload (Linux 6.8+; a kernel
    /// without it leaves the UMEM registered without, see
    /// [`super::Xsk::tx_metadata`]).
    pub tx_metadata: bool,
    /// Chunks the busy sockets may keep in their fill rings beyond their
    /// base shares, together (see [`super::fill`]); 0: fill rings stay at
    /// their base.
    pub fill_boost: u32,
}

impl Default for XskConfig {
    fn default() -> Self {
        Self {
            frame_count: 8192,
            frame_size: 4096,
            headroom: 64,
            fill_size: 2048,
            comp_size: 2048,
            rx_size: 2048,
            tx_size: 2048,
            batch_size: 64,
            bind_mode: BindMode::Copy,
            multi_buffer: true,
            need_wakeup: true,
            busy_poll: None,
            tx_skb_budget: None,
            tx_metadata: true,
            fill_boost: 0,
        }
    }
}

fn pow2(v: u32, what: &'static str) -> Result<(), XskError> {
    if v.is_power_of_two() {
        Ok(())
    } else {
        Err(XskError::Config(what))
    }
}

impl XskConfig {
    /// Refuses a configuration the kernel would refuse, or that leaves no
    /// room for data, naming the field.
    pub(super) fn validate(&self) -> Result<(), XskError> {
        pow2(self.frame_size, "frame_size must be a power of two")?;
        if !(2048..=65536).contains(&self.frame_size) {
            return Err(XskError::Config("frame_size must be 2048..=65536"));
        }
        for (v, what) in [
            (self.fill_size, "fill_size must be a power of two"),
            (self.comp_size, "comp_size must be a power of two"),
            (self.rx_size, "rx_size must be a power of two"),
            (self.tx_size, "tx_size must be a power of two"),
        ] {
            pow2(v, what)?;
        }
        if self.headroom + XDP_PACKET_HEADROOM + 64 > self.frame_size {
            return Err(XskError::Config("headroom leaves no room for data"));
        }
        if self.batch_size == 0 || self.frame_count == 0 {
            return Err(XskError::Config("batch_size and frame_count must be > 0"));
        }
        if self
            .tx_skb_budget
            .is_some_and(|b| !(KERNEL_TX_BATCH..=self.tx_size).contains(&b))
        {
            return Err(XskError::Config("tx_skb_budget must be 32..=tx_size"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{VXLAN_ENCAP_LEN, Xsk};
    use super::*;

    fn bad(cfg: XskConfig) -> &'static str {
        match Xsk::new(&cfg) {
            Err(XskError::Config(why)) => why,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn invalid_configs_are_refused_before_any_syscall() {
        let with = |change: fn(&mut XskConfig)| {
            let mut cfg = XskConfig::default();
            change(&mut cfg);
            cfg
        };
        let cases = [
            (with(|c| c.frame_size = 3000), "power of two"),
            (with(|c| c.frame_size = 1024), "2048"),
            (with(|c| c.fill_size = 1000), "fill_size"),
            (with(|c| c.tx_size = 3), "tx_size"),
            (with(|c| c.headroom = 4096), "headroom"),
            (with(|c| c.batch_size = 0), "batch_size"),
            (with(|c| c.frame_count = 0), "frame_count"),
            (with(|c| c.tx_skb_budget = Some(31)), "tx_skb_budget"),
            (
                with(|c| c.tx_skb_budget = Some(c.tx_size * 2)),
                "tx_skb_budget",
            ),
        ];
        for (cfg, field) in cases {
            let why = bad(cfg.clone());
            assert!(why.contains(field), "{cfg:?}: {why}");
        }
    }

    #[test]
    fn default_headroom_fits_a_vxlan_push() {
        let d = XskConfig::default();
        assert!(d.headroom + XDP_PACKET_HEADROOM >= VXLAN_ENCAP_LEN);
        assert_eq!(d.batch_size, 64);
    }
}
