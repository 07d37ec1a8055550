//! Where each field sits in the YAML text: a map from field path (`routes[2].limits[0].rate`)
//! to line and column, so that problems found after parsing still point at a line.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

#[derive(Default)]
struct Locator {
    stack: Vec<Frame>,
    found: HashMap<String, (usize, usize)>,
}

fn join_key(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl Locator {
    /// The path of the value about to start, recording where it starts.
    fn value_path(&mut self, mark: Marker) -> Option<String> {
        let at = (mark.line(), mark.col() + 1);
        let path = match self.stack.last_mut()? {
            Frame::Map { path, key } => join_key(path, key.as_deref()?),
            Frame::Seq { path, index } => format!("{path}[{index}]"),
        };
        self.found.entry(path.clone()).or_insert(at);
        Some(path)
    }

    /// A value of the top container has ended.
    fn value_done(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key, .. }) => *key = None,
            Some(Frame::Seq { index, .. }) => *index += 1,
            None => {}
        }
    }
}

impl MarkedEventReceiver for Locator {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(text, ..) => {
                if let Some(Frame::Map {
                    path,
                    key: key @ None,
                }) = self.stack.last_mut()
                {
                    // A key: its position stands for the field until the value says otherwise.
                    let at = (mark.line(), mark.col() + 1);
                    self.found.entry(join_key(path, &text)).or_insert(at);
                    *key = Some(text);
                } else {
                    self.value_path(mark);
                    self.value_done();
                }
            }
            Event::Alias(_) => {
                self.value_path(mark);
                self.value_done();
            }
            Event::MappingStart(..) => {
                let path = self.value_path(mark).unwrap_or_default();
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.value_path(mark).unwrap_or_default();
                self.stack.push(Frame::Seq { path, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.value_done();
            }
            _ => {}
        }
    }
}

/// Field path → (line, column), both 1-based. Empty when the text does not parse.
pub fn locate(text: &str) -> HashMap<String, (usize, usize)> {
    let mut locator = Locator::default();
    let mut parser = Parser::new_from_str(text);
    if parser.load(&mut locator, false).is_err() {
        return HashMap::new();
    }
    locator.found
}

/// The location of `path`, or of its nearest enclosing field that has one.
pub fn lookup(found: &HashMap<String, (usize, usize)>, path: &str) -> Option<(usize, usize)> {
    let mut p = path;
    loop {
        if let Some(at) = found.get(p) {
            return Some(*at);
        }
        let cut = p.rfind(['.', '['])?;
        p = &p[..cut];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_block_and_flow_fields() {
        let text = "listen: [\"a\"]\nroutes:\n  - name: a\n    limits:\n      - { name: l, rate: \"x\" }\n";
        let found = locate(text);
        assert_eq!(found.get("listen[0]"), Some(&(1, 10)));
        assert_eq!(found.get("routes[0].name"), Some(&(3, 5)));
        assert_eq!(found.get("routes[0].limits[0].rate"), Some(&(5, 20)));
        assert_eq!(
            lookup(&found, "routes[0].limits[0].rate.extra"),
            Some((5, 20))
        );
        assert_eq!(lookup(&found, "nowhere"), None);
    }
}
