//! HTTP/1.1 pipelining on the proxy port: several requests written in one go on one connection
//! are each answered, in order, whether the gateway proxies them or answers them itself (429,
//! 404, 400), and after a request body; a response after which the connection cannot be reused
//! (a 502) says `Connection: close` instead of leaving the queued requests unanswered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, Gateway, Upstream};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const CONFIG: &str = r#"
listen: ["{PROXY}"]
admin: { listen: "{ADMIN}" }
upstreams:
  app: { targets: ["{UPSTREAM}"], connect_timeout_ms: 500, read_timeout_ms: 2000 }
routes:
  - name: limited
    match: { path_prefix: "/limited" }
    upstream: app
    limits:
      - { name: one, key: ["ip"], rate: "1/m", burst: 1 }
  - name: echo
    match: { path_prefix: "/echo" }
    upstream: app
"#;

/// Longest a test waits for the gateway to answer (or close) before giving up.
const READ_LIMIT: Duration = Duration::from_secs(5);

/// One parsed response.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The upstream's JSON echo (method, path) of the request it received.
    fn echo(&self) -> (String, String) {
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not an upstream echo ({e}): {}", self.body));
        (
            v["method"].as_str().unwrap_or("").to_string(),
            v["path"].as_str().unwrap_or("").to_string(),
        )
    }

    /// The `error` field of a problem+json body the gateway wrote.
    fn problem(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not a problem body ({e}): {}", self.body));
        v["error"].as_str().unwrap_or("").to_string()
    }

    fn says_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// Parses as many complete responses as `data` holds (Content-Length or chunked bodies).
fn parse_responses(mut data: &[u8]) -> Vec<Resp> {
    let mut out = Vec::new();
    while let Some(end) = find(data, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&data[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {head:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let mut rest = &data[end + 4..];
        let chunked = headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
        });
        let body = if chunked {
            let mut body = Vec::new();
            loop {
                let Some(line_end) = find(rest, b"\r\n") else {
                    return out;
                };
                let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                        .unwrap_or_else(|e| panic!("bad chunk size {size_text:?}: {e}"));
                let chunk_start = line_end + 2;
                if rest.len() < chunk_start + size + 2 {
                    return out;
                }
                body.extend_from_slice(&rest[chunk_start..chunk_start + size]);
                rest = &rest[chunk_start + size + 2..];
                if size == 0 {
                    break;
                }
            }
            body
        } else {
            let len = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.parse().expect("content-length"));
            if rest.len() < len {
                return out;
            }
            let body = rest[..len].to_vec();
            rest = &rest[len..];
            body
        };
        out.push(Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        data = rest;
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Writes `requests` to the proxy in ONE write, then reads until the gateway closes the
/// connection (or `READ_LIMIT` passes), and returns every complete response plus whether the
/// connection ended by a clean close (EOF) rather than by the time limit.
fn pipeline(proxy: SocketAddr, requests: &[&str]) -> (Vec<Resp>, bool) {
    let mut stream = TcpStream::connect(proxy).expect("connect to the proxy");
    stream.set_nodelay(true).expect("nodelay");
    stream.set_read_timeout(Some(READ_LIMIT)).expect("timeout");
    stream
        .write_all(requests.concat().as_bytes())
        .expect("write the pipeline");
    read_all(stream)
}

fn read_all(mut stream: TcpStream) -> (Vec<Resp>, bool) {
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let closed = loop {
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break false
            }
            // A reset after the last response is still the end of the conversation.
            Err(_) => break true,
        }
    };
    (parse_responses(&data), closed)
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n")
}

/// The last request of a pipeline asks to close, so that the test reads to EOF, not a timeout.
fn get_last(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
}

fn post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: app.test\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Asserts the statuses, and that every response but the last keeps the connection open.
fn assert_statuses(resps: &[Resp], closed: bool, want: &[u16], gw: &Gateway) {
    let got: Vec<u16> = resps.iter().map(|r| r.status).collect();
    assert_eq!(
        got,
        want,
        "each pipelined request gets its own response, in order; got {resps:#?}\ngateway log:\n{}",
        gw.log()
    );
    assert!(closed, "the connection closed after the last response");
    for r in &resps[..resps.len() - 1] {
        assert!(
            !r.says_close(),
            "a response followed by another says keep-alive: {r:?}"
        );
    }
}

#[tokio::test]
async fn three_pipelined_gets_are_proxied_in_order() {
    let up = Upstream::start();
    let gw = Gateway::start(CONFIG, up.addr).await;
    let (resps, closed) = tokio::task::spawn_blocking({
        let proxy = gw.proxy;
        move || {
            pipeline(
                proxy,
                &[&get("/echo/1"), &get("/echo/2"), &get_last("/echo/3")],
            )
        }
    })
    .await
    .unwrap();
    assert_statuses(&resps, closed, &[200, 200, 200], &gw);
    let paths: Vec<String> = resps.iter().map(|r| r.echo().1).collect();
    assert_eq!(paths, ["/echo/1", "/echo/2", "/echo/3"]);
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn two_pipelined_gets_on_a_kept_alive_connection() {
    // No `Connection: close` at the end: both answers arrive and the connection stays open for
    // a third request sent after them.
    let up = Upstream::start();
    let gw = Gateway::start(CONFIG, up.addr).await;
    let proxy = gw.proxy;
    let (first, second) = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(proxy).expect("connect");
        stream.set_read_timeout(Some(READ_LIMIT)).expect("timeout");
        stream
            .write_all(format!("{}{}", get("/echo/a"), get("/echo/b")).as_bytes())
            .expect("write");
        let mut data = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        while parse_responses(&data).len() < 2 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
        let first = parse_responses(&data);
        stream
            .write_all(get_last("/echo/c").as_bytes())
            .expect("write after the pipeline");
        (first, read_all(stream))
    })
    .await
    .unwrap();
    let paths: Vec<(u16, String)> = first.iter().map(|r| (r.status, r.echo().1)).collect();
    assert_eq!(
        paths,
        [(200, "/echo/a".to_string()), (200, "/echo/b".to_string())],
        "gateway log:\n{}",
        gw.log()
    );
    let (third, closed) = second;
    assert_eq!(third.len(), 1, "{third:?}");
    assert_eq!(third[0].echo().1, "/echo/c");
    assert!(closed);
}

#[tokio::test]
async fn the_gateways_own_answers_keep_their_place_in_the_pipeline() {
    let up = Upstream::start();
    let gw = Gateway::start(CONFIG, up.addr).await;
    let (resps, closed) = tokio::task::spawn_blocking({
        let proxy = gw.proxy;
        move || {
            pipeline(
                proxy,
                &[
                    &get("/limited/1"),   // 200: takes the one token
                    &get("/limited/2"),   // 429: every pipelined request is decided
                    &get("/nowhere"),     // 404: no route
                    &get("/echo/a%zz"),   // 400: bad percent-encoding
                    &get_last("/echo/5"), // 200
                ],
            )
        }
    })
    .await
    .unwrap();
    assert_statuses(&resps, closed, &[200, 429, 404, 400, 200], &gw);
    assert_eq!(resps[0].echo().1, "/limited/1");
    assert_eq!(resps[1].problem(), "rate_limited");
    assert_eq!(resps[2].problem(), "no_route");
    assert_eq!(resps[3].problem(), "bad_percent_encoding");
    assert_eq!(resps[4].echo().1, "/echo/5");
    assert_eq!(
        up.hits(),
        2,
        "the refused requests never reached the upstream"
    );
}

#[tokio::test]
async fn a_get_pipelined_after_a_post_body() {
    let up = Upstream::start();
    let gw = Gateway::start(CONFIG, up.addr).await;
    let (resps, closed) = tokio::task::spawn_blocking({
        let proxy = gw.proxy;
        move || {
            pipeline(
                proxy,
                &[
                    // Proxied with its body; the body must not be read as the next request.
                    &post("/echo/form", "name=GET /echo/evil HTTP/1.1"),
                    &get("/limited/1"),
                    // Refused without reading the body: the gateway skips it.
                    &post("/limited/2", "x=GET /echo/evil HTTP/1.1\r\n\r\n"),
                    &post("/nowhere", "abc"),
                    &get_last("/echo/after"),
                ],
            )
        }
    })
    .await
    .unwrap();
    assert_statuses(&resps, closed, &[200, 200, 429, 404, 200], &gw);
    assert_eq!(
        resps[0].echo(),
        ("POST".to_string(), "/echo/form".to_string())
    );
    assert_eq!(
        resps[1].echo(),
        ("GET".to_string(), "/limited/1".to_string())
    );
    assert_eq!(resps[2].problem(), "rate_limited");
    assert_eq!(resps[3].problem(), "no_route");
    assert_eq!(
        resps[4].echo(),
        ("GET".to_string(), "/echo/after".to_string())
    );
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn a_request_sent_while_the_previous_one_is_proxied_is_answered_after_it() {
    // The second request arrives in its own segment while the first waits on a slow upstream.
    // Whenever it lands, it must get its own answer after the first one's.
    let up = Upstream::start();
    let gw = Gateway::start(CONFIG, up.addr).await;
    let proxy = gw.proxy;
    let (resps, closed) = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(proxy).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream.set_read_timeout(Some(READ_LIMIT)).expect("timeout");
        stream
            .write_all(get("/echo/slow?ms=400").as_bytes())
            .expect("write");
        std::thread::sleep(Duration::from_millis(100));
        stream
            .write_all(get_last("/echo/second").as_bytes())
            .expect("write");
        read_all(stream)
    })
    .await
    .unwrap();
    assert_statuses(&resps, closed, &[200, 200], &gw);
    assert_eq!(resps[0].echo().1, "/echo/slow");
    assert_eq!(resps[1].echo().1, "/echo/second");
}

#[tokio::test]
async fn a_response_that_ends_the_connection_says_close() {
    // An upstream that refuses connections: the 502 cannot be followed by the queued request
    // on this connection, so it must announce `Connection: close` and then close.
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let gw = Gateway::start(CONFIG, dead).await;
    let (resps, closed) = tokio::task::spawn_blocking({
        let proxy = gw.proxy;
        move || pipeline(proxy, &[&get("/echo/1"), &get("/echo/2")])
    })
    .await
    .unwrap();
    assert!(closed, "the connection closed cleanly: {resps:?}");
    assert_eq!(resps.len(), 1, "{resps:?}");
    assert_eq!(resps[0].status, 502);
    assert!(
        resps[0].says_close(),
        "a response after which the connection closes says so: {:?}",
        resps[0]
    );
}

#[tokio::test]
async fn a_refused_request_with_a_chunked_body_closes_the_connection() {
    // The gateway does not read an upload it refuses unless it is small and of known length:
    // here the 429 says `Connection: close`, and the pipelined GET is not answered (the client
    // is told to retry it on a new connection), rather than answered out of a misread body.
    let up = Upstream::start();
    let gw = Gateway::start(CONFIG, up.addr).await;
    let (resps, closed) = tokio::task::spawn_blocking({
        let proxy = gw.proxy;
        move || {
            pipeline(
                proxy,
                &[
                    &get("/limited/1"),
                    "POST /limited/2 HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                     5\r\nhello\r\n0\r\n\r\n",
                    &get_last("/echo/after"),
                ],
            )
        }
    })
    .await
    .unwrap();
    assert!(closed, "the connection closed cleanly: {resps:?}");
    let got: Vec<u16> = resps.iter().map(|r| r.status).collect();
    assert_eq!(got, [200, 429], "{resps:#?}");
    assert!(!resps[0].says_close(), "{:?}", resps[0]);
    assert!(resps[1].says_close(), "{:?}", resps[1]);
    assert_eq!(up.hits(), 1);

    // Same for a body the client only sends after `100 Continue`: it is never read.
    let (resps, closed) = tokio::task::spawn_blocking({
        let proxy = gw.proxy;
        move || {
            pipeline(
                proxy,
                &[
                    "POST /limited/3 HTTP/1.1\r\nHost: app.test\r\nExpect: 100-continue\r\n\
                     Content-Length: 5\r\n\r\n",
                    &get_last("/echo/after"),
                ],
            )
        }
    })
    .await
    .unwrap();
    assert!(closed, "the connection closed cleanly: {resps:?}");
    assert_eq!(resps.len(), 1, "{resps:#?}");
    assert_eq!(resps[0].status, 429);
    assert!(resps[0].says_close(), "{:?}", resps[0]);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn a_refused_post_whose_body_follows_the_answer_keeps_the_connection() {
    // A client that sends the body only after the headers (here: after reading the 429) still
    // keeps its connection: the gateway reads past the small body, then serves the next request.
    let up = Upstream::start();
    let gw = Gateway::start(CONFIG, up.addr).await;
    let proxy = gw.proxy;
    let (refused, rest) = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(proxy).expect("connect");
        stream.set_read_timeout(Some(READ_LIMIT)).expect("timeout");
        let body = "a=1";
        stream
            .write_all(
                format!(
                    "{}POST /limited/2 HTTP/1.1\r\nHost: app.test\r\nContent-Length: {}\r\n\r\n",
                    get("/limited/1"),
                    body.len()
                )
                .as_bytes(),
            )
            .expect("write");
        let mut data = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        while parse_responses(&data).len() < 2 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
        let refused = parse_responses(&data);
        // The body, and the next request right behind it.
        let _ = stream.write_all(format!("{body}{}", get_last("/echo/after")).as_bytes());
        (refused, read_all(stream))
    })
    .await
    .unwrap();
    let got: Vec<u16> = refused.iter().map(|r| r.status).collect();
    assert_eq!(got, [200, 429], "{refused:#?}\ngateway log:\n{}", gw.log());
    assert!(
        !refused[1].says_close(),
        "the 429 keeps the connection: {:?}",
        refused[1]
    );
    let (after, closed) = rest;
    assert_eq!(after.len(), 1, "{after:#?}");
    assert_eq!(
        after[0].echo(),
        ("GET".to_string(), "/echo/after".to_string())
    );
    assert!(closed);
}
