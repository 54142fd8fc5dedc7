//! The flow hash: one fixed, seedless function of the 5-tuple, the same on every node and every
//! run, used for the Maglev backend choice and the VXLAN outer source port.

#![forbid(unsafe_code)]

/// A 64-bit hash of an IPv4 5-tuple (murmur3's finaliser over the packed tuple).
pub fn flow_hash(src: u32, dst: u32, src_port: u16, dst_port: u16, proto: u8) -> u64 {
    let a = (u64::from(src) << 32) | u64::from(dst);
    let b = (u64::from(src_port) << 32) | (u64::from(dst_port) << 16) | u64::from(proto);
    fmix64(fmix64(a ^ 0x9e37_79b9_7f4a_7c15) ^ b)
}

/// A 64-bit hash of a client address alone (sessionAffinity ClientIP).
pub fn addr_hash(src: u32) -> u64 {
    fmix64(u64::from(src) ^ 0x9e37_79b9_7f4a_7c15)
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_spread() {
        assert_eq!(flow_hash(1, 2, 3, 4, 6), flow_hash(1, 2, 3, 4, 6));
        assert_ne!(flow_hash(1, 2, 3, 4, 6), flow_hash(2, 1, 4, 3, 6));
        assert_ne!(flow_hash(1, 2, 3, 4, 6), flow_hash(1, 2, 3, 4, 17));
    }
}
