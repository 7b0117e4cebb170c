//! A promotion applied to a commit's tree through git's objects, without a checkout.
//!
//! [`rewrite_commit`] lists the commit's regular files (`git ls-tree -r`), keeps those a
//! scan of a checkout reads ([`is_yaml_path`]: `*.yaml`/`*.yml` in any case; symbolic links
//! and submodules are not regular files), sorts them in the same (`Path`) order, reads
//! their blobs with one `git cat-file --batch` and scans them with the marker code
//! ([`BlobScan`]). The report is the one [`crate::markers::rewrite_tree`] gives on a
//! checkout of the commit; the new texts are handed back with each file's mode, for
//! [`Git::write_blobs`] and [`Git::commit_changes`].
//!
//! One difference with a checkout: the blobs are scanned as stored. A checkout applies
//! `.gitattributes` conversions (`eol=crlf`, `working-tree-encoding`, filters) and `git add`
//! undoes them; here no conversion happens either way, and the new blob keeps every byte
//! the marker rewrite does not change.

use std::path::{Path, PathBuf};

use crate::git::{Git, GitError, TreeFile};
use crate::markers::{BlobScan, MarkerKey, TreeError, TreeRewrite, is_yaml_path};

/// Blob bytes scanned together (on several threads); reading pauses meanwhile. Small, so
/// that the texts held at once stay few (the scan takes a few ms per MiB).
const SCAN_PART_BYTES: usize = 1 << 20;

/// What [`rewrite_commit`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRewrite {
    pub report: TreeRewrite,
    /// The files whose text changes, in path order: the file as in the commit (mode, old
    /// blob, path) and its new text.
    pub changes: Vec<(TreeFile, String)>,
    /// Milliseconds spent scanning (reading the blobs not included).
    pub scan_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error(transparent)]
    Git(#[from] GitError),
    /// A marker for the key that cannot be applied (the first in path order).
    #[error(transparent)]
    Markers(#[from] TreeError),
}

/// Scans the YAML files of `commit` in `repo` for markers of `key` and computes their new
/// texts for `new_value`; writes nothing.
pub async fn rewrite_commit(
    git: &Git,
    repo: &Path,
    commit: &str,
    key: &MarkerKey,
    new_value: &str,
) -> Result<CommitRewrite, RewriteError> {
    let mut yaml: Vec<TreeFile> = git
        .regular_files(repo, commit)
        .await?
        .into_iter()
        .filter(|file| is_yaml_path(&file.path))
        .collect();
    // Path order (by component), as the scan of a checkout has, not git's tree order: it
    // orders the files of the commit message and pull request, the warnings, and decides
    // which error is reported.
    yaml.sort_by(|a, b| a.path.cmp(&b.path));
    let oids: Vec<&str> = yaml.iter().map(|file| file.oid.as_str()).collect();
    let mut reader = git.read_blobs(repo, &oids)?;
    let mut scan = BlobScan::new(key.clone(), new_value);
    let mut part: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    let mut part_bytes = 0;
    let mut scan_ms = 0;
    let mut paths = yaml.iter();
    loop {
        let next = reader.next().await?;
        let last = next.is_none();
        if let (Some(content), Some(file)) = (next, paths.next()) {
            part_bytes += content.len();
            part.push((file.path.clone(), content));
        }
        if !part.is_empty() && (last || part_bytes >= SCAN_PART_BYTES) {
            let files = std::mem::take(&mut part);
            part_bytes = 0;
            let started = std::time::Instant::now();
            scan = tokio::task::spawn_blocking(move || scan.scan(files).map(|()| scan))
                .await
                .map_err(|e| GitError {
                    kind: crate::git::GitErrorKind::Other,
                    message: format!("rewriting markers stopped: {e}"),
                })??;
            scan_ms += started.elapsed().as_millis() as u64;
        }
        if last {
            break;
        }
    }
    reader.finish().await?;
    let (report, rewritten) = scan.finish();
    // Both in path order: pair each new text with its file.
    let mut files = yaml.into_iter();
    let mut changes = Vec::with_capacity(rewritten.len());
    for (path, text) in rewritten {
        if let Some(file) = files.by_ref().find(|file| file.path == path) {
            changes.push((file, text));
        }
    }
    Ok(CommitRewrite {
        report,
        changes,
        scan_ms,
    })
}
