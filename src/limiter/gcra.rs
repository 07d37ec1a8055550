//! Token-bucket arithmetic in its GCRA form: a bucket is one number, the theoretical arrival
//! time (`tat`) at which it will be full again. Shared by every store so that they agree.
//!
//! With `interval` = time per token and `tau = interval * burst` (time to fill an empty
//! bucket), the bucket's "debt" is `max(tat, now) - now`; the tokens in it are
//! `(tau - debt) / interval`. A request of `cost` tokens is admitted when
//! `debt + cost * interval <= tau`.
//!
//! Precision: time is whole nanoseconds and `interval` is the same integer in every store
//! ([`super::Rate::interval_ns`]); validation keeps `tau` at most [`MAX_REFILL_NS`] (2^53) so
//! that `lua/token_bucket.lua`, which computes in doubles, gets exactly these numbers. A cost
//! above the burst never fits and is never multiplied; a denied decision charges nothing, and
//! [`uncharged`] reports the buckets that admitted as they really are.

use super::BucketOutcome;

/// The most nanoseconds a bucket may take to refill (`interval_ns * burst`): 2^53, about 104
/// days. The Redis script computes in Lua doubles, exact for integers up to 2^53; within this
/// bound every value it computes is exact, so both stores agree to the nanosecond.
pub const MAX_REFILL_NS: u64 = 1 << 53;

/// The shortest time per token: 1 µs (at most 1,000,000 tokens per second).
pub const MIN_INTERVAL_NS: u64 = 1_000;

/// The result of evaluating one bucket: the outcome, and the new `tat` to store if the whole
/// decision admits the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evaluation {
    pub outcome: BucketOutcome,
    pub new_tat: u64,
}

/// Evaluates a bucket whose stored `tat` is given (0 for a bucket never seen) at time `now`.
///
/// A `cost` above `burst` can never fit: it is denied with `retry_ns` 0 (there is no time at
/// which it would be admitted) and never multiplied, so no cost can overflow.
pub fn evaluate(tat: u64, now: u64, interval_ns: u64, burst: u64, cost: u64) -> Evaluation {
    let interval = interval_ns.max(1);
    let tau = interval.saturating_mul(burst);
    let debt = tat.saturating_sub(now).min(tau);
    let room = tau - debt;
    let need = (cost <= burst).then(|| cost.saturating_mul(interval));
    match need {
        Some(need) if need <= room => {
            let new_debt = debt + need;
            Evaluation {
                outcome: state(new_debt, interval, tau),
                new_tat: now.saturating_add(new_debt),
            }
        }
        _ => Evaluation {
            outcome: BucketOutcome {
                allowed: false,
                // Above the burst: never.
                retry_ns: need.map_or(0, |need| need - room),
                ..state(debt, interval, tau)
            },
            new_tat: tat,
        },
    }
}

/// An admitting bucket with `debt` nanoseconds of debt (`debt <= tau`).
fn state(debt: u64, interval: u64, tau: u64) -> BucketOutcome {
    BucketOutcome {
        allowed: true,
        remaining: (tau - debt) / interval,
        reset_ns: debt,
        retry_ns: 0,
        next_token_ns: next_token(debt, interval),
    }
}

/// The outcome of a bucket that admitted a request which another bucket denied: what the
/// bucket really holds, since nothing was charged. `charged` is the outcome as if the cost had
/// been taken (its `reset_ns` is the debt after the charge). Denying outcomes are unchanged.
pub fn uncharged(charged: BucketOutcome, interval_ns: u64, burst: u64, cost: u64) -> BucketOutcome {
    if !charged.allowed {
        return charged;
    }
    let interval = interval_ns.max(1);
    let tau = interval.saturating_mul(burst);
    let debt = charged
        .reset_ns
        .saturating_sub(cost.saturating_mul(interval))
        .min(tau);
    state(debt, interval, tau)
}

fn next_token(debt: u64, interval: u64) -> u64 {
    if debt == 0 {
        0
    } else {
        match debt % interval {
            0 => interval,
            partial => partial,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn admits_burst_then_denies() {
        let (mut tat, now) = (0, 10 * SEC);
        for expected_remaining in (0..5).rev() {
            let e = evaluate(tat, now, SEC / 10, 5, 1);
            assert!(e.outcome.allowed);
            assert_eq!(e.outcome.remaining, expected_remaining);
            tat = e.new_tat;
        }
        let e = evaluate(tat, now, SEC / 10, 5, 1);
        assert!(!e.outcome.allowed);
        assert_eq!(e.outcome.remaining, 0);
        assert_eq!(e.outcome.retry_ns, SEC / 10);
        assert_eq!(e.outcome.reset_ns, SEC / 2);
        assert_eq!(e.new_tat, tat, "a denial charges nothing");
    }

    #[test]
    fn refills_over_time_and_caps_at_burst() {
        let interval = SEC / 10;
        let e = evaluate(0, 100 * SEC, interval, 3, 3);
        assert_eq!(e.outcome.remaining, 0);
        // 150 ms later one and a half tokens are back: one whole token.
        let later = evaluate(e.new_tat, 100 * SEC + 150_000_000, interval, 3, 0);
        assert_eq!(later.outcome.remaining, 1);
        assert_eq!(later.outcome.next_token_ns, 50_000_000);
        // An hour later the bucket is full, not fuller.
        let much_later = evaluate(e.new_tat, 3700 * SEC, interval, 3, 0);
        assert_eq!(much_later.outcome.remaining, 3);
        assert_eq!(much_later.outcome.next_token_ns, 0);
        assert_eq!(much_later.outcome.reset_ns, 0);
    }

    #[test]
    fn cost_above_one_and_above_burst() {
        let e = evaluate(0, SEC, SEC, 10, 4);
        assert!(e.outcome.allowed);
        assert_eq!(e.outcome.remaining, 6);
        let e2 = evaluate(e.new_tat, SEC, SEC, 10, 7);
        assert!(!e2.outcome.allowed);
        assert_eq!(e2.outcome.retry_ns, SEC);
        let never = evaluate(0, SEC, SEC, 10, 11);
        assert!(!never.outcome.allowed);
        assert_eq!(never.outcome.retry_ns, 0, "no wait makes 11 fit in 10");
        assert_eq!(never.outcome.remaining, 10);
    }

    #[test]
    fn huge_costs_never_overflow() {
        for cost in [11, 1_000_000_000_000_000, u64::MAX] {
            let e = evaluate(5 * SEC, SEC, SEC, 10, cost);
            assert!(!e.outcome.allowed);
            assert_eq!(e.outcome.retry_ns, 0);
            assert_eq!(e.outcome.remaining, 6);
            assert_eq!(e.new_tat, 5 * SEC);
        }
    }

    #[test]
    fn uncharged_is_the_state_before_the_charge() {
        let interval = SEC / 10;
        let before = evaluate(10 * SEC + 250_000_000, 10 * SEC, interval, 5, 0);
        let charged = evaluate(10 * SEC + 250_000_000, 10 * SEC, interval, 5, 2);
        assert_eq!(charged.outcome.remaining, 0);
        assert_eq!(uncharged(charged.outcome, interval, 5, 2), before.outcome);
        assert_eq!(before.outcome.remaining, 2);
        assert_eq!(before.outcome.next_token_ns, 50_000_000);
    }
}
