//! From a tenant scope's target to an Elasticsearch index or alias name, and
//! the document ids a handle accepts.

use serde::{Deserialize, Serialize};

use crate::error::EsError;

/// The longest index or alias name Elasticsearch accepts, in bytes.
pub const MAX_INDEX_NAME_LEN: usize = 255;
/// The longest document id Elasticsearch accepts, in bytes.
pub const MAX_DOC_ID_LEN: usize = 512;

/// How a scope's target becomes an index (or alias) name.
///
/// Elasticsearch index names must be lowercase, but a
/// [`TenantId`](switchyard_core::TenantId) may hold uppercase letters, and
/// plain lowercasing would give tenants `Acme` and `acme` the same index.
/// Both modes are injective, so no two targets ever share an index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexNaming {
    /// Lowercase targets are used as they are; each uppercase letter becomes
    /// `.` plus the letter in lowercase (`tenant_Acme` → `tenant_.acme`).
    /// Targets are made of `[A-Za-z0-9_-]`, so a `.` appears only in encoded
    /// names and always before the letter it marks: the mapping can be
    /// undone, hence no collisions. The default.
    #[default]
    Encode,
    /// Targets with uppercase letters are refused with
    /// [`EsError::InvalidIndexName`].
    Strict,
}

/// The index or alias name for `target` under `naming`.
///
/// Fails with [`EsError::InvalidIndexName`] for a name Elasticsearch would
/// refuse or treat specially: one starting with `-`, `_`, `+` or `.` (an
/// exclusion, a system name, or a hidden index; e.g. tenant `_all` under the
/// template `{id}`), one over [`MAX_INDEX_NAME_LEN`] bytes, one holding a
/// character outside the target alphabet, or one with uppercase letters
/// under [`IndexNaming::Strict`]. Nothing is sent anywhere.
///
/// ```
/// use switchyard_elasticsearch::{index_name, IndexNaming};
///
/// assert_eq!(index_name("tenant_acme", IndexNaming::Encode).unwrap(), "tenant_acme");
/// assert_eq!(index_name("tenant_Acme", IndexNaming::Encode).unwrap(), "tenant_.acme");
/// assert!(index_name("tenant_Acme", IndexNaming::Strict).is_err());
/// assert!(index_name("_all", IndexNaming::Encode).is_err());
/// assert!(index_name("Acme", IndexNaming::Encode).is_err()); // would be hidden: `.acme`
/// ```
pub fn index_name(target: &str, naming: IndexNaming) -> Result<String, EsError> {
    let invalid = |reason: &'static str| EsError::InvalidIndexName {
        name: target.chars().take(80).collect(),
        reason,
    };
    if target.is_empty() {
        return Err(invalid("it is empty"));
    }
    if !target
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(invalid(
            "only ASCII letters, digits, '_' and '-' are allowed",
        ));
    }
    let has_upper = target.chars().any(|c| c.is_ascii_uppercase());
    let name = match (has_upper, naming) {
        (false, _) => target.to_owned(),
        (true, IndexNaming::Strict) => {
            return Err(invalid(
                "index names must be lowercase (index_naming is strict)",
            ))
        }
        (true, IndexNaming::Encode) => {
            let mut out = String::with_capacity(target.len() + 8);
            for c in target.chars() {
                if c.is_ascii_uppercase() {
                    out.push('.');
                    out.push(c.to_ascii_lowercase());
                } else {
                    out.push(c);
                }
            }
            out
        }
    };
    if name.starts_with(['-', '_', '+', '.']) {
        return Err(invalid(
            "it would start with '-', '_', '+' or '.', which Elasticsearch reserves",
        ));
    }
    if name.len() > MAX_INDEX_NAME_LEN {
        return Err(invalid("it is longer than 255 bytes"));
    }
    Ok(name)
}

/// Checks a document id before it goes into a URL path.
///
/// The client leaves `.` unescaped in path segments, so an id of `.` or `..`
/// would be resolved as a path step (`DELETE /index/_doc/..` is
/// `DELETE /index/`); both are refused, as are empty ids and ids over
/// [`MAX_DOC_ID_LEN`] bytes.
pub fn validate_doc_id(id: &str) -> Result<(), EsError> {
    let reason = if id.is_empty() {
        "it is empty"
    } else if id == "." || id == ".." {
        "'.' and '..' would be read as path steps"
    } else if id.len() > MAX_DOC_ID_LEN {
        "it is longer than 512 bytes"
    } else {
        return Ok(());
    };
    Err(EsError::InvalidDocId {
        id: id.chars().take(80).collect(),
        reason,
    })
}

/// Checks a tenant field name: a non-empty JSON key without `.` (a top-level
/// field), control characters or `*`.
pub fn validate_field(field: &str) -> Result<(), EsError> {
    if field.is_empty()
        || field.starts_with('_')
        || field
            .chars()
            .any(|c| c == '.' || c == '*' || c.is_control() || c.is_whitespace())
    {
        return Err(EsError::InvalidField {
            field: field.chars().take(80).collect(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_injective_on_case() {
        let a = index_name("tenant_Acme", IndexNaming::Encode).unwrap();
        let b = index_name("tenant_acme", IndexNaming::Encode).unwrap();
        let c = index_name("tenant_ACME", IndexNaming::Encode).unwrap();
        assert_eq!(a, "tenant_.acme");
        assert_eq!(b, "tenant_acme");
        assert_eq!(c, "tenant_.a.c.m.e");
        assert!(a != b && b != c && a != c);
    }

    #[test]
    fn reserved_starts_are_refused() {
        for target in ["_all", "-x", "_x", "Upper", ""] {
            assert!(
                index_name(target, IndexNaming::Encode).is_err(),
                "{target:?}"
            );
        }
        for target in ["*", "a,b", "a b", "a/b", "a:b", "../x", "a.b"] {
            assert!(
                index_name(target, IndexNaming::Encode).is_err(),
                "{target:?}"
            );
        }
        assert!(index_name(&"x".repeat(256), IndexNaming::Encode).is_err());
        assert_eq!(index_name("t-1_x", IndexNaming::Strict).unwrap(), "t-1_x");
    }

    #[test]
    fn doc_ids_that_are_path_steps_are_refused() {
        for id in ["", ".", ".."] {
            assert!(validate_doc_id(id).is_err(), "{id:?}");
        }
        assert!(validate_doc_id(&"x".repeat(513)).is_err());
        for id in ["1", "a/b", "...", "a..", "é", "_x"] {
            assert!(validate_doc_id(id).is_ok(), "{id:?}");
        }
    }

    #[test]
    fn tenant_fields_are_plain_keys() {
        assert!(validate_field("tenant_id").is_ok());
        for f in ["", "a.b", "_id", "a*", "a b"] {
            assert!(validate_field(f).is_err(), "{f:?}");
        }
    }
}
