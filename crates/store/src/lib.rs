//! Embedded promotion store on redb: one file, ACID transactions, durable on commit.
//!
//! Layout of the file (all tables written in the same write transaction, so the indexes
//! never disagree with the records):
//!
//! - `records`: id → record as JSON. The source of truth.
//! - `by_created`: (newest-first time key, id) → (). Lets `list` stream newest first
//!   instead of sorting every record in memory.
//! - `by_pipeline`: (namespace, name, newest-first time key, id) → (). Lets `list` for
//!   one pipeline read only that pipeline's records.
//! - `unfinished`: id → () for `Pending` and `Running` records, so the executor's poll
//!   never reads terminal records.
//! - `meta`: `schema_version` → u64, so an older binary refuses a newer file instead of
//!   misreading it.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use pipeline_core::ports::RecordChange;
use pipeline_core::{Phase, PromotionFilter, PromotionRecord, PromotionStore, StoreError};
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, WriteTransaction,
};

/// The layout version this build writes and understands.
pub const SCHEMA_VERSION: u64 = 1;

const SCHEMA_VERSION_KEY: &str = "schema_version";

/// Page cache cap. redb's default (1 GiB) is sized for databases, not for a controller
/// whose whole store is typically a few megabytes.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
const BY_CREATED: TableDefinition<(u64, u32, &str), ()> = TableDefinition::new("by_created");
const BY_PIPELINE: TableDefinition<(&str, &str, u64, u32, &str), ()> =
    TableDefinition::new("by_pipeline");
const UNFINISHED: TableDefinition<&str, ()> = TableDefinition::new("unfinished");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Why [`RedbPromotionStore::open`] failed. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// redb locks the file for its writer; a second opener (another process, or another
    /// handle in this one) is refused rather than allowed to corrupt it.
    #[error(
        "promotion store {} is already open by another process (or another handle in this one); redb holds an exclusive lock on the file",
        path.display()
    )]
    AlreadyOpen { path: PathBuf },
    /// Written by a newer build; reading it could silently drop fields or misorder data.
    #[error(
        "promotion store {} has schema version {found}, newer than the supported {supported}; upgrade pipeline-controller",
        path.display()
    )]
    UnsupportedSchema {
        path: PathBuf,
        found: u64,
        supported: u64,
    },
    #[error("cannot open promotion store {}: {source}", path.display())]
    Storage {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Promotion records in one redb file.
///
/// Cloning is cheap and shares the open database. Every write commits with redb's
/// default `Durability::Immediate`: a call returns only after the data is fsynced.
#[derive(Clone)]
pub struct RedbPromotionStore {
    db: Arc<Database>,
    path: Arc<Path>,
}

impl fmt::Debug for RedbPromotionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbPromotionStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RedbPromotionStore {
    /// Opens `path`, creating the file and its missing parent directories. Blocking: call
    /// it at startup, or from `spawn_blocking`.
    ///
    /// The integrity of the file is checked on every open (it reads the whole file once),
    /// so a damaged file is refused with an error instead of panicking later in redb.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        let storage = |source: Box<dyn std::error::Error + Send + Sync>| OpenError::Storage {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| storage(Box::new(e)))?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(path)
            .map_err(|err| match err {
                DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
                    OpenError::AlreadyOpen {
                        path: path.to_path_buf(),
                    }
                }
                other => storage(Box::new(other)),
            })?;
        init_schema(&db, path)?;
        tracing::info!(path = %path.display(), "promotion store opened");
        Ok(Self {
            db: Arc::new(db),
            path: Arc::from(path),
        })
    }

    /// The file this store was opened on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on the blocking pool: redb does file I/O and fsync synchronously.
    async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(join_failed)?
    }
}

/// Creates every table (so read transactions never meet a missing one) and checks or
/// stamps the schema version, in one transaction.
fn init_schema(db: &Database, path: &Path) -> Result<(), OpenError> {
    let storage = |err: redb::Error| OpenError::Storage {
        path: path.to_path_buf(),
        source: Box::new(err),
    };
    let txn = db.begin_write().map_err(|e| storage(e.into()))?;
    let found = {
        let mut meta = txn.open_table(META).map_err(|e| storage(e.into()))?;
        let found = meta
            .get(SCHEMA_VERSION_KEY)
            .map_err(|e| storage(e.into()))?
            .map(|v| v.value());
        if found.is_none() {
            meta.insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION)
                .map_err(|e| storage(e.into()))?;
        }
        found
    };
    if let Some(found) = found.filter(|v| *v > SCHEMA_VERSION) {
        // Nothing of ours was written: leave the newer file exactly as it was.
        txn.abort().map_err(|e| storage(e.into()))?;
        return Err(OpenError::UnsupportedSchema {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    // Future schema migrations from `found` to SCHEMA_VERSION go here.
    Tables::open(&txn).map_err(|e| OpenError::Storage {
        path: path.to_path_buf(),
        source: Box::new(e),
    })?;
    txn.commit().map_err(|e| storage(e.into()))?;
    Ok(())
}

fn unavailable(err: impl Into<redb::Error>) -> StoreError {
    StoreError::Unavailable(err.into().to_string())
}

fn join_failed(err: tokio::task::JoinError) -> StoreError {
    StoreError::Unavailable(format!("store task did not complete: {err}"))
}

/// The executor's working set; kept in the `unfinished` index.
fn is_unfinished(phase: Phase) -> bool {
    matches!(phase, Phase::Pending | Phase::Running)
}

/// A key whose ascending byte order is descending time: forward iteration is newest
/// first, ties broken by id ascending (the id follows in the index key).
fn newest_first(at: DateTime<Utc>) -> (u64, u32) {
    // Flipping the sign bit maps i64 order onto u64 order; negating reverses it.
    let seconds = !(at.timestamp().cast_unsigned() ^ (1 << 63));
    // Leap seconds may carry nanos up to 1_999_999_999, still below u32::MAX.
    let nanos = u32::MAX - at.timestamp_subsec_nanos();
    (seconds, nanos)
}

fn encode(record: &PromotionRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record)
        .map_err(|e| StoreError::Unavailable(format!("cannot encode promotion {}: {e}", record.id)))
}

/// A damaged value is an outage of this record, never a panic.
fn decode(id: &str, bytes: &[u8]) -> Result<PromotionRecord, StoreError> {
    let record: PromotionRecord = serde_json::from_slice(bytes).map_err(|e| {
        tracing::error!(promotion = %id, error = %e, "stored promotion record is corrupt");
        StoreError::Unavailable(format!("stored promotion {id} is corrupt: {e}"))
    })?;
    if record.id != id {
        tracing::error!(promotion = %id, stored_id = %record.id, "stored promotion record is under the wrong key");
        return Err(StoreError::Unavailable(format!(
            "stored promotion {id} is corrupt: it holds record {}",
            record.id
        )));
    }
    Ok(record)
}

/// Reads one record through any readable `records` table.
fn load(
    records: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<Option<PromotionRecord>, StoreError> {
    match records.get(id).map_err(unavailable)? {
        Some(bytes) => decode(id, bytes.value()).map(Some),
        None => Ok(None),
    }
}

/// Reads the record an index entry points at; a dangling entry means a damaged file.
fn load_indexed(
    records: &impl ReadableTable<&'static str, &'static [u8]>,
    index: &str,
    id: &str,
) -> Result<PromotionRecord, StoreError> {
    load(records, id)?.ok_or_else(|| {
        tracing::error!(promotion = %id, index, "index entry without a record");
        StoreError::Unavailable(format!(
            "index {index} names promotion {id}, which is not stored"
        ))
    })
}

/// The tables a write touches, opened once per write transaction.
struct Tables<'txn> {
    records: Table<'txn, &'static str, &'static [u8]>,
    by_created: Table<'txn, (u64, u32, &'static str), ()>,
    by_pipeline: Table<'txn, (&'static str, &'static str, u64, u32, &'static str), ()>,
    unfinished: Table<'txn, &'static str, ()>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            records: txn.open_table(RECORDS).map_err(unavailable)?,
            by_created: txn.open_table(BY_CREATED).map_err(unavailable)?,
            by_pipeline: txn.open_table(BY_PIPELINE).map_err(unavailable)?,
            unfinished: txn.open_table(UNFINISHED).map_err(unavailable)?,
        })
    }

    /// Writes `new` (replacing `old`, if it was stored) and keeps every index in step.
    fn put(
        &mut self,
        old: Option<&PromotionRecord>,
        new: &PromotionRecord,
    ) -> Result<(), StoreError> {
        let json = encode(new)?;
        self.records
            .insert(new.id.as_str(), json.as_slice())
            .map_err(unavailable)?;

        let moved =
            old.is_none_or(|old| old.created_at != new.created_at || old.pipeline != new.pipeline);
        if moved {
            if let Some(old) = old {
                let (seconds, nanos) = newest_first(old.created_at);
                self.by_created
                    .remove((seconds, nanos, old.id.as_str()))
                    .map_err(unavailable)?;
                self.by_pipeline
                    .remove((
                        old.pipeline.namespace.as_str(),
                        old.pipeline.name.as_str(),
                        seconds,
                        nanos,
                        old.id.as_str(),
                    ))
                    .map_err(unavailable)?;
            }
            let (seconds, nanos) = newest_first(new.created_at);
            self.by_created
                .insert((seconds, nanos, new.id.as_str()), ())
                .map_err(unavailable)?;
            self.by_pipeline
                .insert(
                    (
                        new.pipeline.namespace.as_str(),
                        new.pipeline.name.as_str(),
                        seconds,
                        nanos,
                        new.id.as_str(),
                    ),
                    (),
                )
                .map_err(unavailable)?;
        }

        if is_unfinished(new.phase) {
            self.unfinished
                .insert(new.id.as_str(), ())
                .map_err(unavailable)?;
        } else if old.is_some_and(|old| is_unfinished(old.phase)) {
            self.unfinished
                .remove(new.id.as_str())
                .map_err(unavailable)?;
        }
        Ok(())
    }
}

#[async_trait]
impl PromotionStore for RedbPromotionStore {
    async fn create_if_absent(
        &self,
        record: PromotionRecord,
    ) -> Result<(PromotionRecord, bool), StoreError> {
        // Check and insert in one write transaction: redb runs one writer at a time, so
        // concurrent creators of one id serialize here and exactly one inserts.
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let existing = {
                let mut tables = Tables::open(&txn)?;
                let existing = load(&tables.records, &record.id)?;
                if existing.is_none() {
                    tables.put(None, &record)?;
                }
                existing
            };
            match existing {
                Some(existing) => {
                    txn.abort().map_err(unavailable)?;
                    Ok((existing, false))
                }
                None => {
                    // Durability::Immediate (the default): fsynced before commit returns.
                    txn.commit().map_err(unavailable)?;
                    tracing::debug!(promotion = %record.id, "promotion record created");
                    Ok((record, true))
                }
            }
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<PromotionRecord>, StoreError> {
        let id = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let records = txn.open_table(RECORDS).map_err(unavailable)?;
            load(&records, &id)
        })
        .await
    }

    async fn list(&self, filter: &PromotionFilter) -> Result<Vec<PromotionRecord>, StoreError> {
        let filter = filter.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let records = txn.open_table(RECORDS).map_err(unavailable)?;
            let mut out = Vec::new();
            if let Some(pipeline) = &filter.pipeline {
                let index = txn.open_table(BY_PIPELINE).map_err(unavailable)?;
                let namespace = pipeline.namespace.as_str();
                let name = pipeline.name.as_str();
                let start = (namespace, name, 0u64, 0u32, "");
                for entry in index.range(start..).map_err(unavailable)? {
                    let (key, _) = entry.map_err(unavailable)?;
                    let (ns, n, _, _, id) = key.value();
                    if ns != namespace || n != name {
                        break;
                    }
                    let record = load_indexed(&records, "by_pipeline", id)?;
                    if filter.matches(&record) {
                        out.push(record);
                    }
                }
            } else {
                let index = txn.open_table(BY_CREATED).map_err(unavailable)?;
                for entry in index.iter().map_err(unavailable)? {
                    let (key, _) = entry.map_err(unavailable)?;
                    let (_, _, id) = key.value();
                    let record = load_indexed(&records, "by_created", id)?;
                    if filter.matches(&record) {
                        out.push(record);
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn modify(
        &self,
        id: &str,
        change: RecordChange<'_>,
    ) -> Result<PromotionRecord, StoreError> {
        // `change` borrows from the caller, so it cannot move to the blocking pool.
        // Instead the write transaction travels: begun and read there, changed here,
        // then written and committed there. It stays one transaction throughout, so
        // the change is applied exactly once and no other writer interleaves.
        let key = id.to_string();
        let (txn, current) = self
            .blocking(move |db| {
                let txn = db.begin_write().map_err(unavailable)?;
                let current = {
                    let records = txn.open_table(RECORDS).map_err(unavailable)?;
                    load(&records, &key)?
                };
                match current {
                    Some(current) => Ok((txn, current)),
                    None => {
                        txn.abort().map_err(unavailable)?;
                        Err(StoreError::NotFound(key))
                    }
                }
            })
            .await?;

        let mut next = current.clone();
        // On any early return below `txn` is dropped, which aborts it: nothing was
        // written, so that is only the release of the write lock. A panicking change is
        // caught only to abort first: dropping a write transaction while unwinding makes
        // redb leak its pages until the next open.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| change(&mut next)));
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(panic) => {
                drop(txn);
                std::panic::resume_unwind(panic);
            }
        };
        outcome?;
        if next.id != current.id {
            return Err(StoreError::Unavailable(format!(
                "a change to promotion {} tried to alter its id",
                current.id
            )));
        }
        if next == current {
            return Ok(next);
        }

        // A write transaction keeps its database open by itself.
        tokio::task::spawn_blocking(move || {
            {
                let mut tables = Tables::open(&txn)?;
                tables.put(Some(&current), &next)?;
            }
            txn.commit().map_err(unavailable)?;
            Ok(next)
        })
        .await
        .map_err(join_failed)?
    }

    async fn unfinished(&self) -> Result<Vec<PromotionRecord>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let records = txn.open_table(RECORDS).map_err(unavailable)?;
            let index = txn.open_table(UNFINISHED).map_err(unavailable)?;
            let mut out = Vec::with_capacity(usize::try_from(index.len().map_err(unavailable)?).unwrap_or(0));
            for entry in index.iter().map_err(unavailable)? {
                let (key, _) = entry.map_err(unavailable)?;
                let id = key.value();
                let record = load_indexed(&records, "unfinished", id)?;
                if is_unfinished(record.phase) {
                    out.push(record);
                } else {
                    tracing::warn!(promotion = %id, phase = %record.phase, "unfinished index lists a finished record; skipped");
                }
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests;
