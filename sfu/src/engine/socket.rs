//! The shared UDP socket: reading datagrams and routing each to its connection (by source
//! address, or for a new address by the ufrag of a STUN request whose MESSAGE-INTEGRITY checks
//! out), and sending what the connections wrote in UDP GSO batches.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};

use super::run::{EngineLoop, Pending};
use super::{MAX_ADDRESSES_PER_CONNECTION, MAX_GSO_BYTES, MAX_READS_PER_ROUND, READ_BUDGET};
use crate::SfuConfig;
use crate::exchange::ConnId;

/// The addresses put in host candidates: the public ones (NAT 1:1) when configured, else the
/// bound address, else (wildcard) every usable interface.
pub(super) fn announced_addresses(config: &SfuConfig, local: SocketAddr) -> Vec<SocketAddr> {
    let port = local.port();
    let public: Vec<SocketAddr> = config
        .public_ips
        .iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    if !public.is_empty() {
        return public;
    }
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    let mut out = Vec::new();
    if let Ok(interfaces) = rtc::shared::ifaces::ifaces() {
        for interface in interfaces {
            let Some(addr) = interface.addr else { continue };
            let ip = addr.ip();
            let link_local = match ip {
                IpAddr::V4(v4) => v4.is_link_local(),
                IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
            };
            if ip.is_ipv4() && !ip.is_loopback() && !ip.is_unspecified() && !link_local {
                let addr = SocketAddr::new(ip, port);
                if !out.contains(&addr) {
                    out.push(addr);
                }
            }
        }
    }
    if out.is_empty() {
        out.push(SocketAddr::new(
            IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            port,
        ));
    }
    out
}

impl EngineLoop {
    /// Reads the datagrams waiting on the socket (at most [`MAX_READS_PER_ROUND`] batches, for
    /// at most [`READ_BUDGET`]) and hands each to its connection; true when it stopped at that
    /// bound with more waiting. The bound keeps a burst of joins (DTLS handshakes cost
    /// milliseconds each) from holding up forwarding for everyone already connected.
    pub(super) fn read_socket(&mut self, buffers: &mut [Vec<u8>], meta: &mut [RecvMeta]) -> bool {
        let started = Instant::now();
        for _ in 0..MAX_READS_PER_ROUND {
            if started.elapsed() >= READ_BUDGET {
                return true;
            }
            let mut slices: Vec<IoSliceMut<'_>> = buffers
                .iter_mut()
                .map(|b| IoSliceMut::new(b.as_mut_slice()))
                .collect();
            let received = self.socket.try_io(tokio::io::Interest::READABLE, || {
                self.state.recv((&self.socket).into(), &mut slices, meta)
            });
            let count = match received {
                Ok(count) => count,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return false,
                Err(err) => {
                    // ICMP errors for one peer surface here; the socket itself is fine.
                    tracing::trace!(%err, "media socket receive error");
                    continue;
                }
            };
            drop(slices);
            let now = Instant::now();
            let mut touched: Vec<ConnId> = Vec::new();
            for (buffer, meta) in buffers.iter().zip(meta.iter()).take(count) {
                let stride = meta.stride.max(1);
                for datagram in buffer[..meta.len].chunks(stride) {
                    if let Some(id) = self.deliver(datagram, meta, now)
                        && !touched.contains(&id)
                    {
                        touched.push(id);
                    }
                }
            }
            for id in touched {
                self.pump(id);
            }
        }
        true
    }

    pub(super) fn deliver(
        &mut self,
        datagram: &[u8],
        meta: &RecvMeta,
        now: Instant,
    ) -> Option<ConnId> {
        let peer = meta.addr;
        let local_ip = meta.dst_ip.unwrap_or_else(|| self.socket_ip());
        let id = match self.by_addr.get(&peer) {
            Some((id, _)) => *id,
            None => {
                let Some(id) = stun_local_ufrag(datagram).and_then(|u| self.by_ufrag.get(u)) else {
                    self.stats
                        .unrouted_datagrams
                        .fetch_add(1, Ordering::Relaxed);
                    return None;
                };
                let id = *id;
                let conn = self.conns.get_mut(&id)?;
                // STUN first, state after: anyone who learns a ufrag (it is in the SDP) could
                // otherwise make the engine remember any number of spoofed addresses.
                if !stun_integrity_ok(datagram, &conn.ice_pwd, self.crypto.crypto()) {
                    self.stats.unverified_stun.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                if conn.addrs.len() >= MAX_ADDRESSES_PER_CONNECTION {
                    // The oldest address is the likeliest to be dead (the client moved on).
                    let oldest = conn.addrs.remove(0);
                    self.by_addr.remove(&oldest);
                } else {
                    self.stats.routed_addresses.fetch_add(1, Ordering::Relaxed);
                }
                conn.addrs.push(peer);
                self.by_addr.insert(peer, (id, local_ip));
                id
            }
        };
        let local_addr = self.local_addr_for(local_ip);
        let conn = self.conns.get_mut(&id)?;
        if !conn.answered {
            tracing::trace!(parent: &conn.span, %peer, "datagram before the answer dropped");
            return Some(id);
        }
        let read = conn.pc.handle_read(TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr,
                peer_addr: peer,
                transport_protocol: TransportProtocol::UDP,
                ecn: None,
            },
            message: BytesMut::from(datagram),
        });
        if let Err(err) = read {
            tracing::trace!(parent: &conn.span, %err, "inbound datagram refused");
        }
        Some(id)
    }

    pub(super) fn socket_ip(&self) -> IpAddr {
        self.announced
            .first()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    /// The local candidate address a datagram that reached `ip` belongs to, as the ICE agent
    /// knows it (the public address under NAT 1:1).
    pub(super) fn local_addr_for(&self, ip: IpAddr) -> SocketAddr {
        self.announced
            .iter()
            .find(|a| a.ip() == ip)
            .or_else(|| self.announced.iter().find(|a| a.is_ipv4() == ip.is_ipv4()))
            .copied()
            .unwrap_or(SocketAddr::new(ip, self.port))
    }

    /// Sends every pending datagram: one GSO `sendmsg` per run of equal-sized datagrams to one
    /// destination, otherwise one `sendmsg` each.
    pub(super) async fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        // Stable: each destination keeps its own order.
        pending.sort_by_key(|p| p.destination);
        let max_segments = self.state.max_gso_segments().max(1);
        let (mut datagrams, mut calls, mut errors) = (0u64, 0u64, 0u64);
        let mut i = 0;
        while i < pending.len() {
            let first = &pending[i];
            let segment = first.datagram.len();
            let mut end = i + 1;
            let mut total = segment;
            if max_segments > 1 && segment > 0 {
                while end < pending.len()
                    && end - i < max_segments
                    && pending[end].destination == first.destination
                    && pending[end].src_ip == first.src_ip
                {
                    let len = pending[end].datagram.len();
                    if len == 0 || len > segment || total + len > MAX_GSO_BYTES {
                        break;
                    }
                    total += len;
                    end += 1;
                    if len < segment {
                        break; // A shorter datagram may only end a GSO run.
                    }
                }
            }
            let (contents, segment_size): (&[u8], Option<usize>) = if end - i > 1 {
                self.scratch.clear();
                for p in &pending[i..end] {
                    self.scratch.extend_from_slice(&p.datagram);
                }
                (&self.scratch, Some(segment))
            } else {
                (&first.datagram, None)
            };
            let transmit = Transmit {
                destination: first.destination,
                ecn: None,
                contents,
                segment_size,
                src_ip: first.src_ip,
            };
            calls += 1;
            datagrams += (end - i) as u64;
            if send_now(&self.socket, &self.state, &transmit)
                .await
                .is_err()
            {
                errors += (end - i) as u64;
            }
            i = end;
        }
        pending.clear();
        // Keep the allocation for the next flush.
        self.pending = pending;
        let stats = &self.stats;
        stats.datagrams_sent.fetch_add(datagrams, Ordering::Relaxed);
        stats.send_calls.fetch_add(calls, Ordering::Relaxed);
        if errors > 0 {
            stats.send_errors.fetch_add(errors, Ordering::Relaxed);
        }
    }
}

/// Queues one encrypted datagram for the next flush. On a wildcard socket it leaves from the
/// local IP its peer reached us on, so a multi-homed host answers from the right address.
pub(super) fn push_pending(
    pending: &mut Vec<Pending>,
    by_addr: &HashMap<SocketAddr, (ConnId, IpAddr)>,
    wildcard: bool,
    write: TaggedBytesMut,
) {
    let destination = write.transport.peer_addr;
    let src_ip = if wildcard {
        by_addr.get(&destination).map(|(_, ip)| *ip)
    } else {
        None
    };
    pending.push(Pending {
        destination,
        src_ip,
        datagram: write.message,
    });
}

/// One `sendmsg`; waits (briefly) for room in the socket buffer rather than dropping at once.
pub(super) async fn send_now(
    socket: &tokio::net::UdpSocket,
    state: &UdpSocketState,
    transmit: &Transmit<'_>,
) -> io::Result<()> {
    for _ in 0..3 {
        match socket.try_io(tokio::io::Interest::WRITABLE, || {
            state.send(socket.into(), transmit)
        }) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                if tokio::time::timeout(Duration::from_millis(5), socket.writable())
                    .await
                    .is_err()
                {
                    return Err(err);
                }
            }
            other => return other,
        }
    }
    Err(io::ErrorKind::WouldBlock.into())
}

/// The local ufrag a STUN request names (`USERNAME` is `local:remote` as the receiver sees it),
/// or `None` when the datagram is not a STUN message with one.
pub fn stun_local_ufrag(datagram: &[u8]) -> Option<&str> {
    const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
    const USERNAME: u16 = 0x0006;
    if datagram.len() < 20 || datagram[0] & 0xC0 != 0 || datagram[4..8] != MAGIC_COOKIE {
        return None;
    }
    let length = u16::from_be_bytes([datagram[2], datagram[3]]) as usize;
    let body = datagram.get(20..20 + length)?;
    let mut at = 0;
    while at + 4 <= body.len() {
        let kind = u16::from_be_bytes([body[at], body[at + 1]]);
        let len = u16::from_be_bytes([body[at + 2], body[at + 3]]) as usize;
        let value = body.get(at + 4..at + 4 + len)?;
        if kind == USERNAME {
            let username = std::str::from_utf8(value).ok()?;
            return username.split(':').next();
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    None
}

/// Whether a STUN message carries a MESSAGE-INTEGRITY made with `pwd` (the short-term
/// credential of RFC 8489 9.1). Runs only for datagrams from addresses not yet routed.
pub fn stun_integrity_ok(datagram: &[u8], pwd: &str, crypto: &dyn rtc::crypto::RTCCrypto) -> bool {
    let mut message = rtc::stun::message::Message::new();
    if message.unmarshal_binary(datagram).is_err() {
        return false;
    }
    rtc::stun::integrity::MessageIntegrity::check(&mut message, pwd.as_bytes(), crypto).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn binding_request(username: &str) -> Vec<u8> {
        let mut attrs = Vec::new();
        // A PRIORITY attribute first, so the walk must skip one.
        attrs.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
        attrs.extend_from_slice(&0x0006u16.to_be_bytes());
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username.as_bytes());
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut msg = vec![0x00, 0x01];
        msg.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        msg.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
        msg.extend_from_slice(&[7; 12]);
        msg.extend_from_slice(&attrs);
        msg
    }

    pub(super) fn signed_binding_request(username: &str, pwd: &str) -> Vec<u8> {
        use rtc::stun::attributes::ATTR_USERNAME;
        use rtc::stun::fingerprint::FINGERPRINT;
        use rtc::stun::integrity::MessageIntegrity;
        use rtc::stun::message::{BINDING_REQUEST, Message, TransactionId};
        use rtc::stun::textattrs::TextAttribute;
        let provider = rtc::crypto::default_provider().expect("crypto");
        let mut message = Message::new();
        message
            .build(&[
                Box::new(BINDING_REQUEST),
                Box::new(TransactionId::new()),
                Box::new(TextAttribute::new(ATTR_USERNAME, username.to_owned())),
                Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                    pwd.to_owned(),
                    provider.crypto(),
                )),
                Box::new(FINGERPRINT),
            ])
            .expect("build");
        message.raw
    }

    #[test]
    pub(super) fn only_stun_signed_with_the_connection_s_password_passes() {
        let provider = rtc::crypto::default_provider().expect("crypto");
        let crypto = provider.crypto();
        let signed = signed_binding_request("server:client", "the-right-password");
        assert_eq!(stun_local_ufrag(&signed), Some("server"));
        assert!(stun_integrity_ok(&signed, "the-right-password", crypto));
        assert!(!stun_integrity_ok(&signed, "a-wrong-password", crypto));
        // Named correctly but unsigned (what a spoofer who read the SDP can send).
        assert!(!stun_integrity_ok(
            &binding_request("server:client"),
            "the-right-password",
            crypto
        ));
        assert!(!stun_integrity_ok(
            &[0x80; 40],
            "the-right-password",
            crypto
        ));
        let mut tampered = signed.clone();
        let last = tampered.len() - 13;
        tampered[last] ^= 1;
        assert!(!stun_integrity_ok(&tampered, "the-right-password", crypto));
    }

    #[test]
    pub(super) fn the_local_ufrag_is_read_from_a_binding_request() {
        assert_eq!(
            stun_local_ufrag(&binding_request("serverUfrag:clientUfrag")),
            Some("serverUfrag")
        );
    }

    #[test]
    pub(super) fn non_stun_and_truncated_datagrams_name_no_ufrag() {
        // An RTP packet (version 2) and a DTLS record are not STUN.
        assert_eq!(stun_local_ufrag(&[0x80; 40]), None);
        assert_eq!(stun_local_ufrag(&[22, 254, 253, 0, 0, 0, 0, 0]), None);
        let mut truncated = binding_request("a:b");
        truncated.truncate(26);
        assert_eq!(stun_local_ufrag(&truncated), None);
        let mut lying = binding_request("a:b");
        lying[3] = 200; // Claims more attributes than there are.
        assert_eq!(stun_local_ufrag(&lying), None);
    }
}
