//! `switchyard check`: validate, connect, probe every endpoint.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use switchyard_config::{ConfigError, ConfigSource, RouterSet};

use crate::table;

/// Exit code for an invalid configuration.
pub const INVALID: u8 = 2;
/// Exit code when some cluster has no healthy endpoint.
pub const UNHEALTHY: u8 = 1;

/// Prints every problem of `error` to stderr.
pub fn print_invalid(error: &ConfigError) {
    eprintln!("switchyard: invalid configuration");
    if error.problems().is_empty() {
        eprintln!("  {error}");
    }
    for p in error.problems() {
        eprintln!("  {p}");
    }
}

/// Runs the check; returns the exit code.
pub async fn run(dir: &Path, env: &str, json: bool) -> u8 {
    let settings = match ConfigSource::new(dir, env).load() {
        Ok(s) => s,
        Err(e) => {
            print_invalid(&e);
            return INVALID;
        }
    };
    let routers = match RouterSet::build(&settings) {
        Ok(r) => r,
        Err(e) => {
            print_invalid(&e);
            return INVALID;
        }
    };
    let timeout = settings
        .clusters
        .values()
        .map(|c| c.router.health.timeout)
        .max()
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_secs(1));
    let probes = routers.probe_all(timeout).await;
    let mut healthy: BTreeMap<&str, usize> =
        settings.clusters.keys().map(|k| (k.as_str(), 0)).collect();
    for p in &probes {
        if p.result.is_ok() {
            *healthy.entry(p.cluster.as_str()).or_default() += 1;
        }
    }
    let all_ok = healthy.values().all(|n| *n > 0);
    if json {
        let endpoints: Vec<_> = probes
            .iter()
            .map(|p| {
                json!({
                    "cluster": p.cluster,
                    "endpoint": p.endpoint,
                    "role": p.role.to_string(),
                    "healthy": p.result.is_ok(),
                    "latency_ms": p.result.as_ref().ok().map(|d| d.as_secs_f64() * 1000.0),
                    "lag_ms": p.lag.map(|d| d.as_secs_f64() * 1000.0),
                    "error": p.result.as_ref().err(),
                })
            })
            .collect();
        let clusters: serde_json::Map<String, serde_json::Value> = healthy
            .iter()
            .map(|(k, n)| ((*k).to_owned(), json!({ "healthy_endpoints": n })))
            .collect();
        println!(
            "{}",
            json!({ "ok": all_ok, "clusters": clusters, "endpoints": endpoints })
        );
    } else {
        let rows: Vec<Vec<String>> = probes
            .iter()
            .map(|p| {
                vec![
                    p.cluster.clone(),
                    p.endpoint.clone(),
                    p.role.to_string(),
                    match &p.result {
                        Ok(_) => "up".to_owned(),
                        Err(e) => format!("down: {e}"),
                    },
                    table::ms(p.result.as_ref().ok().copied()),
                    table::ms(p.lag),
                ]
            })
            .collect();
        print!(
            "{}",
            table::render(
                &["CLUSTER", "ENDPOINT", "ROLE", "HEALTH", "LATENCY", "LAG"],
                &rows
            )
        );
        for (cluster, n) in &healthy {
            if *n == 0 {
                println!("cluster {cluster}: no healthy endpoint");
            }
        }
    }
    drop(routers);
    if all_ok {
        0
    } else {
        UNHEALTHY
    }
}
