//! The engines a cluster may name, and the URL schemes each accepts.

use std::fmt;

/// A database engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Engine {
    /// PostgreSQL (and TimescaleDB), through switchyard-postgres.
    Postgres,
    /// Redis, through switchyard-redis.
    Redis,
    /// MongoDB (routers with the `mongodb` feature).
    Mongodb,
    /// ClickHouse (routers with the `clickhouse` feature).
    Clickhouse,
    /// Elasticsearch (routers with the `elasticsearch` feature).
    Elasticsearch,
}

impl Engine {
    /// Every engine, in the order shown in messages.
    pub const ALL: [Engine; 5] = [
        Engine::Postgres,
        Engine::Redis,
        Engine::Mongodb,
        Engine::Clickhouse,
        Engine::Elasticsearch,
    ];

    /// The name used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::Redis => "redis",
            Engine::Mongodb => "mongodb",
            Engine::Clickhouse => "clickhouse",
            Engine::Elasticsearch => "elasticsearch",
        }
    }

    /// Parses a configuration name (`postgresql` and `timescaledb` mean postgres).
    pub fn parse(name: &str) -> Option<Engine> {
        match name {
            "postgres" | "postgresql" | "timescaledb" => Some(Engine::Postgres),
            "redis" => Some(Engine::Redis),
            "mongodb" | "mongo" => Some(Engine::Mongodb),
            "clickhouse" => Some(Engine::Clickhouse),
            "elasticsearch" => Some(Engine::Elasticsearch),
            _ => None,
        }
    }

    /// The URL schemes this engine's endpoints may use.
    pub fn schemes(self) -> &'static [&'static str] {
        match self {
            Engine::Postgres => &["postgres", "postgresql"],
            Engine::Redis => &["redis", "rediss"],
            Engine::Mongodb => &["mongodb", "mongodb+srv"],
            Engine::Clickhouse | Engine::Elasticsearch => &["http", "https"],
        }
    }

    /// Whether this build can turn a cluster of this engine into a router.
    pub fn is_built_in(self) -> bool {
        match self {
            Engine::Postgres | Engine::Redis => true,
            Engine::Mongodb => cfg!(feature = "mongodb"),
            Engine::Clickhouse => cfg!(feature = "clickhouse"),
            Engine::Elasticsearch => cfg!(feature = "elasticsearch"),
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
