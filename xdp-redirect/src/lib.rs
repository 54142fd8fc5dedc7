//! `sluice-xdp`: frames in and out of userspace, nothing else.
//!
//! * [`bpf`]: the XDP classifier (C, `bpf/sluice.bpf.c`) compiled at build
//!   time and the map types of `bpf/sluice.h` from its skeleton.
//! * [`loader`]: loads, pins and attaches the program, fills its maps,
//!   registers AF_XDP sockets (control path, syscalls).
//! * [`xsk`]: the AF_XDP layer: one UMEM per worker shared by its sockets,
//!   fill/completion/rx/tx rings, batches of frames, frame accounting.
//!
//! A worker's cycle (the agent's shape; `no_run`: needs root and veths):
//!
//! ```no_run
//! use sluice_xdp::{AttachMode, ClassifierConfig, IfaceConfig, IfaceRole, LoaderOptions};
//! use sluice_xdp::{XdpLoader, Xsk, XskConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut loader = XdpLoader::load(&LoaderOptions::new("node-1"))?;
//! loader.set_config(&ClassifierConfig::default())?;
//! let pod = IfaceConfig { role: IfaceRole::Pod, fail_closed: false, redirect_all: false };
//! let (ia, ib) = (
//!     loader.attach("veth-a", pod, AttachMode::Native)?,
//!     loader.attach("veth-b", pod, AttachMode::Native)?,
//! );
//! let mut xsk = Xsk::new(&XskConfig::default())?;
//! let (a, b) = (xsk.open_socket("veth-a", 0)?, xsk.open_socket("veth-b", 0)?);
//! loader.register_socket(ia, 0, xsk.fd(a)?)?;
//! loader.register_socket(ib, 0, xsk.fd(b)?)?;
//! let mut batch = xsk.batch();
//! loop {
//!     // (wait on xsk.fd(a) / xsk.fd(b) with mio or poll here)
//!     let n = xsk.recv(a, &mut batch)?;
//!     for i in 0..n {
//!         let Some(mut frame) = xsk.frame(&mut batch, i) else { continue };
//!         // frame.chunk(): the whole first chunk; frame.offset()/len():
//!         // the data; frame.set_bounds(..) after a push or pull;
//!         // frame.continuation(k): the chained chunks.
//!         frame.forward(b);
//!     }
//!     xsk.complete(&mut batch)?;
//!     xsk.flush()?;
//! }
//! # }
//! ```
//!
//! The same batch all at once, as a pipeline's `process_batch` takes it
//! (every packet's first chunk lent mutably together, no allocation):
//!
//! ```no_run
//! # use sluice_xdp::{RxBatch, SocketId, Verdict, Xsk};
//! # fn run(xsk: &mut Xsk, a: SocketId, b: SocketId, batch: &mut RxBatch) -> Result<(), Box<dyn std::error::Error>> {
//! const BATCH: usize = 64;
//! let n = xsk.recv(a, batch)?;
//! let mut windows = [(0usize, 0usize); BATCH];
//! for (k, frame) in xsk.frames(batch).take(BATCH).enumerate() {
//!     let (chunk, offset, len, continuations) = frame.into_parts();
//!     // The pipeline runs over (chunk, offset, len, continuations) of every
//!     // packet; here: push a 50-byte (VXLAN) header in front of the data.
//!     chunk[offset - 50..offset].fill(0);
//!     windows[k] = (offset - 50, len + 50);
//!     let _tail_bytes: usize = continuations.map(<[u8]>::len).sum();
//! }
//! for (k, (offset, len)) in windows.iter().copied().enumerate().take(n) {
//!     let verdict = match batch.set_bounds(k, offset, len) {
//!         Ok(()) => Verdict::Forward(b),
//!         Err(_) => Verdict::Drop,
//!     };
//!     batch.set_verdict(k, verdict);
//! }
//! xsk.complete(batch)?;
//! xsk.flush()?;
//! # Ok(())
//! # }
//! ```
//!
//! All `unsafe` of the project's kernel ABI (rings, UMEM, libbpf glue) lives
//! in this crate, each block with its `// SAFETY:` reason.

pub mod bpf;
pub mod loader;
pub mod xsk;

pub use loader::{
    AttachMode, ClassifierConfig, Counters, IfaceConfig, IfaceRole, Ipv4Cidr, Isolation,
    LoaderError, LoaderOptions, Pruned, XdpLoader,
};
pub use xsk::{
    BindMode, BoundsError, BusyPoll, ChainError, ChecksumError, Continuations, EmitError, Emitted,
    Emitter, FrameAccounting, FrameMut, Frames, KernelStats, LentChunk, LentError, LentFrame,
    LentRefusal, RxBatch, SendChecksumError, SendError, SocketId, SocketStats, TX_METADATA_LEN,
    TxBuffers, TxMetadata, TxSkbBudget, Verdict, WriteError, Xsk, XskConfig, XskError, chunks_for,
};
