//! Upstream groups: their targets, round-robin choice, timeouts. A target given by IP is used
//! as is; one given by host name is resolved when first used and re-resolved every
//! [`DNS_TTL`] (the last good address is kept while the resolver fails), so a config naming
//! hosts that only exist where it is deployed (containers, Kubernetes services) still validates.
//!
//! Also the transport to the targets: plain or TLS (`tls`: SNI, CA file, verification), HTTP/1.1
//! or HTTP/2 (`http2`), turned into Pingora's [`HttpPeer`] by [`Upstream::peer`].

use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::WrappedX509;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

/// The most HTTP/2 streams the gateway opens on one upstream connection.
pub const MAX_H2_STREAMS: usize = 100;

/// `upstreams.NAME.tls`, validated: the CA file is read and parsed once, at load.
pub struct UpstreamTls {
    /// The name sent as SNI and checked against the certificate; `None`: each target's host.
    pub sni: Option<String>,
    /// Trust anchors from `ca` (`None`: the system roots).
    pub ca: Option<Arc<[WrappedX509]>>,
    /// The `ca` file as written, for logs.
    pub ca_path: Option<String>,
    /// Whether the chain and the name are checked.
    pub verify: bool,
    /// See [`UpstreamTls::ca_group_key`].
    pub group_key: u64,
}

impl UpstreamTls {
    /// Pingora's connection pool tells connections apart by address, SNI and the verify flags,
    /// but not by the CA they were verified against: without this, a connection verified
    /// against one upstream's `ca` (or the system roots) would be reused for another upstream
    /// on the same address whose `ca` would have refused it. The peer's `group_key` is a hash
    /// of the trust anchors (0 for the system roots), so each set gets its own connections.
    pub fn ca_group_key(ca: Option<&Arc<[WrappedX509]>>) -> u64 {
        use std::hash::{Hash, Hasher};
        let Some(ca) = ca else {
            return 0;
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for cert in ca.iter() {
            cert.borrow_raw_cert().hash(&mut hasher);
        }
        hasher.finish() | 1
    }
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("sni", &self.sni)
            .field("ca", &self.ca_path)
            .field("verify", &self.verify)
            .field("group_key", &self.group_key)
            .finish()
    }
}

/// Reads a PEM file of CA certificates: every `CERTIFICATE` block must parse as X.509 and be
/// usable as a trust anchor, and there must be at least one. The error says what is wrong
/// (the caller names the file and field).
pub fn load_ca(path: &str) -> Result<Arc<[WrappedX509]>, String> {
    crate::tls::regular_file(std::path::Path::new(path))?;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path:?}: {e}"))?;
    let mut reader = std::io::BufReader::new(bytes.as_slice());
    let mut certs = Vec::new();
    for (i, item) in rustls_pemfile::certs(&mut reader).enumerate() {
        let der = item.map_err(|e| format!("{path:?} is not valid PEM: {e}"))?;
        if let Err(e) = x509_parser::parse_x509_certificate(der.as_ref()) {
            return Err(format!(
                "certificate {} in {path:?} is not valid X.509: {e}",
                i + 1
            ));
        }
        let mut store = pingora::tls::RootCertStore::empty();
        if let Err(e) = store.add(der.clone()) {
            return Err(format!(
                "certificate {} in {path:?} cannot be a trust anchor: {e}",
                i + 1
            ));
        }
        certs.push(der.as_ref().to_vec());
    }
    if certs.is_empty() {
        return Err(format!(
            "{path:?} holds no PEM CERTIFICATE block (expected one or more CA certificates)"
        ));
    }
    // Each DER was parsed above, so `parse_x509` (which panics on bad DER) cannot fail here.
    Ok(certs
        .into_iter()
        .map(|der| WrappedX509::new(der, pingora::utils::tls::parse_x509))
        .collect())
}

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub targets: Vec<Target>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// TLS to the targets (`None`: plain text).
    pub tls: Option<UpstreamTls>,
    /// HTTP/2 to the targets.
    pub http2: bool,
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
            tls: None,
            http2: false,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Sets the transport: TLS (or plain) and HTTP/2 (or HTTP/1.1).
    pub fn with_transport(mut self, tls: Option<UpstreamTls>, http2: bool) -> Self {
        self.tls = tls;
        self.http2 = http2;
        self
    }

    /// The Pingora peer for `target`, resolved to `addr`.
    pub fn peer(&self, target: &Target, addr: SocketAddr) -> HttpPeer {
        let (tls, sni) = match &self.tls {
            Some(tls) => (true, tls.sni.clone().unwrap_or_else(|| target.host.clone())),
            None => (false, String::new()),
        };
        let mut peer = HttpPeer::new(addr, tls, sni);
        if let Some(t) = &self.tls {
            peer.group_key = t.group_key;
        }
        let options = &mut peer.options;
        options.connection_timeout = Some(self.connect_timeout);
        options.read_timeout = Some(self.read_timeout);
        options.write_timeout = Some(self.read_timeout);
        if let Some(t) = &self.tls {
            // Pingora skips every check when the SNI is empty; validation refuses an empty
            // `sni`, and a target's host is never empty.
            options.verify_cert = t.verify;
            options.verify_hostname = t.verify;
            options.ca = t.ca.clone();
        }
        if self.http2 {
            // h2 only: ALPN `h2` over TLS, prior knowledge (h2c) in plain text.
            options.alpn = ALPN::H2;
            options.max_h2_streams = MAX_H2_STREAMS;
        }
        peer
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
