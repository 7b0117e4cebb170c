//! Property test: random YAML-ish documents with marked and unmarked lines for several keys.
//!
//! After rewriting for one key: (a) every line that is not marked for that key is
//! byte-identical, (b) every marked value reads back (with serde-saphyr) as exactly the new
//! value, and as a string whenever it was one, (c) rewriting again changes nothing.

use pipeline_git::markers::{MarkerKey, rewrite_markers};
use proptest::prelude::*;
use serde_json::Value as Json;

const KEYS: [&str; 4] = [
    "flux-system:podinfo:prod",
    "flux-system:podinfo:staging",
    "flux-system:other:prod",
    "apps:podinfo:prod",
];

fn target() -> MarkerKey {
    MarkerKey::new("flux-system", "podinfo", "prod")
}

/// A scalar as written in the original document.
#[derive(Debug, Clone)]
struct Scalar {
    raw: String,
    /// Whether it reads as a string (false for plain numbers).
    string: bool,
}

fn double_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn marker_json(key: usize, variant: usize) -> String {
    let k = KEYS[key];
    match variant {
        0 => format!("{{\"$promotion\": \"{k}\"}}"),
        1 => format!("{{\"$promotion\":\"{k}\"}}"),
        _ => format!("{{  \"$promotion\" :\t \"{k}\" }}"),
    }
}

fn scalar(flow: bool) -> impl Strategy<Value = Scalar> {
    let plain = |raw: String, string| Scalar { raw, string };
    let mut options = vec![
        "v[0-9][0-9a-z.-]{0,6}"
            .prop_map(move |s| plain(s, true))
            .boxed(),
        "[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,2}"
            .prop_map(move |s| plain(s, true))
            .boxed(),
        "[1-9][0-9]{0,2}(\\.[0-9])?"
            .prop_map(move |s| plain(s, false))
            .boxed(),
        "[a-z0-9 #:\"'.,\\[-]{0,8}"
            .prop_map(|s| Scalar {
                raw: format!("'{}'", s.replace('\'', "''")),
                string: true,
            })
            .boxed(),
        "[a-z0-9 #:\"'.,\\\\{-]{0,8}"
            .prop_map(|s| Scalar {
                raw: double_quote(&s),
                string: true,
            })
            .boxed(),
        (0..KEYS.len())
            .prop_map(|k| Scalar {
                raw: double_quote(&format!("x # {}", marker_json(k, 0))),
                string: true,
            })
            .boxed(),
    ];
    if !flow {
        options.push(
            "a([a-z0-9#:,\\[\\]{}]{0,5}[a-z0-9])?"
                .prop_map(move |s| plain(s, true))
                .boxed(),
        );
    }
    proptest::strategy::Union::new(options)
}

fn new_value() -> impl Strategy<Value = String> {
    let specials = [
        "1.0",
        "true",
        "yes",
        "null",
        "~",
        "",
        "a: b",
        "- x",
        "-x",
        "#x",
        "x #y",
        "it's",
        "\"q\"",
        "tab\there",
        "two\nlines",
        "ünïcode ✓",
        "0x1F",
        "2024-01-01",
        "---",
        "[a]",
        "{a: b}",
        "*alias",
        "&anchor",
        "!tag",
        "%x",
        "@x",
        "a,b",
        " lead",
        "trail ",
        "back\\slash",
        "\u{1}ctl",
        "\u{feff}bom",
    ];
    prop_oneof![
        "[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,2}",
        "v[0-9a-z.+-]{0,8}",
        "[ -~]{0,12}",
        proptest::sample::select(specials.to_vec()).prop_map(str::to_owned),
    ]
}

/// The comment of a line: none, an unrelated note, or a marker for one of the keys.
#[derive(Debug, Clone)]
enum Comment {
    None,
    Note,
    Marker { key: usize, variant: usize },
}

fn comment() -> impl Strategy<Value = Comment> {
    prop_oneof![
        1 => Just(Comment::None),
        1 => Just(Comment::Note),
        4 => (0..KEYS.len(), 0..3usize).prop_map(|(key, variant)| Comment::Marker { key, variant }),
    ]
}

#[derive(Debug, Clone)]
enum Line {
    Map {
        indent: usize,
        value: Scalar,
        comment: Comment,
        gap: usize,
        trailing: bool,
    },
    Seq {
        indent: usize,
        value: Scalar,
        comment: Comment,
        gap: usize,
        trailing: bool,
    },
    FlowMap {
        indent: usize,
        values: Vec<Scalar>,
        comment: Comment,
        gap: usize,
    },
    FlowSeq {
        indent: usize,
        value: Scalar,
        comment: Comment,
        gap: usize,
    },
    /// Block scalar whose content lines look like marked lines for the target key.
    Block {
        base: usize,
        extra: Vec<usize>,
    },
    CommentOnly {
        key: usize,
    },
    DocStart,
    Blank,
}

fn line() -> impl Strategy<Value = Line> {
    let indent = proptest::sample::select(vec![0usize, 2, 4]);
    prop_oneof![
        4 => (indent.clone(), scalar(false), comment(), 1..4usize, any::<bool>())
            .prop_map(|(indent, value, comment, gap, trailing)| Line::Map { indent, value, comment, gap, trailing }),
        2 => (indent.clone(), scalar(false), comment(), 1..4usize, any::<bool>())
            .prop_map(|(indent, value, comment, gap, trailing)| Line::Seq { indent, value, comment, gap, trailing }),
        2 => (indent.clone(), proptest::collection::vec(scalar(true), 1..4), comment(), 1..3usize)
            .prop_map(|(indent, values, comment, gap)| Line::FlowMap { indent, values, comment, gap }),
        1 => (indent, scalar(true), comment(), 1..3usize)
            .prop_map(|(indent, value, comment, gap)| Line::FlowSeq { indent, value, comment, gap }),
        1 => (2..5usize, proptest::collection::vec(0..3usize, 1..4))
            .prop_map(|(base, extra)| Line::Block { base, extra }),
        1 => (0..KEYS.len()).prop_map(|key| Line::CommentOnly { key }),
        1 => Just(Line::DocStart),
        1 => Just(Line::Blank),
    ]
}

/// Where the marked value sits in the standalone parse of its line.
#[derive(Debug, Clone)]
enum Step {
    Key(&'static str),
    Index(usize),
}

#[derive(Debug)]
struct Expect {
    line: usize,
    path: Vec<Step>,
    original: Scalar,
}

struct Doc {
    lines: Vec<String>,
    expects: Vec<Expect>,
}

const FLOW_KEYS: [&str; 3] = ["k0", "k1", "k2"];

fn render(lines: &[Line]) -> Doc {
    let mut out = Vec::new();
    let mut expects = Vec::new();
    // Threshold of a plain scalar that more-indented lines would continue.
    let mut open_plain: Option<usize> = None;
    let comment_text = |c: &Comment, gap: usize| -> String {
        let pad = " ".repeat(gap);
        match c {
            Comment::None => String::new(),
            Comment::Note => format!("{pad}# note"),
            Comment::Marker { key, variant } => format!("{pad}# {}", marker_json(*key, *variant)),
        }
    };
    let is_target = |c: &Comment| matches!(c, Comment::Marker { key: 0, .. });
    for line in lines {
        let clamp = |indent: usize| open_plain.map_or(indent, |t| indent.min(t));
        match line {
            Line::Map {
                indent,
                value,
                comment,
                gap,
                trailing,
            }
            | Line::Seq {
                indent,
                value,
                comment,
                gap,
                trailing,
            } => {
                let indent = clamp(*indent);
                let seq = matches!(line, Line::Seq { .. });
                let head = if seq { "- " } else { "key: " };
                let tail = if *trailing { "  " } else { "" };
                out.push(format!(
                    "{}{head}{}{}{tail}",
                    " ".repeat(indent),
                    value.raw,
                    comment_text(comment, *gap)
                ));
                if is_target(comment) {
                    let path = if seq {
                        vec![Step::Index(0)]
                    } else {
                        vec![Step::Key("key")]
                    };
                    expects.push(Expect {
                        line: out.len() - 1,
                        path,
                        original: value.clone(),
                    });
                }
                let plain = !value.raw.starts_with(['"', '\'']);
                open_plain = (plain && matches!(comment, Comment::None)).then_some(indent);
            }
            Line::FlowMap {
                indent,
                values,
                comment,
                gap,
            } => {
                let entries: Vec<String> = values
                    .iter()
                    .zip(FLOW_KEYS)
                    .map(|(v, k)| format!("{k}: {}", v.raw))
                    .collect();
                out.push(format!(
                    "{}image: {{{}}}{}",
                    " ".repeat(clamp(*indent)),
                    entries.join(", "),
                    comment_text(comment, *gap)
                ));
                if is_target(comment)
                    && let Some(last) = values.last()
                {
                    let path = vec![Step::Key("image"), Step::Key(FLOW_KEYS[values.len() - 1])];
                    expects.push(Expect {
                        line: out.len() - 1,
                        path,
                        original: last.clone(),
                    });
                }
                open_plain = None;
            }
            Line::FlowSeq {
                indent,
                value,
                comment,
                gap,
            } => {
                out.push(format!(
                    "{}tags: [{}]{}",
                    " ".repeat(clamp(*indent)),
                    value.raw,
                    comment_text(comment, *gap)
                ));
                if is_target(comment) {
                    let path = vec![Step::Key("tags"), Step::Index(0)];
                    expects.push(Expect {
                        line: out.len() - 1,
                        path,
                        original: value.clone(),
                    });
                }
                open_plain = None;
            }
            Line::Block { base, extra } => {
                out.push("script: |".to_owned());
                for (i, e) in extra.iter().enumerate() {
                    let indent = if i == 0 { *base } else { base + e };
                    out.push(format!(
                        "{}version: 1.0 # {}",
                        " ".repeat(indent),
                        marker_json(0, i % 3)
                    ));
                    if i == 0 {
                        out.push(String::new());
                    }
                }
                out.push("end: 0 # end of block".to_owned());
                open_plain = None;
            }
            Line::CommentOnly { key } => {
                out.push(format!("# {}", marker_json(*key, 0)));
                open_plain = None;
            }
            Line::DocStart => {
                out.push("---".to_owned());
                open_plain = None;
            }
            Line::Blank => out.push(String::new()),
        }
    }
    Doc {
        lines: out,
        expects,
    }
}

fn navigate<'a>(mut value: &'a Json, path: &[Step]) -> Option<&'a Json> {
    for step in path {
        value = match step {
            Step::Key(k) => value.get(*k)?,
            Step::Index(i) => value.get(*i)?,
        };
    }
    Some(value)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn rewrite_only_touches_marked_values(
        lines in proptest::collection::vec(line(), 0..24),
        new in new_value(),
        crlf in any::<bool>(),
        final_newline in any::<bool>(),
    ) {
        let doc = render(&lines);
        let eol = if crlf { "\r\n" } else { "\n" };
        let mut text = doc.lines.join(eol);
        if final_newline && !doc.lines.is_empty() {
            text.push_str(eol);
        }

        let out = rewrite_markers(&text, &target(), &new).expect("rewrite");
        prop_assert_eq!(out.matched, doc.expects.len());

        // (a) Same lines, same endings; only the expected lines differ.
        let before: Vec<&str> = text.split('\n').collect();
        let after: Vec<&str> = out.text.split('\n').collect();
        prop_assert_eq!(before.len(), after.len());
        let marked: Vec<usize> = doc.expects.iter().map(|e| e.line).collect();
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            if !marked.contains(&i) {
                prop_assert_eq!(b, a, "line {} changed", i + 1);
            }
            prop_assert_eq!(b.ends_with('\r'), a.ends_with('\r'));
        }

        // (b) Each marked line, read on its own, holds exactly the new value.
        let mut changed = 0;
        for expect in &doc.expects {
            let line = after[expect.line].trim_end_matches('\r').trim_start();
            let parsed: Json = serde_saphyr::from_str(line)
                .map_err(|e| TestCaseError::fail(format!("{line:?} does not parse: {e}")))?;
            let value = navigate(&parsed, &expect.path)
                .ok_or_else(|| TestCaseError::fail(format!("{line:?}: no value at {:?}", expect.path)))?;
            match value {
                Json::String(s) => prop_assert_eq!(s, &new, "line {:?}", line),
                other => {
                    // Only a value that was not a string may turn into another type, and
                    // only by writing the new value plain.
                    prop_assert!(!expect.original.string, "{:?} became {:?}", line, other);
                    let alone: Json = serde_saphyr::from_str(&new)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(&alone, other, "line {:?}", line);
                }
            }
            let original_line = before[expect.line];
            if original_line != after[expect.line] {
                changed += 1;
            }
        }
        prop_assert_eq!(out.changed, changed);

        // (c) Idempotent.
        let again = rewrite_markers(&out.text, &target(), &new).expect("rewrite again");
        prop_assert_eq!(again.changed, 0);
        prop_assert_eq!(again.matched, out.matched);
        prop_assert_eq!(&again.text, &out.text);
    }
}

/// One top-level entry `kN: ...` of a flat document.
#[derive(Debug, Clone)]
enum Entry {
    Scalar(Scalar, Comment),
    FlowMap(Vec<Scalar>, Comment),
    FlowSeq(Scalar, Comment),
    Block,
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        4 => (scalar(false), comment()).prop_map(|(s, c)| Entry::Scalar(s, c)),
        2 => (proptest::collection::vec(scalar(true), 1..4), comment()).prop_map(|(v, c)| Entry::FlowMap(v, c)),
        1 => (scalar(true), comment()).prop_map(|(s, c)| Entry::FlowSeq(s, c)),
        1 => Just(Entry::Block),
    ]
}

/// Renders documents of unique top-level keys; returns the text and, per document, the
/// path of each value marked for the target key.
fn render_docs(docs: &[Vec<Entry>], eol: &str) -> (String, Vec<Vec<Vec<String>>>) {
    let mut text = String::new();
    let mut marked = Vec::new();
    for entries in docs {
        text.push_str("---");
        text.push_str(eol);
        let mut paths = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let key = format!("k{i}");
            let (body, comment, path) = match entry {
                Entry::Scalar(s, c) => (s.raw.clone(), c, vec![key.clone()]),
                Entry::FlowMap(values, c) => {
                    let items: Vec<String> = values
                        .iter()
                        .zip(FLOW_KEYS)
                        .map(|(v, k)| format!("{k}: {}", v.raw))
                        .collect();
                    let last = FLOW_KEYS[values.len() - 1].to_owned();
                    (
                        format!("{{{}}}", items.join(", ")),
                        c,
                        vec![key.clone(), last],
                    )
                }
                Entry::FlowSeq(s, c) => (format!("[{}]", s.raw), c, vec![key.clone(), "0".into()]),
                Entry::Block => {
                    text.push_str(&format!(
                        "{key}: |{eol}  v: 1 # {}{eol}{eol}   - 2 # {}{eol}",
                        marker_json(0, 0),
                        marker_json(0, 1)
                    ));
                    continue;
                }
            };
            let suffix = match comment {
                Comment::None => String::new(),
                Comment::Note => " # note".to_owned(),
                Comment::Marker { key, variant } => format!(" # {}", marker_json(*key, *variant)),
            };
            text.push_str(&format!("{key}: {body}{suffix}{eol}"));
            if matches!(comment, Comment::Marker { key: 0, .. }) {
                paths.push(path);
            }
        }
        marked.push(paths);
    }
    (text, marked)
}

fn set_path(value: &mut Json, path: &[String], new: Json) {
    let mut slot = value;
    for step in path {
        slot = match step.parse::<usize>() {
            Ok(i) => &mut slot[i],
            Err(_) => &mut slot[step.as_str()],
        };
    }
    *slot = new;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whole documents read the same before and after, except for the marked values, which
    /// read as the new value.
    #[test]
    fn documents_read_the_same_except_marked_values(
        docs in proptest::collection::vec(proptest::collection::vec(entry(), 1..8), 1..4),
        new in new_value(),
        crlf in any::<bool>(),
    ) {
        let (text, marked) = render_docs(&docs, if crlf { "\r\n" } else { "\n" });
        let out = rewrite_markers(&text, &target(), &new).expect("rewrite");
        let before: Vec<Json> = serde_saphyr::from_multiple(&text)
            .map_err(|e| TestCaseError::reject(format!("generated YAML is invalid: {e}")))?;
        let after: Vec<Json> = serde_saphyr::from_multiple(&out.text)
            .map_err(|e| TestCaseError::fail(format!("rewritten YAML is invalid: {e}\n{}", out.text)))?;
        prop_assert_eq!(before.len(), after.len());
        for ((mut expected, actual), paths) in before.into_iter().zip(&after).zip(&marked) {
            for path in paths {
                let mut actual_leaf = actual.clone();
                for step in path {
                    actual_leaf = match step.parse::<usize>() {
                        Ok(i) => actual_leaf[i].clone(),
                        Err(_) => actual_leaf[step.as_str()].clone(),
                    };
                }
                // A marked value reads as the new string, or (for a former non-string) as
                // whatever the new value reads as on its own.
                let alone: Json = serde_saphyr::from_str(&new).unwrap_or(Json::Null);
                prop_assert!(
                    actual_leaf == Json::String(new.clone()) || actual_leaf == alone,
                    "{:?} at {:?}", actual_leaf, path
                );
                set_path(&mut expected, path, actual_leaf);
            }
            prop_assert_eq!(&expected, actual);
        }
    }
}
