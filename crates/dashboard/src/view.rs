//! What the pages show, computed from the read port's answers: pure, so the rules
//! (which revision runs where, what waits, what failed) are tested without HTML.

use chrono::{DateTime, Utc};
use pipeline_core::deployment::{EnvironmentState, TargetView};
use pipeline_core::{Phase, Pipeline, PipelineRef, PromotionRecord};

/// How the revision shown in a lane is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// The deployment watch sees every target Ready at it.
    Watch,
    /// A deployment event from this environment named it (the latest one).
    Event,
    /// The latest promotion into this environment that succeeded (its deployment is
    /// not observed: a pull request may still wait for its merge).
    Promoted,
}

impl Evidence {
    pub fn describe(self) -> &'static str {
        match self {
            Evidence::Watch => "seen by the deployment watch",
            Evidence::Event => "from the latest deployment event",
            Evidence::Promoted => "latest successful promotion",
        }
    }
}

/// The health of an environment's targets, as far as the controller knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Degraded(String),
    Settling,
    /// Nothing watches it: the records are all there is.
    Unknown(String),
}

impl Health {
    pub fn label(&self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded(_) => "degraded",
            Health::Settling => "watch starting",
            Health::Unknown(_) => "not watched",
        }
    }

    pub fn class(&self) -> &'static str {
        match self {
            Health::Healthy => "ok",
            Health::Degraded(_) => "bad",
            Health::Settling | Health::Unknown(_) => "unknown",
        }
    }

    pub fn detail(&self) -> Option<&str> {
        match self {
            Health::Degraded(why) | Health::Unknown(why) => Some(why),
            _ => None,
        }
    }
}

/// A promotion into the lane's environment waiting for an approver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub id: String,
    pub revision: String,
    pub since: DateTime<Utc>,
    /// The exact command that approves it.
    pub command: String,
}

/// One environment of one pipeline on the overview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lane {
    pub environment: String,
    pub running: Option<(String, Evidence)>,
    pub health: Health,
    /// A pull request opened for a revision the environment does not run yet.
    pub pull_request: Option<(String, String)>,
    pub waiting: Vec<Waiting>,
    /// A promotion being made (`Pending` or `Running`): revision and phase.
    pub in_flight: Option<(String, Phase)>,
    /// The latest finished promotion into the environment, if it failed: id, revision,
    /// message.
    pub failed: Option<(String, String, String)>,
}

/// One pipeline on the overview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub pipeline: PipelineRef,
    pub lanes: Vec<Lane>,
    pub last_activity: Option<DateTime<Utc>>,
}

/// How an approver reaches the controller, for the command shown.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ApproveVia {
    /// Through the Kubernetes API with the approver's own credentials.
    #[default]
    Kubernetes,
    /// Signed over HTTP with the environment's approval key, at this public URL.
    Http { server: String },
}

/// `text` as one shell word: unchanged when it is plainly safe, else single-quoted.
pub fn shell_word(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@+=,".contains(c));
    if plain {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The `pipeline-controller approve …` command for a waiting promotion.
pub fn approve_command(
    pipeline: &PipelineRef,
    environment: &str,
    revision: &str,
    via: &ApproveVia,
) -> String {
    let mut command = format!(
        "pipeline-controller approve {} {} {}",
        shell_word(&pipeline.to_string()),
        shell_word(environment),
        shell_word(revision)
    );
    if let ApproveVia::Http { server } = via {
        command.push_str(&format!(
            " --server {} --key-file APPROVAL_KEY_FILE",
            shell_word(server)
        ));
    }
    command
}

/// When a record reached its current phase.
fn finished_at(record: &PromotionRecord) -> DateTime<Utc> {
    record
        .history
        .iter()
        .rev()
        .find(|c| c.phase == record.phase)
        .map_or(record.updated_at, |c| c.at)
}

/// Whether `text` may be a link target: only web addresses, never `javascript:` and
/// the like (a result comes from a forge's answer).
pub fn web_link(text: &str) -> Option<&str> {
    let lower = text.to_ascii_lowercase();
    (lower.starts_with("https://") || lower.starts_with("http://")).then_some(text)
}

fn health_of(state: Option<&EnvironmentState>) -> Health {
    let Some(state) = state else {
        return Health::Unknown("the deployment watch is off".into());
    };
    if state.settling() {
        return Health::Settling;
    }
    if let Some(why) = state.unobserved_because() {
        return Health::Unknown(why);
    }
    if state.deployed_at().is_some() {
        return Health::Healthy;
    }
    let problems: Vec<String> = state
        .targets
        .iter()
        .filter_map(|(key, view)| {
            let problem = match view {
                TargetView::Seen(app) if app.ready && app.current => None,
                TargetView::Seen(app) if !app.current => {
                    Some("status not yet updated for the latest spec".to_string())
                }
                TargetView::Seen(app) => Some(format!("not Ready: {}", app.message)),
                TargetView::Unreachable(why) => Some(format!("unreachable: {why}")),
                TargetView::Missing => Some("no such object".into()),
                TargetView::Connecting => Some("watch starting".into()),
                TargetView::NotWatched(why) => Some(format!("not watched: {why}")),
            }?;
            Some(format!("{key}: {problem}"))
        })
        .collect();
    if problems.is_empty() {
        Health::Degraded("targets run different revisions".into())
    } else {
        Health::Degraded(problems.join("; "))
    }
}

/// The overview row of `pipeline` from its records (any order) and, per environment,
/// what the deployment watch sees (`None` when nothing watches).
pub fn row(
    pipeline: &Pipeline,
    records: &[PromotionRecord],
    states: &[Option<EnvironmentState>],
    via: &ApproveVia,
) -> Row {
    let mine: Vec<&PromotionRecord> = records
        .iter()
        .filter(|r| r.pipeline == pipeline.reference)
        .collect();
    let lanes = pipeline
        .spec
        .environments
        .iter()
        .enumerate()
        .map(|(index, env)| {
            let name = env.name.as_str();
            let state = states.get(index).and_then(Option::as_ref);
            let into: Vec<&PromotionRecord> = mine
                .iter()
                .copied()
                .filter(|r| r.target_environment == name)
                .collect();
            let from_event = mine
                .iter()
                .filter(|r| r.source_environment == name)
                .max_by_key(|r| r.created_at)
                .map(|r| r.revision.clone());
            let last_success = into
                .iter()
                .filter(|r| r.phase == Phase::Succeeded)
                .max_by_key(|r| finished_at(r));
            let running = state
                .and_then(|s| s.deployed_at())
                .map(|rev| (rev.to_string(), Evidence::Watch))
                .or_else(|| from_event.map(|rev| (rev, Evidence::Event)))
                .or_else(|| last_success.map(|r| (r.revision.clone(), Evidence::Promoted)));
            let pull_request = last_success.and_then(|r| {
                let link = web_link(r.result.as_deref()?)?;
                let runs_it = running.as_ref().is_some_and(|(rev, evidence)| {
                    *rev == r.revision && *evidence != Evidence::Promoted
                });
                (!runs_it).then(|| (link.to_string(), r.revision.clone()))
            });
            let mut waiting: Vec<Waiting> = into
                .iter()
                .filter(|r| r.phase == Phase::WaitingApproval)
                .map(|r| Waiting {
                    id: r.id.clone(),
                    revision: r.revision.clone(),
                    since: r.created_at,
                    command: approve_command(&pipeline.reference, name, &r.revision, via),
                })
                .collect();
            waiting.sort_by_key(|w| std::cmp::Reverse(w.since));
            let in_flight = into
                .iter()
                .filter(|r| matches!(r.phase, Phase::Pending | Phase::Running))
                .max_by_key(|r| r.updated_at)
                .map(|r| (r.revision.clone(), r.phase));
            let failed = into
                .iter()
                .filter(|r| matches!(r.phase, Phase::Succeeded | Phase::Failed))
                .max_by_key(|r| finished_at(r))
                .filter(|r| r.phase == Phase::Failed)
                .map(|r| (r.id.clone(), r.revision.clone(), r.message.clone()));
            Lane {
                environment: name.to_string(),
                running,
                health: health_of(state),
                pull_request,
                waiting,
                in_flight,
                failed,
            }
        })
        .collect();
    Row {
        pipeline: pipeline.reference.clone(),
        lanes,
        last_activity: mine.iter().map(|r| r.updated_at).max(),
    }
}

/// Query of the overview: namespace exactly, name by substring; empty means any.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Filter {
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
}

impl Filter {
    pub fn matches(&self, pipeline: &PipelineRef) -> bool {
        (self.namespace.is_empty() || pipeline.namespace == self.namespace)
            && (self.name.is_empty() || pipeline.name.contains(self.name.as_str()))
    }
}

/// Most recent activity first; pipelines without records last, by name.
pub fn sort_rows(rows: &mut [Row]) {
    rows.sort_by(|a, b| {
        b.last_activity
            .cmp(&a.last_activity)
            .then_with(|| a.pipeline.cmp(&b.pipeline))
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use pipeline_core::Trigger;
    use pipeline_core::deployment::target_keys;
    use pipeline_core::ports::PipelineSource;
    use pipeline_core::testing::{HandView, MemoryCatalog};
    use serde_json::json;

    fn at(minute: i64) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-05-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
            + chrono::Duration::minutes(minute)
    }

    async fn pipeline() -> Pipeline {
        let catalog = MemoryCatalog::new().with_pipeline(
            "apps",
            "web",
            json!({
                "appRef": {"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "name": "web"},
                "environments": [
                    {"name": "dev", "targets": [{"namespace": "dev"}]},
                    {"name": "prod", "targets": [{"namespace": "prod"}],
                     "promotion": {"manual": true, "strategy": {"notification": {}}}}
                ],
                "promotion": {"strategy": {"secretRef": {"name": "hmac"}, "notification": {}}}
            }),
        );
        (*catalog
            .pipeline(&PipelineRef::new("apps", "web"))
            .await
            .unwrap()
            .unwrap())
        .clone()
    }

    fn record(to: &str, revision: &str, manual: bool, minute: i64) -> PromotionRecord {
        PromotionRecord::new(
            PipelineRef::new("apps", "web"),
            "dev",
            to,
            revision,
            manual,
            Trigger::default(),
            at(minute),
        )
    }

    #[tokio::test]
    async fn lanes_from_records_alone() {
        let pipeline = pipeline().await;
        let waiting = record("prod", "1.2.0", true, 5);
        let mut failed = record("prod", "1.1.0", false, 1);
        failed.start_attempt(at(2)).unwrap();
        failed
            .fail_attempt(
                "receiver said 500".into(),
                false,
                &pipeline_core::RetryPolicy::default(),
                at(3),
            )
            .unwrap();
        let row = row(
            &pipeline,
            &[failed, waiting],
            &[None, None],
            &ApproveVia::Kubernetes,
        );
        let dev = &row.lanes[0];
        assert_eq!(dev.running, Some(("1.2.0".into(), Evidence::Event)));
        assert_eq!(dev.health.label(), "not watched");
        let prod = &row.lanes[1];
        assert_eq!(prod.running, None);
        assert_eq!(prod.waiting.len(), 1);
        assert_eq!(
            prod.waiting[0].command,
            "pipeline-controller approve apps/web prod 1.2.0"
        );
        let (_, revision, message) = prod.failed.clone().unwrap();
        assert_eq!(
            (revision.as_str(), message.as_str()),
            ("1.1.0", "receiver said 500")
        );
        assert_eq!(row.last_activity, Some(at(5)));
    }

    #[tokio::test]
    async fn the_watch_wins_over_records_and_an_open_pull_request_shows() {
        let pipeline = pipeline().await;
        let view = HandView::new();
        for key in target_keys(&pipeline, 0) {
            view.set(key, HandView::deployed("2.0.0"));
        }
        let mut promoted = record("prod", "2.0.0", false, 1);
        promoted.start_attempt(at(1)).unwrap();
        promoted
            .succeed(
                "opened".into(),
                Some("https://git.example/pr/7".into()),
                at(2),
            )
            .unwrap();
        let states = vec![
            Some(EnvironmentState::observe(&pipeline, 0, &view)),
            Some(EnvironmentState::observe(&pipeline, 1, &view)),
        ];
        let row = row(&pipeline, &[promoted], &states, &ApproveVia::Kubernetes);
        assert_eq!(
            row.lanes[0].running,
            Some(("2.0.0".into(), Evidence::Watch))
        );
        assert_eq!(row.lanes[0].health, Health::Healthy);
        // prod's target is missing: degraded, the promotion's PR is still open.
        assert_eq!(row.lanes[1].health.label(), "degraded");
        assert_eq!(
            row.lanes[1].pull_request,
            Some(("https://git.example/pr/7".into(), "2.0.0".into()))
        );
    }

    #[test]
    fn commands_quote_what_the_shell_would_read() {
        let pipeline = PipelineRef::new("apps", "web");
        let via = ApproveVia::Http {
            server: "http://127.0.0.1:8080".into(),
        };
        assert_eq!(
            approve_command(&pipeline, "prod", "<img src=x onerror=alert(1)>", &via),
            "pipeline-controller approve apps/web prod '<img src=x onerror=alert(1)>' --server http://127.0.0.1:8080 --key-file APPROVAL_KEY_FILE"
        );
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word("6.5.1"), "6.5.1");
        assert_eq!(web_link("javascript:alert(1)"), None);
        assert_eq!(web_link("HTTPS://x"), Some("HTTPS://x"));
    }

    #[test]
    fn filter_and_sort() {
        let filter = Filter {
            namespace: "apps".into(),
            name: "we".into(),
        };
        assert!(filter.matches(&PipelineRef::new("apps", "web")));
        assert!(!filter.matches(&PipelineRef::new("other", "web")));
        assert!(!filter.matches(&PipelineRef::new("apps", "api")));
        let row = |name: &str, minute: Option<i64>| Row {
            pipeline: PipelineRef::new("apps", name),
            lanes: vec![],
            last_activity: minute.map(at),
        };
        let mut rows = vec![row("a", None), row("b", Some(1)), row("c", Some(9))];
        sort_rows(&mut rows);
        let names: Vec<&str> = rows.iter().map(|r| r.pipeline.name.as_str()).collect();
        assert_eq!(names, ["c", "b", "a"]);
    }
}
