//! Credentials of a pull-request promotion, and the scrubbing of anything that could quote
//! them.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use pipeline_core::SecretBytes;

/// What the `pull-request.secretRef` Secret holds, with the key names Flux's
/// `GitRepository` secrets use: `username`/`password` for git over HTTPS, `identity` and
/// `known_hosts` for git over SSH, `token` for the forge's API.
#[derive(Clone, Default)]
pub struct Credentials {
    pub username: Option<String>,
    pub password: Option<SecretBytes>,
    pub token: Option<SecretBytes>,
    pub identity: Option<SecretBytes>,
    pub known_hosts: Option<SecretBytes>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .field("known_hosts", &self.known_hosts.is_some())
            .finish()
    }
}

fn text(bytes: &SecretBytes) -> String {
    String::from_utf8_lossy(bytes.expose()).into_owned()
}

impl Credentials {
    /// The API token as text, trimmed of a trailing newline (Secrets written with
    /// `echo` often have one).
    pub fn token_text(&self) -> Option<String> {
        self.token
            .as_ref()
            .map(|t| text(t).trim_end_matches(['\r', '\n']).to_string())
            .filter(|t| !t.is_empty())
    }

    /// The user and password git sends over HTTPS: `username`/`password`, or, without
    /// them, the API token as password (GitHub, GitLab, Gitea and Bitbucket accept a token
    /// there; the user name is then `git`, which those forges ignore for tokens).
    pub fn https_basic(&self) -> Option<(String, String)> {
        let password = self
            .password
            .as_ref()
            .map(|p| text(p).trim_end_matches(['\r', '\n']).to_string())
            .filter(|p| !p.is_empty());
        match (&self.username, password) {
            (Some(user), Some(password)) if !user.is_empty() => Some((user.clone(), password)),
            (_, Some(password)) => Some(("git".to_string(), password)),
            (_, None) => self.token_text().map(|t| ("git".to_string(), t)),
        }
    }

    /// A scrubber that removes every form of these credentials from text.
    pub fn scrubber(&self) -> Scrubber {
        let mut scrubber = Scrubber::default();
        for secret in [&self.password, &self.token, &self.identity]
            .into_iter()
            .flatten()
        {
            let raw = text(secret);
            scrubber.add(&raw);
            scrubber.add(raw.trim());
            // A key file: every line of it.
            if raw.contains('\n') {
                for line in raw.lines() {
                    if line.trim().len() >= 8 && !line.starts_with("-----") {
                        scrubber.add(line.trim());
                    }
                }
            }
        }
        if let Some((user, password)) = self.https_basic() {
            let pair = format!("{user}:{password}");
            scrubber.add(&STANDARD.encode(pair.as_bytes()));
            scrubber.add(&pair);
        }
        if let Some(token) = self.token_text() {
            scrubber.add(&STANDARD.encode(format!(":{token}").as_bytes()));
        }
        scrubber
    }
}

/// Replaces known secret strings in text with `<redacted>`.
#[derive(Clone, Default)]
pub struct Scrubber {
    needles: Vec<String>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scrubber(<{} secrets>)", self.needles.len())
    }
}

impl Scrubber {
    pub fn add(&mut self, secret: &str) {
        if secret.is_empty() || self.needles.iter().any(|n| n == secret) {
            return;
        }
        self.needles.push(secret.to_string());
        // Longest first, so a secret containing another is removed whole.
        self.needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
    }

    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = out.replace(needle.as_str(), "<redacted>");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> Option<SecretBytes> {
        Some(SecretBytes::new(text.as_bytes().to_vec()))
    }

    #[test]
    fn scrubs_every_form() {
        let creds = Credentials {
            username: Some("bot".into()),
            password: secret("hunter2-pass"),
            token: secret("tok-123456\n"),
            ..Credentials::default()
        };
        let s = creds.scrubber();
        let b64 = STANDARD.encode("bot:hunter2-pass");
        let text = format!("user bot: a hunter2-pass b bot:hunter2-pass c {b64} d tok-123456 e");
        let out = s.scrub(&text);
        assert!(!out.contains("hunter2"), "{out}");
        assert!(!out.contains("tok-123456"), "{out}");
        assert!(!out.contains(&b64), "{out}");
        assert!(out.contains("bot"), "user names are not secret: {out}");
        assert!(!format!("{creds:?}").contains("hunter2"));
    }

    #[test]
    fn token_is_the_fallback_password() {
        let creds = Credentials {
            token: secret("t0k\n"),
            ..Credentials::default()
        };
        assert_eq!(creds.https_basic(), Some(("git".into(), "t0k".into())));
        assert_eq!(Credentials::default().https_basic(), None);
    }
}
