//! Fuzz-style property tests, bounded for CI: the event decoder and the signature check
//! take attacker-controlled bytes before anything else looks at them, so they must never
//! panic, and only the exact signature may verify.
#![allow(clippy::unwrap_used)]

use pipeline_core::event::FluxEvent;
use pipeline_core::signature::{HmacAlgorithm, SignatureError, sign, verify};
use proptest::prelude::*;

const VALID: &str = r#"{"involvedObject":{"kind":"HelmRelease","namespace":"podinfo-dev","name":"podinfo","uid":"57c3579b","apiVersion":"helm.toolkit.fluxcd.io/v2","resourceVersion":"155540"},"severity":"info","timestamp":"2024-09-13T16:01:01Z","message":"Helm upgrade succeeded for release podinfo-dev/podinfo.v2 with chart podinfo@6.5.1","reason":"UpgradeSucceeded","metadata":{"revision":"6.5.1","summary":"x","helm.toolkit.fluxcd.io/revision":"6.5.1"},"reportingController":"helm-controller","reportingInstance":"helm-controller-7cdc7874f8-9qpft"}"#;

const ALGORITHMS: [HmacAlgorithm; 4] = [
    HmacAlgorithm::Sha224,
    HmacAlgorithm::Sha256,
    HmacAlgorithm::Sha384,
    HmacAlgorithm::Sha512,
];

/// Decodes and, when that works, uses everything the intake uses; none of it may panic.
fn exercise(body: &[u8]) -> bool {
    match FluxEvent::from_json(body) {
        Ok(event) => {
            let _ = event.revision();
            let _ = event.outcome();
            let _ = serde_json::to_vec(&event).unwrap();
            true
        }
        Err(message) => {
            assert!(!message.is_empty());
            false
        }
    }
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, byte: u8 },
    Delete { at: usize, len: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Duplicate { at: usize, len: usize },
    Truncate { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting = proptest::sample::select(vec![
        b'{', b'}', b'[', b']', b'"', b'\\', b':', b',', b'0', b'-', b'e', b'n', b't', b'f', b' ',
        0, 0x1b, 0x7f, 0xff, 0xc0, 0xe2, b'\n',
    ]);
    prop_oneof![
        (any::<usize>(), 0..8u8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), interesting.clone()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (any::<usize>(), 1..16usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), proptest::collection::vec(interesting, 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1..64usize).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn apply(body: &mut Vec<u8>, mutation: &Mutation) {
    let len = body.len();
    let pos = |at: usize| if len == 0 { 0 } else { at % (len + 1) };
    match mutation {
        Mutation::Flip { at, bit } if len > 0 => body[at % len] ^= 1 << bit,
        Mutation::Set { at, byte } if len > 0 => body[at % len] = *byte,
        Mutation::Delete { at, len: n } => {
            let start = pos(*at);
            let end = (start + n).min(len);
            body.drain(start..end);
        }
        Mutation::Insert { at, bytes } => {
            let start = pos(*at);
            body.splice(start..start, bytes.iter().copied());
        }
        Mutation::Duplicate { at, len: n } => {
            let start = pos(*at);
            let end = (start + n).min(len);
            let copy = body[start..end].to_vec();
            body.splice(end..end, copy);
        }
        Mutation::Truncate { at } => body.truncate(pos(*at)),
        _ => {}
    }
}

/// JSON-ish noise: tokens that drive a JSON parser into its corners.
fn json_noise() -> impl Strategy<Value = Vec<u8>> {
    let tokens = proptest::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        "\"",
        "\"involvedObject\"",
        "\"metadata\"",
        "\"revision\"",
        "\"timestamp\"",
        "\"2024-01-01T00:00:00Z\"",
        "\"severity\"",
        "\"info\"",
        "\"reason\"",
        "null",
        "true",
        "1e999",
        "-0",
        "18446744073709551616",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "\"\\uDFFF\"",
        "\\",
        " ",
        "\n",
        "\u{feff}",
        "\u{0}",
    ]);
    proptest::collection::vec(tokens, 0..64).prop_map(|t| t.concat().into_bytes())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn from_json_never_panics_on_arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        exercise(&body);
    }

    #[test]
    fn from_json_never_panics_on_json_noise(body in json_noise()) {
        exercise(&body);
    }

    #[test]
    fn from_json_never_panics_on_mutated_events(
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let mut body = VALID.as_bytes().to_vec();
        for m in &mutations {
            apply(&mut body, m);
        }
        exercise(&body);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Nested arrays and objects at any depth give an error, not a stack overflow.
    #[test]
    fn from_json_survives_deep_nesting(depth in 1usize..200_000, object in any::<bool>(), closed in any::<bool>()) {
        let (open, close) = if object { ("{\"a\":", "}") } else { ("[", "]") };
        let mut body = open.repeat(depth);
        if closed {
            body.push('1');
            body.push_str(&close.repeat(depth));
        }
        prop_assert!(!exercise(body.as_bytes()));
        // The same nesting inside an otherwise valid event.
        let inside = VALID.replacen("\"summary\":\"x\"", &format!("\"summary\":{body}"), 1);
        prop_assert!(!exercise(inside.as_bytes()));
    }
}

/// Every strict prefix of a valid event is refused; the whole is accepted.
#[test]
fn every_truncation_of_a_valid_event_is_refused() {
    let body = VALID.as_bytes();
    assert!(exercise(body));
    for end in 0..body.len() {
        assert!(
            FluxEvent::from_json(&body[..end]).is_err(),
            "prefix of {end} bytes accepted"
        );
    }
}

fn algorithm() -> impl Strategy<Value = HmacAlgorithm> {
    proptest::sample::select(ALGORITHMS.to_vec())
}

/// Headers a client could send: noise, almost-right shapes, and real signatures edited.
fn header_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,200}",
        "(sha1|sha224|sha256|sha384|sha512|md5|SHA256|Sha256| sha256|)[= ]{0,2}[0-9a-fA-F]{0,140}",
        "sha256=[0-9a-f]{64}[ ,;=]{0,2}(sha256=)?[0-9a-f]{0,64}",
        "\\PC{0,64}=\\PC{0,64}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Any header against any body and key: no panic; and whatever verifies is, once
    /// trimmed and lowercased, exactly the signature of that body under that key.
    #[test]
    fn verify_accepts_only_the_exact_signature(
        header in header_text(),
        body in proptest::collection::vec(any::<u8>(), 0..512),
        key in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let result = verify(Some(&header), &key, &body);
        if result.is_ok() {
            let normalized = header.trim().to_ascii_lowercase();
            let (name, hex) = normalized.split_once('=').unwrap();
            let algorithm = HmacAlgorithm::parse(name.trim()).unwrap();
            prop_assert_eq!(format!("{}={}", name.trim(), hex.trim()), sign(algorithm, &key, &body));
        }
    }

    /// Real signatures verify (also with uppercase hex and surrounding spaces), and every
    /// edit of them, of the body or of the key, is refused.
    #[test]
    fn signatures_verify_and_every_edit_is_refused(
        algorithm in algorithm(),
        body in proptest::collection::vec(any::<u8>(), 0..512),
        key in proptest::collection::vec(any::<u8>(), 1..80),
        position in any::<usize>(),
        replacement in "[0-9a-f]",
        cut in any::<usize>(),
        // Not zeros: HMAC pads short keys with zeros, so `k` and `k\0` are the same key.
        extra in proptest::collection::vec(1..=255u8, 1..8),
    ) {
        let header = sign(algorithm, &key, &body);
        prop_assert_eq!(verify(Some(&header), &key, &body), Ok(()));
        prop_assert_eq!(verify(Some(&format!("  {header} ")), &key, &body), Ok(()));
        prop_assert_eq!(verify(Some(&header.to_ascii_uppercase()), &key, &body), Ok(()));

        let (name, hex) = header.split_once('=').unwrap();
        // One hex digit changed.
        let at = position % hex.len();
        if replacement.as_bytes()[0] != hex.as_bytes()[at] {
            let mut edited = hex.as_bytes().to_vec();
            edited[at] = replacement.as_bytes()[0];
            let edited = format!("{name}={}", String::from_utf8(edited).unwrap());
            prop_assert_eq!(verify(Some(&edited), &key, &body), Err(SignatureError::Mismatch));
        }
        // Truncated (any shorter length) or extended.
        let keep = cut % hex.len();
        let truncated = format!("{name}={}", &hex[..keep]);
        prop_assert!(verify(Some(&truncated), &key, &body).is_err());
        let extended = format!("{header}00");
        prop_assert!(verify(Some(&extended), &key, &body).is_err());
        // Another algorithm's name on this digest.
        for other in ALGORITHMS.iter().filter(|a| **a != algorithm) {
            let relabelled = format!("{}={hex}", other.as_str());
            prop_assert!(verify(Some(&relabelled), &key, &body).is_err());
        }
        // Another body or key.
        let mut longer = body.clone();
        longer.extend_from_slice(&extra);
        prop_assert_eq!(verify(Some(&header), &key, &longer), Err(SignatureError::Mismatch));
        if !body.is_empty() {
            prop_assert_eq!(verify(Some(&header), &key, &body[..body.len() - 1]), Err(SignatureError::Mismatch));
        }
        let mut other_key = key.clone();
        other_key.extend_from_slice(&extra);
        prop_assert_eq!(verify(Some(&header), &other_key, &body), Err(SignatureError::Mismatch));
        // Missing header.
        prop_assert_eq!(verify(None, &key, &body), Err(SignatureError::Missing));
    }
}
