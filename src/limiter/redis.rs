//! The Redis store: every bucket of a request decided by one `EVALSHA` of
//! `lua/token_bucket.lua` (loaded from the file at build time, `SCRIPT LOAD`ed at connect,
//! reloaded once on `NOSCRIPT`), with Redis `TIME` as the clock. Standalone, Cluster (buckets
//! grouped by hash slot, tokens given back when another slot denies) and Sentinel, through fred.
//!
//! Connections: the store's own (script load, peek, reset, and decisions asked from threads
//! that are not proxy workers) and one *lane* per proxy worker thread: a connection and a
//! batcher spawned on that thread's runtime by [`RedisStore::connect`], before the proxy takes
//! traffic, so a decision never leaves its thread and never waits for a connection to open.
//! A lane sends everything queued on it in one call (in a Cluster, one call per hash slot).
//!
//! Deadlines: a decision carries one deadline (now + `timeout_ms`, set by the decider). The
//! lane sends it to the script in Redis's clock (estimated from the `TIME` each reply carries),
//! and the script skips a request whose deadline has passed, so a decision the gateway already
//! gave to the fallback is not charged later. A reply that still charged a request whose caller
//! had given up (it came back after the deadline) is refunded at once: a request is charged at
//! most once.

use super::settings::{RedisConfig, RedisMode};
use super::slot::DecisionThread;
use super::{BucketOutcome, BucketRequest, Store, StoreError, StoreKind};
use async_trait::async_trait;
use fred::clients::Client;
use fred::interfaces::{ClientLike, ClusterInterface, KeysInterface};
use fred::types::cluster::ClusterRouting;
use fred::types::config::{Config, ReconnectPolicy, Server, ServerConfig};
use fred::types::scripts::Script;
use fred::types::Builder;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::ThreadId;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

/// The token-bucket script, from `lua/token_bucket.lua`.
pub const TOKEN_BUCKET_LUA: &str = include_str!("../../lua/token_bucket.lua");
/// The same script for a Redis Cluster (Redis 7+): allowed to touch keys of several slots
/// served by the node it runs on, so a batch costs one call per node, not per slot.
pub const CLUSTER_TOKEN_BUCKET_LUA: &str = concat!(
    "#!lua flags=allow-cross-slot-keys\n",
    include_str!("../../lua/token_bucket.lua")
);

/// Most requests decided by one script call.
pub const MAX_BATCH: usize = 64;
/// Most batch calls in flight at once (per lane).
pub const MAX_BATCHES_IN_FLIGHT: usize = 2;
/// Decisions a lane queues at most; past it a decision goes to the fallback.
const LANE_QUEUE: usize = 64 * 1024;
/// How long fred waits for any one reply. Not the decision deadline (that is `timeout_ms`,
/// enforced where a decision waits): it bounds how long a lane keeps a late reply in view to
/// refund a charge that nobody waited for.
pub const REPLY_LIMIT: Duration = Duration::from_secs(2);

/// What one script call needs; cheap to clone (fred's client is a handle).
#[derive(Clone)]
struct Caller {
    client: Client,
    script: Script,
    prefix: String,
    /// How long a batch waits for more decisions after its first.
    batch_window: Duration,
    clustered: bool,
    clock: Arc<RedisClock>,
    /// Requests refunded because their caller had given up before a late reply charged them.
    refunded: Arc<AtomicU64>,
    /// Set when the store is closed: its connection watchdogs stop.
    closed: Arc<AtomicBool>,
}

/// A request waiting for its decision.
struct Pending {
    requests: Vec<BucketRequest>,
    deadline: Instant,
    reply: oneshot::Sender<Result<Vec<BucketOutcome>, StoreError>>,
}

/// One proxy thread's connection and batcher (both run on that thread's runtime).
struct Lane {
    thread: ThreadId,
    tx: mpsc::Sender<Pending>,
    client: Client,
}

static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(1);
/// Counter behind refund ids (hashed with a per-refund random key).
static NEXT_REFUND: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's lanes, by store id. Weak: the store owns them.
    static LOCAL_LANES: RefCell<Vec<(u64, Weak<Lane>)>> = const { RefCell::new(Vec::new()) };
}

/// Redis's clock as seen from here: the offset from this process's monotonic clock to Redis
/// `TIME`, in microseconds. Each reply is a sample taken after Redis read its clock, so no
/// sample is ahead of the true offset and the largest recent one is the closest. Samples are
/// kept for the last two one-second windows, so a Redis clock that steps back (a failover to a
/// server with another clock) is followed within 2 s.
struct RedisClock {
    base: std::time::Instant,
    /// Which one-second window (since `base`) `current` belongs to.
    window: AtomicU64,
    current: AtomicI64,
    previous: AtomicI64,
}

const NO_SAMPLE: i64 = i64::MIN;

impl RedisClock {
    fn new() -> Self {
        RedisClock {
            base: std::time::Instant::now(),
            window: AtomicU64::new(0),
            current: AtomicI64::new(NO_SAMPLE),
            previous: AtomicI64::new(NO_SAMPLE),
        }
    }

    fn mono_us(&self, at: std::time::Instant) -> i64 {
        i64::try_from(at.saturating_duration_since(self.base).as_micros()).unwrap_or(i64::MAX)
    }

    /// Records that Redis's clock read `redis_us` no later than now.
    fn observe(&self, redis_us: i64) {
        let now = std::time::Instant::now();
        let sample = redis_us.saturating_sub(self.mono_us(now));
        let window = now.saturating_duration_since(self.base).as_secs();
        let seen = self.window.load(Ordering::Acquire);
        if window != seen
            && self
                .window
                .compare_exchange(seen, window, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let last = if window == seen + 1 {
                self.current.load(Ordering::Acquire)
            } else {
                NO_SAMPLE
            };
            self.previous.store(last, Ordering::Release);
            self.current.store(sample, Ordering::Release);
            return;
        }
        self.current.fetch_max(sample, Ordering::AcqRel);
    }

    /// `at` in Redis's clock (microseconds), or 0 (no deadline) before the first sample.
    fn to_redis_us(&self, at: Instant) -> i64 {
        let offset = self
            .current
            .load(Ordering::Acquire)
            .max(self.previous.load(Ordering::Acquire));
        if offset == NO_SAMPLE {
            return 0;
        }
        self.mono_us(at.into_std()).saturating_add(offset).max(1)
    }
}

/// How a script call ended for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Every bucket admitted; charged (in `decide` mode).
    Admitted,
    /// Some bucket denied; nothing charged.
    Denied,
    /// The deadline had passed when the script ran: nothing charged, nothing decided.
    Expired,
}

/// One request's part of a reply.
type Answer = (Status, Vec<BucketOutcome>);

pub struct RedisStore {
    /// The store's own connection.
    caller: Caller,
    id: u64,
    /// One lane per proxy thread, opened by [`RedisStore::connect`]; owned here so that they
    /// (and their connections) end with the store.
    lanes: Mutex<Vec<Arc<Lane>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
        let client = Builder::from_config(config)
            .with_performance_config(|p| {
                p.default_command_timeout = REPLY_LIMIT;
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
                script: Script::from_lua(if cfg.mode == RedisMode::Cluster {
                    CLUSTER_TOKEN_BUCKET_LUA
                } else {
                    TOKEN_BUCKET_LUA
                }),
                prefix: cfg.key_prefix.clone(),
                batch_window: cfg.batch_window,
                clustered: cfg.mode == RedisMode::Cluster,
                clock: Arc::new(RedisClock::new()),
                refunded: Arc::new(AtomicU64::new(0)),
                closed: Arc::new(AtomicBool::new(false)),
            },
            id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
            lanes: Mutex::new(Vec::new()),
        })
    }

    /// Opens the store's own connection and one lane on each of `threads` (its connection
    /// task and batcher spawned on that thread's runtime), loads the script and reads Redis's
    /// clock. Returns once all of that is done, or with what stopped it within `wait`; the
    /// connections keep (re)connecting in the background either way. Call once per store.
    pub async fn connect(
        &self,
        threads: &[DecisionThread],
        wait: Duration,
    ) -> Result<(), StoreError> {
        let deadline = Instant::now() + wait;
        let client = &self.caller.client;
        tokio::spawn(keep_connected(
            client.clone(),
            self.caller.closed.clone(),
            "store",
        ));
        let mut joins = Vec::with_capacity(threads.len());
        {
            let mut lanes = lock(&self.lanes);
            for (thread, handle) in threads {
                let lane_client = client.clone_new();
                let caller = Caller {
                    client: lane_client.clone(),
                    ..self.caller.clone()
                };
                let (tx, rx) = mpsc::channel(LANE_QUEUE);
                let warming = caller.clone();
                joins.push(handle.spawn(async move {
                    // Spawns the connection task on this runtime (the lane's thread), then
                    // makes one script call over it: the lane's first decision is no slower
                    // than any other.
                    tokio::spawn(keep_connected(
                        warming.client.clone(),
                        warming.closed.clone(),
                        "lane",
                    ));
                    warming
                        .client
                        .wait_for_connect()
                        .await
                        .map_err(fred_error)?;
                    warming.time().await
                }));
                handle.spawn(run_batcher(caller, rx));
                lanes.push(Arc::new(Lane {
                    thread: *thread,
                    tx,
                    client: lane_client,
                }));
            }
        }
        within(deadline, async {
            client.wait_for_connect().await.map_err(fred_error)
        })
        .await?;
        within(deadline, async {
            self.caller.script.load(client).await.map_err(fred_error)
        })
        .await?;
        for join in joins {
            within(deadline, async {
                join.await
                    .map_err(|e| StoreError::Connection(format!("lane did not start: {e}")))?
            })
            .await?;
        }
        // Redis's clock, for the deadlines sent with every decision.
        within(deadline, self.caller.time()).await
    }

    /// This thread's lane, if it has one.
    fn lane(&self) -> Option<mpsc::Sender<Pending>> {
        let cached = LOCAL_LANES.with(|lanes| {
            lanes
                .borrow()
                .iter()
                .find(|(id, _)| *id == self.id)
                .and_then(|(_, weak)| weak.upgrade())
                .map(|lane| lane.tx.clone())
        });
        if cached.is_some() {
            return cached;
        }
        let me = std::thread::current().id();
        let lane = lock(&self.lanes).iter().find(|l| l.thread == me).cloned()?;
        let tx = lane.tx.clone();
        LOCAL_LANES.with(|lanes| {
            let mut lanes = lanes.borrow_mut();
            lanes.retain(|(_, weak)| weak.strong_count() > 0);
            lanes.push((self.id, Arc::downgrade(&lane)));
        });
        Some(tx)
    }

    /// Closes the connections (a lane's ends when its queue is dropped).
    pub async fn close(&self) {
        self.caller.closed.store(true, Ordering::Release);
        lock(&self.lanes).clear();
        // A polite QUIT, not waited for long (a server that never answers would hold this for
        // fred's reply limit); the connection tasks are stopped by their keepers either way.
        let _ = tokio::time::timeout(Duration::from_millis(200), self.caller.client.quit()).await;
    }

    /// Whether the store's own connection and every lane are connected.
    pub fn is_connected(&self) -> bool {
        self.caller.client.is_connected()
            && lock(&self.lanes).iter().all(|l| l.client.is_connected())
    }

    /// Lanes opened (one per proxy thread once connected).
    pub fn lanes(&self) -> usize {
        lock(&self.lanes).len()
    }

    /// Requests refunded since start because a reply charged them after their caller had
    /// given up (the deadline passed in transit).
    pub fn late_refunds(&self) -> u64 {
        self.caller.refunded.load(Ordering::Relaxed)
    }
}

/// How many more times a failed refund is tried (after 0.2 s, 0.4 s, ...).
const REFUND_RETRIES: u32 = 5;

/// Pause before a connection task that ended is started again.
const RESTART_AFTER: Duration = Duration::from_millis(200);

/// Runs a client's connection task, on the runtime this runs on (a lane's own thread), for as
/// long as the store is open. fred ends the task for good in some cases (a Cluster command that
/// ran out of redirect attempts during a resharding disconnects the client from every node and
/// ends its task, while the client still reports itself connected); it is started again here.
async fn keep_connected(client: Client, closed: Arc<AtomicBool>, name: &'static str) {
    let mut task = client.connect();
    loop {
        tokio::select! {
            ended = &mut task => {
                if closed.load(Ordering::Acquire) {
                    return;
                }
                tracing::warn!(
                    connection = name,
                    result = ?ended,
                    "a Redis connection task ended; starting it again"
                );
                tokio::time::sleep(RESTART_AFTER).await;
                if closed.load(Ordering::Acquire) {
                    return;
                }
                task = client.connect();
            }
            _ = tokio::time::sleep(RESTART_AFTER) => {
                if closed.load(Ordering::Acquire) {
                    // The store is closed: stop reconnecting (a server that accepts but never
                    // answers would otherwise be retried for good).
                    task.abort();
                    return;
                }
            }
        }
    }
}

/// `fut`, unless `deadline` passes first.
async fn within<T>(
    deadline: Instant,
    fut: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Timeout),
    }
}

/// Waits for a decision until its deadline. At the deadline the channel is closed first, so
/// that a reply either made it (and is used) or is refused and the lane refunds its charge.
async fn await_reply(
    mut answer: oneshot::Receiver<Result<Vec<BucketOutcome>, StoreError>>,
    deadline: Instant,
) -> Result<Vec<BucketOutcome>, StoreError> {
    match tokio::time::timeout_at(deadline, &mut answer).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(StoreError::Connection("the lane stopped".into())),
        Err(_) => {
            answer.close();
            match answer.try_recv() {
                Ok(result) => result,
                Err(_) => Err(StoreError::Timeout),
            }
        }
    }
}

/// Groups the decisions queued on one lane into script calls until the queue is dropped,
/// then closes the lane's connection.
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
            let deadline = Instant::now() + caller.batch_window;
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

/// Where a Cluster call goes: the node that serves a set of slots, or (while the client does
/// not know the topology yet) one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Shard {
    Node(Server),
    Slot(u16),
}

/// Buckets of one request, by index, grouped by the node that serves them.
fn by_shard(
    caller: &Caller,
    routing: Option<&ClusterRouting>,
    requests: &[BucketRequest],
) -> Vec<(Shard, Vec<usize>)> {
    let mut groups: Vec<(Shard, Vec<usize>)> = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let slot = fred::util::redis_keyslot(caller.full_key(&r.key).as_bytes());
        let shard = match routing.and_then(|t| t.get_server(slot)) {
            Some(server) => Shard::Node(server.clone()),
            None => Shard::Slot(slot),
        };
        match groups.iter_mut().find(|(s, _)| *s == shard) {
            Some((_, members)) => members.push(i),
            None => groups.push((shard, vec![i])),
        }
    }
    groups
}

/// A request (by index in the batch) and the indexes of its buckets on one shard.
type SlotPiece = (usize, Vec<usize>);

/// One request's buckets as the script sees them, with its deadline in Redis's clock.
type Piece<'a> = (Vec<&'a BucketRequest>, i64);

impl Caller {
    fn full_key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len());
        k.push_str(&self.prefix);
        k.push_str(key);
        k
    }

    /// One script call over pieces (in a Cluster all on one node). No timeout of its own
    /// beyond fred's [`REPLY_LIMIT`]: the caller's deadline travels in the pieces.
    async fn call(&self, mode: &str, pieces: &[Piece<'_>]) -> Result<Vec<i64>, StoreError> {
        let buckets: usize = pieces.iter().map(|(r, _)| r.len()).sum();
        let mut keys: Vec<String> = Vec::with_capacity(buckets);
        let mut args: Vec<fred::types::Value> =
            Vec::with_capacity(3 + 2 * pieces.len() + 4 * buckets);
        args.push(mode.into());
        args.push((pieces.len() as i64).into());
        // Cluster: the keys go at the end of ARGV and only the first is a declared key (it
        // routes the call to the node that serves them all).
        args.push((if self.clustered { buckets as i64 } else { 0 }).into());
        for (requests, deadline_us) in pieces {
            args.push((requests.len() as i64).into());
            args.push((*deadline_us).into());
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
        if self.clustered {
            let first = keys.first().cloned();
            args.extend(keys.into_iter().map(fred::types::Value::from));
            keys = first.into_iter().collect();
        }
        // fred bounds each reply by REPLY_LIMIT; this bounds the whole call (redirects,
        // reconnects, a `NOSCRIPT` reload) so that a lane never waits on a call for good.
        let call = self
            .script
            .evalsha_with_reload::<Vec<i64>, _, _>(&self.client, keys, args);
        let result = match tokio::time::timeout(REPLY_LIMIT * 2, call).await {
            Ok(result) => result.map_err(fred_error),
            Err(_) => Err(StoreError::Timeout),
        };
        if self.clustered {
            if let Err(StoreError::Script(message)) = &result {
                if message.contains("non local key") || message.contains("MOVED") {
                    // The topology changed under a call grouped by the old one: refresh it.
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        if let Err(e) = client.sync_cluster().await {
                            tracing::warn!(error = %e, "refreshing the Cluster topology failed");
                        }
                    });
                }
            }
        }
        result
    }

    /// Reads Redis's clock (one script call in `time` mode).
    async fn time(&self) -> Result<(), StoreError> {
        let reply = self.call("time", &[]).await?;
        parse_reply(&reply, &[]).map(|(now_us, _)| self.clock.observe(now_us))
    }

    /// Decides pieces in one call; one answer per piece.
    async fn decide_pieces(&self, pieces: &[Piece<'_>]) -> Result<Vec<Answer>, StoreError> {
        let sizes: Vec<usize> = pieces.iter().map(|(r, _)| r.len()).collect();
        let reply = self.call("decide", pieces).await?;
        let (now_us, answers) = parse_reply(&reply, &sizes)?;
        self.clock.observe(now_us);
        Ok(answers)
    }

    /// Decides a batch and answers each waiting request; refunds what a late reply charged
    /// for requests whose callers had already given up.
    async fn run_batch(&self, batch: Vec<Pending>) {
        let now = Instant::now();
        let mut live = Vec::with_capacity(batch.len());
        for p in batch {
            if p.reply.is_closed() || p.deadline <= now {
                // Its caller has given up (or is about to): it went to the fallback.
                let _ = p.reply.send(Err(StoreError::Timeout));
            } else {
                live.push(p);
            }
        }
        if live.is_empty() {
            return;
        }
        let answers = if self.clustered {
            self.decide_by_slot(&live).await
        } else {
            let pieces: Vec<Piece<'_>> = live
                .iter()
                .map(|p| {
                    (
                        p.requests.iter().collect(),
                        self.clock.to_redis_us(p.deadline),
                    )
                })
                .collect();
            match self.decide_pieces(&pieces).await {
                Ok(answers) => answers.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e); live.len()],
            }
        };
        let mut late: Vec<BucketRequest> = Vec::new();
        for (p, answer) in live.into_iter().zip(answers) {
            let charged = matches!(answer, Ok((Status::Admitted, _)))
                && p.requests.iter().any(|r| r.cost > 0);
            let result = match answer {
                Ok((Status::Expired, _)) => Err(StoreError::Timeout),
                Ok((_, outcomes)) => Ok(outcomes),
                Err(e) => Err(e),
            };
            if let Err(Ok(_)) = p.reply.send(result) {
                if charged {
                    late.extend(p.requests);
                    self.refunded.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if !late.is_empty() {
            tracing::debug!(
                buckets = late.len(),
                "refunding decisions whose reply came after their deadline"
            );
            self.refund(&late).await;
        }
    }

    /// Cluster: every request's buckets grouped by the node that serves them, one call per
    /// node for the whole batch (concurrently). A request admitted by some nodes and denied (or
    /// failed) by another gets the admitting nodes' tokens back.
    async fn decide_by_slot(&self, live: &[Pending]) -> Vec<Result<Answer, StoreError>> {
        let routing = self.client.cached_cluster_state();
        // Per node: the (request, bucket indexes) pieces that live there.
        let mut slots: Vec<(Shard, Vec<SlotPiece>)> = Vec::new();
        for (pi, p) in live.iter().enumerate() {
            for (slot, members) in by_shard(self, routing.as_ref(), &p.requests) {
                match slots.iter_mut().find(|(s, _)| *s == slot) {
                    Some((_, pieces)) => pieces.push((pi, members)),
                    None => slots.push((slot, vec![(pi, members)])),
                }
            }
        }
        let calls = slots.iter().map(|(_, pieces)| {
            let pieces: Vec<Piece<'_>> = pieces
                .iter()
                .map(|(pi, members)| {
                    let p = &live[*pi];
                    (
                        members.iter().map(|&i| &p.requests[i]).collect(),
                        self.clock.to_redis_us(p.deadline),
                    )
                })
                .collect();
            async move { self.decide_pieces(&pieces).await }
        });
        let results = futures::future::join_all(calls).await;

        struct Tally {
            outcomes: Vec<BucketOutcome>,
            denied: bool,
            expired: bool,
            error: Option<StoreError>,
            admitted: Vec<usize>,
        }
        let mut tallies: Vec<Tally> = live
            .iter()
            .map(|p| Tally {
                outcomes: vec![BucketOutcome::default(); p.requests.len()],
                denied: false,
                expired: false,
                error: None,
                admitted: Vec::new(),
            })
            .collect();
        for ((_, pieces), result) in slots.iter().zip(results) {
            match result {
                Ok(answers) => {
                    for ((pi, members), (status, outcomes)) in pieces.iter().zip(answers) {
                        let t = &mut tallies[*pi];
                        for (&i, o) in members.iter().zip(outcomes) {
                            t.outcomes[i] = o;
                        }
                        match status {
                            Status::Admitted => t.admitted.extend(members.iter().copied()),
                            Status::Denied => t.denied = true,
                            Status::Expired => t.expired = true,
                        }
                    }
                }
                Err(e) => {
                    for (pi, _) in pieces {
                        tallies[*pi].error.get_or_insert_with(|| e.clone());
                    }
                }
            }
        }
        let mut refunds: Vec<BucketRequest> = Vec::new();
        let mut answers = Vec::with_capacity(live.len());
        for (p, mut t) in live.iter().zip(tallies) {
            let whole = !t.denied && !t.expired && t.error.is_none();
            if whole {
                answers.push(Ok((Status::Admitted, t.outcomes)));
                continue;
            }
            // Give back what the admitting slots took, so the request charges nothing.
            for &i in &t.admitted {
                let r = &p.requests[i];
                if r.cost > 0 {
                    refunds.push(r.clone());
                }
                // Charged and given back: reported uncharged, as the script reports a slot
                // that denied.
                t.outcomes[i] =
                    super::gcra::uncharged(t.outcomes[i], r.interval_ns, r.burst, r.cost);
            }
            answers.push(if t.denied {
                Ok((Status::Denied, t.outcomes))
            } else if let Some(e) = t.error {
                Err(e)
            } else {
                Ok((Status::Expired, t.outcomes))
            });
        }
        if !refunds.is_empty() {
            self.refund(&refunds).await;
        }
        answers
    }

    /// Gives back `cost` tokens to each bucket (one call, or one per node in a Cluster). A
    /// call that fails is tried again a few times in the background (a node briefly away);
    /// each bucket's refund carries an id, so a try that ran after all is not applied twice.
    async fn refund(&self, buckets: &[BucketRequest]) {
        use std::hash::BuildHasher;
        let ids = std::collections::hash_map::RandomState::new();
        let owed: Vec<(BucketRequest, i64)> = buckets
            .iter()
            .map(|b| {
                let id =
                    ids.hash_one(NEXT_REFUND.fetch_add(1, Ordering::Relaxed)) & ((1 << 53) - 1);
                (b.clone(), int(id).max(1))
            })
            .collect();
        let owed = self.refund_once(&owed).await;
        if owed.is_empty() {
            return;
        }
        tracing::warn!(
            buckets = owed.len(),
            "giving tokens back failed; trying again"
        );
        let caller = self.clone();
        tokio::spawn(async move {
            let mut owed = owed;
            for attempt in 1..=REFUND_RETRIES {
                tokio::time::sleep(RESTART_AFTER * attempt).await;
                owed = caller.refund_once(&owed).await;
                if owed.is_empty() {
                    return;
                }
            }
            tracing::error!(
                buckets = owed.len(),
                "giving tokens back failed for good: those buckets stay charged"
            );
        });
    }

    /// One try at [`Caller::refund`]; returns the buckets whose call failed.
    async fn refund_once(&self, owed: &[(BucketRequest, i64)]) -> Vec<(BucketRequest, i64)> {
        let buckets: Vec<BucketRequest> = owed.iter().map(|(b, _)| b.clone()).collect();
        let groups: Vec<Vec<usize>> = if self.clustered {
            let routing = self.client.cached_cluster_state();
            by_shard(self, routing.as_ref(), &buckets)
                .into_iter()
                .map(|(_, m)| m)
                .collect()
        } else {
            vec![(0..buckets.len()).collect()]
        };
        let calls = groups.iter().map(|members| {
            let buckets = &buckets;
            async move {
                // One piece per bucket: each carries its own refund id.
                let pieces: Vec<Piece<'_>> = members
                    .iter()
                    .map(|&i| (vec![&buckets[i]], owed[i].1))
                    .collect();
                self.call("refund", &pieces).await
            }
        });
        let results = futures::future::join_all(calls).await;
        groups
            .iter()
            .zip(results)
            .filter(|(_, r)| r.is_err())
            .flat_map(|(members, _)| members.iter().map(|&i| owed[i].clone()))
            .collect()
    }
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Splits a reply into Redis's clock (microseconds) and one answer per request of `sizes`
/// buckets each.
fn parse_reply(reply: &[i64], sizes: &[usize]) -> Result<(i64, Vec<Answer>), StoreError> {
    let expected: usize = 2 + sizes.iter().map(|n| 1 + 5 * n).sum::<usize>();
    if reply.len() != expected {
        return Err(StoreError::Script(format!(
            "script returned {} values, expected {expected}",
            reply.len()
        )));
    }
    let now_us = reply[0].saturating_mul(1_000_000).saturating_add(reply[1]);
    let ns = |v: i64| u64::try_from(v).unwrap_or(0);
    let mut at = 2;
    let mut answers = Vec::with_capacity(sizes.len());
    for &n in sizes {
        let status = match reply[at] {
            1 => Status::Admitted,
            2 => Status::Expired,
            _ => Status::Denied,
        };
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
        answers.push((status, outcomes));
        at += 1 + 5 * n;
    }
    Ok((now_us, answers))
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Redis
    }

    async fn decide(
        &self,
        requests: &[BucketRequest],
        deadline: Instant,
    ) -> Result<Vec<BucketOutcome>, StoreError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            requests: requests.to_vec(),
            deadline,
            reply,
        };
        match self.lane() {
            Some(queue) => queue
                .try_send(pending)
                .map_err(|_| StoreError::Connection("decision queue full".into()))?,
            None => {
                // Not a proxy thread (admin API, tests): the store's own connection, in a task
                // that outlives the deadline so that a late charge is still refunded.
                let caller = self.caller.clone();
                tokio::spawn(async move { caller.run_batch(vec![pending]).await });
            }
        }
        await_reply(answer, deadline).await
    }

    async fn peek(&self, request: &BucketRequest) -> Result<BucketOutcome, StoreError> {
        let uncharged = BucketRequest {
            cost: 0,
            ..request.clone()
        };
        let reply = self.caller.call("peek", &[(vec![&uncharged], 0)]).await?;
        let (now_us, answers) = parse_reply(&reply, &[1])?;
        self.caller.clock.observe(now_us);
        answers
            .into_iter()
            .next()
            .and_then(|(_, outcomes)| outcomes.into_iter().next())
            .ok_or_else(|| StoreError::Script("empty reply".into()))
    }

    async fn reset(&self, key: &str) -> Result<(), StoreError> {
        self.caller
            .client
            .del::<i64, _>(self.caller.full_key(key))
            .await
            .map(|_| ())
            .map_err(fred_error)
    }
}
