//! Value parsers for flags whose mistakes deserve a precise suggestion.

use std::net::SocketAddr;

/// `--listen`: `IP:PORT`. `:9000` and `localhost:9000` get the address to write instead.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    if let Some(port) = text.strip_prefix(':') {
        return Err(format!(
            "no IP address; use 0.0.0.0:{port} for every interface or 127.0.0.1:{port} for this machine only"
        ));
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        return Err(format!(
            "use 127.0.0.1:{port} (an IP address, not a host name)"
        ));
    }
    if text.parse::<u16>().is_ok() {
        return Err(format!(
            "a port alone; use 0.0.0.0:{text} for every interface or 127.0.0.1:{text} for this machine only"
        ));
    }
    Err("expected IP:PORT, e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::]:8080".to_string())
}

/// An `http://` or `https://` URL (`--server`, `--notify-url`, `--events-addr`). Without
/// a scheme the answer names the URL to write.
pub fn parse_http_url(text: &str) -> Result<reqwest::Url, String> {
    let text = text.trim();
    if !text.contains("://") {
        return Err(format!("needs a scheme: http://{text}"));
    }
    let url = reqwest::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(format!(
                "scheme {other:?} is not supported; use http:// or https://"
            ));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".to_string());
    }
    Ok(url)
}

/// `--server`: like [`parse_http_url`], kept as text without a trailing slash.
pub fn parse_server(text: &str) -> Result<String, String> {
    parse_http_url(text)?;
    Ok(text.trim().trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn listen_mistakes_get_the_address_to_use() {
        assert_eq!(parse_listen("0.0.0.0:9000").unwrap().port(), 9000);
        assert!(parse_listen("[::1]:9000").is_ok());
        assert!(parse_listen(":9000").unwrap_err().contains("0.0.0.0:9000"));
        assert!(parse_listen("9000").unwrap_err().contains("0.0.0.0:9000"));
        assert!(
            parse_listen("localhost:9000")
                .unwrap_err()
                .contains("127.0.0.1:9000")
        );
        assert!(parse_listen("nonsense").unwrap_err().contains("IP:PORT"));
    }

    #[test]
    fn urls_need_an_http_scheme() {
        assert_eq!(
            parse_http_url("127.0.0.1:8080").unwrap_err(),
            "needs a scheme: http://127.0.0.1:8080"
        );
        assert_eq!(
            parse_http_url("localhost:8080").unwrap_err(),
            "needs a scheme: http://localhost:8080"
        );
        assert!(parse_http_url("ftp://x/").unwrap_err().contains("http://"));
        assert!(parse_http_url("https://receiver.example/events").is_ok());
        assert_eq!(
            parse_server("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
    }
}
