//! Promotions from what the controller sees itself, so a lost Flux event changes
//! nothing: when every target of an environment is deployed at one revision, that
//! revision is proposed to the next environment (trigger `observed`), through the same
//! [`Intake::propose`] the webhook uses, so both converge on one record.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;

use crate::deployment::{DeploymentView, EnvironmentState};
use crate::intake::{Decision, Intake};
use crate::pipeline::Pipeline;
use crate::ports::PromotionFilter;
use crate::promotion::{Phase, Trigger, parse_version, promotion_id};

/// Full evaluations happen at least this often, changes or not.
const RESYNC: Duration = Duration::from_secs(30);
/// Pipelines evaluated (and their promotions recorded) at the same time.
const PROPOSALS_AT_ONCE: usize = 32;

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
        // Several at once: when many environments become ready together (a fleet-wide
        // release), their promotions are recorded side by side, not one after another.
        // (A plain loop over a FuturesUnordered: closures here would make the future
        // not `Send` for every lifetime, which spawning it needs.)
        let mut running = futures::stream::FuturesUnordered::new();
        let mut waiting = pipelines.iter();
        let mut recorded = 0;
        loop {
            while running.len() < PROPOSALS_AT_ONCE {
                let Some(pipeline) = waiting.next() else {
                    break;
                };
                running.push(self.evaluate(pipeline));
            }
            match running.next().await {
                Some(count) => recorded += count,
                None => break,
            }
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
            // Where the next environment is not watched, its records say what it ran:
            // a newer version promoted there already makes this one a downgrade.
            match self.promoted_newer(pipeline, &next.name, revision).await {
                Ok(Some(newer)) => {
                    tracing::debug!(pipeline = %pipeline.reference, environment = %next.name, %revision, %newer, "observed revision is older than one promoted already; not proposed");
                    self.remember(id);
                    continue;
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::debug!(error = %err, "promotion store unavailable; observation retried later");
                    continue;
                }
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

    /// A version newer than `revision` (both semantic versions) that a record already
    /// took, or is taking, into `environment`.
    async fn promoted_newer(
        &self,
        pipeline: &Pipeline,
        environment: &str,
        revision: &str,
    ) -> Result<Option<String>, crate::ports::StoreError> {
        let Some(proposed) = parse_version(revision) else {
            return Ok(None);
        };
        let records = self
            .intake
            .store()
            .list(&PromotionFilter {
                pipeline: Some(pipeline.reference.clone()),
                environment: Some(environment.to_string()),
            })
            .await?;
        Ok(records
            .into_iter()
            .filter(|r| r.target_environment == environment)
            .filter(|r| {
                matches!(
                    r.phase,
                    Phase::Succeeded | Phase::Running | Phase::Pending | Phase::WaitingApproval
                )
            })
            .find(|r| parse_version(&r.revision).is_some_and(|v| v > proposed))
            .map(|r| r.revision))
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
        metadata: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deployment::{AppKind, AppState, ClusterKey, TargetKey, TargetView};
    use crate::intake::TimeWindow;
    use crate::metrics::Metrics;
    use crate::ports::{PromotionFilter, PromotionStore};
    use crate::promotion::PromotionRecord;
    use crate::testing::{FixedClock, HandView, MemoryCatalog, MemoryStore};

    /// dev has two targets, one on the local cluster and one on a leaf cluster.
    fn spec(kind: &str, api_version: &str) -> serde_json::Value {
        serde_json::json!({
            "appRef": {"apiVersion": api_version, "kind": kind, "name": "app"},
            "environments": [
                {"name": "dev", "targets": [
                    {"namespace": "dev-a"},
                    {"namespace": "dev-b", "clusterRef": {"kind": "GitopsCluster", "name": "leaf"}}
                ]},
                {"name": "staging", "targets": [{"namespace": "staging"}]},
                {"name": "prod", "targets": [{"namespace": "prod"}]}
            ],
            "promotion": {"strategy": {"notification": {}}}
        })
    }

    struct Fixture {
        store: Arc<MemoryStore>,
        view: Arc<HandView>,
        intake: Arc<Intake>,
        kind: AppKind,
    }

    impl Fixture {
        fn new(kind: AppKind) -> Self {
            let api_version = format!("{}/v1", kind.group());
            let catalog = Arc::new(MemoryCatalog::new().with_pipeline(
                "ns",
                "p",
                spec(kind.as_str(), &api_version),
            ));
            let store = Arc::new(MemoryStore::new());
            let intake = Arc::new(Intake::new(
                catalog.clone(),
                catalog,
                store.clone(),
                Arc::new(FixedClock::default()),
                TimeWindow::default(),
                Arc::new(Metrics::new()),
                Arc::new(tokio::sync::Notify::new()),
            ));
            Self {
                store,
                view: Arc::new(HandView::new()),
                intake,
                kind,
            }
        }

        fn proposer(&self) -> Proposer {
            Proposer::new(self.intake.clone(), self.view.clone())
        }

        fn key(&self, namespace: &str) -> TargetKey {
            TargetKey {
                cluster: if namespace == "dev-b" {
                    ClusterKey::Remote {
                        kind: "GitopsCluster".into(),
                        namespace: "ns".into(),
                        name: "leaf".into(),
                    }
                } else {
                    ClusterKey::Local
                },
                namespace: namespace.into(),
                kind: self.kind,
                name: "app".into(),
            }
        }

        fn set(&self, namespace: &str, view: TargetView) {
            self.view.set(self.key(namespace), view);
        }

        /// Both dev targets Ready and current at `revision`.
        fn dev_at(&self, revision: &str) {
            self.set("dev-a", HandView::deployed(revision));
            self.set("dev-b", HandView::deployed(revision));
        }

        async fn records(&self) -> Vec<PromotionRecord> {
            self.store.list(&PromotionFilter::default()).await.unwrap()
        }
    }

    fn helm() -> Fixture {
        Fixture::new(AppKind::HelmRelease)
    }

    fn seen(revision: &str, ready: bool, current: bool) -> TargetView {
        TargetView::Seen(AppState {
            ready,
            current,
            revision: Some(revision.into()),
            message: if ready {
                String::new()
            } else {
                "install failed".into()
            },
        })
    }

    #[tokio::test]
    async fn every_target_deployed_proposes_the_revision_once() {
        let f = helm();
        f.dev_at("1.0.0");
        assert_eq!(f.proposer().pass().await, 1);
        let records = f.records().await;
        assert_eq!(records.len(), 1, "{records:?}");
        let record = &records[0];
        assert_eq!(
            (
                record.source_environment.as_str(),
                record.target_environment.as_str(),
                record.revision.as_str()
            ),
            ("dev", "staging", "1.0.0")
        );
        assert_eq!(record.trigger.source, "observed");
        assert_eq!(record.trigger.reason, "Ready");
        assert_eq!(record.trigger.reporting_controller, "pipeline-controller");
        assert_eq!(
            record.trigger.object,
            "HelmRelease/dev-a/app, HelmRelease/dev-b/app"
        );
        assert_eq!(record.trigger.cluster, "local, GitopsCluster/ns/leaf");
    }

    #[tokio::test]
    async fn one_of_two_targets_proposes_nothing() {
        let f = helm();
        f.set("dev-a", HandView::deployed("1.0.0"));
        f.set("dev-b", HandView::deployed("0.9.0"));
        assert_eq!(f.proposer().pass().await, 0);
        f.view.remove(&f.key("dev-b"));
        assert_eq!(f.proposer().pass().await, 0);
        assert!(f.records().await.is_empty());
        assert_eq!(f.store.calls().create_if_absent, 0);
    }

    #[tokio::test]
    async fn a_stale_or_unready_target_proposes_nothing() {
        let f = helm();
        f.set("dev-a", HandView::deployed("1.0.0"));
        // Status written for an older generation.
        f.set("dev-b", seen("1.0.0", true, false));
        assert_eq!(f.proposer().pass().await, 0);
        // Ready=False.
        f.set("dev-b", seen("1.0.0", false, true));
        assert_eq!(f.proposer().pass().await, 0);
        assert!(f.records().await.is_empty());
        assert_eq!(f.store.calls().create_if_absent, 0);
    }

    #[tokio::test]
    async fn the_next_environment_at_or_past_the_revision_gets_nothing() {
        let f = helm();
        f.dev_at("1.0.0");
        f.set("staging", HandView::deployed("1.0.0"));
        // staging -> prod is proposed (staging runs 1.0.0 everywhere), dev -> staging not.
        f.set("prod", HandView::deployed("1.0.0"));
        assert_eq!(f.proposer().pass().await, 0);
        f.set("staging", HandView::deployed("1.1.0"));
        f.set("prod", HandView::deployed("1.1.0"));
        assert_eq!(f.proposer().pass().await, 0);
        assert!(f.records().await.is_empty());
        assert_eq!(f.store.calls().create_if_absent, 0);

        // An older revision there is no obstacle.
        f.set("staging", HandView::deployed("0.9.0"));
        f.set("prod", HandView::deployed("0.9.0"));
        assert_eq!(f.proposer().pass().await, 1);
        let records = f.records().await;
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].target_environment, "staging");
        assert_eq!(records[0].revision, "1.0.0");
    }

    #[tokio::test]
    async fn a_second_pass_neither_records_nor_asks_the_store_again() {
        let f = helm();
        f.dev_at("1.0.0");
        let proposer = f.proposer();
        assert_eq!(proposer.pass().await, 1);
        assert_eq!(proposer.pass().await, 0);
        assert_eq!(f.records().await.len(), 1);
        assert_eq!(f.store.calls().create_if_absent, 1);
        // A new process asks once and finds the record there.
        assert_eq!(f.proposer().pass().await, 0);
        assert_eq!(f.records().await.len(), 1);
        assert_eq!(f.store.calls().create_if_absent, 2);
    }

    #[tokio::test]
    async fn an_environment_not_watched_proposes_nothing() {
        let f = helm();
        f.set("dev-a", HandView::deployed("1.0.0"));
        f.set(
            "dev-b",
            TargetView::NotWatched("no GitopsCluster ns/leaf".into()),
        );
        assert_eq!(f.proposer().pass().await, 0);
        assert!(f.records().await.is_empty());
        assert_eq!(f.store.calls().create_if_absent, 0);
    }

    #[tokio::test]
    async fn a_next_environment_not_watched_does_not_block() {
        let f = helm();
        f.dev_at("1.0.0");
        f.set("staging", TargetView::NotWatched("embedded mode".into()));
        assert_eq!(f.proposer().pass().await, 1);
        assert_eq!(f.records().await[0].target_environment, "staging");
    }

    #[tokio::test]
    async fn a_git_revision_is_proposed_once() {
        let f = Fixture::new(AppKind::Kustomization);
        let revision = "main@sha1:0123456789abcdef0123456789abcdef01234567";
        f.dev_at(revision);
        let proposer = f.proposer();
        assert_eq!(proposer.pass().await, 1);
        assert_eq!(proposer.pass().await, 0);
        let records = f.records().await;
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].revision, revision);
        assert_eq!(
            records[0].trigger.object,
            "Kustomization/dev-a/app, Kustomization/dev-b/app"
        );
        assert_eq!(f.store.calls().create_if_absent, 1);
    }

    #[tokio::test]
    async fn a_rollback_is_not_proposed_where_a_newer_version_was_promoted() {
        let f = helm();
        // staging is not watched: only its records say what it ran.
        f.set("staging", TargetView::NotWatched("embedded mode".into()));
        f.dev_at("1.2.0");
        assert_eq!(f.proposer().pass().await, 1);
        // dev rolls back: no downgrade of staging is proposed, now or later.
        f.dev_at("1.1.0");
        let proposer = f.proposer();
        assert_eq!(proposer.pass().await, 0);
        assert_eq!(proposer.pass().await, 0);
        let records = f.records().await;
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].revision, "1.2.0");
        // A newer one still goes.
        f.dev_at("1.3.0");
        assert_eq!(proposer.pass().await, 1);
    }
}
