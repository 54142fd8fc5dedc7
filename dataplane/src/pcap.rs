//! A minimal reader and writer of classic pcap files (Ethernet link type), for golden test
//! frames, the fuzz seed corpus and the `sluice-replay` demo. Not on the hot path.

/// Why a pcap file could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PcapError {
    /// The file is shorter than the pcap global header.
    #[error("pcap file too short for its global header")]
    Truncated,
    /// The magic number is not a classic pcap one.
    #[error("not a classic pcap file (magic {0:#010x})")]
    BadMagic(u32),
    /// The link type is not Ethernet.
    #[error("pcap link type {0} is not Ethernet (1)")]
    LinkType(u32),
}

/// The frames of a classic pcap file, in order. A record cut short at the end of the file ends
/// the list.
pub fn read_frames(data: &[u8]) -> Result<Vec<Vec<u8>>, PcapError> {
    let hdr = data.get(..24).ok_or(PcapError::Truncated)?;
    let magic_le = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let le = match magic_le {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        m => return Err(PcapError::BadMagic(m)),
    };
    let rd = |b: &[u8]| {
        let a = [b[0], b[1], b[2], b[3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let link = rd(&hdr[20..24]);
    if link != 1 {
        return Err(PcapError::LinkType(link));
    }
    let mut out = Vec::new();
    let mut at = 24usize;
    while let Some(rec) = data.get(at..at + 16) {
        let incl = rd(&rec[8..12]) as usize;
        let Some(frame) = data.get(at + 16..at + 16 + incl) else {
            break;
        };
        out.push(frame.to_vec());
        at += 16 + incl;
    }
    Ok(out)
}

/// A classic little-endian pcap file (microsecond timestamps, all zero) holding `frames`.
pub fn write_frames<'a>(frames: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for v in [0xa1b2_c3d4u32, 0x0004_0002, 0, 0, 65535, 1] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for f in frames {
        let n = u32::try_from(f.len()).unwrap_or(u32::MAX);
        for v in [0u32, 0, n, n] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_errors() {
        let a = [1u8, 2, 3];
        let b = [4u8; 60];
        let file = write_frames([&a[..], &b[..]]);
        assert_eq!(read_frames(&file).unwrap(), vec![a.to_vec(), b.to_vec()]);
        assert_eq!(read_frames(&file[..10]), Err(PcapError::Truncated));
        let mut bad = file.clone();
        bad[0] = 0;
        assert!(matches!(read_frames(&bad), Err(PcapError::BadMagic(_))));
        // a cut record ends the list
        assert_eq!(read_frames(&file[..file.len() - 1]).unwrap().len(), 1);
    }
}
