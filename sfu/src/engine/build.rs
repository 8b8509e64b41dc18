//! Building a connection: codecs, header extensions, interceptors (for a subscriber the one
//! that hands its feedback over; for a publisher NACKs, receiver reports and TWCC feedback),
//! ICE credentials and a host candidate on the shared socket. A subscriber's sender reports and
//! transport-wide congestion control are the engine's own ([`crate::sender_reports`],
//! [`crate::transport_cc`]), not interceptors.

use std::sync::Arc;
use std::time::Instant;

use rtc::interceptor::{Registry, Slot};
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::RTCPeerConnectionBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpHeaderExtensionCapability, RtpCodecKind, TYPE_RTCP_FB_TRANSPORT_CC,
};

use super::{Bandwidth, Engine, IceCredentials};
use crate::SfuError;
use crate::connection::ice_settings;
use crate::feedback::FeedbackInterceptor;

impl Engine {
    /// Builds a subscribe connection for this engine: its ICE ufrag (returned too, for routing),
    /// its certificate and a host candidate on the shared socket for every announced address;
    /// also where its bandwidth estimate (bits per second, 0 until the first one) is kept.
    /// Runs in the caller's task, so key generation never holds up forwarding.
    pub(crate) fn build_connection(
        &self,
    ) -> Result<(RTCPeerConnection, IceCredentials, Option<Arc<Bandwidth>>), SfuError> {
        let credentials = IceCredentials {
            ufrag: random_token(16),
            pwd: random_token(32),
        };
        let mut engine = MediaEngine::default();
        engine.register_default_codecs().map_err(SfuError::WebRtc)?;
        let bandwidth = Arc::new(Bandwidth::default());
        // Only the feedback interceptor: every interceptor is a queue each packet moves
        // through, so the engine writes sender reports itself (crate::sender_reports), there
        // are no receiver reports (nothing is received here), and NACKs are answered by the
        // fanout from one cache per publication.
        let registry = Registry::new().with(
            Slot::from(14_000),
            FeedbackInterceptor::new(self.nacks.clone())
                .with_estimate(bandwidth.estimate.clone())
                .with_remb_flag(bandwidth.from_remb.clone())
                .with_transport_feedback(bandwidth.transport_feedback.clone()),
        );
        if self.config.bandwidth_estimation {
            // Transport-wide congestion control feedback (TWCC) from the subscriber, for the
            // estimate of what its network carries: the engine numbers what leaves and runs
            // the estimator on the feedback (crate::transport_cc); the feedback interceptor
            // hands the feedback over.
            for kind in [RtpCodecKind::Audio, RtpCodecKind::Video] {
                engine.register_feedback(
                    RTCPFeedback {
                        typ: TYPE_RTCP_FB_TRANSPORT_CC.to_owned(),
                        parameter: String::new(),
                    },
                    kind,
                );
                engine
                    .register_header_extension(
                        RTCRtpHeaderExtensionCapability {
                            uri: crate::transport_cc::TRANSPORT_CC_URI.to_owned(),
                        },
                        kind,
                        None,
                    )
                    .map_err(SfuError::WebRtc)?;
            }
        }
        let pc = self.finish(engine, registry, &credentials)?;
        let bandwidth = self.config.bandwidth_estimation.then_some(bandwidth);
        Ok((pc, credentials, bandwidth))
    }

    /// Builds a publish connection for this engine, as [`Engine::build_connection`] does a
    /// subscribe one: it receives every default codec, the audio level, `mid` and simulcast
    /// header extensions, NACKs what it loses, and gives the publisher receiver reports and
    /// transport-wide feedback, so the publisher's own estimate can ramp up.
    pub(crate) fn build_publish_connection(
        &self,
    ) -> Result<(RTCPeerConnection, IceCredentials), SfuError> {
        let credentials = IceCredentials {
            ufrag: random_token(16),
            pwd: random_token(32),
        };
        let mut engine = MediaEngine::default();
        engine.register_default_codecs().map_err(SfuError::WebRtc)?;
        engine
            .register_header_extension(
                RTCRtpHeaderExtensionCapability {
                    uri: crate::connection::AUDIO_LEVEL_URI.to_owned(),
                },
                RtpCodecKind::Audio,
                None,
            )
            .map_err(SfuError::WebRtc)?;
        let registry = register_default_interceptors(Registry::new(), &mut engine)
            .map_err(SfuError::WebRtc)?;
        let pc = self.finish(engine, registry, &credentials)?;
        Ok((pc, credentials))
    }

    /// The connection itself, with a host candidate on the shared socket for every announced
    /// address.
    fn finish(
        &self,
        engine: MediaEngine,
        registry: Registry,
        credentials: &IceCredentials,
    ) -> Result<RTCPeerConnection, SfuError> {
        let settings = ice_settings(&self.config)
            .with_ice_credentials(credentials.ufrag.clone(), credentials.pwd.clone())
            .build();
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(engine)
            .with_setting_engine(settings)
            .with_interceptor_registry(registry)
            .build(Instant::now())
            .map_err(SfuError::WebRtc)?;
        for addr in self.announced.iter() {
            let candidate = CandidateHostConfig {
                base_config: CandidateConfig {
                    network: "udp".to_owned(),
                    address: addr.ip().to_string(),
                    port: addr.port(),
                    component: 1,
                    ..Default::default()
                },
                ..Default::default()
            }
            .new_candidate_host()
            .map_err(|err| SfuError::LocalCandidate(err.to_string()))?;
            let init = RTCIceCandidate::from(&candidate)
                .to_json()
                .map_err(SfuError::WebRtc)?;
            pc.add_local_candidate(init).map_err(SfuError::WebRtc)?;
        }
        Ok(pc)
    }
}

/// ICE ufrag and password characters (RFC 8839: ice-char is ALPHA / DIGIT / "+" / "/").
pub(super) fn random_token(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}
