//! What fanouts, transports and the engine hand each other: the bottom of the media plane,
//! which imports none of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RtpCodecKind};
use rtc::rtp_transceiver::{RTCRtpReceiverId, RTCRtpSenderId};

/// A peer connection (publish or subscribe) in the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ConnId(pub(crate) u64);

/// One subscription: a publication forwarded to one subscriber, as its fanout and its
/// subscriber's transport both know it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SubscriptionId(u64);

impl SubscriptionId {
    /// An id no other subscription in this process has.
    pub(crate) fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// One forwarded packet for one subscription.
pub(crate) struct Outgoing {
    pub(crate) conn: ConnId,
    pub(crate) sender: RTCRtpSenderId,
    pub(crate) packet: rtp::Packet,
    pub(crate) class: Class,
}

/// How the engine's per-subscriber pacer treats a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// Sent at once, ahead of any video waiting: audio is small and must never wait.
    Audio,
    /// Paced to the subscriber's estimate while its allocation is limited.
    Video,
    /// Video sent again for a NACK: ahead of video waiting in the pacer (a picture the
    /// receiver already holds part of is worth more than the next), dropped when the pacer
    /// already holds the most it may (the receiver asks again, or for a keyframe).
    Resend,
    /// Part of a probe cluster (padding after recent video), sent at its own rate.
    Probe,
}

/// What a subscriber's RTCP asks of the publication one of its subscriptions forwards.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SubscriberFeedback {
    /// It lost these outgoing sequence numbers.
    Nack(Vec<u16>),
    /// It asked for a keyframe (PLI or FIR).
    KeyframeRequest,
}

/// Where a subscriber's RTCP about one subscription goes: to the publication's fanout, which the
/// engine knows only through this. Advisory: it never waits.
#[derive(Clone)]
pub(crate) struct FeedbackRoute(Arc<dyn Fn(SubscriberFeedback) + Send + Sync>);

impl FeedbackRoute {
    pub(crate) fn new(deliver: impl Fn(SubscriberFeedback) + Send + Sync + 'static) -> Self {
        Self(Arc::new(deliver))
    }

    pub(crate) fn send(&self, feedback: SubscriberFeedback) {
        (self.0)(feedback);
    }
}

/// What the engine hands a publication's fanout, in the order the publisher's connection
/// produced it.
pub(crate) enum TrackInput {
    /// A stream of the track began: its SSRC and, in simulcast, its rid.
    Open { ssrc: u32, rid: Option<String> },
    /// A packet the publisher sent (decrypted, through the receive interceptors).
    Rtp(rtp::Packet),
}

/// A publisher's track whose first packet just arrived, as its connection describes it.
pub(crate) struct OpenedTrack {
    /// The publish connection it arrived on and the receiver that reads it: where keyframe
    /// requests for it go.
    pub(crate) conn: ConnId,
    pub(crate) receiver: RTCRtpReceiverId,
    /// Its media section, when the connection knows it.
    pub(crate) mid: Option<String>,
    /// Its track id in the publisher's SDP (`a=msid`).
    pub(crate) msid_track_id: String,
    pub(crate) kind: RtpCodecKind,
    pub(crate) codec: RTCRtpCodec,
    /// The SSRC of its first packet.
    pub(crate) ssrc: u32,
}

/// Who starts a publication when a publish connection's track opens: the publish transport,
/// which the engine knows only through this (so the engine imports no transport code).
pub(crate) trait PublishSink: Send + Sync {
    /// Starts the publication of `track`; returns where its packets go, or `None` when it is
    /// not forwarded.
    fn track_opened(&self, track: OpenedTrack) -> Option<tokio::sync::mpsc::Sender<TrackInput>>;
}

/// Where a publication's keyframe requests go: the receiver of its publish connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Upstream {
    pub(crate) conn: ConnId,
    pub(crate) receiver: RTCRtpReceiverId,
}

/// Where a publication's keyframe requests go (the SSRC of the stream that needs one): its
/// publisher's connection in the engine. Advisory: false when the request could not be queued.
#[derive(Clone)]
pub(crate) struct KeyframeRoute(Arc<dyn Fn(u32) -> bool + Send + Sync>);

impl KeyframeRoute {
    pub(crate) fn new(request: impl Fn(u32) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(request))
    }

    pub(crate) fn request(&self, media_ssrc: u32) -> bool {
        (self.0)(media_ssrc)
    }
}
