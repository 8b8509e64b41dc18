//! One participant's subscribe side: the negotiator task owns its subscribe transport,
//! subscribes it to what the room publishes (as [`RoomCommand`]s arrive) and serialises the
//! server's offers on it: one at a time, with changes that arrive while an answer is awaited
//! folded into the next offer.

use std::sync::Arc;

use sfu::{Publication, PublicationId, RTCIceCandidateInit, SfuError, SubscribeTransport};
use tokio::sync::mpsc;

use super::{Outbound, Room, RoomCommand, SfuLinkId, ToSession, send};
use crate::protocol::{ErrorCode, ServerMessage, SubscriptionInfo, TransportName};

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
