//! HMAC keys for the client commands come from files, never from arguments, so they do
//! not show up in process listings or shell history.

use std::path::Path;

use anyhow::{Context, bail};
use pipeline_core::SecretBytes;

/// Reads a key file. One trailing newline (as `echo` writes) is not part of the key.
pub fn read(path: &Path) -> anyhow::Result<SecretBytes> {
    let mut bytes =
        std::fs::read(path).with_context(|| format!("reading key file {}", path.display()))?;
    if bytes.ends_with(b"\r\n") {
        bytes.truncate(bytes.len() - 2);
    } else if bytes.ends_with(b"\n") {
        bytes.truncate(bytes.len() - 1);
    }
    if bytes.is_empty() {
        bail!("key file {} is empty", path.display());
    }
    Ok(SecretBytes::new(bytes))
}
