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
use std::time::Duration;

/// The token-bucket script, from `lua/token_bucket.lua`.
pub const TOKEN_BUCKET_LUA: &str = include_str!("../../lua/token_bucket.lua");

pub struct RedisStore {
    client: Client,
    script: Script,
    prefix: String,
    timeout: Duration,
    clustered: bool,
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
            client,
            script: Script::from_lua(TOKEN_BUCKET_LUA),
            prefix: cfg.key_prefix.clone(),
            timeout,
            clustered: cfg.mode == RedisMode::Cluster,
        })
    }

    /// Starts the connection task on the current runtime (which must outlive the store) and,
    /// once connected, loads the script. Returns once connected, or with the error that stopped
    /// the first attempt; reconnection goes on in the background either way.
    pub async fn connect(&self, wait: Duration) -> Result<(), StoreError> {
        let _task = self.client.connect();
        match tokio::time::timeout(wait, self.client.wait_for_connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(fred_error(e)),
            Err(_) => return Err(StoreError::Timeout),
        }
        self.script.load(&self.client).await.map_err(fred_error)
    }

    /// Closes the connection.
    pub async fn close(&self) {
        let _ = self.client.quit().await;
    }

    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    fn full_key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len());
        k.push_str(&self.prefix);
        k.push_str(key);
        k
    }

    /// One script call over `requests` (all in one slot), bounded by the timeout.
    async fn call(&self, mode: &str, requests: &[&BucketRequest]) -> Result<Vec<i64>, StoreError> {
        let keys: Vec<String> = requests.iter().map(|r| self.full_key(&r.key)).collect();
        let mut args: Vec<fred::types::Value> = Vec::with_capacity(1 + 3 * requests.len());
        args.push(mode.into());
        for r in requests {
            args.push(
                i64::try_from((r.interval_ns / 1000).max(1))
                    .unwrap_or(i64::MAX)
                    .into(),
            );
            args.push(i64::try_from(r.burst).unwrap_or(i64::MAX).into());
            args.push(i64::try_from(r.cost).unwrap_or(i64::MAX).into());
        }
        let call = self
            .script
            .evalsha_with_reload::<Vec<i64>, _, _>(&self.client, keys, args);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(fred_error),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// Decides one slot's buckets; returns whether all admitted, and their outcomes.
    async fn decide_group(
        &self,
        requests: &[&BucketRequest],
    ) -> Result<(bool, Vec<BucketOutcome>), StoreError> {
        let reply = self.call("decide", requests).await?;
        parse_reply(&reply, requests.len())
    }
}

fn parse_reply(reply: &[i64], n: usize) -> Result<(bool, Vec<BucketOutcome>), StoreError> {
    if reply.len() != 1 + 5 * n {
        return Err(StoreError::Script(format!(
            "script returned {} values for {n} buckets",
            reply.len()
        )));
    }
    let us = |v: i64| u64::try_from(v).unwrap_or(0).saturating_mul(1000);
    let outcomes = reply[1..]
        .chunks_exact(5)
        .map(|c| BucketOutcome {
            allowed: c[0] == 1,
            remaining: u64::try_from(c[1]).unwrap_or(0),
            reset_ns: us(c[2]),
            retry_ns: us(c[3]),
            next_token_ns: us(c[4]),
        })
        .collect();
    Ok((reply[0] == 1, outcomes))
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
            return Ok(self.decide_group(&all).await?.1);
        }
        // Cluster: one call per hash slot, concurrently.
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let slot = fred::util::redis_keyslot(self.full_key(&r.key).as_bytes());
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
            let refunds = group_requests
                .iter()
                .zip(&results)
                .filter(|(_, r)| matches!(r, Ok((true, _))))
                .map(|(g, _)| self.call("refund", g));
            for refund in futures::future::join_all(refunds).await {
                if let Err(e) = refund {
                    tracing::warn!(error = %e, "refund after a cross-slot denial failed");
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            for (o, r) in outcomes.iter_mut().zip(requests) {
                if o.allowed {
                    // Report these as uncharged.
                    o.remaining = (o.remaining + r.cost).min(r.burst);
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
        let reply = self.call("peek", &[&uncharged]).await?;
        let (_, outcomes) = parse_reply(&reply, 1)?;
        outcomes
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Script("empty reply".into()))
    }

    async fn reset(&self, key: &str) -> Result<(), StoreError> {
        let del = self.client.del::<i64, _>(self.full_key(key));
        match tokio::time::timeout(self.timeout, del).await {
            Ok(result) => result.map(|_| ()).map_err(fred_error),
            Err(_) => Err(StoreError::Timeout),
        }
    }
}
