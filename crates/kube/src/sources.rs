//! Pipelines and Secrets from watch-backed caches (reflectors), not a GET per request.
//!
//! Pipelines: one cluster-wide reflector. A Pipeline whose spec does not validate is
//! treated as absent by the webhook (the reconciler reports the messages in its `Ready`
//! condition).
//!
//! Secrets, least privilege: no cluster-wide Secret watch. A reflector is started for a
//! namespace the first time a pipeline of that namespace needs a Secret, and dropped when
//! the namespace holds no Pipeline any more ([`KubeSecretSource::prune`]). So only Secrets
//! of namespaces that hold Pipelines are ever cached. A Secret missing from a cache that
//! is ready is looked up once with a GET, so one created a moment ago is not refused.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::watch::{AbortOnDrop, spawn_reflector};
use async_trait::async_trait;
use futures::FutureExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use pipeline_core::pipeline::{FieldError, parse_pipeline_spec};
use pipeline_core::{
    Pipeline, PipelineRef, PipelineSource, SecretBytes, SecretLookupError, SecretSource,
    Unavailable,
};
use pipeline_crds::Pipeline as PipelineObject;
use tokio::sync::Notify;

/// Longest wait for a cache's initial listing before a lookup reports unavailability.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

async fn ready<K>(store: &Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    tokio::time::timeout(READY_TIMEOUT, store.wait_until_ready())
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Whether a cache has listed once, without waiting.
fn ready_now<K>(store: &Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store
        .wait_until_ready()
        .now_or_never()
        .is_some_and(|r| r.is_ok())
}

/// A validated model (`None`: the object is invalid) and the object version it is of.
type Models = HashMap<PipelineRef, (String, Option<Arc<Pipeline>>)>;

/// Pipelines from a cluster-wide watch.
#[derive(Clone)]
pub struct KubePipelineSource {
    store: Store<PipelineObject>,
    changed: Arc<Notify>,
    /// Validated models, reused while their object's resourceVersion stays: every event
    /// looks its pipeline up, and validating the spec each time cost more than the rest
    /// of a rejection.
    models: Arc<Mutex<Models>>,
    _task: Arc<AbortOnDrop>,
}

impl KubePipelineSource {
    pub fn start(client: Client) -> Self {
        let changed = Arc::new(Notify::new());
        let (store, task) = spawn_reflector(
            Api::<PipelineObject>::all(client),
            (),
            "pipelines",
            changed.clone(),
        );
        Self {
            store,
            changed,
            models: Arc::default(),
            _task: Arc::new(task),
        }
    }

    /// The validated model of `object`, from [`Self::models`] when its version was seen.
    fn model(&self, object: &PipelineObject) -> Option<Arc<Pipeline>> {
        let reference = reference_of(object);
        let version = object.resource_version();
        if let Some(version) = &version
            && let Ok(models) = self.models.lock()
            && let Some((seen, model)) = models.get(&reference)
            && seen == version
        {
            return model.clone();
        }
        let model = match validate(object) {
            Ok(pipeline) => Some(Arc::new(pipeline)),
            Err(errors) => {
                tracing::debug!(pipeline = %reference, errors = errors.len(), "invalid pipeline treated as absent");
                None
            }
        };
        if let Some(version) = version
            && let Ok(mut models) = self.models.lock()
        {
            models.insert(reference, (version, model.clone()));
        }
        model
    }

    /// The cache, for the reconciler.
    pub fn cache(&self) -> &Store<PipelineObject> {
        &self.store
    }

    /// Notified after every change to a cached Pipeline (for the one reconciler; a
    /// second waiter would take turns with it).
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    pub async fn ready(&self) -> bool {
        ready(&self.store).await
    }

    /// The UID of a cached Pipeline (for Events).
    pub fn uid(&self, reference: &PipelineRef) -> Option<String> {
        self.object(reference).and_then(|p| p.uid())
    }

    pub fn object(&self, reference: &PipelineRef) -> Option<Arc<PipelineObject>> {
        self.store
            .get(&ObjectRef::new(&reference.name).within(&reference.namespace))
    }

    /// Namespaces holding at least one Pipeline.
    pub fn namespaces(&self) -> BTreeSet<String> {
        self.store
            .state()
            .iter()
            .filter_map(|p| p.namespace())
            .collect()
    }

    /// Namespaces whose Secrets the controller reads: those holding Pipelines, and those
    /// holding the kubeconfig Secrets of the clusters valid Pipelines target.
    pub fn secret_namespaces(&self) -> BTreeSet<String> {
        let mut namespaces = self.namespaces();
        let valid: Vec<Arc<Pipeline>> = self
            .store
            .state()
            .iter()
            .filter_map(|object| self.model(object))
            .collect();
        namespaces.extend(pipeline_core::deployment::cluster_namespaces(
            valid.iter().map(Arc::as_ref),
        ));
        namespaces
    }
}

/// Which pipeline a Pipeline object is.
pub fn reference_of(object: &PipelineObject) -> PipelineRef {
    PipelineRef::new(object.namespace().unwrap_or_default(), object.name_any())
}

/// The validated model of a Pipeline object, or every problem with it.
pub fn validate(object: &PipelineObject) -> Result<Pipeline, Vec<FieldError>> {
    let reference = reference_of(object);
    let value = serde_json::to_value(&object.spec).map_err(|e| {
        vec![FieldError {
            field: "spec".to_string(),
            message: e.to_string(),
        }]
    })?;
    let spec = parse_pipeline_spec(value)?;
    Ok(Pipeline { reference, spec })
}

#[async_trait]
impl PipelineSource for KubePipelineSource {
    async fn pipeline(
        &self,
        reference: &PipelineRef,
    ) -> Result<Option<Arc<Pipeline>>, Unavailable> {
        if !self.ready().await {
            return Err(Unavailable(
                "the Pipeline cache has not synced with the Kubernetes API yet".to_string(),
            ));
        }
        let Some(object) = self.object(reference) else {
            if let Ok(mut models) = self.models.lock() {
                models.remove(reference);
            }
            return Ok(None);
        };
        Ok(self.model(&object))
    }

    async fn list(&self) -> Result<Vec<Arc<Pipeline>>, Unavailable> {
        if !self.ready().await {
            return Err(Unavailable(
                "the Pipeline cache has not synced with the Kubernetes API yet".to_string(),
            ));
        }
        let objects = self.store.state();
        let listed: Vec<Arc<Pipeline>> = objects
            .iter()
            .filter_map(|object| self.model(object))
            .collect();
        // Models of deleted objects go with them.
        if let Ok(mut models) = self.models.lock()
            && models.len() > objects.len()
        {
            let present: std::collections::HashSet<PipelineRef> =
                objects.iter().map(|o| reference_of(o)).collect();
            models.retain(|reference, _| present.contains(reference));
        }
        Ok(listed)
    }
}

struct NamespaceCache {
    store: Store<Secret>,
    _task: AbortOnDrop,
}

/// Secrets of the namespaces that hold Pipelines, from per-namespace watches (the
/// controller may read Secrets only where bound), or from one cluster-wide watch when it
/// may read them everywhere: then the number of watches no longer grows with the number
/// of namespaces, at the cost of caching every Secret of the cluster.
#[derive(Clone)]
pub struct KubeSecretSource {
    client: Client,
    caches: Arc<Mutex<HashMap<String, Arc<NamespaceCache>>>>,
    cluster_wide: Option<Arc<NamespaceCache>>,
    changed: Arc<Notify>,
}

impl KubeSecretSource {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            caches: Arc::default(),
            cluster_wide: None,
            changed: Arc::new(Notify::new()),
        }
    }

    /// One watch of every Secret of the cluster (needs cluster-wide `list`/`watch` on
    /// Secrets, the chart's `rbac.secrets.clusterWide`).
    pub fn cluster_wide(client: Client) -> Self {
        let changed = Arc::new(Notify::new());
        tracing::info!("watching Secrets cluster-wide");
        let (store, task) = spawn_reflector(
            Api::<Secret>::all(client.clone()),
            (),
            "secrets",
            changed.clone(),
        );
        Self {
            client,
            caches: Arc::default(),
            cluster_wide: Some(Arc::new(NamespaceCache { store, _task: task })),
            changed,
        }
    }

    /// Notified after every change to a cached Secret (for the one reconciler).
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// A Secret as the namespace's cache holds it (`None`: not there), without a request
    /// to the API server once the cache is ready: for checks that run on every pass,
    /// which the cache's watch keeps current. While the cache has not finished its first
    /// listing (or cannot, e.g. without RBAC to list Secrets there) the Secret is read
    /// with a GET instead of waiting for it.
    pub async fn cached_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Arc<Secret>>, Unavailable> {
        if let Some(cache) = self.cache(namespace)
            && ready_now(&cache.store)
        {
            return Ok(cache.store.get(&ObjectRef::new(name).within(namespace)));
        }
        Ok(self.fetch(namespace, name).await?.map(Arc::new))
    }

    fn cache(&self, namespace: &str) -> Option<Arc<NamespaceCache>> {
        if let Some(all) = &self.cluster_wide {
            return Some(all.clone());
        }
        let mut caches = self.caches.lock().ok()?;
        let cache = caches.entry(namespace.to_string()).or_insert_with(|| {
            tracing::info!(
                namespace,
                "watching Secrets of a namespace holding Pipelines"
            );
            let (store, task) = spawn_reflector(
                Api::<Secret>::namespaced(self.client.clone(), namespace),
                (),
                "secrets",
                self.changed.clone(),
            );
            Arc::new(NamespaceCache { store, _task: task })
        });
        Some(cache.clone())
    }

    /// Stops watching namespaces that no longer hold a Pipeline.
    pub fn prune(&self, keep: &BTreeSet<String>) {
        if let Ok(mut caches) = self.caches.lock() {
            caches.retain(|namespace, _| {
                let kept = keep.contains(namespace);
                if !kept {
                    tracing::info!(
                        namespace,
                        "no Pipelines left; no longer watching its Secrets"
                    );
                }
                kept
            });
        }
    }

    /// Namespaces whose Secrets are watched.
    pub fn watched(&self) -> BTreeSet<String> {
        self.caches
            .lock()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    async fn fetch(&self, namespace: &str, name: &str) -> Result<Option<Secret>, Unavailable> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        tokio::time::timeout(Duration::from_secs(10), api.get_opt(name))
            .await
            .map_err(|_| Unavailable("Kubernetes API: reading a Secret timed out".to_string()))?
            .map_err(|e| Unavailable(format!("Kubernetes API: {}", crate::store::describe(&e))))
    }
}

/// Whether `secret` holds a non-empty value under `key` (`data` or `stringData`).
pub fn has_key(secret: &Secret, key: &str) -> bool {
    value_of(secret, key).is_some_and(|v| !v.expose().is_empty())
}

fn value_of(secret: &Secret, key: &str) -> Option<SecretBytes> {
    if let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return Some(SecretBytes::new(bytes.0.clone()));
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|s| SecretBytes::new(s.as_bytes().to_vec()))
}

#[async_trait]
impl SecretSource for KubeSecretSource {
    async fn secret_value(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Option<SecretBytes>, SecretLookupError> {
        // Not waiting for a listing: it may be slow (a busy API server) or never come
        // (no RBAC to list Secrets there), and one GET answers now.
        let cached = match self.cache(namespace) {
            Some(cache) if ready_now(&cache.store) => {
                cache.store.get(&ObjectRef::new(name).within(namespace))
            }
            _ => None,
        };
        let secret = match cached {
            Some(secret) => Some(secret),
            None => self.fetch(namespace, name).await?.map(Arc::new),
        };
        match secret {
            Some(secret) => Ok(value_of(&secret, key)),
            None => Err(SecretLookupError::SecretNotFound {
                namespace: namespace.to_string(),
                name: name.to_string(),
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event;

    fn object(version: &str, environments: &[&str]) -> PipelineObject {
        let environments: Vec<serde_json::Value> = environments
            .iter()
            .map(|name| serde_json::json!({"name": name, "targets": [{"namespace": name}]}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "pipelines.weave.works/v1alpha1",
            "kind": "Pipeline",
            "metadata": {"name": "app", "namespace": "ns", "resourceVersion": version},
            "spec": {
                "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "app"},
                "environments": environments,
                "promotion": {"strategy": {"notification": {}}}
            }
        }))
        .unwrap()
    }

    fn source(writer: &Writer<PipelineObject>) -> KubePipelineSource {
        KubePipelineSource {
            store: writer.as_reader(),
            changed: Arc::new(Notify::new()),
            models: Arc::default(),
            _task: Arc::new(AbortOnDrop(tokio::spawn(async {}))),
        }
    }

    #[tokio::test]
    async fn models_are_reused_until_the_object_changes_and_go_with_it() {
        let mut writer = Writer::<PipelineObject>::new(());
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitApply(object("1", &["dev", "prod"])));
        writer.apply_watcher_event(&Event::InitDone);
        let source = source(&writer);
        let reference = PipelineRef::new("ns", "app");

        let first = source.pipeline(&reference).await.unwrap().unwrap();
        assert_eq!(first.spec.environments.len(), 2);
        let again = source.pipeline(&reference).await.unwrap().unwrap();
        assert!(Arc::ptr_eq(&first, &again), "validated once per version");

        writer.apply_watcher_event(&Event::Apply(object("2", &["dev", "staging", "prod"])));
        let changed = source.pipeline(&reference).await.unwrap().unwrap();
        assert_eq!(changed.spec.environments.len(), 3);

        // Two environments with one name: invalid, so absent.
        writer.apply_watcher_event(&Event::Apply(object("3", &["dev", "dev"])));
        assert!(source.pipeline(&reference).await.unwrap().is_none());
        assert!(source.list().await.unwrap().is_empty());

        writer.apply_watcher_event(&Event::Apply(object("4", &["dev", "prod"])));
        assert_eq!(source.list().await.unwrap().len(), 1);
        writer.apply_watcher_event(&Event::Delete(object("4", &["dev", "prod"])));
        assert!(source.pipeline(&reference).await.unwrap().is_none());
        assert!(source.models.lock().unwrap().is_empty());
    }
}
