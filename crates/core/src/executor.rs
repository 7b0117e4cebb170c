//! Runs recorded promotions: picks due records, marks each attempt `Running` durably
//! before acting, and records the outcome with retries and backoff. Exactly one executor
//! may run per store (embedded: the store file is locked; Kubernetes: a Lease).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, Promotion, StrategyKind};
use crate::ports::{Clock, PipelineSource, PromotionStore, SecretSource, StoreError};
use crate::promotion::{PromotionRecord, RetryPolicy};
use crate::report::Throttle;

/// Everything a strategy may look at for one attempt.
pub struct PromotionContext<'a> {
    pub record: &'a PromotionRecord,
    pub pipeline: &'a Pipeline,
    /// The promotion settings that apply to the target environment.
    pub promotion: &'a Promotion,
    pub secrets: &'a dyn SecretSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrategyOutcome {
    pub message: String,
    /// What the promotion produced for people to follow, e.g. a pull request URL.
    pub result: Option<String>,
}

/// A failed attempt. `retryable` errors are retried with backoff; others end the record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StrategyError {
    pub message: String,
    pub retryable: bool,
    /// Parts of the attempt that did succeed, kept in the record for the next attempt
    /// (see [`PromotionRecord::checkpoints`]).
    pub checkpoints: BTreeMap<String, String>,
}

impl StrategyError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            checkpoints: BTreeMap::new(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            checkpoints: BTreeMap::new(),
        }
    }

    pub fn with_checkpoints(mut self, checkpoints: BTreeMap<String, String>) -> Self {
        self.checkpoints = checkpoints;
        self
    }
}

/// One way of carrying out a promotion. Implementations look at the world before acting
/// so that repeating an attempt after a crash repeats nothing visible.
#[async_trait]
pub trait PromotionStrategy: Send + Sync {
    async fn promote(&self, ctx: PromotionContext<'_>) -> Result<StrategyOutcome, StrategyError>;
}

/// The strategy for each kind a pipeline may name.
#[derive(Clone)]
pub struct StrategySet {
    pub notification: Arc<dyn PromotionStrategy>,
    pub pull_request: Arc<dyn PromotionStrategy>,
}

impl StrategySet {
    fn get(&self, kind: StrategyKind) -> &Arc<dyn PromotionStrategy> {
        match kind {
            StrategyKind::Notification => &self.notification,
            StrategyKind::PullRequest => &self.pull_request,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ExecutorSettings {
    pub retry: RetryPolicy,
    /// How many promotions may run at once.
    pub concurrency: usize,
    /// Longest sleep between store scans when nothing wakes the executor.
    pub idle_poll: Duration,
}

impl Default for ExecutorSettings {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            concurrency: 4,
            idle_poll: Duration::from_secs(5),
        }
    }
}

pub struct Executor {
    store: Arc<dyn PromotionStore>,
    pipelines: Arc<dyn PipelineSource>,
    secrets: Arc<dyn SecretSource>,
    strategies: StrategySet,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    settings: ExecutorSettings,
    wake: Arc<Notify>,
}

impl Executor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn PromotionStore>,
        pipelines: Arc<dyn PipelineSource>,
        secrets: Arc<dyn SecretSource>,
        strategies: StrategySet,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        settings: ExecutorSettings,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            pipelines,
            secrets,
            strategies,
            clock,
            metrics,
            settings,
            wake,
        }
    }

    /// Works until `shutdown` resolves. Attempts still running then are abandoned in
    /// `Running` and resumed by the next executor, which strategies tolerate.
    ///
    /// When the store fails (a full disk, an API server away) the executor backs off as
    /// a whole instead of retrying each record at once, and says so once per interval.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut in_flight: JoinSet<Result<(), StoreError>> = JoinSet::new();
        // Record ids of the attempts in flight, by task, so none is started twice.
        let mut running: HashMap<tokio::task::Id, String> = HashMap::new();
        // Due records not started yet, oldest first. The store is scanned again only once
        // this is empty, so a backlog costs one scan, not one scan per finished attempt.
        let mut queue: VecDeque<String> = VecDeque::new();
        let mut sleep_for = Duration::ZERO;
        let mut scan = true;
        let mut outage = StoreOutage::default();
        loop {
            if scan && !outage.waiting() {
                match self.store.unfinished().await {
                    Ok(records) => {
                        outage.ended();
                        let (due, wait) = self.plan(records, &running);
                        queue = due;
                        sleep_for = wait;
                    }
                    Err(err) => {
                        queue.clear();
                        sleep_for = outage.failed(&err);
                    }
                }
            }
            while in_flight.len() < self.settings.concurrency && !outage.waiting() {
                let Some(id) = queue.pop_front() else { break };
                let this = Arc::clone(&self);
                let task = in_flight.spawn({
                    let id = id.clone();
                    async move { this.execute(&id).await }
                });
                running.insert(task.id(), id);
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(outage.remaining().unwrap_or(sleep_for)) => {}
                Some(done) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                    let task = match done {
                        Ok((task, Ok(()))) => task,
                        Ok((task, Err(err))) => {
                            // The attempt could not start: back off before the next try.
                            queue.clear();
                            sleep_for = outage.failed(&err);
                            task
                        }
                        Err(err) => err.id(),
                    };
                    running.remove(&task);
                }
            }
            scan = queue.is_empty();
        }
        in_flight.abort_all();
    }

    /// Splits unfinished records into the due ones not yet running (oldest first) and how
    /// long to sleep until the next scheduled retry.
    fn plan(
        &self,
        mut records: Vec<PromotionRecord>,
        running: &HashMap<tokio::task::Id, String>,
    ) -> (VecDeque<String>, Duration) {
        let now = self.clock.now();
        records.sort_by_key(|r| (r.next_attempt_at.unwrap_or(r.created_at), r.created_at));
        let in_flight: HashSet<&str> = running.values().map(String::as_str).collect();
        let mut sleep_for = self.settings.idle_poll;
        let mut due = VecDeque::new();
        for record in records {
            if in_flight.contains(record.id.as_str()) {
                continue;
            }
            if record.is_due(now) {
                due.push_back(record.id);
            } else if let Some(at) = record.next_attempt_at {
                let wait = (at - now).to_std().unwrap_or(Duration::ZERO);
                sleep_for = sleep_for.min(wait.max(Duration::from_millis(10)));
            }
        }
        (due, sleep_for)
    }

    /// Runs one attempt of record `id`, if it is still unfinished. Fails only when the
    /// attempt could not be started; once the strategy ran, its outcome is kept and
    /// stored as soon as the store takes it, so a store outage never repeats a promotion
    /// that already happened (only a process that dies meanwhile does).
    pub async fn execute(&self, id: &str) -> Result<(), StoreError> {
        let now = self.clock.now();
        let record = match self.store.modify(id, &|r| r.start_attempt(now)).await {
            Ok(record) => record,
            // Finished or waiting meanwhile: nothing to do.
            Err(StoreError::Transition(_)) => return Ok(()),
            Err(err) => return Err(err),
        };
        self.metrics.record_phase(record.phase);
        tracing::info!(
            promotion = %record.id,
            pipeline = %record.pipeline,
            environment = %record.target_environment,
            revision = %record.revision,
            attempt = record.attempts,
            "promotion attempt started"
        );
        let outcome = self.attempt(&record).await;
        let now = self.clock.now();
        let retry = self.settings.retry;
        let change = |r: &mut PromotionRecord| match &outcome {
            Ok(done) => r.succeed(done.message.clone(), done.result.clone(), now),
            Err(err) => {
                r.checkpoints.extend(err.checkpoints.clone());
                r.fail_attempt(err.message.clone(), err.retryable, &retry, now)
            }
        };
        let mut outage = StoreOutage::default();
        let stored = loop {
            match self.store.modify(id, &change).await {
                Ok(stored) => break stored,
                // Someone else finished it meanwhile (another leader after a failover).
                Err(StoreError::Transition(_) | StoreError::NotFound(_)) => return Ok(()),
                Err(err) => {
                    let wait = outage.failed(&err);
                    tokio::time::sleep(wait).await;
                }
            }
        };
        outage.ended();
        self.metrics.record_phase(stored.phase);
        tracing::info!(
            promotion = %stored.id,
            phase = %stored.phase,
            message = %stored.message,
            "promotion attempt finished"
        );
        Ok(())
    }

    async fn attempt(&self, record: &PromotionRecord) -> Result<StrategyOutcome, StrategyError> {
        let pipeline = self
            .pipelines
            .pipeline(&record.pipeline)
            .await
            .map_err(|e| StrategyError::retryable(e.to_string()))?
            .ok_or_else(|| {
                StrategyError::permanent(format!("pipeline {} no longer exists", record.pipeline))
            })?;
        if pipeline
            .environment_index(&record.target_environment)
            .is_none()
        {
            return Err(StrategyError::permanent(format!(
                "pipeline {} no longer has environment {:?}",
                record.pipeline, record.target_environment
            )));
        }
        let promotion = pipeline
            .promotion_for(&record.target_environment)
            .ok_or_else(|| {
                StrategyError::permanent(format!(
                    "pipeline {} has no promotion configured for environment {:?}",
                    record.pipeline, record.target_environment
                ))
            })?;
        let kind = promotion.strategy.kind().ok_or_else(|| {
            StrategyError::permanent("promotion has no single strategy configured")
        })?;
        self.strategies
            .get(kind)
            .promote(PromotionContext {
                record,
                pipeline: &pipeline,
                promotion,
                secrets: self.secrets.as_ref(),
            })
            .await
    }
}

/// Backoff and quiet logging while the promotion store fails.
#[derive(Debug)]
struct StoreOutage {
    since: Option<std::time::Instant>,
    backoff: Duration,
    retry_at: Option<std::time::Instant>,
    warnings: Throttle,
}

impl Default for StoreOutage {
    fn default() -> Self {
        Self {
            since: None,
            backoff: Duration::ZERO,
            retry_at: None,
            warnings: Throttle::new(Self::LOG_INTERVAL),
        }
    }
}

impl StoreOutage {
    const MIN_BACKOFF: Duration = Duration::from_millis(250);
    const MAX_BACKOFF: Duration = Duration::from_secs(10);
    const LOG_INTERVAL: Duration = Duration::from_secs(30);

    /// Notes a failure; returns how long to wait before touching the store again.
    fn failed(&mut self, err: &StoreError) -> Duration {
        let now = std::time::Instant::now();
        let since = *self.since.get_or_insert(now);
        self.backoff = (self.backoff * 2).clamp(Self::MIN_BACKOFF, Self::MAX_BACKOFF);
        self.retry_at = Some(now + self.backoff);
        if let Some(held_back) = self.warnings.admit() {
            tracing::warn!(
                error = %err,
                failures_not_logged = held_back,
                failing_for_s = now.duration_since(since).as_secs(),
                retry_in_ms = u64::try_from(self.backoff.as_millis()).unwrap_or(u64::MAX),
                "executor cannot use the promotion store; backing off"
            );
        }
        self.backoff
    }

    /// Whether the executor is still waiting out a failure.
    fn waiting(&self) -> bool {
        self.remaining().is_some()
    }

    /// How much of the current wait is left, if the executor is waiting.
    fn remaining(&self) -> Option<Duration> {
        self.retry_at
            .and_then(|at| at.checked_duration_since(std::time::Instant::now()))
            .filter(|left| !left.is_zero())
    }

    fn ended(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                after_s = since.elapsed().as_secs(),
                "executor uses the promotion store again"
            );
        }
        self.backoff = Duration::ZERO;
        self.retry_at = None;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::pipeline::{PipelineRef, parse_pipeline_spec};
    use crate::ports::{
        PromotionFilter, RecordChange, SecretBytes, SecretLookupError, SystemClock, Unavailable,
    };
    use crate::promotion::{Phase, Trigger};

    #[derive(Default)]
    struct MemoryStore(Mutex<BTreeMap<String, PromotionRecord>>);

    #[async_trait]
    impl PromotionStore for MemoryStore {
        async fn create_if_absent(
            &self,
            record: PromotionRecord,
        ) -> Result<(PromotionRecord, bool), StoreError> {
            let mut map = self.0.lock().unwrap();
            if let Some(existing) = map.get(&record.id) {
                return Ok((existing.clone(), false));
            }
            map.insert(record.id.clone(), record.clone());
            Ok((record, true))
        }
        async fn get(&self, id: &str) -> Result<Option<PromotionRecord>, StoreError> {
            Ok(self.0.lock().unwrap().get(id).cloned())
        }
        async fn list(&self, f: &PromotionFilter) -> Result<Vec<PromotionRecord>, StoreError> {
            Ok(self
                .0
                .lock()
                .unwrap()
                .values()
                .filter(|r| f.matches(r))
                .cloned()
                .collect())
        }
        async fn modify(
            &self,
            id: &str,
            change: RecordChange<'_>,
        ) -> Result<PromotionRecord, StoreError> {
            let mut map = self.0.lock().unwrap();
            let record = map
                .get_mut(id)
                .ok_or_else(|| StoreError::NotFound(id.into()))?;
            let mut changed = record.clone();
            change(&mut changed)?;
            *record = changed.clone();
            Ok(changed)
        }
        async fn unfinished(&self) -> Result<Vec<PromotionRecord>, StoreError> {
            let map = self.0.lock().unwrap();
            Ok(map
                .values()
                .filter(|r| matches!(r.phase, Phase::Pending | Phase::Running))
                .cloned()
                .collect())
        }
    }

    struct OnePipeline(Arc<Pipeline>);

    #[async_trait]
    impl PipelineSource for OnePipeline {
        async fn pipeline(&self, _: &PipelineRef) -> Result<Option<Arc<Pipeline>>, Unavailable> {
            Ok(Some(self.0.clone()))
        }
    }

    #[async_trait]
    impl SecretSource for OnePipeline {
        async fn secret_value(
            &self,
            _: &str,
            _: &str,
            _: &str,
        ) -> Result<Option<SecretBytes>, SecretLookupError> {
            Ok(None)
        }
    }

    /// Counts calls per revision; fails the first attempt of revisions ending in 7.
    #[derive(Default)]
    struct Counting {
        calls: Mutex<BTreeMap<String, usize>>,
        total: AtomicUsize,
    }

    #[async_trait]
    impl PromotionStrategy for Counting {
        async fn promote(
            &self,
            ctx: PromotionContext<'_>,
        ) -> Result<StrategyOutcome, StrategyError> {
            self.total.fetch_add(1, Ordering::SeqCst);
            let n = {
                let mut calls = self.calls.lock().unwrap();
                let n = calls.entry(ctx.record.revision.clone()).or_default();
                *n += 1;
                *n
            };
            tokio::time::sleep(Duration::from_millis(1)).await;
            if ctx.record.revision.ends_with('7') && n == 1 {
                let done = BTreeMap::from([("half".to_string(), "done".to_string())]);
                return Err(StrategyError::retryable("flaky").with_checkpoints(done));
            }
            // What the failed attempt recorded is there for the retry.
            assert_eq!(
                ctx.record.checkpoints.contains_key("half"),
                ctx.record.revision.ends_with('7')
            );
            Ok(StrategyOutcome {
                message: "done".into(),
                result: None,
            })
        }
    }

    #[tokio::test]
    async fn drains_a_backlog_once_each_with_retries() {
        let spec = parse_pipeline_spec(serde_json::json!({
            "appRef": {"apiVersion": "v1", "kind": "K", "name": "app"},
            "environments": [{"name": "a", "targets": [{"namespace": "a"}]},
                             {"name": "b", "targets": [{"namespace": "b"}]}],
            "promotion": {"strategy": {"notification": {}}}
        }))
        .unwrap();
        let reference = PipelineRef::new("ns", "p");
        let pipeline = Arc::new(OnePipeline(Arc::new(Pipeline {
            reference: reference.clone(),
            spec,
        })));
        let store = Arc::new(MemoryStore::default());
        for i in 0..300 {
            let record = PromotionRecord::new(
                reference.clone(),
                "a",
                "b",
                &format!("1.0.{i}"),
                false,
                Trigger::default(),
                chrono::Utc::now(),
            );
            store.create_if_absent(record).await.unwrap();
        }
        let strategy = Arc::new(Counting::default());
        let executor = Arc::new(Executor::new(
            store.clone(),
            pipeline.clone(),
            pipeline,
            StrategySet {
                notification: strategy.clone(),
                pull_request: strategy.clone(),
            },
            Arc::new(SystemClock),
            Arc::new(Metrics::new()),
            ExecutorSettings {
                retry: RetryPolicy {
                    base_delay: Duration::from_millis(5),
                    max_delay: Duration::from_millis(20),
                    max_attempts: 3,
                },
                concurrency: 4,
                idle_poll: Duration::from_millis(50),
            },
            Arc::new(Notify::new()),
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(executor.run(async {
            let _ = stopped.await;
        }));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !store.unfinished().await.unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "backlog not drained");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop.send(());
        task.await.unwrap();

        let records = store.list(&PromotionFilter::default()).await.unwrap();
        assert!(records.iter().all(|r| r.phase == Phase::Succeeded));
        let calls = strategy.calls.lock().unwrap();
        for record in &records {
            let expected = if record.revision.ends_with('7') { 2 } else { 1 };
            assert_eq!(calls[&record.revision], expected, "{}", record.revision);
            assert_eq!(record.attempts as usize, expected);
        }
        assert_eq!(strategy.total.load(Ordering::SeqCst), 300 + 30);
    }

    /// A store that refuses everything while `broken` is set.
    struct Breakable {
        inner: MemoryStore,
        broken: std::sync::atomic::AtomicBool,
        refused: AtomicUsize,
    }

    impl Breakable {
        fn check(&self) -> Result<(), StoreError> {
            if self.broken.load(Ordering::SeqCst) {
                self.refused.fetch_add(1, Ordering::SeqCst);
                return Err(StoreError::Unavailable("disk full".into()));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl PromotionStore for Breakable {
        async fn create_if_absent(
            &self,
            record: PromotionRecord,
        ) -> Result<(PromotionRecord, bool), StoreError> {
            self.check()?;
            self.inner.create_if_absent(record).await
        }
        async fn get(&self, id: &str) -> Result<Option<PromotionRecord>, StoreError> {
            self.check()?;
            self.inner.get(id).await
        }
        async fn list(&self, f: &PromotionFilter) -> Result<Vec<PromotionRecord>, StoreError> {
            self.check()?;
            self.inner.list(f).await
        }
        async fn modify(
            &self,
            id: &str,
            change: RecordChange<'_>,
        ) -> Result<PromotionRecord, StoreError> {
            self.check()?;
            self.inner.modify(id, change).await
        }
        async fn unfinished(&self) -> Result<Vec<PromotionRecord>, StoreError> {
            self.check()?;
            self.inner.unfinished().await
        }
    }

    /// Breaks the store while promoting, as a disk that fills up mid-attempt would.
    struct BreaksTheStore {
        store: Arc<Breakable>,
        calls: AtomicUsize,
    }

    #[async_trait]
    impl PromotionStrategy for BreaksTheStore {
        async fn promote(&self, _: PromotionContext<'_>) -> Result<StrategyOutcome, StrategyError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.store.broken.store(true, Ordering::SeqCst);
            Ok(StrategyOutcome {
                message: "done".into(),
                result: None,
            })
        }
    }

    #[tokio::test]
    async fn a_store_outage_neither_repeats_a_promotion_nor_spins() {
        let spec = parse_pipeline_spec(serde_json::json!({
            "appRef": {"apiVersion": "v1", "kind": "K", "name": "app"},
            "environments": [{"name": "a", "targets": [{"namespace": "a"}]},
                             {"name": "b", "targets": [{"namespace": "b"}]}],
            "promotion": {"strategy": {"notification": {}}}
        }))
        .unwrap();
        let reference = PipelineRef::new("ns", "p");
        let pipeline = Arc::new(OnePipeline(Arc::new(Pipeline {
            reference: reference.clone(),
            spec,
        })));
        let store = Arc::new(Breakable {
            inner: MemoryStore::default(),
            broken: false.into(),
            refused: AtomicUsize::new(0),
        });
        let record = PromotionRecord::new(
            reference,
            "a",
            "b",
            "1.0.0",
            false,
            Trigger::default(),
            chrono::Utc::now(),
        );
        let id = record.id.clone();
        store.create_if_absent(record).await.unwrap();
        let strategy = Arc::new(BreaksTheStore {
            store: store.clone(),
            calls: AtomicUsize::new(0),
        });
        let executor = Arc::new(Executor::new(
            store.clone(),
            pipeline.clone(),
            pipeline,
            StrategySet {
                notification: strategy.clone(),
                pull_request: strategy.clone(),
            },
            Arc::new(SystemClock),
            Arc::new(Metrics::new()),
            ExecutorSettings {
                idle_poll: Duration::from_millis(10),
                ..ExecutorSettings::default()
            },
            Arc::new(Notify::new()),
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(executor.run(async {
            let _ = stopped.await;
        }));
        // The store stays broken for two seconds after the strategy ran.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while strategy.calls.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "never attempted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let refused = store.refused.load(Ordering::SeqCst);
        store.broken.store(false, Ordering::SeqCst);
        loop {
            let record = store.inner.get(&id).await.unwrap().unwrap();
            if record.phase == Phase::Succeeded {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never recorded: {record:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop.send(());
        task.await.unwrap();
        assert_eq!(strategy.calls.load(Ordering::SeqCst), 1, "promoted twice");
        // Backoff, not a busy loop: a handful of tries in two seconds, not thousands.
        assert!(refused <= 20, "store hit {refused} times while broken");
    }
}
