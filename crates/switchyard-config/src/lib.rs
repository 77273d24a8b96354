//! Layered configuration for switchyard, turned into running routers.
//!
//! A config directory holds a base file, an override per environment and the
//! tenant tier templates, in YAML or TOML; [`ConfigSource`] merges them with
//! [figment](https://docs.rs/figment), in this order, later layers winning:
//!
//! 1. `base.yaml` (or `base.toml`)
//! 2. `environments/{development,testing,staging,production}.yaml`
//! 3. `tiers.yaml`: `tiers` (`free`, `standard`, `premium`, `enterprise`:
//!    isolation, name template, quota), `default_tier`, `tenants`
//! 4. environment variables `SWITCHYARD__CLUSTERS__MAIN__STRATEGY=round_robin`
//!    (`__` separates nested keys; a number picks one item of a list, so
//!    `SWITCHYARD__CLUSTERS__MAIN__ENDPOINTS__1__URL` sets the second
//!    endpoint's URL and leaves the rest of the list as the files have it)
//!
//! URLs may hold `${VAR}` (from the environment) and `${file:/path}`
//! references, or an endpoint may name a `password_file`; resolved URLs become
//! [`SecretUrl`](switchyard_core::SecretUrl)s at once, so secrets never show in
//! `Debug` output or errors.
//!
//! [`ConfigSource::load`] reports every problem at once, each with its path
//! and the file (or environment variable) it came from ([`Problem`]).
//! [`RouterSet::build`] starts one router per cluster, and [`LiveConfig`]
//! re-loads the files while traffic flows and applies every change live:
//! router settings (timeouts, retries, health, read preference, warming,
//! causal reads, strategy), pool settings, endpoints added, removed or re-pointed, weights,
//! clusters added or removed, and tenant tiers. An invalid configuration is
//! rejected with every problem, and the running one stays.
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use switchyard_config::{ConfigSource, LiveConfig};
//! use switchyard_core::{Intent, TenantId};
//!
//! let live = Arc::new(LiveConfig::start(ConfigSource::new("config", "development"))?);
//! let _watch = live.watch(Duration::from_secs(2));
//!
//! let main = live.routers().postgres("main").ok_or("no postgres cluster main")?;
//! let conn = main.checkout(Intent::Read, Some(&TenantId::new("acme")?)).await?;
//! println!("reading from {}", conn.endpoint());
//! # Ok(()) }
//! ```
//!
//! Validation alone needs no runtime:
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile_dir()?;
//! std::fs::write(dir.join("base.yaml"), r#"
//! clusters:
//!   main:
//!     engine: postgres
//!     endpoints:
//!       - { name: pg-1, url: "postgress://app@db:5432/app", role: primary, weight: 0 }
//! "#)?;
//! let err = switchyard_config::ConfigSource::new(&dir, "development").load().unwrap_err();
//! let text = err.to_string();
//! assert!(text.contains(r#"clusters.main.endpoints[0].url: unknown scheme "postgress""#));
//! assert!(text.contains("clusters.main.endpoints[0].weight"));
//! # Ok(()) }
//! # fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
//! #     let d = std::env::temp_dir().join(format!("switchyard-config-doc-{}", std::process::id()));
//! #     std::fs::create_dir_all(&d)?; Ok(d) }
//! ```

mod any;
mod engine;
mod engine_block;
mod env;
mod error;
mod locate;
mod reload;
mod router_set;
pub mod secrets;
mod settings;
mod source;
mod tls_check;
mod topology;
mod validate;

pub use any::AnyCluster;
pub use engine::Engine;
pub use error::{ConfigError, Problem};
pub use reload::{LiveConfig, ReloadEvent, WatchHandle};
pub use router_set::{ApplyReport, EndpointProbe, RouterSet};
pub use settings::{ClusterSettings, EndpointSettings, Settings};
pub use source::{ConfigSource, ENVIRONMENTS, ENV_PREFIX};
pub use tls_check::{check_tls, transport, EndpointTls};
pub use topology::SourceSettings;
