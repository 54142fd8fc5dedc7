//! `sluice-xdp`: frames in and out of userspace, nothing else.
//!
//! * [`bpf`]: the XDP classifier (C, `bpf/sluice.bpf.c`) compiled at build
//!   time and the map types of `bpf/sluice.h` from its skeleton.
//! * [`loader`]: loads, pins and attaches the program, fills its maps,
//!   registers AF_XDP sockets (control path, syscalls).
//! * [`xsk`]: the AF_XDP layer: one UMEM per worker shared by its sockets,
//!   fill/completion/rx/tx rings, batches of frames, frame accounting.
//!
//! All `unsafe` of the project's kernel ABI (rings, UMEM, libbpf glue) lives
//! in this crate, each block with its `// SAFETY:` reason.

pub mod bpf;
pub mod loader;
pub mod xsk;

pub use loader::{
    AttachMode, ClassifierConfig, Counters, IfaceConfig, IfaceRole, Ipv4Cidr, LoaderError,
    LoaderOptions, XdpLoader,
};
pub use xsk::{
    BindMode, BusyPoll, FrameAccounting, FrameMut, RxBatch, SocketId, SocketStats, Verdict, Xsk,
    XskConfig, XskError,
};
