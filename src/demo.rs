//! `tollgate demo`: the embedded default config in front of a built-in upstream on loopback,
//! so the gateway can be tried with nothing else installed.

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

/// The embedded default config (also shipped as `config/demo.yaml`).
pub const DEMO_CONFIG: &str = include_str!("../config/demo.yaml");
/// Addresses written in `config/demo.yaml`, replaced when the demo is started on other ports.
pub const DEMO_PROXY: &str = "127.0.0.1:8080";
pub const DEMO_ADMIN: &str = "127.0.0.1:9901";
pub const DEMO_UPSTREAM: &str = "127.0.0.1:18080";

/// The demo config with its three addresses replaced.
pub fn demo_config_text(proxy: &str, admin: &str, upstream: &str) -> String {
    DEMO_CONFIG
        .replace(DEMO_PROXY, proxy)
        .replace(DEMO_ADMIN, admin)
        .replace(DEMO_UPSTREAM, upstream)
}

/// Curl commands that show the demo's allowed and limited responses.
pub fn instructions(proxy: &str, admin: &str) -> String {
    format!(
        "Tollgate demo: proxy on http://{proxy}, admin on http://{admin}\n\
         \n\
         Allowed, with rate-limit headers:\n\
         \x20 curl -i http://{proxy}/api/hello\n\
         Five quick requests: the burst of 3 passes, then 429 with Retry-After:\n\
         \x20 for i in 1 2 3 4 5; do curl -s -o /dev/null -w '%{{http_code}}\\n' http://{proxy}/api/hello; done\n\
         A per-API-key limit (each key has its own bucket):\n\
         \x20 curl -i -H 'X-Api-Key: alice' http://{proxy}/keyed/anything\n\
         Health, readiness and metrics:\n\
         \x20 curl http://{admin}/ready\n\
         \x20 curl -s http://{admin}/metrics | grep tollgate_requests_total\n\
         \n\
         Ctrl-C or SIGTERM stops it after in-flight requests finish.\n"
    )
}

/// The built-in upstream: answers every request with a small JSON document.
pub struct DemoUpstream;

#[async_trait]
impl ServeHttp for DemoUpstream {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let body = serde_json::json!({
            "message": "hello from the Tollgate demo upstream",
            "method": req.method.as_str(),
            "path": req.uri.path(),
        })
        .to_string()
        .into_bytes();
        let len = body.len();
        let mut resp = Response::new(body);
        *resp.status_mut() = StatusCode::OK;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        resp.headers_mut()
            .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
        resp
    }
}
