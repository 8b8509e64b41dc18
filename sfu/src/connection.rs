//! What every server connection shares, publish and subscribe alike: which one it is, and its
//! ICE settings.

use std::time::Duration;

use rtc::ice::mdns::MulticastDnsMode;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;

/// The audio-level header extension (RFC 6464): how loud each audio packet is, so the server
/// can tell who speaks without decoding.
pub const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/// Which of a participant's two connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// The connection the participant sends media on.
    Publish,
    /// The connection the participant receives media on.
    Subscribe,
}

/// ICE settings of every server connection. Waiting for a "better" pair than the first
/// peer-reflexive or server-reflexive one (webrtc-rs waits 1 s and 0.5 s by default) only delays
/// a server whose own candidates never change.
pub(crate) fn ice_settings(config: &crate::SfuConfig) -> SettingEngineBuilder {
    SettingEngineBuilder::new()
        // The server announces IP addresses and resolves none: an mDNS socket per connection
        // would cost a file descriptor and answer nobody.
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
        .with_srflx_acceptance_min_wait(Some(Duration::ZERO))
        .with_ice_timeouts(
            Some(config.ice_disconnected_timeout),
            Some(config.ice_failed_timeout),
            Some(config.ice_keepalive_interval),
        )
}
