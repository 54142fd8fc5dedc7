//! Maglev table benchmarks.
//!
//! Cases:
//! - `maglev/lookup/{10,100,1000}`: backend choice for a batch of 1,024 precomputed flow hashes
//!   (elements = lookups; target < 10 ns each).
//! - `maglev/flow_hash_lookup/100`: the same with the flow hash computed from the 5-tuple
//!   (`FlowKey::hash64`), as the service stage does it.
//! - `maglev/flow_hash/1`: `FlowKey::hash64` alone.
//! - `maglev/build/{10,100,1000}`: building a table of M = 65537 for 10, 100 and 1,000 backends of
//!   equal weight (elements = tables; target < 10 ms for 1,000).
//! - `maglev/build_weighted/1000`: the same with weights 1..=10.
//! - `maglev/build_skewed/1000`: one backend of weight 1,000, the rest 1 (the heap schedule).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_dataplane::flow::{FlowKey, proto};
use sluice_dataplane::maglev::{MaglevBackend, MaglevTable};

const BATCH: usize = 1024;

fn names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.244.{}.{}:8080", i / 250, i % 250 + 1))
        .collect()
}

fn backends(names: &[String], weighted: bool) -> Vec<MaglevBackend<'_>> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| MaglevBackend {
            key: n.as_bytes(),
            weight: if weighted { i as u32 % 10 + 1 } else { 1 },
        })
        .collect()
}

fn flows() -> Vec<FlowKey> {
    (0..BATCH as u32)
        .map(|i| FlowKey {
            src: (0x0af4_0000 + i * 7).to_be_bytes(),
            dst: [10, 96, 0, 10],
            src_port: 32768 + (i * 13 % 28000) as u16,
            dst_port: 443,
            proto: proto::TCP,
        })
        .collect()
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev");
    g.throughput(Throughput::Elements(BATCH as u64));
    let keys = flows();
    let hashes: Vec<u64> = keys.iter().map(FlowKey::hash64).collect();
    for n in [10usize, 100, 1000] {
        let nm = names(n);
        let table = MaglevTable::build(&backends(&nm, false), MaglevTable::DEFAULT_SIZE).unwrap();
        g.bench_with_input(BenchmarkId::new("lookup", n), &hashes, |b, hashes| {
            b.iter(|| {
                let mut acc = 0u32;
                for &h in hashes {
                    acc = acc.wrapping_add(u32::from(table.lookup(black_box(h)).unwrap_or(0)));
                }
                acc
            })
        });
    }
    g.bench_with_input(BenchmarkId::new("flow_hash", 1), &keys, |b, keys| {
        b.iter(|| {
            let mut acc = 0u64;
            for k in keys {
                acc ^= black_box(k).hash64();
            }
            acc
        })
    });
    let nm = names(100);
    let table = MaglevTable::build(&backends(&nm, false), MaglevTable::DEFAULT_SIZE).unwrap();
    g.bench_with_input(
        BenchmarkId::new("flow_hash_lookup", 100),
        &keys,
        |b, keys| {
            b.iter(|| {
                let mut acc = 0u32;
                for k in keys {
                    let h = black_box(k).hash64();
                    acc = acc.wrapping_add(u32::from(table.lookup(h).unwrap_or(0)));
                }
                acc
            })
        },
    );
    g.finish();
}

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    for n in [10usize, 100, 1000] {
        let nm = names(n);
        let b = backends(&nm, false);
        g.bench_with_input(BenchmarkId::new("build", n), &b, |bench, b| {
            bench.iter(|| MaglevTable::build(black_box(b), MaglevTable::DEFAULT_SIZE).unwrap())
        });
    }
    let nm = names(1000);
    let b = backends(&nm, true);
    g.bench_with_input(BenchmarkId::new("build_weighted", 1000), &b, |bench, b| {
        bench.iter(|| MaglevTable::build(black_box(b), MaglevTable::DEFAULT_SIZE).unwrap())
    });
    let mut b = backends(&nm, false);
    b[0].weight = 1000;
    g.bench_with_input(BenchmarkId::new("build_skewed", 1000), &b, |bench, b| {
        bench.iter(|| MaglevTable::build(black_box(b), MaglevTable::DEFAULT_SIZE).unwrap())
    });
    g.finish();
}

criterion_group!(benches, lookup, build);
criterion_main!(benches);
