//! The edges of the core. Embedded mode and Kubernetes mode differ only in which
//! implementations of these traits `main` wires in.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::pipeline::{Pipeline, PipelineRef};
use crate::promotion::{PromotionRecord, TransitionError};

/// Bytes of a secret value. Its `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The key Flux signs with for this value: notification-controller trims
    /// surrounding whitespace from a Provider's `token` (Go's `strings.TrimSpace`), so a
    /// Secret written from a file ending in a newline must be read the same way.
    pub fn trimmed(self) -> Self {
        match std::str::from_utf8(&self.0) {
            Ok(text) if text.trim().len() != text.len() => Self(text.trim().as_bytes().to_vec()),
            Ok(_) => self,
            Err(_) => Self(self.0.trim_ascii().to_vec()),
        }
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

/// A backing system (file system, API server, database) could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// Where pipelines come from.
#[async_trait]
pub trait PipelineSource: Send + Sync {
    async fn pipeline(&self, reference: &PipelineRef)
    -> Result<Option<Arc<Pipeline>>, Unavailable>;

    /// Every valid pipeline known now (the watcher evaluates them all).
    async fn list(&self) -> Result<Vec<Arc<Pipeline>>, Unavailable>;
}

/// Where Secrets come from; `key` is a key of the Secret's data.
#[async_trait]
pub trait SecretSource: Send + Sync {
    async fn secret_value(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Option<SecretBytes>, SecretLookupError>;
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SecretLookupError {
    #[error("secret {namespace}/{name} not found")]
    SecretNotFound { namespace: String, name: String },
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
}

/// Filters for listing promotions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromotionFilter {
    pub pipeline: Option<PipelineRef>,
    /// Matches the source or the target environment.
    pub environment: Option<String>,
}

impl PromotionFilter {
    pub fn matches(&self, record: &PromotionRecord) -> bool {
        self.pipeline.as_ref().is_none_or(|p| *p == record.pipeline)
            && self
                .environment
                .as_ref()
                .is_none_or(|e| *e == record.target_environment || *e == record.source_environment)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("promotion store unavailable: {0}")]
    Unavailable(String),
    #[error("promotion {0} not found")]
    NotFound(String),
    #[error(transparent)]
    Transition(#[from] TransitionError),
}

/// A change to one record, applied atomically by the store. May be called more than
/// once if the store retries on a conflicting write.
pub type RecordChange<'a> =
    &'a (dyn Fn(&mut PromotionRecord) -> Result<(), TransitionError> + Send + Sync);

/// Durable promotion records. `create_if_absent` is the deduplication point: the id is
/// derived from the record's meaning, so concurrent creators converge on one record.
#[async_trait]
pub trait PromotionStore: Send + Sync {
    /// Stores `record` unless one with the same id exists. Returns the stored record and
    /// whether it was created by this call. Returns only once the record is durable.
    async fn create_if_absent(
        &self,
        record: PromotionRecord,
    ) -> Result<(PromotionRecord, bool), StoreError>;

    async fn get(&self, id: &str) -> Result<Option<PromotionRecord>, StoreError>;

    /// Matching records, newest first.
    async fn list(&self, filter: &PromotionFilter) -> Result<Vec<PromotionRecord>, StoreError>;

    /// Reads, changes and writes one record atomically; returns the stored result.
    async fn modify(
        &self,
        id: &str,
        change: RecordChange<'_>,
    ) -> Result<PromotionRecord, StoreError>;

    /// Records the executor should work on (`Pending` and `Running`), with their next
    /// attempt time so the executor knows how long it may sleep.
    async fn unfinished(&self) -> Result<Vec<PromotionRecord>, StoreError>;

    /// Removes a finished record (the retention policy's sweep). Removing one that is
    /// gone already is not an error.
    async fn delete(&self, id: &str) -> Result<(), StoreError>;

    /// Whether the store can record promotions now; `/readyz` answers with it. The
    /// default asks for a record, which any answering backend can give.
    async fn ready(&self) -> Result<(), StoreError> {
        self.get("readyz-probe").await.map(|_| ())
    }
}

/// Time, injectable so tests can move it.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}
