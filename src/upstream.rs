//! Upstream groups: their targets, round-robin choice, timeouts. A target given by IP is used
//! as is; one given by host name is resolved when first used and re-resolved every
//! [`DNS_TTL`] (the last good address is kept while the resolver fails), so a config naming
//! hosts that only exist where it is deployed (containers, Kubernetes services) still validates.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a resolved host name is used before it is looked up again.
pub const DNS_TTL: Duration = Duration::from_secs(30);

/// One `HOST:PORT` of an upstream group.
#[derive(Debug)]
pub struct Target {
    pub host: String,
    pub port: u16,
    literal: Option<SocketAddr>,
    cached: Mutex<Option<(Instant, SocketAddr)>>,
}

impl Target {
    /// Parses `host:port`, `1.2.3.4:port` or `[v6]:port`.
    pub fn parse(text: &str) -> Result<Target, String> {
        let bad = || format!("expected HOST:PORT, got {text:?}");
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Target {
                host: addr.ip().to_string(),
                port: addr.port(),
                literal: Some(addr),
                cached: Mutex::new(None),
            });
        }
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let valid_host = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        let looks_numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        if !valid_host || port == 0 || looks_numeric || host.parse::<IpAddr>().is_ok() {
            return Err(bad());
        }
        Ok(Target {
            host: host.to_string(),
            port,
            literal: None,
            cached: Mutex::new(None),
        })
    }

    /// The address to connect to.
    pub async fn resolve(&self) -> Result<SocketAddr, String> {
        if let Some(addr) = self.literal {
            return Ok(addr);
        }
        let cached = *self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, addr)) = cached {
            if at.elapsed() < DNS_TTL {
                return Ok(addr);
            }
        }
        let looked_up = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map(|mut addrs| addrs.next());
        match (looked_up, cached) {
            (Ok(Some(addr)), _) => {
                *self.cached.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), addr));
                Ok(addr)
            }
            (_, Some((_, stale))) => {
                tracing::warn!(host = %self.host, "DNS lookup failed; using the last address");
                Ok(stale)
            }
            (Ok(None), None) => Err(format!("{} resolves to no address", self.host)),
            (Err(e), None) => Err(format!("cannot resolve {}: {e}", self.host)),
        }
    }
}

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub targets: Vec<Target>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    cursor: AtomicUsize,
}

impl Upstream {
    pub fn new(
        name: String,
        targets: Vec<Target>,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Self {
        Upstream {
            name,
            targets,
            connect_timeout,
            read_timeout,
            cursor: AtomicUsize::new(0),
        }
    }

    /// The next target in round-robin order (`None` only for an empty group, which validation
    /// rejects).
    pub fn next_target(&self) -> Option<&Target> {
        if self.targets.is_empty() {
            return None;
        }
        let i = self.cursor.fetch_add(1, Ordering::Relaxed) % self.targets.len();
        Some(&self.targets[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(s: &str) -> Target {
        Target::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn round_robin_visits_every_target() {
        let up = Upstream::new(
            "u".into(),
            vec![target("127.0.0.1:1"), target("127.0.0.1:2")],
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let picked: Vec<u16> = (0..4)
            .filter_map(|_| up.next_target().map(|t| t.port))
            .collect();
        assert_eq!(picked, [1, 2, 1, 2]);
    }

    #[test]
    fn parses_names_and_addresses() {
        assert_eq!(target("[::1]:80").port, 80);
        assert_eq!(target("redis-0.cache.svc:6379").host, "redis-0.cache.svc");
        for bad in [
            "nohost",
            ":80",
            "host:",
            "host:http",
            "a b:80",
            "host:0",
            "1.2.3.999:80",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolves_localhost() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = rt
            .block_on(target("localhost:8080").resolve())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(addr.ip().is_loopback());
        assert!(rt
            .block_on(target("no-such-host.invalid:80").resolve())
            .is_err());
    }
}
