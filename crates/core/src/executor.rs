//! Runs recorded promotions: picks due records, marks each attempt `Running` durably
//! before acting, and records the outcome with retries and backoff. Exactly one executor
//! may run per store (embedded: the store file is locked; Kubernetes: a Lease).

use std::collections::HashMap;
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
}

impl StrategyError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
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
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut in_flight: JoinSet<()> = JoinSet::new();
        // Record ids of the attempts in flight, by task, so none is started twice.
        let mut running: HashMap<tokio::task::Id, String> = HashMap::new();
        loop {
            let sleep_for = match self.store.unfinished().await {
                Ok(records) => self.dispatch(records, &mut in_flight, &mut running),
                Err(err) => {
                    tracing::warn!(error = %err, "executor cannot read the promotion store");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(sleep_for) => {}
                Some(done) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                    let task = match done {
                        Ok((task, ())) => task,
                        Err(err) => err.id(),
                    };
                    running.remove(&task);
                }
            }
        }
        in_flight.abort_all();
    }

    /// Starts due records (up to the concurrency limit) and returns how long to sleep.
    fn dispatch(
        self: &Arc<Self>,
        mut records: Vec<PromotionRecord>,
        in_flight: &mut JoinSet<()>,
        running: &mut HashMap<tokio::task::Id, String>,
    ) -> Duration {
        let now = self.clock.now();
        records.sort_by_key(|r| (r.next_attempt_at.unwrap_or(r.created_at), r.created_at));
        let mut sleep_for = self.settings.idle_poll;
        for record in records {
            if running.values().any(|id| *id == record.id) {
                continue;
            }
            if record.is_due(now) {
                if in_flight.len() >= self.settings.concurrency {
                    continue;
                }
                let id = record.id.clone();
                let this = Arc::clone(self);
                let task = in_flight.spawn(async move {
                    if let Err(err) = this.execute(&record.id).await {
                        tracing::warn!(promotion = %record.id, error = %err, "promotion attempt not recorded");
                    }
                });
                running.insert(task.id(), id);
            } else if let Some(at) = record.next_attempt_at {
                let wait = (at - now).to_std().unwrap_or(Duration::ZERO);
                sleep_for = sleep_for.min(wait.max(Duration::from_millis(10)));
            }
        }
        sleep_for
    }

    /// Runs one attempt of record `id`, if it is still unfinished.
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
        let stored = match &outcome {
            Ok(done) => {
                self.store
                    .modify(id, &|r| {
                        r.succeed(done.message.clone(), done.result.clone(), now)
                    })
                    .await?
            }
            Err(err) => {
                self.store
                    .modify(id, &|r| {
                        r.fail_attempt(err.message.clone(), err.retryable, &retry, now)
                    })
                    .await?
            }
        };
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
