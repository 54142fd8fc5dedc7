//! Criterion benchmarks of the whole pipeline (`process`), in packets (elements) per second.
//! Each iteration copies a batch of 64 prebuilt frames into frame buffers (with headroom) and runs
//! the pipeline on them; the copy (64-100 bytes a frame) is included in the figures.
//!
//! Cases (demo snapshot of `sluice_dataplane::demo`, 200 local pods):
//! - `established/clusterip_remote`: one pod -> ClusterIP 10.96.0.10:80 whose backend is on the
//!   remote node: conntrack hit, DNAT, MAC/TTL rewrite, VXLAN encap; 1,024 flows, `process_batch`.
//! - `established/mix`: a realistic mix over 4,096 established flows: 50% TCP to the ClusterIP
//!   (local or remote backend), 25% UDP pod -> remote pod (encap), 15% TCP pod -> local pod, 10%
//!   replies arriving over VXLAN (decap, reverse NAT); grouped by ingress port as sockets deliver
//!   them, each group through `process_batch` as the worker runs it.
//! - `new_flow/clusterip_syn`: conntrack miss: a SYN of a never-seen flow to the ClusterIP
//!   (service lookup, Maglev, policy, conntrack insert with eviction in a full 65,536 table, DNAT,
//!   route, encap for the remote backend).

use arrayvec::ArrayVec;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::net::Ipv4Addr;

use sluice_dataplane::demo::{self, FrameSpec};
use sluice_dataplane::events::{EventKind, EventSink, FlowEvent};
use sluice_dataplane::frame::Frame;
use sluice_dataplane::pipeline::{WorkerConfig, WorkerState, process, process_batch};
use sluice_dataplane::tables::{LocalPod, Tables};
use sluice_dataplane::verdict::{PortId, Verdict};
use sluice_dataplane::{conntrack::CtConfig, vxlan};

const BATCH: usize = 64;
const HEADROOM: usize = 128;
const VIP: [u8; 4] = [10, 96, 0, 10];

fn tables() -> Tables {
    let mut b = demo::demo_builder();
    for n in 10..210u8 {
        b = b.pod(
            Ipv4Addr::new(10, 244, 1, n),
            LocalPod {
                port: PortId(u32::from(n)),
                pod_mac: demo::pod_mac(n),
                host_mac: demo::host_mac(n),
            },
        );
    }
    b.build().expect("bench tables")
}

fn state(cap: usize) -> WorkerState {
    WorkerState::new(WorkerConfig {
        conntrack: CtConfig::with_capacity(cap),
        affinity_capacity: 1 << 14,
    })
}

/// A frame as it arrives: bytes and ingress port.
struct Pkt {
    bytes: Vec<u8>,
    port: PortId,
}

fn from_pod(n: u8, dst: [u8; 4], sp: u16, dp: u16, tcp: bool) -> Pkt {
    let spec = FrameSpec::from_pod(n, dst, sp, dp);
    let bytes = if tcp {
        demo::tcp_frame(&spec, 0x10, &[0u8; 10])
    } else {
        demo::udp_frame(&spec, &[0u8; 18])
    };
    Pkt {
        bytes,
        port: PortId(u32::from(n)),
    }
}

fn from_remote(inner: Vec<u8>) -> Pkt {
    let mut buf = vec![0u8; HEADROOM + inner.len()];
    buf[HEADROOM..].copy_from_slice(&inner);
    let mut f = Frame::new(&mut buf, HEADROOM, inner.len());
    let tun = vxlan::Tunnel {
        src_mac: demo::PEER_MAC,
        dst_mac: demo::NODE_MAC,
        src_ip: [192, 168, 50, 2],
        dst_ip: [192, 168, 50, 1],
        vni: 1,
        dst_port: 8472,
    };
    vxlan::encap(&mut f, &tun, 40000, 1).expect("encap");
    Pkt {
        bytes: f.head().to_vec(),
        port: demo::UPLINK,
    }
}

/// Run packets as a worker does: consecutive packets of one ingress port (one socket's receive
/// batch) through one `process_batch` call. Returns how many were forwarded.
fn run_batch(
    t: &Tables,
    s: &mut WorkerState,
    now: u64,
    pkts: &[Pkt],
    bufs: &mut [Vec<u8>],
) -> usize {
    let mut fwd = 0;
    let mut verdicts = [Verdict::PassToKernel; BATCH];
    let mut start = 0;
    let mut bufs = bufs.iter_mut();
    while start < pkts.len() {
        let port = pkts[start].port;
        let end = pkts[start..]
            .iter()
            .position(|p| p.port != port)
            .map_or(pkts.len(), |n| start + n)
            .min(start + BATCH);
        let mut frames = ArrayVec::<Frame<'_>, BATCH>::new();
        for (p, b) in pkts[start..end].iter().zip(bufs.by_ref()) {
            b[HEADROOM..HEADROOM + p.bytes.len()].copy_from_slice(&p.bytes);
            frames.push(Frame::new(b, HEADROOM, p.bytes.len()));
        }
        let n = frames.len();
        process_batch(t, s, now, port, &mut frames, &mut verdicts[..n]);
        fwd += verdicts[..n]
            .iter()
            .filter(|v| matches!(v, Verdict::Forward(_)))
            .count();
        start = end;
    }
    fwd
}

fn established(c: &mut Criterion) {
    let t = tables();
    let mut g = c.benchmark_group("established");
    g.throughput(Throughput::Elements(BATCH as u64));

    // ClusterIP flows whose backend is remote: choose source ports Maglev sends to 10.244.2.3.
    let mut s = state(1 << 16);
    let mut flows = Vec::new();
    let mut sp = 10000u16;
    while flows.len() < 1024 {
        let p = from_pod(10, VIP, sp, 80, true);
        let mut buf = vec![0u8; HEADROOM + 200];
        buf[HEADROOM..HEADROOM + p.bytes.len()].copy_from_slice(&p.bytes);
        let mut f = Frame::new(&mut buf, HEADROOM, p.bytes.len());
        if process(&t, &mut s, 1, p.port, &mut f) == Verdict::Forward(demo::UPLINK) {
            flows.push(p);
        }
        sp += 1;
    }
    let mut bufs = vec![vec![0u8; HEADROOM + 200]; BATCH];
    let mut verdicts = [Verdict::PassToKernel; BATCH];
    let mut i = 0usize;
    g.bench_function("clusterip_remote", |b| {
        b.iter(|| {
            let start = i % (flows.len() - BATCH);
            i += BATCH;
            let mut frames: ArrayVec<Frame<'_>, BATCH> = flows[start..start + BATCH]
                .iter()
                .zip(bufs.iter_mut())
                .map(|(p, buf)| {
                    buf[HEADROOM..HEADROOM + p.bytes.len()].copy_from_slice(&p.bytes);
                    Frame::new(buf, HEADROOM, p.bytes.len())
                })
                .collect();
            process_batch(&t, &mut s, 2, PortId(10), &mut frames, &mut verdicts);
            black_box(&verdicts);
        })
    });

    // The mix.
    let mut s = state(1 << 16);
    let mut mix = Vec::new();
    let mut k = 0u32;
    while mix.len() < 4096 {
        k += 1;
        let n = 10 + (k % 200) as u8;
        let sp = 20000 + (k % 40000) as u16;
        let p = match k % 20 {
            0..10 => from_pod(n, VIP, sp, 80, true),
            10..15 => from_pod(n, [10, 244, 2, 3 + (k % 50) as u8], sp, 53, false),
            15..18 => from_pod(n, [10, 244, 1, 10 + ((k / 7) % 200) as u8], sp, 8080, true),
            _ => {
                // A reply from a remote pod to a flow we opened: open it first.
                let out = from_pod(n, [10, 244, 2, 9], sp, 9000, false);
                let mut buf = vec![0u8; HEADROOM + 200];
                buf[HEADROOM..HEADROOM + out.bytes.len()].copy_from_slice(&out.bytes);
                let mut f = Frame::new(&mut buf, HEADROOM, out.bytes.len());
                process(&t, &mut s, 1, out.port, &mut f);
                let spec = FrameSpec {
                    src_mac: demo::PEER_VTEP_MAC,
                    dst_mac: demo::VTEP_MAC,
                    src: [10, 244, 2, 9],
                    dst: [10, 244, 1, n],
                    src_port: 9000,
                    dst_port: sp,
                };
                from_remote(demo::udp_frame(&spec, &[0u8; 18]))
            }
        };
        // Warm: the flow is established before measuring.
        let mut buf = vec![0u8; HEADROOM + 200];
        buf[HEADROOM..HEADROOM + p.bytes.len()].copy_from_slice(&p.bytes);
        let mut f = Frame::new(&mut buf, HEADROOM, p.bytes.len());
        if let Verdict::Forward(_) = process(&t, &mut s, 1, p.port, &mut f) {
            mix.push(p);
        }
    }
    // As sockets deliver them: each port's frames together, in batches of up to 64.
    mix.sort_by_key(|p| p.port);
    for events in [false, true] {
        // With events: the worker's ring, drained after every batch as the agent would.
        let mut consumer = None;
        if events {
            let (p, c) = ring(4096);
            s.events = Some(Box::new(p));
            consumer = Some(c);
        }
        let mut i = 0usize;
        let name = if events { "mix_events" } else { "mix" };
        g.bench_function(name, |b| {
            b.iter(|| {
                let start = i % (mix.len() - BATCH);
                i += BATCH;
                black_box(run_batch(
                    &t,
                    &mut s,
                    2,
                    &mix[start..start + BATCH],
                    &mut bufs,
                ));
                if let Some(c) = consumer.as_mut() {
                    while let Ok(e) = c.pop() {
                        black_box(e);
                    }
                }
            })
        });
    }
    g.finish();
}

fn new_flow(c: &mut Criterion) {
    let t = tables();
    let mut g = c.benchmark_group("new_flow");
    g.throughput(Throughput::Elements(BATCH as u64));
    for events in [false, true] {
        let mut s = state(1 << 16);
        // With events: the worker's ring, drained after every batch as the agent would.
        let mut consumer = None;
        if events {
            let (p, c) = ring(4096);
            s.events = Some(Box::new(p));
            consumer = Some(c);
        }
        let template = demo::tcp_frame(&FrameSpec::from_pod(10, VIP, 1, 80), 0x02, b"");
        let mut bufs = vec![vec![0u8; HEADROOM + 200]; BATCH];
        let mut verdicts = [Verdict::PassToKernel; BATCH];
        let mut k = 0u64;
        let name = if events {
            "clusterip_syn_events"
        } else {
            "clusterip_syn"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut frames: Vec<Frame<'_>> = Vec::with_capacity(BATCH);
                for buf in bufs.iter_mut() {
                    k += 1;
                    let pod = 10 + (k % 200) as u8;
                    let sp = 1024 + ((k / 200) % 60000) as u16;
                    let bytes = &mut buf[HEADROOM..HEADROOM + template.len()];
                    bytes.copy_from_slice(&template);
                    // Make the tuple unique: rewrite source address and port in place (incremental
                    // checksums). This set-up (a parse and a rewrite) is included in the figure.
                    let mut f = Frame::new(buf, HEADROOM, template.len());
                    let mut p = match sluice_dataplane::parse::parse(&t, &f) {
                        sluice_dataplane::parse::ParseOutcome::Ipv4(p) => p,
                        _ => unreachable!(),
                    };
                    let mut to = p.key();
                    to.src = [10, 244, 1, pod];
                    to.src_port = sp;
                    sluice_dataplane::nat::rewrite(&mut f, &mut p, &to);
                    frames.push(f);
                }
                // Each frame comes from its own pod's port: process_batch of one per frame.
                for (f, v) in frames.iter_mut().zip(verdicts.iter_mut()) {
                    let src = f.head()[14 + 15];
                    process_batch(
                        &t,
                        &mut s,
                        k,
                        PortId(u32::from(src)),
                        std::slice::from_mut(f),
                        std::slice::from_mut(v),
                    );
                }
                black_box(&verdicts);
                if let Some(c) = consumer.as_mut() {
                    while let Ok(e) = c.pop() {
                        black_box(e);
                    }
                }
            })
        });
    }
    g.finish();
}

/// The worker's event ring as the agent builds it (`sluice_agent::events::RingSink`): a bounded
/// lock-free SPSC ring (`rtrb`) whose writer counts an event lost when it is full.
#[derive(Debug)]
struct RingSink(rtrb::Producer<FlowEvent>, u64);

impl EventSink for RingSink {
    fn emit(&mut self, ev: FlowEvent) {
        if self.0.push(ev).is_err() {
            self.1 += 1;
        }
    }
}

fn ring(capacity: usize) -> (RingSink, rtrb::Consumer<FlowEvent>) {
    let (p, c) = rtrb::RingBuffer::new(capacity);
    (RingSink(p, 0), c)
}

/// The cost of one flow event alone: a batch of emits into a worker's ring and the drain.
fn event_ring(c: &mut Criterion) {
    let mut g = c.benchmark_group("events");
    g.throughput(Throughput::Elements(BATCH as u64));
    let (mut p, mut cons) = ring(4096);
    let ev = FlowEvent {
        tuple: Some(sluice_dataplane::flow::FlowKey {
            src: [10, 244, 1, 2],
            dst: [10, 96, 0, 10],
            src_port: 1234,
            dst_port: 80,
            proto: 6,
        }),
        ..FlowEvent::new(EventKind::NewConnection, 1, PortId(1))
    };
    g.bench_function("push_64_then_drain", |b| {
        b.iter(|| {
            for i in 0..BATCH as u64 {
                p.emit(FlowEvent {
                    ts_ns: i,
                    ..black_box(ev)
                });
            }
            while let Ok(e) = cons.pop() {
                black_box(e);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, established, new_flow, event_ring);
criterion_main!(benches);
