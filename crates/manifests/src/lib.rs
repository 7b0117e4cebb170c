//! Embedded mode's source of pipelines and secrets: a folder of Kubernetes-style YAML
//! manifests, reloaded when it changes.
//!
//! [`load_dir`] reads a folder into a [`Catalog`] once; [`ManifestCatalog`] serves the
//! current catalog through the core's [`PipelineSource`](pipeline_core::PipelineSource)
//! and [`SecretSource`](pipeline_core::SecretSource) ports, and [`ManifestCatalog::watch`]
//! polls the folder and reloads it when it changes.
//!
//! Secret values are never logged and never appear in errors or warnings.
#![forbid(unsafe_code)]

mod document;
mod load;
mod source;
mod walk;

pub use load::{Catalog, LastGoodFile, LoadError, SecretData, load_dir};
pub use source::{ManifestCatalog, ReloadReport};
pub use walk::Fingerprint;
