//! The promotion record: the unit of truth for one (pipeline, target environment,
//! revision), and the only legal ways its phase changes.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::pipeline::PipelineRef;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Phase {
    Pending,
    WaitingApproval,
    Running,
    Succeeded,
    Failed,
    /// An approver said no; final.
    Rejected,
    /// A newer revision for the same environment was recorded or promoted while this one
    /// waited for approval; approving this one would roll the environment back. Final.
    Superseded,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Pending,
        Phase::WaitingApproval,
        Phase::Running,
        Phase::Succeeded,
        Phase::Failed,
        Phase::Rejected,
        Phase::Superseded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::WaitingApproval => "WaitingApproval",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Rejected => "Rejected",
            Phase::Superseded => "Superseded",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Phase::Succeeded | Phase::Failed | Phase::Rejected | Phase::Superseded
        )
    }
}

/// Why a record changed phase. Stored by name in the history; Kubernetes Events and
/// metrics are derived from it, so renaming one is a visible change made here only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ChangeReason {
    Recorded,
    AwaitingApproval,
    Approved,
    Rejected,
    Superseded,
    Retried,
    Started,
    Resumed,
    RetryScheduled,
    /// Held back until every target of the source environment is deployed at the
    /// revision (the health gate).
    WaitingForSource,
    Succeeded,
    Failed,
    /// A reason this build does not know (written by a newer one).
    #[serde(other)]
    Unknown,
}

impl ChangeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeReason::Recorded => "Recorded",
            ChangeReason::AwaitingApproval => "AwaitingApproval",
            ChangeReason::Approved => "Approved",
            ChangeReason::Rejected => "Rejected",
            ChangeReason::Superseded => "Superseded",
            ChangeReason::Retried => "Retried",
            ChangeReason::Started => "Started",
            ChangeReason::Resumed => "Resumed",
            ChangeReason::RetryScheduled => "RetryScheduled",
            ChangeReason::WaitingForSource => "WaitingForSource",
            ChangeReason::Succeeded => "Succeeded",
            ChangeReason::Failed => "Failed",
            ChangeReason::Unknown => "Unknown",
        }
    }

    /// The reason of the Kubernetes Event announcing this change.
    pub fn event_reason(self) -> &'static str {
        match self {
            ChangeReason::Recorded => "PromotionRecorded",
            ChangeReason::AwaitingApproval => "WaitingApproval",
            ChangeReason::Approved => "PromotionApproved",
            ChangeReason::Rejected => "PromotionRejected",
            ChangeReason::Superseded => "PromotionSuperseded",
            ChangeReason::Retried => "PromotionRetried",
            ChangeReason::Started => "PromotionStarted",
            ChangeReason::Resumed => "PromotionResumed",
            ChangeReason::RetryScheduled => "PromotionRetrying",
            ChangeReason::WaitingForSource => "PromotionWaitingForSource",
            ChangeReason::Succeeded => "PromotionSucceeded",
            ChangeReason::Failed => "PromotionFailed",
            ChangeReason::Unknown => "PromotionUpdated",
        }
    }

    /// Whether the change calls for attention (a Warning Event).
    pub fn is_warning(self) -> bool {
        matches!(
            self,
            ChangeReason::RetryScheduled | ChangeReason::Failed | ChangeReason::Rejected
        )
    }

    /// Whether people watching the pipeline (not only the promotion) should hear of it:
    /// what they act on, and outcomes.
    pub fn concerns_pipeline(self) -> bool {
        matches!(
            self,
            ChangeReason::AwaitingApproval
                | ChangeReason::Approved
                | ChangeReason::Rejected
                | ChangeReason::Superseded
                | ChangeReason::Succeeded
                | ChangeReason::Failed
        )
    }

    /// Whether it asks something of people (an approval, a failure, a refused or obsolete
    /// promotion), so it is worth an Event on the Pipeline too, not only on the
    /// Promotion: a promotion that simply succeeds costs one Event of ours.
    pub fn needs_attention(self) -> bool {
        matches!(
            self,
            ChangeReason::AwaitingApproval
                | ChangeReason::Rejected
                | ChangeReason::Superseded
                | ChangeReason::Failed
        )
    }
}

impl fmt::Display for ChangeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of a record's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PhaseChange {
    pub phase: Phase,
    pub at: DateTime<Utc>,
    pub reason: ChangeReason,
    pub message: String,
}

/// What caused the record: kept for audit, never used for decisions.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Trigger {
    /// `webhook` (a signed Flux event) or `observed` (the controller's own watch saw every
    /// target of the environment deployed).
    pub source: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reporting_controller: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub object: String,
    /// The cluster the object is in, for observed deployments (`local` or
    /// `<kind>/<namespace>/<name>` of its clusterRef).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster: String,
    /// What the sender added to its event: a Flux Alert's `summary` and `eventMetadata`
    /// (e.g. `cluster`, `env`, `team`), bounded. Passed on in notifications.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PromotionRecord {
    pub id: String,
    pub pipeline: PipelineRef,
    pub source_environment: String,
    pub target_environment: String,
    pub revision: String,
    pub phase: Phase,
    pub attempts: u32,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When a `Pending` record may next be attempted; absent means now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub trigger: Trigger,
    #[serde(default)]
    pub history: Vec<PhaseChange>,
    /// What strategies already did in earlier attempts (e.g. which receivers got the
    /// notification), so a retry does not repeat it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checkpoints: BTreeMap<String, String>,
    /// Who approved, rejected or retried it last (the approver's identity as the
    /// channel used vouches for it: Kubernetes username, or the approval-key holder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
}

/// The deterministic identity of a promotion. Readable prefix, hashed suffix over the
/// full key, valid as a Kubernetes object name (at most 63 characters, DNS label).
pub fn promotion_id(pipeline: &PipelineRef, target_environment: &str, revision: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [
        pipeline.namespace.as_str(),
        pipeline.name.as_str(),
        target_environment,
        revision,
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hex::encode(hasher.finalize());
    let readable = dns_label(&format!("{}-{}", pipeline.name, target_environment), 46);
    if readable.is_empty() {
        format!("p-{}", &digest[..16])
    } else {
        format!("{readable}-{}", &digest[..16])
    }
}

fn dns_label(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        if out.len() >= max {
            break;
        }
        out.push(c);
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// A revision as a semantic version, if it is one (`1.2.3`, `v1.2.3-rc.1`, `1.2.3+build`).
pub fn parse_version(revision: &str) -> Option<semver::Version> {
    let text = revision.strip_prefix('v').unwrap_or(revision);
    semver::Version::parse(text).ok()
}

/// Asked for a phase change the record's current phase does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("promotion {id} is {phase}; cannot {action}")]
pub struct TransitionError {
    pub id: String,
    pub phase: Phase,
    pub action: &'static str,
}

/// Exponential backoff between attempts, and when to give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(300),
            max_attempts: 8,
        }
    }
}

impl RetryPolicy {
    /// Delay after the `attempts`-th failed attempt (1-based): base, 2×base, 4×base, … capped.
    pub fn delay_after(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(30);
        self.base_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay)
    }
}

impl PromotionRecord {
    /// A new record, `Pending` or, for manual promotions, `WaitingApproval`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pipeline: PipelineRef,
        source_environment: &str,
        target_environment: &str,
        revision: &str,
        manual: bool,
        trigger: Trigger,
        now: DateTime<Utc>,
    ) -> Self {
        let (phase, reason, message) = if manual {
            (
                Phase::WaitingApproval,
                ChangeReason::AwaitingApproval,
                format!("promotion of {revision} to {target_environment} waits for approval"),
            )
        } else {
            (
                Phase::Pending,
                ChangeReason::Recorded,
                format!("promotion of {revision} to {target_environment} recorded"),
            )
        };
        Self {
            id: promotion_id(&pipeline, target_environment, revision),
            pipeline,
            source_environment: source_environment.to_string(),
            target_environment: target_environment.to_string(),
            revision: revision.to_string(),
            phase,
            attempts: 0,
            message: message.clone(),
            result: None,
            created_at: now,
            updated_at: now,
            next_attempt_at: None,
            trigger,
            history: vec![PhaseChange {
                phase,
                at: now,
                reason,
                message,
            }],
            checkpoints: BTreeMap::new(),
            decided_by: None,
        }
    }

    fn change(&mut self, phase: Phase, reason: ChangeReason, message: String, now: DateTime<Utc>) {
        self.phase = phase;
        self.message = message.clone();
        self.updated_at = now;
        self.history.push(PhaseChange {
            phase,
            at: now,
            reason,
            message,
        });
    }

    fn refuse(&self, action: &'static str) -> TransitionError {
        TransitionError {
            id: self.id.clone(),
            phase: self.phase,
            action,
        }
    }

    /// Whether the executor should pick this record up at `now`. `Running` records are
    /// due too: they belong to an attempt a crashed process never finished.
    pub fn is_due(&self, now: DateTime<Utc>) -> bool {
        match self.phase {
            Phase::Pending => self.next_attempt_at.is_none_or(|at| at <= now),
            Phase::Running => true,
            _ => false,
        }
    }

    pub fn approve(&mut self, by: &str, now: DateTime<Utc>) -> Result<(), TransitionError> {
        if self.phase != Phase::WaitingApproval {
            return Err(self.refuse("approve"));
        }
        self.next_attempt_at = None;
        self.decided_by = Some(by.to_string());
        let message = format!(
            "promotion of {} to {} approved by {by}",
            self.revision, self.target_environment
        );
        self.change(Phase::Pending, ChangeReason::Approved, message, now);
        Ok(())
    }

    /// An approver refuses the promotion; it never runs.
    pub fn reject(
        &mut self,
        by: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<(), TransitionError> {
        if self.phase != Phase::WaitingApproval {
            return Err(self.refuse("reject"));
        }
        self.next_attempt_at = None;
        self.decided_by = Some(by.to_string());
        let because = if reason.is_empty() {
            String::new()
        } else {
            format!(": {reason}")
        };
        let message = format!(
            "promotion of {} to {} rejected by {by}{because}",
            self.revision, self.target_environment
        );
        self.change(Phase::Rejected, ChangeReason::Rejected, message, now);
        Ok(())
    }

    /// A newer revision for the same environment makes this waiting one obsolete.
    pub fn supersede(&mut self, newer: &str, now: DateTime<Utc>) -> Result<(), TransitionError> {
        if self.phase != Phase::WaitingApproval {
            return Err(self.refuse("supersede"));
        }
        self.next_attempt_at = None;
        let message = format!(
            "superseded by {newer}: approving {} would roll {} back",
            self.revision, self.target_environment
        );
        self.change(Phase::Superseded, ChangeReason::Superseded, message, now);
        Ok(())
    }

    /// Re-queues a `Failed` promotion for a fresh set of attempts. What earlier attempts
    /// already did (checkpoints) is kept, so it is not repeated.
    pub fn retry(&mut self, by: &str, now: DateTime<Utc>) -> Result<(), TransitionError> {
        if self.phase != Phase::Failed {
            return Err(self.refuse("retry"));
        }
        self.attempts = 0;
        self.next_attempt_at = None;
        self.decided_by = Some(by.to_string());
        let message = format!(
            "promotion of {} to {} re-queued by {by}",
            self.revision, self.target_environment
        );
        self.change(Phase::Pending, ChangeReason::Retried, message, now);
        Ok(())
    }

    /// Whether this record's revision is newer than `other`'s: by version where both
    /// are semantic versions (a leading `v` allowed), else by when they were recorded.
    pub fn is_newer_than(&self, other: &PromotionRecord) -> bool {
        match (
            parse_version(&self.revision),
            parse_version(&other.revision),
        ) {
            (Some(mine), Some(theirs)) => mine > theirs,
            _ => self.created_at > other.created_at,
        }
    }

    /// Holds a `Pending` promotion back while its source environment is not deployed at
    /// its revision everywhere; `message` says what is missing. The history notes the
    /// first hold only, so waiting does not grow the record.
    pub fn hold(&mut self, message: String, now: DateTime<Utc>) -> Result<(), TransitionError> {
        if self.phase != Phase::Pending {
            return Err(self.refuse("hold"));
        }
        if self.history.last().map(|h| h.reason) == Some(ChangeReason::WaitingForSource) {
            self.message = message;
            self.updated_at = now;
        } else {
            self.change(Phase::Pending, ChangeReason::WaitingForSource, message, now);
        }
        Ok(())
    }

    /// Ends a `Pending` promotion that can no longer run (e.g. its source environment
    /// never became healthy in time).
    pub fn give_up(&mut self, message: String, now: DateTime<Utc>) -> Result<(), TransitionError> {
        if self.phase != Phase::Pending {
            return Err(self.refuse("give up"));
        }
        self.next_attempt_at = None;
        self.change(Phase::Failed, ChangeReason::Failed, message, now);
        Ok(())
    }

    /// Marks the start of an attempt; persisted before the strategy runs so a crash
    /// mid-attempt is visible and counted.
    pub fn start_attempt(&mut self, now: DateTime<Utc>) -> Result<(), TransitionError> {
        match self.phase {
            Phase::Pending | Phase::Running => {}
            _ => return Err(self.refuse("start an attempt")),
        }
        let resumed = self.phase == Phase::Running;
        self.attempts += 1;
        self.next_attempt_at = None;
        let message = format!("attempt {} started", self.attempts);
        let reason = if resumed {
            ChangeReason::Resumed
        } else {
            ChangeReason::Started
        };
        self.change(Phase::Running, reason, message, now);
        Ok(())
    }

    pub fn succeed(
        &mut self,
        message: String,
        result: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<(), TransitionError> {
        if self.phase != Phase::Running {
            return Err(self.refuse("succeed"));
        }
        self.result = result;
        self.change(Phase::Succeeded, ChangeReason::Succeeded, message, now);
        Ok(())
    }

    /// Records a failed attempt: back to `Pending` with the next attempt scheduled, or
    /// `Failed` when the error is permanent or attempts are exhausted.
    pub fn fail_attempt(
        &mut self,
        message: String,
        retryable: bool,
        policy: &RetryPolicy,
        now: DateTime<Utc>,
    ) -> Result<(), TransitionError> {
        if self.phase != Phase::Running {
            return Err(self.refuse("fail"));
        }
        if retryable && self.attempts < policy.max_attempts {
            let delay = policy.delay_after(self.attempts);
            let next = now
                + chrono::Duration::from_std(delay).unwrap_or_else(|_| chrono::Duration::zero());
            self.next_attempt_at = Some(next);
            let message = format!(
                "attempt {} failed: {message}; retrying at {}",
                self.attempts,
                next.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
            self.change(Phase::Pending, ChangeReason::RetryScheduled, message, now);
        } else {
            let message = if retryable {
                format!("gave up after {} attempts: {message}", self.attempts)
            } else {
                message
            };
            self.next_attempt_at = None;
            self.change(Phase::Failed, ChangeReason::Failed, message, now);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(manual: bool) -> PromotionRecord {
        PromotionRecord::new(
            PipelineRef::new("flux-system", "podinfo"),
            "dev",
            "staging",
            "6.5.1",
            manual,
            Trigger::default(),
            Utc::now(),
        )
    }

    #[test]
    fn id_is_deterministic_and_a_dns_label() {
        let p = PipelineRef::new("ns", "Pod_Info");
        let a = promotion_id(&p, "prod", "1.0.0");
        assert_eq!(a, promotion_id(&p, "prod", "1.0.0"));
        assert_ne!(a, promotion_id(&p, "prod", "1.0.1"));
        assert_ne!(
            a,
            promotion_id(&PipelineRef::new("ns2", "Pod_Info"), "prod", "1.0.0")
        );
        assert!(a.starts_with("pod-info-prod-"), "{a}");
        let long = promotion_id(
            &PipelineRef::new("n", "x".repeat(300)),
            &"e".repeat(100),
            "r",
        );
        assert!(long.len() <= 63, "{}", long.len());
        assert!(
            long.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        // Separator-free concatenation must not collide.
        assert_ne!(
            promotion_id(&PipelineRef::new("a", "bc"), "d", "e"),
            promotion_id(&PipelineRef::new("ab", "c"), "d", "e")
        );
    }

    #[test]
    fn lifecycle_with_retries_and_give_up() {
        let policy = RetryPolicy {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(3),
            max_attempts: 3,
        };
        assert_eq!(policy.delay_after(1), Duration::from_secs(1));
        assert_eq!(policy.delay_after(2), Duration::from_secs(2));
        assert_eq!(policy.delay_after(3), Duration::from_secs(3));
        let now = Utc::now();
        let mut r = record(false);
        assert!(r.is_due(now));
        r.start_attempt(now).unwrap();
        r.fail_attempt("boom".into(), true, &policy, now).unwrap();
        assert_eq!(r.phase, Phase::Pending);
        assert!(!r.is_due(now));
        assert!(r.is_due(now + chrono::Duration::seconds(1)));
        r.start_attempt(now).unwrap();
        r.fail_attempt("boom".into(), true, &policy, now).unwrap();
        r.start_attempt(now).unwrap();
        r.fail_attempt("boom".into(), true, &policy, now).unwrap();
        assert_eq!(r.phase, Phase::Failed);
        assert_eq!(r.attempts, 3);
        assert!(r.message.starts_with("gave up after 3 attempts"));
        assert!(r.start_attempt(now).is_err());
    }

    #[test]
    fn manual_needs_approval_and_success_is_final() {
        let now = Utc::now();
        let mut r = record(true);
        assert_eq!(r.phase, Phase::WaitingApproval);
        assert!(!r.is_due(now));
        assert!(r.start_attempt(now).is_err());
        r.approve("alice", now).unwrap();
        assert!(r.approve("alice", now).is_err());
        assert_eq!(r.decided_by.as_deref(), Some("alice"));
        r.start_attempt(now).unwrap();
        r.succeed("done".into(), Some("https://x/pr/1".into()), now)
            .unwrap();
        assert!(r.start_attempt(now).is_err());
        assert!(!r.is_due(now));
        let phases: Vec<Phase> = r.history.iter().map(|h| h.phase).collect();
        assert_eq!(
            phases,
            [
                Phase::WaitingApproval,
                Phase::Pending,
                Phase::Running,
                Phase::Succeeded
            ]
        );
    }

    #[test]
    fn reject_supersede_and_retry_are_recorded_with_who() {
        let now = Utc::now();
        let mut r = record(true);
        r.reject("bob", "not during the freeze", now).unwrap();
        assert_eq!(r.phase, Phase::Rejected);
        assert!(r.phase.is_terminal());
        assert!(
            r.message.contains("rejected by bob: not during the freeze"),
            "{}",
            r.message
        );
        assert!(r.approve("bob", now).is_err());

        let mut r = record(true);
        r.supersede("6.5.2", now).unwrap();
        assert_eq!(r.phase, Phase::Superseded);
        assert_eq!(r.history.last().unwrap().reason, ChangeReason::Superseded);
        assert!(r.approve("alice", now).is_err());

        let policy = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        let mut r = record(false);
        assert!(r.retry("carol", now).is_err());
        r.start_attempt(now).unwrap();
        r.fail_attempt("boom".into(), true, &policy, now).unwrap();
        assert_eq!(r.phase, Phase::Failed);
        r.retry("carol", now).unwrap();
        assert_eq!((r.phase, r.attempts), (Phase::Pending, 0));
        assert_eq!(r.history.last().unwrap().reason, ChangeReason::Retried);
        assert!(r.is_due(now));
    }

    #[test]
    fn newer_means_higher_version_else_later_record() {
        let now = Utc::now();
        let at = |revision: &str, seconds: i64| {
            PromotionRecord::new(
                PipelineRef::new("ns", "p"),
                "dev",
                "prod",
                revision,
                true,
                Trigger::default(),
                now + chrono::Duration::seconds(seconds),
            )
        };
        assert!(at("1.10.0", 0).is_newer_than(&at("1.9.0", 5)));
        assert!(at("v2.0.0", 0).is_newer_than(&at("1.9.9", 5)));
        assert!(!at("1.0.0-rc.1", 5).is_newer_than(&at("1.0.0", 0)));
        assert!(at("main@sha1:bbb", 5).is_newer_than(&at("main@sha1:aaa", 0)));
        assert!(!at("main@sha1:bbb", 0).is_newer_than(&at("main@sha1:aaa", 5)));
    }

    #[test]
    fn history_reasons_read_back_and_unknown_ones_survive() {
        let change: PhaseChange = serde_json::from_value(serde_json::json!({
            "phase": "Pending", "at": "2026-01-01T00:00:00Z", "reason": "Approved", "message": "m"
        }))
        .unwrap();
        assert_eq!(change.reason, ChangeReason::Approved);
        let change: PhaseChange = serde_json::from_value(serde_json::json!({
            "phase": "Pending", "at": "2026-01-01T00:00:00Z", "reason": "FromTheFuture", "message": "m"
        }))
        .unwrap();
        assert_eq!(change.reason, ChangeReason::Unknown);
    }
}
