//! The wait between retries (a sender reconnecting, the uploader retrying the object store): exponential
//! with jitter, from `backon`, so that many senders cut off together do not come back in lockstep; reset
//! after an attempt that made progress.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Exponential backoff from `first` up to `max`, each wait in `[d, 2d)` (jitter), never giving up.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    current: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        let max = max.max(first);
        let builder = ExponentialBuilder::new()
            .with_min_delay(first)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Backoff {
            builder,
            current: builder.build(),
            max,
        }
    }

    /// Starts over (the last attempt made progress).
    pub fn reset(&mut self) {
        self.current = self.builder.build();
    }

    /// The wait before the next attempt; the one after is about twice as long, up to the maximum.
    pub fn next_wait(&mut self) -> Duration {
        self.current.next().unwrap_or(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_with_jitter_up_to_the_limit_and_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(350));
        let waits: Vec<Duration> = (0..5).map(|_| b.next_wait()).collect();
        // 100, 200, then the limit; jitter adds up to the wait itself
        assert!(waits[0] >= ms(100) && waits[0] < ms(200), "{waits:?}");
        assert!(waits[1] >= ms(200) && waits[1] < ms(400), "{waits:?}");
        for w in &waits[2..] {
            assert!(*w >= ms(350) && *w < ms(700), "{waits:?}");
        }
        b.reset();
        let w = b.next_wait();
        assert!(w >= ms(100) && w < ms(200), "after a reset: {w:?}");
    }
}
