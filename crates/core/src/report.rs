//! Error text for people: one line with the causes that add something.

/// An error and its causes, `a: b: c`, skipping causes whose text the line already
/// contains (many libraries repeat their source in their own message).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Lets a repeated warning through at most once per interval, counting the ones it
/// held back, so a failure that repeats per request or per attempt cannot flood logs.
#[derive(Debug)]
pub struct Throttle {
    interval: std::time::Duration,
    state: std::sync::Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    last: Option<std::time::Instant>,
    held_back: u64,
}

impl Throttle {
    pub const fn new(interval: std::time::Duration) -> Self {
        Self {
            interval,
            state: std::sync::Mutex::new(ThrottleState {
                last: None,
                held_back: 0,
            }),
        }
    }

    /// `Some(n)` when the caller should log now, `n` being how many occurrences were
    /// held back since the last one logged; `None` to stay quiet.
    pub fn admit(&self) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        if state
            .last
            .is_some_and(|last| now.duration_since(last) < self.interval)
        {
            state.held_back += 1;
            return None;
        }
        state.last = Some(now);
        Some(std::mem::take(&mut state.held_back))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn throttle_lets_one_through_per_interval_and_counts_the_rest() {
        let throttle = super::Throttle::new(std::time::Duration::from_millis(200));
        assert_eq!(throttle.admit(), Some(0));
        assert_eq!(throttle.admit(), None);
        assert_eq!(throttle.admit(), None);
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert_eq!(throttle.admit(), Some(2));
    }

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle: inner")]
    struct Middle(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[test]
    fn joins_causes_without_repeating_them() {
        assert_eq!(error_chain(&Outer(Middle(Inner))), "outer: middle: inner");
    }
}
