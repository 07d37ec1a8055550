//! Runtime overrides as data: the table of overrides set through the admin API (by route,
//! limit and normalised key value), what one says (a policy, `unlimited` or `block`), its
//! stored form, and [`resolve`], which picks the policy a bucket is decided under: the runtime
//! override, else the YAML `overrides` entry, else the limit's own policy. Where the table is
//! kept and how every instance gets it is [`crate::override_store`]'s job.

use super::{Limit, Policy, Rate};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// What an override does to its key's bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The bucket is decided under this policy.
    Policy(Policy),
    /// The limit does not apply to this key (no bucket is touched).
    Unlimited,
    /// The limit always denies this key (429 with no `Retry-After`; no bucket is touched).
    Block,
}

/// One override and who set it when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub action: Action,
    /// The audit identity of the caller that set it.
    pub by: String,
    /// When it was set, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl Entry {
    /// The stored (and shown) form: `{"rate","burst"}`, `{"unlimited":true}` or
    /// `{"block":true}`, with `by` and `at_ms`.
    pub fn to_json(&self) -> Value {
        let mut v = action_json(&self.action);
        v["by"] = Value::from(self.by.as_str());
        v["at_ms"] = Value::from(self.at_ms);
        v
    }

    /// Reads the stored form back; `None` for anything this version cannot enforce exactly.
    pub fn from_json(v: &Value) -> Option<Entry> {
        let action = if v.get("unlimited").and_then(Value::as_bool) == Some(true) {
            Action::Unlimited
        } else if v.get("block").and_then(Value::as_bool) == Some(true) {
            Action::Block
        } else {
            let rate = Rate::parse(v.get("rate")?.as_str()?).ok()?;
            let burst = v.get("burst")?.as_u64().filter(|b| *b >= 1)?;
            let policy = Policy { rate, burst };
            policy.check_precision().ok()?;
            Action::Policy(policy)
        };
        Some(Entry {
            action,
            by: v
                .get("by")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            at_ms: v.get("at_ms").and_then(Value::as_u64).unwrap_or(0),
        })
    }
}

/// An action as JSON: `{"rate","burst"}`, `{"unlimited":true}` or `{"block":true}`.
pub fn action_json(action: &Action) -> Value {
    match action {
        Action::Policy(p) => json!({"rate": Limit::rate_text(p), "burst": p.burst}),
        Action::Unlimited => json!({"unlimited": true}),
        Action::Block => json!({"block": true}),
    }
}

/// Where the policy in force for a key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Limit,
    YamlOverride,
    RuntimeOverride,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Limit => "limit",
            Source::YamlOverride => "yaml_override",
            Source::RuntimeOverride => "runtime_override",
        }
    }
}

/// The identity of an override: route, limit, normalised key value.
pub type Id = (String, String, String);

/// Every runtime override, by route, limit and key value (sorted, for listing).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OverrideTable {
    by_route: BTreeMap<String, BTreeMap<String, BTreeMap<String, Entry>>>,
    len: usize,
}

impl OverrideTable {
    /// No overrides.
    pub const EMPTY: OverrideTable = OverrideTable {
        by_route: BTreeMap::new(),
        len: 0,
    };

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, route: &str, limit: &str, value: &str) -> Option<&Entry> {
        self.by_route.get(route)?.get(limit)?.get(value)
    }

    /// Sets (`Some`) or removes (`None`) an override; returns the one it replaces.
    pub fn put(&mut self, id: Id, entry: Option<Entry>) -> Option<Entry> {
        let (route, limit, value) = id;
        let adding = entry.is_some();
        let before = match entry {
            Some(e) => self
                .by_route
                .entry(route)
                .or_default()
                .entry(limit)
                .or_default()
                .insert(value, e),
            None => {
                let limits = self.by_route.get_mut(&route)?;
                let values = limits.get_mut(&limit)?;
                let before = values.remove(&value);
                if values.is_empty() {
                    limits.remove(&limit);
                }
                if limits.is_empty() {
                    self.by_route.remove(&route);
                }
                before
            }
        };
        match (adding, before.is_some()) {
            (true, false) => self.len += 1,
            (false, true) => self.len -= 1,
            _ => {}
        }
        before
    }

    /// Every override in (route, limit, key) order, optionally of one route and limit.
    pub fn iter<'a>(
        &'a self,
        route: Option<&'a str>,
        limit: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a str, &'a str, &'a str, &'a Entry)> + 'a {
        self.by_route
            .iter()
            .filter(move |(r, _)| route.is_none_or(|want| want == r.as_str()))
            .flat_map(move |(r, limits)| {
                limits
                    .iter()
                    .filter(move |(l, _)| limit.is_none_or(|want| want == l.as_str()))
                    .flat_map(move |(l, values)| {
                        values
                            .iter()
                            .map(move |(v, e)| (r.as_str(), l.as_str(), v.as_str(), e))
                    })
            })
    }
}

/// The hash field an override is stored under: the JSON array `[route, limit, value]`.
pub fn field(route: &str, limit: &str, value: &str) -> String {
    json!([route, limit, value]).to_string()
}

/// The identity in a stored field.
pub fn parse_field(text: &str) -> Option<Id> {
    let (route, limit, value): Id = serde_json::from_str(text).ok()?;
    Some((route, limit, value))
}

/// The action in force for a key, and where it comes from: the runtime override, else the
/// YAML `overrides` entry, else the limit's own policy.
pub fn resolve(table: &OverrideTable, route: &str, limit: &Limit, value: &str) -> (Action, Source) {
    if !table.is_empty() {
        if let Some(e) = table.get(route, &limit.name, value) {
            return (e.action, Source::RuntimeOverride);
        }
    }
    match limit.overrides.get(value) {
        Some(p) => (Action::Policy(*p), Source::YamlOverride),
        None => (Action::Policy(limit.policy), Source::Limit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(action: Action) -> Entry {
        Entry {
            action,
            by: "token:ab".into(),
            at_ms: 7,
        }
    }

    fn id(r: &str, l: &str, v: &str) -> Id {
        (r.into(), l.into(), v.into())
    }

    #[test]
    fn put_get_remove_and_count() {
        let mut t = OverrideTable::default();
        assert!(t
            .put(id("r", "l", "a"), Some(entry(Action::Block)))
            .is_none());
        assert!(t
            .put(id("r", "l", "b"), Some(entry(Action::Unlimited)))
            .is_none());
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.put(id("r", "l", "a"), Some(entry(Action::Unlimited)))
                .map(|e| e.action),
            Some(Action::Block)
        );
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.get("r", "l", "a").map(|e| e.action),
            Some(Action::Unlimited)
        );
        assert!(t.put(id("r", "l", "a"), None).is_some());
        assert!(t.put(id("r", "l", "a"), None).is_none());
        assert!(t.put(id("x", "y", "z"), None).is_none());
        assert_eq!(t.len(), 1);
        let listed: Vec<_> = t.iter(None, None).map(|(r, l, v, _)| (r, l, v)).collect();
        assert_eq!(listed, vec![("r", "l", "b")]);
        assert_eq!(t.iter(Some("r"), Some("other")).count(), 0);
    }

    #[test]
    fn stored_form_round_trips_and_refuses_what_cannot_be_enforced() {
        let p = Policy {
            rate: Rate::parse("10/h").unwrap_or_else(|e| panic!("{e}")),
            burst: 3,
        };
        for a in [Action::Policy(p), Action::Unlimited, Action::Block] {
            let e = entry(a);
            assert_eq!(Entry::from_json(&e.to_json()), Some(e));
        }
        for bad in [
            json!({"rate": "0/s", "burst": 1}),
            json!({"rate": "1/s", "burst": 0}),
            json!({"rate": "1/d", "burst": 1000}),
            json!({"unlimited": false}),
            json!({}),
        ] {
            assert_eq!(Entry::from_json(&bad), None, "{bad}");
        }
        assert_eq!(
            parse_field(&field("r:1", "l\"", "a|b")),
            Some(id("r:1", "l\"", "a|b"))
        );
    }
}
