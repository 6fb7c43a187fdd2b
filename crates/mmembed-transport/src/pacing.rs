//! Time, and the client-side rate limit built on it.
//!
//! The client reads time only through [`Clock`], so tests can run retries
//! and the pacing of hundreds of requests in virtual time and assert exact
//! spacing. That is also why pacing is a small GCRA here rather than
//! `governor`: governor waits on its own timer, which neither tokio's paused
//! time nor a virtual clock can drive, and every retry must take a slot too.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

/// A source of time and sleeping.
#[async_trait]
pub trait Clock: Send + Sync + fmt::Debug {
    /// Time since an arbitrary, fixed origin.
    fn now(&self) -> Duration;
    /// Waits for `d`.
    async fn sleep(&self, d: Duration);
}

/// Real time through tokio (honours `tokio::time::pause`).
#[derive(Debug)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
        }
    }
}

#[async_trait]
impl Clock for TokioClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }
}

/// Evenly spaced request slots: at most one every `60 / rpm` seconds, no
/// bursts (a burst of a minute's quota right away is what earns 429s).
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    next: Mutex<Duration>,
}

impl Pacer {
    pub fn new(requests_per_minute: u32) -> Self {
        Self {
            interval: Duration::from_secs(60) / requests_per_minute.max(1),
            next: Mutex::new(Duration::ZERO),
        }
    }

    /// Takes the next slot, waiting until it comes.
    pub async fn acquire(&self, clock: &dyn Clock) {
        let wait = {
            let now = clock.now();
            // A poisoned lock only means another task panicked mid-update of
            // a plain Duration; the value is still usable.
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let slot = (*next).max(now);
            *next = slot + self.interval;
            slot - now
        };
        if !wait.is_zero() {
            clock.sleep(wait).await;
        }
    }
}

/// Virtual time for tests and simulations: sleeping moves the clock forward
/// at once and is recorded, so retries and pacing are asserted exactly
/// without waiting for them.
#[derive(Debug, Default)]
pub struct VirtualClock {
    now: Mutex<Duration>,
    sleeps: Mutex<Vec<Duration>>,
}

impl VirtualClock {
    /// Every sleep so far, in order.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.sleeps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[async_trait]
impl Clock for VirtualClock {
    fn now(&self) -> Duration {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
    async fn sleep(&self, d: Duration) {
        let start = self.now();
        self.sleeps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(d);
        {
            let mut n = self.now.lock().unwrap_or_else(|p| p.into_inner());
            *n = (*n).max(start + d);
        }
        tokio::task::yield_now().await;
    }
}
