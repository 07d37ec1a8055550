//! The route table: host, method and path matching, built once per config generation.
//! Routes are tried in file order; the first match wins.

use crate::limiter::Limit;
use crate::upstream::Upstream;
use regex::Regex;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug)]
pub enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `api.example.com`
    Exact(String),
    /// `*.example.com`, stored as `.example.com`
    Suffix(String),
}

impl HostMatch {
    pub fn parse(text: &str) -> HostMatch {
        let lower = text.trim().to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        match lower.strip_prefix('*') {
            Some(suffix) => HostMatch::Suffix(suffix.to_string()),
            None => HostMatch::Exact(lower.to_string()),
        }
    }

    fn matches(&self, host: Option<&str>) -> bool {
        match (self, host) {
            (HostMatch::Exact(want), Some(h)) => want == h,
            (HostMatch::Suffix(suffix), Some(h)) => h.len() > suffix.len() && h.ends_with(suffix),
            (_, None) => false,
        }
    }
}

/// Which requests a route takes.
#[derive(Debug)]
pub struct RouteMatch {
    pub host: Option<HostMatch>,
    pub path: PathMatch,
    pub methods: Option<Vec<http::Method>>,
}

impl RouteMatch {
    pub fn matches(&self, method: &http::Method, host: Option<&str>, path: &str) -> bool {
        if let Some(methods) = &self.methods {
            if !methods.contains(method) {
                return false;
            }
        }
        if let Some(h) = &self.host {
            if !h.matches(host) {
                return false;
            }
        }
        match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

/// Which headers a route's responses carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderFlags {
    pub legacy: bool,
    pub ietf: bool,
}

/// A validated route.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub matcher: RouteMatch,
    pub upstream: Arc<Upstream>,
    pub shadow: bool,
    pub limits: Vec<Limit>,
    pub headers: HeaderFlags,
    /// This route's metric series, resolved on first use.
    pub stats: std::sync::OnceLock<crate::metrics::RouteStats>,
}

impl Route {
    /// Named captures of the route's path regex, when a limit needs `path_param:` values.
    pub fn captures<'p>(&self, path: &'p str) -> Option<regex::Captures<'p>> {
        match &self.matcher.path {
            PathMatch::Regex(r) => r.captures(path),
            _ => None,
        }
    }

    pub fn needs_captures(&self) -> bool {
        self.limits
            .iter()
            .any(|l| l.key.path_params().next().is_some())
    }
}

/// Routes in file order, indexed so that lookup does not scan every route: exact paths by a
/// hash map, prefixes by a hash map per prefix length in use, the rest (regex, any path) in
/// order. The first route (lowest index) whose whole match holds wins, as if scanned in order.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Arc<Route>>,
    exact: HashMap<String, Vec<usize>>,
    prefixes: HashMap<String, Vec<usize>>,
    /// Distinct prefix lengths, ascending.
    prefix_lengths: Vec<usize>,
    /// Regex and any-path routes, ascending.
    scanned: Vec<usize>,
}

impl Router {
    pub fn new(routes: Vec<Arc<Route>>) -> Self {
        let mut router = Router {
            routes,
            ..Router::default()
        };
        for (i, route) in router.routes.iter().enumerate() {
            match &route.matcher.path {
                PathMatch::Exact(p) => router.exact.entry(p.clone()).or_default().push(i),
                PathMatch::Prefix(p) => router.prefixes.entry(p.clone()).or_default().push(i),
                PathMatch::Regex(_) | PathMatch::Any => router.scanned.push(i),
            }
        }
        let mut lengths: Vec<usize> = router.prefixes.keys().map(String::len).collect();
        lengths.sort_unstable();
        lengths.dedup();
        router.prefix_lengths = lengths;
        router
    }

    /// The first route that takes this request.
    pub fn find(
        &self,
        method: &http::Method,
        host: Option<&str>,
        path: &str,
    ) -> Option<&Arc<Route>> {
        let mut best: Option<usize> = None;
        let mut consider = |i: usize| {
            if best.is_some_and(|b| b <= i) {
                return;
            }
            if self.routes[i].matcher.matches(method, host, path) {
                best = Some(i);
            }
        };
        if let Some(candidates) = self.exact.get(path) {
            candidates.iter().for_each(|&i| consider(i));
        }
        for &len in &self.prefix_lengths {
            if len > path.len() {
                break;
            }
            if let Some(prefix) = path.get(..len) {
                if let Some(candidates) = self.prefixes.get(prefix) {
                    candidates.iter().for_each(|&i| consider(i));
                }
            }
        }
        for &i in &self.scanned {
            consider(i);
        }
        best.map(|i| &self.routes[i])
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| &*r.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(host: Option<&str>, path: PathMatch, methods: Option<&[&str]>) -> RouteMatch {
        RouteMatch {
            host: host.map(HostMatch::parse),
            path,
            methods: methods.map(|ms| {
                ms.iter()
                    .map(|s| s.parse().unwrap_or_else(|e| panic!("{e}")))
                    .collect()
            }),
        }
    }

    #[test]
    fn path_host_and_method_matching() {
        let get = http::Method::GET;
        let post = http::Method::POST;
        let exact = m(None, PathMatch::Exact("/a".into()), None);
        assert!(exact.matches(&get, None, "/a"));
        assert!(!exact.matches(&get, None, "/a/b"));
        let prefix = m(None, PathMatch::Prefix("/api/".into()), Some(&["POST"]));
        assert!(prefix.matches(&post, None, "/api/x"));
        assert!(!prefix.matches(&get, None, "/api/x"));
        let re = Regex::new(r"^/users/(?P<id>\d+)$").unwrap_or_else(|e| panic!("{e}"));
        let regex = m(Some("*.example.com"), PathMatch::Regex(re), None);
        assert!(regex.matches(&get, Some("api.example.com"), "/users/42"));
        assert!(!regex.matches(&get, Some("example.com"), "/users/42"));
        assert!(!regex.matches(&get, Some("api.example.com"), "/users/x"));
        let host = m(Some("API.example.com."), PathMatch::Any, None);
        assert!(host.matches(&get, Some("api.example.com"), "/"));
        assert!(!host.matches(&get, None, "/"));
    }

    fn route(name: &str, path: PathMatch, methods: Option<&[&str]>) -> Arc<Route> {
        Arc::new(Route {
            name: Arc::from(name),
            matcher: m(None, path, methods),
            upstream: Arc::new(crate::upstream::Upstream::new(
                "u".into(),
                Vec::new(),
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(1),
            )),
            shadow: false,
            limits: Vec::new(),
            headers: HeaderFlags {
                legacy: true,
                ietf: true,
            },
            stats: Default::default(),
        })
    }

    #[test]
    fn indexed_lookup_is_first_match_in_file_order() {
        let re = Regex::new("^/a/.*").unwrap_or_else(|e| panic!("{e}"));
        let router = Router::new(vec![
            route(
                "post-only",
                PathMatch::Prefix("/a/".into()),
                Some(&["POST"]),
            ),
            route("regex", PathMatch::Regex(re), None),
            route("exact", PathMatch::Exact("/a/b".into()), None),
            route("short-prefix", PathMatch::Prefix("/".into()), None),
        ]);
        let find = |method: http::Method, path: &str| {
            router.find(&method, None, path).map(|r| r.name.to_string())
        };
        assert_eq!(
            find(http::Method::POST, "/a/b").as_deref(),
            Some("post-only")
        );
        assert_eq!(find(http::Method::GET, "/a/b").as_deref(), Some("regex"));
        assert_eq!(
            find(http::Method::GET, "/zzz").as_deref(),
            Some("short-prefix")
        );
        let linear = |method: &http::Method, path: &str| {
            router
                .routes()
                .iter()
                .find(|r| r.matcher.matches(method, None, path))
                .map(|r| r.name.to_string())
        };
        for path in ["/", "/a", "/a/", "/a/b", "/a/bc", "/b", ""] {
            for method in [http::Method::GET, http::Method::POST] {
                assert_eq!(
                    find(method.clone(), path),
                    linear(&method, path),
                    "{method} {path}"
                );
            }
        }
    }
}
