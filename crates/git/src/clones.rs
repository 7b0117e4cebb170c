//! Warm clones of the repositories pull-request promotions edit, kept between promotions.
//!
//! One clone per repository and base branch lives in `<work dir>/clones/<name>`, where
//! `<name>` is the repository's last path segment and 16 hex digits of a hash of the
//! normalized repository URL (scheme, lower-case host, port, path, SSH user) and the base
//! branch. The full key is written to `.git/pipeline-controller-clone` and checked on every
//! use, so a hash collision or a foreign directory is never mistaken for the clone.
//!
//! - A clone is used by one promotion at a time: an async lock per clone, taken inside the
//!   strategy's per-repository lock, and an exclusive file lock on `clones/<name>.lock`, so
//!   that even two processes given the same work dir never use one clone at once.
//! - Fresh clones are made in `clones/.tmp-*` and renamed into place once complete, so a
//!   crash never leaves a half-made clone under a clone's name.
//! - The cache is bounded: after each use the clone's size is measured (a directory walk,
//!   on a blocking thread, in the background: the promotion does not wait for it) and the
//!   least recently used clones that nobody is using are removed until the total is within
//!   the byte and clone limits. The clone just used is removed last, so one clone larger
//!   than the whole budget is not kept.
//! - Clones left by an earlier run are adopted at the first use of the cache (sized in the
//!   background); leftovers of interrupted clones or removals are deleted.
//! - A clone has no work tree: it is made with `git clone --no-checkout`, and the strategy
//!   reads and writes git objects only, so a clone of a 10,000-file repository is its
//!   packed objects (a few MiB), not a checkout.
//! - No credential is ever written into a clone: git gets them per command through the
//!   environment (see [`crate::git`]); `.git/config` holds the plain repository URL.
//!
//! The `clones` directory must be owned by this process's user and is made `0700`, and the
//! work dir must be owned by this user too (or be a sticky directory of root's, like
//! `/tmp`); when not (for example a `clones` planted by another user in a shared `/tmp`),
//! the cache is turned off with a warning and every attempt clones into a temporary
//! directory. git itself also refuses repositories owned by another user.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::git::{GitError, GitErrorKind};
use crate::repo_url::RepoUrl;

/// Default limit of the cache's total size on disk: 2 GiB.
pub const DEFAULT_CLONE_CACHE_MAX_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Default limit of the number of clones kept.
pub const DEFAULT_CLONE_CACHE_MAX_CLONES: usize = 32;
/// A clone is garbage-collected (`git gc --prune=now`) after this many uses, so the objects
/// of old promotion commits and fetched base commits do not pile up.
pub(crate) const GC_EVERY: u32 = 50;

/// The directory under the work dir that holds the clones.
pub const CLONES_DIR: &str = "clones";
/// File in a clone's `.git` directory naming what it is a clone of.
const META_FILE: &str = "pipeline-controller-clone";
const TMP_PREFIX: &str = ".tmp-";
const TRASH_PREFIX: &str = ".trash-";
const LOCK_SUFFIX: &str = ".lock";
/// Leftovers of interrupted clones and removals older than this are deleted when the cache
/// starts (younger ones may belong to another process still at work).
const LEFTOVER_AGE: Duration = Duration::from_secs(15 * 60);

/// Limits of the clone cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneCacheLimits {
    /// Largest total size on disk (bytes); 0 turns the cache off.
    pub max_bytes: u64,
    /// Most clones kept; 0 turns the cache off.
    pub max_clones: usize,
}

impl Default for CloneCacheLimits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_CLONE_CACHE_MAX_BYTES,
            max_clones: DEFAULT_CLONE_CACHE_MAX_CLONES,
        }
    }
}

impl CloneCacheLimits {
    pub fn enabled(&self) -> bool {
        self.max_bytes > 0 && self.max_clones > 0
    }
}

/// Parses a size in bytes for the cache limit: a plain number of bytes, or a number with a
/// unit, binary (`Ki`, `Mi`, `Gi`, `Ti`, also written `KiB`, ...) or decimal (`K`/`KB`,
/// `M`/`MB`, `G`/`GB`, `T`/`TB`), e.g. `2Gi`, `500MB`, `0` (off).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 2Gi, 500MB, 1073741824)"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "k" | "kB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use Ki, Mi, Gi, Ti, K, M, G, T or none)"
            ));
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// What the clone of `url` at `base_branch` is keyed by.
pub(crate) fn clone_key(url: &RepoUrl, base_branch: &str) -> String {
    format!("{}\n{}\n{}", url.lock_key(), url.user, base_branch)
}

/// The directory name of the clone with `key`.
pub(crate) fn clone_name(url: &RepoUrl, key: &str) -> String {
    let label: String = url
        .segments
        .last()
        .map(String::as_str)
        .unwrap_or("repo")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("{label}-{:016x}", fnv1a64(key.as_bytes()))
}

/// FNV-1a, 64 bits: stable across Rust versions (unlike `DefaultHasher`), and the key is
/// checked in the clone anyway.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[derive(Debug, Clone)]
struct Entry {
    bytes: u64,
    last_used: SystemTime,
    /// Uses since the clone was made or last garbage-collected (this process only).
    uses: u32,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    locks: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

/// The clone cache of one strategy.
pub(crate) struct CloneCache {
    root: PathBuf,
    limits: CloneCacheLimits,
    state: Mutex<State>,
    /// Background upkeep after each use.
    upkeep: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// `Ok` once the directory is checked and earlier clones are adopted; `Err` turns the
    /// cache off.
    ready: tokio::sync::OnceCell<Result<(), String>>,
}

impl std::fmt::Debug for CloneCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloneCache")
            .field("root", &self.root)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn other(message: String) -> GitError {
    GitError {
        kind: GitErrorKind::Other,
        message,
    }
}

async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, GitError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| other(format!("{what} stopped: {e}")))
}

impl CloneCache {
    pub(crate) fn new(work_dir: &Path, limits: CloneCacheLimits) -> Self {
        Self {
            root: work_dir.join(CLONES_DIR),
            limits,
            state: Mutex::new(State::default()),
            upkeep: Mutex::new(Vec::new()),
            ready: tokio::sync::OnceCell::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Checks the directory and adopts the clones an earlier run left, once.
    async fn ready(self: &Arc<Self>) -> bool {
        let this = self.clone();
        let result = self
            .ready
            .get_or_init(|| async move {
                let root = this.root.clone();
                let scanned = blocking("scanning the clone cache", move || scan(&root))
                    .await
                    .map_err(|e| e.message)
                    .and_then(|r| r);
                match scanned {
                    Ok(found) => {
                        let count = found.len();
                        let names: Vec<String> = found.iter().map(|(n, _)| n.clone()).collect();
                        this.state()
                            .entries
                            .extend(found.into_iter().map(|(name, last_used)| {
                                (
                                    name,
                                    Entry {
                                        bytes: 0,
                                        last_used,
                                        uses: 0,
                                    },
                                )
                            }));
                        tracing::info!(
                            directory = %this.root.display(),
                            clones = count,
                            max_bytes = this.limits.max_bytes,
                            max_clones = this.limits.max_clones,
                            "clone cache ready"
                        );
                        // Sizing the clones found (a walk of each) must not hold up the
                        // first promotion.
                        let upkeep = this.clone();
                        this.track(tokio::spawn(async move {
                            let root = upkeep.root.clone();
                            let sizes = blocking("measuring the cached clones", move || {
                                names
                                    .into_iter()
                                    .map(|name| {
                                        let bytes = dir_size(&root.join(&name));
                                        (name, bytes)
                                    })
                                    .collect::<Vec<_>>()
                            })
                            .await
                            .unwrap_or_default();
                            let total: u64 = sizes.iter().map(|(_, b)| b).sum();
                            {
                                let mut state = upkeep.state();
                                for (name, bytes) in sizes {
                                    if let Some(entry) = state.entries.get_mut(&name) {
                                        entry.bytes = bytes;
                                    }
                                }
                            }
                            tracing::info!(
                                directory = %upkeep.root.display(),
                                bytes = total,
                                "clones of an earlier run measured"
                            );
                            upkeep.evict().await;
                        }));
                        Ok(())
                    }
                    Err(err) => {
                        tracing::warn!(
                            directory = %this.root.display(),
                            error = %err,
                            "clone cache turned off: every pull-request attempt clones afresh"
                        );
                        Err(err)
                    }
                }
            })
            .await;
        result.is_ok()
    }

    /// The clone for `key`, locked for this caller; `None` when the cache is off.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        url: &RepoUrl,
        key: &str,
    ) -> Result<Option<Lease>, GitError> {
        if !self.limits.enabled() || !self.ready().await {
            return Ok(None);
        }
        let name = clone_name(url, key);
        let lock = {
            let mut state = self.state();
            // Locks nobody holds or waits for can go.
            state.locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            state.locks.entry(name.clone()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        let lock_path = self.root.join(format!("{name}{LOCK_SUFFIX}"));
        let file_lock = blocking("locking the cached clone", move || {
            let file = open_lock_file(&lock_path)?;
            file.lock()?;
            Ok::<_, std::io::Error>(file)
        })
        .await?
        .map_err(|e| other(format!("cannot lock the cached clone {name}: {e}")))?;
        let path = self.root.join(&name);
        let lease = Lease {
            cache: self.clone(),
            name,
            path,
            key: key.to_string(),
            _file_lock: file_lock,
            _guard: guard,
        };
        // A directory under the clone's name that is not (or no longer) its clone.
        let check_path = lease.path.clone();
        let check_key = lease.key.clone();
        let problem = blocking("checking the cached clone", move || {
            check(&check_path, &check_key)
        })
        .await?;
        if let Some(problem) = problem {
            tracing::warn!(
                repository = %url,
                clone = %lease.path.display(),
                problem = %problem,
                "cached clone unusable; replacing it with a fresh clone"
            );
            lease.discard().await?;
        }
        Ok(Some(lease))
    }

    /// Records the use of `lease`'s clone and frees it. Its size is then measured and
    /// least recently used clones beyond the limits removed in the background, so the
    /// promotion does not wait for the directory walk ([`CloneCache::settle`] waits).
    pub(crate) fn release(self: &Arc<Self>, lease: Lease, gc_done: bool) {
        let name = lease.name.clone();
        let path = lease.path.clone();
        {
            let mut state = self.state();
            let entry = state.entries.entry(name.clone()).or_insert(Entry {
                bytes: 0,
                last_used: SystemTime::now(),
                uses: 0,
            });
            entry.last_used = SystemTime::now();
            entry.uses = if gc_done {
                0
            } else {
                entry.uses.saturating_add(1)
            };
        }
        drop(lease);
        let this = self.clone();
        let upkeep = tokio::spawn(async move {
            let measured = blocking("measuring the cached clone", move || {
                if !path.join(".git").is_dir() {
                    return None;
                }
                // The key file's mtime is the last use, for the next run.
                if let Ok(file) = std::fs::File::options()
                    .write(true)
                    .open(path.join(".git").join(META_FILE))
                {
                    let _ = file.set_modified(SystemTime::now());
                }
                Some(dir_size(&path))
            })
            .await
            .ok()
            .flatten();
            {
                let mut state = this.state();
                match measured {
                    Some(bytes) => {
                        if let Some(entry) = state.entries.get_mut(&name) {
                            entry.bytes = bytes;
                        }
                    }
                    None => {
                        state.entries.remove(&name);
                    }
                }
            }
            this.evict().await;
        });
        self.track(upkeep);
    }

    /// Keeps `task` for [`CloneCache::settle`].
    fn track(&self, task: tokio::task::JoinHandle<()>) {
        let mut pending = match self.upkeep.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        pending.retain(|task| !task.is_finished());
        pending.push(task);
    }

    /// Waits until the background upkeep (measuring, evicting) started so far is done.
    pub(crate) async fn settle(&self) {
        loop {
            let tasks: Vec<_> = match self.upkeep.lock() {
                Ok(mut guard) => guard.drain(..).collect(),
                Err(poisoned) => poisoned.into_inner().drain(..).collect(),
            };
            if tasks.is_empty() {
                return;
            }
            for task in tasks {
                let _ = task.await;
            }
        }
    }

    /// Uses of the clone since it was made or garbage-collected.
    fn uses(&self, name: &str) -> u32 {
        self.state().entries.get(name).map_or(0, |e| e.uses)
    }

    /// Removes least recently used clones nobody holds until the cache is within limits.
    async fn evict(self: &Arc<Self>) {
        let mut victims = Vec::new();
        {
            let mut state = self.state();
            let mut total: u64 = state.entries.values().map(|e| e.bytes).sum();
            let mut count = state.entries.len();
            let mut order: Vec<(String, Entry)> = state
                .entries
                .iter()
                .map(|(n, e)| (n.clone(), e.clone()))
                .collect();
            order.sort_by_key(|(_, e)| e.last_used);
            for (name, entry) in order {
                if total <= self.limits.max_bytes && count <= self.limits.max_clones {
                    break;
                }
                // In use: keep it. Otherwise hold its lock until it is moved away, so
                // nobody starts using it meanwhile.
                let lock = state.locks.entry(name.clone()).or_default().clone();
                let Ok(guard) = lock.try_lock_owned() else {
                    continue;
                };
                state.entries.remove(&name);
                total = total.saturating_sub(entry.bytes);
                count -= 1;
                victims.push((name, entry, guard));
            }
        }
        if victims.is_empty() {
            return;
        }
        let this = self.clone();
        let _ = blocking("evicting cached clones", move || {
            let root = &this.root;
            let limits = this.limits;
            for (name, entry, guard) in victims {
                let path = root.join(&name);
                // Another process is using it: keep it.
                let file_lock = open_lock_file(&root.join(format!("{name}{LOCK_SUFFIX}")));
                if let Ok(file) = &file_lock
                    && file.try_lock().is_err()
                {
                    this.state().entries.insert(name, entry);
                    continue;
                }
                // Renamed while its locks are held, then removed without them.
                let trash = trash_path(root, &name);
                let moved = std::fs::rename(&path, &trash);
                drop(file_lock);
                drop(guard);
                let idle = entry
                    .last_used
                    .elapsed()
                    .unwrap_or(Duration::ZERO)
                    .as_secs();
                match moved {
                    Ok(()) => {
                        let _ = std::fs::remove_dir_all(&trash);
                        tracing::info!(
                            clone = %path.display(),
                            bytes = entry.bytes,
                            idle_s = idle,
                            max_bytes = limits.max_bytes,
                            max_clones = limits.max_clones,
                            "evicted the least recently used cached clone"
                        );
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => tracing::warn!(
                        clone = %path.display(),
                        error = %err,
                        "cannot evict a cached clone"
                    ),
                }
            }
        })
        .await;
    }

    /// A fresh, empty directory in the cache to clone into.
    fn fresh_dir(&self) -> Result<tempfile::TempDir, GitError> {
        tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempdir_in(&self.root)
            .map_err(|e| {
                other(format!(
                    "cannot create a directory in {}: {e}",
                    self.root.display()
                ))
            })
    }
}

fn trash_path(root: &Path, name: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    root.join(format!("{TRASH_PREFIX}{name}-{nanos}"))
}

/// Creates and checks the cache directory; removes leftovers; lists the clones found with
/// their last use.
fn scan(root: &Path) -> Result<Vec<(String, SystemTime)>, String> {
    std::fs::create_dir_all(root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let meta = std::fs::symlink_metadata(root)
        .map_err(|e| format!("cannot read {}: {e}", root.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", root.display()));
    }
    // Who we are: the owner of a file we just made.
    let probe = tempfile::tempfile_in(root)
        .map_err(|e| format!("cannot write in {}: {e}", root.display()))?;
    let uid = probe
        .metadata()
        .map_err(|e| format!("cannot read a file's owner: {e}"))?
        .uid();
    drop(probe);
    if meta.uid() != uid {
        return Err(format!(
            "{} belongs to another user (uid {}, not {uid}); give --pr-work-dir a directory of its own",
            root.display(),
            meta.uid()
        ));
    }
    // Whoever owns the work dir could swap `clones` for a directory of theirs: it must be
    // ours, or a sticky directory of root's such as /tmp.
    if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
        let parent_meta = std::fs::metadata(parent)
            .map_err(|e| format!("cannot read {}: {e}", parent.display()))?;
        let sticky_root = parent_meta.uid() == 0 && parent_meta.mode() & 0o1000 != 0;
        if parent_meta.uid() != uid && !sticky_root {
            return Err(format!(
                "{} belongs to another user (uid {}, not {uid}); give --pr-work-dir a directory of its own",
                parent.display(),
                parent_meta.uid()
            ));
        }
    }
    if meta.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make {} private: {e}", root.display()))?;
    }
    let mut found = Vec::new();
    let entries =
        std::fs::read_dir(root).map_err(|e| format!("cannot list {}: {e}", root.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(LOCK_SUFFIX) {
            continue;
        }
        if name.starts_with(TMP_PREFIX) || name.starts_with(TRASH_PREFIX) {
            let old = std::fs::symlink_metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age > LEFTOVER_AGE);
            if old {
                remove_any(&path);
            }
            continue;
        }
        let meta_file = path.join(".git").join(META_FILE);
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let last_used = if is_dir {
            std::fs::metadata(&meta_file)
                .and_then(|m| m.modified())
                .ok()
        } else {
            None
        };
        let Some(last_used) = last_used else {
            tracing::warn!(path = %path.display(), "removing what is not a cached clone");
            remove_any(&path);
            continue;
        };
        found.push((name, last_used));
    }
    Ok(found)
}

fn open_lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
}

fn remove_any(path: &Path) {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => return,
    };
    if let Err(err) = result {
        tracing::warn!(path = %path.display(), error = %err, "cannot remove");
    }
}

/// Why the directory at `path` cannot be used as the clone of `key`; `None` when it can
/// (or when there is nothing there).
fn check(path: &Path, key: &str) -> Option<String> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_dir() {
        return Some("not a directory".to_string());
    }
    let git = path.join(".git");
    if !git.is_dir() {
        return Some(".git is missing".to_string());
    }
    match std::fs::read_to_string(git.join(META_FILE)) {
        Ok(text) if text == key => None,
        Ok(_) => Some("it is the clone of another repository or branch".to_string()),
        Err(err) => Some(format!("{META_FILE} unreadable: {err}")),
    }
}

/// Bytes on disk under `path` (allocated blocks), symbolic links not followed.
pub fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// The right to use one cached clone, until dropped.
pub(crate) struct Lease {
    cache: Arc<CloneCache>,
    name: String,
    key: String,
    path: PathBuf,
    _file_lock: std::fs::File,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Lease {
    /// The clone's directory: `.git` and nothing else (nothing is checked out).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the clone exists (else it is to be made with [`Lease::install`]).
    pub(crate) fn exists(&self) -> bool {
        self.path.join(".git").is_dir()
    }

    /// Whether the clone is due for `git gc`.
    pub(crate) fn gc_due(&self) -> bool {
        self.cache.uses(&self.name) + 1 >= GC_EVERY
    }

    /// Removes the clone (it is broken); the next use clones afresh.
    pub(crate) async fn discard(&self) -> Result<(), GitError> {
        self.cache.state().entries.remove(&self.name);
        let path = self.path.clone();
        let trash = trash_path(&self.cache.root, &self.name);
        blocking("removing a cached clone", move || {
            match std::fs::rename(&path, &trash) {
                Ok(()) => remove_any(&trash),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                // Cannot move it aside: remove it in place.
                Err(_) => remove_any(&path),
            }
            if path.exists() {
                Err(other(format!(
                    "cannot remove the broken cached clone {}",
                    path.display()
                )))
            } else {
                Ok(())
            }
        })
        .await?
    }

    /// A fresh directory for a new clone; hand it to [`Lease::install`] once cloned.
    pub(crate) fn fresh_dir(&self) -> Result<tempfile::TempDir, GitError> {
        self.cache.fresh_dir()
    }

    /// Moves the complete clone in `fresh` into place.
    pub(crate) async fn install(&self, fresh: tempfile::TempDir) -> Result<(), GitError> {
        let path = self.path.clone();
        let key = self.key.clone();
        blocking("installing a fresh clone", move || {
            std::fs::write(fresh.path().join(".git").join(META_FILE), key.as_bytes())
                .and_then(|()| std::fs::rename(fresh.path(), &path))
                .map_err(|e| {
                    other(format!(
                        "cannot move a fresh clone to {}: {e}",
                        path.display()
                    ))
                })?;
            // Now under its final name: nothing left to remove.
            let _ = fresh.keep();
            Ok(())
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2Gi"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size(" 64 Mi "), Ok(64 << 20));
        assert!(parse_size("2 parsecs").is_err());
        assert!(parse_size("Gi").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999Ti").is_err());
    }

    #[test]
    fn a_work_dir_of_another_user_turns_the_cache_off() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        // Ours: fine, and `clones` is made private.
        assert_eq!(scan(&work.join(CLONES_DIR)), Ok(Vec::new()));
        let mode = std::fs::metadata(work.join(CLONES_DIR)).unwrap().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Someone else's (only root may hand a directory to another user).
        if std::os::unix::fs::chown(&work, Some(65534), None).is_err() {
            return;
        }
        let err = scan(&work.join(CLONES_DIR)).unwrap_err();
        assert!(err.contains("belongs to another user"), "{err}");
        std::os::unix::fs::chown(&work, Some(0), None).unwrap();
        std::os::unix::fs::chown(work.join(CLONES_DIR), Some(65534), None).unwrap();
        let err = scan(&work.join(CLONES_DIR)).unwrap_err();
        assert!(err.contains("belongs to another user"), "{err}");
    }

    #[test]
    fn names_are_stable_and_distinct() {
        let a = RepoUrl::parse("https://Git.Example/org/fleet.git").unwrap();
        let b = RepoUrl::parse("https://git.example/org/fleet").unwrap();
        let c = RepoUrl::parse("https://git.example/org/other").unwrap();
        assert_eq!(clone_key(&a, "main"), clone_key(&b, "main"));
        let name = clone_name(&a, &clone_key(&a, "main"));
        assert!(name.starts_with("fleet-"), "{name}");
        assert_eq!(name.len(), "fleet-".len() + 16);
        assert_eq!(name, clone_name(&b, &clone_key(&b, "main")));
        assert_ne!(name, clone_name(&a, &clone_key(&a, "release")));
        assert_ne!(name, clone_name(&c, &clone_key(&c, "main")));
        // Known FNV-1a value, so the names survive compiler upgrades.
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
