//! WAL record framing and the segment reader (format 2).
//!
//! ```text
//! segment file = frame*
//! frame        = len: u32 LE | crc: u32 LE (CRC32C of payload)
//!                | hcrc: u32 LE (CRC32C of the 8 bytes of len and crc) | payload: len bytes
//! ```
//!
//! The header has a checksum of its own, so a length is verified before it is trusted: a
//! damaged length cannot pass for a frame that runs past the end of the file.
//!
//! A crash (even SIGKILL mid-write) leaves a file that is a prefix of what was written, and
//! only the segment being written can be cut. So a **torn tail** is accepted only at the end
//! of the *last* segment, and only in the shapes a crash leaves: an incomplete header, a
//! verified header whose payload runs past the end, a last frame whose payload checksum fails
//! (a write the disk did not finish), or zeros to the end (space allocated, never written).
//! Anything else, and any of these in an older segment, is **corruption**, reported with its
//! offset; nothing after it is trusted. The reader never panics, whatever the bytes.

/// Bytes of a frame header.
pub(crate) const HEADER: usize = 12;
/// Largest payload accepted (a verified header claiming more is damage).
pub(crate) const MAX_PAYLOAD: usize = 1 << 30;

/// Appends one frame around `payload`.
pub(crate) fn frame(payload: &[u8], out: &mut Vec<u8>) {
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[4..].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&crc32c::crc32c(&head).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The payload length and checksum of a frame header, if the header's own checksum holds and
/// the length is plausible.
pub(crate) fn parse_header(head: &[u8]) -> Option<(usize, u32)> {
    let head: &[u8; HEADER] = head.get(..HEADER)?.try_into().ok()?;
    let hcrc = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if crc32c::crc32c(&head[..8]) != hcrc {
        return None;
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    (len <= MAX_PAYLOAD).then_some((len, crc))
}

/// How reading a segment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Every byte belonged to a valid frame.
    Clean,
    /// The last `len - valid_len` bytes are an incomplete final frame (last segment only).
    TornTail { valid_len: usize },
    /// A damaged frame at `offset`: nothing from there on is trusted.
    Corrupt { offset: usize },
}

/// Valid frames of a segment, as `(offset, payload)`, and how reading ended. `last`: this is
/// the segment that was being written (the only one whose tail a crash can tear).
pub(crate) fn read_frames(bytes: &[u8], last: bool) -> (Vec<(usize, &[u8])>, Ending) {
    let mut frames = Vec::new();
    let mut at = 0usize;
    let torn = |at: usize| {
        if last {
            Ending::TornTail { valid_len: at }
        } else {
            Ending::Corrupt { offset: at }
        }
    };
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < HEADER {
            return (frames, torn(at));
        }
        let head = &rest[..8];
        let hcrc = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
        if crc32c::crc32c(head) != hcrc {
            let ending = if rest.iter().all(|b| *b == 0) {
                torn(at)
            } else {
                Ending::Corrupt { offset: at }
            };
            return (frames, ending);
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len > MAX_PAYLOAD {
            return (frames, Ending::Corrupt { offset: at });
        }
        if rest.len() - HEADER < len {
            return (frames, torn(at));
        }
        let payload = &rest[HEADER..HEADER + len];
        if crc32c::crc32c(payload) != crc {
            let end = at + HEADER + len;
            let ending = if end == bytes.len() {
                torn(at)
            } else {
                Ending::Corrupt { offset: at }
            };
            return (frames, ending);
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
        let (frames, end) = read_frames(&seg, true);
        assert_eq!(end, Ending::Clean);
        let payloads: Vec<&[u8]> = frames.iter().map(|(_, p)| *p).collect();
        assert_eq!(payloads, vec![&b"one"[..], b"", b"three"]);
        assert_eq!(frames[1].0, HEADER + 3);
    }

    #[test]
    fn reader_truncates_torn_tail() {
        let seg = segment(&[b"one", b"two"]);
        let one = HEADER + 3;
        for cut in one + 1..seg.len() {
            let (frames, end) = read_frames(&seg[..cut], true);
            assert_eq!(frames.len(), 1, "cut at {cut}");
            assert_eq!(end, Ending::TornTail { valid_len: one });
            // The same cut in an older segment is corruption: only the last one is written.
            let (_, end) = read_frames(&seg[..cut], false);
            assert_eq!(end, Ending::Corrupt { offset: one });
        }
    }

    #[test]
    fn reader_reports_damage_in_the_last_frame_as_torn_tail() {
        let mut seg = segment(&[b"one", b"two"]);
        let last = seg.len() - 1;
        seg[last] ^= 0x40;
        assert_eq!(
            read_frames(&seg, true).1,
            Ending::TornTail {
                valid_len: HEADER + 3
            }
        );
    }

    #[test]
    fn reader_reports_corruption_in_the_middle_with_its_offset() {
        let mut seg = segment(&[b"one", b"two", b"three"]);
        let two = HEADER + 3;
        seg[two + HEADER] ^= 0x01; // first byte of "two"
        let (frames, end) = read_frames(&seg, true);
        assert_eq!(frames.len(), 1);
        assert_eq!(end, Ending::Corrupt { offset: two });
    }

    #[test]
    fn reader_verifies_a_length_before_trusting_it() {
        // A length that grew (so that the frame seems to run past the end of the file) or
        // got its top bit set is corruption, even in the last segment.
        for grow in [
            |l: u32| l + (16 << 20),
            |l: u32| l | (1 << 31),
            |l: u32| l - 1,
        ] {
            let mut seg = segment(&[b"one", b"two", b"three"]);
            let len = u32::from_le_bytes(seg[0..4].try_into().unwrap());
            seg[0..4].copy_from_slice(&grow(len).to_le_bytes());
            let (frames, end) = read_frames(&seg, true);
            assert!(frames.is_empty());
            assert_eq!(end, Ending::Corrupt { offset: 0 });
        }
    }

    #[test]
    fn reader_takes_zeros_at_the_end_of_the_last_segment_for_a_torn_tail() {
        let mut seg = segment(&[b"one"]);
        seg.extend_from_slice(&[0u8; 40]);
        assert_eq!(
            read_frames(&seg, true).1,
            Ending::TornTail {
                valid_len: HEADER + 3
            }
        );
        assert_eq!(
            read_frames(&seg, false).1,
            Ending::Corrupt { offset: HEADER + 3 }
        );
    }

    proptest! {
        #[test]
        fn reader_never_panics_and_never_returns_a_damaged_frame(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
            cut in any::<prop::sample::Index>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 0..4),
            last in any::<bool>(),
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
            let (frames, _end) = read_frames(&seg, last);
            // Every frame returned is one that was written, in order (a flip that yields a
            // valid-looking frame would need a CRC32C collision).
            for (k, (_, p)) in frames.iter().enumerate() {
                prop_assert_eq!(*p, payloads[k].as_slice());
            }
        }
    }
}
