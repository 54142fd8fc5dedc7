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
//!    with `XDP_PKT_CONTD`).
//! 2. [`Xsk::frame`] gives a [`FrameMut`]: the whole first chunk (headroom +
//!    data) mutably, the data offset and length, the continuation chunks
//!    read-only. The caller may move the data bounds (push or pull a VXLAN
//!    header) and sets the verdict: forward to a socket or drop.
//! 3. [`Xsk::complete`] moves forwarded frames to their socket's tx queue and
//!    dropped ones to the free list; [`Xsk::flush`] produces tx descriptors
//!    (whole packets, in order), kicks the kernel while the tx ring is not
//!    empty, reaps completions and refills every fill ring greedily.
//!
//! Frame accounting: each chunk is at any time in exactly one of: the free
//! list, a fill ring or the kernel's rx path, a user batch, a tx queue/ring
//! awaiting completion, or lost with a closed socket. [`Xsk::accounting`]
//! counts them, [`Xsk::audit_quiescent`] checks chunk by chunk.
//!
//! Built on `libxdp-sys` (the C library under xsk-rs, same version): xsk-rs
//! 0.11 keeps a descriptor's address crate-private, so a frame's data offset
//! cannot move there (no push/pull of a header in front without memmove).
//! Multi-buffer uses the kernel's `XDP_USE_SG` bind flag and the
//! `XDP_PKT_CONTD` descriptor option (both from `libc`).
//!
//! RX headroom (measured, copy mode on veth, Linux 6.18): the kernel puts rx
//! data at `XDP_PACKET_HEADROOM (256) + UmemConfig::headroom` from the chunk
//! start, first and continuation chunks alike; so a chunk carries at most
//! `frame_size - 256 - headroom` bytes of a packet and the first chunk always
//! has at least 256 bytes in front of the data for an encapsulation header.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU64, Ordering};

use libxdp_sys::{xdp_desc, xsk_ring_cons, xsk_ring_prod, xsk_socket, xsk_umem};

/// Kernel headroom in front of rx data (`XDP_PACKET_HEADROOM`).
pub const XDP_PACKET_HEADROOM: u32 = libxdp_sys::XDP_PACKET_HEADROOM;
/// Room a VXLAN encapsulation pushes in front of a frame (14+20+8+8).
pub const VXLAN_ENCAP_LEN: u32 = 50;
/// Most chunks one packet may span (the kernel's `MAX_SKB_FRAGS` + 1).
pub const MAX_SEGMENTS: usize = 18;

const XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD: u32 = 1;
const SO_PREFER_BUSY_POLL: libc::c_int = 69;
const SO_BUSY_POLL_BUDGET: libc::c_int = 70;

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
    /// Packets per [`Xsk::recv`].
    pub batch_size: usize,
    /// Copy or zero-copy.
    pub bind_mode: BindMode,
    /// Bind with `XDP_USE_SG` (frames spanning several chunks).
    pub multi_buffer: bool,
    /// Bind with `XDP_USE_NEED_WAKEUP`.
    pub need_wakeup: bool,
    /// Busy polling, if wanted.
    pub busy_poll: Option<BusyPoll>,
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
        }
    }
}

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

/// What happens to a frame after processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verdict {
    /// Back to the free list.
    #[default]
    Drop,
    /// Onto this socket's tx ring.
    Forward(SocketId),
}

/// Why setting frame bounds was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    /// Offset plus length exceed the chunk, or the length is zero.
    #[error("data bounds outside the chunk")]
    OutOfChunk,
}

/// Why [`Xsk::send_copy`] did not queue a frame (per packet: small and `Copy`; the frame is
/// simply not sent and nothing is taken from the UMEM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The socket id does not name an open socket.
    #[error("no open AF_XDP socket with this id")]
    NoSuchSocket,
    /// The frame has no bytes.
    #[error("the frame is empty")]
    Empty,
    /// The frame needs more chunks than one packet may span ([`MAX_SEGMENTS`], or one chunk
    /// without multi-buffer).
    #[error("the frame spans more chunks than one packet may")]
    TooLarge,
    /// The free list has fewer chunks than the frame needs.
    #[error("not enough free chunks in the UMEM")]
    NoFreeChunks,
    /// The socket's tx queue has no room for the frame's descriptors.
    #[error("the socket's tx queue is full")]
    QueueFull,
}

/// Chunks a frame of `len` bytes takes when each chunk carries `per_chunk` bytes and a packet may
/// span `max_segments` chunks.
pub fn chunks_for(len: usize, per_chunk: usize, max_segments: usize) -> Result<usize, SendError> {
    if len == 0 {
        return Err(SendError::Empty);
    }
    let n = len.div_ceil(per_chunk.max(1));
    if n > max_segments {
        return Err(SendError::TooLarge);
    }
    Ok(n)
}

/// Per-socket counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketStats {
    /// Packets received.
    pub rx_packets: u64,
    /// Descriptors received (more than packets with multi-buffer).
    pub rx_descs: u64,
    /// Packets put on the tx ring.
    pub tx_packets: u64,
    /// Descriptors completed by the kernel.
    pub tx_completed: u64,
    /// Packets dropped because the tx queue was full.
    pub tx_queue_full: u64,
    /// RX descriptors outside the UMEM or with a broken chain (dropped).
    pub rx_invalid: u64,
    /// `sendto` kicks.
    pub tx_kicks: u64,
    /// Packets queued by [`Xsk::send_copy`] (copied in, not forwarded).
    pub tx_copied: u64,
}

/// The kernel's own counters of a socket (`XDP_STATISTICS`): what it
/// dropped or found missing on its side of the rings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Frames dropped for reasons other than the two below (e.g. too big).
    pub rx_dropped: u64,
    /// Invalid descriptors found on the fill ring.
    pub rx_invalid_descs: u64,
    /// Invalid descriptors found on the tx ring.
    pub tx_invalid_descs: u64,
    /// Frames dropped because the rx ring was full.
    pub rx_ring_full: u64,
    /// Frames dropped because the fill ring was empty.
    pub rx_fill_ring_empty_descs: u64,
    /// Times the kernel found the tx ring empty on a kick.
    pub tx_ring_empty_descs: u64,
}

impl KernelStats {
    /// `(name, value)` of every counter, named as the kernel names them.
    pub fn fields(&self) -> [(&'static str, u64); 6] {
        [
            ("rx_dropped", self.rx_dropped),
            ("rx_invalid_descs", self.rx_invalid_descs),
            ("tx_invalid_descs", self.tx_invalid_descs),
            ("rx_ring_full", self.rx_ring_full),
            ("rx_fill_ring_empty_descs", self.rx_fill_ring_empty_descs),
            ("tx_ring_empty_descs", self.tx_ring_empty_descs),
        ]
    }
}

/// Where the UMEM's chunks are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameAccounting {
    /// All chunks of the UMEM.
    pub total: u64,
    /// On the free list.
    pub free: u64,
    /// Given to fill rings, not yet received back.
    pub fill: u64,
    /// Held in user batches.
    pub held: u64,
    /// Queued or on tx rings, not yet completed.
    pub tx: u64,
    /// Left in the rings of closed sockets.
    pub lost: u64,
}

impl FrameAccounting {
    /// True when every chunk is somewhere.
    pub fn is_balanced(&self) -> bool {
        self.free + self.fill + self.held + self.tx + self.lost == self.total
    }
}

#[derive(Debug, Clone, Copy)]
struct Packet {
    first: u32,
    nsegs: u16,
    verdict: Verdict,
}

/// A batch of received packets, reused from call to call (no allocation
/// after [`Xsk::batch`]).
#[derive(Debug)]
pub struct RxBatch {
    owner: u64,
    socket: SocketId,
    descs: Vec<xdp_desc>,
    packets: Vec<Packet>,
    max_packets: usize,
}

impl RxBatch {
    /// Packets in the batch.
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    /// True if the batch holds no packet.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// The socket the packets came from.
    pub fn socket(&self) -> SocketId {
        self.socket
    }

    /// Sets the verdict of packet `i` (ignored if out of range).
    pub fn set_verdict(&mut self, i: usize, verdict: Verdict) {
        if let Some(p) = self.packets.get_mut(i) {
            p.verdict = verdict;
        }
    }
}

/// One received packet, borrowed from a batch.
#[derive(Debug)]
pub struct FrameMut<'a> {
    chunk: &'a mut [u8],
    first: &'a mut xdp_desc,
    conts: &'a [xdp_desc],
    verdict: &'a mut Verdict,
    mem: &'a Memory,
}

impl FrameMut<'_> {
    /// The whole first chunk: headroom, data and tailroom.
    pub fn chunk(&mut self) -> &mut [u8] {
        self.chunk
    }

    /// Offset of the data in the first chunk.
    pub fn offset(&self) -> usize {
        self.mem.offset_in_chunk(self.first.addr)
    }

    /// Data length in the first chunk.
    pub fn len(&self) -> usize {
        self.first.len as usize
    }

    /// True if the first chunk holds no data (never for received frames).
    pub fn is_empty(&self) -> bool {
        self.first.len == 0
    }

    /// The data of the first chunk.
    pub fn data(&self) -> &[u8] {
        let o = self.offset();
        self.chunk.get(o..o + self.len()).unwrap_or(&[])
    }

    /// The data of the first chunk, mutable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        let o = self.offset();
        let l = self.len();
        self.chunk.get_mut(o..o + l).unwrap_or(&mut [])
    }

    /// Moves the data bounds of the first chunk (push or pull a header).
    pub fn set_bounds(&mut self, offset: usize, len: usize) -> Result<(), BoundsError> {
        if len == 0
            || offset
                .checked_add(len)
                .is_none_or(|end| end > self.chunk.len())
        {
            return Err(BoundsError::OutOfChunk);
        }
        let base = self.mem.chunk_base(self.first.addr);
        self.first.addr = base + offset as u64;
        self.first.len = len as u32;
        Ok(())
    }

    /// Number of continuation chunks.
    pub fn continuations(&self) -> usize {
        self.conts.len()
    }

    /// The data of continuation chunk `k` (empty if out of range).
    pub fn continuation(&self, k: usize) -> &[u8] {
        self.conts.get(k).map_or(&[], |d| self.mem.slice(d))
    }

    /// The first chunk mutably together with the data of the continuation
    /// chunks (distinct chunks, so both borrows hold at once and nothing is
    /// copied): fills `tail` with up to `tail.len()` continuation slices and
    /// returns the chunk and how many were filled. A packet with more
    /// continuations than `tail` holds reports them all in
    /// [`Self::continuations`]; the caller compares.
    pub fn split_tail<'s>(&'s mut self, tail: &mut [&'s [u8]]) -> (&'s mut [u8], usize) {
        let mem: &'s Memory = self.mem;
        let mut n = 0;
        for (slot, d) in tail.iter_mut().zip(self.conts.iter()) {
            *slot = mem.slice(d);
            n += 1;
        }
        (&mut *self.chunk, n)
    }

    /// Offset of continuation chunk `k`'s data within its chunk.
    pub fn continuation_offset(&self, k: usize) -> usize {
        self.conts
            .get(k)
            .map_or(0, |d| self.mem.offset_in_chunk(d.addr))
    }

    /// Bytes of the whole packet over all chunks.
    pub fn total_len(&self) -> usize {
        self.len() + self.conts.iter().map(|d| d.len as usize).sum::<usize>()
    }

    /// Forward to `to` after [`Xsk::complete`].
    pub fn forward(&mut self, to: SocketId) {
        *self.verdict = Verdict::Forward(to);
    }

    /// Drop (back to the free list) after [`Xsk::complete`].
    pub fn drop_frame(&mut self) {
        *self.verdict = Verdict::Drop;
    }
}

/// The UMEM memory region (anonymous mapping).
#[derive(Debug)]
struct Memory {
    base: NonNull<u8>,
    len: usize,
    frame_size: u64,
}

impl Memory {
    fn chunk_base(&self, addr: u64) -> u64 {
        addr & !(self.frame_size - 1)
    }

    fn offset_in_chunk(&self, addr: u64) -> usize {
        (addr & (self.frame_size - 1)) as usize
    }

    /// True if `d` lies inside one chunk of this memory.
    fn contains(&self, d: &xdp_desc) -> bool {
        let off = self.offset_in_chunk(d.addr) as u64;
        d.addr < self.len as u64 && off + u64::from(d.len) <= self.frame_size
    }

    /// The data of a descriptor already checked with [`Self::contains`].
    fn slice(&self, d: &xdp_desc) -> &[u8] {
        if !self.contains(d) {
            return &[];
        }
        // SAFETY: `contains` checked that [addr, addr+len) lies in the
        // mapping; the descriptor belongs to a batch, so the chunk is owned
        // by userspace (not in any ring) and nobody writes it meanwhile.
        unsafe {
            std::slice::from_raw_parts(self.base.as_ptr().add(d.addr as usize), d.len as usize)
        }
    }
}

impl Memory {
    /// The whole chunk at `addr` (a chunk base from the free list), writable.
    fn chunk_mut(&mut self, addr: u64) -> &mut [u8] {
        let base = self.chunk_base(addr);
        if base + self.frame_size > self.len as u64 {
            return &mut [];
        }
        // SAFETY: [base, base + frame_size) lies in the mapping (checked above); the chunk comes
        // from the free list, so it is in no ring and no batch: neither the kernel nor any
        // `FrameMut` touches it, and the `&mut self` borrow makes this the only reference.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base.as_ptr().add(base as usize),
                self.frame_size as usize,
            )
        }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping made in `Xsk::new`,
        // unmapped once, after every socket and the UMEM were deleted (field
        // order of `Xsk`).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

struct Socket {
    xsk: NonNull<xsk_socket>,
    // Boxed: libxdp keeps pointers to the fill and completion rings in its
    // per-(interface, queue) context until `xsk_socket__delete`.
    rx: Box<xsk_ring_cons>,
    tx: Box<xsk_ring_prod>,
    fill: Box<xsk_ring_prod>,
    comp: Box<xsk_ring_cons>,
    fd: RawFd,
    ifname: String,
    queue: u32,
    pending: VecDeque<xdp_desc>,
    pending_cap: usize,
    need_wakeup: bool,
    fill_out: u64,
    /// How many chunks this socket's fill ring is kept at (see
    /// [`Xsk::open_socket_with`]).
    fill_target: u32,
    tx_out: u64,
    stats: SocketStats,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("ifname", &self.ifname)
            .field("queue", &self.queue)
            .field("fd", &self.fd)
            .field("stats", &self.stats)
            .finish()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A worker's UMEM, its free list and its sockets.
#[derive(Debug)]
pub struct Xsk {
    // Field order is drop order: sockets, then the UMEM, then the memory.
    sockets: Vec<Option<Socket>>,
    umem: UmemHandle,
    mem: Memory,
    id: u64,
    cfg: XskConfig,
    free: Vec<u64>,
    held: u64,
    lost: u64,
}

#[derive(Debug)]
struct UmemHandle {
    ptr: NonNull<xsk_umem>,
    // The rings created with the UMEM; libxdp hands them to the first
    // socket's context and may dereference them until then.
    _fill: Box<xsk_ring_prod>,
    _comp: Box<xsk_ring_cons>,
}

impl Drop for UmemHandle {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `xsk_umem__create` and every socket on it
        // was deleted before (field order of `Xsk`).
        let rc = unsafe { libxdp_sys::xsk_umem__delete(self.ptr.as_ptr()) };
        if rc != 0 {
            tracing::warn!(error = %io::Error::from_raw_os_error(-rc), "deleting the UMEM");
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: `xsk` came from `xsk_socket__create_shared`; the rings it
        // points at are still alive (fields dropped after this body).
        unsafe { libxdp_sys::xsk_socket__delete(self.xsk.as_ptr()) };
    }
}

// SAFETY: an `Xsk` is owned by one worker thread at a time; the raw pointers
// are to libxdp objects and mappings that are not tied to a thread.
unsafe impl Send for Xsk {}

fn zeroed_prod() -> Box<xsk_ring_prod> {
    // SAFETY: xsk_ring_prod is a C struct of integers and raw pointers, for
    // which all-zero is the "not set up" value libxdp expects.
    Box::new(unsafe { std::mem::zeroed() })
}

fn zeroed_cons() -> Box<xsk_ring_cons> {
    // SAFETY: as in `zeroed_prod`.
    Box::new(unsafe { std::mem::zeroed() })
}

fn pow2(v: u32, what: &'static str) -> Result<(), XskError> {
    if v.is_power_of_two() {
        Ok(())
    } else {
        Err(XskError::Config(what))
    }
}

impl Xsk {
    /// Maps and registers a UMEM of `cfg.frame_count` chunks, all free.
    pub fn new(cfg: &XskConfig) -> Result<Self, XskError> {
        pow2(cfg.frame_size, "frame_size must be a power of two")?;
        if !(2048..=65536).contains(&cfg.frame_size) {
            return Err(XskError::Config("frame_size must be 2048..=65536"));
        }
        for (v, what) in [
            (cfg.fill_size, "fill_size must be a power of two"),
            (cfg.comp_size, "comp_size must be a power of two"),
            (cfg.rx_size, "rx_size must be a power of two"),
            (cfg.tx_size, "tx_size must be a power of two"),
        ] {
            pow2(v, what)?;
        }
        if cfg.headroom + XDP_PACKET_HEADROOM + 64 > cfg.frame_size {
            return Err(XskError::Config("headroom leaves no room for data"));
        }
        if cfg.batch_size == 0 || cfg.frame_count == 0 {
            return Err(XskError::Config("batch_size and frame_count must be > 0"));
        }
        let len = cfg.frame_count as usize * cfg.frame_size as usize;
        // SAFETY: a fresh anonymous private mapping; no existing memory is
        // affected. The result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(XskError::Mmap {
                bytes: len,
                source: io::Error::last_os_error(),
            });
        }
        let mem = Memory {
            base: NonNull::new(p.cast()).ok_or(XskError::Config("mmap returned null"))?,
            len,
            frame_size: u64::from(cfg.frame_size),
        };
        let ucfg = libxdp_sys::xsk_umem_config {
            fill_size: cfg.fill_size,
            comp_size: cfg.comp_size,
            frame_size: cfg.frame_size,
            frame_headroom: cfg.headroom,
            flags: 0,
        };
        let mut fill = zeroed_prod();
        let mut comp = zeroed_cons();
        let mut uptr = ptr::null_mut();
        // SAFETY: the memory region is mapped, page aligned and `len` long;
        // the ring structs are boxed and outlive the UMEM (`UmemHandle`).
        let rc = unsafe {
            libxdp_sys::xsk_umem__create(
                &mut uptr,
                mem.base.as_ptr().cast(),
                len as u64,
                &mut *fill,
                &mut *comp,
                &ucfg,
            )
        };
        if rc != 0 {
            return Err(XskError::Umem(io::Error::from_raw_os_error(-rc)));
        }
        let ptr = NonNull::new(uptr).ok_or(XskError::Config("xsk_umem__create returned null"))?;
        let free = (0..u64::from(cfg.frame_count))
            .rev()
            .map(|i| i * u64::from(cfg.frame_size))
            .collect();
        Ok(Self {
            sockets: Vec::new(),
            umem: UmemHandle {
                ptr,
                _fill: fill,
                _comp: comp,
            },
            mem,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            cfg: cfg.clone(),
            free,
            held: 0,
            lost: 0,
        })
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

    /// A batch sized for this UMEM (the only allocation of the cycle).
    pub fn batch(&self) -> RxBatch {
        RxBatch {
            owner: self.id,
            socket: SocketId(0),
            descs: Vec::with_capacity(self.cfg.batch_size + MAX_SEGMENTS),
            packets: Vec::with_capacity(self.cfg.batch_size),
            max_packets: self.cfg.batch_size,
        }
    }

    /// Opens and binds a socket on (`ifname`, `queue`) sharing this UMEM and
    /// fills its fill ring. Register its fd with
    /// [`crate::XdpLoader::register_socket`] to receive.
    pub fn open_socket(&mut self, ifname: &str, queue: u32) -> Result<SocketId, XskError> {
        self.open_socket_with(ifname, queue, self.cfg.fill_size)
    }

    /// [`Self::open_socket`], keeping at most `fill_target` chunks in its
    /// fill ring. Chunks in a fill ring are idle until that socket receives,
    /// so with many sockets on one UMEM (a worker's pods) each gets a share:
    /// the busy uplink a full ring, a pod a few batches, a transmit-only
    /// socket none.
    pub fn open_socket_with(
        &mut self,
        ifname: &str,
        queue: u32,
        fill_target: u32,
    ) -> Result<SocketId, XskError> {
        let sock_err = |source: io::Error| XskError::Socket {
            ifname: ifname.to_string(),
            queue,
            mode: self.cfg.bind_mode,
            source,
        };
        let cname = CString::new(ifname)
            .map_err(|e| sock_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let mut bind_flags: u16 = match self.cfg.bind_mode {
            BindMode::Copy => libc::XDP_COPY,
            BindMode::ZeroCopy => libc::XDP_ZEROCOPY,
        };
        if self.cfg.need_wakeup {
            bind_flags |= libc::XDP_USE_NEED_WAKEUP;
        }
        if self.cfg.multi_buffer {
            bind_flags |= libc::XDP_USE_SG;
        }
        let scfg = libxdp_sys::xsk_socket_config {
            rx_size: self.cfg.rx_size,
            tx_size: self.cfg.tx_size,
            __bindgen_anon_1: libxdp_sys::xsk_socket_config__bindgen_ty_1 {
                libxdp_flags: XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD,
            },
            xdp_flags: 0,
            bind_flags,
        };
        let mut rx = zeroed_cons();
        let mut tx = zeroed_prod();
        let mut fill = zeroed_prod();
        let mut comp = zeroed_cons();
        let mut xptr = ptr::null_mut();
        // SAFETY: all ring structs are boxed (stable addresses) and kept in
        // the `Socket` until after `xsk_socket__delete`; the UMEM outlives
        // the socket (field order of `Xsk`).
        let rc = unsafe {
            libxdp_sys::xsk_socket__create_shared(
                &mut xptr,
                cname.as_ptr(),
                queue,
                self.umem.ptr.as_ptr(),
                &mut *rx,
                &mut *tx,
                &mut *fill,
                &mut *comp,
                &scfg,
            )
        };
        if rc != 0 {
            return Err(sock_err(io::Error::from_raw_os_error(-rc)));
        }
        let xsk = NonNull::new(xptr).ok_or_else(|| sock_err(io::Error::other("null socket")))?;
        // SAFETY: `xsk` is a live socket.
        let fd = unsafe { libxdp_sys::xsk_socket__fd(xsk.as_ptr()) };
        let mut sock = Socket {
            xsk,
            rx,
            tx,
            fill,
            comp,
            fd,
            ifname: ifname.to_string(),
            queue,
            pending: VecDeque::with_capacity(self.cfg.tx_size as usize),
            pending_cap: self.cfg.tx_size as usize,
            need_wakeup: self.cfg.need_wakeup,
            fill_out: 0,
            fill_target: fill_target.min(self.cfg.fill_size),
            tx_out: 0,
            stats: SocketStats::default(),
        };
        if let Some(bp) = self.cfg.busy_poll {
            for (option, name, value) in [
                (SO_PREFER_BUSY_POLL, "SO_PREFER_BUSY_POLL", 1),
                (libc::SO_BUSY_POLL, "SO_BUSY_POLL", bp.usecs as libc::c_int),
                (
                    SO_BUSY_POLL_BUDGET,
                    "SO_BUSY_POLL_BUDGET",
                    bp.budget as libc::c_int,
                ),
            ] {
                setsockopt_int(fd, libc::SOL_SOCKET, option, value).map_err(|source| {
                    XskError::SockOpt {
                        ifname: ifname.to_string(),
                        option: name,
                        source,
                    }
                })?;
            }
        }
        refill(&mut sock, &mut self.free);
        let id = match self.sockets.iter().position(Option::is_none) {
            Some(i) => {
                self.sockets[i] = Some(sock);
                i
            }
            None => {
                self.sockets.push(Some(sock));
                self.sockets.len() - 1
            }
        };
        Ok(SocketId(id as u16))
    }

    /// Closes a socket. Chunks still in its rings are reclaimed where
    /// userspace can see them (unconsumed fill entries, rx, completions,
    /// queued tx); the rest is counted as lost.
    ///
    /// Unregister the socket from the XSKMAP first
    /// ([`crate::XdpLoader::unregister_socket`]): the unconsumed fill entries
    /// are reclaimed on the assumption that no redirect into this socket
    /// takes one meanwhile. Its [`SocketId`] may be reused by the next
    /// [`Xsk::open_socket`].
    pub fn close_socket(&mut self, id: SocketId) -> Result<(), XskError> {
        let mut sock = self
            .sockets
            .get_mut(id.0 as usize)
            .and_then(Option::take)
            .ok_or(XskError::NoSuchSocket(id))?;
        reap(&mut sock, &self.mem, &mut self.free);
        // Drain rx: those chunks are ours again.
        loop {
            let mut idx = 0;
            // SAFETY: the rx ring was set up by libxdp for this live socket.
            let n = unsafe { libxdp_sys::xsk_ring_cons__peek(&mut *sock.rx, 64, &mut idx) };
            if n == 0 {
                break;
            }
            for k in 0..n {
                // SAFETY: index within the peeked range.
                let d =
                    unsafe { *libxdp_sys::xsk_ring_cons__rx_desc(&*sock.rx, idx.wrapping_add(k)) };
                if self.mem.contains(&d) {
                    self.free.push(self.mem.chunk_base(d.addr));
                }
                sock.fill_out = sock.fill_out.saturating_sub(1);
            }
            // SAFETY: releasing what was peeked.
            unsafe { libxdp_sys::xsk_ring_cons__release(&mut *sock.rx, n) };
        }
        // Fill entries the kernel has not consumed yet.
        let in_fill = fill_ring_entries(&sock.fill);
        for a in in_fill.iter().copied() {
            self.free.push(self.mem.chunk_base(a));
        }
        sock.fill_out = sock.fill_out.saturating_sub(in_fill.len() as u64);
        let queued = sock.pending.len() as u64;
        while let Some(d) = sock.pending.pop_front() {
            self.free.push(self.mem.chunk_base(d.addr));
        }
        sock.tx_out = sock.tx_out.saturating_sub(queued);
        self.lost += sock.fill_out + sock.tx_out;
        drop(sock);
        Ok(())
    }

    fn socket(&self, id: SocketId) -> Result<&Socket, XskError> {
        self.sockets
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .ok_or(XskError::NoSuchSocket(id))
    }

    /// The socket's fd, for registering in the XSKMAP and polling (mio).
    pub fn fd(&self, id: SocketId) -> Result<BorrowedFd<'_>, XskError> {
        let s = self.socket(id)?;
        // SAFETY: the fd stays open as long as the socket, which the
        // returned borrow of `self` keeps alive.
        Ok(unsafe { BorrowedFd::borrow_raw(s.fd) })
    }

    /// The (interface, queue) a socket is bound to.
    pub fn binding(&self, id: SocketId) -> Result<(&str, u32), XskError> {
        let s = self.socket(id)?;
        Ok((&s.ifname, s.queue))
    }

    /// Enters the kernel for `id`'s rx side (`recvfrom`, non-blocking):
    /// drives NAPI when busy polling is configured, and wakes the fill ring
    /// when the kernel asks for it.
    pub fn poll_kernel(&mut self, id: SocketId) -> Result<(), XskError> {
        let sock = self
            .sockets
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(XskError::NoSuchSocket(id))?;
        recv_kick(sock)
    }

    /// Counters of one socket.
    pub fn stats(&self, id: SocketId) -> Result<SocketStats, XskError> {
        Ok(self.socket(id)?.stats)
    }

    /// The kernel's counters of socket `id` (`getsockopt(XDP_STATISTICS)`:
    /// one syscall; for metrics, not the hot path).
    pub fn kernel_stats(&self, id: SocketId) -> Result<KernelStats, XskError> {
        let sock = self.socket(id)?;
        let mut st = libc::xdp_statistics {
            rx_dropped: 0,
            rx_invalid_descs: 0,
            tx_invalid_descs: 0,
            rx_ring_full: 0,
            rx_fill_ring_empty_descs: 0,
            tx_ring_empty_descs: 0,
        };
        let mut len = size_of::<libc::xdp_statistics>() as libc::socklen_t;
        // SAFETY: `sock.fd` is a live AF_XDP socket; `st` and `len` are live
        // and `len` is the size of `st`, which the kernel fills at most.
        let rc = unsafe {
            libc::getsockopt(
                sock.fd,
                libc::SOL_XDP,
                libc::XDP_STATISTICS,
                (&mut st as *mut libc::xdp_statistics).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(XskError::SockOpt {
                ifname: sock.ifname.clone(),
                option: "XDP_STATISTICS",
                source: io::Error::last_os_error(),
            });
        }
        Ok(KernelStats {
            rx_dropped: st.rx_dropped,
            rx_invalid_descs: st.rx_invalid_descs,
            tx_invalid_descs: st.tx_invalid_descs,
            rx_ring_full: st.rx_ring_full,
            rx_fill_ring_empty_descs: st.rx_fill_ring_empty_descs,
            tx_ring_empty_descs: st.tx_ring_empty_descs,
        })
    }

    /// Receives up to `batch_size` whole packets from `id` into `batch`
    /// (completing whatever the batch still held first). Returns the number
    /// of packets.
    pub fn recv(&mut self, id: SocketId, batch: &mut RxBatch) -> Result<usize, XskError> {
        if batch.owner != self.id {
            return Err(XskError::ForeignBatch);
        }
        if !batch.packets.is_empty() {
            self.complete(batch)?;
        }
        batch.descs.clear();
        batch.packets.clear();
        batch.socket = id;
        let mem = &self.mem;
        let free = &mut self.free;
        let sock = self
            .sockets
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(XskError::NoSuchSocket(id))?;
        let cap = batch.descs.capacity() as u32;
        let mut idx = 0;
        // SAFETY: the rx ring of a live socket.
        let n = unsafe { libxdp_sys::xsk_ring_cons__peek(&mut *sock.rx, cap, &mut idx) };
        let mut used = 0u32;
        let mut start = 0u32;
        let mut bad_chain = false;
        for k in 0..n {
            if batch.packets.len() >= batch.max_packets {
                break;
            }
            // SAFETY: index within the peeked range.
            let d = unsafe { *libxdp_sys::xsk_ring_cons__rx_desc(&*sock.rx, idx.wrapping_add(k)) };
            batch.descs.push(d);
            let seg = k + 1 - start;
            bad_chain |= !mem.contains(&d) || seg as usize > MAX_SEGMENTS;
            if d.options & libc::XDP_PKT_CONTD == 0 {
                let first = batch.descs.len() - seg as usize;
                if bad_chain {
                    // Broken descriptors: hand the valid chunks back.
                    for bd in batch.descs.drain(first..) {
                        if mem.contains(&bd) {
                            free.push(mem.chunk_base(bd.addr));
                        } else {
                            // Outside the UMEM: nothing to reclaim.
                        }
                    }
                    sock.stats.rx_invalid += 1;
                } else {
                    batch.packets.push(Packet {
                        first: first as u32,
                        nsegs: seg as u16,
                        verdict: Verdict::Drop,
                    });
                    sock.stats.rx_packets += 1;
                }
                sock.fill_out = sock.fill_out.saturating_sub(u64::from(seg));
                sock.stats.rx_descs += u64::from(seg);
                used = k + 1;
                start = k + 1;
                bad_chain = false;
            }
        }
        // Descriptors of an incomplete trailing chain stay in the ring.
        let tail = batch.descs.len()
            - batch
                .packets
                .last()
                .map_or(0, |p| p.first as usize + p.nsegs as usize);
        batch.descs.truncate(batch.descs.len() - tail);
        if n > used {
            // SAFETY: cancels the peeked but unused tail.
            unsafe { libxdp_sys::xsk_ring_cons__cancel(&mut *sock.rx, n - used) };
        }
        if used > 0 {
            // SAFETY: releases the consumed descriptors.
            unsafe { libxdp_sys::xsk_ring_cons__release(&mut *sock.rx, used) };
        }
        self.held += batch.descs.len() as u64;
        Ok(batch.packets.len())
    }

    /// Packet `i` of `batch` (`None` if out of range or foreign).
    pub fn frame<'a>(&'a self, batch: &'a mut RxBatch, i: usize) -> Option<FrameMut<'a>> {
        if batch.owner != self.id {
            return None;
        }
        let p = batch.packets.get_mut(i)?;
        let first = p.first as usize;
        let (head, rest) = batch
            .descs
            .get_mut(first..first + p.nsegs as usize)?
            .split_first_mut()?;
        let base = self.mem.chunk_base(head.addr) as usize;
        if !self.mem.contains(head) {
            return None;
        }
        // SAFETY: `contains` checked the chunk lies in the mapping; the
        // chunk belongs to this batch (received, not in any ring, in no
        // other batch), and the `&mut` borrow of the batch makes this the
        // only reference to it.
        let chunk = unsafe {
            std::slice::from_raw_parts_mut(
                self.mem.base.as_ptr().add(base),
                self.mem.frame_size as usize,
            )
        };
        Some(FrameMut {
            chunk,
            first: head,
            conts: rest,
            verdict: &mut p.verdict,
            mem: &self.mem,
        })
    }

    /// Applies the verdicts of `batch`: forwarded packets go to their
    /// socket's tx queue (dropped if it is full), the rest to the free list.
    /// The batch is empty afterwards.
    pub fn complete(&mut self, batch: &mut RxBatch) -> Result<(), XskError> {
        if batch.owner != self.id {
            return Err(XskError::ForeignBatch);
        }
        for p in batch.packets.drain(..) {
            let segs = &mut batch.descs[p.first as usize..p.first as usize + p.nsegs as usize];
            let target = match p.verdict {
                Verdict::Forward(to) => self
                    .sockets
                    .get_mut(to.0 as usize)
                    .and_then(Option::as_mut)
                    .filter(|s| s.pending.len() + segs.len() <= s.pending_cap),
                Verdict::Drop => None,
            };
            match target {
                Some(sock) => {
                    let last = segs.len() - 1;
                    for (k, d) in segs.iter_mut().enumerate() {
                        d.options = if k == last { 0 } else { libc::XDP_PKT_CONTD };
                        sock.pending.push_back(*d);
                    }
                    sock.tx_out += segs.len() as u64;
                }
                None => {
                    if let Verdict::Forward(to) = p.verdict
                        && let Some(Some(s)) = self.sockets.get_mut(to.0 as usize)
                    {
                        s.stats.tx_queue_full += 1;
                    }
                    for d in segs.iter() {
                        self.free.push(self.mem.chunk_base(d.addr));
                    }
                }
            }
        }
        self.held -= batch.descs.len() as u64;
        batch.descs.clear();
        Ok(())
    }

    /// Queues a copy of a frame for transmission on `to`: the bytes of `parts`, in order, are
    /// written into chunks taken from the free list (each filled from offset 0, chained with
    /// `XDP_PKT_CONTD` when the frame spans several) and queued like a forwarded packet; the next
    /// [`Xsk::flush`] puts them on the tx ring and the completions bring the chunks back. On
    /// error nothing is taken and nothing is queued (a full queue counts in `tx_queue_full`).
    ///
    /// This is how a frame that lives outside this UMEM (handed over by another worker) leaves
    /// through one of this UMEM's sockets. No allocation, no syscall.
    pub fn send_copy(&mut self, to: SocketId, parts: &[&[u8]]) -> Result<(), SendError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let per = self.cfg.frame_size as usize;
        let max = if self.cfg.multi_buffer {
            MAX_SEGMENTS
        } else {
            1
        };
        let segs = chunks_for(len, per, max)?;
        let Self {
            sockets, mem, free, ..
        } = self;
        let sock = sockets
            .get_mut(to.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(SendError::NoSuchSocket)?;
        if sock.pending.len() + segs > sock.pending_cap {
            sock.stats.tx_queue_full += 1;
            return Err(SendError::QueueFull);
        }
        if free.len() < segs {
            return Err(SendError::NoFreeChunks);
        }
        // Gather cursor: part index and offset in that part.
        let (mut pi, mut po) = (0, 0);
        let mut left = len;
        for k in 0..segs {
            let Some(addr) = free.pop() else {
                // Checked above: the free list holds at least `segs` chunks.
                break;
            };
            let n = left.min(per);
            let chunk = mem.chunk_mut(addr);
            let mut w = 0;
            while w < n {
                let Some(part) = parts.get(pi) else { break };
                let take = (part.len() - po).min(n - w);
                if let (Some(d), Some(s)) = (chunk.get_mut(w..w + take), part.get(po..po + take)) {
                    d.copy_from_slice(s);
                }
                w += take;
                po += take;
                if po == part.len() {
                    pi += 1;
                    po = 0;
                }
            }
            left -= n;
            sock.pending.push_back(xdp_desc {
                addr,
                len: n as u32,
                options: if k + 1 < segs { libc::XDP_PKT_CONTD } else { 0 },
            });
        }
        sock.tx_out += segs as u64;
        sock.stats.tx_copied += 1;
        Ok(())
    }

    /// Moves queued packets onto tx rings (whole packets, in order), kicks
    /// the kernel while a tx ring is not empty, reaps completions and refills
    /// every fill ring from the free list.
    pub fn flush(&mut self) -> Result<(), XskError> {
        for sock in self.sockets.iter_mut().flatten() {
            produce_tx(sock);
            kick_tx(sock)?;
            reap(sock, &self.mem, &mut self.free);
            produce_tx(sock);
        }
        for sock in self.sockets.iter_mut().flatten() {
            refill(sock, &mut self.free);
            wake_fill(sock)?;
        }
        Ok(())
    }

    /// Where the chunks are now.
    pub fn accounting(&self) -> FrameAccounting {
        let mut a = FrameAccounting {
            total: u64::from(self.cfg.frame_count),
            free: self.free.len() as u64,
            held: self.held,
            lost: self.lost,
            ..FrameAccounting::default()
        };
        for s in self.sockets.iter().flatten() {
            a.fill += s.fill_out;
            a.tx += s.tx_out;
        }
        a
    }

    /// With no traffic in flight (tx completed, nothing held): checks chunk
    /// by chunk that the free list and the unconsumed fill ring entries hold
    /// every chunk exactly once. Returns the accounting on success, or a
    /// description of the first discrepancy.
    pub fn audit_quiescent(&mut self) -> Result<FrameAccounting, String> {
        for sock in self.sockets.iter_mut().flatten() {
            reap(sock, &self.mem, &mut self.free);
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
        for s in self.sockets.iter().flatten() {
            let entries = fill_ring_entries(&s.fill);
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
        match seen.iter().position(|s| !*s) {
            Some(i) => Err(format!("chunk {i} is nowhere")),
            None => Ok(acc),
        }
    }
}

/// The chunk addresses between the kernel's consumer and our producer.
fn fill_ring_entries(fill: &xsk_ring_prod) -> Vec<u64> {
    if fill.ring.is_null() || fill.consumer.is_null() {
        return Vec::new();
    }
    // SAFETY: `consumer` points into the mapped fill ring of a live socket;
    // the kernel updates it concurrently, hence the atomic (acquire) read.
    let cons = unsafe {
        (*(fill.consumer as *const std::sync::atomic::AtomicU32)).load(Ordering::Acquire)
    };
    let prod = fill.cached_prod;
    let n = prod.wrapping_sub(cons);
    (0..n)
        .map(|k| {
            let i = cons.wrapping_add(k) & fill.mask;
            // SAFETY: `i <= mask` indexes the ring of `size` u64 entries;
            // entries in [cons, prod) were written by us and not consumed.
            unsafe { *(fill.ring as *const u64).add(i as usize) }
        })
        .collect()
}

fn refill(sock: &mut Socket, free: &mut Vec<u64>) {
    let fill = &mut *sock.fill;
    // SAFETY: the fill ring of a live socket.
    let room = unsafe { libxdp_sys::xsk_prod_nb_free(fill, fill.size) };
    let want = u64::from(sock.fill_target).saturating_sub(sock.fill_out);
    let n = room
        .min(free.len() as u32)
        .min(u32::try_from(want).unwrap_or(u32::MAX));
    if n == 0 {
        return;
    }
    let mut idx = 0;
    // SAFETY: reserving at most the free room, so the call cannot fail
    // partially (libxdp reserves all or nothing).
    let got = unsafe { libxdp_sys::xsk_ring_prod__reserve(fill, n, &mut idx) };
    for k in 0..got {
        let Some(addr) = free.pop() else { break };
        // SAFETY: `idx + k` is within the reserved range.
        unsafe { *libxdp_sys::xsk_ring_prod__fill_addr(fill, idx.wrapping_add(k)) = addr };
    }
    // SAFETY: submits exactly the reserved entries, each written above
    // (`free` had at least `n >= got` entries).
    unsafe { libxdp_sys::xsk_ring_prod__submit(fill, got) };
    sock.fill_out += u64::from(got);
}

fn produce_tx(sock: &mut Socket) {
    if sock.pending.is_empty() {
        return;
    }
    let tx = &mut *sock.tx;
    // SAFETY: the tx ring of a live socket.
    let room = unsafe { libxdp_sys::xsk_prod_nb_free(tx, tx.size) } as usize;
    // Whole packets only: cut after the last descriptor that ends one.
    let mut n = 0;
    for (k, d) in sock.pending.iter().take(room).enumerate() {
        if d.options & libc::XDP_PKT_CONTD == 0 {
            n = k + 1;
        }
    }
    if n == 0 {
        return;
    }
    let mut idx = 0;
    // SAFETY: `n <= room`, so the reservation succeeds in full.
    let got = unsafe { libxdp_sys::xsk_ring_prod__reserve(tx, n as u32, &mut idx) };
    for k in 0..got {
        let Some(d) = sock.pending.pop_front() else {
            break;
        };
        if d.options & libc::XDP_PKT_CONTD == 0 {
            sock.stats.tx_packets += 1;
        }
        // SAFETY: `idx + k` is within the reserved range.
        unsafe { *libxdp_sys::xsk_ring_prod__tx_desc(tx, idx.wrapping_add(k)) = d };
    }
    // SAFETY: submits the reserved entries, all written above.
    unsafe { libxdp_sys::xsk_ring_prod__submit(tx, got) };
}

fn kick_tx(sock: &mut Socket) -> Result<(), XskError> {
    // Copy mode sends at most 32 frames per sendto: kick until the kernel
    // has consumed the ring, or it reports it is busy.
    let size = sock.tx.size;
    for _ in 0..(size / 32 + 2) {
        // SAFETY: the tx ring of a live socket.
        let free = unsafe { libxdp_sys::xsk_prod_nb_free(&mut *sock.tx, size) };
        if free == size {
            break;
        }
        // Without XDP_USE_NEED_WAKEUP the kernel never sets the flag and
        // every non-empty ring needs a kick.
        // SAFETY: as above.
        if sock.need_wakeup && unsafe { libxdp_sys::xsk_ring_prod__needs_wakeup(&*sock.tx) } == 0 {
            break;
        }
        sock.stats.tx_kicks += 1;
        // SAFETY: sendto with a null buffer of length 0 on an AF_XDP socket
        // is the documented tx kick.
        let rc =
            unsafe { libc::sendto(sock.fd, ptr::null(), 0, libc::MSG_DONTWAIT, ptr::null(), 0) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS | libc::EINTR) => break,
                _ => {
                    return Err(XskError::Wakeup {
                        ifname: sock.ifname.clone(),
                        source: e,
                    });
                }
            }
        }
    }
    Ok(())
}

fn wake_fill(sock: &mut Socket) -> Result<(), XskError> {
    // SAFETY: the fill ring of a live socket.
    if unsafe { libxdp_sys::xsk_ring_prod__needs_wakeup(&*sock.fill) } == 0 {
        return Ok(());
    }
    recv_kick(sock)
}

fn recv_kick(sock: &mut Socket) -> Result<(), XskError> {
    // SAFETY: recvfrom with a null buffer of length 0 on an AF_XDP socket
    // is the documented rx/fill wakeup.
    let rc = unsafe {
        libc::recvfrom(
            sock.fd,
            ptr::null_mut(),
            0,
            libc::MSG_DONTWAIT,
            ptr::null_mut(),
            ptr::null_mut(),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if !matches!(
            e.raw_os_error(),
            Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS | libc::EINTR)
        ) {
            return Err(XskError::Wakeup {
                ifname: sock.ifname.clone(),
                source: e,
            });
        }
    }
    Ok(())
}

fn reap(sock: &mut Socket, mem: &Memory, free: &mut Vec<u64>) {
    loop {
        let mut idx = 0;
        // SAFETY: the completion ring of a live socket.
        let n = unsafe { libxdp_sys::xsk_ring_cons__peek(&mut *sock.comp, 256, &mut idx) };
        if n == 0 {
            return;
        }
        for k in 0..n {
            // SAFETY: index within the peeked range.
            let addr =
                unsafe { *libxdp_sys::xsk_ring_cons__comp_addr(&*sock.comp, idx.wrapping_add(k)) };
            free.push(mem.chunk_base(addr));
        }
        // SAFETY: releases what was peeked.
        unsafe { libxdp_sys::xsk_ring_cons__release(&mut *sock.comp, n) };
        sock.tx_out = sock.tx_out.saturating_sub(u64::from(n));
        sock.stats.tx_completed += u64::from(n);
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and its size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(cfg: XskConfig) -> &'static str {
        match Xsk::new(&cfg) {
            Err(XskError::Config(why)) => why,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn invalid_configs_are_refused_before_any_syscall() {
        let d = XskConfig::default();
        assert!(
            bad(XskConfig {
                frame_size: 3000,
                ..d.clone()
            })
            .contains("power of two")
        );
        assert!(
            bad(XskConfig {
                frame_size: 1024,
                ..d.clone()
            })
            .contains("2048")
        );
        assert!(
            bad(XskConfig {
                fill_size: 1000,
                ..d.clone()
            })
            .contains("fill_size")
        );
        assert!(
            bad(XskConfig {
                tx_size: 3,
                ..d.clone()
            })
            .contains("tx_size")
        );
        assert!(
            bad(XskConfig {
                headroom: 4096,
                ..d.clone()
            })
            .contains("headroom")
        );
        assert!(
            bad(XskConfig {
                batch_size: 0,
                ..d.clone()
            })
            .contains("batch_size")
        );
        assert!(
            bad(XskConfig {
                frame_count: 0,
                ..d
            })
            .contains("frame_count")
        );
    }

    #[test]
    fn accounting_balances_only_when_every_chunk_is_somewhere() {
        let mut a = FrameAccounting {
            total: 10,
            free: 4,
            fill: 3,
            held: 1,
            tx: 2,
            lost: 0,
        };
        assert!(a.is_balanced());
        a.free -= 1;
        assert!(!a.is_balanced());
    }

    #[test]
    fn copied_frames_take_whole_chunks_up_to_the_segment_limit() {
        assert_eq!(chunks_for(0, 4096, 18), Err(SendError::Empty));
        assert_eq!(chunks_for(1, 4096, 18), Ok(1));
        assert_eq!(chunks_for(4096, 4096, 18), Ok(1));
        assert_eq!(chunks_for(4097, 4096, 18), Ok(2));
        // The largest frame a pod veth delivers (65535 + 14) fits in 4 KiB chunks.
        assert_eq!(chunks_for(65549, 4096, MAX_SEGMENTS), Ok(17));
        assert_eq!(chunks_for(4097, 4096, 1), Err(SendError::TooLarge));
        assert_eq!(
            chunks_for(18 * 4096 + 1, 4096, MAX_SEGMENTS),
            Err(SendError::TooLarge)
        );
    }

    #[test]
    fn default_headroom_fits_a_vxlan_push() {
        let d = XskConfig::default();
        assert!(d.headroom + XDP_PACKET_HEADROOM >= VXLAN_ENCAP_LEN);
        assert_eq!(d.batch_size, 64);
    }
}
