//! Why the server refused something a client sent over the signaling socket: one variant per
//! mistake, each mapped to its wire [`ErrorCode`] here and nowhere else. The text is for humans;
//! the code is the contract (docs/protocol.md, section 6).

use crate::lobby::LobbyError;
use crate::matching::MatchError;
use crate::protocol::{
    CHAT_BURST, CHAT_PER_SECOND, ErrorCode, MAX_CHAT_CHARS, MAX_ID_BYTES, MAX_TRACK_ID_BYTES,
    MAX_TRACKS, MAX_VIEW_PIXELS, RELAY_BURST, RELAY_PER_SECOND, SFU_PEER,
};

/// A refused client message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignalError {
    /// Anything but `join` or `leave` before `join`.
    #[error("send `join` first")]
    NotJoined,
    /// A second `join`.
    #[error("already joined")]
    AlreadyJoined,
    /// A display name that is empty, only spaces or too long.
    #[error(
        "a name is 1 to 64 characters, not only spaces, without control or invisible characters"
    )]
    BadName,
    /// A description naming too many tracks.
    #[error("at most {MAX_TRACKS} tracks per description")]
    TooManyTracks,
    /// A `trackId` or `mid` longer than [`MAX_TRACK_ID_BYTES`].
    #[error("a trackId or mid is at most {MAX_TRACK_ID_BYTES} bytes ({0} sent)")]
    TrackIdTooLong(usize),
    /// A WebSocket frame or message larger than the socket reads at all (it then closes, 1009).
    #[error("a message is at most {0} bytes on this socket: closing")]
    FrameTooLarge(usize),
    /// No `join` within the join deadline.
    #[error("no `join` within {0} s: closing")]
    JoinTimeout(u64),
    /// A track whose source is not `microphone`, `camera` or `screen`.
    #[error("unknown source `{0}`")]
    UnknownSource(String),
    /// A chat message that is empty, only spaces or too long.
    #[error("a chat message is 1 to {MAX_CHAT_CHARS} characters, not only spaces ({0} sent)")]
    BadChat(usize),
    /// A `view` whose width or height is 0 or above [`MAX_VIEW_PIXELS`].
    #[error("a view is 1 to {MAX_VIEW_PIXELS} pixels wide and high ({0}x{1} sent)")]
    BadView(u32, u32),
    /// A candidate for `sfu` that does not say which connection it is for.
    #[error("a candidate for `sfu` names its `transport`")]
    CandidateWithoutTransport,
    /// A candidate the connection would not take.
    #[error("candidate refused: {0}")]
    CandidateRefused(String),
    /// `peerId: "sfu"` while the participant has no SFU connections (a settled mesh).
    #[error("the room is in mesh mode: address participants by their peerId, not `sfu`")]
    MeshMode,
    /// A participant id in a settled SFU room.
    #[error("the room is in sfu mode: address `{SFU_PEER}`, not `{0}`")]
    SfuMode(String),
    /// A message addressed to its own sender.
    #[error("a message addressed to yourself")]
    ToSelf,
    /// A `peerId` that names nobody in the room.
    #[error("no participant `{0}` in this room")]
    UnknownPeer(String),
    /// An offer to `sfu` that is not for the publish connection.
    #[error(
        "offers to `sfu` are for the publish connection (`transport: \"publish\"`); the server \
         makes every offer on the subscribe connection"
    )]
    OfferNotForPublish,
    /// An answer to `sfu` that is not for the subscribe connection.
    #[error("answers to `sfu` are for the subscribe connection (`transport: \"subscribe\"`)")]
    AnswerNotForSubscribe,
    /// An SDP that could not be parsed or applied, or asks for what the server does not do.
    #[error("{0}")]
    InvalidSdp(String),
    /// More relayed messages (or bytes) than the budget allows.
    #[error(
        "more than {RELAY_BURST} messages to other participants in a burst ({RELAY_PER_SECOND} \
         per second after it): this one was dropped"
    )]
    RelayRateLimited,
    /// More `mute` or `pause` messages than the relay budget allows.
    #[error("too many messages for other participants: this {0} was dropped")]
    ControlRateLimited(&'static str),
    /// More chat from this participant than its budget allows.
    #[error(
        "more than {CHAT_BURST} chat messages in a burst ({CHAT_PER_SECOND} per second after it): \
         this one was not sent"
    )]
    ChatRateLimited,
    /// More chat from the whole room than it can deliver.
    #[error("the room is chatting faster than it can be delivered: this message was not sent")]
    RoomChatRateLimited,
    /// Another participant in the room has this name.
    #[error("the name `{0}` is taken in this room")]
    NameTaken(String),
    /// The room is at its participant limit.
    #[error("the room is full ({0} participants)")]
    RoomFull(usize),
    /// The server hosts as many rooms as it may, and this join would open another.
    #[error("the server hosts its limit of {0} rooms: no new room can open now")]
    TooManyRooms(usize),
    /// Joins come faster than allowed from this address or into this room.
    #[error("too many joins {0} in a short time: try again in a second")]
    JoinRateLimited(&'static str),
    /// A media connection of the participant to the server failed (ICE or DTLS): it leaves.
    #[error("your media connection to the server failed: leaving the room")]
    MediaFailed,
    /// The token does not grant what the message asks (publishing, or a mesh connection for a
    /// participant only the SFU can hold to its grants).
    #[error("your token does not allow {0}")]
    NotAllowed(&'static str),
    /// The participant's subscribe negotiator has ended (its connections are closing).
    #[error("subscribe connection is gone")]
    SubscribeGone,
    /// The media plane could not open a connection.
    #[error("media transport: {0}")]
    MediaTransport(#[from] sfu::SfuError),
    #[error("send `lobby` first")]
    NotInLobby,
    #[error("an id or room name is at most {MAX_ID_BYTES} bytes ({0} sent)")]
    IdTooLong(usize),
    #[error("{0}")]
    Lobby(#[from] LobbyError),
    #[error("{0}")]
    Matching(#[from] MatchError),
    #[error("send `find_partner` first")]
    NotFinding,
    /// The cluster cannot place the room (its store is unreachable, or every node is full or
    /// draining).
    #[error("{0}")]
    Placement(#[from] crate::cluster::PlacementError),
}

impl SignalError {
    /// The wire code of this refusal.
    pub fn code(&self) -> ErrorCode {
        use SignalError::*;
        match self {
            NotJoined
            | AlreadyJoined
            | JoinTimeout(_)
            | MeshMode
            | SfuMode(_)
            | ToSelf
            | OfferNotForPublish
            | AnswerNotForSubscribe
            | NotInLobby => ErrorCode::InvalidState,
            IdTooLong(_) => ErrorCode::BadRequest,
            Lobby(err) => match err {
                LobbyError::NameTaken(_) => ErrorCode::NameTaken,
                LobbyError::Full(_) => ErrorCode::RoomFull,
                LobbyError::UnknownPeer(_) => ErrorCode::UnknownPeer,
                LobbyError::CallSelf
                | LobbyError::AlreadyRinging
                | LobbyError::UnknownCall(_)
                | LobbyError::WrongSide => ErrorCode::InvalidState,
                LobbyError::NotInRoom => ErrorCode::NotAllowed,
                LobbyError::CallingTooOften => ErrorCode::RateLimited,
                LobbyError::Token(_) => ErrorCode::Internal,
            },
            Matching(err) => match err {
                MatchError::Full(_) => ErrorCode::RoomFull,
                MatchError::AlreadyWaiting | MatchError::NoPlace => ErrorCode::InvalidState,
            },
            NotFinding => ErrorCode::InvalidState,
            Placement(crate::cluster::PlacementError::Unavailable) => ErrorCode::ClusterUnavailable,
            Placement(crate::cluster::PlacementError::NoNode) => ErrorCode::ServerFull,
            BadName
            | TooManyTracks
            | TrackIdTooLong(_)
            | UnknownSource(_)
            | BadChat(_)
            | BadView(_, _)
            | CandidateWithoutTransport
            | CandidateRefused(_) => ErrorCode::BadRequest,
            UnknownPeer(_) => ErrorCode::UnknownPeer,
            InvalidSdp(_) => ErrorCode::InvalidSdp,
            RelayRateLimited
            | ControlRateLimited(_)
            | ChatRateLimited
            | RoomChatRateLimited
            | JoinRateLimited(_) => ErrorCode::RateLimited,
            NameTaken(_) => ErrorCode::NameTaken,
            FrameTooLarge(_) => ErrorCode::TooLarge,
            RoomFull(_) => ErrorCode::RoomFull,
            TooManyRooms(_) => ErrorCode::ServerFull,
            NotAllowed(_) => ErrorCode::NotAllowed,
            SubscribeGone | MediaTransport(_) | MediaFailed => ErrorCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_maps_to_the_code_the_protocol_documents() {
        let rows = [
            (SignalError::NotJoined, "invalid_state"),
            (SignalError::SfuMode("p-1".into()), "invalid_state"),
            (SignalError::UnknownPeer("p-9".into()), "unknown_peer"),
            (SignalError::BadChat(1001), "bad_request"),
            (SignalError::RelayRateLimited, "rate_limited"),
            (SignalError::InvalidSdp("no media".into()), "invalid_sdp"),
            (SignalError::NameTaken("Ann".into()), "name_taken"),
            (SignalError::RoomFull(100), "room_full"),
            (SignalError::TooManyRooms(1000), "server_full"),
            (
                SignalError::JoinRateLimited("into this room"),
                "rate_limited",
            ),
            (SignalError::SubscribeGone, "internal"),
            (SignalError::NotAllowed("publishing"), "not_allowed"),
        ];
        for (error, code) in rows {
            let wire = serde_json::to_value(error.code()).unwrap_or_default();
            assert_eq!(wire, code, "{error}");
        }
    }

    #[test]
    fn the_text_says_what_to_do_instead() {
        assert_eq!(
            SignalError::SfuMode("p-2".into()).to_string(),
            "the room is in sfu mode: address `sfu`, not `p-2`"
        );
        assert_eq!(
            SignalError::ControlRateLimited("pause").to_string(),
            "too many messages for other participants: this pause was dropped"
        );
    }
}
