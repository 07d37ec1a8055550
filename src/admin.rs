//! The admin listener: `/health`, `/ready` and `/metrics` (the `/v1` API comes with the
//! operations work). Bound to loopback unless configured otherwise.

use crate::config::model::{Fallback, StoreKindConfig};
use crate::state::Shared;
use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::Arc;

pub struct AdminApp {
    shared: Arc<Shared>,
}

impl AdminApp {
    pub fn new(shared: Arc<Shared>) -> Self {
        AdminApp { shared }
    }

    /// Ready when the config is loaded and the store answers, or when the breaker's fallback
    /// (`local` or `allow`) keeps the gateway deciding without it.
    fn ready(&self) -> Response<Vec<u8>> {
        let config = self.shared.config();
        let slot = self.shared.store();
        let store = match slot.config.kind {
            StoreKindConfig::Memory => "memory",
            StoreKindConfig::Redis => "redis",
        };
        let healthy = slot.healthy();
        let covered = matches!(config.breaker.fallback, Fallback::Local | Fallback::Allow);
        let (status, state) = match (healthy, covered) {
            (true, _) => (StatusCode::OK, "ready"),
            (false, true) => (StatusCode::OK, "degraded"),
            (false, false) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        let mut body = serde_json::json!({
            "status": state,
            "store": store,
            "store_healthy": healthy,
            "breaker": self.shared.decider.breaker_state().name(),
            "config_generation": self.shared.generation(),
        });
        if !healthy {
            body["reason"] = serde_json::Value::from(format!(
                "store {store} is not answering; fallback: {:?}",
                config.breaker.fallback
            ));
        }
        json(status, body)
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Vec<u8>> {
    respond(status, "application/json", value.to_string().into_bytes())
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let len = body.len();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let method = req.method.clone();
        match (method.as_str(), path.as_str()) {
            ("GET", "/health") => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
            ("GET", "/ready") => self.ready(),
            ("GET", "/metrics") => {
                self.shared.refresh_gauges();
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.shared.metrics.render(),
                )
            }
            (_, "/health" | "/ready" | "/metrics") => json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({"error": "method_not_allowed"}),
            ),
            _ => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not_found", "path": path}),
            ),
        }
    }
}
