//! `sluice-replay`: feed the frames of pcap files through the pipeline, one worker, against the
//! built-in demo snapshot (`sluice_dataplane::demo`: node 1 of two, pods 10.244.1.2/.3, services
//! `web` 10.96.0.10:80 and NodePort 30080, `dns` 10.96.0.53:53, `empty` 10.96.0.99:80), and print
//! one line per frame and the counters.
//!
//! The ingress port of a frame is inferred from its MACs: a frame from a demo pod's MAC arrived on
//! that pod's host veth; anything else arrived on the uplink.
//!
//! Usage: `sluice-replay FILE.pcap...`

use std::process::ExitCode;

use sluice_dataplane::demo;
use sluice_dataplane::frame::Frame;
use sluice_dataplane::parse::{self, IcmpKind, ParseOutcome};
use sluice_dataplane::pipeline::{WorkerConfig, WorkerState, process};
use sluice_dataplane::tables::Tables;
use sluice_dataplane::verdict::{DropReason, PortId, Verdict};
use sluice_dataplane::vxlan;

const HEADROOM: usize = 256;

fn main() -> ExitCode {
    let files: Vec<String> = std::env::args().skip(1).collect();
    if files.is_empty() || files.iter().any(|f| f == "-h" || f == "--help") {
        eprintln!("usage: sluice-replay FILE.pcap...");
        return ExitCode::from(2);
    }
    let tables = demo::demo_tables();
    let mut state = WorkerState::new(WorkerConfig::default());
    let mut n = 0u64;
    for file in &files {
        let data = match std::fs::read(file) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("sluice-replay: cannot read {file}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let frames = match sluice_dataplane::pcap::read_frames(&data) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("sluice-replay: {file}: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("== {file}: {} frames", frames.len());
        for bytes in frames {
            n += 1;
            let port = ingress_of(&tables, &bytes);
            let before = describe(&tables, &bytes);
            let mut buf = vec![0u8; HEADROOM + bytes.len()];
            buf[HEADROOM..].copy_from_slice(&bytes);
            let mut f = Frame::new(&mut buf, HEADROOM, bytes.len());
            // 1 ms between frames.
            let v = process(&tables, &mut state, n * 1_000_000, port, &mut f);
            let verdict = match v {
                Verdict::Forward(p) => {
                    format!("FORWARD port {} as {}", p.0, describe(&tables, f.head()))
                }
                Verdict::Drop(r) => format!("DROP {}", r.as_str()),
                Verdict::PassToKernel => "PASS to kernel".to_string(),
                Verdict::Steer(w) => format!("STEER to worker {w}"),
                Verdict::Segment(p) => format!("SEGMENT for port {}", p.0),
                Verdict::FragNeeded(mtu) => format!("FRAG-NEEDED back to sender (mtu {mtu})"),
            };
            println!("{n:4} in port {:<2} {before:<58} -> {verdict}", port.0);
        }
    }
    let c = &state.counters;
    println!(
        "== counters: rx {} tx {} passed {} dropped {}",
        c.rx,
        c.tx,
        c.passed,
        c.drops.iter().sum::<u64>()
    );
    for r in DropReason::ALL {
        if c.dropped(*r) > 0 {
            println!("   drop {:<24} {}", r.as_str(), c.dropped(*r));
        }
    }
    println!("== conntrack entries: {}", state.conntrack.len());
    ExitCode::SUCCESS
}

fn ingress_of(tables: &Tables, bytes: &[u8]) -> PortId {
    let src_mac = bytes.get(6..12);
    for n in 1..=254u8 {
        if src_mac == Some(&demo::pod_mac(n).0[..])
            && let Some(pod) = tables.local_pod([10, 244, 1, n])
        {
            return pod.port;
        }
    }
    tables.node.uplink
}

/// A one-line description of a frame ("VXLAN[...]" around the inner one).
fn describe(tables: &Tables, bytes: &[u8]) -> String {
    let mut b = bytes.to_vec();
    let len = b.len();
    let mut f = Frame::new(&mut b, 0, len);
    let mut prefix = "";
    let outer_dst = bytes
        .get(30..34)
        .map_or([0; 4], |d| [d[0], d[1], d[2], d[3]]);
    if vxlan::is_vxlan_to(f.head(), outer_dst, tables.node.vxlan_port)
        && vxlan::decap(&mut f, tables.node.vni).is_ok()
    {
        prefix = "vxlan ";
    }
    match parse::parse(tables, &f) {
        ParseOutcome::Ipv4(p) => {
            let t = p.key();
            let ip = |a: [u8; 4]| std::net::Ipv4Addr::from(a).to_string();
            let what = match (p.proto, p.icmp) {
                (6, _) => format!("TCP {}", tcp_flags(p.tcp_flags)),
                (17, _) => "UDP".to_string(),
                (1, IcmpKind::Echo) => "ICMP echo".to_string(),
                (1, IcmpKind::Error { .. }) => "ICMP error".to_string(),
                (1, _) => "ICMP".to_string(),
                (n, _) => format!("proto {n}"),
            };
            if matches!(p.proto, 6 | 17) {
                format!(
                    "{prefix}{what} {}:{} > {}:{}",
                    ip(t.src),
                    t.src_port,
                    ip(t.dst),
                    t.dst_port
                )
            } else {
                format!("{prefix}{what} {} > {}", ip(t.src), ip(t.dst))
            }
        }
        ParseOutcome::Done(_) => match bytes.get(12..14) {
            Some([8, 6]) => "ARP".to_string(),
            Some([0x86, 0xdd]) => "IPv6".to_string(),
            _ => format!("{prefix}malformed/other ({} bytes)", bytes.len()),
        },
    }
}

fn tcp_flags(f: u8) -> String {
    let mut s = String::new();
    for (bit, c) in [
        (0x02, 'S'),
        (0x10, '.'),
        (0x01, 'F'),
        (0x04, 'R'),
        (0x08, 'P'),
    ] {
        if f & bit != 0 {
            s.push(c);
        }
    }
    format!("[{s}]")
}
