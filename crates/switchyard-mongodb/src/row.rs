//! Row-level isolation: the tenant field added to every filter and document a
//! row-scoped handle passes on, and the updates it refuses.

use std::sync::Arc;

use mongodb::bson::{doc, Bson, Document};
use switchyard_core::TenantId;

use crate::error::MongoError;

/// The tenant field and value a row-scoped handle enforces.
#[derive(Debug, Clone)]
pub(crate) struct RowGuard {
    field: Arc<str>,
    tenant: TenantId,
}

impl RowGuard {
    pub(crate) fn new(field: Arc<str>, tenant: TenantId) -> Self {
        Self { field, tenant }
    }

    pub(crate) fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    fn value(&self) -> Bson {
        Bson::String(self.tenant.as_str().to_owned())
    }

    /// The tenant condition alone: `{<field>: <tenant>}`.
    pub(crate) fn condition(&self) -> Document {
        let mut d = Document::new();
        d.insert(self.field.as_ref(), self.value());
        d
    }

    /// `filter` confined to the tenant.
    ///
    /// Top-level clauses of a MongoDB filter are ANDed, so when the caller's
    /// filter does not mention the tenant field at the top level the condition
    /// is simply added next to its clauses (`{tenant_id: T, ...filter}`);
    /// otherwise both go under `$and` (`{$and: [{tenant_id: T}, filter]}`), so
    /// the caller's clause can narrow the result but never replace ours. No
    /// operator inside the caller's filter (`$or`, `$where`, `$expr`, ...) can
    /// widen an AND.
    pub(crate) fn filter(&self, filter: Document) -> Document {
        if filter.is_empty() {
            return self.condition();
        }
        if filter.contains_key(self.field.as_ref()) {
            return doc! { "$and": [Bson::Document(self.condition()), Bson::Document(filter)] };
        }
        let mut confined = self.condition();
        confined.extend(filter);
        confined
    }

    /// A document to insert or a replacement: the tenant field is added when
    /// missing, kept when it already names this tenant, and anything else is
    /// refused.
    pub(crate) fn document(&self, mut doc: Document) -> Result<Document, MongoError> {
        match doc.get(self.field.as_ref()) {
            None => {
                doc.insert(self.field.as_ref(), self.value());
                Ok(doc)
            }
            Some(Bson::String(s)) if s == self.tenant.as_str() => Ok(doc),
            Some(other) => Err(MongoError::TenantFieldMismatch {
                field: self.field.to_string(),
                tenant: self.tenant.clone(),
                found: other.clone().into_relaxed_extjson().to_string(),
            }),
        }
    }

    /// Checks an update document: no operator may touch the tenant field (as
    /// a path, a sub-path, or the target of `$rename`).
    pub(crate) fn check_update(&self, update: &Document) -> Result<(), MongoError> {
        check_operators(update)?;
        for (operator, spec) in update {
            let Bson::Document(spec) = spec else {
                return Err(MongoError::InvalidUpdate {
                    reason: "an update operator's argument must be a document",
                });
            };
            for (path, value) in spec {
                let renamed_to = match (operator.as_str(), value) {
                    ("$rename", Bson::String(to)) => Some(to.as_str()),
                    _ => None,
                };
                let touched = [Some(path.as_str()), renamed_to]
                    .into_iter()
                    .flatten()
                    .find(|p| self.touches(p));
                if let Some(touched) = touched {
                    return Err(MongoError::TenantFieldUpdate {
                        field: self.field.to_string(),
                        operator: operator.clone(),
                        path: touched.to_owned(),
                    });
                }
            }
        }
        Ok(())
    }

    /// For an upsert: makes a newly inserted document carry the tenant field
    /// (`$setOnInsert`), whatever the filter's equality clauses seed.
    pub(crate) fn seed_upsert(&self, update: &mut Document) {
        match update.get_mut("$setOnInsert") {
            Some(Bson::Document(on_insert)) => {
                on_insert.insert(self.field.as_ref(), self.value());
            }
            _ => {
                update.insert("$setOnInsert", self.condition());
            }
        }
    }

    /// Whether `path` is the tenant field or inside it.
    fn touches(&self, path: &str) -> bool {
        let field = self.field.as_ref();
        path == field
            || path
                .strip_prefix(field)
                .is_some_and(|rest| rest.starts_with('.'))
    }
}

/// Checks that an update document is made of update operators only.
pub(crate) fn check_operators(update: &Document) -> Result<(), MongoError> {
    if update.is_empty() {
        return Err(MongoError::InvalidUpdate {
            reason: "it is empty",
        });
    }
    if update.keys().any(|k| !k.starts_with('$')) {
        return Err(MongoError::InvalidUpdate {
            reason: "every top-level key must be an update operator such as $set; \
                     use replace_one to replace a document",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> RowGuard {
        RowGuard::new(Arc::from("tenant_id"), TenantId::new("a").unwrap())
    }

    #[test]
    fn filters_are_anded_with_the_tenant() {
        let g = guard();
        assert_eq!(g.filter(doc! {}), doc! { "tenant_id": "a" });
        assert_eq!(
            g.filter(doc! { "n": 1, "$or": [{ "x": 1 }, {}] }),
            doc! { "tenant_id": "a", "n": 1, "$or": [{ "x": 1 }, {}] }
        );
        // Naming the field cannot replace the tenant condition.
        assert_eq!(
            g.filter(doc! { "tenant_id": "b" }),
            doc! { "$and": [{ "tenant_id": "a" }, { "tenant_id": "b" }] }
        );
    }

    #[test]
    fn documents_get_the_tenant_or_are_refused() {
        let g = guard();
        assert_eq!(
            g.document(doc! { "x": 1 }).unwrap(),
            doc! { "x": 1, "tenant_id": "a" }
        );
        assert!(g.document(doc! { "tenant_id": "a" }).is_ok());
        for bad in [
            doc! { "tenant_id": "b" },
            doc! { "tenant_id": 1 },
            doc! { "tenant_id": Bson::Null },
            doc! { "tenant_id": ["a"] },
            doc! { "tenant_id": { "$ne": "a" } },
        ] {
            assert!(
                matches!(
                    g.document(bad.clone()),
                    Err(MongoError::TenantFieldMismatch { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn updates_may_not_touch_the_tenant_field() {
        let g = guard();
        assert!(g
            .check_update(&doc! { "$set": { "n": 1 }, "$inc": { "m": 1 } })
            .is_ok());
        assert!(g
            .check_update(&doc! { "$set": { "tenant_idx": 1 } })
            .is_ok());
        for bad in [
            doc! { "$set": { "tenant_id": "b" } },
            doc! { "$set": { "tenant_id": "a" } },
            doc! { "$set": { "tenant_id.x": 1 } },
            doc! { "$unset": { "tenant_id": "" } },
            doc! { "$rename": { "tenant_id": "old" } },
            doc! { "$rename": { "other": "tenant_id" } },
            doc! { "$setOnInsert": { "tenant_id": "b" } },
            doc! { "$currentDate": { "tenant_id": true } },
            doc! { "$push": { "tenant_id": 1 } },
        ] {
            assert!(
                matches!(
                    g.check_update(&bad),
                    Err(MongoError::TenantFieldUpdate { .. })
                ),
                "{bad}"
            );
        }
        for bad in [doc! {}, doc! { "tenant_id": "b" }, doc! { "$set": 1 }] {
            assert!(
                matches!(g.check_update(&bad), Err(MongoError::InvalidUpdate { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn upserts_seed_the_tenant() {
        let g = guard();
        let mut u = doc! { "$set": { "n": 1 } };
        g.seed_upsert(&mut u);
        assert_eq!(
            u,
            doc! { "$set": { "n": 1 }, "$setOnInsert": { "tenant_id": "a" } }
        );
        let mut u = doc! { "$setOnInsert": { "m": 2 } };
        g.seed_upsert(&mut u);
        assert_eq!(u, doc! { "$setOnInsert": { "m": 2, "tenant_id": "a" } });
    }
}
