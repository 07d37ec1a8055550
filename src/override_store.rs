//! Where the runtime overrides live and how every instance gets them.
//!
//! Each instance decides from an in-process [`OverrideTable`] (an `ArcSwap`: a request plans
//! under one snapshot). With the memory store that table *is* the store: changes made through
//! this instance's admin API, lost on restart, seen by no other instance. With Redis the table
//! is a copy of one Redis hash, `{prefix}{overrides}:table` (field: the JSON array
//! `[route, limit, key value]`; value: the entry as JSON), beside a version counter,
//! `{prefix}{overrides}:version`; the `{overrides}` hash tag puts both in one Cluster slot. A
//! change is one script call (`HSET`/`HDEL` and `INCR` of the version, atomically) followed by a
//! reload on the instance that made it. Every instance polls the version every
//! [`POLL_EVERY`] and reloads the whole hash (version and hash read atomically by one script)
//! when it moved, and reloads it every [`RESYNC_EVERY`] anyway, so a change is seen everywhere
//! within about `POLL_EVERY` plus one round trip, and a missed or lost version change (a failed
//! poll, a Redis that lost the counter) lasts at most `RESYNC_EVERY`. At start-up the table is
//! loaded right after the store connects, before the proxy listener opens (within
//! `store.redis.startup_wait_ms`; when that fails the proxy starts with the YAML policies and
//! the poll loads the table as soon as Redis answers). A poll that finds the version moved or
//! the table different clears the deny cache (a remembered denial may no longer hold).

use crate::limiter::overrides::{self, Entry, Id, OverrideTable};
use crate::limiter::redis::fred_error;
use crate::limiter::slot::StoreSlot;
use crate::limiter::StoreError;
use crate::state::Shared;
use arc_swap::ArcSwap;
use fred::interfaces::KeysInterface;
use fred::types::scripts::Script;
use pingora::server::ShutdownWatch;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often every instance reads the version counter.
pub const POLL_EVERY: Duration = Duration::from_millis(250);
/// How often every instance reloads the whole table even when the version did not move.
pub const RESYNC_EVERY: Duration = Duration::from_secs(5);
/// The longest one Redis call of the poll may take.
const CALL_LIMIT: Duration = Duration::from_secs(1);

/// Sets one entry unless that would hold more than ARGV[3] (the cap, checked here so that
/// concurrent writers through several instances cannot pass it); `#full` then.
const SET_LUA: &str = "local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return '#full'
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[2])
return old or ''";
/// What [`SET_LUA`] answers when the table is full.
const FULL: &str = "#full";

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The store did not confirm the change: it may or may not have been applied.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Adding one more would pass the cap.
    #[error("{held} runtime overrides are held, the most there may be ({cap})")]
    Full { held: usize, cap: usize },
}
const DELETE_LUA: &str = "local old = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if old ~= '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('INCR', KEYS[2])
end
return old";
const LOAD_LUA: &str = "local all = redis.call('HGETALL', KEYS[1])
table.insert(all, 1, redis.call('GET', KEYS[2]) or '0')
return all";

/// The Redis keys of the table and its version under a key prefix.
pub fn redis_keys(prefix: &str) -> (String, String) {
    (
        format!("{prefix}{{overrides}}:table"),
        format!("{prefix}{{overrides}}:version"),
    )
}

pub struct OverrideStore {
    table: ArcSwap<OverrideTable>,
    /// Serialises changes to the in-process table (memory store).
    write: tokio::sync::Mutex<()>,
    /// The store the table was last loaded from (its address) and the version loaded.
    seen: Mutex<Option<(usize, String)>>,
    set: Script,
    delete: Script,
    load: Script,
    held: prometheus::IntGauge,
}

fn slot_id(slot: &StoreSlot) -> usize {
    slot as *const StoreSlot as usize
}

impl OverrideStore {
    pub fn new(held: prometheus::IntGauge) -> OverrideStore {
        OverrideStore {
            table: ArcSwap::from_pointee(OverrideTable::default()),
            write: tokio::sync::Mutex::new(()),
            seen: Mutex::new(None),
            set: Script::from_lua(SET_LUA),
            delete: Script::from_lua(DELETE_LUA),
            load: Script::from_lua(LOAD_LUA),
            held,
        }
    }

    /// The table requests are planned under now (an owned handle, for admin calls).
    pub fn snapshot(&self) -> Arc<OverrideTable> {
        self.table.load_full()
    }

    /// The table for one synchronous use (planning a request): no reference count is touched,
    /// so threads planning at once do not contend on it.
    pub fn current(&self) -> arc_swap::Guard<Arc<OverrideTable>> {
        self.table.load()
    }

    /// Replaces the table; whether it differs from the one held.
    fn install(&self, table: OverrideTable) -> bool {
        self.held.set(table.len() as i64);
        let changed = **self.table.load() != table;
        if changed {
            self.table.store(Arc::new(table));
        }
        changed
    }

    /// Sets (`Some`) or removes (`None`) one override in the store of `slot`, adding at most
    /// up to `cap` entries (checked atomically where the table lives); returns the entry it
    /// replaced. With Redis, call [`OverrideStore::reload_after_change`] next: the change is
    /// made whether or not that reload is quick.
    pub async fn change(
        &self,
        slot: &StoreSlot,
        id: Id,
        entry: Option<Entry>,
        cap: usize,
    ) -> Result<Option<Entry>, ChangeError> {
        let Some(redis) = &slot.redis else {
            let _guard = self.write.lock().await;
            let mut table = (**self.table.load()).clone();
            if entry.is_some() && table.get(&id.0, &id.1, &id.2).is_none() && table.len() >= cap {
                return Err(ChangeError::Full {
                    held: table.len(),
                    cap,
                });
            }
            let before = table.put(id, entry);
            self.install(table);
            return Ok(before);
        };
        let (client, prefix) = redis.own_client();
        let (table_key, version_key) = redis_keys(prefix);
        let field = overrides::field(&id.0, &id.1, &id.2);
        let keys = vec![table_key, version_key];
        let old: String = match entry {
            Some(e) => {
                self.set
                    .evalsha_with_reload(
                        client,
                        keys,
                        vec![field, e.to_json().to_string(), cap.to_string()],
                    )
                    .await
            }
            None => {
                self.delete
                    .evalsha_with_reload(client, keys, vec![field])
                    .await
            }
        }
        .map_err(fred_error)?;
        if old == FULL {
            return Err(ChangeError::Full {
                held: self.table.load().len(),
                cap,
            });
        }
        Ok(serde_json::from_str(&old)
            .ok()
            .and_then(|v| Entry::from_json(&v)))
    }

    /// Reloads the table after a change this instance made (bounded; a failure is made up by
    /// the next poll).
    pub async fn reload_after_change(&self, slot: &StoreSlot) {
        if slot.redis.is_none() {
            return;
        }
        match tokio::time::timeout(CALL_LIMIT, self.sync(slot)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reloading runtime overrides after a change failed")
            }
            Err(_) => tracing::warn!("reloading runtime overrides after a change timed out"),
        }
    }

    /// Loads the whole table from Redis (a no-op for the memory store); whether it changed.
    pub async fn sync(&self, slot: &StoreSlot) -> Result<bool, StoreError> {
        let Some(redis) = &slot.redis else {
            return Ok(false);
        };
        let (client, prefix) = redis.own_client();
        let (table_key, version_key) = redis_keys(prefix);
        let all: Vec<String> = self
            .load
            .evalsha_with_reload(client, vec![table_key, version_key], Vec::<String>::new())
            .await
            .map_err(fred_error)?;
        let mut it = all.into_iter();
        let version = it.next().unwrap_or_default();
        let mut table = OverrideTable::default();
        let mut unreadable: Option<(String, String)> = None;
        let mut skipped = 0usize;
        while let (Some(f), Some(v)) = (it.next(), it.next()) {
            let parsed = overrides::parse_field(&f).zip(
                serde_json::from_str(&v)
                    .ok()
                    .and_then(|v| Entry::from_json(&v)),
            );
            match parsed {
                Some((id, entry)) => {
                    table.put(id, Some(entry));
                }
                None => {
                    skipped += 1;
                    unreadable.get_or_insert((f, v));
                }
            }
        }
        if let Some((field, value)) = unreadable {
            // One line per load, not one per entry.
            tracing::warn!(
                skipped,
                first_field = %field,
                first_value = %value,
                "ignoring unreadable runtime overrides"
            );
        }
        let changed = self.install(table);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some((slot_id(slot), version));
        Ok(changed)
    }

    /// Whether the version in Redis differs from the one loaded from this store.
    async fn moved(&self, slot: &StoreSlot) -> Result<bool, StoreError> {
        let Some(redis) = &slot.redis else {
            return Ok(false);
        };
        let (client, prefix) = redis.own_client();
        let (_, version_key) = redis_keys(prefix);
        let now: Option<String> = client.get(version_key).await.map_err(fred_error)?;
        let now = now.unwrap_or_else(|| "0".into());
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(seen.is_none_or(|(id, v)| id != slot_id(slot) || v != now))
    }
}

/// Keeps the table in step with Redis until shutdown (see the module docs for the bounds).
pub async fn poll(shared: Arc<Shared>, mut shutdown: ShutdownWatch) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let slot = shared.store();
        if slot.redis.is_none() {
            continue;
        }
        let store = &shared.overrides;
        let due = last_full.elapsed() >= RESYNC_EVERY;
        let result = async {
            let moved = store.moved(&slot).await?;
            if due || moved {
                // A moved version is a change, and the instance that made it reset the
                // bucket: even when the table reads the same again (set and deleted between
                // two polls), a denial remembered here may no longer hold.
                return store
                    .sync(&slot)
                    .await
                    .map(|changed| Some(changed || moved));
            }
            Ok(None)
        };
        match tokio::time::timeout(CALL_LIMIT, result).await {
            Ok(Ok(Some(changed))) => {
                last_full = tokio::time::Instant::now();
                if changed {
                    shared.decider.deny_cache.clear();
                    tracing::info!(
                        held = store.snapshot().len(),
                        "runtime overrides reloaded from Redis"
                    );
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "polling runtime overrides failed"),
            Err(_) => tracing::debug!("polling runtime overrides timed out"),
        }
    }
}
