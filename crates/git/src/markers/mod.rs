//! Rewriting values marked for promotion in the YAML files of a GitOps repository.
//!
//! A value is marked with a line comment holding a JSON object:
//!
//! ```yaml
//! spec:
//!   chart:
//!     spec:
//!       version: "6.0.0" # {"$promotion": "flux-system:podinfo:prod"}
//! ```
//!
//! The marker names `<pipeline-namespace>:<pipeline-name>:<environment>`. Promoting rewrites the
//! marked values of one such key and leaves every other byte of the file alone: comments,
//! indentation, quoting, line endings (`\n` or `\r\n`), other documents, a missing final
//! newline.
//!
//! # Which value a marker refers to
//!
//! The marker is the trailing comment of a line, and refers to the single scalar value that
//! line holds:
//!
//! * `key: value # marker`: the mapping value (also after `- ` entries, anchors and tags);
//! * `- value # marker`: the sequence item; a line holding just a scalar (the value of a `key:`
//!   on the line above) works the same way;
//! * a flow collection that opens and closes on the line, e.g.
//!   `image: {repository: ghcr.io/x, tag: 1.0.0} # marker`: the value of the **last** entry of
//!   a flow mapping, or the **sole** item of a flow sequence, descending into nested flow
//!   collections the same way. A flow sequence with several items is ambiguous and an error.
//!
//! A marker for the promoted key anywhere else (an empty value, a block scalar, an alias, a
//! scalar spanning several lines, a flow collection spanning several lines) is an error naming
//! the line, so that a promotion never silently skips a value it was asked to change. Markers
//! for other keys are never an error. Marker-like text inside block scalars (`|`, `>`) and
//! quoted scalars is content, not a marker; a marker on a comment-only line refers to nothing
//! and is reported as a warning, as is a comment that mentions `$promotion` but does not parse.
//!
//! # How the new value is written
//!
//! Double-quoted values stay double-quoted (escaped as needed). Single-quoted values stay
//! single-quoted (`'` doubled), unless the value holds characters single quotes cannot carry,
//! then it is double-quoted. Plain values stay plain unless the new value would need quotes
//! to read back as the same text (`a: b`, `#x`, leading `-`/`*`/`&`, ...) or the old value was
//! a string and the new one would read as a number, boolean, null or timestamp (under YAML 1.2
//! or 1.1), then it is double-quoted.

mod scalar;
mod scan;
mod tree;

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use scan::{Kind, LineKind, Scanner, Tok};

pub use tree::{
    BlobScan, FileRewrite, TreeError, TreeRewrite, TreeWarning, is_yaml_path, rewrite_tree,
};

/// The text every marker contains; files without it are skipped without parsing.
pub const MARKER_FIELD: &str = "$promotion";

/// Which pipeline environment a marker belongs to: `<namespace>:<name>:<environment>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MarkerKey {
    pub namespace: String,
    pub name: String,
    pub environment: String,
}

impl MarkerKey {
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        environment: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            environment: environment.into(),
        }
    }

    fn matches(&self, marker: &str) -> bool {
        let mut parts = marker.split(':');
        parts.next() == Some(self.namespace.as_str())
            && parts.next() == Some(self.name.as_str())
            && parts.next() == Some(self.environment.as_str())
            && parts.next().is_none()
    }
}

impl fmt::Display for MarkerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.namespace, self.name, self.environment)
    }
}

/// A marker value that is not `<namespace>:<name>:<environment>` with three non-empty parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid promotion marker key {0:?}: expected <namespace>:<name>:<environment>")]
pub struct InvalidMarkerKey(pub String);

impl FromStr for MarkerKey {
    type Err = InvalidMarkerKey;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            [ns, name, env] if !ns.is_empty() && !name.is_empty() && !env.is_empty() => {
                Ok(Self::new(*ns, *name, *env))
            }
            _ => Err(InvalidMarkerKey(s.to_owned())),
        }
    }
}

/// Why a marker for the promoted key could not be applied. Lines are 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarkerError {
    #[error("line {line}: the marked value cannot be rewritten: {reason}")]
    Unsupported { line: usize, reason: &'static str },
    #[error("line {line}: the marked line has no value to rewrite")]
    MissingValue { line: usize },
    #[error(
        "line {line}: the marker is ambiguous: the flow sequence has {items} items; \
         mark a line with a single value"
    )]
    Ambiguous { line: usize, items: usize },
}

impl MarkerError {
    /// The 1-based line the error is about.
    pub fn line(&self) -> usize {
        match self {
            Self::Unsupported { line, .. }
            | Self::MissingValue { line }
            | Self::Ambiguous { line, .. } => *line,
        }
    }
}

/// Something worth telling the user that does not stop the promotion. Lines are 1-based.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkerWarning {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for MarkerWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// The result of rewriting one file's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// The new text (identical to the input when `changed == 0`).
    pub text: String,
    /// Marked values whose text changed.
    pub changed: usize,
    /// Markers for the key (including values already equal to the new value).
    pub matched: usize,
    pub warnings: Vec<MarkerWarning>,
}

/// Rewrites every value marked for `key` in `text` to `new_value`.
pub fn rewrite_markers(
    text: &str,
    key: &MarkerKey,
    new_value: &str,
) -> Result<Rewrite, MarkerError> {
    let scan = scan_text(text, key, new_value)?;
    Ok(Rewrite {
        text: scan.apply(text),
        changed: scan.edits.len(),
        matched: scan.matched,
        warnings: scan.warnings,
    })
}

/// A replacement of `text[start..end]`.
#[derive(Debug)]
struct Edit {
    start: usize,
    end: usize,
    text: String,
}

/// What scanning a text found, before anything is copied.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    edits: Vec<Edit>,
    matched: usize,
    warnings: Vec<MarkerWarning>,
}

impl Scan {
    fn apply(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len() + 16 * self.edits.len());
        let mut pos = 0;
        for edit in &self.edits {
            out.push_str(&text[pos..edit.start]);
            out.push_str(&edit.text);
            pos = edit.end;
        }
        out.push_str(&text[pos..]);
        out
    }
}

#[derive(Deserialize)]
struct MarkerJson {
    #[serde(rename = "$promotion")]
    promotion: String,
}

/// Parses a comment (without `#`) that mentions `$promotion`; `Err` explains a malformed one.
fn parse_marker(comment: &str) -> Result<String, String> {
    let body = comment.trim();
    if !body.starts_with('{') {
        return Err("comment mentions $promotion but is not a JSON object".to_owned());
    }
    // Only the first JSON value is read, so a note after the object is allowed.
    let mut de = serde_json::Deserializer::from_str(body);
    let marker =
        MarkerJson::deserialize(&mut de).map_err(|e| format!("malformed promotion marker: {e}"))?;
    marker
        .promotion
        .parse::<MarkerKey>()
        .map(|_| marker.promotion)
        .map_err(|e| e.to_string())
}

pub(crate) fn scan_text(text: &str, key: &MarkerKey, new_value: &str) -> Result<Scan, MarkerError> {
    let mut scan = Scan::default();
    if !text.contains(MARKER_FIELD) {
        return Ok(scan);
    }
    let mut scanner = Scanner::new();
    let mut pos = 0;
    let mut line_no = 0;
    while pos < text.len() {
        line_no += 1;
        let (line_end, next) = match text[pos..].find('\n') {
            Some(k) => (pos + k, pos + k + 1),
            None => (text.len(), text.len()),
        };
        let content_end = if text[pos..line_end].ends_with('\r') {
            line_end - 1
        } else {
            line_end
        };
        let start = if pos == 0 && text.starts_with('\u{feff}') {
            '\u{feff}'.len_utf8()
        } else {
            pos
        };
        let line = &text[start..content_end];
        pos = next;

        let kind = scanner.line(line);
        if kind == LineKind::Text {
            continue;
        }
        let Some(comment) = scanner.tokens.last().filter(|t| t.kind == Kind::Comment) else {
            continue;
        };
        let comment_text = &line[comment.start + 1..comment.end];
        if !comment_text.contains(MARKER_FIELD) {
            continue;
        }
        let marker = match parse_marker(comment_text) {
            Ok(marker) => marker,
            Err(message) => {
                scan.warnings.push(MarkerWarning {
                    line: line_no,
                    message,
                });
                continue;
            }
        };
        if !key.matches(&marker) {
            continue;
        }
        let nodes = &scanner.tokens[..scanner.tokens.len() - 1];
        if nodes.is_empty() {
            scan.warnings.push(MarkerWarning {
                line: line_no,
                message: format!(
                    "marker for {key} is on a comment-only line and marks nothing; \
                     put it after the value"
                ),
            });
            continue;
        }
        if kind == LineKind::Continued {
            return Err(MarkerError::Unsupported {
                line: line_no,
                reason: "the line continues a scalar or flow collection from a previous line",
            });
        }
        let (target, in_flow) = find_target(nodes, line_no)?;
        scan.matched += 1;
        let Kind::Scalar { style, .. } = target.kind else {
            return Err(MarkerError::Unsupported {
                line: line_no,
                reason: "not a scalar",
            });
        };
        let raw = &line[target.start..target.end];
        if scalar::decode(style, raw).as_deref() == Some(new_value) {
            continue;
        }
        scan.edits.push(Edit {
            start: start + target.start,
            end: start + target.end,
            text: scalar::render(style, raw, new_value, in_flow),
        });
    }
    Ok(scan)
}

fn unsupported(line: usize, reason: &'static str) -> MarkerError {
    MarkerError::Unsupported { line, reason }
}

/// Skips anchors and tags.
fn skip_properties(toks: &[Tok], mut i: usize) -> usize {
    while toks
        .get(i)
        .is_some_and(|t| matches!(t.kind, Kind::Anchor | Kind::Tag))
    {
        i += 1;
    }
    i
}

/// Finds the scalar a marker refers to among a line's tokens (comment excluded); the flag
/// tells whether it sits in a flow collection.
fn find_target(toks: &[Tok], line: usize) -> Result<(Tok, bool), MarkerError> {
    let mut i = 0;
    if toks
        .first()
        .is_some_and(|t| matches!(t.kind, Kind::DocStart | Kind::DocEnd))
    {
        i += 1;
    }
    while let Some(t) = toks.get(i) {
        match t.kind {
            Kind::Dash | Kind::ExplicitValue => i += 1,
            Kind::Question => return Err(unsupported(line, "an explicit mapping key")),
            _ => break,
        }
    }
    i = skip_properties(toks, i);
    // A mapping key, when present, is a single scalar followed by `:`.
    if let Some(t) = toks.get(i)
        && matches!(t.kind, Kind::Scalar { complete: true, .. })
        && toks.get(i + 1).is_some_and(|t| t.kind == Kind::Colon)
    {
        i = skip_properties(toks, i + 2);
    }
    let Some(node) = toks.get(i) else {
        return Err(MarkerError::MissingValue { line });
    };
    let target = match node.kind {
        Kind::Scalar { complete: true, .. } => {
            i += 1;
            (*node, false)
        }
        Kind::FlowOpen { .. } => {
            let mut parser = FlowParser { toks, pos: i, line };
            let collection = parser.collection()?;
            i = parser.pos;
            (collection.target(line)?, true)
        }
        Kind::Scalar { .. } => return Err(unsupported(line, "a quoted scalar spanning lines")),
        Kind::BlockHeader { .. } => return Err(unsupported(line, "a block scalar (| or >)")),
        Kind::Alias => return Err(unsupported(line, "an alias")),
        Kind::Colon => return Err(unsupported(line, "a complex mapping key")),
        _ => return Err(unsupported(line, "unexpected syntax before the value")),
    };
    if i != toks.len() {
        return Err(unsupported(line, "more than one node on the line"));
    }
    Ok(target)
}

/// A node inside a single-line flow collection.
enum Node {
    Scalar(Tok),
    Collection(Collection),
    Alias,
    Empty,
}

struct Entry {
    key: Node,
    /// `Some` when the entry has a `:` (a key-value pair).
    value: Option<Node>,
}

struct Collection {
    map: bool,
    entries: Vec<Entry>,
}

impl Node {
    fn target(&self, line: usize) -> Result<Tok, MarkerError> {
        match self {
            Node::Scalar(tok) => Ok(*tok),
            Node::Collection(c) => c.target(line),
            Node::Alias => Err(unsupported(line, "an alias")),
            Node::Empty => Err(MarkerError::MissingValue { line }),
        }
    }
}

impl Collection {
    /// The flow rule: last entry of a mapping, sole item of a sequence.
    fn target(&self, line: usize) -> Result<Tok, MarkerError> {
        let entry = if self.map {
            self.entries.last()
        } else {
            match self.entries.len() {
                0 | 1 => self.entries.first(),
                items => return Err(MarkerError::Ambiguous { line, items }),
            }
        };
        let Some(entry) = entry else {
            return Err(MarkerError::MissingValue { line });
        };
        match &entry.value {
            Some(value) => value.target(line),
            None if self.map => Err(MarkerError::MissingValue { line }),
            None => entry.key.target(line),
        }
    }
}

/// Recursive descent over the tokens of a flow collection that must close on the line.
struct FlowParser<'a> {
    toks: &'a [Tok],
    pos: usize,
    line: usize,
}

impl FlowParser<'_> {
    fn peek(&self) -> Option<Kind> {
        self.toks.get(self.pos).map(|t| t.kind)
    }

    fn node(&mut self) -> Result<Node, MarkerError> {
        self.pos = skip_properties(self.toks, self.pos);
        let Some(tok) = self.toks.get(self.pos) else {
            return Ok(Node::Empty);
        };
        match tok.kind {
            Kind::Scalar { complete: true, .. } => {
                self.pos += 1;
                Ok(Node::Scalar(*tok))
            }
            Kind::FlowOpen { .. } => Ok(Node::Collection(self.collection()?)),
            Kind::Alias => {
                self.pos += 1;
                Ok(Node::Alias)
            }
            _ => Ok(Node::Empty),
        }
    }

    fn collection(&mut self) -> Result<Collection, MarkerError> {
        let map = matches!(self.peek(), Some(Kind::FlowOpen { map: true }));
        self.pos += 1;
        let mut entries = Vec::new();
        loop {
            match self.peek() {
                Some(Kind::FlowClose) => {
                    self.pos += 1;
                    return Ok(Collection { map, entries });
                }
                None => {
                    return Err(unsupported(
                        self.line,
                        "a flow collection continuing on the next line",
                    ));
                }
                Some(Kind::Question) => self.pos += 1,
                Some(_) => {}
            }
            let key = self.node()?;
            let value = if self.peek() == Some(Kind::Colon) {
                self.pos += 1;
                Some(self.node()?)
            } else {
                None
            };
            entries.push(Entry { key, value });
            match self.peek() {
                Some(Kind::Comma) => self.pos += 1,
                Some(Kind::FlowClose) | None => {}
                Some(_) => {
                    return Err(unsupported(
                        self.line,
                        "unexpected syntax in a flow collection",
                    ));
                }
            }
        }
    }
}
