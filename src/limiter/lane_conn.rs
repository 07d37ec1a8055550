//! A lane's own Redis connection (standalone Redis over plain TCP): one pipelined connection,
//! commands written as whole RESP frames built by the caller and replies matched to them in
//! order, with none of a general client's per-command machinery. It reconnects by itself
//! (50 ms doubling to 2 s), answers commands at once with a connection error while it is down,
//! and drops a connection that has left a command unanswered for [`UNRESPONSIVE`].

use super::resp::{self, Reply};
use super::StoreError;
use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Longest a connection may leave a command unanswered before it is dropped and opened again
/// (a hung server, a black-holed network).
pub const UNRESPONSIVE: Duration = Duration::from_millis(1000);
/// Longest a connect (TCP, then `AUTH` and `SELECT`) may take.
const CONNECT_LIMIT: Duration = Duration::from_millis(500);
/// First and longest pause between connection attempts.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const LONGEST_BACKOFF: Duration = Duration::from_millis(2000);
/// Commands queued on a connection at most.
const QUEUE: usize = 1024;
/// Most bytes held of a reply not yet whole: a script reply is a few numbers per request, so
/// a server sending more is broken (or not Redis).
const MOST_BUFFERED: usize = 4 * 1024 * 1024;

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub database: Option<u8>,
}

/// Where a command's reply goes.
type ReplyTo = oneshot::Sender<Result<Reply, StoreError>>;
/// The commands written and not yet answered, oldest first, with when each was written.
type Waiting = VecDeque<(Instant, ReplyTo)>;

/// One command and who waits for its reply.
struct Job {
    frame: Bytes,
    reply: ReplyTo,
}

/// A handle on the connection; cheap to clone. The connection ends when every handle is gone.
#[derive(Clone)]
pub struct LaneConn {
    jobs: mpsc::Sender<Job>,
    connected: watch::Receiver<bool>,
}

impl LaneConn {
    /// Starts the connection's task on `runtime` (the lane's thread). It stops when every
    /// handle is gone, or once `closed` is set (the store was closed) and it is not connected:
    /// a store swapped away while its Redis is unreachable does not retry for good.
    pub fn start(
        target: Target,
        runtime: &tokio::runtime::Handle,
        closed: Arc<AtomicBool>,
    ) -> LaneConn {
        let (jobs, rx) = mpsc::channel(QUEUE);
        let (tell, connected) = watch::channel(false);
        runtime.spawn(run(target, rx, tell, closed));
        LaneConn { jobs, connected }
    }

    /// Sends one command (a whole RESP frame) and waits for its reply. A server's error reply
    /// is `Ok(Reply::Error(..))`; a connection that is down or fails is `Err`.
    pub async fn call(&self, frame: Bytes) -> Result<Reply, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job { frame, reply })
            .map_err(|_| StoreError::Connection("the lane's Redis queue is full".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Connection("the lane's Redis connection stopped".into()))?
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Returns once the connection is open (at once if it is).
    pub async fn wait_connected(&self) {
        let mut connected = self.connected.clone();
        let _ = connected.wait_for(|up| *up).await;
    }
}

/// How a connection ended.
enum Ended {
    /// Every handle is gone: stop for good.
    Unused,
    /// It broke (closed, reset, unresponsive, garbled) with commands in flight, or the server
    /// sent something nobody asked for: connect again.
    Broken(StoreError),
    /// The server closed it while nothing was in flight (Redis's idle `timeout`): connect
    /// again, quietly.
    ClosedIdle,
}

/// A connection that served at least this long is opened again at once when it ends; one
/// that ends sooner is retried after the backoff, so that a server that takes connections
/// and drops them does not make a loop of it.
const STEADY: Duration = Duration::from_secs(1);

async fn run(
    target: Target,
    mut jobs: mpsc::Receiver<Job>,
    connected: watch::Sender<bool>,
    closed: Arc<AtomicBool>,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut said_down = false;
    loop {
        if closed.load(Ordering::Acquire) {
            return;
        }
        // Commands that arrive while connecting wait in the queue for the connection.
        let mut retry_at_once = false;
        match tokio::time::timeout(CONNECT_LIMIT, open(&target)).await {
            Ok(Ok(stream)) => {
                if said_down {
                    tracing::info!(host = %target.host, port = target.port, "lane connection to Redis open again");
                    said_down = false;
                }
                connected.send_replace(true);
                let opened = Instant::now();
                let ended = serve(stream, &mut jobs).await;
                connected.send_replace(false);
                let steady = opened.elapsed() >= STEADY;
                if steady {
                    backoff = FIRST_BACKOFF;
                }
                match ended {
                    Ended::Unused => return,
                    Ended::ClosedIdle => {
                        tracing::debug!("Redis closed an idle lane connection; connecting again");
                        retry_at_once = steady;
                    }
                    Ended::Broken(e) => {
                        tracing::warn!(error = %e, "lane connection to Redis lost; connecting again");
                        said_down = true;
                        retry_at_once = steady;
                    }
                }
            }
            Ok(Err(e)) => {
                if !said_down {
                    tracing::warn!(error = %e, "lane connection to Redis failed; retrying");
                    said_down = true;
                }
            }
            Err(_) => {
                if !said_down {
                    tracing::warn!("lane connection to Redis timed out; retrying");
                    said_down = true;
                }
            }
        }
        if retry_at_once {
            continue;
        }
        // Until the next attempt, commands are answered at once: the caller's fallback
        // decides instead of waiting out its deadline.
        let next = Instant::now() + backoff;
        loop {
            tokio::select! {
                job = jobs.recv() => match job {
                    Some(job) => {
                        let _ = job.reply.send(Err(StoreError::Connection(
                            "the lane's Redis connection is down".into(),
                        )));
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(next) => break,
            }
        }
        backoff = (backoff * 2).min(LONGEST_BACKOFF);
    }
}

/// Connects, then `AUTH` and `SELECT` as the URL asks, then `PING`: a connection counts as
/// open only once the server has answered (a full server's `-ERR max number of clients`, a
/// `-NOAUTH`, or something that is not Redis fails here, and is retried after the backoff).
async fn open(target: &Target) -> Result<TcpStream, StoreError> {
    let io = |e: std::io::Error| StoreError::Connection(e.to_string());
    let mut stream = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    if let Some(password) = &target.password {
        let frame = match &target.username {
            Some(user) => resp::command(&[b"AUTH", user.as_bytes(), password.as_bytes()]),
            None => resp::command(&[b"AUTH", password.as_bytes()]),
        };
        expect_ok(&mut stream, &frame, "AUTH").await?;
    }
    if let Some(db) = target.database.filter(|db| *db != 0) {
        let db = db.to_string();
        expect_ok(
            &mut stream,
            &resp::command(&[b"SELECT", db.as_bytes()]),
            "SELECT",
        )
        .await?;
    }
    expect_ok(&mut stream, &resp::command(&[b"PING"]), "PING").await?;
    Ok(stream)
}

/// Most bytes read for the reply to a handshake command (`AUTH`, `SELECT`, `PING`): a status
/// or an error line, never long.
const MOST_HANDSHAKE: usize = 4096;

/// Writes one command and reads its reply, which must be a status (`+OK`, `+PONG`).
async fn expect_ok(stream: &mut TcpStream, frame: &[u8], what: &str) -> Result<(), StoreError> {
    let io = |e: std::io::Error| StoreError::Connection(e.to_string());
    stream.write_all(frame).await.map_err(io)?;
    let mut buf = BytesMut::with_capacity(256);
    loop {
        let before = buf.len();
        if stream.read_buf(&mut buf).await.map_err(io)? == 0 {
            return Err(StoreError::Connection(format!(
                "Redis closed the connection at {what}"
            )));
        }
        // A reply ends with a line feed: nothing to parse until one arrives.
        if !buf[before..].contains(&b'\n') {
            if buf.len() > MOST_HANDSHAKE {
                return Err(StoreError::Connection(format!(
                    "no reply to {what} within {MOST_HANDSHAKE} bytes"
                )));
            }
            continue;
        }
        match resp::parse(&buf) {
            Ok(Some((Reply::Status(_), _))) => return Ok(()),
            Ok(Some((other, _))) => {
                return Err(StoreError::Connection(format!("{what} refused: {other:?}")))
            }
            Ok(None) if buf.len() > MOST_HANDSHAKE => {
                return Err(StoreError::Connection(format!(
                    "no reply to {what} within {MOST_HANDSHAKE} bytes"
                )))
            }
            Ok(None) => {}
            Err(e) => return Err(StoreError::Connection(e.to_string())),
        }
    }
}

/// Runs one open connection: writes each command as it comes, matches replies to the
/// commands in order, until it breaks or nobody can send any more.
async fn serve(stream: TcpStream, jobs: &mut mpsc::Receiver<Job>) -> Ended {
    let (mut read, mut write) = stream.into_split();
    let mut waiting: Waiting = VecDeque::new();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut check = tokio::time::interval(UNRESPONSIVE / 5);
    let fail_all = |waiting: &mut Waiting, e: &StoreError| {
        for (_, reply) in waiting.drain(..) {
            let _ = reply.send(Err(e.clone()));
        }
    };
    loop {
        tokio::select! {
            job = jobs.recv() => {
                let Some(job) = job else {
                    return Ended::Unused;
                };
                // A server that stops reading (hung, its buffers full) fills ours: a write
                // stuck for as long as an unanswered command ends the connection the same way.
                let written = tokio::time::timeout(UNRESPONSIVE, write.write_all(&job.frame)).await;
                if let Some(e) = match written {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some(format!(
                        "Redis read nothing for {} ms",
                        UNRESPONSIVE.as_millis()
                    )),
                } {
                    let e = StoreError::Connection(e);
                    let _ = job.reply.send(Err(e.clone()));
                    fail_all(&mut waiting, &e);
                    return Ended::Broken(e);
                }
                waiting.push_back((Instant::now(), job.reply));
            }
            read_result = read.read_buf(&mut buf) => {
                let before = buf.len() - read_result.as_ref().map_or(0, |n| *n);
                let result = match read_result {
                    Ok(0) if waiting.is_empty() && buf.is_empty() => return Ended::ClosedIdle,
                    Ok(0) => Err(StoreError::Connection("Redis closed the connection".into())),
                    Err(e) => Err(StoreError::Connection(e.to_string())),
                    // A whole reply ends with a line feed: parse only when one arrived (a
                    // stream without one is not scanned over and over), and never hold more
                    // than any reply of ours needs.
                    Ok(_) if !buf[before..].contains(&b'\n') => {
                        if buf.len() > MOST_BUFFERED {
                            Err(StoreError::Connection(format!(
                                "Redis sent over {MOST_BUFFERED} bytes without a whole reply"
                            )))
                        } else {
                            Ok(())
                        }
                    }
                    Ok(_) => answer_replies(&mut buf, &mut waiting),
                };
                if let Err(e) = result {
                    fail_all(&mut waiting, &e);
                    return Ended::Broken(e);
                }
            }
            _ = check.tick() => {
                if waiting.front().is_some_and(|(sent, _)| sent.elapsed() >= UNRESPONSIVE) {
                    let e = StoreError::Timeout;
                    fail_all(&mut waiting, &e);
                    return Ended::Broken(StoreError::Connection(format!(
                        "Redis left a command unanswered for {} ms",
                        UNRESPONSIVE.as_millis()
                    )));
                }
            }
        }
    }
}

/// Hands every whole reply in `buf` to the command waiting for it, oldest first. More whole
/// replies than commands waiting is a broken stream, found before any of them is handed out:
/// a stray reply is never taken as another command's answer.
fn answer_replies(buf: &mut BytesMut, waiting: &mut Waiting) -> Result<(), StoreError> {
    let mut replies = Vec::new();
    let mut used = 0;
    loop {
        match resp::parse(&buf[used..]) {
            Ok(Some((reply, n))) => {
                used += n;
                replies.push(reply);
                if replies.len() > waiting.len() {
                    return Err(StoreError::Connection(
                        "a reply from Redis that nothing asked for".into(),
                    ));
                }
            }
            Ok(None) => break,
            Err(e) => return Err(StoreError::Connection(e.to_string())),
        }
    }
    if buf.len() - used > MOST_BUFFERED {
        return Err(StoreError::Connection(format!(
            "Redis sent over {MOST_BUFFERED} bytes without a whole reply"
        )));
    }
    buf.advance(used);
    for reply in replies {
        if let Some((_, to)) = waiting.pop_front() {
            let _ = to.send(Ok(reply));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Answers = Vec<oneshot::Receiver<Result<Reply, StoreError>>>;

    fn waiting(n: usize) -> (Waiting, Answers) {
        let mut queue = VecDeque::new();
        let mut answers = Vec::new();
        for _ in 0..n {
            let (tx, rx) = oneshot::channel();
            queue.push_back((Instant::now(), tx));
            answers.push(rx);
        }
        (queue, answers)
    }

    #[tokio::test]
    async fn replies_go_to_their_commands_in_order_and_a_partial_one_waits() {
        let (mut queue, mut answers) = waiting(2);
        let mut buf = BytesMut::from(&b":1\r\n:2\r\n:3"[..]);
        assert!(answer_replies(&mut buf, &mut queue).is_ok());
        assert_eq!(&buf[..], b":3", "the partial reply is kept");
        assert_eq!(queue.len(), 0);
        assert!(matches!(answers[0].try_recv(), Ok(Ok(Reply::Integer(1)))));
        assert!(matches!(answers[1].try_recv(), Ok(Ok(Reply::Integer(2)))));
    }

    #[tokio::test]
    async fn a_stray_reply_is_found_before_any_reply_is_handed_out() {
        let (mut queue, mut answers) = waiting(1);
        let mut buf = BytesMut::from(&b":1\r\n:2\r\n"[..]);
        assert!(answer_replies(&mut buf, &mut queue).is_err());
        // Nothing was delivered: the caller fails every waiting command instead.
        assert!(answers[0].try_recv().is_err());
        assert_eq!(queue.len(), 1);
    }

    #[tokio::test]
    async fn garbage_and_oversize_input_are_errors() {
        let (mut queue, _answers) = waiting(1);
        let mut buf = BytesMut::from(&b"!bad\r\n"[..]);
        assert!(answer_replies(&mut buf, &mut queue).is_err());
        let mut big_line = BytesMut::from(&b"+"[..]);
        big_line.extend_from_slice(&vec![b'a'; MOST_BUFFERED + 1]);
        big_line.extend_from_slice(b"\n");
        assert!(answer_replies(&mut big_line, &mut queue).is_err());
    }
}
