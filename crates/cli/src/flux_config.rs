//! `flux-config`: writes, for GitOps delivery, the Flux Provider and Alert every leaf
//! cluster needs (a folder per cluster and namespace, with a `kustomization.yaml`) and,
//! for the management cluster, a Flux Kustomization per cluster that applies its folder
//! (remotely, through the cluster's kubeconfig Secret). Deterministic: re-running it on
//! a repository changes nothing unless the pipelines did.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::{Api, ResourceExt};
use pipeline_core::deployment::{ClusterKey, KubeconfigRef, kubeconfig_ref};
use pipeline_core::flux_wiring::{GitOpsLayout, gitops_files};
use pipeline_core::{Pipeline, PipelineRef};
use pipeline_kube::public_url::{Exposure, PublicUrl, resolve as resolve_public_url};
use serde_json::Value;

use crate::cli::FluxConfigArgs;
use crate::errors::usage;

/// Folders of the output that `flux-config` owns (and clears before writing).
const OWNED: [&str; 2] = ["clusters", "management"];

pub async fn run(args: FluxConfigArgs) -> anyhow::Result<()> {
    let (pipelines, gitops_clusters) = match &args.manifests {
        Some(dir) => from_manifests(dir)?,
        None => from_cluster().await?,
    };
    let wanted: Vec<&Pipeline> = match &args.pipeline {
        Some(text) => {
            let reference = PipelineRef::parse(text).ok_or_else(|| {
                usage(format!(
                    "--pipeline {text:?} is not of the form NAMESPACE/NAME"
                ))
            })?;
            let found: Vec<&Pipeline> = pipelines
                .iter()
                .filter(|p| p.reference == reference)
                .collect();
            if found.is_empty() {
                anyhow::bail!("no valid pipeline {reference} found");
            }
            found
        }
        None => pipelines.iter().collect(),
    };
    let (source_namespace, source_name) = args.source.split_once('/').ok_or_else(|| {
        usage(format!(
            "--source {:?} is not of the form NAMESPACE/NAME",
            args.source
        ))
    })?;
    let layout = GitOpsLayout {
        repo_path: args.repo_path.clone(),
        source_name: source_name.to_string(),
        source_namespace: source_namespace.to_string(),
        kustomization_namespace: args.kustomization_namespace.clone(),
    };
    let resolve = |cluster: &ClusterKey| -> Result<KubeconfigRef, String> {
        let object = match cluster {
            ClusterKey::Remote {
                namespace, name, ..
            } => gitops_clusters.get(&(namespace.clone(), name.clone())),
            ClusterKey::Local => None,
        };
        kubeconfig_ref(cluster, object)
    };
    let public_url = match &args.public_url {
        Some(url) => url.as_str().trim_end_matches('/').to_string(),
        None => derived_public_url(&args).await?,
    };
    let output = gitops_files(&wanted, &public_url, &layout, &resolve);
    for warning in &output.warnings {
        eprintln!("warning: {warning}");
    }
    let files = output.files;
    write(&args.output_dir, &files)?;
    println!(
        "wrote {} files for {} pipeline(s) to {}",
        files.len(),
        wanted.len(),
        args.output_dir.display()
    );
    Ok(())
}

/// The public URL as `serve` derives it when --public-url is not set, said on stderr.
async fn derived_public_url(args: &FluxConfigArgs) -> anyhow::Result<String> {
    if args.manifests.is_some() {
        return Err(usage(
            "pass --public-url URL: with --manifests there is no cluster to derive it from",
        ));
    }
    let client = crate::kubeconfig::client("pass --public-url URL").await?;
    let exposure = Exposure {
        flag: None,
        service_namespace: args.service_namespace.clone(),
        service_name: args.service_name.clone(),
    };
    match resolve_public_url(&client, &exposure).await {
        PublicUrl::Found { url, source } => {
            eprintln!("public URL: {url} (from {source})");
            Ok(url)
        }
        missing => Err(usage(format!("no public URL: {missing}"))),
    }
}

type GitopsClusters = HashMap<(String, String), Value>;

fn from_manifests(dir: &Path) -> anyhow::Result<(Vec<Pipeline>, GitopsClusters)> {
    let catalog = pipeline_manifests::load_dir(dir);
    if let Some(first) = catalog.errors.first() {
        eprintln!(
            "warning: {} problem(s) in {}; the first: {first}",
            catalog.errors.len(),
            dir.display()
        );
    }
    let pipelines = catalog
        .pipelines
        .values()
        .map(|p| p.as_ref().clone())
        .collect();
    Ok((pipelines, catalog.clusters.clone()))
}

async fn from_cluster() -> anyhow::Result<(Vec<Pipeline>, GitopsClusters)> {
    let client =
        crate::kubeconfig::client("pass --manifests DIR to read pipelines from a folder").await?;
    let objects = Api::<pipeline_crds::Pipeline>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing Pipelines")?;
    let pipelines = objects
        .items
        .iter()
        .filter_map(|object| pipeline_kube::sources::validate(object).ok())
        .collect();
    let gvk = GroupVersionKind::gvk("gitops.weave.works", "v1alpha1", "GitopsCluster");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "gitopsclusters");
    // A cluster without the GitopsCluster CRD has none.
    let clusters = match Api::<DynamicObject>::all_with(client, &resource)
        .list(&ListParams::default())
        .await
    {
        Ok(list) => list
            .items
            .iter()
            .map(|o| {
                (
                    (o.namespace().unwrap_or_default(), o.name_any()),
                    serde_json::to_value(o).unwrap_or_default(),
                )
            })
            .collect(),
        Err(_) => GitopsClusters::new(),
    };
    Ok((pipelines, clusters))
}

/// Replaces the owned folders of `out` with `files`.
fn write(out: &Path, files: &pipeline_core::flux_wiring::Files) -> anyhow::Result<()> {
    for owned in OWNED {
        let dir = out.join(owned);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
    }
    for (path, file) in files {
        let target: PathBuf = out.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut text = file.header.clone();
        for (i, document) in file.documents.iter().enumerate() {
            if i > 0 {
                text.push_str("---\n");
            }
            text.push_str(
                &serde_saphyr::to_string(document)
                    .with_context(|| format!("writing {}", target.display()))?,
            );
        }
        std::fs::write(&target, text).with_context(|| format!("writing {}", target.display()))?;
    }
    Ok(())
}
