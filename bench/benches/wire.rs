//! Criterion benchmarks of the header-level work, in packets (elements) per second.
//!
//! Cases:
//! - `parse/tcp_syn`, `parse/udp`: the `parse` stage (etherparse validation, IPv4 checksum, tuple)
//!   of a 54-byte TCP SYN and a 64-byte UDP datagram.
//! - `checksum/full_64`, `checksum/full_1500`, `checksum/full_chain_9000`: the full L4 checksum
//!   over 64 and 1500 bytes, and over a 9000-byte frame in three buffers.
//! - `checksum/incremental_dnat`: RFC 1624 update of an IPv4 header and TCP checksum for a DNAT
//!   (address and port) via `nat::rewrite`.
//! - `vxlan/encap`, `vxlan/decap`: outer headers on and off a 64-byte inner frame.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

use sluice_dataplane::checksum;
use sluice_dataplane::demo::{self, FrameSpec};
use sluice_dataplane::frame::Frame;
use sluice_dataplane::nat;
use sluice_dataplane::parse::{self, ParseOutcome};
use sluice_dataplane::vxlan;

fn parse_bench(c: &mut Criterion) {
    let t = demo::demo_tables();
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    let syn = demo::tcp_frame(
        &FrameSpec::from_pod(2, [10, 96, 0, 10], 40000, 80),
        0x02,
        b"",
    );
    let udp = demo::udp_frame(
        &FrameSpec::from_pod(2, [10, 244, 2, 3], 5000, 53),
        &[0u8; 22],
    );
    for (name, f) in [("tcp_syn", syn), ("udp", udp)] {
        let mut buf = f.clone();
        let n = buf.len();
        g.bench_function(name, |b| {
            b.iter(|| {
                let fr = Frame::new(&mut buf, 0, n);
                black_box(matches!(
                    parse::parse(&t, black_box(&fr)),
                    ParseOutcome::Ipv4(_)
                ))
            })
        });
    }
    g.finish();
}

fn checksum_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    g.throughput(Throughput::Elements(1));
    for n in [64usize, 1500] {
        let mut data: Vec<u8> = (0..n).map(|i| i as u8).collect();
        g.bench_function(format!("full_{n}"), |b| {
            b.iter(|| {
                let f = Frame::new(&mut data, 0, n);
                black_box(checksum::l4_full(&f, 0, n, 16, 1234))
            })
        });
    }
    let mut head: Vec<u8> = (0..3000).map(|i| i as u8).collect();
    let t1: Vec<u8> = (0..3000).map(|i| (i * 7) as u8).collect();
    let t2: Vec<u8> = (0..3000).map(|i| (i * 3) as u8).collect();
    let tail: [&[u8]; 2] = [&t1, &t2];
    g.bench_function("full_chain_9000", |b| {
        b.iter(|| {
            let f = Frame::new(&mut head, 0, 3000).with_tail(&tail);
            black_box(checksum::l4_full(&f, 34, 9000 - 34, 16, 1234))
        })
    });
    let t = demo::demo_tables();
    let syn = demo::tcp_frame(
        &FrameSpec::from_pod(2, [10, 96, 0, 10], 40000, 80),
        0x02,
        b"",
    );
    let mut buf = syn.clone();
    let n = buf.len();
    let p0 = match parse::parse(&t, &Frame::new(&mut buf, 0, n)) {
        ParseOutcome::Ipv4(p) => p,
        o => panic!("{o:?}"),
    };
    let a = p0.key();
    let mut bk = a;
    bk.dst = [10, 244, 2, 3];
    bk.dst_port = 8080;
    let mut flip = false;
    g.bench_function("incremental_dnat", |b| {
        b.iter(|| {
            // Alternate DNAT and its reverse so the frame stays valid.
            let mut f = Frame::new(&mut buf, 0, n);
            let (from, to) = if flip { (bk, a) } else { (a, bk) };
            let mut parsed = p0;
            parsed.dst = from.dst;
            parsed.dst_port = from.dst_port;
            nat::rewrite(&mut f, &mut parsed, black_box(&to));
            flip = !flip;
        })
    });
    g.finish();
}

fn vxlan_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("vxlan");
    g.throughput(Throughput::Elements(1));
    let inner = demo::udp_frame(
        &FrameSpec::from_pod(2, [10, 244, 2, 3], 5000, 53),
        &[0u8; 22],
    );
    let tun = vxlan::Tunnel {
        src_mac: demo::NODE_MAC,
        dst_mac: demo::PEER_MAC,
        src_ip: [192, 168, 50, 1],
        dst_ip: [192, 168, 50, 2],
        vni: 1,
        dst_port: 8472,
    };
    let mut buf = vec![0u8; 128 + inner.len()];
    buf[128..].copy_from_slice(&inner);
    let n = inner.len();
    g.bench_function("encap", |b| {
        b.iter(|| {
            let mut f = Frame::new(&mut buf, 128, n);
            black_box(vxlan::encap(&mut f, &tun, 40000, 1)).ok();
        })
    });
    let mut f = Frame::new(&mut buf, 128, n);
    vxlan::encap(&mut f, &tun, 40000, 1).ok();
    let (off, len) = (f.offset(), f.len());
    let mut rx = buf.clone();
    g.bench_function("decap", |b| {
        b.iter(|| {
            let mut f = Frame::new(&mut rx, off, len);
            black_box(vxlan::decap(&mut f, 1)).ok();
        })
    });
    g.finish();
}

criterion_group!(benches, parse_bench, checksum_bench, vxlan_bench);
criterion_main!(benches);
