//! Embeds the git commit in `--version`: `git rev-parse --short HEAD` when built from a
//! git checkout, else `PIPELINE_CONTROLLER_GIT_COMMIT` from the build environment (e.g. a
//! Docker build argument), else "unknown".

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn rerun_if_exists(path: &Path) {
    // A path that does not exist would make Cargo rerun this script at every build.
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PIPELINE_CONTROLLER_GIT_COMMIT");
    let from_env = std::env::var("PIPELINE_CONTROLLER_GIT_COMMIT")
        .ok()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty());
    let commit = from_env
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=PIPELINE_CONTROLLER_GIT_COMMIT={commit}");

    // Rebuild when HEAD moves: HEAD itself (checkout of another branch or commit), the
    // branch it points to (a commit), and packed-refs (where refs go after `git gc`).
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let git_dir = PathBuf::from(git_dir);
        let head = git_dir.join("HEAD");
        rerun_if_exists(&head);
        let common = git(&["rev-parse", "--git-common-dir"])
            .map(PathBuf::from)
            // Relative paths are relative to the working directory, the package root.
            .map(|dir| match std::env::var_os("CARGO_MANIFEST_DIR") {
                Some(root) if dir.is_relative() => PathBuf::from(root).join(dir),
                _ => dir,
            })
            .unwrap_or_else(|| git_dir.clone());
        if let Some(reference) = std::fs::read_to_string(&head)
            .ok()
            .and_then(|h| h.strip_prefix("ref: ").map(|r| r.trim().to_string()))
        {
            rerun_if_exists(&git_dir.join(&reference));
            rerun_if_exists(&common.join(&reference));
        }
        rerun_if_exists(&common.join("packed-refs"));
    }
}
