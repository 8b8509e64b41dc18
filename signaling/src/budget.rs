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
