//! Watches the app objects (Flux HelmReleases, Kustomizations) of every pipeline target,
//! in every cluster, and keeps what promotions need of each: Ready, up to date, revision.
//!
//! One watch per (cluster, kind), cluster-wide: the number of watches on a leaf cluster
//! does not grow with the number of pipelines, only with the kinds their `appRef`s name
//! (two at most). The cost is that a watch lists every object of its kind in the cluster,
//! which is what Flux's own controllers do anyway. Only a small summary per object is
//! kept, not the objects.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, ResourceExt};
use pipeline_core::PipelineSource;
use pipeline_core::deployment::{
    AppKind, AppState, ClusterKey, DeploymentView, TargetKey, TargetView, target_keys,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clusters::ClusterRegistry;

/// How often the set of watched clusters is brought in line with the pipelines.
const RESYNC: Duration = Duration::from_secs(5);
/// How often a cluster's kubeconfig is checked for rotation.
const KUBECONFIG_CHECK: Duration = Duration::from_secs(10);
/// Longest wait before trying an unreachable cluster again, so one that comes back is
/// seen within this time.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

type Objects = HashMap<(String, String), AppState>;

#[derive(Default)]
struct KindWatch {
    /// The cluster serves no version of the kind (no Flux there): nothing to watch, so
    /// its targets count as not watched rather than unreachable.
    unserved: bool,
    /// Listed at least once since the last failure.
    synced: bool,
    error: Option<String>,
    objects: Objects,
}

#[derive(Default)]
struct ClusterWatch {
    /// Why no client could be made for the cluster (its GitopsCluster or kubeconfig
    /// Secret is missing or unusable), while none can: its targets are not watched.
    unconfigured: Option<String>,
    kinds: HashMap<AppKind, KindWatch>,
}

/// The watches and what they saw; the [`DeploymentView`] of the health gate and of the
/// proposer.
pub struct DeploymentWatcher {
    registry: Arc<ClusterRegistry>,
    pipelines: Arc<dyn PipelineSource>,
    state: RwLock<HashMap<ClusterKey, ClusterWatch>>,
    /// Bumped on every change a watch delivers that matters to promotions.
    changes: tokio::sync::watch::Sender<u64>,
    /// Woken on the same changes (the executor's wake, so held promotions are rechecked).
    wake: Arc<Notify>,
}

impl DeploymentWatcher {
    pub fn new(
        registry: Arc<ClusterRegistry>,
        pipelines: Arc<dyn PipelineSource>,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            registry,
            pipelines,
            state: RwLock::default(),
            changes: tokio::sync::watch::Sender::new(0),
            wake,
        }
    }

    /// Changes to what the watches see, for whoever acts on them.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
        self.wake.notify_one();
    }

    /// The clusters being watched now, and the kinds watched in each.
    pub fn watched(&self) -> Vec<(ClusterKey, Vec<AppKind>)> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<_> = state
            .iter()
            .map(|(cluster, watch)| {
                let mut kinds: Vec<AppKind> = watch.kinds.keys().copied().collect();
                kinds.sort();
                (cluster.clone(), kinds)
            })
            .collect();
        out.sort();
        out
    }

    /// Keeps one watch per (cluster, kind) that some pipeline target needs, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut running: HashMap<ClusterKey, (BTreeSet<AppKind>, CancellationToken)> =
            HashMap::new();
        loop {
            match self.pipelines.list().await {
                Ok(pipelines) => {
                    let mut wanted: HashMap<ClusterKey, BTreeSet<AppKind>> = HashMap::new();
                    for pipeline in &pipelines {
                        for index in 0..pipeline.spec.environments.len() {
                            for key in target_keys(pipeline, index) {
                                if self.registry.can_reach(&key.cluster) {
                                    wanted.entry(key.cluster).or_default().insert(key.kind);
                                }
                            }
                        }
                    }
                    running.retain(|cluster, (kinds, token)| {
                        let keep = wanted.get(cluster) == Some(kinds);
                        if !keep {
                            token.cancel();
                            self.state
                                .write()
                                .unwrap_or_else(PoisonError::into_inner)
                                .remove(cluster);
                            tracing::info!(%cluster, "no longer watching a cluster's app objects (pipelines changed)");
                        }
                        keep
                    });
                    for (cluster, kinds) in wanted {
                        if running.contains_key(&cluster) {
                            continue;
                        }
                        let token = stop.child_token();
                        tracing::info!(%cluster, kinds = ?kinds, "watching a cluster's app objects");
                        tokio::spawn(Arc::clone(&self).watch_cluster(
                            cluster.clone(),
                            kinds.clone(),
                            token.clone(),
                        ));
                        running.insert(cluster, (kinds, token));
                    }
                    self.registry
                        .retain(&|cluster| running.contains_key(cluster));
                }
                Err(err) => tracing::debug!(error = %err, "pipelines not available yet"),
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(RESYNC) => {}
            }
        }
        for (_, (_, token)) in running {
            token.cancel();
        }
        self.state
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn set_unconfigured(&self, cluster: &ClusterKey, why: Option<String>) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let watch = state.entry(cluster.clone()).or_default();
        if watch.unconfigured != why {
            watch.unconfigured = why;
            drop(state);
            self.changed();
        }
    }

    /// Watches `kinds` in `cluster` until `stop`, reconnecting with backoff, and with a
    /// new client when the kubeconfig changes.
    async fn watch_cluster(
        self: Arc<Self>,
        cluster: ClusterKey,
        kinds: BTreeSet<AppKind>,
        stop: CancellationToken,
    ) {
        let mut backoff = Duration::from_secs(1);
        let mut said: Option<String> = None;
        while !stop.is_cancelled() {
            let connected = match self.registry.client(&cluster).await {
                Ok(connected) => connected,
                Err(why) => {
                    // Said once per distinct reason, not per retry.
                    if said.as_ref() != Some(&why) {
                        tracing::warn!(%cluster, error = %why, "no client for a cluster; its targets are not watched until there is one");
                        said = Some(why.clone());
                    }
                    self.set_unconfigured(&cluster, Some(why));
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            backoff = Duration::from_secs(1);
            said = None;
            self.set_unconfigured(&cluster, None);
            let session = stop.child_token();
            let watches: Vec<_> = kinds
                .iter()
                .map(|kind| {
                    tokio::spawn(Arc::clone(&self).watch_kind(
                        cluster.clone(),
                        *kind,
                        connected.client.clone(),
                        session.clone(),
                    ))
                })
                .collect();
            // Until stopped, or until the kubeconfig (credentials, address) changes.
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(KUBECONFIG_CHECK) => {
                        match self.registry.fingerprint(&cluster).await {
                            Ok(now) if now == connected.fingerprint => continue,
                            Ok(_) => tracing::info!(%cluster, "kubeconfig changed; reconnecting"),
                            Err(why) => {
                                tracing::warn!(%cluster, error = %why, "kubeconfig no longer available");
                                self.set_unconfigured(&cluster, Some(why));
                            }
                        }
                        break;
                    }
                }
            }
            session.cancel();
            for watch in watches {
                let _ = watch.await;
            }
        }
    }

    /// One cluster-wide watch of `kind`, feeding the summaries, until `stop`.
    async fn watch_kind(
        self: Arc<Self>,
        cluster: ClusterKey,
        kind: AppKind,
        client: Client,
        stop: CancellationToken,
    ) {
        let mut backoff = Duration::from_secs(1);
        let resource = loop {
            match served_resource(&client, kind).await {
                Ok(Some(resource)) => break resource,
                Ok(None) => {
                    self.update(&cluster, kind, |watch| {
                        let changed = !watch.unserved;
                        watch.unserved = true;
                        watch.synced = false;
                        changed
                    });
                    tracing::info!(%cluster, %kind, "the cluster serves no version of this kind; its targets are not watched until it does");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(MAX_BACKOFF) => {}
                    }
                }
                Err(why) => {
                    self.kind_failed(&cluster, kind, why.clone());
                    tracing::debug!(%cluster, %kind, error = %why, "cannot find a served version");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        let api: Api<DynamicObject> = Api::all_with(client, &resource);
        // Backoff is ours, not kube-runtime's: that one only resets after an event and
        // adds up to 100% jitter, so a leaf that came back could wait a grown delay twice
        // (reconnect, then the 410 a restarted server gives the old resourceVersion).
        let stream = watcher(api, watcher::Config::default());
        futures::pin_mut!(stream);
        let mut listing: Objects = HashMap::new();
        let mut backoff = Duration::from_millis(500);
        loop {
            let item = tokio::select! {
                () = stop.cancelled() => return,
                item = stream.next() => item,
            };
            let Some(item) = item else { return };
            if item.is_ok() {
                backoff = Duration::from_millis(500);
            }
            match item {
                Ok(Event::Init) => listing.clear(),
                Ok(Event::InitApply(object)) => {
                    listing.insert(object_key(&object), kind.state_of(&json(&object)));
                }
                Ok(Event::InitDone) => {
                    let objects = std::mem::take(&mut listing);
                    self.update(&cluster, kind, |watch| {
                        let changed = !watch.synced || watch.unserved || watch.objects != objects;
                        watch.unserved = false;
                        watch.synced = true;
                        watch.error = None;
                        watch.objects = objects;
                        changed
                    });
                }
                Ok(Event::Apply(object)) => {
                    let state = kind.state_of(&json(&object));
                    let key = object_key(&object);
                    self.update(&cluster, kind, |watch| {
                        watch.objects.insert(key, state.clone()) != Some(state)
                    });
                }
                Ok(Event::Delete(object)) => {
                    let key = object_key(&object);
                    self.update(&cluster, kind, |watch| watch.objects.remove(&key).is_some());
                }
                // The server no longer has our position (e.g. it restarted): the watcher
                // lists again on the next poll, which is now.
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    tracing::debug!(%cluster, %kind, "watch position expired; listing again");
                }
                Err(err) => {
                    let why = err.to_string();
                    tracing::debug!(%cluster, %kind, error = %why, retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), "watch failed; retrying with backoff");
                    self.kind_failed(&cluster, kind, why);
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn kind_failed(&self, cluster: &ClusterKey, kind: AppKind, why: String) {
        self.update(cluster, kind, |watch| {
            let changed = watch.synced;
            watch.synced = false;
            watch.error = Some(why);
            changed
        });
    }

    /// Applies `change` to the watch of (`cluster`, `kind`); announces it when it says
    /// something changed.
    fn update(
        &self,
        cluster: &ClusterKey,
        kind: AppKind,
        change: impl FnOnce(&mut KindWatch) -> bool,
    ) {
        let changed = {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            change(
                state
                    .entry(cluster.clone())
                    .or_default()
                    .kinds
                    .entry(kind)
                    .or_default(),
            )
        };
        if changed {
            self.changed();
        }
    }
}

impl DeploymentView for DeploymentWatcher {
    fn target(&self, key: &TargetKey) -> TargetView {
        if !self.registry.can_reach(&key.cluster) {
            return TargetView::NotWatched(
                "targets without clusterRef are not watched in embedded mode".to_string(),
            );
        }
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let Some(cluster) = state.get(&key.cluster) else {
            return TargetView::Connecting;
        };
        if let Some(why) = &cluster.unconfigured {
            return TargetView::NotWatched(why.clone());
        }
        let Some(watch) = cluster.kinds.get(&key.kind) else {
            return TargetView::Connecting;
        };
        if watch.unserved {
            return TargetView::NotWatched(format!(
                "the cluster serves no {} (is Flux installed?)",
                key.kind
            ));
        }
        if !watch.synced {
            return match &watch.error {
                Some(why) => TargetView::Unreachable(why.clone()),
                None => TargetView::Connecting,
            };
        }
        match watch
            .objects
            .get(&(key.namespace.clone(), key.name.clone()))
        {
            Some(state) => TargetView::Seen(state.clone()),
            None => TargetView::Missing,
        }
    }
}

fn object_key(object: &DynamicObject) -> (String, String) {
    (object.namespace().unwrap_or_default(), object.name_any())
}

fn json(object: &DynamicObject) -> serde_json::Value {
    serde_json::to_value(object).unwrap_or_default()
}

/// The first version of `kind` the cluster serves, preferring current Flux's; `None`
/// when it serves none (Flux is not installed there).
async fn served_resource(client: &Client, kind: AppKind) -> Result<Option<ApiResource>, String> {
    for version in kind.versions() {
        let gvk = GroupVersionKind::gvk(kind.group(), version, kind.as_str());
        let resource = ApiResource::from_gvk_with_plural(&gvk, kind.plural());
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => return Ok(Some(resource)),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(crate::store::describe(&err)),
        }
    }
    Ok(None)
}
