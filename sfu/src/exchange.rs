//! What fanouts, subscribe transports and the egress engine hand each other: the bottom of the
//! media plane, which imports none of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rtc::rtp;
use rtc::rtp_transceiver::RTCRtpSenderId;

/// A subscribe connection in the egress engine.
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
