//! One participant's subscribe side: the negotiator task owns its subscribe transport,
//! subscribes it to what the room publishes (as [`RoomCommand`]s arrive) and serialises the
//! server's offers on it: one at a time, with changes that arrive while an answer is awaited
//! folded into the next offer.

use std::sync::Arc;

use sfu::{Publication, PublicationId, RTCIceCandidateInit, SfuError, SubscribeTransport};
use tokio::sync::mpsc;

use super::{Outbound, Room, RoomCommand, SfuLinkId, ToSession, send};
use crate::protocol::{ErrorCode, ServerMessage, SubscriptionInfo, TransportName};

/// How often a subscriber's bandwidth is shared out again over its subscriptions.
const ALLOCATION_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// When the subscriber was last told its bandwidth estimate, and what.
#[derive(Debug, Default)]
struct EstimateTold {
    last: Option<(u64, std::time::Instant)>,
}

impl EstimateTold {
    /// True when `estimate` is to be told now: it changed by a tenth or more and 2 s have
    /// passed since the last time.
    fn due(&mut self, estimate: u64, now: std::time::Instant) -> bool {
        if estimate == 0 {
            return false;
        }
        let due = match self.last {
            None => true,
            Some((told, at)) => {
                now.saturating_duration_since(at) >= std::time::Duration::from_secs(2)
                    && estimate.abs_diff(told) * 10 >= told
            }
        };
        if due {
            self.last = Some((estimate, now));
        }
        due
    }
}

/// What the participant's own socket asks of its subscribe transport.
#[derive(Debug)]
pub enum NegotiatorCommand {
    /// The participant's answer to the outstanding offer.
    Answer(String),
    /// A candidate the participant trickled for its subscribe connection.
    Candidate(RTCIceCandidateInit),
    /// Stop or resume forwarding one publication to the participant.
    Pause(PublicationId, bool),
    /// The size the participant shows one publication at.
    View(PublicationId, (u16, u16)),
}

/// Owns one participant's subscribe transport and serialises its offers: one offer at a time,
/// changes that arrive while an answer is awaited go into the next offer. Ends when the
/// participant's socket task drops its command sender, and closes the transport. Its offers
/// carry `link`, so that one still being made when the transport closed is never sent.
pub async fn run_negotiator(
    link: SfuLinkId,
    mut transport: SubscribeTransport,
    mut commands: mpsc::Receiver<NegotiatorCommand>,
    mut room_commands: mpsc::UnboundedReceiver<RoomCommand>,
    initial: Vec<Publication>,
    outbound: Outbound,
    room: Arc<Room>,
) {
    let mut awaiting_answer = false;
    let mut dirty = false;
    let mut allocation_tick = tokio::time::interval(ALLOCATION_INTERVAL);
    allocation_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut estimate_told = EstimateTold::default();
    for publication in initial {
        dirty |= subscribe(&mut transport, &publication).await;
    }
    loop {
        if dirty && !awaiting_answer {
            match transport.create_offer().await {
                Ok((sdp, offered)) => {
                    let subscriptions = offered
                        .into_iter()
                        .map(|o| SubscriptionInfo {
                            muted: room.is_muted(&o.publication),
                            track_id: o.publication.track_id.clone(),
                            mid: o.mid,
                            publication_id: o.publication.id.to_string(),
                            peer_id: o.publication.participant.to_string(),
                            kind: o.publication.kind.as_str(),
                            source: o.publication.source.as_str(),
                        })
                        .collect();
                    let offer = ServerMessage::Offer {
                        peer_id: crate::protocol::SFU_PEER.to_owned(),
                        transport: Some(TransportName::Subscribe),
                        sdp,
                        subscriptions: Some(subscriptions),
                        tracks: None,
                    };
                    // Not sent means the participant is being disconnected.
                    if outbound.queue(ToSession::Sfu {
                        link,
                        message: offer,
                    }) {
                        awaiting_answer = true;
                        dirty = false;
                    }
                }
                Err(err) => tracing::error!(%err, "subscribe offer failed"),
            }
        }
        tokio::select! {
            // Commands first: once they are closed (the SFU connections closed), no new offer.
            biased;
            command = commands.recv() => match command {
                Some(NegotiatorCommand::Answer(sdp)) => {
                    if !awaiting_answer {
                        send(
                            &outbound,
                            ServerMessage::error(
                                ErrorCode::InvalidState,
                                "no subscribe offer is waiting for an answer",
                                Some("answer"),
                            ),
                        );
                        continue;
                    }
                    match transport.apply_answer(sdp).await {
                        Ok(()) => awaiting_answer = false,
                        Err(err) => send(
                            &outbound,
                            ServerMessage::error(ErrorCode::InvalidSdp, err.to_string(), Some("answer")),
                        ),
                    }
                }
                Some(NegotiatorCommand::Pause(publication, paused)) => {
                    // A publication that just ended has nothing left to pause: nothing to say.
                    transport.set_paused(&publication, paused).await;
                }
                Some(NegotiatorCommand::View(publication, size)) => {
                    transport.set_view(&publication, Some(size)).await;
                }
                Some(NegotiatorCommand::Candidate(candidate)) => {
                    if let Err(err) = transport.add_ice_candidate(candidate).await {
                        send(
                            &outbound,
                            ServerMessage::error(
                                ErrorCode::BadRequest,
                                format!("candidate refused: {err}"),
                                Some("ice-candidate"),
                            ),
                        );
                    }
                }
                None => break,
            },
            _ = allocation_tick.tick() => {
                let speaker = room.top_speaker();
                let estimate = transport.estimate().unwrap_or(0);
                if estimate_told.due(estimate, std::time::Instant::now()) {
                    send(&outbound, ServerMessage::Bandwidth { estimate });
                }
                for change in transport.allocate(speaker.as_ref()).await {
                    send(
                        &outbound,
                        ServerMessage::Allocation {
                            publication_id: change.publication.to_string(),
                            state: change.allocation.as_str(),
                            estimate,
                        },
                    );
                }
            }
            Some(first) = room_commands.recv() => {
                // Fold everything already queued into the next offer.
                let mut next = Some(first);
                while let Some(command) = next.take().or_else(|| room_commands.try_recv().ok()) {
                    match command {
                        RoomCommand::Subscribe(publication) => {
                            dirty |= subscribe(&mut transport, &publication).await;
                        }
                        RoomCommand::Unsubscribe(publication) => {
                            if transport.is_subscribed(&publication) {
                                if let Err(err) = transport.unsubscribe(&publication).await {
                                    tracing::warn!(%err, %publication, "unsubscribe failed");
                                }
                                dirty = true;
                            }
                        }
                    }
                }
            }
        }
    }
    transport.close().await;
}

/// Subscribes to `publication`; true when the transport changed.
async fn subscribe(transport: &mut SubscribeTransport, publication: &Publication) -> bool {
    match transport.subscribe(publication).await {
        Ok(()) => true,
        Err(SfuError::PublicationEnded) => false,
        Err(err) => {
            tracing::warn!(%err, publication = %publication.id, "subscribe failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EstimateTold;
    use std::time::{Duration, Instant};

    #[test]
    fn the_estimate_is_told_when_it_moved_a_tenth_and_two_seconds_passed() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut told = EstimateTold::default();
        let cases: &[(u64, u64, bool)] = &[
            (0, 0, false), // none yet
            (1_000_000, 100, true),
            (2_000_000, 1_000, false), // too soon
            (1_050_000, 2_200, false), // moved 5 %
            (1_200_000, 2_300, true),
            (600_000, 4_400, true),
        ];
        for &(estimate, ms, due) in cases {
            assert_eq!(told.due(estimate, at(ms)), due, "{estimate} at {ms} ms");
        }
    }
}
