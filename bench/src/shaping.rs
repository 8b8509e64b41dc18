//! How the bench's clients receive: as a browser does, one datagram per read (no UDP GRO, which
//! would hand over a whole GSO batch at once and flatter the server's per-packet cost), and for a
//! shaped subscriber through a downlink in the generator's own socket layer: what the server sends
//! waits in a queue served at the link's rate and is dropped when that queue holds more than
//! [`QUEUE_DELAY`], as a router's buffer in front of a slow link (tc's tbf with `latency 100ms`,
//! without its burst). Uplink (feedback) goes out unshaped.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, JoinHandle, RecvMeta, Runtime,
    TokioRuntime, Transmit,
};

/// The deepest the link's queue gets: longer waits are dropped.
pub const QUEUE_DELAY: Duration = Duration::from_millis(100);
/// Bytes a datagram takes on the wire beyond its UDP payload (UDP, IPv4, Ethernet).
const WIRE_OVERHEAD: usize = 8 + 20 + 14;
/// Largest datagram read.
const MAX_DATAGRAM: usize = 2048;

/// Tokio, with every UDP socket's receive side as a client of the bench wants it.
#[derive(Debug)]
pub struct ClientRuntime {
    /// The downlink's rate in bits per second, and where to count what it drops.
    link: Option<(u64, Arc<AtomicU64>)>,
    /// Let the kernel coalesce received datagrams (UDP GRO), as no browser does.
    gro: bool,
}

impl ClientRuntime {
    /// Sockets that receive as a browser does: one datagram per read, unless `gro`.
    pub fn unshaped(gro: bool) -> Self {
        Self { link: None, gro }
    }

    /// Sockets that receive at most `rate_bps` bits per second, counting what the link drops
    /// into `dropped` (one datagram per read).
    pub fn shaped(rate_bps: u64, dropped: Arc<AtomicU64>) -> Self {
        Self {
            link: Some((rate_bps.max(1), dropped)),
            gro: false,
        }
    }
}

/// Turns UDP GRO off on `fd` (quinn-udp turns it on where the kernel has it).
fn disable_gro(fd: RawFd) -> io::Result<()> {
    let off: libc::c_int = 0;
    // SAFETY: `fd` is an open UDP socket, and the option's value is a c_int of the size given.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&raw const off).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        let err = io::Error::last_os_error();
        // A kernel without UDP GRO never coalesces anyway.
        if err.raw_os_error() == Some(libc::ENOPROTOOPT) {
            Ok(())
        } else {
            Err(err)
        }
    }
}

/// One datagram on its way through the link.
struct InFlight {
    due: Instant,
    from: SocketAddr,
    data: Vec<u8>,
}

/// The link's queue, filled by the socket's reader task as datagrams arrive (so each is timed
/// when it arrives, not when the client gets round to reading) and emptied by the client.
#[derive(Default)]
struct Link {
    queue: VecDeque<InFlight>,
    /// When the link finishes sending what it holds.
    free_at: Option<Instant>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The client waiting for a datagram.
    waker: Option<Waker>,
    /// The socket failed with this.
    failed: Option<io::ErrorKind>,
}

impl Link {
    /// Admits a datagram that arrived `now`, or drops it when the queue is full; true when
    /// admitted.
    fn admit(
        &mut self,
        data: Vec<u8>,
        from: SocketAddr,
        bytes_per_second: f64,
        now: Instant,
    ) -> bool {
        let start = self.free_at.map_or(now, |free| free.max(now));
        if start.duration_since(now) > QUEUE_DELAY {
            return false;
        }
        let wire = (data.len() + WIRE_OVERHEAD) as f64 / bytes_per_second;
        let due = start + Duration::from_secs_f64(wire);
        self.free_at = Some(due);
        self.queue.push_back(InFlight { due, from, data });
        true
    }
}

#[derive(Debug)]
struct ShapedSocket {
    socket: Arc<tokio::net::UdpSocket>,
    link: Arc<Mutex<Link>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for ShapedSocket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("queued", &self.queue.len())
            .finish()
    }
}

/// Reads the socket as fast as datagrams come and puts them through the link.
async fn read_into(
    socket: Arc<tokio::net::UdpSocket>,
    link: Arc<Mutex<Link>>,
    bytes_per_second: f64,
    dropped: Arc<AtomicU64>,
) {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        let received = socket.recv_from(&mut buffer).await;
        let Ok(mut link) = link.lock() else {
            return;
        };
        match received {
            Ok((len, from)) => {
                let data = buffer[..len].to_vec();
                if !link.admit(data, from, bytes_per_second, Instant::now()) {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            Err(err) => link.failed = Some(err.kind()),
        }
        if let Some(waker) = link.waker.take() {
            waker.wake();
        }
        if link.failed.is_some() {
            return;
        }
    }
}

impl AsyncUdpSocket for ShapedSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    fn poll_send(&self, cx: &mut Context<'_>, transmit: &Transmit<'_>) -> Poll<io::Result<usize>> {
        self.socket
            .poll_send_to(cx, transmit.contents, transmit.destination)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let Ok(mut link) = self.link.lock() else {
            return Poll::Ready(Err(io::Error::other("shaped link poisoned")));
        };
        let now = Instant::now();
        match link.queue.front() {
            Some(next) if next.due <= now => {
                let Some(datagram) = link.queue.pop_front() else {
                    return Poll::Pending;
                };
                let (Some(buf), Some(slot)) = (bufs.first_mut(), meta.first_mut()) else {
                    return Poll::Ready(Ok(0));
                };
                let len = datagram.data.len().min(buf.len());
                buf[..len].copy_from_slice(&datagram.data[..len]);
                let mut m = RecvMeta::default();
                m.addr = datagram.from;
                m.len = len;
                m.stride = len.max(1);
                *slot = m;
                Poll::Ready(Ok(1))
            }
            _ if link.failed.is_some() => Poll::Ready(Err(io::Error::from(
                link.failed.unwrap_or(io::ErrorKind::Other),
            ))),
            Some(next) => {
                // Wake when the head of the queue is through the link.
                let due = tokio::time::Instant::from_std(next.due);
                let timer = link
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                timer.as_mut().reset(due);
                let _ = timer.as_mut().poll(cx);
                Poll::Pending
            }
            None => {
                link.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Runtime for ClientRuntime {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        TokioRuntime.spawn(future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let Some((rate_bps, dropped)) = &self.link else {
            let fd = socket.as_raw_fd();
            // The wrapper owns the socket from here, so `fd` stays open while it lives.
            let wrapped = TokioRuntime.wrap_udp_socket(socket)?;
            if !self.gro {
                disable_gro(fd)?;
            }
            return Ok(wrapped);
        };
        socket.set_nonblocking(true)?;
        let socket = Arc::new(tokio::net::UdpSocket::from_std(socket)?);
        let link = Arc::new(Mutex::new(Link::default()));
        let reader = tokio::spawn(read_into(
            socket.clone(),
            link.clone(),
            *rate_bps as f64 / 8.0,
            dropped.clone(),
        ));
        Ok(Arc::new(ShapedSocket {
            socket,
            link,
            reader,
        }))
    }

    fn wrap_tcp_listener(
        &self,
        listener: std::net::TcpListener,
    ) -> io::Result<Arc<dyn AsyncTcpListener>> {
        TokioRuntime.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        remote_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        TokioRuntime.connect_tcp(remote_addr)
    }

    fn resolve_host<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        TokioRuntime.resolve_host(host)
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        TokioRuntime.sleep(duration)
    }

    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        TokioRuntime.interval(period)
    }

    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        TokioRuntime.block_on(future)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 60 datagrams of 1,000 bytes sent at once (few enough for the kernel's socket buffer)
    /// through a 1 Mbit/s link: about 100 ms of them get through the queue, the rest are
    /// dropped, and what arrives comes at the link's rate.
    #[tokio::test]
    async fn a_burst_is_served_at_the_rate_and_what_does_not_fit_is_dropped() -> io::Result<()> {
        let dropped = Arc::new(AtomicU64::new(0));
        let runtime = ClientRuntime::shaped(1_000_000, dropped.clone());
        let receiver = runtime.wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0")?)?;
        let to = receiver.local_addr()?;
        let sender = std::net::UdpSocket::bind("127.0.0.1:0")?;
        for _ in 0..60 {
            sender.send_to(&[7u8; 1_000], to)?;
        }
        let started = Instant::now();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut received = 0;
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(300), receiver.recv_from(&mut buf)).await
        {
            received += 1;
        }
        let took = started.elapsed().saturating_sub(Duration::from_millis(300));
        let dropped = dropped.load(Ordering::Relaxed);
        assert_eq!(
            received + dropped,
            60,
            "every datagram arrives or is dropped"
        );
        // 1 Mbit/s is 1,042 bytes of wire per 8.3 ms: 100 ms of queue holds about 12.
        assert!(
            (10..=16).contains(&received),
            "{received} arrived, {dropped} dropped"
        );
        assert!(
            took >= Duration::from_millis(80),
            "{received} datagrams took {took:?}: faster than the link"
        );
        Ok(())
    }

    /// Three datagrams sent as one GSO batch, as the server sends a subscriber's packets: a
    /// browser-like socket reads three datagrams, one with GRO reads them as one batch.
    #[tokio::test]
    async fn without_gro_a_batch_arrives_datagram_by_datagram() -> io::Result<()> {
        let sender = TokioRuntime.wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0")?)?;
        if sender.max_gso_segments() < 3 {
            return Ok(()); // No GSO here: nothing could be batched.
        }
        for gro in [false, true] {
            let receiver = ClientRuntime::unshaped(gro)
                .wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0")?)?;
            let contents = [7u8; 3_000];
            let transmit = Transmit {
                destination: receiver.local_addr()?,
                ecn: None,
                contents: &contents,
                segment_size: Some(1_000),
                src_ip: None,
            };
            std::future::poll_fn(|cx| sender.poll_send(cx, &transmit)).await?;
            let mut buffer = vec![0u8; 64 * 1_500];
            let mut meta = [RecvMeta::default(); 1];
            let mut reads = Vec::new();
            while reads.iter().sum::<usize>() < 3_000 {
                let read = tokio::time::timeout(
                    Duration::from_secs(1),
                    std::future::poll_fn(|cx| {
                        let mut bufs = [io::IoSliceMut::new(&mut buffer)];
                        receiver.poll_recv(cx, &mut bufs, &mut meta)
                    }),
                )
                .await??;
                assert_eq!(read, 1);
                assert_eq!(meta[0].stride, 1_000, "each datagram keeps its size");
                reads.push(meta[0].len);
            }
            if gro {
                // What made the bench flatter the server: the batch read at once.
                assert_eq!(reads, vec![3_000], "one read of the whole batch with GRO");
            } else {
                assert_eq!(reads, vec![1_000; 3], "one datagram per read without GRO");
            }
        }
        Ok(())
    }
}
