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

use crate::deployment::{DeploymentView, EnvironmentState};
use crate::intake_load::IntakeLoad;
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
    /// While the intake records new promotions, attempts start at most this often.
    pub busy_pace: Duration,
}

impl Default for ExecutorSettings {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            concurrency: 4,
            idle_poll: Duration::from_secs(5),
            busy_pace: crate::intake_load::BUSY_PACE,
        }
    }
}

/// Runs a promotion only once its source environment is healthy at the revision,
/// wherever the controller can see that environment.
#[derive(Clone)]
pub struct HealthGate {
    pub view: Arc<dyn DeploymentView>,
    /// How long a promotion may wait for its source environment before it fails.
    pub timeout: Duration,
}

/// How an execution ended, for the run loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The attempt ran (or there was nothing to run).
    Done,
    /// Held back by the health gate; look again when the view changes.
    Held,
}

/// How long a held promotion waits before the executor looks again, when nothing wakes it.
const HOLD_RECHECK: Duration = Duration::from_secs(5);

pub struct Executor {
    gate: Option<HealthGate>,
    store: Arc<dyn PromotionStore>,
    pipelines: Arc<dyn PipelineSource>,
    secrets: Arc<dyn SecretSource>,
    strategies: StrategySet,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    settings: ExecutorSettings,
    wake: Arc<Notify>,
    /// How many promotions this executor brought to a final phase, so the retention
    /// sweep can follow the pace of promotions rather than only a timer.
    finished: tokio::sync::watch::Sender<u64>,
    /// While the intake records new promotions, at most one attempt runs, started at
    /// most every `settings.busy_pace`.
    load: Arc<IntakeLoad>,
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
            gate: None,
            store,
            pipelines,
            secrets,
            strategies,
            clock,
            metrics,
            settings,
            wake,
            finished: tokio::sync::watch::Sender::new(0),
            load: Arc::default(),
        }
    }

    /// Yields to the intake reporting to `load`: while it is busy, one attempt at a time
    /// and at most one started per `busy_pace`.
    pub fn with_load(mut self, load: Arc<IntakeLoad>) -> Self {
        self.load = load;
        self
    }

    /// Counts promotions this executor brought to a final phase (a notification per
    /// change).
    pub fn finished(&self) -> tokio::sync::watch::Receiver<u64> {
        self.finished.subscribe()
    }

    fn note_phase(&self, phase: crate::promotion::Phase) {
        self.metrics.record_phase(phase);
        if phase.is_terminal() {
            self.finished.send_modify(|n| *n += 1);
        }
    }

    /// Holds promotions back until their source environment is deployed at the revision
    /// on every target the view can see. Wake the executor when the view changes.
    pub fn with_health_gate(mut self, gate: HealthGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Works until `shutdown` resolves. Attempts still running then are abandoned in
    /// `Running` and resumed by the next executor, which strategies tolerate.
    ///
    /// When the store fails (a full disk, an API server away) the executor backs off as
    /// a whole instead of retrying each record at once, and says so once per interval.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut in_flight: JoinSet<Result<Attempt, StoreError>> = JoinSet::new();
        // Promotions held by the health gate, and until when (a wake looks again sooner).
        let mut held: HashMap<String, tokio::time::Instant> = HashMap::new();
        // Record ids of the attempts in flight, by task, so none is started twice.
        let mut running: HashMap<tokio::task::Id, String> = HashMap::new();
        // Due records not started yet, oldest first. The store is scanned again only once
        // this is empty, so a backlog costs one scan, not one scan per finished attempt.
        let mut queue: VecDeque<String> = VecDeque::new();
        let mut sleep_for = Duration::ZERO;
        let mut scan = true;
        let mut outage = StoreOutage::default();
        // When the last attempt started, to pace starts while the intake is busy.
        let mut last_start: Option<tokio::time::Instant> = None;
        loop {
            if scan && !outage.waiting() {
                match self.store.unfinished().await {
                    Ok(records) => {
                        outage.ended();
                        let now = tokio::time::Instant::now();
                        held.retain(|_, until| *until > now);
                        let (due, wait) = self.plan(records, &running, &held);
                        queue = due;
                        sleep_for = wait;
                    }
                    Err(err) => {
                        queue.clear();
                        sleep_for = outage.failed(&err);
                    }
                }
            }
            let busy = self.load.busy();
            let limit = if !busy {
                self.settings.concurrency
            } else if last_start.is_none_or(|t| t.elapsed() >= self.settings.busy_pace) {
                1
            } else {
                0
            };
            while in_flight.len() < limit && !outage.waiting() {
                let Some(id) = queue.pop_front() else { break };
                last_start = Some(tokio::time::Instant::now());
                let this = Arc::clone(&self);
                let task = in_flight.spawn({
                    let id = id.clone();
                    async move { this.execute(&id).await }
                });
                running.insert(task.id(), id);
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = self.wake.notified() => held.clear(),
                () = tokio::time::sleep(outage.remaining().unwrap_or(sleep_for)) => {}
                // Held back by a busy intake: look again once it may have gone quiet or
                // the next paced start is due.
                () = tokio::time::sleep(crate::intake_load::QUIET.min(self.settings.busy_pace)),
                    if !queue.is_empty()
                        && in_flight.len() >= limit
                        && limit < self.settings.concurrency => {}
                Some(done) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                    let task = match done {
                        Ok((task, Ok(Attempt::Done))) => task,
                        Ok((task, Ok(Attempt::Held))) => {
                            if let Some(id) = running.get(&task) {
                                held.insert(id.clone(), tokio::time::Instant::now() + HOLD_RECHECK);
                            }
                            task
                        }
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
        held: &HashMap<String, tokio::time::Instant>,
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
            if let Some(until) = held.get(&record.id) {
                let wait = until.saturating_duration_since(tokio::time::Instant::now());
                sleep_for = sleep_for.min(wait.max(Duration::from_millis(10)));
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
    pub async fn execute(&self, id: &str) -> Result<Attempt, StoreError> {
        let note = match &self.gate {
            Some(gate) => match self.check_gate(id, gate).await? {
                GateCheck::Pass(note) => note,
                GateCheck::Held => return Ok(Attempt::Held),
                GateCheck::Settled => return Ok(Attempt::Done),
            },
            None => None,
        };
        let now = self.clock.now();
        let start = |r: &mut PromotionRecord| {
            r.start_attempt(now)?;
            if let Some(note) = &note {
                r.message = format!("{}; {note}", r.message);
                if let Some(last) = r.history.last_mut() {
                    last.message.clone_from(&r.message);
                }
            }
            Ok(())
        };
        let record = match self.store.modify(id, &start).await {
            Ok(record) => record,
            // Finished or waiting meanwhile: nothing to do.
            Err(StoreError::Transition(_)) => return Ok(Attempt::Done),
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
                Err(StoreError::Transition(_) | StoreError::NotFound(_)) => {
                    return Ok(Attempt::Done);
                }
                Err(err) => {
                    let wait = outage.failed(&err);
                    tokio::time::sleep(wait).await;
                }
            }
        };
        outage.ended();
        self.note_phase(stored.phase);
        tracing::info!(
            promotion = %stored.id,
            phase = %stored.phase,
            message = %stored.message,
            "promotion attempt finished"
        );
        Ok(Attempt::Done)
    }

    /// Whether record `id` may run now: only once every target of its source environment
    /// is deployed at its revision, where the view sees that environment. Holding writes
    /// to the store only when what is missing changed.
    async fn check_gate(&self, id: &str, gate: &HealthGate) -> Result<GateCheck, StoreError> {
        let Some(record) = self.store.get(id).await? else {
            return Ok(GateCheck::Settled);
        };
        // A resumed attempt (Running) passed the gate before.
        if record.phase != crate::promotion::Phase::Pending {
            return Ok(GateCheck::Pass(None));
        }
        let pipeline = match self.pipelines.pipeline(&record.pipeline).await {
            Ok(Some(pipeline)) => pipeline,
            // The attempt itself reports these.
            Ok(None) | Err(_) => return Ok(GateCheck::Pass(None)),
        };
        let Some(index) = pipeline.environment_index(&record.source_environment) else {
            return Ok(GateCheck::Pass(None));
        };
        let state = EnvironmentState::observe(&pipeline, index, gate.view.as_ref());
        let source = &record.source_environment;
        if let Some(why) = state.unobserved_because() {
            return Ok(GateCheck::Pass(Some(format!(
                "{source} is not observed by the controller ({why}): the signed event alone suffices"
            ))));
        }
        let (ready, total) = state.count_at(&record.revision);
        if ready == total {
            return Ok(GateCheck::Pass(Some(format!(
                "{source} deployed at {} on all {total} targets",
                record.revision
            ))));
        }
        let now = self.clock.now();
        // Waiting counts from when it last became runnable (recorded, approved,
        // re-queued), not from its creation: an approval given late gets its own time.
        let runnable_since = record
            .history
            .iter()
            .rev()
            .find(|h| {
                h.phase == crate::promotion::Phase::Pending
                    && h.reason != crate::promotion::ChangeReason::WaitingForSource
            })
            .map_or(record.created_at, |h| h.at);
        let waited = (now - runnable_since).to_std().unwrap_or_default();
        let shortfall = state.shortfall(&record.revision);
        if waited >= gate.timeout {
            let message = format!(
                "{source} was not deployed at {} on every target within {}: {shortfall}",
                record.revision,
                humantime_secs(gate.timeout)
            );
            match self
                .store
                .modify(id, &|r| r.give_up(message.clone(), now))
                .await
            {
                Ok(stored) => self.note_phase(stored.phase),
                Err(StoreError::Transition(_)) => {}
                Err(err) => return Err(err),
            }
            return Ok(GateCheck::Settled);
        }
        // Said only once the watches have reported: a starting watch is not news.
        if record.message != shortfall && !state.settling() {
            match self
                .store
                .modify(id, &|r| r.hold(shortfall.clone(), now))
                .await
            {
                Ok(_) | Err(StoreError::Transition(_)) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(GateCheck::Held)
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

/// What the health gate decided about one record.
enum GateCheck {
    /// Run it; the note says what the gate saw, for the record.
    Pass(Option<String>),
    /// Not yet.
    Held,
    /// Nothing to run (gone, or failed by the gate).
    Settled,
}

fn humantime_secs(duration: Duration) -> String {
    format!("{}s", duration.as_secs())
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
    use crate::ports::{PromotionFilter, SystemClock};
    use crate::promotion::{ChangeReason, Phase, Trigger};
    use crate::testing::{HandView, MemoryCatalog, MemoryStore};

    /// Environments a → b, notification strategy.
    fn a_to_b() -> crate::pipeline::PipelineSpec {
        parse_pipeline_spec(serde_json::json!({
            "appRef": {"apiVersion": "v1", "kind": "HelmRelease", "name": "app"},
            "environments": [{"name": "a", "targets": [{"namespace": "a"}]},
                             {"name": "b", "targets": [{"namespace": "b"}]}],
            "promotion": {"strategy": {"notification": {}}}
        }))
        .unwrap()
    }

    /// Records ns/p a → b of revisions `1.0.<i>`, `i` in `revisions`.
    async fn add_a_to_b(store: &MemoryStore, revisions: std::ops::Range<usize>) {
        for i in revisions {
            let record = PromotionRecord::new(
                PipelineRef::new("ns", "p"),
                "a",
                "b",
                &format!("1.0.{i}"),
                false,
                Trigger::default(),
                chrono::Utc::now(),
            );
            store.create_if_absent(record).await.unwrap();
        }
    }

    /// A catalog holding `spec` as pipeline ns/p, the one every test here uses.
    fn one_pipeline(spec: crate::pipeline::PipelineSpec) -> Arc<MemoryCatalog> {
        Arc::new(MemoryCatalog::new().with_pipeline_spec("ns", "p", spec))
    }

    /// An executor over `catalog` and `store` that runs every kind with `strategy`.
    fn executor(
        store: Arc<MemoryStore>,
        catalog: Arc<MemoryCatalog>,
        strategy: Arc<dyn PromotionStrategy>,
        settings: ExecutorSettings,
        wake: Arc<Notify>,
    ) -> Executor {
        Executor::new(
            store,
            catalog.clone(),
            catalog,
            StrategySet {
                notification: strategy.clone(),
                pull_request: strategy,
            },
            Arc::new(SystemClock),
            Arc::new(Metrics::new()),
            settings,
            wake,
        )
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
        let spec = a_to_b();
        let pipeline = one_pipeline(spec);
        let store = Arc::new(MemoryStore::default());
        add_a_to_b(&store, 0..300).await;
        let strategy = Arc::new(Counting::default());
        let executor = Arc::new(executor(
            store.clone(),
            pipeline,
            strategy.clone(),
            ExecutorSettings {
                retry: RetryPolicy {
                    base_delay: Duration::from_millis(5),
                    max_delay: Duration::from_millis(20),
                    max_attempts: 3,
                },
                concurrency: 4,
                idle_poll: Duration::from_millis(50),
                ..ExecutorSettings::default()
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

    /// Tracks how many attempts run at once, and when each started.
    #[derive(Default)]
    struct Overlap {
        now: AtomicUsize,
        max: AtomicUsize,
        starts: std::sync::Mutex<Vec<std::time::Instant>>,
    }

    impl Overlap {
        /// The shortest gap between two consecutive starts.
        fn closest_starts(&self) -> Duration {
            let starts = self.starts.lock().unwrap();
            starts
                .windows(2)
                .map(|w| w[1] - w[0])
                .min()
                .unwrap_or(Duration::MAX)
        }
    }

    #[async_trait]
    impl PromotionStrategy for Overlap {
        async fn promote(&self, _: PromotionContext<'_>) -> Result<StrategyOutcome, StrategyError> {
            self.starts.lock().unwrap().push(std::time::Instant::now());
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(StrategyOutcome {
                message: "done".into(),
                result: None,
            })
        }
    }

    #[tokio::test]
    async fn a_busy_intake_gets_paced_attempts_one_at_a_time_and_still_progress() {
        let spec = a_to_b();
        let store = Arc::new(MemoryStore::default());
        let drained = |store: Arc<MemoryStore>| async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !store.unfinished().await.unwrap().is_empty() {
                assert!(std::time::Instant::now() < deadline, "backlog not drained");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let strategy = Arc::new(Overlap::default());
        let load = Arc::new(IntakeLoad::default());
        let wake = Arc::new(Notify::new());
        let settings = ExecutorSettings {
            concurrency: 4,
            idle_poll: Duration::from_millis(50),
            busy_pace: Duration::from_millis(60),
            ..ExecutorSettings::default()
        };
        let executor = Arc::new(
            executor(
                store.clone(),
                one_pipeline(spec),
                strategy.clone(),
                settings,
                wake.clone(),
            )
            .with_load(load.clone()),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(executor.run(async {
            let _ = stopped.await;
        }));

        // While a recording is in progress, the backlog drains one attempt at a time,
        // started no closer together than the pace.
        let recording = load.recording();
        add_a_to_b(&store, 0..12).await;
        wake.notify_one();
        drained(store.clone()).await;
        assert_eq!(strategy.max.load(Ordering::SeqCst), 1);
        let closest = strategy.closest_starts();
        assert!(
            closest >= Duration::from_millis(40),
            "starts {closest:?} apart"
        );
        drop(recording);
        strategy.starts.lock().unwrap().clear();

        // Once the intake is quiet, attempts run side by side again.
        tokio::time::sleep(crate::intake_load::QUIET * 2).await;
        add_a_to_b(&store, 100..112).await;
        wake.notify_one();
        drained(store.clone()).await;
        assert!(strategy.max.load(Ordering::SeqCst) > 1);
        assert!(strategy.closest_starts() < Duration::from_millis(30));

        let _ = stop.send(());
        task.await.unwrap();
    }

    /// Breaks the store while promoting, as a disk that fills up mid-attempt would.
    struct BreaksTheStore {
        store: Arc<MemoryStore>,
        calls: AtomicUsize,
    }

    #[async_trait]
    impl PromotionStrategy for BreaksTheStore {
        async fn promote(&self, _: PromotionContext<'_>) -> Result<StrategyOutcome, StrategyError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.store.fail("disk full");
            Ok(StrategyOutcome {
                message: "done".into(),
                result: None,
            })
        }
    }

    #[tokio::test]
    async fn a_store_outage_neither_repeats_a_promotion_nor_spins() {
        let spec = a_to_b();
        let reference = PipelineRef::new("ns", "p");
        let pipeline = one_pipeline(spec);
        let store = Arc::new(MemoryStore::default());
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
        let executor = Arc::new(executor(
            store.clone(),
            pipeline,
            strategy.clone(),
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
        let refused = store.refused();
        store.recover();
        loop {
            let record = store.record(&id).unwrap();
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

    #[tokio::test]
    async fn the_health_gate_holds_a_promotion_until_its_source_is_deployed() {
        use crate::deployment::{AppKind, AppState, ClusterKey, TargetKey, TargetView};
        let spec = parse_pipeline_spec(serde_json::json!({
            "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "app"},
            "environments": [{"name": "a", "targets": [{"namespace": "a1"}, {"namespace": "a2"}]},
                             {"name": "b", "targets": [{"namespace": "b"}]}],
            "promotion": {"strategy": {"notification": {}}}
        }))
        .unwrap();
        let reference = PipelineRef::new("ns", "p");
        let pipeline = one_pipeline(spec);
        let store = Arc::new(MemoryStore::default());
        let record = PromotionRecord::new(
            reference,
            "a",
            "b",
            "2.0.0",
            false,
            Trigger::default(),
            chrono::Utc::now(),
        );
        let id = record.id.clone();
        store.create_if_absent(record).await.unwrap();
        let view = Arc::new(HandView::default());
        let key = |namespace: &str| TargetKey {
            cluster: ClusterKey::Local,
            namespace: namespace.into(),
            kind: AppKind::HelmRelease,
            name: "app".into(),
        };
        let at = |revision: &str| {
            TargetView::Seen(AppState {
                ready: true,
                current: true,
                revision: Some(revision.into()),
                message: String::new(),
            })
        };
        view.set(key("a1"), at("2.0.0"));
        view.set(key("a2"), at("1.0.0"));
        let strategy = Arc::new(Counting::default());
        let wake = Arc::new(Notify::new());
        let executor = Arc::new(
            executor(
                store.clone(),
                pipeline,
                strategy.clone(),
                ExecutorSettings {
                    idle_poll: Duration::from_millis(20),
                    ..ExecutorSettings::default()
                },
                wake.clone(),
            )
            .with_health_gate(HealthGate {
                view: view.clone(),
                timeout: Duration::from_secs(60),
            }),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(executor.run(async {
            let _ = stopped.await;
        }));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let record = store.get(&id).await.unwrap().unwrap();
            if record.message.starts_with("waiting for 1 of 2 targets") {
                assert_eq!(record.phase, Phase::Pending);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never held: {record:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            strategy.total.load(Ordering::SeqCst),
            0,
            "ran before healthy"
        );

        // The second target catches up; the view's owner wakes the executor.
        view.set(key("a2"), at("2.0.0"));
        wake.notify_one();
        loop {
            let record = store.get(&id).await.unwrap().unwrap();
            if record.phase == Phase::Succeeded {
                let started = &record.history[record.history.len() - 2];
                assert!(
                    started
                        .message
                        .contains("a deployed at 2.0.0 on all 2 targets"),
                    "{started:?}"
                );
                let reasons: Vec<_> = record.history.iter().map(|h| h.reason).collect();
                assert_eq!(
                    reasons,
                    [
                        ChangeReason::Recorded,
                        ChangeReason::WaitingForSource,
                        ChangeReason::Started,
                        ChangeReason::Succeeded
                    ]
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never ran: {record:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop.send(());
        task.await.unwrap();
        assert_eq!(strategy.total.load(Ordering::SeqCst), 1);
    }
}
