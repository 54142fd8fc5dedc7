//! The VXLAN receive path: frames arriving on the uplink from the other node, wrapped in outer
//! headers a real peer would send, through `pipeline::process_batch` against the demo snapshot
//! (decap, parse, source check, conntrack, services, policy, route, and re-encap or delivery to a
//! pod). Random bytes rarely make a VXLAN frame to this node; here the fuzzer shapes the inner
//! frame and, optionally, one byte of the outer headers.
//!
//! Input: byte 0 an outer-header offset (mod 50) and byte 1 the value XORed there (0: the outer
//! headers stay as the peer sent them); byte 2 bit 0 recomputes the outer IPv4 checksum after the
//! change; then frames as `[length (2 bytes), first-buffer split, inner frame]`, at most 8. The
//! batch runs twice, so the second pass meets the conntrack entries of the first.
//!
//! Checks: every frame is counted once per pass; outer headers as the peer sent them never count
//! as a VXLAN drop when the first buffer holds them and an inner Ethernet header.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_dataplane::checksum;
use sluice_dataplane::conntrack::CtConfig;
use sluice_dataplane::demo;
use sluice_dataplane::frame::Frame;
use sluice_dataplane::pipeline::{WorkerConfig, WorkerState, process_batch};
use sluice_dataplane::tables::Tables;
use sluice_dataplane::verdict::{DropReason, Verdict};
use sluice_dataplane::vxlan;

/// Headroom in front of each received frame (AF_XDP gives XDP_PACKET_HEADROOM and more).
const HEADROOM: usize = 256;
const MAX_FRAMES: usize = 8;
/// Outer Ethernet + IPv4 + UDP + VXLAN, as the peer sends them (no IPv4 options).
const OUTER: usize = vxlan::OVERHEAD;

static TABLES: OnceLock<Tables> = OnceLock::new();

/// `inner` wrapped as node 2 (192.168.50.2) sends it to this node's VTEP.
fn from_peer(inner: &[u8], hash: u64) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; HEADROOM + inner.len()];
    buf[HEADROOM..].copy_from_slice(inner);
    let mut f = Frame::new(&mut buf, HEADROOM, inner.len());
    let t = vxlan::Tunnel {
        src_mac: demo::PEER_MAC,
        dst_mac: demo::NODE_MAC,
        src_ip: [192, 168, 50, 2],
        dst_ip: [192, 168, 50, 1],
        vni: vxlan::FLANNEL_VNI,
        dst_port: vxlan::FLANNEL_PORT,
    };
    vxlan::encap(&mut f, &t, vxlan::src_port(hash), hash as u16).ok()?;
    let (off, len) = (f.offset(), f.len());
    Some(buf[off..off + len].to_vec())
}

fuzz_target!(|data: &[u8]| {
    let [at, xor, flags, rest @ ..] = data else {
        return;
    };
    let mut rest = rest;
    let tables = TABLES.get_or_init(demo::demo_tables);
    let mut outers: Vec<(Vec<u8>, usize)> = Vec::new();
    while let [hi, lo, split, tail @ ..] = rest {
        if outers.len() == MAX_FRAMES {
            break;
        }
        let n = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (inner, next) = tail.split_at(n);
        rest = next;
        let Some(mut outer) = from_peer(inner, outers.len() as u64 * 0x9e37_79b9) else {
            continue;
        };
        if *xor != 0 {
            outer[usize::from(*at) % OUTER] ^= xor;
            if flags & 1 != 0 {
                outer[24..26].fill(0);
                let c = checksum::checksum(&outer[14..34]);
                outer[24..26].copy_from_slice(&c.to_be_bytes());
            }
        }
        let split = match *split {
            0 => outer.len(),
            s => usize::from(s).max(64).min(outer.len()),
        };
        outers.push((outer, split));
    }
    if outers.is_empty() {
        return;
    }
    let mut state = WorkerState::new(WorkerConfig {
        conntrack: CtConfig::with_capacity(64),
        affinity_capacity: 16,
    });
    for round in 0..2u64 {
        let mut heads: Vec<Vec<u8>> = outers
            .iter()
            .map(|(o, split)| {
                let mut b = vec![0u8; HEADROOM + split];
                b[HEADROOM..].copy_from_slice(&o[..*split]);
                b
            })
            .collect();
        let tails: Vec<[&[u8]; 1]> = outers.iter().map(|(o, split)| [&o[*split..]]).collect();
        let mut frames: Vec<Frame<'_>> = heads
            .iter_mut()
            .zip(&tails)
            .map(|(b, t)| {
                let n = b.len() - HEADROOM;
                Frame::new(b, HEADROOM, n).with_tail(t)
            })
            .collect();
        let mut verdicts = vec![Verdict::PassToKernel; frames.len()];
        process_batch(
            tables,
            &mut state,
            round * 1_000_000_000,
            demo::UPLINK,
            &mut frames,
            &mut verdicts,
        );
        assert_eq!(state.counters.rx, (round + 1) * outers.len() as u64);
        if *xor == 0 {
            for ((o, split), v) in outers.iter().zip(&verdicts) {
                if *split >= OUTER + 14 && o.len() >= OUTER + 14 {
                    assert!(
                        !matches!(
                            v,
                            Verdict::Drop(
                                DropReason::VxlanMalformed
                                    | DropReason::VxlanBadChecksum
                                    | DropReason::VxlanWrongVni
                            )
                        ),
                        "a well-formed VXLAN frame was dropped: {v:?}"
                    );
                }
            }
        }
    }
});
