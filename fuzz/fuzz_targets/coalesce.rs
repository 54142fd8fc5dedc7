//! GRO (`coalesce`) over an arbitrary batch. Byte 0: checksum trust (even: derive, odd: verify);
//! then frames, each as a 2-byte big-endian length, one byte for how many of its bytes go in the
//! first buffer (0: all; the rest in tail buffers of 64 bytes), and its bytes. The plan must hold
//! every frame exactly once, at most 18 buffers a frame, and only ranges inside the buffers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_dataplane::coalesce::{self, ChecksumTrust, MAX_BUFFERS, Merged};
use sluice_dataplane::frame::Frame;

fuzz_target!(|data: &[u8]| {
    let [trust, rest @ ..] = data else {
        return;
    };
    let mut rest: &[u8] = rest;
    let trust = if trust % 2 == 0 {
        ChecksumTrust::Derive
    } else {
        ChecksumTrust::Verify
    };
    let mut heads = Vec::new();
    let mut tails: Vec<Vec<&[u8]>> = Vec::new();
    while let [hi, lo, split, more @ ..] = rest
        && heads.len() < 64
    {
        let n = usize::from(u16::from_be_bytes([*hi, *lo])).min(more.len());
        let (bytes, next) = more.split_at(n);
        let split = match usize::from(*split) {
            0 => n,
            s => s.min(n),
        };
        heads.push(bytes[..split].to_vec());
        tails.push(bytes[split..].chunks(64).collect());
        rest = next;
    }
    let mut frames: Vec<Frame<'_>> = heads
        .iter_mut()
        .zip(&tails)
        .map(|(h, t)| {
            let n = h.len();
            Frame::new(h, 0, n).with_tail(t)
        })
        .collect();
    let mut plan = vec![Merged::default(); frames.len()];
    let n = coalesce::coalesce(&mut frames, trust, &mut plan);
    let mut seen = vec![false; frames.len()];
    for m in &plan[..n] {
        let first = &frames[m.first()];
        assert!(!std::mem::replace(&mut seen[m.first()], true));
        assert!(1 + first.tail().len() + m.pieces().len() <= MAX_BUFFERS);
        let mut prev = m.first();
        for p in m.pieces() {
            let (i, b) = (usize::from(p.frame), usize::from(p.buf));
            if i != prev {
                assert!(!std::mem::replace(&mut seen[i], true));
                prev = i;
            }
            let buf: &[u8] = if b == 0 {
                frames[i].head()
            } else {
                tails[i][b - 1]
            };
            assert!(buf.get(p.off as usize..(p.off + p.len) as usize).is_some());
        }
    }
    assert!(seen.iter().all(|&s| s));
});
