//! Delivery insights (DORA-style) computed from promotion records alone: how often each
//! environment is deployed to, how long a revision takes from the first environment to
//! the last, how long promotions wait for approval, how often they fail and how soon a
//! failure is followed by a success. Pure functions of the records and `now`, so the
//! figures are the same on every replica and testable with fixed timestamps.
//!
//! What counts as a deployment: in the first environment, the first record of a
//! revision leaving it (its signed or observed deployment event); in every later
//! environment, a promotion into it that succeeded (when it finished).

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};

use crate::pipeline::Pipeline;
use crate::promotion::{Phase, PromotionRecord};

/// Figures for one environment of one pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvironmentInsights {
    pub environment: String,
    /// Deployments, oldest first, each with its revision.
    pub deployments: Vec<(DateTime<Utc>, String)>,
    /// Finished waits for approval of promotions into this environment, in seconds,
    /// with when each ended (oldest first).
    pub approval_waits: Vec<(DateTime<Utc>, f64)>,
    /// Since when the oldest promotion still waiting for approval waits.
    pub waiting_since: Option<DateTime<Utc>>,
    pub succeeded: usize,
    pub failed: usize,
    /// From a failed promotion into this environment to the next successful one, in
    /// seconds, with when each recovery happened (oldest first).
    pub recoveries: Vec<(DateTime<Utc>, f64)>,
}

impl EnvironmentInsights {
    /// Deployments per day in the `window` before `now`.
    pub fn deployments_per_day(&self, now: DateTime<Utc>, window: Duration) -> f64 {
        let since = now - window;
        let count = self
            .deployments
            .iter()
            .filter(|(at, _)| *at > since && *at <= now)
            .count();
        let days = window.num_seconds() as f64 / 86_400.0;
        if days <= 0.0 {
            0.0
        } else {
            count as f64 / days
        }
    }

    /// Failed promotions out of finished ones (succeeded or failed; rejected and
    /// superseded ones were never tried); `None` before any finished.
    pub fn failure_rate(&self) -> Option<f64> {
        let finished = self.succeeded + self.failed;
        (finished > 0).then(|| self.failed as f64 / finished as f64)
    }

    /// Deployments on each of the `days` days up to `now` (UTC days, oldest first).
    pub fn daily_deployments(&self, now: DateTime<Utc>, days: usize) -> Vec<usize> {
        let today = now.date_naive();
        let mut counts = vec![0; days];
        for (at, _) in &self.deployments {
            let age = (today - at.date_naive()).num_days();
            if let Ok(age) = usize::try_from(age)
                && age < days
            {
                counts[days - 1 - age] += 1;
            }
        }
        counts
    }
}

/// Lead time of one revision: from its deployment in the first environment to its
/// deployment in the last.
#[derive(Debug, Clone, PartialEq)]
pub struct LeadTime {
    pub revision: String,
    pub finished_at: DateTime<Utc>,
    pub seconds: f64,
}

/// Figures for one pipeline, its environments in promotion order.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineInsights {
    pub environments: Vec<EnvironmentInsights>,
    /// Oldest first.
    pub lead_times: Vec<LeadTime>,
}

/// When a record reached its current phase.
fn finished_at(record: &PromotionRecord) -> DateTime<Utc> {
    record
        .history
        .iter()
        .rev()
        .find(|change| change.phase == record.phase)
        .map_or(record.updated_at, |change| change.at)
}

fn seconds(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds() as f64 / 1000.0
}

/// The insights of `pipeline` from `records` (any order; records of other pipelines
/// are ignored).
pub fn pipeline_insights(pipeline: &Pipeline, records: &[PromotionRecord]) -> PipelineInsights {
    let records: Vec<&PromotionRecord> = records
        .iter()
        .filter(|r| r.pipeline == pipeline.reference)
        .collect();
    let names: Vec<&str> = pipeline
        .spec
        .environments
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    let mut environments = Vec::with_capacity(names.len());
    for (index, name) in names.iter().enumerate() {
        environments.push(environment_insights(name, index == 0, &records));
    }
    let lead_times = match (environments.first(), environments.last()) {
        (Some(first), Some(last)) if environments.len() > 1 => {
            let mut started: BTreeMap<&str, DateTime<Utc>> = BTreeMap::new();
            for (at, revision) in &first.deployments {
                started.entry(revision.as_str()).or_insert(*at);
            }
            let mut leads: Vec<LeadTime> = last
                .deployments
                .iter()
                .filter_map(|(at, revision)| {
                    let start = started.get(revision.as_str())?;
                    (at >= start).then(|| LeadTime {
                        revision: revision.clone(),
                        finished_at: *at,
                        seconds: seconds(*start, *at),
                    })
                })
                .collect();
            leads.sort_by_key(|lead| lead.finished_at);
            leads
        }
        _ => Vec::new(),
    };
    PipelineInsights {
        environments,
        lead_times,
    }
}

fn environment_insights(
    name: &str,
    first: bool,
    records: &[&PromotionRecord],
) -> EnvironmentInsights {
    let mut deployments: Vec<(DateTime<Utc>, String)> = Vec::new();
    if first {
        // The first record of each revision leaving the first environment.
        let mut seen: BTreeMap<&str, DateTime<Utc>> = BTreeMap::new();
        for record in records.iter().filter(|r| r.source_environment == name) {
            let at = seen
                .entry(record.revision.as_str())
                .or_insert(record.created_at);
            *at = (*at).min(record.created_at);
        }
        deployments.extend(seen.into_iter().map(|(rev, at)| (at, rev.to_string())));
    }
    let into: Vec<&PromotionRecord> = records
        .iter()
        .copied()
        .filter(|r| r.target_environment == name)
        .collect();
    let mut finished: Vec<(DateTime<Utc>, Phase)> = Vec::new();
    let mut approval_waits = Vec::new();
    let mut waiting_since: Option<DateTime<Utc>> = None;
    for record in &into {
        match record.phase {
            Phase::Succeeded | Phase::Failed => {
                let at = finished_at(record);
                finished.push((at, record.phase));
                if record.phase == Phase::Succeeded && !first {
                    deployments.push((at, record.revision.clone()));
                }
            }
            Phase::WaitingApproval => {
                let since = record
                    .history
                    .iter()
                    .rev()
                    .find(|c| c.phase == Phase::WaitingApproval)
                    .map_or(record.created_at, |c| c.at);
                waiting_since = Some(waiting_since.map_or(since, |w| w.min(since)));
            }
            _ => {}
        }
        // Every finished wait: a WaitingApproval entry and the change after it.
        for pair in record.history.windows(2) {
            if pair[0].phase == Phase::WaitingApproval && pair[1].phase != Phase::WaitingApproval {
                approval_waits.push((pair[1].at, seconds(pair[0].at, pair[1].at)));
            }
        }
    }
    deployments.sort();
    approval_waits.sort_by_key(|(at, _)| *at);
    finished.sort_by_key(|(at, _)| *at);
    let mut recoveries = Vec::new();
    let mut failing_since: Option<DateTime<Utc>> = None;
    for (at, phase) in &finished {
        match phase {
            Phase::Failed => {
                failing_since.get_or_insert(*at);
            }
            _ => {
                if let Some(since) = failing_since.take() {
                    recoveries.push((*at, seconds(since, *at)));
                }
            }
        }
    }
    EnvironmentInsights {
        environment: name.to_string(),
        deployments,
        approval_waits,
        waiting_since,
        succeeded: finished
            .iter()
            .filter(|(_, p)| *p == Phase::Succeeded)
            .count(),
        failed: finished.iter().filter(|(_, p)| *p == Phase::Failed).count(),
        recoveries,
    }
}

/// How far back the exporter remembers what it counted; an event older than this (or
/// than the process) is never counted, so the memory stays bounded.
const EXPORT_HORIZON_HOURS: i64 = 24;

/// Turns insights into metrics: each deployment, approval wait, recovery and lead time
/// that ends while this process runs is counted once; gauges are set on every pass.
/// Events before the process started were counted by the process before it.
pub struct InsightsExporter {
    started: DateTime<Utc>,
    seen: std::sync::Mutex<BTreeMap<String, DateTime<Utc>>>,
}

impl InsightsExporter {
    pub fn new(started: DateTime<Utc>) -> Self {
        Self {
            started,
            seen: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// One pass over every pipeline's records.
    pub fn export(
        &self,
        metrics: &crate::metrics::Metrics,
        pipelines: &[std::sync::Arc<Pipeline>],
        records: &[PromotionRecord],
        now: DateTime<Utc>,
    ) {
        use crate::metrics::{EnvironmentLabels, PipelineLabels};
        let delivery = &metrics.delivery;
        let horizon = self
            .started
            .max(now - Duration::hours(EXPORT_HORIZON_HOURS));
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Keys of what the records still show: the others can never come back (their
        // records were deleted), so they are forgotten after this pass.
        let mut shown: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut first_time = |key: String, at: DateTime<Utc>| -> bool {
            if at < horizon {
                return false;
            }
            if seen.contains_key(&key) {
                shown.insert(key);
                return false;
            }
            seen.insert(key.clone(), at);
            shown.insert(key);
            true
        };
        for pipeline in pipelines {
            let name = pipeline.reference.to_string();
            let insights = pipeline_insights(pipeline, records);
            for env in &insights.environments {
                let labels = EnvironmentLabels {
                    pipeline: name.clone(),
                    environment: env.environment.clone(),
                };
                for (at, revision) in &env.deployments {
                    if first_time(format!("d|{name}|{}|{revision}|{at}", env.environment), *at) {
                        delivery.deployments.get_or_create(&labels).inc();
                    }
                }
                for (at, wait) in &env.approval_waits {
                    if first_time(format!("a|{name}|{}|{at}", env.environment), *at) {
                        delivery.approval_wait.get_or_create(&labels).observe(*wait);
                    }
                }
                for (at, took) in &env.recoveries {
                    if first_time(format!("r|{name}|{}|{at}", env.environment), *at) {
                        delivery
                            .time_to_recover
                            .get_or_create(&labels)
                            .observe(*took);
                    }
                }
                if let Some(rate) = env.failure_rate() {
                    delivery.failure_ratio.get_or_create(&labels).set(rate);
                }
                // A series only while something waits: one per environment of every
                // pipeline would be most of /metrics (and of the memory) with thousands.
                match env.waiting_since {
                    Some(since) => {
                        delivery
                            .approval_waiting
                            .get_or_create(&labels)
                            .set(seconds(since, now));
                    }
                    None => {
                        delivery.approval_waiting.remove(&labels);
                    }
                }
            }
            for lead in &insights.lead_times {
                if first_time(format!("l|{name}|{}", lead.revision), lead.finished_at) {
                    delivery
                        .lead_time
                        .get_or_create(&PipelineLabels {
                            pipeline: name.clone(),
                        })
                        .observe(lead.seconds);
                }
            }
        }
        seen.retain(|key, _| shown.contains(key));
    }

    /// Exports every `interval` from `reader` until `stop`, then withdraws what it
    /// exported (with several replicas only the leader exports: see the CLI's wiring).
    pub async fn run(
        self,
        reader: std::sync::Arc<dyn crate::read::ReadPort>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
        clock: std::sync::Arc<dyn crate::ports::Clock>,
        interval: std::time::Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            let pass = async {
                let pipelines = reader.pipelines().await.map_err(|e| e.to_string())?;
                let records = reader
                    .records(&crate::ports::PromotionFilter::default())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((pipelines, records))
            };
            match pass.await {
                Ok((pipelines, records)) => {
                    self.export(&metrics, &pipelines, &records, clock.now());
                }
                Err(error) => {
                    tracing::debug!(%error, "delivery insights not exported this time");
                }
            }
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
        metrics.delivery.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::pipeline::PipelineRef;
    use crate::ports::{Clock, PipelineSource};
    use crate::promotion::{RetryPolicy, Trigger};
    use crate::testing::{FixedClock, MemoryCatalog};
    use serde_json::json;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    async fn pipeline() -> Pipeline {
        let catalog = MemoryCatalog::new().with_pipeline(
            "apps",
            "web",
            json!({
                "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "web"},
                "environments": [
                    {"name": "dev", "targets": [{"namespace": "dev"}]},
                    {"name": "staging", "targets": [{"namespace": "staging"}]},
                    {"name": "prod", "targets": [{"namespace": "prod"}], "promotion": {"manual": true, "strategy": {"notification": {}}}}
                ],
                "promotion": {"strategy": {"secretRef": {"name": "hmac"}, "notification": {}}}
            }),
        );
        let reference = PipelineRef::new("apps", "web");
        (*catalog.pipeline(&reference).await.unwrap().unwrap()).clone()
    }

    fn record(
        from: &str,
        to: &str,
        revision: &str,
        manual: bool,
        clock: &FixedClock,
    ) -> PromotionRecord {
        PromotionRecord::new(
            PipelineRef::new("apps", "web"),
            from,
            to,
            revision,
            manual,
            Trigger::default(),
            clock.now(),
        )
    }

    fn succeed(record: &mut PromotionRecord, clock: &FixedClock) {
        record.start_attempt(clock.now()).unwrap();
        record.succeed("done".into(), None, clock.now()).unwrap();
    }

    fn fail(record: &mut PromotionRecord, clock: &FixedClock) {
        record.start_attempt(clock.now()).unwrap();
        record
            .fail_attempt("broken".into(), false, &RetryPolicy::default(), clock.now())
            .unwrap();
    }

    /// One revision through dev → staging → prod with known times: lead time, approval
    /// wait and deployments are exactly what the timestamps say.
    #[tokio::test]
    async fn a_revision_through_every_environment() {
        let pipeline = pipeline().await;
        let clock = FixedClock::new(at("2026-01-01T10:00:00Z"));
        // 10:00 dev deployed 1.0.0 → promotion to staging, succeeds at 10:02.
        let mut to_staging = record("dev", "staging", "1.0.0", false, &clock);
        clock.advance(Duration::minutes(2));
        succeed(&mut to_staging, &clock);
        // 10:05 staging's event → prod waits for approval; approved at 11:05, done 11:06.
        clock.set(at("2026-01-01T10:05:00Z"));
        let mut to_prod = record("staging", "prod", "1.0.0", true, &clock);
        clock.set(at("2026-01-01T11:05:00Z"));
        to_prod.approve("alice", clock.now()).unwrap();
        clock.advance(Duration::minutes(1));
        succeed(&mut to_prod, &clock);

        let insights = pipeline_insights(&pipeline, &[to_prod, to_staging]);
        let [dev, staging, prod] = &insights.environments[..] else {
            panic!("three environments expected")
        };
        assert_eq!(
            dev.deployments,
            vec![(at("2026-01-01T10:00:00Z"), "1.0.0".to_string())]
        );
        assert_eq!(
            staging.deployments,
            vec![(at("2026-01-01T10:02:00Z"), "1.0.0".to_string())]
        );
        assert_eq!(
            prod.deployments,
            vec![(at("2026-01-01T11:06:00Z"), "1.0.0".to_string())]
        );
        assert_eq!(
            prod.approval_waits,
            vec![(at("2026-01-01T11:05:00Z"), 3600.0)]
        );
        assert!(staging.approval_waits.is_empty());
        assert_eq!(prod.waiting_since, None);
        assert_eq!(
            insights.lead_times,
            vec![LeadTime {
                revision: "1.0.0".into(),
                finished_at: at("2026-01-01T11:06:00Z"),
                seconds: 66.0 * 60.0,
            }]
        );
        assert_eq!(prod.failure_rate(), Some(0.0));
        assert_eq!(dev.failure_rate(), None);
    }

    /// Two failures then a success: failure rate 2/3, one recovery measured from the
    /// first failure; a promotion still waiting is reported with its start.
    #[tokio::test]
    async fn failures_recovery_and_waiting() {
        let pipeline = pipeline().await;
        let clock = FixedClock::new(at("2026-02-01T08:00:00Z"));
        let mut first = record("dev", "staging", "1.0.0", false, &clock);
        fail(&mut first, &clock); // 08:00
        clock.set(at("2026-02-01T09:00:00Z"));
        let mut second = record("dev", "staging", "1.0.1", false, &clock);
        fail(&mut second, &clock); // 09:00
        clock.set(at("2026-02-01T09:30:00Z"));
        let mut third = record("dev", "staging", "1.0.2", false, &clock);
        succeed(&mut third, &clock); // 09:30
        clock.set(at("2026-02-01T10:00:00Z"));
        let waiting = record("staging", "prod", "1.0.2", true, &clock);

        let insights = pipeline_insights(&pipeline, &[first, second, third, waiting]);
        let staging = &insights.environments[1];
        assert_eq!(staging.succeeded, 1);
        assert_eq!(staging.failed, 2);
        assert!((staging.failure_rate().unwrap() - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(
            staging.recoveries,
            vec![(at("2026-02-01T09:30:00Z"), 5400.0)]
        );
        let prod = &insights.environments[2];
        assert_eq!(prod.waiting_since, Some(at("2026-02-01T10:00:00Z")));
        assert!(prod.approval_waits.is_empty());
        assert!(insights.lead_times.is_empty(), "1.0.2 has not reached prod");
        // Three revisions left dev, one a day apart would be 3 a day over one day.
        let dev = &insights.environments[0];
        assert_eq!(dev.deployments.len(), 3);
        assert!(
            (dev.deployments_per_day(at("2026-02-02T00:00:00Z"), Duration::days(1)) - 3.0).abs()
                < 1e-9
        );
        assert_eq!(
            dev.daily_deployments(at("2026-02-03T12:00:00Z"), 3),
            vec![3, 0, 0]
        );
        // A week's window spreads them over seven days.
        assert!(
            (dev.deployments_per_day(at("2026-02-02T00:00:00Z"), Duration::days(7)) - 3.0 / 7.0)
                .abs()
                < 1e-9
        );
    }

    /// Records of another pipeline do not count.
    #[tokio::test]
    async fn other_pipelines_are_ignored() {
        let pipeline = pipeline().await;
        let clock = FixedClock::new(at("2026-03-01T00:00:00Z"));
        let mut other = PromotionRecord::new(
            PipelineRef::new("apps", "other"),
            "dev",
            "staging",
            "9.9.9",
            false,
            Trigger::default(),
            clock.now(),
        );
        succeed(&mut other, &clock);
        let insights = pipeline_insights(&pipeline, &[other]);
        assert!(
            insights
                .environments
                .iter()
                .all(|e| e.deployments.is_empty())
        );
    }

    /// The exporter counts what happened after it started, once, and sets the gauges.
    #[tokio::test]
    async fn exporter_counts_each_event_once() {
        let pipeline = std::sync::Arc::new(pipeline().await);
        let clock = FixedClock::new(at("2026-04-01T10:00:00Z"));
        let exporter = InsightsExporter::new(at("2026-04-01T09:00:00Z"));
        let mut to_staging = record("dev", "staging", "2.0.0", false, &clock);
        clock.advance(Duration::minutes(1));
        succeed(&mut to_staging, &clock);
        clock.advance(Duration::minutes(1));
        let mut to_prod = record("staging", "prod", "2.0.0", true, &clock);
        let metrics = crate::metrics::Metrics::new();
        let records = vec![to_staging.clone(), to_prod.clone()];
        exporter.export(
            &metrics,
            std::slice::from_ref(&pipeline),
            &records,
            at("2026-04-01T10:32:00Z"),
        );
        let text = metrics.render();
        assert!(
            text.contains(r#"pipeline_controller_approval_waiting_seconds{pipeline="apps/web",environment="prod"} 1800.0"#),
            "{text}"
        );
        clock.advance(Duration::minutes(30));
        to_prod.approve("bob", clock.now()).unwrap();
        succeed(&mut to_prod, &clock);
        let records = vec![to_staging, to_prod];
        for _ in 0..2 {
            exporter.export(
                &metrics,
                std::slice::from_ref(&pipeline),
                &records,
                at("2026-04-01T10:40:00Z"),
            );
        }
        let text = metrics.render();
        for line in [
            r#"pipeline_controller_deployments_total{pipeline="apps/web",environment="dev"} 1"#,
            r#"pipeline_controller_deployments_total{pipeline="apps/web",environment="prod"} 1"#,
            r#"pipeline_controller_approval_wait_seconds_sum{pipeline="apps/web",environment="prod"} 1800.0"#,
            r#"pipeline_controller_lead_time_seconds_sum{pipeline="apps/web"} 1920.0"#,
            r#"pipeline_controller_lead_time_seconds_count{pipeline="apps/web"} 1"#,
            r#"pipeline_controller_promotion_failure_ratio{pipeline="apps/web",environment="prod"} 0.0"#,
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        // Nothing waits any more: no series for it (not a 0 per environment).
        assert!(
            !text.contains("pipeline_controller_approval_waiting_seconds{"),
            "{text}"
        );
        // What deleted records showed is forgotten: what it remembers follows the records.
        assert!(!exporter.seen.lock().unwrap().is_empty());
        exporter.export(
            &metrics,
            std::slice::from_ref(&pipeline),
            &[],
            at("2026-04-01T10:41:00Z"),
        );
        assert!(exporter.seen.lock().unwrap().is_empty());
        // Before the process started: not counted again by a new process.
        let later = InsightsExporter::new(at("2026-04-01T11:00:00Z"));
        let fresh = crate::metrics::Metrics::new();
        later.export(&fresh, &[pipeline], &records, at("2026-04-01T11:01:00Z"));
        assert!(
            !fresh
                .render()
                .contains("pipeline_controller_deployments_total{")
        );
    }
}
