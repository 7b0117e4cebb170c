//! Fuzz-style property tests of the marker rewriter, bounded for CI: arbitrary bytes and
//! YAML-ish text with markers sprinkled in. Whatever the input, the rewriter must not
//! panic, and when it rewrites it may only change lines that carry a marker for the
//! promoted key, and on those only what comes before the marker comment.

use pipeline_git::markers::{MarkerKey, rewrite_markers};
use proptest::prelude::*;

const TARGET: &str = "flux-system:podinfo:prod";

fn target() -> MarkerKey {
    MarkerKey::new("flux-system", "podinfo", "prod")
}

/// Checks one rewrite of `text` to `new`: no panic, and only marked values changed.
fn check(text: &str, new: &str) -> Result<(), TestCaseError> {
    let Ok(out) = rewrite_markers(text, &target(), new) else {
        return Ok(());
    };
    prop_assert!(
        out.changed <= out.matched,
        "changed {} > matched {}",
        out.changed,
        out.matched
    );
    if out.changed == 0 {
        prop_assert_eq!(&out.text, text, "text changed without a counted change");
        return Ok(());
    }
    let before: Vec<&str> = text.split('\n').collect();
    let after: Vec<&str> = out.text.split('\n').collect();
    prop_assert_eq!(
        before.len(),
        after.len(),
        "line count changed:\n{:?}\n=>\n{:?}",
        text,
        out.text
    );
    let mut changed_lines = 0;
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        if b == a {
            continue;
        }
        changed_lines += 1;
        // Only a line with a marker for the key may change ...
        let marker = b.rfind("$promotion");
        prop_assert!(
            marker.is_some() && b.contains(TARGET),
            "line {} changed without a marker for {}: {:?} => {:?}",
            i + 1,
            TARGET,
            b,
            a
        );
        // ... and the marker comment itself, the line ending and the indentation stay.
        let comment = &b[marker.unwrap_or(0)..];
        prop_assert!(
            a.ends_with(comment),
            "line {}: marker comment changed: {:?} => {:?}",
            i + 1,
            b,
            a
        );
        let hash = b[..marker.unwrap_or(0)].rfind('#');
        prop_assert!(
            hash.is_some(),
            "line {}: no comment before the marker: {:?}",
            i + 1,
            b
        );
        let from_hash = &b[hash.unwrap_or(0)..];
        prop_assert!(
            a.ends_with(from_hash),
            "line {}: comment changed: {:?} => {:?}",
            i + 1,
            b,
            a
        );
        let indent = |s: &str| s.len() - s.trim_start_matches([' ', '\t']).len();
        prop_assert_eq!(
            &b[..indent(b)],
            &a[..indent(a)],
            "line {}: indentation changed",
            i + 1
        );
        prop_assert_eq!(b.ends_with('\r'), a.ends_with('\r'));
    }
    prop_assert!(
        changed_lines <= out.changed,
        "{} lines changed for {} counted changes",
        changed_lines,
        out.changed
    );
    prop_assert!(changed_lines > 0, "changes counted but no line changed");
    // Rewriting the result again changes nothing.
    match rewrite_markers(&out.text, &target(), new) {
        Ok(again) => {
            prop_assert_eq!(again.changed, 0, "second rewrite changed {:?}", out.text);
            prop_assert_eq!(again.matched, out.matched);
        }
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "the rewritten text no longer rewrites ({e}):\n{:?}\n=>\n{:?}",
                text, out.text
            )));
        }
    }
    Ok(())
}

fn new_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,2}",
        "[ -~]{0,16}",
        any::<String>().prop_map(|s| s.chars().take(16).collect()),
        proptest::sample::select(vec![
            "",
            "null",
            "~",
            "true",
            "0x1F",
            "1e3",
            "a: b",
            "#x",
            "x #y",
            "- x",
            "'",
            "\"",
            "\\",
            "two\nlines",
            "cr\rhere",
            "tab\there",
            "\u{0}",
            "\u{1b}[31m",
            "\u{85}",
            "\u{2028}",
            "\u{feff}",
            "---",
            "...",
            "{a: b}",
            "[a]",
            "*a",
            "&a",
            "!t",
            "|",
            ">",
        ])
        .prop_map(str::to_owned),
    ]
}

fn comment() -> impl Strategy<Value = String> {
    proptest::sample::select(vec![
        String::new(),
        " # note".to_owned(),
        format!(" # {{\"$promotion\": \"{TARGET}\"}}"),
        format!("  #{{\"$promotion\":\"{TARGET}\"}}"),
        format!(" # {{ \"$promotion\" : \"{TARGET}\" }} trailing note"),
        format!("\t# {{\"$promotion\": \"{TARGET}\"}}"),
        " # {\"$promotion\": \"flux-system:podinfo:staging\"}".to_owned(),
        " # {\"$promotion\": \"apps:podinfo:prod\"}".to_owned(),
        " # {\"$promotion\": 1}".to_owned(),
        " # {\"$promotion\": \"flux-system:podinfo\"}".to_owned(),
        " # $promotion".to_owned(),
        format!(" # {{\"$promotion\": \"{TARGET}\", \"$promotion\": \"{TARGET}\"}}"),
        format!(" # {{\"$promotion\": \"{TARGET}\"}} # {{\"$promotion\": \"{TARGET}\"}}"),
        format!("# {{\"$promotion\": \"{TARGET}\"}}"),
    ])
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(vec![
            "1.0.0", "v2", "6.5.1", "12", "3.14", "true", "null", "~", "", "ghcr.io/x/y:1",
            "a b", "a#b", "a:b", "'q'", "'it''s'", "\"d\"", "\"esc \\\" \\n\"", "\"open",
            "'open", "{repository: x, tag: 1.0}", "{a: {b: 1}}", "[1.0]", "[a, b]", "[]", "{}",
            "{a: [1, {b: c}]}", "[{a: 1}]", "|", ">-", "|2", "*anchor", "&anchor 1", "!!str 1",
            "!tag v", "? k", "- x", "key: 1", "\t1", "[", "{", "]", "}", ",", "\"a\\", "'a''",
        ])
        .prop_map(str::to_owned),
        1 => "[ -~]{0,12}",
        1 => any::<String>().prop_map(|s| s.chars().take(12).collect()),
    ]
}

/// One YAML-ish line: indentation, an optional sequence dash and key, a value, a comment.
fn line() -> impl Strategy<Value = String> {
    let indent = proptest::sample::select(vec!["", " ", "  ", "    ", "\t", "   - "]);
    let key = proptest::sample::select(vec![
        "",
        "key: ",
        "- ",
        "- key: ",
        "\"quoted key\": ",
        "'k': ",
        "k:",
        "? ",
        ": ",
        "&a k: ",
        "!t k: ",
        "--- ",
        "... ",
        "%YAML ",
        "# ",
        "-",
    ]);
    (indent, key, value(), comment(), any::<bool>()).prop_map(
        |(indent, key, value, comment, crlf)| {
            format!(
                "{indent}{key}{value}{comment}{}",
                if crlf { "\r" } else { "" }
            )
        },
    )
}

fn document() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(line(), 0..24),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(lines, final_newline, bom)| {
            let mut text = if bom {
                "\u{feff}".to_owned()
            } else {
                String::new()
            };
            text.push_str(&lines.join("\n"));
            if final_newline {
                text.push('\n');
            }
            text
        })
}

/// Arbitrary text with marker text spliced in, so the scanner runs on it.
fn noise_with_markers() -> impl Strategy<Value = String> {
    (
        any::<String>(),
        proptest::collection::vec((any::<usize>(), comment()), 1..6),
    )
        .prop_map(|(mut text, inserts)| {
            for (at, comment) in inserts {
                let mut at = if text.is_empty() {
                    0
                } else {
                    at % (text.len() + 1)
                };
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.insert_str(at, &format!("v: 1{comment}\n"));
            }
            text
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn rewriter_never_panics_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..1024),
        new in new_value(),
    ) {
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        // Without the marker field the scanner is skipped; make sure it runs.
        text.push_str(&format!("\n{}\n", "x # {\"$promotion\": \"flux-system:podinfo:prod\"}"));
        check(&text, &new)?;
        check(&String::from_utf8_lossy(&bytes), &new)?;
    }

    #[test]
    fn rewriter_never_panics_on_noise_with_markers(text in noise_with_markers(), new in new_value()) {
        check(&text, &new)?;
    }

    #[test]
    fn rewriter_only_touches_marked_lines_of_yamlish_text(text in document(), new in new_value()) {
        check(&text, &new)?;
    }
}

/// The generators are not vacuous: a good share of the YAML-ish documents do get values
/// rewritten, and some are refused, so both paths of `check` run.
#[test]
fn yamlish_documents_reach_rewrites_and_refusals() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut rewritten, mut refused) = (0, 0);
    for _ in 0..300 {
        let text = document().new_tree(&mut runner).unwrap().current();
        match rewrite_markers(&text, &target(), "9.9.9") {
            Ok(out) if out.changed > 0 => rewritten += 1,
            Ok(_) => {}
            Err(_) => refused += 1,
        }
    }
    eprintln!("{rewritten} of 300 documents rewritten, {refused} refused");
    assert!(
        rewritten >= 30,
        "only {rewritten} of 300 documents rewritten"
    );
    assert!(refused >= 10, "only {refused} of 300 documents refused");
}
