//! Splitting a manifest file into its YAML documents and parsing each one.
//!
//! Files are split at `---` lines here rather than by the YAML parser so that every
//! document keeps its position in the file (`document 3` is the third `---`-separated
//! section, empty ones included), a syntax error in one document does not hide the
//! others, and errors give the line in the file. YAML forbids a line starting with `---`
//! inside any scalar, so splitting there cannot cut a value in two.

use serde_json::Value;

/// One non-empty YAML document of a file.
#[derive(Debug)]
pub(crate) struct Document {
    /// 1-based position among the file's `---`-separated documents.
    pub number: usize,
    pub value: Result<Value, String>,
}

/// The non-empty documents of `text`, in order. A document that is not valid YAML is
/// returned as an error naming the line and column in the file.
///
/// Parsed one `---` section at a time as the caller asks for them: a folder holding one
/// file of 10,000 Pipelines would otherwise hold every document's generic YAML value at
/// once (about 8 KiB each), a peak the allocator keeps as resident memory afterwards.
pub(crate) fn parse_documents(text: &str) -> impl Iterator<Item = Document> + '_ {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    split(text)
        .into_iter()
        .enumerate()
        .flat_map(|(index, (first_line, chunk))| parse_section(index + 1, first_line, chunk))
}

/// The non-empty documents of one `---` section (section `number`, starting on line
/// `first_line` of the file).
fn parse_section(number: usize, first_line: usize, chunk: &str) -> Vec<Document> {
    let options = serde_saphyr::options! { with_snippet: false };
    match serde_saphyr::from_multiple_with_options::<Value>(chunk, options) {
        Ok(values) => values
            .into_iter()
            .filter(|v| !v.is_null())
            .map(|value| Document {
                number,
                value: Ok(value),
            })
            .collect(),
        Err(err) => {
            let render = serde_saphyr::render_options! {
                formatter: &serde_saphyr::UserMessageFormatter,
                snippets: serde_saphyr::SnippetMode::Off,
                line_offset: (first_line - 1) as u64,
            };
            let mut message = err.render_with_options(render);
            if chunk.contains("Secret") {
                message = redact_quoted(&message);
            }
            vec![Document {
                number,
                value: Err(format!("invalid YAML: {message}")),
            }]
        }
    }
}

/// Splits `text` at document-start lines (`---`), returning each section with the line
/// number (1-based) it starts on. Each section after the first starts with its `---`
/// line, so the parser sees an explicit document start. Comments and directives before
/// the first `---` belong to the first document.
fn split(text: &str) -> Vec<(usize, &str)> {
    let mut starts: Vec<(usize, usize)> = Vec::new();
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if is_document_start(line) {
            starts.push((offset, index + 1));
        }
        offset += line.len();
    }
    match starts.first().copied() {
        None => starts.push((0, 1)),
        Some((0, _)) => {}
        Some((first, _)) => {
            if is_trivia(&text[..first]) {
                starts[0] = (0, 1);
            } else {
                starts.insert(0, (0, 1));
            }
        }
    }
    let mut sections = Vec::with_capacity(starts.len());
    for (i, &(begin, line)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(text.len(), |&(next, _)| next);
        sections.push((line, &text[begin..end]));
    }
    sections
}

/// Hides what a parser message quotes (`` `value` ``, `"value"`): in a Secret's
/// document it could be a secret value.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut open: Option<char> = None;
    for c in message.chars() {
        match open {
            Some(quote) if c == quote => {
                out.push_str("...");
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '`' || c == '"' {
                    open = Some(c);
                }
            }
        }
    }
    if open.is_some() {
        out.push_str("...");
    }
    out
}

fn is_document_start(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

/// Blank lines, comments and directives only.
fn is_trivia(text: &str) -> bool {
    text.lines().all(|line| {
        let trimmed = line.trim();
        trimmed.is_empty() || trimmed.starts_with('#') || line.starts_with('%')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn values(text: &str) -> Vec<(usize, Result<Value, String>)> {
        parse_documents(text).map(|d| (d.number, d.value)).collect()
    }

    #[test]
    fn numbers_documents_by_position_and_skips_empty_ones() {
        let docs = values("a: 1\n---\n---\n# only a comment\n---\nb: 2\n---\n");
        assert_eq!(
            docs,
            vec![(1, Ok(json!({"a": 1}))), (4, Ok(json!({"b": 2})))]
        );
    }

    #[test]
    fn leading_marker_comments_and_directives_belong_to_the_first_document() {
        let docs = values("# Source: chart/a.yaml\n---\na: 1\n---\nb: 2\n");
        assert_eq!(
            docs,
            vec![(1, Ok(json!({"a": 1}))), (2, Ok(json!({"b": 2})))]
        );
        let docs = values("%YAML 1.2\n---\na: 1\n");
        assert_eq!(docs, vec![(1, Ok(json!({"a": 1})))]);
        let docs = values("\u{feff}--- # comment\na: 1\n");
        assert_eq!(docs, vec![(1, Ok(json!({"a": 1})))]);
    }

    #[test]
    fn markers_need_a_line_of_their_own_start() {
        let docs = values("a: |\n  ---\n  x\nb: ---x\n");
        assert_eq!(docs, vec![(1, Ok(json!({"a": "---\nx\n", "b": "---x"})))]);
    }

    #[test]
    fn syntax_errors_name_the_line_in_the_file_and_spare_the_others() {
        let docs = values("a: 1\n---\nb: 2\nc: [1, 2\nd: 3\n---\ne: 5\n");
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0], (1, Ok(json!({"a": 1}))));
        assert_eq!(docs[2], (3, Ok(json!({"e": 5}))));
        let (number, Err(message)) = &docs[1] else {
            panic!("expected an error: {docs:?}");
        };
        assert_eq!(*number, 2);
        assert!(message.starts_with("invalid YAML: "), "{message}");
        assert!(
            message.contains("line 5") || message.contains("line 4"),
            "{message}"
        );
    }

    #[test]
    fn syntax_errors_in_secrets_quote_nothing() {
        let docs = values("kind: Secret\nstringData:\n  k: .nan\n  k: x\n");
        let (_, Err(message)) = &docs[0] else {
            panic!("expected an error: {docs:?}");
        };
        assert!(
            !message.contains(".nan") && message.contains("line"),
            "{message}"
        );
        assert_eq!(
            redact_quoted("a `b` c \"d\" e `f"),
            "a `...` c \"...\" e `..."
        );
    }
}
