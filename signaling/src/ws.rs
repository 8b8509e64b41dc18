//! One task per signaling socket: decodes frames, drives the participant's transports, relays
//! room events, and cleans up on every way out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use sfu::{ParticipantId, PublishTransport, RTCIceCandidateInit, SfuEvent, Source};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::auth::Claims;
use crate::http::AppState;
use crate::protocol::{
    CandidateInit, ClientMessage, ErrorCode, PROTOCOL_VERSION, SFU_PEER, ServerMessage,
    TransportName,
};
use crate::room::{JoinError, NegotiatorCommand, Outbound, Room, run_negotiator};

/// Interval between server pings.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);
/// Silence after which a client is taken as gone: three unanswered pings, so that a dead peer
/// is out of the room well within 10 seconds.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(7);
/// How often silence is checked.
const LIVENESS_CHECK: Duration = Duration::from_millis(500);
const OUTBOUND_QUEUE: usize = 1024;

struct Membership {
    room: Arc<Room>,
    participant: ParticipantId,
    publish: PublishTransport,
    negotiator: mpsc::Sender<NegotiatorCommand>,
}

struct Session {
    state: AppState,
    claims: Claims,
    outbound: Outbound,
    sfu_events: mpsc::UnboundedSender<SfuEvent>,
    membership: Option<Membership>,
}

enum Flow {
    Continue,
    Leave,
}

/// Serves one upgraded socket until the client leaves, goes silent, or the server stops.
pub async fn serve(socket: WebSocket, state: AppState, claims: Claims) {
    let tasks = state.tasks.clone();
    let _alive = sfu::TaskGuard::new(&tasks.sessions);
    let span = tracing::info_span!("session", room = %claims.room, user = %claims.sub, participant = tracing::field::Empty);
    run(socket, state, claims).instrument(span).await
}

async fn run(socket: WebSocket, state: AppState, claims: Claims) {
    let (mut sink, mut stream) = socket.split();
    let (outbound, mut outbound_rx) = Outbound::new(OUTBOUND_QUEUE);
    let kick = outbound.clone();
    // Unbounded: media-plane events per participant are bounded by its publications, and the
    // webrtc-rs driver that sends them must never wait on this socket.
    let (sfu_events, mut sfu_rx) = mpsc::unbounded_channel();
    let mut shutdown = state.shutdown.clone();
    let mut session = Session {
        state,
        claims,
        outbound,
        sfu_events,
        membership: None,
    };
    let mut liveness = tokio::time::interval(LIVENESS_CHECK);
    let mut last_heard = Instant::now();
    let mut last_ping = Instant::now();
    let mut close: Option<CloseFrame> = None;
    loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    last_heard = Instant::now();
                    if let Flow::Leave = session.handle_text(&text).await {
                        close = Some(CloseFrame { code: 1000, reason: Utf8Bytes::from_static("left") });
                        break;
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    last_heard = Instant::now();
                    session.reply(ServerMessage::error(ErrorCode::BadRequest, "binary frames are not part of the protocol", None));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => last_heard = Instant::now(),
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(err)) => {
                    tracing::debug!(%err, "socket error");
                    break;
                }
            },
            Some(message) = outbound_rx.recv() => {
                if send_json(&mut sink, &message).await.is_err() {
                    break;
                }
            }
            _ = kick.kicked() => break,
            Some(event) = sfu_rx.recv() => {
                if let Flow::Leave = session.handle_sfu_event(event) {
                    break;
                }
            }
            _ = liveness.tick() => {
                if last_heard.elapsed() > PEER_TIMEOUT {
                    tracing::info!("client silent for too long");
                    break;
                }
                if last_ping.elapsed() >= PING_INTERVAL {
                    last_ping = Instant::now();
                    let ping = sink.send(Message::Ping(Default::default()));
                    if !matches!(tokio::time::timeout(PEER_TIMEOUT, ping).await, Ok(Ok(()))) {
                        break;
                    }
                }
            }
            _ = shutdown.changed() => {
                let _ = send_json(&mut sink, &ServerMessage::error(ErrorCode::ServerShutdown, "server shutting down", None)).await;
                close = Some(CloseFrame { code: 1001, reason: Utf8Bytes::from_static("server shutting down") });
                break;
            }
        }
    }
    session.leave().await;
    // Whatever was queued before leaving (e.g. an error reply) still goes out.
    while let Ok(message) = outbound_rx.try_recv() {
        if send_json(&mut sink, &message).await.is_err() {
            break;
        }
    }
    let _ = tokio::time::timeout(PEER_TIMEOUT, async {
        let _ = sink.send(Message::Close(close)).await;
        let _ = sink.close().await;
    })
    .await;
}

/// Writes one message. A client that does not read for [`PEER_TIMEOUT`] (its TCP window full)
/// counts as gone: a write never blocks the session for longer.
async fn send_json<S>(sink: &mut S, message: &ServerMessage) -> Result<(), ()>
where
    S: SinkExt<Message> + Unpin,
{
    let Ok(text) = serde_json::to_string(message) else {
        return Ok(());
    };
    match tokio::time::timeout(PEER_TIMEOUT, sink.send(Message::Text(text.into()))).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

fn candidate_init(candidate: CandidateInit) -> RTCIceCandidateInit {
    RTCIceCandidateInit {
        candidate: candidate.candidate,
        sdp_mid: candidate.sdp_mid,
        sdp_mline_index: candidate.sdp_mline_index,
        username_fragment: candidate.username_fragment,
        ..Default::default()
    }
}

fn valid_name(name: &str) -> bool {
    let trimmed = name.trim();
    !trimmed.is_empty() && trimmed.chars().count() <= 64
}

impl Session {
    fn reply(&self, message: ServerMessage) {
        self.outbound.send(message);
    }

    async fn handle_text(&mut self, text: &str) -> Flow {
        let message = match ClientMessage::decode(text) {
            Ok(message) => message,
            Err(err) => {
                tracing::debug!(code = ?err.code, message = %err.message, "refused a message");
                self.reply(ServerMessage::Error {
                    code: err.code,
                    message: err.message,
                    request_type: err.request_type,
                });
                return Flow::Continue;
            }
        };
        let kind = message.type_name();
        if let Err((code, text)) = self.handle(message).await {
            tracing::debug!(?code, %text, kind, "refused a message");
            self.reply(ServerMessage::error(code, text, Some(kind)));
            return Flow::Continue;
        }
        if kind == "leave" {
            Flow::Leave
        } else {
            Flow::Continue
        }
    }

    /// Checks that `peer_id` is the server and that the participant has joined.
    fn sfu_target(&self, peer_id: &str) -> Result<&Membership, (ErrorCode, String)> {
        let membership = self
            .membership
            .as_ref()
            .ok_or((ErrorCode::InvalidState, "send `join` first".to_owned()))?;
        if peer_id == SFU_PEER {
            Ok(membership)
        } else if membership.room.has_member(peer_id) {
            Err((
                ErrorCode::InvalidState,
                format!("the room is in sfu mode: address `{SFU_PEER}`, not `{peer_id}`"),
            ))
        } else {
            Err((
                ErrorCode::UnknownPeer,
                format!("no participant `{peer_id}` in this room"),
            ))
        }
    }

    async fn handle(&mut self, message: ClientMessage) -> Result<(), (ErrorCode, String)> {
        match message {
            ClientMessage::Join { name } => self.join(name).await,
            ClientMessage::Offer {
                peer_id,
                transport,
                sdp,
                tracks,
            } => {
                let membership = self.sfu_target(&peer_id)?;
                if transport != TransportName::Publish {
                    return Err((
                        ErrorCode::InvalidState,
                        "the server makes every offer on the subscribe connection".into(),
                    ));
                }
                let mut sources = HashMap::new();
                for track in tracks {
                    let source = Source::parse(&track.source).ok_or((
                        ErrorCode::BadRequest,
                        format!("unknown source `{}`", track.source),
                    ))?;
                    sources.insert(track.track_id, source);
                }
                let answer = membership
                    .publish
                    .answer(sdp, sources)
                    .await
                    .map_err(|err| (ErrorCode::InvalidSdp, err.to_string()))?;
                self.reply(ServerMessage::Answer {
                    peer_id: SFU_PEER,
                    transport: TransportName::Publish,
                    sdp: answer,
                });
                Ok(())
            }
            ClientMessage::Answer {
                peer_id,
                transport,
                sdp,
            } => {
                let membership = self.sfu_target(&peer_id)?;
                if transport != TransportName::Subscribe {
                    return Err((
                        ErrorCode::InvalidState,
                        "the publish connection takes offers, not answers".into(),
                    ));
                }
                membership
                    .negotiator
                    .send(NegotiatorCommand::Answer(sdp))
                    .await
                    .map_err(|_| (ErrorCode::Internal, "subscribe connection is gone".into()))
            }
            ClientMessage::IceCandidate {
                peer_id,
                transport,
                candidate,
            } => {
                let membership = self.sfu_target(&peer_id)?;
                let Some(candidate) = candidate.filter(|c| !c.candidate.is_empty()) else {
                    return Ok(()); // End of candidates: nothing to do for an ICE-lite-like server.
                };
                let candidate = candidate_init(candidate);
                match transport {
                    TransportName::Publish => membership
                        .publish
                        .add_ice_candidate(candidate)
                        .await
                        .map_err(|err| {
                            (ErrorCode::BadRequest, format!("candidate refused: {err}"))
                        }),
                    TransportName::Subscribe => membership
                        .negotiator
                        .send(NegotiatorCommand::Candidate(candidate))
                        .await
                        .map_err(|_| (ErrorCode::Internal, "subscribe connection is gone".into())),
                }
            }
            ClientMessage::Mute { track_id, muted } => {
                let membership = self.sfu_target(SFU_PEER)?;
                membership
                    .room
                    .set_muted(&membership.participant, &track_id, muted);
                Ok(())
            }
            ClientMessage::Leave => Ok(()),
        }
    }

    async fn join(&mut self, name: Option<String>) -> Result<(), (ErrorCode, String)> {
        if self.membership.is_some() {
            return Err((ErrorCode::InvalidState, "already joined".into()));
        }
        let name = name.unwrap_or_else(|| self.claims.sub.clone());
        if !valid_name(&name) {
            return Err((
                ErrorCode::BadRequest,
                "a name is 1 to 64 characters, not only spaces".into(),
            ));
        }
        let name = name.trim().to_owned();
        let participant = ParticipantId::random();
        // Transports first: once in the room, the participant must be able to take offers.
        let sfu = &self.state.sfu;
        let internal =
            |err: sfu::SfuError| (ErrorCode::Internal, format!("media transport: {err}"));
        let publish = sfu
            .publish_transport(participant.clone(), self.sfu_events.clone())
            .await
            .map_err(internal)?;
        let mut subscribe = match sfu
            .subscribe_transport(participant.clone(), self.sfu_events.clone())
            .await
        {
            Ok(subscribe) => subscribe,
            Err(err) => {
                publish.close().await;
                return Err(internal(err));
            }
        };
        let (negotiator, negotiator_rx) = mpsc::channel(64);
        let (room_commands, room_commands_rx) = mpsc::unbounded_channel();
        let config = &self.state.config;
        let joined = self.state.rooms.join(
            &self.claims.room,
            &participant,
            &name,
            self.outbound.clone(),
            room_commands,
            |room, peers| ServerMessage::Joined {
                participant_id: participant.to_string(),
                room: room.to_owned(),
                name: name.clone(),
                mode: "sfu",
                peers,
                ice_servers: config.ice_servers.clone(),
                max_video_bitrate: config.max_video_bitrate,
                protocol: PROTOCOL_VERSION,
            },
        );
        let joined = match joined {
            Ok(joined) => joined,
            Err(err) => {
                publish.close().await;
                subscribe.close().await;
                return Err(match err {
                    JoinError::NameTaken => (
                        ErrorCode::NameTaken,
                        format!("the name `{name}` is taken in this room"),
                    ),
                    JoinError::RoomFull(limit) => (
                        ErrorCode::RoomFull,
                        format!("the room is full ({limit} participants)"),
                    ),
                });
            }
        };
        tracing::Span::current().record("participant", participant.as_str());
        tracing::info!(%name, "joined");
        let negotiator_task = run_negotiator(
            subscribe,
            negotiator_rx,
            room_commands_rx,
            joined.publications,
            self.outbound.clone(),
            joined.room.clone(),
        );
        let tasks = self.state.tasks.clone();
        tokio::spawn(
            async move {
                let _alive = sfu::TaskGuard::new(&tasks.negotiators);
                negotiator_task.await;
            }
            .in_current_span(),
        );
        self.membership = Some(Membership {
            room: joined.room,
            participant,
            publish,
            negotiator,
        });
        Ok(())
    }

    fn handle_sfu_event(&mut self, event: SfuEvent) -> Flow {
        let Some(membership) = &self.membership else {
            return Flow::Continue;
        };
        match event {
            SfuEvent::PublicationStarted(publication) => {
                membership
                    .room
                    .add_publication(&membership.participant, publication);
                Flow::Continue
            }
            SfuEvent::PublicationEnded {
                participant,
                publication,
            } => {
                membership
                    .room
                    .remove_publication(&participant, &publication);
                Flow::Continue
            }
            SfuEvent::TransportFailed { kind, .. } => {
                tracing::info!(?kind, "media connection failed");
                Flow::Leave
            }
        }
    }

    async fn leave(&mut self) {
        let Some(membership) = self.membership.take() else {
            return;
        };
        self.state
            .rooms
            .leave(&membership.room, &membership.participant);
        // Dropping the negotiator's only sender ends it, and it closes the subscribe transport.
        drop(membership.negotiator);
        membership.publish.close().await;
        tracing::info!("left");
    }
}
