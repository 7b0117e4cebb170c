//! Fixture tests for marker rewriting, on strings and on real files.

use std::fs;
use std::path::Path;

use pipeline_git::markers::{MarkerError, MarkerKey, TreeError, rewrite_markers, rewrite_tree};

fn key() -> MarkerKey {
    MarkerKey::new("flux-system", "podinfo", "prod")
}

const M: &str = r#"{"$promotion": "flux-system:podinfo:prod"}"#;

/// Rewrites `input` to 6.5.1 and checks the result and counts.
fn check(input: &str, expected: &str, matched: usize, changed: usize) {
    let out = rewrite_markers(input, &key(), "6.5.1").expect("rewrite");
    assert_eq!(out.text, expected, "input:\n{input}");
    assert_eq!((out.matched, out.changed), (matched, changed), "counts");
    let again = rewrite_markers(&out.text, &key(), "6.5.1").expect("rewrite again");
    assert_eq!(again.text, out.text);
    assert_eq!((again.matched, again.changed), (matched, 0));
}

fn m(s: &str) -> String {
    s.replace("MARK", M)
}

#[test]
fn block_mapping_plain_value() {
    check(
        &m("spec:\n  chart:\n    spec:\n      version: 6.0.0 # MARK\n      chart: podinfo\n"),
        &m("spec:\n  chart:\n    spec:\n      version: 6.5.1 # MARK\n      chart: podinfo\n"),
        1,
        1,
    );
}

#[test]
fn double_and_single_quoted_values_keep_style() {
    check(
        &m("a: \"6.0.0\" # MARK\nb: '6.0.0'   # MARK\n"),
        &m("a: \"6.5.1\" # MARK\nb: '6.5.1'   # MARK\n"),
        2,
        2,
    );
    let out = rewrite_markers(
        &m("a: \"x\" # MARK\nb: 'x' # MARK\n"),
        &key(),
        "it's \"q\"\\",
    )
    .expect("rewrite");
    assert_eq!(
        out.text,
        m("a: \"it's \\\"q\\\"\\\\\" # MARK\nb: 'it''s \"q\"\\' # MARK\n")
    );
}

#[test]
fn plain_value_is_quoted_when_it_would_change_meaning() {
    let input = m("a: v1 # MARK\nb: 1.0 # MARK\n- c # MARK\n");
    let out = rewrite_markers(&input, &key(), "2.0").expect("rewrite");
    // `a` was a string, so 2.0 is quoted; `b` was a number, so it stays plain.
    assert_eq!(
        out.text,
        m("a: \"2.0\" # MARK\nb: 2.0 # MARK\n- \"2.0\" # MARK\n")
    );
    let out = rewrite_markers(&input, &key(), "x: y #z").expect("rewrite");
    assert_eq!(
        out.text,
        m("a: \"x: y #z\" # MARK\nb: \"x: y #z\" # MARK\n- \"x: y #z\" # MARK\n")
    );
    let out = rewrite_markers(&input, &key(), "yes").expect("rewrite");
    assert_eq!(
        out.text,
        m("a: \"yes\" # MARK\nb: yes # MARK\n- \"yes\" # MARK\n")
    );
}

#[test]
fn block_sequence_items() {
    check(
        &m(
            "images:\n  - ghcr.io/a\n  - 6.0.0 # MARK\n  - - nested # MARK\n  - &anchor !!str old # MARK\n",
        ),
        &m(
            "images:\n  - ghcr.io/a\n  - 6.5.1 # MARK\n  - - 6.5.1 # MARK\n  - &anchor !!str 6.5.1 # MARK\n",
        ),
        3,
        3,
    );
}

#[test]
fn flow_mapping_rewrites_last_value() {
    check(
        &m("image: {repository: ghcr.io/x, tag: 1.0.0} # MARK\n"),
        &m("image: {repository: ghcr.io/x, tag: 6.5.1} # MARK\n"),
        1,
        1,
    );
    check(
        &m("- {\"name\": \"app\", \"tag\":\"1.0.0\"} # MARK\n"),
        &m("- {\"name\": \"app\", \"tag\":\"6.5.1\"} # MARK\n"),
        1,
        1,
    );
    check(
        &m("i: {a: {b: 1, c: [old]}} # MARK\n"),
        &m("i: {a: {b: 1, c: [6.5.1]}} # MARK\n"),
        1,
        1,
    );
}

#[test]
fn flow_sequence_with_one_item() {
    check(
        &m("tags: [ 'old' ] # MARK\n"),
        &m("tags: [ '6.5.1' ] # MARK\n"),
        1,
        1,
    );
}

#[test]
fn flow_plain_value_is_quoted_for_flow_indicators() {
    let out = rewrite_markers(&m("i: {tag: old} # MARK\n"), &key(), "a,b").expect("rewrite");
    assert_eq!(out.text, m("i: {tag: \"a,b\"} # MARK\n"));
}

#[test]
fn ambiguous_flow_sequence_is_an_error() {
    let err = rewrite_markers(&m("a: 1\ntags: [1.0, 2.0] # MARK\n"), &key(), "6.5.1")
        .expect_err("ambiguous");
    assert_eq!(err, MarkerError::Ambiguous { line: 2, items: 2 });
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[test]
fn unsupported_positions_are_errors_naming_the_line() {
    let cases = [
        ("x: |\n  text\ny: | # MARK\n  text\n", 3),
        ("a: 1\nb: # MARK\n", 2),
        ("a: *ref # MARK\n", 1),
        ("a: \"multi\n  line\" # MARK\n", 2),
        ("a: plain\n  continued # MARK\n", 2),
        ("a: {x: 1,\n  y: 2} # MARK\n", 2),
        ("a: {b: 1, c: 2 # MARK\n  }\n", 1),
        ("? key # MARK\n: value\n", 1),
        ("a: {} # MARK\n", 1),
    ];
    for (input, line) in cases {
        let err = rewrite_markers(&m(input), &key(), "6.5.1").expect_err(input);
        assert_eq!(err.line(), line, "{input}: {err}");
    }
}

#[test]
fn multi_document_files() {
    check(
        &m("---\na: 1.0.0 # MARK\n...\n---\n# comment\nb: 1.0.0 # MARK\n--- 1.0.0 # MARK\n"),
        &m("---\na: 6.5.1 # MARK\n...\n---\n# comment\nb: 6.5.1 # MARK\n--- 6.5.1 # MARK\n"),
        3,
        3,
    );
}

#[test]
fn crlf_line_endings_are_kept() {
    check(
        &m("a: 1\r\nb: \"1.0.0\" # MARK\r\nc: 2\r\n"),
        &m("a: 1\r\nb: \"6.5.1\" # MARK\r\nc: 2\r\n"),
        1,
        1,
    );
}

#[test]
fn missing_trailing_newline_and_trailing_whitespace() {
    check(
        &m("a: 1\nb: 1.0.0   #   MARK  \t"),
        &m("a: 1\nb: 6.5.1   #   MARK  \t"),
        1,
        1,
    );
}

#[test]
fn other_keys_are_untouched() {
    let input = concat!(
        "a: 1.0.0 # {\"$promotion\": \"flux-system:podinfo:staging\"}\n",
        "b: 1.0.0 # {\"$promotion\": \"flux-system:other:prod\"}\n",
        "c: 1.0.0 # {\"$promotion\": \"apps:podinfo:prod\"}\n",
        "d: 1.0.0 # {\"$promotion\": \"flux-system:podinfo:prod:extra\"}\n",
        "e: [1, 2] # {\"$promotion\": \"flux-system:podinfo:staging\"}\n",
        "f: 1.0.0 # {\"$imagepolicy\": \"flux-system:podinfo\"}\n",
    );
    check(input, input, 0, 0);
}

#[test]
fn json_whitespace_is_free() {
    check(
        "a: 1 #{\"$promotion\":\"flux-system:podinfo:prod\"}\nb: 2 #  {  \"$promotion\"  :\t\"flux-system:podinfo:prod\" }  note\n",
        "a: 6.5.1 #{\"$promotion\":\"flux-system:podinfo:prod\"}\nb: 6.5.1 #  {  \"$promotion\"  :\t\"flux-system:podinfo:prod\" }  note\n",
        2,
        2,
    );
}

#[test]
fn already_at_version_is_matched_not_changed() {
    let input = m("a: 6.5.1 # MARK\nb: \"6.5.1\" # MARK\nc: '6.5.1' # MARK\n");
    check(&input, &input, 3, 0);
}

#[test]
fn hash_inside_quotes_is_not_a_comment() {
    check(
        &m("a: \"x # {\\\"$promotion\\\": 1}\" # MARK\nb: 'it''s # not' # MARK\nc: a#b # MARK\n"),
        &m("a: \"6.5.1\" # MARK\nb: '6.5.1' # MARK\nc: 6.5.1 # MARK\n"),
        3,
        3,
    );
    let quoted_only = m("a: \"v # MARK\"\nb: 'v # MARK'\n");
    check(&quoted_only, &quoted_only, 0, 0);
}

#[test]
fn block_scalar_content_is_not_a_marker() {
    let input = m(concat!(
        "script: |\n",
        "  version: 1.0.0 # MARK\n",
        "\n",
        "    - 1.0.0 # MARK\n",
        "folded: >-\n",
        "    text # MARK\n",
        "list:\n",
        "- |2\n",
        "    a: 1 # MARK\n",
        "   b: 1 # MARK\n",
        "real: 1.0.0 # MARK\n",
    ));
    let expected = input.replace("real: 1.0.0", "real: 6.5.1");
    check(&input, &expected, 1, 1);
}

#[test]
fn comment_only_marker_and_malformed_markers_warn() {
    let input = m("# MARK\na: 1 # {\"$promotion\": \"nope\"}\nb: 1 # {$promotion}\n");
    let out = rewrite_markers(&input, &key(), "6.5.1").expect("rewrite");
    assert_eq!(out.text, input);
    let lines: Vec<usize> = out.warnings.iter().map(|w| w.line).collect();
    assert_eq!(lines, vec![1, 2, 3]);
}

#[test]
fn bom_and_plain_value_on_its_own_line() {
    check(
        &m("\u{feff}version:\n  1.0.0 # MARK\n"),
        &m("\u{feff}version:\n  6.5.1 # MARK\n"),
        1,
        1,
    );
}

#[test]
fn marker_key_parsing() {
    let key: MarkerKey = "ns:name:env".parse().expect("parse");
    assert_eq!(key, MarkerKey::new("ns", "name", "env"));
    assert_eq!(key.to_string(), "ns:name:env");
    assert!("ns:name".parse::<MarkerKey>().is_err());
    assert!("ns::env".parse::<MarkerKey>().is_err());
}

fn write(root: &Path, rel: &str, content: &[u8]) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, content).expect("write");
}

#[test]
fn tree_rewrites_only_changed_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    write(
        root,
        "apps/prod/release.yaml",
        m("version: 6.0.0 # MARK\r\n").as_bytes(),
    );
    write(
        root,
        "apps/prod/current.yml",
        m("version: 6.5.1 # MARK").as_bytes(),
    );
    write(
        root,
        "apps/staging/release.YAML",
        b"version: 6.0.0 # {\"$promotion\": \"flux-system:podinfo:staging\"}\n",
    );
    write(
        root,
        "apps/prod/notes.txt",
        m("version: 6.0.0 # MARK\n").as_bytes(),
    );
    write(
        root,
        ".git/config.yaml",
        m("version: 6.0.0 # MARK\n").as_bytes(),
    );
    write(root, "latin1.yaml", b"name: caf\xe9 # x\n");
    write(root, "warn.yaml", b"a: 1 # {\"$promotion\": 1}\n");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let path = root.join("apps/prod/release.yaml");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
    }

    let report = rewrite_tree(root, &key(), "6.5.1").expect("rewrite tree");

    let changed: Vec<&Path> = report.changed_paths().collect();
    assert_eq!(changed, vec![Path::new("apps/prod/release.yaml")]);
    assert_eq!(report.files.len(), 2);
    assert_eq!((report.matched(), report.changed()), (2, 1));
    assert_eq!(
        report.skipped_non_utf8,
        vec![Path::new("latin1.yaml").to_path_buf()]
    );
    assert_eq!(report.warnings.len(), 1);
    assert_eq!(report.warnings[0].path, Path::new("warn.yaml"));
    assert_eq!(report.scanned, 5);

    let read = |rel: &str| fs::read_to_string(root.join(rel)).expect("read");
    assert_eq!(
        read("apps/prod/release.yaml"),
        m("version: 6.5.1 # MARK\r\n")
    );
    assert_eq!(read("apps/prod/current.yml"), m("version: 6.5.1 # MARK"));
    assert_eq!(read("apps/prod/notes.txt"), m("version: 6.0.0 # MARK\n"));
    assert_eq!(read(".git/config.yaml"), m("version: 6.0.0 # MARK\n"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(root.join("apps/prod/release.yaml"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
    }
    let leftovers: Vec<_> = fs::read_dir(root.join("apps/prod"))
        .expect("ls")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".promotion-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");

    let again = rewrite_tree(root, &key(), "6.5.1").expect("rewrite again");
    assert_eq!(again.changed(), 0);
    assert_eq!(again.matched(), 2);
}

#[test]
fn tree_error_leaves_every_file_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    write(root, "a.yaml", m("version: 6.0.0 # MARK\n").as_bytes());
    write(root, "b.yaml", m("tags: [1, 2] # MARK\n").as_bytes());
    let err = rewrite_tree(root, &key(), "6.5.1").expect_err("ambiguous");
    match &err {
        TreeError::Marker { path, source } => {
            assert_eq!(path, Path::new("b.yaml"));
            assert_eq!(source.line(), 1);
        }
        TreeError::Io { .. } => panic!("unexpected {err}"),
    }
    assert!(err.to_string().starts_with("b.yaml: line 1"), "{err}");
    assert_eq!(
        fs::read_to_string(root.join("a.yaml")).expect("read"),
        m("version: 6.0.0 # MARK\n")
    );
}

/// A tree big enough to be scanned on several threads gives what a sequential scan gives:
/// files and warnings in path order, and the error of the first failing file.
#[test]
fn big_trees_are_scanned_in_parallel_with_sequential_results() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let good = format!("version: 1.0.0 # {M}\n");
    let warn = "# {\"$promotion\": \"not a marker\n";
    let bad = format!("key: | # {M}\n  text\n");
    for i in 0..1200 {
        let sub = root.join(format!("apps/{:02}", i / 100));
        fs::create_dir_all(&sub).unwrap();
        let text = match i % 100 {
            7 => good.clone(),
            42 => warn.to_string(),
            _ => "plain: yaml\n".to_string(),
        };
        fs::write(sub.join(format!("f{i:04}.yaml")), text).unwrap();
    }
    let out = rewrite_tree(root, &key(), "2.0.0").unwrap();
    assert_eq!(out.scanned, 1200);
    let files: Vec<String> = out
        .files
        .iter()
        .map(|f| f.path.display().to_string())
        .collect();
    let expected: Vec<String> = (0..12)
        .map(|c| format!("apps/{c:02}/f{:04}.yaml", c * 100 + 7))
        .collect();
    assert_eq!(files, expected);
    let warned: Vec<String> = out
        .warnings
        .iter()
        .map(|w| w.path.display().to_string())
        .collect();
    let expected: Vec<String> = (0..12)
        .map(|c| format!("apps/{c:02}/f{:04}.yaml", c * 100 + 42))
        .collect();
    assert_eq!(warned, expected);
    assert_eq!(
        fs::read_to_string(root.join("apps/05/f0507.yaml")).unwrap(),
        good.replace("1.0.0", "2.0.0")
    );

    // Two bad files far apart: the first one in path order is reported, nothing written.
    fs::write(root.join("apps/03/f0350.yaml"), &bad).unwrap();
    fs::write(root.join("apps/10/f1050.yaml"), &bad).unwrap();
    let err = rewrite_tree(root, &key(), "3.0.0").unwrap_err();
    match &err {
        TreeError::Marker { path, .. } => {
            assert_eq!(path, Path::new("apps/03/f0350.yaml"), "{err}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(
        fs::read_to_string(root.join("apps/05/f0507.yaml")).unwrap(),
        good.replace("1.0.0", "2.0.0")
    );
}
