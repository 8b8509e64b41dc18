//! One task per signaling socket: decodes frames, drives the participant's transports, relays
//! room events, and cleans up on every way out.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use sfu::{
    DeclaredTrack, ParticipantId, PublishTransport, RTCIceCandidateInit, SfuEvent, Source,
    SubscribeTransport,
};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::auth::{Claims, Grants};
use crate::budget::Budget;
use crate::cluster::{Placement, Service};
use crate::error::SignalError;
use crate::matching::Place;
use crate::metrics::ErrorCounts;
use crate::protocol::{
    CHAT_BURST, CHAT_PER_SECOND, CandidateInit, ClientMessage, ErrorCode, MAX_CHAT_CHARS,
    MAX_FRAME_BYTES, MAX_ID_BYTES, MAX_TRACK_ID_BYTES, MAX_TRACKS, MAX_VIEW_PIXELS, Mode,
    ModePhase, PROTOCOL_VERSION, RELAY_BURST, RELAY_PER_SECOND, SFU_PEER, ServerMessage, TrackInfo,
    TransportName,
};
use crate::room::{
    JoinError, Joiner, NegotiatorCommand, Outbound, RelayError, Room, SfuLinkId, ToSession,
    run_negotiator,
};
use crate::state::AppState;

/// Interval between server pings.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);
/// Silence after which a client is taken as gone: three unanswered pings, so that a dead peer
/// is out of the room well within 10 seconds.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(7);
/// How often silence is checked.
const LIVENESS_CHECK: Duration = Duration::from_millis(500);
const OUTBOUND_QUEUE: usize = 1024;
/// Most queued messages written before one flush.
const MAX_MESSAGES_PER_WRITE: usize = 64;
/// Bytes of SDP and candidates a participant may have relayed in a burst, and per second after
/// it: a message count alone would let 64 KiB messages fill another participant's queue.
const RELAY_BYTES_BURST: f64 = 512.0 * 1024.0;
const RELAY_BYTES_PER_SECOND: f64 = 128.0 * 1024.0;
/// What a relayed message costs beyond its SDP.
const RELAY_MESSAGE_BYTES: usize = 256;

/// A participant's connections to the server (SFU mode, and during a switch).
struct SfuLink {
    id: SfuLinkId,
    publish: PublishTransport,
    negotiator: mpsc::Sender<NegotiatorCommand>,
}

/// Transports opened but not yet attached to the room.
struct OpenTransports {
    publish: PublishTransport,
    subscribe: SubscribeTransport,
    events: mpsc::UnboundedReceiver<SfuEvent>,
}

impl OpenTransports {
    async fn close(mut self) {
        self.publish.close().await;
        self.subscribe.close().await;
    }
}

struct Membership {
    room: Arc<Room>,
    participant: ParticipantId,
    sfu: Option<SfuLink>,
}

struct Session {
    state: AppState,
    claims: Claims,
    /// The client's address, for limits per address.
    peer: Option<IpAddr>,
    outbound: Outbound,
    /// Events of the current SFU transports; replaced with them, so that a closed transport's
    /// late events are never mistaken for the current one's.
    sfu_events: Option<mpsc::UnboundedReceiver<SfuEvent>>,
    membership: Option<Membership>,
    /// The session's id in the lobby, when it entered the lobby instead of a room.
    lobby_peer: Option<String>,
    /// Its place in the waiting queue, when it looks for a partner instead.
    match_place: Option<Place>,
    relay_budget: Budget,
    relay_bytes: Budget,
    chat_budget: Budget,
    /// Set when the session must end once the current reply is out.
    ending: bool,
    /// How many SFU links this session has opened: the next one's id.
    sfu_links_opened: u64,
    /// The close code and reason when the session itself decides to end.
    close: Option<(u16, &'static str)>,
}

/// What a queued entry sends to the client, given the participant's current SFU connections:
/// an offer or answer made for others (since closed) is dropped.
fn to_client(entry: ToSession, current: Option<SfuLinkId>) -> Option<ServerMessage> {
    match entry {
        ToSession::Send(message) => Some(message),
        ToSession::Mode {
            mode,
            phase,
            switch,
        } => Some(ServerMessage::Mode {
            mode,
            phase,
            switch,
        }),
        ToSession::Sfu { link, message } => (current == Some(link)).then_some(message),
    }
}

async fn next_sfu_event(events: &mut Option<mpsc::UnboundedReceiver<SfuEvent>>) -> SfuEvent {
    match events {
        Some(rx) => match rx.recv().await {
            Some(event) => event,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

enum Flow {
    Continue,
    Leave,
}

/// Serves one upgraded socket until the client leaves, goes silent, or the server stops.
pub async fn serve(socket: WebSocket, state: AppState, claims: Claims, peer: Option<IpAddr>) {
    let tasks = state.tasks.clone();
    let _alive = sfu::TaskGuard::new(&tasks.sessions);
    let span = tracing::info_span!("session", room = %claims.room, user = %claims.sub, participant = tracing::field::Empty);
    run(socket, state, claims, peer).instrument(span).await
}

async fn run(socket: WebSocket, state: AppState, claims: Claims, peer: Option<IpAddr>) {
    let (mut sink, mut stream) = socket.split();
    let (outbound, mut outbound_rx) = Outbound::new(OUTBOUND_QUEUE);
    let kick = outbound.clone();
    let mut shutdown = state.shutdown.clone();
    let mut session = Session::new(state, claims, peer, outbound);
    let refusals = session.state.refusals.clone();
    let mut liveness = tokio::time::interval(LIVENESS_CHECK);
    let opened = Instant::now();
    let join_timeout = Duration::from_secs(session.state.config.join_timeout_secs);
    let mut last_heard = Instant::now();
    let mut last_ping = Instant::now();
    let mut close: Option<CloseFrame> = None;
    'session: loop {
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
                    if is_too_large(&err) {
                        let err = SignalError::FrameTooLarge(MAX_FRAME_BYTES);
                        let _ = send_json(&mut sink, &refusals.signaling, &ServerMessage::error(err.code(), err.to_string(), None)).await;
                        close = Some(CloseFrame { code: 1009, reason: Utf8Bytes::from_static("message too big") });
                    }
                    break;
                }
            },
            Some(entry) = outbound_rx.recv() => {
                // Whatever else is queued goes out in the same write: under a burst (a crowd
                // arriving in the lobby or a room), one flush for many messages, not one each.
                let mut next = Some(entry);
                let mut fed = 0;
                while let Some(entry) = next.take() {
                    if let ToSession::Mode { mode, phase, .. } = &entry {
                        // What came before goes out now: opening connections takes a while.
                        if fed > 0 && !matches!(tokio::time::timeout(PEER_TIMEOUT, sink.flush()).await, Ok(Ok(()))) {
                            break 'session;
                        }
                        // Applied before the client hears of it: its next message may rely on it.
                        if let Err(err) = session.apply_mode(*mode, *phase).await {
                            let _ = send_json(&mut sink, &refusals.signaling, &ServerMessage::error(err.code(), err.to_string(), None)).await;
                            close = Some(CloseFrame { code: 1011, reason: Utf8Bytes::from_static("media connections failed") });
                            break 'session;
                        }
                    }
                    match to_client(entry, session.current_sfu_link()) {
                        Some(message) => {
                            if feed_json(&mut sink, &refusals.signaling, &message).await.is_err() {
                                break 'session;
                            }
                            fed += 1;
                        }
                        None => tracing::debug!("a message for closed SFU connections dropped"),
                    }
                    if fed < MAX_MESSAGES_PER_WRITE {
                        next = outbound_rx.try_recv().ok();
                    }
                }
                if !matches!(tokio::time::timeout(PEER_TIMEOUT, sink.flush()).await, Ok(Ok(()))) {
                    break;
                }
            }
            why = kick.kicked() => {
                let (error, message) = why.error();
                let _ = send_json(&mut sink, &refusals.signaling, &ServerMessage::error(error, message, None)).await;
                let (code, reason) = why.close();
                close = Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) });
                break;
            }
            event = next_sfu_event(&mut session.sfu_events) => {
                if let Flow::Leave = session.handle_sfu_event(event) {
                    break;
                }
            }
            _ = liveness.tick() => {
                if session.membership.is_none() && session.lobby_peer.is_none() && session.match_place.is_none() && opened.elapsed() > join_timeout {
                    // A socket that never joins only holds memory and a descriptor.
                    let err = SignalError::JoinTimeout(join_timeout.as_secs());
                    tracing::debug!("no join before the deadline");
                    let _ = send_json(&mut sink, &refusals.signaling, &ServerMessage::error(err.code(), err.to_string(), None)).await;
                    close = Some(CloseFrame { code: 1008, reason: Utf8Bytes::from_static("no join") });
                    break;
                }
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
                let _ = send_json(&mut sink, &refusals.signaling, &ServerMessage::error(ErrorCode::ServerShutdown, "server shutting down", None)).await;
                close = Some(CloseFrame { code: 1001, reason: Utf8Bytes::from_static("server shutting down") });
                break;
            }
        }
    }
    if close.is_none()
        && let Some((code, reason)) = session.close
    {
        close = Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        });
    }
    session.leave().await;
    // Whatever was queued before leaving (e.g. an error reply) still goes out.
    while let Ok(entry) = outbound_rx.try_recv() {
        let Some(message) = to_client(entry, None) else {
            continue;
        };
        if send_json(&mut sink, &refusals.signaling, &message)
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = tokio::time::timeout(PEER_TIMEOUT, async {
        let _ = sink.send(Message::Close(close)).await;
        let _ = sink.close().await;
    })
    .await;
}

/// What a socket enters: its token's room, or a service of a node.
#[derive(Clone, Copy, Debug)]
enum Destination {
    Room,
    Service(Service),
}

/// True when a read failed because the frame or message was larger than the socket reads.
fn is_too_large(err: &axum::Error) -> bool {
    // The WebSocket library's own error type is not exposed; its text is stable.
    let text = err.to_string();
    text.contains("Space limit exceeded") || text.contains("Message too long")
}

/// Writes one message and flushes it. A client that does not read for [`PEER_TIMEOUT`] (its TCP
/// window full) counts as gone: a write never blocks the session for longer.
async fn send_json<S>(sink: &mut S, errors: &ErrorCounts, message: &ServerMessage) -> Result<(), ()>
where
    S: SinkExt<Message> + Unpin,
{
    feed_json(sink, errors, message).await?;
    match tokio::time::timeout(PEER_TIMEOUT, sink.flush()).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Queues one message in the socket's write buffer (written once it holds a few KiB, or at the
/// next flush), within [`PEER_TIMEOUT`].
async fn feed_json<S>(sink: &mut S, errors: &ErrorCounts, message: &ServerMessage) -> Result<(), ()>
where
    S: SinkExt<Message> + Unpin,
{
    if let ServerMessage::Error { code, .. } = message {
        errors.add(*code);
    }
    let Ok(text) = serde_json::to_string(message) else {
        return Ok(());
    };
    match tokio::time::timeout(PEER_TIMEOUT, sink.feed(Message::Text(text.into()))).await {
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

/// Checks the `tracks` of a description.
fn parse_tracks(tracks: &[TrackInfo]) -> Result<Vec<DeclaredTrack>, SignalError> {
    if tracks.len() > MAX_TRACKS {
        return Err(SignalError::TooManyTracks);
    }
    tracks
        .iter()
        .map(|track| {
            check_track_id(&track.track_id)?;
            if let Some(mid) = &track.mid {
                check_track_id(mid)?;
            }
            let source = Source::parse(&track.source)
                .ok_or_else(|| SignalError::UnknownSource(track.source.clone()))?;
            Ok(DeclaredTrack {
                track_id: track.track_id.clone(),
                source,
                mid: track.mid.clone(),
            })
        })
        .collect()
}

/// Refuses a `trackId` (or `mid`) longer than any stack makes: each is relayed or broadcast.
fn check_track_id(id: &str) -> Result<(), SignalError> {
    if id.len() > MAX_TRACK_ID_BYTES {
        return Err(SignalError::TrackIdTooLong(id.len()));
    }
    Ok(())
}

/// Refuses a lobby id, call id or room name longer than the server makes: each is echoed in
/// errors.
fn check_id(id: &str) -> Result<(), SignalError> {
    if id.len() > MAX_ID_BYTES {
        return Err(SignalError::IdTooLong(id.len()));
    }
    Ok(())
}

/// 1 to 64 characters, not only spaces, and nothing invisible: control characters and the
/// zero-width and direction marks would let two names that look the same both be taken.
fn valid_name(name: &str) -> bool {
    let trimmed = name.trim();
    !trimmed.is_empty()
        && trimmed.chars().count() <= 64
        && !trimmed.chars().any(crate::room::invisible)
}

impl Session {
    fn new(state: AppState, claims: Claims, peer: Option<IpAddr>, outbound: Outbound) -> Self {
        Session {
            state,
            claims,
            peer,
            outbound,
            sfu_events: None,
            membership: None,
            lobby_peer: None,
            match_place: None,
            relay_budget: Budget::new(RELAY_BURST, RELAY_PER_SECOND),
            relay_bytes: Budget::new(RELAY_BYTES_BURST, RELAY_BYTES_PER_SECOND),
            ending: false,
            sfu_links_opened: 0,
            close: None,
            chat_budget: Budget::new(CHAT_BURST, CHAT_PER_SECOND),
        }
    }

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
        if let Err(err) = self.handle(message).await {
            let code = err.code();
            tracing::debug!(?code, %err, kind, "refused a message");
            self.reply(ServerMessage::error(code, err.to_string(), Some(kind)));
            return if self.ending {
                Flow::Leave
            } else {
                Flow::Continue
            };
        }
        if kind == "leave" || self.ending {
            Flow::Leave
        } else {
            Flow::Continue
        }
    }

    fn membership(&self) -> Result<&Membership, SignalError> {
        self.membership.as_ref().ok_or(SignalError::NotJoined)
    }

    /// The participant's SFU connections, when `peer_id` is the server.
    fn sfu_link(&self) -> Result<&SfuLink, SignalError> {
        self.membership()?.sfu.as_ref().ok_or(SignalError::MeshMode)
    }

    /// Hands the message `make` builds (from the sender's id) to participant `to`, within the
    /// relay budgets.
    fn relay(
        &mut self,
        to: &str,
        make: impl FnOnce(String) -> ServerMessage,
    ) -> Result<(), SignalError> {
        let membership = self.membership()?;
        if self.claims.grants.needs_sfu() {
            return Err(SignalError::NotAllowed(
                "mesh connections: your grants are kept by the server's connections",
            ));
        }
        let (room, from) = (membership.room.clone(), membership.participant.clone());
        let message = make(from.to_string());
        // Everything relayed counts (SDP, `tracks`, candidates), as it will be sent.
        let bytes = RELAY_MESSAGE_BYTES + serde_json::to_vec(&message).map_or(0, |v| v.len());
        if !self.relay_budget.take() || !self.relay_bytes.take_n(bytes as f64) {
            return Err(SignalError::RelayRateLimited);
        }
        room.relay(&from, to, message).map_err(|err| match err {
            RelayError::SfuMode => SignalError::SfuMode(to.to_owned()),
            RelayError::UnknownPeer => SignalError::UnknownPeer(to.to_owned()),
            RelayError::ToSelf => SignalError::ToSelf,
        })
    }

    async fn handle(&mut self, message: ClientMessage) -> Result<(), SignalError> {
        match message {
            ClientMessage::Join { name, resume } => self.join(name, resume).await,
            ClientMessage::Offer {
                peer_id,
                transport,
                sdp,
                tracks,
            } => {
                let declared = parse_tracks(&tracks)?;
                if peer_id != SFU_PEER {
                    return self.relay(&peer_id, |me| ServerMessage::Offer {
                        peer_id: me,
                        transport: None,
                        sdp,
                        subscriptions: None,
                        tracks: Some(tracks),
                    });
                }
                let link = self.sfu_link()?;
                if transport != Some(TransportName::Publish) {
                    return Err(SignalError::OfferNotForPublish);
                }
                // Without the grant an offer may still carry the relay data channel (files),
                // but no audio or video.
                if !self.claims.grants.publish && offers_media(&sdp) {
                    return Err(SignalError::NotAllowed("publishing"));
                }
                let link_id = link.id;
                let answer = link
                    .publish
                    .answer(sdp, declared)
                    .await
                    .map_err(|err| SignalError::InvalidSdp(err.to_string()))?;
                // The room may settle in mesh while the answer is made: then it is not sent.
                self.outbound.queue(ToSession::Sfu {
                    link: link_id,
                    message: ServerMessage::Answer {
                        peer_id: SFU_PEER.to_owned(),
                        transport: Some(TransportName::Publish),
                        sdp: answer,
                        tracks: None,
                    },
                });
                Ok(())
            }
            ClientMessage::Answer {
                peer_id,
                transport,
                sdp,
                tracks,
            } => {
                parse_tracks(&tracks)?;
                if peer_id != SFU_PEER {
                    return self.relay(&peer_id, |me| ServerMessage::Answer {
                        peer_id: me,
                        transport: None,
                        sdp,
                        tracks: Some(tracks),
                    });
                }
                let link = self.sfu_link()?;
                if transport != Some(TransportName::Subscribe) {
                    return Err(SignalError::AnswerNotForSubscribe);
                }
                link.negotiator
                    .send(NegotiatorCommand::Answer(sdp))
                    .await
                    .map_err(|_| SignalError::SubscribeGone)
            }
            ClientMessage::IceCandidate {
                peer_id,
                transport,
                candidate,
            } => {
                if peer_id != SFU_PEER {
                    return self.relay(&peer_id, |me| ServerMessage::IceCandidate {
                        peer_id: me,
                        candidate,
                    });
                }
                let link = self.sfu_link()?;
                let transport = transport.ok_or(SignalError::CandidateWithoutTransport)?;
                let Some(candidate) = candidate.filter(|c| !c.candidate.is_empty()) else {
                    return Ok(()); // End of candidates: nothing to do for an ICE-lite-like server.
                };
                let candidate = candidate_init(candidate);
                match transport {
                    TransportName::Publish => link
                        .publish
                        .add_ice_candidate(candidate)
                        .await
                        .map_err(|err| SignalError::CandidateRefused(err.to_string())),
                    TransportName::Subscribe => link
                        .negotiator
                        .send(NegotiatorCommand::Candidate(candidate))
                        .await
                        .map_err(|_| SignalError::SubscribeGone),
                }
            }
            ClientMessage::Ready { mode, switch } => {
                let membership = self.membership()?;
                membership.room.ready(&membership.participant, mode, switch);
                Ok(())
            }
            ClientMessage::Mute { track_id, muted } => {
                check_track_id(&track_id)?;
                if !self.claims.grants.publish {
                    return Err(SignalError::NotAllowed("publishing"));
                }
                let recipients = self.membership()?.room.member_count().saturating_sub(1);
                // Sent to every other member: its bytes count once per recipient.
                let bytes = (RELAY_MESSAGE_BYTES + track_id.len()) * recipients;
                if !self.relay_budget.take() || !self.relay_bytes.take_n(bytes as f64) {
                    return Err(SignalError::ControlRateLimited("mute"));
                }
                let membership = self.membership()?;
                membership
                    .room
                    .set_muted(&membership.participant, &track_id, muted);
                Ok(())
            }
            ClientMessage::Chat { text } => {
                let membership = self.membership()?;
                let length = text.chars().count();
                if text.trim().is_empty() || length > MAX_CHAT_CHARS {
                    return Err(SignalError::BadChat(length));
                }
                let (room, participant) = (membership.room.clone(), membership.participant.clone());
                if !self.chat_budget.take() {
                    return Err(SignalError::ChatRateLimited);
                }
                if !room.chat(&participant, text) {
                    return Err(SignalError::RoomChatRateLimited);
                }
                Ok(())
            }
            ClientMessage::Pause {
                publication_id,
                paused,
            } => {
                self.membership()?;
                let command = NegotiatorCommand::Pause(publication_id.as_str().into(), paused);
                self.ask_negotiator("pause", command).await
            }
            ClientMessage::View {
                publication_id,
                width,
                height,
            } => {
                self.membership()?;
                let size = u16::try_from(width)
                    .ok()
                    .zip(u16::try_from(height).ok())
                    .filter(|&(w, h)| {
                        (1..=MAX_VIEW_PIXELS).contains(&u32::from(w))
                            && (1..=MAX_VIEW_PIXELS).contains(&u32::from(h))
                    })
                    .ok_or(SignalError::BadView(width, height))?;
                let command = NegotiatorCommand::View(publication_id.as_str().into(), size);
                self.ask_negotiator("view", command).await
            }
            ClientMessage::MeshFailed { peer_id } => {
                let membership = self.membership()?;
                membership
                    .room
                    .mesh_failed(&membership.participant, peer_id.as_deref());
                Ok(())
            }
            ClientMessage::Lobby { name } => self.enter_lobby(name).await,
            ClientMessage::Call { peer_id, room } => {
                check_id(&peer_id)?;
                if let Some(room) = &room {
                    check_id(room)?;
                }
                let me = self.lobby_peer()?.to_owned();
                if !self.relay_budget.take() {
                    return Err(SignalError::ControlRateLimited("call"));
                }
                let state = &self.state;
                let call = state
                    .lobby
                    .call(&me, &peer_id, room.as_deref(), &state.rooms)?;
                tracing::debug!(%call, "calling");
                Ok(())
            }
            ClientMessage::AcceptCall { call_id } => {
                check_id(&call_id)?;
                let me = self.lobby_peer()?;
                Ok(self
                    .state
                    .lobby
                    .accept(me, &call_id, &self.state.auth, &self.state.rooms)?)
            }
            ClientMessage::DeclineCall { call_id } => {
                check_id(&call_id)?;
                let me = self.lobby_peer()?;
                Ok(self.state.lobby.decline(me, &call_id)?)
            }
            ClientMessage::CancelCall { call_id } => {
                check_id(&call_id)?;
                let me = self.lobby_peer()?;
                Ok(self.state.lobby.cancel(me, &call_id)?)
            }
            ClientMessage::FindPartner { name, resume } => self.find_partner(name, resume).await,
            ClientMessage::Next => {
                let place = self.match_id()?.to_owned();
                if !self.relay_budget.take() {
                    return Err(SignalError::ControlRateLimited("next"));
                }
                Ok(self.state.matching.next(&place, &self.state.auth)?)
            }
            ClientMessage::Stop => {
                let place = self.match_id()?;
                self.state.matching.stop(place);
                Ok(())
            }
            ClientMessage::Leave => {
                // Said, not dropped: no place is kept for a reconnect.
                if let Some(place) = &self.match_place {
                    self.state.matching.stop(&place.id);
                }
                Ok(())
            }
        }
    }

    /// Enters the waiting queue (or takes a dropped place back), or queues again after a match
    /// or a stop.
    async fn find_partner(
        &mut self,
        name: Option<String>,
        resume: Option<String>,
    ) -> Result<(), SignalError> {
        if let Some(resume) = &resume {
            check_id(resume)?;
        }
        if let Some(place) = &self.match_place {
            if !self.relay_budget.take() {
                return Err(SignalError::ControlRateLimited("find_partner"));
            }
            return Ok(self
                .state
                .matching
                .find_again(&place.id, &self.state.auth)?);
        }
        let name = self.entering(name)?;
        if !self.claims.grants.lobby {
            return Err(SignalError::NotAllowed("meeting strangers"));
        }
        self.state
            .limits
            .join_from(self.peer)
            .map_err(SignalError::JoinRateLimited)?;
        let open_here = !self.state.matching.is_empty();
        if self
            .redirected(Destination::Service(Service::Queue), open_here)
            .await?
        {
            return Ok(());
        }
        let place = self.state.matching.find(
            &name,
            &self.claims.sub,
            self.claims.grants,
            self.outbound.clone(),
            resume.as_deref(),
            &self.state.auth,
        )?;
        tracing::Span::current().record("participant", place.id.as_str());
        tracing::info!(%name, "looking for a partner");
        self.match_place = Some(place);
        Ok(())
    }

    fn match_id(&self) -> Result<&str, SignalError> {
        self.match_place
            .as_ref()
            .map(|place| place.id.as_str())
            .ok_or(SignalError::NotFinding)
    }

    /// The display name of a `join` or `lobby` (default: the token's userId), trimmed; refused
    /// when the socket is in a room or the lobby already.
    fn entering(&self, name: Option<String>) -> Result<String, SignalError> {
        if self.membership.is_some() || self.lobby_peer.is_some() || self.match_place.is_some() {
            return Err(SignalError::AlreadyJoined);
        }
        let name = name.unwrap_or_else(|| self.claims.sub.clone());
        if !valid_name(&name) {
            return Err(SignalError::BadName);
        }
        Ok(name.trim().to_owned())
    }

    fn lobby_peer(&self) -> Result<&str, SignalError> {
        self.lobby_peer.as_deref().ok_or(SignalError::NotInLobby)
    }

    /// Enters the lobby: `lobby_joined` to this session, `online` to everyone else there.
    async fn enter_lobby(&mut self, name: Option<String>) -> Result<(), SignalError> {
        let name = self.entering(name)?;
        if !self.claims.grants.lobby {
            return Err(SignalError::NotAllowed("entering the lobby"));
        }
        self.state
            .limits
            .join_from(self.peer)
            .map_err(SignalError::JoinRateLimited)?;
        let open_here = !self.state.lobby.is_empty();
        if self
            .redirected(Destination::Service(Service::Lobby), open_here)
            .await?
        {
            return Ok(());
        }
        let entered = self.state.lobby.enter(
            &name,
            &self.claims.sub,
            self.claims.grants,
            self.outbound.clone(),
        )?;
        tracing::Span::current().record("participant", entered.peer_id.as_str());
        tracing::info!(%name, "entered the lobby");
        self.lobby_peer = Some(entered.peer_id);
        Ok(())
    }

    /// In a cluster, whether the token's room (or the lobby, or the queue) lives on another
    /// node: then the client is told `redirect` there, and this socket ends.
    async fn redirected(
        &mut self,
        destination: Destination,
        open_here: bool,
    ) -> Result<bool, SignalError> {
        let Some(cluster) = &self.state.cluster else {
            return Ok(false);
        };
        let placement = match destination {
            Destination::Room => cluster.place(&self.claims.room, open_here).await?,
            Destination::Service(service) => cluster.place_service(service, open_here).await?,
        };
        let Placement::Elsewhere { node, url } = placement else {
            return Ok(false);
        };
        tracing::debug!(%node, %url, ?destination, "hosted on another node: redirecting");
        self.reply(ServerMessage::Redirect {
            url,
            room: self.claims.room.clone(),
        });
        // The client goes there; this socket has nothing more to do.
        self.ending = true;
        Ok(true)
    }

    async fn join(
        &mut self,
        name: Option<String>,
        resume: Option<String>,
    ) -> Result<(), SignalError> {
        let name = self.entering(name)?;
        self.state
            .limits
            .join(self.peer, &self.claims.room)
            .map_err(SignalError::JoinRateLimited)?;
        let open_here = self.state.rooms.contains(&self.claims.room);
        if self.redirected(Destination::Room, open_here).await? {
            return Ok(());
        }
        let participant = ParticipantId::random();
        // A participant who will be in SFU mode gets its transports before it enters: once in,
        // it must be able to take offers, and a failure must not show up as a join and a leave.
        let mut transports = None;
        let grants = self.claims.grants;
        if self.state.rooms.mode_for_join(&self.claims.room, grants) == Mode::Sfu {
            transports = Some(self.open_transports(&participant).await?);
        }
        let config = &self.state.config;
        let joined = self.state.rooms.join(
            &self.claims.room,
            Joiner {
                id: &participant,
                name: &name,
                user: &self.claims.sub,
                resume: resume.as_deref(),
                grants,
            },
            self.outbound.clone(),
            |room, mode, peers, chat, resume_token| ServerMessage::Joined {
                participant_id: participant.to_string(),
                room: room.to_owned(),
                name: name.clone(),
                mode,
                peers,
                chat,
                resume_token: resume_token.to_owned(),
                ice_servers: config
                    .ice_servers
                    .iter()
                    .cloned()
                    .chain(crate::turn::ice_server(config, &self.claims.sub))
                    .collect(),
                max_video_bitrate: config.max_video_bitrate,
                grants,
                protocol: PROTOCOL_VERSION,
            },
        );
        let joined = match joined {
            Ok(joined) => joined,
            Err(err) => {
                if let Some(transports) = transports {
                    transports.close().await;
                }
                return Err(match err {
                    JoinError::NameTaken => SignalError::NameTaken(name),
                    JoinError::RoomFull(limit) => SignalError::RoomFull(limit),
                    JoinError::TooManyRooms(limit) => SignalError::TooManyRooms(limit),
                });
            }
        };
        tracing::Span::current().record("participant", participant.as_str());
        tracing::info!(%name, mode = joined.mode.as_str(), "joined");
        self.membership = Some(Membership {
            room: joined.room,
            participant,
            sfu: None,
        });
        match (joined.mode, transports) {
            (Mode::Sfu, Some(transports)) => self.attach_sfu(transports),
            (Mode::Sfu, None) => {
                if let Err(refusal) = self.start_sfu().await {
                    // `joined` is already queued: the client is told, and the socket closes.
                    self.leave().await;
                    self.ending = true;
                    return Err(refusal);
                }
            }
            (Mode::Mesh, Some(transports)) => transports.close().await,
            (Mode::Mesh, None) => {}
        }
        Ok(())
    }

    async fn open_transports(
        &self,
        participant: &ParticipantId,
    ) -> Result<OpenTransports, SignalError> {
        let sfu = &self.state.sfu;
        // Unbounded: media-plane events per participant are bounded by its publications, and the
        // webrtc-rs driver that sends them must never wait on this socket.
        let (events_tx, events) = mpsc::unbounded_channel();
        let publish = sfu
            .publish_transport(participant.clone(), events_tx.clone())
            .await?;
        let subscribe = match sfu
            .subscribe_transport(participant.clone(), events_tx)
            .await
        {
            Ok(subscribe) => subscribe,
            Err(err) => {
                publish.close().await;
                return Err(err.into());
            }
        };
        Ok(OpenTransports {
            publish,
            subscribe,
            events,
        })
    }

    /// Opens and attaches SFU transports, unless the participant has them.
    async fn start_sfu(&mut self) -> Result<(), SignalError> {
        let Some(membership) = &self.membership else {
            return Ok(());
        };
        if membership.sfu.is_some() {
            return Ok(());
        }
        let participant = membership.participant.clone();
        let transports = self.open_transports(&participant).await?;
        self.attach_sfu(transports);
        Ok(())
    }

    /// Puts opened transports in the room: the negotiator subscribes to what others publish.
    fn attach_sfu(&mut self, transports: OpenTransports) {
        let Some(membership) = &mut self.membership else {
            return;
        };
        let id = SfuLinkId(self.sfu_links_opened);
        self.sfu_links_opened += 1;
        let (negotiator, negotiator_rx) = mpsc::channel(64);
        let (room_commands, room_commands_rx) = mpsc::unbounded_channel();
        let initial = membership.room.attach_sfu(
            &membership.participant,
            room_commands,
            transports.publish.data_relay(),
        );
        let negotiator_task = run_negotiator(
            id,
            transports.subscribe,
            negotiator_rx,
            room_commands_rx,
            initial,
            self.outbound.clone(),
            membership.room.clone(),
        );
        let tasks = self.state.tasks.clone();
        tokio::spawn(
            async move {
                let _alive = sfu::TaskGuard::new(&tasks.negotiators);
                negotiator_task.await;
            }
            .in_current_span(),
        );
        self.sfu_events = Some(transports.events);
        membership.sfu = Some(SfuLink {
            id,
            publish: transports.publish,
            negotiator,
        });
    }

    /// The participant's SFU connections now. A server `offer` or `answer` made for others, that
    /// this session has closed since (a negotiator still finishing an offer when the room
    /// settled in mesh), is never sent: the client may already have new connections it would be
    /// applied to.
    fn current_sfu_link(&self) -> Option<SfuLinkId> {
        self.membership
            .as_ref()
            .and_then(|m| m.sfu.as_ref())
            .map(|l| l.id)
    }

    /// Closes the participant's SFU transports and takes its publications out of the room.
    async fn stop_sfu(&mut self) {
        let Some(membership) = &mut self.membership else {
            return;
        };
        let Some(link) = membership.sfu.take() else {
            return;
        };
        membership.room.detach_sfu(&membership.participant);
        self.sfu_events = None;
        // Dropping the negotiator's only sender ends it, and it closes the subscribe transport.
        drop(link.negotiator);
        link.publish.close().await;
    }

    /// Follows the room's mode: SFU transports come up when a switch to SFU starts, and go once
    /// the room has settled in mesh. A participant whose transports cannot open cannot stay in
    /// an SFU room: the error ends its session.
    async fn apply_mode(&mut self, mode: Mode, phase: ModePhase) -> Result<(), SignalError> {
        match (mode, phase) {
            (Mode::Sfu, _) => {
                if let Err(err) = self.start_sfu().await {
                    tracing::error!(%err, "cannot open SFU transports for a switch");
                    return Err(err);
                }
            }
            (Mode::Mesh, ModePhase::Settled) => self.stop_sfu().await,
            (Mode::Mesh, ModePhase::Switching) => {}
        }
        Ok(())
    }

    /// Hands a participant's request about its own subscriptions (`pause`, `view`) to its
    /// subscribe negotiator, within the control budget. In a mesh there are no server
    /// subscriptions: one that crossed a switch to mesh has nothing left to do.
    async fn ask_negotiator(
        &mut self,
        kind: &'static str,
        command: NegotiatorCommand,
    ) -> Result<(), SignalError> {
        if !self.relay_budget.take() {
            return Err(SignalError::ControlRateLimited(kind));
        }
        let Some(link) = self.membership.as_ref().and_then(|m| m.sfu.as_ref()) else {
            return Ok(());
        };
        link.negotiator
            .send(command)
            .await
            .map_err(|_| SignalError::SubscribeGone)
    }

    fn handle_sfu_event(&mut self, event: SfuEvent) -> Flow {
        let Some(membership) = &self.membership else {
            return Flow::Continue;
        };
        if membership.sfu.is_none() {
            return Flow::Continue;
        }
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
            SfuEvent::LayersWanted {
                publication,
                track_id,
                active,
                ..
            } => {
                self.reply(ServerMessage::Layers {
                    publication_id: publication.to_string(),
                    track_id,
                    active,
                });
                Flow::Continue
            }
            SfuEvent::Relayed(data) => {
                if let Some(link) = &membership.sfu {
                    let sender = link.publish.data_relay();
                    if let Err(data) = membership.room.relay_data(data, &sender) {
                        sender.notify(sfu::relay::Notice::Undeliverable { to: data.to });
                    }
                }
                Flow::Continue
            }
            SfuEvent::TransportFailed { kind, .. } => {
                tracing::info!(?kind, "media connection failed");
                // Said before the close, which says it too.
                let err = SignalError::MediaFailed;
                self.reply(ServerMessage::error(err.code(), err.to_string(), None));
                self.close = Some((1011, "media connection failed"));
                Flow::Leave
            }
        }
    }

    async fn leave(&mut self) {
        if let Some(place) = self.match_place.take() {
            self.state.matching.disconnected(&place);
            tracing::info!("left the waiting queue");
        }
        if let Some(peer) = self.lobby_peer.take() {
            self.state.lobby.leave(&peer);
            tracing::info!("left the lobby");
        }
        let Some(membership) = self.membership.take() else {
            return;
        };
        self.state
            .rooms
            .leave(&membership.room, &membership.participant);
        self.sfu_events = None;
        if let Some(link) = membership.sfu {
            // Dropping the negotiator's only sender ends it, and it closes the subscribe
            // transport.
            drop(link.negotiator);
            link.publish.close().await;
        }
        tracing::info!("left");
    }
}

/// What the dispatcher fuzz target in `fuzz/` drives: sessions of one room without sockets,
/// each message handled as a socket's would be. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Sessions of one room, fed text frames.
    pub struct Dispatcher {
        sessions: Vec<Option<(Session, mpsc::Receiver<ToSession>)>>,
    }

    impl Dispatcher {
        /// One session per entry of `grants`, each with a token for `room`.
        pub fn new(state: &AppState, room: &str, grants: &[Grants]) -> Self {
            let sessions = grants
                .iter()
                .enumerate()
                .map(|(index, grants)| {
                    let claims = Claims {
                        sub: format!("user-{index}"),
                        room: room.to_owned(),
                        iat: 0,
                        exp: u64::MAX,
                        nbf: None,
                        grants: *grants,
                    };
                    let (outbound, queue) = Outbound::new(OUTBOUND_QUEUE);
                    Some((Session::new(state.clone(), claims, None, outbound), queue))
                })
                .collect();
            Self { sessions }
        }

        /// Session `index` receives `text`; what the server queues for every session is taken
        /// off its queue (mode changes applied first, as a socket does). False once that
        /// session has ended.
        pub async fn text(&mut self, index: usize, text: &str) -> bool {
            let Some(slot) = self.sessions.get_mut(index) else {
                return false;
            };
            let Some((session, _)) = slot else {
                return false;
            };
            if let Flow::Leave = session.handle_text(text).await {
                if let Some((mut session, _)) = slot.take() {
                    session.leave().await;
                }
                return false;
            }
            self.drain().await;
            true
        }

        async fn drain(&mut self) {
            for slot in &mut self.sessions {
                let Some((session, queue)) = slot else {
                    continue;
                };
                while let Ok(entry) = queue.try_recv() {
                    if let ToSession::Mode { mode, phase, .. } = entry
                        && session.apply_mode(mode, phase).await.is_err()
                    {
                        if let Some((mut session, _)) = slot.take() {
                            session.leave().await;
                        }
                        break;
                    }
                }
            }
        }

        /// Every session leaves, as its socket closing would make it.
        pub async fn leave_all(mut self) {
            for slot in &mut self.sessions {
                if let Some((mut session, _)) = slot.take() {
                    // As a client that says `leave`: no waiting place is kept for a reconnect.
                    let _ = session.handle(ClientMessage::Leave).await;
                    session.leave().await;
                }
            }
        }
    }
}

/// Whether an SDP has an audio or video section.
fn offers_media(sdp: &str) -> bool {
    sdp.lines()
        .any(|line| line.starts_with("m=audio") || line.starts_with("m=video"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscribe_offer() -> ServerMessage {
        ServerMessage::Offer {
            peer_id: SFU_PEER.to_owned(),
            transport: Some(TransportName::Subscribe),
            sdp: String::new(),
            subscriptions: Some(Vec::new()),
            tracks: None,
        }
    }

    fn publish_answer() -> ServerMessage {
        ServerMessage::Answer {
            peer_id: SFU_PEER.to_owned(),
            transport: Some(TransportName::Publish),
            sdp: String::new(),
            tracks: None,
        }
    }

    #[test]
    fn offers_and_answers_of_closed_sfu_connections_are_not_sent() {
        let (old, new) = (SfuLinkId(0), SfuLinkId(1));
        for message in [subscribe_offer(), publish_answer()] {
            let made = || ToSession::Sfu {
                link: old,
                message: message.clone(),
            };
            assert!(
                to_client(made(), Some(new)).is_none(),
                "{message:?} after a reopen"
            );
            assert!(to_client(made(), None).is_none(), "{message:?} once closed");
            assert!(
                to_client(made(), Some(old)).is_some(),
                "{message:?} while open"
            );
        }
        // Relayed mesh messages belong to no SFU connection.
        for relayed in [subscribe_offer(), publish_answer()] {
            assert!(to_client(ToSession::Send(relayed.clone()), None).is_some());
            assert!(to_client(ToSession::Send(relayed), Some(new)).is_some());
        }
    }

    #[test]
    fn a_mode_change_reaches_the_client_as_the_mode_message() {
        let entry = ToSession::Mode {
            mode: Mode::Sfu,
            phase: ModePhase::Switching,
            switch: 3,
        };
        let message = to_client(entry, None).map(|m| serde_json::to_value(&m).ok());
        assert_eq!(
            message.flatten(),
            Some(
                serde_json::json!({"type": "mode", "mode": "sfu", "phase": "switching", "switch": 3})
            )
        );
    }
}
