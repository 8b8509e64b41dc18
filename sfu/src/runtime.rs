//! The async runtime handed to webrtc-rs: Tokio, with every media socket's buffers enlarged.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, JoinHandle, Runtime,
    TokioRuntime,
};

/// Tokio, except that each UDP socket gets `buffer_bytes` of receive and send buffer: with the
/// kernel defaults a forwarder bursting to many subscribers loses datagrams at the socket.
#[derive(Debug)]
pub(crate) struct MediaRuntime {
    inner: TokioRuntime,
    buffer_bytes: usize,
}

impl MediaRuntime {
    pub(crate) fn new(buffer_bytes: usize) -> Self {
        Self {
            inner: TokioRuntime,
            buffer_bytes,
        }
    }
}

impl Runtime for MediaRuntime {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        self.inner.spawn(future)
    }

    fn spawn_reactor(
        &self,
        reactor_pool_size: usize,
        future: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Box<dyn JoinHandle> {
        self.inner.spawn_reactor(reactor_pool_size, future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let sock = socket2::SockRef::from(&socket);
        // The kernel caps these at net.core.{r,w}mem_max; a smaller buffer still works.
        if let Err(err) = sock.set_recv_buffer_size(self.buffer_bytes) {
            tracing::warn!(%err, "could not set the media socket receive buffer");
        }
        if let Err(err) = sock.set_send_buffer_size(self.buffer_bytes) {
            tracing::warn!(%err, "could not set the media socket send buffer");
        }
        self.inner.wrap_udp_socket(socket)
    }

    fn wrap_tcp_listener(
        &self,
        listener: std::net::TcpListener,
    ) -> io::Result<Arc<dyn AsyncTcpListener>> {
        self.inner.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        remote_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        self.inner.connect_tcp(remote_addr)
    }

    fn resolve_host<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        self.inner.resolve_host(host)
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.sleep(duration)
    }

    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        self.inner.interval(period)
    }

    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        self.inner.block_on(future)
    }

    fn name(&self) -> &'static str {
        "tokio+buffers"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysctl(name: &str) -> Option<usize> {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    #[tokio::test]
    async fn media_sockets_get_the_configured_buffers() -> io::Result<()> {
        let requested = 4 * 1024 * 1024;
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let probe = socket.try_clone()?;
        let _wrapped = MediaRuntime::new(requested).wrap_udp_socket(socket)?;
        let sock = socket2::SockRef::from(&probe);
        // Linux doubles the value it grants (for bookkeeping) and caps it at the sysctl limit.
        let expect = |limit: Option<usize>| 2 * requested.min(limit.unwrap_or(requested));
        assert!(sock.recv_buffer_size()? >= expect(sysctl("rmem_max")));
        assert!(sock.send_buffer_size()? >= expect(sysctl("wmem_max")));
        Ok(())
    }
}
