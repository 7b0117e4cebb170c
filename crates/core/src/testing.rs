//! In-memory implementations of the core's ports, for the tests of every crate (feature
//! `testing`): a promotion store that can be made to fail, a catalog of pipelines and
//! Secrets, a clock that moves only when told, and a deployment view set by hand.
//!
//! They keep everything in memory and behave like the real adapters where tests can
//! tell: `create_if_absent` deduplicates by id, `list` is newest first, `unfinished`
//! returns `Pending` and `Running` records, `modify` applies a change atomically.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::deployment::{AppState, DeploymentView, TargetKey, TargetView};
use crate::pipeline::{Pipeline, PipelineRef, PipelineSpec, parse_pipeline_spec};
use crate::ports::{
    Clock, PipelineSource, PromotionFilter, PromotionStore, RecordChange, SecretBytes,
    SecretLookupError, SecretSource, StoreError, Unavailable,
};
use crate::promotion::{Phase, PromotionRecord};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How often each [`PromotionStore`] method of a [`MemoryStore`] was called, refused
/// calls included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCalls {
    pub create_if_absent: usize,
    pub get: usize,
    pub list: usize,
    pub modify: usize,
    pub unfinished: usize,
}

#[derive(Default)]
struct Counters {
    create_if_absent: AtomicUsize,
    get: AtomicUsize,
    list: AtomicUsize,
    modify: AtomicUsize,
    unfinished: AtomicUsize,
    refused: AtomicUsize,
}

/// A [`PromotionStore`] in memory. [`MemoryStore::fail`] makes every call fail with
/// [`StoreError::Unavailable`] until [`MemoryStore::recover`], as a full disk or an API
/// server away would; [`MemoryStore::refused`] counts the calls refused meanwhile.
#[derive(Default)]
pub struct MemoryStore {
    records: Mutex<BTreeMap<String, PromotionRecord>>,
    /// While set, every call fails with this message.
    outage: Mutex<Option<String>>,
    counters: Counters,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that fails every call with `message` from the start.
    pub fn unavailable(message: impl Into<String>) -> Self {
        let store = Self::default();
        store.fail(message);
        store
    }

    /// Fails every call with [`StoreError::Unavailable`]`(message)` from now on.
    pub fn fail(&self, message: impl Into<String>) {
        *lock(&self.outage) = Some(message.into());
    }

    /// Answers again.
    pub fn recover(&self) {
        *lock(&self.outage) = None;
    }

    pub fn is_failing(&self) -> bool {
        lock(&self.outage).is_some()
    }

    /// How many calls were refused because the store was failing.
    pub fn refused(&self) -> usize {
        self.counters.refused.load(Ordering::SeqCst)
    }

    /// How many calls each method received so far, refused ones included.
    pub fn calls(&self) -> StoreCalls {
        let c = &self.counters;
        StoreCalls {
            create_if_absent: c.create_if_absent.load(Ordering::SeqCst),
            get: c.get.load(Ordering::SeqCst),
            list: c.list.load(Ordering::SeqCst),
            modify: c.modify.load(Ordering::SeqCst),
            unfinished: c.unfinished.load(Ordering::SeqCst),
        }
    }

    /// Record `id`, read past the failure switch and the counters.
    pub fn record(&self, id: &str) -> Option<PromotionRecord> {
        lock(&self.records).get(id).cloned()
    }

    /// Every record, newest first, read past the failure switch and the counters.
    pub fn records(&self) -> Vec<PromotionRecord> {
        newest_first(lock(&self.records).values().cloned().collect())
    }

    /// Counts a call to one method; refuses it while the store is failing.
    fn call(&self, counter: &AtomicUsize) -> Result<(), StoreError> {
        counter.fetch_add(1, Ordering::SeqCst);
        match lock(&self.outage).as_ref() {
            Some(message) => {
                self.counters.refused.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::Unavailable(message.clone()))
            }
            None => Ok(()),
        }
    }
}

/// Newest first, ties by id, as the real stores list.
fn newest_first(mut records: Vec<PromotionRecord>) -> Vec<PromotionRecord> {
    records.sort_by(|a, b| (Reverse(a.created_at), &a.id).cmp(&(Reverse(b.created_at), &b.id)));
    records
}

#[async_trait]
impl PromotionStore for MemoryStore {
    async fn create_if_absent(
        &self,
        record: PromotionRecord,
    ) -> Result<(PromotionRecord, bool), StoreError> {
        self.call(&self.counters.create_if_absent)?;
        let mut records = lock(&self.records);
        if let Some(existing) = records.get(&record.id) {
            return Ok((existing.clone(), false));
        }
        records.insert(record.id.clone(), record.clone());
        Ok((record, true))
    }

    async fn get(&self, id: &str) -> Result<Option<PromotionRecord>, StoreError> {
        self.call(&self.counters.get)?;
        Ok(lock(&self.records).get(id).cloned())
    }

    async fn list(&self, filter: &PromotionFilter) -> Result<Vec<PromotionRecord>, StoreError> {
        self.call(&self.counters.list)?;
        let matching = lock(&self.records)
            .values()
            .filter(|r| filter.matches(r))
            .cloned()
            .collect();
        Ok(newest_first(matching))
    }

    async fn modify(
        &self,
        id: &str,
        change: RecordChange<'_>,
    ) -> Result<PromotionRecord, StoreError> {
        self.call(&self.counters.modify)?;
        let mut records = lock(&self.records);
        let record = records
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        let mut changed = record.clone();
        change(&mut changed)?;
        *record = changed.clone();
        Ok(changed)
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.call(&self.counters.modify)?;
        lock(&self.records).remove(id);
        Ok(())
    }

    async fn unfinished(&self) -> Result<Vec<PromotionRecord>, StoreError> {
        self.call(&self.counters.unfinished)?;
        Ok(lock(&self.records)
            .values()
            .filter(|r| matches!(r.phase, Phase::Pending | Phase::Running))
            .cloned()
            .collect())
    }
}

/// (namespace, name) of a Secret.
type SecretName = (String, String);
/// A Secret's data: key → value.
type SecretData = BTreeMap<String, Vec<u8>>;

/// Pipelines and Secrets in memory: a [`PipelineSource`] and a [`SecretSource`].
/// [`MemoryCatalog::fail`] makes every lookup fail with [`Unavailable`].
#[derive(Default)]
pub struct MemoryCatalog {
    pipelines: Mutex<BTreeMap<PipelineRef, Arc<Pipeline>>>,
    secrets: Mutex<HashMap<SecretName, SecretData>>,
    outage: Mutex<Option<String>>,
}

impl MemoryCatalog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds pipeline `namespace/name` with `spec`, given as the JSON (or YAML converted
    /// to JSON) of a `Pipeline`'s spec and validated as the real sources validate it.
    ///
    /// # Panics
    ///
    /// When `spec` is not a valid pipeline spec: a broken fixture is a bug in the test.
    #[track_caller]
    pub fn with_pipeline(self, namespace: &str, name: &str, spec: serde_json::Value) -> Self {
        match parse_pipeline_spec(spec) {
            Ok(spec) => self.with_pipeline_spec(namespace, name, spec),
            Err(errors) => {
                let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
                panic!(
                    "pipeline {namespace}/{name} of the test is invalid: {}",
                    errors.join("; ")
                )
            }
        }
    }

    /// Adds pipeline `namespace/name` with `spec` as it is, unvalidated (a cluster may
    /// hold pipelines a manifests folder would refuse).
    pub fn with_pipeline_spec(self, namespace: &str, name: &str, spec: PipelineSpec) -> Self {
        self.add_pipeline(Pipeline {
            reference: PipelineRef::new(namespace, name),
            spec,
        });
        self
    }

    /// Adds (or replaces) `pipeline`; returns it as the catalog serves it.
    pub fn add_pipeline(&self, pipeline: Pipeline) -> Arc<Pipeline> {
        let pipeline = Arc::new(pipeline);
        lock(&self.pipelines).insert(pipeline.reference.clone(), Arc::clone(&pipeline));
        pipeline
    }

    /// Removes pipeline `reference`, if present.
    pub fn remove_pipeline(&self, reference: &PipelineRef) {
        lock(&self.pipelines).remove(reference);
    }

    /// Adds the keys of `data` to Secret `namespace/name` (creating it).
    pub fn with_secret<K, V>(
        self,
        namespace: &str,
        name: &str,
        data: impl IntoIterator<Item = (K, V)>,
    ) -> Self
    where
        K: Into<String>,
        V: AsRef<[u8]>,
    {
        self.add_secret(namespace, name, data);
        self
    }

    /// Adds the keys of `data` to Secret `namespace/name` (creating it).
    pub fn add_secret<K, V>(
        &self,
        namespace: &str,
        name: &str,
        data: impl IntoIterator<Item = (K, V)>,
    ) where
        K: Into<String>,
        V: AsRef<[u8]>,
    {
        let mut secrets = lock(&self.secrets);
        let secret = secrets
            .entry((namespace.to_string(), name.to_string()))
            .or_default();
        for (key, value) in data {
            secret.insert(key.into(), value.as_ref().to_vec());
        }
    }

    /// Removes Secret `namespace/name`, if present.
    pub fn remove_secret(&self, namespace: &str, name: &str) {
        lock(&self.secrets).remove(&(namespace.to_string(), name.to_string()));
    }

    /// Fails every lookup with [`Unavailable`]`(message)` from now on.
    pub fn fail(&self, message: impl Into<String>) {
        *lock(&self.outage) = Some(message.into());
    }

    /// Answers again.
    pub fn recover(&self) {
        *lock(&self.outage) = None;
    }

    fn available(&self) -> Result<(), Unavailable> {
        match lock(&self.outage).as_ref() {
            Some(message) => Err(Unavailable(message.clone())),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl PipelineSource for MemoryCatalog {
    async fn pipeline(
        &self,
        reference: &PipelineRef,
    ) -> Result<Option<Arc<Pipeline>>, Unavailable> {
        self.available()?;
        Ok(lock(&self.pipelines).get(reference).cloned())
    }

    async fn list(&self) -> Result<Vec<Arc<Pipeline>>, Unavailable> {
        self.available()?;
        Ok(lock(&self.pipelines).values().cloned().collect())
    }
}

#[async_trait]
impl SecretSource for MemoryCatalog {
    async fn secret_value(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Option<SecretBytes>, SecretLookupError> {
        self.available()?;
        let secrets = lock(&self.secrets);
        let secret = secrets
            .get(&(namespace.to_string(), name.to_string()))
            .ok_or_else(|| SecretLookupError::SecretNotFound {
                namespace: namespace.to_string(),
                name: name.to_string(),
            })?;
        Ok(secret.get(key).map(|v| SecretBytes::new(v.clone())))
    }
}

/// A [`Clock`] that stands still until set or advanced.
#[derive(Debug)]
pub struct FixedClock(Mutex<DateTime<Utc>>);

impl FixedClock {
    pub fn new(at: DateTime<Utc>) -> Self {
        Self(Mutex::new(at))
    }

    pub fn set(&self, at: DateTime<Utc>) {
        *lock(&self.0) = at;
    }

    /// Moves the clock forward by `by` (backward, if negative).
    pub fn advance(&self, by: chrono::Duration) {
        let mut now = lock(&self.0);
        *now += by;
    }
}

impl Default for FixedClock {
    /// Stands at the moment it was made.
    fn default() -> Self {
        Self::new(Utc::now())
    }
}

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        *lock(&self.0)
    }
}

/// A [`DeploymentView`] whose targets tests set by hand; a target never set is
/// [`TargetView::Missing`].
#[derive(Debug, Default)]
pub struct HandView(Mutex<HashMap<TargetKey, TargetView>>);

impl HandView {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, key: TargetKey, view: TargetView) {
        lock(&self.0).insert(key, view);
    }

    /// Forgets `key`: it is [`TargetView::Missing`] again.
    pub fn remove(&self, key: &TargetKey) {
        lock(&self.0).remove(key);
    }

    /// A target that is Ready, up to date, and deployed at `revision`.
    pub fn deployed(revision: &str) -> TargetView {
        TargetView::Seen(AppState {
            ready: true,
            current: true,
            revision: Some(revision.to_string()),
            message: String::new(),
        })
    }
}

impl DeploymentView for HandView {
    fn target(&self, key: &TargetKey) -> TargetView {
        lock(&self.0)
            .get(key)
            .cloned()
            .unwrap_or(TargetView::Missing)
    }
}
