//! What the gateway writes itself: rate-limit headers (legacy `X-RateLimit-*` and IETF
//! draft-10 `RateLimit-Policy` / `RateLimit`), the 429 problem+json response, the 404 for
//! requests no route takes, and the problem+json 502/504 written when the upstream fails.

use crate::limiter::{ceil_secs, Decision, RetryAfter};
use crate::routes::HeaderFlags;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use std::fmt::Write as _;

pub const PROBLEM_JSON: &str = "application/problem+json";
const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// Adds the rate-limit headers describing `decision` to a response.
pub fn add_rate_limit_headers(
    resp: &mut ResponseHeader,
    decision: &Decision,
    flags: HeaderFlags,
) -> pingora::Result<()> {
    each_rate_limit_header(decision, flags, |name, value| {
        resp.insert_header(name, value).map(|_| ())
    })
}

/// Hands each rate-limit header describing `decision` to `emit`, by name: `X-RateLimit-*` (the
/// most restrictive limit) and the IETF `RateLimit-Policy` / `RateLimit`, as `flags` ask. The
/// proxy writes them on responses; the rate-limit service hands them to Envoy to write.
/// Numbers go straight into their values (no `String` per number: this runs on every limited
/// response). Stops at the first error `emit` returns.
pub fn each_rate_limit_header<E>(
    decision: &Decision,
    flags: HeaderFlags,
    mut emit: impl FnMut(&'static str, http::HeaderValue) -> Result<(), E>,
) -> Result<(), E> {
    if decision.statuses.is_empty() {
        return Ok(());
    }
    if flags.legacy {
        if let Some(s) = decision.most_restrictive() {
            emit("X-RateLimit-Limit", s.policy.burst.into())?;
            emit("X-RateLimit-Remaining", s.outcome.remaining.into())?;
            emit("X-RateLimit-Reset", ceil_secs(s.outcome.reset_ns).into())?;
        }
    }
    if flags.ietf {
        // Limit names are validated ASCII (`[A-Za-z0-9._-]`): the lists are valid values.
        for (name, list) in [
            ("RateLimit-Policy", ietf_policy(decision)),
            ("RateLimit", ietf_state(decision)),
        ] {
            if let Ok(value) = http::HeaderValue::from_maybe_shared(Bytes::from(list)) {
                emit(name, value)?;
            }
        }
    }
    Ok(())
}

/// Appends `n` in decimal.
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends one IETF list member: `"NAME";A=X;B=Y`.
fn push_member(out: &mut Vec<u8>, name: &str, a: u8, x: u64, b: u8, y: u64) {
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&[b'"', b';', a, b'=']);
    push_u64(out, x);
    out.extend_from_slice(&[b';', b, b'=']);
    push_u64(out, y);
}

/// Room for one member with short numbers, so a value is allocated once.
fn ietf_capacity(decision: &Decision) -> usize {
    decision
        .statuses
        .iter()
        .map(|s| s.name.len() + 24)
        .sum::<usize>()
}

/// `"per-ip";q=20;w=2, "per-key";q=100;w=60`, as bytes (ASCII: limit names are validated
/// `[A-Za-z0-9._-]`). Bytes, not a `String`: this runs on every limited response, and a
/// `String` pushes (and checks) one `char` at a time.
pub fn ietf_policy(decision: &Decision) -> Vec<u8> {
    let mut out = Vec::with_capacity(ietf_capacity(decision));
    for (i, s) in decision.statuses.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        let w = s.algorithm.window_secs(&s.policy);
        push_member(&mut out, &s.name, b'q', s.policy.burst, b'w', w);
    }
    out
}

/// `"per-ip";r=7;t=1, "per-key";r=99;t=1`, as bytes (see `ietf_policy`).
pub fn ietf_state(decision: &Decision) -> Vec<u8> {
    let mut out = Vec::with_capacity(ietf_capacity(decision));
    for (i, s) in decision.statuses.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        let t = ceil_secs(s.outcome.next_token_ns);
        push_member(&mut out, &s.name, b'r', s.outcome.remaining, b't', t);
    }
    out
}

/// Whole seconds to wait: the wait rounded up, never earlier than the violated limits' `t`,
/// and at least 1. `None` when no wait makes the request pass (its cost exceeds a limit's
/// capacity, or a runtime override blocks its key): such a 429 carries no `Retry-After`.
pub fn retry_after_secs(decision: &Decision) -> Option<u64> {
    if decision.retry_after() == RetryAfter::Never {
        return None;
    }
    let t = decision
        .statuses
        .iter()
        .filter(|s| !s.outcome.allowed)
        .map(|s| ceil_secs(s.outcome.next_token_ns))
        .max()
        .unwrap_or(0);
    Some(ceil_secs(decision.retry_after_ns).max(t).max(1))
}

/// Why a request can never pass, for the problem `detail`.
fn capacity_detail(decision: &Decision) -> Option<String> {
    let blocked = decision.blocked.iter().map(|l| {
        format!("limit \"{l}\" blocks this key (a runtime override): it is never admitted")
    });
    let mut parts = decision
        .exceeds_capacity
        .iter()
        .map(|e| {
            format!(
                "cost {} exceeds the capacity {} of limit \"{}\": it can never be admitted",
                e.cost, e.capacity, e.limit
            )
        })
        .chain(blocked);
    let first = parts.next()?;
    Some(parts.fold(first, |all, p| all + "; " + &p))
}

/// The RFC 9457 body of a 429. `retry_after_ms` is null, and `detail` says why, when no wait
/// makes the request pass.
pub fn problem_body(route: &str, decision: &Decision) -> Bytes {
    let retry_after_ms = match decision.retry_after() {
        RetryAfter::Never => None,
        RetryAfter::Admitted | RetryAfter::After(_) => {
            Some(decision.retry_after_ns.div_ceil(1_000_000))
        }
    };
    let mut body = serde_json::json!({
        "type": QUOTA_EXCEEDED,
        "title": "Too Many Requests",
        "status": 429,
        "error": "rate_limited",
        "violated-policies": decision.violated.iter().map(|n| n.as_ref()).collect::<Vec<_>>(),
        "route": route,
        "retry_after_ms": retry_after_ms,
    });
    if let (Some(detail), Some(map)) = (capacity_detail(decision), body.as_object_mut()) {
        map.insert("detail".into(), detail.into());
    }
    Bytes::from(body.to_string())
}

/// The `grpc-message` of a denied gRPC call: which limits, and when to retry.
pub fn limited_message(decision: &Decision) -> String {
    let names: Vec<&str> = decision.violated.iter().map(|n| n.as_ref()).collect();
    let mut message = format!("rate limited ({})", names.join(", "));
    match retry_after_secs(decision) {
        Some(secs) => {
            let _ = write!(message, "; retry after {secs} s");
        }
        None => message.push_str("; the call can never be admitted"),
    }
    message
}

/// The full 429 response for a denied request.
pub fn too_many_requests(
    route: &str,
    decision: &Decision,
    flags: HeaderFlags,
) -> pingora::Result<(ResponseHeader, Bytes)> {
    let body = problem_body(route, decision);
    let mut resp = ResponseHeader::build(429, Some(8))?;
    add_rate_limit_headers(&mut resp, decision, flags)?;
    if let Some(secs) = retry_after_secs(decision) {
        resp.insert_header("Retry-After", secs.to_string())?;
    }
    resp.insert_header("Content-Type", PROBLEM_JSON)?;
    resp.insert_header("Content-Length", body.len().to_string())?;
    resp.insert_header("Cache-Control", "no-store")?;
    Ok((resp, body))
}

/// A small problem+json response the gateway writes itself (404 no route, 503 fallback deny).
pub fn problem(status: u16, title: &str, error: &str) -> pingora::Result<(ResponseHeader, Bytes)> {
    problem_with_detail(status, title, error, None)
}

/// An RFC 9457 problem response with an optional human-readable `detail`.
pub fn problem_with_detail(
    status: u16,
    title: &str,
    error: &str,
    detail: Option<&str>,
) -> pingora::Result<(ResponseHeader, Bytes)> {
    let mut value = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status,
        "error": error,
    });
    if let (Some(detail), Some(map)) = (detail, value.as_object_mut()) {
        map.insert("detail".into(), detail.into());
    }
    let body = Bytes::from(value.to_string());
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header("Content-Type", PROBLEM_JSON)?;
    resp.insert_header("Content-Length", body.len().to_string())?;
    Ok((resp, body))
}

/// The `title` and `error` code of a failure response the proxy writes after an error
/// (`fail_to_proxy`): 502/504 when the upstream failed, 400/500 otherwise.
pub fn failure_kind(status: u16, etype: &pingora::ErrorType) -> (&'static str, &'static str) {
    use pingora::ErrorType as E;
    match status {
        504 => ("Gateway Timeout", "upstream_timeout"),
        502 => match etype {
            E::ConnectRefused
            | E::ConnectNoRoute
            | E::ConnectError
            | E::BindError
            | E::SocketError
            | E::ConnectProxyFailure
            | E::TLSHandshakeFailure
            | E::TLSHandshakeTimedout
            | E::TLSWantX509Lookup
            | E::InvalidCert
            | E::HandshakeError => ("Bad Gateway", "upstream_unreachable"),
            _ => ("Bad Gateway", "upstream_error"),
        },
        400 => ("Bad Request", "bad_request"),
        500 => ("Internal Server Error", "internal_error"),
        _ => (
            http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Error"),
            "proxy_error",
        ),
    }
}

/// The problem+json response for a failure after the request was let through (an upstream that
/// cannot be reached, times out or breaks the exchange). `Cache-Control` as Pingora's own error
/// responses; the caller closes the connection (`Connection: close`).
pub fn failure(
    status: u16,
    etype: &pingora::ErrorType,
) -> pingora::Result<(ResponseHeader, Bytes)> {
    let (title, error) = failure_kind(status, etype);
    let (mut resp, body) = problem(status, title, error)?;
    resp.insert_header("Cache-Control", "private, no-store")?;
    Ok((resp, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{BucketOutcome, LimitStatus, Policy, Rate};
    use std::sync::Arc;

    fn status(name: &str, burst: u64, remaining: u64, allowed: bool) -> LimitStatus {
        LimitStatus {
            name: Arc::from(name),
            algorithm: crate::limiter::Algorithm::TokenBucket,
            policy: Policy {
                rate: Rate::parse("10/s").unwrap_or_else(|e| panic!("{e}")),
                burst,
            },
            outcome: BucketOutcome {
                allowed,
                remaining,
                reset_ns: 1_500_000_000,
                retry_ns: if allowed { 0 } else { 1_200_000_000 },
                next_token_ns: 100_000_000,
            },
        }
    }

    #[test]
    fn numbers_are_written_as_display_writes_them() {
        for n in [0, 1, 9, 10, 99, 100, 1_000_000, 18_446_744_073_709_551_615] {
            let mut out = b"x".to_vec();
            push_u64(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
    }

    #[test]
    fn upstream_failures_are_problems() {
        use pingora::ErrorType as E;
        for (status, etype, error) in [
            (502, E::ConnectRefused, "upstream_unreachable"),
            (502, E::ConnectNoRoute, "upstream_unreachable"),
            (502, E::ConnectionClosed, "upstream_error"),
            (502, E::InvalidHTTPHeader, "upstream_error"),
            (504, E::ReadTimedout, "upstream_timeout"),
            (504, E::ConnectTimedout, "upstream_timeout"),
        ] {
            let (resp, body) = failure(status, &etype).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(resp.status.as_u16(), status);
            assert_eq!(
                resp.headers.get("content-type").map(|v| v.as_bytes()),
                Some(PROBLEM_JSON.as_bytes())
            );
            let body: serde_json::Value =
                serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(body["status"], status);
            assert_eq!(body["error"], error, "{etype:?}");
            assert_eq!(body["type"], "about:blank");
        }
    }

    #[test]
    fn ietf_fields_list_every_limit() {
        let d = Decision {
            allowed: true,
            statuses: vec![
                status("per-ip", 20, 7, true),
                status("per-key", 100, 50, true),
            ],
            violated: vec![],
            retry_after_ns: 0,
            exceeds_capacity: vec![],
            blocked: vec![],
        };
        assert_eq!(
            ietf_policy(&d),
            b"\"per-ip\";q=20;w=2, \"per-key\";q=100;w=10"
        );
        assert_eq!(ietf_state(&d), b"\"per-ip\";r=7;t=1, \"per-key\";r=50;t=1");
        assert_eq!(d.most_restrictive().map(|s| &*s.name), Some("per-ip"));
    }

    #[test]
    fn denial_body_and_retry_after() {
        let d = Decision {
            allowed: false,
            statuses: vec![
                status("per-ip", 20, 0, false),
                status("per-key", 100, 3, true),
            ],
            violated: vec![Arc::from("per-ip")],
            retry_after_ns: 1_200_000_000,
            exceeds_capacity: vec![],
            blocked: vec![],
        };
        assert_eq!(retry_after_secs(&d), Some(2));
        let body: serde_json::Value =
            serde_json::from_slice(&problem_body("login", &d)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(body["violated-policies"], serde_json::json!(["per-ip"]));
        assert_eq!(body["retry_after_ms"], 1200);
        assert_eq!(body["route"], "login");
        assert_eq!(body["status"], 429);
        assert!(body.get("detail").is_none());
    }

    #[test]
    fn a_cost_beyond_capacity_has_no_retry_after() {
        let d = Decision {
            allowed: false,
            statuses: vec![status("per-ip", 20, 20, false)],
            violated: vec![Arc::from("per-ip")],
            retry_after_ns: 0,
            exceeds_capacity: vec![crate::limiter::CapacityExceeded {
                limit: Arc::from("per-ip"),
                cost: u64::MAX,
                capacity: 20,
            }],
            blocked: vec![],
        };
        assert_eq!(retry_after_secs(&d), None);
        let (resp, body) = too_many_requests(
            "login",
            &d,
            HeaderFlags {
                legacy: true,
                ietf: true,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(resp.headers.get("retry-after").is_none());
        let body: serde_json::Value =
            serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}"));
        assert!(body["retry_after_ms"].is_null());
        assert_eq!(
            body["detail"],
            "cost 18446744073709551615 exceeds the capacity 20 of limit \"per-ip\": it can never be admitted"
        );
    }
}
