//! One watch of every Promotion, shared by the store (reads, duplicate checks, the
//! executor's scans), the reconciler (decisions people wrote) and the executor's wake-ups,
//! so no part of the controller LISTs Promotions on a timer.
//!
//! It keeps what the controller needs of each object (the record, where it lives, the
//! version it was read at, the decisions written into it), not the objects themselves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, ResourceExt};
use pipeline_core::PromotionRecord;
use pipeline_crds::{Approval, Promotion, RETRIED_BY_ANNOTATION, RETRY_ANNOTATION};
use tokio::sync::Notify;

use crate::convert;
use crate::watch::AbortOnDrop;

/// Table capacity below which deletions never shrink it (a few hundred entries: a
/// burst's table is not kept for the quiet that follows).
const SHRINK_ABOVE: usize = 256;

/// What is kept of one Promotion.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedPromotion {
    pub record: PromotionRecord,
    pub resource_version: Option<String>,
    pub generation: Option<i64>,
    /// Status conditions, so rewriting the status keeps their transition times.
    pub conditions: Vec<Condition>,
    /// `spec.approval`, as people wrote it.
    pub approval: Option<Approval>,
    /// The retry annotation's value and who asked, if set.
    pub retry_request: Option<(String, Option<String>)>,
}

impl CachedPromotion {
    pub fn of(promotion: &Promotion) -> Option<Self> {
        let record = convert::record_of(promotion)?;
        let annotations = promotion.metadata.annotations.as_ref();
        let retry_request = annotations
            .and_then(|a| a.get(RETRY_ANNOTATION))
            .filter(|v| !v.is_empty())
            .map(|token| {
                (
                    token.clone(),
                    annotations
                        .and_then(|a| a.get(RETRIED_BY_ANNOTATION))
                        .cloned(),
                )
            });
        Some(Self {
            record,
            resource_version: promotion.resource_version(),
            generation: promotion.metadata.generation,
            conditions: promotion
                .status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default(),
            approval: promotion.spec.approval.clone(),
            retry_request,
        })
    }
}

/// Promotions of the whole cluster, as the watch last delivered them (and as our own
/// writes left them).
pub struct PromotionCache {
    entries: RwLock<HashMap<String, CachedPromotion>>,
    synced: AtomicBool,
    /// Notified on every change (the reconciler waits on it).
    changed: Arc<Notify>,
    /// Woken on every change (the executor: a record another replica created is run
    /// without waiting for a scan).
    wake: Arc<Notify>,
    task: std::sync::Mutex<Option<AbortOnDrop>>,
}

impl PromotionCache {
    /// Starts the watch; lookups fall back to the API until it has listed once.
    pub fn start(client: Client, wake: Arc<Notify>) -> Arc<Self> {
        let cache = Arc::new(Self {
            entries: RwLock::default(),
            synced: AtomicBool::new(false),
            changed: Arc::new(Notify::new()),
            wake,
            task: std::sync::Mutex::new(None),
        });
        let weak = Arc::downgrade(&cache);
        let task = tokio::spawn(async move {
            let stream = watcher(Api::<Promotion>::all(client), watcher::Config::default())
                .default_backoff();
            futures::pin_mut!(stream);
            let mut listing: HashMap<String, CachedPromotion> = HashMap::new();
            let warnings = pipeline_core::Throttle::new(Duration::from_secs(60));
            while let Some(item) = stream.next().await {
                let Some(cache) = weak.upgrade() else { return };
                match item {
                    Ok(Event::Init) => listing.clear(),
                    Ok(Event::InitApply(object)) => {
                        if let Some(entry) = CachedPromotion::of(&object) {
                            listing.insert(entry.record.id.clone(), entry);
                        }
                    }
                    Ok(Event::InitDone) => {
                        *cache
                            .entries
                            .write()
                            .unwrap_or_else(PoisonError::into_inner) = std::mem::take(&mut listing);
                        cache.synced.store(true, Ordering::SeqCst);
                        cache.announce();
                    }
                    Ok(Event::Apply(object)) => {
                        if let Some(entry) = CachedPromotion::of(&object) {
                            cache.put(entry);
                        }
                    }
                    Ok(Event::Delete(object)) => {
                        cache.forget(&object.name_any());
                        cache.announce();
                    }
                    Err(err) => {
                        if warnings.admit().is_some() {
                            tracing::warn!(error = %err, "Promotion watch failed; retrying");
                        }
                    }
                }
            }
        });
        *cache.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(AbortOnDrop(task));
        cache
    }

    fn announce(&self) {
        self.changed.notify_waiters();
        self.changed.notify_one();
        self.wake.notify_one();
    }

    /// Whether the cache has listed once, so it can answer alone.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    /// Waits (at most `limit`) until the cache has listed once.
    pub async fn wait_synced(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.synced() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    pub fn get(&self, id: &str) -> Option<CachedPromotion> {
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// Entries with `keep` true, without copying the others.
    pub fn entries(&self, keep: impl Fn(&CachedPromotion) -> bool) -> Vec<CachedPromotion> {
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|e| keep(e))
            .cloned()
            .collect()
    }

    /// Records with `keep` true, without copying the others.
    pub fn records(&self, keep: impl Fn(&PromotionRecord) -> bool) -> Vec<PromotionRecord> {
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|e| keep(&e.record))
            .map(|e| e.record.clone())
            .collect()
    }

    /// Notified on every change.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// Takes in what a write of ours returned, unless the watch already brought a newer
    /// version (etcd's resource versions grow).
    pub fn put(&self, entry: CachedPromotion) {
        let newer = |a: &Option<String>, b: &Option<String>| match (a, b) {
            (Some(a), Some(b)) => match (a.parse::<u64>(), b.parse::<u64>()) {
                (Ok(a), Ok(b)) => a >= b,
                _ => true,
            },
            _ => true,
        };
        {
            let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
            match entries.get(&entry.record.id) {
                Some(current) if !newer(&entry.resource_version, &current.resource_version) => {
                    return;
                }
                _ => {
                    entries.insert(entry.record.id.clone(), entry);
                }
            }
        }
        self.announce();
    }

    pub fn forget(&self, id: &str) {
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        entries.remove(id);
        // A table keeps the size of its largest burst: give it back once mostly empty.
        let (len, capacity) = (entries.len(), entries.capacity());
        if capacity > SHRINK_ABOVE && len * 4 < capacity {
            entries.shrink_to(len * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline_core::{PipelineRef, Trigger};

    fn idle_cache() -> PromotionCache {
        PromotionCache {
            entries: RwLock::default(),
            synced: AtomicBool::new(true),
            changed: Arc::new(Notify::new()),
            wake: Arc::new(Notify::new()),
            task: std::sync::Mutex::new(None),
        }
    }

    fn entry(i: usize) -> CachedPromotion {
        CachedPromotion {
            record: PromotionRecord::new(
                PipelineRef::new("ns", "p"),
                "dev",
                "prod",
                &format!("1.0.{i}"),
                false,
                Trigger::default(),
                chrono::Utc::now(),
            ),
            resource_version: Some("1".into()),
            generation: Some(1),
            conditions: Vec::new(),
            approval: None,
            retry_request: None,
        }
    }

    #[test]
    fn the_table_shrinks_once_a_burst_is_deleted() {
        let cache = idle_cache();
        let ids: Vec<String> = (0..5000)
            .map(|i| {
                let entry = entry(i);
                let id = entry.record.id.clone();
                cache.put(entry);
                id
            })
            .collect();
        let capacity = |cache: &PromotionCache| cache.entries.read().unwrap().capacity();
        assert!(capacity(&cache) >= 5000);
        for id in &ids[10..] {
            cache.forget(id);
        }
        assert!(capacity(&cache) <= 2 * SHRINK_ABOVE, "{}", capacity(&cache));
        for id in &ids[..10] {
            assert!(cache.get(id).is_some(), "{id} kept");
        }
    }
}
