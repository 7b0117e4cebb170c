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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use pipeline_core::ports::RecordChange;
use pipeline_core::{
    Phase, PromotionFilter, PromotionRecord, PromotionStore, StoreError, Throttle,
};
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
    /// An existing empty file most likely means the data was lost (a truncated copy, a
    /// full disk while it was written); silently starting afresh would hide that.
    #[error(
        "promotion store {} exists but is empty (0 bytes), which usually means its data was lost; restore it from a backup, or start with an empty store by passing --init-empty-state",
        path.display()
    )]
    EmptyFile { path: PathBuf },
    #[error("cannot open promotion store {}: {source}", path.display())]
    Storage {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// How [`RedbPromotionStore::open_with`] treats the file.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Start with an empty store when the file exists with 0 bytes, instead of refusing.
    pub init_empty_file: bool,
}

/// First wait before reopening the file after a storage failure; doubles up to
/// [`MAX_REOPEN_BACKOFF`], so a disk that has room again is used within seconds.
const MIN_REOPEN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_REOPEN_BACKOFF: Duration = Duration::from_secs(5);

/// While the store keeps failing, its warning is repeated at most this often.
const FAULT_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Promotion records in one redb file.
///
/// Cloning is cheap and shares the open database. Every write commits with redb's
/// default `Durability::Immediate`: a call returns only after the data is fsynced.
///
/// After an I/O failure redb refuses all further work on that handle ("previous I/O
/// error"), so the store drops the handle and reopens the file itself, with backoff,
/// until a durable probe write succeeds; until then every call answers `Unavailable`.
#[derive(Clone)]
pub struct RedbPromotionStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// The open database; replaced when the file is reopened after a failure.
    db: Mutex<Option<Arc<Database>>>,
    fault: Mutex<Option<Fault>>,
    /// Failure and recovery lines, across episodes: a disk that keeps filling up does
    /// not write a pair of lines per episode.
    announcements: Throttle,
    /// Writes waiting for the next group commit.
    writes: Mutex<Vec<QueuedWrite>>,
    /// Whether a caller is committing queued writes now.
    committing: AtomicBool,
}

/// A write for the next group commit.
enum Write {
    /// Create the record unless one with its id exists.
    Create(Box<PromotionRecord>),
    /// Replace the stored record with `next` if it is still `expected` (compare and set:
    /// the change was computed from `expected` outside the transaction).
    Replace {
        expected: Box<PromotionRecord>,
        next: Box<PromotionRecord>,
    },
}

/// What a [`Write`] did.
enum Written {
    /// The stored record, and whether this write created it.
    Created(Box<PromotionRecord>, bool),
    /// Whether the record was replaced (false: it had changed since it was read).
    Replaced(bool),
}

/// A write and where its caller waits for the outcome.
type QueuedWrite = (
    Write,
    tokio::sync::oneshot::Sender<Result<Written, StoreError>>,
);

/// Most writes one transaction takes.
const MAX_BATCH: usize = 512;

/// How often `modify` recomputes a change whose record another write changed meanwhile.
const MAX_REPLACE_ATTEMPTS: usize = 64;

/// Applies `writes` in order in one write transaction; commits (one fsync) only when
/// something changed. A replace of a record that changed since it was read (also by an
/// earlier write of the batch) is refused, so its caller recomputes it.
fn write_batch(db: &Database, writes: Vec<Write>) -> Result<Vec<Written>, Failure> {
    let txn = db.begin_write().map_err(io)?;
    let mut results = Vec::with_capacity(writes.len());
    let mut changed = 0;
    {
        let mut tables = Tables::open(&txn)?;
        for write in writes {
            match write {
                Write::Create(record) => match load(&tables.records, &record.id)? {
                    Some(existing) => results.push(Written::Created(Box::new(existing), false)),
                    None => {
                        tables.put(None, &record)?;
                        changed += 1;
                        results.push(Written::Created(record, true));
                    }
                },
                Write::Replace { expected, next } => {
                    match load(&tables.records, &expected.id)? {
                        Some(stored) if stored == *expected => {
                            tables.put(Some(&stored), &next)?;
                            changed += 1;
                            results.push(Written::Replaced(true));
                        }
                        // Changed meanwhile, or deleted: the caller reads it again (and
                        // then finds it changed, or gone).
                        Some(_) | None => results.push(Written::Replaced(false)),
                    }
                }
            }
        }
    }
    if changed == 0 {
        txn.abort().map_err(io)?;
    } else {
        // Durability::Immediate (the default): fsynced before commit returns.
        txn.commit().map_err(io)?;
        tracing::debug!(changed, "promotion records written");
    }
    Ok(results)
}

/// A storage failure the store has not recovered from yet.
struct Fault {
    message: String,
    since: Instant,
    retry_at: Instant,
    backoff: Duration,
    warnings: Throttle,
    /// Whether its start was logged (then its end is too).
    announced: bool,
}

impl fmt::Debug for RedbPromotionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbPromotionStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why an operation on the open database failed: the storage itself (the handle must be
/// reopened) or the data or request (the handle is fine).
enum Failure {
    Storage(redb::Error),
    Store(StoreError),
}

impl From<StoreError> for Failure {
    fn from(err: StoreError) -> Self {
        Failure::Store(err)
    }
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Storage(err) => StoreError::Unavailable(err.to_string()),
            Failure::Store(err) => err,
        }
    }
}

fn io(err: impl Into<redb::Error>) -> Failure {
    Failure::Storage(err.into())
}

impl RedbPromotionStore {
    /// Opens `path`, creating the file and its missing parent directories, and refusing
    /// an existing empty file. Blocking: call it at startup, or from `spawn_blocking`.
    ///
    /// The integrity of the file is checked on every open (it reads the whole file once),
    /// so a damaged file is refused with an error instead of panicking later in redb.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        Self::open_with(path, OpenOptions::default())
    }

    pub fn open_with(path: &Path, options: OpenOptions) -> Result<Self, OpenError> {
        let storage = |source: Box<dyn std::error::Error + Send + Sync>| OpenError::Storage {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| storage(Box::new(e)))?;
        }
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() && meta.len() == 0 => {
                if !options.init_empty_file {
                    return Err(OpenError::EmptyFile {
                        path: path.to_path_buf(),
                    });
                }
                tracing::warn!(path = %path.display(), "state file is empty; starting with an empty promotion store as --init-empty-state asks");
            }
            _ => {}
        }
        let db = open_database(path)?;
        tracing::info!(path = %path.display(), "promotion store opened");
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                db: Mutex::new(Some(Arc::new(db))),
                fault: Mutex::new(None),
                announcements: Throttle::new(FAULT_LOG_INTERVAL),
                writes: Mutex::new(Vec::new()),
                committing: AtomicBool::new(false),
            }),
        })
    }

    /// The file this store was opened on.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Commits queued writes, batch after batch, until the queue is empty. Runs with
    /// `committing` set by its starter.
    async fn commit_writes(&self) {
        loop {
            let batch: Vec<QueuedWrite> = {
                let mut queue = lock(&self.inner.writes);
                let take = queue.len().min(MAX_BATCH);
                queue.drain(..take).collect()
            };
            if batch.is_empty() {
                self.inner.committing.store(false, Ordering::SeqCst);
                // A writer may have queued after the drain and before the reset.
                if lock(&self.inner.writes).is_empty()
                    || self.inner.committing.swap(true, Ordering::SeqCst)
                {
                    return;
                }
                continue;
            }
            let (writes, answers): (Vec<Write>, Vec<_>) = batch.into_iter().unzip();
            match self.blocking(move |db| write_batch(db, writes)).await {
                Ok(results) => {
                    for (answer, result) in answers.into_iter().zip(results) {
                        let _ = answer.send(Ok(result));
                    }
                }
                Err(err) => {
                    // Nothing of the batch was committed: every writer gets the failure.
                    for answer in answers {
                        // (A batch fails only on storage or decoding: `Unavailable`.)
                        let _ = answer.send(Err(match &err {
                            StoreError::Unavailable(message) => {
                                StoreError::Unavailable(message.clone())
                            }
                            other => StoreError::Unavailable(other.to_string()),
                        }));
                    }
                }
            }
        }
    }

    /// Queues `write` for the next group commit and waits until it is durable (or
    /// refused). The commit runs in a task of its own: a caller that goes away (its
    /// client disconnected) must not leave the queue without a committer.
    async fn group_write(&self, write: Write) -> Result<Written, StoreError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        lock(&self.inner.writes).push((write, answer));
        if !self.inner.committing.swap(true, Ordering::SeqCst) {
            let store = self.clone();
            tokio::spawn(async move { store.commit_writes().await });
        }
        answered.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the promotion store dropped a write".to_string(),
            ))
        })
    }

    /// Runs `work` on the blocking pool: redb does file I/O and fsync synchronously.
    async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, Failure> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let db = inner.database()?;
            let result = work(&db);
            drop(db);
            inner.settle(result)
        })
        .await
        .map_err(join_failed)?
    }
}

/// Opens (or creates) the database file with our settings and checks its schema.
fn open_database(path: &Path) -> Result<Database, OpenError> {
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
            other => OpenError::Storage {
                path: path.to_path_buf(),
                source: Box::new(other),
            },
        })?;
    init_schema(&db, path)?;
    Ok(db)
}

impl Inner {
    /// The database to work on, reopening the file first when a failure is due for a
    /// retry. Refuses while a failure stands and its backoff has not passed.
    fn database(&self) -> Result<Arc<Database>, StoreError> {
        let mut slot = lock(&self.db);
        let mut fault = lock(&self.fault);
        let Some(current) = fault.as_mut() else {
            return slot
                .clone()
                .ok_or_else(|| StoreError::Unavailable("promotion store is closed".into()));
        };
        let now = Instant::now();
        if now < current.retry_at {
            return Err(current.refusal());
        }
        // redb locks the file per handle: the old handle (and any transaction still
        // holding it) must be gone before the file can be opened again.
        if let Some(old) = slot.take() {
            match Arc::try_unwrap(old) {
                Ok(old) => drop(old),
                Err(shared) => {
                    *slot = Some(shared);
                    current.retry_at = now + MIN_REOPEN_BACKOFF;
                    return Err(current.refusal());
                }
            }
        }
        let reopened = open_database(&self.path)
            .map_err(|err| err.to_string())
            .and_then(|db| match probe_write(&db) {
                Ok(()) => Ok(db),
                Err(err) => {
                    *slot = Some(Arc::new(db));
                    Err(err)
                }
            });
        match reopened {
            Ok(db) => {
                if current.announced {
                    tracing::info!(
                        path = %self.path.display(),
                        after_ms = u64::try_from(current.since.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "promotion store recovered: the file was reopened and takes writes again"
                    );
                }
                *fault = None;
                let db = Arc::new(db);
                *slot = Some(Arc::clone(&db));
                Ok(db)
            }
            Err(message) => {
                current.note(message, now);
                Err(current.refusal())
            }
        }
    }

    /// Turns a work result into the caller's, recording a storage failure.
    fn settle<T>(&self, result: Result<T, Failure>) -> Result<T, StoreError> {
        match result {
            Ok(value) => Ok(value),
            Err(Failure::Store(err)) => Err(err),
            Err(Failure::Storage(err)) => {
                let message = err.to_string();
                let mut fault = lock(&self.fault);
                let now = Instant::now();
                let current = fault.get_or_insert_with(|| {
                    let announced = self.announcements.admit();
                    if let Some(earlier) = announced {
                        tracing::error!(path = %self.path.display(), error = %message, earlier_failures_not_logged = earlier, "promotion store failed; refusing writes and reopening the file with backoff until it takes writes again");
                    }
                    let warnings = Throttle::new(FAULT_LOG_INTERVAL);
                    // The error above is this interval's line.
                    warnings.admit();
                    Fault {
                        message: message.clone(),
                        since: now,
                        retry_at: now,
                        backoff: MIN_REOPEN_BACKOFF / 2,
                        warnings,
                        announced: announced.is_some(),
                    }
                });
                current.note(message, now);
                Err(current.refusal())
            }
        }
    }
}

/// Bytes a probe writes: well above a normal transaction's, so a probe that succeeds only
/// by reusing a few freed pages of a still-full disk does not declare the store healthy.
const PROBE_BYTES: usize = 1024 * 1024;

/// Durable writes of [`PROBE_BYTES`] (then their removal): prove the file takes writes
/// again, with room to spare.
fn probe_write(db: &Database) -> Result<(), String> {
    const PROBE: TableDefinition<&str, &[u8]> = TableDefinition::new("write_probe");
    let filler = vec![0x5a_u8; PROBE_BYTES];
    for value in [Some(filler.as_slice()), None] {
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut probe = txn.open_table(PROBE).map_err(|e| e.to_string())?;
            match value {
                Some(bytes) => probe.insert("probe", bytes).map(|_| ()),
                None => probe.remove("probe").map(|_| ()),
            }
            .map_err(|e| e.to_string())?;
        }
        txn.commit().map_err(|e| e.to_string())?;
    }
    Ok(())
}

impl Fault {
    /// Another failure while this one stands: back off further, log once per interval.
    fn note(&mut self, message: String, now: Instant) {
        self.backoff = (self.backoff * 2).min(MAX_REOPEN_BACKOFF);
        self.retry_at = now + self.backoff;
        self.message = message;
        if let Some(held_back) = self.warnings.admit() {
            tracing::warn!(
                error = %self.message,
                failing_for_s = self.since.elapsed().as_secs(),
                failures_not_logged = held_back,
                "promotion store still failing"
            );
        }
    }

    fn refusal(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "storage failure ({}), retrying in the background",
            self.message
        ))
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
        source: Box::new(StoreError::from(e)),
    })?;
    txn.commit().map_err(|e| storage(e.into()))?;
    Ok(())
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
) -> Result<Option<PromotionRecord>, Failure> {
    match records.get(id).map_err(io)? {
        Some(bytes) => Ok(Some(decode(id, bytes.value())?)),
        None => Ok(None),
    }
}

/// Reads the record an index entry points at; a dangling entry means a damaged file.
fn load_indexed(
    records: &impl ReadableTable<&'static str, &'static [u8]>,
    index: &str,
    id: &str,
) -> Result<PromotionRecord, Failure> {
    load(records, id)?.ok_or_else(|| {
        tracing::error!(promotion = %id, index, "index entry without a record");
        Failure::Store(StoreError::Unavailable(format!(
            "index {index} names promotion {id}, which is not stored"
        )))
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
    /// Removes `old` and its index entries.
    fn remove(&mut self, old: &PromotionRecord) -> Result<(), Failure> {
        self.records.remove(old.id.as_str()).map_err(io)?;
        self.remove_ordering(old)?;
        self.unfinished.remove(old.id.as_str()).map_err(io)?;
        Ok(())
    }

    /// Removes `old`'s entries of the two time-ordered indexes.
    fn remove_ordering(&mut self, old: &PromotionRecord) -> Result<(), Failure> {
        let (seconds, nanos) = newest_first(old.created_at);
        self.by_created
            .remove((seconds, nanos, old.id.as_str()))
            .map_err(io)?;
        self.by_pipeline
            .remove((
                old.pipeline.namespace.as_str(),
                old.pipeline.name.as_str(),
                seconds,
                nanos,
                old.id.as_str(),
            ))
            .map_err(io)?;
        Ok(())
    }

    fn open(txn: &'txn WriteTransaction) -> Result<Self, Failure> {
        Ok(Self {
            records: txn.open_table(RECORDS).map_err(io)?,
            by_created: txn.open_table(BY_CREATED).map_err(io)?,
            by_pipeline: txn.open_table(BY_PIPELINE).map_err(io)?,
            unfinished: txn.open_table(UNFINISHED).map_err(io)?,
        })
    }

    /// Writes `new` (replacing `old`, if it was stored) and keeps every index in step.
    fn put(&mut self, old: Option<&PromotionRecord>, new: &PromotionRecord) -> Result<(), Failure> {
        let json = encode(new)?;
        self.records
            .insert(new.id.as_str(), json.as_slice())
            .map_err(io)?;

        let moved =
            old.is_none_or(|old| old.created_at != new.created_at || old.pipeline != new.pipeline);
        if moved {
            if let Some(old) = old {
                self.remove_ordering(old)?;
            }
            let (seconds, nanos) = newest_first(new.created_at);
            self.by_created
                .insert((seconds, nanos, new.id.as_str()), ())
                .map_err(io)?;
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
                .map_err(io)?;
        }

        if is_unfinished(new.phase) {
            self.unfinished.insert(new.id.as_str(), ()).map_err(io)?;
        } else if old.is_some_and(|old| is_unfinished(old.phase)) {
            self.unfinished.remove(new.id.as_str()).map_err(io)?;
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
        // Group commit: concurrent writers queue up, and one task writes the whole queue
        // in one transaction (one fsync), then answers every writer. Each still gets its
        // answer only once its record is durable.
        match self.group_write(Write::Create(Box::new(record))).await? {
            Written::Created(stored, created) => Ok((*stored, created)),
            Written::Replaced(_) => Err(StoreError::Unavailable(
                "the promotion store answered a create with a replace".to_string(),
            )),
        }
    }

    async fn get(&self, id: &str) -> Result<Option<PromotionRecord>, StoreError> {
        let id = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(io)?;
            let records = txn.open_table(RECORDS).map_err(io)?;
            load(&records, &id)
        })
        .await
    }

    async fn list(&self, filter: &PromotionFilter) -> Result<Vec<PromotionRecord>, StoreError> {
        let filter = filter.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(io)?;
            let records = txn.open_table(RECORDS).map_err(io)?;
            let mut out = Vec::new();
            if let Some(pipeline) = &filter.pipeline {
                let index = txn.open_table(BY_PIPELINE).map_err(io)?;
                let namespace = pipeline.namespace.as_str();
                let name = pipeline.name.as_str();
                let start = (namespace, name, 0u64, 0u32, "");
                for entry in index.range(start..).map_err(io)? {
                    let (key, _) = entry.map_err(io)?;
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
                let index = txn.open_table(BY_CREATED).map_err(io)?;
                for entry in index.iter().map_err(io)? {
                    let (key, _) = entry.map_err(io)?;
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
        // Optimistic, so that changes share the group commit with creates and with each
        // other: read the record, apply `change` here, and have the batch write it only
        // if the record is still what was read; otherwise read it again and recompute.
        // Either way the change is applied exactly once to the version it was computed
        // from, and the answer comes once it is durable.
        for _ in 0..MAX_REPLACE_ATTEMPTS {
            let current = self
                .get(id)
                .await?
                .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
            let mut next = current.clone();
            change(&mut next)?;
            if next.id != current.id {
                return Err(StoreError::Unavailable(format!(
                    "a change to promotion {} tried to alter its id",
                    current.id
                )));
            }
            if next == current {
                return Ok(next);
            }
            let write = Write::Replace {
                expected: Box::new(current),
                next: Box::new(next.clone()),
            };
            match self.group_write(write).await? {
                Written::Replaced(true) => return Ok(next),
                Written::Replaced(false) => continue,
                Written::Created(..) => {
                    return Err(StoreError::Unavailable(
                        "the promotion store answered a replace with a create".to_string(),
                    ));
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "promotion {id} kept changing while it was being changed ({MAX_REPLACE_ATTEMPTS} tries)"
        )))
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(io)?;
            {
                let mut tables = Tables::open(&txn)?;
                if let Some(old) = load(&tables.records, &id)? {
                    tables.remove(&old)?;
                }
            }
            txn.commit().map_err(io)?;
            Ok(())
        })
        .await
    }

    /// Ready when the file takes writes: after a storage failure this stays refused until
    /// the file was reopened and a probe write was durable.
    async fn ready(&self) -> Result<(), StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(io)?;
            txn.open_table(META).map_err(io)?;
            Ok(())
        })
        .await
    }

    async fn unfinished(&self) -> Result<Vec<PromotionRecord>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(io)?;
            let records = txn.open_table(RECORDS).map_err(io)?;
            let index = txn.open_table(UNFINISHED).map_err(io)?;
            let mut out = Vec::with_capacity(usize::try_from(index.len().map_err(io)?).unwrap_or(0));
            for entry in index.iter().map_err(io)? {
                let (key, _) = entry.map_err(io)?;
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
