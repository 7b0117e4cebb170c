//! Reading a folder of manifests into a [`Catalog`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use pipeline_core::SecretBytes;
use pipeline_core::intake::HMAC_KEY;
use pipeline_core::pipeline::{
    API_VERSION, PIPELINE_KIND, Pipeline, PipelineRef, PipelineSpec, Promotion, parse_pipeline_spec,
};
use serde_json::Value;

use crate::document::{Document, parse_documents};
use crate::walk::{Walk, walk};

/// The keys and values of one Secret.
pub type SecretData = BTreeMap<String, SecretBytes>;

/// Namespace `kubectl` assumes when a manifest names none.
const DEFAULT_NAMESPACE: &str = "default";

/// Everything a folder of manifests holds, as read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Valid pipelines; invalid or duplicated ones are left out (see `errors`).
    pub pipelines: HashMap<PipelineRef, Arc<Pipeline>>,
    /// Secrets by `(namespace, name)`; `stringData` already merged over `data`.
    pub secrets: HashMap<(String, String), SecretData>,
    /// `GitopsCluster` objects (`gitops.weave.works`) by `(namespace, name)`, as JSON:
    /// they say which Secret holds a leaf cluster's kubeconfig.
    pub clusters: HashMap<(String, String), Value>,
    /// Problems, in file order. Each one left a document (or file) out.
    pub errors: Vec<LoadError>,
    /// Problems that load nonetheless but will make the controller refuse or fail work.
    pub warnings: Vec<String>,
    /// Manifest files read.
    pub files: usize,
    /// Documents of other kinds (and documents that are not Kubernetes objects), skipped.
    pub ignored: usize,
    /// Files that have problems now but loaded cleanly before: their objects are loaded
    /// from that last good version (only [`ManifestCatalog`](crate::ManifestCatalog)
    /// remembers one; [`load_dir`] never fills this).
    pub last_good: Vec<LastGoodFile>,
}

/// A manifest file that is invalid now and served from its last good version.
///
/// Displays as `team/pipe.yaml is invalid, serving its last good version: <first error>`
/// (`(and N more)` when there are several).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastGoodFile {
    /// Relative to the folder.
    pub file: PathBuf,
    /// Its current problems (at least one).
    pub errors: Vec<LoadError>,
}

impl fmt::Display for LastGoodFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is invalid, serving its last good version",
            self.file.display()
        )?;
        if let Some(first) = self.errors.first() {
            write!(f, ": {first}")?;
        }
        if self.errors.len() > 1 {
            write!(f, " (and {} more)", self.errors.len() - 1)?;
        }
        Ok(())
    }
}

/// One problem with one document (or a whole file, when `document` is 0).
///
/// Displays as
/// `examples/pipe.yaml (document 2) Pipeline flux-system/podinfo: spec.environments[1].name: duplicate environment name "dev"`.
/// Never holds a secret value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadError {
    /// Relative to the folder; empty for the folder itself.
    pub file: PathBuf,
    /// 1-based position of the document in the file (`---`-separated, empty documents
    /// counted); 0 when the problem concerns the whole file.
    pub document: usize,
    /// `Pipeline namespace/name` or `Secret namespace/name`, when known.
    pub object: Option<String>,
    /// Field path within the object (`spec.environments[1].name`, `data.hmac-key`).
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.file.as_os_str().is_empty() {
            f.write_str(".")?;
        } else {
            write!(f, "{}", self.file.display())?;
        }
        if self.document > 0 {
            write!(f, " (document {})", self.document)?;
        }
        if let Some(object) = &self.object {
            write!(f, " {object}")?;
        }
        f.write_str(": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Where a document is.
#[derive(Debug, Clone)]
struct Location {
    file: PathBuf,
    document: usize,
}

impl Location {
    fn describe(&self) -> String {
        format!("{} (document {})", self.file.display(), self.document)
    }

    fn error(
        &self,
        object: Option<String>,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> LoadError {
        LoadError {
            file: self.file.clone(),
            document: self.document,
            object,
            field: field.map(str::to_string),
            message: message.into(),
        }
    }
}

/// A `(field, message)` problem inside one object.
type FieldProblem = (String, String);

struct PipelineDoc {
    location: Location,
    reference: PipelineRef,
    spec: Result<PipelineSpec, Vec<FieldProblem>>,
}

struct SecretDoc {
    location: Location,
    namespace: String,
    name: String,
    data: Result<SecretData, Vec<FieldProblem>>,
}

impl SecretDoc {
    fn object(&self) -> String {
        format!("Secret {}/{}", self.namespace, self.name)
    }
}

/// Reads every `*.yaml` / `*.yml` file under `dir` (recursively; names starting with `.`
/// skipped; symlinks followed, loops not) and every YAML document in them.
///
/// `Pipeline` (`pipelines.weave.works/v1alpha1`) and `Secret` (`v1`) objects are loaded;
/// other kinds are counted in [`Catalog::ignored`]. Invalid or duplicated objects are
/// left out and reported in [`Catalog::errors`]; the rest load.
pub fn load_dir(dir: &Path) -> Catalog {
    load_walk(&walk(dir))
}

pub(crate) fn load_walk(walk: &Walk) -> Catalog {
    load_walk_keeping(walk, &mut HashMap::new())
}

/// The parsed documents of one file, before files are combined.
#[derive(Default)]
struct FileDocs {
    pipelines: Vec<PipelineDoc>,
    secrets: Vec<SecretDoc>,
    clusters: Vec<((String, String), Value)>,
    /// Problems of the file itself (YAML, object metadata, other problems not tied to a
    /// loaded document); invalid specs and Secret data stay in the docs.
    errors: Vec<LoadError>,
    ignored: usize,
}

impl FileDocs {
    /// Whether the file loads without a problem of its own: every document parses, every
    /// object is valid, and no object is defined twice within the file. (Objects defined
    /// in other files too are a problem of the folder, not of the file.)
    fn is_valid(&self) -> bool {
        self.errors.is_empty()
            && self.pipelines.iter().all(|p| p.spec.is_ok())
            && self.secrets.iter().all(|s| s.data.is_ok())
            && duplicates(
                self.pipelines
                    .iter()
                    .map(|d| (d.reference.clone(), d.location.clone())),
            )
            .is_empty()
            && duplicates(
                self.secrets
                    .iter()
                    .map(|d| ((d.namespace.clone(), d.name.clone()), d.location.clone())),
            )
            .is_empty()
    }

    /// The problems this file would report if it were the only one in the folder.
    fn own_errors(rel: &Path, text: &str) -> Vec<LoadError> {
        let mut alone = Catalog::default();
        assemble(vec![parse_file(rel, text)], &mut alone);
        alone.errors
    }
}

fn parse_file(rel: &Path, text: &str) -> FileDocs {
    let mut docs = FileDocs::default();
    for Document { number, value } in parse_documents(text) {
        let location = Location {
            file: rel.to_path_buf(),
            document: number,
        };
        match value {
            Err(message) => docs.errors.push(location.error(None, None, message)),
            Ok(value) => classify(value, location, &mut docs),
        }
    }
    docs
}

/// Like [`load_walk`], but a file that loaded without problems before (its text is in
/// `last_good`, by path) and has problems now is served from that last good text: its
/// objects stay loaded, its current problems are in [`Catalog::errors`] and it is listed
/// in [`Catalog::last_good`]. Files that load cleanly replace their entry in `last_good`;
/// files gone from the folder lose theirs. A file that never loaded cleanly is loaded as
/// it is (its valid documents load, the others are reported).
pub(crate) fn load_walk_keeping(walk: &Walk, last_good: &mut HashMap<PathBuf, String>) -> Catalog {
    let mut catalog = Catalog::default();
    let mut files: Vec<FileDocs> = Vec::new();
    let mut held: Vec<LastGoodFile> = Vec::new();

    for error in &walk.errors {
        catalog.errors.push(LoadError {
            file: error.rel.clone(),
            document: 0,
            object: None,
            field: None,
            message: error.message.clone(),
        });
    }

    let mut seen: std::collections::HashSet<&Path> = std::collections::HashSet::new();
    for file in &walk.files {
        seen.insert(&file.rel);
        let whole_file = |message: String| LoadError {
            file: file.rel.clone(),
            document: 0,
            object: None,
            field: None,
            message,
        };
        let text = match std::fs::read(&file.abs) {
            Err(err) => Err(whole_file(format!("cannot read file: {err}"))),
            Ok(bytes) => {
                catalog.files += 1;
                String::from_utf8(bytes).map_err(|_| whole_file("not valid UTF-8".to_string()))
            }
        };
        let errors = match text {
            Err(error) => vec![error],
            Ok(text) => {
                let docs = parse_file(&file.rel, &text);
                if docs.is_valid() {
                    last_good.insert(file.rel.clone(), text);
                    files.push(docs);
                    continue;
                }
                if !last_good.contains_key(&file.rel) {
                    // Never loaded cleanly: its valid documents load, as they are.
                    files.push(docs);
                    continue;
                }
                // Its current problems, as `validate` reports them.
                FileDocs::own_errors(&file.rel, &text)
            }
        };
        match last_good.get(&file.rel) {
            Some(good) => {
                catalog.errors.extend(errors.iter().cloned());
                held.push(LastGoodFile {
                    file: file.rel.clone(),
                    errors,
                });
                files.push(parse_file(&file.rel, good));
            }
            None => catalog.errors.extend(errors),
        }
    }

    // Files not listed by the walk: deleted (forgotten), or behind a walk error such as
    // an unreadable folder (still served, as for an unreadable file).
    last_good.retain(|rel, _| {
        seen.contains(rel.as_path()) || walk.errors.iter().any(|e| rel.starts_with(&e.rel))
    });
    let mut unlisted: Vec<(&PathBuf, &String)> = last_good
        .iter()
        .filter(|(rel, _)| !seen.contains(rel.as_path()))
        .collect();
    unlisted.sort();
    for (rel, good) in unlisted {
        let errors = walk
            .errors
            .iter()
            .filter(|e| rel.starts_with(&e.rel))
            .map(|e| LoadError {
                file: e.rel.clone(),
                document: 0,
                object: None,
                field: None,
                message: e.message.clone(),
            })
            .collect();
        held.push(LastGoodFile {
            file: rel.clone(),
            errors,
        });
        files.push(parse_file(rel, good));
    }
    held.sort_by(|a, b| a.file.cmp(&b.file));
    catalog.last_good = held;

    assemble(files, &mut catalog);
    catalog
}

/// Combines the documents of every file into `catalog`: objects defined in several
/// files are errors, the rest load; then the Secrets the pipelines need are checked.
fn assemble(files: Vec<FileDocs>, catalog: &mut Catalog) {
    let mut pipelines = Vec::new();
    let mut secrets = Vec::new();
    for file in files {
        catalog.errors.extend(file.errors);
        catalog.ignored += file.ignored;
        pipelines.extend(file.pipelines);
        secrets.extend(file.secrets);
        for (key, object) in file.clusters {
            if catalog.clusters.insert(key.clone(), object).is_some() {
                catalog.warnings.push(format!(
                    "GitopsCluster {}/{} is defined more than once; the last definition is used",
                    key.0, key.1
                ));
            }
        }
    }
    load_secrets(secrets, catalog);
    let loaded = load_pipelines(pipelines, catalog);
    for (location, pipeline) in &loaded {
        check_secrets(location, pipeline, catalog);
    }
    // Stable: problems of one document keep their order.
    catalog
        .errors
        .sort_by(|a, b| (&a.file, a.document).cmp(&(&b.file, b.document)));
}

/// Sorts one document into pipelines, secrets, errors or ignored.
fn classify(value: Value, location: Location, docs: &mut FileDocs) {
    let Value::Object(mut object) = value else {
        docs.ignored += 1;
        return;
    };
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    let api_version = object.get("apiVersion").and_then(Value::as_str);
    match (kind, api_version) {
        (PIPELINE_KIND, Some(API_VERSION)) => {
            let reference = match metadata(&object, PIPELINE_KIND) {
                Ok((namespace, name)) => PipelineRef::new(namespace, name),
                Err(problems) => {
                    push_problems(
                        &mut docs.errors,
                        &location,
                        PIPELINE_KIND.to_string(),
                        problems,
                    );
                    return;
                }
            };
            let spec = match object.remove("spec") {
                None | Some(Value::Null) => Err(vec![("spec".to_string(), "must be set".into())]),
                Some(spec) => parse_pipeline_spec(spec)
                    .map_err(|errors| errors.into_iter().map(|e| (e.field, e.message)).collect()),
            };
            docs.pipelines.push(PipelineDoc {
                location,
                reference,
                spec,
            });
        }
        (PIPELINE_KIND, api_version) => {
            let label = match metadata(&object, PIPELINE_KIND) {
                Ok((namespace, name)) => format!("{PIPELINE_KIND} {namespace}/{name}"),
                Err(_) => PIPELINE_KIND.to_string(),
            };
            let message = match api_version {
                Some(other) => format!("{other:?} is not supported; expected {API_VERSION:?}"),
                None => format!("must be set to {API_VERSION:?}"),
            };
            docs.errors
                .push(location.error(Some(label), Some("apiVersion"), message));
        }
        ("Secret", Some("v1")) => {
            let (namespace, name) = match metadata(&object, "Secret") {
                Ok(found) => found,
                Err(problems) => {
                    push_problems(&mut docs.errors, &location, "Secret".to_string(), problems);
                    return;
                }
            };
            let data = secret_data(&object);
            docs.secrets.push(SecretDoc {
                location,
                namespace,
                name,
                data,
            });
        }
        ("GitopsCluster", Some(api_version)) if api_version.starts_with("gitops.weave.works/") => {
            match metadata(&object, "GitopsCluster") {
                Ok(key) => docs.clusters.push((key, Value::Object(object))),
                Err(problems) => {
                    push_problems(
                        &mut docs.errors,
                        &location,
                        "GitopsCluster".to_string(),
                        problems,
                    );
                }
            }
        }
        _ => docs.ignored += 1,
    }
}

fn push_problems(
    errors: &mut Vec<LoadError>,
    location: &Location,
    object: String,
    problems: Vec<FieldProblem>,
) {
    for (field, message) in problems {
        errors.push(location.error(Some(object.clone()), Some(&field), message));
    }
}

/// `(namespace, name)` from `metadata`; the namespace defaults to `default`.
fn metadata(
    object: &serde_json::Map<String, Value>,
    kind: &str,
) -> Result<(String, String), Vec<FieldProblem>> {
    let mut problems = Vec::new();
    let problem = |field: &str, message: &str| (field.to_string(), message.to_string());
    let metadata = match object.get("metadata") {
        Some(Value::Object(metadata)) => metadata,
        Some(_) => return Err(vec![problem("metadata", "must be a mapping")]),
        None => return Err(vec![problem("metadata.name", "must be set")]),
    };
    let name = match metadata.get("name") {
        Some(Value::String(name)) if !name.is_empty() => name.clone(),
        None | Some(Value::Null) => {
            problems.push(problem("metadata.name", "must be set"));
            String::new()
        }
        Some(Value::String(_)) => {
            problems.push(problem("metadata.name", "must not be empty"));
            String::new()
        }
        Some(_) => {
            problems.push(problem("metadata.name", "must be a string"));
            String::new()
        }
    };
    let namespace = match metadata.get("namespace") {
        None | Some(Value::Null) => DEFAULT_NAMESPACE.to_string(),
        Some(Value::String(namespace)) if namespace.is_empty() => DEFAULT_NAMESPACE.to_string(),
        Some(Value::String(namespace)) => namespace.clone(),
        Some(_) => {
            problems.push(problem("metadata.namespace", "must be a string"));
            String::new()
        }
    };
    for (field, value) in [("metadata.name", &name), ("metadata.namespace", &namespace)] {
        if value.contains('/') {
            problems.push((
                field.to_string(),
                format!("{kind} names cannot contain '/' (got {value:?})"),
            ));
        }
    }
    if problems.is_empty() {
        Ok((namespace, name))
    } else {
        Err(problems)
    }
}

/// Decodes `data` (base64) and `stringData` (raw; wins for the same key). Problems name
/// the key, never the value.
fn secret_data(object: &serde_json::Map<String, Value>) -> Result<SecretData, Vec<FieldProblem>> {
    let mut data = SecretData::new();
    let mut problems = Vec::new();
    for (section, base64) in [("data", true), ("stringData", false)] {
        let entries = match object.get(section) {
            None | Some(Value::Null) => continue,
            Some(Value::Object(entries)) => entries,
            Some(_) => {
                problems.push((
                    section.to_string(),
                    "must be a mapping of keys to values".to_string(),
                ));
                continue;
            }
        };
        for (key, value) in entries {
            let field = format!("{section}.{key}");
            let text = match value {
                Value::String(text) => text.as_str(),
                Value::Null => "",
                _ => {
                    problems.push((field, "must be a string (quote it)".to_string()));
                    continue;
                }
            };
            let bytes = if base64 {
                // Like Go's decoder, which Kubernetes uses: line breaks are ignored.
                let compact: String = text.chars().filter(|c| !matches!(c, '\r' | '\n')).collect();
                match base64::engine::general_purpose::STANDARD.decode(compact) {
                    Ok(bytes) => bytes,
                    Err(_) => {
                        // The decoder's message quotes the offending byte: not repeated.
                        problems.push((
                            field,
                            "is not valid base64 (standard alphabet, with padding); use stringData for plain text".to_string(),
                        ));
                        continue;
                    }
                }
            } else {
                text.as_bytes().to_vec()
            };
            data.insert(key.clone(), SecretBytes::new(bytes));
        }
    }
    if problems.is_empty() {
        Ok(data)
    } else {
        Err(problems)
    }
}

/// Reports each object defined more than once, once per occurrence, naming the others.
fn duplicates<K: std::hash::Hash + Eq + Clone>(
    keys: impl Iterator<Item = (K, Location)>,
) -> HashMap<K, Vec<Location>> {
    let mut seen: HashMap<K, Vec<Location>> = HashMap::new();
    for (key, location) in keys {
        seen.entry(key).or_default().push(location);
    }
    seen.retain(|_, locations| locations.len() > 1);
    seen
}

fn duplicate_message(kind: &str, locations: &[Location], me: &Location) -> String {
    let others: Vec<String> = locations
        .iter()
        .filter(|l| l.file != me.file || l.document != me.document)
        .map(Location::describe)
        .collect();
    format!(
        "duplicate {kind}: also defined in {}; none of them is loaded",
        others.join(", ")
    )
}

fn load_secrets(docs: Vec<SecretDoc>, catalog: &mut Catalog) {
    let dups = duplicates(
        docs.iter()
            .map(|d| ((d.namespace.clone(), d.name.clone()), d.location.clone())),
    );
    for doc in docs {
        let object = doc.object();
        let key = (doc.namespace, doc.name);
        if let Some(locations) = dups.get(&key) {
            let message = duplicate_message("Secret", locations, &doc.location);
            catalog
                .errors
                .push(doc.location.error(Some(object.clone()), None, message));
        }
        match doc.data {
            Err(problems) => push_problems(&mut catalog.errors, &doc.location, object, problems),
            Ok(data) if !dups.contains_key(&key) => {
                catalog.secrets.insert(key, data);
            }
            Ok(_) => {}
        }
    }
}

/// Loads the valid, unique pipelines; returns them with their location, in file order.
fn load_pipelines(docs: Vec<PipelineDoc>, catalog: &mut Catalog) -> Vec<(Location, Arc<Pipeline>)> {
    let dups = duplicates(
        docs.iter()
            .map(|d| (d.reference.clone(), d.location.clone())),
    );
    let mut loaded = Vec::new();
    for doc in docs {
        let object = format!("{PIPELINE_KIND} {}", doc.reference);
        let duplicated = dups.get(&doc.reference);
        if let Some(locations) = duplicated {
            let message = duplicate_message(PIPELINE_KIND, locations, &doc.location);
            catalog
                .errors
                .push(doc.location.error(Some(object.clone()), None, message));
        }
        match doc.spec {
            Err(problems) => push_problems(&mut catalog.errors, &doc.location, object, problems),
            Ok(spec) if duplicated.is_none() => {
                let pipeline = Arc::new(Pipeline {
                    reference: doc.reference.clone(),
                    spec,
                });
                catalog
                    .pipelines
                    .insert(doc.reference, Arc::clone(&pipeline));
                loaded.push((doc.location, pipeline));
            }
            Ok(_) => {}
        }
    }
    loaded
}

/// Warns about Secrets a loaded pipeline needs but the folder does not provide: in
/// embedded mode the folder is the only source of Secrets.
fn check_secrets(location: &Location, pipeline: &Pipeline, catalog: &mut Catalog) {
    let reference = &pipeline.reference;
    let prefix = format!("{} Pipeline {reference}", location.describe());
    let namespace = reference.namespace.as_str();
    let refused = "promotions for this pipeline will be refused with 401";

    match pipeline.hmac_secret_name() {
        None => catalog.warnings.push(format!(
            "{prefix}: spec.promotion.strategy.secretRef is not set, so webhooks cannot be signed; {refused}"
        )),
        Some(secret) => match catalog.secrets.get(&(namespace.to_string(), secret.to_string())) {
            None => catalog.warnings.push(format!(
                "{prefix}: spec.promotion.strategy.secretRef names Secret {namespace}/{secret}, which is not loaded from the folder (missing or invalid); {refused}"
            )),
            Some(data) if data.get(HMAC_KEY).is_none_or(|v| v.expose().is_empty()) => {
                catalog.warnings.push(format!(
                    "{prefix}: Secret {namespace}/{secret} has no {HMAC_KEY:?} key (or it is empty); {refused}"
                ));
            }
            Some(_) => {}
        },
    }

    let mut promotions: Vec<(String, &Promotion)> = Vec::new();
    if let Some(promotion) = &pipeline.spec.promotion {
        promotions.push(("spec.promotion".to_string(), promotion));
    }
    for (i, env) in pipeline.spec.environments.iter().enumerate() {
        if let Some(promotion) = &env.promotion {
            promotions.push((format!("spec.environments[{i}].promotion"), promotion));
        }
    }
    for (field, promotion) in promotions {
        let Some(pull_request) = &promotion.strategy.pull_request else {
            continue;
        };
        let secret = &pull_request.secret_ref.name;
        if !catalog
            .secrets
            .contains_key(&(namespace.to_string(), secret.clone()))
        {
            catalog.warnings.push(format!(
                "{prefix}: {field}.strategy.pull-request.secretRef names Secret {namespace}/{secret}, which is not loaded from the folder (missing or invalid); pull requests for it will fail"
            ));
        }
    }
}
