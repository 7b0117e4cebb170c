//! A promotion applied through git's objects (no checkout) against real git repositories:
//! the same files, results and warnings as the scan of a checkout, and a commit that
//! changes exactly the rewritten files, keeping modes, symbolic links and submodules.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use pipeline_git::credentials::Credentials;
use pipeline_git::git::{Author, Git, TreeFile};
use pipeline_git::markers::{MarkerKey, TreeError, rewrite_tree};
use pipeline_git::objects::{RewriteError, rewrite_commit};
use pipeline_git::repo_url::RepoUrl;
use support::git;

mod support;

const M: &str = r#"{"$promotion": "flux-system:podinfo:prod"}"#;
/// A submodule commit (a gitlink needs no object).
const SUBMODULE: &str = "1234567890abcdef1234567890abcdef12345678";

fn m(s: &str) -> String {
    s.replace("MARK", M)
}

fn key() -> MarkerKey {
    MarkerKey::new("flux-system", "podinfo", "prod")
}

fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

/// A repository with one commit holding every kind of file the scan must tell apart.
fn source_repo(dir: &Path, extra: &[(&str, String)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    git(&src, &["init", "--quiet", "-b", "main"]);
    // Marked for the key, in a subdirectory, with CRLF line ends (kept byte for byte).
    write(
        &src,
        "apps/prod/release.yaml",
        m("spec:\r\n  version: 6.0.0 # MARK\r\n  replicas: 2\r\n").as_bytes(),
    );
    // Already at the version: matched, not changed.
    write(
        &src,
        "apps/prod/current.yml",
        m("version: 6.5.1 # MARK").as_bytes(),
    );
    // Another key; upper-case extensions are YAML too.
    write(
        &src,
        "apps/staging/release.YAML",
        b"version: 6.0.0 # {\"$promotion\": \"flux-system:podinfo:staging\"}\n",
    );
    write(&src, "UPPER.YML", m("tag: 1.0.0 # MARK\n").as_bytes());
    // Executable: the mode is kept.
    write(
        &src,
        "deploy/run.yaml",
        m("image: {tag: 6.0.0} # MARK\n").as_bytes(),
    );
    fs::set_permissions(
        src.join("deploy/run.yaml"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    // Path order (by component) differs from git's tree order here: a/ < a-b/ < a.b/.
    for dir in ["a", "a-b", "a.b"] {
        write(
            &src,
            &format!("{dir}/x.yaml"),
            m("v: 1.0.0 # MARK\n").as_bytes(),
        );
    }
    // Not scanned: not YAML, no stem, a directory named like YAML.
    write(
        &src,
        "apps/prod/notes.txt",
        m("version: 6.0.0 # MARK\n").as_bytes(),
    );
    write(&src, ".yaml", m("version: 6.0.0 # MARK\n").as_bytes());
    write(
        &src,
        "dir.yaml/inner.md",
        m("version: 6.0.0 # MARK\n").as_bytes(),
    );
    // Scanned: not UTF-8 (skipped), a malformed marker (a warning), no marker at all.
    write(
        &src,
        "latin1.yaml",
        &[b"name: caf\xe9 # ".as_slice(), M.as_bytes(), b"\n"].concat(),
    );
    write(&src, "warn.yaml", b"a: 1 # {\"$promotion\": 1}\n");
    write(&src, "plain.yaml", b"plain: yaml\n");
    for (rel, text) in extra {
        write(&src, rel, text.as_bytes());
    }
    // A symbolic link named like YAML, to a marked file: never followed.
    std::os::unix::fs::symlink("apps/prod/release.yaml", src.join("link.yaml")).unwrap();
    git(&src, &["add", "--all"]);
    // A submodule named like YAML.
    git(
        &src,
        &[
            "update-index",
            "--add",
            "--cacheinfo",
            &format!("160000,{SUBMODULE},vendor/chart.yaml"),
        ],
    );
    git(&src, &["commit", "--quiet", "-m", "fleet"]);
    src
}

/// `git ls-tree` of one path: mode, type, object.
fn entry(repo: &Path, rev: &str, path: &str) -> String {
    let line = git(repo, &["ls-tree", rev, "--", path]);
    line.split('\t').next().unwrap().to_string()
}

fn tool(dir: &Path) -> Git {
    // Local commands only: the URL is never contacted.
    let url = RepoUrl::parse("https://git.example/org/fleet").unwrap();
    Git::new(&url, &Credentials::default(), dir).unwrap()
}

#[tokio::test]
async fn the_objects_give_what_a_scan_of_the_checkout_gives() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_repo(dir.path(), &[]);
    let src_url = format!("file://{}", src.display());

    // The scan of a checkout.
    git(dir.path(), &["clone", "--quiet", &src_url, "checkout"]);
    let checkout = dir.path().join("checkout");
    assert!(checkout.join("vendor/chart.yaml").is_dir());
    let on_disk = rewrite_tree(&checkout, &key(), "6.5.1").unwrap();

    // The objects of a clone without checkout.
    git(
        dir.path(),
        &["clone", "--quiet", "--no-checkout", &src_url, "objects"],
    );
    let repo = dir.path().join("objects");
    let head = git(&repo, &["rev-parse", "HEAD"]).trim().to_string();
    let work = tempfile::tempdir().unwrap();
    let tool = tool(work.path());
    let rewrite = rewrite_commit(&tool, &repo, &head, &key(), "6.5.1")
        .await
        .unwrap();

    // The same report: files in path order, counts, warnings, non-UTF-8 files.
    assert_eq!(rewrite.report, on_disk);
    let files: Vec<String> = rewrite
        .report
        .files
        .iter()
        .map(|f| f.path.display().to_string())
        .collect();
    assert_eq!(
        files,
        [
            "UPPER.YML",
            "a/x.yaml",
            "a-b/x.yaml",
            "a.b/x.yaml",
            "apps/prod/current.yml",
            "apps/prod/release.yaml",
            "deploy/run.yaml"
        ]
    );
    assert_eq!((rewrite.report.matched(), rewrite.report.changed()), (7, 6));
    assert_eq!(
        rewrite.report.skipped_non_utf8,
        [PathBuf::from("latin1.yaml")]
    );
    assert_eq!(rewrite.report.warnings.len(), 1);
    assert_eq!(rewrite.report.warnings[0].path, Path::new("warn.yaml"));
    // YAML files: the 11 regular ones (not the symbolic link, the submodule, `.yaml`,
    // `dir.yaml/inner.md`).
    assert_eq!(rewrite.report.scanned, 11);

    // The same new texts, with the modes of the files.
    let changed: Vec<&Path> = rewrite
        .changes
        .iter()
        .map(|(f, _)| f.path.as_path())
        .collect();
    assert_eq!(changed, rewrite.report.changed_paths().collect::<Vec<_>>());
    for (file, text) in &rewrite.changes {
        assert_eq!(
            fs::read(checkout.join(&file.path)).unwrap(),
            text.as_bytes(),
            "{}",
            file.path.display()
        );
        let expected_mode = if file.path == Path::new("deploy/run.yaml") {
            "100755"
        } else {
            "100644"
        };
        assert_eq!(file.mode, expected_mode, "{}", file.path.display());
    }

    // The commit: exactly the rewritten files, modes kept, the rest untouched.
    let contents: Vec<&[u8]> = rewrite.changes.iter().map(|(_, t)| t.as_bytes()).collect();
    let oids = tool.write_blobs(&repo, &contents).await.unwrap();
    let changes: Vec<TreeFile> = rewrite
        .changes
        .iter()
        .zip(oids)
        .map(|((file, _), oid)| TreeFile {
            oid,
            ..file.clone()
        })
        .collect();
    let author = Author {
        name: "Promotion Bot".into(),
        email: "bot@example.com".into(),
    };
    let made = tool
        .commit_changes(&repo, &head, &changes, &author, "Promote\n\nbody\n")
        .await
        .unwrap();
    let commit = made.commit.as_str();
    assert_eq!(
        git(&repo, &["rev-parse", &format!("{commit}^{{tree}}")]).trim(),
        made.tree
    );
    assert_eq!(
        git(&repo, &["diff-tree", "-r", "--name-status", &head, commit]),
        "M\tUPPER.YML\nM\ta-b/x.yaml\nM\ta.b/x.yaml\nM\ta/x.yaml\nM\tapps/prod/release.yaml\nM\tdeploy/run.yaml\n"
    );
    assert_eq!(
        git(
            &repo,
            &[
                "cat-file",
                "blob",
                &format!("{commit}:apps/prod/release.yaml")
            ]
        ),
        m("spec:\r\n  version: 6.5.1 # MARK\r\n  replicas: 2\r\n")
    );
    assert!(entry(&repo, commit, "deploy/run.yaml").starts_with("100755 blob "));
    for path in ["link.yaml", "vendor/chart.yaml", "latin1.yaml", ".yaml"] {
        assert_eq!(
            entry(&repo, commit, path),
            entry(&repo, &head, path),
            "{path}"
        );
    }
    assert!(entry(&repo, commit, "link.yaml").starts_with("120000 blob "));
    assert_eq!(
        entry(&repo, commit, "vendor/chart.yaml"),
        format!("160000 commit {SUBMODULE}")
    );
    assert_eq!(
        git(&repo, &["log", "-1", "--format=%P%n%an <%ae>%n%B", commit]),
        format!("{head}\nPromotion Bot <bot@example.com>\nPromote\n\nbody\n\n")
    );
    // Nothing else moved: no ref, no index, no file beside .git, no temporary file.
    assert_eq!(git(&repo, &["rev-parse", "HEAD"]).trim(), head);
    assert!(!repo.join(".git/index").exists());
    let beside: Vec<_> = fs::read_dir(&repo)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(beside, [".git"]);
    let leftovers: Vec<_> = fs::read_dir(repo.join(".git"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("promotion-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn a_marker_error_names_the_first_failing_file_in_path_order() {
    let dir = tempfile::tempdir().unwrap();
    // b/ comes before b.x/ in path order, after it in git's tree order.
    let bad = m("tags: [1, 2] # MARK\n");
    let src = source_repo(
        dir.path(),
        &[
            ("b.x/bad.yaml", bad.clone()),
            ("b/bad.yaml", format!("ok: 1\n{bad}")),
        ],
    );
    let head = git(&src, &["rev-parse", "HEAD"]).trim().to_string();
    let work = tempfile::tempdir().unwrap();
    let err = rewrite_commit(&tool(work.path()), &src, &head, &key(), "6.5.1")
        .await
        .unwrap_err();
    match &err {
        RewriteError::Markers(TreeError::Marker { path, source }) => {
            assert_eq!(path, Path::new("b/bad.yaml"));
            assert_eq!(source.line(), 2);
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().starts_with("b/bad.yaml: line 2"), "{err}");
    // The same as the scan of a checkout says.
    git(
        dir.path(),
        &["clone", "--quiet", &src.display().to_string(), "checkout"],
    );
    let on_disk = rewrite_tree(&dir.path().join("checkout"), &key(), "6.5.1").unwrap_err();
    assert_eq!(on_disk.to_string(), err.to_string());
}

#[tokio::test]
async fn a_missing_blob_is_a_git_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_repo(dir.path(), &[]);
    let head = git(&src, &["rev-parse", "HEAD"]).trim().to_string();
    // The blob of one YAML file gone from the object store.
    let blob = git(&src, &["rev-parse", &format!("{head}:plain.yaml")])
        .trim()
        .to_string();
    fs::remove_file(src.join(".git/objects").join(&blob[..2]).join(&blob[2..])).unwrap();
    let work = tempfile::tempdir().unwrap();
    let err = rewrite_commit(&tool(work.path()), &src, &head, &key(), "6.5.1")
        .await
        .unwrap_err();
    match err {
        RewriteError::Git(err) => {
            // "git …": the strategy then checks the clone with fsck.
            assert!(err.message.starts_with("git cat-file "), "{err}");
            assert!(err.message.contains(&blob), "{err}");
        }
        other => panic!("{other}"),
    }
}
