//! The four rings of a socket, as the rest of the AF_XDP layer drives them:
//! fill (chunks to the kernel), rx (packets from it), tx (packets to it) and
//! completion (chunks back from tx), plus the kicks (`sendto`/`recvfrom`).
//!
//! Owns every ring access: creating and mapping a ring ([`MappedRing`],
//! unmapped on drop) and libxdp's inline producer/consumer helpers over the
//! mapped rings. Guarantees: nothing is produced beyond the room the ring
//! has (libxdp reserves all or nothing); a tx ring only ever receives whole
//! packets; every chunk taken from or given to a ring is counted in the
//! socket's `fill_out`/`tx_out`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, Ordering};

use libxdp_sys::{xdp_desc, xsk_ring_cons, xsk_ring_prod};

use super::socket::Socket;
use super::umem::Memory;
use super::{KERNEL_TX_BATCH, XskError};

/// The rings of an AF_XDP socket; each is created with a socket option and
/// mapped at its own page offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RingKind {
    Fill,
    Completion,
    Rx,
    Tx,
}

impl RingKind {
    fn sockopt(self) -> libc::c_int {
        match self {
            Self::Fill => libc::XDP_UMEM_FILL_RING,
            Self::Completion => libc::XDP_UMEM_COMPLETION_RING,
            Self::Rx => libc::XDP_RX_RING,
            Self::Tx => libc::XDP_TX_RING,
        }
    }

    fn pgoff(self) -> libc::off_t {
        match self {
            Self::Fill => libc::XDP_UMEM_PGOFF_FILL_RING as libc::off_t,
            Self::Completion => libc::XDP_UMEM_PGOFF_COMPLETION_RING as libc::off_t,
            Self::Rx => libc::XDP_PGOFF_RX_RING,
            Self::Tx => libc::XDP_PGOFF_TX_RING,
        }
    }

    /// Bytes of one entry: a chunk address or a descriptor.
    fn entry_size(self) -> usize {
        match self {
            Self::Fill | Self::Completion => size_of::<u64>(),
            Self::Rx | Self::Tx => size_of::<xdp_desc>(),
        }
    }

    fn offsets(self, off: &libc::xdp_mmap_offsets) -> &libc::xdp_ring_offset {
        match self {
            Self::Fill => &off.fr,
            Self::Completion => &off.cr,
            Self::Rx => &off.rx,
            Self::Tx => &off.tx,
        }
    }

    /// Creates this ring with `entries` entries (a power of two) on `fd`.
    pub(super) fn create(self, fd: BorrowedFd<'_>, entries: u32) -> io::Result<()> {
        // SAFETY: `entries` is a live u32 and its size is passed along.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_XDP,
                self.sockopt(),
                (&entries as *const u32).cast(),
                size_of::<u32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Where the kernel puts each ring's producer, consumer, flags and entries
/// in its mapping (`XDP_MMAP_OFFSETS`).
pub(super) fn mmap_offsets(fd: BorrowedFd<'_>) -> io::Result<libc::xdp_mmap_offsets> {
    let zero = libc::xdp_ring_offset {
        producer: 0,
        consumer: 0,
        desc: 0,
        flags: 0,
    };
    let mut off = libc::xdp_mmap_offsets {
        rx: zero,
        tx: zero,
        fr: zero,
        cr: zero,
    };
    let mut len = size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
    // SAFETY: `off` and `len` are live and `len` is the size of `off`, which
    // the kernel fills at most.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            libc::XDP_MMAP_OFFSETS,
            (&mut off as *mut libc::xdp_mmap_offsets).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<libc::xdp_mmap_offsets>() {
        // Kernels before 5.4 give no flags offset (no need_wakeup).
        return Err(io::Error::other("XDP_MMAP_OFFSETS without ring flags"));
    }
    Ok(off)
}

/// libxdp's two ring views (`xsk_ring_prod`, `xsk_ring_cons`) have the same
/// fields: one builder for both, over a [`MappedRing`].
macro_rules! ring_view {
    ($view:ident, $ring:expr, $cached_prod:expr, $cached_cons:expr) => {
        $view {
            cached_prod: $cached_prod,
            cached_cons: $cached_cons,
            mask: $ring.size - 1,
            size: $ring.size,
            producer: $ring.at($ring.producer),
            consumer: $ring.at($ring.consumer),
            ring: $ring.at($ring.desc),
            flags: $ring.at($ring.flags),
        }
    };
}

/// One ring of a socket, mapped; unmapped on drop. The `xsk_ring_*` views
/// made from it point into the mapping and must not outlive it.
#[derive(Debug)]
pub(super) struct MappedRing {
    base: NonNull<u8>,
    len: usize,
    size: u32,
    producer: usize,
    consumer: usize,
    flags: usize,
    desc: usize,
}

impl MappedRing {
    /// Maps ring `kind` of `fd`, created with `entries` entries, at the
    /// offsets `off` the kernel gave.
    pub(super) fn map(
        fd: BorrowedFd<'_>,
        kind: RingKind,
        entries: u32,
        off: &libc::xdp_mmap_offsets,
    ) -> io::Result<Self> {
        let o = kind.offsets(off);
        let desc = o.desc as usize;
        let len = desc + entries as usize * kind.entry_size();
        if [o.producer, o.consumer, o.flags]
            .iter()
            .any(|&f| f as usize + size_of::<u32>() > desc)
        {
            return Err(io::Error::other("ring offsets overlap the entries"));
        }
        // SAFETY: a new shared mapping of the ring the kernel created on `fd`
        // (`len` is what it needs: the header up to `desc`, then the
        // entries); no existing memory is affected; checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                kind.pgoff(),
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self {
            base,
            len,
            size: entries,
            producer: o.producer as usize,
            consumer: o.consumer as usize,
            flags: o.flags as usize,
            desc,
        })
    }

    /// A pointer `offset` bytes into the mapping.
    fn at<T>(&self, offset: usize) -> *mut T {
        // The offsets were checked against the mapping's length in `map`.
        self.base.as_ptr().wrapping_add(offset).cast()
    }

    /// The kernel's producer and consumer index now.
    fn indexes(&self) -> (u32, u32) {
        let load = |offset| {
            // SAFETY: `offset` (producer or consumer) lies in the mapping and
            // is 4-byte aligned (the kernel's layout); the kernel updates it
            // concurrently, hence the atomic read.
            unsafe { (*self.at::<AtomicU32>(offset)).load(Ordering::Acquire) }
        };
        (load(self.producer), load(self.consumer))
    }

    /// The ring as libxdp's consumer view (rx, completion).
    pub(super) fn consumer(&self) -> xsk_ring_cons {
        let (prod, cons) = self.indexes();
        ring_view!(xsk_ring_cons, self, prod, cons)
    }

    /// The ring as libxdp's producer view (fill, tx): the consumer index is
    /// kept `size` ahead, as `xsk_prod_nb_free` expects.
    pub(super) fn producer(&self) -> xsk_ring_prod {
        let (prod, cons) = self.indexes();
        ring_view!(xsk_ring_prod, self, prod, cons.wrapping_add(self.size))
    }
}

impl Drop for MappedRing {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `MappedRing::map`, unmapped
        // once; the ring views into it are dropped with it (`Socket`).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// A range of rx descriptors peeked and not yet released.
#[derive(Debug)]
pub(super) struct RxPeek {
    idx: u32,
    n: u32,
}

impl RxPeek {
    /// Descriptors in the range.
    pub(super) fn len(&self) -> u32 {
        self.n
    }

    /// Descriptor `k` of the range (`None` past its end).
    pub(super) fn desc(&self, sock: &Socket, k: u32) -> Option<xdp_desc> {
        if k >= self.n {
            return None;
        }
        // SAFETY: `idx + k` lies within the range peeked from this socket's
        // rx ring and not released, which the kernel does not write.
        Some(unsafe { *libxdp_sys::xsk_ring_cons__rx_desc(&sock.rx, self.idx.wrapping_add(k)) })
    }
}

/// Peeks at most `max` descriptors of `sock`'s rx ring.
pub(super) fn rx_peek(sock: &mut Socket, max: u32) -> RxPeek {
    let mut idx = 0;
    // SAFETY: the rx ring of a live socket.
    let n = unsafe { libxdp_sys::xsk_ring_cons__peek(&mut sock.rx, max, &mut idx) };
    RxPeek { idx, n }
}

/// Releases the first `used` descriptors of `peek` to the kernel and leaves
/// the rest in the ring for the next peek.
pub(super) fn rx_finish(sock: &mut Socket, peek: RxPeek, used: u32) {
    let used = used.min(peek.n);
    if peek.n > used {
        // SAFETY: cancels the peeked but unused tail.
        unsafe { libxdp_sys::xsk_ring_cons__cancel(&mut sock.rx, peek.n - used) };
    }
    if used > 0 {
        // SAFETY: releases the consumed descriptors.
        unsafe { libxdp_sys::xsk_ring_cons__release(&mut sock.rx, used) };
    }
}

/// Takes everything out of `sock`'s rx ring: the chunks go to `free`.
pub(super) fn drain_rx(sock: &mut Socket, mem: &Memory, free: &mut Vec<u64>) {
    loop {
        let peek = rx_peek(sock, 64);
        if peek.len() == 0 {
            break;
        }
        for k in 0..peek.len() {
            if let Some(d) = peek.desc(sock, k)
                && mem.contains(&d)
            {
                free.push(mem.chunk_base(d.addr));
            }
            sock.fill_out = sock.fill_out.saturating_sub(1);
        }
        let n = peek.len();
        rx_finish(sock, peek, n);
    }
}

/// The chunk addresses between the kernel's consumer and our producer.
pub(super) fn fill_ring_entries(fill: &xsk_ring_prod) -> Vec<u64> {
    if fill.ring.is_null() || fill.consumer.is_null() {
        return Vec::new();
    }
    // SAFETY: `consumer` points into the mapped fill ring of a live socket;
    // the kernel updates it concurrently, hence the atomic (acquire) read.
    let cons = unsafe { (*(fill.consumer as *const AtomicU32)).load(Ordering::Acquire) };
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

/// Chunks on `sock`'s fill ring the kernel has not taken yet (its consumer index, read now).
pub(super) fn fill_queued(sock: &mut Socket) -> u64 {
    let fill = &mut sock.fill;
    // SAFETY: the fill ring of a live socket; asking for the whole ring makes libxdp read the
    // kernel's consumer index unless the ring is known to be empty.
    let room = unsafe { libxdp_sys::xsk_prod_nb_free(fill, fill.size) };
    u64::from(fill.size.saturating_sub(room))
}

/// Tops `sock`'s fill ring up to its fill target from `free`.
pub(super) fn refill(sock: &mut Socket, free: &mut Vec<u64>) {
    let fill = &mut sock.fill;
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

/// Moves queued descriptors onto `sock`'s tx ring: as many whole packets,
/// in order, as the ring has room for.
pub(super) fn produce_tx(sock: &mut Socket) {
    if sock.pending.is_empty() {
        return;
    }
    let tx = &mut sock.tx;
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

/// Tx ring entries the kernel has not consumed yet (refreshes the cached
/// consumer).
fn tx_in_ring(sock: &mut Socket) -> u32 {
    let size = sock.tx.size;
    // SAFETY: the tx ring of a live socket.
    size - unsafe { libxdp_sys::xsk_prod_nb_free(&mut sock.tx, size) }
}

/// Kicks the kernel (`sendto`) while `sock`'s tx ring is not empty.
///
/// In copy mode one kick turns at most the socket's budget of descriptors
/// into skbs ([`KERNEL_TX_BATCH`] unless `XDP_MAX_TX_SKB_BUDGET` raised it)
/// and answers EAGAIN when it stopped at the budget; it answers EAGAIN too
/// when it could take nothing (completion ring or socket buffer full). So
/// an EAGAIN after which the ring holds fewer entries kicks again; one that
/// took nothing, EBUSY, ENOBUFS and EINTR end the round (the next flush
/// tries again).
pub(super) fn kick_tx(sock: &mut Socket) -> Result<(), XskError> {
    let mut in_ring = tx_in_ring(sock);
    for _ in 0..(sock.tx.size / KERNEL_TX_BATCH + 2) {
        if in_ring == 0 {
            break;
        }
        // Without XDP_USE_NEED_WAKEUP the kernel never sets the flag and
        // every non-empty ring needs a kick.
        // SAFETY: the tx ring of a live socket.
        if sock.need_wakeup && unsafe { libxdp_sys::xsk_ring_prod__needs_wakeup(&sock.tx) } == 0 {
            break;
        }
        sock.stats.tx_kicks += 1;
        let kicked = kick(sock, Kick::Tx);
        let before = in_ring;
        in_ring = tx_in_ring(sock);
        match kicked {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && in_ring < before => {}
            Err(e) if is_transient(&e) => break,
            Err(source) => {
                return Err(XskError::Wakeup {
                    ifname: sock.ifname.clone(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Wakes the kernel's fill ring side when it asks for it.
pub(super) fn wake_fill(sock: &mut Socket) -> Result<(), XskError> {
    // SAFETY: the fill ring of a live socket.
    if unsafe { libxdp_sys::xsk_ring_prod__needs_wakeup(&sock.fill) } == 0 {
        return Ok(());
    }
    recv_kick(sock)
}

/// `recvfrom` with no buffer: the rx/fill wakeup (and busy poll).
pub(super) fn recv_kick(sock: &mut Socket) -> Result<(), XskError> {
    match kick(sock, Kick::Rx) {
        Err(source) if !is_transient(&source) => Err(XskError::Wakeup {
            ifname: sock.ifname.clone(),
            source,
        }),
        _ => Ok(()),
    }
}

/// Which way a kick enters the kernel.
#[derive(Debug, Clone, Copy)]
enum Kick {
    /// `sendto`: transmit what the tx ring holds.
    Tx,
    /// `recvfrom`: wake the rx/fill side, busy poll.
    Rx,
}

/// A kick: `sendto` or `recvfrom` with no buffer, non-blocking.
fn kick(sock: &Socket, way: Kick) -> io::Result<()> {
    let fd = sock.fd.as_raw_fd();
    // SAFETY: sendto/recvfrom with a null buffer of length 0 and no address
    // on an AF_XDP socket are the documented kicks; nothing is read or written
    // through the null pointers.
    let rc = unsafe {
        match way {
            Kick::Tx => libc::sendto(fd, ptr::null(), 0, libc::MSG_DONTWAIT, ptr::null(), 0),
            Kick::Rx => libc::recvfrom(
                fd,
                ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                ptr::null_mut(),
                ptr::null_mut(),
            ),
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel is busy or the call was interrupted: the next flush tries
/// again.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS | libc::EINTR)
    )
}

/// Takes every completed tx chunk back onto `free`.
pub(super) fn reap(sock: &mut Socket, mem: &Memory, free: &mut Vec<u64>) {
    loop {
        let mut idx = 0;
        // SAFETY: the completion ring of a live socket.
        let n = unsafe { libxdp_sys::xsk_ring_cons__peek(&mut sock.comp, 256, &mut idx) };
        if n == 0 {
            return;
        }
        for k in 0..n {
            // SAFETY: index within the peeked range.
            let addr =
                unsafe { *libxdp_sys::xsk_ring_cons__comp_addr(&sock.comp, idx.wrapping_add(k)) };
            free.push(mem.chunk_base(addr));
        }
        // SAFETY: releases what was peeked.
        unsafe { libxdp_sys::xsk_ring_cons__release(&mut sock.comp, n) };
        sock.tx_out = sock.tx_out.saturating_sub(u64::from(n));
        sock.stats.tx_completed += u64::from(n);
    }
}
