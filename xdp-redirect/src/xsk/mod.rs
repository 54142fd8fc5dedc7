//! The AF_XDP layer: one UMEM per worker, shared by the sockets it owns.
//!
//! [`Xsk`] owns the UMEM memory, a free list of chunks and the worker's
//! sockets. Every socket (interface, rx queue) has its own fill, completion,
//! rx and tx ring over the same memory, so forwarding a frame from one
//! socket to another moves its descriptors to the other socket's tx ring;
//! nothing is copied.
//!
//! The per-batch cycle, without allocation:
//! 1. [`Xsk::recv`] fills an [`RxBatch`] with up to `batch_size` whole
//!    packets (a packet is one first chunk plus continuation chunks, chained
//!    with `XDP_PKT_CONTD`); [`Xsk::adopt`] adds a frame another worker
//!    wrote into chunks this UMEM lent it ([`Xsk::lend`], [`LentFrame`]), as
//!    if received.
//! 2. [`Xsk::frame`] gives a [`FrameMut`]: the whole first chunk (headroom +
//!    data) mutably, the data offset and length, the continuation chunks
//!    read-only. The caller may move the data bounds (push or pull a VXLAN
//!    header) and sets the verdict: forward to a socket or drop.
//!    [`Xsk::frames`] gives every packet of the batch at once (distinct
//!    chunks, all borrowed together); bounds and verdicts are then set on
//!    the batch by index ([`RxBatch::set_bounds`], [`RxBatch::set_verdict`],
//!    [`RxBatch::append_piece`] to chain followers' bytes behind a leader).
//!    [`Xsk::emit_from`] lends one packet as the source of new ones
//!    (software TSO, fragments) written into fresh chunks of the free list
//!    ([`Emitter`], [`TxBuffers`]) and queued as descriptor chains; the
//!    source stays in the batch.
//! 3. [`Xsk::complete`] moves forwarded frames to their socket's tx queue
//!    (writing a checksum offload request, [`RxBatch::set_tx_checksum`], in
//!    front of the data) and dropped ones to the free list; [`Xsk::flush`]
//!    produces tx descriptors (whole packets, in order), kicks the kernel
//!    while the tx ring is not empty, reaps completions and refills every
//!    fill ring greedily.
//!
//! Frame accounting: each chunk is at any time in exactly one of: the free
//! list, a fill ring or the kernel's rx path, a user batch (or a fresh tx
//! buffer being written), a tx queue/ring awaiting completion, lent to
//! another thread, or lost with a closed socket. [`Xsk::accounting`] counts
//! them, [`Xsk::audit_quiescent`] checks chunk by chunk.
//!
//! The UMEM's memory is shared (`Arc`) by the [`Xsk`] and the chunks it
//! lent, so it stays mapped while any lent chunk exists; everything else
//! about a chunk (which ring, batch or buffer has it) is the [`Xsk`]'s, on
//! the worker's thread.
//!
//! Built on `libxdp-sys` (the C library under xsk-rs, same version) for the
//! descriptor and ring types and the inline ring helpers: xsk-rs 0.11 keeps
//! a descriptor's address crate-private, so a frame's data offset cannot
//! move there (no push/pull of a header in front without memmove). The UMEM
//! registration and the socket setup (ring options, mmap, bind) are done
//! here with `libc`, not with libxdp's `xsk_umem__create` and
//! `xsk_socket__create_shared` (see `umem` and `socket` for why).
//! Multi-buffer uses the kernel's `XDP_USE_SG` bind flag and the
//! `XDP_PKT_CONTD` descriptor option (both from `libc`).
//!
//! RX headroom (measured, copy mode on veth, Linux 6.18): the kernel puts rx
//! data at `XDP_PACKET_HEADROOM (256) + UmemConfig::headroom` from the chunk
//! start, first and continuation chunks alike; so a chunk carries at most
//! `frame_size - 256 - headroom` bytes of a packet and the first chunk always
//! has at least 256 bytes in front of the data for an encapsulation header.
//! With tx metadata registered ([`TxMetadata::Registered`], the default on
//! Linux 6.8+), the first [`TX_METADATA_LEN`] bytes of every chunk belong to
//! the metadata: no tx descriptor's data may start there (bounds refuse it
//! with [`BoundsError::NoMetadataRoom`]); see `metadata` for the layout.
//!
//! Files, one concept each:
//! * `config`: [`XskConfig`] and its checks;
//! * `umem`: the mapping, its registration, chunk arithmetic, the chunks
//!   batches and buffers hold and the chunks lent;
//! * `socket`: open, bind, options, close, counters;
//! * `ring`: creating and mapping the rings, fill, rx, tx and completion ring
//!   operations, kicks;
//! * `batch`: [`RxBatch`], [`FrameMut`], recv/frame/complete;
//! * `chain`: [`RxBatch::append_piece`]: pieces of followers behind a
//!   leader (GRO output), who carries which chunk;
//! * `copy`: [`Xsk::send_copy`] and [`chunks_for`];
//! * `emit`: [`Xsk::emit_from`], [`Emitter`], [`TxBuffers`]: new packets
//!   written from a received one into fresh chunks;
//! * `lend`: [`Xsk::lend`], [`LentChunk`], [`LentFrame`], [`Xsk::adopt`],
//!   [`Xsk::reclaim`]: one copy across workers;
//! * `metadata`: AF_XDP tx metadata (checksum offload), its layout in front
//!   of the data, [`TxMetadata`];
//! * `accounting`: [`FrameAccounting`] and the audit.

mod accounting;
mod batch;
mod chain;
mod config;
mod copy;
mod emit;
pub mod fill;
mod lend;
mod metadata;
mod ring;
mod socket;
mod umem;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use accounting::FrameAccounting;
pub use batch::{BoundsError, Continuations, FrameMut, Frames, RxBatch, Verdict};
pub use chain::ChainError;
pub use config::{BindMode, BusyPoll, XskConfig};
pub use copy::{SendChecksumError, SendError, chunks_for};
pub use emit::{EmitError, Emitted, Emitter, TxBuffers};
pub use lend::{LentChunk, LentError, LentFrame, LentRefusal, WriteError};
pub use metadata::{ChecksumError, TX_METADATA_LEN, TxMetadata};
pub use socket::{KernelStats, SocketStats, TxSkbBudget};

use socket::Socket;
use umem::{ChunkClaims, Memory};

/// Kernel headroom in front of rx data (`XDP_PACKET_HEADROOM`).
pub const XDP_PACKET_HEADROOM: u32 = libxdp_sys::XDP_PACKET_HEADROOM;
/// Room a VXLAN encapsulation pushes in front of a frame (14+20+8+8).
pub const VXLAN_ENCAP_LEN: u32 = 50;
/// Most chunks one packet may span (the kernel's `MAX_SKB_FRAGS` + 1).
pub const MAX_SEGMENTS: usize = 18;
/// Tx descriptors one copy-mode kick turns into skbs unless
/// `XDP_MAX_TX_SKB_BUDGET` says otherwise (`TX_BATCH_SIZE` in
/// `net/xdp/xsk.c`).
pub const KERNEL_TX_BATCH: u32 = 32;

/// AF_XDP errors (control path).
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    /// The configuration is not usable.
    #[error("invalid AF_XDP configuration: {0}")]
    Config(&'static str),
    /// Mapping the UMEM memory failed.
    #[error("mapping {bytes} bytes of UMEM: {source}")]
    Mmap {
        /// Size asked for.
        bytes: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Registering the UMEM failed (RLIMIT_MEMLOCK without CAP_IPC_LOCK?).
    #[error("registering the UMEM: {0}")]
    Umem(#[source] io::Error),
    /// Creating or binding the socket failed.
    #[error("AF_XDP socket on {ifname} queue {queue} ({mode:?} mode): {source}")]
    Socket {
        /// Interface.
        ifname: String,
        /// RX queue.
        queue: u32,
        /// Bind mode asked for.
        mode: BindMode,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A socket option could not be set.
    #[error("setsockopt {option} on the AF_XDP socket of {ifname}: {source}")]
    SockOpt {
        /// Interface.
        ifname: String,
        /// Option name.
        option: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Kicking the kernel failed with an unexpected error.
    #[error("waking the AF_XDP socket of {ifname}: {source}")]
    Wakeup {
        /// Interface.
        ifname: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The socket id does not name an open socket.
    #[error("no open AF_XDP socket {0:?}")]
    NoSuchSocket(SocketId),
    /// The batch belongs to another [`Xsk`].
    #[error("the batch belongs to another UMEM")]
    ForeignBatch,
}

/// Index of a socket within its [`Xsk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketId(pub u16);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A worker's UMEM, its free list and its sockets.
#[derive(Debug)]
pub struct Xsk {
    // Field order is drop order: sockets, then the UMEM, then this owner of
    // the memory (unmapped with the last owner: this one, or a lent chunk).
    sockets: Vec<Option<Socket>>,
    /// The AF_XDP socket the UMEM is registered on while no socket of ours
    /// is bound: the next [`Xsk::open_socket`] binds it.
    unbound: Option<OwnedFd>,
    /// Shared with the chunks lent from it ([`LentChunk`], [`LentFrame`]),
    /// which keep the mapping alive.
    mem: Arc<Memory>,
    id: u64,
    cfg: XskConfig,
    free: Vec<u64>,
    /// The chunks user batches and tx buffers hold (see [`ChunkClaims`]).
    claims: ChunkClaims,
    lost: u64,
    /// Whether the UMEM has room for tx metadata (checksum offload).
    tx_metadata: TxMetadata,
}

// SAFETY: an `Xsk` is owned by one worker thread at a time; its raw pointers
// are into mappings (UMEM, rings) that are not tied to a thread.
unsafe impl Send for Xsk {}

impl Xsk {
    /// Maps and registers a UMEM of `cfg.frame_count` chunks, all free.
    pub fn new(cfg: &XskConfig) -> Result<Self, XskError> {
        cfg.validate()?;
        let mut mem = Memory::map(cfg)?;
        let (unbound, tx_metadata) = Self::register(&mut mem, cfg)?;
        let free = mem.all_chunks();
        let claims = ChunkClaims::new(free.len());
        Ok(Self {
            sockets: Vec::new(),
            unbound: Some(unbound),
            mem: Arc::new(mem),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            cfg: cfg.clone(),
            free,
            claims,
            lost: 0,
            tx_metadata,
        })
    }

    /// Registers the UMEM, with tx metadata if the configuration asks for it
    /// and the kernel takes it (EINVAL otherwise: then without, keeping the
    /// reason).
    fn register(mem: &mut Memory, cfg: &XskConfig) -> Result<(OwnedFd, TxMetadata), XskError> {
        if !cfg.tx_metadata {
            let fd = umem::register(mem, cfg).map_err(XskError::Umem)?;
            return Ok((fd, TxMetadata::Disabled));
        }
        mem.tx_metadata_len = TX_METADATA_LEN as usize;
        match umem::register(mem, cfg) {
            Ok(fd) => Ok((
                fd,
                TxMetadata::Registered {
                    len: TX_METADATA_LEN,
                },
            )),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                mem.tx_metadata_len = 0;
                let fd = umem::register(mem, cfg).map_err(XskError::Umem)?;
                tracing::debug!(error = %e, "UMEM registered without tx metadata");
                Ok((fd, TxMetadata::Unsupported(e)))
            }
            Err(e) => Err(XskError::Umem(e)),
        }
    }

    /// The configuration this UMEM was made with.
    pub fn config(&self) -> &XskConfig {
        &self.cfg
    }

    /// Where rx data starts in a chunk: `XDP_PACKET_HEADROOM + headroom`
    /// (copy mode; see the module doc).
    pub fn rx_offset(&self) -> usize {
        (XDP_PACKET_HEADROOM + self.cfg.headroom) as usize
    }

    /// Moves queued packets onto tx rings (whole packets, in order), kicks
    /// the kernel while a tx ring is not empty, reaps completions and refills
    /// every fill ring from the free list.
    pub fn flush(&mut self) -> Result<(), XskError> {
        for sock in self.sockets.iter_mut().flatten() {
            ring::produce_tx(sock);
            ring::kick_tx(sock)?;
            ring::reap(sock, &self.mem, &mut self.free);
            ring::produce_tx(sock);
            sock.fill_queued = ring::fill_queued(sock);
        }
        self.adapt_fill_targets();
        for sock in self.sockets.iter_mut().flatten() {
            ring::refill(sock, &mut self.free);
            ring::wake_fill(sock)?;
        }
        Ok(())
    }

    /// Moves every socket's fill target for the traffic since the last
    /// flush (see [`fill`]). No allocation; a pass over the sockets.
    fn adapt_fill_targets(&mut self) {
        let pool = u64::from(self.cfg.fill_boost);
        let state = |s: &Socket| fill::FillState {
            base: s.fill_base,
            target: s.fill_target,
            out: s.fill_out,
            queued: s.fill_queued,
            received: s.stats.rx_descs - s.rx_seen,
            idle: s.idle_flushes,
        };
        let mut held: u64 = self
            .sockets
            .iter()
            .flatten()
            .map(|s| fill::boost_held(&state(s)))
            .sum();
        for sock in self.sockets.iter_mut().flatten() {
            let s = state(sock);
            let before = fill::boost_held(&s);
            let (target, idle) =
                fill::next_target(&s, self.cfg.fill_size, pool.saturating_sub(held));
            sock.fill_target = target;
            sock.idle_flushes = idle;
            sock.rx_seen = sock.stats.rx_descs;
            held = held - before + fill::boost_held(&state(sock));
        }
    }
}
