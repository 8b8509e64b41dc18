//! Media-plane settings. Every field documents its unit and default.

use std::net::IpAddr;
use std::time::Duration;

/// Settings of the media plane.
#[derive(Clone, Debug)]
pub struct SfuConfig {
    /// Local address the media (UDP) sockets bind to. `None` binds the wildcard and announces
    /// every non-loopback interface. Default: `None`.
    pub media_ip: Option<IpAddr>,
    /// Public addresses announced in ICE instead of the local ones (NAT 1:1, e.g. a cloud VM's
    /// elastic IP). Default: empty.
    pub public_ips: Vec<String>,
    /// UDP port of the first media thread's socket; thread `i` binds `udp_port + i`. Every
    /// connection, publish and subscribe, shares its thread's socket. 0 lets the system choose
    /// each. Default: 0.
    pub udp_port: u16,
    /// Media threads (engines), each with its own socket and port: a connection is placed on
    /// the one with the fewest connections. Default: the number of CPUs.
    pub media_threads: usize,
    /// Receive and send buffer of every media socket, in bytes. Default: 4 MiB, because with the
    /// kernel defaults a busy forwarder loses packets at the socket.
    pub socket_buffer_bytes: usize,
    /// Shortest interval between two keyframe requests sent to one publication. Default: 500 ms.
    pub keyframe_request_interval: Duration,
    /// Highest video bitrate a publisher is asked to send, in bits per second. Default: 2.5 Mbit/s.
    pub max_video_bitrate: u64,
    /// Estimate each subscriber's downlink (transport-wide congestion control feedback and
    /// Google congestion control on every subscribe connection) and fit what it receives to it.
    /// Default: true.
    pub bandwidth_estimation: bool,
    /// Silence on a connection's ICE path before it counts as disconnected. Default: 3 s.
    pub ice_disconnected_timeout: Duration,
    /// Further silence before it counts as failed and its participant is removed. Default: 5 s,
    /// so a participant whose network vanished is gone within 10 s.
    pub ice_failed_timeout: Duration,
    /// Interval of the server's own ICE keepalives. Default: 1 s.
    pub ice_keepalive_interval: Duration,
}

impl Default for SfuConfig {
    fn default() -> Self {
        Self {
            media_ip: None,
            public_ips: Vec::new(),
            udp_port: 0,
            media_threads: std::thread::available_parallelism().map_or(1, usize::from),
            socket_buffer_bytes: 4 * 1024 * 1024,
            keyframe_request_interval: Duration::from_millis(500),
            max_video_bitrate: 2_500_000,
            bandwidth_estimation: true,
            ice_disconnected_timeout: Duration::from_secs(3),
            ice_failed_timeout: Duration::from_secs(5),
            ice_keepalive_interval: Duration::from_secs(1),
        }
    }
}
