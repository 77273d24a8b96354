//! `switchyard check`: validate, connect, probe every endpoint.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use switchyard_config::{
    check_tls, ConfigError, ConfigSource, EndpointProbe, EndpointTls, RouterSet,
};
use switchyard_core::Transport;

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

/// The configured protection, for `--json`.
fn transport_name(transport: Transport) -> &'static str {
    match transport {
        Transport::Plaintext => "plaintext",
        Transport::Opportunistic => "opportunistic_unverified",
        Transport::Unverified => "tls_unverified",
        Transport::Verified => "tls_verified",
        _ => "unknown",
    }
}

/// The ENCRYPTION column: `TLSv1_3, verified`, `plaintext`, or the failure.
fn shown(t: &EndpointTls) -> String {
    match (&t.version, t.transport) {
        (Ok(Some(version)), _) => format!("{version}, verified"),
        (Ok(None), transport) => transport.to_string(),
        (Err(e), _) => format!("tls FAILED: {e}"),
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
    if let Err(e) = routers
        .wait_sources(timeout.max(Duration::from_secs(3)))
        .await
    {
        eprintln!("switchyard: {e}");
        return UNHEALTHY;
    }
    let (mut probes, encryption) =
        tokio::join!(routers.probe_all(timeout), check_tls(&settings, timeout));
    let tls_of = |cluster: &str, endpoint: &str| {
        encryption
            .iter()
            .find(|t| t.cluster == cluster && t.endpoint == endpoint)
    };
    // Members of clusters that follow a topology source: as the router sees
    // them once each has been probed.
    tokio::time::sleep(timeout).await;
    let mut source_roles = BTreeMap::new();
    for status in routers.statuses() {
        let Some(source) = &status.source else {
            continue;
        };
        for ep in &status.endpoints {
            source_roles.insert(
                (status.name.clone(), ep.id.to_string()),
                source.roles.get(&ep.id).copied(),
            );
            probes.push(EndpointProbe {
                cluster: status.name.clone(),
                endpoint: ep.id.to_string(),
                role: ep.role,
                result: match (&ep.last_probe_error, ep.probe_rtt) {
                    (Some(e), _) => Err(e.clone()),
                    (None, Some(rtt)) => Ok(rtt),
                    (None, None) => Err("not probed yet".into()),
                },
                lag: ep.lag,
            });
        }
    }
    let source_of =
        |p: &EndpointProbe| match source_roles.get(&(p.cluster.clone(), p.endpoint.clone())) {
            None => "static".to_owned(),
            Some(None) => "-".to_owned(),
            Some(Some(role)) => role.to_string(),
        };
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
                    "source_role": source_of(p),
                    "healthy": p.result.is_ok(),
                    "latency_ms": p.result.as_ref().ok().map(|d| d.as_secs_f64() * 1000.0),
                    "lag_ms": p.lag.map(|d| d.as_secs_f64() * 1000.0),
                    "error": p.result.as_ref().err(),
                    "transport": tls_of(&p.cluster, &p.endpoint).map(|t| transport_name(t.transport)),
                    "tls_version": tls_of(&p.cluster, &p.endpoint).and_then(|t| t.version.clone().ok().flatten()),
                    "tls_error": tls_of(&p.cluster, &p.endpoint).and_then(|t| t.version.clone().err()),
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
                    source_of(p),
                    match &p.result {
                        Ok(_) => "up".to_owned(),
                        Err(e) => format!("down: {e}"),
                    },
                    table::ms(p.result.as_ref().ok().copied()),
                    table::ms(p.lag),
                    tls_of(&p.cluster, &p.endpoint).map_or_else(String::new, shown),
                ]
            })
            .collect();
        print!(
            "{}",
            table::render(
                &[
                    "CLUSTER",
                    "ENDPOINT",
                    "ROLE",
                    "SOURCE",
                    "HEALTH",
                    "LATENCY",
                    "LAG",
                    "ENCRYPTION"
                ],
                &rows
            )
        );
        for t in &encryption {
            if matches!(
                t.transport,
                Transport::Unverified | Transport::Opportunistic
            ) {
                println!(
                    "WARNING: cluster {} endpoint {}: the server's certificate is NOT VERIFIED ({})",
                    t.cluster, t.endpoint, t.transport
                );
            }
        }
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
