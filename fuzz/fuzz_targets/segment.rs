//! Software TSO, fragmentation and the ICMP answer (`segment`) over arbitrary frames. Bytes 0-1:
//! the route's MTU (big-endian); byte 2: how many frame bytes go in the first buffer (0: all);
//! byte 3: the size of the further input buffers; byte 4: the size of the output tail buffers;
//! the rest: the frame. Every piece is written; none may exceed the MTU.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_dataplane::frame::Frame;
use sluice_dataplane::segment::{self, Oversize, SegmentError};

const START: usize = 64;

fuzz_target!(|data: &[u8]| {
    let [mtu_hi, mtu_lo, split, chunk, out_chunk, frame @ ..] = data else {
        return;
    };
    let mtu = usize::from(u16::from_be_bytes([*mtu_hi, *mtu_lo]));
    let split = match usize::from(*split) * 8 {
        0 => frame.len(),
        s => s.min(frame.len()),
    };
    let mut head = frame[..split].to_vec();
    let tail: Vec<&[u8]> = frame[split..]
        .chunks(usize::from(*chunk).max(1) * 16)
        .collect();
    let f = Frame::new(&mut head, 0, split).with_tail(&tail);
    match segment::plan(&f, mtu) {
        Ok(Oversize::Split(mut seg)) => {
            let out_chunk = usize::from(*out_chunk).max(1) * 8;
            while let Some(need) = seg.next_len() {
                let first = need.min(START + 54 + out_chunk);
                let mut out = vec![0u8; START + first];
                let mut spill = vec![vec![0u8; out_chunk]; need.div_ceil(out_chunk)];
                let mut tails: Vec<&mut [u8]> = spill.iter_mut().map(Vec::as_mut_slice).collect();
                match seg.write_next(&mut out, START, &mut tails) {
                    Ok(w) => {
                        assert_eq!(w.len, need);
                        assert!(w.len - 14 <= mtu.max(68), "piece larger than the MTU");
                    }
                    // A first buffer too short for the headers: give it all in one.
                    Err(SegmentError::OutputTooSmall) => {
                        let mut big = vec![0u8; START + need];
                        let w = seg.write_next(&mut big, START, &mut []).expect("fits");
                        assert_eq!((w.len, w.head_len), (need, need));
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
        }
        Ok(Oversize::FragNeeded { mtu }) => {
            let mut out = [0u8; 14 + segment::ICMP_ERROR_MAX];
            if let Ok(n) = segment::frag_needed(&f, mtu, [10, 244, 1, 0], 1, &mut out) {
                assert!(n <= out.len());
            }
        }
        Ok(Oversize::Fits) | Err(_) => {}
    }
});
