//! Limits on what many signaling sockets do together: sockets open per token, joins per second
//! per client address and per room. (One socket's own budgets are in [`crate::ws`]; connections
//! per address in [`crate::listener`].)

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::budget::KeyedBudgets;
use crate::config::Config;

/// A join burst is this many seconds of the per-second rate.
pub const JOIN_BURST_SECS: f64 = 5.0;

/// Places counted per key (a client address, a token), each held until its [`Place`] drops.
pub struct Places<K: Hash + Eq + Clone> {
    open: Mutex<HashMap<K, usize>>,
}

/// One place taken; dropping it frees it.
pub struct Place<K: Hash + Eq + Clone> {
    places: Arc<Places<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Places<K> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            open: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, usize>> {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place for `key` if it holds fewer than `max`.
    pub fn take(self: &Arc<Self>, key: K, max: usize) -> Option<Place<K>> {
        let mut open = self.lock();
        let count = open.entry(key.clone()).or_insert(0);
        if *count >= max {
            if *count == 0 {
                open.remove(&key);
            }
            return None;
        }
        *count += 1;
        Some(Place {
            places: self.clone(),
            key,
        })
    }

    /// Places held now, over every key.
    pub fn total(&self) -> usize {
        self.lock().values().sum()
    }
}

impl<K: Hash + Eq + Clone> Drop for Place<K> {
    fn drop(&mut self) {
        let mut open = self.places.lock();
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Shared by every socket; counted in `/metrics`.
pub struct SignalingLimits {
    max_sockets_per_token: usize,
    sockets_per_token: Arc<Places<String>>,
    joins_per_address: KeyedBudgets<IpAddr>,
    joins_per_room: KeyedBudgets<String>,
    /// Signaling sockets refused: their token had `max_sockets_per_token` open.
    pub refused_sockets: AtomicU64,
    /// Joins refused for coming too fast from one address or into one room.
    pub refused_joins: AtomicU64,
}

/// One socket opened with a token; dropping it frees its place.
pub type TokenSocket = Place<String>;

impl SignalingLimits {
    pub fn new(config: &Config) -> Self {
        let per_address = config.max_joins_per_second_per_address.max(0.1);
        let per_room = config.max_joins_per_second_per_room.max(0.1);
        Self {
            max_sockets_per_token: config.max_sockets_per_token.max(1),
            sockets_per_token: Places::new(),
            joins_per_address: KeyedBudgets::new(per_address * JOIN_BURST_SECS, per_address),
            joins_per_room: KeyedBudgets::new(per_room * JOIN_BURST_SECS, per_room),
            refused_sockets: AtomicU64::new(0),
            refused_joins: AtomicU64::new(0),
        }
    }

    /// A place for one more socket opened with `token`, if it has fewer than the limit open.
    pub fn open_socket(&self, token: &str) -> Option<TokenSocket> {
        // The signature identifies the token; the rest may be long.
        let key = token.rsplit('.').next().unwrap_or(token).to_owned();
        let place = self.sockets_per_token.take(key, self.max_sockets_per_token);
        if place.is_none() {
            self.refused_sockets.fetch_add(1, Ordering::Relaxed);
        }
        place
    }

    /// Whether a join from `address` into `room` may go ahead now: `Err` says which limit.
    pub fn join(&self, address: Option<IpAddr>, room: &str) -> Result<(), &'static str> {
        self.join_from(address)?;
        if !self.joins_per_room.take(&room.to_lowercase()) {
            self.refused_joins.fetch_add(1, Ordering::Relaxed);
            return Err("into this room");
        }
        Ok(())
    }

    /// Whether a join from `address` may go ahead now, whatever it joins (the lobby and the
    /// waiting queue, which are everyone's: a limit of their own would let one client shut
    /// everyone else out).
    pub fn join_from(&self, address: Option<IpAddr>) -> Result<(), &'static str> {
        if let Some(address) = address
            && !self.joins_per_address.take(&address)
        {
            self.refused_joins.fetch_add(1, Ordering::Relaxed);
            return Err("from this address");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(sockets: usize, joins_per_second: f64) -> Arc<SignalingLimits> {
        Arc::new(SignalingLimits::new(&Config {
            max_sockets_per_token: sockets,
            max_joins_per_second_per_address: joins_per_second,
            max_joins_per_second_per_room: joins_per_second * 2.0,
            ..Config::default()
        }))
    }

    #[test]
    fn a_token_opens_a_few_sockets_and_gets_its_places_back() {
        let limits = limits(2, 1.0);
        let a = limits.open_socket("h.p.sig1").expect("first");
        let _b = limits.open_socket("h.p.sig1").expect("second");
        assert!(limits.open_socket("h.p.sig1").is_none());
        assert!(limits.open_socket("h.p.sig2").is_some(), "another token");
        drop(a);
        assert!(limits.open_socket("h.p.sig1").is_some());
        assert_eq!(limits.refused_sockets.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn joins_are_limited_per_address_and_per_room() {
        let limits = limits(4, 2.0);
        let one: IpAddr = "10.0.0.1".parse().expect("ip");
        let two: IpAddr = "10.0.0.2".parse().expect("ip");
        // A burst of five seconds' worth from one address.
        for _ in 0..10 {
            assert!(limits.join(Some(one), "standup").is_ok());
        }
        assert_eq!(limits.join(Some(one), "other"), Err("from this address"));
        // The room's own burst (20) is half spent; another address fills it.
        for _ in 0..10 {
            assert!(limits.join(Some(two), "Standup").is_ok());
        }
        assert_eq!(limits.join(Some(two), "STANDUP"), Err("from this address"));
        let three: IpAddr = "10.0.0.3".parse().expect("ip");
        assert_eq!(limits.join(Some(three), "standup"), Err("into this room"));
        assert!(limits.join(Some(three), "another room").is_ok());
    }
}
