//! Promotions from what the controller sees itself, so a lost Flux event changes
//! nothing: when every target of an environment is deployed at one revision, that
//! revision is proposed to the next environment (trigger `observed`), through the same
//! [`Intake::propose`] the webhook uses, so both converge on one record.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::deployment::{DeploymentView, EnvironmentState};
use crate::intake::{Decision, Intake};
use crate::pipeline::Pipeline;
use crate::promotion::{Trigger, promotion_id};

/// Full evaluations happen at least this often, changes or not.
const RESYNC: Duration = Duration::from_secs(30);
/// Changes arriving this close together are evaluated once.
const SETTLE: Duration = Duration::from_millis(50);

pub struct Proposer {
    intake: Arc<Intake>,
    view: Arc<dyn DeploymentView>,
    /// Record ids this process already proposed, so a steady state costs no store calls.
    proposed: Mutex<HashSet<String>>,
}

impl Proposer {
    pub fn new(intake: Arc<Intake>, view: Arc<dyn DeploymentView>) -> Self {
        Self {
            intake,
            view,
            proposed: Mutex::default(),
        }
    }

    /// Evaluates every pipeline after each change (and every 30 s) until `stop`.
    pub async fn run(
        self: Arc<Self>,
        mut changes: tokio::sync::watch::Receiver<u64>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            self.pass().await;
            tokio::select! {
                () = &mut stop => break,
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    tokio::time::sleep(SETTLE).await;
                    changes.borrow_and_update();
                }
                () = tokio::time::sleep(RESYNC) => {}
            }
        }
    }

    /// One evaluation of every pipeline; returns how many promotions were recorded.
    pub async fn pass(&self) -> usize {
        let pipelines = match self.intake.pipelines().list().await {
            Ok(pipelines) => pipelines,
            Err(err) => {
                tracing::debug!(error = %err, "pipelines not available; observation skipped");
                return 0;
            }
        };
        let mut recorded = 0;
        for pipeline in &pipelines {
            recorded += self.evaluate(pipeline).await;
        }
        recorded
    }

    async fn evaluate(&self, pipeline: &Pipeline) -> usize {
        let environments = &pipeline.spec.environments;
        let mut recorded = 0;
        for index in 0..environments.len().saturating_sub(1) {
            let state = EnvironmentState::observe(pipeline, index, self.view.as_ref());
            if !state.observable() {
                continue;
            }
            let Some(revision) = state.deployed_at() else {
                continue;
            };
            let next = &environments[index + 1];
            let id = promotion_id(&pipeline.reference, &next.name, revision);
            if self.already_proposed(&id) {
                continue;
            }
            // Never repeat what the next environment runs, nor roll it back.
            let downstream = EnvironmentState::observe(pipeline, index + 1, self.view.as_ref());
            if downstream.observable() && downstream.runs_or_passed(revision) {
                continue;
            }
            let trigger = observed_trigger(&state);
            let source = &environments[index].name;
            match self
                .intake
                .propose(pipeline, source, revision, trigger)
                .await
            {
                Ok(Decision::Recorded(record)) => {
                    tracing::info!(promotion = %record.id, pipeline = %record.pipeline, from = %source, to = %record.target_environment, revision = %record.revision, trigger = "observed", "promotion recorded");
                    self.remember(id);
                    recorded += 1;
                }
                Ok(_) => self.remember(id),
                Err(refusal) => {
                    tracing::debug!(pipeline = %pipeline.reference, environment = %source, %revision, error = %refusal, "observed deployment not proposed");
                }
            }
        }
        recorded
    }

    fn already_proposed(&self, id: &str) -> bool {
        self.proposed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(id)
    }

    fn remember(&self, id: String) {
        self.proposed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id);
    }
}

/// Names the objects (and clusters) whose state made the observation.
fn observed_trigger(state: &EnvironmentState) -> Trigger {
    let mut objects = Vec::new();
    let mut clusters: Vec<String> = Vec::new();
    for (key, _) in &state.targets {
        objects.push(format!("{}/{}/{}", key.kind, key.namespace, key.name));
        let cluster = key.cluster.to_string();
        if !clusters.contains(&cluster) {
            clusters.push(cluster);
        }
    }
    Trigger {
        source: "observed".to_string(),
        reason: "Ready".to_string(),
        reporting_controller: "pipeline-controller".to_string(),
        object: objects.join(", "),
        cluster: clusters.join(", "),
    }
}
