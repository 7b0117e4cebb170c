//! How long finished promotions are kept: a store (and, in Kubernetes mode, the API
//! server and every cache of Promotions) must not grow with history for ever.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::pipeline::PipelineRef;
use crate::ports::{PromotionFilter, PromotionStore, StoreError};
use crate::promotion::PromotionRecord;

/// Deletes a sweep keeps in flight at once.
const DELETES_IN_FLIGHT: usize = 8;

/// Finished promotions are kept while they finished less than `max_age` ago and are
/// among the newest recorded `keep_per_environment` of their pipeline and target
/// environment. Unfinished ones
/// (pending, running, waiting for approval) are always kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// `None` keeps them whatever their age.
    pub max_age: Option<Duration>,
    /// `None` keeps them whatever their number.
    pub keep_per_environment: Option<usize>,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            max_age: Some(Duration::from_secs(30 * 24 * 3600)),
            keep_per_environment: Some(100),
        }
    }
}

impl RetentionPolicy {
    /// Ids of the records this policy lets go, at `now`.
    pub fn expired(&self, records: &[PromotionRecord], now: DateTime<Utc>) -> Vec<String> {
        let mut finished: HashMap<(&PipelineRef, &str), Vec<&PromotionRecord>> = HashMap::new();
        for record in records.iter().filter(|r| r.phase.is_terminal()) {
            finished
                .entry((&record.pipeline, record.target_environment.as_str()))
                .or_default()
                .push(record);
        }
        let mut out = Vec::new();
        for group in finished.values_mut() {
            // Newest recorded first: the ones past the count are the oldest. Not by when
            // they finished, which concurrent attempts (and approvals) reorder.
            group.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
            for (rank, record) in group.iter().enumerate() {
                let too_many = self.keep_per_environment.is_some_and(|keep| rank >= keep);
                let too_old = self.max_age.is_some_and(|max| {
                    (now - record.updated_at)
                        .to_std()
                        .is_ok_and(|age| age > max)
                });
                if too_many || too_old {
                    out.push(record.id.clone());
                }
            }
        }
        out.sort();
        out
    }

    /// Removes what the policy lets go from `store`.
    pub async fn sweep(
        &self,
        store: &dyn PromotionStore,
        now: DateTime<Utc>,
    ) -> Result<Sweep, StoreError> {
        let records = store.list(&PromotionFilter::default()).await?;
        let expired = self.expired(&records, now);
        // A few deletes in flight: one at a time, an API server's round trip would bound
        // the sweep below the pace at which a burst of promotions finishes.
        // (No closure-mapped stream: that makes the leader's future not `Send`.)
        let mut pending = expired.iter();
        let mut deletes = FuturesUnordered::new();
        loop {
            while deletes.len() < DELETES_IN_FLIGHT {
                let Some(id) = pending.next() else { break };
                deletes.push(store.delete(id));
            }
            match deletes.next().await {
                Some(result) => result?,
                None => break,
            }
        }
        Ok(Sweep {
            examined: records.len(),
            removed: expired.len(),
        })
    }

    /// After how many more finished promotions the next sweep is due, given what the last
    /// one examined: a tenth of what is kept (at least a quarter of the per-environment
    /// count), so the store stays near its bound during a burst while a sweep, which reads
    /// every record, costs a bounded share of the work per promotion. `None` without a
    /// count limit: age alone is handled by the periodic sweep.
    pub fn sweep_after(&self, last: &Sweep) -> Option<u64> {
        let keep = self.keep_per_environment?;
        let kept = last.examined.saturating_sub(last.removed);
        Some((kept / 10).max(keep / 4).max(10) as u64)
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Records read.
    pub examined: usize,
    /// Records deleted.
    pub removed: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::promotion::{Phase, Trigger};

    fn record(env: &str, revision: &str, phase: Phase, age_days: i64) -> PromotionRecord {
        let at = Utc::now() - chrono::Duration::days(age_days);
        let mut r = PromotionRecord::new(
            PipelineRef::new("ns", "p"),
            "dev",
            env,
            revision,
            false,
            Trigger::default(),
            at,
        );
        r.phase = phase;
        r
    }

    #[test]
    fn the_next_sweep_follows_what_is_kept() {
        let policy = RetentionPolicy {
            max_age: None,
            keep_per_environment: Some(100),
        };
        let after = |examined, removed| policy.sweep_after(&Sweep { examined, removed });
        // A quarter of one environment's count while little is kept...
        assert_eq!(after(0, 0), Some(25));
        assert_eq!(after(130, 30), Some(25));
        // ...a tenth of everything kept once that is more (1,000 environments at 100).
        assert_eq!(after(100_000, 0), Some(10_000));
        let small = RetentionPolicy {
            max_age: None,
            keep_per_environment: Some(3),
        };
        assert_eq!(small.sweep_after(&Sweep::default()), Some(10));
        let age_only = RetentionPolicy {
            max_age: Some(Duration::from_secs(60)),
            keep_per_environment: None,
        };
        assert_eq!(age_only.sweep_after(&Sweep::default()), None);
    }

    #[test]
    fn the_newest_recorded_are_kept_whatever_order_they_finished_in() {
        let policy = RetentionPolicy {
            max_age: None,
            keep_per_environment: Some(2),
        };
        let mut records: Vec<PromotionRecord> = (1..=4)
            .map(|i| record("staging", &i.to_string(), Phase::Succeeded, 10 - i))
            .collect();
        // The newest finished first, the oldest last.
        for (i, r) in records.iter_mut().enumerate() {
            r.updated_at = Utc::now() - chrono::Duration::minutes(i as i64);
        }
        let expired = policy.expired(&records, Utc::now());
        let id = |rev: &str| {
            crate::promotion::promotion_id(&PipelineRef::new("ns", "p"), "staging", rev)
        };
        let mut want = vec![id("1"), id("2")];
        want.sort();
        assert_eq!(expired, want);
    }

    #[test]
    fn keeps_the_newest_and_the_young_and_never_the_unfinished() {
        let policy = RetentionPolicy {
            max_age: Some(Duration::from_secs(10 * 24 * 3600)),
            keep_per_environment: Some(2),
        };
        let records = vec![
            record("staging", "1", Phase::Succeeded, 1),
            record("staging", "2", Phase::Failed, 2),
            record("staging", "3", Phase::Succeeded, 3),
            record("staging", "4", Phase::Pending, 50),
            record("prod", "1", Phase::Succeeded, 20),
            record("prod", "2", Phase::WaitingApproval, 40),
        ];
        let expired = policy.expired(&records, Utc::now());
        let ids = |env: &str, rev: &str| {
            crate::promotion::promotion_id(&PipelineRef::new("ns", "p"), env, rev)
        };
        let mut want = vec![ids("staging", "3"), ids("prod", "1")];
        want.sort();
        assert_eq!(expired, want);
        let unlimited = RetentionPolicy {
            max_age: None,
            keep_per_environment: None,
        };
        assert!(unlimited.expired(&records, Utc::now()).is_empty());
    }
}
