//! Steering (`steer::owner`) on arbitrary frames from a pod port and from the uplink (VXLAN and
//! not), for 1 to 8 workers: never panics, always a worker in range or none.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_dataplane::demo;
use sluice_dataplane::steer::owner;
use sluice_dataplane::tables::Tables;
use sluice_dataplane::verdict::PortId;

static TABLES: OnceLock<Tables> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let tables = TABLES.get_or_init(demo::demo_tables);
    let Some((&sel, frame)) = data.split_first() else {
        return;
    };
    let workers = usize::from(sel & 7) + 1;
    let port = if sel & 8 != 0 {
        demo::UPLINK
    } else {
        PortId(1)
    };
    if let Some(w) = owner(tables, frame, port, workers) {
        assert!(w < workers);
    }
});
