//! How long finished promotions are kept: a store (and, in Kubernetes mode, the API
//! server and every cache of Promotions) must not grow with history for ever.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::pipeline::PipelineRef;
use crate::ports::{PromotionFilter, PromotionStore, StoreError};
use crate::promotion::PromotionRecord;

/// Finished promotions are kept while younger than `max_age` and among the newest
/// `keep_per_environment` of their pipeline and target environment. Unfinished ones
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
            // Newest first: the ones past the count are the oldest.
            group.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(b.id.cmp(&a.id)));
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

    /// Removes what the policy lets go from `store`; returns how many were removed.
    pub async fn sweep(
        &self,
        store: &dyn PromotionStore,
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let records = store.list(&PromotionFilter::default()).await?;
        let expired = self.expired(&records, now);
        for id in &expired {
            store.delete(id).await?;
        }
        Ok(expired.len())
    }
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
