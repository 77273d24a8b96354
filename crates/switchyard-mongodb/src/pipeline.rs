//! Aggregation pipelines confined to a tenant's scope.
//!
//! Most stages only transform the documents that reach them, and those are the
//! tenant's already. What can escape are the stages that name another
//! collection or database (`$lookup`, `$graphLookup`, `$unionWith`, `$out`,
//! `$merge`), stages that look at the whole cluster (`$changeStream`,
//! `$currentOp`, `$listSessions`, ...), and, for row-level tenants who share a
//! collection, stages that describe the whole collection (`$collStats`,
//! `$indexStats`, `$search`, ...). Per isolation level:
//!
//! | stage | database | collection prefix | row |
//! |---|---|---|---|
//! | `$lookup`, `$graphLookup`, `$unionWith`, `$out`, `$merge` | allowed in the tenant database; naming another database is refused | collection names are prefixed (`from: "items"` reads `tenant_a__items`); another database is refused | refused |
//! | cluster-wide stages | refused | refused | refused |
//! | collection-wide stages | allowed | allowed | refused |
//!
//! Sub-pipelines (`$facet`, `$lookup.pipeline`, `$unionWith.pipeline`,
//! `$merge.whenMatched`) are confined by the same rules, recursively. A stage
//! must have exactly one field. Row-level pipelines additionally start with a
//! `$match` on the tenant field, added by the handle.

use mongodb::bson::{Bson, Document};
use switchyard_core::Isolation;

use crate::error::MongoError;
use crate::names::{check_namespace, prefixed};

/// Stages that read or write another collection.
const CROSS_COLLECTION: &[&str] = &["$lookup", "$graphLookup", "$unionWith", "$out", "$merge"];

/// Stages that see beyond one database.
const CLUSTER_WIDE: &[&str] = &[
    "$changeStream",
    "$changeStreamSplitLargeEvent",
    "$currentOp",
    "$listSessions",
    "$listLocalSessions",
    "$listSampledQueries",
    "$listClusterCatalog",
    "$shardedDataDistribution",
    "$querySettings",
];

/// Stages that describe a whole collection, which row-level tenants share.
const COLLECTION_WIDE: &[&str] = &[
    "$collStats",
    "$indexStats",
    "$planCacheStats",
    "$listSearchIndexes",
    "$search",
    "$searchMeta",
    "$vectorSearch",
];

/// How far a pipeline may reach.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Policy<'a> {
    /// Unscoped: anything goes.
    Open,
    /// Database isolation: any collection of `database`.
    Database { database: &'a str },
    /// Collection-prefix isolation: collections of `database` under `prefix`.
    Prefix { database: &'a str, prefix: &'a str },
    /// Row isolation: the one collection, no cross-collection stages.
    Row,
}

impl Policy<'_> {
    fn isolation(&self) -> Option<Isolation> {
        match self {
            Policy::Open => None,
            Policy::Database { .. } => Some(Isolation::Database),
            Policy::Prefix { .. } => Some(Isolation::Schema),
            Policy::Row => Some(Isolation::Row),
        }
    }

    /// The real name of collection `name` named inside a stage.
    fn collection(&self, stage: &str, name: &Bson) -> Result<Bson, MongoError> {
        let Bson::String(name) = name else {
            return Err(invalid(stage, "a collection name must be a string"));
        };
        match self {
            Policy::Prefix { database, prefix } => {
                let real = prefixed(prefix, name)?;
                check_namespace(database, &real)?;
                Ok(Bson::String(real))
            }
            _ => Ok(Bson::String(name.clone())),
        }
    }

    /// Checks a database named inside a stage.
    fn database(&self, stage: &str, db: &Bson) -> Result<(), MongoError> {
        let own = match self {
            Policy::Database { database } | Policy::Prefix { database, .. } => *database,
            Policy::Open | Policy::Row => return Ok(()),
        };
        match db {
            Bson::String(db) if db == own => Ok(()),
            Bson::String(db) => Err(MongoError::ForeignNamespace {
                stage: stage.to_owned(),
                database: db.clone(),
            }),
            _ => Err(invalid(stage, "a database name must be a string")),
        }
    }
}

fn invalid(stage: &str, reason: &'static str) -> MongoError {
    MongoError::InvalidStage {
        stage: stage.to_owned(),
        reason,
    }
}

/// Checks every stage of `pipeline` against `policy`, renaming collections for
/// prefix tenants.
pub(crate) fn confine(
    pipeline: Vec<Document>,
    policy: Policy<'_>,
) -> Result<Vec<Document>, MongoError> {
    let Some(isolation) = policy.isolation() else {
        return Ok(pipeline);
    };
    pipeline
        .into_iter()
        .map(|stage| confine_stage(stage, policy, isolation))
        .collect()
}

fn confine_stage(
    stage: Document,
    policy: Policy<'_>,
    isolation: Isolation,
) -> Result<Document, MongoError> {
    if stage.len() != 1 {
        let name = stage.keys().next().cloned().unwrap_or_default();
        return Err(invalid(&name, "a stage must have exactly one field"));
    }
    let mut out = Document::new();
    for (name, spec) in stage {
        let forbidden = CLUSTER_WIDE.contains(&name.as_str())
            || (isolation == Isolation::Row
                && (CROSS_COLLECTION.contains(&name.as_str())
                    || COLLECTION_WIDE.contains(&name.as_str())));
        if forbidden {
            return Err(MongoError::ForbiddenStage {
                stage: name,
                isolation,
            });
        }
        let spec = match name.as_str() {
            "$facet" => facet(&name, spec, policy, isolation)?,
            "$lookup" | "$graphLookup" => lookup(&name, spec, policy, isolation)?,
            "$unionWith" => union_with(&name, spec, policy, isolation)?,
            "$out" => output(&name, spec, policy, "coll")?,
            "$merge" => merge(&name, spec, policy, isolation)?,
            _ => spec,
        };
        out.insert(name, spec);
    }
    Ok(out)
}

/// Confines an array of stages found inside a stage.
fn sub_pipeline(
    stage: &str,
    value: Bson,
    policy: Policy<'_>,
    isolation: Isolation,
) -> Result<Bson, MongoError> {
    let Bson::Array(stages) = value else {
        return Err(invalid(stage, "a sub-pipeline must be an array of stages"));
    };
    let stages = stages
        .into_iter()
        .map(|s| match s {
            Bson::Document(d) => confine_stage(d, policy, isolation).map(Bson::Document),
            _ => Err(invalid(stage, "a sub-pipeline stage must be a document")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Bson::Array(stages))
}

fn spec_document(stage: &str, spec: Bson) -> Result<Document, MongoError> {
    match spec {
        Bson::Document(d) => Ok(d),
        _ => Err(invalid(stage, "its argument must be a document")),
    }
}

fn facet(stage: &str, spec: Bson, policy: Policy<'_>, iso: Isolation) -> Result<Bson, MongoError> {
    let facets = spec_document(stage, spec)?;
    let mut out = Document::new();
    for (name, pipeline) in facets {
        out.insert(name, sub_pipeline(stage, pipeline, policy, iso)?);
    }
    Ok(Bson::Document(out))
}

/// `{db, coll}` or a bare name, as `$lookup.from`, `$out` and `$merge.into`
/// accept.
fn namespace(
    stage: &str,
    value: Bson,
    policy: Policy<'_>,
    coll_key: &str,
) -> Result<Bson, MongoError> {
    match value {
        Bson::String(_) => policy.collection(stage, &value),
        Bson::Document(mut ns) => {
            if let Some(db) = ns.get("db") {
                policy.database(stage, db)?;
            }
            if let Some(coll) = ns.get(coll_key) {
                let real = policy.collection(stage, coll)?;
                ns.insert(coll_key, real);
            }
            Ok(Bson::Document(ns))
        }
        _ => Err(invalid(stage, "a namespace must be a name or {db, coll}")),
    }
}

fn lookup(stage: &str, spec: Bson, policy: Policy<'_>, iso: Isolation) -> Result<Bson, MongoError> {
    let mut spec = spec_document(stage, spec)?;
    if let Some(from) = spec.remove("from") {
        spec.insert("from", namespace(stage, from, policy, "coll")?);
    }
    if let Some(pipeline) = spec.remove("pipeline") {
        spec.insert("pipeline", sub_pipeline(stage, pipeline, policy, iso)?);
    }
    Ok(Bson::Document(spec))
}

fn union_with(
    stage: &str,
    spec: Bson,
    policy: Policy<'_>,
    iso: Isolation,
) -> Result<Bson, MongoError> {
    match spec {
        Bson::String(_) => policy.collection(stage, &spec),
        Bson::Document(mut spec) => {
            if let Some(db) = spec.get("db") {
                policy.database(stage, db)?;
            }
            if let Some(coll) = spec.remove("coll") {
                spec.insert("coll", policy.collection(stage, &coll)?);
            }
            if let Some(pipeline) = spec.remove("pipeline") {
                spec.insert("pipeline", sub_pipeline(stage, pipeline, policy, iso)?);
            }
            Ok(Bson::Document(spec))
        }
        _ => Err(invalid(stage, "its argument must be a name or a document")),
    }
}

fn output(stage: &str, spec: Bson, policy: Policy<'_>, coll_key: &str) -> Result<Bson, MongoError> {
    namespace(stage, spec, policy, coll_key)
}

fn merge(stage: &str, spec: Bson, policy: Policy<'_>, iso: Isolation) -> Result<Bson, MongoError> {
    match spec {
        Bson::String(_) => policy.collection(stage, &spec),
        Bson::Document(mut spec) => {
            let Some(into) = spec.remove("into") else {
                return Err(invalid(stage, "it needs an 'into' field"));
            };
            spec.insert("into", output(stage, into, policy, "coll")?);
            if let Some(when) = spec.remove("whenMatched") {
                let when = match when {
                    Bson::Array(_) => sub_pipeline(stage, when, policy, iso)?,
                    other => other,
                };
                spec.insert("whenMatched", when);
            }
            Ok(Bson::Document(spec))
        }
        _ => Err(invalid(stage, "its argument must be a name or a document")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    const DB: Policy<'static> = Policy::Database {
        database: "tenant_a",
    };
    const PREFIX: Policy<'static> = Policy::Prefix {
        database: "shared",
        prefix: "tenant_a",
    };

    fn forbidden(r: Result<Vec<Document>, MongoError>) -> bool {
        matches!(r, Err(MongoError::ForbiddenStage { .. }))
    }

    #[test]
    fn row_pipelines_refuse_every_cross_collection_stage_even_nested() {
        for stage in [
            doc! { "$lookup": { "from": "items", "localField": "a", "foreignField": "b", "as": "j" } },
            doc! { "$graphLookup": { "from": "items", "startWith": "$a", "connectFromField": "a", "connectToField": "b", "as": "g" } },
            doc! { "$unionWith": "items" },
            doc! { "$out": "copy" },
            doc! { "$merge": { "into": "copy" } },
            doc! { "$collStats": {} },
            doc! { "$currentOp": {} },
            doc! { "$facet": { "x": [{ "$unionWith": "items" }] } },
            doc! { "$facet": { "x": [{ "$facet": { "y": [{ "$lookup": { "from": "z" } }] } }] } },
        ] {
            assert!(
                forbidden(confine(vec![stage.clone()], Policy::Row)),
                "{stage}"
            );
        }
        let ok = vec![
            doc! { "$match": { "n": 1 } },
            doc! { "$group": { "_id": "$x" } },
        ];
        assert_eq!(confine(ok.clone(), Policy::Row).unwrap(), ok);
    }

    #[test]
    fn prefix_pipelines_are_renamed_into_the_prefix() {
        let got = confine(
            vec![
                doc! { "$lookup": { "from": "items", "as": "j", "pipeline": [
                    { "$unionWith": { "coll": "more", "pipeline": [{ "$lookup": { "from": "deep", "as": "d" } }] } }
                ] } },
                doc! { "$graphLookup": { "from": "items", "as": "g" } },
                doc! { "$unionWith": "other" },
                doc! { "$facet": { "f": [{ "$lookup": { "from": { "db": "shared", "coll": "x" }, "as": "y" } }] } },
                doc! { "$merge": { "into": "copy", "whenMatched": [{ "$set": { "m": 1 } }] } },
            ],
            PREFIX,
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                doc! { "$lookup": { "from": "tenant_a__items", "as": "j", "pipeline": [
                    { "$unionWith": { "coll": "tenant_a__more", "pipeline": [{ "$lookup": { "from": "tenant_a__deep", "as": "d" } }] } }
                ] } },
                doc! { "$graphLookup": { "from": "tenant_a__items", "as": "g" } },
                doc! { "$unionWith": "tenant_a__other" },
                doc! { "$facet": { "f": [{ "$lookup": { "from": { "db": "shared", "coll": "tenant_a__x" }, "as": "y" } }] } },
                doc! { "$merge": { "into": "tenant_a__copy", "whenMatched": [{ "$set": { "m": 1 } }] } },
            ]
        );
        assert_eq!(
            confine(vec![doc! { "$out": "copy" }], PREFIX).unwrap(),
            vec![doc! { "$out": "tenant_a__copy" }]
        );
    }

    #[test]
    fn other_databases_are_refused() {
        for policy in [DB, PREFIX] {
            for stage in [
                doc! { "$lookup": { "from": { "db": "other", "coll": "x" }, "as": "y" } },
                doc! { "$out": { "db": "other", "coll": "x" } },
                doc! { "$merge": { "into": { "db": "admin", "coll": "x" } } },
                doc! { "$unionWith": { "db": "other", "coll": "x" } },
                doc! { "$facet": { "f": [{ "$out": { "db": "other", "coll": "x" } }] } },
            ] {
                let r = confine(vec![stage.clone()], policy);
                assert!(
                    matches!(r, Err(MongoError::ForeignNamespace { .. })),
                    "{stage}: {r:?}"
                );
            }
        }
        // Within the tenant database, cross-collection stages are fine.
        let same =
            vec![doc! { "$lookup": { "from": { "db": "tenant_a", "coll": "x" }, "as": "y" } }];
        assert_eq!(confine(same.clone(), DB).unwrap(), same);
    }

    #[test]
    fn malformed_stages_are_refused_not_passed_on() {
        for stage in [
            doc! { "$match": {}, "$lookup": { "from": "x" } },
            doc! { "$lookup": { "from": 1 } },
            doc! { "$lookup": "x" },
            doc! { "$facet": { "x": "notapipeline" } },
            doc! { "$unionWith": { "coll": "$cmd" } },
        ] {
            assert!(confine(vec![stage.clone()], PREFIX).is_err(), "{stage}");
        }
        assert!(forbidden(confine(vec![doc! { "$changeStream": {} }], DB)));
        let open = vec![doc! { "$out": { "db": "anything", "coll": "x" } }];
        assert_eq!(confine(open.clone(), Policy::Open).unwrap(), open);
    }
}
