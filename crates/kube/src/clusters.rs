//! Clients for the clusters that pipelines' targets live in, always with the controller's
//! own identity: the cluster it runs in, and leaf clusters reached through the kubeconfig
//! Secret of a `GitopsCluster` or Cluster API `Cluster`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Config};
use pipeline_core::deployment::{ClusterKey, ClusterSource, kubeconfig_ref, read_kubeconfig};
use pipeline_core::{SecretBytes, SecretSource};
use sha2::{Digest, Sha256};

use tokio::sync::Notify;

use crate::watch::{AbortOnDrop, spawn_reflector};

/// How long connecting to a leaf cluster may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client for one cluster, and a fingerprint of the kubeconfig it was built from so a
/// rotated Secret is noticed.
#[derive(Clone)]
pub struct ClusterClient {
    pub client: Client,
    pub fingerprint: String,
}

/// Builds a client from kubeconfig YAML. The kubeconfig's current context is used.
pub async fn client_from_kubeconfig(kubeconfig: &SecretBytes) -> Result<Client, String> {
    let text = std::str::from_utf8(kubeconfig.expose())
        .map_err(|_| "the kubeconfig is not UTF-8 text".to_string())?;
    let parsed =
        Kubeconfig::from_yaml(text).map_err(|e| format!("the kubeconfig does not parse: {e}"))?;
    let mut config = Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("the kubeconfig is not usable: {e}"))?;
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    crate::api_client::api_client(config)
        .map_err(|e| format!("cannot build a client from the kubeconfig: {e}"))
}

fn fingerprint(kubeconfig: &SecretBytes) -> String {
    hex::encode(Sha256::digest(kubeconfig.expose()))
}

/// Clients per cluster, built on first use and rebuilt when the kubeconfig changes.
pub struct ClusterRegistry {
    local: Option<Client>,
    source: Arc<dyn ClusterSource>,
    clients: Mutex<HashMap<ClusterKey, ClusterClient>>,
}

impl ClusterRegistry {
    /// `local` is the cluster the controller runs in, if it runs in one (Kubernetes
    /// mode); without it, targets without a `clusterRef` are not watched.
    pub fn new(local: Option<Client>, source: Arc<dyn ClusterSource>) -> Self {
        Self {
            local,
            source,
            clients: Mutex::default(),
        }
    }

    /// Whether targets in `cluster` can be watched at all.
    pub fn can_reach(&self, cluster: &ClusterKey) -> bool {
        !matches!(cluster, ClusterKey::Local) || self.local.is_some()
    }

    /// A client for `cluster`, reusing the one built from the same kubeconfig.
    pub async fn client(&self, cluster: &ClusterKey) -> Result<ClusterClient, String> {
        if let ClusterKey::Local = cluster {
            return self
                .local
                .clone()
                .map(|client| ClusterClient {
                    client,
                    fingerprint: "local".to_string(),
                })
                .ok_or_else(|| "the controller does not run in a cluster".to_string());
        }
        let kubeconfig = self.source.kubeconfig(cluster).await?;
        let wanted = fingerprint(&kubeconfig);
        if let Some(known) = self
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(cluster)
            .filter(|c| c.fingerprint == wanted)
        {
            return Ok(known.clone());
        }
        let client = client_from_kubeconfig(&kubeconfig).await?;
        let built = ClusterClient {
            client,
            fingerprint: wanted,
        };
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cluster.clone(), built.clone());
        Ok(built)
    }

    /// The fingerprint of `cluster`'s kubeconfig now, to notice rotations.
    pub async fn fingerprint(&self, cluster: &ClusterKey) -> Result<String, String> {
        match cluster {
            ClusterKey::Local => Ok("local".to_string()),
            remote => Ok(fingerprint(&self.source.kubeconfig(remote).await?)),
        }
    }

    /// Forgets clients of clusters no pipeline needs any more.
    pub fn retain(&self, wanted: &dyn Fn(&ClusterKey) -> bool) {
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|cluster, _| wanted(cluster));
    }
}

/// Kubeconfigs from the management cluster: `GitopsCluster` objects (watched) and their
/// Secrets.
pub struct KubeClusterSource<S> {
    gitops_clusters: Store<DynamicObject>,
    secrets: S,
    _watch: AbortOnDrop,
}

impl<S: SecretSource> KubeClusterSource<S> {
    /// Watches GitopsClusters of the whole cluster (a missing CRD only means none).
    pub fn start(client: Client, secrets: S) -> Self {
        let resource = gitops_cluster_resource();
        let api: Api<DynamicObject> = Api::all_with(client, &resource);
        let (gitops_clusters, watch) =
            spawn_reflector(api, resource, "gitopsclusters", Arc::new(Notify::new()));
        Self {
            gitops_clusters,
            secrets,
            _watch: watch,
        }
    }
}

fn gitops_cluster_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("gitops.weave.works", "v1alpha1", "GitopsCluster");
    ApiResource::from_gvk_with_plural(&gvk, "gitopsclusters")
}

#[async_trait]
impl<S: SecretSource> ClusterSource for KubeClusterSource<S> {
    async fn kubeconfig(&self, cluster: &ClusterKey) -> Result<SecretBytes, String> {
        let object = match cluster {
            ClusterKey::Remote {
                kind,
                namespace,
                name,
            } if kind == "GitopsCluster" => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    self.gitops_clusters.wait_until_ready(),
                )
                .await;
                self.gitops_clusters
                    .get(&ObjectRef::new_with(name, gitops_cluster_resource()).within(namespace))
                    .map(|o| serde_json::to_value(&*o).unwrap_or_default())
            }
            _ => None,
        };
        let reference = kubeconfig_ref(cluster, object.as_ref())?;
        read_kubeconfig(&self.secrets, &reference).await
    }
}
