//! Data relayed between participants through the server (files in rooms on the SFU): one data
//! channel per publish connection, labelled [`RELAY_CHANNEL`], opened by the client. The server
//! reads nothing but each message's envelope, the other participant's id:
//!
//! ```text
//! client -> server   [id length: 1 byte][recipient's participant id][payload]
//! server -> client   [id length: 1 byte][sender's participant id][payload]
//! ```
//!
//! Both are binary messages. Text messages from the server are notices (JSON): a message that
//! could not be delivered ([`Notice`]).
//!
//! Who may reach whom is the caller's business (signaling routes within a room); here are the
//! byte budgets that keep a sender from filling the server's memory:
//! - a sender's messages on their way from its connection to the recipient's (between engines,
//!   through signaling) are at most [`RELAY_IN_FLIGHT_BYTES`] and [`RELAY_IN_FLIGHT_MESSAGES`];
//!   past that a message is dropped and the sender told `over_budget`;
//! - a recipient's channel holds at most [`RELAY_BUFFER_BYTES`] that it has not taken yet (SCTP
//!   outstanding); past that a message is dropped and the recipient told `dropped`.
//!
//! Clients keep well inside both with an end-to-end window (the SDK's files wait for the
//! recipient's acknowledgement every 256 KiB and keep at most 1 MiB unacknowledged per recipient).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{BufMut, Bytes, BytesMut};

use crate::engine::{Engine, EngineInput};
use crate::exchange::ConnId;
use crate::ids::ParticipantId;

/// The label of the relay data channel a client opens on its publish connection.
pub const RELAY_CHANNEL: &str = "switchboard-relay";
/// Largest relay message, envelope included (every browser sends 64 KiB messages).
pub const MAX_RELAY_MESSAGE: usize = 64 * 1024;
/// Bytes of one sender's messages between its connection and their recipients' at once.
pub const RELAY_IN_FLIGHT_BYTES: usize = 4 * 1024 * 1024;
/// Messages of one sender between its connection and their recipients' at once.
pub const RELAY_IN_FLIGHT_MESSAGES: usize = 512;
/// Bytes a recipient's relay channel may hold that the recipient has not acknowledged yet.
pub const RELAY_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// Longest participant id an envelope carries.
pub const MAX_ENVELOPE_ID: usize = 64;

/// What one sender has in flight.
#[derive(Debug, Default)]
pub(crate) struct RelayBudget {
    bytes: AtomicUsize,
    messages: AtomicUsize,
}

impl RelayBudget {
    /// Takes `bytes` and one message from the budget, or nothing when they do not fit.
    pub(crate) fn take(self: &Arc<Self>, bytes: usize) -> Option<RelayTicket> {
        let taken = self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let messages = self.messages.fetch_add(1, Ordering::Relaxed);
        let ticket = RelayTicket {
            budget: self.clone(),
            bytes,
        };
        (taken + bytes <= RELAY_IN_FLIGHT_BYTES && messages < RELAY_IN_FLIGHT_MESSAGES)
            .then_some(ticket)
    }
}

/// A message's share of its sender's budget, given back when the message is handed to the
/// recipient's connection or dropped.
#[derive(Debug)]
pub(crate) struct RelayTicket {
    budget: Arc<RelayBudget>,
    bytes: usize,
}

impl Drop for RelayTicket {
    fn drop(&mut self) {
        self.budget.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
        self.budget.messages.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A message a participant sent through its relay channel, for another participant.
#[derive(Debug)]
pub struct RelayedData {
    /// Who sent it.
    pub from: ParticipantId,
    /// The id the sender named as the recipient (not checked here).
    pub to: String,
    /// What follows the envelope, untouched.
    pub payload: Bytes,
    /// Held until the message is written or dropped: its share of the sender's budget.
    pub(crate) _ticket: RelayTicket,
}

/// The way to one participant's relay channel (its publish connection). It does not keep the
/// connection open: what is handed over after the connection closed is dropped. Cheap to clone.
#[derive(Clone)]
pub struct DataRelay {
    pub(crate) engine: Engine,
    pub(crate) conn: ConnId,
}

impl std::fmt::Debug for DataRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataRelay")
            .field("conn", &self.conn)
            .finish()
    }
}

/// What is handed to a relay channel.
pub(crate) enum Delivery {
    /// Data, and the way back to its sender's channel, to say when it cannot be delivered.
    Data(RelayedData, DataRelay),
    Notice(Notice),
}

impl DataRelay {
    /// Hands `data` to this participant's channel, never waiting: when the engine's command
    /// queue is full it goes from a task (bounded by the sender's in-flight budget, which the
    /// message holds until it is written). `sender` is the sender's own relay, told
    /// `undeliverable` when this participant has no relay channel open.
    pub fn deliver(&self, data: RelayedData, sender: DataRelay) {
        self.hand_over(Delivery::Data(data, sender));
    }

    /// Tells this participant something about its own relayed messages.
    pub fn notify(&self, notice: Notice) {
        self.hand_over(Delivery::Notice(notice));
    }

    fn hand_over(&self, delivery: Delivery) {
        self.engine.input.send_soon(EngineInput::Relay {
            conn: self.conn,
            delivery,
        });
    }
}

/// A notice from the server on a relay channel (a text message, JSON with `type`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A message to `to` was not delivered: nobody with that id can receive relayed data here.
    Undeliverable {
        /// The recipient named.
        to: String,
    },
    /// A message was dropped: the sender had too much in flight.
    OverBudget,
    /// A message from `from` to this participant was dropped: its channel held too much.
    Dropped {
        /// Who sent it.
        from: String,
    },
}

impl Notice {
    pub(crate) fn to_json(&self) -> String {
        let value = match self {
            Notice::Undeliverable { to } => {
                serde_json::json!({"type": "undeliverable", "to": to})
            }
            Notice::OverBudget => serde_json::json!({"type": "over_budget"}),
            Notice::Dropped { from } => serde_json::json!({"type": "dropped", "from": from}),
        };
        value.to_string()
    }
}

/// Why a client's relay message was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum EnvelopeError {
    /// Text, empty, too long, or an id that is empty, too long or not UTF-8.
    Malformed,
}

/// Splits a client's message into the recipient's id and the payload.
pub(crate) fn open_envelope(message: &[u8]) -> Result<(&str, &[u8]), EnvelopeError> {
    if message.len() > MAX_RELAY_MESSAGE {
        return Err(EnvelopeError::Malformed);
    }
    let (&length, rest) = message.split_first().ok_or(EnvelopeError::Malformed)?;
    let length = usize::from(length);
    if length == 0 || length > MAX_ENVELOPE_ID || rest.len() < length {
        return Err(EnvelopeError::Malformed);
    }
    let (id, payload) = rest.split_at(length);
    let id = std::str::from_utf8(id).map_err(|_| EnvelopeError::Malformed)?;
    Ok((id, payload))
}

/// The message a recipient gets: the sender's id, then the payload.
pub(crate) fn seal_envelope(from: &str, payload: &[u8]) -> BytesMut {
    let id = &from.as_bytes()[..from.len().min(MAX_ENVELOPE_ID)];
    let mut out = BytesMut::with_capacity(1 + id.len() + payload.len());
    out.put_u8(id.len() as u8);
    out.put_slice(id);
    out.put_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_round_trips_and_bad_ones_are_refused() {
        let sealed = seal_envelope("alice-1", b"chunk");
        assert_eq!(open_envelope(&sealed), Ok(("alice-1", &b"chunk"[..])));
        assert_eq!(open_envelope(b""), Err(EnvelopeError::Malformed));
        assert_eq!(open_envelope(&[0, b'x']), Err(EnvelopeError::Malformed));
        assert_eq!(
            open_envelope(&[5, b'a', b'b']),
            Err(EnvelopeError::Malformed)
        );
        assert_eq!(open_envelope(&[1, 0xFF, 1]), Err(EnvelopeError::Malformed));
        let mut long = vec![65];
        long.extend(std::iter::repeat_n(b'a', 70));
        assert_eq!(open_envelope(&long), Err(EnvelopeError::Malformed));
        let huge = seal_envelope("a", &vec![0; MAX_RELAY_MESSAGE]);
        assert_eq!(open_envelope(&huge), Err(EnvelopeError::Malformed));
    }

    #[test]
    fn the_budget_refuses_past_its_bytes_or_messages_and_tickets_give_back() {
        let budget = Arc::new(RelayBudget::default());
        let big = budget.take(RELAY_IN_FLIGHT_BYTES).expect("fits exactly");
        assert!(budget.take(1).is_none(), "one byte past the budget");
        drop(big);
        let tickets: Vec<_> = (0..RELAY_IN_FLIGHT_MESSAGES)
            .map(|_| budget.take(1).expect("within the message count"))
            .collect();
        assert!(budget.take(1).is_none(), "one message past the count");
        drop(tickets);
        assert!(budget.take(RELAY_IN_FLIGHT_BYTES).is_some());
    }
}
