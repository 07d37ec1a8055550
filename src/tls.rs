//! TLS listeners: loading certificate/key pairs (PEM files), choosing the pair of a handshake
//! by SNI ([`CertResolver`], rustls through Pingora), refusing TLS 1.2 on a listener whose
//! `min_version` is 1.3, and rotating pairs without a restart: the files are polled every
//! [`POLL_INTERVAL`] ([`poll`]) and re-read with the config on every config reload. A pair that
//! does not load (unreadable, not PEM, key not matching the certificate) is refused, logged and
//! counted in `tollgate_tls_cert_reloads_total{result="error"}`; the previous pair keeps serving.

use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::CipherSuite;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// How often the certificate and key files are checked for a change: a rotated pair serves new
/// handshakes within this (plus the time to read it).
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The lowest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    Tls12,
    Tls13,
}

/// Where one pair lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What identifies the version of a file on disk: a rewrite changes the mtime/ctime (and
/// usually the size), a rename or a symlink swap changes the inode. Symlinks are followed (a
/// Kubernetes secret volume swaps a `..data` link).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    /// The file could not be stat'ed.
    missing: bool,
}

impl FileStamp {
    pub fn of(path: &Path) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(path) {
            Ok(m) => FileStamp {
                dev: m.dev(),
                ino: m.ino(),
                len: m.len(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
                missing: false,
            },
            Err(_) => FileStamp {
                missing: true,
                ..FileStamp::default()
            },
        }
    }
}

/// The stamps of both files of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PairStamp {
    cert: FileStamp,
    key: FileStamp,
}

impl PairStamp {
    pub fn of(paths: &CertPaths) -> PairStamp {
        PairStamp {
            cert: FileStamp::of(&paths.cert),
            key: FileStamp::of(&paths.key),
        }
    }
}

/// A loaded pair: the certificate chain with its signing key, and the stamps of the files it
/// was read from.
#[derive(Clone)]
pub struct LoadedPair {
    pub paths: CertPaths,
    pub key: Arc<CertifiedKey>,
    pub stamp: PairStamp,
}

impl std::fmt::Debug for LoadedPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPair")
            .field("paths", &self.paths)
            .field("stamp", &self.stamp)
            .finish_non_exhaustive()
    }
}

/// Why a pair did not load, by the file at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairError {
    Cert(String),
    Key(String),
}

impl PairError {
    /// The config field at fault: `cert` or `key`.
    pub fn field(&self) -> &'static str {
        match self {
            PairError::Cert(_) => "cert",
            PairError::Key(_) => "key",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            PairError::Cert(m) | PairError::Key(m) => m,
        }
    }
}

impl std::fmt::Display for PairError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field(), self.message())
    }
}

/// Certificate or key files larger than this are refused unread.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Refuses anything but a regular file (after symlinks) before it is opened: opening a FIFO
/// blocks until a writer comes, which would stall rotation and reloads for good.
pub fn regular_file(path: &Path) -> Result<(), String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(format!("{} is not a regular file", path.display()))
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    regular_file(path)?;
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(format!(
            "{} is larger than {MAX_PEM_BYTES} bytes",
            path.display()
        ));
    }
    Ok(bytes)
}

/// Reads and checks a pair (blocking): the certificate file holds at least one PEM
/// certificate (the first is the server's, the rest its chain), the key file a PEM private key
/// (PKCS#8, PKCS#1 or SEC1) that matches the first certificate.
pub fn load_pair(paths: &CertPaths) -> Result<LoadedPair, PairError> {
    // Stamped before reading: a write after the read changes the stamp, and the next poll
    // reads again.
    let stamp = PairStamp::of(paths);
    let cert_bytes = read_pem(&paths.cert).map_err(PairError::Cert)?;
    let key_bytes = read_pem(&paths.key).map_err(PairError::Key)?;
    let certs = CertificateDer::pem_slice_iter(&cert_bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            PairError::Cert(format!(
                "{} is not a PEM certificate file: {e}",
                paths.cert.display()
            ))
        })?;
    let Some(leaf) = certs.first() else {
        return Err(PairError::Cert(format!(
            "no PEM CERTIFICATE block in {}",
            paths.cert.display()
        )));
    };
    if let Err(e) = webpki::EndEntityCert::try_from(leaf) {
        return Err(PairError::Cert(format!(
            "the first certificate in {} is not a valid X.509 certificate: {e}",
            paths.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        PairError::Key(format!(
            "no PEM private key in {} ({e})",
            paths.key.display()
        ))
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(certs, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => PairError::Key(format!(
            "the key in {} does not match the certificate in {}",
            paths.key.display(),
            paths.cert.display()
        )),
        other => PairError::Key(format!(
            "unusable private key in {}: {other}",
            paths.key.display()
        )),
    })?;
    Ok(LoadedPair {
        paths: paths.clone(),
        key: Arc::new(certified),
        stamp,
    })
}

/// Whether the certificate of `key` is valid for `name` (its DNS subjectAltNames, wildcards
/// included; the subject CN is not looked at).
fn serves_name(key: &CertifiedKey, name: &ServerName<'_>) -> bool {
    key.cert.first().is_some_and(|leaf| {
        webpki::EndEntityCert::try_from(leaf)
            .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(name).is_ok())
    })
}

/// Whether the ClientHello offers a TLS 1.3 cipher suite. A client that can do TLS 1.3 offers
/// one (and rustls then negotiates 1.3, which every listener enables); a client capped at TLS
/// 1.2 (OpenSSL, curl `--tls-max 1.2`, rustls, Go) offers none.
fn offers_tls13(hello: &ClientHello<'_>) -> bool {
    hello.cipher_suites().iter().any(|s| {
        matches!(
            s,
            CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS13_AES_256_GCM_SHA384
                | CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
                | CipherSuite::TLS13_AES_128_CCM_SHA256
                | CipherSuite::TLS13_AES_128_CCM_8_SHA256
        )
    })
}

/// The TLS settings of one listener, as configured.
#[derive(Debug, Clone)]
pub struct TlsListen {
    pub certs: Vec<LoadedPair>,
    pub min_version: MinVersion,
}

impl TlsListen {
    /// Same files and version (what a restart would change); the files' contents may differ.
    pub fn same_shape(&self, other: &TlsListen) -> bool {
        self.min_version == other.min_version
            && self.certs.len() == other.certs.len()
            && self
                .certs
                .iter()
                .zip(&other.certs)
                .all(|(a, b)| a.paths == b.paths)
    }
}

/// Chooses the pair of each handshake of one listener: the first pair whose certificate is
/// valid for the SNI name, else the first pair. On a `min_version: "1.3"` listener a
/// ClientHello without TLS 1.3 is refused (no certificate: rustls aborts the handshake).
pub struct CertResolver {
    pub address: SocketAddr,
    pub min_version: MinVersion,
    pairs: ArcSwap<Vec<LoadedPair>>,
    /// Serialises replacing pairs (poller and config reload).
    write: Mutex<()>,
    /// Per pair: the stamp of the last version that failed to load (reported once).
    failed: Mutex<Vec<Option<PairStamp>>>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertResolver")
            .field("address", &self.address)
            .field("min_version", &self.min_version)
            .finish_non_exhaustive()
    }
}

impl CertResolver {
    pub fn new(address: SocketAddr, tls: &TlsListen) -> CertResolver {
        CertResolver {
            address,
            min_version: tls.min_version,
            pairs: ArcSwap::from_pointee(tls.certs.clone()),
            write: Mutex::new(()),
            failed: Mutex::new(vec![None; tls.certs.len()]),
        }
    }

    /// The pairs serving now, in config order.
    pub fn pairs(&self) -> Arc<Vec<LoadedPair>> {
        self.pairs.load_full()
    }

    fn replace(&self, index: usize, pair: LoadedPair) {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut pairs = (*self.pairs.load_full()).clone();
        if let Some(slot) = pairs.get_mut(index) {
            *slot = pair;
        }
        self.pairs.store(Arc::new(pairs));
    }

    fn set_failed(&self, index: usize, stamp: Option<PairStamp>) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = failed.get_mut(index) {
            *slot = stamp;
        }
    }

    fn failed(&self, index: usize) -> Option<PairStamp> {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.get(index).copied().flatten()
    }

    /// Checks every pair's files once; re-reads the pairs whose files changed (blocking).
    pub fn check_files(&self, metrics: &Metrics) {
        let pairs = self.pairs();
        for (index, pair) in pairs.iter().enumerate() {
            let now = PairStamp::of(&pair.paths);
            if now == pair.stamp || Some(now) == self.failed(index) {
                continue;
            }
            match load_pair(&pair.paths) {
                Ok(new) => {
                    self.replace(index, new);
                    self.set_failed(index, None);
                    metrics.tls_cert_reloads.with_label_values(&["ok"]).inc();
                    tracing::info!(
                        listen = %self.address,
                        cert = %pair.paths.cert.display(),
                        "TLS certificate reloaded after its files changed"
                    );
                }
                Err(e) => {
                    self.set_failed(index, Some(now));
                    metrics.tls_cert_reloads.with_label_values(&["error"]).inc();
                    tracing::error!(
                        listen = %self.address,
                        cert = %pair.paths.cert.display(),
                        error = %e,
                        "TLS certificate files changed but do not load; the previous pair keeps serving"
                    );
                }
            }
        }
    }

    /// Takes the pairs a reloaded config read (same files as this listener's): the ones whose
    /// files changed since they were loaded here are swapped in and counted.
    pub fn take_from_config(&self, tls: &TlsListen, metrics: &Metrics) {
        let current = self.pairs();
        for (index, (old, new)) in current.iter().zip(&tls.certs).enumerate() {
            // Only if the files are still as the config read them: the poller may have
            // swapped in a newer version meanwhile.
            if old.paths == new.paths
                && old.stamp != new.stamp
                && PairStamp::of(&new.paths) == new.stamp
            {
                self.replace(index, new.clone());
                self.set_failed(index, None);
                metrics.tls_cert_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(
                    listen = %self.address,
                    cert = %new.paths.cert.display(),
                    "TLS certificate reloaded with the config"
                );
            }
        }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if self.min_version == MinVersion::Tls13 && !offers_tls13(&hello) {
            tracing::debug!(listen = %self.address, "TLS handshake without TLS 1.3 refused (min_version 1.3)");
            return None;
        }
        let pairs = self.pairs.load();
        if let Some(name) = hello
            .server_name()
            .and_then(|n| ServerName::try_from(n).ok())
        {
            if let Some(pair) = pairs.iter().find(|p| serves_name(&p.key, &name)) {
                return Some(pair.key.clone());
            }
        }
        pairs.first().map(|p| p.key.clone())
    }
}

/// The resolvers of the running TLS listeners (set once at start: listeners need a restart).
#[derive(Default)]
pub struct TlsListeners {
    resolvers: RwLock<Vec<Arc<CertResolver>>>,
}

impl TlsListeners {
    pub fn set(&self, resolvers: Vec<Arc<CertResolver>>) {
        *self.resolvers.write().unwrap_or_else(|p| p.into_inner()) = resolvers;
    }

    pub fn all(&self) -> Vec<Arc<CertResolver>> {
        self.resolvers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Polls every TLS listener's files every [`POLL_INTERVAL`] until shutdown.
pub async fn poll(shared: Arc<crate::state::Shared>, mut shutdown: pingora::server::ShutdownWatch) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let resolvers = shared.tls.all();
                if resolvers.is_empty() {
                    continue;
                }
                let shared = shared.clone();
                // File reads and key parsing are blocking.
                let _ = tokio::task::spawn_blocking(move || {
                    for r in resolvers {
                        r.check_files(&shared.metrics);
                    }
                })
                .await;
            }
            _ = shutdown.changed() => return,
        }
    }
}
