//! Signaling protocol v1: the messages of docs/protocol.md, as Rust types.

use serde::{Deserialize, Serialize};

/// Version announced in `joined`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest text frame accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Largest frame or message the socket reads at all: anything between [`MAX_MESSAGE_BYTES`]
/// and this is answered with `too_large`; beyond it the socket closes with 1009.
pub const MAX_FRAME_BYTES: usize = 16 * MAX_MESSAGE_BYTES;
/// The pseudo-peer naming the server.
pub const SFU_PEER: &str = "sfu";

/// Error codes: the contract on the wire (the message text is for humans).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not a JSON object, a missing or mistyped field, or a binary frame.
    BadRequest,
    /// `type` names no message of this protocol.
    UnknownType,
    /// The frame is over [`MAX_MESSAGE_BYTES`].
    TooLarge,
    /// The message is out of order.
    InvalidState,
    /// `peerId` names nobody in this room.
    UnknownPeer,
    /// (HTTP only) the room named is not open, or has no such participant.
    UnknownRoom,
    /// The SDP could not be parsed or applied.
    InvalidSdp,
    /// The display name is taken in this room.
    NameTaken,
    /// The room is at its participant limit.
    RoomFull,
    /// The server hosts its limit of rooms, and the join would open another.
    ServerFull,
    /// The token or API key is missing, invalid or expired, or grants too little (HTTP only).
    Unauthorized,
    /// The request's `Origin` is not allowed to use this server (HTTP only).
    ForbiddenOrigin,
    /// Too many messages relayed to other participants in a short time.
    RateLimited,
    /// The server is shutting down.
    ServerShutdown,
    /// A newer connection of the same client resumed this session; this socket closes.
    Replaced,
    /// An admin removed the participant from the room; the socket closes.
    Removed,
    /// An admin ended the room; the socket closes.
    RoomEnded,
    /// The server failed.
    Internal,
    /// The participant's token does not grant this (publishing, subscribing).
    NotAllowed,
    /// A node of a cluster cannot reach the cluster's store, so it cannot open a room it does
    /// not already host; try again shortly.
    ClusterUnavailable,
}

impl ErrorCode {
    /// Every code, in declaration order: `ALL[code as usize] == code`.
    pub const ALL: [ErrorCode; 20] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownType,
        ErrorCode::TooLarge,
        ErrorCode::InvalidState,
        ErrorCode::UnknownPeer,
        ErrorCode::UnknownRoom,
        ErrorCode::InvalidSdp,
        ErrorCode::NameTaken,
        ErrorCode::RoomFull,
        ErrorCode::ServerFull,
        ErrorCode::Unauthorized,
        ErrorCode::ForbiddenOrigin,
        ErrorCode::RateLimited,
        ErrorCode::ServerShutdown,
        ErrorCode::Replaced,
        ErrorCode::Removed,
        ErrorCode::RoomEnded,
        ErrorCode::Internal,
        ErrorCode::NotAllowed,
        ErrorCode::ClusterUnavailable,
    ];

    /// The wire name (`bad_request`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::UnknownPeer => "unknown_peer",
            ErrorCode::UnknownRoom => "unknown_room",
            ErrorCode::InvalidSdp => "invalid_sdp",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::ServerFull => "server_full",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ForbiddenOrigin => "forbidden_origin",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ServerShutdown => "server_shutdown",
            ErrorCode::Replaced => "replaced",
            ErrorCode::Removed => "removed",
            ErrorCode::RoomEnded => "room_ended",
            ErrorCode::Internal => "internal",
            ErrorCode::NotAllowed => "not_allowed",
            ErrorCode::ClusterUnavailable => "cluster_unavailable",
        }
    }
}

/// Which of a participant's two connections a message is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportName {
    /// The client sends on it and makes its offers.
    Publish,
    /// The client receives on it and answers the server's offers.
    Subscribe,
}

/// How a room's media flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Peer to peer: every participant connects to every other; the server relays signaling.
    Mesh,
    /// Through the server: one publish and one subscribe connection per participant.
    Sfu,
}

impl Mode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Mesh => "mesh",
            Mode::Sfu => "sfu",
        }
    }
}

/// Where a room is in a change of [`Mode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModePhase {
    /// Bring up the new mode's connections; keep the old ones playing.
    Switching,
    /// Everyone receives through the new mode: close the old connections.
    Settled,
}

/// Most tracks a description may describe.
pub const MAX_TRACKS: usize = 16;
/// Longest `trackId` (and `mid`) a client may send, in bytes: browsers' ids are 36 to 38.
pub const MAX_TRACK_ID_BYTES: usize = 256;

/// Messages a participant may have relayed to others (and `mute` broadcasts) in a burst, and
/// per second after it: enough for several renegotiations with trickled candidates, too few to
/// flood a room.
pub const RELAY_BURST: f64 = 100.0;
/// See [`RELAY_BURST`].
pub const RELAY_PER_SECOND: f64 = 20.0;
/// Chat messages a participant may send in a burst, and per second after it.
pub const CHAT_BURST: f64 = 10.0;
/// See [`CHAT_BURST`].
pub const CHAT_PER_SECOND: f64 = 1.0;

/// A track the client sends, named by the track id of its `a=msid` line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackInfo {
    /// The msid track id (`MediaStreamTrack.id` in a browser).
    pub track_id: String,
    /// `microphone`, `camera` or `screen`.
    pub source: String,
    /// The media section carrying it (mesh: tells the receiver which section is which).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid: Option<String>,
    /// Whether the sender has muted it (mesh: a new peer learns the state from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub muted: Option<bool>,
}

/// An ICE candidate in the browser's `RTCIceCandidateInit` shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CandidateInit {
    /// The `candidate:` attribute; empty at the end of candidates.
    #[serde(default)]
    pub candidate: String,
    /// The m-section's mid.
    #[serde(default)]
    pub sdp_mid: Option<String>,
    /// The m-section's index.
    #[serde(default, rename = "sdpMLineIndex")]
    pub sdp_mline_index: Option<u16>,
    /// The ICE ufrag.
    #[serde(default)]
    pub username_fragment: Option<String>,
}

/// Messages from a client.
#[derive(Clone, Debug, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum ClientMessage {
    /// Enter the token's room.
    Join {
        /// Display name; the token's userId when absent.
        #[serde(default)]
        name: Option<String>,
        /// The `resumeToken` of an earlier `joined`: that participant, if still in the room
        /// (its connection lost but not yet noticed), is replaced by this one.
        #[serde(default)]
        resume: Option<String>,
    },
    /// An offer: of the publish connection (to `sfu`), or of a mesh connection (to a peer).
    Offer {
        /// `sfu` or a participant id.
        peer_id: String,
        /// `publish` (to `sfu` only).
        #[serde(default)]
        transport: Option<TransportName>,
        /// The SDP.
        sdp: String,
        /// What each sending track is.
        #[serde(default)]
        tracks: Vec<TrackInfo>,
    },
    /// An answer: to the server's subscribe offer, or to a peer's mesh offer.
    Answer {
        /// `sfu` or a participant id.
        peer_id: String,
        /// `subscribe` (to `sfu` only).
        #[serde(default)]
        transport: Option<TransportName>,
        /// The SDP.
        sdp: String,
        /// What each sending track is (mesh).
        #[serde(default)]
        tracks: Vec<TrackInfo>,
    },
    /// A trickled ICE candidate.
    #[serde(rename = "ice-candidate")]
    IceCandidate {
        /// `sfu` or a participant id.
        peer_id: String,
        /// Which connection it belongs to (to `sfu` only).
        #[serde(default)]
        transport: Option<TransportName>,
        /// The candidate; null at the end of candidates.
        candidate: Option<CandidateInit>,
    },
    /// The client receives every other participant's media through `mode`'s connections.
    Ready {
        /// The mode being switched to.
        mode: Mode,
        /// The `switch` number of the `mode` message this answers. Optional; with it, a `ready`
        /// that crossed a newer switch to the same mode is not taken for that one.
        #[serde(default)]
        switch: Option<u64>,
    },
    /// A published track was muted or unmuted.
    Mute {
        /// The msid track id.
        track_id: String,
        /// Muted or not.
        muted: bool,
    },
    /// A mesh connection cannot connect (no route between the peers): the room must use the SFU.
    #[serde(rename = "mesh_failed")]
    MeshFailed {
        /// The participant it could not reach, for the logs.
        #[serde(default)]
        peer_id: Option<String>,
    },
    /// Stop or resume receiving one publication through the server (its video is off screen).
    Pause {
        /// The publication, as named in `subscriptions`.
        publication_id: String,
        /// Paused or not.
        paused: bool,
    },
    /// The size at which the client shows one video it receives through the server, in device
    /// pixels: the server sends the smallest simulcast layer that covers it.
    View {
        /// The publication, as named in `subscriptions`.
        publication_id: String,
        /// 1 to [`MAX_VIEW_PIXELS`].
        width: u32,
        /// 1 to [`MAX_VIEW_PIXELS`].
        height: u32,
    },
    /// A chat message to everyone in the room.
    Chat {
        /// 1 to [`MAX_CHAT_CHARS`] characters, not only whitespace.
        text: String,
    },
    /// Enter the lobby instead of a room (the token must grant `lobby`).
    Lobby {
        /// The display name, unique in the lobby; default the token's userId.
        #[serde(default)]
        name: Option<String>,
    },
    /// Call someone online: into a new room of two, or into `room`, a call the caller is in.
    Call {
        /// The callee's lobby id.
        peer_id: String,
        /// A room the caller is in, to invite the callee to.
        #[serde(default)]
        room: Option<String>,
    },
    /// The callee accepts a ringing call.
    AcceptCall {
        /// As in `incoming_call`.
        call_id: String,
    },
    /// The callee declines a ringing call.
    DeclineCall {
        /// As in `incoming_call`.
        call_id: String,
    },
    /// The caller cancels its ringing call.
    CancelCall {
        /// As in `calling`.
        call_id: String,
    },
    /// Look for a partner: enter the waiting queue (the token must grant `lobby`), first
    /// message on a socket or again after a match or a stop.
    FindPartner {
        /// The display name the partner sees; default the token's userId.
        #[serde(default)]
        name: Option<String>,
        /// A `waiting.resume` of a place whose socket dropped: take it back.
        #[serde(default)]
        resume: Option<String>,
    },
    /// Leave the partner and queue again.
    Next,
    /// Stop looking: leave the queue, or the match.
    Stop,
    /// Leave the room (or the lobby, or the queue).
    Leave,
}

/// Largest width or height a `view` may give.
pub const MAX_VIEW_PIXELS: u32 = 16_384;

/// Longest chat message, in characters.
pub const MAX_CHAT_CHARS: usize = 1000;

/// Every `type` a client may send, to tell an unknown type from a malformed known one.
pub const CLIENT_TYPES: [&str; 19] = [
    "join",
    "offer",
    "answer",
    "ice-candidate",
    "ready",
    "mute",
    "chat",
    "mesh_failed",
    "pause",
    "view",
    "lobby",
    "call",
    "accept_call",
    "decline_call",
    "cancel_call",
    "find_partner",
    "next",
    "stop",
    "leave",
];

/// Why a frame could not be decoded.
#[derive(Debug)]
pub struct DecodeError {
    /// The wire code.
    pub code: ErrorCode,
    /// For humans.
    pub message: String,
    /// The frame's `type`, when it had one.
    pub request_type: Option<String>,
}

impl ClientMessage {
    /// Decodes one text frame, telling apart each way it can be wrong.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        if text.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError {
                code: ErrorCode::TooLarge,
                message: format!(
                    "message of {} bytes exceeds the limit of {MAX_MESSAGE_BYTES}",
                    text.len()
                ),
                request_type: None,
            });
        }
        let value: serde_json::Value = serde_json::from_str(text).map_err(|err| DecodeError {
            code: ErrorCode::BadRequest,
            message: format!("not valid JSON: {err}"),
            request_type: None,
        })?;
        let Some(kind) = value
            .get("type")
            .and_then(|t| t.as_str())
            .map(str::to_owned)
        else {
            return Err(DecodeError {
                code: ErrorCode::BadRequest,
                message: "a message must be a JSON object with a string field `type`".into(),
                request_type: None,
            });
        };
        if !CLIENT_TYPES.contains(&kind.as_str()) {
            // Echo at most 64 characters: the reply must not amplify what the client sent.
            let kind: String = kind.chars().take(64).collect();
            return Err(DecodeError {
                code: ErrorCode::UnknownType,
                message: format!("unknown message type `{kind}`"),
                request_type: Some(kind),
            });
        }
        serde_json::from_value(value).map_err(|err| DecodeError {
            code: ErrorCode::BadRequest,
            message: format!("malformed `{kind}`: {err}"),
            request_type: Some(kind),
        })
    }

    /// The wire name of this message's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientMessage::Join { .. } => "join",
            ClientMessage::Offer { .. } => "offer",
            ClientMessage::Answer { .. } => "answer",
            ClientMessage::IceCandidate { .. } => "ice-candidate",
            ClientMessage::Ready { .. } => "ready",
            ClientMessage::Mute { .. } => "mute",
            ClientMessage::Chat { .. } => "chat",
            ClientMessage::MeshFailed { .. } => "mesh_failed",
            ClientMessage::Pause { .. } => "pause",
            ClientMessage::View { .. } => "view",
            ClientMessage::Lobby { .. } => "lobby",
            ClientMessage::Call { .. } => "call",
            ClientMessage::AcceptCall { .. } => "accept_call",
            ClientMessage::DeclineCall { .. } => "decline_call",
            ClientMessage::CancelCall { .. } => "cancel_call",
            ClientMessage::FindPartner { .. } => "find_partner",
            ClientMessage::Next => "next",
            ClientMessage::Stop => "stop",
            ClientMessage::Leave => "leave",
        }
    }
}

/// An ICE server handed to clients, in the browser's `RTCIceServer` shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IceServer {
    /// `stun:` or `turn:` URLs.
    pub urls: Vec<String>,
    /// TURN username.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Another participant, as listed in `joined`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerInfo {
    /// Their participant id.
    pub peer_id: String,
    /// Their display name.
    pub name: String,
}

/// A chat message as the room keeps it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatMessage {
    /// Its number in the room, from 1.
    pub id: u64,
    /// Who sent it.
    pub peer_id: String,
    /// Their display name then.
    pub name: String,
    /// The text, as sent (clients must escape it).
    pub text: String,
    /// When the server received it, milliseconds since the Unix epoch.
    pub at: u64,
}

/// One media section of a subscribe offer.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionInfo {
    /// The section's mid.
    pub mid: String,
    /// The publication it carries.
    pub publication_id: String,
    /// Who publishes it.
    pub peer_id: String,
    /// `audio` or `video`.
    pub kind: &'static str,
    /// `microphone`, `camera` or `screen`.
    pub source: &'static str,
    /// Whether the publisher has muted it.
    pub muted: bool,
    /// The msid track id the publisher named it by (what `mute` messages name).
    pub track_id: String,
}

/// One entry of `speakers`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpeakerInfo {
    /// The participant.
    pub peer_id: String,
    /// How loud, from 0 (the speaking threshold) to 1 (the loudest).
    pub level: f32,
}

/// Messages to a client.
/// Why a call ended before it was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallEndReason {
    /// The callee declined.
    Declined,
    /// The callee is in a call, or another call rings for it.
    Busy,
    /// The callee went offline while it rang.
    Unavailable,
    /// Nobody answered within `call_timeout_secs`.
    Timeout,
    /// The caller cancelled, or went offline.
    Cancelled,
}

/// Why a place in the waiting queue ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueLeftReason {
    /// The client sent `stop`.
    Stopped,
    /// Nobody came within `match_timeout_secs`.
    Timeout,
}

/// Longest lobby id, call id or room name a client may name, in bytes.
pub const MAX_ID_BYTES: usize = 64;

#[derive(Clone, Debug, Serialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum ServerMessage {
    /// You are in.
    Joined {
        /// Your id.
        participant_id: String,
        /// The room's name as first created.
        room: String,
        /// Your display name.
        name: String,
        /// The room's mode now.
        mode: Mode,
        /// The others already in the room.
        peers: Vec<PeerInfo>,
        /// The room's latest chat messages, oldest first.
        chat: Vec<ChatMessage>,
        /// A secret to put in `join.resume` when reconnecting.
        resume_token: String,
        /// ICE servers for your connections.
        ice_servers: Vec<IceServer>,
        /// The highest video bitrate to send, in bits per second.
        max_video_bitrate: u64,
        /// What your token allows: without `publish`, offers on the publish connection are
        /// refused; without `subscribe`, the server offers you nothing.
        grants: crate::auth::Grants,
        /// [`PROTOCOL_VERSION`].
        protocol: u32,
    },
    /// The answer to `join` on a node of a cluster that does not host the room: open a
    /// signaling socket at `url` (`{url}/ws/signal?token=...`, the same token) and send the same
    /// `join` there. This socket then closes.
    Redirect {
        /// The base URL of the node that hosts the room (`https://node-2.example.com`).
        url: String,
        /// The room asked for.
        room: String,
    },
    /// This node is leaving the cluster (draining) or lost the room to another node: leave,
    /// then join the same room at `url` as after a `redirect`, with your resume token. Until you
    /// leave, the call goes on here.
    Moved {
        /// The base URL of the node that hosts the room from now on.
        url: String,
    },
    /// Someone entered.
    PeerJoined {
        /// Their id.
        peer_id: String,
        /// Their display name.
        name: String,
    },
    /// Someone left.
    PeerLeft {
        /// Their id.
        peer_id: String,
    },
    /// An offer: of the subscribe connection (from `sfu`), or a peer's mesh offer, relayed.
    Offer {
        /// `sfu` or the offering participant.
        peer_id: String,
        /// `subscribe` (from `sfu` only).
        #[serde(skip_serializing_if = "Option::is_none")]
        transport: Option<TransportName>,
        /// The SDP.
        sdp: String,
        /// What each media section carries (from `sfu` only).
        #[serde(skip_serializing_if = "Option::is_none")]
        subscriptions: Option<Vec<SubscriptionInfo>>,
        /// What each of the peer's sending tracks is (relayed only).
        #[serde(skip_serializing_if = "Option::is_none")]
        tracks: Option<Vec<TrackInfo>>,
    },
    /// An answer: to the publish offer (from `sfu`), or a peer's mesh answer, relayed.
    Answer {
        /// `sfu` or the answering participant.
        peer_id: String,
        /// `publish` (from `sfu` only).
        #[serde(skip_serializing_if = "Option::is_none")]
        transport: Option<TransportName>,
        /// The SDP.
        sdp: String,
        /// What each of the peer's sending tracks is (relayed only).
        #[serde(skip_serializing_if = "Option::is_none")]
        tracks: Option<Vec<TrackInfo>>,
    },
    /// A peer's trickled mesh candidate, relayed.
    #[serde(rename = "ice-candidate")]
    IceCandidate {
        /// The participant it comes from.
        peer_id: String,
        /// The candidate; null at the end of candidates.
        candidate: Option<CandidateInit>,
    },
    /// The room's mode changes (`switching`), or has changed for everyone (`settled`).
    Mode {
        /// The mode the room is in, or switching to.
        mode: Mode,
        /// `switching` or `settled`.
        phase: ModePhase,
        /// Numbers the room's switches: `settled` carries its switch's number.
        switch: u64,
    },
    /// A chat message, to everyone in the room (its sender too).
    Chat(ChatMessage),
    /// A track was muted or unmuted.
    Mute {
        /// Its publisher.
        peer_id: String,
        /// The msid track id the publisher named it by.
        track_id: String,
        /// The publication, when it goes through the server.
        #[serde(skip_serializing_if = "Option::is_none")]
        publication_id: Option<String>,
        /// `microphone`, `camera` or `screen`, when it goes through the server.
        #[serde(skip_serializing_if = "Option::is_none")]
        source: Option<&'static str>,
        /// Muted or not.
        muted: bool,
    },
    /// Which simulcast layers of one of your publications someone watches (dynacast): send the
    /// encodings whose rid is in `active`, pause the others.
    Layers {
        /// The publication.
        publication_id: String,
        /// The `trackId` you declared for it.
        track_id: String,
        /// The rids to send, lowest first.
        active: Vec<String>,
    },
    /// How one of the videos you receive through the server is served, given your bandwidth:
    /// `full` (the layer your view needs), `lowered` (a lower one) or `paused` (nothing).
    Allocation {
        /// The publication, as named in `subscriptions`.
        publication_id: String,
        /// `full`, `lowered` or `paused`.
        state: &'static str,
        /// The server's estimate of your downlink, bits per second (0: none yet).
        estimate: u64,
    },
    /// The server's estimate of your downlink through it, bits per second: sent when it changed
    /// by a tenth or more, at most every 2 s.
    Bandwidth {
        /// Bits per second.
        estimate: u64,
    },
    /// Who is speaking now, loudest first (SFU publications only).
    Speakers {
        /// Participants whose microphone is above the speaking level.
        speakers: Vec<SpeakerInfo>,
    },
    /// The lobby entered: the participant's lobby id and everyone else online.
    LobbyJoined {
        /// Its id in the lobby, as others see it in `online`.
        peer_id: String,
        /// Its display name, as accepted.
        name: String,
        /// Everyone else online.
        online: Vec<PeerInfo>,
        /// [`PROTOCOL_VERSION`].
        protocol: u32,
    },
    /// Someone came online in the lobby.
    Online {
        /// Its lobby id.
        peer_id: String,
        /// Its display name.
        name: String,
    },
    /// Someone left the lobby.
    Offline {
        /// Its lobby id.
        peer_id: String,
    },
    /// The caller's call, under this id: it rings until answered, cancelled or timed out (or
    /// `call_ended` follows at once: `busy`).
    Calling {
        /// Names the call in `cancel_call` and in what follows.
        call_id: String,
        /// The callee.
        peer_id: String,
    },
    /// Someone calls: answer with `accept_call` or `decline_call`.
    IncomingCall {
        /// Names the call.
        call_id: String,
        /// The caller's lobby id.
        peer_id: String,
        /// The caller's display name.
        name: String,
    },
    /// The call was accepted: join `room` with `token` (each side gets its own).
    CallAccepted {
        /// The call.
        call_id: String,
        /// The other side's lobby id.
        peer_id: String,
        /// The room to join.
        room: String,
        /// A token for that room, for this participant.
        token: String,
    },
    /// A call ended before it was accepted, and why.
    CallEnded {
        /// The call.
        call_id: String,
        /// Why.
        reason: CallEndReason,
    },
    /// In the waiting queue.
    Waiting {
        /// Takes this place back after a reconnect (`find_partner.resume`), for 30 s.
        resume: String,
        /// How many wait before you.
        position: usize,
    },
    /// A partner found: join `room` with `token`.
    Matched {
        /// The partner's id in the queue.
        partner: String,
        /// The partner's display name.
        name: String,
        /// The room to join, the two of you.
        room: String,
        /// A token for it, for you.
        token: String,
    },
    /// Your partner left (`next`, `stop`, or gone): leave the room; `find_partner` looks again.
    PartnerLeft {
        /// Who it was.
        partner: String,
    },
    /// You are out of the queue, and why.
    QueueLeft {
        /// `stopped` (you sent `stop`) or `timeout`.
        reason: QueueLeftReason,
    },
    /// Something was refused.
    Error {
        /// The contract.
        code: ErrorCode,
        /// For humans.
        message: String,
        /// The `type` of the message it answers.
        #[serde(skip_serializing_if = "Option::is_none")]
        request_type: Option<String>,
    },
}

impl ServerMessage {
    /// An error reply.
    pub fn error(code: ErrorCode, message: impl Into<String>, request_type: Option<&str>) -> Self {
        ServerMessage::Error {
            code,
            message: message.into(),
            request_type: request_type.map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_is_listed_once_under_its_wire_name() {
        for (index, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*code as usize, index);
            let wire = serde_json::to_value(code).unwrap_or_default();
            assert_eq!(wire, code.as_str());
        }
    }

    #[test]
    fn decoding_tells_each_mistake_apart() {
        let cases: &[(&str, ErrorCode)] = &[
            ("{not json", ErrorCode::BadRequest),
            ("[1,2]", ErrorCode::BadRequest),
            (r#"{"type": 5}"#, ErrorCode::BadRequest),
            (r#"{"type": "dance"}"#, ErrorCode::UnknownType),
            (
                r#"{"type": "offer", "peerId": "sfu"}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"type": "offer", "peerId": "sfu", "transport": "sideways", "sdp": ""}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"type": "mute", "trackId": "t", "muted": "yes"}"#,
                ErrorCode::BadRequest,
            ),
        ];
        for (text, code) in cases {
            let err = ClientMessage::decode(text).expect_err(text);
            assert_eq!(err.code, *code, "{text}: {}", err.message);
        }
        let big = format!(
            r#"{{"type":"join","name":"{}"}}"#,
            "x".repeat(MAX_MESSAGE_BYTES)
        );
        assert_eq!(
            ClientMessage::decode(&big).expect_err("too large").code,
            ErrorCode::TooLarge
        );
    }

    #[test]
    fn client_messages_round_trip_from_their_documented_shape() {
        let offer = ClientMessage::decode(
            r#"{"type":"offer","peerId":"sfu","transport":"publish","sdp":"v=0","tracks":[{"trackId":"a","source":"camera"}]}"#,
        )
        .expect("offer");
        assert!(matches!(
            offer,
            ClientMessage::Offer { ref tracks, transport: Some(TransportName::Publish), .. } if tracks[0].source == "camera"
        ));
        let candidate = ClientMessage::decode(
            r#"{"type":"ice-candidate","peerId":"sfu","transport":"subscribe","candidate":{"candidate":"candidate:1 1 udp 1 127.0.0.1 5000 typ host","sdpMid":"0","sdpMLineIndex":0}}"#,
        )
        .expect("candidate");
        assert_eq!(candidate.type_name(), "ice-candidate");
        assert!(matches!(
            ClientMessage::decode(r#"{"type":"join"}"#),
            Ok(ClientMessage::Join {
                name: None,
                resume: None
            })
        ));
    }

    #[test]
    fn server_messages_use_the_documented_field_names() {
        let json = serde_json::to_value(ServerMessage::PeerJoined {
            peer_id: "p-1".into(),
            name: "Ann".into(),
        })
        .expect("encode");
        assert_eq!(
            json,
            serde_json::json!({"type": "peer_joined", "peerId": "p-1", "name": "Ann"})
        );
        let json = serde_json::to_value(ServerMessage::error(
            ErrorCode::NameTaken,
            "taken",
            Some("join"),
        ))
        .expect("encode");
        assert_eq!(
            json,
            serde_json::json!({"type": "error", "code": "name_taken", "message": "taken", "requestType": "join"})
        );
    }
}
