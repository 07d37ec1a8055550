//! The Pingora `ProxyHttp` implementation: the request's path through the gateway.
//!
//! `early_request_filter` turns on HTTP/1.1 pipelining for the downstream connection;
//! `request_filter` matches the route, derives keys and decides every limit (writing a 429 or
//! 404 itself when it must); `upstream_peer` picks a target round-robin; `response_filter` adds
//! the rate-limit headers; `fail_to_connect`/`fail_to_proxy` turn upstream failures into
//! problem+json 502/504; `logging` records upstream metrics and the access log. A gRPC call the
//! gateway refuses is answered with a gRPC status instead of the HTTP error ([`grpc`]).

pub mod ctx;
pub mod grpc;
pub mod response;

use crate::keys::{self, RequestView};
use crate::limiter::decider::{DecidedBy, Verdict};
use crate::limiter::plan::{self, Decision};
use crate::limiter::StoreKind;
use crate::metrics::{status_class, RequestDecision, RouteStats, NO_ROUTE_LABEL};
use crate::normalize;
use crate::routes::Route;
use crate::state::Shared;
use async_trait::async_trait;
use bytes::Bytes;
use ctx::Ctx;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::protocols::http::authority::raw_target_authority;
use pingora::protocols::http::HttpTask;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The gateway's proxy logic.
pub struct Gateway {
    shared: Arc<Shared>,
    /// TLS listeners with `min_version: "1.3"`.
    tls13_only: Vec<std::net::SocketAddr>,
}

impl Gateway {
    pub fn new(shared: Arc<Shared>) -> Self {
        Gateway {
            shared,
            tls13_only: Vec::new(),
        }
    }

    /// Requests over TLS 1.2 on these listeners are refused (their `min_version` is 1.3).
    pub fn with_tls13_only(mut self, listeners: Vec<std::net::SocketAddr>) -> Self {
        self.tls13_only = listeners;
        self
    }

    /// Whether this session came over TLS older than 1.3 on a listener that needs 1.3.
    fn below_min_version(&self, session: &Session) -> bool {
        if self.tls13_only.is_empty() {
            return false;
        }
        let Some(ssl) = session.digest().and_then(|d| d.ssl_digest.as_ref()) else {
            return false;
        };
        let tls13 = matches!(ssl.version.as_ref(), "TLSv1_3" | "TLSv1.3");
        let Some(local) = session.server_addr().and_then(|a| a.as_inet()) else {
            return !tls13;
        };
        !tls13
            && self.tls13_only.iter().any(|l| {
                l.port() == local.port() && (l.ip().is_unspecified() || l.ip() == local.ip())
            })
    }

    fn stats<'r>(&self, route: &'r Route) -> &'r RouteStats {
        route
            .stats
            .get_or_init(|| self.shared.metrics.route_stats(&route.name))
    }

    /// Counts the request under its decision (`route` is `None` for no route).
    fn count(&self, route: Option<&Route>, decision: RequestDecision, ctx: &mut Ctx) {
        ctx.counted_as = Some(decision);
        match route {
            Some(route) => self.stats(route).decision(decision).inc(),
            None if decision == RequestDecision::BadRequest => {
                self.shared.metrics.bad_request.inc()
            }
            None => self.shared.metrics.no_route.inc(),
        }
    }
}

/// Why a request has no normal form: answered 400 with this problem code and detail.
struct Refusal {
    code: &'static str,
    detail: String,
}

/// Rewrites the request to its one spelling, in place, so that routing, keys and the upstream
/// all see the same thing: the method upper-case, the target in origin form with a normal path
/// (the query as sent), and `Host` set from an absolute-form target that came without one.
/// Returns the normal host (lower-case, no port, no trailing dot) for routing.
fn normalize_request(
    req: &mut RequestHeader,
    slashes: normalize::EscapedSlashes,
) -> std::result::Result<Option<String>, Refusal> {
    if !req.raw_path_is_utf8() {
        return Err(Refusal {
            code: "bad_path",
            detail: "the request target is not UTF-8".into(),
        });
    }
    if let Some(upper) = normalize::method(&req.method) {
        req.set_method(upper);
    }
    let absolute = raw_target_authority(req.raw_path())
        .authority()
        .map(<[u8]>::to_vec);
    // Origin-form (`/path`), absolute-form (`http://host/path`) or `OPTIONS *`; anything else
    // (`static/x`, `./x`, ` /x`) would reach the upstream unrouted and unlimited.
    let raw = req.raw_path();
    let asterisk = raw == b"*" && req.method == http::Method::OPTIONS;
    if absolute.is_none() && !raw.starts_with(b"/") && !asterisk {
        return Err(Refusal {
            code: "bad_path",
            detail: "the request target must start with '/' or be an absolute URI".into(),
        });
    }
    let bad_host = |e: normalize::HostError| Refusal {
        code: "bad_host",
        detail: e.to_string(),
    };
    let host_header = match req.headers.get(http::header::HOST) {
        Some(value) => Some(value.to_str().map_err(|_| Refusal {
            code: "bad_host",
            detail: "the Host header is not visible ASCII".into(),
        })?),
        None => None,
    };
    let has_host_header = host_header.is_some();
    // Borrowed where it can be: the normal host is the one String made.
    let authority: Option<std::borrow::Cow<'_, str>> = match host_header {
        Some(text) => Some(text.into()),
        None => match &absolute {
            Some(a) => Some(String::from_utf8_lossy(a)),
            None => req.uri.authority().map(|a| a.as_str().into()),
        },
    };
    let host = match authority {
        Some(text) => Some(normalize::host(&text).map_err(bad_host)?),
        None if req.version == http::Version::HTTP_10 => None,
        None => {
            return Err(Refusal {
                code: "bad_host",
                detail: "HTTP/1.1 needs a Host header (RFC 9112 3.2)".into(),
            })
        }
    };
    let path = normalize::path(req.uri.path(), slashes).map_err(|e| Refusal {
        code: e.code(),
        detail: e.to_string(),
    })?;
    if matches!(path, std::borrow::Cow::Borrowed(_)) && absolute.is_none() {
        return Ok(host);
    }
    let mut target = path.into_owned();
    if let Some(query) = req.uri.query() {
        target.push('?');
        target.push_str(query);
    }
    if let (Some(authority), false) = (&absolute, has_host_header) {
        let value = http::HeaderValue::from_bytes(authority).map_err(|_| Refusal {
            code: "bad_host",
            detail: "the request target's authority is not a valid Host".into(),
        })?;
        // Cannot fail for a valid header value.
        let _ = req.insert_header(http::header::HOST, value);
    }
    // An HTTP/2 request carries its host in the URI (`:authority`), which `set_raw_path`
    // would drop: kept, so the upstream still gets a Host / `:authority`.
    let h2_authority = match &absolute {
        None => req
            .uri
            .authority()
            .cloned()
            .map(|a| (req.uri.scheme().cloned(), a)),
        Some(_) => None,
    };
    req.set_raw_path(target.as_bytes()).map_err(|e| Refusal {
        code: "bad_path",
        detail: format!("the normalised target is not valid: {e}"),
    })?;
    if let Some((scheme, authority)) = h2_authority {
        let mut parts = req.uri.clone().into_parts();
        parts.scheme = Some(scheme.unwrap_or(http::uri::Scheme::HTTP));
        parts.authority = Some(authority);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            req.set_uri(uri);
        }
    }
    Ok(host)
}

fn peer_ip(session: &Session) -> IpAddr {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// `X-Forwarded-For`, parsed once (a header name given as text is parsed at every lookup).
const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

/// The largest unread request body the gateway reads past (and drops) after answering a request
/// itself, to keep the connection open for the next request.
const SKIP_BODY_MAX: usize = 64 * 1024;
/// How long reading past that body may take before the connection is closed instead.
const SKIP_BODY_TIMEOUT: Duration = Duration::from_secs(1);

/// Before the gateway answers a request itself (429, 404, 400, 503): whether the connection can
/// stay open although the request's body was never read. By default Pingora answers such a
/// request with `Connection: close` and closes, which also drops whatever the client pipelined
/// behind the body. A small body of known length (`Content-Length` up to `SKIP_BODY_MAX`, no
/// `Expect` such as `100-continue`) is instead read and dropped after the answer, within
/// `SKIP_BODY_TIMEOUT`, so that the next request is read and answered on the same connection.
/// Chunked or larger bodies, and bodies the client waits to send, keep Pingora's close: the
/// gateway does not spend bandwidth receiving uploads it has refused.
fn keep_alive_past_unread_body(session: &mut Session) {
    if session.is_body_done() {
        return;
    }
    let headers = &session.req_header().headers;
    if headers.contains_key(http::header::EXPECT)
        || headers.contains_key(http::header::TRANSFER_ENCODING)
    {
        return;
    }
    let small = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|len| len <= SKIP_BODY_MAX);
    if small {
        session.set_close_on_response_before_downstream_finish(false);
        session.set_total_drain_timeout(Some(SKIP_BODY_TIMEOUT));
    }
}

/// Writes a response that ends the stream with its header: on HTTP/2 one HEADERS frame with
/// END_STREAM (what gRPC calls trailers-only). Pingora's `Session::write_response_header` drops
/// its end-of-stream flag, so the header goes as a task to the downstream session itself.
async fn write_trailers_only(session: &mut Session, resp: ResponseHeader) -> Result<()> {
    session
        .as_downstream_mut()
        .response_duplex_vec(vec![HttpTask::Header(Box::new(resp), true)])
        .await
        .map(|_| ())
}

/// Writes the gateway's own answer: `resp` and `body`, or, for a gRPC call (`ctx.grpc`), the
/// trailers-only gRPC response carrying `message` (see [`grpc`]).
async fn send(
    session: &mut Session,
    ctx: &Ctx,
    resp: ResponseHeader,
    body: Bytes,
    message: &str,
) -> Result<bool> {
    keep_alive_past_unread_body(session);
    if ctx.grpc {
        let h1 = !session.is_http2();
        let resp = grpc::trailers_only(&resp, message, h1)?;
        write_trailers_only(session, resp).await?;
        return Ok(true);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(true)
}

/// An upgraded (WebSocket) connection on which the upstream sent nothing for the upstream's
/// read timeout: an idle close, not an upstream failure.
fn idle_upgraded(session: &Session, e: &Error) -> bool {
    session.was_upgraded()
        && e.esource() == &ErrorSource::Upstream
        && matches!(e.etype(), ErrorType::ReadTimedout)
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::new(self.shared.enter())
    }

    fn init_downstream_modules(&self, _modules: &mut HttpModules) {
        // No downstream modules. Pingora's default adds its response-compression module,
        // disabled (level 0), which the gateway never enables: it still cost a module context
        // per request and a call in every request and response phase.
    }

    async fn early_request_filter(&self, session: &mut Session, _ctx: &mut Ctx) -> Result<()> {
        // HTTP/1.1 pipelining (RFC 9112 §9.3.2). Pingora 0.9 leaves it off: bytes read past the
        // end of a request (the next pipelined request) then make the connection unreusable, so
        // the client got its first answer with `Connection: keep-alive`, then EOF; and a request
        // that arrived while the previous one was still being proxied failed that one with a 400
        // ("Sent data after end of body"). On, Pingora hands those bytes to the next request on
        // the connection, which goes through every phase here like any other; requests are
        // served one at a time and answered in order. Pingora carries the flag to the next
        // request on the connection; setting it on each costs nothing.
        session.set_pipelining_enabled(true);
        // The resolver refuses ClientHellos that offer no TLS 1.3 suite, but a hand-made one
        // offering 1.3 suites without `supported_versions` still negotiates 1.2: refused here,
        // on the negotiated version, before anything is routed.
        if self.below_min_version(session) {
            session.set_keepalive(None);
            return Err(Error::explain(
                ErrorType::HTTPStatus(426),
                "TLS 1.2 session on a listener whose min_version is 1.3",
            ));
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let config = self.shared.config();
        let peer = peer_ip(session);
        ctx.grpc = grpc::is_grpc(session.req_header());
        let host = match normalize_request(session.req_header_mut(), config.server.escaped_slashes)
        {
            Ok(host) => host,
            Err(refusal) => {
                self.count(None, RequestDecision::BadRequest, ctx);
                ctx.config = Some(config);
                let (resp, body) = response::problem_with_detail(
                    400,
                    "Bad Request",
                    refusal.code,
                    Some(&refusal.detail),
                )?;
                let message = format!("bad request ({}): {}", refusal.code, refusal.detail);
                return send(session, ctx, resp, body, &message).await;
            }
        };
        let req = session.req_header();
        let path = req.uri.path();
        let Some(route) = config
            .router
            .find(&req.method, host.as_deref(), path)
            .cloned()
        else {
            self.count(None, RequestDecision::NoRoute, ctx);
            ctx.config = Some(config);
            let (resp, body) = response::problem(404, "Not Found", "no_route")?;
            return send(session, ctx, resp, body, "no route for this call").await;
        };

        let mut fallback = false;
        let decision = if route.limits.is_empty() {
            Decision::unlimited()
        } else {
            let client = keys::client_ip_and_trust(
                peer,
                || {
                    req.headers
                        .get_all(&X_FORWARDED_FOR)
                        .iter()
                        .map(|v| v.as_bytes())
                },
                &config.client_ip.trusted_proxies,
            );
            let captures = if route.needs_captures() {
                route.captures(path)
            } else {
                None
            };
            let view = RequestView {
                method: req.method.as_str(),
                host: host.as_deref(),
                path,
                query: req.uri.query(),
                headers: &req.headers,
                client_ip: client.ip,
                peer_trusted: client.peer_trusted,
                path_params: captures.as_ref(),
            };
            let plan = plan::plan(
                &route.name,
                &route.limits,
                &view,
                config.client_ip.ipv6_prefix,
                &self.shared.overrides.current(),
            );
            if let Some(source) = &plan.ambiguous {
                self.count(Some(&route), RequestDecision::BadRequest, ctx);
                let detail = format!(
                    "the key source {} appears more than once with different values",
                    source.spec()
                );
                let (resp, body) = response::problem_with_detail(
                    400,
                    "Bad Request",
                    "ambiguous_key",
                    Some(&detail),
                )?;
                ctx.route = Some(route);
                ctx.config = Some(config);
                let message = format!("bad request (ambiguous_key): {detail}");
                return send(session, ctx, resp, body, &message).await;
            }
            let slot = self.shared.store();
            match self
                .shared
                .decider
                .decide_plan(&slot, &config.breaker, plan)
                .await
            {
                Verdict::Decided { decision, by } => {
                    fallback = by == DecidedBy::Store(StoreKind::LocalFallback);
                    decision
                }
                Verdict::AllowFallback => {
                    self.count(Some(&route), RequestDecision::FallbackAllowed, ctx);
                    ctx.route = Some(route);
                    ctx.config = Some(config);
                    return Ok(false);
                }
                Verdict::DenyFallback { retry_after_ns } => {
                    self.count(Some(&route), RequestDecision::FallbackLimited, ctx);
                    let (mut resp, body) =
                        response::problem(503, "Service Unavailable", "limiter_unavailable")?;
                    resp.insert_header(
                        "Retry-After",
                        crate::limiter::ceil_secs(retry_after_ns).max(1).to_string(),
                    )?;
                    ctx.route = Some(route);
                    ctx.config = Some(config);
                    let message = "the rate limiter is unavailable";
                    return send(session, ctx, resp, body, message).await;
                }
            }
        };

        ctx.config = Some(config);
        if decision.allowed {
            self.count(
                Some(&route),
                if fallback {
                    RequestDecision::FallbackAllowed
                } else {
                    RequestDecision::Allowed
                },
                ctx,
            );
            if !route.shadow {
                ctx.decision = Some(decision);
            }
        } else if route.shadow {
            self.count(Some(&route), RequestDecision::ShadowLimited, ctx);
            tracing::info!(
                route = %route.name,
                violated = ?decision.violated,
                "shadow mode: request would have been limited"
            );
        } else {
            self.count(
                Some(&route),
                if fallback {
                    RequestDecision::FallbackLimited
                } else {
                    RequestDecision::Limited
                },
                ctx,
            );
            let (resp, body) = response::too_many_requests(&route.name, &decision, route.headers)?;
            let message = response::limited_message(&decision);
            ctx.route = Some(route);
            return send(session, ctx, resp, body, &message).await;
        }
        ctx.route = Some(route);
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        // An empty body chunk (an HTTP/2 DATA frame of length 0, which gRPC clients send to
        // end a stream) would be written to an HTTP/1.1 upstream as a chunk of size 0, i.e.
        // the chunked body's end, followed by the real end: the upstream would read a second
        // request from what follows (request smuggling across clients). Nothing to forward.
        if body.as_ref().is_some_and(Bytes::is_empty) {
            *body = None;
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let route = ctx
            .route
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no route in context"))?;
        let upstream = &route.upstream;
        let chosen = upstream
            .next_target()
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "upstream has no targets"))?;
        ctx.attempts += 1;
        let target = chosen.resolve().await.map_err(|msg| {
            let mut e = Error::explain(ErrorType::ConnectNoRoute, msg);
            e.esource = ErrorSource::Upstream;
            e
        })?;
        ctx.upstream_start = Some(Instant::now());
        Ok(Box::new(upstream.peer(chosen, target)))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        // Like NGINX's $proxy_add_x_forwarded_for: the hops received, then the direct peer,
        // folded into one header line.
        // The received values go on as their bytes (a hop that is not ASCII is passed on, as
        // NGINX does, not dropped with the rest of the chain).
        let mut chain: Vec<u8> = Vec::with_capacity(48);
        for value in upstream_request.headers.get_all(&X_FORWARDED_FOR) {
            chain.extend_from_slice(value.as_bytes());
            chain.extend_from_slice(b", ");
        }
        let mut peer = String::with_capacity(16);
        keys::push_ip(peer_ip(session), &mut peer);
        chain.extend_from_slice(peer.as_bytes());
        let value = http::HeaderValue::from_bytes(&chain)
            .or_else(|_| http::HeaderValue::from_str(&peer))
            .map_err(|e| Error::because(ErrorType::InternalError, "X-Forwarded-For", e))?;
        upstream_request.insert_header("X-Forwarded-For", value)?;
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // One line naming the upstream, the target and why (for TLS: the handshake's reason,
        // e.g. an unknown issuer, a name mismatch, an expired certificate).
        let upstream = ctx.route.as_ref().map_or("", |r| r.upstream.name.as_str());
        if e.etype() == &ErrorType::TLSHandshakeFailure
            || e.etype() == &ErrorType::InvalidCert
            || e.etype() == &ErrorType::HandshakeError
        {
            tracing::warn!(
                upstream,
                target = %peer.address(),
                sni = %peer.sni,
                reason = %e,
                "upstream TLS handshake failed (certificate not verified); answering 502"
            );
        } else {
            tracing::warn!(
                upstream,
                target = %peer.address(),
                reason = %e,
                "cannot connect to upstream target"
            );
        }
        // Like NGINX's proxy_next_upstream: a target that cannot be reached is skipped, once
        // per target of the group.
        let targets = ctx.route.as_ref().map_or(0, |r| r.upstream.targets.len());
        if ctx.attempts < targets {
            e.set_retry(true);
        }
        e
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(route) = &ctx.route {
            let stats = self.stats(route);
            if let Some(c) = stats.upstream(status_class(upstream_response.status.as_u16())) {
                c.inc();
            }
            if let Some(start) = ctx.upstream_start {
                stats
                    .upstream_duration
                    .observe(start.elapsed().as_secs_f64());
            }
            if let Some(decision) = &ctx.decision {
                response::add_rate_limit_headers(upstream_response, decision, route.headers)?;
            }
        }
        Ok(())
    }

    fn suppress_error_log(&self, session: &Session, _ctx: &Ctx, e: &Error) -> bool {
        // Pingora logs every final error as `ERROR Fail to proxy`; an idle WebSocket closed by
        // the read timeout is not one (fail_to_proxy logs it at INFO).
        idle_upgraded(session, e)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if idle_upgraded(session, e) {
            // Like NGINX's proxy_read_timeout: the route's `read_timeout_ms` also bounds how long
            // an upgraded (WebSocket) connection may go without a byte from the upstream. The
            // 101 is already sent, so nothing more is written: both connections are closed.
            tracing::info!(
                route = ctx.route.as_ref().map_or(NO_ROUTE_LABEL, |r| &r.name),
                "upgraded connection closed: no data from the upstream within read_timeout_ms"
            );
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                504
            }
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if e.esource() == &ErrorSource::Upstream {
            if let Some(route) = &ctx.route {
                if let Some(c) = self.stats(route).upstream("error") {
                    c.inc();
                }
            }
        }
        if code > 0 && ctx.grpc && session.response_written().is_none() {
            let h1 = !session.is_http2();
            let message = format!("gateway: upstream failed ({})", e.etype().as_str());
            let written = match ResponseHeader::build(code, None)
                .and_then(|http| grpc::trailers_only(&http, &message, h1))
            {
                Ok(resp) => write_trailers_only(session, resp).await,
                Err(err) => Err(err),
            };
            if let Err(write_err) = written {
                tracing::debug!(error = %write_err, "could not send error response");
            }
        } else if code > 0 {
            // RFC 9457 problem+json like the gateway's own 404/429, and `Connection: close`
            // as Pingora's `respond_error` (write_error_response turns keep-alive off; it writes
            // nothing when a response, or a 101 upgrade, was already sent).
            let written = match response::failure(code, e.etype()) {
                Ok((resp, body)) => session.write_error_response(resp, body).await,
                Err(build_err) => Err(build_err),
            };
            if let Err(write_err) = written {
                tracing::debug!(error = %write_err, "could not send error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            self.shared
                .metrics
                .proxy_tasks
                .set(handle.metrics().num_alive_tasks() as i64);
        }
        let Some(level) = ctx.config.as_ref().and_then(|c| c.access_log) else {
            return;
        };
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let route = ctx.route.as_ref().map_or(NO_ROUTE_LABEL, |r| &r.name);
        let req = session.req_header();
        let client = peer_ip(session);
        let duration_us = ctx.started.elapsed().as_micros() as u64;
        let error = e.map(|e| e.to_string());
        macro_rules! access {
            ($lvl:expr) => {
                tracing::event!(
                    target: "tollgate::access",
                    $lvl,
                    client = %client,
                    method = %req.method,
                    path = %req.uri.path(),
                    route,
                    decision = ctx.counted_as.map_or("", RequestDecision::label),
                    status,
                    duration_us,
                    error,
                    "request"
                )
            };
        }
        match level {
            tracing::Level::ERROR => access!(tracing::Level::ERROR),
            tracing::Level::WARN => access!(tracing::Level::WARN),
            tracing::Level::INFO => access!(tracing::Level::INFO),
            tracing::Level::DEBUG => access!(tracing::Level::DEBUG),
            _ => access!(tracing::Level::TRACE),
        }
    }
}
