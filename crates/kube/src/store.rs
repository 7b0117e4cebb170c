//! Promotion records as `Promotion` custom resources.
//!
//! - Name = record id, namespace = the pipeline's namespace. Ids hash the namespace, so
//!   an id names at most one Promotion cluster-wide and `get(id)` needs no namespace.
//! - Creation is the deduplication point: `create` answers AlreadyExists to every
//!   creator but one, and those read and return the existing object.
//! - The record's phase, attempts and history live in `.status` (a subresource, so a
//!   second write). A Promotion whose creator died before writing the status is read as
//!   its initial phase, derived from the spec, so the two-step creation is crash-safe.
//! - `modify` reads, changes and replaces the status with the read `resourceVersion`,
//!   retrying a bounded number of times on 409 Conflict.
//! - Every API failure is [`StoreError::Unavailable`]: the webhook answers 503 with
//!   `Retry-After` and Flux retries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use pipeline_core::ports::RecordChange;
use pipeline_core::{Phase, PromotionFilter, PromotionRecord, PromotionStore, StoreError};
use pipeline_crds::{Promotion, PromotionStatus};

use crate::cache::{CachedPromotion, PromotionCache};
use crate::convert;
use crate::events::{EventPublisher, EventType, pipeline_reference, promotion_reference};
use crate::sources::KubePipelineSource;

/// Conflicting status writes retried before giving up.
const CONFLICT_RETRIES: usize = 8;

/// Longest wait for one API call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct KubePromotionStore {
    client: Client,
    /// id → namespace, learnt from creations and listings, so lookups are one GET.
    namespaces: Arc<Mutex<HashMap<String, String>>>,
    events: Option<(EventPublisher, KubePipelineSource)>,
    /// The shared watch of Promotions: once synced, reads come from it, not the API.
    cache: Option<Arc<PromotionCache>>,
}

impl KubePromotionStore {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            namespaces: Arc::default(),
            events: None,
            cache: None,
        }
    }

    /// Reads (get, list, unfinished, duplicate checks, the record a change starts from)
    /// from `cache` once it has synced; writes update it at once.
    pub fn with_cache(mut self, cache: Arc<PromotionCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The cache, if it can answer alone.
    fn synced_cache(&self) -> Option<&PromotionCache> {
        self.cache.as_deref().filter(|c| c.synced())
    }

    /// Takes a write's result into the cache.
    fn cache_write(&self, object: &Promotion) {
        if let (Some(cache), Some(entry)) = (&self.cache, CachedPromotion::of(object)) {
            cache.put(entry);
        }
    }

    /// Emits Kubernetes Events on the Promotion and its Pipeline for phase changes.
    pub fn with_events(mut self, publisher: EventPublisher, pipelines: KubePipelineSource) -> Self {
        self.events = Some((publisher, pipelines));
        self
    }

    fn remember(&self, id: &str, namespace: &str) {
        if let Ok(mut map) = self.namespaces.lock() {
            map.insert(id.to_string(), namespace.to_string());
        }
    }

    fn known_namespace(&self, id: &str) -> Option<String> {
        self.namespaces.lock().ok()?.get(id).cloned()
    }

    fn forget(&self, id: &str) {
        if let Ok(mut map) = self.namespaces.lock() {
            map.remove(id);
        }
    }

    /// The Promotion named `id`, in whatever namespace it lives.
    pub async fn find(&self, id: &str) -> Result<Option<Promotion>, StoreError> {
        if let Some(namespace) = self.known_namespace(id) {
            let api: Api<Promotion> = Api::namespaced(self.client.clone(), &namespace);
            match call(api.get_opt(id)).await? {
                Some(found) => return Ok(Some(found)),
                None => self.forget(id),
            }
        }
        if !is_object_name(id) {
            return Ok(None);
        }
        let api: Api<Promotion> = Api::all(self.client.clone());
        let list =
            call(api.list(&ListParams::default().fields(&format!("metadata.name={id}")))).await?;
        let mut found: Vec<Promotion> = list.items;
        // Ids hash the namespace: a same-named object elsewhere was not made by us.
        found.retain(|p| convert::record_of(p).is_some_and(|r| is_genuine(&r)));
        let first = found.into_iter().next();
        if let Some(p) = &first
            && let Some(ns) = &p.metadata.namespace
        {
            self.remember(id, ns);
        }
        Ok(first)
    }

    fn announce(
        &self,
        promotion: &Promotion,
        before: Option<&PromotionRecord>,
        after: &PromotionRecord,
    ) {
        let Some((publisher, pipelines)) = &self.events else {
            return;
        };
        let changes = match before {
            Some(before) => convert::new_changes(before, after),
            None => after.history.as_slice(),
        };
        let ns = &after.pipeline.namespace;
        // Events for what people act on and for outcomes only (the history has the
        // rest), on the Promotion; on its Pipeline too when it needs people. A promotion
        // that runs straight through costs one Event.
        for change in changes.iter().filter(|c| c.reason.concerns_pipeline()) {
            let type_ = if change.reason.is_warning() {
                EventType::Warning
            } else {
                EventType::Normal
            };
            let reason = change.reason.event_reason();
            publisher.spawn(
                promotion_reference(ns, &after.id, promotion.metadata.uid.clone()),
                type_,
                reason,
                change.message.clone(),
            );
            if !change.reason.needs_attention() {
                continue;
            }
            publisher.spawn(
                pipeline_reference(ns, &after.pipeline.name, pipelines.uid(&after.pipeline)),
                type_,
                reason,
                format!("{}: {}", after.id, change.message),
            );
        }
    }

    /// Writes `record` as the status of the Promotion `base` was read from (optimistic:
    /// with its resourceVersion). The status subresource ignores the rest of the object,
    /// so it is rebuilt from the record rather than kept.
    async fn write_status(
        &self,
        base: &CachedPromotion,
        record: &PromotionRecord,
    ) -> Result<Promotion, kube::Error> {
        let manual = base
            .record
            .history
            .first()
            .is_some_and(|h| h.phase == Phase::WaitingApproval);
        let mut object = convert::promotion_for(record, manual);
        object.metadata.resource_version = base.resource_version.clone();
        object.metadata.generation = base.generation;
        let previous = PromotionStatus {
            conditions: base.conditions.clone(),
            ..PromotionStatus::default()
        };
        object.status = Some(convert::status_of(record, Some(&previous), base.generation));
        let api: Api<Promotion> = Api::namespaced(self.client.clone(), &record.pipeline.namespace);
        timeout(api.replace_status(&record.id, &PostParams::default(), &object)).await
    }
}

/// Whether the record's id is what this controller would have named it.
fn is_genuine(record: &PromotionRecord) -> bool {
    record.id
        == pipeline_core::promotion_id(
            &record.pipeline,
            &record.target_environment,
            &record.revision,
        )
}

fn is_object_name(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 253
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

async fn timeout<T>(
    future: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    tokio::time::timeout(CALL_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| Err(kube::Error::Service("Kubernetes API call timed out".into())))
}

async fn call<T>(future: impl Future<Output = Result<T, kube::Error>>) -> Result<T, StoreError> {
    timeout(future).await.map_err(unavailable)
}

pub(crate) fn unavailable(err: kube::Error) -> StoreError {
    StoreError::Unavailable(format!("Kubernetes API: {}", describe(&err)))
}

/// A short description of a kube error (its `Display` can be long and repetitive).
pub(crate) fn describe(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => pipeline_core::report::error_chain(other),
    }
}

fn is_status(err: &kube::Error, check: fn(&kube::core::Status) -> bool) -> bool {
    matches!(err, kube::Error::Api(status) if check(status))
}

#[async_trait]
impl PromotionStore for KubePromotionStore {
    async fn create_if_absent(
        &self,
        record: PromotionRecord,
    ) -> Result<(PromotionRecord, bool), StoreError> {
        // A duplicate the cache already holds costs no API call.
        if let Some(existing) = self.synced_cache().and_then(|c| c.get(&record.id))
            && is_genuine(&existing.record)
        {
            return Ok((existing.record, false));
        }
        let manual = record.phase == Phase::WaitingApproval;
        let object = convert::promotion_for(&record, manual);
        let api: Api<Promotion> = Api::namespaced(self.client.clone(), &record.pipeline.namespace);
        match timeout(api.create(&PostParams::default(), &object)).await {
            Ok(created) => {
                // One write: a Promotion without status reads as its initial phase,
                // derived from its spec, and a Pending one runs within moments. One that
                // waits for a person gets its status written too, so `kubectl get
                // promotions` shows WaitingApproval while it waits.
                self.remember(&record.id, &record.pipeline.namespace);
                let mut stored = created;
                if manual && let Some(base) = CachedPromotion::of(&stored) {
                    match self.write_status(&base, &record).await {
                        Ok(written) => stored = written,
                        Err(err) => {
                            tracing::debug!(promotion = %record.id, error = %describe(&err), "initial status not written; the object reads as its initial phase");
                        }
                    }
                }
                self.cache_write(&stored);
                self.announce(&stored, None, &record);
                Ok((record, true))
            }
            Err(err) if is_status(&err, kube::core::Status::is_already_exists) => {
                let existing = call(api.get(&record.id)).await?;
                self.remember(&record.id, &record.pipeline.namespace);
                let stored = convert::record_of(&existing).ok_or_else(|| {
                    StoreError::Unavailable(format!("promotion {} has no name", record.id))
                })?;
                Ok((stored, false))
            }
            Err(err) => Err(unavailable(err)),
        }
    }

    async fn get(&self, id: &str) -> Result<Option<PromotionRecord>, StoreError> {
        if let Some(cache) = self.synced_cache() {
            return Ok(cache.get(id).map(|e| e.record).filter(is_genuine));
        }
        Ok(self.find(id).await?.as_ref().and_then(convert::record_of))
    }

    async fn list(&self, filter: &PromotionFilter) -> Result<Vec<PromotionRecord>, StoreError> {
        if let Some(cache) = self.synced_cache() {
            let mut records = cache.records(|r| filter.matches(r) && is_genuine(r));
            records.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
            return Ok(records);
        }
        let (api, params): (Api<Promotion>, ListParams) = match &filter.pipeline {
            Some(p) => (
                Api::namespaced(self.client.clone(), &p.namespace),
                ListParams::default(),
            ),
            None => (Api::all(self.client.clone()), ListParams::default()),
        };
        let items = call(api.list(&params)).await?.items;
        let mut records: Vec<PromotionRecord> = items
            .iter()
            .filter_map(convert::record_of)
            .filter(|r| filter.matches(r))
            .collect();
        for r in &records {
            self.remember(&r.id, &r.pipeline.namespace);
        }
        records.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        Ok(records)
    }

    async fn modify(
        &self,
        id: &str,
        change: RecordChange<'_>,
    ) -> Result<PromotionRecord, StoreError> {
        // The first try starts from the cache; after a conflict, from the API.
        let mut base = self.synced_cache().and_then(|c| c.get(id));
        for _ in 0..CONFLICT_RETRIES {
            let current = match base.take() {
                Some(cached) => cached,
                None => self
                    .find(id)
                    .await?
                    .as_ref()
                    .and_then(CachedPromotion::of)
                    .ok_or_else(|| StoreError::NotFound(id.to_string()))?,
            };
            let before = current.record.clone();
            let mut after = before.clone();
            change(&mut after)?;
            if after == before {
                return Ok(after);
            }
            match self.write_status(&current, &after).await {
                Ok(stored) => {
                    self.cache_write(&stored);
                    self.announce(&stored, Some(&before), &after);
                    return Ok(convert::record_of(&stored).unwrap_or(after));
                }
                Err(err) if is_status(&err, kube::core::Status::is_conflict) => {
                    tracing::debug!(promotion = %id, "conflicting status write; retrying");
                    continue;
                }
                Err(err) if is_status(&err, kube::core::Status::is_not_found) => {
                    self.forget(id);
                    return Err(StoreError::NotFound(id.to_string()));
                }
                Err(err) => return Err(unavailable(err)),
            }
        }
        Err(StoreError::Unavailable(format!(
            "promotion {id}: status kept changing under us ({CONFLICT_RETRIES} conflicting writes)"
        )))
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        let namespace = match self.synced_cache().and_then(|c| c.get(id)) {
            Some(cached) => cached.record.pipeline.namespace,
            None => match self.find(id).await? {
                Some(found) => found.metadata.namespace.unwrap_or_default(),
                None => return Ok(()),
            },
        };
        let api: Api<Promotion> = Api::namespaced(self.client.clone(), &namespace);
        match timeout(api.delete(id, &kube::api::DeleteParams::default())).await {
            Ok(_) => {}
            Err(err) if is_status(&err, kube::core::Status::is_not_found) => {}
            Err(err) => return Err(unavailable(err)),
        }
        self.forget(id);
        if let Some(cache) = &self.cache {
            cache.forget(id);
        }
        Ok(())
    }

    async fn unfinished(&self) -> Result<Vec<PromotionRecord>, StoreError> {
        if let Some(cache) = self.synced_cache() {
            return Ok(cache
                .records(|r| matches!(r.phase, Phase::Pending | Phase::Running) && is_genuine(r)));
        }
        let api: Api<Promotion> = Api::all(self.client.clone());
        let items = call(api.list(&ListParams::default())).await?.items;
        Ok(items
            .iter()
            .filter_map(convert::record_of)
            .filter(|r| matches!(r.phase, Phase::Pending | Phase::Running) && is_genuine(r))
            .inspect(|r| self.remember(&r.id, &r.pipeline.namespace))
            .collect())
    }
}
