//! Errors: every configuration problem with its path and, where known, its file.

use std::fmt;

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where in the merged configuration (`clusters.main.endpoints[1].url`).
    pub path: String,
    /// What is wrong. Never holds a secret.
    pub message: String,
    /// The file or environment variable the value came from, when known.
    pub origin: Option<String>,
}

impl Problem {
    /// A problem at `path`, origin unknown.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            origin: None,
        }
    }

    /// Sets the origin.
    pub fn with_origin(mut self, origin: Option<String>) -> Self {
        self.origin = origin;
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)?;
        if let Some(origin) = &self.origin {
            write!(f, " (in {origin})")?;
        }
        Ok(())
    }
}

/// Why a configuration could not be loaded or turned into routers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The files or environment hold one or more problems; all are listed.
    #[error("{} configuration problem(s):\n{}", .0.len(), Lines(.0))]
    Invalid(Vec<Problem>),
    /// The cluster's engine is valid but its crate is not built into this binary.
    #[error(
        "clusters.{cluster}.engine: engine {engine} is not built in (enable the switchyard-config feature {engine:?})"
    )]
    EngineNotBuiltIn {
        /// The cluster.
        cluster: String,
        /// The engine it asked for.
        engine: &'static str,
    },
    /// A cluster's topology source gave no view.
    #[error("cluster {cluster}: topology source {name} is unreachable: {reason}")]
    SourceUnreachable {
        /// The cluster.
        cluster: String,
        /// The source (kind and addresses).
        name: String,
        /// Why.
        reason: String,
    },
    /// A router or backend refused to start.
    #[error("cluster {cluster} could not be built")]
    Build {
        /// The cluster.
        cluster: String,
        /// Why.
        #[source]
        source: switchyard_core::Error,
    },
}

impl ConfigError {
    /// The problems of an [`ConfigError::Invalid`], empty otherwise.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(p) => p,
            _ => &[],
        }
    }
}

struct Lines<'a>(&'a [Problem]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  {p}")?;
        }
        Ok(())
    }
}
