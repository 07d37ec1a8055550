//! Token-bucket arithmetic in its GCRA form: a bucket is one number, the theoretical arrival
//! time (`tat`) at which it will be full again. Shared by every store so that they agree.
//!
//! With `interval` = time per token and `tau = interval * burst` (time to fill an empty
//! bucket), the bucket's "debt" is `max(tat, now) - now`; the tokens in it are
//! `(tau - debt) / interval`. A request of `cost` tokens is admitted when
//! `debt + cost * interval <= tau`.

use super::BucketOutcome;

/// The result of evaluating one bucket: the outcome, and the new `tat` to store if the whole
/// decision admits the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evaluation {
    pub outcome: BucketOutcome,
    pub new_tat: u64,
}

/// Evaluates a bucket whose stored `tat` is given (0 for a bucket never seen) at time `now`.
pub fn evaluate(tat: u64, now: u64, interval_ns: u64, burst: u64, cost: u64) -> Evaluation {
    let interval = interval_ns.max(1);
    let tau = interval.saturating_mul(burst);
    let debt = tat.saturating_sub(now).min(tau);
    let new_debt = debt.saturating_add(cost.saturating_mul(interval));
    if new_debt <= tau {
        Evaluation {
            outcome: BucketOutcome {
                allowed: true,
                remaining: (tau - new_debt) / interval,
                reset_ns: new_debt,
                retry_ns: 0,
                next_token_ns: next_token(new_debt, interval),
            },
            new_tat: now.saturating_add(new_debt),
        }
    } else {
        Evaluation {
            outcome: BucketOutcome {
                allowed: false,
                remaining: (tau - debt) / interval,
                reset_ns: debt,
                retry_ns: new_debt - tau,
                next_token_ns: next_token(debt, interval),
            },
            new_tat: tat,
        }
    }
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
    }
}
