//! Every wire view over arbitrary bytes: once `new_checked` accepts, no accessor may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_dataplane::wire::{ethernet, icmp, ipv4, tcp, udp, vxlan};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = ethernet::Packet::new_checked(data) {
        let _ = (p.dst(), p.src(), p.ethertype(), p.payload().len());
    }
    let mut buf = data.to_vec();
    if let Ok(mut p) = ipv4::Packet::new_checked(&mut buf[..]) {
        let _ = (p.header_len(), p.total_len(), p.ident(), p.is_fragment(), p.frag_offset());
        let _ = (p.ttl(), p.protocol(), p.src(), p.dst(), p.tos(), p.verify_checksum());
        p.set_src([1, 2, 3, 4]);
        p.set_dst([5, 6, 7, 8]);
        p.decrement_ttl();
        p.fill_checksum();
        assert!(p.verify_checksum());
    }
    if let Ok(mut p) = tcp::Packet::new_checked(&mut buf[..]) {
        let _ = (p.src_port(), p.dst_port(), p.seq(), p.ack(), p.header_len(), p.flags());
        p.set_src_port(1);
        p.set_checksum(p.checksum());
    }
    if let Ok(mut p) = udp::Packet::new_checked(&mut buf[..]) {
        let _ = (p.src_port(), p.dst_port(), p.length(), p.payload().len());
        p.set_dst_port(2);
        p.set_checksum(0);
    }
    if let Ok(mut p) = icmp::Packet::new_checked(&mut buf[..]) {
        let _ = (p.msg_type(), p.code(), p.is_echo(), p.is_error(), p.echo_seq(), p.next_hop_mtu());
        p.set_echo_id(7);
        p.fill_checksum();
    }
    if let Ok(mut p) = vxlan::Packet::new_checked(&mut buf[..]) {
        let _ = (p.flags(), p.vni());
        p.set_vni(1);
    }
});
