//! One backoff for every retry loop of the connector: delays doubling from a minimum up to a
//! cap, from the `backon` crate, started again after a success. (The SynapTask reconnect loop
//! adds full jitter on top, in `SynapTaskConfig::backoff`, since many connectors may reconnect
//! to one server at once.)

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays of a retry loop.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// Delays `min`, `2 min`, `4 min`, ... up to `max`, for ever.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max.max(min))
            .with_factor(2.0)
            .without_max_times();
        Self {
            builder,
            delays: builder.build(),
            max,
        }
    }

    /// The delay to wait now; the next one is twice as long, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        // Never `None`: the builder has no limit on attempts.
        self.delays.next().unwrap_or(self.max)
    }

    /// After a success: the next delay is the minimum again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_starts_again_after_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        // backon multiplies by an f32 factor: whole milliseconds are what counts.
        let got: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(), ms(100));
    }
}
