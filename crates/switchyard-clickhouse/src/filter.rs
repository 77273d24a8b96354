//! Structured row filters: the only `WHERE` a scoped handle accepts.
//!
//! A filter is data, not SQL: column names must be plain identifiers (checked,
//! then backquoted) and every value is bound as a literal by the driver. So a
//! filter can narrow what a tenant sees but can never widen it: there is no way
//! to close a parenthesis, add `OR 1`, `UNION` another table or reach another
//! database through one. That is why the row-scoped handle takes a [`Filter`]
//! rather than a SQL fragment, which no amount of parenthesising makes safe.

use std::fmt::Write as _;

use crate::error::ChError;

/// The longest identifier accepted, in bytes.
pub const MAX_IDENTIFIER_LEN: usize = 128;

/// Checks that `name` is a plain identifier: an ASCII letter or `_`, then
/// ASCII letters, digits or `_`, at most [`MAX_IDENTIFIER_LEN`] bytes.
///
/// Table, column, database and setting names pass through this before they
/// reach SQL, so none can carry a quote, a dot (another database), a space, a
/// comment or a `?` placeholder.
///
/// ```
/// use switchyard_clickhouse::validate_identifier;
///
/// assert!(validate_identifier("events_2024").is_ok());
/// assert!(validate_identifier("other_db.events").is_err());
/// assert!(validate_identifier("events` UNION ALL SELECT").is_err());
/// ```
pub fn validate_identifier(name: &str) -> Result<(), ChError> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err(ChError::invalid_identifier(name, "it is empty"));
    };
    if !(first.is_ascii_alphabetic() || first == '_') {
        return Err(ChError::invalid_identifier(
            name,
            "it must start with an ASCII letter or '_'",
        ));
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ChError::invalid_identifier(
            name,
            "only ASCII letters, digits and '_' are allowed",
        ));
    }
    if name.len() > MAX_IDENTIFIER_LEN {
        return Err(ChError::invalid_identifier(name, "it is too long"));
    }
    Ok(())
}

/// `name` checked and backquoted.
pub(crate) fn quoted(name: &str) -> Result<String, ChError> {
    validate_identifier(name)?;
    Ok(format!("`{name}`"))
}

/// A value compared against a column; always sent as a bound literal.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Value {
    /// A string.
    Str(String),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer.
    UInt(u64),
    /// A float.
    Float(f64),
    /// A boolean (ClickHouse `UInt8` 0/1).
    Bool(bool),
}

macro_rules! value_from {
    ($($t:ty => $variant:ident as $as:ty),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::$variant(<$as>::from(v))
            }
        }
    )*};
}

value_from!(
    i8 => Int as i64, i16 => Int as i64, i32 => Int as i64, i64 => Int as i64,
    u8 => UInt as u64, u16 => UInt as u64, u32 => UInt as u64, u64 => UInt as u64,
    f32 => Float as f64, f64 => Float as f64, bool => Bool as bool,
    String => Str as String, &str => Str as String,
);

impl Value {
    fn bind(&self, query: clickhouse::query::Query) -> clickhouse::query::Query {
        match self {
            Value::Str(s) => query.bind(s.as_str()),
            Value::Int(i) => query.bind(*i),
            Value::UInt(u) => query.bind(*u),
            Value::Float(f) => query.bind(*f),
            Value::Bool(b) => query.bind(u8::from(*b)),
        }
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Like,
}

impl Op {
    fn sql(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Like => "LIKE",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    All,
    Cmp {
        column: String,
        op: Op,
        value: Value,
    },
    In {
        column: String,
        values: Vec<Value>,
    },
    IsNull(String),
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
}

/// A row filter built from column comparisons, combined with `and`, `or` and
/// `negate`.
///
/// ```
/// use switchyard_clickhouse::Filter;
///
/// let f = Filter::ge("ts", 1_700_000_000_u64)
///     .and(Filter::eq("kind", "click").or(Filter::is_in("kind", ["view", "scroll"])))
///     .and(Filter::like("path", "/api/%").negate());
/// # let _ = f;
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Filter(Node);

impl Default for Filter {
    fn default() -> Self {
        Self::all()
    }
}

impl Filter {
    /// Matches every row (of the tenant, on a row-scoped handle).
    pub fn all() -> Self {
        Filter(Node::All)
    }

    fn cmp(column: &str, op: Op, value: impl Into<Value>) -> Self {
        Filter(Node::Cmp {
            column: column.to_owned(),
            op,
            value: value.into(),
        })
    }

    /// `column = value`.
    pub fn eq(column: &str, value: impl Into<Value>) -> Self {
        Self::cmp(column, Op::Eq, value)
    }

    /// `column != value`.
    pub fn ne(column: &str, value: impl Into<Value>) -> Self {
        Self::cmp(column, Op::Ne, value)
    }

    /// `column < value`.
    pub fn lt(column: &str, value: impl Into<Value>) -> Self {
        Self::cmp(column, Op::Lt, value)
    }

    /// `column <= value`.
    pub fn le(column: &str, value: impl Into<Value>) -> Self {
        Self::cmp(column, Op::Le, value)
    }

    /// `column > value`.
    pub fn gt(column: &str, value: impl Into<Value>) -> Self {
        Self::cmp(column, Op::Gt, value)
    }

    /// `column >= value`.
    pub fn ge(column: &str, value: impl Into<Value>) -> Self {
        Self::cmp(column, Op::Ge, value)
    }

    /// `column LIKE pattern` (`%` and `_` are wildcards).
    pub fn like(column: &str, pattern: impl Into<String>) -> Self {
        Self::cmp(column, Op::Like, Value::Str(pattern.into()))
    }

    /// `column IN (values...)`; an empty list matches nothing.
    pub fn is_in<V: Into<Value>>(column: &str, values: impl IntoIterator<Item = V>) -> Self {
        Filter(Node::In {
            column: column.to_owned(),
            values: values.into_iter().map(Into::into).collect(),
        })
    }

    /// `isNull(column)`.
    pub fn is_null(column: &str) -> Self {
        Filter(Node::IsNull(column.to_owned()))
    }

    /// Both this and `other`.
    pub fn and(self, other: Filter) -> Self {
        match (self.0, other.0) {
            (Node::All, n) | (n, Node::All) => Filter(n),
            (Node::And(mut a), Node::And(b)) => {
                a.extend(b);
                Filter(Node::And(a))
            }
            (Node::And(mut a), n) => {
                a.push(n);
                Filter(Node::And(a))
            }
            (a, b) => Filter(Node::And(vec![a, b])),
        }
    }

    /// Either this or `other`.
    pub fn or(self, other: Filter) -> Self {
        match (self.0, other.0) {
            (Node::All, _) | (_, Node::All) => Filter(Node::All),
            (Node::Or(mut a), n) => {
                a.push(n);
                Filter(Node::Or(a))
            }
            (a, b) => Filter(Node::Or(vec![a, b])),
        }
    }

    /// Rows this filter does not match.
    pub fn negate(self) -> Self {
        Filter(Node::Not(Box::new(self.0)))
    }

    /// Renders the filter as SQL with `?` placeholders, collecting the values
    /// to bind in order.
    pub(crate) fn render(&self, sql: &mut String, binds: &mut Vec<Value>) -> Result<(), ChError> {
        render(&self.0, sql, binds)
    }
}

fn render(node: &Node, sql: &mut String, binds: &mut Vec<Value>) -> Result<(), ChError> {
    match node {
        Node::All => sql.push('1'),
        Node::Cmp { column, op, value } => {
            let _ = write!(sql, "{} {} ?", quoted(column)?, op.sql());
            binds.push(value.clone());
        }
        Node::In { column, values } => {
            let column = quoted(column)?;
            if values.is_empty() {
                sql.push('0');
            } else {
                let _ = write!(sql, "{column} IN (");
                for (i, v) in values.iter().enumerate() {
                    sql.push_str(if i == 0 { "?" } else { ", ?" });
                    binds.push(v.clone());
                }
                sql.push(')');
            }
        }
        Node::IsNull(column) => {
            let _ = write!(sql, "isNull({})", quoted(column)?);
        }
        Node::And(nodes) | Node::Or(nodes) => {
            let joiner = if matches!(node, Node::And(_)) {
                " AND "
            } else {
                " OR "
            };
            for (i, n) in nodes.iter().enumerate() {
                if i > 0 {
                    sql.push_str(joiner);
                }
                sql.push('(');
                render(n, sql, binds)?;
                sql.push(')');
            }
        }
        Node::Not(n) => {
            sql.push_str("NOT (");
            render(n, sql, binds)?;
            sql.push(')');
        }
    }
    Ok(())
}

/// Binds `values` to `query` in order.
pub(crate) fn bind_all(
    mut query: clickhouse::query::Query,
    values: &[Value],
) -> clickhouse::query::Query {
    for v in values {
        query = v.bind(query);
    }
    query
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(f: &Filter) -> (String, Vec<Value>) {
        let mut s = String::new();
        let mut b = Vec::new();
        f.render(&mut s, &mut b).unwrap();
        (s, b)
    }

    #[test]
    fn renders_placeholders_and_quoted_columns() {
        let f = Filter::gt("n", 5)
            .and(Filter::eq("kind", "a").or(Filter::is_in("kind", ["b", "c"])))
            .and(Filter::like("path", "/x%").negate());
        let (s, b) = sql(&f);
        assert_eq!(
            s,
            "(`n` > ?) AND ((`kind` = ?) OR (`kind` IN (?, ?))) AND (NOT (`path` LIKE ?))"
        );
        assert_eq!(b.len(), 5);
        assert_eq!(b[0], Value::Int(5));
    }

    #[test]
    fn all_is_neutral_and_empty_in_matches_nothing() {
        assert_eq!(sql(&Filter::all()).0, "1");
        assert_eq!(sql(&Filter::all().and(Filter::eq("a", 1))).0, "`a` = ?");
        assert_eq!(sql(&Filter::is_in::<i64>("a", [])).0, "0");
        assert_eq!(sql(&Filter::eq("a", 1).or(Filter::all())).0, "1");
    }

    #[test]
    fn hostile_columns_are_refused() {
        for bad in [
            "",
            "1=1 OR tenant_id",
            "a`b",
            "db.table",
            "a b",
            "a?",
            "a--",
            "ü",
            &"x".repeat(129),
        ] {
            let mut s = String::new();
            let mut b = Vec::new();
            let err = Filter::eq(bad, 1).render(&mut s, &mut b);
            assert!(err.is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hostile_values_stay_values() {
        let (s, b) = sql(&Filter::eq("name", "') OR 1=1 --"));
        assert_eq!(s, "`name` = ?");
        assert_eq!(b, vec![Value::Str("') OR 1=1 --".into())]);
    }
}
