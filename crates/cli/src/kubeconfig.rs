//! Finding the Kubernetes configuration, with one clear line when there is none.

use std::path::PathBuf;

use crate::errors::usage;

/// Whether any source of Kubernetes configuration is there to try: `KUBECONFIG`,
/// `~/.kube/config`, or the in-cluster service environment.
pub fn present() -> bool {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    if set("KUBECONFIG") || set("KUBERNETES_SERVICE_HOST") {
        return true;
    }
    let home = std::env::var_os("HOME").or_else(|| std::env::var_os("USERPROFILE"));
    home.is_some_and(|home| PathBuf::from(home).join(".kube/config").is_file())
}

/// The usage error for a command that needs a cluster where there is no configuration;
/// `instead` says what to do, e.g. `pass --manifests DIR for embedded mode`.
pub fn missing(instead: &str) -> anyhow::Error {
    usage(format!(
        "no Kubernetes configuration found (KUBECONFIG, ~/.kube/config or in-cluster); {instead}"
    ))
}

/// A client from the configuration found, or a [`missing`] usage error saying `instead`.
pub async fn client(instead: &str) -> anyhow::Result<kube::Client> {
    if !present() {
        return Err(missing(instead));
    }
    let config = kube::Config::infer().await.map_err(|err| {
        anyhow::anyhow!(
            "reading the Kubernetes configuration: {}",
            pipeline_core::report::error_chain(&err)
        )
    })?;
    pipeline_kube::api_client::api_client(config).map_err(|err| {
        anyhow::anyhow!(
            "configuring the Kubernetes client: {}",
            pipeline_core::report::error_chain(&err)
        )
    })
}
