//! Token buckets, for what one participant (or one room) may send in a burst and per second.

use std::time::Instant;

/// A token bucket: `burst` messages at once, `per_second` after them.
pub struct Budget {
    burst: f64,
    per_second: f64,
    tokens: f64,
    refilled: Instant,
}

impl Budget {
    pub fn new(burst: f64, per_second: f64) -> Self {
        Self {
            burst,
            per_second,
            tokens: burst,
            refilled: Instant::now(),
        }
    }

    pub fn take(&mut self) -> bool {
        self.take_n(1.0)
    }

    /// Whether the bucket has refilled to its burst (nothing spent recently).
    pub fn is_full(&self) -> bool {
        self.tokens + self.refilled.elapsed().as_secs_f64() * self.per_second >= self.burst
    }

    pub fn take_n(&mut self, n: f64) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.refilled = now;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// A token bucket per key (a client address, a room), for limits on what many sockets do
/// together. Keys whose buckets are full again are forgotten, so the map holds only keys active
/// in the last few seconds.
pub struct KeyedBudgets<K> {
    burst: f64,
    per_second: f64,
    budgets: std::sync::Mutex<std::collections::HashMap<K, Budget>>,
}

impl<K: std::hash::Hash + Eq + Clone> KeyedBudgets<K> {
    /// `burst` at once per key, `per_second` after it.
    pub fn new(burst: f64, per_second: f64) -> Self {
        Self {
            burst,
            per_second,
            budgets: std::sync::Mutex::default(),
        }
    }

    /// Takes one from `key`'s bucket; false when it is empty.
    pub fn take(&self, key: &K) -> bool {
        let mut budgets = self
            .budgets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Forgetting full buckets costs a pass over the map: do it when the map has grown.
        if budgets.len() >= 1024 && budgets.len().is_power_of_two() {
            budgets.retain(|_, budget| !budget.is_full());
        }
        budgets
            .entry(key.clone())
            .or_insert_with(|| Budget::new(self.burst, self.per_second))
            .take()
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.budgets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_has_its_own_burst() {
        let budgets = KeyedBudgets::new(3.0, 0.001);
        for _ in 0..3 {
            assert!(budgets.take(&"a"));
        }
        assert!(!budgets.take(&"a"), "a's burst is spent");
        assert!(budgets.take(&"b"), "b has its own");
    }

    #[test]
    fn refilled_keys_are_forgotten() {
        let budgets = KeyedBudgets::new(1.0, 1_000_000.0);
        for key in 0..5000u32 {
            assert!(budgets.take(&key));
        }
        // Every bucket refills at once at this rate: the map was pruned as it grew.
        assert!(budgets.len() < 2100, "{} keys held", budgets.len());
    }
}
