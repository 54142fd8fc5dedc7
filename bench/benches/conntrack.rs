//! Conntrack benchmarks.
//!
//! Cases:
//! - `conntrack/lookup_hit/{1000,100000,1000000}`: batches of 1,024 lookups of live flows drawn
//!   uniformly at random from a table holding that many connections at full capacity; each batch
//!   takes the next 1,024 of 2^20 random draws, so at 1 M the entries are cold in cache
//!   (elements = lookups; target: flat within 1.5x from 1 k to 1 M).
//! - `conntrack/lookup_batch_hit/{1000,100000,1000000}`: the same cold draws through
//!   `lookup_batch`, which overlaps the cache misses of 32 keys.
//! - `conntrack/lookup_hit_hot/{1000,100000,1000000}`: the same 1,024 flows every batch (a working
//!   set of active flows that stays in cache, whatever the table size).
//! - `conntrack/hit_account/{1000,1000000}`: lookup plus `on_packet` (TCP ACK), the established-flow
//!   path of the pipeline, cold as in `lookup_hit`.
//! - `conntrack/lookup_miss/1000000`: lookups of absent flows (the new-flow path before insert).
//! - `conntrack/churn/100000`: steady state at capacity: each element inserts a new flow
//!   (evicting or replacing an expired one) and sweeps two pool slots with `expire`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_dataplane::conntrack::{ConnTrack, CtConfig, FlowDir};
use sluice_dataplane::flow::{FlowKey, proto};
use sluice_dataplane::wire::tcp::flags as tcp_flags;

const BATCH: usize = 1024;
const SEC: u64 = 1_000_000_000;

/// Distinct TCP flows: client pods talking to service backends.
fn key(i: u32) -> FlowKey {
    FlowKey {
        src: (0x0af4_0000 ^ (i >> 6)).to_be_bytes(),
        dst: (0x0a60_0000 + (i & 63)).to_be_bytes(),
        src_port: 32768 + (i.wrapping_mul(2_654_435_761) >> 20) as u16 % 28000,
        dst_port: 8080,
        proto: proto::TCP,
    }
}

fn nat_reply(k: FlowKey) -> FlowKey {
    FlowKey {
        src: (u32::from_be_bytes(k.dst) ^ 0x0100_0000).to_be_bytes(),
        ..k.reversed()
    }
}

const DRAWS: usize = 1 << 20;

/// A full table of `n` connections and `DRAWS` keys of it drawn at random.
fn filled(n: usize) -> (ConnTrack<u32>, Vec<FlowKey>) {
    let mut ct = ConnTrack::new(CtConfig {
        hash_seed: 0x5eed,
        ..CtConfig::with_capacity(n)
    });
    for i in 0..n as u32 {
        let k = key(i);
        let h = ct.insert(k, nat_reply(k), i, 0).expect("insert");
        ct.on_packet(h, FlowDir::Original, Some(tcp_flags::ACK), 100, 0);
    }
    assert_eq!(ct.len(), n);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let draws = (0..DRAWS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            key((x % n as u64) as u32)
        })
        .collect();
    (ct, draws)
}

/// The next batch of `BATCH` draws.
fn next_batch<'a>(draws: &'a [FlowKey], at: &mut usize) -> &'a [FlowKey] {
    let b = &draws[*at..*at + BATCH];
    *at = (*at + BATCH) % draws.len();
    b
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("conntrack");
    g.throughput(Throughput::Elements(BATCH as u64));
    for n in [1_000usize, 100_000, 1_000_000] {
        let (mut ct, draws) = filled(n);
        let mut at = 0;
        g.bench_function(BenchmarkId::new("lookup_hit", n), |b| {
            b.iter(|| {
                let mut hits = 0u32;
                for k in next_batch(&draws, &mut at) {
                    hits += u32::from(ct.lookup(black_box(k), SEC).is_some());
                }
                assert_eq!(hits as usize, BATCH);
                hits
            })
        });
        let mut out = vec![None; BATCH];
        g.bench_function(BenchmarkId::new("lookup_batch_hit", n), |b| {
            b.iter(|| {
                ct.lookup_batch(black_box(next_batch(&draws, &mut at)), SEC, &mut out);
                assert!(out.iter().all(Option::is_some));
            })
        });
        let hot = &draws[..BATCH];
        g.bench_function(BenchmarkId::new("lookup_hit_hot", n), |b| {
            b.iter(|| {
                let mut hits = 0u32;
                for k in hot {
                    hits += u32::from(ct.lookup(black_box(k), SEC).is_some());
                }
                assert_eq!(hits as usize, BATCH);
                hits
            })
        });
        if n != 100_000 {
            g.bench_function(BenchmarkId::new("hit_account", n), |b| {
                b.iter(|| {
                    for k in next_batch(&draws, &mut at) {
                        let (h, dir) = ct.lookup(black_box(k), SEC).unwrap();
                        black_box(ct.on_packet(h, dir, Some(tcp_flags::ACK), 1500, SEC));
                    }
                })
            });
        }
        if n == 1_000_000 {
            let misses: Vec<FlowKey> = draws
                .iter()
                .map(|k| FlowKey { dst_port: 9, ..*k })
                .collect();
            g.bench_function(BenchmarkId::new("lookup_miss", n), |b| {
                b.iter(|| {
                    for k in next_batch(&misses, &mut at) {
                        black_box(ct.lookup(black_box(k), SEC));
                    }
                })
            });
        }
    }
    g.finish();
}

fn churn(c: &mut Criterion) {
    let mut g = c.benchmark_group("conntrack");
    g.throughput(Throughput::Elements(BATCH as u64));
    let n = 100_000usize;
    let mut ct = ConnTrack::<u32>::new(CtConfig::with_capacity(n));
    // UDP flows, one per microsecond of simulated time: with a 30 s timeout the table stays full
    // and the oldest entries keep expiring.
    let mut i = 0u32;
    let mut now = 0u64;
    let udp = |i: u32| FlowKey {
        proto: proto::UDP,
        ..key(i)
    };
    for _ in 0..n {
        let k = udp(i);
        ct.insert(k, k.reversed(), i, now).expect("insert");
        i = i.wrapping_add(1);
        now += 300 * 1000;
    }
    g.bench_function(BenchmarkId::new("churn", n), |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                let k = udp(i);
                let _ = black_box(ct.insert(k, k.reversed(), i, now));
                ct.expire(now, 2);
                i = i.wrapping_add(1);
                now += 300 * 1000;
            }
        })
    });
    g.finish();
}

criterion_group!(benches, lookup, churn);
criterion_main!(benches);
