//! Kubernetes mode of pipeline-controller: the adapters that make the core run against
//! an API server instead of a manifests folder and an embedded store.
//!
//! - [`KubePromotionStore`]: promotion records as `Promotion` custom resources (name =
//!   record id, namespace = the pipeline's), phase and history in `.status`.
//! - [`KubePipelineSource`] and [`KubeSecretSource`]: watch-backed caches.
//! - [`LeaderElector`]: a `coordination.k8s.io/v1` Lease; only its holder executes.
//! - [`Reconciler`]: leader-only housekeeping (approvals given through the API, the
//!   Pipeline's `status.environments[env].waitingApproval`, Pipeline `Ready`).
//! - [`KubeNotification`]: the notification strategy of Kubernetes mode.
//! - [`DirectWiring`]: the Flux Provider, Alert and key Secret applied to each target's
//!   cluster by the leader (`--flux-wiring direct`), addressed with [`public_url`].
#![forbid(unsafe_code)]

pub mod api_client;
pub mod cache;
pub mod client;
pub mod clusters;
pub mod convert;
pub mod deployments;
pub mod events;
pub mod flux_wiring;
pub mod leader;
pub mod notification;
pub mod public_url;
pub mod reconciler;
pub mod sources;
pub mod store;
pub mod watch;

pub use cache::{CachedPromotion, PromotionCache};
pub use client::{ApproveError, decide, find_promotion, list_promotions};
pub use clusters::{ClusterRegistry, KubeClusterSource};
pub use deployments::DeploymentWatcher;
pub use events::EventPublisher;
pub use flux_wiring::DirectWiring;
pub use leader::{LeaderElector, LeaseSettings};
pub use notification::KubeNotification;
pub use reconciler::Reconciler;
pub use sources::{KubePipelineSource, KubeSecretSource};
pub use store::KubePromotionStore;

/// Name of this controller in Events, field managers and Leases.
pub const CONTROLLER_NAME: &str = "pipeline-controller";

/// Path of a Promotion object in the Kubernetes API.
pub fn promotion_api_path(namespace: &str, name: &str) -> String {
    format!("/apis/pipelines.weave.works/v1alpha1/namespaces/{namespace}/promotions/{name}")
}
