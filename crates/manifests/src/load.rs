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
    /// Problems, in file order. Each one left a document (or file) out.
    pub errors: Vec<LoadError>,
    /// Problems that load nonetheless but will make the controller refuse or fail work.
    pub warnings: Vec<String>,
    /// Manifest files read.
    pub files: usize,
    /// Documents of other kinds (and documents that are not Kubernetes objects), skipped.
    pub ignored: usize,
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
    let mut catalog = Catalog::default();
    let mut pipelines = Vec::new();
    let mut secrets = Vec::new();

    for error in &walk.errors {
        catalog.errors.push(LoadError {
            file: error.rel.clone(),
            document: 0,
            object: None,
            field: None,
            message: error.message.clone(),
        });
    }

    for file in &walk.files {
        let whole_file = |message: String| LoadError {
            file: file.rel.clone(),
            document: 0,
            object: None,
            field: None,
            message,
        };
        let bytes = match std::fs::read(&file.abs) {
            Ok(bytes) => bytes,
            Err(err) => {
                catalog
                    .errors
                    .push(whole_file(format!("cannot read file: {err}")));
                continue;
            }
        };
        catalog.files += 1;
        let Ok(text) = String::from_utf8(bytes) else {
            catalog
                .errors
                .push(whole_file("not valid UTF-8".to_string()));
            continue;
        };
        for Document { number, value } in parse_documents(&text) {
            let location = Location {
                file: file.rel.clone(),
                document: number,
            };
            match value {
                Err(message) => catalog.errors.push(location.error(None, None, message)),
                Ok(value) => classify(value, location, &mut catalog, &mut pipelines, &mut secrets),
            }
        }
    }

    load_secrets(secrets, &mut catalog);
    let loaded = load_pipelines(pipelines, &mut catalog);
    for (location, pipeline) in &loaded {
        check_secrets(location, pipeline, &mut catalog);
    }
    // Stable: problems of one document keep their order.
    catalog
        .errors
        .sort_by(|a, b| (&a.file, a.document).cmp(&(&b.file, b.document)));
    catalog
}

/// Sorts one document into pipelines, secrets, errors or ignored.
fn classify(
    value: Value,
    location: Location,
    catalog: &mut Catalog,
    pipelines: &mut Vec<PipelineDoc>,
    secrets: &mut Vec<SecretDoc>,
) {
    let Value::Object(mut object) = value else {
        catalog.ignored += 1;
        return;
    };
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    let api_version = object.get("apiVersion").and_then(Value::as_str);
    match (kind, api_version) {
        (PIPELINE_KIND, Some(API_VERSION)) => {
            let reference = match metadata(&object, PIPELINE_KIND) {
                Ok((namespace, name)) => PipelineRef::new(namespace, name),
                Err(problems) => {
                    push_problems(catalog, &location, PIPELINE_KIND.to_string(), problems);
                    return;
                }
            };
            let spec = match object.remove("spec") {
                None | Some(Value::Null) => Err(vec![("spec".to_string(), "must be set".into())]),
                Some(spec) => parse_pipeline_spec(spec)
                    .map_err(|errors| errors.into_iter().map(|e| (e.field, e.message)).collect()),
            };
            pipelines.push(PipelineDoc {
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
            catalog
                .errors
                .push(location.error(Some(label), Some("apiVersion"), message));
        }
        ("Secret", Some("v1")) => {
            let (namespace, name) = match metadata(&object, "Secret") {
                Ok(found) => found,
                Err(problems) => {
                    push_problems(catalog, &location, "Secret".to_string(), problems);
                    return;
                }
            };
            let data = secret_data(&object);
            secrets.push(SecretDoc {
                location,
                namespace,
                name,
                data,
            });
        }
        _ => catalog.ignored += 1,
    }
}

fn push_problems(
    catalog: &mut Catalog,
    location: &Location,
    object: String,
    problems: Vec<FieldProblem>,
) {
    for (field, message) in problems {
        catalog
            .errors
            .push(location.error(Some(object.clone()), Some(&field), message));
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
            Err(problems) => push_problems(catalog, &doc.location, object, problems),
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
            Err(problems) => push_problems(catalog, &doc.location, object, problems),
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
