//! The line a configuration path is written on, in a YAML or TOML file, so a
//! problem can say `config/base.yaml:14` rather than just the file.
//!
//! figment merges values without positions; this reads the one file a value
//! came from again, with parsers that keep them (yaml-rust2's marked events,
//! toml_edit's spans). A path that is not in the file (a missing key) resolves
//! to the deepest part of it that is.

use std::collections::HashMap;
use std::path::Path;

use toml_edit::{ImDocument, Item, TableLike, Value};
use yaml_rust2::parser::{Event, Parser};

/// One step of a path such as `clusters.main.endpoints[1].url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// A key of a table or mapping.
    Key(String),
    /// An element of a list.
    Index(usize),
}

/// Splits `clusters.main.endpoints[1].url` into its keys and indices.
pub(crate) fn segments(path: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, rest) = part.split_once('[').unwrap_or((part, ""));
        if !key.is_empty() {
            out.push(Segment::Key(key.to_owned()));
        }
        for idx in rest.split('[') {
            if let Ok(i) = idx.trim_end_matches(']').parse::<usize>() {
                out.push(Segment::Index(i));
            }
        }
    }
    out
}

/// The 1-based line of `path` (or of its deepest existing prefix) in `file`.
pub(crate) fn line_of(file: &Path, path: &str) -> Option<usize> {
    let text = std::fs::read_to_string(file).ok()?;
    let segments = segments(path);
    if file.extension().is_some_and(|e| e == "toml") {
        toml_line(&text, &segments)
    } else {
        yaml_line(&text, &segments)
    }
}

fn render(segments: &[Segment]) -> String {
    let mut out = String::new();
    for s in segments {
        match s {
            Segment::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Where a YAML parser is inside the document.
enum Frame {
    /// In a mapping: the key whose value comes next, if it has been read.
    Map(Option<String>),
    /// In a sequence: the index of the next element.
    Seq(usize),
}

fn yaml_line(text: &str, segments: &[Segment]) -> Option<usize> {
    let lines = yaml_lines(text);
    (1..=segments.len())
        .rev()
        .find_map(|n| lines.get(&render(&segments[..n])).copied())
}

/// The line of every key and list element in the first YAML document.
fn yaml_lines(text: &str) -> HashMap<String, usize> {
    let mut lines = HashMap::new();
    let mut frames: Vec<Frame> = Vec::new();
    let mut parser = Parser::new_from_str(text);
    let path = |frames: &[Frame], key: Option<&str>| {
        let mut segs: Vec<Segment> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Map(Some(k)) => Some(Segment::Key(k.clone())),
                Frame::Map(None) => None,
                Frame::Seq(i) => Some(Segment::Index(*i)),
            })
            .collect();
        if let Some(k) = key {
            segs.push(Segment::Key(k.to_owned()));
        }
        render(&segs)
    };
    // After a complete value: the mapping waits for its next key, the
    // sequence moves to its next element.
    let advance = |frames: &mut Vec<Frame>| match frames.last_mut() {
        Some(Frame::Map(key)) => *key = None,
        Some(Frame::Seq(i)) => *i += 1,
        None => {}
    };
    while let Ok((event, mark)) = parser.next_token() {
        let is_key = matches!(frames.last(), Some(Frame::Map(None)));
        match event {
            Event::StreamEnd | Event::DocumentEnd => break,
            Event::Scalar(value, ..) if is_key => {
                lines
                    .entry(path(&frames, Some(&value)))
                    .or_insert(mark.line());
                if let Some(Frame::Map(key)) = frames.last_mut() {
                    *key = Some(value);
                }
            }
            Event::Scalar(..) | Event::Alias(_) => {
                lines.entry(path(&frames, None)).or_insert(mark.line());
                advance(&mut frames);
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                if is_key {
                    // A complex key: not something a configuration uses.
                    if let Some(Frame::Map(key)) = frames.last_mut() {
                        *key = Some(String::from("?"));
                    }
                }
                lines.entry(path(&frames, None)).or_insert(mark.line());
                frames.push(if matches!(event, Event::MappingStart(..)) {
                    Frame::Map(None)
                } else {
                    Frame::Seq(0)
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                frames.pop();
                advance(&mut frames);
            }
            Event::Nothing | Event::StreamStart | Event::DocumentStart => {}
        }
    }
    lines
}

/// A node of a TOML document that a path can step into.
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a toml_edit::Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn table(self) -> Option<&'a dyn TableLike> {
        match self {
            Node::Item(i) => i.as_table_like(),
            Node::Table(t) => Some(t),
            Node::Value(v) => v.as_inline_table().map(|t| t as &dyn TableLike),
        }
    }

    fn index(self, i: usize) -> Option<(Node<'a>, Option<std::ops::Range<usize>>)> {
        match self {
            Node::Item(Item::ArrayOfTables(a)) => a.get(i).map(|t| (Node::Table(t), t.span())),
            Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => {
                a.get(i).map(|v| (Node::Value(v), v.span()))
            }
            _ => None,
        }
    }
}

fn toml_line(text: &str, segments: &[Segment]) -> Option<usize> {
    let doc = ImDocument::parse(text).ok()?;
    let mut node = Node::Item(doc.as_item());
    let mut best = None;
    for segment in segments {
        let step = match segment {
            Segment::Key(k) => node
                .table()
                .and_then(|t| t.get_key_value(k))
                .map(|(key, item)| (Node::Item(item), key.span().or_else(|| item.span()))),
            Segment::Index(i) => node.index(*i),
        };
        let Some((next, span)) = step else { break };
        node = next;
        best = span.or(best);
    }
    best.map(|span| line_at(text, span.start))
}

/// The 1-based line of byte `offset` in `text`.
fn line_at(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |head| head.matches('\n').count())
        + 1
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const YAML: &str = "\
# a comment
clusters:
  main:
    engine: postgres
    endpoints:
      - name: pg-1
        url: postgres://a@h/db
      - { name: pg-2, url: \"postgress://b@h/db\" }
      -
        name: pg-3
        weight: 0
  cache:
    engine: redis
";

    const TOML: &str = r#"
[clusters.main]
engine = "postgres"

[[clusters.main.endpoints]]
name = "pg-1"
url = "postgres://a@h/db"

[[clusters.main.endpoints]]
name = "pg-2"
url = "postgress://b@h/db"

[clusters.cache]
engine = "redis"
endpoints = [
  { name = "r-1", url = "redis://h" },
  { name = "r-2", url = "redis://h2", weight = 0 },
]
"#;

    #[test]
    fn yaml_paths_resolve_to_their_lines() {
        let cases = [
            ("clusters", 2),
            ("clusters.main.engine", 4),
            ("clusters.main.endpoints", 5),
            ("clusters.main.endpoints[0]", 6),
            ("clusters.main.endpoints[0].url", 7),
            ("clusters.main.endpoints[1].url", 8),
            ("clusters.main.endpoints[2].weight", 11),
            ("clusters.cache.engine", 13),
            // Missing keys fall back to the deepest part that exists.
            ("clusters.main.endpoints[1].role", 8),
            ("clusters.main.pool.max_size", 3),
            ("clusters.main.endpoints[7].url", 5),
        ];
        for (path, line) in cases {
            assert_eq!(yaml_line(YAML, &segments(path)), Some(line), "{path}");
        }
        assert_eq!(yaml_line(YAML, &segments("tiers")), None);
    }

    #[test]
    fn toml_paths_resolve_to_their_lines() {
        let cases = [
            ("clusters.main.engine", 3),
            ("clusters.main.endpoints[0].url", 7),
            ("clusters.main.endpoints[1].url", 11),
            ("clusters.main.endpoints[1]", 9),
            ("clusters.cache.endpoints[1].weight", 17),
            ("clusters.cache.endpoints[0]", 16),
            ("clusters.cache.strategy", 13),
        ];
        for (path, line) in cases {
            assert_eq!(toml_line(TOML, &segments(path)), Some(line), "{path}");
        }
    }

    #[test]
    fn broken_or_missing_files_do_not_fail() {
        // What was read before the syntax error still has its lines.
        assert_eq!(yaml_line("a: 1\nb: [", &segments("a")), Some(1));
        assert_eq!(toml_line("a = ", &segments("a")), None);
        assert_eq!(line_of(Path::new("/nonexistent/base.yaml"), "a"), None);
    }
}
