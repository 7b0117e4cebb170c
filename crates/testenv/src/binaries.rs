//! Finding the etcd and kube-apiserver binaries built by `scripts/ensure-test-binaries.sh`.

use std::path::{Path, PathBuf};

use crate::Error;

const HINT: &str = "run `scripts/ensure-test-binaries.sh kube` (it builds them from tools/envtest \
     into the cache once), or point PIPELINE_ETCD_BIN and PIPELINE_KUBE_APISERVER_BIN at them";

/// Paths of the control-plane binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
}

impl Binaries {
    /// `PIPELINE_ETCD_BIN` / `PIPELINE_KUBE_APISERVER_BIN` when set, else what
    /// `<cache>/env.sh` (written by `scripts/ensure-test-binaries.sh`) names, with
    /// `<cache>` = `$PIPELINE_TOOLS_CACHE`, else `${XDG_CACHE_HOME:-$HOME/.cache}/pipeline-controller/tools`.
    /// Fails, saying how to build them, when they are missing: tests never skip silently.
    pub fn locate() -> Result<Self, Error> {
        let etcd = require(
            lookup("PIPELINE_ETCD_BIN"),
            "etcd",
            "PIPELINE_ETCD_BIN",
            HINT,
        )?;
        let kube_apiserver = require(
            lookup("PIPELINE_KUBE_APISERVER_BIN"),
            "kube-apiserver",
            "PIPELINE_KUBE_APISERVER_BIN",
            HINT,
        )?;
        Ok(Self {
            etcd,
            kube_apiserver,
        })
    }
}

/// The `helm` binary built from tools/helm: `PIPELINE_HELM_BIN`, else the tools cache's
/// env.sh (as [`Binaries::locate`]). Fails, saying how to build it, when missing.
pub fn helm_binary() -> Result<PathBuf, Error> {
    require(
        lookup("PIPELINE_HELM_BIN"),
        "helm",
        "PIPELINE_HELM_BIN",
        "run `scripts/ensure-test-binaries.sh helm` (it builds helm from tools/helm into the cache once), or point PIPELINE_HELM_BIN at one",
    )
}

/// The directory of Flux's CRD manifests (source, kustomize, helm, notification) fetched by
/// `scripts/ensure-test-binaries.sh flux-crds`: `PIPELINE_FLUX_CRDS_DIR`, else the tools
/// cache's env.sh (as [`Binaries::locate`]). Fails, saying how to fetch them, when missing.
pub fn flux_crds_dir() -> Result<PathBuf, Error> {
    const HINT: &str = "run `scripts/ensure-test-binaries.sh flux-crds` (it copies them from the Go module proxy into the cache once), or point PIPELINE_FLUX_CRDS_DIR at a directory of CRD YAML files";
    match lookup("PIPELINE_FLUX_CRDS_DIR") {
        Some(dir) if dir.is_dir() => Ok(dir),
        Some(dir) => Err(Error::MissingBinaries(format!(
            "Flux CRD directory {} (PIPELINE_FLUX_CRDS_DIR) does not exist: {HINT}",
            dir.display()
        ))),
        None => Err(Error::MissingBinaries(format!(
            "no Flux CRDs: PIPELINE_FLUX_CRDS_DIR is unset and the tools cache has none: {HINT}"
        ))),
    }
}

/// The four Flux controllers built by `scripts/ensure-test-binaries.sh flux`:
/// `PIPELINE_FLUX_{SOURCE,KUSTOMIZE,HELM,NOTIFICATION}_BIN`, else the tools cache's env.sh
/// (as [`Binaries::locate`]). Fails, saying how to build them, when one is missing.
pub(crate) fn flux_binaries() -> Result<crate::FluxBinaries, Error> {
    const HINT: &str = "run `scripts/ensure-test-binaries.sh flux` (it builds Flux's controllers from tools/flux-* into the cache once), or point PIPELINE_FLUX_<NAME>_BIN at them";
    let find = |var: &str, what: &str| require(lookup(var), what, var, HINT);
    Ok(crate::FluxBinaries {
        source: find("PIPELINE_FLUX_SOURCE_BIN", "source-controller")?,
        kustomize: find("PIPELINE_FLUX_KUSTOMIZE_BIN", "kustomize-controller")?,
        helm: find("PIPELINE_FLUX_HELM_BIN", "helm-controller")?,
        notification: find("PIPELINE_FLUX_NOTIFICATION_BIN", "notification-controller")?,
    })
}

/// `var` from the environment, else from `<cache>/env.sh`.
fn lookup(var: &str) -> Option<PathBuf> {
    if let Some(value) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(value));
    }
    let vars = read_env_file(&cache_dir()?.join("env.sh"));
    vars.into_iter()
        .find(|(name, _)| name == var)
        .map(|(_, value)| PathBuf::from(value))
}

fn require(path: Option<PathBuf>, what: &str, var: &str, hint: &str) -> Result<PathBuf, Error> {
    match path {
        Some(path) if is_executable(&path) => Ok(path),
        Some(path) => Err(Error::MissingBinaries(format!(
            "{what} binary {} ({var}) does not exist or is not executable: {hint}",
            path.display()
        ))),
        None => Err(Error::MissingBinaries(format!(
            "no {what} binary: {var} is unset and the tools cache has none: {hint}"
        ))),
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PIPELINE_TOOLS_CACHE").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".cache"))
        })?;
    Some(base.join("pipeline-controller").join("tools"))
}

/// `export NAME=value` lines; values are written with bash's `printf %q`, which leaves
/// ordinary paths as they are (a value with quoting is taken literally minus `\`).
fn read_env_file(path: &Path) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("export "))
        .filter_map(|rest| rest.split_once('='))
        .map(|(name, value)| {
            let value = value.trim();
            let value = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .map(str::to_owned)
                .unwrap_or_else(|| value.replace('\\', ""));
            (name.trim().to_owned(), value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_lines_parse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("env.sh");
        std::fs::write(
            &path,
            "# comment\nexport PIPELINE_ETCD_BIN=/a/etcd-v3.6.0-r1/etcd\nexport X='/with space/x'\nexport Y=/with\\ space/y\n",
        )
        .unwrap();
        let vars = read_env_file(&path);
        assert_eq!(
            vars,
            vec![
                (
                    "PIPELINE_ETCD_BIN".to_owned(),
                    "/a/etcd-v3.6.0-r1/etcd".to_owned()
                ),
                ("X".to_owned(), "/with space/x".to_owned()),
                ("Y".to_owned(), "/with space/y".to_owned()),
            ]
        );
    }
}
