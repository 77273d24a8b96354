//! The environment-variable layer: figment's own `Env` provider, plus key
//! segments that are numbers addressing one item of a list from the files.
//!
//! figment nests `SWITCHYARD__CLUSTERS__MAIN__ENDPOINTS__1__URL` as a map
//! `{endpoints: {"1": {url}}}`, and merging a map over the files' list would
//! replace the list. So before the layer is merged, wherever the files have a
//! list and the variables a map whose keys are all numbers, the map becomes a
//! copy of that list with those items updated. figment then merges the layer as
//! usual. Items copied from the files keep their tags, so problems in them
//! still name their file; what the variables set names the variable.

use figment::providers::Env;
use figment::value::{Dict, Map, Value};
use figment::{Error, Figment, Metadata, Profile, Provider};

use crate::error::Problem;
use crate::source::dotted;

/// The environment variables as one figment layer, list indexes resolved.
pub(crate) struct EnvLayer {
    metadata: Metadata,
    data: Dict,
}

impl EnvLayer {
    /// The variables `env` reads (prefix `prefix`), list indexes resolved
    /// against `files`, the merged layers beneath. Also returns a problem for
    /// every variable whose index is past the end of its list; those variables
    /// are left out of the layer.
    pub fn new(env: &Env, prefix: &str, files: &Figment) -> (Self, Vec<Problem>) {
        let vars = env
            .data()
            .ok()
            .and_then(|mut data| data.remove(&Profile::Default))
            .unwrap_or_default();
        let mut problems = Vec::new();
        // With broken files there is nothing to index into; their errors are
        // reported instead.
        let data = match files.data() {
            Ok(mut base) => {
                let base = base.remove(&Profile::Default).unwrap_or_default();
                let mut at = Indexing {
                    path: Vec::new(),
                    prefix,
                    problems: &mut problems,
                };
                at.sparse(vars, &base)
            }
            Err(_) => vars,
        };
        let layer = Self {
            metadata: env.metadata(),
            data,
        };
        (layer, problems)
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        Ok(Profile::Default.collect(self.data.clone()))
    }
}

/// A walk of the variables' tree alongside the files' tree.
struct Indexing<'a> {
    /// The keys from the root to where the walk is.
    path: Vec<String>,
    prefix: &'a str,
    problems: &'a mut Vec<Problem>,
}

/// Whether a map from the variables addresses list items: every key a number.
fn is_index_map(d: &Dict) -> bool {
    !d.is_empty()
        && d.keys()
            .all(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
}

impl Indexing<'_> {
    /// The variables' entries of `vars`, each resolved against the same key in
    /// `base`; figment merges them over the files.
    fn sparse(&mut self, vars: Dict, base: &Dict) -> Dict {
        vars.into_iter()
            .map(|(key, value)| {
                let value = match base.get(&key) {
                    Some(b) => {
                        self.path.push(key.clone());
                        let v = self.resolve(value, b, false);
                        self.path.pop();
                        v
                    }
                    None => value,
                };
                (key, value)
            })
            .collect()
    }

    /// `value` from the variables over `base` from the files. Inside a list item
    /// (`whole`) the result is the complete merged value, since figment will
    /// not merge into a list; elsewhere only what the variables set.
    fn resolve(&mut self, value: Value, base: &Value, whole: bool) -> Value {
        match (value, base) {
            (Value::Dict(_, vars), Value::Array(tag, items)) if is_index_map(&vars) => {
                Value::Array(*tag, self.patch(vars, items.clone()))
            }
            (Value::Dict(tag, vars), Value::Dict(base_tag, b)) => {
                let mut out = if whole { b.clone() } else { Dict::new() };
                for (key, v) in vars {
                    let v = match b.get(&key) {
                        Some(bv) => {
                            self.path.push(key.clone());
                            let v = self.resolve(v, bv, whole);
                            self.path.pop();
                            v
                        }
                        None => v,
                    };
                    out.insert(key, v);
                }
                Value::Dict(if whole { *base_tag } else { tag }, out)
            }
            (value, _) => value,
        }
    }

    /// The files' `items` with the items the variables address updated.
    fn patch(&mut self, vars: Dict, mut items: Vec<Value>) -> Vec<Value> {
        let len = items.len();
        for (key, v) in vars {
            self.path.push(key.clone());
            match key.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                Some(item) => *item = self.resolve(v, &item.clone(), true),
                None => self.past_the_end(&key, len, &v),
            }
            self.path.pop();
        }
        items
    }

    /// A problem for every variable under `v`, whose index `key` is past the
    /// end of a list of `len` items.
    fn past_the_end(&mut self, key: &str, len: usize, v: &Value) {
        match v {
            Value::Dict(_, d) if !d.is_empty() => {
                for (k, inner) in d {
                    self.path.push(k.clone());
                    self.past_the_end(key, len, inner);
                    self.path.pop();
                }
            }
            _ => {
                let var = format!(
                    "{}{}",
                    self.prefix,
                    self.path.join("__").to_ascii_uppercase()
                );
                self.problems.push(
                    Problem::new(
                        dotted(&self.path),
                        format!("index {key} is past the end of the list ({len} items)"),
                    )
                    .with_origin(Some(format!("environment variable {var}"))),
                );
            }
        }
    }
}
