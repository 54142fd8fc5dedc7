//! The whole pipeline against the fixed demo snapshot. The first input byte picks the ingress
//! port (uplink or a pod's veth), the second how many of the remaining bytes go in the first
//! buffer (the rest forms a tail buffer, as AF_XDP multi-buffer delivers); the input is run twice
//! so the second pass meets the conntrack entries of the first.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_dataplane::conntrack::CtConfig;
use sluice_dataplane::demo;
use sluice_dataplane::frame::Frame;
use sluice_dataplane::pipeline::{WorkerConfig, WorkerState, process};
use sluice_dataplane::tables::Tables;
use sluice_dataplane::verdict::PortId;

static TABLES: OnceLock<Tables> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let [port, split, frame @ ..] = data else { return };
    let tables = TABLES.get_or_init(demo::demo_tables);
    let mut state = WorkerState::new(WorkerConfig {
        conntrack: CtConfig::with_capacity(64),
        affinity_capacity: 16,
    });
    let split = if *split == 0 { frame.len() } else { usize::from(*split).min(frame.len()) };
    for round in 0..2u64 {
        let mut buf = vec![0u8; 128 + split];
        buf[128..].copy_from_slice(&frame[..split]);
        let tail_bytes = &frame[split..];
        let tail: [&[u8]; 1] = [tail_bytes];
        let mut f = Frame::new(&mut buf, 128, split).with_tail(&tail);
        process(tables, &mut state, round * 1_000_000, PortId(u32::from(port % 3)), &mut f);
    }
    assert_eq!(state.counters.rx, 2);
});
