//! HMAC signatures in the `X-Signature: <algo>=<hex>` form Flux's `generic-hmac` provider
//! sends. Always computed over the raw body bytes and compared in constant time.

use hmac::{Hmac, Mac};
use sha2::{Sha224, Sha256, Sha384, Sha512};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HmacAlgorithm {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl HmacAlgorithm {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "sha224" => Some(Self::Sha224),
            "sha256" => Some(Self::Sha256),
            "sha384" => Some(Self::Sha384),
            "sha512" => Some(Self::Sha512),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha224 => "sha224",
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
            Self::Sha512 => "sha512",
        }
    }
}

/// Why a signature was refused. Messages never contain the key or the signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing X-Signature header")]
    Missing,
    #[error("malformed X-Signature header (expected <algorithm>=<hex>)")]
    Malformed,
    #[error("unsupported signature algorithm (use sha224, sha256, sha384 or sha512)")]
    UnsupportedAlgorithm,
    #[error("signature does not match the body")]
    Mismatch,
}

/// Computes (`mac!(D, key, body)`) or verifies (`mac!(D, key, body, expected)`, constant
/// time) an HMAC with digest `D`; a macro because the digest types share no simple bound.
macro_rules! mac {
    ($digest:ty, $key:expr, $body:expr) => {{
        let mut mac = <Hmac<$digest> as Mac>::new_from_slice($key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update($body);
        mac.finalize().into_bytes().to_vec()
    }};
    ($digest:ty, $key:expr, $body:expr, $expected:expr) => {{
        match <Hmac<$digest> as Mac>::new_from_slice($key) {
            Ok(mut mac) => {
                mac.update($body);
                mac.verify_slice($expected).is_ok()
            }
            Err(_) => false,
        }
    }};
}

/// Returns the header value (`sha256=<hex>`) for `body` under `key`.
pub fn sign(algorithm: HmacAlgorithm, key: &[u8], body: &[u8]) -> String {
    let digest = match algorithm {
        HmacAlgorithm::Sha224 => mac!(Sha224, key, body),
        HmacAlgorithm::Sha256 => mac!(Sha256, key, body),
        HmacAlgorithm::Sha384 => mac!(Sha384, key, body),
        HmacAlgorithm::Sha512 => mac!(Sha512, key, body),
    };
    format!("{}={}", algorithm.as_str(), hex::encode(digest))
}

/// Checks `header` (the `X-Signature` value) against `body` under `key`.
pub fn verify(header: Option<&str>, key: &[u8], body: &[u8]) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?.trim();
    let (algorithm, digest_hex) = header.split_once('=').ok_or(SignatureError::Malformed)?;
    let algorithm = HmacAlgorithm::parse(&algorithm.trim().to_ascii_lowercase())
        .ok_or(SignatureError::UnsupportedAlgorithm)?;
    let digest = hex::decode(digest_hex.trim()).map_err(|_| SignatureError::Malformed)?;
    if digest.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let ok = match algorithm {
        HmacAlgorithm::Sha224 => mac!(Sha224, key, body, &digest),
        HmacAlgorithm::Sha256 => mac!(Sha256, key, body, &digest),
        HmacAlgorithm::Sha384 => mac!(Sha384, key, body, &digest),
        HmacAlgorithm::Sha512 => mac!(Sha512, key, body, &digest),
    };
    if ok {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_rfc4231_case2() {
        let header = sign(
            HmacAlgorithm::Sha256,
            b"Jefe",
            b"what do ya want for nothing?",
        );
        assert_eq!(
            header,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn round_trips_every_algorithm_and_refuses_tampering() {
        for algo in [
            HmacAlgorithm::Sha224,
            HmacAlgorithm::Sha256,
            HmacAlgorithm::Sha384,
            HmacAlgorithm::Sha512,
        ] {
            let header = sign(algo, b"key", b"body");
            assert_eq!(verify(Some(&header), b"key", b"body"), Ok(()));
            assert_eq!(
                verify(Some(&header), b"key", b"body "),
                Err(SignatureError::Mismatch)
            );
            assert_eq!(
                verify(Some(&header), b"other", b"body"),
                Err(SignatureError::Mismatch)
            );
        }
    }

    #[test]
    fn refuses_bad_headers() {
        assert_eq!(verify(None, b"k", b"b"), Err(SignatureError::Missing));
        assert_eq!(
            verify(Some("abc"), b"k", b"b"),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(Some("sha256=zz"), b"k", b"b"),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(Some("sha256="), b"k", b"b"),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(Some("md5=00ff"), b"k", b"b"),
            Err(SignatureError::UnsupportedAlgorithm)
        );
        // A truncated digest is a mismatch, not a prefix match.
        let header = sign(HmacAlgorithm::Sha256, b"k", b"b");
        assert_eq!(
            verify(Some(&header[..21]), b"k", b"b"),
            Err(SignatureError::Mismatch)
        );
    }
}
