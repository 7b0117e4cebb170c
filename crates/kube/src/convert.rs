//! Promotion records to and from `Promotion` custom resources.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use pipeline_core::promotion::PhaseChange;
use pipeline_core::{Phase, PipelineRef, PromotionRecord};
use pipeline_crds::{PipelineReference, Promotion, PromotionSpec, PromotionStatus};

/// Labels set on every Promotion, so `kubectl get promotions -l` can filter.
pub const LABEL_PIPELINE: &str = "pipelines.weave.works/pipeline";
pub const LABEL_ENVIRONMENT: &str = "pipelines.weave.works/environment";

/// The Promotion object for a new record (without status: that is a second write).
pub fn promotion_for(record: &PromotionRecord, manual: bool) -> Promotion {
    let mut promotion = Promotion::new(
        &record.id,
        PromotionSpec {
            pipeline: PipelineReference {
                name: record.pipeline.name.clone(),
            },
            source_environment: record.source_environment.clone(),
            target_environment: record.target_environment.clone(),
            revision: record.revision.clone(),
            manual,
            trigger: record.trigger.clone(),
            recorded_at: record.created_at,
            approval: None,
        },
    );
    promotion.metadata = ObjectMeta {
        name: Some(record.id.clone()),
        namespace: Some(record.pipeline.namespace.clone()),
        labels: Some(
            [
                (
                    LABEL_PIPELINE.to_string(),
                    label_value(&record.pipeline.name),
                ),
                (
                    LABEL_ENVIRONMENT.to_string(),
                    label_value(&record.target_environment),
                ),
            ]
            .into_iter()
            .collect(),
        ),
        ..ObjectMeta::default()
    };
    promotion
}

/// A label value (at most 63 characters of `[A-Za-z0-9._-]`, alphanumeric at both ends);
/// labels are for filtering only, the spec holds the exact value.
fn label_value(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    while out.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        out.pop();
    }
    let trimmed = out.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    trimmed.to_string()
}

/// The record a Promotion holds. A Promotion without status (its creator died between
/// creating it and writing the status) is in its initial phase, derived from the spec.
pub fn record_of(promotion: &Promotion) -> Option<PromotionRecord> {
    let name = promotion.metadata.name.clone()?;
    let namespace = promotion.metadata.namespace.clone()?;
    let spec = &promotion.spec;
    let pipeline = PipelineRef::new(namespace, spec.pipeline.name.clone());
    let mut record = PromotionRecord::new(
        pipeline,
        &spec.source_environment,
        &spec.target_environment,
        &spec.revision,
        spec.manual,
        spec.trigger.clone(),
        spec.recorded_at,
    );
    // The object's name is the id, whatever created it.
    record.id = name;
    if let Some(status) = &promotion.status
        && let Some(phase) = status.phase
    {
        record.phase = phase;
        record.attempts = status.attempts;
        record.message = status.message.clone();
        record.result = status.result.clone();
        record.next_attempt_at = status.next_attempt_at;
        record.updated_at = status.updated_at.unwrap_or(record.created_at);
        record.history = status.history.clone();
        record.checkpoints = status.checkpoints.clone();
        record.decided_by = status.decided_by.clone();
    }
    Some(record)
}

/// The status holding `record`, with kstatus conditions derived from its phase. Condition
/// transition times are kept from `previous` when the condition did not change.
pub fn status_of(
    record: &PromotionRecord,
    previous: Option<&PromotionStatus>,
    generation: Option<i64>,
) -> PromotionStatus {
    let now = record.updated_at;
    let reason = record
        .history
        .last()
        .map_or_else(|| record.phase.as_str(), |h| h.reason.as_str());
    let message = record.message.clone();
    let (ready, reconciling, stalled) = match record.phase {
        Phase::Pending | Phase::Running => ("False", true, false),
        Phase::WaitingApproval => ("False", false, false),
        Phase::Succeeded => ("True", false, false),
        Phase::Failed => ("False", false, true),
        // Final and nothing to fix: decided by people, not a fault.
        Phase::Rejected | Phase::Superseded => ("False", false, false),
    };
    let mut wanted = vec![condition("Ready", ready, reason, &message, now, generation)];
    if reconciling {
        wanted.push(condition(
            "Reconciling",
            "True",
            reason,
            &message,
            now,
            generation,
        ));
    }
    if stalled {
        wanted.push(condition(
            "Stalled", "True", reason, &message, now, generation,
        ));
    }
    let old = previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    for condition in &mut wanted {
        if let Some(before) = old
            .iter()
            .find(|c| c.type_ == condition.type_ && c.status == condition.status)
        {
            condition.last_transition_time = before.last_transition_time.clone();
        }
    }
    PromotionStatus {
        phase: Some(record.phase),
        attempts: record.attempts,
        message: record.message.clone(),
        result: record.result.clone(),
        next_attempt_at: record.next_attempt_at,
        updated_at: Some(record.updated_at),
        observed_generation: generation,
        conditions: wanted,
        history: record.history.clone(),
        checkpoints: record.checkpoints.clone(),
        decided_by: record.decided_by.clone(),
    }
}

pub fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    at: DateTime<Utc>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: condition_reason(reason),
        message: message.chars().take(32_000).collect(),
        last_transition_time: Time(timestamp(at)),
        observed_generation: generation,
    }
}

/// A Kubernetes timestamp for a chrono time.
pub fn timestamp(at: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    let nanos = i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0);
    k8s_openapi::jiff::Timestamp::new(at.timestamp(), nanos)
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now())
}

/// Condition reasons must be CamelCase identifiers.
fn condition_reason(reason: &str) -> String {
    let out: String = reason
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(1024)
        .collect();
    if out.is_empty() || !out.starts_with(|c: char| c.is_ascii_alphabetic()) {
        "Unknown".to_string()
    } else {
        out
    }
}

/// The phase change `before` → `after`, if any: the history entries `after` added.
pub fn new_changes<'a>(before: &PromotionRecord, after: &'a PromotionRecord) -> &'a [PhaseChange] {
    after
        .history
        .get(before.history.len()..)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use pipeline_core::Trigger;

    fn record(manual: bool) -> PromotionRecord {
        PromotionRecord::new(
            PipelineRef::new("flux-system", "podinfo"),
            "dev",
            "staging",
            "6.5.1",
            manual,
            Trigger {
                source: "webhook".into(),
                ..Trigger::default()
            },
            Utc::now(),
        )
    }

    #[test]
    fn round_trips_and_status_less_object_is_initial_phase() {
        for manual in [false, true] {
            let r = record(manual);
            let mut promotion = promotion_for(&r, manual);
            assert_eq!(record_of(&promotion).unwrap(), r);
            let mut changed = r.clone();
            if manual {
                changed.approve("alice", Utc::now()).unwrap();
            }
            changed.start_attempt(Utc::now()).unwrap();
            promotion.status = Some(status_of(&changed, None, Some(1)));
            assert_eq!(record_of(&promotion).unwrap(), changed);
        }
    }

    #[test]
    fn conditions_follow_the_phase() {
        let mut r = record(false);
        let pending = status_of(&r, None, None);
        assert!(pending.conditions.iter().any(|c| c.type_ == "Reconciling"));
        r.start_attempt(Utc::now()).unwrap();
        r.succeed("done".into(), None, Utc::now()).unwrap();
        let done = status_of(&r, Some(&pending), None);
        assert_eq!(done.conditions.len(), 1);
        assert_eq!(done.conditions[0].status, "True");
    }

    #[test]
    fn labels_are_valid() {
        assert_eq!(label_value("-a/b_"), "a-b");
        assert_eq!(label_value(&"x".repeat(80)).len(), 63);
    }
}
