//! Direct Flux wiring (`serve --flux-wiring direct`): the leader applies, to every target
//! of every environment that has a next one, exactly the Provider and Alert that
//! `flux-config` writes for GitOps ([`pipeline_core::flux_wiring::pipeline_wiring`]), plus
//! the Secret the Provider signs with (key `token`, a copy of the pipeline's `hmac-key`).
//!
//! - Through the cluster registry: targets with a `clusterRef` in their leaf cluster,
//!   others in the controller's own cluster.
//! - Server-side apply with its own field manager ([`FIELD_MANAGER`]), forced; fields
//!   someone else added to a Provider's or Alert's `spec` or a Secret's `data` are
//!   removed. Every object carries the labels naming its pipeline and environment and
//!   [`WIRING_LABEL`]`=direct`.
//! - Re-applied at once when a Pipeline changes and on a bounded interval otherwise, so
//!   an object someone edited or deleted is put back within that interval.
//! - Objects labelled as ours that no pipeline wants any more (pipeline deleted,
//!   environment or target removed, environment now the last one) are deleted; those of a
//!   Pipeline that exists but is invalid, or whose key cannot be read now, are kept.
//!
//! The key is only ever held in [`SecretBytes`] and the Secret sent to the API server;
//! it is never logged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::{Api, Client, ResourceExt};
use pipeline_core::deployment::ClusterKey;
use pipeline_core::flux_wiring::{
    LABEL_PIPELINE, LABEL_PIPELINE_NAMESPACE, TOKEN_KEY, pipeline_wiring,
};
use pipeline_core::intake::HMAC_KEY;
use pipeline_core::{Pipeline, PipelineRef, PipelineSource, SecretBytes, SecretSource};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::clusters::ClusterRegistry;
use crate::public_url::{Exposure, PublicUrl, resolve};
use crate::sources::KubePipelineSource;

/// Field manager of the applied objects.
pub const FIELD_MANAGER: &str = "pipeline-controller-flux-wiring";
/// Label marking objects this mode applied (and may delete).
pub const WIRING_LABEL: &str = "pipelines.weave.works/flux-wiring";
pub const WIRING_DIRECT: &str = "direct";

/// How often Pipelines are checked for changes between full passes.
const CHANGE_POLL: Duration = Duration::from_secs(1);

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Objects applied (created, updated or put back).
    pub applied: usize,
    /// Objects left alone: as we last applied them, by their resourceVersion.
    pub unchanged: usize,
    /// Objects that had been changed or deleted since the last pass, and were put back.
    pub restored: Vec<String>,
    /// Objects deleted because no pipeline wants them any more.
    pub deleted: Vec<String>,
    /// What could not be done (cluster unreachable, apply refused, no key, ...).
    pub problems: Vec<String>,
    /// `None` when the pass did not run (Pipelines not loaded yet).
    pub public_url: Option<PublicUrl>,
}

/// An object's identity: kind, namespace, name.
type ObjectId = (String, String, String);

/// One of our objects as listed in a cluster.
struct Listed {
    id: ObjectId,
    resource_version: String,
    /// The pipeline its labels name.
    owner: PipelineRef,
}

#[derive(Default)]
struct State {
    /// Clusters applied to in this process (checked for leftovers even when no pipeline
    /// targets them any more).
    touched: BTreeSet<ClusterKey>,
    /// Digest of what we last applied of each object and its resourceVersion after
    /// that, to tell a repair from a change of our own.
    versions: HashMap<(ClusterKey, ObjectId), (String, String)>,
    /// The last public URL logged, and the last problems logged, to log changes only.
    logged_url: Option<String>,
    logged_problems: BTreeSet<String>,
    /// The public URL of the last pass.
    url: Option<PublicUrl>,
}

/// The leader's direct-wiring task.
pub struct DirectWiring {
    local: Client,
    clusters: Arc<ClusterRegistry>,
    pipelines: KubePipelineSource,
    secrets: Arc<dyn SecretSource>,
    exposure: Exposure,
    interval: Duration,
    state: Mutex<State>,
}

impl DirectWiring {
    /// `local` is the controller's own cluster (where its Service is); `interval` bounds
    /// how long a changed or deleted object stays so.
    pub fn new(
        local: Client,
        clusters: Arc<ClusterRegistry>,
        pipelines: KubePipelineSource,
        secrets: Arc<dyn SecretSource>,
        exposure: Exposure,
        interval: Duration,
    ) -> Self {
        Self {
            local,
            clusters,
            pipelines,
            secrets,
            exposure,
            interval: interval.max(Duration::from_secs(1)),
            state: Mutex::default(),
        }
    }

    /// Passes until `stop`: at once, whenever a Pipeline changes, and every interval.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        tracing::info!(interval = %humantime_secs(self.interval), "direct Flux wiring started");
        let mut last_seen = None;
        let mut next_full = tokio::time::Instant::now();
        loop {
            let seen = self.pipelines_fingerprint();
            if last_seen.as_ref() != Some(&seen) || tokio::time::Instant::now() >= next_full {
                let report = self.pass().await;
                if report.public_url.is_some() {
                    last_seen = Some(seen);
                    next_full = tokio::time::Instant::now() + self.interval;
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(CHANGE_POLL) => {}
            }
        }
    }

    /// Name and resourceVersion of every cached Pipeline.
    fn pipelines_fingerprint(&self) -> Vec<(String, String, String)> {
        let mut all: Vec<_> = self
            .pipelines
            .cache()
            .state()
            .iter()
            .map(|p| {
                (
                    p.namespace().unwrap_or_default(),
                    p.name_any(),
                    p.resource_version().unwrap_or_default(),
                )
            })
            .collect();
        all.sort();
        all
    }

    /// One pass: resolve the public URL, apply what every pipeline wants, delete what
    /// none wants. Logs what changed since the last pass.
    pub async fn pass(&self) -> PassReport {
        let mut report = PassReport::default();
        if !self.pipelines.ready().await {
            // Said once (until it changes): nothing is applied or deleted before every
            // Pipeline is known.
            report
                .problems
                .push("waiting: Pipelines are not loaded yet".to_string());
            self.log_problems(&report);
            return report;
        }
        let url = resolve(&self.local, &self.exposure).await;
        self.log_url(&url);
        report.public_url = Some(url.clone());
        let PublicUrl::Found { url, .. } = url else {
            // Without an address no Provider can be written; existing ones are left as
            // they are (they may be right; deleting them would stop every event).
            return report;
        };
        let pipelines = match self.pipelines.list().await {
            Ok(pipelines) => pipelines,
            Err(err) => {
                report
                    .problems
                    .push(format!("cannot list Pipelines: {err}"));
                self.log_problems(&report);
                return report;
            }
        };
        let valid: BTreeSet<PipelineRef> = pipelines.iter().map(|p| p.reference.clone()).collect();
        // Pipelines whose objects are kept whatever this pass computes: invalid ones
        // (their Pipeline object still exists) and those whose key is unreadable now.
        let mut keep: BTreeSet<PipelineRef> = self
            .pipelines
            .cache()
            .state()
            .iter()
            .map(|p| crate::sources::reference_of(p))
            .filter(|r| !valid.contains(r))
            .collect();
        let mut desired: BTreeMap<ClusterKey, Vec<Value>> = BTreeMap::new();
        for pipeline in &pipelines {
            let targets = pipeline_wiring(pipeline, &url);
            if targets.is_empty() {
                continue;
            }
            let key = match self.hmac_key(pipeline).await {
                Ok(key) => key,
                Err(why) => {
                    report.problems.push(why);
                    keep.insert(pipeline.reference.clone());
                    continue;
                }
            };
            for target in targets {
                let mut objects = target.objects.clone();
                let labels = objects
                    .first()
                    .map(|o| o["metadata"]["labels"].clone())
                    .unwrap_or_default();
                objects.push(secret(&target.secret_name, &target.namespace, labels, &key));
                for object in &mut objects {
                    object["metadata"]["labels"][WIRING_LABEL] = json!(WIRING_DIRECT);
                }
                desired
                    .entry(target.cluster.clone())
                    .or_default()
                    .extend(objects);
            }
        }
        let mut check: BTreeSet<ClusterKey> = desired.keys().cloned().collect();
        check.insert(ClusterKey::Local);
        check.extend(self.lock().touched.iter().cloned());
        for cluster in check {
            let client = match self.clusters.client(&cluster).await {
                Ok(client) => client.client,
                Err(why) => {
                    report
                        .problems
                        .push(format!("cannot reach cluster {cluster}: {why}"));
                    continue;
                }
            };
            let objects = desired.remove(&cluster).unwrap_or_default();
            let wanted: BTreeSet<ObjectId> = objects.iter().map(identity).collect();
            // What is there now (metadata only), so objects unchanged since our last
            // apply cost no request, and leftovers are found.
            let listed = self.list_ours(&client, &cluster, &mut report).await;
            let live: HashMap<&ObjectId, &str> = listed
                .iter()
                .flatten()
                .map(|l| (&l.id, l.resource_version.as_str()))
                .collect();
            for object in &objects {
                let id = identity(object);
                let key = (cluster.clone(), id.clone());
                // What we apply, so a change of ours (pipeline edited, public URL moved)
                // is not taken for someone else's.
                let wanted_digest = hex::encode(Sha256::digest(object.to_string().as_bytes()));
                let unchanged = live.get(&id).is_some_and(|live| {
                    self.lock()
                        .versions
                        .get(&key)
                        .is_some_and(|(digest, version)| {
                            *digest == wanted_digest && version == live
                        })
                });
                if unchanged {
                    report.unchanged += 1;
                    continue;
                }
                match apply(&client, object).await {
                    Ok(version) => {
                        report.applied += 1;
                        let previous = self
                            .lock()
                            .versions
                            .insert(key, (wanted_digest.clone(), version.clone()));
                        if previous
                            .is_some_and(|(digest, v)| digest == wanted_digest && v != version)
                        {
                            report.restored.push(describe(&cluster, &id));
                        }
                    }
                    Err(why) => report
                        .problems
                        .push(format!("cannot apply {}: {why}", describe(&cluster, &id))),
                }
            }
            if !objects.is_empty() {
                self.lock().touched.insert(cluster.clone());
            }
            if let Some(listed) = listed {
                self.remove_unwanted(&client, &cluster, listed, &wanted, &keep, &mut report)
                    .await;
            }
        }
        for restored in &report.restored {
            tracing::info!(object = %restored, "put back a Flux wiring object someone changed or deleted");
        }
        for deleted in &report.deleted {
            tracing::info!(object = %deleted, "deleted a Flux wiring object no pipeline wants any more");
        }
        self.log_problems(&report);
        tracing::debug!(
            applied = report.applied,
            unchanged = report.unchanged,
            "direct Flux wiring pass done"
        );
        report
    }

    /// Our objects in `cluster` (those labelled [`WIRING_LABEL`]), Alerts first; `None`
    /// when one kind cannot be listed (then nothing is skipped or deleted there).
    async fn list_ours(
        &self,
        client: &Client,
        cluster: &ClusterKey,
        report: &mut PassReport,
    ) -> Option<Vec<Listed>> {
        let ours = ListParams::default().labels(&format!("{WIRING_LABEL}={WIRING_DIRECT}"));
        let mut all = Vec::new();
        // Alerts first: an Alert without its Provider only logs errors.
        for kind in ["Alert", "Provider", "Secret"] {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource_of(kind));
            let found = match api.list_metadata(&ours).await {
                Ok(list) => list.items,
                Err(err) => {
                    report.problems.push(format!(
                        "cannot list {kind}s in cluster {cluster}: {}",
                        crate::store::describe(&err)
                    ));
                    return None;
                }
            };
            for object in found {
                let labels = object.labels();
                let owner = PipelineRef::new(
                    labels
                        .get(LABEL_PIPELINE_NAMESPACE)
                        .cloned()
                        .unwrap_or_default(),
                    labels.get(LABEL_PIPELINE).cloned().unwrap_or_default(),
                );
                all.push(Listed {
                    id: (
                        kind.to_string(),
                        object.namespace().unwrap_or_default(),
                        object.name_any(),
                    ),
                    resource_version: object.resource_version().unwrap_or_default(),
                    owner,
                });
            }
        }
        Some(all)
    }

    /// Deletes the `listed` objects of `cluster` that are not `wanted`, except those of
    /// `keep`.
    async fn remove_unwanted(
        &self,
        client: &Client,
        cluster: &ClusterKey,
        listed: Vec<Listed>,
        wanted: &BTreeSet<ObjectId>,
        keep: &BTreeSet<PipelineRef>,
        report: &mut PassReport,
    ) {
        for Listed { id, owner, .. } in listed {
            if wanted.contains(&id) || keep.contains(&owner) {
                continue;
            }
            let (kind, namespace, name) = &id;
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), namespace, &resource_of(kind));
            match api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {
                    self.lock().versions.remove(&(cluster.clone(), id.clone()));
                    report.deleted.push(describe(cluster, &id));
                }
                Err(kube::Error::Api(status)) if status.is_not_found() => {}
                Err(err) => report.problems.push(format!(
                    "cannot delete {}: {}",
                    describe(cluster, &id),
                    crate::store::describe(&err)
                )),
            }
        }
    }

    /// The pipeline's webhook key, trimmed as Flux trims a Provider's token.
    async fn hmac_key(&self, pipeline: &Pipeline) -> Result<SecretBytes, String> {
        let reference = &pipeline.reference;
        let Some(name) = pipeline.hmac_secret_name() else {
            return Err(format!(
                "pipeline {reference} has no spec.promotion.strategy.secretRef: no key to give its Providers"
            ));
        };
        match self
            .secrets
            .secret_value(&reference.namespace, name, HMAC_KEY)
            .await
        {
            Ok(Some(key)) if !key.expose().trim_ascii().is_empty() => Ok(key.trimmed()),
            Ok(_) => Err(format!(
                "secret {}/{name} of pipeline {reference} has no {HMAC_KEY:?} key",
                reference.namespace
            )),
            Err(err) => Err(format!("the key of pipeline {reference}: {err}")),
        }
    }

    /// What does not work now, for `/readyz`'s detail (on the leader, which runs the
    /// passes): no public URL, or problems of the last pass.
    pub fn degradations(&self) -> Vec<String> {
        let state = self.lock();
        let mut out = Vec::new();
        if let Some(PublicUrl::NotFound { .. }) = &state.url {
            out.push(format!(
                "direct Flux wiring writes no Providers: no public URL, {}",
                state.logged_url.clone().unwrap_or_default()
            ));
        }
        if !state.logged_problems.is_empty() {
            out.push(format!(
                "direct Flux wiring: {} problem(s) in its last pass, e.g. {}",
                state.logged_problems.len(),
                state
                    .logged_problems
                    .iter()
                    .next()
                    .cloned()
                    .unwrap_or_default()
            ));
        }
        out
    }

    fn log_url(&self, url: &PublicUrl) {
        let text = url.to_string();
        let mut state = self.lock();
        state.url = Some(url.clone());
        if state.logged_url.as_deref() == Some(text.as_str()) {
            return;
        }
        state.logged_url = Some(text);
        match url {
            PublicUrl::Found { url, source } => {
                tracing::info!(public_url = %url, from = %source, "public URL of the webhook for Flux Providers");
            }
            PublicUrl::NotFound { .. } => {
                tracing::warn!(public_url = %url, "direct Flux wiring cannot write Providers: no public URL");
            }
        }
    }

    /// Logs problems that are new since the last pass, and when they are gone.
    fn log_problems(&self, report: &PassReport) {
        let now: BTreeSet<String> = report.problems.iter().cloned().collect();
        let mut state = self.lock();
        for problem in now.difference(&state.logged_problems) {
            tracing::warn!(problem = %problem, "direct Flux wiring");
        }
        if now.is_empty() && !state.logged_problems.is_empty() {
            tracing::info!("direct Flux wiring: earlier problems are gone");
        }
        state.logged_problems = now;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn humantime_secs(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// The Secret a Provider signs with: the key under `token`.
fn secret(name: &str, namespace: &str, labels: Value, key: &SecretBytes) -> Value {
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_string(),
            ByteString(key.expose().to_vec()),
        )])),
        ..Default::default()
    };
    let mut value = serde_json::to_value(&secret).unwrap_or_default();
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("Secret");
    value["metadata"]["labels"] = labels;
    value
}

fn identity(object: &Value) -> ObjectId {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        text(&object["kind"]),
        text(&object["metadata"]["namespace"]),
        text(&object["metadata"]["name"]),
    )
}

fn describe(cluster: &ClusterKey, (kind, namespace, name): &ObjectId) -> String {
    format!("{kind} {namespace}/{name} in cluster {cluster}")
}

fn resource_of(kind: &str) -> ApiResource {
    match kind {
        "Secret" => {
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Secret"), "secrets")
        }
        other => {
            let (group, version) = pipeline_core::flux_wiring::NOTIFICATION_API
                .split_once('/')
                .unwrap_or(("notification.toolkit.fluxcd.io", "v1beta3"));
            let plural = format!("{}s", other.to_ascii_lowercase());
            ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, other),
                &plural,
            )
        }
    }
}

/// Server-side applies `object` (forced), then removes fields of its `spec` (`data` for
/// a Secret) that someone else added. Returns the resulting resourceVersion.
async fn apply(client: &Client, object: &Value) -> Result<String, String> {
    let (kind, namespace, name) = identity(object);
    let resource = resource_of(&kind);
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
    let live = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(|err| crate::store::describe(&err))?;
    let field = if kind == "Secret" { "data" } else { "spec" };
    let extras: Vec<String> = match (live.data.get(field), object.get(field)) {
        (Some(Value::Object(live)), Some(Value::Object(wanted))) => live
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect(),
        _ => Vec::new(),
    };
    // Only the defaulted eventSeverity could come back, and we always set it.
    if extras.is_empty() {
        return Ok(live.resource_version().unwrap_or_default());
    }
    let nulls: serde_json::Map<String, Value> =
        extras.into_iter().map(|k| (k, Value::Null)).collect();
    let patched = api
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ field: nulls })),
        )
        .await
        .map_err(|err| crate::store::describe(&err))?;
    Ok(patched.resource_version().unwrap_or_default())
}
