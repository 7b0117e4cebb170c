//! The live catalog: serves lookups, reloads the folder, watches it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use pipeline_core::pipeline::{Pipeline, PipelineRef};
use pipeline_core::ports::{
    PipelineSource, SecretBytes, SecretLookupError, SecretSource, Unavailable,
};
use tracing::{info, warn};

use crate::load::{Catalog, LoadError, load_walk};
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
        }
    }
}

/// Pipelines and Secrets of a folder of manifests, as last loaded.
///
/// Lookups read the current [`Catalog`] behind a briefly held lock; reloads build a new
/// catalog aside and swap it in whole, so a lookup sees either the old folder or the new
/// one, never a mix.
#[derive(Debug)]
pub struct ManifestCatalog {
    dir: PathBuf,
    current: RwLock<Arc<Catalog>>,
    /// Fingerprint of the folder as last loaded. Held during a reload, so reloads do not
    /// overlap and the newest read always wins.
    loaded: Mutex<Fingerprint>,
}

impl ManifestCatalog {
    /// Loads `dir` (see [`load_dir`](crate::load_dir)), logging what it found. Problems do
    /// not fail this: see [`catalog`](Self::catalog)`().errors`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let this = Self {
            dir: dir.into(),
            current: RwLock::new(Arc::new(Catalog::default())),
            loaded: Mutex::new(Fingerprint::default()),
        };
        this.reload();
        this
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
        if Fingerprint::of_dir(&self.dir) == *loaded {
            return None;
        }
        Some(self.reload_locked(&mut loaded))
    }

    fn reload_locked(&self, loaded: &mut Fingerprint) -> ReloadReport {
        // Fingerprinted before reading: a change made while reading shows at the next poll.
        let walked = walk(&self.dir);
        let fingerprint = Fingerprint::of_walk(&walked);
        let catalog = Arc::new(load_walk(&walked));
        let report = ReloadReport::of(&catalog);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = catalog;
        *loaded = fingerprint;

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
        for error in &report.errors {
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
