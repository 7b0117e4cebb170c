//! Server-side apply of arbitrary YAML manifests, as `kubectl apply --server-side` does.

use std::time::{Duration, Instant};

use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Scope, pinned_kind};

use crate::{Error, FIELD_MANAGER};

/// The non-empty documents of a (multi-document) YAML stream, as JSON values.
pub fn parse_yaml_documents(yaml: &str) -> Result<Vec<serde_json::Value>, Error> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml)
        .map_err(|e| Error::Other(format!("parsing YAML: {e}")))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Server-side applies (field manager [`FIELD_MANAGER`], forced) every document of `yaml`
/// in order, with `dryRun=All` when `dry_run`. Namespaced objects without a namespace go
/// to `default`. Kinds are resolved by discovery (waiting up to 10 s for a kind whose
/// CRD was just created). Returns the objects as the API server answered them; stops at
/// the first error, which names the object.
pub async fn apply_yaml(
    client: &Client,
    yaml: &str,
    dry_run: bool,
) -> Result<Vec<DynamicObject>, Error> {
    let mut applied = Vec::new();
    for doc in parse_yaml_documents(yaml)? {
        applied.push(apply_value(client, doc, dry_run).await?);
    }
    Ok(applied)
}

async fn apply_value(
    client: &Client,
    doc: serde_json::Value,
    dry_run: bool,
) -> Result<DynamicObject, Error> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_owned();
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    let object: DynamicObject = serde_json::from_value(doc)
        .map_err(|e| Error::Other(format!("{api_version} {kind}: not an object: {e}")))?;
    let name = object.metadata.name.clone().unwrap_or_default();
    let what = format!("{kind} {name} ({api_version})");
    if api_version.is_empty() || kind.is_empty() || name.is_empty() {
        return Err(Error::Other(format!(
            "{what}: apiVersion, kind and metadata.name are required"
        )));
    }
    let (group, version) = api_version
        .split_once('/')
        .unwrap_or(("", api_version.as_str()));
    let gvk = GroupVersionKind::gvk(group, version, &kind);

    let deadline = Instant::now() + Duration::from_secs(10);
    let (resource, caps) = loop {
        match pinned_kind(client, &gvk).await {
            Ok(found) => break found,
            Err(e) if Instant::now() > deadline => {
                return Err(Error::kube(format!("{what}: discovering the kind"), e));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Cluster => Api::all_with(client.clone(), &resource),
        Scope::Namespaced => {
            let namespace = object.metadata.namespace.as_deref().unwrap_or("default");
            Api::namespaced_with(client.clone(), namespace, &resource)
        }
    };
    let mut params = PatchParams::apply(FIELD_MANAGER).force();
    if dry_run {
        params = params.dry_run();
    }
    api.patch(&name, &params, &Patch::Apply(&object))
        .await
        .map_err(|e| {
            let mode = if dry_run {
                "dry-run applying"
            } else {
                "applying"
            };
            Error::kube(format!("{mode} {what}"), e)
        })
}
