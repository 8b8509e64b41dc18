//! What `/api/rooms` and `/metrics` show of a room: a copy taken under the room's lock.

use serde::Serialize;

use super::Room;

impl Room {
    /// A snapshot for `/api/rooms`.
    pub fn snapshot(&self) -> RoomSnapshot {
        let state = self.lock();
        let participants: Vec<ParticipantSnapshot> = state
            .members
            .iter()
            .map(|member| ParticipantSnapshot {
                participant_id: member.id.to_string(),
                name: member.name.clone(),
                publications: member
                    .published
                    .iter()
                    .map(|p| {
                        let stats = &p.publication.stats;
                        PublicationSnapshot {
                            publication_id: p.publication.id.to_string(),
                            kind: p.publication.kind.as_str(),
                            source: p.publication.source.as_str(),
                            codec: p.publication.codec.mime_type.clone(),
                            muted: member.muted.get(&p.track_id).copied().unwrap_or(false),
                            received_packets: stats.received_packets.load(RELAXED),
                            forwarded_packets: stats.forwarded_packets.load(RELAXED),
                            forwarded_bytes: stats.forwarded_bytes.load(RELAXED),
                            dropped_packets: stats.dropped_packets.load(RELAXED),
                        }
                    })
                    .collect(),
            })
            .collect();
        let (forwarded_packets, forwarded_bytes) = participants
            .iter()
            .flat_map(|p| &p.publications)
            .fold((0, 0), |(packets, bytes), p| {
                (packets + p.forwarded_packets, bytes + p.forwarded_bytes)
            });
        let (switches_to_sfu, switches_to_mesh) = state.mode.switch_counts();
        RoomSnapshot {
            name: self.name.clone(),
            mode: state.mode.mode().as_str(),
            switching: state.mode.switching(),
            mesh_blocked: state.mode.mesh_blocked(),
            switches_to_sfu,
            switches_to_mesh,
            participants,
            forwarded_packets,
            forwarded_bytes,
        }
    }
}

const RELAXED: std::sync::atomic::Ordering = std::sync::atomic::Ordering::Relaxed;

/// A room as `/api/rooms` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomSnapshot {
    /// Its name.
    pub name: String,
    /// `mesh` or `sfu` (the mode it is switching to, during a switch).
    pub mode: &'static str,
    /// A switch waits for participants' `ready`.
    pub switching: bool,
    /// A mesh failed here: the room stays in SFU mode.
    pub mesh_blocked: bool,
    /// Switches from mesh to SFU so far.
    pub switches_to_sfu: u64,
    /// Switches from SFU to mesh so far.
    pub switches_to_mesh: u64,
    /// Who is in.
    pub participants: Vec<ParticipantSnapshot>,
    /// Packets forwarded for the room's live publications.
    pub forwarded_packets: u64,
    /// Bytes forwarded for the room's live publications.
    pub forwarded_bytes: u64,
}

/// A participant as `/api/rooms` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParticipantSnapshot {
    /// Its id.
    pub participant_id: String,
    /// Its display name.
    pub name: String,
    /// What it publishes.
    pub publications: Vec<PublicationSnapshot>,
}

/// A publication as `/api/rooms` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PublicationSnapshot {
    /// Its id.
    pub publication_id: String,
    /// `audio` or `video`.
    pub kind: &'static str,
    /// `microphone`, `camera` or `screen`.
    pub source: &'static str,
    /// MIME type of its codec.
    pub codec: String,
    /// Muted by its publisher.
    pub muted: bool,
    /// Packets received from the publisher.
    pub received_packets: u64,
    /// Packets handed to subscribers.
    pub forwarded_packets: u64,
    /// Bytes handed to subscribers.
    pub forwarded_bytes: u64,
    /// Packets dropped for slow subscribers.
    pub dropped_packets: u64,
}
