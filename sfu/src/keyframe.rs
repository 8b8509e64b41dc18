//! Keyframe detection on RTP payloads, without decoding.

/// Codecs whose keyframes the forwarder can recognise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VideoCodec {
    /// VP8 (RFC 7741).
    Vp8,
    /// H.264 (RFC 6184).
    H264,
    /// Anything else: every packet counts as a keyframe start, so nothing is held back.
    Other,
}

impl VideoCodec {
    /// Classifies a MIME type such as `video/VP8`.
    pub fn from_mime(mime: &str) -> Self {
        if mime.eq_ignore_ascii_case("video/vp8") {
            VideoCodec::Vp8
        } else if mime.eq_ignore_ascii_case("video/h264") {
            VideoCodec::H264
        } else {
            VideoCodec::Other
        }
    }

    /// True when this payload is the first packet of a keyframe, where a decoder can start.
    pub fn is_keyframe_start(self, payload: &[u8]) -> bool {
        match self {
            VideoCodec::Vp8 => vp8_keyframe_start(payload),
            VideoCodec::H264 => h264_keyframe(payload),
            VideoCodec::Other => true,
        }
    }
}

/// RFC 7741 §4.2-4.3: the payload descriptor, then the VP8 header whose P bit is 0 on keyframes.
fn vp8_keyframe_start(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    let start_of_partition = first & 0x10 != 0;
    let partition_id = first & 0x0f;
    if !start_of_partition || partition_id != 0 {
        return false;
    }
    let mut offset = 1;
    if first & 0x80 != 0 {
        let Some(&ext) = payload.get(1) else {
            return false;
        };
        offset = 2;
        if ext & 0x80 != 0 {
            // PictureID: one byte, or two when its M bit is set.
            let Some(&pid) = payload.get(offset) else {
                return false;
            };
            offset += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if ext & 0x40 != 0 {
            offset += 1; // TL0PICIDX
        }
        if ext & 0x30 != 0 {
            offset += 1; // TID/Y/KEYIDX
        }
    }
    payload.get(offset).is_some_and(|header| header & 0x01 == 0)
}

/// RFC 6184 §5: an IDR slice or a sequence parameter set, alone, aggregated or fragmented.
fn h264_keyframe(payload: &[u8]) -> bool {
    const IDR: u8 = 5;
    const SPS: u8 = 7;
    const STAP_A: u8 = 24;
    const FU_A: u8 = 28;
    let Some(&first) = payload.first() else {
        return false;
    };
    match first & 0x1f {
        IDR | SPS => true,
        STAP_A => {
            let mut rest = &payload[1..];
            while rest.len() > 2 {
                let size = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let Some(&nal) = rest.get(2) else {
                    return false;
                };
                if matches!(nal & 0x1f, IDR | SPS) {
                    return true;
                }
                rest = rest.get(2 + size..).unwrap_or(&[]);
            }
            false
        }
        FU_A => payload
            .get(1)
            .is_some_and(|fu| fu & 0x80 != 0 && fu & 0x1f == IDR),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8_keyframes_are_recognised() {
        let cases: &[(&[u8], bool, &str)] = &[
            (&[0x10, 0x00], true, "start, no extension, P=0"),
            (&[0x10, 0x01], false, "start, interframe"),
            (&[0x00, 0x00], false, "not a partition start"),
            (&[0x11, 0x00], false, "partition 1"),
            (&[0x90, 0x80, 0x05, 0x00], true, "one-byte picture id"),
            (&[0x90, 0x80, 0x85, 0x01, 0x00], true, "two-byte picture id"),
            (
                &[0x90, 0xe0, 0x85, 0x01, 0x07, 0x20, 0x00],
                true,
                "picture id, tl0, tid",
            ),
            (
                &[0x90, 0xe0, 0x85, 0x01, 0x07, 0x20, 0x01],
                false,
                "interframe with all fields",
            ),
            (&[0x90, 0x80], false, "truncated"),
            (&[], false, "empty"),
        ];
        for (payload, expected, what) in cases {
            assert_eq!(
                VideoCodec::Vp8.is_keyframe_start(payload),
                *expected,
                "{what}"
            );
        }
    }

    #[test]
    fn h264_keyframes_are_recognised() {
        let cases: &[(&[u8], bool, &str)] = &[
            (&[0x65, 0x88], true, "IDR slice"),
            (&[0x67, 0x42], true, "SPS"),
            (&[0x41, 0x9a], false, "non-IDR slice"),
            (
                &[0x78, 0x00, 0x02, 0x67, 0x42, 0x00, 0x02, 0x68, 0xce],
                true,
                "STAP-A with SPS",
            ),
            (
                &[0x78, 0x00, 0x02, 0x41, 0x9a],
                false,
                "STAP-A with a P slice",
            ),
            (&[0x7c, 0x85, 0x88], true, "FU-A start of IDR"),
            (&[0x7c, 0x05, 0x88], false, "FU-A middle of IDR"),
            (&[0x78, 0xff], false, "truncated STAP-A"),
        ];
        for (payload, expected, what) in cases {
            assert_eq!(
                VideoCodec::H264.is_keyframe_start(payload),
                *expected,
                "{what}"
            );
        }
    }
}
