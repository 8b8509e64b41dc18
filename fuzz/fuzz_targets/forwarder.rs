//! The forwarder under whatever a publisher sends: RTP packets of any shape on any simulcast
//! layer, mixed with the subscriber's and the allocator's changes. Every packet it passes carries
//! the subscriber's SSRC and payload type, two different packets never share an outgoing
//! sequence number (a duplicate of one packet keeps its number), and a NACK for any number never
//! panics.
#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rtc::rtp;
use rtc::shared::marshal::Unmarshal;
use sfu::MediaKind;
use sfu::forwarder::{Forwarder, ForwarderParams};

const SSRC: u32 = 0x5357_4244;
const PAYLOAD_TYPE: u8 = 96;

fuzz_target!(|data: &[u8]| {
    let Some((&codec, mut rest)) = data.split_first() else {
        return;
    };
    let (kind, mime) = match codec % 3 {
        0 => (MediaKind::Video, "video/VP8"),
        1 => (MediaKind::Video, "video/H264"),
        _ => (MediaKind::Audio, "audio/opus"),
    };
    let mut forwarder = Forwarder::new(kind, mime, 90_000);
    let extensions = [("urn:ietf:params:rtp-hdrext:ssrc-audio-level".to_owned(), 1)];
    forwarder.configure(ForwarderParams::new(
        SSRC,
        PAYLOAD_TYPE,
        &extensions,
        &extensions,
    ));
    let start = Instant::now();
    let mut now = start;
    // Outgoing sequence number -> what it was given to: a publisher's (SSRC, sequence number),
    // or padding (SSRC 0 and a count).
    let mut given: HashMap<u16, (u32, u16)> = HashMap::new();
    let mut paddings: u16 = 0;
    let mut last_out: Option<u16> = None;
    let mut last_source: Option<(u32, u16)> = None;
    // A publisher whose numbers jump by thousands is mirrored, and two such jumps go around the
    // 16-bit space as the publisher's own numbers do: the check holds between such jumps.
    let mut check = |out: u16, source: (u32, u16), given: &mut HashMap<u16, (u32, u16)>| {
        if last_out.is_some_and(|last: u16| {
            let distance = out.wrapping_sub(last);
            distance > 0x1000 && distance < 0xF000
        }) {
            given.clear();
        }
        last_out = Some(out);

        let first = *given.entry(out).or_insert(source);
        assert_eq!(first, source, "two packets got one sequence number");
    };
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        now += Duration::from_millis(u64::from(op & 0x0F));
        match op >> 4 {
            // A packet: a length byte, then that many bytes of RTP, on layer `op & 3`.
            0..=8 => {
                let Some((&len, tail)) = rest.split_first() else {
                    return;
                };
                let len = usize::from(len).min(tail.len());
                let (wire, tail) = tail.split_at(len);
                rest = tail;
                let Ok(packet) = rtp::Packet::unmarshal(&mut &wire[..]) else {
                    continue;
                };
                // Likewise a jump of thousands in what the publisher sends, forwarded or not.
                let jumped = last_source.is_some_and(|(ssrc, seq): (u32, u16)| {
                    let distance = packet.header.sequence_number.wrapping_sub(seq);
                    ssrc == packet.header.ssrc && distance > 0x1000 && distance < 0xF000
                });
                if jumped {
                    given.clear();
                }
                last_source = Some((packet.header.ssrc, packet.header.sequence_number));
                if let Ok(out) = forwarder.forward(&packet, op & 3, now) {
                    assert_eq!(out.header.ssrc, SSRC);
                    assert_eq!(out.header.payload_type, PAYLOAD_TYPE);
                    let source = (packet.header.ssrc.max(1), packet.header.sequence_number);
                    check(out.header.sequence_number, source, &mut given);
                }
            }
            9 => forwarder.set_target(op & 3),
            10 => forwarder.set_max_temporal(op & 3),
            11 => forwarder.set_paused(op & 1 == 1),
            12 => forwarder.set_paused_for_bandwidth(op & 1 == 1),
            13 => forwarder.set_layered(op & 1 == 1),
            14 => {
                let Some((seq, tail)) = rest.split_first_chunk::<2>() else {
                    return;
                };
                rest = tail;
                let _ = forwarder.resend(u16::from_be_bytes(*seq), now);
            }
            _ => {
                for padding in forwarder.padding(u16::from(op & 0x0F)) {
                    assert_eq!(padding.header.ssrc, SSRC);
                    paddings = paddings.wrapping_add(1);
                    check(padding.header.sequence_number, (0, paddings), &mut given);
                }
            }
        }
    }
});
