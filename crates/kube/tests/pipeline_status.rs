//! The reconciler's Pipeline status against a real kube-apiserver (pipeline-testenv):
//! kstatus conditions that name a missing Secret or key and recover once it exists, an
//! invalid spec reported as Stalled, and `waitingApproval` per environment.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use pipeline_crds::Pipeline;
use pipeline_kube::sources::KubeSecretSource;
use pipeline_kube::{KubePipelineSource, KubePromotionStore, Reconciler};
use pipeline_testenv::TestCluster;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const NS: &str = "flux-system";

fn pipeline() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "pipelines.weave.works/v1alpha1",
        "kind": "Pipeline",
        "metadata": {"name": "podinfo", "namespace": NS},
        "spec": {
            "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "podinfo"},
            "environments": [
                {"name": "dev", "targets": [{"namespace": "podinfo-dev"}]},
                {"name": "staging", "targets": [{"namespace": "podinfo-staging"}],
                 "promotion": {"manual": true, "strategy": {"secretRef": {"name": "approvals"}, "notification": {}}}},
                {"name": "prod", "targets": [{"namespace": "podinfo-prod"}],
                 "promotion": {"strategy": {"pull-request": {
                     "type": "gitea", "url": "https://git.example/o/r", "baseBranch": "main", "secretRef": {"name": "pr"}}}}}
            ],
            "promotion": {"strategy": {"secretRef": {"name": "hmac"}, "notification": {}}}
        }
    })
}

fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(NS.to_owned()),
            ..Default::default()
        },
        string_data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..Default::default()
    }
}

fn condition<'a>(pipeline: &'a Pipeline, type_: &str) -> Option<&'a Condition> {
    pipeline
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

/// Waits until the Pipeline satisfies `check`; panics with its status after 30 s.
async fn wait_for<F>(api: &Api<Pipeline>, what: &str, check: F) -> Pipeline
where
    F: Fn(&Pipeline) -> bool,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let current = api.get("podinfo").await.unwrap();
        if check(&current) {
            return current;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: status is {:#?}",
            current.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ready_is(pipeline: &Pipeline, status: &str, reason: &str) -> bool {
    condition(pipeline, "Ready").is_some_and(|c| {
        c.status == status
            && c.reason == reason
            && c.observed_generation == pipeline.metadata.generation
    })
}

async fn apply_pipeline(api: &Api<Pipeline>, pipeline: &serde_json::Value) {
    api.patch(
        "podinfo",
        &PatchParams::apply("test").force(),
        &Patch::Apply(pipeline),
    )
    .await
    .unwrap();
}

async fn with_reconciler<F: Future<Output = ()>>(cluster: &TestCluster, test: F) {
    let client = cluster.client();
    let stop = CancellationToken::new();
    let wake = Arc::new(Notify::new());
    let promotions = pipeline_kube::PromotionCache::start(client.clone(), wake.clone());
    let reconciler = Reconciler::new(
        client.clone(),
        KubePromotionStore::new(client.clone()).with_cache(promotions.clone()),
        KubePipelineSource::start(client.clone()),
        promotions,
        wake,
    )
    .with_secrets(KubeSecretSource::new(client.clone()));
    let running = tokio::spawn(reconciler.run(stop.clone()));
    test.await;
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test]
async fn ready_names_missing_secrets_and_keys_then_recovers() {
    let cluster = TestCluster::start().await.unwrap();
    cluster.install_crds().await.unwrap();
    cluster.ensure_namespace(NS).await.unwrap();
    let client = cluster.client();
    let pipelines: Api<Pipeline> = Api::namespaced(client.clone(), NS);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    apply_pipeline(&pipelines, &pipeline()).await;

    with_reconciler(&cluster, async {
        // No Secret at all: Ready=False naming each one and the field naming it;
        // Reconciling (the controller checks again), not Stalled (no edit needed).
        let p = wait_for(&pipelines, "SecretNotFound", |p| {
            ready_is(p, "False", "SecretNotFound")
        })
        .await;
        let message = &condition(&p, "Ready").unwrap().message;
        for expected in [
            "Secret flux-system/hmac not found (spec.promotion.strategy.secretRef)",
            "Secret flux-system/approvals not found (spec.environments[1].promotion.strategy.secretRef)",
            "Secret flux-system/pr not found (spec.environments[2].promotion.strategy.pull-request.secretRef)",
        ] {
            assert!(message.contains(expected), "{message}");
        }
        let reconciling = condition(&p, "Reconciling").unwrap();
        assert_eq!(reconciling.status, "True");
        assert_eq!(reconciling.reason, "SecretNotFound");
        assert!(condition(&p, "Stalled").is_none());
        let status = p.status.as_ref().unwrap();
        assert_eq!(status.observed_generation, p.metadata.generation);
        // The Environments column's source.
        assert_eq!(status.environment_names, "dev,staging,prod");
        // The Go original's per-environment status is kept as it was.
        for env in ["dev", "staging", "prod"] {
            assert_eq!(status.environments[env].waiting_approval.revision, "");
        }

        // The Secrets exist, but without the keys the controller reads.
        for (name, data) in [
            ("hmac", &[("hmac", "wrong key name")][..]),
            ("approvals", &[][..]),
            ("pr", &[("username", "bot"), ("password", "pw")][..]),
        ] {
            secrets
                .create(&PostParams::default(), &secret(name, data))
                .await
                .unwrap();
        }
        let p = wait_for(&pipelines, "SecretKeyNotFound", |p| {
            ready_is(p, "False", "SecretKeyNotFound")
        })
        .await;
        let message = &condition(&p, "Ready").unwrap().message;
        assert!(
            message.contains("Secret flux-system/hmac has no \"hmac-key\" key"),
            "{message}"
        );
        assert!(
            message.contains("Secret flux-system/pr has no \"token\" key"),
            "{message}"
        );
        assert!(!message.contains("approvals"), "{message}");

        // An SSH repository needs the SSH keys as well.
        let mut ssh = pipeline();
        ssh["spec"]["environments"][2]["promotion"]["strategy"]["pull-request"]["url"] =
            "git@git.example:o/r.git".into();
        apply_pipeline(&pipelines, &ssh).await;
        let p = wait_for(&pipelines, "SSH keys", |p| {
            ready_is(p, "False", "SecretKeyNotFound")
                && condition(p, "Ready").unwrap().message.contains("known_hosts")
        })
        .await;
        assert!(
            condition(&p, "Ready").unwrap().message.contains("\"identity\""),
            "{:?}",
            condition(&p, "Ready")
        );
        apply_pipeline(&pipelines, &pipeline()).await;

        // Fixed: Ready=True again, Reconciling gone.
        for (name, key, value) in [("hmac", "hmac-key", "k"), ("pr", "token", "t")] {
            secrets
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"stringData": {key: value}})),
                )
                .await
                .unwrap();
        }
        let p = wait_for(&pipelines, "Ready=True", |p| ready_is(p, "True", "Ready")).await;
        assert!(condition(&p, "Reconciling").is_none(), "{:?}", p.status);
        assert!(condition(&p, "Stalled").is_none(), "{:?}", p.status);

        // An invalid spec (the schema cannot see duplicate names): Stalled, with the
        // problem, at the new generation.
        let mut invalid = pipeline();
        invalid["spec"]["environments"][1]["name"] = "dev".into();
        apply_pipeline(&pipelines, &invalid).await;
        let p = wait_for(&pipelines, "InvalidSpec", |p| {
            ready_is(p, "False", "InvalidSpec")
        })
        .await;
        let stalled = condition(&p, "Stalled").unwrap();
        assert_eq!(stalled.status, "True");
        assert!(
            stalled
                .message
                .contains("spec.environments[1].name: duplicate environment name \"dev\""),
            "{}",
            stalled.message
        );
        assert!(condition(&p, "Reconciling").is_none());

        // Fixed again.
        apply_pipeline(&pipelines, &pipeline()).await;
        let p = wait_for(&pipelines, "Ready=True after the fix", |p| {
            ready_is(p, "True", "Ready")
        })
        .await;
        assert!(condition(&p, "Stalled").is_none(), "{:?}", p.status);
        assert_eq!(
            p.status.as_ref().unwrap().observed_generation,
            p.metadata.generation
        );
    })
    .await;
}
