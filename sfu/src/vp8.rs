//! The VP8 payload descriptor (RFC 7741 §4.2), read and rewritten without decoding.
//!
//! A subscription that moves between simulcast layers receives pictures from unrelated
//! encoders. Their picture ids and TL0PICIDX must continue where the previous layer's left off,
//! or the subscriber's decoder takes the new pictures for old ones (or for a gap) and freezes.

use bytes::{Bytes, BytesMut};

/// The fields of a VP8 payload descriptor that a forwarder reads or rewrites.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vp8Descriptor {
    /// PictureID and whether it is the 15-bit form (M bit set).
    pub picture_id: Option<(u16, bool)>,
    /// Offset of the PictureID bytes in the payload.
    picture_id_at: usize,
    /// TL0PICIDX and its offset in the payload.
    pub tl0_pic_idx: Option<u8>,
    tl0_at: usize,
    /// Temporal layer index (TID), when the T bit is set.
    pub temporal: Option<u8>,
    /// True for the first packet of a picture (S bit and partition 0).
    pub picture_start: bool,
    /// Offset of the VP8 payload header (the frame tag) in the payload.
    header_at: usize,
}

impl Vp8Descriptor {
    /// Reads the descriptor at the start of `payload`; `None` when it is truncated.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let first = *payload.first()?;
        let mut out = Self {
            picture_start: first & 0x10 != 0 && first & 0x0f == 0,
            header_at: 1,
            ..Self::default()
        };
        if first & 0x80 == 0 {
            return Some(out);
        }
        let ext = *payload.get(1)?;
        let mut at = 2;
        if ext & 0x80 != 0 {
            let high = *payload.get(at)?;
            out.picture_id_at = at;
            if high & 0x80 != 0 {
                let low = *payload.get(at + 1)?;
                out.picture_id = Some((u16::from_be_bytes([high & 0x7f, low]), true));
                at += 2;
            } else {
                out.picture_id = Some((u16::from(high), false));
                at += 1;
            }
        }
        if ext & 0x40 != 0 {
            out.tl0_pic_idx = Some(*payload.get(at)?);
            out.tl0_at = at;
            at += 1;
        }
        if ext & 0x30 != 0 {
            let tid_byte = *payload.get(at)?;
            if ext & 0x20 != 0 {
                out.temporal = Some(tid_byte >> 6);
            }
            at += 1;
        }
        out.header_at = at;
        Some(out)
    }

    /// True when this packet starts a keyframe (the frame tag's P bit is 0).
    pub fn is_keyframe_start(&self, payload: &[u8]) -> bool {
        self.picture_start
            && payload
                .get(self.header_at)
                .is_some_and(|tag| tag & 0x01 == 0)
    }

    /// The picture size a keyframe's header declares (RFC 6386 §9.1), `(width, height)`.
    pub fn keyframe_size(&self, payload: &[u8]) -> Option<(u16, u16)> {
        if !self.is_keyframe_start(payload) {
            return None;
        }
        let header = payload.get(self.header_at..self.header_at + 10)?;
        if header[3..6] != [0x9d, 0x01, 0x2a] {
            return None;
        }
        let width = u16::from_le_bytes([header[6], header[7]]) & 0x3fff;
        let height = u16::from_le_bytes([header[8], header[9]]) & 0x3fff;
        Some((width, height))
    }
}

/// Keeps the picture ids and TL0PICIDX one subscription receives continuous across layer
/// switches and dropped pictures.
#[derive(Clone, Debug, Default)]
pub struct Vp8Munger {
    /// Added to the publisher's picture id (mod 2^15).
    picture_id_offset: u16,
    /// Added to the publisher's TL0PICIDX (mod 2^8).
    tl0_offset: u8,
    /// The last picture id and TL0PICIDX sent, as sent.
    last_picture_id: Option<u16>,
    last_tl0: Option<u8>,
    /// The publisher's picture id of the last dropped picture, so its other packets do not
    /// count again.
    last_dropped: Option<u16>,
}

const PICTURE_ID_MASK: u16 = 0x7fff;

impl Vp8Munger {
    /// Starts a new source (a layer switch at its keyframe `first`): its numbers continue right
    /// after the last ones sent.
    pub fn switch_to(&mut self, first: &Vp8Descriptor) {
        if let (Some((picture_id, _)), Some(last)) = (first.picture_id, self.last_picture_id) {
            self.picture_id_offset =
                last.wrapping_add(1).wrapping_sub(picture_id) & PICTURE_ID_MASK;
        }
        if let (Some(tl0), Some(last)) = (first.tl0_pic_idx, self.last_tl0) {
            self.tl0_offset = last.wrapping_add(1).wrapping_sub(tl0);
        }
        self.last_dropped = None;
    }

    /// A picture held back (a temporal layer above the target): later pictures close the gap.
    pub fn drop_picture(&mut self, descriptor: &Vp8Descriptor) {
        let Some((picture_id, _)) = descriptor.picture_id else {
            return;
        };
        if self.last_dropped != Some(picture_id) {
            self.last_dropped = Some(picture_id);
            self.picture_id_offset = self.picture_id_offset.wrapping_sub(1) & PICTURE_ID_MASK;
        }
    }

    /// The offsets now added to picture ids and TL0PICIDX, to rebuild a retransmission.
    pub fn offsets(&self) -> (u16, u8) {
        (self.picture_id_offset, self.tl0_offset)
    }

    /// The payload to send for `payload` (described by `descriptor`): the same bytes when no
    /// number changes, else a copy with the numbers rewritten.
    pub fn munge(&mut self, payload: &Bytes, descriptor: &Vp8Descriptor) -> Bytes {
        if let Some((id, _)) = descriptor.picture_id {
            self.last_picture_id = Some(id.wrapping_add(self.picture_id_offset) & PICTURE_ID_MASK);
        }
        if let Some(tl0) = descriptor.tl0_pic_idx {
            self.last_tl0 = Some(tl0.wrapping_add(self.tl0_offset));
        }
        with_offsets(payload, descriptor, self.offsets())
    }
}

/// `payload` with `offsets` (picture id, TL0PICIDX) added to its numbers: the same bytes when
/// both are zero, else a copy.
pub fn with_offsets(payload: &Bytes, descriptor: &Vp8Descriptor, offsets: (u16, u8)) -> Bytes {
    let (picture_id_offset, tl0_offset) = offsets;
    if picture_id_offset == 0 && tl0_offset == 0 {
        return payload.clone();
    }
    let mut out = BytesMut::from(&payload[..]);
    match descriptor.picture_id {
        Some((id, true)) => {
            let [high, low] = (id.wrapping_add(picture_id_offset) & PICTURE_ID_MASK).to_be_bytes();
            out[descriptor.picture_id_at] = 0x80 | high;
            out[descriptor.picture_id_at + 1] = low;
        }
        // A 7-bit picture id wraps at 128.
        Some((id, false)) => {
            out[descriptor.picture_id_at] = (id.wrapping_add(picture_id_offset) & 0x7f) as u8;
        }
        None => {}
    }
    if let Some(tl0) = descriptor.tl0_pic_idx {
        out[descriptor.tl0_at] = tl0.wrapping_add(tl0_offset);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A descriptor with a 15-bit picture id, TL0PICIDX and TID, then a frame tag.
    fn payload(picture_id: u16, tl0: u8, tid: u8, keyframe: bool) -> Bytes {
        let [high, low] = picture_id.to_be_bytes();
        let mut bytes = vec![0x90, 0xe0, 0x80 | high, low, tl0, tid << 6];
        // Frame tag (P bit), then a keyframe's start code and 640x360.
        bytes.extend_from_slice(&[u8::from(!keyframe), 0, 0, 0x9d, 0x01, 0x2a]);
        bytes.extend_from_slice(&640u16.to_le_bytes());
        bytes.extend_from_slice(&360u16.to_le_bytes());
        Bytes::from(bytes)
    }

    #[test]
    fn descriptors_are_read_whatever_fields_they_carry() {
        /// Payload, then picture id, TL0PICIDX, TID and picture start as read.
        type Case = (
            &'static [u8],
            Option<(u16, bool)>,
            Option<u8>,
            Option<u8>,
            bool,
        );
        let cases: &[Case] = &[
            (&[0x10, 0x00], None, None, None, true),
            (
                &[0x90, 0x80, 0x05, 0x00],
                Some((5, false)),
                None,
                None,
                true,
            ),
            (
                &[0x90, 0xe0, 0x85, 0x01, 0x07, 0x80, 0x01],
                Some((0x0501, true)),
                Some(7),
                Some(2),
                true,
            ),
            (&[0x80, 0x40, 0x09, 0x01], None, Some(9), None, false),
        ];
        for &(bytes, picture_id, tl0, temporal, start) in cases {
            let d = Vp8Descriptor::parse(bytes).expect("complete");
            assert_eq!(
                (d.picture_id, d.tl0_pic_idx, d.temporal, d.picture_start),
                (picture_id, tl0, temporal, start),
                "{bytes:02x?}"
            );
        }
        assert_eq!(Vp8Descriptor::parse(&[0x90, 0xe0, 0x85]), None, "truncated");
        assert_eq!(Vp8Descriptor::parse(&[]), None);
    }

    #[test]
    fn a_keyframe_declares_its_size() {
        let key = payload(1, 1, 0, true);
        let d = Vp8Descriptor::parse(&key).expect("complete");
        assert_eq!(d.keyframe_size(&key), Some((640, 360)));
        let delta = payload(2, 1, 0, false);
        let d = Vp8Descriptor::parse(&delta).expect("complete");
        assert_eq!(d.keyframe_size(&delta), None);
    }

    fn munged(munger: &mut Vp8Munger, bytes: &Bytes) -> (u16, u8) {
        let d = Vp8Descriptor::parse(bytes).expect("complete");
        let out = munger.munge(bytes, &d);
        let d = Vp8Descriptor::parse(&out).expect("complete");
        (d.picture_id.expect("id").0, d.tl0_pic_idx.expect("tl0"))
    }

    #[test]
    fn numbers_continue_across_a_switch_and_wrap() {
        let mut munger = Vp8Munger::default();
        assert_eq!(
            munged(&mut munger, &payload(0x7ffe, 200, 0, true)),
            (0x7ffe, 200)
        );
        let unchanged = payload(0x7fff, 255, 0, false);
        let d = Vp8Descriptor::parse(&unchanged).expect("complete");
        assert_eq!(
            munger.munge(&unchanged, &d).as_ptr(),
            unchanged.as_ptr(),
            "no copy while nothing changes"
        );
        // Another layer's keyframe, with unrelated numbers.
        let key = payload(100, 7, 0, true);
        munger.switch_to(&Vp8Descriptor::parse(&key).expect("complete"));
        assert_eq!(
            munged(&mut munger, &key),
            (0, 0),
            "wrapped after 0x7fff and 255"
        );
        assert_eq!(munged(&mut munger, &payload(101, 7, 2, false)), (1, 0));
        assert_eq!(munged(&mut munger, &payload(102, 8, 0, false)), (2, 1));
    }

    #[test]
    fn dropped_pictures_leave_no_gap() {
        let mut munger = Vp8Munger::default();
        assert_eq!(munged(&mut munger, &payload(10, 1, 0, true)), (10, 1));
        let dropped = payload(11, 1, 2, false);
        let d = Vp8Descriptor::parse(&dropped).expect("complete");
        munger.drop_picture(&d);
        munger.drop_picture(&d); // its second packet
        assert_eq!(munged(&mut munger, &payload(12, 1, 1, false)), (11, 1));
        assert_eq!(munged(&mut munger, &payload(13, 2, 0, false)), (12, 2));
    }
}
