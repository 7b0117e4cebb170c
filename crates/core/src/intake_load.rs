//! How busy the intake is recording new promotions, so that the executor's background
//! work yields to it.
//!
//! Flux delivers an event once, with a timeout: an event the webhook does not answer in
//! time is lost, while a recorded promotion waits safely in the store. Both compete for the
//! same store (the API server in Kubernetes mode) and the same CPUs, so while new
//! promotions are being recorded the executor keeps at most one attempt in flight and
//! starts at most one per [`BUSY_PACE`] (a promotion's attempt costs several writes, a
//! recording one), and runs at full concurrency again once the intake has been quiet for
//! [`QUIET`]. A lone event is never slowed: its attempt starts at once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long after the last recording the intake counts as busy.
pub const QUIET: Duration = Duration::from_millis(50);

/// While the intake is busy, the executor starts attempts at most this often, so a
/// long burst still makes progress.
pub const BUSY_PACE: Duration = Duration::from_millis(500);

/// Shared by the intake (which reports recordings) and the executor (which asks).
#[derive(Debug)]
pub struct IntakeLoad {
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` at which the last recording ended, plus one (0: never).
    last_end: AtomicU64,
    epoch: Instant,
}

impl Default for IntakeLoad {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

/// Held while one new promotion is being recorded.
#[must_use = "the recording counts only while this is held"]
pub struct Recording<'a>(&'a IntakeLoad);

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        let load = self.0;
        load.last_end.store(load.millis() + 1, Ordering::Relaxed);
        load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl IntakeLoad {
    fn millis(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Marks a recording in progress until the guard is dropped.
    pub fn recording(&self) -> Recording<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Recording(self)
    }

    /// Whether a recording is in progress or ended less than [`QUIET`] ago.
    pub fn busy(&self) -> bool {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return true;
        }
        match self.last_end.load(Ordering::Relaxed) {
            0 => false,
            end => self.millis() + 1 < end + QUIET.as_millis() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_while_recording_and_shortly_after() {
        let load = IntakeLoad::default();
        assert!(!load.busy(), "never used");
        let guard = load.recording();
        assert!(load.busy());
        drop(guard);
        assert!(load.busy(), "just ended");
        std::thread::sleep(QUIET + Duration::from_millis(20));
        assert!(!load.busy(), "quiet since");
    }

    #[test]
    fn overlapping_recordings_count_until_the_last_ends() {
        let load = IntakeLoad::default();
        let first = load.recording();
        let second = load.recording();
        drop(first);
        std::thread::sleep(QUIET + Duration::from_millis(20));
        assert!(load.busy(), "one still in progress");
        drop(second);
        assert!(load.busy());
    }
}
