//! SDP as a participant may send it (a publish offer, a subscribe answer): the server's own
//! readers of it never panic, and what they return comes from the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sfu::fuzzing::{extmap, sections_not_sending, simulcast_rids, with_video_bandwidth};

fuzz_target!(|data: &[u8]| {
    let Ok(sdp) = std::str::from_utf8(data) else {
        return;
    };
    for (uri, _) in extmap(sdp) {
        assert!(sdp.contains(&uri));
    }
    for (mid, rids) in simulcast_rids(sdp) {
        assert!(sdp.contains(&mid));
        for rid in rids {
            assert!(sdp.contains(&rid));
        }
    }
    for mid in sections_not_sending(sdp) {
        assert!(sdp.contains(&mid));
    }
    let _ = with_video_bandwidth(sdp, 1_000_000);
    let _ = rtc::sdp::description::session::SessionDescription::unmarshal(
        &mut std::io::Cursor::new(data),
    );
});
