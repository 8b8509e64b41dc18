//! The per-packet path without sockets: one forwarder's decision and header rewrite, the
//! publication's retransmission cache, and a fanout's walk over N subscriptions into their
//! bounded queues. Reports time per packet (criterion) and heap allocations per packet (printed
//! once per case, counted by the allocator below).
//!
//!     cargo bench -p sfu --bench per_packet

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rtc::rtp;
use sfu::MediaKind;
use sfu::forwarder::{Forwarder, ForwarderParams, PacketCache};
use tokio::sync::mpsc;

struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const VIDEO_EXTENSIONS: [(&str, u16); 3] = [
    (
        "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
        2,
    ),
    (
        "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
        3,
    ),
    ("urn:3gpp:video-orientation", 13),
];

/// A 1,100-byte VP8 packet as a browser sends it: keyframe start, three header extensions.
fn video_packet(seq: u16) -> rtp::Packet {
    let mut payload = vec![0u8; 1100];
    payload[0] = 0x10;
    rtp::Packet {
        header: rtp::Header {
            version: 2,
            marker: seq % 6 == 5,
            payload_type: 96,
            sequence_number: seq,
            timestamp: u32::from(seq / 6) * 3000,
            ssrc: 0x1234_5678,
            extension: true,
            extension_profile: 0xBEDE,
            extensions: vec![
                rtp::header::Extension {
                    id: 2,
                    payload: Bytes::from_static(&[1, 2, 3]),
                },
                rtp::header::Extension {
                    id: 3,
                    payload: Bytes::from_static(&[0, 7]),
                },
                rtp::header::Extension {
                    id: 13,
                    payload: Bytes::from_static(&[0]),
                },
            ],
            ..Default::default()
        },
        payload: Bytes::from(payload),
    }
}

fn forwarder(ssrc: u32) -> Forwarder {
    let owned: Vec<(String, u16)> = VIDEO_EXTENSIONS
        .iter()
        .map(|(uri, id)| ((*uri).to_owned(), *id))
        .collect();
    let subscriber: Vec<(String, u16)> = VIDEO_EXTENSIONS
        .iter()
        .map(|(uri, id)| ((*uri).to_owned(), id + 1))
        .collect();
    let mut forwarder = Forwarder::new(MediaKind::Video, "video/VP8", 90_000);
    forwarder.configure(ForwarderParams::new(ssrc, 100, &owned, &subscriber));
    forwarder
}

/// Heap allocations per call of `op`, averaged over many calls.
fn allocations_per_call(mut op: impl FnMut()) -> f64 {
    const CALLS: u64 = 10_000;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..CALLS {
        op();
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / CALLS as f64
}

fn forwarder_rewrite(c: &mut Criterion) {
    let mut forwarder = forwarder(42);
    let mut packets: Vec<rtp::Packet> = (0..1024).map(video_packet).collect();
    let now = Instant::now();
    let mut i = 0usize;
    let mut seq = 0u16;
    // The publisher's numbers run on (cycling back to the first packet's number would make
    // every lap a late packet).
    let mut next = || {
        i = (i + 1) % packets.len();
        seq = seq.wrapping_add(1);
        let packet = &mut packets[i];
        packet.header.sequence_number = seq;
        packet.header.timestamp = u32::from(seq / 6) * 3000;
        black_box(forwarder.forward(packet, 0, now).ok());
    };
    println!(
        "forwarder/rewrite: {:.2} allocations per packet",
        allocations_per_call(&mut next)
    );
    let mut group = c.benchmark_group("forwarder");
    group.throughput(Throughput::Elements(1));
    group.bench_function("rewrite", |b| b.iter(&mut next));
    group.finish();
}

/// `video_packet` with a full VP8 descriptor (15-bit picture id, TL0PICIDX, TID), as a
/// simulcast layer sends it.
fn layer_packet(ssrc: u32, seq: u16, picture_id: u16) -> rtp::Packet {
    let mut packet = video_packet(seq);
    let mut payload = packet.payload.to_vec();
    let [high, low] = (picture_id & 0x7fff).to_be_bytes();
    payload[..7].copy_from_slice(&[0x90, 0xe0, 0x80 | high, low, 1, 0, 0]);
    packet.payload = Bytes::from(payload);
    packet.header.ssrc = ssrc;
    packet
}

/// A subscription that switched simulcast layers: every packet's picture id is rewritten, so
/// its payload is copied.
fn forwarder_switched(c: &mut Criterion) {
    let mut forwarder = forwarder(42);
    forwarder.set_layered(true);
    let now = Instant::now();
    forwarder.set_target(0);
    let _ = forwarder.forward(&layer_packet(1, 1, 100), 0, now);
    forwarder.set_target(1);
    let _ = forwarder.forward(&layer_packet(2, 1, 9000), 1, now);
    let mut packets: Vec<rtp::Packet> = (0..1024)
        .map(|seq| layer_packet(2, seq + 2, 9000 + seq / 6))
        .collect();
    let mut i = 0usize;
    let mut seq = 1u16;
    let mut next = || {
        i = (i + 1) % packets.len();
        seq = seq.wrapping_add(1);
        let packet = &mut packets[i];
        packet.header.sequence_number = seq;
        black_box(forwarder.forward(packet, 1, now).ok());
    };
    println!(
        "forwarder/rewrite_switched: {:.2} allocations per packet",
        allocations_per_call(&mut next)
    );
    let mut group = c.benchmark_group("forwarder");
    group.throughput(Throughput::Elements(1));
    group.bench_function("rewrite_switched", |b| b.iter(&mut next));
    group.finish();
}

fn packet_cache(c: &mut Criterion) {
    let mut cache = PacketCache::new(1024);
    let packets: Vec<rtp::Packet> = (0..4096).map(video_packet).collect();
    let mut i = 0usize;
    let mut insert_and_lookup = || {
        i = (i + 1) % packets.len();
        cache.insert(packets[i].clone());
        let seq = (i as u16).wrapping_sub(100);
        black_box(cache.get(0x1234_5678, seq).is_some());
    };
    println!(
        "packet_cache/insert+lookup: {:.2} allocations per packet",
        allocations_per_call(&mut insert_and_lookup)
    );
    let mut group = c.benchmark_group("packet_cache");
    group.throughput(Throughput::Elements(1));
    group.bench_function("insert+lookup", |b| b.iter(&mut insert_and_lookup));
    group.finish();
}

fn fanout_walk(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_walk");
    for subscribers in [10usize, 100, 300] {
        let mut slots: Vec<(
            Forwarder,
            mpsc::Sender<rtp::Packet>,
            mpsc::Receiver<rtp::Packet>,
        )> = (0..subscribers)
            .map(|n| {
                let (tx, rx) = mpsc::channel(512);
                (forwarder(n as u32), tx, rx)
            })
            .collect();
        let packets: Vec<rtp::Packet> = (0..1024).map(video_packet).collect();
        let now = Instant::now();
        let mut i = 0usize;
        // One packet to every subscription, then the writers' side drains the queues, as the
        // writer tasks would.
        let mut walk = || {
            i = (i + 1) % packets.len();
            for (forwarder, tx, _) in slots.iter_mut() {
                if let Ok(out) = forwarder.forward(&packets[i], 0, now) {
                    let _ = tx.try_send(out);
                }
            }
            for (_, _, rx) in slots.iter_mut() {
                while let Ok(packet) = rx.try_recv() {
                    black_box(packet);
                }
            }
        };
        let per_walk = allocations_per_call(&mut walk);
        println!(
            "fanout_walk/{subscribers}: {:.2} allocations per forwarded packet",
            per_walk / subscribers as f64
        );
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, _| b.iter(&mut walk),
        );
    }
    group.finish();
}

criterion_group!(
    benches,
    forwarder_rewrite,
    forwarder_switched,
    packet_cache,
    fanout_walk
);
criterion_main!(benches);
