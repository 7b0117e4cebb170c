//! The live catalog: serves lookups, reloads the folder, watches it.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use pipeline_core::Metrics;
use pipeline_core::deployment::{ClusterKey, ClusterSource, kubeconfig_ref, read_kubeconfig};
use pipeline_core::pipeline::{Pipeline, PipelineRef};
use pipeline_core::ports::{
    PipelineSource, SecretBytes, SecretLookupError, SecretSource, Unavailable,
};
use tracing::{info, warn};

use crate::load::{Catalog, LastGoodFile, LoadError, load_walk_keeping};
use crate::walk::{Fingerprint, walk};

/// What one reload found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub files: usize,
    pub pipelines: usize,
    pub secrets: usize,
    pub ignored: usize,
    pub errors: Vec<LoadError>,
    pub warnings: Vec<String>,
    /// Files invalid now whose last good version is served.
    pub last_good: Vec<LastGoodFile>,
}

impl ReloadReport {
    fn of(catalog: &Catalog) -> Self {
        Self {
            files: catalog.files,
            pipelines: catalog.pipelines.len(),
            secrets: catalog.secrets.len(),
            ignored: catalog.ignored,
            errors: catalog.errors.clone(),
            warnings: catalog.warnings.clone(),
            last_good: catalog.last_good.clone(),
        }
    }
}

/// Pipelines and Secrets of a folder of manifests, as last loaded.
///
/// Lookups read the current [`Catalog`] behind a briefly held lock; reloads build a new
/// catalog aside and swap it in whole, so a lookup sees either the old folder or the new
/// one, never a mix.
///
/// A file that loaded cleanly once and then becomes invalid (bad YAML, an invalid
/// Pipeline or Secret, unreadable) keeps being served from its last good version until it
/// is fixed or deleted: a broken edit does not take its pipelines and secrets away. Such
/// files are listed in [`last_good_files`](Self::last_good_files), logged once per change
/// and counted in the metrics given to [`with_metrics`](Self::with_metrics).
#[derive(Debug)]
pub struct ManifestCatalog {
    dir: PathBuf,
    current: RwLock<Arc<Catalog>>,
    /// What the last load saw. Held during a reload, so reloads do not overlap and the
    /// newest read always wins.
    loaded: Mutex<Loaded>,
    metrics: Option<Arc<Metrics>>,
}

#[derive(Debug, Default)]
struct Loaded {
    fingerprint: Fingerprint,
    /// Text of each file as it last loaded cleanly, by path relative to the folder.
    last_good: HashMap<PathBuf, String>,
}

impl ManifestCatalog {
    /// Loads `dir` (see [`load_dir`](crate::load_dir)), logging what it found. Problems do
    /// not fail this: see [`catalog`](Self::catalog)`().errors`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let this = Self {
            dir: dir.into(),
            current: RwLock::new(Arc::new(Catalog::default())),
            loaded: Mutex::new(Loaded::default()),
            metrics: None,
        };
        this.reload();
        this
    }

    /// Keeps `pipeline_controller_manifest_files_invalid` and `_last_good` in `metrics`
    /// up to date, from now on.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        Self::count(&metrics, &self.catalog());
        self.metrics = Some(metrics);
        self
    }

    fn count(metrics: &Metrics, catalog: &Catalog) {
        let invalid: std::collections::HashSet<&Path> =
            catalog.errors.iter().map(|e| e.file.as_path()).collect();
        metrics.set_manifest_files(invalid.len(), catalog.last_good.len());
    }

    /// Files invalid now whose last good version is served instead, by path.
    pub fn last_good_files(&self) -> Vec<LastGoodFile> {
        self.catalog().last_good.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current catalog.
    pub fn catalog(&self) -> Arc<Catalog> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Re-reads the folder and swaps the new catalog in. Valid pipelines load even when
    /// others do not; each problem is logged at warn.
    pub fn reload(&self) -> ReloadReport {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        self.reload_locked(&mut loaded)
    }

    /// Reloads only if the folder's [`Fingerprint`] changed since the last load; returns
    /// the report when it did.
    pub fn reload_if_changed(&self) -> Option<ReloadReport> {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if Fingerprint::of_dir(&self.dir) == loaded.fingerprint {
            return None;
        }
        Some(self.reload_locked(&mut loaded))
    }

    fn reload_locked(&self, loaded: &mut Loaded) -> ReloadReport {
        // Fingerprinted before reading: a change made while reading shows at the next poll.
        let walked = walk(&self.dir);
        let fingerprint = Fingerprint::of_walk(&walked);
        let catalog = Arc::new(load_walk_keeping(&walked, &mut loaded.last_good));
        let report = ReloadReport::of(&catalog);
        if let Some(metrics) = &self.metrics {
            Self::count(metrics, &catalog);
        }
        let previous = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(PoisonError::into_inner),
            catalog,
        );
        loaded.fingerprint = fingerprint;

        info!(
            dir = %self.dir.display(),
            files = report.files,
            pipelines = report.pipelines,
            secrets = report.secrets,
            ignored = report.ignored,
            errors = report.errors.len(),
            warnings = report.warnings.len(),
            "manifests loaded"
        );
        // A file served from its last good version: one warning when that starts or its
        // problems change, not at every reload.
        for held in &report.last_good {
            if !previous.last_good.contains(held) {
                let errors: Vec<String> = held.errors.iter().map(ToString::to_string).collect();
                let errors = errors.join("; ");
                warn!(dir = %self.dir.display(), file = %held.file.display(), "manifest file invalid, serving its last good version: {errors}");
            }
        }
        for before in &previous.last_good {
            if !report.last_good.iter().any(|now| now.file == before.file) {
                info!(dir = %self.dir.display(), file = %before.file.display(), "manifest file no longer served from its last good version (fixed or removed)");
            }
        }
        for error in &report.errors {
            if report
                .last_good
                .iter()
                .any(|held| held.errors.contains(error))
            {
                continue;
            }
            warn!(dir = %self.dir.display(), "manifest error: {error}");
        }
        for warning in &report.warnings {
            warn!(dir = %self.dir.display(), "manifest warning: {warning}");
        }
        report
    }

    /// Polls the folder every `interval` and reloads it when its [`Fingerprint`] (paths,
    /// sizes, modification times) changed, until `shutdown` completes.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: impl Future) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                () = tokio::time::sleep(interval) => {}
            }
            let this = Arc::clone(&self);
            let poll = tokio::task::spawn_blocking(move || this.reload_if_changed());
            tokio::select! {
                _ = &mut shutdown => return,
                result = poll => {
                    if let Err(err) = result {
                        warn!(dir = %self.dir.display(), "manifest reload failed: {err}");
                    }
                }
            }
        }
    }
}

#[async_trait]
impl PipelineSource for ManifestCatalog {
    async fn pipeline(
        &self,
        reference: &PipelineRef,
    ) -> Result<Option<Arc<Pipeline>>, Unavailable> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        Ok(current.pipelines.get(reference).cloned())
    }

    async fn list(&self) -> Result<Vec<Arc<Pipeline>>, Unavailable> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        Ok(current.pipelines.values().cloned().collect())
    }
}

#[async_trait]
impl SecretSource for ManifestCatalog {
    async fn secret_value(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Option<SecretBytes>, SecretLookupError> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        match current
            .secrets
            .get(&(namespace.to_string(), name.to_string()))
        {
            Some(data) => Ok(data.get(key).cloned()),
            None => Err(SecretLookupError::SecretNotFound {
                namespace: namespace.to_string(),
                name: name.to_string(),
            }),
        }
    }
}

/// Leaf clusters named by pipelines' `clusterRef`s: their `GitopsCluster` objects and
/// kubeconfig Secrets live in the folder too, so embedded mode watches real clusters.
#[async_trait]
impl ClusterSource for ManifestCatalog {
    async fn kubeconfig(&self, cluster: &ClusterKey) -> Result<SecretBytes, String> {
        let object = match cluster {
            ClusterKey::Remote {
                kind,
                namespace,
                name,
            } if kind == "GitopsCluster" => {
                let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
                current
                    .clusters
                    .get(&(namespace.clone(), name.clone()))
                    .cloned()
            }
            _ => None,
        };
        let reference = kubeconfig_ref(cluster, object.as_ref())?;
        read_kubeconfig(self, &reference).await
    }
}
