//! VXLAN decapsulation of arbitrary uplink frames, then re-encapsulation of what it accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_dataplane::frame::Frame;
use sluice_dataplane::vxlan;
use sluice_dataplane::wire::ethernet::Mac;

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    let n = buf.len();
    let _ = vxlan::is_vxlan_to(&buf, [192, 168, 50, 1], vxlan::FLANNEL_PORT);
    let mut f = Frame::new(&mut buf, 0, n);
    if vxlan::decap(&mut f, vxlan::FLANNEL_VNI).is_ok() {
        let len = f.len();
        assert!(len + vxlan::OVERHEAD <= n);
        let t = vxlan::Tunnel {
            src_mac: Mac([2; 6]),
            dst_mac: Mac([4; 6]),
            src_ip: [1, 2, 3, 4],
            dst_ip: [5, 6, 7, 8],
            vni: 1,
            dst_port: vxlan::FLANNEL_PORT,
        };
        // The outer headers fit exactly where the old ones were (unless the old had IP options).
        let _ = vxlan::encap(&mut f, &t, 40000, 1);
    }
});
