//! The UMEM: the anonymous mapping that holds every chunk, its registration
//! with the kernel, the initial free list and the chunk arithmetic.
//!
//! Owns: the memory (unmapped when the last owner lets it go: the
//! [`super::Xsk`], after its sockets (field order), or the last chunk lent
//! from it, see `super::lend`). Guarantees: [`Memory::slice`] and [`Memory::chunk_mut`]
//! never reach outside the mapping; a chunk address is always
//! `index * frame_size` (aligned mode), and a descriptor address
//! `chunk base + offset in chunk`.
//!
//! The registration (`XDP_UMEM_REG`) is done here with `libc`, not with
//! libxdp's `xsk_umem__create`: that cannot pass `tx_metadata_len`, and its
//! socket setup corrupts the UMEM's saved rings when the first socket fails
//! to bind (see `super::socket`). The UMEM lives on the AF_XDP socket it is
//! registered on and, once sockets bind to it, as long as any of them.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::AtomicU64;

use libxdp_sys::xdp_desc;

use super::socket::xdp_socket;
use super::{XskConfig, XskError};

/// The UMEM memory region (anonymous mapping).
#[derive(Debug)]
pub(super) struct Memory {
    pub(super) base: NonNull<u8>,
    pub(super) len: usize,
    pub(super) frame_size: u64,
    /// Bytes of tx metadata the UMEM is registered with: no tx descriptor's
    /// data may start closer to its chunk's start (see `super::metadata`).
    pub(super) tx_metadata_len: usize,
    /// Chunks lent from this UMEM whose `LentChunk` or `LentFrame` was
    /// dropped without being given back (its borrower died): lost for good.
    pub(super) lent_dropped: AtomicU64,
}

// SAFETY: `Memory` is a pointer to a private anonymous mapping and its size,
// fixed after construction (registration sets `tx_metadata_len` before the
// memory is shared), plus an atomic counter. It hands out chunk bytes only
// through `slice` and the unsafe `chunk_mut`, whose callers own the chunk
// they name (a batch's claim, a fresh buffer's claim, a lent chunk's single
// owner, see `ChunkClaims`): no two threads reach one chunk at once, and the
// mapping is valid from any thread until it is unmapped on drop.
unsafe impl Send for Memory {}
// SAFETY: as for `Send`: shared references only read the fixed fields and
// the atomic; chunk contents are reached by the owner of each chunk only.
unsafe impl Sync for Memory {}

impl Memory {
    /// Maps `frame_count * frame_size` bytes, populated.
    pub(super) fn map(cfg: &XskConfig) -> Result<Self, XskError> {
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
        Ok(Self {
            base: NonNull::new(p.cast()).ok_or(XskError::Config("mmap returned null"))?,
            len,
            frame_size: u64::from(cfg.frame_size),
            tx_metadata_len: 0,
            lent_dropped: AtomicU64::new(0),
        })
    }

    /// The chunk base addresses of the whole UMEM, as the initial free list
    /// (popped from the end: chunk 0 first).
    pub(super) fn all_chunks(&self) -> Vec<u64> {
        (0..self.len as u64 / self.frame_size)
            .rev()
            .map(|i| i * self.frame_size)
            .collect()
    }

    pub(super) fn chunk_base(&self, addr: u64) -> u64 {
        addr & !(self.frame_size - 1)
    }

    pub(super) fn offset_in_chunk(&self, addr: u64) -> usize {
        (addr & (self.frame_size - 1)) as usize
    }

    /// Index of the chunk holding `addr`.
    pub(super) fn chunk_index(&self, addr: u64) -> usize {
        (addr / self.frame_size) as usize
    }

    /// True if `d` lies inside one chunk of this memory.
    pub(super) fn contains(&self, d: &xdp_desc) -> bool {
        let off = self.offset_in_chunk(d.addr) as u64;
        d.addr < self.len as u64 && off + u64::from(d.len) <= self.frame_size
    }

    /// The data of a descriptor already checked with [`Self::contains`].
    pub(super) fn slice(&self, d: &xdp_desc) -> &[u8] {
        if !self.contains(d) {
            return &[];
        }
        // SAFETY: `contains` checked that [addr, addr+len) lies in the
        // mapping; the descriptor belongs to a batch, so the chunk is owned
        // by userspace (not in any ring) and nobody writes it meanwhile: the
        // only mutable loans of a batch's chunks are of first chunks
        // (`FrameMut`), and `ChunkClaims` keeps every chunk of the live
        // batches in one place only (not in two batches, not a fresh tx
        // buffer, not lent to another thread).
        unsafe {
            std::slice::from_raw_parts(self.base.as_ptr().add(d.addr as usize), d.len as usize)
        }
    }

    /// The whole chunk holding `addr`, writable (empty if outside the UMEM).
    ///
    /// # Safety
    /// For the returned lifetime nothing else references the chunk: it is
    /// userspace's (taken off the free list, or held by a batch being
    /// completed; in no ring, so the kernel does not touch it), and no other
    /// slice of it is alive (no `FrameMut` of it, no other `chunk_mut`).
    #[expect(
        clippy::mut_from_ref,
        reason = "the caller guarantees the chunk is not aliased (# Safety)"
    )]
    pub(super) unsafe fn chunk_mut(&self, addr: u64) -> &mut [u8] {
        let base = self.chunk_base(addr);
        if base + self.frame_size > self.len as u64 {
            return &mut [];
        }
        // SAFETY: [base, base + frame_size) lies in the mapping (checked
        // above); the kernel does not touch the chunk and nothing else
        // references it while the slice lives (caller).
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
        // SAFETY: `base`/`len` are exactly the mapping made in `Memory::map`,
        // unmapped once, when its last owner lets it go: the `Xsk` after its
        // sockets and the UMEM were deleted (field order of `Xsk`), or the
        // last lent chunk, whose lender is gone then; either way the kernel
        // no longer uses it and no slice of it is alive (slices borrow an
        // owner).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The chunks userspace holds outside the free list and the rings, one bit
/// each, in two sets:
/// * held: a chunk is claimed when [`super::Xsk::recv`] or
///   [`super::Xsk::adopt`] puts it in a batch (or [`super::Xsk::emit_from`]
///   hands it out as a fresh tx buffer) and released when
///   [`super::Xsk::complete`] (or the queued or dropped buffer) takes it out;
/// * lent: a chunk is lent by [`super::Xsk::lend`] and comes back with
///   [`super::Xsk::adopt`] (then held) or [`super::Xsk::reclaim`].
///
/// A chunk is in at most one of the two, once: a claim or a lend of a chunk
/// held or lent already is refused. That is what makes the chunks of all
/// live batches and buffers pairwise distinct (the `FrameMut`s of a batch
/// borrow them mutably, all at once, next to the buffers), and a lent chunk
/// untouchable by its lender while another thread writes it.
#[derive(Debug)]
pub(super) struct ChunkClaims {
    held: ChunkBits,
    lent: ChunkBits,
}

impl ChunkClaims {
    /// No chunk held or lent, room for `chunks` chunks.
    pub(super) fn new(chunks: usize) -> Self {
        Self {
            held: ChunkBits::new(chunks),
            lent: ChunkBits::new(chunks),
        }
    }

    /// Claims the chunks of `descs` (each inside `mem`, see
    /// [`Memory::contains`]). If one is already held (by any batch, or twice
    /// in `descs`) or lent, nothing is claimed and the answer is false.
    pub(super) fn claim(&mut self, mem: &Memory, descs: &[xdp_desc]) -> bool {
        for (j, d) in descs.iter().enumerate() {
            if !self.claim_chunk(mem.chunk_index(d.addr)) {
                self.release(mem, &descs[..j]);
                return false;
            }
        }
        true
    }

    /// Claims chunk `i`; false (nothing claimed) if it is held or lent
    /// already, or outside the UMEM.
    pub(super) fn claim_chunk(&mut self, i: usize) -> bool {
        !self.lent.contains(i) && self.held.insert(i)
    }

    /// Releases the chunks of `descs` (claimed before).
    pub(super) fn release(&mut self, mem: &Memory, descs: &[xdp_desc]) {
        for d in descs {
            self.release_chunk(mem.chunk_index(d.addr));
        }
    }

    /// Releases chunk `i` (nothing happens if it is not held).
    pub(super) fn release_chunk(&mut self, i: usize) {
        self.held.remove(i);
    }

    /// Chunks held now.
    pub(super) fn held(&self) -> usize {
        self.held.count
    }

    /// Marks chunk `i` lent; false (nothing changes) if it is held or lent
    /// already, or outside the UMEM.
    pub(super) fn lend(&mut self, i: usize) -> bool {
        !self.held.contains(i) && self.lent.insert(i)
    }

    /// True if chunk `i` is lent.
    pub(super) fn is_lent(&self, i: usize) -> bool {
        self.lent.contains(i)
    }

    /// Ends the lend of chunk `i`; false if it was not lent.
    pub(super) fn unlend(&mut self, i: usize) -> bool {
        self.lent.remove(i)
    }

    /// Chunks lent now.
    pub(super) fn lent(&self) -> usize {
        self.lent.count
    }

    /// The lent chunks' indexes, in order.
    pub(super) fn lent_chunks(&self) -> impl Iterator<Item = usize> + '_ {
        self.lent.iter()
    }
}

/// A set of chunk indexes below `chunks`, one bit each, with its size.
#[derive(Debug)]
struct ChunkBits {
    bits: Vec<u64>,
    chunks: usize,
    count: usize,
}

impl ChunkBits {
    fn new(chunks: usize) -> Self {
        Self {
            bits: vec![0; chunks.div_ceil(64)],
            chunks,
            count: 0,
        }
    }

    /// Adds `i`; false if it is in the set already or out of range.
    fn insert(&mut self, i: usize) -> bool {
        if i >= self.chunks {
            return false;
        }
        match self.bits.get_mut(i / 64) {
            Some(w) if *w & (1 << (i % 64)) == 0 => {
                *w |= 1 << (i % 64);
                self.count += 1;
                true
            }
            _ => false,
        }
    }

    fn contains(&self, i: usize) -> bool {
        self.bits
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// The indexes in the set, in order.
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.bits.iter().enumerate().flat_map(|(k, &w)| {
            (0..64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| k * 64 + b)
        })
    }

    /// Removes `i`; false if it was not in the set.
    fn remove(&mut self, i: usize) -> bool {
        match self.bits.get_mut(i / 64) {
            Some(w) if *w & (1 << (i % 64)) != 0 => {
                *w &= !(1 << (i % 64));
                self.count -= 1;
                true
            }
            _ => false,
        }
    }
}

/// Registers `mem` as a UMEM of `cfg.frame_size` chunks with
/// `cfg.headroom`, and `mem.tx_metadata_len` bytes of tx metadata if not 0
/// (`XDP_UMEM_TX_METADATA_LEN`), on a new AF_XDP socket (`XDP_UMEM_REG`),
/// which is returned: the first socket to bind uses it.
pub(super) fn register(mem: &Memory, cfg: &XskConfig) -> io::Result<OwnedFd> {
    let fd = xdp_socket()?;
    let tx_metadata_len = u32::try_from(mem.tx_metadata_len)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let reg = libc::xdp_umem_reg {
        addr: mem.base.as_ptr() as u64,
        len: mem.len as u64,
        chunk_size: cfg.frame_size,
        headroom: cfg.headroom,
        flags: if tx_metadata_len > 0 {
            libc::XDP_UMEM_TX_METADATA_LEN
        } else {
            0
        },
        tx_metadata_len,
    };
    // SAFETY: `fd` is an AF_XDP socket; `reg` is a live `struct
    // xdp_umem_reg` whose size is passed along; the memory it names is
    // mapped, page aligned and `len` long, and stays mapped as long as the
    // kernel can use it (every socket is closed before `Memory` unmaps it).
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            libc::XDP_UMEM_REG,
            (&reg as *const libc::xdp_umem_reg).cast(),
            size_of::<libc::xdp_umem_reg>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(chunk: u64, offset: u64) -> xdp_desc {
        xdp_desc {
            addr: chunk * 4096 + offset,
            len: 60,
            options: 0,
        }
    }

    /// A mapping of 130 chunks of 4 KiB (not registered).
    fn memory() -> Memory {
        Memory::map(&XskConfig {
            frame_count: 130,
            ..XskConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn a_chunk_is_held_once_until_released() {
        let mem = memory();
        assert_eq!(mem.all_chunks().len(), 130);
        let mut held = ChunkClaims::new(130);
        assert!(held.claim(&mem, &[d(0, 320), d(129, 320), d(64, 0)]));
        assert_eq!(held.held(), 3);
        // Any chunk already held refuses the whole chain and claims nothing of it.
        assert!(!held.claim(&mem, &[d(5, 320), d(129, 270)]));
        assert!(
            !held.claim(&mem, &[d(6, 320), d(6, 1000)]),
            "twice in one chain"
        );
        assert_eq!(held.held(), 3);
        assert!(held.claim(&mem, &[d(5, 320), d(6, 320)]));
        held.release(&mem, &[d(0, 270), d(129, 320), d(64, 0), d(5, 1), d(6, 2)]);
        assert_eq!(held.held(), 0);
        held.release(&mem, &[d(0, 0)]);
        assert_eq!(held.held(), 0, "releasing a free chunk changes nothing");
        assert!(held.claim(&mem, &[d(129, 320)]));
    }

    #[test]
    fn a_chunk_is_held_or_lent_never_both() {
        let mem = memory();
        let mut claims = ChunkClaims::new(130);
        assert!(claims.lend(7) && claims.lend(128));
        assert!(!claims.lend(7), "lent twice");
        assert!(!claims.lend(130), "outside the UMEM");
        assert!(
            !claims.claim(&mem, &[d(1, 320), d(7, 320)]),
            "a lent chunk is not claimed"
        );
        assert_eq!(claims.held(), 0);
        assert!(claims.claim_chunk(1));
        assert!(!claims.lend(1), "a held chunk is not lent");
        assert_eq!(claims.lent_chunks().collect::<Vec<_>>(), [7, 128]);
        assert!(claims.unlend(7) && !claims.unlend(7));
        assert!(claims.claim_chunk(7), "once back, claimed like any other");
        assert_eq!((claims.held(), claims.lent()), (2, 1));
        assert!(claims.is_lent(128) && !claims.is_lent(7));
    }
}
