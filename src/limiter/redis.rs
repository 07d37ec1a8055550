//! The Redis store: every bucket of a request decided by one `EVALSHA` of
//! `lua/token_bucket.lua` (loaded from the file at build time, `SCRIPT LOAD`ed at connect,
//! reloaded once on `NOSCRIPT`), with Redis `TIME` as the clock. Standalone, Cluster (buckets
//! grouped by hash slot, tokens given back when another slot denies) and Sentinel, through fred.

use super::{BucketOutcome, BucketRequest, Store, StoreError, StoreKind};
use crate::config::model::{RedisConfig, RedisMode};
use async_trait::async_trait;
use fred::clients::Client;
use fred::interfaces::{ClientLike, KeysInterface};
use fred::types::config::{Config, ReconnectPolicy, Server, ServerConfig};
use fred::types::scripts::Script;
use fred::types::Builder;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// The token-bucket script, from `lua/token_bucket.lua`.
pub const TOKEN_BUCKET_LUA: &str = include_str!("../../lua/token_bucket.lua");

/// Most requests decided by one script call.
pub const MAX_BATCH: usize = 64;
/// Most batch calls in flight at once (per store).
pub const MAX_BATCHES_IN_FLIGHT: usize = 2;

/// What one script call needs; cheap to clone (fred's client is a handle).
#[derive(Clone)]
struct Caller {
    client: Client,
    script: Script,
    prefix: String,
    timeout: Duration,
    /// How long a batch waits for more decisions after its first.
    batch_window: Duration,
}

/// A request waiting for the batcher.
struct Pending {
    requests: Vec<BucketRequest>,
    reply: oneshot::Sender<Result<Vec<BucketOutcome>, StoreError>>,
}

/// One thread's decision queue; its batcher and connection run on that thread's runtime.
struct LocalConn {
    tx: mpsc::Sender<Pending>,
}

static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's decision queues, by store id. Weak: the store owns them.
    static LOCAL_CONNS: RefCell<Vec<(u64, Weak<LocalConn>)>> = const { RefCell::new(Vec::new()) };
}

pub struct RedisStore {
    /// The store's own connection: connect, readiness, script load, peek, reset, Cluster.
    caller: Caller,
    clustered: bool,
    id: u64,
    /// Set by `connect`: from then on each thread that decides gets its own connection.
    started: AtomicBool,
    /// The per-thread queues, owned here so that they (and their connections) end with the
    /// store.
    locals: Mutex<Vec<Arc<LocalConn>>>,
}

fn fred_error(e: fred::error::Error) -> StoreError {
    use fred::error::ErrorKind;
    match e.kind() {
        ErrorKind::Timeout => StoreError::Timeout,
        ErrorKind::IO
        | ErrorKind::Canceled
        | ErrorKind::Cluster
        | ErrorKind::Sentinel
        | ErrorKind::Auth
        | ErrorKind::Tls
        | ErrorKind::Routing
        | ErrorKind::Backpressure => StoreError::Connection(e.to_string()),
        _ => StoreError::Script(e.to_string()),
    }
}

/// Host and port of a `redis://` / `rediss://` URL, and the parsed single-server config.
fn parse_url(url: &str) -> Result<(Config, Server), StoreError> {
    let config = Config::from_url(url)
        .map_err(|e| StoreError::Connection(format!("bad Redis URL {url:?}: {e}")))?;
    let server = match &config.server {
        ServerConfig::Centralized { server } => server.clone(),
        _ => {
            return Err(StoreError::Connection(format!(
                "expected redis://HOST:PORT or rediss://HOST:PORT, got {url:?}"
            )))
        }
    };
    Ok((config, server))
}

impl RedisStore {
    /// Builds the client (no connection yet; see [`RedisStore::connect`]).
    pub fn new(cfg: &RedisConfig) -> Result<RedisStore, StoreError> {
        let mut parsed = cfg
            .urls
            .iter()
            .map(|u| parse_url(u))
            .collect::<Result<Vec<_>, _>>()?;
        if parsed.is_empty() {
            return Err(StoreError::Connection("no Redis URL given".into()));
        }
        let servers: Vec<Server> = parsed.iter().map(|(_, s)| s.clone()).collect();
        // Credentials, TLS and database come from the first URL.
        let (mut config, _) = parsed.swap_remove(0);
        config.fail_fast = false;
        config.server = match cfg.mode {
            RedisMode::Standalone => ServerConfig::Centralized {
                server: servers[0].clone(),
            },
            RedisMode::Cluster => ServerConfig::Clustered {
                hosts: servers,
                policy: Default::default(),
            },
            RedisMode::Sentinel => ServerConfig::Sentinel {
                hosts: servers,
                service_name: cfg.service_name.clone().unwrap_or_default(),
            },
        };
        let timeout = cfg.timeout;
        let client = Builder::from_config(config)
            .with_performance_config(|p| {
                p.default_command_timeout = timeout;
            })
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_millis(500);
                c.internal_command_timeout = Duration::from_millis(1000);
                c.max_command_attempts = 1;
                c.unresponsive.max_timeout = Some(Duration::from_millis(1000));
                c.unresponsive.interval = Duration::from_millis(200);
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2000, 2))
            .build()
            .map_err(fred_error)?;
        Ok(RedisStore {
            caller: Caller {
                client,
                script: Script::from_lua(TOKEN_BUCKET_LUA),
                prefix: cfg.key_prefix.clone(),
                timeout,
                batch_window: cfg.batch_window,
            },
            clustered: cfg.mode == RedisMode::Cluster,
            id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
            started: AtomicBool::new(false),
            locals: Mutex::new(Vec::new()),
        })
    }

    /// Starts the connection task on the current runtime (which must outlive the store) and,
    /// once connected, loads the script. Returns once connected, or with the error that stopped
    /// the first attempt; reconnection goes on in the background either way.
    pub async fn connect(&self, wait: Duration) -> Result<(), StoreError> {
        let client = &self.caller.client;
        let _task = client.connect();
        self.started.store(true, Ordering::Release);
        match tokio::time::timeout(wait, client.wait_for_connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(fred_error(e)),
            Err(_) => return Err(StoreError::Timeout),
        }
        self.caller.script.load(client).await.map_err(fred_error)
    }

    /// This thread's decision queue, created on first use: a connection of its own and a
    /// batcher, both spawned on the current runtime, so a decision never leaves the thread
    /// that serves the request (Pingora runs one runtime per thread). `None` for a Cluster
    /// (decided per slot, unbatched) or before `connect`.
    fn local_queue(&self) -> Option<mpsc::Sender<Pending>> {
        if self.clustered || !self.started.load(Ordering::Acquire) {
            return None;
        }
        let found = LOCAL_CONNS.with(|conns| {
            conns
                .borrow()
                .iter()
                .find(|(id, _)| *id == self.id)
                .and_then(|(_, weak)| weak.upgrade())
                .map(|conn| conn.tx.clone())
        });
        if found.is_some() {
            return found;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let caller = Caller {
            client: self.caller.client.clone_new(),
            ..self.caller.clone()
        };
        // Spawns the connection task on the current runtime (this thread's).
        let _connection = caller.client.connect();
        let (tx, rx) = mpsc::channel(64 * 1024);
        runtime.spawn(run_batcher(caller, rx));
        let conn = Arc::new(LocalConn { tx: tx.clone() });
        self.locals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn.clone());
        LOCAL_CONNS.with(|conns| {
            let mut conns = conns.borrow_mut();
            conns.retain(|(_, weak)| weak.strong_count() > 0);
            conns.push((self.id, Arc::downgrade(&conn)));
        });
        Some(tx)
    }

    /// Closes the connections (the per-thread ones end when their queues are dropped).
    pub async fn close(&self) {
        self.locals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let _ = self.caller.client.quit().await;
    }

    pub fn is_connected(&self) -> bool {
        self.caller.client.is_connected()
    }

    /// Decides one slot's buckets directly; returns whether all admitted, and their outcomes.
    async fn decide_group(
        &self,
        requests: &[&BucketRequest],
    ) -> Result<(bool, Vec<BucketOutcome>), StoreError> {
        let reply = self.caller.call("decide", &[requests]).await?;
        parse_reply(&reply, &[requests.len()])?
            .pop()
            .ok_or_else(|| StoreError::Script("empty reply".into()))
    }
}

/// Groups the decisions queued on one thread into script calls until the queue is dropped,
/// then closes its connection.
async fn run_batcher(caller: Caller, mut rx: mpsc::Receiver<Pending>) {
    let permits = Arc::new(Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        // Everything that queued up while the previous calls were in flight goes in this
        // call: no waiting when idle, bigger batches under load.
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        // With a window, wait a little longer for more (trading latency for fewer calls).
        if !caller.batch_window.is_zero() {
            let deadline = tokio::time::Instant::now() + caller.batch_window;
            while batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(p)) => batch.push(p),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let caller = caller.clone();
        tokio::spawn(async move {
            caller.run_batch(batch).await;
            drop(permit);
        });
    }
    let _ = caller.client.quit().await;
}

impl Caller {
    fn full_key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len());
        k.push_str(&self.prefix);
        k.push_str(key);
        k
    }

    /// One script call over a batch of requests' buckets (all in one slot), bounded by the
    /// timeout.
    async fn call(&self, mode: &str, batch: &[&[&BucketRequest]]) -> Result<Vec<i64>, StoreError> {
        let buckets: usize = batch.iter().map(|r| r.len()).sum();
        let mut keys: Vec<String> = Vec::with_capacity(buckets);
        let mut args: Vec<fred::types::Value> = Vec::with_capacity(2 + batch.len() + 3 * buckets);
        args.push(mode.into());
        args.push((batch.len() as i64).into());
        for requests in batch {
            args.push((requests.len() as i64).into());
            for r in requests.iter() {
                keys.push(self.full_key(&r.key));
                // Whole nanoseconds, the same integer the memory store uses. A cost above the
                // burst never fits; the script only needs to see that, so it is sent as at most
                // burst + 1 (exact in Lua doubles, never multiplied out).
                args.push(int(r.interval_ns).into());
                args.push(int(r.burst).into());
                args.push(int(r.cost.min(r.burst.saturating_add(1))).into());
            }
        }
        let call = self
            .script
            .evalsha_with_reload::<Vec<i64>, _, _>(&self.client, keys, args);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(fred_error),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// Decides a batch in one call and answers each waiting request.
    async fn run_batch(&self, batch: Vec<Pending>) {
        let groups: Vec<Vec<&BucketRequest>> =
            batch.iter().map(|p| p.requests.iter().collect()).collect();
        let slices: Vec<&[&BucketRequest]> = groups.iter().map(Vec::as_slice).collect();
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        let result = self
            .call("decide", &slices)
            .await
            .and_then(|reply| parse_reply(&reply, &sizes));
        match result {
            Ok(decided) => {
                for (pending, (_, outcomes)) in batch.into_iter().zip(decided) {
                    let _ = pending.reply.send(Ok(outcomes));
                }
            }
            Err(e) => {
                for pending in batch {
                    let _ = pending.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Splits a reply into one (all admitted, outcomes) per request of `sizes` buckets each.
fn parse_reply(
    reply: &[i64],
    sizes: &[usize],
) -> Result<Vec<(bool, Vec<BucketOutcome>)>, StoreError> {
    let expected: usize = sizes.iter().map(|n| 1 + 5 * n).sum();
    if reply.len() != expected {
        return Err(StoreError::Script(format!(
            "script returned {} values, expected {expected}",
            reply.len()
        )));
    }
    let ns = |v: i64| u64::try_from(v).unwrap_or(0);
    let mut at = 0;
    let mut decided = Vec::with_capacity(sizes.len());
    for &n in sizes {
        let all = reply[at] == 1;
        let outcomes = reply[at + 1..at + 1 + 5 * n]
            .chunks_exact(5)
            .map(|c| BucketOutcome {
                allowed: c[0] == 1,
                remaining: u64::try_from(c[1]).unwrap_or(0),
                reset_ns: ns(c[2]),
                retry_ns: ns(c[3]),
                next_token_ns: ns(c[4]),
            })
            .collect();
        decided.push((all, outcomes));
        at += 1 + 5 * n;
    }
    Ok(decided)
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Redis
    }

    async fn decide(&self, requests: &[BucketRequest]) -> Result<Vec<BucketOutcome>, StoreError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let all: Vec<&BucketRequest> = requests.iter().collect();
        if !self.clustered {
            let Some(queue) = self.local_queue() else {
                return Ok(self.decide_group(&all).await?.1);
            };
            let (reply, answer) = oneshot::channel();
            queue
                .try_send(Pending {
                    requests: requests.to_vec(),
                    reply,
                })
                .map_err(|_| StoreError::Connection("decision queue full".into()))?;
            return match tokio::time::timeout(self.caller.timeout, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(StoreError::Connection("batcher stopped".into())),
                Err(_) => Err(StoreError::Timeout),
            };
        }
        // Cluster: one call per hash slot, concurrently.
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let slot = fred::util::redis_keyslot(self.caller.full_key(&r.key).as_bytes());
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, members)) => members.push(i),
                None => groups.push((slot, vec![i])),
            }
        }
        if groups.len() == 1 {
            return Ok(self.decide_group(&all).await?.1);
        }
        let group_requests: Vec<Vec<&BucketRequest>> = groups
            .iter()
            .map(|(_, members)| members.iter().map(|&i| &requests[i]).collect())
            .collect();
        let results =
            futures::future::join_all(group_requests.iter().map(|g| self.decide_group(g))).await;
        let mut outcomes = vec![BucketOutcome::default(); requests.len()];
        let mut denied = false;
        let mut first_error = None;
        for ((_, members), result) in groups.iter().zip(&results) {
            match result {
                Ok((admitted, group_outcomes)) => {
                    denied |= !admitted;
                    for (&i, o) in members.iter().zip(group_outcomes) {
                        outcomes[i] = *o;
                    }
                }
                Err(e) => {
                    denied = true;
                    first_error.get_or_insert_with(|| e.clone());
                }
            }
        }
        if denied {
            // Give back what the admitting slots took, so the request charges nothing.
            let charged: Vec<[&[&BucketRequest]; 1]> = group_requests
                .iter()
                .zip(&results)
                .filter(|(_, r)| matches!(r, Ok((true, _))))
                .map(|(g, _)| [g.as_slice()])
                .collect();
            let refunds = charged
                .iter()
                .map(|batch| self.caller.call("refund", batch));
            for refund in futures::future::join_all(refunds).await {
                if let Err(e) = refund {
                    tracing::warn!(error = %e, "refund after a cross-slot denial failed");
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            // The slots that admitted were charged and given back: report their buckets
            // uncharged, as the script does for a slot that denied.
            for ((_, members), result) in groups.iter().zip(&results) {
                if matches!(result, Ok((true, _))) {
                    for &i in members {
                        let r = &requests[i];
                        outcomes[i] =
                            super::gcra::uncharged(outcomes[i], r.interval_ns, r.burst, r.cost);
                    }
                }
            }
        }
        Ok(outcomes)
    }

    async fn peek(&self, request: &BucketRequest) -> Result<BucketOutcome, StoreError> {
        let uncharged = BucketRequest {
            cost: 0,
            ..request.clone()
        };
        let reply = self.caller.call("peek", &[&[&uncharged]]).await?;
        parse_reply(&reply, &[1])?
            .pop()
            .and_then(|(_, outcomes)| outcomes.into_iter().next())
            .ok_or_else(|| StoreError::Script("empty reply".into()))
    }

    async fn reset(&self, key: &str) -> Result<(), StoreError> {
        let del = self.caller.client.del::<i64, _>(self.caller.full_key(key));
        match tokio::time::timeout(self.caller.timeout, del).await {
            Ok(result) => result.map(|_| ()).map_err(fred_error),
            Err(_) => Err(StoreError::Timeout),
        }
    }
}
