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
    /// Receive and send buffer of every media socket, in bytes. Default: 4 MiB, because with the
    /// kernel defaults a busy forwarder loses packets at the socket.
    pub socket_buffer_bytes: usize,
    /// Shortest interval between two keyframe requests sent to one publication. Default: 500 ms.
    pub keyframe_request_interval: Duration,
    /// Packets a subscription may have queued toward its connection before further packets are
    /// dropped for that subscriber alone. Default: 512.
    pub subscription_queue_packets: usize,
    /// Highest video bitrate a publisher is asked to send, in bits per second. Default: 2.5 Mbit/s.
    pub max_video_bitrate: u64,
}

impl Default for SfuConfig {
    fn default() -> Self {
        Self {
            media_ip: None,
            public_ips: Vec::new(),
            socket_buffer_bytes: 4 * 1024 * 1024,
            keyframe_request_interval: Duration::from_millis(500),
            subscription_queue_packets: 512,
            max_video_bitrate: 2_500_000,
        }
    }
}
