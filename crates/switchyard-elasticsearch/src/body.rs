//! What a scoped handle lets through in a search body, and how a row-scoped
//! one narrows queries and checks what comes back.
//!
//! The handle fixes the index (or alias) in the URL, but the query DSL has
//! ways to read other indices or documents from inside the body, and a shared
//! index has index-wide statistics that ignore filters. Keys that do either
//! are refused wherever they appear (a field literally named `index` is
//! refused too; rename it or query it from an unscoped checkout).

use serde_json::{json, Map, Value};
use switchyard_core::TenantId;

use crate::error::EsError;

/// Refused on every scoped checkout: they name other indices or point in time
/// (terms lookup, `indexed_shape`, `percolate` by id, `more_like_this` docs
/// with `_index`, `pit`, `indices_boost`).
const INDEX_KEYS: &[(&str, &str)] = &[
    ("index", "it names an index (terms lookup, percolate, ...)"),
    ("_index", "it names an index"),
    ("indices", "it names indices"),
    ("indices_boost", "it names indices"),
    ("indexed_shape", "it fetches a document from another index"),
    ("pit", "a point in time carries its own indices"),
];

/// Also refused on row-scoped checkouts (a shared index): these read
/// documents or statistics past the alias filter.
const ROW_KEYS: &[(&str, &str)] = &[
    ("global", "the global aggregation ignores the query"),
    (
        "suggest",
        "suggesters read terms of every document in the index",
    ),
    ("significant_terms", "its background set is the whole index"),
    ("significant_text", "its background set is the whole index"),
    (
        "more_like_this",
        "liked documents are fetched past the alias filter",
    ),
    ("explain", "explanations show index-wide term statistics"),
    (
        "knn",
        "not verified to honour alias filters on every version",
    ),
    ("retriever", "its queries are not narrowed by the handle"),
    ("sub_searches", "its queries are not narrowed by the handle"),
];

/// `min_doc_count` below 1 lists terms of every document in the shard.
const ZERO_MIN_DOC_COUNT: &str = "with 0 it lists terms of other tenants' documents";

/// `profile: true` on a shared index: profiles name the terms each shard's
/// queries rewrote into, across the whole index.
const PROFILE: &str = "a profile shows index-wide terms past the alias filter";

/// Whether `value` is a `min_doc_count` of at least 1 as Elasticsearch would
/// read it: it coerces strings (`"0"`) and truncates fractions (`0.5`), so
/// the parsed value is compared, not the JSON type.
fn at_least_one(value: &Value) -> bool {
    let parsed = match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    parsed.is_some_and(|n| n >= 1.0)
}

/// Fails with [`EsError::ForbiddenKey`] if `body` holds a refused key.
pub(crate) fn guard(body: &Value, row: bool) -> Result<(), EsError> {
    walk(body, &mut String::new(), row)
}

fn walk(value: &Value, path: &mut String, row: bool) -> Result<(), EsError> {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let refused = INDEX_KEYS
                    .iter()
                    .chain(if row { ROW_KEYS } else { &[] })
                    .find(|(k, _)| k == key)
                    .map(|(_, why)| *why)
                    .or_else(|| {
                        (row && key == "min_doc_count" && !at_least_one(child))
                            .then_some(ZERO_MIN_DOC_COUNT)
                    })
                    .or_else(|| {
                        (row && path.is_empty() && key == "profile" && *child != Value::Bool(false))
                            .then_some(PROFILE)
                    });
                if let Some(reason) = refused {
                    return Err(EsError::ForbiddenKey {
                        key: key.chars().take(80).collect(),
                        path: if path.is_empty() {
                            "/".into()
                        } else {
                            path.clone()
                        },
                        mode: if row { "row" } else { "index" },
                        reason,
                    });
                }
                let len = path.len();
                path.push('/');
                path.push_str(&key.replace('~', "~0").replace('/', "~1"));
                walk(child, path, row)?;
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push('/');
                path.push_str(&i.to_string());
                walk(item, path, row)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// The body as an object (`null` is an empty body).
pub(crate) fn object(body: Value, what: &'static str) -> Result<Map<String, Value>, EsError> {
    match body {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(Map::new()),
        _ => Err(EsError::NotAnObject { what }),
    }
}

/// `{"bool": {"filter": [{"term": {field: tenant}}], "must": [query]}}`: the
/// handle's own tenant filter, on top of the alias filter.
pub(crate) fn tenant_query(query: Option<Value>, field: &str, tenant: &TenantId) -> Value {
    let mut term = Map::new();
    term.insert(field.to_owned(), Value::String(tenant.as_str().to_owned()));
    let mut filter = json!({ "bool": { "filter": [ { "term": term } ] } });
    if let Some(query) = query {
        filter["bool"]["must"] = json!([query]);
    }
    filter
}

/// The stored `_id` of a tenant's document in a shared index.
pub(crate) fn stored_id(tenant: &TenantId, id: &str) -> String {
    format!("{tenant}:{id}")
}

/// Checks that `source` (a document's `_source`) carries `tenant` in `field`,
/// when it carries the field at all (a search may filter `_source`).
pub(crate) fn source_is_tenants(source: &Value, field: &str, tenant: &TenantId) -> bool {
    match source.get(field) {
        None => true,
        Some(Value::String(s)) => s == tenant.as_str(),
        Some(_) => false,
    }
}

/// Rewrites a row-scoped search response: every hit's `_id` loses the
/// tenant prefix, and a hit of another tenant is an error, never returned.
pub(crate) fn check_hits(
    response: &mut Value,
    field: &str,
    tenant: &TenantId,
) -> Result<(), EsError> {
    let prefix = format!("{tenant}:");
    let Some(hits) = response
        .pointer_mut("/hits/hits")
        .and_then(Value::as_array_mut)
    else {
        return Ok(());
    };
    for hit in hits {
        let stored = hit.get("_id").and_then(Value::as_str).unwrap_or_default();
        let foreign = || EsError::ForeignDocument {
            id: stored.chars().take(120).collect(),
            tenant: tenant.clone(),
        };
        let Some(local) = stored.strip_prefix(&prefix) else {
            return Err(foreign());
        };
        if let Some(source) = hit.get("_source") {
            if !source_is_tenants(source, field, tenant) {
                return Err(foreign());
            }
        }
        let local = local.to_owned();
        hit["_id"] = Value::String(local);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    #[test]
    fn index_reaching_keys_are_refused_everywhere() {
        let lookup =
            json!({"query": {"terms": {"x": {"index": "shared", "id": "b:1", "path": "x"}}}});
        let err = guard(&lookup, false).unwrap_err();
        assert!(err.to_string().contains("/query/terms/x"), "{err}");
        assert!(guard(&json!({"pit": {"id": "abc"}}), false).is_err());
        assert!(guard(&json!({"query": {"bool": {"should": [{"more_like_this": {"like": [{"_index": "x", "_id": "1"}]}}]}}}), false).is_err());
        assert!(guard(&json!({"query": {"match": {"title": "index"}}}), true).is_ok());
    }

    #[test]
    fn row_scope_refuses_index_wide_statistics() {
        for body in [
            json!({"aggs": {"all": {"global": {}}}}),
            json!({"suggest": {"s": {"text": "x", "term": {"field": "title"}}}}),
            json!({"aggs": {"s": {"significant_terms": {"field": "tag"}}}}),
            json!({"aggs": {"t": {"terms": {"field": "tag", "min_doc_count": 0}}}}),
            json!({"explain": true}),
            json!({"knn": {"field": "v", "query_vector": [1.0], "k": 1}}),
        ] {
            assert!(guard(&body, true).is_err(), "{body}");
            assert!(guard(&body, false).is_ok(), "{body}");
        }
        assert!(guard(
            &json!({"aggs": {"t": {"terms": {"field": "tag", "min_doc_count": 1}}}}),
            true
        )
        .is_ok());
        // Elasticsearch coerces strings and truncates fractions.
        for zero in [
            json!("0"),
            json!(" 0 "),
            json!("0.0"),
            json!(0.5),
            json!("-1"),
            json!(null),
            json!("x"),
        ] {
            let body = json!({"aggs": {"t": {"terms": {"field": "tag", "min_doc_count": zero}}}});
            assert!(guard(&body, true).is_err(), "{body}");
        }
        assert!(guard(
            &json!({"aggs": {"t": {"terms": {"field": "tag", "min_doc_count": "2"}}}}),
            true
        )
        .is_ok());
        assert!(guard(&json!({"profile": true}), true).is_err());
        assert!(guard(&json!({"profile": "true"}), true).is_err());
        assert!(guard(&json!({"profile": false}), true).is_ok());
        assert!(guard(&json!({"profile": true}), false).is_ok());
        // A field named `profile` is data, not the option.
        assert!(guard(&json!({"query": {"match": {"profile": "x"}}}), true).is_ok());
    }

    #[test]
    fn tenant_query_wraps_the_callers_query() {
        let q = tenant_query(Some(json!({"match_all": {}})), "tenant_id", &t("a"));
        assert_eq!(
            q,
            json!({"bool": {"filter": [{"term": {"tenant_id": "a"}}], "must": [{"match_all": {}}]}})
        );
        let q = tenant_query(None, "tenant_id", &t("a"));
        assert_eq!(
            q,
            json!({"bool": {"filter": [{"term": {"tenant_id": "a"}}]}})
        );
    }

    #[test]
    fn hits_lose_their_prefix_and_foreign_ones_fail() {
        let mut ok = json!({"hits": {"hits": [{"_id": "a:1", "_source": {"tenant_id": "a"}}, {"_id": "a:b:2"}]}});
        check_hits(&mut ok, "tenant_id", &t("a")).unwrap();
        assert_eq!(ok["hits"]["hits"][0]["_id"], "1");
        assert_eq!(ok["hits"]["hits"][1]["_id"], "b:2");
        let mut foreign = json!({"hits": {"hits": [{"_id": "b:1"}]}});
        assert!(check_hits(&mut foreign, "tenant_id", &t("a")).is_err());
        let mut planted =
            json!({"hits": {"hits": [{"_id": "a:1", "_source": {"tenant_id": "b"}}]}});
        assert!(check_hits(&mut planted, "tenant_id", &t("a")).is_err());
        // `ab:1` is not `a:` + anything.
        let mut prefix = json!({"hits": {"hits": [{"_id": "ab:1"}]}});
        assert!(check_hits(&mut prefix, "tenant_id", &t("a")).is_err());
    }
}
