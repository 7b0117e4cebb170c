//! Hostile-input and failure campaign against the real binary over loopback: a catalogue
//! of bad requests (each refused with its status and reason, and without side effects),
//! bodies that keep coming after a 413, slowloris under a low open-file limit, connection
//! timeouts, kill -9 under load, a full disk and its recovery, a zero-byte state file, and
//! secrets that must never leave the process.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pipeline_core::signature::{HmacAlgorithm, sign};
use serde_json::{Value, json};
use support::raw::{self, Framing, RawResponse};
use support::*;

const DEV: &str = "/pipelines/promotions/flux-system/podinfo/dev";
const STAGING: &str = "/pipelines/promotions/flux-system/podinfo/staging";
const APPROVE_PROD: &str = "/pipelines/approvals/flux-system/podinfo/prod/6.5.1";
const MAX_BODY: usize = 256 * 1024;
/// The quickstart Secret's `approval-key`: approvals, rejections and retries are signed
/// with it, not with the webhook key every leaf cluster holds.
const APPROVAL_KEY: &str = "quickstart-approval-key-9876543210";

// ---------------------------------------------------------------------------------------
// Building requests
// ---------------------------------------------------------------------------------------

/// A successful HelmRelease upgrade reported from `namespace`. The message does not
/// repeat the revision, so revision cases test the revision rule and nothing else.
fn flux_event(namespace: &str, revision: &str) -> Value {
    json!({
        "involvedObject": {"kind": "HelmRelease", "namespace": namespace, "name": "podinfo",
                           "apiVersion": "helm.toolkit.fluxcd.io/v2", "uid": "u1", "resourceVersion": "7"},
        "severity": "info",
        "timestamp": Utc::now().to_rfc3339(),
        "message": format!("Helm upgrade succeeded for release {namespace}/podinfo.v2"),
        "reason": "UpgradeSucceeded",
        "metadata": {"revision": revision},
        "reportingController": "helm-controller"
    })
}

fn bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

/// A dev event for `revision`, edited by `edit`.
fn dev_event(revision: &str, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut value = flux_event("podinfo-dev", revision);
    edit(&mut value);
    bytes(&value)
}

fn signature(body: &[u8]) -> String {
    sign(HmacAlgorithm::Sha256, KEY.as_bytes(), body)
}

fn approval_signature(body: &[u8]) -> String {
    sign(HmacAlgorithm::Sha256, APPROVAL_KEY.as_bytes(), body)
}

/// Whether `target` is a decision path (approval, rejection, retry), signed with the
/// approval key.
fn is_decision_path(target: &str) -> bool {
    ["/approvals/", "/approval/", "/rejections/", "/retries/"]
        .iter()
        .any(|p| target.contains(p))
}

fn hex_of(header: &str) -> &str {
    header.split_once('=').map_or(header, |(_, hex)| hex)
}

fn approval_body(pipeline: &str, environment: &str, revision: &str, at: DateTime<Utc>) -> Vec<u8> {
    bytes(&json!({
        "pipeline": pipeline,
        "environment": environment,
        "revision": revision,
        "timestamp": at.to_rfc3339(),
    }))
}

/// One catalogue entry: a request and the refusal it must get.
#[derive(Clone)]
struct Case {
    name: String,
    method: &'static str,
    target: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    framing: Framing,
    status: u16,
    reason: &'static str,
}

impl Case {
    fn new(
        name: &str,
        method: &'static str,
        target: impl Into<String>,
        status: u16,
        reason: &'static str,
    ) -> Case {
        Case {
            name: name.to_string(),
            method,
            target: target.into(),
            headers: Vec::new(),
            body: Vec::new(),
            framing: Framing::Length,
            status,
            reason,
        }
    }

    /// A JSON body (with its content type).
    fn body(mut self, body: Vec<u8>) -> Case {
        self.body = body;
        self.header("Content-Type", "application/json")
    }

    fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Case {
        self.headers
            .push((name.to_string(), value.as_ref().to_vec()));
        self
    }

    /// Adds the correct `X-Signature` of the body as it is now: the approval key's on
    /// decision paths, the webhook key's elsewhere.
    fn signed(self) -> Case {
        let value = if is_decision_path(&self.target) {
            approval_signature(&self.body)
        } else {
            signature(&self.body)
        };
        self.header("X-Signature", value)
    }

    fn framing(mut self, framing: Framing) -> Case {
        self.framing = framing;
        self
    }
}

/// POST of `body` to `target`, correctly signed.
fn signed(name: &str, target: &str, body: Vec<u8>, status: u16, reason: &'static str) -> Case {
    Case::new(name, "POST", target, status, reason)
        .body(body)
        .signed()
}

fn deep(open: &str, depth: usize) -> Vec<u8> {
    open.repeat(depth).into_bytes()
}

/// Every hostile or wrong request, with the status and reason the README (and the
/// hardening rules) give it. None of them may leave a record or send a notification.
fn catalogue() -> Vec<Case> {
    let ok = dev_event("6.5.1", |_| {});
    let good_sig = signature(&ok);
    let good_hex = hex_of(&good_sig).to_string();
    let sig_case = |name: &str, value: &[u8]| {
        Case::new(name, "POST", DEV, 401, "unauthenticated")
            .body(ok.clone())
            .header("X-Signature", value)
    };
    let bad_body = |name: &str, body: Vec<u8>| signed(name, DEV, body, 400, "invalid_body");
    let with_revision = |name: &str, revision: &str| {
        signed(
            name,
            DEV,
            dev_event(revision, |_| {}),
            422,
            "invalid_revision",
        )
    };
    let edited = |name: &str, status: u16, reason: &'static str, edit: &dyn Fn(&mut Value)| {
        signed(
            name,
            DEV,
            dev_event(&format!("rev-{name}"), edit),
            status,
            reason,
        )
    };
    let now = Utc::now();
    let hour = chrono::Duration::hours(1);
    let mut trailing_second = ok.clone();
    trailing_second.extend_from_slice(&dev_event("6.5.9", |_| {}));
    let with_suffix = |revision: &str, suffix: &[u8]| {
        let mut body = dev_event(revision, |_| {});
        body.extend_from_slice(suffix);
        body
    };
    let approval = |revision: &str, at: DateTime<Utc>| {
        approval_body("flux-system/podinfo", "prod", revision, at)
    };
    let good_approval = approval("6.5.1", now);
    let cases = vec![
        // --- signatures ---------------------------------------------------------------
        Case::new("signature_missing", "POST", DEV, 401, "unauthenticated").body(ok.clone()),
        sig_case("signature_empty", b""),
        sig_case("signature_algorithm_only", b"sha256="),
        sig_case("signature_hex_without_algorithm", good_hex.as_bytes()),
        sig_case("signature_md5", format!("md5={good_hex}").as_bytes()),
        sig_case("signature_sha1", format!("sha1={}", &good_hex[..40]).as_bytes()),
        sig_case("signature_none_algorithm", b"none="),
        sig_case("signature_truncated_half", format!("sha256={}", &good_hex[..32]).as_bytes()),
        sig_case("signature_odd_length", format!("sha256={}", &good_hex[..63]).as_bytes()),
        sig_case("signature_extended", format!("sha256={good_hex}00").as_bytes()),
        sig_case("signature_not_hex", format!("sha256={}", "zz".repeat(32)).as_bytes()),
        sig_case(
            "signature_wrong_key",
            sign(HmacAlgorithm::Sha256, b"not-the-key", &ok).as_bytes(),
        ),
        sig_case(
            "signature_key_plus_newline",
            sign(HmacAlgorithm::Sha256, format!("{KEY}\n").as_bytes(), &ok).as_bytes(),
        ),
        sig_case(
            "signature_of_other_body",
            signature(&dev_event("6.5.2", |_| {})).as_bytes(),
        ),
        sig_case("signature_of_empty_body", signature(b"").as_bytes()),
        sig_case("signature_algorithm_label_swapped", format!("sha224={good_hex}").as_bytes()),
        sig_case(
            "signature_sha512_wrong_key",
            sign(HmacAlgorithm::Sha512, b"not-the-key", &ok).as_bytes(),
        ),
        sig_case("signature_comma_joined", format!("{good_sig}, {good_sig}").as_bytes()),
        sig_case("signature_non_ascii_bytes", b"sha256=\xff\xfe\xfd"),
        Case::new("signature_two_headers_valid_first", "POST", DEV, 401, "unauthenticated")
            .body(ok.clone())
            .header("X-Signature", &good_sig)
            .header("X-Signature", "sha256=00"),
        Case::new("signature_two_headers_valid_second", "POST", DEV, 401, "unauthenticated")
            .body(ok.clone())
            .header("X-Signature", "sha256=00")
            .header("X-Signature", &good_sig),
        Case::new("signature_two_identical_valid_headers", "POST", DEV, 401, "unauthenticated")
            .body(ok.clone())
            .header("X-Signature", &good_sig)
            .header("x-signature", &good_sig),
        Case::new("signature_in_other_header", "POST", DEV, 401, "unauthenticated")
            .body(ok.clone())
            .header("X-Hub-Signature-256", &good_sig),
        Case::new("key_as_bearer_token", "POST", DEV, 401, "unauthenticated")
            .body(ok.clone())
            .header("Authorization", format!("Bearer {KEY}")),
        {
            // Signed, then changed: one more byte (a space) after signing.
            let mut body = ok.clone();
            body.push(b' ');
            Case::new("body_changed_after_signing", "POST", DEV, 401, "unauthenticated")
                .body(body)
                .header("X-Signature", &good_sig)
        },
        // --- bodies that are not one event ---------------------------------------------
        bad_body("body_empty", Vec::new()),
        bad_body("body_not_json", b"hello".to_vec()),
        bad_body("body_nul_only", b"\0".to_vec()),
        bad_body("body_json_array", b"[]".to_vec()),
        bad_body("body_json_null", b"null".to_vec()),
        bad_body("body_json_string", b"\"event\"".to_vec()),
        bad_body("body_json_number", b"42".to_vec()),
        bad_body("body_truncated", ok[..ok.len() / 2].to_vec()),
        bad_body("body_deep_arrays_10k", deep("[", 10_000)),
        bad_body("body_deep_objects_10k", deep("{\"a\":", 10_000)),
        bad_body(
            "body_deep_nesting_in_metadata",
            format!(
                "{{\"involvedObject\":{{}},\"severity\":\"info\",\"metadata\":{{\"revision\":{}}}}}",
                "[".repeat(5_000)
            )
            .into_bytes(),
        ),
        edited("body_severity_number", 400, "invalid_body", &|v| v["severity"] = json!(1)),
        edited("body_revision_number", 400, "invalid_body", &|v| {
            v["metadata"]["revision"] = json!(651)
        }),
        edited("body_involved_object_string", 400, "invalid_body", &|v| {
            v["involvedObject"] = json!("HelmRelease/podinfo")
        }),
        edited("body_timestamp_garbage", 400, "invalid_body", &|v| {
            v["timestamp"] = json!("yesterday")
        }),
        edited("body_missing_involved_object", 400, "invalid_body", &|v| {
            v.as_object_mut().unwrap().remove("involvedObject");
        }),
        edited("body_missing_timestamp", 400, "invalid_body", &|v| {
            v.as_object_mut().unwrap().remove("timestamp");
        }),
        edited("body_missing_reason", 400, "invalid_body", &|v| {
            v.as_object_mut().unwrap().remove("reason");
        }),
        bad_body("body_duplicate_field", {
            let text = String::from_utf8(dev_event("dup.1", |_| {})).unwrap();
            text.replacen("\"severity\":\"info\"", "\"severity\":\"info\",\"severity\":\"info\"", 1)
                .into_bytes()
        }),
        bad_body("body_invalid_utf8", {
            let text = String::from_utf8(dev_event("utf8.1", |_| {})).unwrap();
            let mut body = Vec::new();
            let (head, tail) = text.split_once("Helm upgrade").unwrap();
            body.extend_from_slice(head.as_bytes());
            body.extend_from_slice(b"\xff\xfe");
            body.extend_from_slice(tail.as_bytes());
            body
        }),
        bad_body("body_utf8_bom_prefix", {
            let mut body = b"\xef\xbb\xbf".to_vec();
            body.extend_from_slice(&dev_event("bom.1", |_| {}));
            body
        }),
        bad_body(
            "body_utf16",
            String::from_utf8(dev_event("utf16.1", |_| {}))
                .unwrap()
                .encode_utf16()
                .flat_map(u16::to_le_bytes)
                .collect(),
        ),
        // --- a valid event followed by anything else -------------------------------------
        bad_body("body_trailing_empty_object", with_suffix("trail.1", b"{}")),
        bad_body("body_trailing_nul", with_suffix("trail.2", b"\0")),
        bad_body("body_trailing_second_event", trailing_second),
        bad_body("body_trailing_garbage", with_suffix("trail.3", b"xyz")),
        bad_body("body_trailing_comma", with_suffix("trail.4", b",")),
        bad_body("body_trailing_whitespace_then_garbage", with_suffix("trail.5", b"\n \tx")),
        // --- revisions -------------------------------------------------------------------
        with_revision("revision_257_bytes", &"a".repeat(257)),
        with_revision("revision_64_kib", &"7".repeat(64 * 1024)),
        with_revision(
            "revision_newline_and_ansi",
            "6.5.1\n\u{1b}[31mERROR forged log line\u{1b}[0m",
        ),
        with_revision("revision_nul", "6.5.1\u{0}"),
        with_revision("revision_inner_space", "6.5 .1"),
        with_revision("revision_leading_space", " 6.5.11"),
        with_revision("revision_tab", "6.5\t1"),
        with_revision("revision_trailing_newline", "6.5.13\n"),
        with_revision("revision_trailing_tab", "6.5.14\t"),
        with_revision("revision_carriage_return", "6.5.1\rX"),
        with_revision("revision_del", "6.5.1\u{7f}"),
        with_revision("revision_ansi_only", "\u{1b}[2J"),
        with_revision("revision_c1_next_line", "6.5.12\u{85}"),
        with_revision("revision_line_separator", "6.5\u{2028}1"),
        with_revision("revision_no_break_space", "6.5\u{a0}1"),
        with_revision("revision_bidi_override", "6.5.1\u{202e}"),
        edited("revision_prefixed_key_with_newline", 422, "invalid_revision", &|v| {
            v["metadata"] = json!({"helm.toolkit.fluxcd.io/revision": "6.5.1\nforged"})
        }),
        edited("revision_missing", 422, "missing_revision", &|v| {
            v["metadata"] = json!({})
        }),
        edited("revision_empty", 422, "missing_revision", &|v| {
            v["metadata"] = json!({"revision": ""})
        }),
        // --- other event strings -------------------------------------------------------------
        edited("object_name_257_bytes", 400, "invalid_body", &|v| {
            v["involvedObject"]["name"] = json!("p".repeat(257))
        }),
        edited("object_kind_newline", 400, "invalid_body", &|v| {
            v["involvedObject"]["kind"] = json!("HelmRelease\n")
        }),
        edited("object_namespace_nul", 400, "invalid_body", &|v| {
            v["involvedObject"]["namespace"] = json!("podinfo-dev\u{0}")
        }),
        edited("object_api_version_300_bytes", 400, "invalid_body", &|v| {
            v["involvedObject"]["apiVersion"] = json!(format!("helm.toolkit.fluxcd.io/{}", "v".repeat(280)))
        }),
        edited("reason_300_bytes", 400, "invalid_body", &|v| {
            v["reason"] = json!("R".repeat(300))
        }),
        edited("reason_ansi_escape", 400, "invalid_body", &|v| {
            v["reason"] = json!("UpgradeSucceeded\u{1b}[0m")
        }),
        edited("severity_control_character", 400, "invalid_body", &|v| {
            v["severity"] = json!("info\u{7}")
        }),
        edited("message_over_32_kib", 400, "invalid_body", &|v| {
            v["message"] = json!("m".repeat(32 * 1024 + 1))
        }),
        edited("message_64_kib", 400, "invalid_body", &|v| {
            v["message"] = json!("m".repeat(64 * 1024))
        }),
        // --- pipeline, environment, involved object, time --------------------------------------
        signed(
            "unknown_pipeline_name",
            "/pipelines/promotions/flux-system/nginx/dev",
            ok.clone(),
            404,
            "pipeline_not_found",
        ),
        signed(
            "unknown_pipeline_namespace",
            "/pipelines/promotions/default/podinfo/dev",
            ok.clone(),
            404,
            "pipeline_not_found",
        ),
        Case::new(
            "unknown_pipeline_unsigned",
            "POST",
            "/pipelines/promotions/default/podinfo/dev",
            404,
            "pipeline_not_found",
        )
        .body(ok.clone()),
        signed(
            "unknown_environment",
            "/pipelines/promotions/flux-system/podinfo/qa",
            ok.clone(),
            422,
            "unknown_environment",
        ),
        signed(
            "environment_wrong_case",
            "/pipelines/promotions/flux-system/podinfo/DEV",
            ok.clone(),
            422,
            "unknown_environment",
        ),
        signed(
            "last_environment",
            "/pipelines/promotions/flux-system/podinfo/prod",
            bytes(&flux_event("podinfo-prod", "6.5.1")),
            422,
            "last_environment",
        ),
        edited("object_kind_mismatch", 422, "involved_object_mismatch", &|v| {
            v["involvedObject"]["kind"] = json!("Kustomization")
        }),
        edited("object_name_mismatch", 422, "involved_object_mismatch", &|v| {
            v["involvedObject"]["name"] = json!("nginx")
        }),
        edited("object_namespace_of_other_environment", 422, "involved_object_mismatch", &|v| {
            v["involvedObject"]["namespace"] = json!("podinfo-staging")
        }),
        edited("object_group_mismatch", 422, "involved_object_mismatch", &|v| {
            v["involvedObject"]["apiVersion"] = json!("kustomize.toolkit.fluxcd.io/v1")
        }),
        edited("stale_timestamp_1h", 422, "stale_timestamp", &|v| {
            v["timestamp"] = json!((now - hour).to_rfc3339())
        }),
        edited("stale_timestamp_epoch", 422, "stale_timestamp", &|v| {
            v["timestamp"] = json!("1970-01-01T00:00:00Z")
        }),
        edited("future_timestamp_1h", 422, "future_timestamp", &|v| {
            v["timestamp"] = json!((now + hour).to_rfc3339())
        }),
        edited("future_timestamp_year_9999", 422, "future_timestamp", &|v| {
            v["timestamp"] = json!("9999-12-31T23:59:59Z")
        }),
        // --- router: methods, paths, path decoding ---------------------------------------------------------
        Case::new("get_on_webhook", "GET", DEV, 405, "method_not_allowed"),
        Case::new("put_on_webhook", "PUT", DEV, 405, "method_not_allowed").body(ok.clone()).signed(),
        Case::new("delete_on_webhook", "DELETE", DEV, 405, "method_not_allowed"),
        Case::new("post_on_promotions_list", "POST", "/api/v1/promotions", 405, "method_not_allowed")
            .body(ok.clone()),
        Case::new("delete_promotion_record", "DELETE", "/api/v1/promotions/abc", 405, "method_not_allowed"),
        Case::new("post_on_healthz", "POST", "/healthz", 405, "method_not_allowed"),
        Case::new("unknown_path_root", "GET", "/", 404, "not_found"),
        signed(
            "webhook_missing_environment",
            "/pipelines/promotions/flux-system/podinfo",
            ok.clone(),
            404,
            "not_found",
        ),
        signed(
            "webhook_extra_segment",
            "/pipelines/promotions/flux-system/podinfo/dev/extra",
            ok.clone(),
            404,
            "not_found",
        ),
        signed(
            "path_dot_dot",
            "/pipelines/promotions/../../api/v1/promotions",
            ok.clone(),
            404,
            "not_found",
        ),
        Case::new("unknown_api_version", "GET", "/api/v2/promotions", 404, "not_found"),
        Case::new("promotion_record_unknown", "GET", "/api/v1/promotions/nope", 404, "promotion_not_found"),
        Case::new("promotion_filter_malformed", "GET", "/api/v1/promotions?pipeline=nope", 400, "invalid_filter"),
        signed(
            "path_percent_ff_environment",
            "/pipelines/promotions/flux-system/podinfo/%FF",
            ok.clone(),
            400,
            "invalid_path",
        ),
        signed(
            "path_percent_ff_namespace",
            "/pipelines/promotions/%FF/podinfo/dev",
            ok.clone(),
            400,
            "invalid_path",
        ),
        signed(
            "path_overlong_utf8",
            "/pipelines/promotions/flux-system/podinfo/%C0%AF",
            ok.clone(),
            400,
            "invalid_path",
        ),
        signed(
            "path_percent_ff_alias",
            "/promotion/flux-system/podinfo/%FF",
            ok.clone(),
            400,
            "invalid_path",
        ),
        signed(
            "path_percent_ff_approval_revision",
            "/pipelines/approvals/flux-system/podinfo/prod/%FF",
            good_approval.clone(),
            400,
            "invalid_path",
        ),
        Case::new("path_percent_ff_promotion_id", "GET", "/api/v1/promotions/%FF", 400, "invalid_path"),
        // --- sizes -------------------------------------------------------------------------------
        signed(
            "body_over_limit_content_length",
            DEV,
            vec![b' '; MAX_BODY + 1],
            413,
            "body_too_large",
        ),
        signed("body_over_limit_chunked", DEV, vec![b' '; MAX_BODY + 64 * 1024], 413, "body_too_large")
            .framing(Framing::Chunked),
        Case::new("body_declared_one_terabyte", "POST", DEV, 413, "body_too_large")
            .body(ok.clone())
            .signed()
            .framing(Framing::Declared(1 << 40)),
        Case::new("body_over_limit_unsigned", "POST", DEV, 413, "body_too_large")
            .body(vec![b'{'; MAX_BODY * 2]),
        // --- approvals ----------------------------------------------------------------------------
        Case::new("approval_unsigned", "POST", APPROVE_PROD, 401, "unauthenticated")
            .body(good_approval.clone()),
        Case::new("approval_wrong_key", "POST", APPROVE_PROD, 401, "unauthenticated")
            .body(good_approval.clone())
            .header("X-Signature", sign(HmacAlgorithm::Sha256, b"not-the-key", &good_approval)),
        Case::new("approval_signature_of_other_body", "POST", APPROVE_PROD, 401, "unauthenticated")
            .body(good_approval.clone())
            .header("X-Signature", approval_signature(&approval("6.5.2", now))),
        Case::new("approval_two_signatures", "POST", APPROVE_PROD, 401, "unauthenticated")
            .body(good_approval.clone())
            .signed()
            .header("X-Signature", approval_signature(&good_approval)),
        Case::new("approval_malformed_signature", "POST", APPROVE_PROD, 401, "unauthenticated")
            .body(good_approval.clone())
            .header("X-Signature", "sha256"),
        signed("approval_not_json", APPROVE_PROD, b"approve!".to_vec(), 400, "invalid_body"),
        signed(
            "approval_trailing_garbage",
            APPROVE_PROD,
            {
                let mut body = good_approval.clone();
                body.extend_from_slice(b"{}");
                body
            },
            400,
            "invalid_body",
        ),
        signed("approval_revision_mismatch", APPROVE_PROD, approval("6.5.2", now), 422, "approval_mismatch"),
        signed(
            "approval_pipeline_mismatch",
            APPROVE_PROD,
            approval_body("flux-system/other", "prod", "6.5.1", now),
            422,
            "approval_mismatch",
        ),
        signed(
            "approval_environment_mismatch",
            APPROVE_PROD,
            approval_body("flux-system/podinfo", "staging", "6.5.1", now),
            422,
            "approval_mismatch",
        ),
        signed("approval_stale", APPROVE_PROD, approval("6.5.1", now - hour), 422, "stale_timestamp"),
        signed("approval_future", APPROVE_PROD, approval("6.5.1", now + hour), 422, "future_timestamp"),
        signed("approval_nothing_waiting", APPROVE_PROD, good_approval.clone(), 404, "promotion_not_found"),
        signed(
            "approval_unknown_pipeline",
            "/pipelines/approvals/flux-system/nginx/prod/6.5.1",
            approval_body("flux-system/nginx", "prod", "6.5.1", now),
            404,
            "pipeline_not_found",
        ),
        Case::new("approval_get", "GET", APPROVE_PROD, 405, "method_not_allowed"),
        Case::new(
            "approval_alias_unsigned",
            "POST",
            "/approval/flux-system/podinfo/prod/6.5.1",
            401,
            "unauthenticated",
        )
        .body(good_approval.clone()),
        Case::new(
            "promotion_alias_unsigned",
            "POST",
            "/promotion/flux-system/podinfo/dev",
            401,
            "unauthenticated",
        )
        .body(ok.clone()),
        Case::new("approval_signed_with_webhook_key", "POST", APPROVE_PROD, 401, "unauthenticated")
            .body(good_approval.clone())
            .header("X-Signature", signature(&good_approval)),
        // The Go original's protocol: a signature over an empty body.
        signed("approval_empty_body_legacy", APPROVE_PROD, Vec::new(), 400, "legacy_approval"),
        signed(
            "approval_action_mismatch",
            APPROVE_PROD,
            {
                let mut body: Value = serde_json::from_slice(&good_approval).unwrap();
                body["action"] = json!("reject");
                bytes(&body)
            },
            422,
            "approval_mismatch",
        ),
        signed(
            "approval_by_with_newline",
            APPROVE_PROD,
            {
                let mut body: Value = serde_json::from_slice(&good_approval).unwrap();
                body["by"] = json!("alice\nERROR forged");
                bytes(&body)
            },
            400,
            "invalid_body",
        ),
        Case::new(
            "rejection_unsigned",
            "POST",
            "/pipelines/rejections/flux-system/podinfo/prod/6.5.1",
            401,
            "unauthenticated",
        )
        .body(good_approval.clone()),
        Case::new(
            "retry_signed_with_webhook_key",
            "POST",
            "/pipelines/retries/flux-system/podinfo/prod/6.5.1",
            401,
            "unauthenticated",
        )
        .body(good_approval.clone())
        .header("X-Signature", signature(&good_approval)),
        signed(
            "approval_over_limit",
            APPROVE_PROD,
            vec![b' '; MAX_BODY + 1],
            413,
            "body_too_large",
        ),
    ];
    let names: BTreeSet<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names.len(), cases.len(), "duplicate case names");
    cases
}

// ---------------------------------------------------------------------------------------
// Talking to the service
// ---------------------------------------------------------------------------------------

async fn exchange(address: SocketAddr, case: &Case) -> Result<RawResponse, String> {
    let wire = raw::request(
        case.method,
        &case.target,
        &case.headers,
        &case.body,
        case.framing,
    );
    tokio::task::spawn_blocking(move || raw::exchange(address, wire, Duration::from_secs(20)))
        .await
        .unwrap()
}

/// The answer is `status` with a JSON error body whose `reason` is `reason`.
fn check_error(response: &RawResponse, status: u16, reason: &str) -> Result<(), String> {
    let shown = || {
        let text = response.text();
        let cut: String = text.chars().take(240).collect();
        format!(
            "{} content-type={:?} body={cut:?}",
            response.status,
            response.header("content-type")
        )
    };
    if response.status != status {
        return Err(format!("want {status} {reason}, got {}", shown()));
    }
    if !response
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/json"))
    {
        return Err(format!("not JSON: {}", shown()));
    }
    let Some(body) = response.json() else {
        return Err(format!("body does not parse as JSON: {}", shown()));
    };
    if body["reason"] != reason {
        return Err(format!("want reason {reason}, got {}", shown()));
    }
    if body["error"].as_str().is_none_or(str::is_empty) {
        return Err(format!("no error message: {}", shown()));
    }
    if status == 503 && response.header("retry-after").is_none() {
        return Err(format!("503 without Retry-After: {}", shown()));
    }
    Ok(())
}

async fn record_ids(client: &reqwest::Client, base: &str) -> Result<BTreeSet<String>, String> {
    let response = client
        .get(format!("{base}/api/v1/promotions"))
        .send()
        .await
        .map_err(|e| format!("listing promotions: {e}"))?;
    let listed: Value = response
        .json()
        .await
        .map_err(|e| format!("listing promotions: {e}"))?;
    let records = listed
        .as_array()
        .ok_or_else(|| format!("listing is not an array: {listed}"))?;
    Ok(records
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect())
}

/// A signed POST through reqwest, with the headers the campaign checks.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    content_type: Option<String>,
    text: String,
    body: Value,
}

async fn post_signed(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    signature_header: &str,
) -> Result<Answer, reqwest::Error> {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-signature", signature_header)
        .body(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let retry_after = header("retry-after");
    let content_type = header("content-type");
    let text = response.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Answer {
        status,
        retry_after,
        content_type,
        text,
        body,
    })
}

async fn status_of(client: &reqwest::Client, url: &str) -> Option<u16> {
    client
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

fn short_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Promotion ids in the bodies the receiver got (`metadata.promotion`), with counts.
fn notified(receiver: &Receiver) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for (_, body) in receiver.received.lock().unwrap().iter() {
        let event: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let id = event["metadata"]["promotion"]
            .as_str()
            .unwrap_or("<notification without metadata.promotion>")
            .to_string();
        *seen.entry(id).or_insert(0) += 1;
    }
    seen
}

/// Waits (until `deadline`) for every id in `ids` to be `Succeeded`; returns the ids that
/// are not, with their last phase.
async fn unfinished(
    client: &reqwest::Client,
    base: &str,
    ids: &BTreeSet<String>,
    deadline: Instant,
) -> BTreeMap<String, String> {
    let mut left: BTreeMap<String, String> = ids
        .iter()
        .map(|id| (id.clone(), "unknown".to_string()))
        .collect();
    loop {
        let mut still = BTreeMap::new();
        for (id, _) in left {
            let phase = match client
                .get(format!("{base}/api/v1/promotions/{id}"))
                .send()
                .await
            {
                Ok(response) if response.status().as_u16() == 404 => "missing".to_string(),
                Ok(response) => response
                    .json::<Value>()
                    .await
                    .ok()
                    .and_then(|r| r["phase"].as_str().map(str::to_string))
                    .unwrap_or_else(|| "unreadable".to_string()),
                Err(e) => format!("unreachable: {e}"),
            };
            if phase != "Succeeded" {
                still.insert(id, phase);
            }
        }
        left = still;
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A small linear congruential generator: random enough for jitter, reproducible from
/// the printed seed (`PIPELINE_TEST_SEED`).
struct Lcg(u64);

impl Lcg {
    fn seeded() -> (Lcg, u64) {
        let seed = std::env::var("PIPELINE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        (Lcg(seed), seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

// ---------------------------------------------------------------------------------------
// The catalogue
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_catalogue_is_refused_without_side_effects() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let receiver = Receiver::start(vec![], Duration::ZERO).await;
    let service = Service::start(
        &manifests,
        &dir.path().join("state.redb"),
        &[
            "--notify-url",
            &receiver.url(),
            "--max-body-bytes",
            &MAX_BODY.to_string(),
        ],
    );
    let base = service.internal_url("");
    let client = client();
    let cases = catalogue();
    assert!(cases.len() >= 60, "only {} cases", cases.len());

    let mut failures = Vec::new();
    let mut known = BTreeSet::new();
    for case in &cases {
        let answer = exchange(service.address_for(&case.target), case).await;
        if let Err(problem) = answer.and_then(|r| check_error(&r, case.status, case.reason)) {
            failures.push(format!("{}: {problem}", case.name));
        }
        match record_ids(&client, &base).await {
            Ok(ids) => {
                let new: Vec<&String> = ids.difference(&known).collect();
                if !new.is_empty() {
                    failures.push(format!("{}: left record(s) {new:?}", case.name));
                }
                known = ids;
            }
            Err(e) => failures.push(format!("{}: service unusable afterwards: {e}", case.name)),
        }
    }
    // Give a wrongly recorded promotion time to be executed, then look at the receiver.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let notified = notified(&receiver);
    if !notified.is_empty() {
        failures.push(format!("receiver was notified: {notified:?}"));
    }
    assert!(
        status_of(&client, &service.url("/healthz")).await == Some(200),
        "service not healthy after the catalogue"
    );
    eprintln!(
        "catalogue: {} cases, {} failed",
        cases.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} catalogue cases failed:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
}

/// Failure, rollback and uninstall events are valid and authenticated, but report no new
/// deployment: 200 `ignored` with the documented reason, and no record.
#[tokio::test]
async fn failure_events_are_ignored_without_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let receiver = Receiver::start(vec![], Duration::ZERO).await;
    let service = Service::start(
        &manifests,
        &dir.path().join("state.redb"),
        &["--notify-url", &receiver.url()],
    );
    let set = |severity: &'static str, reason: &'static str, message: &'static str| {
        move |v: &mut Value| {
            v["severity"] = json!(severity);
            v["reason"] = json!(reason);
            if !message.is_empty() {
                v["message"] = json!(message);
            }
        }
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "upgrade_failed_error",
            dev_event(
                "9.0.1",
                set("error", "UpgradeFailed", "Helm upgrade failed"),
            ),
            "not_info_severity",
        ),
        (
            "install_failed_error",
            dev_event("9.0.2", set("error", "InstallFailed", "")),
            "not_info_severity",
        ),
        (
            "success_reason_with_error_severity",
            dev_event("9.0.3", set("error", "UpgradeSucceeded", "")),
            "not_info_severity",
        ),
        (
            "trace_severity",
            dev_event("9.0.4", set("trace", "UpgradeSucceeded", "")),
            "not_info_severity",
        ),
        (
            "upgrade_failed_info",
            dev_event("9.0.5", set("info", "UpgradeFailed", "")),
            "not_a_deployment",
        ),
        (
            "rollback_succeeded",
            dev_event("9.0.6", set("info", "RollbackSucceeded", "")),
            "not_a_deployment",
        ),
        (
            "uninstall_succeeded",
            dev_event("9.0.7", set("info", "UninstallSucceeded", "")),
            "not_a_deployment",
        ),
        (
            "legacy_info_failed",
            dev_event("9.0.8", set("info", "info", "Helm upgrade failed")),
            "not_a_deployment",
        ),
        (
            "reconciliation_failed_without_revision",
            dev_event("9.0.9", |v| {
                v["severity"] = json!("error");
                v["reason"] = json!("ReconciliationFailed");
                v["metadata"] = json!({});
            }),
            "not_info_severity",
        ),
        (
            "reason_256_bytes",
            dev_event("9.0.10", |v| v["reason"] = json!("R".repeat(256))),
            "not_a_deployment",
        ),
    ];
    let mut failures = Vec::new();
    for (name, body, reason) in cases {
        let (status, answer) = post_event(&service, "dev", body).await;
        if status != 200 || answer["status"] != "ignored" || answer["reason"] != reason {
            failures.push(format!(
                "{name}: want 200 ignored {reason}, got {status} {answer}"
            ));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listed = get_json(&service, "/api/v1/promotions").await;
    assert_eq!(listed, json!([]), "ignored events left records");
    assert_eq!(receiver.count(), 0, "ignored events notified");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Computes the `X-Signature` value for a body.
type Signer = Box<dyn Fn(&[u8]) -> String>;

/// What must keep working: other algorithms, uppercase hex and algorithm names, normal
/// Flux revisions, the length limits themselves, trailing whitespace.
#[tokio::test]
async fn legitimate_variants_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let service = Service::start(&manifests, &dir.path().join("state.redb"), &[]);
    let url = service.url(DEV);
    let client = client();
    let sha1 = "0123456789abcdef0123456789abcdef01234567";
    let sha256 = "0123456789abcdef".repeat(4);
    let mut cases: Vec<(String, Vec<u8>, Signer)> = Vec::new();
    let plain = |b: &[u8]| signature(b);
    for (name, revision) in [
        ("semver", "6.5.1".to_string()),
        ("git_branch_sha1", format!("main@sha1:{sha1}")),
        ("oci_digest", format!("sha256:{sha256}")),
        ("semver_build", "v1.2.3+build.4".to_string()),
        ("tag_and_digest", format!("6.5.1@sha256:{sha256}")),
        ("revision_256_bytes", "r".repeat(256)),
    ] {
        cases.push((
            name.to_string(),
            dev_event(&revision, |_| {}),
            Box::new(plain),
        ));
    }
    cases.push((
        "uppercase_hex".into(),
        dev_event("10.0.1", |_| {}),
        Box::new(|b: &[u8]| {
            let s = signature(b);
            format!("sha256={}", hex_of(&s).to_ascii_uppercase())
        }),
    ));
    cases.push((
        "uppercase_algorithm".into(),
        dev_event("10.0.2", |_| {}),
        Box::new(|b: &[u8]| signature(b).replacen("sha256", "SHA256", 1)),
    ));
    for (name, algorithm) in [
        ("sha224", HmacAlgorithm::Sha224),
        ("sha384", HmacAlgorithm::Sha384),
        ("sha512", HmacAlgorithm::Sha512),
    ] {
        cases.push((
            name.into(),
            dev_event(&format!("11.0.{}", cases.len()), |_| {}),
            Box::new(move |b: &[u8]| sign(algorithm, KEY.as_bytes(), b)),
        ));
    }
    cases.push((
        "message_32_kib".into(),
        dev_event("12.0.1", |v| v["message"] = json!("m".repeat(32 * 1024))),
        Box::new(plain),
    ));
    cases.push((
        "trailing_whitespace".into(),
        {
            let mut body = dev_event("12.0.2", |_| {});
            body.extend_from_slice(b" \n\t\r\n");
            body
        },
        Box::new(plain),
    ));
    cases.push((
        "legacy_helm_v2beta1_info_reason".into(),
        dev_event("12.0.3", |v| {
            v["reason"] = json!("info");
            v["message"] = json!("Helm upgrade succeeded");
        }),
        Box::new(plain),
    ));
    cases.push((
        "prefixed_revision_key".into(),
        dev_event("ignored", |v| {
            v["metadata"] = json!({"helm.toolkit.fluxcd.io/revision": "12.0.4"})
        }),
        Box::new(plain),
    ));
    let mut failures = Vec::new();
    let mut revisions = BTreeMap::new();
    for (name, body, signer) in &cases {
        let event: Value = serde_json::from_slice(body.trim_ascii_end()).unwrap();
        let revision = event["metadata"]
            .as_object()
            .and_then(|m| m.values().next())
            .and_then(Value::as_str)
            .unwrap()
            .to_string();
        match post_signed(&client, &url, body.clone(), &signer(body)).await {
            Ok(answer) if answer.status == 202 && answer.body["revision"] == revision.as_str() => {
                revisions.insert(answer.body["id"].as_str().unwrap().to_string(), revision);
            }
            Ok(answer) => failures.push(format!("{name}: got {} {}", answer.status, answer.text)),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let listed = get_json(&service, "/api/v1/promotions").await;
    assert_eq!(listed.as_array().unwrap().len(), cases.len());
}

/// Approvals that are refused leave the waiting promotion waiting; the right one runs it
/// once, and replaying it changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_approvals_leave_the_waiting_promotion_alone() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let receiver = Receiver::start(vec![], Duration::ZERO).await;
    let service = Service::start(
        &manifests,
        &dir.path().join("state.redb"),
        &["--notify-url", &receiver.url()],
    );
    let (status, record) = post_event(
        &service,
        "staging",
        bytes(&flux_event("podinfo-staging", "6.5.1")),
    )
    .await;
    assert_eq!(status, 202, "{record}");
    assert_eq!(record["phase"], "WaitingApproval");
    let id = record["id"].as_str().unwrap().to_string();
    let history = record["history"].as_array().unwrap().len();

    let now = Utc::now();
    let body = approval_body("flux-system/podinfo", "prod", "6.5.1", now);
    let good = approval_signature(&body);
    let refused = vec![
        Case::new("unsigned", "POST", APPROVE_PROD, 401, "unauthenticated").body(body.clone()),
        Case::new("wrong_key", "POST", APPROVE_PROD, 401, "unauthenticated")
            .body(body.clone())
            .header("X-Signature", sign(HmacAlgorithm::Sha256, b"nope", &body)),
        Case::new(
            "signature_of_other_body",
            "POST",
            APPROVE_PROD,
            401,
            "unauthenticated",
        )
        .body(body.clone())
        .header(
            "X-Signature",
            approval_signature(&approval_body("flux-system/podinfo", "prod", "6.5.2", now)),
        ),
        Case::new(
            "two_valid_signatures",
            "POST",
            APPROVE_PROD,
            401,
            "unauthenticated",
        )
        .body(body.clone())
        .header("X-Signature", &good)
        .header("X-Signature", &good),
        Case::new(
            "valid_and_invalid_signature",
            "POST",
            APPROVE_PROD,
            401,
            "unauthenticated",
        )
        .body(body.clone())
        .header("X-Signature", "sha256=00")
        .header("X-Signature", &good),
        signed(
            "trailing_garbage",
            APPROVE_PROD,
            {
                let mut b = body.clone();
                b.extend_from_slice(b"\0");
                b
            },
            400,
            "invalid_body",
        ),
        signed(
            "revision_mismatch",
            APPROVE_PROD,
            approval_body("flux-system/podinfo", "prod", "6.5.2", now),
            422,
            "approval_mismatch",
        ),
        signed(
            "stale",
            APPROVE_PROD,
            approval_body(
                "flux-system/podinfo",
                "prod",
                "6.5.1",
                now - chrono::Duration::hours(2),
            ),
            422,
            "stale_timestamp",
        ),
        signed(
            "other_environment",
            "/pipelines/approvals/flux-system/podinfo/staging/6.5.1",
            approval_body("flux-system/podinfo", "staging", "6.5.1", now),
            404,
            "promotion_not_found",
        ),
        signed(
            "over_limit",
            APPROVE_PROD,
            vec![b' '; MAX_BODY + 1],
            413,
            "body_too_large",
        ),
    ];
    let mut failures = Vec::new();
    for case in &refused {
        if let Err(problem) = exchange(service.address_for(&case.target), case)
            .await
            .and_then(|r| check_error(&r, case.status, case.reason))
        {
            failures.push(format!("{}: {problem}", case.name));
        }
        let current = get_json(&service, &format!("/api/v1/promotions/{id}")).await;
        if current["phase"] != "WaitingApproval"
            || current["history"].as_array().unwrap().len() != history
        {
            failures.push(format!("{}: record changed: {current}", case.name));
        }
    }
    assert_eq!(receiver.count(), 0, "a refused approval ran the promotion");

    let accepted = signed("valid", APPROVE_PROD, body.clone(), 200, "");
    let answer = exchange(service.address_for(&accepted.target), &accepted)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    wait_for(&service, &id, "Succeeded", |r| r["phase"] == "Succeeded").await;
    // The captured approval replayed: a conflict, and nothing runs again.
    let replay = exchange(service.address_for(&accepted.target), &accepted)
        .await
        .unwrap();
    if let Err(problem) = check_error(&replay, 409, "not_waiting_approval") {
        failures.push(format!("replayed approval: {problem}"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        notified(&receiver).get(&id),
        Some(&1),
        "{:?}",
        notified(&receiver)
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Connections: 413 while sending, slowloris, timeouts
// ---------------------------------------------------------------------------------------

/// A client still sending a 2 MiB body reads the 413 answer instead of a reset: with a
/// declared length, and chunked (where the limit is only found while reading).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_still_being_sent_gets_413_not_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let service = Service::start(
        &manifests,
        &dir.path().join("state.redb"),
        &["--max-body-bytes", &MAX_BODY.to_string()],
    );
    let mut body = b"{\"message\":\"".to_vec();
    body.resize(2 * 1024 * 1024, b'a');
    let mut failures = Vec::new();
    for framing in [Framing::Length, Framing::Chunked] {
        for attempt in 0..3 {
            let case = Case::new("two_mib", "POST", DEV, 413, "body_too_large")
                .body(body.clone())
                .signed()
                .framing(framing);
            // Sent in one go from a second thread, without waiting for the answer first.
            if let Err(problem) = exchange(service.address_for(&case.target), &case)
                .await
                .and_then(|r| check_error(&r, 413, "body_too_large"))
            {
                failures.push(format!("{framing:?} attempt {attempt}: {problem}"));
            }
        }
    }
    // Slowly: 64 KiB every 20 ms, so the answer arrives while the body is still coming.
    let address = service.address;
    let slow = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(address).unwrap();
        let sig = signature(&body);
        let head = format!(
            "POST {DEV} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Signature: {sig}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            for piece in body.chunks(64 * 1024) {
                if writer.write_all(piece).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let answer = raw::read_response(&mut stream, Duration::from_secs(20));
        drop(stream);
        let _ = sender.join();
        answer
    })
    .await
    .unwrap();
    if let Err(problem) = slow.and_then(|r| check_error(&r, 413, "body_too_large")) {
        failures.push(format!("slow sender: {problem}"));
    }
    assert_eq!(get_json(&service, "/api/v1/promotions").await, json!([]));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// 300 connections that never finish their request line, and more arriving all the time,
/// against a process allowed 256 open files and 100 connections: health checks and the
/// webhook keep answering, and the process does not spin on EMFILE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_starve_health_checks_or_the_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let mut command = Command::new("prlimit");
    command
        .arg("--nofile=256:256")
        .arg("--")
        .arg(BIN)
        .args(serve_args(
            &manifests,
            &dir.path().join("state.redb"),
            &["--header-read-timeout", "2s", "--max-connections", "100"],
        ))
        .env("RUST_LOG", "info");
    let mut service = Service::spawn(command, Duration::from_secs(30));
    let address = service.address;

    let partial: [&[u8]; 3] = [
        b"GET /healthz HT",
        b"POST /pipelines/promotions/flux-system/podinfo/dev HTTP/1.1\r\nHost: x\r\nContent-Len",
        b"G",
    ];
    let open = move |count: usize| {
        let mut held = Vec::new();
        let mut refused = 0;
        for i in 0..count {
            match TcpStream::connect_timeout(&address, Duration::from_secs(2)) {
                Ok(mut stream) => {
                    let _ = stream.write_all(partial[i % partial.len()]);
                    held.push(stream);
                }
                Err(_) => refused += 1,
            }
        }
        (held, refused)
    };
    let (first, refused) = tokio::task::spawn_blocking(move || open(300))
        .await
        .unwrap();
    eprintln!(
        "slowloris: {} connections open, {refused} refused",
        first.len()
    );

    // More attackers keep arriving while the checks run (bounded: 40 every 250 ms, 10 s).
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let attacker = {
        let stop = stop.clone();
        let opened = opened.clone();
        std::thread::spawn(move || {
            let mut all = Vec::new();
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(10) {
                let (held, _) = open(40);
                opened.fetch_add(held.len(), Ordering::Relaxed);
                all.push(held);
                std::thread::sleep(Duration::from_millis(250));
            }
            all
        })
    };

    // Five rounds, 500 ms apart, while the attack goes on: each round's health check and
    // signed event must succeed within 10 s (retrying every 200 ms on new connections).
    let client = short_client(Duration::from_secs(3));
    let mut rounds = Vec::new();
    let mut failures = Vec::new();
    for round in 0..5 {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut health_tries = 0;
        let mut healthy = false;
        while Instant::now() < deadline {
            health_tries += 1;
            if status_of(&client, &service.url("/healthz")).await == Some(200) {
                healthy = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut webhook_tries = 0;
        let mut accepted = false;
        let mut last = String::new();
        while healthy && Instant::now() < deadline {
            webhook_tries += 1;
            let body = bytes(&flux_event("podinfo-dev", &format!("6.6.{round}")));
            let sig = signature(&body);
            match post_signed(&client, &service.url(DEV), body, &sig).await {
                Ok(answer) if answer.status == 202 || answer.status == 200 => {
                    accepted = true;
                    break;
                }
                Ok(answer) => last = format!("{} {}", answer.status, answer.text),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !healthy {
            failures.push(format!(
                "round {round}: /healthz never answered 200 within 10 s"
            ));
        } else if !accepted {
            failures.push(format!(
                "round {round}: the webhook never accepted the event within 10 s; last: {last}"
            ));
        }
        rounds.push((health_tries, webhook_tries));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let extra = attacker.join().unwrap();
    eprintln!(
        "slowloris: {} more connections opened during the checks; (healthz, webhook) tries per round: {rounds:?}",
        opened.load(Ordering::Relaxed)
    );
    drop(first);
    drop(extra);

    let alive = service.child.try_wait().unwrap().is_none();
    let logs = service.logs();
    let emfile = logs.matches("Too many open files").count();
    service.kill9();
    assert!(alive, "the service died under the slowloris");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(emfile <= 1, "\"Too many open files\" logged {emfile} times");
}

/// `--header-read-timeout` closes connections that do not finish their headers (also when
/// they trickle bytes), `--idle-timeout` closes idle keep-alive connections, and the default
/// header timeout is 10 s.
#[test]
fn header_read_and_idle_timeouts_close_connections() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let service = Service::start(
        &manifests,
        &dir.path().join("state.redb"),
        &["--header-read-timeout", "1s", "--idle-timeout", "2s"],
    );
    let defaults_dir = tempfile::tempdir().unwrap();
    let defaults_manifests = copy_quickstart(defaults_dir.path());
    let defaults = Service::start(
        &defaults_manifests,
        &defaults_dir.path().join("state.redb"),
        &[],
    );
    let default_address = defaults.address;
    let default_check = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(default_address).unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        raw::wait_closed(&mut stream, Duration::from_secs(16))
    });

    let mut failures = Vec::new();
    // Partial headers, then silence.
    let mut silent = TcpStream::connect(service.address).unwrap();
    silent
        .write_all(b"POST /pipelines/promotions/flux-system/podinfo/dev HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    match raw::wait_closed(&mut silent, Duration::from_secs(6)) {
        Ok(after) => eprintln!("silent connection closed after {after:?}"),
        Err(e) => failures.push(format!("partial headers: {e}")),
    }
    // Partial headers trickled one byte every 300 ms: the timeout is for all headers.
    let mut trickle = TcpStream::connect(service.address).unwrap();
    trickle.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    let mut writer = trickle.try_clone().unwrap();
    let trickler = std::thread::spawn(move || {
        for byte in b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
            if writer.write_all(&[*byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    match raw::wait_closed(&mut trickle, Duration::from_secs(6)) {
        Ok(after) => eprintln!("trickling connection closed after {after:?}"),
        Err(e) => failures.push(format!("trickled headers: {e}")),
    }
    let _ = trickler.join();
    // Idle keep-alive connection: one request answered, reusable for a moment, then closed.
    let mut idle = TcpStream::connect(service.address).unwrap();
    let get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    idle.write_all(get).unwrap();
    let first = raw::read_response(&mut idle, Duration::from_secs(5));
    if first.as_ref().map(|r| r.status) != Ok(200) {
        failures.push(format!("keep-alive request: {first:?}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    idle.write_all(get).unwrap();
    let second = raw::read_response(&mut idle, Duration::from_secs(5));
    if second.as_ref().map(|r| r.status) != Ok(200) {
        failures.push(format!(
            "keep-alive connection not reusable within the idle timeout: {second:?}"
        ));
    }
    match raw::wait_closed(&mut idle, Duration::from_secs(8)) {
        Ok(after) if after >= Duration::from_millis(1000) => {
            eprintln!("idle connection closed after {after:?}")
        }
        Ok(after) => failures.push(format!("idle connection closed too early ({after:?})")),
        Err(e) => failures.push(format!("idle connection: {e}")),
    }
    match default_check.join().unwrap() {
        Ok(after) if after >= Duration::from_secs(5) => {
            eprintln!("default header timeout closed after {after:?}")
        }
        Ok(after) => failures.push(format!("default header timeout fired after only {after:?}")),
        Err(e) => failures.push(format!("default header timeout: {e}")),
    }
    drop(defaults);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Crashes, disks, state files
// ---------------------------------------------------------------------------------------

/// Rounds of: many concurrent signed events, kill -9 at a random moment, restart on the
/// same state file. Every acknowledged promotion survives, succeeds, and reaches the
/// receiver at least once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_keeps_every_acknowledged_promotion() {
    const ROUNDS: usize = 6;
    const EVENTS: usize = 240;
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let state = dir.path().join("state.redb");
    let receiver = Receiver::start(vec![], Duration::from_millis(5)).await;
    let (mut rng, seed) = Lcg::seeded();
    eprintln!("kill -9 campaign seed {seed} (PIPELINE_TEST_SEED to repeat)");
    // Hundreds of promotions of one pipeline and environment: keep them all (the default
    // retention keeps the newest 100 finished ones, and every restart sweeps), so what is
    // checked is durability, not the retention policy.
    let extra = [
        "--notify-url",
        &receiver.url(),
        "--retry-base",
        "100ms",
        "--retry-max",
        "1s",
        "--retention-per-environment",
        "0",
    ];
    let started = Instant::now();
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let mut unexpected = Vec::new();
    for round in 0..ROUNDS {
        let mut service = Service::start(&manifests, &state, &extra);
        let base = service.url("");
        let client = client();
        let mut tasks = Vec::new();
        for i in 0..EVENTS {
            let revision = format!("{round}.{i}.0");
            let body = bytes(&flux_event("podinfo-dev", &revision));
            let (client, base) = (client.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                (revision, try_post_event(&client, &base, "dev", body).await)
            }));
        }
        let delay = Duration::from_millis(20 + rng.below(200));
        tokio::time::sleep(delay).await;
        service.kill9();
        let mut answered = 0;
        for task in tasks {
            let (revision, result) = task.await.unwrap();
            match result {
                Ok((202 | 200, record)) if record["revision"] == revision.as_str() => {
                    answered += 1;
                    acked.insert(record["id"].as_str().unwrap().to_string(), revision);
                }
                Ok((status, body)) => unexpected.push(format!("{revision}: {status} {body}")),
                Err(_) => {}
            }
        }
        eprintln!("round {round}: killed after {delay:?}, {answered}/{EVENTS} acknowledged");
    }
    let service = Service::start(&manifests, &state, &extra);
    let base = service.internal_url("");
    let client = client();
    let ids: BTreeSet<String> = acked.keys().cloned().collect();
    assert!(
        !ids.is_empty(),
        "no event was acknowledged in {ROUNDS} rounds"
    );
    let left = unfinished(
        &client,
        &base,
        &ids,
        Instant::now() + Duration::from_secs(40),
    )
    .await;
    let seen = notified(&receiver);
    let never_notified: Vec<&String> = ids.iter().filter(|id| !seen.contains_key(*id)).collect();
    let records = record_ids(&client, &base).await.unwrap();
    let phantom: Vec<&String> = seen.keys().filter(|id| !records.contains(*id)).collect();
    let repeated = seen.values().filter(|n| **n > 1).count();
    eprintln!(
        "kill -9 campaign: {} acknowledged, {} records, {} notified ({repeated} more than once), {:?}",
        ids.len(),
        records.len(),
        seen.len(),
        started.elapsed()
    );
    assert!(unexpected.is_empty(), "unexpected answers: {unexpected:?}");
    assert!(
        left.is_empty(),
        "acknowledged promotions not Succeeded: {left:?}"
    );
    assert!(
        never_notified.is_empty(),
        "acknowledged but never notified: {never_notified:?}"
    );
    assert!(
        phantom.is_empty(),
        "notified promotions that are not records: {phantom:?}"
    );
    for (id, revision) in &acked {
        let record = get_json(&service, &format!("/api/v1/promotions/{id}")).await;
        assert_eq!(record["revision"], revision.as_str(), "{record}");
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn unprivileged_allowed() -> bool {
    std::env::var("PIPELINE_TEST_UNPRIVILEGED").as_deref() == Ok("1")
}

/// A tmpfs mounted for the test; unmounted when dropped, also on panic.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Writes zeros to `path` until the file system is full; the bytes written.
fn fill_until_enospc(path: &Path) -> Result<u64, String> {
    let mut file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    // At most 64 MiB: far above the 8 MiB file system.
    for _ in 0..1024 {
        match file.write(&chunk) {
            Ok(0) => return Ok(written),
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => return Ok(written),
            Err(e) => return Err(format!("filling: {e}")),
        }
    }
    Err(format!("wrote {written} bytes without ENOSPC"))
}

/// The state file's disk fills up: events are refused with 503 + Retry-After and /readyz
/// is 503, the warnings are rate limited; once space is freed the service recovers by
/// itself, and no acknowledged promotion is lost or executed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_then_freed_recovers_without_restart_or_loss() {
    if !running_as_root() {
        if unprivileged_allowed() {
            eprintln!(
                "SKIPPED disk_full_then_freed_recovers_without_restart_or_loss: not root and PIPELINE_TEST_UNPRIVILEGED=1"
            );
            return;
        }
        panic!(
            "disk_full_then_freed_recovers_without_restart_or_loss mounts a tmpfs and needs root; \
             run the tests as root, or set PIPELINE_TEST_UNPRIVILEGED=1 to skip it explicitly"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    // Declared before the service, so the service is killed before the unmount.
    let mount = match Tmpfs::mount(&dir.path().join("small"), "8m") {
        Ok(mount) => mount,
        Err(e) if unprivileged_allowed() => {
            eprintln!("SKIPPED disk_full_then_freed_recovers_without_restart_or_loss: {e}");
            return;
        }
        Err(e) => panic!(
            "cannot mount the tmpfs this test needs ({e}); set PIPELINE_TEST_UNPRIVILEGED=1 to skip it"
        ),
    };
    let state = mount.path.join("state.redb");
    let receiver = Receiver::start(vec![], Duration::from_millis(50)).await;
    let mut command = serve_command(
        &manifests,
        &state,
        &[
            "--notify-url",
            &receiver.url(),
            "--retry-base",
            "100ms",
            "--retry-max",
            "1s",
        ],
    );
    command.env("RUST_LOG", "info");
    let service = Service::spawn(command, Duration::from_secs(30));
    let base = service.internal_url("");
    let events_url = service.url(DEV);
    let ready_url = service.url("/readyz");
    let client = short_client(Duration::from_secs(5));
    let mut acked: BTreeMap<String, String> = BTreeMap::new(); // revision → id
    let mut unknown: BTreeSet<String> = BTreeSet::new();
    let mut failures: Vec<String> = Vec::new();
    let mut n = 0;
    let send = async |n: &mut usize,
                      acked: &mut BTreeMap<String, String>,
                      unknown: &mut BTreeSet<String>|
           -> Option<Answer> {
        *n += 1;
        let revision = format!("1.0.{n}");
        let body = bytes(&flux_event("podinfo-dev", &revision));
        let sig = signature(&body);
        match post_signed(&client, &events_url, body, &sig).await {
            Ok(answer) => {
                if answer.status == 202 || answer.status == 200 {
                    acked.insert(
                        revision,
                        answer.body["id"].as_str().unwrap_or("").to_string(),
                    );
                }
                Some(answer)
            }
            Err(_) => {
                unknown.insert(revision);
                None
            }
        }
    };

    // Healthy: a batch accepted, whose attempts are still running when the disk fills.
    for _ in 0..12 {
        let answer = send(&mut n, &mut acked, &mut unknown).await;
        assert_eq!(
            answer.as_ref().map(|a| a.status),
            Some(202),
            "before the disk filled"
        );
    }
    let fill = mount.path.join("fill");
    let filled = fill_until_enospc(&fill).unwrap();
    eprintln!("disk filled with {filled} bytes");

    // Ten seconds of a full disk: an event every 50 ms, /readyz every 250 ms.
    let log_lines_before = service.logs().lines().count();
    let episode = Instant::now();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut first_503: Option<Duration> = None;
    let mut readyz_503 = false;
    let mut probes = 0;
    while episode.elapsed() < Duration::from_secs(10) {
        if let Some(answer) = send(&mut n, &mut acked, &mut unknown).await {
            *statuses.entry(answer.status).or_insert(0) += 1;
            match answer.status {
                202 | 200 => {}
                503 => {
                    first_503.get_or_insert(episode.elapsed());
                    if answer.body["reason"] != "unavailable"
                        || answer.retry_after.is_none()
                        || !answer
                            .content_type
                            .as_deref()
                            .is_some_and(|t| t.starts_with("application/json"))
                    {
                        failures.push(format!(
                            "503 without reason unavailable / Retry-After / JSON: {}",
                            answer.text
                        ));
                    }
                }
                other => failures.push(format!("disk full: unexpected {other} {}", answer.text)),
            }
        }
        probes += 1;
        if probes % 5 == 0
            && first_503.is_some()
            && status_of(&client, &ready_url).await == Some(503)
        {
            readyz_503 = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let episode_log: Vec<String> = service
        .logs()
        .lines()
        .skip(log_lines_before)
        .map(str::to_string)
        .collect();
    let episode_lines = episode_log.len();
    // Which messages those lines were: level and message, without the fields.
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for line in &episode_log {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        let kind: Vec<&str> = words
            .iter()
            .take_while(|w| !w.contains('='))
            .take(6)
            .copied()
            .collect();
        *kinds.entry(kind.join(" ")).or_insert(0) += 1;
    }
    eprintln!(
        "disk full for 10 s: answers {statuses:?}, first 503 after {first_503:?}, {episode_lines} log lines: {kinds:#?}"
    );
    if first_503.is_none() {
        failures.push(format!("no 503 in 10 s of a full disk: {statuses:?}"));
    }
    if !readyz_503 {
        failures.push("/readyz never answered 503 while writes failed".into());
    }
    if episode_lines >= 200 {
        failures.push(format!(
            "{episode_lines} log lines in 10 s of a full disk: {kinds:#?}"
        ));
    }
    // README: the storage failure "is logged once when it starts, then at most every
    // 30 s", and the executor backs off as a whole; so in 10 s of one full disk only a
    // handful of warnings and errors, however many requests and attempts failed.
    let alarms: Vec<&String> = episode_log
        .iter()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    if alarms.len() > 10 {
        failures.push(format!(
            "{} warnings/errors in 10 s of one full disk (expected a handful); the first: {:#?}",
            alarms.len(),
            &alarms[..4]
        ));
    }

    // Space again: ready and accepting within a few seconds, without a restart.
    std::fs::remove_file(&fill).unwrap();
    let freed = Instant::now();
    let mut ready_after = None;
    while freed.elapsed() < Duration::from_secs(10) {
        if status_of(&client, &ready_url).await == Some(200) {
            ready_after = Some(freed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut accepted_after = None;
    let mut last = String::new();
    while freed.elapsed() < Duration::from_secs(12) {
        match send(&mut n, &mut acked, &mut unknown).await {
            Some(answer) if answer.status == 202 => {
                accepted_after = Some(freed.elapsed());
                break;
            }
            Some(answer) => last = format!("{} {}", answer.status, answer.text),
            None => last = "no answer".into(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("space freed: ready after {ready_after:?}, event accepted after {accepted_after:?}");
    if ready_after.is_none() {
        failures.push("/readyz not 200 within 10 s of freeing space".into());
    }
    if accepted_after.is_none() {
        failures.push(format!(
            "no event accepted within 12 s of freeing space; last: {last}"
        ));
    }

    // Nothing acknowledged lost; nothing executed twice; nothing refused was recorded.
    let ids: BTreeSet<String> = acked.values().cloned().collect();
    let left = unfinished(
        &client,
        &base,
        &ids,
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    if !left.is_empty() {
        failures.push(format!("acknowledged promotions not Succeeded: {left:?}"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    match client.get(format!("{base}/api/v1/promotions")).send().await {
        Ok(response) => {
            let listed: Value = response.json().await.unwrap_or(Value::Null);
            let records: BTreeMap<String, String> = listed
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    (
                        r["revision"].as_str().unwrap_or("").to_string(),
                        r["id"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect();
            for (revision, id) in &acked {
                if records.get(revision) != Some(id) {
                    failures.push(format!(
                        "acknowledged {revision} ({id}) missing from the store"
                    ));
                }
            }
            for revision in records.keys() {
                if !acked.contains_key(revision) && !unknown.contains(revision) {
                    failures.push(format!("refused event {revision} was recorded anyway"));
                }
            }
        }
        Err(e) => failures.push(format!("listing after recovery: {e}")),
    }
    let seen = notified(&receiver);
    for id in &ids {
        match seen.get(id) {
            Some(1) => {}
            Some(k) => failures.push(format!("{id} notified {k} times")),
            None => failures.push(format!("{id} never notified")),
        }
    }
    for (id, k) in &seen {
        if !ids.contains(id) && *k > 1 {
            failures.push(format!("unacknowledged {id} notified {k} times"));
        }
    }
    drop(service);
    drop(mount);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A zero-byte state file (e.g. a volume that lost its data) is refused, naming the file
/// and the flag that allows starting empty; with `--init-empty-state` it starts.
#[tokio::test]
async fn zero_byte_state_file_is_refused_unless_init_empty_state() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let state = dir.path().join("state.redb");
    std::fs::File::create(&state).unwrap();

    let mut child = serve_command(&manifests, &state, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = reader.join().unwrap();
    let status = status.unwrap_or_else(|| {
        panic!("serve kept running on a zero-byte state file for 20 s; stderr:\n{stderr}")
    });
    assert!(!status.success(), "serve exited successfully: {stderr}");
    assert!(
        stderr.contains(&state.display().to_string()) && stderr.contains("--init-empty-state"),
        "the refusal must name the file and --init-empty-state:\n{stderr}"
    );
    assert_eq!(
        std::fs::metadata(&state).unwrap().len(),
        0,
        "the refused file was modified"
    );

    let mut service = Service::start(&manifests, &state, &["--init-empty-state"]);
    assert_eq!(get_json(&service, "/api/v1/promotions").await, json!([]));
    let (status, record) =
        post_event(&service, "dev", bytes(&flux_event("podinfo-dev", "6.5.1"))).await;
    assert_eq!(status, 202, "{record}");
    service.kill9();
    // The flag only allows an empty file: a store with data is opened as it is.
    let service = Service::start(&manifests, &state, &["--init-empty-state"]);
    let listed = get_json(&service, "/api/v1/promotions").await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
}

// ---------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------

/// At trace level, with valid and refused events and an approval flow: the key and every
/// signature sent never show in logs, answers, metrics, records or notifications.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_leave_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = copy_quickstart(dir.path());
    let receiver = Receiver::start(vec![], Duration::ZERO).await;
    let mut command = serve_command(
        &manifests,
        &dir.path().join("state.redb"),
        &["--notify-url", &receiver.url()],
    );
    command.env("RUST_LOG", "trace");
    let service = Service::spawn(command, Duration::from_secs(30));
    let client = client();
    let mut sent: Vec<String> = Vec::new();
    let mut answers = String::new();
    let mut post = async |path: &str, body: Vec<u8>, header: String| -> Answer {
        sent.push(hex_of(&header).to_string());
        let answer = post_signed(&client, &service.url(path), body, &header)
            .await
            .unwrap();
        answers.push_str(&format!(
            "{} {:?} {:?} {}\n",
            answer.status, answer.retry_after, answer.content_type, answer.text
        ));
        answer
    };

    let dev = bytes(&flux_event("podinfo-dev", "6.5.1"));
    let answer = post(DEV, dev.clone(), signature(&dev)).await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    let dev_id = answer.body["id"].as_str().unwrap().to_string();
    // Refused: wrong key, signature of another body, truncated, two algorithms.
    let refused = bytes(&flux_event("podinfo-dev", "6.5.2"));
    let other = bytes(&flux_event("podinfo-dev", "6.5.3"));
    for header in [
        sign(HmacAlgorithm::Sha256, b"wrong-key", &refused),
        signature(&other),
        signature(&refused)[..40].to_string(),
        sign(HmacAlgorithm::Sha512, b"wrong-key", &refused),
    ] {
        let answer = post(DEV, refused.clone(), header).await;
        assert_eq!(answer.status, 401, "{}", answer.text);
    }
    // Approval flow: staging → prod waits; a wrong approval, then the right one.
    let staging = bytes(&flux_event("podinfo-staging", "6.5.1"));
    let answer = post(STAGING, staging.clone(), signature(&staging)).await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    let prod_id = answer.body["id"].as_str().unwrap().to_string();
    let approval = approval_body("flux-system/podinfo", "prod", "6.5.1", Utc::now());
    let answer = post(
        APPROVE_PROD,
        approval.clone(),
        sign(HmacAlgorithm::Sha256, b"wrong-key", &approval),
    )
    .await;
    assert_eq!(answer.status, 401, "{}", answer.text);
    let answer = post(
        APPROVE_PROD,
        approval.clone(),
        sign(HmacAlgorithm::Sha256, KEY.as_bytes(), &approval),
    )
    .await;
    assert_eq!(
        answer.status, 401,
        "approval signed with the webhook key: {}",
        answer.text
    );
    let answer = post(
        APPROVE_PROD,
        approval.clone(),
        approval_signature(&approval),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    wait_for(&service, &dev_id, "Succeeded", |r| {
        r["phase"] == "Succeeded"
    })
    .await;
    wait_for(&service, &prod_id, "Succeeded", |r| {
        r["phase"] == "Succeeded"
    })
    .await;

    let mut surfaces: Vec<(&str, String)> = vec![("answers", answers)];
    for path in [
        "/metrics".to_string(),
        "/api/v1/promotions".to_string(),
        format!("/api/v1/promotions/{dev_id}"),
        format!("/api/v1/promotions/{prod_id}"),
        "/healthz".to_string(),
        "/readyz".to_string(),
    ] {
        let text = client
            .get(service.url(&path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        surfaces.push(("GET answers", text));
    }
    let mut notifications = String::new();
    for (headers, body) in receiver.received.lock().unwrap().iter() {
        for (name, value) in headers {
            if name != "x-signature" {
                notifications.push_str(&format!("{name}: {value:?}\n"));
            }
        }
        notifications.push_str(&String::from_utf8_lossy(body));
        notifications.push('\n');
    }
    assert_eq!(receiver.count(), 2, "{notifications}");
    surfaces.push(("notifications", notifications));
    let logs = service.logs();
    assert!(
        logs.contains("promotion recorded") && logs.contains(" TRACE "),
        "trace logging is not on:\n{logs}"
    );
    surfaces.push(("logs", logs));

    let key_hex: String = KEY.bytes().map(|b| format!("{b:02x}")).collect();
    let mut needles: Vec<(String, String)> = vec![
        ("the HMAC key".into(), KEY.to_string()),
        ("the HMAC key in hex".into(), key_hex),
        ("the approval key".into(), APPROVAL_KEY.to_string()),
    ];
    for hex in &sent {
        needles.push((
            format!("signature {}…", &hex[..8.min(hex.len())]),
            hex.clone(),
        ));
        if hex.len() >= 32 {
            needles.push((
                "a signature's first 16 hex digits".into(),
                hex[..16].to_string(),
            ));
            needles.push((
                "a signature's last 16 hex digits".into(),
                hex[hex.len() - 16..].to_string(),
            ));
        }
    }
    let mut leaks = Vec::new();
    for (surface, text) in &surfaces {
        let lower = text.to_ascii_lowercase();
        for (what, needle) in &needles {
            if lower.contains(&needle.to_ascii_lowercase()) {
                leaks.push(format!("{what} appears in {surface}"));
            }
        }
    }
    assert!(leaks.is_empty(), "{}", leaks.join("\n"));
}
