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

use super::lane_conn::{self, LaneConn};
use super::resp::{self, Reply};
use super::settings::{RedisConfig, RedisMode};
use super::slot::DecisionThread;
use super::{gcra, window};
use super::{Algorithm, BucketOutcome, BucketRequest, Store, StoreError, StoreKind};
use async_trait::async_trait;
use fred::clients::Client;
use fred::interfaces::{ClientLike, ClusterInterface, KeysInterface};
use fred::types::cluster::ClusterRouting;
use fred::types::config::{Config, ReconnectPolicy, Server, ServerConfig};
use fred::types::scripts::Script;
use fred::types::Builder;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
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
    /// A lane's own connection, when it has one (standalone Redis over plain TCP): its script
    /// calls are written straight onto it instead of through `client`.
    lane_conn: Option<LaneConn>,
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
    conn: Option<LaneConn>,
}

impl Lane {
    fn is_connected(&self) -> bool {
        match &self.conn {
            Some(conn) => conn.is_connected(),
            None => self.client.is_connected(),
        }
    }
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
    /// Which lane the next decision from a thread without one (the admin API) goes to.
    next_lane: AtomicUsize,
    /// Where lanes open their own connections ([`lane_conn`]): standalone Redis over plain
    /// TCP. `None` (Cluster, Sentinel, TLS): lanes use fred clients.
    lane_target: Option<lane_conn::Target>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn fred_error(e: fred::error::Error) -> StoreError {
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
    let config = Config::from_url(url).map_err(|e| {
        let url = crate::redact::url_without_password(url);
        StoreError::Connection(format!("bad Redis URL {url:?}: {e}"))
    })?;
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
        let lane_target = (cfg.mode == RedisMode::Standalone && config.tls.is_none()).then(|| {
            lane_conn::Target {
                // fred keeps an IPv6 address in its URL brackets: `[::1]`.
                host: servers[0]
                    .host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                port: servers[0].port,
                username: config.username.clone(),
                password: config.password.clone(),
                database: config.database,
            }
        });
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
                lane_conn: None,
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
            next_lane: AtomicUsize::new(0),
            lane_target,
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
                // A lane's own connection when it can have one; otherwise a fred client of
                // its own, its connection task on the lane's thread.
                let conn = self.lane_target.as_ref().map(|target| {
                    LaneConn::start(target.clone(), handle, self.caller.closed.clone())
                });
                let lane_client = match conn {
                    Some(_) => client.clone(),
                    None => client.clone_new(),
                };
                let caller = Caller {
                    client: lane_client.clone(),
                    lane_conn: conn.clone(),
                    ..self.caller.clone()
                };
                let (tx, rx) = mpsc::channel(LANE_QUEUE);
                let warming = caller.clone();
                joins.push(handle.spawn(async move {
                    // Opens the lane's connection on this runtime (the lane's thread), then
                    // makes one script call over it: the lane's first decision is no slower
                    // than any other.
                    match &warming.lane_conn {
                        Some(conn) => conn.wait_connected().await,
                        None => {
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
                        }
                    }
                    warming.time().await
                }));
                handle.spawn(run_batcher(caller, rx));
                lanes.push(Arc::new(Lane {
                    thread: *thread,
                    tx,
                    client: lane_client,
                    conn,
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

    /// The next lane in turn, for a thread that has none.
    fn some_lane(&self) -> Option<mpsc::Sender<Pending>> {
        let lanes = lock(&self.lanes);
        if lanes.is_empty() {
            return None;
        }
        let at = self.next_lane.fetch_add(1, Ordering::Relaxed) % lanes.len();
        Some(lanes[at].tx.clone())
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
        self.caller.client.is_connected() && lock(&self.lanes).iter().all(|l| l.is_connected())
    }

    /// Lanes opened (one per proxy thread once connected).
    pub fn lanes(&self) -> usize {
        lock(&self.lanes).len()
    }

    /// Counts late refunds into `counter` (shared with the metrics, and with the stores
    /// reloads build) instead of a counter of the store's own.
    pub fn count_late_refunds_in(mut self, counter: Arc<AtomicU64>) -> RedisStore {
        self.caller.refunded = counter;
        self
    }

    /// Requests refunded since start because a reply charged them after their caller had
    /// given up (the deadline passed in transit).
    pub fn late_refunds(&self) -> u64 {
        self.caller.refunded.load(Ordering::Relaxed)
    }

    /// The store's own connection and the key prefix, for data kept beside the buckets (the
    /// runtime overrides, [`crate::override_store`]).
    pub fn own_client(&self) -> (&Client, &str) {
        (&self.caller.client, &self.caller.prefix)
    }
}

impl Drop for RedisStore {
    /// A store dropped without [`RedisStore::close`] (a reload whose store never connected and
    /// was rejected) still stops its connections' retries.
    fn drop(&mut self) {
        self.caller.closed.store(true, Ordering::Release);
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
    // A fred lane client is the lane's own; with a lane connection, `client` is the store's.
    if caller.lane_conn.is_none() {
        let _ = caller.client.quit().await;
    }
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

/// A charge to give back: when it was made (the Redis `TIME` of its call, in microseconds) and,
/// for a token bucket, the bucket's debt right after it (ns; the charge's tat is the one plus
/// the other). A window's refund goes back to the window the charge was made in; a token
/// bucket's gives back only what the charge still holds (a bucket that has refilled since has
/// paid it off with time: giving the tokens back then would erase a later request's charge).
#[derive(Debug, Clone, Copy, Default)]
struct Charge {
    at_us: i64,
    debt_ns: i64,
}

impl Charge {
    /// The charge that `outcome` (an admitting one, read at `at_us`) reports for bucket `r`.
    fn of(r: &BucketRequest, outcome: &BucketOutcome, at_us: i64) -> Charge {
        Charge {
            at_us,
            debt_ns: if r.algorithm.is_window() {
                0
            } else {
                int(outcome.reset_ns)
            },
        }
    }
}

/// A refund owed: the bucket, the refund's id, the charge.
type Owed = (BucketRequest, i64, Charge);

/// One request's buckets as the script sees them, with its deadline in Redis's clock (a
/// refund: its id) and, for a refund, the charge it gives back (default otherwise).
type Piece<'a> = (Vec<&'a BucketRequest>, i64, Charge);

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
        if let Some(conn) = &self.lane_conn {
            return self.call_direct(conn, mode, pieces).await;
        }
        let buckets: usize = pieces.iter().map(|(r, _, _)| r.len()).sum();
        let mut keys: Vec<String> = pieces
            .iter()
            .flat_map(|(r, _, _)| r.iter())
            .map(|r| self.full_key(&r.key))
            .collect();
        let mut args: Vec<fred::types::Value> =
            Vec::with_capacity(8 + 3 * pieces.len() + 2 * buckets);
        // Cluster: the keys go at the end of ARGV and only the first is a declared key (it
        // routes the call to the node that serves them all).
        let keys_in_argv = if self.clustered { buckets as i64 } else { 0 };
        write_argv(mode, pieces, keys_in_argv, &mut args);
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

    /// [`Caller::call`] over a lane's own connection: the `EVALSHA` frame written straight
    /// from the pieces (the same arguments, in the same order), and the script loaded on the
    /// first `NOSCRIPT` (a restarted or flushed Redis).
    async fn call_direct(
        &self,
        conn: &LaneConn,
        mode: &str,
        pieces: &[Piece<'_>],
    ) -> Result<Vec<i64>, StoreError> {
        let frame = self.evalsha_frame(mode, pieces);
        let attempt = async {
            let mut reply = conn.call(frame.clone()).await?;
            if matches!(&reply, Reply::Error(m) if m.starts_with("NOSCRIPT")) {
                let body = self.script.lua().map(|l| l.as_bytes()).unwrap_or_default();
                if let Reply::Error(m) = conn
                    .call(resp::command(&[b"SCRIPT", b"LOAD", body]))
                    .await?
                {
                    return Err(StoreError::Script(m));
                }
                reply = conn.call(frame).await?;
            }
            integers(reply)
        };
        match tokio::time::timeout(REPLY_LIMIT * 2, attempt).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// The `EVALSHA` command of one script call (standalone: every key a declared key), with
    /// the arguments [`Caller::call`] sends.
    fn evalsha_frame(&self, mode: &str, pieces: &[Piece<'_>]) -> bytes::Bytes {
        let buckets: usize = pieces.iter().map(|(r, _, _)| r.len()).sum();
        let key_bytes: usize = pieces
            .iter()
            .flat_map(|(r, _, _)| r.iter())
            .map(|r| self.prefix.len() + r.key.len() + 8)
            .sum();
        let mut c = resp::Command::with_capacity(key_bytes + 24 * (buckets + pieces.len()) + 128);
        c.arg(b"EVALSHA")
            .arg(self.script.sha1().as_bytes())
            .int(buckets as i64);
        for (requests, _, _) in pieces {
            for r in requests.iter() {
                c.joined(self.prefix.as_bytes(), r.key.as_bytes());
            }
        }
        write_argv(mode, pieces, 0, &mut c);
        c.finish()
    }

    /// Reads Redis's clock (one script call in `time` mode).
    async fn time(&self) -> Result<(), StoreError> {
        let reply = self.call("time", &[]).await?;
        parse_reply(&reply, &[]).map(|(now_us, _)| self.clock.observe(now_us))
    }

    /// Decides pieces in one call; one answer per piece, and the Redis `TIME` of the call in
    /// microseconds (when its charges were made).
    async fn decide_pieces(&self, pieces: &[Piece<'_>]) -> Result<(i64, Vec<Answer>), StoreError> {
        let reply = self.call("decide", pieces).await?;
        let (now_us, answers) = parse_reply(&reply, pieces)?;
        self.clock.observe(now_us);
        Ok((now_us, answers))
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
                        Charge::default(),
                    )
                })
                .collect();
            match self.decide_pieces(&pieces).await {
                Ok((at, answers)) => answers.into_iter().map(|a| Ok((a, at))).collect(),
                // One failed call, whatever the number of requests it carried.
                Err(e) => vec![Err(e.of_one_call()); live.len()],
            }
        };
        let mut late: Vec<(BucketRequest, Charge)> = Vec::new();
        for (p, answer) in live.into_iter().zip(answers) {
            let charged = matches!(answer, Ok(((Status::Admitted, _), _)))
                && p.requests.iter().any(|r| r.cost > 0);
            let charged_at = answer.as_ref().map_or(0, |(_, at)| *at);
            let result = match answer {
                Ok(((Status::Expired, _), _)) => Err(StoreError::Timeout),
                Ok(((_, outcomes), _)) => Ok(outcomes),
                Err(e) => Err(e),
            };
            if let Err(Ok(outcomes)) = p.reply.send(result) {
                if charged {
                    late.extend(p.requests.into_iter().zip(&outcomes).map(|(r, o)| {
                        let charge = Charge::of(&r, o, charged_at);
                        (r, charge)
                    }));
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
    async fn decide_by_slot(&self, live: &[Pending]) -> Vec<Result<(Answer, i64), StoreError>> {
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
                        Charge::default(),
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
            /// Buckets admitted (charged), with the Redis `TIME` (us) of their slot's call.
            admitted: Vec<(usize, i64)>,
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
                Ok((at, answers)) => {
                    for ((pi, members), (status, outcomes)) in pieces.iter().zip(answers) {
                        let t = &mut tallies[*pi];
                        for (&i, o) in members.iter().zip(outcomes) {
                            t.outcomes[i] = o;
                        }
                        match status {
                            Status::Admitted => t.admitted.extend(members.iter().map(|&i| (i, at))),
                            Status::Denied => t.denied = true,
                            Status::Expired => t.expired = true,
                        }
                    }
                }
                Err(e) => {
                    let e = e.of_one_call();
                    for (pi, _) in pieces {
                        tallies[*pi].error.get_or_insert_with(|| e.clone());
                    }
                }
            }
        }
        let mut refunds: Vec<(BucketRequest, Charge)> = Vec::new();
        let mut answers = Vec::with_capacity(live.len());
        for (p, mut t) in live.iter().zip(tallies) {
            let whole = !t.denied && !t.expired && t.error.is_none();
            // A late reply's refund goes back to the earliest slot call's time (a request
            // whose slots' calls straddle a window boundary and come back late is not tracked
            // further; for a token bucket an earlier time only gives back less).
            let first_at = t.admitted.iter().map(|(_, at)| *at).min().unwrap_or(0);
            if whole {
                answers.push(Ok(((Status::Admitted, t.outcomes), first_at)));
                continue;
            }
            // Give back what the admitting slots took, so the request charges nothing.
            for &(i, at) in &t.admitted {
                let r = &p.requests[i];
                if r.cost > 0 {
                    refunds.push((r.clone(), Charge::of(r, &t.outcomes[i], at)));
                }
                // Charged and given back: reported uncharged, as the script reports a slot
                // that denied.
                t.outcomes[i] = if r.algorithm.is_window() {
                    super::window::uncharged(t.outcomes[i], r.burst, r.cost)
                } else {
                    super::gcra::uncharged(t.outcomes[i], r.interval_ns, r.burst, r.cost)
                };
            }
            answers.push(if t.denied {
                Ok(((Status::Denied, t.outcomes), first_at))
            } else if let Some(e) = t.error {
                Err(e)
            } else {
                Ok(((Status::Expired, t.outcomes), first_at))
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
    /// `buckets` pairs each bucket with the charge to give back.
    async fn refund(&self, buckets: &[(BucketRequest, Charge)]) {
        use std::hash::BuildHasher;
        let ids = std::collections::hash_map::RandomState::new();
        let owed: Vec<Owed> = buckets
            .iter()
            .map(|(b, charge)| {
                let id =
                    ids.hash_one(NEXT_REFUND.fetch_add(1, Ordering::Relaxed)) & ((1 << 53) - 1);
                (b.clone(), int(id).max(1), *charge)
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
                "giving tokens back failed for good: those buckets may stay charged (a try that \
                 reached Redis after it was given up on still applies, once)"
            );
        });
    }

    /// One try at [`Caller::refund`]; returns the buckets whose call failed.
    async fn refund_once(&self, owed: &[Owed]) -> Vec<Owed> {
        let buckets: Vec<BucketRequest> = owed.iter().map(|(b, _, _)| b.clone()).collect();
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
                    .map(|&i| (vec![&buckets[i]], owed[i].1, owed[i].2))
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

/// Where a script call's arguments go: fred values (fred lanes, the store's own connection) or
/// a RESP frame (a lane's own connection).
trait ScriptArgs {
    fn int(&mut self, value: i64);
    fn text(&mut self, value: &str);
}

impl ScriptArgs for Vec<fred::types::Value> {
    fn int(&mut self, value: i64) {
        self.push(value.into());
    }
    fn text(&mut self, value: &str) {
        self.push(value.into());
    }
}

impl ScriptArgs for resp::Command {
    fn int(&mut self, value: i64) {
        resp::Command::int(self, value);
    }
    fn text(&mut self, value: &str) {
        self.arg(value.as_bytes());
    }
}

/// The script's ARGV for one call, keys aside (`lua/token_bucket.lua` documents it): mode, the
/// number of requests, `keys_in_argv` (Cluster: the keys follow at the end), the call's
/// distinct policies once, then per request its bucket count, deadline (and in refunds the
/// charge's second), and per bucket its policy's position, "P" or "P*C".
fn write_argv(mode: &str, pieces: &[Piece<'_>], keys_in_argv: i64, out: &mut impl ScriptArgs) {
    // The call's distinct policies, sent once (a batch's requests share a few limits); each
    // bucket then names its policy by position.
    let mut policies: Vec<(i64, i64, i64)> = Vec::new();
    let mut at: Vec<i64> = Vec::with_capacity(pieces.iter().map(|(r, _, _)| r.len()).sum());
    for r in pieces.iter().flat_map(|(r, _, _)| r.iter()) {
        let policy = policy_triple(r);
        let i = match policies.iter().position(|p| *p == policy) {
            Some(i) => i,
            None => {
                policies.push(policy);
                policies.len() - 1
            }
        };
        at.push(i as i64 + 1);
    }
    out.text(mode);
    out.int(pieces.len() as i64);
    out.int(keys_in_argv);
    out.int(policies.len() as i64);
    for (interval, burst, algorithm) in &policies {
        out.int(*interval);
        out.int(*burst);
        out.int(*algorithm);
    }
    let refund = mode == "refund";
    let mut next = at.into_iter();
    for (requests, deadline_us, charge) in pieces {
        out.int(requests.len() as i64);
        out.int(*deadline_us);
        if refund {
            out.int(charge.at_us);
            out.int(charge.debt_ns);
        }
        for r in requests.iter() {
            let policy = next.next().unwrap_or(1);
            // A cost above the burst never fits; the script only needs to see that, so it is
            // sent as at most burst + 1 (exact in Lua doubles, never multiplied out). "P" for
            // cost 1 (nearly every bucket), "P*C" otherwise: one argument.
            match r.cost.min(r.burst.saturating_add(1)) {
                1 => out.int(policy),
                cost => out.text(&format!("{policy}*{cost}")),
            }
        }
    }
}

/// A bucket's policy as the script takes it: interval (ns), burst, algorithm (0 token bucket,
/// 1 sliding window, 2 fixed window).
fn policy_triple(r: &BucketRequest) -> (i64, i64, i64) {
    (
        int(r.interval_ns),
        int(r.burst),
        match r.algorithm {
            Algorithm::TokenBucket => 0,
            Algorithm::SlidingWindow => 1,
            Algorithm::FixedWindow => 2,
        },
    )
}

/// A script reply as integers; a server error as [`StoreError::Script`].
fn integers(reply: Reply) -> Result<Vec<i64>, StoreError> {
    match reply {
        Reply::Array(Some(items)) => items
            .into_iter()
            .map(|item| match item {
                Reply::Integer(i) => Ok(i),
                other => Err(StoreError::Script(format!(
                    "unexpected item in the script's reply: {other:?}"
                ))),
            })
            .collect(),
        Reply::Error(message) => Err(StoreError::Script(message)),
        other => Err(StoreError::Script(format!(
            "unexpected script reply: {other:?}"
        ))),
    }
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Splits a reply into Redis's clock (microseconds) and one answer per request of `pieces`.
///
/// The script returns each bucket's state as it read it (a token bucket's debt; a window's
/// current and previous counts), not its outcome: the outcome is computed here, by the same
/// arithmetic the memory store uses ([`gcra::evaluate`], [`window::evaluate`]), at the call's
/// Redis `TIME`. Redis then converts 1 + 1 or 2 numbers per bucket instead of 1 + 5, and the
/// script computes no headers' values (both were most of its cost).
fn parse_reply(reply: &[i64], pieces: &[Piece<'_>]) -> Result<(i64, Vec<Answer>), StoreError> {
    let short = || {
        StoreError::Script(format!(
            "script returned {} values, fewer than its requests need",
            reply.len()
        ))
    };
    let (Some(&seconds), Some(&micros)) = (reply.first(), reply.get(1)) else {
        return Err(short());
    };
    let now_us = seconds.saturating_mul(1_000_000).saturating_add(micros);
    let now = u64::try_from(now_us).unwrap_or(0).saturating_mul(1_000);
    let value = |at: usize| -> Result<u64, StoreError> {
        reply
            .get(at)
            .map(|v| u64::try_from(*v).unwrap_or(0))
            .ok_or_else(short)
    };
    let mut at = 2;
    let mut answers = Vec::with_capacity(pieces.len());
    for (requests, _, _) in pieces {
        let status = match value(at)? {
            1 => Status::Admitted,
            2 => Status::Expired,
            _ => Status::Denied,
        };
        at += 1;
        let mut outcomes = Vec::with_capacity(requests.len());
        if status == Status::Expired {
            outcomes.resize(requests.len(), BucketOutcome::default());
        } else {
            for r in requests {
                let state = if r.algorithm.is_window() {
                    at += 2;
                    BucketState::Window(value(at - 2)?, value(at - 1)?)
                } else {
                    at += 1;
                    BucketState::Debt(value(at - 1)?)
                };
                outcomes.push(outcome_of(r, state, now, status == Status::Admitted));
            }
        }
        answers.push((status, outcomes));
    }
    if at != reply.len() {
        return Err(StoreError::Script(format!(
            "script returned {} values, expected {at}",
            reply.len()
        )));
    }
    Ok((now_us, answers))
}

/// A bucket as the script read it: a token bucket's debt (ns until full, at most its refill
/// time), or a window's counts in force (current, previous).
#[derive(Debug, Clone, Copy)]
enum BucketState {
    Debt(u64),
    Window(u64, u64),
}

/// The outcome the script's decision means for bucket `r` read as `state` at `now` (ns of
/// Redis `TIME`): charged when the whole request was `admitted`; else as the bucket really is
/// (one that would have admitted reports its state uncharged).
fn outcome_of(r: &BucketRequest, state: BucketState, now: u64, admitted: bool) -> BucketOutcome {
    // The cost as sent: a cost above the burst never fits, whatever its size.
    let cost = r.cost.min(r.burst.saturating_add(1));
    let evaluate = |cost: u64| match state {
        BucketState::Debt(debt) => {
            gcra::evaluate(now.saturating_add(debt), now, r.interval_ns, r.burst, cost).outcome
        }
        BucketState::Window(current, previous) => {
            let w = r.interval_ns.max(1);
            let stored = window::State {
                window: now / w,
                current,
                previous,
            };
            let sliding = r.algorithm == Algorithm::SlidingWindow;
            window::evaluate(stored, now, w, r.burst, cost, sliding).outcome
        }
    };
    let charged = evaluate(cost);
    if admitted || !charged.allowed {
        charged
    } else {
        evaluate(0)
    }
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
        // A thread without a lane of its own (the admin API's `/v1/check`) takes the lanes in
        // turn: its decisions share script calls with the proxy's.
        match self.lane().or_else(|| self.some_lane()) {
            Some(queue) => queue
                .try_send(pending)
                .map_err(|_| StoreError::Connection("decision queue full".into()))?,
            None => {
                // No lanes (yet): the store's own connection, in a task that outlives the
                // deadline so that a late charge is still refunded.
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
        let pieces = [(vec![&uncharged], 0, Charge::default())];
        let reply = self.caller.call("peek", &pieces).await?;
        let (now_us, answers) = parse_reply(&reply, &pieces)?;
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
