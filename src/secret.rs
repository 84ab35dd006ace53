//! Secrets (API tokens, broker passwords): read from an environment variable or a file, never
//! from the config file, and never printed: `Debug` and `Display` show `***`.

use std::fmt;
use std::path::Path;

/// A secret string whose formatting never reveals it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that must send it (a handshake header).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads a secret from the variable `env`, else from `file`; `None` if neither is set.
    /// A file's trailing newline and surrounding spaces are dropped.
    pub fn load(env: Option<&str>, file: Option<&Path>) -> Result<Option<Secret>, SecretError> {
        if let Some(name) = env.filter(|n| !n.is_empty()) {
            if let Ok(v) = std::env::var(name) {
                let v = v.trim().to_string();
                if !v.is_empty() {
                    return Ok(Some(Secret(v)));
                }
            }
        }
        if let Some(path) = file {
            let v = std::fs::read_to_string(path).map_err(|e| SecretError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            let v = v.trim().to_string();
            if v.is_empty() {
                return Err(SecretError::File {
                    path: path.display().to_string(),
                    message: "file is empty".into(),
                });
            }
            return Ok(Some(Secret(v)));
        }
        Ok(None)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Why a secret could not be read; it names where from, never the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The secret file could not be read.
    #[error("cannot read secret file {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// The cause.
        message: String,
    },
}

/// The URL without user info, which may hold a password.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***{}", &u[..scheme + 3], &u[at..])
            }
            (None, Some(at)) => format!("***{}", &u[at..]),
            _ => u.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_formats_the_value() {
        let s = Secret::new("st_supersecret");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
    }

    #[test]
    fn file_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tok");
        std::fs::write(&p, "st_abc\n").unwrap();
        let s = Secret::load(Some("TASKSTREAM_TEST_UNSET_VARIABLE"), Some(&p))
            .unwrap()
            .unwrap();
        assert_eq!(s.expose(), "st_abc");
        assert!(Secret::load(None, None).unwrap().is_none());
    }
}
