//! Loading real folders of manifests.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use pipeline_core::pipeline::{PipelineRef, StrategyKind};
use pipeline_core::ports::{PipelineSource, SecretLookupError, SecretSource};
use pipeline_manifests::{Catalog, LoadError, ManifestCatalog, load_dir};

const GO_ORIGINAL: &str = include_str!("fixtures/go-original.yaml");
const VALID: &str = include_str!("fixtures/valid.yaml");

fn write(dir: &Path, rel: &str, text: &str) -> PathBuf {
    let path = dir.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, text).unwrap();
    path
}

/// A valid pipeline `namespace/name` whose webhook key is in Secret `hmac`.
fn pipeline(namespace: &str, name: &str) -> String {
    format!(
        "apiVersion: pipelines.weave.works/v1alpha1
kind: Pipeline
metadata:
  name: {name}
  namespace: {namespace}
spec:
  appRef: {{apiVersion: kustomize.toolkit.fluxcd.io/v1, kind: Kustomization, name: app}}
  environments:
    - name: dev
      targets: [{{namespace: dev}}]
    - name: prod
      targets: [{{namespace: prod}}]
  promotion:
    strategy:
      secretRef: {{name: hmac}}
      notification: {{}}
"
    )
}

fn hmac_secret(namespace: &str) -> String {
    format!(
        "apiVersion: v1
kind: Secret
metadata: {{name: hmac, namespace: {namespace}}}
stringData: {{hmac-key: k}}
"
    )
}

fn error_lines(catalog: &Catalog) -> Vec<String> {
    catalog.errors.iter().map(ToString::to_string).collect()
}

fn reference(namespace: &str, name: &str) -> PipelineRef {
    PipelineRef::new(namespace, name)
}

#[test]
fn go_original_manifest_is_reported_with_its_missing_field() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "examples/pipe.yaml", GO_ORIGINAL);
    let catalog = load_dir(dir.path());
    assert_eq!(catalog.files, 1);
    assert!(catalog.pipelines.is_empty());
    assert_eq!(
        catalog.errors,
        vec![LoadError {
            file: PathBuf::from("examples/pipe.yaml"),
            document: 1,
            object: Some("Pipeline flux-system/podinfo-02".into()),
            field: Some("spec.promotion.strategy.pull-request.secretRef.name".into()),
            message: "must be set".into(),
        }]
    );
    assert_eq!(
        error_lines(&catalog),
        [
            "examples/pipe.yaml (document 1) Pipeline flux-system/podinfo-02: spec.promotion.strategy.pull-request.secretRef.name: must be set"
        ]
    );
}

#[tokio::test]
async fn valid_pipeline_and_its_secrets_load_from_one_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "valid.yaml", VALID);
    let catalog = load_dir(dir.path());
    assert_eq!(catalog.errors, vec![]);
    assert_eq!(catalog.warnings, Vec::<String>::new());
    assert_eq!((catalog.pipelines.len(), catalog.secrets.len()), (1, 2));

    let pipeline = &catalog.pipelines[&reference("flux-system", "podinfo-03")];
    assert_eq!(pipeline.spec.environments.len(), 3);
    assert_eq!(pipeline.hmac_secret_name(), Some("promotion-credentials"));
    let prod = pipeline.promotion_for("prod").unwrap();
    assert!(prod.manual);
    assert_eq!(prod.strategy.kind(), Some(StrategyKind::PullRequest));
    assert_eq!(
        pipeline.promotion_for("test").unwrap().strategy.kind(),
        Some(StrategyKind::Notification)
    );

    // Through the ports.
    let source = ManifestCatalog::new(dir.path());
    let found = source
        .pipeline(&reference("flux-system", "podinfo-03"))
        .await
        .unwrap();
    assert_eq!(found.as_deref(), Some(&**pipeline));
    assert!(
        source
            .pipeline(&reference("flux-system", "nope"))
            .await
            .unwrap()
            .is_none()
    );
    // stringData wins over data for the same key.
    let key = source
        .secret_value("flux-system", "promotion-credentials", "hmac-key")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(key.expose(), b"webhook-key");
    let other = source
        .secret_value("flux-system", "promotion-credentials", "other")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(other.expose(), b"other");
    assert!(
        source
            .secret_value("flux-system", "promotion-credentials", "missing")
            .await
            .unwrap()
            .is_none()
    );
    let err = source
        .secret_value("flux-system", "absent", "hmac-key")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SecretLookupError::SecretNotFound { namespace, name } if namespace == "flux-system" && name == "absent"),
        "{err:?}"
    );
    // Debug never shows secret values.
    let debug = format!("{:?}", source.catalog());
    assert!(!debug.contains("webhook-key"), "{debug}");
}

#[test]
fn secrets_decode_data_and_default_their_namespace() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "secrets.yml",
        "apiVersion: v1
kind: Secret
metadata:
  name: mixed
data:
  a: YWFh
  wrapped: |
    YmJi
    YmJi
  empty:
stringData:
  b: plain text
",
    );
    let catalog = load_dir(dir.path());
    assert_eq!(catalog.errors, vec![]);
    let secret = &catalog.secrets[&("default".to_string(), "mixed".to_string())];
    let shown: Vec<(&str, &[u8])> = secret
        .iter()
        .map(|(k, v)| (k.as_str(), v.expose()))
        .collect();
    assert_eq!(
        shown,
        [
            ("a", &b"aaa"[..]),
            ("b", b"plain text"),
            ("empty", b""),
            ("wrapped", b"bbbbbb"),
        ]
    );
}

#[test]
fn bad_base64_names_the_key_never_the_value() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        &format!(
            "{}---
apiVersion: v1
kind: Secret
metadata: {{name: hmac, namespace: ns}}
data:
  hmac-key: s3cr3t-not-base64!
  port: 8080
",
            pipeline("ns", "p")
        ),
    );
    let catalog = load_dir(dir.path());
    let lines = error_lines(&catalog);
    assert_eq!(
        lines,
        [
            "a.yaml (document 2) Secret ns/hmac: data.hmac-key: is not valid base64 (standard alphabet, with padding); use stringData for plain text",
            "a.yaml (document 2) Secret ns/hmac: data.port: must be a string (quote it)",
        ]
    );
    assert!(catalog.secrets.is_empty());
    // The pipeline loads, but its promotions will be refused.
    assert!(catalog.pipelines.contains_key(&reference("ns", "p")));
    assert_eq!(catalog.warnings.len(), 1, "{:?}", catalog.warnings);
    assert!(
        catalog.warnings[0].contains("Secret ns/hmac") && catalog.warnings[0].contains("401"),
        "{:?}",
        catalog.warnings
    );
    let everything = format!("{lines:?} {:?} {catalog:?}", catalog.warnings);
    assert!(!everything.contains("s3cr3t"), "{everything}");
}

#[test]
fn invalid_yaml_names_file_document_and_line_and_spares_other_documents() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "mixed.yaml",
        &format!(
            "{}{}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: [oops\n",
            pipeline("ns", "p"),
            format_args!("---\n{}", hmac_secret("ns")),
        ),
    );
    let catalog = load_dir(dir.path());
    assert!(catalog.pipelines.contains_key(&reference("ns", "p")));
    assert_eq!(catalog.secrets.len(), 1);
    assert_eq!(catalog.errors.len(), 1, "{:?}", catalog.errors);
    let error = &catalog.errors[0];
    assert_eq!(
        (error.file.as_path(), error.document),
        (Path::new("mixed.yaml"), 3)
    );
    let line = error.to_string();
    assert!(
        line.starts_with("mixed.yaml (document 3): invalid YAML: "),
        "{line}"
    );
    assert_eq!(
        line,
        "mixed.yaml (document 3): invalid YAML: unclosed bracket '[' at line 25, column 18"
    );
}

#[test]
fn duplicate_pipelines_are_errors_for_every_occurrence() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "one.yaml", &pipeline("ns", "p"));
    write(
        dir.path(),
        "teams/two.yaml",
        &format!("{}---\n{}", pipeline("other", "q"), pipeline("ns", "p")),
    );
    write(dir.path(), "secrets.yaml", &hmac_secret("other"));
    let catalog = load_dir(dir.path());
    assert_eq!(
        error_lines(&catalog),
        [
            "one.yaml (document 1) Pipeline ns/p: duplicate Pipeline: also defined in teams/two.yaml (document 2); none of them is loaded",
            "teams/two.yaml (document 2) Pipeline ns/p: duplicate Pipeline: also defined in one.yaml (document 1); none of them is loaded",
        ]
    );
    let loaded: Vec<_> = catalog.pipelines.keys().cloned().collect();
    assert_eq!(loaded, [reference("other", "q")]);
}

#[test]
fn duplicate_secrets_are_errors_too() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &hmac_secret("ns"));
    write(dir.path(), "b.yaml", &hmac_secret("ns"));
    let catalog = load_dir(dir.path());
    assert_eq!(catalog.errors.len(), 2, "{:?}", catalog.errors);
    assert!(
        catalog
            .errors
            .iter()
            .all(|e| e.object.as_deref() == Some("Secret ns/hmac"))
    );
    assert!(catalog.secrets.is_empty());
}

#[test]
fn every_problem_of_a_pipeline_is_reported_with_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let broken = pipeline("flux-system", "podinfo").replace("name: prod", "name: dev");
    write(
        dir.path(),
        "examples/pipe.yaml",
        &format!("{}---\n{broken}", hmac_secret("flux-system")),
    );
    let catalog = load_dir(dir.path());
    assert_eq!(
        error_lines(&catalog),
        [
            "examples/pipe.yaml (document 2) Pipeline flux-system/podinfo: spec.environments[1].name: duplicate environment name \"dev\""
        ]
    );
    assert!(catalog.pipelines.is_empty());
}

#[test]
fn other_kinds_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "kinds.yaml",
        "apiVersion: v1
kind: ConfigMap
metadata: {name: c}
---
apiVersion: pipelines.weave.works/v1beta1
kind: Pipeline
metadata: {name: p, namespace: ns}
spec: {}
---
- just
- a list
---
apiVersion: pipelines.weave.works/v1alpha1
kind: Pipeline
metadata: {namespace: ns}
spec: {}
---
apiVersion: pipelines.weave.works/v1alpha1
kind: Pipeline
metadata: {name: nospec}
",
    );
    write(dir.path(), "values.yml", "replicas: 2\n");
    let catalog = load_dir(dir.path());
    assert_eq!(catalog.ignored, 3);
    assert_eq!(catalog.files, 2);
    assert_eq!(
        error_lines(&catalog),
        [
            "kinds.yaml (document 2) Pipeline ns/p: apiVersion: \"pipelines.weave.works/v1beta1\" is not supported; expected \"pipelines.weave.works/v1alpha1\"",
            "kinds.yaml (document 4) Pipeline: metadata.name: must be set",
            "kinds.yaml (document 5) Pipeline default/nospec: spec: must be set",
        ]
    );
}

#[test]
fn missing_secrets_are_warnings() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &pipeline("ns", "no-secret"));
    write(
        dir.path(),
        "b.yaml",
        &format!(
            "{}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: hmac, namespace: keyless}}\nstringData: {{other: x}}\n",
            pipeline("keyless", "p")
        ),
    );
    write(
        dir.path(),
        "c.yaml",
        &pipeline("unsigned", "p").replace("      secretRef: {name: hmac}\n", ""),
    );
    let catalog = load_dir(dir.path());
    assert_eq!(catalog.errors, vec![]);
    assert_eq!(catalog.pipelines.len(), 3);
    let warnings = &catalog.warnings;
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(warnings[0].starts_with("a.yaml (document 1) Pipeline ns/no-secret: spec.promotion.strategy.secretRef names Secret ns/hmac, which is not loaded"), "{warnings:?}");
    assert!(
        warnings[1].starts_with(
            "b.yaml (document 1) Pipeline keyless/p: Secret keyless/hmac has no \"hmac-key\" key"
        ),
        "{warnings:?}"
    );
    assert!(
        warnings[2].starts_with(
            "c.yaml (document 1) Pipeline unsigned/p: spec.promotion.strategy.secretRef is not set"
        ),
        "{warnings:?}"
    );
    assert!(
        warnings.iter().all(|w| w.ends_with("refused with 401")),
        "{warnings:?}"
    );
}

#[test]
fn walks_nested_folders_and_skips_hidden_ones_and_other_files() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a/b/c/deep.yaml", &pipeline("ns", "deep"));
    write(dir.path(), "a/secret.yml", &hmac_secret("ns"));
    write(dir.path(), ".git/config.yaml", &pipeline("ns", "git"));
    write(dir.path(), "a/.hidden/x.yaml", &pipeline("ns", "hidden"));
    write(dir.path(), "a/.dotfile.yaml", &pipeline("ns", "dotfile"));
    write(dir.path(), "README.md", "not yaml: [");
    write(dir.path(), "a/pipe.yaml.bak", "not yaml: [");
    let catalog = load_dir(dir.path());
    assert_eq!(catalog.errors, vec![]);
    assert_eq!(catalog.files, 2);
    let loaded: Vec<_> = catalog.pipelines.keys().cloned().collect();
    assert_eq!(loaded, [reference("ns", "deep")]);
    assert_eq!(catalog.warnings, Vec::<String>::new());
}

#[test]
fn a_missing_folder_is_one_error() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = load_dir(&dir.path().join("absent"));
    assert_eq!(catalog.errors.len(), 1);
    let line = catalog.errors[0].to_string();
    assert!(line.starts_with(".: cannot read folder "), "{line}");
}

#[cfg(unix)]
#[test]
fn follows_symlinks_but_not_loops() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    // As Kubernetes mounts a ConfigMap: visible names link into a hidden folder.
    write(dir.path(), "..2024_01_01/pipe.yaml", &pipeline("ns", "p"));
    write(dir.path(), "..2024_01_01/hmac.yaml", &hmac_secret("ns"));
    symlink("..2024_01_01", dir.path().join("..data")).unwrap();
    symlink("..data/pipe.yaml", dir.path().join("pipe.yaml")).unwrap();
    symlink("..data/hmac.yaml", dir.path().join("hmac.yaml")).unwrap();
    // A loop.
    fs::create_dir(dir.path().join("sub")).unwrap();
    symlink("..", dir.path().join("sub/parent")).unwrap();
    let catalog = load_dir(dir.path());
    assert_eq!(catalog.errors, vec![]);
    assert_eq!(catalog.files, 2);
    assert!(catalog.pipelines.contains_key(&reference("ns", "p")));
    assert_eq!(catalog.warnings, Vec::<String>::new());
}

#[test]
fn reload_picks_up_added_modified_and_deleted_files() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "hmac.yaml", &hmac_secret("ns"));
    let first = write(dir.path(), "first.yaml", &pipeline("ns", "first"));
    let source = ManifestCatalog::new(dir.path());
    assert_eq!(source.catalog().pipelines.len(), 1);
    assert!(source.reload_if_changed().is_none());

    let second = write(dir.path(), "second.yaml", &pipeline("ns", "second"));
    let report = source.reload_if_changed().unwrap();
    assert_eq!((report.pipelines, report.files), (2, 3));

    fs::write(&first, pipeline("ns", "renamed-first")).unwrap();
    let report = source.reload();
    assert_eq!(report.pipelines, 2);
    let catalog = source.catalog();
    assert!(
        catalog
            .pipelines
            .contains_key(&reference("ns", "renamed-first"))
    );
    assert!(!catalog.pipelines.contains_key(&reference("ns", "first")));

    fs::remove_file(&second).unwrap();
    let report = source.reload_if_changed().unwrap();
    assert_eq!((report.pipelines, report.files), (1, 2));
    assert!(source.reload_if_changed().is_none());

    // A broken edit drops only that file's pipeline; the others keep serving.
    write(dir.path(), "broken.yaml", "kind: Pipeline\napiVersion: [\n");
    let report = source.reload_if_changed().unwrap();
    assert_eq!((report.pipelines, report.errors.len()), (1, 1));
    assert!(
        source
            .catalog()
            .pipelines
            .contains_key(&reference("ns", "renamed-first"))
    );
}

/// The rendered value of a metric without labels.
fn gauge(metrics: &pipeline_core::Metrics, name: &str) -> String {
    let text = metrics.render();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .to_string()
}

#[tokio::test]
async fn a_valid_file_that_breaks_is_served_from_its_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "team/pipe.yaml",
        &format!("{}---\n{}", pipeline("ns", "kept"), hmac_secret("ns")),
    );
    write(dir.path(), "other.yaml", &pipeline("ns", "other"));
    let metrics = std::sync::Arc::new(pipeline_core::Metrics::new());
    let source = ManifestCatalog::new(dir.path()).with_metrics(metrics.clone());
    assert_eq!(source.catalog().pipelines.len(), 2);
    assert_eq!(
        gauge(&metrics, "pipeline_controller_manifest_files_invalid"),
        "0"
    );
    assert_eq!(
        gauge(&metrics, "pipeline_controller_manifest_files_last_good"),
        "0"
    );

    // Bad YAML: the pipeline and the secret of the last good version stay.
    fs::write(&file, "kind: Pipeline\napiVersion: [\n").unwrap();
    let report = source.reload();
    assert_eq!(report.pipelines, 2, "{report:?}");
    assert_eq!(report.secrets, 1);
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.last_good.len(), 1);
    let held = &source.last_good_files()[0];
    assert_eq!(held.file, Path::new("team/pipe.yaml"));
    assert_eq!(held.errors, report.errors);
    let shown = held.to_string();
    assert!(
        shown.starts_with(
            "team/pipe.yaml is invalid, serving its last good version: team/pipe.yaml (document 1)"
        ),
        "{shown}"
    );
    assert!(
        source
            .pipeline(&reference("ns", "kept"))
            .await
            .unwrap()
            .is_some()
    );
    let key = source.secret_value("ns", "hmac", "hmac-key").await.unwrap();
    assert_eq!(key.unwrap().expose(), b"k");
    assert_eq!(
        gauge(&metrics, "pipeline_controller_manifest_files_invalid"),
        "1"
    );
    assert_eq!(
        gauge(&metrics, "pipeline_controller_manifest_files_last_good"),
        "1"
    );

    // An invalid Pipeline (valid YAML): still the last good version, with the new error.
    fs::write(
        &file,
        "apiVersion: pipelines.weave.works/v1alpha1\nkind: Pipeline\nmetadata: {name: kept, namespace: ns}\nspec: {environments: []}\n",
    )
    .unwrap();
    let report = source.reload();
    assert_eq!(report.pipelines, 2);
    assert_eq!(report.secrets, 1);
    assert_eq!(
        error_lines(&source.catalog()),
        ["team/pipe.yaml (document 1) Pipeline ns/kept: spec: missing field `appRef`"]
    );
    assert_eq!(report.last_good[0].errors, report.errors);

    // A valid version with changes replaces the last good one.
    fs::write(&file, pipeline("ns", "renamed")).unwrap();
    let report = source.reload();
    assert_eq!(report.last_good, vec![]);
    assert_eq!(report.errors, vec![]);
    let catalog = source.catalog();
    assert!(catalog.pipelines.contains_key(&reference("ns", "renamed")));
    assert!(!catalog.pipelines.contains_key(&reference("ns", "kept")));
    assert!(catalog.secrets.is_empty(), "the secret left the file");
    assert_eq!(
        gauge(&metrics, "pipeline_controller_manifest_files_invalid"),
        "0"
    );
    assert_eq!(
        gauge(&metrics, "pipeline_controller_manifest_files_last_good"),
        "0"
    );

    // Broken again, then deleted: deleting a file drops its last good version too.
    fs::write(&file, "not: [valid\n").unwrap();
    source.reload();
    assert!(
        source
            .catalog()
            .pipelines
            .contains_key(&reference("ns", "renamed"))
    );
    fs::remove_file(&file).unwrap();
    let report = source.reload();
    assert_eq!(report.last_good, vec![]);
    assert_eq!(report.errors, vec![]);
    assert!(
        !source
            .catalog()
            .pipelines
            .contains_key(&reference("ns", "renamed"))
    );
    // And a new file at the same path starts without a last good version.
    fs::write(&file, "not: [valid\n").unwrap();
    let report = source.reload();
    assert_eq!((report.last_good.len(), report.errors.len()), (0, 1));
    assert_eq!(
        gauge(&metrics, "pipeline_controller_manifest_files_invalid"),
        "1"
    );
    assert_eq!(
        gauge(&metrics, "pipeline_controller_manifest_files_last_good"),
        "0"
    );
}

#[test]
fn a_file_that_was_never_valid_contributes_only_its_valid_documents() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "hmac.yaml", &hmac_secret("ns"));
    let file = write(
        dir.path(),
        "mixed.yaml",
        &format!(
            "{}---\nkind: Pipeline\napiVersion: [\n",
            pipeline("ns", "good")
        ),
    );
    let source = ManifestCatalog::new(dir.path());
    let catalog = source.catalog();
    assert!(catalog.pipelines.contains_key(&reference("ns", "good")));
    assert_eq!(catalog.errors.len(), 1);
    assert_eq!(catalog.last_good, vec![]);

    // Still never valid: what it holds now is what loads.
    fs::write(&file, "kind: Pipeline\napiVersion: [\n").unwrap();
    let report = source.reload();
    assert_eq!((report.pipelines, report.last_good.len()), (0, 0));
}

#[test]
fn a_file_that_becomes_partly_invalid_is_served_whole_from_its_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "hmac.yaml", &hmac_secret("ns"));
    let file = write(dir.path(), "pipes.yaml", &pipeline("ns", "one"));
    let source = ManifestCatalog::new(dir.path());
    // A second, valid pipeline is added in the same edit that breaks the first one: the
    // file is served as it last loaded, so the new pipeline waits for the fix.
    fs::write(
        &file,
        format!(
            "{}---\n{}",
            pipeline("ns", "two"),
            pipeline("ns", "one").replace("appRef", "appReff")
        ),
    )
    .unwrap();
    let report = source.reload();
    assert_eq!(report.last_good.len(), 1);
    let catalog = source.catalog();
    assert!(catalog.pipelines.contains_key(&reference("ns", "one")));
    assert!(!catalog.pipelines.contains_key(&reference("ns", "two")));
    // The same object defined again in another file is a folder problem, not the file's.
    write(dir.path(), "copy.yaml", &pipeline("ns", "one"));
    let report = source.reload();
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.message.starts_with("duplicate Pipeline")),
        "{report:?}"
    );
    assert!(
        !source
            .catalog()
            .pipelines
            .contains_key(&reference("ns", "one"))
    );
}

#[cfg(unix)]
#[test]
fn an_unreadable_file_is_served_from_its_last_good_version() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "hmac.yaml", &hmac_secret("ns"));
    let file = write(dir.path(), "pipe.yaml", &pipeline("ns", "p"));
    let source = ManifestCatalog::new(dir.path());
    fs::set_permissions(&file, fs::Permissions::from_mode(0o000)).unwrap();
    if fs::read(&file).is_ok() {
        // Running as root: permissions do not stop reading; nothing to check.
        return;
    }
    let report = source.reload();
    assert_eq!(report.last_good.len(), 1, "{report:?}");
    assert!(
        source
            .catalog()
            .pipelines
            .contains_key(&reference("ns", "p"))
    );
}
