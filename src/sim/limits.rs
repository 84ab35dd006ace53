//! Sliding-window rate limits, the simulator's enforcement of the documented connect and read
//! limits. A window admits at most `max` hits in any span of `window`, which is the strictest
//! reading of "N per T" and so the one a well-behaved client must already satisfy.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// At most `max` hits per key in any `window`.
#[derive(Debug)]
pub struct SlidingWindow<K> {
    max: usize,
    window: Duration,
    hits: HashMap<K, VecDeque<Instant>>,
}

impl<K: Hash + Eq + Clone> SlidingWindow<K> {
    /// A limiter of `max` hits per `window` for every key.
    pub fn new(max: usize, window: Duration) -> Self {
        Self {
            max,
            window,
            hits: HashMap::new(),
        }
    }

    fn prune(&mut self, key: &K, now: Instant) -> &mut VecDeque<Instant> {
        let q = self.hits.entry(key.clone()).or_default();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            q.pop_front();
        }
        q
    }

    /// Counts a hit if the key is under its limit; returns whether it was admitted.
    /// A refused hit is not counted, so a refused caller is served again once the window slides.
    pub fn try_hit(&mut self, key: &K) -> bool {
        self.try_hit_at(key, Instant::now())
    }

    fn try_hit_at(&mut self, key: &K, now: Instant) -> bool {
        let max = self.max;
        let q = self.prune(key, now);
        if q.len() >= max {
            false
        } else {
            q.push_back(now);
            true
        }
    }

    /// Counts a hit whatever the outcome and returns whether the key was within its limit.
    /// Connect attempts are counted this way: the docs limit attempts, not successes.
    pub fn hit_always(&mut self, key: &K) -> bool {
        let now = Instant::now();
        let max = self.max;
        let q = self.prune(key, now);
        q.push_back(now);
        q.len() <= max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_max_then_refuses_until_window_slides() {
        let mut w = SlidingWindow::new(5, Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(w.try_hit_at(&"u", t0 + Duration::from_secs(i)));
        }
        assert!(!w.try_hit_at(&"u", t0 + Duration::from_secs(9)));
        assert!(w.try_hit_at(&"other", t0 + Duration::from_secs(9)));
        // the first hit leaves the window at t0+10s
        assert!(w.try_hit_at(&"u", t0 + Duration::from_secs(10)));
        assert!(!w.try_hit_at(&"u", t0 + Duration::from_millis(10_500)));
    }

    #[test]
    fn attempts_count_even_when_refused() {
        let mut w = SlidingWindow::new(2, Duration::from_secs(60));
        assert!(w.hit_always(&1));
        assert!(w.hit_always(&1));
        assert!(!w.hit_always(&1));
        assert!(!w.hit_always(&1));
    }
}
