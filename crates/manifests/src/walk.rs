//! Finding the manifest files of a folder, and fingerprinting them cheaply.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// One manifest file found under the folder.
#[derive(Debug, Clone)]
pub(crate) struct FileEntry {
    /// Path relative to the folder, as walked (through symlinks, not to their targets).
    pub rel: PathBuf,
    pub abs: PathBuf,
    pub len: u64,
    pub mtime_ns: u128,
    /// Where a symlinked file leads, so that retargeting a link (as Kubernetes does when
    /// it updates a mounted ConfigMap) changes the fingerprint.
    pub target: Option<PathBuf>,
}

/// A problem met while walking: a folder or file that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WalkError {
    pub rel: PathBuf,
    pub message: String,
}

#[derive(Debug, Default)]
pub(crate) struct Walk {
    pub files: Vec<FileEntry>,
    pub errors: Vec<WalkError>,
}

/// What [`ManifestCatalog::watch`](crate::ManifestCatalog::watch) compares between polls:
/// the manifest files' paths, sizes, modification times (ns) and symlink targets, and the
/// walk's errors. Computing it reads no file contents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint {
    files: Vec<(PathBuf, u64, u128, Option<PathBuf>)>,
    errors: Vec<(PathBuf, String)>,
}

impl Fingerprint {
    /// Fingerprints the manifest files under `dir`.
    pub fn of_dir(dir: &Path) -> Self {
        Self::of_walk(&walk(dir))
    }

    pub(crate) fn of_walk(walk: &Walk) -> Self {
        Self {
            files: walk
                .files
                .iter()
                .map(|f| (f.rel.clone(), f.len, f.mtime_ns, f.target.clone()))
                .collect(),
            errors: walk
                .errors
                .iter()
                .map(|e| (e.rel.clone(), e.message.clone()))
                .collect(),
        }
    }

    /// Number of manifest files.
    pub fn files(&self) -> usize {
        self.files.len()
    }
}

/// Whether `name` is a manifest file name.
fn is_manifest(name: &str) -> bool {
    name.ends_with(".yaml") || name.ends_with(".yml")
}

/// Names starting with `.` (`.git`, Kubernetes' `..data` in mounted ConfigMaps, editor
/// lock files) are skipped, files and folders alike.
fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

/// Walks `dir` recursively, following symlinks but visiting each real folder once (so
/// symlink loops end), in name order. Only `*.yaml` and `*.yml` files are listed.
pub(crate) fn walk(dir: &Path) -> Walk {
    let mut out = Walk::default();
    let root = match fs::canonicalize(dir) {
        Ok(root) => root,
        Err(err) => {
            out.errors.push(WalkError {
                rel: PathBuf::new(),
                message: format!("cannot read folder {}: {err}", dir.display()),
            });
            return out;
        }
    };
    let mut visited = HashSet::from([root]);
    walk_into(dir, Path::new(""), &mut visited, &mut out);
    out
}

fn walk_into(abs: &Path, rel: &Path, visited: &mut HashSet<PathBuf>, out: &mut Walk) {
    let read = match fs::read_dir(abs) {
        Ok(read) => read,
        Err(err) => {
            out.errors.push(WalkError {
                rel: rel.to_path_buf(),
                message: format!("cannot read folder: {err}"),
            });
            return;
        }
    };
    let mut entries: Vec<(String, PathBuf, bool)> = Vec::new();
    for entry in read {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                out.errors.push(WalkError {
                    rel: rel.to_path_buf(),
                    message: format!("cannot read folder: {err}"),
                });
                continue;
            }
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_hidden(&name) {
            continue;
        }
        let is_symlink = entry.file_type().is_ok_and(|t| t.is_symlink());
        entries.push((name, entry.path(), is_symlink));
    }
    entries.sort();

    for (name, path, is_symlink) in entries {
        let child_rel = rel.join(&name);
        // Follows symlinks.
        let metadata = match fs::metadata(&path) {
            Ok(metadata) => metadata,
            Err(err) => {
                if is_manifest(&name) {
                    out.errors.push(WalkError {
                        rel: child_rel,
                        message: format!("cannot read file: {err}"),
                    });
                }
                continue;
            }
        };
        if metadata.is_dir() {
            let Ok(real) = fs::canonicalize(&path) else {
                out.errors.push(WalkError {
                    rel: child_rel,
                    message: "cannot resolve folder".to_string(),
                });
                continue;
            };
            if visited.insert(real) {
                walk_into(&path, &child_rel, visited, out);
            }
        } else if metadata.is_file() && is_manifest(&name) {
            let mtime_ns = metadata
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let target = if is_symlink {
                fs::canonicalize(&path).ok()
            } else {
                None
            };
            out.files.push(FileEntry {
                rel: child_rel,
                abs: path,
                len: metadata.len(),
                mtime_ns,
                target,
            });
        }
    }
}
