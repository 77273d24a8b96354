#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Every operation of a tenant handle, at every isolation level, lands in the
//! tenant's namespace and works as the driver's own would.

mod common;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::{FindOneOptions, FindOptions, ReplaceOptions, UpdateOptions};
use switchyard_core::{Isolation, TenantId};

use common::*;

fn sorted(mut v: Vec<Bson>) -> Vec<Bson> {
    v.sort_by_key(|b| b.to_string());
    v
}

#[tokio::test]
async fn every_operation_works_within_each_isolation_level() {
    let server = server().await;
    let url = server.url().to_owned();
    let tag = unique("op");
    let shared = format!("{tag}_shared");
    let backend = backend(&url, &shared, 4);
    let raw = raw_client(&url).await;
    let mut dbs = vec![shared.clone()];

    for level in [Isolation::Database, Isolation::Schema, Isolation::Row] {
        let name = format!("ops{}", tier(level));
        let id = TenantId::new(&name).unwrap();
        let registry = registry(&tag, 2).with_tenant(id.clone(), tier(level));
        let entry = registry.resolve(&id).unwrap();
        let conn = checkout(&backend, &entry).await;
        assert_eq!(conn.isolation(), Some(level));
        let items = conn.collection("items").unwrap();
        let (db, real) = real_namespace(&shared, &entry, "items");
        assert_eq!(
            (items.database_name(), items.real_name()),
            (db.as_str(), real.as_str())
        );
        if level == Isolation::Database {
            dbs.push(db.clone());
        }

        items
            .insert_one(doc! { "n": 1, "c": "x" }, None)
            .await
            .unwrap();
        let many = items
            .insert_many(
                (2..=5).map(|n| doc! { "n": n, "c": if n % 2 == 0 { "y" } else { "x" } }),
                None,
            )
            .await
            .unwrap();
        assert_eq!(many.inserted_ids.len(), 4);

        let sorted_desc = FindOptions::builder()
            .sort(doc! { "n": -1 })
            .limit(2)
            .build();
        let top = items.find(doc! {}, sorted_desc).await.unwrap();
        assert_eq!(
            top.iter()
                .map(|d| d.get_i32("n").unwrap())
                .collect::<Vec<_>>(),
            [5, 4]
        );
        let one = items
            .find_one(
                doc! { "c": "y" },
                FindOneOptions::builder().sort(doc! { "n": 1 }).build(),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(one.get_i32("n").unwrap(), 2);
        let cursor = items
            .find_cursor(doc! { "n": { "$gte": 3 } }, None)
            .await
            .unwrap();
        let streamed: Vec<Document> = cursor.try_collect().await.unwrap();
        assert_eq!(streamed.len(), 3);

        let updated = items
            .update_one(doc! { "n": 1 }, doc! { "$set": { "c": "z" } }, None)
            .await
            .unwrap();
        assert_eq!(updated.modified_count, 1);
        let bumped = items
            .update_many(doc! { "c": "y" }, doc! { "$inc": { "n": 100 } }, None)
            .await
            .unwrap();
        assert_eq!(bumped.modified_count, 2);
        let upserted = items
            .update_one(
                doc! { "n": 7 },
                doc! { "$set": { "c": "u" } },
                UpdateOptions::builder().upsert(true).build(),
            )
            .await
            .unwrap();
        assert!(upserted.upserted_id.is_some());
        let replaced = items
            .replace_one(doc! { "n": 3 }, doc! { "n": 30, "c": "r" }, None)
            .await
            .unwrap();
        assert_eq!(replaced.modified_count, 1);
        let replace_upsert = items
            .replace_one(
                doc! { "n": 8 },
                doc! { "n": 8, "c": "ru" },
                ReplaceOptions::builder().upsert(true).build(),
            )
            .await
            .unwrap();
        assert!(replace_upsert.upserted_id.is_some());

        // n: 102, 104 (y), 1 (z), 30 (r), 5 (x), 7 (u), 8 (ru)
        assert_eq!(items.count_documents(doc! {}, None).await.unwrap(), 7);
        assert_eq!(
            sorted(items.distinct("c", doc! {}, None).await.unwrap()),
            sorted(["r", "ru", "u", "x", "y", "z"].map(Bson::from).to_vec())
        );
        let sums = items
            .aggregate(
                [
                    doc! { "$match": { "c": { "$in": ["x", "y"] } } },
                    doc! { "$group": { "_id": "$c", "total": { "$sum": "$n" } } },
                    doc! { "$sort": { "_id": 1 } },
                ],
                None,
            )
            .await
            .unwrap();
        let sums: Vec<(String, i64)> = sums
            .iter()
            .map(|d| {
                let total = match d.get("total").unwrap() {
                    Bson::Int32(n) => i64::from(*n),
                    Bson::Int64(n) => *n,
                    other => panic!("{other}"),
                };
                (d.get_str("_id").unwrap().to_owned(), total)
            })
            .collect();
        assert_eq!(sums, [("x".to_owned(), 5), ("y".to_owned(), 206)]);

        assert_eq!(
            items
                .delete_one(doc! { "c": "y" }, None)
                .await
                .unwrap()
                .deleted_count,
            1
        );
        assert_eq!(
            items
                .delete_many(doc! { "n": { "$lt": 10 } }, None)
                .await
                .unwrap()
                .deleted_count,
            4
        );

        // What is stored: two documents left (a "y" above 100, and 30), in the tenant's namespace, and for
        // row isolation stamped with the tenant.
        let stored = all_docs(&raw, &db, &real).await;
        let stored: Vec<&Document> = stored
            .iter()
            .filter(|d| level != Isolation::Row || d.get_str("tenant_id") == Ok(name.as_str()))
            .collect();
        assert_eq!(stored.len(), 2, "{level}: {stored:?}");
        if level == Isolation::Row {
            assert!(stored
                .iter()
                .all(|d| d.get_str("tenant_id") == Ok(name.as_str())));
        } else {
            assert!(
                stored.iter().all(|d| !d.contains_key("tenant_id")),
                "{stored:?}"
            );
        }
    }
    cleanup(&server, &url, dbs).await;
}
