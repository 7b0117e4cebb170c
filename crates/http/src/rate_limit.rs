//! Per-peer request limiting, keyed on the TCP peer address: never on client-supplied
//! headers, which any sender can forge.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// `N/WINDOW`, e.g. `20/30s`: at most N requests per WINDOW from one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: NonZeroU32,
    pub window: Duration,
}

impl FromStr for RateLimit {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (count, window) = text.split_once('/').ok_or_else(|| {
            format!("rate limit {text:?} is not of the form N/WINDOW, e.g. 20/30s")
        })?;
        let requests: NonZeroU32 = count
            .trim()
            .parse()
            .map_err(|_| format!("rate limit count {count:?} is not a positive integer"))?;
        let window = humantime::parse_duration(window.trim())
            .map_err(|e| format!("rate limit window {window:?}: {e}"))?;
        if window.is_zero() {
            return Err("rate limit window must be longer than zero".to_string());
        }
        Ok(Self { requests, window })
    }
}

pub struct PeerRateLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

impl PeerRateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        let period = limit.window / limit.requests.get();
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(limit.requests);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
        }
    }

    /// `Err(seconds to wait)` when `peer` is over its limit.
    pub fn check(&self, peer: IpAddr) -> Result<(), u64> {
        self.limiter.check_key(&peer).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })?;
        if self.limiter.len() > 10_000 {
            // Forget peers whose allowance is full again, so memory stays bounded.
            self.limiter.retain_recent();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_limits() {
        let limit: RateLimit = "2/1m".parse().unwrap();
        assert_eq!(limit.window, Duration::from_secs(60));
        assert!("2".parse::<RateLimit>().is_err());
        assert!("0/1s".parse::<RateLimit>().is_err());
        assert!("2/soon".parse::<RateLimit>().is_err());
        let limiter = PeerRateLimiter::new(limit);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(limiter.check(a).is_ok());
        assert!(limiter.check(a).is_ok());
        let wait = limiter.check(a).unwrap_err();
        assert!((1..=30).contains(&wait), "{wait}");
        assert!(limiter.check(b).is_ok());
    }
}
