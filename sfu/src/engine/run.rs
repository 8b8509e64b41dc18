//! The engine's loop: one task that takes forwarded copies and commands, reads the shared
//! socket, drives every connection's timers, paces limited subscribers and flushes what the
//! connections wrote.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_udp::{RecvMeta, UdpSocketState};
use rtc::data_channel::RTCDataChannelId;
use rtc::data_channel::RTCDataChannelMessage;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::event::{RTCDataChannelEvent, RTCPeerConnectionEvent};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp;
use rtc::rtp_transceiver::{RTCRtpSenderId, RTCRtpTransceiverDirection};
use rtc::sansio::Protocol;
use rtc::shared::TaggedBytesMut;
use tokio::sync::mpsc;

use super::pacer::{PACING_FACTOR, Pacer, list_pacer, packet_bytes};
use super::publish::PublishTracks;
use super::socket::push_pending;
use super::{
    Bandwidth, DATAGRAM_BUFFER, EngineInput, EngineStats, HOUSEKEEPING, IceCredentials,
    MAX_COMMANDS_PER_ROUND, MAX_GSO_BYTES, MAX_INPUTS_PER_ROUND,
};
use crate::admission::{Backlog, MediaBatch, ROUND_COPIES};
use crate::connection::TransportKind;
use crate::estimator::{Estimator, INITIAL_ESTIMATE, MAX_ESTIMATE, MIN_ESTIMATE};
use crate::exchange::{Class, ConnId, FeedbackRoute, Outgoing, SubscriberFeedback};
use crate::ids::ParticipantId;
use crate::relay::{
    Delivery, Notice, RELAY_BUFFER_BYTES, RELAY_CHANNEL, RelayBudget, RelayedData, open_envelope,
    seal_envelope,
};
use crate::sender_reports::SenderReports;
use crate::transport_cc::{TRANSPORT_CC_URI, TransportCc};
use crate::{SfuError, SfuEvent};

pub(super) struct Conn {
    pub(super) pc: RTCPeerConnection,
    pub(super) kind: TransportKind,
    pub(super) participant: ParticipantId,
    pub(super) events: mpsc::UnboundedSender<SfuEvent>,
    pub(super) ufrag: String,
    /// The local ICE password: a STUN request from a new address must be signed with it before
    /// the address is routed here.
    pub(super) ice_pwd: String,
    /// Subscriber RTCP routes, by the local track id (the publication id).
    pub(super) feedback: HashMap<String, FeedbackRoute>,
    /// Remote addresses routed to this connection.
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) deadline: Option<Instant>,
    pub(super) failed: bool,
    /// DTLS is up: before that, and once the connection is lost, forwarded media cannot be
    /// protected and is dropped here rather than run through the pipeline to fail there.
    pub(super) connected: bool,
    /// The client's first answer has been applied: until then the connection has no remote ICE
    /// credentials, and the client's early connectivity checks (it retransmits them) are dropped.
    pub(super) answered: bool,
    pub(super) bandwidth: Option<Arc<Bandwidth>>,
    /// A subscriber's transport-wide numbering and estimator, when it estimates bandwidth.
    pub(super) transport_cc: Option<TransportCc>,
    /// A subscriber's sender reports.
    pub(super) sender_reports: Option<SenderReports>,
    pub(super) pacer: Pacer,
    /// A publish connection's tracks: where each one's packets go.
    pub(super) publish: Option<PublishTracks>,
    /// A publish connection's relay data channel, once the client opened it.
    pub(super) relay: Option<RTCDataChannelId>,
    /// What this participant's relayed messages hold of the server now.
    pub(super) relay_budget: Arc<RelayBudget>,
    pub(super) span: tracing::Span,
}

impl Conn {
    /// Bytes per second this subscriber's video may leave at now, when it is paced.
    pub(super) fn pace(&self) -> Option<f64> {
        let bandwidth = self.bandwidth.as_ref()?;
        if !bandwidth.limiting.load(Ordering::Relaxed) {
            return None;
        }
        let estimate = match bandwidth.pace_estimate.load(Ordering::Relaxed) {
            0 => bandwidth.estimate.load(Ordering::Relaxed),
            // A fall shows at once, a rise once it has lasted.
            lowest => lowest.min(bandwidth.estimate.load(Ordering::Relaxed)),
        };
        (estimate > 0).then(|| estimate as f64 * PACING_FACTOR / 8.0)
    }

    /// Bytes per second a probe cluster leaves at.
    pub(super) fn probe_rate(&self) -> Option<f64> {
        let bandwidth = self.bandwidth.as_ref()?;
        let estimate = bandwidth.estimate.load(Ordering::Relaxed);
        let rate = match bandwidth.probe_rate.load(Ordering::Relaxed) {
            0 => estimate,
            rate => rate,
        };
        (rate > 0).then(|| rate as f64 / 8.0)
    }

    /// Hands one packet to the connection (interceptors, SRTP) and queues what it writes.
    pub(super) fn write(
        &mut self,
        sender: RTCRtpSenderId,
        packet: rtp::Packet,
        now: Instant,
        out: &mut Outbox<'_>,
    ) -> bool {
        let mut packet = packet;
        if let Some(transport_cc) = &mut self.transport_cc {
            transport_cc.stamp(&mut packet, now);
        }
        if let Some(reports) = &mut self.sender_reports {
            let pc = &mut self.pc;
            reports.on_sent(sender, &packet, now, || {
                let payload_type = packet.header.payload_type;
                pc.rtp_sender(sender)?
                    .get_parameters()
                    .rtp_parameters
                    .codecs
                    .iter()
                    .find(|codec| codec.payload_type == payload_type)
                    .map(|codec| codec.rtp_codec.clock_rate)
            });
        }
        let written = match self.pc.rtp_sender(sender) {
            Some(mut sender) => sender.write_rtp(now, packet).is_ok(),
            None => false,
        };
        while let Some(write) = self.pc.poll_write() {
            push_pending(out.pending, out.by_addr, out.wildcard, write);
        }
        written
    }
}

/// Where a connection's writes go: the engine's pending datagrams.
pub(super) struct Outbox<'a> {
    pub(super) pending: &'a mut Vec<Pending>,
    pub(super) by_addr: &'a HashMap<SocketAddr, (ConnId, IpAddr)>,
    pub(super) wildcard: bool,
}

/// A datagram waiting for the next flush.
pub(super) struct Pending {
    pub(super) destination: SocketAddr,
    pub(super) src_ip: Option<IpAddr>,
    pub(super) datagram: BytesMut,
}

pub(super) struct EngineLoop {
    pub(super) socket: tokio::net::UdpSocket,
    /// Checks MESSAGE-INTEGRITY of STUN from new addresses.
    pub(super) crypto: Arc<dyn rtc::crypto::RTCCryptoProvider>,
    pub(super) state: UdpSocketState,
    pub(super) wildcard: bool,
    pub(super) port: u16,
    pub(super) announced: Vec<SocketAddr>,
    pub(super) inputs: mpsc::Receiver<EngineInput>,
    pub(super) media: mpsc::Receiver<MediaBatch>,
    pub(super) conns: HashMap<ConnId, Conn>,
    pub(super) by_ufrag: HashMap<String, ConnId>,
    /// Remote address -> (connection, the local IP it reached us on).
    pub(super) by_addr: HashMap<SocketAddr, (ConnId, IpAddr)>,
    pub(super) pending: Vec<Pending>,
    /// Forwarded copies received and not yet written.
    pub(super) queued: Vec<Outgoing>,
    /// Of those, the rest of admitted frames.
    pub(super) queued_frame_rest: usize,
    /// Connections whose pacer holds something, and when the first of them is due.
    pub(super) paced: Vec<ConnId>,
    pub(super) next_paced: Option<Instant>,
    /// Copies handed over by fanouts and not yet written, and the limit on them.
    pub(super) backlog: Arc<Backlog>,
    /// Recent seconds per written copy.
    pub(super) pace: f64,
    pub(super) scratch: Vec<u8>,
    pub(super) stats: Arc<EngineStats>,
}

impl EngineLoop {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        socket: tokio::net::UdpSocket,
        state: UdpSocketState,
        wildcard: bool,
        port: u16,
        announced: Vec<SocketAddr>,
        (inputs, media): (mpsc::Receiver<EngineInput>, mpsc::Receiver<MediaBatch>),
        backlog: Arc<Backlog>,
        stats: Arc<EngineStats>,
        crypto: Arc<dyn rtc::crypto::RTCCryptoProvider>,
    ) -> Self {
        Self {
            port,
            socket,
            state,
            wildcard,
            announced,
            inputs,
            media,
            conns: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            pending: Vec::new(),
            queued: Vec::new(),
            queued_frame_rest: 0,
            paced: Vec::new(),
            next_paced: None,
            backlog,
            pace: 0.0,
            scratch: Vec::with_capacity(MAX_GSO_BYTES),
            stats,
            crypto,
        }
    }
}

impl EngineLoop {
    pub(super) async fn run(mut self) {
        let batch = quinn_udp::BATCH_SIZE.max(1);
        let gro = self.state.gro_segments().max(1);
        let mut buffers: Vec<Vec<u8>> = (0..batch)
            .map(|_| vec![0u8; DATAGRAM_BUFFER * gro])
            .collect();
        let mut meta = vec![RecvMeta::default(); batch];
        let mut next_housekeeping = Instant::now();
        loop {
            // Everything already waiting, then the forwarded copies subscriber by subscriber,
            // each subscriber's sent as soon as they are encrypted: under load many published
            // packets' copies leave together, GSO-batched per subscriber, and the first
            // subscribers need not wait for the last one's encryption.
            let mut batches = 0;
            while batches < MAX_INPUTS_PER_ROUND && self.queued.len() < ROUND_COPIES {
                match self.media.try_recv() {
                    Ok(batch) => {
                        self.take(batch);
                        batches += 1;
                    }
                    Err(_) => break,
                }
            }
            let mut commands = 0;
            while commands < MAX_COMMANDS_PER_ROUND {
                match self.inputs.try_recv() {
                    Ok(input) => {
                        self.handle_input(input);
                        commands += 1;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.close_all();
                        return;
                    }
                }
            }
            let full_round = batches == MAX_INPUTS_PER_ROUND
                || commands == MAX_COMMANDS_PER_ROUND
                || self.queued.len() >= ROUND_COPIES;
            self.forward_queued().await;
            let more_to_read = self.read_socket(&mut buffers, &mut meta);
            let full_round = full_round || more_to_read;
            // Timers run here, every round, not only when the queue is idle: a busy engine that
            // skipped them would stop its ICE keepalives and lose every subscriber at once.
            let now = Instant::now();
            if now >= next_housekeeping {
                for conn in self.conns.values_mut() {
                    conn.deadline = conn.next_deadline();
                }
                next_housekeeping = now + HOUSEKEEPING;
            }
            self.handle_timeouts();
            self.release_paced(now);
            self.flush().await;
            if full_round {
                tokio::task::yield_now().await;
                continue;
            }
            let next = self
                .conns
                .values()
                .filter_map(|conn| conn.deadline)
                .min()
                .unwrap_or(next_housekeeping)
                .min(next_housekeeping)
                .min(self.next_paced.unwrap_or(next_housekeeping));
            tokio::select! {
                biased;
                batch = self.media.recv() => {
                    if let Some(batch) = batch {
                        self.take(batch);
                    }
                }
                input = self.inputs.recv() => match input {
                    Some(input) => self.handle_input(input),
                    None => {
                        self.close_all();
                        return;
                    }
                },
                ready = self.socket.readable() => {
                    if let Err(err) = ready {
                        tracing::error!(%err, "media socket failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                _ = tokio::time::sleep_until(next.into()) => {}
            }
        }
    }

    pub(super) fn handle_timeouts(&mut self) {
        let now = Instant::now();
        let due: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, conn)| conn.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        let mut reports = Vec::new();
        for id in due {
            if let Some(conn) = self.conns.get_mut(&id) {
                if let Err(err) = conn.pc.handle_timeout(now) {
                    tracing::debug!(parent: &conn.span, %err, "timeout handling failed");
                }
                conn.send_reports(now, &mut reports);
            }
            self.pump(id);
        }
    }

    pub(super) fn handle_input(&mut self, input: EngineInput) {
        match input {
            EngineInput::Open {
                conn,
                pc,
                credentials,
                participant,
                events,
                bandwidth,
                publisher,
                reply,
            } => {
                let publish = publisher.map(PublishTracks::new);
                self.open(
                    conn,
                    *pc,
                    credentials,
                    participant,
                    events,
                    bandwidth,
                    publish,
                );
                let _ = reply.send(Ok(()));
            }
            EngineInput::AnswerOffer { conn, sdp, reply } => {
                let result = self.with_conn(conn, |c| c.answer_offer(sdp));
                let _ = reply.send(result);
                self.pump(conn);
            }
            EngineInput::RequestKeyframe {
                upstream,
                media_ssrc,
            } => {
                if let Some(c) = self.conns.get_mut(&upstream.conn) {
                    c.request_keyframe(upstream.receiver, media_ssrc);
                }
                self.pump(upstream.conn);
            }
            EngineInput::AddTrack {
                conn,
                track,
                feedback,
                reply,
            } => {
                let result = self.with_conn(conn, |c| {
                    let track_id = track.track_id().to_string();
                    let sender = c.pc.add_track(*track).map_err(SfuError::WebRtc)?;
                    // `add_track` makes the section `sendrecv` (W3C addTrack); the server only
                    // sends on it, and says so. A removed one then goes `inactive`.
                    let ids: Vec<_> = c.pc.get_transceivers().collect();
                    for id in ids {
                        if let Some(mut transceiver) = c.pc.rtp_transceiver(id)
                            && transceiver.sender() == Some(sender)
                        {
                            transceiver.set_direction(RTCRtpTransceiverDirection::Sendonly);
                        }
                    }
                    c.feedback.insert(track_id, feedback);
                    Ok(sender)
                });
                let _ = reply.send(result);
                self.pump(conn);
            }
            EngineInput::RemoveTrack {
                conn,
                sender,
                track_id,
                reply,
            } => {
                let result = self.with_conn(conn, |c| {
                    c.feedback.remove(&track_id);
                    c.pc.remove_track(sender).map_err(SfuError::WebRtc)
                });
                let _ = reply.send(result);
                self.pump(conn);
            }
            EngineInput::CreateOffer { conn, reply } => {
                let result = self.with_conn(conn, |c| {
                    let offer = c.pc.create_offer(None).map_err(SfuError::WebRtc)?;
                    c.pc.set_local_description(Instant::now(), offer)
                        .map_err(SfuError::WebRtc)?;
                    let sdp =
                        c.pc.local_description()
                            .map(|desc| desc.sdp)
                            .ok_or(SfuError::NoLocalDescription)?;
                    let ids: Vec<_> = c.pc.get_transceivers().collect();
                    let mut mids = Vec::new();
                    for id in ids {
                        if let Some(transceiver) = c.pc.rtp_transceiver(id)
                            && let (Some(mid), Some(sender)) =
                                (transceiver.mid().clone(), transceiver.sender())
                        {
                            mids.push((mid, sender));
                        }
                    }
                    Ok((sdp, mids))
                });
                let _ = reply.send(result);
                self.pump(conn);
            }
            EngineInput::ApplyAnswer {
                conn,
                sdp,
                wanted,
                reply,
            } => {
                let result = self.with_conn(conn, |c| {
                    let answer = RTCSessionDescription::answer(sdp).map_err(SfuError::WebRtc)?;
                    c.pc.set_remote_description(Instant::now(), answer)
                        .map_err(SfuError::WebRtc)?;
                    c.answered = true;
                    let mut types = Vec::with_capacity(wanted.len());
                    for (sender, mime) in wanted {
                        let payload_type = c.pc.rtp_sender(sender).and_then(|mut sender| {
                            sender
                                .get_parameters()
                                .rtp_parameters
                                .codecs
                                .iter()
                                .find(|codec| codec.rtp_codec.mime_type.eq_ignore_ascii_case(&mime))
                                .map(|codec| codec.payload_type)
                        });
                        types.push(payload_type);
                    }
                    if let Some(transport_cc) = &mut c.transport_cc {
                        transport_cc.negotiated(transport_cc_extension(&mut c.pc));
                    }
                    Ok(types)
                });
                let _ = reply.send(result);
                self.pump(conn);
            }
            EngineInput::AddCandidate {
                conn,
                candidate,
                reply,
            } => {
                let result = self.with_conn(conn, |c| {
                    c.pc.add_remote_candidate(candidate)
                        .map_err(SfuError::WebRtc)
                });
                let _ = reply.send(result);
                self.pump(conn);
            }
            EngineInput::Close { conn } => self.close(conn),
            EngineInput::Relay { conn, delivery } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.relay_out(delivery, &self.stats);
                    self.pump(conn);
                }
            }
        }
    }

    pub(super) fn with_conn<T>(
        &mut self,
        conn: ConnId,
        f: impl FnOnce(&mut Conn) -> Result<T, SfuError>,
    ) -> Result<T, SfuError> {
        match self.conns.get_mut(&conn) {
            Some(c) => f(c),
            None => Err(SfuError::ConnectionClosed),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn open(
        &mut self,
        id: ConnId,
        pc: RTCPeerConnection,
        credentials: IceCredentials,
        participant: ParticipantId,
        events: mpsc::UnboundedSender<SfuEvent>,
        bandwidth: Option<Arc<Bandwidth>>,
        publish: Option<PublishTracks>,
    ) {
        let kind = if publish.is_some() {
            TransportKind::Publish
        } else {
            TransportKind::Subscribe
        };
        let span = match kind {
            TransportKind::Publish => tracing::info_span!("publish", participant = %participant),
            TransportKind::Subscribe => {
                tracing::info_span!("subscribe", participant = %participant)
            }
        };
        let IceCredentials { ufrag, pwd } = credentials;
        self.by_ufrag.insert(ufrag.clone(), id);
        self.conns.insert(
            id,
            Conn {
                pc,
                kind,
                participant,
                events,
                ufrag,
                ice_pwd: pwd,
                feedback: HashMap::new(),
                addrs: Vec::new(),
                deadline: None,
                failed: false,
                connected: false,
                answered: false,
                transport_cc: bandwidth.as_ref().map(|bandwidth| {
                    let estimator = Estimator::new(
                        INITIAL_ESTIMATE as f64,
                        MIN_ESTIMATE as f64,
                        MAX_ESTIMATE as f64,
                        bandwidth.probes.clone(),
                    );
                    TransportCc::new(estimator, Instant::now())
                }),
                sender_reports: (kind == TransportKind::Subscribe)
                    .then(|| SenderReports::new(Instant::now())),
                bandwidth,
                pacer: Pacer::default(),
                publish,
                relay: None,
                relay_budget: Arc::default(),
                span,
            },
        );
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.pump(id);
    }

    pub(super) fn close(&mut self, id: ConnId) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        if let Err(err) = conn.pc.close() {
            tracing::debug!(parent: &conn.span, %err, "closing connection");
        }
        // Whatever closing produced (a DTLS close_notify) still goes out.
        while let Some(write) = conn.pc.poll_write() {
            self.queue_write(write);
        }
        self.by_ufrag.remove(&conn.ufrag);
        for addr in &conn.addrs {
            self.by_addr.remove(addr);
        }
        self.stats
            .routed_addresses
            .fetch_sub(conn.addrs.len() as u64, Ordering::Relaxed);
        self.stats.connections.fetch_sub(1, Ordering::Relaxed);
        // Dropping the connection drops its tracks' queues: their fanouts end.
        tracing::debug!(parent: &conn.span, "connection closed");
    }

    pub(super) fn close_all(&mut self) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.close(id);
        }
    }

    /// The per-packet path: the queued copies, grouped by subscriber (stable, so each keeps its
    /// order), go through their subscriber's connection (interceptors, SRTP) and out.
    /// Queues a batch a fanout handed over.
    pub(super) fn take(&mut self, mut batch: MediaBatch) {
        if batch.frame_rest {
            self.queued_frame_rest += batch.copies.len();
        }
        self.queued.append(&mut batch.copies);
    }

    pub(super) async fn forward_queued(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut queued = std::mem::take(&mut self.queued);
        let copies = queued.len();
        queued.sort_by_key(|outgoing| outgoing.conn);
        let now = Instant::now();
        let mut errors = 0;
        let mut current = None;
        let mut pace = None;
        for Outgoing {
            conn,
            sender,
            packet,
            class,
        } in queued.drain(..)
        {
            if current != Some(conn) {
                self.flush().await;
                current = Some(conn);
                pace = self.conns.get(&conn).and_then(Conn::pace);
            }
            let Some(c) = self.conns.get_mut(&conn).filter(|c| c.connected) else {
                errors += 1;
                continue;
            };
            let mut out = Outbox {
                pending: &mut self.pending,
                by_addr: &self.by_addr,
                wildcard: self.wildcard,
            };
            let send_now = match (class, pace) {
                (Class::Probe, _) => {
                    if c.probe_rate().is_some() {
                        c.pacer.probe.push_back((sender, packet));
                        c.pacer.probe_next.get_or_insert(now);
                        list_pacer(&mut self.paced, c, conn);
                        continue;
                    }
                    false
                }
                (_, None) => true,
                (Class::Resend, Some(rate)) => {
                    if c.pacer.admit(now, rate, packet_bytes(&packet)) {
                        true
                    } else {
                        if c.pacer.queue_resend(rate, sender, packet) {
                            list_pacer(&mut self.paced, c, conn);
                        } else {
                            self.stats.paced_drops.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                }
                (Class::Audio, Some(rate)) => {
                    // Audio never waits, but takes its share, so video makes room for it.
                    c.pacer.refill(now, rate);
                    c.pacer.budget -= packet_bytes(&packet) as f64;
                    true
                }
                (Class::Video, Some(rate)) => {
                    if c.pacer.admit(now, rate, packet_bytes(&packet)) {
                        true
                    } else {
                        let dropped = c.pacer.queue_video(rate, sender, packet);
                        if dropped > 0 {
                            self.stats.paced_drops.fetch_add(dropped, Ordering::Relaxed);
                        }
                        list_pacer(&mut self.paced, c, conn);
                        continue;
                    }
                }
            };
            if send_now && !c.write(sender, packet, now, &mut out) {
                errors += 1;
            }
        }
        self.flush().await;
        let left = self
            .backlog
            .processed(copies, std::mem::take(&mut self.queued_frame_rest));
        self.backlog
            .measured(copies, started.elapsed(), &mut self.pace);
        self.stats.backlog.store(left as u64, Ordering::Relaxed);
        self.stats.backlog_limit.store(
            self.backlog.limit.load(Ordering::Relaxed) as u64,
            Ordering::Relaxed,
        );
        // Keep the allocation for the next round.
        self.queued = queued;
        if errors > 0 {
            self.stats.write_errors.fetch_add(errors, Ordering::Relaxed);
        }
    }

    /// Sends what pacers hold and is due: video within each budget, probe packets at their
    /// cluster's rate. Notes when the next is due.
    pub(super) fn release_paced(&mut self, now: Instant) {
        self.next_paced = None;
        if self.paced.is_empty() {
            return;
        }
        let mut paced = std::mem::take(&mut self.paced);
        let mut out = Outbox {
            pending: &mut self.pending,
            by_addr: &self.by_addr,
            wildcard: self.wildcard,
        };
        let mut next: Option<Instant> = None;
        paced.retain(|id| {
            let Some(c) = self.conns.get_mut(id) else {
                return false;
            };
            match c.pace() {
                Some(rate) => {
                    c.pacer.refill(now, rate);
                    while c.pacer.budget > 0.0
                        && let Some((sender, packet)) = c.pacer.pop()
                    {
                        c.pacer.budget -= packet_bytes(&packet) as f64;
                        c.write(sender, packet, now, &mut out);
                    }
                    if c.pacer.queued_bytes > 0 {
                        let wait = (1.0 - c.pacer.budget) / rate;
                        let due = now + Duration::from_secs_f64(wait.clamp(0.0, 1.0));
                        next = Some(next.map_or(due, |n| n.min(due)));
                    }
                }
                // No longer limited: whatever waits leaves now.
                None => {
                    while let Some((sender, packet)) = c.pacer.pop() {
                        c.write(sender, packet, now, &mut out);
                    }
                }
            }
            if let Some(rate) = c.probe_rate() {
                while c.pacer.probe_next.is_some_and(|at| at <= now)
                    && let Some((sender, packet)) = c.pacer.probe.pop_front()
                {
                    let bytes = packet_bytes(&packet);
                    let started = *c.pacer.probe_started.get_or_insert(now);
                    c.write(sender, packet, now, &mut out);
                    if c.pacer.probe.is_empty() {
                        if let Some(bandwidth) = &c.bandwidth {
                            bandwidth.probes.sent(started, now);
                        }
                        self.stats.probes_sent.fetch_add(1, Ordering::Relaxed);
                        c.pacer.probe_next = None;
                        c.pacer.probe_started = None;
                    } else {
                        let gap = Duration::from_secs_f64(bytes as f64 / rate);
                        c.pacer.probe_next = c.pacer.probe_next.map(|at| at + gap);
                    }
                }
                if let Some(due) = c.pacer.probe_next {
                    next = Some(next.map_or(due, |n| n.min(due)));
                }
            } else {
                c.pacer.probe.clear();
                c.pacer.probe_next = None;
                c.pacer.probe_started = None;
            }
            c.pacer.listed = !c.pacer.is_idle();
            c.pacer.listed
        });
        self.paced = paced;
        self.next_paced = next;
    }

    pub(super) fn queue_write(&mut self, write: TaggedBytesMut) {
        push_pending(&mut self.pending, &self.by_addr, self.wildcard, write);
    }

    /// Drains a connection's writes, events and inbound RTCP, and re-reads its timer.
    pub(super) fn pump(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let mut writes = Vec::new();
        while let Some(write) = conn.pc.poll_write() {
            writes.push(write);
        }
        while let Some(event) = conn.pc.poll_event() {
            match event {
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                    tracing::debug!(parent: &conn.span, %state, "connection state");
                    match state {
                        RTCPeerConnectionState::Connected => conn.connected = true,
                        // Disconnected may pass (ICE keeps checking): keep sending meanwhile.
                        RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                            conn.connected = false
                        }
                        _ => {}
                    }
                    if state == RTCPeerConnectionState::Failed && !conn.failed {
                        conn.failed = true;
                        let _ = conn.events.send(SfuEvent::TransportFailed {
                            participant: conn.participant.clone(),
                            kind: conn.kind,
                        });
                    }
                }
                RTCPeerConnectionEvent::OnTrack(event) => conn.track_event(id, event),
                RTCPeerConnectionEvent::OnDataChannel(event) => {
                    conn.channel_event(event, &self.stats)
                }
                _ => {}
            }
        }
        conn.estimate();
        while let Some(message) = conn.pc.poll_read() {
            match message.message {
                RTCMessage::RtpPacket(track_id, packet) => {
                    if let Some(publish) = conn.publish.as_mut()
                        && !publish.deliver(&track_id, packet)
                    {
                        self.stats.ingress_drops.fetch_add(1, Ordering::Relaxed);
                    }
                }
                RTCMessage::RtcpPacket(track_id, packets) => {
                    if let Some(route) = conn.feedback.get(&track_id) {
                        route_feedback(route, &packets);
                    }
                }
                RTCMessage::DataChannelMessage(channel, message) => {
                    conn.relay_in(channel, message, &self.stats)
                }
                _ => {}
            }
        }
        conn.deadline = conn.next_deadline();
        for write in writes {
            self.queue_write(write);
        }
    }
}

/// The transport-wide sequence number extension's id, when every stream the subscriber
/// answered for negotiated it (0 otherwise): `rtc` refuses a packet carrying an extension its
/// stream did not negotiate, so numbering only some streams' packets would drop the others.
fn transport_cc_extension(pc: &mut RTCPeerConnection) -> u8 {
    let ids: Vec<_> = pc.get_transceivers().collect();
    let mut found = None;
    for id in ids {
        let Some(sender) = pc.rtp_transceiver(id).and_then(|t| t.sender()) else {
            continue;
        };
        let Some(mut sender) = pc.rtp_sender(sender) else {
            continue;
        };
        let extension = sender
            .get_parameters()
            .rtp_parameters
            .header_extensions
            .iter()
            .find(|extension| extension.uri == TRANSPORT_CC_URI)
            .map(|extension| extension.id);
        match (extension, found) {
            (Some(id), None) => found = Some(id),
            (Some(id), Some(known)) if id == known => {}
            _ => return 0,
        }
    }
    found.and_then(|id| u8::try_from(id).ok()).unwrap_or(0)
}

impl Conn {
    /// When the connection next needs a turn: its own timers, or its sender reports.
    pub(super) fn next_deadline(&mut self) -> Option<Instant> {
        let timer = self.pc.poll_timeout();
        match (
            timer,
            self.sender_reports.as_ref().and_then(SenderReports::due),
        ) {
            (Some(timer), Some(report)) => Some(timer.min(report)),
            (timer, report) => timer.or(report),
        }
    }

    /// Writes the sender reports that are due (`reports` is scratch space).
    fn send_reports(&mut self, now: Instant, reports: &mut Vec<(RTCRtpSenderId, SenderReport)>) {
        let Some(sender_reports) = &mut self.sender_reports else {
            return;
        };
        sender_reports.take_due(now, reports);
        for (sender, report) in reports.drain(..) {
            if let Some(mut sender) = self.pc.rtp_sender(sender) {
                let _ = sender.write_rtcp(now, vec![Box::new(report)]);
            }
        }
    }

    /// Runs the estimator on the transport-wide feedback the subscriber sent since last time,
    /// and keeps the estimate (unless it comes from the subscriber's REMB).
    fn estimate(&mut self) {
        let (Some(transport_cc), Some(bandwidth)) = (&mut self.transport_cc, &self.bandwidth)
        else {
            return;
        };
        let pending = match bandwidth.transport_feedback.lock() {
            Ok(mut pending) if !pending.is_empty() => std::mem::take(&mut *pending),
            _ => return,
        };
        let now = Instant::now();
        for feedback in &pending {
            if let Some(estimate) = transport_cc.on_feedback(feedback, now)
                && !bandwidth.from_remb.load(Ordering::Relaxed)
            {
                bandwidth.estimate.store(estimate, Ordering::Relaxed);
            }
        }
    }

    /// A data channel opened or closed. A publish connection serves one relay channel; any
    /// other channel is closed (and counted), so a client cannot make the server keep many.
    fn channel_event(&mut self, event: RTCDataChannelEvent, stats: &EngineStats) {
        match event {
            RTCDataChannelEvent::OnOpen(channel) => {
                let label_ok = self
                    .pc
                    .data_channel(channel)
                    .is_some_and(|dc| dc.label() == RELAY_CHANNEL);
                if label_ok && self.publish.is_some() && self.relay.is_none() {
                    tracing::debug!(parent: &self.span, "relay channel open");
                    self.relay = Some(channel);
                } else {
                    stats.refused_channels.fetch_add(1, Ordering::Relaxed);
                    if let Some(mut dc) = self.pc.data_channel(channel) {
                        let _ = dc.close();
                    }
                }
            }
            RTCDataChannelEvent::OnClose(channel) if self.relay == Some(channel) => {
                self.relay = None;
            }
            _ => {}
        }
    }

    /// A message on a data channel: from the relay channel, a message for another
    /// participant, handed to the owner within the sender's budget.
    fn relay_in(
        &mut self,
        channel: RTCDataChannelId,
        message: RTCDataChannelMessage,
        stats: &EngineStats,
    ) {
        if self.relay != Some(channel) || message.is_string {
            stats.relay_drops.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Ok((to, payload)) = open_envelope(&message.data) else {
            stats.relay_drops.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(ticket) = self.relay_budget.take(message.data.len()) else {
            stats.relay_drops.fetch_add(1, Ordering::Relaxed);
            self.relay_notice(&Notice::OverBudget);
            return;
        };
        let data = RelayedData {
            from: self.participant.clone(),
            to: to.to_owned(),
            payload: bytes::Bytes::copy_from_slice(payload),
            _ticket: ticket,
        };
        let _ = self.events.send(SfuEvent::Relayed(data));
    }

    /// Writes relayed data or a notice to this connection's relay channel: data only while
    /// the channel holds less than [`RELAY_BUFFER_BYTES`] the client has not taken.
    pub(super) fn relay_out(&mut self, delivery: Delivery, stats: &EngineStats) {
        match delivery {
            Delivery::Data(data, sender) => {
                let Some(mut dc) = self.relay.and_then(|channel| self.pc.data_channel(channel))
                else {
                    stats.relay_drops.fetch_add(1, Ordering::Relaxed);
                    sender.notify(Notice::Undeliverable {
                        to: self.participant.to_string(),
                    });
                    return;
                };
                let sealed = seal_envelope(data.from.as_str(), &data.payload);
                let len = sealed.len();
                if dc.outstanding_bytes() + len > RELAY_BUFFER_BYTES {
                    stats.relay_drops.fetch_add(1, Ordering::Relaxed);
                    self.relay_notice(&Notice::Dropped {
                        from: data.from.to_string(),
                    });
                    return;
                }
                if dc.send(Instant::now(), sealed).is_ok() {
                    stats.relay_messages.fetch_add(1, Ordering::Relaxed);
                    stats.relay_bytes.fetch_add(len as u64, Ordering::Relaxed);
                } else {
                    stats.relay_drops.fetch_add(1, Ordering::Relaxed);
                }
                // The ticket goes with `data`: the sender's budget is given back.
            }
            Delivery::Notice(notice) => self.relay_notice(&notice),
        }
    }

    /// A notice on the relay channel, unless the channel already holds twice its buffer (a
    /// client that floods and reads nothing is not told about every message).
    fn relay_notice(&mut self, notice: &Notice) {
        let Some(mut dc) = self.relay.and_then(|channel| self.pc.data_channel(channel)) else {
            return;
        };
        if dc.outstanding_bytes() <= 2 * RELAY_BUFFER_BYTES {
            let _ = dc.send_text(Instant::now(), notice.to_json());
        }
    }
}

/// Passes a subscriber's keyframe requests and NACKs to the publication's fanout (advisory:
/// the engine never waits on a fanout).
pub(super) fn route_feedback(route: &FeedbackRoute, packets: &[Box<dyn rtc::rtcp::Packet>]) {
    let mut seqs = Vec::new();
    let mut keyframe = false;
    for packet in packets {
        let any = packet.as_any();
        if let Some(nack) = any.downcast_ref::<TransportLayerNack>() {
            seqs.extend(nack.nacks.iter().flat_map(|pair| pair.packet_list()));
        } else if any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>() {
            keyframe = true;
        }
    }
    if !seqs.is_empty() {
        route.send(SubscriberFeedback::Nack(seqs));
    }
    if keyframe {
        route.send(SubscriberFeedback::KeyframeRequest);
    }
}
