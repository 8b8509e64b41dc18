//! What a room's participants may send, in any order: three sessions of one room (their grants
//! chosen by the input, so rooms run in mesh or SFU mode), each line of the input a text frame
//! from one of them. Nothing panics, and once everyone has left, the room is gone.
//!
//! Input: line 1's first byte picks the grants (two bits per session: publish, subscribe; the
//! seventh bit the lobby grant for all, so sessions may enter the lobby or the waiting queue
//! instead); every later line is `<digit><frame>`, the digit naming the session (modulo 3).
#![no_main]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use libfuzzer_sys::fuzz_target;
use signaling::auth::Grants;
use signaling::state::AppState;
use signaling::ws::fuzzing::Dispatcher;

const SESSIONS: usize = 3;
/// At most this many frames per input: a long input is no deeper, only slower.
const MAX_FRAMES: usize = 64;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

fn state() -> &'static AppState {
    static STATE: OnceLock<AppState> = OnceLock::new();
    STATE.get_or_init(|| {
        let config = signaling::Config {
            bind: "127.0.0.1:0".parse().expect("an address"),
            media_ip: Some("127.0.0.1".parse().expect("an address")),
            udp_port: 0,
            // Calls and waits end soon: their timers are tasks that outlive one input.
            call_timeout_secs: 1,
            match_timeout_secs: 1,
            ..signaling::Config::default()
        };
        let (_, shutdown) = tokio::sync::watch::channel(false);
        runtime().block_on(async { AppState::new(config, shutdown) })
    })
}

fuzz_target!(|data: &[u8]| {
    static ROOMS: AtomicU64 = AtomicU64::new(0);
    let mut lines = data.split(|&b| b == b'\n');
    let bits = lines
        .next()
        .and_then(|line| line.first())
        .copied()
        .unwrap_or(0xff);
    let grants: Vec<Grants> = (0..SESSIONS)
        .map(|i| Grants {
            publish: bits >> (2 * i) & 1 == 1,
            subscribe: bits >> (2 * i + 1) & 1 == 1,
            lobby: bits >> 6 & 1 == 1,
            ..Grants::default()
        })
        .collect();
    let room = format!("fuzz-{}", ROOMS.fetch_add(1, Ordering::Relaxed));
    let state = state();
    runtime().block_on(async {
        let mut dispatcher = Dispatcher::new(state, &room, &grants);
        for line in lines.take(MAX_FRAMES) {
            let Some((&who, frame)) = line.split_first() else {
                continue;
            };
            let Ok(text) = std::str::from_utf8(frame) else {
                continue;
            };
            dispatcher.text(usize::from(who) % SESSIONS, text).await;
        }
        dispatcher.leave_all().await;
    });
    assert!(
        state.rooms.rooms().iter().all(|r| r.name() != room),
        "everyone left, and the room is still open"
    );
});
