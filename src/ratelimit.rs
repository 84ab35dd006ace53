//! Sliding-window rate limits: the simulator enforces the documented connect and read limits
//! with them, and the connector budgets its own connects and reads with the same type. A window
//! admits at most `max` hits in any span of `window`, the strictest reading of "N per T", so a
//! client that keeps to it cannot trip a server that reads the limit more loosely.

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

    /// How long until a hit for `key` would be admitted (zero if it would be now).
    pub fn wait_time(&mut self, key: &K) -> Duration {
        let now = Instant::now();
        let (max, window) = (self.max, self.window);
        let q = self.prune(key, now);
        if q.len() < max {
            return Duration::ZERO;
        }
        // The oldest hit of the last `max` leaves the window first.
        q.get(q.len() - max).map_or(Duration::ZERO, |t| {
            (*t + window).saturating_duration_since(now)
        })
    }

    /// Counts a hit now and returns its time, for [`SlidingWindow::moved`] once the request
    /// is answered. Unlike [`SlidingWindow::try_hit`] it does not check the limit: the caller
    /// waited for [`SlidingWindow::wait_time`] first.
    pub fn hit(&mut self, key: &K) -> Instant {
        let now = Instant::now();
        self.prune(key, now).push_back(now);
        now
    }

    /// Moves a hit counted at `sent` to `to` (later). The server counts a request when it
    /// arrives, somewhere between our send and its answer; counting it at the answer keeps
    /// our window at least as strict as the server's whatever the latency. A hit already
    /// pruned is counted again at `to`.
    pub fn moved(&mut self, key: &K, sent: Instant, to: Instant) {
        let q = self.prune(key, to);
        if let Some(i) = q.iter().position(|t| *t == sent) {
            q.remove(i);
        }
        let at = q.partition_point(|t| *t <= to);
        q.insert(at, to);
    }

    /// Counts a hit that happened `ago` (before this limiter existed: an earlier run's
    /// attempts, read from the state store). Call oldest first, before any other hit.
    pub fn seed(&mut self, key: &K, ago: Duration) {
        let now = Instant::now();
        let at = now.checked_sub(ago).unwrap_or(now);
        let window = self.window;
        let q = self.prune(key, now);
        if now.duration_since(at) < window {
            q.push_back(at);
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
    fn a_hit_moved_to_its_answer_holds_the_window_from_there() {
        let mut w = SlidingWindow::new(2, Duration::from_secs(60));
        let first = w.hit(&1);
        w.hit(&1);
        // The first request was answered 30 s after it was sent: the window counts from then.
        let answered = first + Duration::from_secs(30);
        w.moved(&1, first, answered);
        let q = &w.hits[&1];
        assert!(q.iter().is_sorted(), "hits stay in order");
        assert_eq!(q.back(), Some(&answered));
        assert!(w.wait_time(&1) > Duration::from_secs(59));
    }

    #[test]
    fn wait_time_is_until_the_oldest_hit_leaves() {
        let mut w = SlidingWindow::new(2, Duration::from_secs(60));
        assert_eq!(w.wait_time(&1), Duration::ZERO);
        assert!(w.try_hit(&1) && w.try_hit(&1));
        let wait = w.wait_time(&1);
        assert!(
            wait > Duration::from_secs(59) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
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
