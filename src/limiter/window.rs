//! Window arithmetic, shared by every store (`lua/token_bucket.lua` computes the same numbers):
//! a fixed window (what envoyproxy/ratelimit and Kong OSS do) and Cloudflare's sliding-window
//! counter. Windows are aligned to the clock: window `i` covers `[i * W, (i + 1) * W)` of the
//! store's clock (Redis `TIME`, or the memory store's clock, which counts from the Unix epoch).
//! The quota `Q` is the rate's count per window.
//!
//! * **Fixed window**: a counter per window. A request of `cost` is admitted when
//!   `count + cost <= Q`; the counter starts from 0 at each boundary. Over any span of length
//!   `W` up to `2Q` can pass (a full window's worth on each side of a boundary).
//! * **Sliding window**: the counts of the current window (`cur`) and the previous one
//!   (`prev`). At `e` into the current window, the previous window is weighted by the share of
//!   it the sliding window `(now - W, now]` still overlaps: `used = cur + ceil(prev * (W - e) /
//!   W)`, and a request is admitted when `used + cost <= Q`. Elapsed time is counted in whole
//!   milliseconds (rounded down, so the weight is never smaller than the exact one): every value
//!   is then an integer below 2^53 when `Q * W_ms <= 2^53` ([`check_precision`]), and the script
//!   computes it exactly in Lua doubles. It assumes the previous window's requests were spread
//!   evenly; the admitted count in a sliding span of `W` is at most `Q` when they were, and can
//!   exceed it when they were not (at most `2Q - 1` in the worst case; see README, Limits).
//!
//! A cost above `Q` never fits: denied with `retry_ns` 0, never multiplied. A denied decision
//! charges nothing; the buckets that admitted report [`evaluate`] with cost 0.

use super::BucketOutcome;
use std::time::Duration;

const MS: u64 = 1_000_000;

/// The most `Q * W_ms` a sliding window may have: 2^53 (exact in Lua doubles).
pub const MAX_SLIDING_PRODUCT: u128 = 1 << 53;

/// Whether a sliding window of `quota` per `period` is held exactly by both stores.
pub fn check_precision(quota: u64, period: Duration) -> Result<(), String> {
    let window_ms = period.as_millis();
    if u128::from(quota) * window_ms > MAX_SLIDING_PRODUCT {
        return Err(format!(
            "a sliding window of {quota} per {}s is too fine to count exactly: quota times \
             window in milliseconds must be at most 2^53 ({}); lower the quota or use a shorter \
             period",
            period.as_secs(),
            MAX_SLIDING_PRODUCT
        ));
    }
    Ok(())
}

/// A window bucket's stored state: the window it was last written in and its counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct State {
    /// The window index (`now / W`) of the last write.
    pub window: u64,
    /// Requests counted in that window.
    pub current: u64,
    /// Requests counted in the window before it (sliding window only).
    pub previous: u64,
}

/// One evaluation: the outcome and the state to store if the whole decision admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evaluation {
    pub outcome: BucketOutcome,
    pub new_state: State,
}

/// The counts in force at `now`: `(window index, cur, prev, elapsed ns into the window)`.
fn normalise(state: State, now: u64, window_ns: u64, sliding: bool) -> (u64, u64, u64, u64) {
    let w = window_ns.max(1);
    let index = now / w;
    let elapsed = now % w;
    // A stored window ahead of now (the clock stepped back: a failover to a node whose clock
    // is behind) is the current one, counts kept: starting it empty would admit a fresh quota.
    let (cur, prev) = if state.window >= index {
        (state.current, state.previous)
    } else if state.window.wrapping_add(1) == index {
        (0, state.current)
    } else {
        (0, 0)
    };
    (index, cur, if sliding { prev } else { 0 }, elapsed)
}

/// `ceil(prev * left_ms / w_ms)`: the previous window's weighted count.
fn weighted(prev: u64, left_ms: u64, w_ms: u64) -> u64 {
    let num = u128::from(prev) * u128::from(left_ms);
    u64::try_from(num.div_ceil(u128::from(w_ms.max(1)))).unwrap_or(u64::MAX)
}

/// Nanoseconds from `elapsed` (into the current window) until `cost` fits, for a cost at most
/// the quota that does not fit now.
fn wait(cur: u64, prev: u64, elapsed: u64, w: u64, quota: u64, cost: u64, sliding: bool) -> u64 {
    let w_ms = (w / MS).max(1);
    // The first millisecond of a window at which `p` weighted plus `c + cost` fits (w_ms: the
    // window's end, where `p` drops out).
    let fits_at = |p: u64, c: u64| -> u64 {
        let room = quota.saturating_sub(c.saturating_add(cost));
        if p == 0 {
            return 0;
        }
        let left = u128::from(room) * u128::from(w_ms) / u128::from(p);
        w_ms.saturating_sub(u64::try_from(left).unwrap_or(u64::MAX))
    };
    if cur.saturating_add(cost) <= quota {
        // In this window, once enough of the previous one has slid out.
        let at = fits_at(prev, cur);
        (at * MS).max(elapsed) - elapsed
    } else {
        // In the next window, where (sliding) this one's count is the previous.
        let to_end = w - elapsed;
        if sliding {
            to_end + fits_at(cur, 0) * MS
        } else {
            to_end
        }
    }
}

/// Evaluates a window bucket stored as `state` (default for one never seen) at `now`, with
/// `window_ns` the window and `quota` the requests per window.
pub fn evaluate(
    state: State,
    now: u64,
    window_ns: u64,
    quota: u64,
    cost: u64,
    sliding: bool,
) -> Evaluation {
    let w = window_ns.max(1);
    let (index, cur, prev, elapsed) = normalise(state, now, w, sliding);
    let w_ms = (w / MS).max(1);
    let left_ms = w_ms.saturating_sub(elapsed / MS).max(1);
    let used = cur.saturating_add(weighted(prev, left_ms, w_ms));
    let fits = cost <= quota && used <= quota - cost;
    let here = State {
        window: index,
        current: cur,
        previous: prev,
    };
    if fits {
        let after = State {
            current: cur + cost,
            ..here
        };
        let remaining = quota - used - cost;
        Evaluation {
            outcome: outcome(after, remaining, elapsed, w, quota, sliding, true, 0),
            new_state: after,
        }
    } else {
        let retry = if cost <= quota {
            wait(cur, prev, elapsed, w, quota, cost, sliding)
        } else {
            0
        };
        Evaluation {
            outcome: outcome(
                here,
                quota.saturating_sub(used),
                elapsed,
                w,
                quota,
                sliding,
                false,
                retry,
            ),
            new_state: state,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn outcome(
    s: State,
    remaining: u64,
    elapsed: u64,
    w: u64,
    quota: u64,
    sliding: bool,
    allowed: bool,
    retry_ns: u64,
) -> BucketOutcome {
    let to_end = w - elapsed;
    let reset_ns = if s.current > 0 {
        if sliding {
            to_end + w
        } else {
            to_end
        }
    } else if s.previous > 0 {
        to_end
    } else {
        0
    };
    let next_token_ns = if remaining < quota {
        wait(
            s.current,
            s.previous,
            elapsed,
            w,
            quota,
            remaining + 1,
            sliding,
        )
    } else {
        0
    };
    BucketOutcome {
        allowed,
        remaining,
        reset_ns,
        retry_ns,
        next_token_ns,
    }
}

/// When a window bucket's state may be forgotten: the time from which it counts nothing.
pub fn expires_at(state: State, window_ns: u64, sliding: bool) -> u64 {
    let ahead = if sliding { 2 } else { 1 };
    state
        .window
        .saturating_add(ahead)
        .saturating_mul(window_ns.max(1))
}

/// A window outcome that admitted a request later given back (a Cluster slot that admitted
/// while another denied): `cost` more remains. Times are kept as they were reported.
pub fn uncharged(charged: BucketOutcome, quota: u64, cost: u64) -> BucketOutcome {
    if !charged.allowed {
        return charged;
    }
    BucketOutcome {
        remaining: charged.remaining.saturating_add(cost).min(quota),
        ..charged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn run(state: &mut State, now: u64, w: u64, q: u64, cost: u64, sliding: bool) -> BucketOutcome {
        let e = evaluate(*state, now, w, q, cost, sliding);
        *state = e.new_state;
        e.outcome
    }

    #[test]
    fn a_window_stored_ahead_of_the_clock_keeps_its_counts() {
        // Spent in window 1001, then the clock steps back into window 1000 (a failover to a
        // node whose clock is behind): still spent, for both algorithms.
        let w = 60 * SEC;
        for sliding in [false, true] {
            let mut s = State::default();
            for _ in 0..3 {
                assert!(run(&mut s, 1001 * w + SEC, w, 3, 1, sliding).allowed);
            }
            let back = run(&mut s, 1000 * w + 59 * SEC, w, 3, 1, sliding);
            assert!(
                !back.allowed,
                "sliding {sliding}: a step back gave a fresh quota"
            );
        }
    }

    #[test]
    fn fixed_window_counts_and_resets_at_the_boundary() {
        let w = 60 * SEC;
        let mut s = State::default();
        let start = 1000 * w + 50 * SEC;
        for i in 0..10 {
            let o = run(&mut s, start, w, 10, 1, false);
            assert!(o.allowed);
            assert_eq!(o.remaining, 9 - i);
            assert_eq!(o.reset_ns, 10 * SEC);
        }
        let o = run(&mut s, start, w, 10, 1, false);
        assert!(!o.allowed);
        assert_eq!(o.retry_ns, 10 * SEC);
        assert_eq!(o.next_token_ns, 10 * SEC);
        // At the boundary a full quota again.
        let o = run(&mut s, 1001 * w, w, 10, 10, false);
        assert!(o.allowed);
        assert_eq!(o.remaining, 0);
        let never = run(&mut s, 1001 * w, w, 10, 11, false);
        assert!(!never.allowed);
        assert_eq!(never.retry_ns, 0);
    }

    #[test]
    fn sliding_window_weighs_the_previous_window() {
        let w = 60 * SEC;
        let mut s = State::default();
        // 10 in window 1000, none left.
        assert!(run(&mut s, 1000 * w, w, 10, 10, true).allowed);
        // A quarter into window 1001: the previous counts ceil(10 * 3/4) = 8; 2 fit.
        let t = 1001 * w + 15 * SEC;
        let o = run(&mut s, t, w, 10, 0, true);
        assert_eq!(o.remaining, 2);
        assert!(run(&mut s, t, w, 10, 2, true).allowed);
        let o = run(&mut s, t, w, 10, 1, true);
        assert!(!o.allowed);
        // One more fits once the previous weighs 7: ceil(10 * left / 60 s) <= 7, left <= 42 s.
        assert_eq!(o.retry_ns, 3 * SEC);
        assert!(!run(&mut s, t + 3 * SEC - 1, w, 10, 1, true).allowed);
        assert!(run(&mut s, t + 3 * SEC, w, 10, 1, true).allowed);
    }

    #[test]
    fn sliding_retry_past_the_window_end() {
        let w = 10 * SEC;
        let mut s = State::default();
        assert!(run(&mut s, 100 * w + 9 * SEC, w, 4, 4, true).allowed);
        // Cost 3 next window: cur 4 becomes previous; fits when ceil(4 * left / 10 s) <= 1,
        // left <= 2.5 s, i.e. 7.5 s into the next window; we are 1 s from its start.
        let o = run(&mut s, 100 * w + 9 * SEC, w, 4, 3, true);
        assert_eq!(o.retry_ns, SEC + 7_500_000_000);
        let later = 100 * w + 9 * SEC + o.retry_ns;
        assert!(!run(&mut s, later - MS, w, 4, 3, true).allowed);
        assert!(run(&mut s, later, w, 4, 3, true).allowed);
    }

    #[test]
    fn precision_bound() {
        assert!(check_precision(100_000_000, Duration::from_secs(86_400)).is_ok());
        assert!(check_precision(200_000_000, Duration::from_secs(86_400)).is_err());
    }
}
