//! Criterion benchmarks of software TSO (`segment`) and GRO (`coalesce`).
//!
//! Frames live in 4 KiB chunks as AF_XDP delivers them (packet data 256 bytes into the first
//! chunk, the rest in further 4 KiB chunks); outputs go into 4 KiB chunks with 256 bytes of
//! headroom, VXLAN encapsulation included.
//!
//! Cases:
//! - `segment/vxlan_mtu1500`: one 64 KiB TCP frame (IP length 65,535, timestamps option, payload
//!   over 17 chunks) cut for an inner MTU of 1450 into 47 segments, each written into its own
//!   chunk and VXLAN-encapsulated ([`FlowTunnel`]). `Throughput::Bytes` of the original's IP
//!   length: the time is per 64 KiB frame.
//! - `segment/vxlan_mtu9000`: the same frame for an inner MTU of 8950: 8 segments, each over three
//!   chunks.
//! - `segment/copy_sum_floor`: the fused copy-and-sum alone over the same 64 KiB, contiguous:
//!   the floor under both cases above.
//! - `coalesce/bulk_derive`: a batch of 64 full-sized segments (1,398 bytes of payload and the
//!   timestamps option) of one flow, merged into 4 frames (18 buffers each at most), checksums
//!   derived. `Throughput::Elements` of the 64 segments: the time per element is per segment.
//!   Each iteration first restores the headers the previous one rewrote (4 merged frames' 66
//!   bytes each), then builds the 64 frame views and plans; all of it is timed. The batch stays
//!   in cache, as frames the kernel just copied into UMEM are.
//! - `coalesce/four_flows_derive`: 64 segments of four flows, interleaved.
//! - `coalesce/bulk_verify`: `bulk_derive` with `ChecksumTrust::Verify` (every payload summed).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

use sluice_dataplane::coalesce::{self, ChecksumTrust, Merged};
use sluice_dataplane::demo::{self, FrameSpec};
use sluice_dataplane::frame::Frame;
use sluice_dataplane::segment::{self, FlowTunnel, Oversize};
use sluice_dataplane::vxlan;
use sluice_dataplane::wordsum::WordSum;

const CHUNK: usize = 4096;
const HEADROOM: usize = 256;
const BATCH: usize = 64;

/// A TCP frame from pod 10.244.1.2 to a remote pod with the timestamps option and `payload`
/// bytes (`demo::tcp_frame` has no options: the option goes in by hand, checksums redone).
fn tcp_frame(sport: u16, seq: u32, payload: usize) -> Vec<u8> {
    let spec = FrameSpec::from_pod(2, [10, 244, 2, 3], sport, 8080);
    let mut body = vec![1u8, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
    body.extend((0..payload).map(|i| i as u8));
    let plain = demo::tcp_frame(&spec, 0x10, &body);
    let mut f = plain;
    f[14 + 20 + 4..14 + 20 + 8].copy_from_slice(&seq.to_be_bytes());
    f[14 + 20 + 12] = 0x80; // data offset 8: the first 12 body bytes are the option
    let tcp_len = f.len() - 34;
    let mut c = sluice_dataplane::checksum::Checksum::new();
    c.add_u32(sluice_dataplane::checksum::pseudo_header_sum(
        [10, 244, 1, 2],
        [10, 244, 2, 3],
        6,
        tcp_len as u16,
    ));
    f[34 + 16..34 + 18].copy_from_slice(&[0, 0]);
    c.add_bytes(&f[34..]);
    let v = c.finish();
    f[34 + 16..34 + 18].copy_from_slice(&v.to_be_bytes());
    f
}

fn tunnel() -> vxlan::Tunnel {
    vxlan::Tunnel {
        src_mac: demo::NODE_MAC,
        dst_mac: demo::PEER_MAC,
        src_ip: [192, 168, 50, 1],
        dst_ip: [192, 168, 50, 2],
        vni: vxlan::FLANNEL_VNI,
        dst_port: vxlan::FLANNEL_PORT,
    }
}

/// Cut `bytes` into a first chunk (data at HEADROOM) and full tail chunks.
fn chunked(bytes: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let first = bytes.len().min(CHUNK - HEADROOM);
    let mut head = vec![0u8; CHUNK];
    head[HEADROOM..HEADROOM + first].copy_from_slice(&bytes[..first]);
    let tail = bytes[first..].chunks(CHUNK).map(<[u8]>::to_vec).collect();
    (head, tail)
}

fn segment(c: &mut Criterion) {
    let mut g = c.benchmark_group("segment");
    let orig = tcp_frame(40000, 1, 65_535 - 20 - 32);
    g.throughput(Throughput::Bytes((orig.len() - 14) as u64));
    let (mut head, tail) = chunked(&orig);
    let tails: Vec<&[u8]> = tail.iter().map(Vec::as_slice).collect();
    let head_len = orig.len().min(CHUNK - HEADROOM);
    for (name, mtu) in [("vxlan_mtu1500", 1450usize), ("vxlan_mtu9000", 8950)] {
        let mut out = vec![vec![0u8; CHUNK]; 48];
        let mut spill = vec![vec![0u8; CHUNK]; 2];
        g.bench_function(name, |b| {
            b.iter(|| {
                let frame = Frame::new(&mut head, HEADROOM, head_len).with_tail(&tails);
                let Ok(Oversize::Split(mut seg)) = segment::plan(&frame, mtu) else {
                    unreachable!("a 64 KiB frame is split");
                };
                let tun = FlowTunnel::new(tunnel(), seg.flow_key());
                let mut id = 0u16;
                let mut bytes = 0;
                for chunk in out.iter_mut() {
                    if seg.is_done() {
                        break;
                    }
                    let [s1, s2] = &mut spill[..] else {
                        unreachable!()
                    };
                    let mut more = [&mut s1[..], &mut s2[..]];
                    let w = seg
                        .write_next(chunk, HEADROOM, &mut more)
                        .unwrap_or_else(|e| unreachable!("{e:?}"));
                    let spilled: [&[u8]; 2] = match w.tail_bufs {
                        2 => [&s1[..], &s2[..w.last_tail_len]],
                        _ => [&s1[..w.last_tail_len], &[]],
                    };
                    let t = &spilled[..w.tail_bufs.min(2)];
                    let mut f = Frame::new(chunk, HEADROOM, w.head_len).with_tail(t);
                    id = id.wrapping_add(1);
                    let _ = tun.encap(&mut f, id);
                    bytes += f.total_len();
                }
                black_box(bytes)
            })
        });
    }
    let mut dst = vec![0u8; orig.len()];
    g.bench_function("copy_sum_floor", |b| {
        b.iter(|| {
            let mut sum = WordSum::new();
            sum.copy_from(&mut dst, black_box(&orig));
            black_box(sum.fold())
        })
    });
    g.finish();
}

/// The headers (Ethernet, IPv4, TCP with timestamps) in a chunk.
const HEADER: core::ops::Range<usize> = HEADROOM..HEADROOM + 14 + 20 + 32;

/// A batch of segments in their chunks.
struct Batch {
    chunks: Vec<Vec<u8>>,
    lens: Vec<usize>,
}

impl Batch {
    fn new(frames: &[Vec<u8>]) -> Self {
        Self {
            chunks: frames.iter().map(|f| chunked(f).0).collect(),
            lens: frames.iter().map(Vec::len).collect(),
        }
    }
}

fn coalesce_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("coalesce");
    g.throughput(Throughput::Elements(BATCH as u64));
    let bulk: Vec<Vec<u8>> = (0..BATCH as u32)
        .map(|k| tcp_frame(40000, 1 + k * 1398, 1398))
        .collect();
    let four: Vec<Vec<u8>> = (0..BATCH as u32)
        .map(|k| tcp_frame(40000 + (k % 4) as u16, 1 + (k / 4) * 1398, 1398))
        .collect();
    let cases = [
        ("bulk_derive", &bulk, ChecksumTrust::Derive),
        ("four_flows_derive", &four, ChecksumTrust::Derive),
        ("bulk_verify", &bulk, ChecksumTrust::Verify),
    ];
    for (name, frames, trust) in cases {
        let fresh = Batch::new(frames);
        let mut batch = Batch::new(frames);
        let mut plan = vec![Merged::default(); BATCH];
        let mut planned = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                // Undo the last iteration's header rewrites (a few merged frames' headers).
                for m in plan[..planned].iter().filter(|m| m.is_merge()) {
                    let i = m.first();
                    batch.chunks[i][HEADER].copy_from_slice(&fresh.chunks[i][HEADER]);
                }
                let mut it = batch.chunks.iter_mut().zip(&batch.lens);
                let mut views: [Frame<'_>; BATCH] = core::array::from_fn(|_| {
                    let (c, &n) = it.next().unwrap_or_else(|| unreachable!());
                    Frame::new(c, HEADROOM, n)
                });
                planned = coalesce::coalesce(&mut views, trust, &mut plan);
                black_box(planned)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, segment, coalesce_bench);
criterion_main!(benches);
