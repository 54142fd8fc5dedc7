//! The compiled XDP program and the map types of `bpf/sluice.h`.
//!
//! Both come from the build: `build.rs` compiles `bpf/sluice.bpf.c` with
//! clang and generates the libbpf-cargo skeleton, whose `types` module holds
//! the `#[repr(C)]` mirrors of the C structs and enums. Nothing here re-types
//! a field or an offset; this module only adds byte views for map I/O.

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    dead_code,
    unused_imports,
    unsafe_op_in_unsafe_fn
)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/sluice.skel.rs"));
}

pub use skel::types;

/// The BPF ELF object (`bpf/sluice.bpf.c` compiled for the `bpf` target).
pub static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sluice.bpf.o"));

/// Name of the XDP program in [`OBJECT`].
pub const PROGRAM: &str = "sluice_xdp";

/// Map names in [`OBJECT`].
pub mod maps {
    /// Node configuration, array of one [`super::types::sluice_config`].
    pub const CONFIG: &str = "sluice_config";
    /// ifindex -> [`super::types::sluice_iface`].
    pub const IFACES: &str = "sluice_ifaces";
    /// [`super::types::sluice_xsk_key`] -> XSKMAP slot.
    pub const XSK_SLOTS: &str = "sluice_xsk_slots";
    /// XSKMAP of the AF_XDP sockets.
    pub const XSKS: &str = "xsks";
    /// Per-CPU [`super::types::sluice_counters`].
    pub const COUNTERS: &str = "sluice_counters";
    /// Local pod IPv4 address (network byte order) -> `sluice_isolated_flags`.
    pub const ISOLATED: &str = "sluice_isolated";
    /// Every map the loader pins.
    pub const ALL: [&str; 6] = [CONFIG, IFACES, XSK_SLOTS, XSKS, COUNTERS, ISOLATED];
}

/// Plain old data: a `#[repr(C)]` type made only of integers (or
/// transparent integer newtypes), without padding bytes, so any byte pattern
/// of its size is a valid value and its bytes are always initialised.
///
/// # Safety
/// Implement only for types meeting the description above.
pub(crate) unsafe trait Pod: Copy + Default {}

// SAFETY: all fields are u32/u16 (5*4 + 4*2 + 4 = 32 bytes, 4-aligned, the
// explicit `pad` field fills what would otherwise be padding).
unsafe impl Pod for types::sluice_config {}
// SAFETY: two transparent u32 newtypes, no padding.
unsafe impl Pod for types::sluice_iface {}
// SAFETY: two u32, no padding.
unsafe impl Pod for types::sluice_xsk_key {}
// SAFETY: fourteen u64, no padding.
unsafe impl Pod for types::sluice_counters {}
// SAFETY: six u32, no padding.
unsafe impl Pod for types::xdp_md {}
// SAFETY: a plain integer.
unsafe impl Pod for u32 {}

/// The bytes of a value, as a map key or value.
pub(crate) fn bytes_of<T: Pod>(value: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no padding, so all `size_of::<T>()` bytes behind
    // the reference are initialised; the slice borrows `value`.
    unsafe {
        core::slice::from_raw_parts((value as *const T).cast::<u8>(), core::mem::size_of::<T>())
    }
}

/// A value read back from map bytes; `None` if the length does not match.
pub(crate) fn from_bytes<T: Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() != core::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the length matches, `read_unaligned` has no alignment
    // requirement, and `T: Pod` accepts any byte pattern.
    Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_types_have_the_c_sizes() {
        assert_eq!(core::mem::size_of::<types::sluice_config>(), 32);
        assert_eq!(core::mem::size_of::<types::sluice_iface>(), 8);
        assert_eq!(core::mem::size_of::<types::sluice_xsk_key>(), 8);
        assert_eq!(core::mem::size_of::<types::sluice_counters>(), 14 * 8);
    }

    #[test]
    fn bytes_round_trip() {
        let key = types::sluice_xsk_key {
            ifindex: 7,
            queue: 3,
        };
        let back: types::sluice_xsk_key = from_bytes(bytes_of(&key)).unwrap();
        assert_eq!((back.ifindex, back.queue), (7, 3));
        assert!(from_bytes::<types::sluice_xsk_key>(&[0; 7]).is_none());
    }

    #[test]
    fn object_is_an_elf_file() {
        assert_eq!(&OBJECT[..4], b"\x7fELF");
    }
}
