//! How failed requests are retried.

use std::time::Duration;

/// Truncated exponential backoff with full jitter.
///
/// Attempt `n` (0-based) waits a random time in `[0, min(max_delay,
/// initial_delay · multiplierⁿ)]`, or `Retry-After` when the server sends a
/// longer one (Google's guidance for its APIs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts, the first one included (default 5).
    pub max_attempts: u32,
    /// First backoff ceiling (default 1 s).
    pub initial_delay: Duration,
    /// Largest backoff (default 60 s).
    pub max_delay: Duration,
    /// Growth per attempt (default 2).
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// The backoff ceiling before retry number `n` (0 = the first retry).
    pub fn ceiling(&self, n: u32) -> Duration {
        let grow = self.multiplier.max(1.0).powi(n.min(64) as i32);
        let secs = (self.initial_delay.as_secs_f64() * grow).min(self.max_delay.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// The wait before retry `n`: full jitter under the ceiling, but never
    /// less than the server's `Retry-After`.
    pub fn delay(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        let jittered = self.ceiling(n).mul_f64(fastrand::f64());
        match retry_after {
            Some(ra) => ra.max(jittered),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        assert_eq!(p.ceiling(0), Duration::from_secs(1));
        assert_eq!(p.ceiling(3), Duration::from_secs(8));
        assert_eq!(p.ceiling(10), Duration::from_secs(60));
        for n in 0..8 {
            let d = p.delay(n, None);
            assert!(d <= p.ceiling(n));
        }
        assert!(p.delay(0, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
    }
}
