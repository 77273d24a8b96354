//! `switchyard watch`: live endpoint state, refreshed every second.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use switchyard_config::{ConfigSource, LiveConfig};

use crate::check::{print_invalid, INVALID};
use crate::table;

/// Runs until Ctrl-C; returns the exit code. With `metrics`, serves every
/// metric the routers record in Prometheus' text format at
/// `http://ADDR/metrics` meanwhile.
pub async fn run(dir: &Path, env: &str, metrics: Option<SocketAddr>) -> u8 {
    if let Some(addr) = metrics {
        // Installed before any cluster is built: handles register once.
        let installed = metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install();
        if let Err(e) = installed {
            eprintln!("switchyard: cannot serve metrics on {addr}: {e}");
            return INVALID;
        }
    }
    let live = match LiveConfig::start(ConfigSource::new(dir, env)) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            print_invalid(&e);
            return INVALID;
        }
    };
    // The files are followed too: edits show up live, invalid ones are logged.
    let _watch = live.watch(Duration::from_secs(1));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return 0,
            _ = tick.tick() => {}
        }
        let mut rows = Vec::new();
        for status in live.routers().statuses() {
            for ep in &status.endpoints {
                rows.push(vec![
                    status.name.clone(),
                    ep.id.to_string(),
                    ep.role.to_string(),
                    ep.source_role
                        .map_or_else(|| "-".to_owned(), |r| r.to_string()),
                    ep.health.to_string(),
                    if status.writer.as_ref() == Some(&ep.id) {
                        "yes"
                    } else {
                        ""
                    }
                    .to_owned(),
                    ep.in_flight.to_string(),
                    format!("{}/{}", ep.pool.in_use(), ep.pool.size),
                    ep.counters.waits.to_string(),
                    ep.counters.ejections.to_string(),
                    table::ms(Some(ep.latency)),
                    table::ms(ep.lag),
                    ep.last_probe_error.clone().unwrap_or_default(),
                ]);
            }
        }
        let event = live.subscribe().borrow().clone();
        // Clear the screen and home the cursor.
        print!("\x1b[2J\x1b[H");
        println!(
            "switchyard watch  {} ({})  reloads: {} accepted, {} rejected   Ctrl-C to quit\n",
            dir.display(),
            env,
            event.accepted,
            event.rejected
        );
        print!(
            "{}",
            table::render(
                &[
                    "CLUSTER",
                    "ENDPOINT",
                    "ROLE",
                    "SOURCE",
                    "HEALTH",
                    "WRITER",
                    "IN-FLIGHT",
                    "POOL",
                    "WAITS",
                    "EJECTIONS",
                    "LATENCY",
                    "LAG",
                    "LAST ERROR"
                ],
                &rows
            )
        );
        for status in live.routers().statuses() {
            if let Some(source) = &status.source {
                println!(
                    "cluster {}: {} {}{}",
                    status.name,
                    source.source,
                    source.state,
                    source
                        .last_error
                        .as_ref()
                        .map_or_else(String::new, |e| format!(" ({e})"))
                );
            }
        }
        for p in &event.last_problems {
            println!("rejected: {p}");
        }
    }
}
