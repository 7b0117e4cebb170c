//! Applying a promotion to every YAML file of a checked-out repository ([`rewrite_tree`]) or
//! of a git tree read from its blobs ([`BlobScan`]).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{MarkerError, MarkerKey, MarkerWarning, scan_text};

/// One YAML file that holds markers for the promoted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRewrite {
    /// Path relative to the tree's root.
    pub path: PathBuf,
    pub matched: usize,
    pub changed: usize,
}

/// A warning from one file; see [`MarkerWarning`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeWarning {
    pub path: PathBuf,
    pub warning: MarkerWarning,
}

/// What [`rewrite_tree`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeRewrite {
    /// Files with at least one marker for the key, in path order; those with `changed > 0`
    /// were rewritten.
    pub files: Vec<FileRewrite>,
    /// YAML files that are not UTF-8 and were left alone (relative paths).
    pub skipped_non_utf8: Vec<PathBuf>,
    pub warnings: Vec<TreeWarning>,
    /// Number of YAML files read.
    pub scanned: usize,
}

impl TreeRewrite {
    /// Relative paths of the files that were rewritten.
    pub fn changed_paths(&self) -> impl Iterator<Item = &Path> {
        self.files
            .iter()
            .filter(|f| f.changed > 0)
            .map(|f| f.path.as_path())
    }

    /// Markers for the key over all files.
    pub fn matched(&self) -> usize {
        self.files.iter().map(|f| f.matched).sum()
    }

    /// Values changed over all files.
    pub fn changed(&self) -> usize {
        self.files.iter().map(|f| f.changed).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A marker for the key that cannot be applied; `path` is relative to the root.
    #[error("{}: {source}", path.display())]
    Marker {
        path: PathBuf,
        #[source]
        source: MarkerError,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> TreeError + '_ {
    move |source| TreeError::Io {
        path: path.to_owned(),
        source,
    }
}

fn is_yaml(name: &Path) -> bool {
    name.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

/// Collects the YAML files under `root` (relative paths, sorted), skipping `.git` and not
/// following symlinks, so a rewrite never leaves the tree.
fn yaml_files(root: &Path) -> Result<Vec<PathBuf>, TreeError> {
    let mut files = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel_dir) = dirs.pop() {
        let dir = root.join(&rel_dir);
        let entries = fs::read_dir(&dir).map_err(io_error(&dir))?;
        for entry in entries {
            let entry = entry.map_err(io_error(&dir))?;
            let file_type = entry.file_type().map_err(io_error(&entry.path()))?;
            let rel = rel_dir.join(entry.file_name());
            if file_type.is_dir() {
                if entry.file_name() != ".git" {
                    dirs.push(rel);
                }
            } else if file_type.is_file() && is_yaml(&rel) {
                files.push(rel);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Replaces `path`'s content atomically: a temporary file in the same directory, given the
/// original's permissions, renamed over it.
fn replace_file(path: &Path, text: &str) -> Result<(), TreeError> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let permissions = fs::metadata(path).map_err(io_error(path))?.permissions();
    let mut tmp = tempfile::Builder::new()
        .prefix(".promotion-")
        .tempfile_in(dir)
        .map_err(io_error(dir))?;
    tmp.write_all(text.as_bytes())
        .map_err(io_error(tmp.path()))?;
    tmp.as_file()
        .set_permissions(permissions)
        .map_err(io_error(path))?;
    tmp.persist(path).map_err(|e| TreeError::Io {
        path: path.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

/// What scanning one YAML file found.
enum Scanned {
    NonUtf8(PathBuf),
    Yaml {
        rel: PathBuf,
        warnings: Vec<MarkerWarning>,
        matched: usize,
        changed: usize,
        /// The new text, when it differs.
        rewritten: Option<String>,
    },
}

/// Scans the content of the YAML file `rel`.
fn scan_bytes(
    rel: PathBuf,
    bytes: Vec<u8>,
    key: &MarkerKey,
    new_value: &str,
) -> Result<Scanned, TreeError> {
    let Ok(text) = String::from_utf8(bytes) else {
        return Ok(Scanned::NonUtf8(rel));
    };
    let scan = match scan_text(&text, key, new_value) {
        Ok(scan) => scan,
        Err(source) => return Err(TreeError::Marker { path: rel, source }),
    };
    let rewritten = (scan.matched > 0 && !scan.edits.is_empty()).then(|| scan.apply(&text));
    Ok(Scanned::Yaml {
        rel,
        matched: scan.matched,
        changed: scan.edits.len(),
        warnings: scan.warnings,
        rewritten,
    })
}

fn scan_file(
    root: &Path,
    rel: &Path,
    key: &MarkerKey,
    new_value: &str,
) -> Result<Scanned, TreeError> {
    let path = root.join(rel);
    let bytes = fs::read(&path).map_err(io_error(&path))?;
    scan_bytes(rel.to_path_buf(), bytes, key, new_value)
}

/// Files per scanning thread below which one thread does it all.
const FILES_PER_THREAD: usize = 256;
/// Most threads a scan uses.
const MAX_THREADS: usize = 4;

/// Scans `items` (in order) with `scan_one`, on several threads for many items. The result
/// is what a sequential scan gives: the files in order, or the error of the first failing
/// file.
fn scan_parallel<T: Send>(
    items: Vec<T>,
    scan_one: impl Fn(T) -> Result<Scanned, TreeError> + Sync,
) -> Result<Vec<Scanned>, TreeError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(MAX_THREADS)
        .min(items.len() / FILES_PER_THREAD)
        .max(1);
    if threads == 1 {
        return items.into_iter().map(scan_one).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let mut parts: Vec<Vec<T>> = Vec::with_capacity(threads);
    let mut rest = items.into_iter();
    loop {
        let part: Vec<T> = rest.by_ref().take(chunk).collect();
        if part.is_empty() {
            break;
        }
        parts.push(part);
    }
    let scan_one = &scan_one;
    std::thread::scope(|scope| {
        let workers: Vec<_> = parts
            .into_iter()
            .map(|part| {
                scope.spawn(move || {
                    part.into_iter()
                        .map(scan_one)
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut all = Vec::new();
        for worker in workers {
            match worker.join() {
                Ok(part) => all.extend(part?),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(all)
    })
}

/// Adds what scanning one file found to `report`; returns the file's new text when it
/// changes.
fn record(report: &mut TreeRewrite, scanned: Scanned) -> Option<(PathBuf, String)> {
    report.scanned += 1;
    let (rel, warnings, matched, changed, rewritten) = match scanned {
        Scanned::NonUtf8(rel) => {
            report.skipped_non_utf8.push(rel);
            return None;
        }
        Scanned::Yaml {
            rel,
            warnings,
            matched,
            changed,
            rewritten,
        } => (rel, warnings, matched, changed, rewritten),
    };
    report
        .warnings
        .extend(warnings.into_iter().map(|warning| TreeWarning {
            path: rel.clone(),
            warning,
        }));
    if matched == 0 {
        return None;
    }
    let write = rewritten.map(|text| (rel.clone(), text));
    report.files.push(FileRewrite {
        path: rel,
        matched,
        changed,
    });
    write
}

/// Whether the file at `path` (relative to the tree's root) is one of the YAML files a
/// promotion scans: its name ends in `.yaml` or `.yml` (any case) after a non-empty stem,
/// and no directory on the way is named `.git` (which git never checks out).
pub fn is_yaml_path(path: &Path) -> bool {
    is_yaml(path)
        && !path
            .components()
            .any(|c| c.as_os_str().eq_ignore_ascii_case(".git"))
}

/// Scans the YAML files of a git tree from their content (blobs), with the same rules and
/// results as [`rewrite_tree`] on a checkout of that tree, but writing nothing: the new
/// texts are handed back. The caller lists the tree's regular files (not symbolic links,
/// not submodules) that pass [`is_yaml_path`], sorted by path (`Path` order, as
/// [`rewrite_tree`] does), and gives their contents in that order, in one or more parts.
#[derive(Debug)]
pub struct BlobScan {
    key: MarkerKey,
    new_value: String,
    report: TreeRewrite,
    rewritten: Vec<(PathBuf, String)>,
}

impl BlobScan {
    pub fn new(key: MarkerKey, new_value: impl Into<String>) -> Self {
        Self {
            key,
            new_value: new_value.into(),
            report: TreeRewrite::default(),
            rewritten: Vec::new(),
        }
    }

    /// Scans the next files (path, content), which come after every file given before;
    /// on several threads when there are many. The error is that of the first failing file.
    pub fn scan(&mut self, files: Vec<(PathBuf, Vec<u8>)>) -> Result<(), TreeError> {
        let (key, new_value) = (&self.key, self.new_value.as_str());
        let scanned = scan_parallel(files, |(rel, bytes)| scan_bytes(rel, bytes, key, new_value))?;
        for one in scanned {
            if let Some(write) = record(&mut self.report, one) {
                self.rewritten.push(write);
            }
        }
        Ok(())
    }

    /// What the scan found, and the new text of each file that changes (in path order).
    pub fn finish(self) -> (TreeRewrite, Vec<(PathBuf, String)>) {
        (self.report, self.rewritten)
    }
}

/// Rewrites every value marked for `key` in the `*.yaml`/`*.yml` files under `root`.
///
/// All files are scanned before any is written (on several threads for big trees), so a
/// marker error leaves the tree untouched; the error reported is that of the first failing
/// file in path order. Only files whose text changes are written, each atomically
/// (temporary file + rename, with the original permissions); an I/O error while writing can
/// still leave earlier files rewritten. `.git` directories and symlinks (to files or
/// directories) are skipped, so that nothing outside the tree is read or written.
pub fn rewrite_tree(
    root: &Path,
    key: &MarkerKey,
    new_value: &str,
) -> Result<TreeRewrite, TreeError> {
    let mut report = TreeRewrite::default();
    let mut writes = Vec::new();
    let files = yaml_files(root)?;
    let scanned = scan_parallel(files.iter().collect(), |rel: &PathBuf| {
        scan_file(root, rel, key, new_value)
    })?;
    for one in scanned {
        if let Some((rel, text)) = record(&mut report, one) {
            writes.push((root.join(rel), text));
        }
    }
    for (path, text) in &writes {
        replace_file(path, text)?;
    }
    Ok(report)
}
