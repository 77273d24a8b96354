//! Where configuration comes from: the files of a config directory, layered
//! with figment, then `SWITCHYARD__...` environment variables.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml, Yaml};
use figment::value::{Dict, Value};
use figment::{Figment, Profile, Provider, Source};

use crate::env::EnvLayer;
use crate::error::{ConfigError, Problem};
use crate::locate::{segments, Segment};
use crate::settings::Settings;

/// The environments an override file may exist for.
pub const ENVIRONMENTS: [&str; 4] = ["development", "testing", "staging", "production"];

/// The default prefix of environment variables (`SWITCHYARD__CLUSTERS__MAIN__STRATEGY`).
pub const ENV_PREFIX: &str = "SWITCHYARD__";

/// A config directory and the environment to load it for.
///
/// Layers, later ones winning: `base.{yaml,toml}`,
/// `environments/{env}.{yaml,toml}`, `tiers.{yaml,toml}`, then environment
/// variables with [`ENV_PREFIX`] and `__` between nested keys. A key segment
/// that is a number picks one item of a list the files define:
/// `SWITCHYARD__CLUSTERS__MAIN__ENDPOINTS__1__URL` sets the `url` of the
/// second endpoint of `main` and leaves the other endpoints and fields as the
/// files have them; an index past the end of the list is a problem naming the
/// variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSource {
    dir: PathBuf,
    environment: String,
    env_prefix: String,
}

impl ConfigSource {
    /// The configuration in `dir` for `environment`.
    pub fn new(dir: impl Into<PathBuf>, environment: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            environment: environment.into(),
            env_prefix: ENV_PREFIX.to_owned(),
        }
    }

    /// Reads environment variables starting with `prefix` instead of [`ENV_PREFIX`].
    pub fn env_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.env_prefix = prefix.into();
        self
    }

    /// The config directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The environment name.
    pub fn environment(&self) -> &str {
        &self.environment
    }

    /// Every file a layer may come from, whether it exists or not, in merge order.
    pub fn candidate_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for stem in self.stems() {
            for ext in ["yaml", "yml", "toml"] {
                files.push(self.dir.join(format!("{stem}.{ext}")));
            }
        }
        files
    }

    fn stems(&self) -> [String; 3] {
        [
            "base".to_owned(),
            format!("environments/{}", self.environment),
            "tiers".to_owned(),
        ]
    }

    /// The merged layers, before validation. Environment variables whose list
    /// index is past the end of the list are left out ([`load`](Self::load)
    /// reports them).
    pub fn figment(&self) -> Result<Figment, ConfigError> {
        self.layers().map(|(figment, _)| figment)
    }

    /// The merged layers, and a problem for every environment variable whose
    /// list index is past the end of its list.
    fn layers(&self) -> Result<(Figment, Vec<Problem>), ConfigError> {
        let mut problems = Vec::new();
        let mut figment = Figment::new();
        for (i, stem) in self.stems().iter().enumerate() {
            let found: Vec<PathBuf> = ["yaml", "yml", "toml"]
                .iter()
                .map(|ext| self.dir.join(format!("{stem}.{ext}")))
                .filter(|p| p.is_file())
                .collect();
            if found.len() > 1 {
                problems.push(Problem::new(
                    stem.as_str(),
                    format!(
                        "more than one file for this layer: {}",
                        found
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            match (i, found.first()) {
                (0, None) => problems.push(Problem::new(
                    "base",
                    format!("no base.yaml or base.toml in {}", self.dir.display()),
                )),
                (1, None) if !ENVIRONMENTS.contains(&self.environment.as_str()) => {
                    problems.push(Problem::new(
                        "environment",
                        format!(
                            "unknown environment {:?} (expected one of {}, or a file environments/{}.yaml)",
                            self.environment,
                            ENVIRONMENTS.join(", "),
                            self.environment
                        ),
                    ))
                }
                _ => {}
            }
            for file in found {
                figment = if file.extension().is_some_and(|e| e == "toml") {
                    figment.merge(Toml::file_exact(file))
                } else {
                    figment.merge(Yaml::file_exact(file))
                };
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        let env = Env::prefixed(&self.env_prefix).split("__");
        let (layer, index_problems) = EnvLayer::new(&env, &self.env_prefix, &figment);
        Ok((figment.merge(layer), index_problems))
    }

    /// Loads, merges and validates everything, reporting every problem at once.
    pub fn load(&self) -> Result<Settings, ConfigError> {
        let (figment, index_problems) = self.layers()?;
        let root = match figment.data() {
            Ok(mut data) => data.remove(&Profile::Default).unwrap_or_default(),
            Err(errors) => {
                let problems = errors
                    .into_iter()
                    .map(|e| {
                        let path = dotted(&e.path);
                        let origin = e.metadata.as_ref().map(|m| match &m.source {
                            Some(Source::File(p)) => file_and_line(p, &path),
                            _ => m.name.to_string(),
                        });
                        Problem::new(path, e.kind.to_string()).with_origin(origin)
                    })
                    .chain(index_problems)
                    .collect();
                return Err(ConfigError::Invalid(problems));
            }
        };
        let mut problems = Vec::new();
        let settings = crate::validate::walk(&root, &mut problems);
        for p in &mut problems {
            if p.origin.is_none() {
                p.origin = origin_of(&figment, &root, &p.path, &self.env_prefix);
            }
        }
        problems.extend(index_problems);
        match settings {
            Some(s) if problems.is_empty() => Ok(s),
            _ => Err(ConfigError::Invalid(problems)),
        }
    }
}

/// Renders figment key segments as a path: numbers become `[i]`.
pub(crate) fn dotted(keys: &[String]) -> String {
    let mut out = String::new();
    for k in keys {
        if k.parse::<usize>().is_ok() && !out.is_empty() {
            out.push_str(&format!("[{k}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(k);
        }
    }
    out
}

/// The deepest value along `path` (`a.b[1].c`) in `root`, and the keys that
/// lead to it (`a`, `b`, `1`, `c`).
fn deepest<'a>(root: &'a Dict, path: &str) -> Option<(&'a Value, Vec<String>)> {
    let mut keys = Vec::new();
    let mut current: Option<&Value> = None;
    for segment in segments(path) {
        let next = match (current, &segment) {
            (None, Segment::Key(key)) => root.get(key),
            (Some(Value::Dict(_, d)), Segment::Key(key)) => d.get(key),
            (Some(Value::Array(_, a)), Segment::Index(i)) => a.get(*i),
            _ => None,
        };
        match next {
            Some(v) => {
                keys.push(match segment {
                    Segment::Key(key) => key,
                    Segment::Index(i) => i.to_string(),
                });
                current = Some(v);
            }
            None => break,
        }
    }
    current.map(|v| (v, keys))
}

/// Which file or environment variable the value at `path` came from.
fn origin_of(figment: &Figment, root: &Dict, path: &str, prefix: &str) -> Option<String> {
    let (value, keys) = deepest(root, path)?;
    let meta = figment.get_metadata(value.tag())?;
    Some(match &meta.source {
        Some(Source::File(p)) => file_and_line(p, path),
        _ => format!(
            "environment variable {prefix}{}",
            keys.join("__").to_ascii_uppercase()
        ),
    })
}

/// `file:line` where `path` (or its deepest existing part) is written, or
/// just the file when the line cannot be found.
fn file_and_line(file: &Path, path: &str) -> String {
    match crate::locate::line_of(file, path) {
        Some(line) => format!("{}:{line}", file.display()),
        None => file.display().to_string(),
    }
}
