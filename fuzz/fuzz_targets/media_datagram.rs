//! A datagram at the shared media port from an address the server does not know: routed by the
//! ufrag its STUN request names, and only when its MESSAGE-INTEGRITY checks out; RTP and RTCP as
//! the connection's pipeline reads them.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rtc::crypto::RTCCryptoProvider;
use rtc::shared::marshal::Unmarshal;
use sfu::fuzzing::{stun_integrity_ok, stun_local_ufrag};

fn provider() -> &'static dyn RTCCryptoProvider {
    static PROVIDER: OnceLock<std::sync::Arc<dyn RTCCryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| rtc::crypto::default_provider().expect("a crypto provider"))
        .as_ref()
}

fuzz_target!(|data: &[u8]| {
    if let Some(ufrag) = stun_local_ufrag(data) {
        assert!(
            !ufrag.contains(':'),
            "the local ufrag ends at the first colon"
        );
        // Random bytes never carry a MESSAGE-INTEGRITY made with the password.
        assert!(!stun_integrity_ok(
            data,
            "fuzz-password-0123456789",
            provider().crypto()
        ));
    }
    let _ = rtc::rtp::Packet::unmarshal(&mut &data[..]);
    let _ = rtc::rtcp::packet::unmarshal(&mut &data[..]);
});
