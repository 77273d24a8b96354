//! `${VAR}` and `${file:/path}` references in URLs, and `password_file`.
//!
//! Resolved values go straight into a [`SecretUrl`]; messages name the
//! variable or file, never what it holds.

use std::path::{Path, PathBuf};

use switchyard_core::SecretUrl;

/// Replaces every `${VAR}` with the environment variable and every
/// `${file:/path}` with the file's content (trailing newline trimmed).
///
/// Returns the resolved string, or every reference that could not be resolved.
pub fn resolve_references(raw: &str) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(raw.len());
    let mut missing = Vec::new();
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            missing.push(format!("unterminated reference {:?}", &rest[start..]));
            rest = "";
            break;
        };
        let name = &after[..end];
        if let Some(path) = name.strip_prefix("file:") {
            match std::fs::read_to_string(path) {
                Ok(s) => out.push_str(s.trim_end_matches(['\n', '\r'])),
                Err(e) => missing.push(format!("unresolved ${{file:{path}}}: {e}")),
            }
        } else {
            match std::env::var(name) {
                Ok(v) => out.push_str(&v),
                Err(_) => missing.push(format!(
                    "unresolved ${{{name}}}: environment variable {name} is not set"
                )),
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

/// The files `raw` reads through `${file:/path}` references.
pub fn file_references(raw: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut rest = raw;
    while let Some(start) = rest.find("${file:") {
        let after = &rest[start + "${file:".len()..];
        let Some(end) = after.find('}') else { break };
        files.push(PathBuf::from(&after[..end]));
        rest = &after[end + 1..];
    }
    files
}

/// Puts the content of `password_file` into `url` as its password.
pub fn with_password_file(url: &str, password_file: &Path) -> Result<SecretUrl, String> {
    let password = std::fs::read_to_string(password_file)
        .map_err(|e| format!("cannot read password_file {}: {e}", password_file.display()))?;
    let password = password.trim_end_matches(['\n', '\r']);
    let mut parsed =
        url::Url::parse(url).map_err(|e| format!("{} is not a url: {e}", SecretUrl::new(url)))?;
    parsed
        .set_password(Some(password))
        .map_err(|()| format!("{} cannot carry a password", SecretUrl::new(url)))?;
    Ok(SecretUrl::new(String::from(parsed)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn resolves_env_and_files() {
        std::env::set_var("SY_SECRETS_UNIT_PW", "hunter2");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        let raw = format!(
            "postgres://a:${{SY_SECRETS_UNIT_PW}}@h/${{file:{}}}",
            f.display()
        );
        assert_eq!(
            resolve_references(&raw).unwrap(),
            "postgres://a:hunter2@h/s3cret"
        );
        let err = resolve_references("x${SY_SECRETS_UNIT_NOPE}y${z").unwrap_err();
        assert_eq!(err.len(), 2);
        assert!(err[0].contains("SY_SECRETS_UNIT_NOPE"));
        assert_eq!(file_references(&raw), std::slice::from_ref(&f));
        assert!(file_references("postgres://a:${PW}@h/db").is_empty());
        let url = with_password_file("redis://u@h:1/0", &f).unwrap();
        assert_eq!(url.expose(), "redis://u:s3cret@h:1/0");
        assert!(!url.to_string().contains("s3cret"));
    }
}
