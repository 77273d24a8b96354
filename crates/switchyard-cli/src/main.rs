//! `switchyard`: check, watch and demo a switchyard configuration.
//!
//! ```text
//! switchyard check --config config --env development [--json]
//! switchyard watch --config config --env development [--metrics 127.0.0.1:9187]
//! switchyard demo [--json]
//! switchyard testbed --config config --env development
//! ```
//!
//! `check` exits 0 when every cluster has a healthy endpoint, 1 when some
//! cluster has none, and 2 when the configuration is invalid (every problem is
//! printed).

mod check;
mod demo;
mod table;
mod testbed;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Route database checkouts across clusters: inspect and demonstrate switchyard.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration, connect, probe every endpoint and print a table.
    Check {
        /// The config directory (base.yaml, environments/, tiers.yaml).
        #[arg(long, default_value = "config")]
        config: PathBuf,
        /// The environment override to apply.
        #[arg(long, default_value = "development")]
        env: String,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show every endpoint's live state, refreshed every second, until Ctrl-C.
    Watch {
        /// The config directory.
        #[arg(long, default_value = "config")]
        config: PathBuf,
        /// The environment override to apply.
        #[arg(long, default_value = "development")]
        env: String,
        /// Serve the routers' metrics for Prometheus at http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Start the PostgreSQL and Redis engines the configuration names, on
    /// loopback at the ports of its URLs, and keep them up until Ctrl-C.
    Testbed {
        /// The config directory.
        #[arg(long, default_value = "config")]
        config: PathBuf,
        /// The environment override to apply.
        #[arg(long, default_value = "development")]
        env: String,
    },
    /// Start the local test bed, run a multi-tenant workload through the
    /// router while faults are injected, and print a timeline and an audit.
    Demo {
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Check { config, env, json } => check::run(&config, &env, json).await,
            Command::Watch {
                config,
                env,
                metrics,
            } => watch::run(&config, &env, metrics).await,
            Command::Demo { json } => demo::run(json).await,
            Command::Testbed { config, env } => testbed::run(&config, &env).await,
        }
    });
    // Probers and pools hold tasks; do not wait for them.
    runtime.shutdown_background();
    ExitCode::from(code)
}
