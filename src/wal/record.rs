//! WAL record framing and the segment reader.
//!
//! ```text
//! segment file = frame*
//! frame        = len: u32 LE | crc: u32 LE (CRC32C of payload) | payload: len bytes
//! ```
//!
//! The reader never panics, whatever the bytes: a frame that runs past the end of the file, or
//! whose checksum fails and is the last frame, is a **torn tail** (a crash during the append):
//! the segment is valid up to the previous frame. A checksum failure followed by more data is
//! **corruption in the middle**, reported with its offset; nothing after it is trusted.

/// Bytes of a frame header.
pub(crate) const HEADER: usize = 8;
/// Largest payload accepted (a frame header claiming more is treated as damage).
pub(crate) const MAX_PAYLOAD: usize = 1 << 30;

/// Appends one frame around `payload`.
pub(crate) fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// How reading a segment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Every byte belonged to a valid frame.
    Clean,
    /// The last `len - valid_len` bytes are an incomplete or damaged final frame.
    TornTail { valid_len: usize },
    /// A damaged frame at `offset` is followed by more data.
    Corrupt { offset: usize },
}

/// Valid frames of a segment, as `(offset, payload)`, and how reading ended.
pub(crate) fn read_frames(bytes: &[u8]) -> (Vec<(usize, &[u8])>, Ending) {
    let mut frames = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < HEADER {
            return (frames, Ending::TornTail { valid_len: at });
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len > MAX_PAYLOAD || rest.len() - HEADER < len {
            // Runs past the end: a torn final append (or a damaged length, which cannot be
            // told apart from one; nothing valid can follow it either way).
            return (frames, Ending::TornTail { valid_len: at });
        }
        let payload = &rest[HEADER..HEADER + len];
        if crc32c::crc32c(payload) != crc {
            let end = at + HEADER + len;
            return if end == bytes.len() {
                (frames, Ending::TornTail { valid_len: at })
            } else {
                (frames, Ending::Corrupt { offset: at })
            };
        }
        frames.push((at, payload));
        at += HEADER + len;
    }
    (frames, Ending::Clean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn segment(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            frame(p, &mut out);
        }
        out
    }

    #[test]
    fn reader_reads_back_every_frame() {
        let seg = segment(&[b"one", b"", b"three"]);
        let (frames, end) = read_frames(&seg);
        assert_eq!(end, Ending::Clean);
        let payloads: Vec<&[u8]> = frames.iter().map(|(_, p)| *p).collect();
        assert_eq!(payloads, vec![&b"one"[..], b"", b"three"]);
        assert_eq!(frames[1].0, 11);
    }

    #[test]
    fn reader_truncates_torn_tail() {
        let seg = segment(&[b"one", b"two"]);
        for cut in 12..seg.len() {
            let (frames, end) = read_frames(&seg[..cut]);
            assert_eq!(frames.len(), 1, "cut at {cut}");
            assert_eq!(end, Ending::TornTail { valid_len: 11 });
        }
    }

    #[test]
    fn reader_reports_damage_in_the_last_frame_as_torn_tail() {
        let mut seg = segment(&[b"one", b"two"]);
        let last = seg.len() - 1;
        seg[last] ^= 0x40;
        assert_eq!(read_frames(&seg).1, Ending::TornTail { valid_len: 11 });
    }

    #[test]
    fn reader_reports_corruption_in_the_middle_with_its_offset() {
        let mut seg = segment(&[b"one", b"two", b"three"]);
        seg[11 + HEADER] ^= 0x01; // first byte of "two"
        let (frames, end) = read_frames(&seg);
        assert_eq!(frames.len(), 1);
        assert_eq!(end, Ending::Corrupt { offset: 11 });
    }

    proptest! {
        #[test]
        fn reader_never_panics_and_never_returns_a_damaged_frame(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
            cut in any::<prop::sample::Index>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 0..4),
        ) {
            let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
            let mut seg = segment(&refs);
            if !seg.is_empty() {
                let cut = cut.index(seg.len() + 1);
                seg.truncate(cut);
            }
            for (i, bit) in flips {
                if !seg.is_empty() {
                    let i = i.index(seg.len());
                    seg[i] ^= 1 << bit;
                }
            }
            let (frames, _end) = read_frames(&seg);
            // Every frame returned is one that was written, in order (a flip that yields a
            // valid-looking frame would need a CRC32C collision).
            for (k, (_, p)) in frames.iter().enumerate() {
                prop_assert_eq!(*p, payloads[k].as_slice());
            }
        }
    }
}
