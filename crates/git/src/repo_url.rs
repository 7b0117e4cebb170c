//! The repository URL of a `pull-request` promotion, as git and the forge APIs need it.

use std::fmt;

use reqwest::Url;

/// How git reaches the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Ssh,
}

/// A parsed repository URL: `http(s)://host[:port]/path`, `ssh://[user@]host[:port]/path`
/// or scp-like `[user@]host:path`. User information in HTTP(S) URLs is dropped:
/// credentials come from the Secret, never from a URL.
#[derive(Clone, PartialEq, Eq)]
pub struct RepoUrl {
    pub transport: Transport,
    /// `http`, `https` or `ssh`.
    pub scheme: String,
    /// SSH user (`git` in `git@host:o/r`); empty for HTTP(S).
    pub user: String,
    pub host: String,
    pub port: Option<u16>,
    /// Path segments; the last one without a `.git` suffix.
    pub segments: Vec<String>,
    /// Whether the written URL ended in `.git`.
    dot_git: bool,
    scp_like: bool,
}

impl fmt::Debug for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoUrl({})", self.git_url())
    }
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.git_url())
    }
}

impl RepoUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("the repository URL is empty".to_string());
        }
        if !text.contains("://") {
            return Self::parse_scp_like(text);
        }
        let url = Url::parse(text).map_err(|e| format!("invalid repository URL: {e}"))?;
        let transport = match url.scheme() {
            "http" | "https" => Transport::Http,
            "ssh" => Transport::Ssh,
            other => {
                return Err(format!(
                    "unsupported repository URL scheme {other:?} (use https, http or ssh)"
                ));
            }
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("the repository URL has no host")?
            .to_string();
        let user = match transport {
            Transport::Ssh => url.username().to_string(),
            Transport::Http => String::new(),
        };
        Self::from_parts(
            transport,
            url.scheme(),
            user,
            host,
            url.port(),
            url.path(),
            false,
        )
    }

    fn parse_scp_like(text: &str) -> Result<Self, String> {
        let (user_host, path) = text.split_once(':').ok_or_else(|| {
            "invalid repository URL: expected scheme://host/path or user@host:path".to_string()
        })?;
        if user_host.contains('/') {
            return Err("invalid repository URL: expected user@host:path".to_string());
        }
        let (user, host) = match user_host.rsplit_once('@') {
            Some((user, host)) => (user.to_string(), host.to_string()),
            None => (String::new(), user_host.to_string()),
        };
        if host.is_empty() {
            return Err("the repository URL has no host".to_string());
        }
        Self::from_parts(Transport::Ssh, "ssh", user, host, None, path, true)
    }

    fn from_parts(
        transport: Transport,
        scheme: &str,
        user: String,
        host: String,
        port: Option<u16>,
        path: &str,
        scp_like: bool,
    ) -> Result<Self, String> {
        let mut segments: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect();
        let mut dot_git = false;
        if let Some(last) = segments.last_mut()
            && let Some(stripped) = last.strip_suffix(".git")
        {
            *last = stripped.to_string();
            dot_git = true;
        }
        if segments.iter().any(|s| s.is_empty() || s == "..") || segments.is_empty() {
            return Err("the repository URL has no repository path".to_string());
        }
        Ok(Self {
            transport,
            scheme: scheme.to_string(),
            user,
            host,
            port,
            segments,
            dot_git,
            scp_like,
        })
    }

    /// `scheme://host[:port]` (for SSH URLs: `https://host`, where forges serve their API).
    pub fn web_origin(&self) -> String {
        match self.transport {
            Transport::Http => self.http_origin(),
            Transport::Ssh => format!("https://{}", self.host_for_url()),
        }
    }

    fn host_for_url(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    fn http_origin(&self) -> String {
        match self.port {
            Some(port) => format!("{}://{}:{port}", self.scheme, self.host_for_url()),
            None => format!("{}://{}", self.scheme, self.host_for_url()),
        }
    }

    /// The path as written, without the `.git` suffix.
    pub fn path(&self) -> String {
        self.segments.join("/")
    }

    /// The URL handed to `git`: without user information for HTTP(S).
    pub fn git_url(&self) -> String {
        let mut path = self.path();
        if self.dot_git {
            path.push_str(".git");
        }
        match self.transport {
            Transport::Http => format!("{}/{path}", self.http_origin()),
            Transport::Ssh if self.scp_like => {
                let user = if self.user.is_empty() {
                    String::new()
                } else {
                    format!("{}@", self.user)
                };
                format!("{user}{}:{path}", self.host)
            }
            Transport::Ssh => {
                let user = if self.user.is_empty() {
                    String::new()
                } else {
                    format!("{}@", self.user)
                };
                let port = self.port.map(|p| format!(":{p}")).unwrap_or_default();
                format!("ssh://{user}{}{port}/{path}", self.host_for_url())
            }
        }
    }

    /// The prefix git configuration is scoped to (`http.<prefix>.extraHeader`): the
    /// repository's origin, so credentials go to that server only.
    pub fn credential_scope(&self) -> String {
        format!("{}/", self.http_origin())
    }

    /// Key identifying the repository for the one-promotion-at-a-time rule.
    pub fn lock_key(&self) -> String {
        format!(
            "{}://{}:{}/{}",
            self.scheme,
            self.host.to_ascii_lowercase(),
            self.port.unwrap_or(0),
            self.path()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        let u = RepoUrl::parse("https://bot:pw@github.com/o/r.git").unwrap();
        assert_eq!(u.transport, Transport::Http);
        assert_eq!(u.git_url(), "https://github.com/o/r.git");
        assert_eq!(u.segments, ["o", "r"]);
        assert_eq!(u.web_origin(), "https://github.com");

        let u = RepoUrl::parse("git@github.com:o/r.git").unwrap();
        assert_eq!(u.transport, Transport::Ssh);
        assert_eq!(u.git_url(), "git@github.com:o/r.git");
        assert_eq!(u.web_origin(), "https://github.com");

        let u = RepoUrl::parse("ssh://git@host.example:7999/proj/repo.git").unwrap();
        assert_eq!(u.git_url(), "ssh://git@host.example:7999/proj/repo.git");
        assert_eq!(u.web_origin(), "https://host.example");
        assert_eq!(u.segments, ["proj", "repo"]);

        let u = RepoUrl::parse("http://127.0.0.1:3000/a/b").unwrap();
        assert_eq!(u.web_origin(), "http://127.0.0.1:3000");
        assert_eq!(u.credential_scope(), "http://127.0.0.1:3000/");

        assert!(RepoUrl::parse("ftp://x/y").is_err());
        assert!(RepoUrl::parse("https://host/").is_err());
        assert!(RepoUrl::parse("").is_err());
    }
}
