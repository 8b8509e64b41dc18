//! The HTTP listener: accepts connections within limits and serves each with hyper.
//!
//! `axum::serve` has no header-read timeout and no connection limits, so one address that opens
//! connections and sends half a request could hold every file descriptor. Here each accepted
//! connection takes a [`ConnectionSlot`] (a total and a per-address count), its request head must
//! arrive within the header-read timeout, and a signaling socket keeps its slot for as long as it
//! lives (the upgrade hands the slot to the socket's task).

use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::limits::{Place, Places};

/// How many connections the listener admits.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Open connections in all (HTTP requests and signaling sockets).
    pub max_connections: usize,
    /// Open connections from one address (one /64 for IPv6).
    pub max_per_address: usize,
    /// Time a client has to send a request's head.
    pub header_read_timeout: Duration,
}

/// Open connections, counted in all and per address; shared with `/metrics`.
pub struct Connections {
    limits: ConnectionLimits,
    per_address: Arc<Places<IpAddr>>,
    total: AtomicUsize,
    /// Connections closed at once because the total was reached.
    pub refused_total: AtomicU64,
    /// Connections closed at once because their address had too many.
    pub refused_per_address: AtomicU64,
    /// Accept calls that failed (most often: no file descriptor left).
    pub accept_errors: AtomicU64,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerAddress,
}

/// One admitted connection; dropping it frees its place.
pub struct ConnectionSlot {
    connections: Arc<Connections>,
    _per_address: Place<IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.connections.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The address a connection counts against: IPv6 clients usually hold a whole /64, so one
/// client could otherwise take any number of places.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let segments = v6.segments();
                IpAddr::V6(Ipv6Addr::new(
                    segments[0],
                    segments[1],
                    segments[2],
                    segments[3],
                    0,
                    0,
                    0,
                    0,
                ))
            }
        },
    }
}

impl Connections {
    pub fn new(limits: ConnectionLimits) -> Self {
        Self {
            limits,
            per_address: Places::new(),
            total: AtomicUsize::new(0),
            refused_total: AtomicU64::new(0),
            refused_per_address: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// A place for a connection from `ip`, if the limits allow one.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Refusal> {
        let max = self.limits.max_connections;
        if self
            .total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            self.refused_total.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Total);
        }
        match self
            .per_address
            .take(address_key(ip), self.limits.max_per_address)
        {
            Some(place) => Ok(ConnectionSlot {
                connections: self.clone(),
                _per_address: place,
            }),
            None => {
                self.total.fetch_sub(1, Ordering::Relaxed);
                self.refused_per_address.fetch_add(1, Ordering::Relaxed);
                Err(Refusal::PerAddress)
            }
        }
    }
}

/// Says a repeated warning at most once per interval, with how many times it happened.
struct Summarised {
    interval: Duration,
    last: Option<Instant>,
    unsaid: u64,
}

impl Summarised {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            unsaid: 0,
        }
    }

    /// The number of occurrences to report now (this one included), or `None` to stay quiet.
    fn occurred(&mut self, now: Instant) -> Option<u64> {
        self.unsaid += 1;
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < self.interval)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unsaid))
    }
}

/// Serves `app` on `listener` until `shutdown` turns true, then lets open requests finish
/// (signaling sockets end through the same signal).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    connections: Arc<Connections>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut accept_warning = Summarised::new(Duration::from_secs(10));
    let mut refusal_warning = Summarised::new(Duration::from_secs(10));
    let (drained, mut all_drained) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    connections.accept_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(count) = accept_warning.occurred(Instant::now()) {
                        tracing::warn!(%err, count, "cannot accept connections");
                    }
                    // Out of file descriptors: accepting again at once would spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // The guard `wait_for` returns is not `Send`: dropped inside.
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
        };
        let slot = match connections.admit(peer.ip()) {
            Ok(slot) => Arc::new(slot),
            Err(refusal) => {
                if let Some(count) = refusal_warning.occurred(Instant::now()) {
                    tracing::warn!(?refusal, %peer, count, "connections refused over the limits");
                }
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request.extensions_mut().insert(slot.clone());
            let app = app.clone();
            async move { Ok::<_, Infallible>(app.oneshot(request).await.into_response_infallible()) }
        });
        let header_read_timeout = connections.limits.header_read_timeout;
        let mut stop = shutdown.clone();
        let drained = drained.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let stopping = tokio::select! {
                _ = connection.as_mut() => false,
                stopped = async { stop.wait_for(|stop| *stop).await.is_ok() } => stopped,
            };
            if stopping {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
            drop(drained);
        });
    }
    drop(listener);
    drop(drained);
    // Every connection task holds a sender: this ends when the last has finished.
    let _ = all_drained.recv().await;
    Ok(())
}

/// `Router`'s error type is `Infallible`; this names the unwrapping.
trait IntoResponseInfallible {
    fn into_response_infallible(self) -> axum::response::Response;
}

impl IntoResponseInfallible for Result<axum::response::Response, Infallible> {
    fn into_response_infallible(self) -> axum::response::Response {
        match self {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}

/// The peer address of a request served by [`serve`].
pub fn peer_address(extensions: &axum::http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connections(max_connections: usize, max_per_address: usize) -> Arc<Connections> {
        Arc::new(Connections::new(ConnectionLimits {
            max_connections,
            max_per_address,
            header_read_timeout: Duration::from_secs(1),
        }))
    }

    #[test]
    fn one_address_cannot_take_every_place_and_places_come_back() {
        let connections = connections(3, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = connections.admit(a).expect("first");
        let _second = connections.admit(a).expect("second");
        assert_eq!(connections.admit(a).err(), Some(Refusal::PerAddress));
        let _third = connections.admit(b).expect("another address");
        assert_eq!(connections.admit(b).err(), Some(Refusal::Total));
        drop(first);
        assert!(
            connections.admit(a).is_ok(),
            "a closed connection frees its place"
        );
        assert_eq!(connections.refused_per_address.load(Ordering::Relaxed), 1);
        assert_eq!(connections.refused_total.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn an_ipv6_client_counts_as_its_64() {
        let connections = connections(10, 1);
        let _one = connections
            .admit("2001:db8:1:2::1".parse().expect("ip"))
            .expect("first");
        assert_eq!(
            connections
                .admit("2001:db8:1:2:ffff::9".parse().expect("ip"))
                .err(),
            Some(Refusal::PerAddress)
        );
        assert!(
            connections
                .admit("2001:db8:1:3::1".parse().expect("ip"))
                .is_ok()
        );
    }

    #[test]
    fn repeated_warnings_are_said_once_per_interval_with_their_count() {
        let mut warning = Summarised::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(warning.occurred(start), Some(1));
        for i in 1..100 {
            assert_eq!(warning.occurred(start + Duration::from_millis(i)), None);
        }
        assert_eq!(warning.occurred(start + Duration::from_secs(11)), Some(100));
    }
}
