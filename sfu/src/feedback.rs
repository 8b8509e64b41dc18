//! RTCP feedback from subscribers: keyframe requests reach the application, NACKs are counted,
//! and the connection's bandwidth estimate is kept (from TWCC, or REMB where that is all a
//! client sends).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtc::interceptor::{Attribute, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::sansio::Protocol;
use rtc::shared::error::Error;
use std::sync::atomic::AtomicU64 as Estimate;

/// Transport-wide feedback on its way from the feedback interceptor to the engine's estimator.
pub type TransportFeedback = Arc<Mutex<Vec<TransportLayerCc>>>;

/// Most feedback packets held for the engine: it takes them within milliseconds, so more
/// means the engine is stalled, and the oldest are worth least.
const MAX_PENDING_FEEDBACK: usize = 64;

/// Inbound RTCP on a subscribe connection stops inside the interceptor chain (where reports are
/// read) unless an interceptor marks it for the application. This one, placed last, marks PLI
/// and FIR (the fanout asks the publisher for a keyframe) and NACKs (the fanout answers them from
/// the publication's packet cache), and counts NACKs for the metrics.
pub struct FeedbackInterceptor {
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
    nacks: Arc<AtomicU64>,
    estimate: Option<Arc<Estimate>>,
    /// Where the estimate comes from now.
    source: EstimateSource,
    /// Set while the estimate is the subscriber's REMB.
    from_remb: Option<Arc<AtomicBool>>,
    /// Where transport-wide feedback goes, for the engine's estimator.
    transport_feedback: Option<TransportFeedback>,
}

/// Where a connection's estimate comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EstimateSource {
    /// Neither yet: the engine's estimator, once transport-wide feedback comes.
    Undecided,
    /// The subscriber's REMB: it sent REMB and no transport-wide feedback, so the controller
    /// has nothing to go on (a client that negotiated only `goog-remb`).
    Remb,
    /// The engine's estimator, on the subscriber's transport-wide feedback: from then on
    /// REMB is ignored (a client may send both; the send-side estimate sees more).
    Twcc,
}

/// The lowest and highest estimate a REMB may set, bits per second.
const REMB_RANGE: (u64, u64) = (
    crate::estimator::MIN_ESTIMATE,
    crate::estimator::MAX_ESTIMATE,
);

impl FeedbackInterceptor {
    /// Counts NACK packets into `nacks`.
    pub fn new(nacks: Arc<AtomicU64>) -> Self {
        Self {
            read_queue: VecDeque::new(),
            write_queue: VecDeque::new(),
            nacks,
            estimate: None,
            source: EstimateSource::Undecided,
            from_remb: None,
            transport_feedback: None,
        }
    }

    /// Also hands the subscriber's transport-wide feedback to `mailbox`, for the engine's
    /// estimator ([`crate::transport_cc`]).
    pub fn with_transport_feedback(mut self, mailbox: TransportFeedback) -> Self {
        self.transport_feedback = Some(mailbox);
        self
    }

    /// Also sets `from_remb` while the estimate is the subscriber's REMB (probing the link then
    /// teaches nothing: only transport-wide feedback measures a probe).
    pub fn with_remb_flag(mut self, from_remb: Arc<AtomicBool>) -> Self {
        self.from_remb = Some(from_remb);
        self
    }

    /// Also keeps the connection's bandwidth estimate (bits per second) in `estimate` from a
    /// subscriber that sends REMB and no transport-wide feedback, as its REMB says. (With
    /// transport-wide feedback, the engine's estimator keeps it.)
    pub fn with_estimate(mut self, estimate: Arc<Estimate>) -> Self {
        self.estimate = Some(estimate);
        self
    }
}

fn is_keyframe_request(packet: &dyn rtc::rtcp::Packet) -> bool {
    let any = packet.as_any();
    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for FeedbackInterceptor {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Some(estimate) = &self.estimate {
            if let Packet::Rtcp(packets) = &msg.message.packet {
                for packet in packets {
                    let any = packet.as_any();
                    if let Some(feedback) = any.downcast_ref::<TransportLayerCc>() {
                        self.source = EstimateSource::Twcc;
                        if let Some(mailbox) = &self.transport_feedback
                            && let Ok(mut pending) = mailbox.lock()
                        {
                            if pending.len() >= MAX_PENDING_FEEDBACK {
                                pending.remove(0);
                            }
                            pending.push(feedback.clone());
                        }
                    } else if let Some(remb) = any.downcast_ref::<ReceiverEstimatedMaximumBitrate>()
                        && self.source != EstimateSource::Twcc
                    {
                        self.source = EstimateSource::Remb;
                        let bps = (remb.bitrate.max(0.0) as u64).clamp(REMB_RANGE.0, REMB_RANGE.1);
                        estimate.store(bps, Ordering::Relaxed);
                    }
                }
            }
            if let Some(from_remb) = &self.from_remb {
                from_remb.store(self.source == EstimateSource::Remb, Ordering::Relaxed);
            }
        }
        if let Packet::Rtcp(packets) = &msg.message.packet {
            let nacks = packets
                .iter()
                .filter(|p| p.as_any().is::<TransportLayerNack>())
                .count();
            if nacks > 0 {
                self.nacks.fetch_add(nacks as u64, Ordering::Relaxed);
            }
            let requests: Vec<Box<dyn rtc::rtcp::Packet>> = packets
                .iter()
                .filter(|p| {
                    is_keyframe_request(p.as_ref()) || p.as_any().is::<TransportLayerNack>()
                })
                .cloned()
                .collect();
            if requests.is_empty() {
                return Ok(());
            }
            msg.message.packet = Packet::Rtcp(requests);
            msg.message.add(Attribute::DeliverToApplication);
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for FeedbackInterceptor {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// Lets at most one keyframe request per `interval` through to a publisher.
#[derive(Debug)]
pub struct KeyframeThrottle {
    interval: Duration,
    last_sent: Option<Instant>,
    pending: bool,
}

impl KeyframeThrottle {
    /// A throttle passing one request per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_sent: None,
            pending: false,
        }
    }

    /// Records a request; true when it may be sent now. A request that may not is remembered and
    /// released by [`KeyframeThrottle::poll`] when the interval has passed.
    pub fn request(&mut self, now: Instant) -> bool {
        if self.may_send(now) {
            self.last_sent = Some(now);
            self.pending = false;
            true
        } else {
            self.pending = true;
            false
        }
    }

    /// True when a remembered request is now due.
    pub fn poll(&mut self, now: Instant) -> bool {
        self.pending && self.request(now)
    }

    fn may_send(&self, now: Instant) -> bool {
        self.last_sent
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_passes_one_request_per_interval_and_keeps_the_rest() {
        let start = Instant::now();
        let ms = |n| start + Duration::from_millis(n);
        let mut throttle = KeyframeThrottle::new(Duration::from_millis(500));
        assert!(throttle.request(ms(0)));
        assert!(!throttle.request(ms(100)));
        assert!(!throttle.request(ms(200)));
        assert!(!throttle.poll(ms(400)));
        assert!(throttle.poll(ms(500)), "the held request goes out once due");
        assert!(!throttle.poll(ms(1200)), "and only once");
        assert!(throttle.request(ms(1200)));
    }
}
