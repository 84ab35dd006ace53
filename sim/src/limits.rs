//! The simulator's own rate limiter, written apart from the connector's (`taskstream::ratelimit`)
//! so that a bug in one cannot hide in the tests that pit them against each other.
//!
//! A limit of `max` per `window` is read strictly: a request is admitted when fewer than `max`
//! admitted requests happened in the `window` before it (a request exactly `window` old no
//! longer counts).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// At most `max` admitted requests per key in any span of `window`.
#[derive(Debug)]
pub struct SlidingWindow<K> {
    max: usize,
    window: Duration,
    /// Admission times per key, in the order they happened.
    log: HashMap<K, Vec<Instant>>,
}

impl<K: Hash + Eq + Clone> SlidingWindow<K> {
    /// A limiter of `max` requests per `window` for each key.
    pub fn new(max: usize, window: Duration) -> Self {
        Self {
            max,
            window,
            log: HashMap::new(),
        }
    }

    fn recent(&mut self, key: &K, now: Instant) -> &mut Vec<Instant> {
        let window = self.window;
        let times = self.log.entry(key.clone()).or_default();
        times.retain(|t| now.saturating_duration_since(*t) < window);
        times
    }

    /// Admits and counts a request if the key is under its limit; a refused one is not counted.
    pub fn try_hit(&mut self, key: &K) -> bool {
        let now = Instant::now();
        let max = self.max;
        let times = self.recent(key, now);
        let admitted = times.len() < max;
        if admitted {
            times.push(now);
        }
        admitted
    }

    /// Counts a request whatever the outcome and says whether it was within the limit; the
    /// documented connect limits count attempts, refused ones included.
    pub fn hit_always(&mut self, key: &K) -> bool {
        let now = Instant::now();
        let max = self.max;
        let times = self.recent(key, now);
        times.push(now);
        times.len() <= max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_max_per_window_then_refuses_without_counting() {
        let mut w = SlidingWindow::new(2, Duration::from_millis(200));
        assert!(w.try_hit(&1) && w.try_hit(&1));
        assert!(!w.try_hit(&1));
        assert!(w.try_hit(&2), "keys are independent");
        std::thread::sleep(Duration::from_millis(210));
        assert!(w.try_hit(&1), "the window slid");
    }

    #[test]
    fn hit_always_counts_refused_attempts() {
        let mut w = SlidingWindow::new(1, Duration::from_secs(60));
        assert!(w.hit_always(&()));
        assert!(!w.hit_always(&()));
        assert!(!w.try_hit(&()));
    }
}
