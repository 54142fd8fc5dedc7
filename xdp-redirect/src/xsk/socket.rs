//! The AF_XDP sockets of a worker: opening and binding one on (interface,
//! queue) over the shared UMEM, its options, closing it, and its counters
//! (ours in [`SocketStats`], the kernel's in [`KernelStats`]).
//!
//! Owns each socket's fd and its four mapped rings. Guarantees: a socket's
//! fill ring is topped up on open; a failed open leaves nothing behind (the
//! next one starts clean); closing a socket closes its fd (the kernel
//! unbinds it), gives back every chunk userspace can still see and counts
//! the rest as lost.
//!
//! The setup is done here with `libc` (socket, ring options, mmap, bind),
//! as libxdp's `xsk_socket__create_shared` does it, without libxdp's object
//! lifecycle: with libxdp 1.6.0, when the first socket of a UMEM fails to
//! bind, `xsk_put_ctx` unmaps the UMEM's fill and completion rings while
//! `umem->fill_save` still points at them, and the next socket copies those
//! dangling rings (seen here: 966656 completions read from a ring that had
//! 256). The first socket binds on the fd the UMEM is registered on; each
//! further one binds with `XDP_SHARED_UMEM` to a live socket of this UMEM,
//! with its own fill and completion ring (one per (interface, queue)).

use std::collections::VecDeque;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use libxdp_sys::{xdp_desc, xsk_ring_cons, xsk_ring_prod};

use super::ring::{self, MappedRing, RingKind};
use super::umem;
use super::{BindMode, KERNEL_TX_BATCH, SocketId, Xsk, XskError};

const SO_PREFER_BUSY_POLL: libc::c_int = 69;
const SO_BUSY_POLL_BUDGET: libc::c_int = 70;
/// `#define XDP_MAX_TX_SKB_BUDGET 9` in `include/uapi/linux/if_xdp.h`
/// (Linux 6.17, commit 45e359be1ce8 "net: xsk: introduce
/// XDP_MAX_TX_SKB_BUDGET setsockopt"); not in libc 0.2.191. The kernel takes
/// an `unsigned int` in `32..=tx ring entries` (EACCES otherwise) and
/// answers ENOPROTOOPT where it does not know the option.
const XDP_MAX_TX_SKB_BUDGET: libc::c_int = 9;

/// A socket's copy-mode transmit budget: how many tx descriptors one kick
/// (`sendto`) turns into skbs before the kernel answers EAGAIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxSkbBudget {
    /// Not asked for ([`super::XskConfig::tx_skb_budget`] is `None`): the
    /// kernel's [`KERNEL_TX_BATCH`].
    KernelDefault,
    /// Set with `XDP_MAX_TX_SKB_BUDGET`.
    Set(u32),
    /// Asked for, but the kernel has no `XDP_MAX_TX_SKB_BUDGET` (before
    /// Linux 6.17: the setsockopt answered ENOPROTOOPT or EINVAL); the
    /// socket works with the kernel's [`KERNEL_TX_BATCH`].
    Unsupported {
        /// The budget the configuration asked for.
        asked: u32,
    },
}

impl TxSkbBudget {
    /// Tx descriptors one kick may turn into skbs.
    pub fn per_kick(&self) -> u32 {
        match self {
            Self::Set(n) => *n,
            Self::KernelDefault | Self::Unsupported { .. } => KERNEL_TX_BATCH,
        }
    }
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
    /// Packets queued through [`super::Emitter`] (written into fresh
    /// chunks from a received packet: segments, fragments).
    pub tx_emitted: u64,
    /// Forwarded packets dropped because their checksum offload request no
    /// longer fit the first chunk's data (bounds moved after the request):
    /// the kernel would refuse the descriptor and stall the tx ring on it.
    pub tx_csum_invalid: u64,
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

pub(super) struct Socket {
    // Views into `rings`, dropped before them.
    pub(super) rx: xsk_ring_cons,
    pub(super) tx: xsk_ring_prod,
    pub(super) fill: xsk_ring_prod,
    pub(super) comp: xsk_ring_cons,
    /// Fill, completion, rx, tx: unmapped before the fd closes.
    _rings: [MappedRing; 4],
    pub(super) fd: OwnedFd,
    pub(super) ifname: String,
    ifindex: u32,
    pub(super) queue: u32,
    /// Descriptors queued for the tx ring (whole packets, in order).
    pub(super) pending: VecDeque<xdp_desc>,
    pub(super) pending_cap: usize,
    pub(super) need_wakeup: bool,
    /// Chunks given to the fill ring and not received back.
    pub(super) fill_out: u64,
    /// Of those, the chunks still on the fill ring at the last flush (see [`super::fill`]).
    pub(super) fill_queued: u64,
    /// How many chunks this socket's fill ring is kept at now (see
    /// [`super::fill`]).
    pub(super) fill_target: u32,
    /// The share it always keeps (see [`Xsk::open_socket_with`]).
    pub(super) fill_base: u32,
    /// `stats.rx_descs` at the last flush.
    pub(super) rx_seen: u64,
    /// Consecutive flushes without a received descriptor.
    pub(super) idle_flushes: u32,
    /// Chunks queued or on the tx ring, not completed.
    pub(super) tx_out: u64,
    /// What one tx kick may send (see [`Xsk::tx_skb_budget`]).
    pub(super) tx_budget: TxSkbBudget,
    pub(super) stats: SocketStats,
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

/// A new AF_XDP socket (close-on-exec).
pub(super) fn xdp_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The four rings of a socket, created on `fd` with the configured sizes
/// and mapped, as (fill, completion, rx, tx).
fn map_rings(fd: BorrowedFd<'_>, sizes: [(RingKind, u32); 4]) -> io::Result<[MappedRing; 4]> {
    for (kind, entries) in sizes {
        kind.create(fd, entries)?;
    }
    let off = ring::mmap_offsets(fd)?;
    let [f, c, r, t] = sizes;
    Ok([
        MappedRing::map(fd, f.0, f.1, &off)?,
        MappedRing::map(fd, c.0, c.1, &off)?,
        MappedRing::map(fd, r.0, r.1, &off)?,
        MappedRing::map(fd, t.0, t.1, &off)?,
    ])
}

/// Binds `fd` to (`ifindex`, `queue`): with `flags`, or sharing the UMEM of
/// the bound socket `shared` (then the kernel allows no other flag).
fn bind(
    fd: BorrowedFd<'_>,
    ifindex: u32,
    queue: u32,
    flags: u16,
    shared: Option<RawFd>,
) -> io::Result<()> {
    let sxdp = libc::sockaddr_xdp {
        sxdp_family: libc::AF_XDP as u16,
        sxdp_flags: if shared.is_some() {
            libc::XDP_SHARED_UMEM
        } else {
            flags
        },
        sxdp_ifindex: ifindex,
        sxdp_queue_id: queue,
        sxdp_shared_umem_fd: shared.map_or(0, |s| s as u32),
    };
    // SAFETY: `sxdp` is a live `struct sockaddr_xdp` and its size is passed
    // along.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sxdp as *const libc::sockaddr_xdp).cast(),
            size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Xsk {
    /// Opens and binds a socket on (`ifname`, `queue`) sharing this UMEM and
    /// fills its fill ring. Register its fd with
    /// [`crate::XdpLoader::register_socket`] to receive.
    pub fn open_socket(&mut self, ifname: &str, queue: u32) -> Result<SocketId, XskError> {
        self.open_socket_with(ifname, queue, self.cfg.fill_size)
    }

    /// [`Self::open_socket`], keeping `fill_target` chunks in its fill ring
    /// (its base share). Chunks in a fill ring are idle until that socket
    /// receives, so with many sockets on one UMEM (a worker's pods) each gets
    /// a share: the busy uplink a full ring, a pod a few batches, a
    /// transmit-only socket none. A busy socket deepens its ring from the
    /// pool [`XskConfig::fill_boost`] while it stays busy (see
    /// [`super::fill`]).
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
        // SAFETY: `cname` is NUL-terminated and outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(sock_err(io::Error::last_os_error()));
        }
        if self
            .sockets
            .iter()
            .flatten()
            .any(|s| (s.ifindex, s.queue, s.ifname.as_str()) == (ifindex, queue, ifname))
        {
            return Err(sock_err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "this UMEM has a socket on this queue already",
            )));
        }
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
        // The first socket binds on the fd the UMEM is registered on (again
        // after every socket closed); the others share the UMEM of a live one.
        let shared = self
            .sockets
            .iter()
            .flatten()
            .next()
            .map(|s| s.fd.as_raw_fd());
        let fd = match (shared, self.unbound.take()) {
            (None, Some(fd)) => fd,
            (None, None) => umem::register(&self.mem, &self.cfg).map_err(XskError::Umem)?,
            (Some(_), unbound) => {
                self.unbound = unbound;
                xdp_socket().map_err(sock_err)?
            }
        };
        let rings = map_rings(
            fd.as_fd(),
            [
                (RingKind::Fill, self.cfg.fill_size),
                (RingKind::Completion, self.cfg.comp_size),
                (RingKind::Rx, self.cfg.rx_size),
                (RingKind::Tx, self.cfg.tx_size),
            ],
        )
        .map_err(sock_err)?;
        bind(fd.as_fd(), ifindex, queue, bind_flags, shared).map_err(sock_err)?;
        let [fill, comp, rx, tx] = &rings;
        let mut sock = Socket {
            rx: rx.consumer(),
            tx: tx.producer(),
            fill: fill.producer(),
            comp: comp.consumer(),
            _rings: rings,
            fd,
            ifname: ifname.to_string(),
            ifindex,
            queue,
            pending: VecDeque::with_capacity(self.cfg.tx_size as usize),
            pending_cap: self.cfg.tx_size as usize,
            need_wakeup: self.cfg.need_wakeup,
            fill_out: 0,
            fill_queued: 0,
            fill_target: fill_target.min(self.cfg.fill_size),
            fill_base: fill_target.min(self.cfg.fill_size),
            rx_seen: 0,
            idle_flushes: 0,
            tx_out: 0,
            tx_budget: TxSkbBudget::KernelDefault,
            stats: SocketStats::default(),
        };
        let fd = sock.fd.as_raw_fd();
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
        if let Some(asked) = self.cfg.tx_skb_budget {
            sock.tx_budget = match setsockopt_int(
                fd,
                libc::SOL_XDP,
                XDP_MAX_TX_SKB_BUDGET,
                asked as libc::c_int,
            ) {
                Ok(()) => TxSkbBudget::Set(asked),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOPROTOOPT | libc::EINVAL)) => {
                    TxSkbBudget::Unsupported { asked }
                }
                Err(source) => {
                    return Err(XskError::SockOpt {
                        ifname: ifname.to_string(),
                        option: "XDP_MAX_TX_SKB_BUDGET",
                        source,
                    });
                }
            };
        }
        ring::refill(&mut sock, &mut self.free);
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
        ring::reap(&mut sock, &self.mem, &mut self.free);
        // Drain rx: those chunks are ours again.
        ring::drain_rx(&mut sock, &self.mem, &mut self.free);
        // Fill entries the kernel has not consumed yet.
        let in_fill = ring::fill_ring_entries(&sock.fill);
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

    pub(super) fn socket(&self, id: SocketId) -> Result<&Socket, XskError> {
        self.sockets
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .ok_or(XskError::NoSuchSocket(id))
    }

    /// The socket's fd, for registering in the XSKMAP and polling (mio).
    pub fn fd(&self, id: SocketId) -> Result<BorrowedFd<'_>, XskError> {
        let s = self.socket(id)?;
        Ok(s.fd.as_fd())
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
        ring::recv_kick(sock)
    }

    /// Socket `id`'s copy-mode transmit budget: what
    /// [`super::XskConfig::tx_skb_budget`] asked for and whether the kernel
    /// took it (for the agent's log: [`TxSkbBudget::Unsupported`] on kernels
    /// before 6.17).
    pub fn tx_skb_budget(&self, id: SocketId) -> Result<TxSkbBudget, XskError> {
        Ok(self.socket(id)?.tx_budget)
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
                sock.fd.as_raw_fd(),
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
