//! Tenant identity, isolation levels and the scope a checkout is bound to.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};

use crate::fair::Share;

/// The longest tenant id accepted, in bytes (PostgreSQL's identifier limit).
pub const MAX_TENANT_ID_LEN: usize = 63;

/// A validated tenant identifier: 1 to 63 ASCII letters, digits, `_` or `-`.
///
/// Validation happens before any I/O, so an identifier that reaches a backend is
/// already known to be harmless; backends still pass it only as a bound parameter
/// or a quoted identifier. Cloning is cheap (one reference count).
///
/// ```
/// use switchyard_core::TenantId;
///
/// let acme = TenantId::new("acme-eu_1").unwrap();
/// assert_eq!(acme.as_str(), "acme-eu_1");
/// assert!(TenantId::new("a'; DROP TABLE x; --").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TenantId(Arc<str>);

/// Why a string is not a valid [`TenantId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TenantIdError {
    /// The identifier was empty.
    #[error("tenant id is empty")]
    Empty,
    /// The identifier was longer than [`MAX_TENANT_ID_LEN`] bytes.
    #[error("tenant id is {len} bytes long, the limit is {max}", max = MAX_TENANT_ID_LEN)]
    TooLong {
        /// Length of the rejected input in bytes.
        len: usize,
    },
    /// The identifier held a character outside `[A-Za-z0-9_-]`.
    #[error("tenant id has {ch:?} at position {index}; only ASCII letters, digits, '_' and '-' are allowed")]
    InvalidChar {
        /// The first offending character.
        ch: char,
        /// Its character position in the input.
        index: usize,
    },
}

impl TenantId {
    /// Validates `id` and wraps it.
    pub fn new(id: &str) -> Result<Self, TenantIdError> {
        validate(id)?;
        Ok(Self(Arc::from(id)))
    }

    /// The identifier as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate(id: &str) -> Result<(), TenantIdError> {
    if id.is_empty() {
        return Err(TenantIdError::Empty);
    }
    if let Some((index, ch)) = id
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(TenantIdError::InvalidChar { ch, index });
    }
    if id.len() > MAX_TENANT_ID_LEN {
        return Err(TenantIdError::TooLong { len: id.len() });
    }
    Ok(())
}

impl std::str::FromStr for TenantId {
    type Err = TenantIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<&str> for TenantId {
    type Error = TenantIdError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for TenantId {
    type Error = TenantIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        validate(&s)?;
        Ok(Self(Arc::from(s)))
    }
}

impl<'de> Deserialize<'de> for TenantId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::try_from(s).map_err(serde::de::Error::custom)
    }
}

impl AsRef<str> for TenantId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for TenantId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({:?})", &*self.0)
    }
}

/// How strongly tenants are separated from each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// A database (or index, or logical DB) of its own per tenant.
    Database,
    /// A schema (or key/collection prefix) of its own per tenant in a shared database.
    Schema,
    /// Shared tables; each row carries the tenant and the engine filters on it.
    Row,
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isolation::Database => "database",
            Isolation::Schema => "schema",
            Isolation::Row => "row",
        })
    }
}

/// A name pattern with one `{id}` placeholder, such as `tenant_{id}`.
///
/// The fixed parts may hold only ASCII letters, digits and `_`, so every rendered
/// name is a valid identifier whenever the tenant id is.
#[derive(Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "String")]
pub struct NameTemplate {
    prefix: Box<str>,
    suffix: Box<str>,
}

/// Why a string is not a valid [`NameTemplate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// The template does not contain `{id}` exactly once.
    #[error("name template {template:?} must contain \"{{id}}\" exactly once")]
    Placeholder {
        /// The rejected template.
        template: String,
    },
    /// A fixed part held a character that is not an ASCII letter, digit or `_`.
    #[error("name template {template:?} has {ch:?}; fixed parts allow only ASCII letters, digits and '_'")]
    InvalidChar {
        /// The rejected template.
        template: String,
        /// The first offending character.
        ch: char,
    },
    /// The fixed parts alone leave no room for a tenant id.
    #[error("name template {template:?} leaves no room for a tenant id within {max} bytes", max = MAX_TENANT_ID_LEN)]
    TooLong {
        /// The rejected template.
        template: String,
    },
}

impl NameTemplate {
    /// Parses a template such as `tenant_{id}`.
    pub fn new(template: &str) -> Result<Self, TemplateError> {
        let Some((prefix, suffix)) = template.split_once("{id}") else {
            return Err(TemplateError::Placeholder {
                template: template.to_owned(),
            });
        };
        if suffix.contains("{id}") {
            return Err(TemplateError::Placeholder {
                template: template.to_owned(),
            });
        }
        if let Some(ch) = prefix
            .chars()
            .chain(suffix.chars())
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
        {
            return Err(TemplateError::InvalidChar {
                template: template.to_owned(),
                ch,
            });
        }
        if prefix.len() + suffix.len() >= MAX_TENANT_ID_LEN {
            return Err(TemplateError::TooLong {
                template: template.to_owned(),
            });
        }
        Ok(Self {
            prefix: prefix.into(),
            suffix: suffix.into(),
        })
    }

    /// The longest tenant id this template can render within [`MAX_TENANT_ID_LEN`].
    pub fn max_tenant_len(&self) -> usize {
        MAX_TENANT_ID_LEN - self.prefix.len() - self.suffix.len()
    }

    /// Whether this template and `other` could render the same name for two
    /// different tenants.
    ///
    /// Tenant ids may contain `_`, so `t_{id}` (tenant `a_b`) and `t_a_{id}`
    /// (tenant `b`) both render `t_a_b`. Two different templates are told apart
    /// only when neither fixed prefix is a prefix of the other.
    pub fn may_collide_with(&self, other: &NameTemplate) -> bool {
        self != other
            && (self.prefix.starts_with(&*other.prefix) || other.prefix.starts_with(&*self.prefix))
    }

    /// Whether some valid tenant id renders exactly `name`: a refusal check
    /// for names a tier must never hand out (a system or shared namespace).
    ///
    /// ```
    /// use switchyard_core::NameTemplate;
    ///
    /// assert!(NameTemplate::new("{id}").unwrap().can_render("postgres"));
    /// assert!(NameTemplate::new("{id}1").unwrap().can_render("template1"));
    /// assert!(!NameTemplate::new("tenant_{id}").unwrap().can_render("postgres"));
    /// assert!(NameTemplate::new("tenant_{id}").unwrap().can_render("tenant_shared"));
    /// ```
    pub fn can_render(&self, name: &str) -> bool {
        self.renders(name, &self.prefix, &self.suffix)
    }

    /// [`can_render`](Self::can_render) comparing ASCII letters ignoring case,
    /// for engines whose names are case-insensitive (MongoDB databases).
    pub fn can_render_ignoring_case(&self, name: &str) -> bool {
        self.renders(
            &name.to_ascii_lowercase(),
            &self.prefix.to_ascii_lowercase(),
            &self.suffix.to_ascii_lowercase(),
        )
    }

    fn renders(&self, name: &str, prefix: &str, suffix: &str) -> bool {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(suffix))
            .is_some_and(|id| id.len() <= self.max_tenant_len() && validate(id).is_ok())
    }

    /// Renders the name for `tenant`, or `None` when it would exceed [`MAX_TENANT_ID_LEN`].
    pub fn render(&self, tenant: &TenantId) -> Option<String> {
        (tenant.as_str().len() <= self.max_tenant_len())
            .then(|| format!("{}{}{}", self.prefix, tenant, self.suffix))
    }
}

impl Default for NameTemplate {
    fn default() -> Self {
        Self {
            prefix: "tenant_".into(),
            suffix: "".into(),
        }
    }
}

impl std::str::FromStr for NameTemplate {
    type Err = TemplateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl From<NameTemplate> for String {
    fn from(t: NameTemplate) -> String {
        t.to_string()
    }
}

impl<'de> Deserialize<'de> for NameTemplate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for NameTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{{id}}{}", self.prefix, self.suffix)
    }
}

impl fmt::Debug for NameTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NameTemplate({self})")
    }
}

/// What a checkout for one tenant must be confined to, resolved from its tier.
///
/// `target` is what the isolation level needs: the database (or index) name for
/// [`Isolation::Database`], the schema (or prefix) for [`Isolation::Schema`], and
/// the rendered tenant namespace for [`Isolation::Row`] (the row setting's name is
/// in `row_setting`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TenantScope {
    tenant: TenantId,
    isolation: Isolation,
    target: Arc<str>,
    row_setting: Arc<str>,
    share: Share,
}

impl TenantScope {
    /// Builds a scope directly; most callers get one from a [`crate::TenantRegistry`].
    pub fn new(
        tenant: TenantId,
        isolation: Isolation,
        target: impl Into<Arc<str>>,
        row_setting: impl Into<Arc<str>>,
    ) -> Self {
        Self {
            tenant,
            isolation,
            target: target.into(),
            row_setting: row_setting.into(),
            share: Share::default(),
        }
    }

    /// Sets the scope's place in a saturated pool's queue (its tier's
    /// weight and order); the default is a class of its own, weight 1.
    pub fn with_share(mut self, share: Share) -> Self {
        self.share = share;
        self
    }

    /// The scope's place in a saturated pool's queue.
    pub fn share(&self) -> &Share {
        &self.share
    }

    /// The tenant this scope belongs to.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The isolation level to apply.
    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// The database, schema or prefix name rendered from the tier's template.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The session setting that carries the tenant for row-level isolation.
    pub fn row_setting(&self) -> &str {
        &self.row_setting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "A9", "acme_eu-1", &"x".repeat(63), "-", "_"] {
            assert!(TenantId::new(ok).is_ok(), "{ok:?} should be valid");
        }
    }

    #[test]
    fn rejects_everything_else_with_a_precise_error() {
        assert_eq!(TenantId::new(""), Err(TenantIdError::Empty));
        assert_eq!(
            TenantId::new(&"x".repeat(64)),
            Err(TenantIdError::TooLong { len: 64 })
        );
        assert_eq!(
            TenantId::new("a'; DROP TABLE x; --"),
            Err(TenantIdError::InvalidChar { ch: '\'', index: 1 })
        );
        assert_eq!(
            TenantId::new("a\"b"),
            Err(TenantIdError::InvalidChar { ch: '"', index: 1 })
        );
        assert_eq!(
            TenantId::new("../x"),
            Err(TenantIdError::InvalidChar { ch: '.', index: 0 })
        );
        assert_eq!(
            TenantId::new("zürich"),
            Err(TenantIdError::InvalidChar { ch: 'ü', index: 1 })
        );
        for bad in ["a b", "a\0", "a\n", "a;", "a$1", "é", "ａ"] {
            assert!(TenantId::new(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn long_non_ascii_input_reports_the_character_not_the_length() {
        let err = TenantId::new(&"é".repeat(40)).unwrap_err();
        assert!(matches!(
            err,
            TenantIdError::InvalidChar { ch: 'é', index: 0 }
        ));
    }

    #[test]
    fn deserialization_validates() {
        let ok: TenantId = serde_json::from_str("\"acme\"").unwrap();
        assert_eq!(ok.as_str(), "acme");
        let err = serde_json::from_str::<TenantId>("\"a;b\"").unwrap_err();
        assert!(err.to_string().contains("';'"), "{err}");
    }

    #[test]
    fn templates_render_valid_identifiers() {
        let t = NameTemplate::new("tenant_{id}_v2").unwrap();
        let id = TenantId::new("acme").unwrap();
        assert_eq!(t.render(&id).as_deref(), Some("tenant_acme_v2"));
        assert_eq!(t.to_string(), "tenant_{id}_v2");
        assert_eq!(t.max_tenant_len(), 63 - 10);
        let long = TenantId::new(&"x".repeat(60)).unwrap();
        assert_eq!(t.render(&long), None);
    }

    #[test]
    fn overlapping_templates_are_detected() {
        let t = |s: &str| NameTemplate::new(s).unwrap();
        assert!(t("t_{id}").may_collide_with(&t("t_a_{id}")));
        assert!(t("t_{id}").may_collide_with(&t("t_{id}_x")));
        assert!(!t("t_{id}").may_collide_with(&t("t_{id}")));
        assert!(!t("free_{id}").may_collide_with(&t("paid_{id}")));
        // The collision the check exists for.
        let a = TenantId::new("a_b").unwrap();
        let b = TenantId::new("b").unwrap();
        assert_eq!(t("t_{id}").render(&a), t("t_a_{id}").render(&b));
    }

    #[test]
    fn templates_reject_unsafe_or_impossible_patterns() {
        assert!(matches!(
            NameTemplate::new("tenant"),
            Err(TemplateError::Placeholder { .. })
        ));
        assert!(matches!(
            NameTemplate::new("{id}_{id}"),
            Err(TemplateError::Placeholder { .. })
        ));
        assert!(matches!(
            NameTemplate::new("t\"{id}"),
            Err(TemplateError::InvalidChar { ch: '"', .. })
        ));
        assert!(matches!(
            NameTemplate::new("t-{id}"),
            Err(TemplateError::InvalidChar { ch: '-', .. })
        ));
        assert!(matches!(
            NameTemplate::new(&format!("{}{{id}}", "p".repeat(63))),
            Err(TemplateError::TooLong { .. })
        ));
    }

    #[test]
    fn can_render_finds_exactly_the_names_a_tenant_can_reach() {
        let t = |s: &str| NameTemplate::new(s).unwrap();
        assert!(t("{id}").can_render("default"));
        assert!(t("{id}").can_render("template1"));
        assert!(!t("{id}").can_render("a.b"));
        assert!(!t("{id}").can_render(""));
        assert!(t("db_{id}_v1").can_render("db_x_v1"));
        assert!(!t("db_{id}_v1").can_render("db__v1"));
        assert!(!t("tenant_{id}").can_render_ignoring_case("ADMIN"));
        assert!(t("{id}").can_render("ADMIN"));
        assert!(t("Ten_{id}").can_render_ignoring_case("ten_admin"));
        assert!(!t("Ten_{id}").can_render("ten_admin"));
    }

    #[test]
    fn isolation_uses_lowercase_names() {
        let i: Isolation = serde_json::from_str("\"schema\"").unwrap();
        assert_eq!(i, Isolation::Schema);
        assert_eq!(Isolation::Row.to_string(), "row");
    }
}
