//! Flux events (`fluxcd/pkg/apis/event/v1beta1`) as notification-controller forwards them,
//! and what they say about a deployment.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::pipeline::api_group_of;

/// Prefix notification-controller and Flux's own recorders use for event metadata.
pub const EVENT_METADATA_PREFIX: &str = "event.toolkit.fluxcd.io/";

/// Reasons that mean "a new version is now deployed".
const SUCCESS_REASONS: &[&str] = &[
    "InstallSucceeded",
    "UpgradeSucceeded",
    "TestSucceeded",
    "ReconciliationSucceeded",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FluxEvent {
    pub involved_object: ObjectReference,
    pub severity: String,
    pub timestamp: DateTime<Utc>,
    #[serde(default)]
    pub message: String,
    pub reason: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub reporting_controller: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporting_instance: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default)]
    pub api_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
}

/// Longest accepted revision. Flux revisions are short (`6.5.1`, `main@sha1:<40 hex>`,
/// `sha256:<64 hex>`, `v1.2.3@sha256:<64 hex>`); 256 bytes leaves room for long branch and tag
/// names.
pub const MAX_REVISION_BYTES: usize = 256;

/// Most entries of an event's metadata kept in a record (see [`FluxEvent::enrichment`]).
pub const MAX_ENRICHMENT_ENTRIES: usize = 16;
/// Longest metadata key kept.
pub const MAX_ENRICHMENT_KEY_BYTES: usize = 63;
/// Longest metadata value kept (longer ones are cut).
pub const MAX_ENRICHMENT_VALUE_BYTES: usize = 256;

/// Longest accepted event message.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;

/// Longest accepted identifying field of an event (kind, names, reason, ...).
pub const MAX_NAME_BYTES: usize = 256;

/// Decodes exactly one JSON value from `body`, naming the field that is wrong.
pub fn decode_exactly_one<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        if path == "." {
            err.into_inner().to_string()
        } else {
            format!("{path}: {}", err.into_inner())
        }
    })?;
    de.end()
        .map_err(|err| format!("unexpected data after the JSON document: {err}"))?;
    Ok(value)
}

/// Characters that never belong in a revision or a name: controls (NUL, newline, ESC
/// starting ANSI sequences, DEL, C1), whitespace, and the invisible formatting and
/// bidirectional overrides that make text display differently from what it is.
pub fn is_unprintable(c: char) -> bool {
    c.is_control()
        || c.is_whitespace()
        || matches!(c,
            '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

/// Why a revision cannot be promoted, if it cannot: too long, or not printable.
pub fn check_revision(revision: &str) -> Result<(), String> {
    if revision.len() > MAX_REVISION_BYTES {
        return Err(format!(
            "revision is {} bytes long, more than the accepted {MAX_REVISION_BYTES}",
            revision.len()
        ));
    }
    if let Some(c) = revision.chars().find(|c| is_unprintable(*c)) {
        return Err(format!(
            "revision contains the unprintable character {:?}; revisions are printable and without spaces",
            c
        ));
    }
    Ok(())
}

/// Whether an event reports a successful deployment, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Deployed,
    NotADeployment {
        reason: &'static str,
        message: String,
    },
}

impl FluxEvent {
    /// Decodes an event; the message says which field is missing or wrong. The body must
    /// hold exactly one event: anything after it but whitespace is refused, since the
    /// signature covers bytes that no one would then have read.
    pub fn from_json(body: &[u8]) -> Result<Self, String> {
        let event: Self = decode_exactly_one(body)?;
        event.check_fields()?;
        Ok(event)
    }

    /// The identifying fields are short names; bounding them (and refusing control
    /// characters) keeps a signed but hostile sender from forging log lines or bloating
    /// records. The message is free text (kustomize-controller lists every changed
    /// object in it, one per line), so it is only bounded, generously.
    fn check_fields(&self) -> Result<(), String> {
        if self.message.len() > MAX_MESSAGE_BYTES {
            return Err(format!(
                "message: {} bytes long, more than the accepted {MAX_MESSAGE_BYTES}",
                self.message.len()
            ));
        }
        let object = &self.involved_object;
        for (field, value) in [
            ("involvedObject.kind", object.kind.as_str()),
            ("involvedObject.namespace", object.namespace.as_str()),
            ("involvedObject.name", object.name.as_str()),
            ("involvedObject.apiVersion", object.api_version.as_str()),
            ("involvedObject.uid", object.uid.as_str()),
            (
                "involvedObject.resourceVersion",
                object.resource_version.as_str(),
            ),
            ("severity", self.severity.as_str()),
            ("reason", self.reason.as_str()),
            ("reportingController", self.reporting_controller.as_str()),
        ] {
            if value.len() > MAX_NAME_BYTES {
                return Err(format!(
                    "{field}: {} bytes long, more than the accepted {MAX_NAME_BYTES}",
                    value.len()
                ));
            }
            if value.chars().any(is_unprintable) {
                return Err(format!("{field}: contains control or invisible characters"));
            }
        }
        Ok(())
    }

    /// The deployed revision: `revision`, else `<involvedObject group>/revision`, else the
    /// Flux event prefix, else any other `<group>/revision` (older controllers forwarded
    /// prefixed keys).
    pub fn revision(&self) -> Option<&str> {
        let group = api_group_of(&self.involved_object.api_version);
        // Not trimmed: a revision with surrounding whitespace or controls is refused by
        // `check_revision`, not silently made into another one.
        fn non_empty(v: &str) -> Option<&str> {
            (!v.trim().is_empty()).then_some(v)
        }
        if let Some(v) = self.metadata.get("revision").and_then(|v| non_empty(v)) {
            return Some(v);
        }
        for key in [
            format!("{group}/revision"),
            format!("{EVENT_METADATA_PREFIX}revision"),
        ] {
            if let Some(v) = self.metadata.get(&key).and_then(|v| non_empty(v)) {
                return Some(v);
            }
        }
        self.metadata
            .iter()
            .find(|(k, _)| k.ends_with("/revision"))
            .and_then(|(_, v)| non_empty(v))
    }

    /// What an Alert added to the event (`summary`, `eventMetadata`), for the record:
    /// every metadata entry but the revision and Flux's own keys, at most
    /// [`MAX_ENRICHMENT_ENTRIES`] of them, keys printable and short, values bounded and
    /// with control characters made spaces.
    pub fn enrichment(&self) -> BTreeMap<String, String> {
        let group = api_group_of(&self.involved_object.api_version);
        let revision_keys = [
            "revision".to_string(),
            format!("{group}/revision"),
            format!("{EVENT_METADATA_PREFIX}revision"),
        ];
        self.metadata
            .iter()
            .filter(|(key, _)| {
                !revision_keys.contains(key)
                    && !key.ends_with("/revision")
                    && !matches!(key.as_str(), "token" | "checksum" | "digest")
                    && !key.ends_with("/token")
                    && key.len() <= MAX_ENRICHMENT_KEY_BYTES
                    && !key.is_empty()
                    && !key.chars().any(is_unprintable)
            })
            .take(MAX_ENRICHMENT_ENTRIES)
            .map(|(key, value)| {
                let mut value: String = value
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                if value.len() > MAX_ENRICHMENT_VALUE_BYTES {
                    let mut end = MAX_ENRICHMENT_VALUE_BYTES;
                    while !value.is_char_boundary(end) {
                        end -= 1;
                    }
                    value.truncate(end);
                    value.push('…');
                }
                (key.clone(), value)
            })
            .collect()
    }

    /// Classifies the event. Failures, rollbacks and uninstalls are not deployments of a
    /// new version, whatever revision they carry.
    pub fn outcome(&self) -> Outcome {
        if self.severity != "info" {
            return Outcome::NotADeployment {
                reason: "not_info_severity",
                message: format!(
                    "event severity is {:?}; only info events report deployments",
                    self.severity
                ),
            };
        }
        if SUCCESS_REASONS.contains(&self.reason.as_str()) {
            return Outcome::Deployed;
        }
        // helm-controller v2beta1 used reason "info" and "Helm upgrade succeeded".
        if self.reason == "info"
            && self
                .message
                .trim_end()
                .to_ascii_lowercase()
                .ends_with("succeeded")
        {
            return Outcome::Deployed;
        }
        Outcome::NotADeployment {
            reason: "not_a_deployment",
            message: format!(
                "event reason {:?} does not report a successful deployment",
                self.reason
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(reason: &str, severity: &str, message: &str) -> FluxEvent {
        FluxEvent {
            involved_object: ObjectReference {
                kind: "HelmRelease".into(),
                namespace: "dev".into(),
                name: "podinfo".into(),
                api_version: "helm.toolkit.fluxcd.io/v2".into(),
                ..Default::default()
            },
            severity: severity.into(),
            timestamp: Utc::now(),
            message: message.into(),
            reason: reason.into(),
            metadata: BTreeMap::new(),
            reporting_controller: "helm-controller".into(),
            reporting_instance: None,
        }
    }

    #[test]
    fn classifies_reasons() {
        assert_eq!(
            event("UpgradeSucceeded", "info", "").outcome(),
            Outcome::Deployed
        );
        assert_eq!(
            event("ReconciliationSucceeded", "info", "").outcome(),
            Outcome::Deployed
        );
        assert_eq!(
            event("info", "info", "Helm upgrade succeeded").outcome(),
            Outcome::Deployed
        );
        assert!(matches!(
            event("info", "info", "Helm upgrade failed").outcome(),
            Outcome::NotADeployment { .. }
        ));
        assert!(matches!(
            event("UpgradeFailed", "error", "").outcome(),
            Outcome::NotADeployment {
                reason: "not_info_severity",
                ..
            }
        ));
        assert!(matches!(
            event("UpgradeSucceeded", "error", "").outcome(),
            Outcome::NotADeployment { .. }
        ));
        assert!(matches!(
            event("RollbackSucceeded", "info", "").outcome(),
            Outcome::NotADeployment {
                reason: "not_a_deployment",
                ..
            }
        ));
        assert!(matches!(
            event("UninstallSucceeded", "info", "").outcome(),
            Outcome::NotADeployment { .. }
        ));
    }

    #[test]
    fn finds_revision_plain_or_prefixed() {
        let mut e = event("UpgradeSucceeded", "info", "");
        assert_eq!(e.revision(), None);
        e.metadata
            .insert("helm.toolkit.fluxcd.io/revision".into(), "6.5.1".into());
        assert_eq!(e.revision(), Some("6.5.1"));
        e.metadata.insert("revision".into(), "6.5.2".into());
        assert_eq!(e.revision(), Some("6.5.2"));
        let mut k = event("ReconciliationSucceeded", "info", "");
        k.metadata.insert(
            "kustomize.toolkit.fluxcd.io/revision".into(),
            "main@sha1:abc".into(),
        );
        assert_eq!(k.revision(), Some("main@sha1:abc"));
        k.metadata.insert("revision".into(), "  ".into());
        assert_eq!(k.revision(), Some("main@sha1:abc"));
    }

    #[test]
    fn refuses_trailing_data_and_unprintable_names() {
        let body = br#"{"involvedObject":{"kind":"HelmRelease","namespace":"dev","name":"podinfo","apiVersion":"helm.toolkit.fluxcd.io/v2"},"severity":"info","timestamp":"2022-09-13T16:01:01Z","reason":"UpgradeSucceeded","metadata":{"revision":"1.0.0"}}"#;
        assert!(FluxEvent::from_json(body).is_ok());
        let mut padded = body.to_vec();
        padded.extend_from_slice(b" \n\t");
        assert!(FluxEvent::from_json(&padded).is_ok());
        for tail in [&b"{}"[..], b"\0", b"x", b"[]"] {
            let mut bad = body.to_vec();
            bad.extend_from_slice(tail);
            let err = FluxEvent::from_json(&bad).unwrap_err();
            assert!(err.contains("after the JSON document"), "{err}");
        }
        let text = std::str::from_utf8(body).unwrap();
        let forged = text.replace("UpgradeSucceeded", "UpgradeSucceeded\\n\\u001b[31m");
        let err = FluxEvent::from_json(forged.as_bytes()).unwrap_err();
        assert!(err.starts_with("reason"), "{err}");
        let long = text.replace("podinfo", &"a".repeat(300));
        let err = FluxEvent::from_json(long.as_bytes()).unwrap_err();
        assert!(err.starts_with("involvedObject.name"), "{err}");
    }

    #[test]
    fn enrichment_keeps_what_alerts_add_bounded() {
        let mut e = event("UpgradeSucceeded", "info", "");
        for (k, v) in [
            ("revision", "1.0.0"),
            ("helm.toolkit.fluxcd.io/revision", "1.0.0"),
            ("token", "secret-digest"),
            ("summary", "dev cluster\nsecond line"),
            ("cluster", "leaf-1"),
            ("team", &"t".repeat(300)),
        ] {
            e.metadata.insert(k.into(), v.into());
        }
        let kept = e.enrichment();
        assert_eq!(
            kept.keys().map(String::as_str).collect::<Vec<_>>(),
            ["cluster", "summary", "team"]
        );
        assert_eq!(kept["summary"], "dev cluster second line");
        assert!(kept["team"].len() <= MAX_ENRICHMENT_VALUE_BYTES + '…'.len_utf8());
        for i in 0..40 {
            e.metadata.insert(format!("k{i:02}"), "v".into());
        }
        assert_eq!(e.enrichment().len(), MAX_ENRICHMENT_ENTRIES);
    }

    #[test]
    fn revisions_are_printable_and_bounded() {
        for ok in [
            "6.5.1",
            "v1.2.3+build.4",
            "main@sha1:0123456789abcdef0123456789abcdef01234567",
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "feature/überweisung@sha1:abc",
        ] {
            assert!(check_revision(ok).is_ok(), "{ok}");
        }
        for bad in [
            "1.0\n2.0",
            "1.0\u{1b}[31m",
            "1.0\0",
            "1.0 2.0",
            "1.0\u{7f}",
            "1.0\u{202e}",
            "1.0\u{200b}",
        ] {
            assert!(check_revision(bad).is_err(), "{bad:?}");
        }
        assert!(check_revision(&"1".repeat(MAX_REVISION_BYTES)).is_ok());
        assert!(check_revision(&"1".repeat(MAX_REVISION_BYTES + 1)).is_err());
    }

    #[test]
    fn decodes_design_document_example_and_names_missing_fields() {
        let body = br#"{"involvedObject":{"kind":"HelmRelease","namespace":"shopping","name":"search","uid":"57c3579b","apiVersion":"helm.toolkit.fluxcd.io/v2beta1","resourceVersion":"155540"},"severity":"info","timestamp":"2022-09-13T16:01:01Z","message":"Helm upgrade succeeded","reason":"info","metadata":{"revision":"0.13.4","summary":"foobar"},"reportingController":"helm-controller","reportingInstance":"helm-controller-7cdc7874f8-9qpft"}"#;
        let e = FluxEvent::from_json(body).unwrap();
        assert_eq!(e.revision(), Some("0.13.4"));
        assert_eq!(e.outcome(), Outcome::Deployed);
        let err = FluxEvent::from_json(br#"{"severity":"info"}"#).unwrap_err();
        assert!(err.contains("involvedObject"), "{err}");
        let err = FluxEvent::from_json(
            br#"{"involvedObject":{},"severity":"info","reason":"x","timestamp":"yesterday"}"#,
        )
        .unwrap_err();
        assert!(err.starts_with("timestamp"), "{err}");
    }
}
