//! The rate-limit service's config (`rls`): the gRPC listener and its domains, each a tree of
//! descriptor nodes as envoyproxy/ratelimit writes them (`key`, optional `value`, nested
//! `descriptors`). A node says what applies when a request's descriptor ends there: a limit of
//! its own (`rate_limit`), a proxy route's limit shared with proxied requests (`share`), or
//! `unlimited`. Validated here; [`Domain::find`] walks a request's entries down the tree.

use super::raw::{RawDescriptor, RawRls, RawRlsRate};
use crate::keys::{self, KeySource};
use crate::limiter::{Algorithm, CostHeaderFrom, Limit, OnMissingKey, Policy, Rate};
use crate::routes::{HeaderFlags, Route};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// Prefix of the bucket keys of a domain's own limits: `rls/DOMAIN:NAME:{value}`. A route name
/// cannot hold `/`, so these never meet a proxy route's buckets.
pub const BUCKET_PREFIX: &str = "rls/";

/// `rls.max_connections` by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// `rls.idle_timeout_ms` by default: two missed pings and then some.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 75_000;
/// The least `rls.idle_timeout_ms`: past one ping interval and its answer.
pub const MIN_IDLE_TIMEOUT_MS: u64 = 35_000;

/// The validated `rls` section.
#[derive(Debug)]
pub struct RlsConfig {
    pub listen: SocketAddr,
    pub headers: HeaderFlags,
    /// Most connections at once; read at start, like `listen`.
    pub max_connections: usize,
    /// How long a connection may send nothing; read at start.
    pub idle_timeout: std::time::Duration,
    pub domains: HashMap<String, Domain>,
}

/// One domain: its descriptor tree.
#[derive(Debug)]
pub struct Domain {
    pub name: Arc<str>,
    /// `rls/DOMAIN`: the route part of its own limits' bucket keys.
    pub bucket_route: String,
    nodes: Nodes,
}

/// The nodes of one level: by key and value, by key and value prefix (`value: "/api/*"`,
/// longest prefix first), and value-less ones (any value) by key.
#[derive(Debug, Default)]
struct Nodes {
    exact: HashMap<String, HashMap<String, Node>>,
    prefixes: HashMap<String, Vec<(String, Node)>>,
    any: HashMap<String, Node>,
}

/// One descriptor node.
#[derive(Debug)]
pub struct Node {
    /// The key source of a shared limit this entry's value fills (`as:`).
    pub as_source: Option<KeySource>,
    /// What applies to a descriptor that ends here (none: no limit).
    pub target: Option<Target>,
    children: Nodes,
}

/// What a descriptor that ends at a node counts against.
#[derive(Debug)]
pub enum Target {
    /// A limit of the domain's own; its key value is the descriptor's values.
    Own { limit: Limit, shadow: bool },
    /// `limits[limit]` of a proxy route: the same buckets as its proxied requests.
    Shared { route: Arc<Route>, limit: usize },
    /// Always OK, never counted.
    Unlimited,
}

impl Domain {
    /// The nodes a descriptor's entries walk through, root first; `None` when some entry
    /// matches no node (the descriptor has no limit). At each level, as in
    /// envoyproxy/ratelimit: the node with the entry's key and value, else the node with its
    /// key and the longest wildcard prefix of the value, else the value-less node with its key.
    pub fn find<'a, 'e>(
        &'a self,
        entries: impl IntoIterator<Item = (&'e str, &'e str)>,
    ) -> Option<Vec<&'a Node>> {
        let mut path = Vec::new();
        let mut level = &self.nodes;
        for (key, value) in entries {
            let node = level
                .exact
                .get(key)
                .and_then(|by_value| by_value.get(value))
                .or_else(|| {
                    level.prefixes.get(key).and_then(|list| {
                        list.iter()
                            .find(|(prefix, _)| value.starts_with(prefix.as_str()))
                            .map(|(_, node)| node)
                    })
                })
                .or_else(|| level.any.get(key))?;
            path.push(node);
            level = &node.children;
        }
        Some(path)
    }
}

/// Problems found while building, by field path.
pub type Problems = Vec<(String, String)>;

/// Builds `rls` against the routes just built (a shared limit names one of them).
pub fn build(
    raw: RawRls,
    listen: Option<SocketAddr>,
    headers: HeaderFlags,
    routes: &[Arc<Route>],
    problems: &mut Problems,
) -> Option<RlsConfig> {
    let before = problems.len();
    let max_connections = raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if max_connections == 0 {
        problems.push(("rls.max_connections".into(), "must be at least 1".into()));
    }
    let idle_timeout_ms = raw.idle_timeout_ms.unwrap_or(DEFAULT_IDLE_TIMEOUT_MS);
    if idle_timeout_ms < MIN_IDLE_TIMEOUT_MS {
        problems.push((
            "rls.idle_timeout_ms".into(),
            format!(
                "must be at least {MIN_IDLE_TIMEOUT_MS} (the server pings idle connections every \
                 30 s; a live client's answer keeps its connection open)"
            ),
        ));
    }
    let mut domains = HashMap::new();
    for (i, d) in raw.domains.into_iter().enumerate() {
        let path = format!("rls.domains[{i}]");
        if !super::model::valid_name(&d.domain) {
            problems.push((
                format!("{path}.domain"),
                format!("domain name {}", super::model::NAME_RULE),
            ));
            continue;
        }
        if domains.contains_key(&d.domain) {
            problems.push((
                format!("{path}.domain"),
                format!("domain {:?} is listed twice", d.domain),
            ));
            continue;
        }
        let mut names = HashMap::new();
        let (nodes, _) = build_nodes(
            &format!("{path}.descriptors"),
            d.descriptors,
            &[],
            &mut names,
            routes,
            problems,
        );
        let bucket_route = format!("{BUCKET_PREFIX}{}", d.domain);
        domains.insert(
            d.domain.clone(),
            Domain {
                name: d.domain.into(),
                bucket_route,
                nodes,
            },
        );
    }
    let listen = listen?;
    (problems.len() == before).then_some(RlsConfig {
        listen,
        headers,
        max_connections,
        idle_timeout: std::time::Duration::from_millis(idle_timeout_ms),
        domains,
    })
}

/// One entry of the path to a node, as written: its key, its value (none: any) and `as:`.
#[derive(Clone)]
struct Step {
    key: String,
    value: Option<String>,
    as_source: Option<KeySource>,
}

/// Builds one level; the flag says whether any node in it or below shares a route's limit
/// (an `as:` with no `share` below it fills nothing, so it is an error).
fn build_nodes(
    path: &str,
    raw: Vec<RawDescriptor>,
    above: &[Step],
    names: &mut HashMap<String, String>,
    routes: &[Arc<Route>],
    problems: &mut Problems,
) -> (Nodes, bool) {
    let mut nodes = Nodes::default();
    let mut level_shares = false;
    for (i, d) in raw.into_iter().enumerate() {
        let here = format!("{path}[{i}]");
        if d.key.is_empty() {
            problems.push((format!("{here}.key"), "must not be empty".into()));
            continue;
        }
        for (field, present, why) in [
            (
                "detailed_metric",
                d.detailed_metric.is_some(),
                "Tollgate's metrics never carry descriptor values (their series stay bounded); \
                 remove it",
            ),
            (
                "rate_limit.replaces",
                d.rate_limit.as_ref().is_some_and(|r| r.replaces.is_some()),
                "every matched limit of a call applies; remove it or the limit it replaces",
            ),
            (
                "rate_limit.unlimited",
                d.rate_limit.as_ref().is_some_and(|r| r.unlimited.is_some()),
                "write `unlimited: true` on the descriptor instead",
            ),
        ] {
            if present {
                problems.push((
                    format!("{here}.{field}"),
                    format!("envoyproxy/ratelimit's `{field}` is not supported: {why}"),
                ));
            }
        }
        let wildcard = match d.value.as_deref() {
            Some(v) if v.contains('*') => match v.strip_suffix('*') {
                Some(prefix) if !prefix.contains('*') => Some(prefix.to_string()),
                _ => {
                    problems.push((
                        format!("{here}.value"),
                        format!(
                            "{v:?}: a wildcard is one `*` at the end of the value (a prefix match)"
                        ),
                    ));
                    continue;
                }
            },
            _ => None,
        };
        let as_source = match d.as_source.as_deref() {
            None => None,
            Some(text) => match keys::parse_part(text) {
                Ok(part) if part.alternatives.len() == 1 => part.alternatives.into_iter().next(),
                Ok(_) => {
                    problems.push((
                        format!("{here}.as"),
                        format!("names one key source, got {text:?}"),
                    ));
                    None
                }
                Err(msg) => {
                    problems.push((format!("{here}.as"), msg));
                    None
                }
            },
        };
        let mut steps = above.to_vec();
        steps.push(Step {
            key: d.key.clone(),
            value: d.value.clone(),
            as_source: as_source.clone(),
        });
        let target = build_target(&here, &d, &steps, names, routes, problems);
        let (children, below_shares) = build_nodes(
            &format!("{here}.descriptors"),
            d.descriptors,
            &steps,
            names,
            routes,
            problems,
        );
        // A `share` written here counts even when it is wrong (its own problem is reported).
        let shares = below_shares || d.share.is_some();
        if as_source.is_some() && !shares {
            problems.push((
                format!("{here}.as"),
                "fills a key part of a shared limit, and no `share` is at or below this \
                 descriptor"
                    .into(),
            ));
        }
        level_shares |= shares;
        let node = Node {
            as_source,
            target,
            children,
        };
        let taken = match (wildcard, d.value) {
            (Some(prefix), _) => {
                let list = nodes.prefixes.entry(d.key.clone()).or_default();
                let taken = list.iter().any(|(p, _)| *p == prefix);
                if !taken {
                    list.push((prefix, node));
                    // Longest prefix first: the most specific wildcard wins.
                    list.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
                }
                taken
            }
            (None, Some(value)) => nodes
                .exact
                .entry(d.key.clone())
                .or_default()
                .insert(value, node)
                .is_some(),
            (None, None) => nodes.any.insert(d.key.clone(), node).is_some(),
        };
        if taken {
            problems.push((
                format!("{here}.key"),
                format!(
                    "another descriptor at this level has key {:?} and the same value",
                    d.key
                ),
            ));
        }
    }
    (nodes, level_shares)
}

/// The limit's default name: the path's `key` or `key_value` steps joined by `.`, with
/// characters a name cannot hold written `_`.
fn default_name(steps: &[Step]) -> String {
    let mut name = String::new();
    for (i, s) in steps.iter().enumerate() {
        if i > 0 {
            name.push('.');
        }
        name.push_str(&s.key);
        if let Some(v) = &s.value {
            name.push('_');
            name.push_str(v);
        }
    }
    let mut name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(64);
    name
}

fn build_target(
    here: &str,
    d: &RawDescriptor,
    steps: &[Step],
    names: &mut HashMap<String, String>,
    routes: &[Arc<Route>],
    problems: &mut Problems,
) -> Option<Target> {
    let chosen = usize::from(d.rate_limit.is_some())
        + usize::from(d.share.is_some())
        + usize::from(d.unlimited);
    if chosen > 1 {
        problems.push((
            here.to_string(),
            "takes one of rate_limit, share and unlimited".into(),
        ));
        return None;
    }
    if d.shadow_mode && d.rate_limit.is_none() {
        problems.push((
            format!("{here}.shadow_mode"),
            "applies to a rate_limit of the descriptor's own (a shared limit follows its \
             route's shadow setting)"
                .into(),
        ));
    }
    if d.name.is_some() && d.rate_limit.is_none() {
        problems.push((
            format!("{here}.name"),
            "names a rate_limit of the descriptor's own".into(),
        ));
    }
    if d.unlimited {
        return Some(Target::Unlimited);
    }
    if let Some(share) = &d.share {
        return build_share(here, share, steps, routes, problems);
    }
    let rate = d.rate_limit.as_ref()?;
    let (algorithm, policy) = build_rate(&format!("{here}.rate_limit"), rate, problems)?;
    let written = match (&d.name, &rate.name) {
        (Some(_), Some(_)) => {
            problems.push((
                format!("{here}.rate_limit.name"),
                "the limit is named twice (`name` and `rate_limit.name`): keep one".into(),
            ));
            return None;
        }
        (name, inner) => name.as_ref().or(inner.as_ref()),
    };
    let name = match written {
        Some(name) if !super::model::valid_name(name) => {
            problems.push((
                format!("{here}.name"),
                format!("limit name {}", super::model::NAME_RULE),
            ));
            return None;
        }
        Some(name) => name.clone(),
        None => default_name(steps),
    };
    if let Some(other) = names.insert(name.clone(), here.to_string()) {
        problems.push((
            format!("{here}.name"),
            format!(
                "the limit name {name:?} is also the name of {other}; give one of them a \
                 `name:` of its own (the name is part of the bucket key)"
            ),
        ));
        return None;
    }
    Some(Target::Own {
        limit: Limit {
            name: name.into(),
            key: keys::KeySpec { parts: Vec::new() },
            algorithm,
            policy,
            cost: 1,
            cost_header: None,
            cost_header_from: CostHeaderFrom::default(),
            on_missing_key: OnMissingKey::Skip,
            overrides: HashMap::new(),
        },
        shadow: d.shadow_mode,
    })
}

/// `rate_limit`: `{unit, requests_per_unit}` (burst: the count) or `{rate, burst}`.
fn build_rate(
    path: &str,
    raw: &RawRlsRate,
    problems: &mut Problems,
) -> Option<(Algorithm, Policy)> {
    let algorithm = match raw.algorithm.as_deref().map(Algorithm::parse) {
        None => Algorithm::TokenBucket,
        Some(Ok(algorithm)) => algorithm,
        Some(Err(msg)) => {
            problems.push((format!("{path}.algorithm"), msg));
            return None;
        }
    };
    if raw.requests_per_unit == Some(0) {
        problems.push((
            format!("{path}.requests_per_unit"),
            "must be at least 1".into(),
        ));
        return None;
    }
    let text = match (&raw.rate, &raw.unit, raw.requests_per_unit) {
        (Some(rate), None, None) => rate.clone(),
        (None, Some(unit), Some(count)) => {
            let unit = match unit.to_ascii_lowercase().as_str() {
                "second" => "s",
                "minute" => "m",
                "hour" => "h",
                "day" => "d",
                _ => {
                    problems.push((
                        format!("{path}.unit"),
                        format!("expected second, minute, hour or day, got {unit:?}"),
                    ));
                    return None;
                }
            };
            format!("{count}/{unit}")
        }
        _ => {
            problems.push((
                path.to_string(),
                "needs either unit and requests_per_unit (as envoyproxy/ratelimit writes \
                 them) or rate (N/s, N/m, N/h, N/d)"
                    .into(),
            ));
            return None;
        }
    };
    let rate = match Rate::parse(&text) {
        Ok(rate) => rate,
        Err(msg) => {
            let field = if raw.rate.is_some() {
                "rate"
            } else {
                "requests_per_unit"
            };
            problems.push((format!("{path}.{field}"), msg));
            return None;
        }
    };
    if algorithm.is_window() && raw.burst.is_some() {
        problems.push((
            format!("{path}.burst"),
            format!(
                "does not apply with algorithm {}: the quota is the rate's count per window \
                 (requests_per_unit per unit); remove burst or use token_bucket",
                algorithm.name()
            ),
        ));
        return None;
    }
    let burst = raw.burst.unwrap_or(rate.count);
    if burst == 0 {
        problems.push((format!("{path}.burst"), "must be at least 1".into()));
        return None;
    }
    let policy = Policy { rate, burst };
    if let Err(msg) = algorithm.check_precision(&policy) {
        let field = if algorithm.is_window() {
            "rate"
        } else {
            "burst"
        };
        problems.push((format!("{path}.{field}"), msg));
        return None;
    }
    Some((algorithm, policy))
}

fn build_share(
    here: &str,
    share: &super::raw::RawShare,
    steps: &[Step],
    routes: &[Arc<Route>],
    problems: &mut Problems,
) -> Option<Target> {
    let Some(route) = routes.iter().find(|r| *r.name == *share.route) else {
        problems.push((
            format!("{here}.share.route"),
            format!("no route named {:?}", share.route),
        ));
        return None;
    };
    let Some(index) = route.limits.iter().position(|l| *l.name == *share.limit) else {
        problems.push((
            format!("{here}.share.limit"),
            format!("route {:?} has no limit {:?}", share.route, share.limit),
        ));
        return None;
    };
    let spec = &route.limits[index].key;
    let named: Vec<&KeySource> = steps.iter().filter_map(|s| s.as_source.as_ref()).collect();
    let implicit = named.is_empty()
        && spec.parts.len() == 1
        && spec.parts.iter().all(|p| p.alternatives.len() == 1);
    if implicit {
        return Some(Target::Shared {
            route: route.clone(),
            limit: index,
        });
    }
    for (k, part) in spec.parts.iter().enumerate() {
        let filled = part
            .alternatives
            .iter()
            .any(|a| matches!(a, KeySource::Literal(_)) || named.contains(&a));
        if !filled {
            let specs: Vec<String> = part.alternatives.iter().map(KeySource::spec).collect();
            problems.push((
                format!("{here}.share"),
                format!(
                    "part {k} of the key of {}.{} ({}) is filled by no descriptor entry on \
                     the way here: give the entry whose value it is `as: {}`",
                    share.route,
                    share.limit,
                    specs.join("|"),
                    specs.first().map(String::as_str).unwrap_or("SOURCE")
                ),
            ));
            return None;
        }
    }
    Some(Target::Shared {
        route: route.clone(),
        limit: index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
upstreams:
  app: {targets: ["127.0.0.1:9"]}
routes:
  - name: api
    match: {path_prefix: /}
    upstream: app
    limits:
      - {name: per_key, key: [header:x-api-key], rate: 5/m}
      - {name: pair, key: [header:x-tenant, ip], rate: 5/m}
"#;

    fn load(rls: &str) -> Result<crate::config::Config, String> {
        crate::config::parse(&format!("{BASE}{rls}"), "t.yaml").map_err(|e| e.to_string())
    }

    fn target_name(t: Option<&Target>) -> String {
        match t {
            Some(Target::Own { limit, shadow }) => format!("own:{}:{shadow}", limit.name),
            Some(Target::Shared { route, limit }) => format!("shared:{}:{limit}", route.name),
            Some(Target::Unlimited) => "unlimited".into(),
            None => "none".into(),
        }
    }

    #[test]
    fn a_fixed_value_wins_over_a_value_less_node_and_the_last_entry_decides() {
        let config = load(
            r#"
rls:
  listen: "127.0.0.1:18081"
  domains:
    - domain: edge
      descriptors:
        - key: db
          rate_limit: {unit: second, requests_per_unit: 10}
          descriptors:
            - key: op
              unlimited: true
        - key: db
          value: users
          rate_limit: {rate: 500/s, burst: 50}
          shadow_mode: true
        - key: api_key
          share: {route: api, limit: per_key}
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let rls = config.rls.as_ref().unwrap_or_else(|| panic!("no rls"));
        let edge = &rls.domains["edge"];
        let leaf = |entries: &[(&str, &str)]| {
            edge.find(entries.iter().copied())
                .map(|p| target_name(p.last().and_then(|n| n.target.as_ref())))
        };
        assert_eq!(
            leaf(&[("db", "users")]).as_deref(),
            Some("own:db_users:true")
        );
        assert_eq!(leaf(&[("db", "orders")]).as_deref(), Some("own:db:false"));
        assert_eq!(
            leaf(&[("db", "orders"), ("op", "x")]).as_deref(),
            Some("unlimited")
        );
        // The fixed-value node has no children: a longer descriptor finds nothing there.
        assert_eq!(leaf(&[("db", "users"), ("op", "x")]), None);
        assert_eq!(leaf(&[("api_key", "k")]).as_deref(), Some("shared:api:0"));
        assert_eq!(leaf(&[("nope", "k")]), None);
        assert_eq!(edge.bucket_route, "rls/edge");
    }

    #[test]
    fn a_wildcard_value_matches_by_prefix_the_longest_first() {
        let config = load(
            r#"
rls:
  listen: "127.0.0.1:18081"
  domains:
    - domain: edge
      descriptors:
        - {key: path, value: "/api/*", rate_limit: {rate: 1/s}}
        - {key: path, value: "/api/admin/*", rate_limit: {rate: 2/s}}
        - {key: path, value: "/api/exact", rate_limit: {rate: 3/s}}
        - {key: path, rate_limit: {rate: 4/s}}
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let rls = config.rls.as_ref().unwrap_or_else(|| panic!("no rls"));
        let edge = &rls.domains["edge"];
        let leaf = |value: &str| {
            edge.find([("path", value)])
                .map(|p| target_name(p.last().and_then(|n| n.target.as_ref())))
                .unwrap_or_default()
        };
        assert_eq!(leaf("/api/users"), "own:path__api__:false");
        assert_eq!(leaf("/api/admin/x"), "own:path__api_admin__:false");
        assert_eq!(leaf("/api/exact"), "own:path__api_exact:false");
        assert_eq!(leaf("/other"), "own:path:false");
        let err = load(
            "rls:\n  listen: \"127.0.0.1:18081\"\n  domains:\n    - domain: edge\n      \
             descriptors:\n        - {key: path, value: \"/a*/b\", unlimited: true}\n",
        )
        .expect_err("a * inside the value");
        assert!(err.contains("descriptors[0].value"), "{err}");
    }

    #[test]
    fn problems_name_their_field() {
        let cases = [
            (
                "share: {route: nope, limit: per_key}",
                "rls.domains[0].descriptors[0].share.route",
            ),
            (
                "share: {route: api, limit: nope}",
                "rls.domains[0].descriptors[0].share.limit",
            ),
            (
                "share: {route: api, limit: pair}",
                "rls.domains[0].descriptors[0].share",
            ),
            (
                "rate_limit: {unit: fortnight, requests_per_unit: 1}",
                "rls.domains[0].descriptors[0].rate_limit.unit",
            ),
            (
                "rate_limit: {unit: second}",
                "rls.domains[0].descriptors[0].rate_limit",
            ),
            (
                "rate_limit: {rate: 0/s}",
                "rls.domains[0].descriptors[0].rate_limit.rate",
            ),
            (
                "{rate_limit: {rate: 1/s}, unlimited: true}",
                "rls.domains[0].descriptors[0]",
            ),
            (
                "{share: {route: api, limit: per_key}, shadow_mode: true}",
                "rls.domains[0].descriptors[0].shadow_mode",
            ),
            (
                "{as: \"header:a|ip\", unlimited: true}",
                "rls.domains[0].descriptors[0].as",
            ),
            (
                "{as: ip, rate_limit: {rate: 1/s}}",
                "rls.domains[0].descriptors[0].as",
            ),
            (
                "rate_limit: {unit: minute, requests_per_unit: 0}",
                "rls.domains[0].descriptors[0].rate_limit.requests_per_unit: must be at least 1",
            ),
            (
                "{detailed_metric: true, rate_limit: {rate: 1/s}}",
                "descriptors[0].detailed_metric: envoyproxy/ratelimit's `detailed_metric` is not supported",
            ),
            (
                "rate_limit: {rate: 1/s, replaces: [{name: x}]}",
                "descriptors[0].rate_limit.replaces",
            ),
            (
                "rate_limit: {rate: 1/s, algorithm: leaky}",
                "rls.domains[0].descriptors[0].rate_limit.algorithm",
            ),
            (
                "rate_limit: {rate: 1/s, burst: 5, algorithm: fixed_window}",
                "rls.domains[0].descriptors[0].rate_limit.burst",
            ),
            (
                "rate_limit: {unit: day, requests_per_unit: 200000000, algorithm: sliding_window}",
                "rls.domains[0].descriptors[0].rate_limit.rate",
            ),
        ];
        for (body, field) in cases {
            let inner = body
                .strip_prefix('{')
                .and_then(|b| b.strip_suffix('}'))
                .unwrap_or(body);
            let text = format!(
                "rls:\n  listen: \"127.0.0.1:18081\"\n  domains:\n    - domain: edge\n      \
                 descriptors:\n        - {{key: k, {inner}}}\n"
            );
            let err = load(&text).expect_err(body);
            assert!(err.contains(field), "{body}: {err}");
        }
    }

    #[test]
    fn an_own_limit_counts_with_its_algorithm() {
        let config = load(
            "rls:\n  listen: \"127.0.0.1:18081\"\n  domains:\n    - domain: edge\n      \
             descriptors:\n        - {key: a, rate_limit: {unit: minute, requests_per_unit: 100, \
             algorithm: sliding_window}}\n        - {key: b, rate_limit: {rate: 3/s}}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let rls = config.rls.as_ref().unwrap_or_else(|| panic!("no rls"));
        let edge = &rls.domains["edge"];
        let own = |key: &str| {
            let path = edge.find([(key, "x")]).unwrap_or_default();
            match path.last().and_then(|n| n.target.as_ref()) {
                Some(Target::Own { limit, .. }) => Some((limit.algorithm, limit.policy.burst)),
                _ => None,
            }
        };
        assert_eq!(own("a"), Some((Algorithm::SlidingWindow, 100)));
        assert_eq!(own("b"), Some((Algorithm::TokenBucket, 3)));
    }

    #[test]
    fn a_multi_part_shared_key_is_filled_by_as_on_the_path() {
        let ok = load(
            r#"
rls:
  listen: "127.0.0.1:18081"
  domains:
    - domain: edge
      descriptors:
        - key: tenant
          as: header:x-tenant
          descriptors:
            - key: remote_address
              as: ip
              share: {route: api, limit: pair}
"#,
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn names_and_listeners_are_checked() {
        let two = load(
            r#"
rls:
  listen: "127.0.0.1:18081"
  domains:
    - domain: edge
      descriptors:
        - {key: "a b", rate_limit: {rate: 1/s}}
        - {key: "a?b", rate_limit: {rate: 1/s}}
"#,
        )
        .expect_err("two default names collide");
        assert!(two.contains("descriptors[1].name"), "{two}");
        let dup = load(
            r#"
rls:
  listen: "127.0.0.1:18081"
  domains:
    - {domain: edge}
    - {domain: edge}
"#,
        )
        .expect_err("duplicate domain");
        assert!(dup.contains("rls.domains[1].domain"), "{dup}");
        let same =
            load("rls:\n  listen: \"127.0.0.1:9901\"\n").expect_err("rls on the admin listener");
        assert!(same.contains("rls.listen"), "{same}");
    }
}
