//! The read-only port: what the API and the dashboard may see (pipelines, records, the
//! state of each environment), and nothing they could change. Both modes build it from
//! the same ports the core runs on, so the pages show what the controller acts on.

use std::sync::Arc;

use async_trait::async_trait;

use crate::deployment::{DeploymentView, EnvironmentState};
use crate::pipeline::{Pipeline, PipelineRef};
use crate::ports::{PipelineSource, PromotionFilter, PromotionStore, StoreError, Unavailable};
use crate::promotion::PromotionRecord;

/// Reading the controller's state, never changing it.
#[async_trait]
pub trait ReadPort: Send + Sync {
    /// Every valid pipeline known now.
    async fn pipelines(&self) -> Result<Vec<Arc<Pipeline>>, Unavailable>;

    /// One pipeline, if it exists.
    async fn pipeline(&self, reference: &PipelineRef)
    -> Result<Option<Arc<Pipeline>>, Unavailable>;

    /// Matching records, newest first.
    async fn records(&self, filter: &PromotionFilter) -> Result<Vec<PromotionRecord>, StoreError>;

    async fn record(&self, id: &str) -> Result<Option<PromotionRecord>, StoreError>;

    /// What the deployment watch sees of environment `index` of `pipeline`; `None` when
    /// nothing watches deployments (then only the records tell what runs where).
    fn environment(&self, pipeline: &Pipeline, index: usize) -> Option<EnvironmentState>;
}

/// The [`ReadPort`] over the core's own ports, for both modes.
pub struct PortReader {
    pipelines: Arc<dyn PipelineSource>,
    store: Arc<dyn PromotionStore>,
    view: Option<Arc<dyn DeploymentView>>,
}

impl PortReader {
    pub fn new(
        pipelines: Arc<dyn PipelineSource>,
        store: Arc<dyn PromotionStore>,
        view: Option<Arc<dyn DeploymentView>>,
    ) -> Self {
        Self {
            pipelines,
            store,
            view,
        }
    }
}

#[async_trait]
impl ReadPort for PortReader {
    async fn pipelines(&self) -> Result<Vec<Arc<Pipeline>>, Unavailable> {
        let mut pipelines = self.pipelines.list().await?;
        pipelines.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(pipelines)
    }

    async fn pipeline(
        &self,
        reference: &PipelineRef,
    ) -> Result<Option<Arc<Pipeline>>, Unavailable> {
        self.pipelines.pipeline(reference).await
    }

    async fn records(&self, filter: &PromotionFilter) -> Result<Vec<PromotionRecord>, StoreError> {
        self.store.list(filter).await
    }

    async fn record(&self, id: &str) -> Result<Option<PromotionRecord>, StoreError> {
        self.store.get(id).await
    }

    fn environment(&self, pipeline: &Pipeline, index: usize) -> Option<EnvironmentState> {
        let view = self.view.as_ref()?;
        Some(EnvironmentState::observe(pipeline, index, view.as_ref()))
    }
}
