//! A publish connection in the engine: answering the publisher's offers, starting a
//! publication when a track's first packet arrives, handing each packet to its fanout, and
//! keyframe requests back to the publisher.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use rtc::peer_connection::event::RTCTrackEvent;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use rtc::rtp_transceiver::RTCRtpReceiverId;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::run::Conn;
use crate::SfuError;
use crate::exchange::{ConnId, OpenedTrack, PublishSink, TrackInput};

/// A publish connection's tracks, by the track id its connection gives each one.
pub(crate) struct PublishTracks {
    sink: Arc<dyn PublishSink>,
    tracks: HashMap<String, mpsc::Sender<TrackInput>>,
}

impl PublishTracks {
    pub(crate) fn new(sink: Arc<dyn PublishSink>) -> Self {
        Self {
            sink,
            tracks: HashMap::new(),
        }
    }

    /// Hands one packet to its publication's fanout; false when the fanout's queue was full
    /// and the packet is dropped (the fanout is behind; subscribers recover by NACK or at the
    /// next keyframe). A packet of a track that is not forwarded is dropped quietly.
    pub(super) fn deliver(&mut self, track_id: &str, packet: rtp::Packet) -> bool {
        let Some(queue) = self.tracks.get(track_id) else {
            return true;
        };
        match queue.try_send(TrackInput::Rtp(packet)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => false,
            Err(TrySendError::Closed(_)) => {
                // The publication ended (a re-offer stopped its section): forget it.
                self.tracks.remove(track_id);
                true
            }
        }
    }
}

impl Conn {
    /// Applies a publisher's (re-)offer and returns the answer.
    pub(super) fn answer_offer(&mut self, sdp: String) -> Result<String, SfuError> {
        if self.publish.is_none() {
            return Err(SfuError::NotPublishing);
        }
        let offer = RTCSessionDescription::offer(sdp).map_err(SfuError::InvalidSdp)?;
        self.pc
            .set_remote_description(Instant::now(), offer)
            .map_err(SfuError::InvalidSdp)?;
        // The remote ICE credentials are known now: the publisher's checks may be answered.
        self.answered = true;
        let answer = self.pc.create_answer(None).map_err(SfuError::WebRtc)?;
        self.pc
            .set_local_description(Instant::now(), answer)
            .map_err(SfuError::WebRtc)?;
        self.pc
            .local_description()
            .map(|desc| desc.sdp)
            .ok_or(SfuError::NoLocalDescription)
    }

    /// Sends the publisher a picture loss indication for the stream `media_ssrc`.
    pub(super) fn request_keyframe(&mut self, receiver: RTCRtpReceiverId, media_ssrc: u32) {
        let pli = PictureLossIndication {
            sender_ssrc: 0,
            media_ssrc,
        };
        let Some(mut receiver) = self.pc.rtp_receiver(receiver) else {
            return;
        };
        if let Err(err) = receiver.write_rtcp(Instant::now(), vec![Box::new(pli)]) {
            tracing::debug!(parent: &self.span, %err, "keyframe request not sent");
        }
    }

    /// A track of the publisher opened (its first packet, or a simulcast layer's first) or
    /// closed.
    pub(super) fn track_event(&mut self, id: ConnId, event: RTCTrackEvent) {
        if self.publish.is_none() {
            return;
        }
        match event {
            RTCTrackEvent::OnOpen(init) => {
                let known = self
                    .publish
                    .as_ref()
                    .is_some_and(|publish| publish.tracks.contains_key(&init.track_id));
                if !known && let Some(opened) = self.describe(id, init.receiver_id, init.ssrc) {
                    let Some(publish) = self.publish.as_mut() else {
                        return;
                    };
                    if let Some(queue) = publish.sink.track_opened(opened) {
                        publish.tracks.insert(init.track_id.clone(), queue);
                    }
                }
                // Every stream's first packet says which one it is, the first stream's too.
                if let Some(queue) = self
                    .publish
                    .as_ref()
                    .and_then(|publish| publish.tracks.get(&init.track_id))
                {
                    let open = TrackInput::Open {
                        ssrc: init.ssrc,
                        rid: init.rid,
                    };
                    // Sent before the packet that opened it (events are drained before reads);
                    // a full queue drops it, and the fanout places that stream's packets by
                    // their rid extension instead.
                    let _ = queue.try_send(open);
                }
            }
            RTCTrackEvent::OnClose(track_id) => {
                if let Some(publish) = self.publish.as_mut() {
                    // Its fanout sees the queue close and ends the publication.
                    publish.tracks.remove(&track_id);
                }
            }
            _ => {}
        }
    }

    /// What the connection knows of a track whose stream `ssrc` just opened on `receiver`.
    fn describe(
        &mut self,
        id: ConnId,
        receiver: RTCRtpReceiverId,
        ssrc: u32,
    ) -> Option<OpenedTrack> {
        let (msid_track_id, kind, codec) = {
            let receiver = self.pc.rtp_receiver(receiver)?;
            let track = receiver.track();
            let Some(codec) = track.codec(ssrc).cloned() else {
                tracing::warn!(parent: &self.span, ssrc, "publisher track has no codec");
                return None;
            };
            (track.track_id().to_string(), track.kind(), codec)
        };
        let transceivers: Vec<_> = self.pc.get_transceivers().collect();
        let mid = transceivers.into_iter().find_map(|transceiver| {
            let transceiver = self.pc.rtp_transceiver(transceiver)?;
            (transceiver.receiver() == Some(receiver))
                .then(|| transceiver.mid().clone())
                .flatten()
        });
        Some(OpenedTrack {
            conn: id,
            receiver,
            mid,
            msid_track_id,
            kind,
            codec,
            ssrc,
        })
    }
}
