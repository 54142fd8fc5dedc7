//! The `parse` stage (etherparse validation plus Sluice's checks) on arbitrary frames.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_dataplane::demo;
use sluice_dataplane::frame::Frame;
use sluice_dataplane::parse::{ParseOutcome, parse};
use sluice_dataplane::tables::Tables;

static TABLES: OnceLock<Tables> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let tables = TABLES.get_or_init(demo::demo_tables);
    let mut buf = data.to_vec();
    let n = buf.len();
    let f = Frame::new(&mut buf, 0, n);
    if let ParseOutcome::Ipv4(p) = parse(tables, &f) {
        // What parse promises: the L4 segment lies inside the frame.
        assert!(p.l4_off + p.l4_len <= n);
    }
});
