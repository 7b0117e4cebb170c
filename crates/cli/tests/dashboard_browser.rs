//! The dashboard in a real headless browser: Debian's `chromium` driven through
//! `chromedriver` (WebDriver, on loopback) by `fantoccini`, against the real binary in
//! embedded mode. After signed events the overview shows each revision in its lane
//! without a reload; an approval appears and disappears live; a revision carrying markup
//! is shown as text; with JavaScript disabled the pages still read correctly.
//!
//! Needs `chromium` and `chromedriver` (`apt-get install chromium chromium-driver`;
//! scripts/test.sh installs them when missing). PIPELINE_CHROMEDRIVER and
//! PIPELINE_CHROMIUM override where they are. PIPELINE_DASHBOARD_SCREENSHOTS=DIR also
//! writes the screenshots there (`docs/` for the README's).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use support::*;

const APPROVAL_KEY: &str = "quickstart-approval-key-9876543210";
/// Markup as a revision: signed events refuse spaces in revisions, so `/` separates the
/// attributes, which HTML parsers accept as well.
const XSS: &str = "<img/src=x/onerror=alert(1)>";
const WAIT: Duration = Duration::from_secs(20);

fn binary(env: &str, candidates: &[&str]) -> PathBuf {
    if let Ok(path) = std::env::var(env) {
        return PathBuf::from(path);
    }
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "none of {candidates:?} exists: install Debian's chromium and chromium-driver (scripts/test.sh does), or set {env}"
            )
        })
}

/// A chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Driver {
    async fn start(dir: &Path) -> Driver {
        let bin = binary(
            "PIPELINE_CHROMEDRIVER",
            &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"],
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join("chromedriver.log");
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = client()
                .get(format!("{}/status", driver.url))
                .send()
                .await
                .ok()
                .map(|r| r.status().is_success());
            if ready == Some(true) {
                return driver;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not start in 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn session(&self, javascript: bool) -> Client {
        let chromium = binary(
            "PIPELINE_CHROMIUM",
            &["/usr/bin/chromium", "/usr/lib/chromium/chromium"],
        );
        let mut options = json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1360,900", "--hide-scrollbars", "--no-first-run"],
        });
        if !javascript {
            options["prefs"] = json!({"profile.managed_default_content_settings.javascript": 2});
        }
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), options);
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
        {
            Ok(client) => client,
            Err(err) => panic!(
                "no browser session: {err}; chromedriver log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            ),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lane(environment: &str) -> String {
    format!(r#"[data-pipeline="flux-system/podinfo"] [data-environment="{environment}"]"#)
}

/// The text of the first element matching `css`, if there is one. The live script may
/// swap the element out between finding and reading it: then it is looked up again.
async fn text_of(browser: &Client, css: &str) -> Option<String> {
    let mut tries = 0;
    loop {
        let found = browser.find_all(Locator::Css(css)).await.unwrap();
        let element = found.first()?;
        match element.text().await {
            Ok(text) => return Some(text),
            Err(err) if tries < 5 => {
                tries += 1;
                eprintln!("re-reading {css}: {err}");
            }
            Err(err) => panic!("reading {css}: {err}"),
        }
    }
}

/// Waits (bounded) until `check` holds for the page; returns how long it took.
async fn wait_until<F, Fut>(what: &str, browser: &Client, check: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        if started.elapsed() > WAIT {
            let html = browser.source().await.unwrap_or_default();
            panic!("timed out after {WAIT:?} waiting for {what}; page:\n{html}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A value set on `window` survives only as long as the page is not reloaded.
async fn marker(browser: &Client) -> Value {
    browser
        .execute("return window.__dashboardMarker || null;", vec![])
        .await
        .unwrap()
}

fn save_screenshot(png: &[u8], dir: &Path, name: &str) {
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{name} is not a PNG");
    assert!(png.len() > 10_000, "{name} is suspiciously small");
    std::fs::write(dir.join(name), png).unwrap();
    if let Ok(out) = std::env::var("PIPELINE_DASHBOARD_SCREENSHOTS") {
        let out = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(out);
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join(name), png).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let receiver = Receiver::start(vec![], Duration::ZERO).await;
    let service = Service::start(
        &manifests,
        &dir.path().join("state.redb"),
        &["--notify-url", &receiver.url()],
    );
    let driver = Driver::start(dir.path()).await;
    let browser = driver.session(true).await;
    let overview = service.internal_url("/");

    // The pipeline is there with its three lanes, nothing deployed yet.
    browser.goto(&overview).await.unwrap();
    for environment in ["dev", "staging", "prod"] {
        assert!(
            text_of(&browser, &lane(environment)).await.is_some(),
            "lane {environment}"
        );
    }
    assert_eq!(
        text_of(&browser, &format!("{} .revision", lane("dev"))).await,
        None
    );
    // Connected to the live endpoint.
    wait_until("the live indicator", &browser, || async {
        !browser
            .find_all(Locator::Css("body.connected"))
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    browser
        .execute(
            "window.__dashboardMarker = 'no reload'; return null;",
            vec![],
        )
        .await
        .unwrap();

    // dev deployed 6.5.1: dev runs it (event), staging gets it (promotion succeeded).
    let (status, body) = post_event(&service, "dev", event("podinfo-dev", "6.5.1")).await;
    assert_eq!(status, 202, "{body}");
    let took = wait_until("6.5.1 in the dev and staging lanes", &browser, || async {
        text_of(&browser, &format!("{} .revision", lane("dev")))
            .await
            .as_deref()
            == Some("6.5.1")
            && text_of(&browser, &format!("{} .revision", lane("staging")))
                .await
                .as_deref()
                == Some("6.5.1")
    })
    .await;
    eprintln!("revision shown live {took:?} after the event was accepted");
    assert_eq!(marker(&browser).await, "no reload", "the page was reloaded");

    // staging deployed it: prod waits for approval, with the command to copy.
    let (status, body) = post_event(&service, "staging", event("podinfo-staging", "6.5.1")).await;
    assert_eq!(status, 202, "{body}");
    let waiting = format!(r#"{} .waiting[data-revision="6.5.1"]"#, lane("prod"));
    let took = wait_until("the approval waiting in prod", &browser, || async {
        text_of(&browser, &waiting).await.is_some()
    })
    .await;
    eprintln!("approval shown live after {took:?}");
    save_screenshot(
        &browser.screenshot().await.unwrap(),
        dir.path(),
        "dashboard-overview.png",
    );
    let command = text_of(&browser, &format!("{waiting} .command"))
        .await
        .unwrap();
    assert_eq!(
        command,
        format!(
            "pipeline-controller approve flux-system/podinfo prod 6.5.1 --server http://{} --key-file APPROVAL_KEY_FILE",
            service.address
        )
    );
    // Approve exactly as shown (with the real key file): it disappears live.
    let key_file = dir.path().join("approval-key");
    std::fs::write(&key_file, APPROVAL_KEY).unwrap();
    let command = command.replace("APPROVAL_KEY_FILE", key_file.to_str().unwrap());
    let words: Vec<String> = command.split(' ').skip(1).map(str::to_string).collect();
    let (code, _, stderr) = tokio::task::spawn_blocking(move || {
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        run_cli(&words)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{stderr}");
    let took = wait_until(
        "the approval to disappear and prod to show 6.5.1",
        &browser,
        || async {
            text_of(&browser, &waiting).await.is_none()
                && text_of(&browser, &format!("{} .revision", lane("prod")))
                    .await
                    .as_deref()
                    == Some("6.5.1")
        },
    )
    .await;
    eprintln!("approval gone live after {took:?}");
    assert_eq!(marker(&browser).await, "no reload", "the page was reloaded");

    // A revision carrying markup is text: no element is made of it, no script runs.
    let (status, body) = post_event(&service, "dev", event("podinfo-dev", XSS)).await;
    assert_eq!(status, 202, "{body}");
    wait_until("the markup revision in dev, as text", &browser, || async {
        text_of(&browser, &format!("{} .revision", lane("dev")))
            .await
            .as_deref()
            == Some(XSS)
    })
    .await;
    let images = browser
        .execute("return document.querySelectorAll('img').length;", vec![])
        .await
        .unwrap();
    assert_eq!(images, json!(0), "the revision became an element");

    // The pipeline page: timeline newest first (the markup revision on top), insights.
    browser
        .find(Locator::Css(
            r#"[data-pipeline="flux-system/podinfo"] h2 a"#,
        ))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_until("the pipeline page", &browser, || async {
        text_of(&browser, "section.timeline h2").await.is_some()
    })
    .await;
    let revisions = browser
        .execute(
            "return Array.from(document.querySelectorAll('li.record')).map(r => r.dataset.revision);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(revisions, json!([XSS, "6.5.1", "6.5.1"]), "newest first");
    assert!(text_of(&browser, "section.insights svg").await.is_some());
    let images = browser
        .execute("return document.querySelectorAll('img').length;", vec![])
        .await
        .unwrap();
    assert_eq!(images, json!(0));
    save_screenshot(
        &browser.screenshot().await.unwrap(),
        dir.path(),
        "dashboard-pipeline.png",
    );
    browser.close().await.unwrap();

    // JavaScript off: the same state reads correctly, links and the filter form work.
    let plain = driver.session(false).await;
    plain.goto(&overview).await.unwrap();
    assert!(
        plain
            .find_all(Locator::Css("html.js"))
            .await
            .unwrap()
            .is_empty(),
        "the script ran: JavaScript is not off"
    );
    assert_eq!(
        text_of(&plain, &format!("{} .revision", lane("dev")))
            .await
            .as_deref(),
        Some(XSS)
    );
    assert_eq!(
        text_of(&plain, &format!("{} .revision", lane("prod")))
            .await
            .as_deref(),
        Some("6.5.1")
    );
    let form = plain.find(Locator::Css("form.filter")).await.unwrap();
    form.find(Locator::Css(r#"input[name="namespace"]"#))
        .await
        .unwrap()
        .send_keys("elsewhere")
        .await
        .unwrap();
    form.find(Locator::Css(r#"button[type="submit"]"#))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_until("the filtered overview", &plain, || async {
        text_of(&plain, "p.empty").await.as_deref() == Some("No pipeline matches.")
    })
    .await;
    assert!(
        plain
            .current_url()
            .await
            .unwrap()
            .as_str()
            .contains("namespace=elsewhere")
    );
    plain
        .goto(&service.internal_url("/ui/pipelines/flux-system/podinfo"))
        .await
        .unwrap();
    let records = plain.find_all(Locator::Css("li.record")).await.unwrap();
    assert_eq!(records.len(), 3);
    plain.close().await.unwrap();
}
