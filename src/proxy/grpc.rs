//! gRPC calls the gateway refuses itself: instead of an HTTP error status (which a gRPC client
//! reports as a transport failure), a trailers-only gRPC response: HTTP 200, `content-type:
//! application/grpc`, `grpc-status`, `grpc-message`, and the refusal's other headers
//! (rate-limit fields, `Retry-After`) as metadata, all in one HEADERS frame with END_STREAM.
//!
//! The mapping of the gateway's refusals (documented in the README):
//! 429 rate limited -> 8 RESOURCE_EXHAUSTED; 404 no route -> 12 UNIMPLEMENTED;
//! 503 limiter unavailable, 502/504 upstream failures -> 14 UNAVAILABLE;
//! 400 malformed request -> 3 INVALID_ARGUMENT; 500 and anything else -> 13 INTERNAL.

use pingora::http::{RequestHeader, ResponseHeader};

pub const GRPC_CONTENT_TYPE: &str = "application/grpc";

/// Whether a request is a gRPC call: `content-type` is `application/grpc`, optionally followed
/// by `+format` or parameters (not gRPC-Web, whose trailers travel in the body).
pub fn is_grpc(req: &RequestHeader) -> bool {
    let Some(value) = req.headers.get(http::header::CONTENT_TYPE) else {
        return false;
    };
    let bytes = value.as_bytes();
    let prefix = GRPC_CONTENT_TYPE.as_bytes();
    bytes.len() >= prefix.len()
        && bytes[..prefix.len()].eq_ignore_ascii_case(prefix)
        && matches!(bytes.get(prefix.len()), None | Some(b'+' | b';'))
}

/// The gRPC status code for an HTTP status the gateway would have answered.
pub fn code_for(http_status: u16) -> u8 {
    match http_status {
        429 => 8,        // RESOURCE_EXHAUSTED
        404 => 12,       // UNIMPLEMENTED
        502..=504 => 14, // UNAVAILABLE
        400 => 3,        // INVALID_ARGUMENT
        _ => 13,         // INTERNAL
    }
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and `%`, as `%XX`.
pub fn encode_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Headers of the HTTP refusal that are about its body, not carried over as metadata.
const BODY_HEADERS: [http::HeaderName; 3] = [
    http::header::CONTENT_TYPE,
    http::header::CONTENT_LENGTH,
    http::header::CACHE_CONTROL,
];

/// The trailers-only gRPC response for an HTTP refusal `http`: its status mapped by
/// [`code_for`], `message` as `grpc-message`, its other headers as metadata. `h1`: the call came
/// over HTTP/1.1, where the empty body needs a `content-length: 0`.
pub fn trailers_only(
    http: &ResponseHeader,
    message: &str,
    h1: bool,
) -> pingora::Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(200, Some(http.headers.len() + 4))?;
    for (name, value) in http.headers.iter() {
        if !BODY_HEADERS.contains(name) {
            resp.append_header(name.clone(), value.clone())?;
        }
    }
    resp.insert_header(http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE)?;
    resp.insert_header("grpc-status", code_for(http.status.as_u16()).to_string())?;
    resp.insert_header("grpc-message", encode_message(message))?;
    if h1 {
        resp.insert_header(http::header::CONTENT_LENGTH, "0")?;
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(content_type: Option<&str>) -> RequestHeader {
        let mut r =
            RequestHeader::build("POST", b"/pkg.Svc/Call", None).unwrap_or_else(|e| panic!("{e}"));
        if let Some(ct) = content_type {
            r.insert_header("content-type", ct)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        r
    }

    #[test]
    fn recognises_grpc_but_not_grpc_web() {
        assert!(is_grpc(&req(Some("application/grpc"))));
        assert!(is_grpc(&req(Some("application/grpc+proto"))));
        assert!(is_grpc(&req(Some("Application/GRPC;charset=utf-8"))));
        assert!(!is_grpc(&req(Some("application/grpc-web"))));
        assert!(!is_grpc(&req(Some("application/json"))));
        assert!(!is_grpc(&req(None)));
    }

    #[test]
    fn refusal_keeps_metadata_and_maps_the_status() {
        let mut http = ResponseHeader::build(429, None).unwrap_or_else(|e| panic!("{e}"));
        http.insert_header("RateLimit", "\"per-ip\";r=0;t=1")
            .unwrap_or_else(|e| panic!("{e}"));
        http.insert_header("Content-Type", "application/problem+json")
            .unwrap_or_else(|e| panic!("{e}"));
        http.insert_header("Content-Length", "99")
            .unwrap_or_else(|e| panic!("{e}"));
        let g = trailers_only(&http, "rate limited: 100%", false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(g.status.as_u16(), 200);
        let h = |n: &str| {
            g.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        assert_eq!(h("grpc-status").as_deref(), Some("8"));
        assert_eq!(h("grpc-message").as_deref(), Some("rate limited: 100%25"));
        assert_eq!(h("content-type").as_deref(), Some("application/grpc"));
        assert_eq!(h("ratelimit").as_deref(), Some("\"per-ip\";r=0;t=1"));
        assert_eq!(h("content-length"), None);
        assert_eq!(code_for(404), 12);
        assert_eq!(code_for(503), 14);
        assert_eq!(code_for(400), 3);
        assert_eq!(code_for(500), 13);
    }
}
