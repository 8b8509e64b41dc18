//! A headless client speaking the public protocol over real HTTP, WebSocket and WebRTC
//! (webrtc-rs), and helpers to start a server inside the test.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionEventHandler, RTCIceGatheringState, RTCSessionDescription,
};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A server on an ephemeral port with media on loopback.
pub async fn start_server(max_participants: usize) -> Result<signaling::Server> {
    let config = signaling::Config {
        bind: "127.0.0.1:0".parse()?,
        media_ip: Some("127.0.0.1".parse()?),
        max_participants,
        // These tests exercise the media plane: every room is an SFU room from its first member.
        mesh_max: 0,
        // Two media threads whatever the machine: connections spread over both, so packets
        // cross from one thread's publisher to another's subscribers.
        media_threads: 2,
        log_level: "warn".into(),
        ..signaling::Config::default()
    };
    Ok(signaling::Server::start(config).await?)
}

/// A server on an ephemeral port whose rooms are meshes up to `mesh_max` participants.
pub async fn start_mesh_server(mesh_max: usize, hold_secs: u64) -> Result<signaling::Server> {
    let config = signaling::Config {
        bind: "127.0.0.1:0".parse()?,
        media_ip: Some("127.0.0.1".parse()?),
        mesh_max,
        mesh_hold_secs: hold_secs,
        log_level: "warn".into(),
        ..signaling::Config::default()
    };
    Ok(signaling::Server::start(config).await?)
}

pub async fn token(server: &signaling::Server, user: &str, room: &str) -> Result<String> {
    token_granting(server, user, room, json!({})).await
}

/// A token with `grants` (minted openly: the development posture).
pub async fn token_granting(
    server: &signaling::Server,
    user: &str,
    room: &str,
    grants: Value,
) -> Result<String> {
    let body: Value = reqwest::Client::new()
        .post(format!("http://{}/auth/token", server.addr))
        .json(&json!({"userId": user, "room": room, "grants": grants}))
        .send()
        .await?
        .json()
        .await?;
    body["token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no token in {body}"))
}

/// `GET /api/rooms`, with a token that grants listing rooms (minted openly: the development
/// posture).
pub async fn list_rooms(server: &signaling::Server) -> Result<Value> {
    let http = reqwest::Client::new();
    let body: Value = http
        .post(format!("http://{}/auth/token", server.addr))
        .json(&json!({"userId": "operator", "room": "any", "grants": {"roomList": true}}))
        .send()
        .await?
        .json()
        .await?;
    let token = body["token"]
        .as_str()
        .ok_or_else(|| anyhow!("no token in {body}"))?;
    Ok(http
        .get(format!("http://{}/api/rooms", server.addr))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// A bare signaling socket, for protocol tests.
pub async fn connect(server: &signaling::Server, user: &str, room: &str) -> Result<Ws> {
    connect_granting(server, user, room, json!({})).await
}

/// A bare signaling socket whose token carries `grants`.
pub async fn connect_granting(
    server: &signaling::Server,
    user: &str,
    room: &str,
    grants: Value,
) -> Result<Ws> {
    let token = token_granting(server, user, room, grants).await?;
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws/signal?token={token}", server.addr))
            .await?;
    Ok(ws)
}

pub async fn send(ws: &mut Ws, message: Value) -> Result<()> {
    ws.send(Message::Text(message.to_string().into())).await?;
    Ok(())
}

/// The next JSON message, skipping pings; errors after `timeout`.
pub async fn recv(ws: &mut Ws, timeout: Duration) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .context("timed out waiting for a message")?
            .ok_or_else(|| anyhow!("socket closed"))??;
        match frame {
            Message::Text(text) => return Ok(serde_json::from_str(&text)?),
            Message::Close(frame) => bail!("socket closed: {frame:?}"),
            _ => {}
        }
    }
}

/// The next message of `kind`, skipping others.
pub async fn recv_type(ws: &mut Ws, kind: &str, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = recv(ws, left)
            .await
            .with_context(|| format!("waiting for `{kind}`"))?;
        if message["type"] == kind {
            return Ok(message);
        }
    }
}

fn opus() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: "audio/opus".into(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
        rtcp_feedback: vec![],
    }
}

fn vp8() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: "video/VP8".into(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![],
    }
}

struct Handler {
    gathered: watch::Sender<bool>,
    media: Option<mpsc::UnboundedSender<Received>>,
}

/// One RTP packet a subscriber received.
#[derive(Clone)]
pub struct Received {
    /// The msid stream id: the publisher's participant id.
    pub stream_id: String,
    /// The msid track id: the publication id.
    pub publication_id: String,
    pub kind: RtpCodecKind,
    pub payload: Bytes,
    pub at: Instant,
    /// The track it arrived on (to send feedback on, as a receiver does).
    pub track: Arc<dyn TrackRemote>,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("stream_id", &self.stream_id)
            .field("publication_id", &self.publication_id)
            .field("kind", &self.kind)
            .field("payload", &self.payload.len())
            .finish()
    }
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.send_replace(true);
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let Some(media) = self.media.clone() else {
            return;
        };
        let stream_id = track.stream_id().await.to_string();
        let publication_id = track.track_id().await.to_string();
        let kind = track.kind().await;
        tokio::spawn(async move {
            while let Some(event) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(packet) = event {
                    let _ = media.send(Received {
                        stream_id: stream_id.clone(),
                        publication_id: publication_id.clone(),
                        kind,
                        payload: packet.payload.clone(),
                        at: Instant::now(),
                        track: track.clone(),
                    });
                }
            }
        });
    }
}

/// Tokio, except that every `drop_every`-th incoming RTP datagram is thrown away before
/// decryption, as a lossy network would: the client's NACK generator then asks for it again.
#[derive(Debug)]
struct LossyRuntime {
    inner: webrtc::runtime::TokioRuntime,
    drop_every: u64,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug)]
struct LossySocket {
    socket: tokio::net::UdpSocket,
    drop_every: u64,
    seen: std::sync::atomic::AtomicU64,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    /// Once set, nothing goes in or out: the network path is gone.
    cut: Arc<std::sync::atomic::AtomicBool>,
}

fn is_rtp(datagram: &[u8]) -> bool {
    // RFC 7983: 128-191 is RTP or RTCP; RTCP packet types 192-223 sit in the second byte.
    datagram.len() > 12 && (128..=191).contains(&datagram[0]) && !(192..=223).contains(&datagram[1])
}

impl webrtc::runtime::AsyncUdpSocket for LossySocket {
    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.socket.local_addr()
    }

    fn poll_send(
        &self,
        cx: &mut std::task::Context<'_>,
        transmit: &webrtc::runtime::Transmit<'_>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.cut.load(std::sync::atomic::Ordering::Relaxed) {
            return std::task::Poll::Ready(Ok(transmit.contents.len()));
        }
        self.socket
            .poll_send_to(cx, transmit.contents, transmit.destination)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context<'_>,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [webrtc::runtime::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::sync::atomic::Ordering;
        use std::task::Poll;
        loop {
            let mut buf = tokio::io::ReadBuf::new(&mut bufs[0]);
            let addr = match self.socket.poll_recv_from(cx, &mut buf) {
                Poll::Ready(Ok(addr)) => addr,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            };
            let len = buf.filled().len();
            if self.cut.load(Ordering::Relaxed) {
                continue;
            }
            if is_rtp(buf.filled()) {
                let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
                if n % self.drop_every == 0 {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            let mut m = webrtc::runtime::RecvMeta::default();
            m.addr = addr;
            m.len = len;
            m.stride = len.max(1);
            meta[0] = m;
            return Poll::Ready(Ok(1));
        }
    }
}

impl webrtc::runtime::Runtime for LossyRuntime {
    fn spawn(
        &self,
        future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    ) -> Box<dyn webrtc::runtime::JoinHandle> {
        self.inner.spawn(future)
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn webrtc::runtime::AsyncUdpSocket>> {
        socket.set_nonblocking(true)?;
        Ok(Arc::new(LossySocket {
            socket: tokio::net::UdpSocket::from_std(socket)?,
            drop_every: self.drop_every,
            seen: std::sync::atomic::AtomicU64::new(0),
            dropped: self.dropped.clone(),
            cut: self.cut.clone(),
        }))
    }

    fn wrap_tcp_listener(
        &self,
        listener: std::net::TcpListener,
    ) -> std::io::Result<Arc<dyn webrtc::runtime::AsyncTcpListener>> {
        self.inner.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        remote_addr: std::net::SocketAddr,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = std::io::Result<Arc<dyn webrtc::runtime::AsyncTcpStream>>,
                > + Send
                + 'a,
        >,
    > {
        self.inner.connect_tcp(remote_addr)
    }

    fn resolve_host<'a>(
        &'a self,
        host: &'a str,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = std::io::Result<Vec<std::net::SocketAddr>>>
                + Send
                + 'a,
        >,
    > {
        self.inner.resolve_host(host)
    }

    fn sleep(
        &self,
        duration: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        self.inner.sleep(duration)
    }

    fn interval(&self, period: Duration) -> Box<dyn webrtc::runtime::AsyncInterval> {
        self.inner.interval(period)
    }

    fn block_on(&self, future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>) {
        self.inner.block_on(future)
    }
}

async fn peer_connection(
    media: Option<mpsc::UnboundedSender<Received>>,
) -> Result<(Arc<dyn PeerConnection>, watch::Receiver<bool>)> {
    peer_connection_with(media, None, CongestionFeedback::Twcc).await
}

async fn peer_connection_with(
    media: Option<mpsc::UnboundedSender<Received>>,
    runtime: Option<Arc<dyn webrtc::runtime::Runtime>>,
    feedback: CongestionFeedback,
) -> Result<(Arc<dyn PeerConnection>, watch::Receiver<bool>)> {
    let (gathered, gathered_rx) = watch::channel(false);
    let handler = Arc::new(Handler { gathered, media });
    let pc = switchboard_bench::client::loopback_peer_connection_with(
        handler,
        runtime,
        feedback,
        switchboard_bench::client::Srtp::default(),
    )
    .await?;
    Ok((pc, gathered_rx))
}

pub use switchboard_bench::client::CongestionFeedback;
use switchboard_bench::client::local_sdp;

/// What the socket task saw, other than media.
#[derive(Clone, Debug)]
pub enum Event {
    Message(Value),
    Closed,
}

/// A participant with a subscribe connection that answers every server offer, and optionally
/// a publish connection carrying one audio and one video track.
pub struct TestClient {
    pub participant_id: String,
    pub joined: Value,
    outgoing: mpsc::UnboundedSender<Value>,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub media: mpsc::UnboundedReceiver<Received>,
    publish_answers: Option<mpsc::UnboundedReceiver<String>>,
    pub audio: Option<Arc<TrackLocalStaticRTP>>,
    pub video: Option<Arc<TrackLocalStaticRTP>>,
    pub screen: Option<Arc<TrackLocalStaticRTP>>,
    /// Cuts the subscribe connection's network path (joined with `join_lossy` only).
    pub cut: Arc<std::sync::atomic::AtomicBool>,
    audio_seq: std::sync::atomic::AtomicU16,
    publish_pc: Option<Arc<dyn PeerConnection>>,
    subscribe_pc: Arc<dyn PeerConnection>,
    socket_task: tokio::task::JoinHandle<()>,
}

impl TestClient {
    /// Joins `room` as `name`.
    pub async fn join(server: &signaling::Server, room: &str, name: &str) -> Result<Self> {
        Self::join_lossy(server, room, name, None).await
    }

    /// Joins `room` as `name` with a token carrying `grants`.
    pub async fn join_granted(
        server: &signaling::Server,
        room: &str,
        name: &str,
        grants: Value,
    ) -> Result<Self> {
        let ws = connect_granting(server, name, room, grants).await?;
        Self::join_on(ws, name, None, CongestionFeedback::Twcc).await
    }

    /// Joins `room` as `name`, its subscribe connection sending `feedback`.
    pub async fn join_with_feedback(
        server: &signaling::Server,
        room: &str,
        name: &str,
        feedback: CongestionFeedback,
    ) -> Result<Self> {
        Self::join_with(server, room, name, None, feedback).await
    }

    /// Joins `room` as `name`; with `loss = Some((n, counter))` every n-th RTP datagram that
    /// reaches the subscribe connection is lost, counted in `counter`.
    pub async fn join_lossy(
        server: &signaling::Server,
        room: &str,
        name: &str,
        loss: Option<(u64, Arc<std::sync::atomic::AtomicU64>)>,
    ) -> Result<Self> {
        Self::join_with(server, room, name, loss, CongestionFeedback::Twcc).await
    }

    async fn join_with(
        server: &signaling::Server,
        room: &str,
        name: &str,
        loss: Option<(u64, Arc<std::sync::atomic::AtomicU64>)>,
        feedback: CongestionFeedback,
    ) -> Result<Self> {
        let ws = connect(server, name, room).await?;
        Self::join_on(ws, name, loss, feedback).await
    }

    async fn join_on(
        mut ws: Ws,
        name: &str,
        loss: Option<(u64, Arc<std::sync::atomic::AtomicU64>)>,
        feedback: CongestionFeedback,
    ) -> Result<Self> {
        send(&mut ws, json!({"type": "join", "name": name})).await?;
        let joined = recv_type(&mut ws, "joined", Duration::from_secs(5)).await?;
        Self::from_joined(ws, joined, loss, feedback).await
    }

    /// A client on a socket that has just received `joined`.
    pub async fn from_joined(
        ws: Ws,
        joined: Value,
        loss: Option<(u64, Arc<std::sync::atomic::AtomicU64>)>,
        feedback: CongestionFeedback,
    ) -> Result<Self> {
        let participant_id = joined["participantId"]
            .as_str()
            .ok_or_else(|| anyhow!("no participantId in {joined}"))?
            .to_owned();
        let (media_tx, media) = mpsc::unbounded_channel();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let runtime = loss.map(|(drop_every, dropped)| {
            Arc::new(LossyRuntime {
                inner: webrtc::runtime::TokioRuntime,
                drop_every,
                dropped,
                cut: cut.clone(),
            }) as Arc<dyn webrtc::runtime::Runtime>
        });
        let (subscribe_pc, subscribe_gathered) =
            peer_connection_with(Some(media_tx), runtime, feedback).await?;
        let (outgoing, outgoing_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (answers_tx, answers_rx) = mpsc::unbounded_channel();
        let socket_task = tokio::spawn(socket_loop(
            ws,
            subscribe_pc.clone(),
            subscribe_gathered,
            outgoing_rx,
            events_tx,
            answers_tx,
        ));
        Ok(Self {
            participant_id,
            joined,
            outgoing,
            events,
            media,
            publish_answers: Some(answers_rx),
            audio: None,
            video: None,
            screen: None,
            cut,
            audio_seq: std::sync::atomic::AtomicU16::new(rand::random::<u16>() >> 1),
            publish_pc: None,
            subscribe_pc,
            socket_task,
        })
    }

    /// Publishes one Opus and one VP8 track.
    pub async fn publish(&mut self) -> Result<()> {
        let (pc, mut gathered) = peer_connection(None).await?;
        let audio = local_track("mic", RtpCodecKind::Audio, opus());
        let video = local_track("cam", RtpCodecKind::Video, vp8());
        pc.add_track(audio.clone() as Arc<dyn TrackLocal>).await?;
        pc.add_track(video.clone() as Arc<dyn TrackLocal>).await?;
        let offer = pc.create_offer(None).await?;
        let sdp = local_sdp(&pc, &mut gathered, offer).await?;
        self.negotiate_publish(&pc, sdp, camera_and_microphone())
            .await?;
        self.audio = Some(audio);
        self.video = Some(video);
        self.publish_pc = Some(pc);
        Ok(())
    }

    /// Opens a publish connection that carries only the relay data channel (files in SFU
    /// rooms) and waits until the channel is open.
    pub async fn open_relay(&mut self) -> Result<Arc<dyn webrtc::data_channel::DataChannel>> {
        let (pc, mut gathered) = peer_connection(None).await?;
        let channel = pc.create_data_channel("switchboard-relay", None).await?;
        let offer = pc.create_offer(None).await?;
        let sdp = local_sdp(&pc, &mut gathered, offer).await?;
        self.negotiate_publish(&pc, sdp, Vec::new()).await?;
        self.publish_pc = Some(pc);
        let opened = async {
            while let Some(event) = channel.poll().await {
                if matches!(event, webrtc::data_channel::DataChannelEvent::OnOpen) {
                    return Ok(());
                }
            }
            bail!("the relay channel closed before it opened")
        };
        tokio::time::timeout(Duration::from_secs(10), opened)
            .await
            .context("relay channel open")??;
        Ok(channel)
    }

    /// The publish connection, once opened.
    pub fn publish_connection(&self) -> Option<Arc<dyn PeerConnection>> {
        self.publish_pc.clone()
    }

    /// Adds a screen share to the publish connection and re-offers it.
    pub async fn publish_screen(&mut self) -> Result<()> {
        let pc = self
            .publish_pc
            .clone()
            .ok_or_else(|| anyhow!("publish first"))?;
        let screen = local_track("screen", RtpCodecKind::Video, vp8());
        pc.add_track(screen.clone() as Arc<dyn TrackLocal>).await?;
        let offer = pc.create_offer(None).await?;
        pc.set_local_description(offer).await?;
        let sdp = pc
            .local_description()
            .await
            .ok_or_else(|| anyhow!("no local description"))?
            .sdp;
        let mut tracks = camera_and_microphone();
        tracks.push(json!({"trackId": "screen", "source": "screen"}));
        self.negotiate_publish(&pc, sdp, tracks).await?;
        self.screen = Some(screen);
        Ok(())
    }

    /// Publishes a microphone, a camera and a screen in one offer described as another stack
    /// would: `munge` rewrites the offer's SDP before it is sent (the client's own description
    /// stays as made), and `declare(local track id, mid)` gives each entry of `tracks`.
    pub async fn publish_described(
        &mut self,
        munge: impl Fn(&str) -> String,
        declare: impl Fn(&str, &str) -> Value,
    ) -> Result<()> {
        let (pc, mut gathered) = peer_connection(None).await?;
        let audio = local_track("mic", RtpCodecKind::Audio, opus());
        let video = local_track("cam", RtpCodecKind::Video, vp8());
        let screen = local_track("screen", RtpCodecKind::Video, vp8());
        for track in [&audio, &video, &screen] {
            pc.add_track(track.clone() as Arc<dyn TrackLocal>).await?;
        }
        let offer = pc.create_offer(None).await?;
        let sdp = local_sdp(&pc, &mut gathered, offer).await?;
        let mut tracks = Vec::new();
        for transceiver in pc.get_transceivers().await {
            let (Some(mid), Some(sender)) = (transceiver.mid().await?, transceiver.sender().await?)
            else {
                continue;
            };
            tracks.push(declare(&sender.track().track_id().await, &mid));
        }
        self.negotiate_publish(&pc, munge(&sdp), tracks).await?;
        self.audio = Some(audio);
        self.video = Some(video);
        self.screen = Some(screen);
        self.publish_pc = Some(pc);
        Ok(())
    }

    /// Sends a publish offer naming the tracks, and applies the server's answer.
    async fn negotiate_publish(
        &mut self,
        pc: &Arc<dyn PeerConnection>,
        sdp: String,
        tracks: Vec<Value>,
    ) -> Result<()> {
        self.outgoing.send(json!({
            "type": "offer", "peerId": "sfu", "transport": "publish", "sdp": sdp, "tracks": tracks
        }))?;
        let answers = self
            .publish_answers
            .as_mut()
            .ok_or_else(|| anyhow!("no answer channel"))?;
        let answer = tokio::time::timeout(Duration::from_secs(10), answers.recv())
            .await?
            .ok_or_else(|| anyhow!("socket closed before the publish answer"))?;
        pc.set_remote_description(RTCSessionDescription::answer(answer)?)
            .await?;
        Ok(())
    }

    /// Sends numbered audio packets until `receiver` gets one (its subscription is live).
    pub async fn audio_until_received(&self, receiver: &mut TestClient) -> Result<()> {
        let (audio_pt, _) = self.payload_types().await?;
        let audio = self
            .audio
            .clone()
            .ok_or_else(|| anyhow!("not publishing"))?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while receiver.media.try_recv().is_err() {
            if Instant::now() > deadline {
                bail!("{} received no media within 15 s", receiver.participant_id);
            }
            // One continuous sequence per publisher: SRTP derives its rollover counter from it,
            // so a jump would make the server discard the packets as unauthentic.
            let seq = self
                .audio_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let ts = u32::from(seq) * 960;
            write(&audio, audio_pt, seq, ts, Bytes::from_static(b"\xF8x")).await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Sends one audio packet whose audio-level extension (RFC 6464) says `level` -dBov
    /// (0 the loudest, 127 silence).
    pub async fn send_audio_level(&self, level: u8) -> Result<()> {
        let pc = self
            .publish_pc
            .as_ref()
            .ok_or_else(|| anyhow!("not publishing"))?;
        let sdp = pc
            .local_description()
            .await
            .ok_or_else(|| anyhow!("no local description"))?
            .sdp;
        let id = sdp
            .lines()
            .filter_map(|l| l.trim_end().strip_prefix("a=extmap:"))
            .find(|l| l.ends_with(sfu::AUDIO_LEVEL_URI))
            .and_then(|l| l.split([' ', '/']).next())
            .and_then(|id| id.parse::<u8>().ok())
            .ok_or_else(|| anyhow!("no audio-level extension negotiated"))?;
        let (audio_pt, _) = self.payload_types().await?;
        let audio = self
            .audio
            .clone()
            .ok_or_else(|| anyhow!("not publishing"))?;
        let ssrc = audio
            .ssrcs()
            .await
            .first()
            .copied()
            .ok_or_else(|| anyhow!("no ssrc"))?;
        let seq = self
            .audio_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut header = rtp::Header {
            version: 2,
            payload_type: audio_pt,
            sequence_number: seq,
            timestamp: u32::from(seq) * 960,
            ssrc,
            ..Default::default()
        };
        header.set_extension(id, Bytes::from(vec![0x80 | level]))?;
        let packet = rtp::Packet {
            header,
            payload: Bytes::from_static(b"\xF8x"),
        };
        Ok(audio.write_rtp(packet).await?)
    }

    /// The payload types the publish connection negotiated: (Opus, VP8).
    pub async fn payload_types(&self) -> Result<(u8, u8)> {
        let pc = self
            .publish_pc
            .as_ref()
            .ok_or_else(|| anyhow!("not publishing"))?;
        let (mut audio, mut video) = (None, None);
        for sender in pc.get_senders().await {
            let parameters = sender.get_parameters().await?;
            for codec in &parameters.rtp_parameters.codecs {
                match codec.rtp_codec.mime_type.to_ascii_lowercase().as_str() {
                    "audio/opus" => audio = audio.or(Some(codec.payload_type)),
                    "video/vp8" => video = video.or(Some(codec.payload_type)),
                    _ => {}
                }
            }
        }
        Ok((
            audio.ok_or_else(|| anyhow!("no opus"))?,
            video.ok_or_else(|| anyhow!("no vp8"))?,
        ))
    }

    pub fn send(&self, message: Value) -> Result<()> {
        Ok(self.outgoing.send(message)?)
    }

    /// The server's last offer on the subscribe connection.
    pub async fn subscribe_offer(&self) -> Option<String> {
        Some(self.subscribe_pc.remote_description().await?.sdp)
    }

    /// The subscribe connection's last answer, as sent to the server.
    pub async fn subscribe_answer(&self) -> Option<String> {
        Some(self.subscribe_pc.local_description().await?.sdp)
    }

    /// Waits for a signaling message of `kind`.
    pub async fn wait_for(&mut self, kind: &str, timeout: Duration) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => bail!("no `{kind}` within {timeout:?}"),
                Ok(None) | Ok(Some(Event::Closed)) => bail!("socket closed waiting for `{kind}`"),
                Ok(Some(Event::Message(message))) if message["type"] == kind => return Ok(message),
                Ok(Some(Event::Message(_))) => {}
            }
        }
    }

    /// Leaves with `leave` and closes the connections.
    pub async fn leave(self) -> Result<()> {
        self.outgoing.send(json!({"type": "leave"}))?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.close_media().await;
        Ok(())
    }

    /// Goes silent: the socket stays open but nothing is read or answered (not even pings),
    /// as when a laptop lid closes or a network path dies without a TCP reset.
    pub fn freeze(&self) -> Result<()> {
        Ok(self.outgoing.send(json!({"__freeze": true}))?)
    }

    /// Vanishes without a word: the socket task and the connections just stop.
    pub async fn vanish(self) {
        self.socket_task.abort();
        self.close_media().await;
    }

    async fn close_media(&self) {
        if let Some(pc) = &self.publish_pc {
            let _ = pc.close().await;
        }
        let _ = self.subscribe_pc.close().await;
    }
}

/// The `tracks` of [`TestClient::publish`]: named by msid track id, as webrtc-rs writes it.
fn camera_and_microphone() -> Vec<Value> {
    vec![
        json!({"trackId": "mic", "source": "microphone"}),
        json!({"trackId": "cam", "source": "camera"}),
    ]
}

fn local_track(id: &str, kind: RtpCodecKind, codec: RTCRtpCodec) -> Arc<TrackLocalStaticRTP> {
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        "test-stream".into(),
        id.into(),
        id.into(),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(rand::random::<u32>()),
                ..Default::default()
            },
            codec,
            ..Default::default()
        }],
    )))
}

/// Sends one RTP packet on a publisher track.
pub async fn write(
    track: &TrackLocalStaticRTP,
    payload_type: u8,
    seq: u16,
    ts: u32,
    payload: Bytes,
) -> Result<()> {
    let ssrc = track
        .ssrcs()
        .await
        .first()
        .copied()
        .ok_or_else(|| anyhow!("no ssrc"))?;
    let packet = rtp::Packet {
        header: rtp::Header {
            version: 2,
            marker: true,
            payload_type,
            sequence_number: seq,
            timestamp: ts,
            ssrc,
            ..Default::default()
        },
        payload,
    };
    Ok(track.write_rtp(packet).await?)
}

use webrtc::media_stream::Track as _;

async fn socket_loop(
    mut ws: Ws,
    subscribe_pc: Arc<dyn PeerConnection>,
    mut gathered: watch::Receiver<bool>,
    mut outgoing: mpsc::UnboundedReceiver<Value>,
    events: mpsc::UnboundedSender<Event>,
    publish_answers: mpsc::UnboundedSender<String>,
) {
    loop {
        tokio::select! {
            Some(message) = outgoing.recv() => {
                if message.get("__freeze").is_some() {
                    // Hold the socket open, unread, until the test ends.
                    let _held = ws;
                    std::future::pending::<()>().await;
                    return;
                }
                if send(&mut ws, message).await.is_err() {
                    break;
                }
            }
            frame = ws.next() => {
                let Some(Ok(frame)) = frame else { break };
                let Message::Text(text) = frame else { continue };
                let Ok(message) = serde_json::from_str::<Value>(&text) else { continue };
                match (message["type"].as_str(), message["transport"].as_str()) {
                    (Some("offer"), Some("subscribe")) => {
                        let sdp = message["sdp"].as_str().unwrap_or_default().to_owned();
                        let answer = async {
                            subscribe_pc.set_remote_description(RTCSessionDescription::offer(sdp)?).await?;
                            let answer = subscribe_pc.create_answer(None).await?;
                            local_sdp(&subscribe_pc, &mut gathered, answer).await
                        }.await;
                        match answer {
                            Ok(sdp) => {
                                let reply = json!({"type": "answer", "peerId": "sfu", "transport": "subscribe", "sdp": sdp});
                                if send(&mut ws, reply).await.is_err() {
                                    break;
                                }
                            }
                            Err(err) => eprintln!("subscribe answer failed: {err}"),
                        }
                        let _ = events.send(Event::Message(message));
                    }
                    (Some("answer"), Some("publish")) => {
                        let _ = publish_answers.send(message["sdp"].as_str().unwrap_or_default().to_owned());
                    }
                    _ => {
                        let _ = events.send(Event::Message(message));
                    }
                }
            }
        }
    }
    let _ = events.send(Event::Closed);
}
