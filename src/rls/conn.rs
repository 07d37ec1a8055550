//! The rate-limit service's connections: at most `rls.max_connections` at once (one past it is
//! closed as soon as it is accepted, so idle sockets can never take the file descriptors the
//! proxy and admin listeners need), none idle for ever (a connection that sends nothing within
//! [`FIRST_BYTES`] of opening, or makes no `ShouldRateLimit` call for `rls.idle_timeout_ms`, is
//! closed: pings, their answers and trickled bytes do not count, so nobody holds a place under
//! the cap without calling), and none silent at the stop (only a connection that has spoken is
//! handed to the server). Each connection's [`CallClock`] reaches the handler as tonic's
//! connect info, which marks every call on it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected as _;

/// How long a new connection may stay silent before it is closed.
pub const FIRST_BYTES: Duration = Duration::from_secs(10);
/// How often the server pings an HTTP/2 connection (a live client answers).
pub const PING_EVERY: Duration = Duration::from_secs(30);

/// When a connection last made a call (milliseconds since the process's first connection);
/// the handler marks it through tonic's connect info.
#[derive(Clone, Debug)]
pub struct CallClock {
    pub tcp: tonic::transport::server::TcpConnectInfo,
    last_call_ms: Arc<AtomicU64>,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl CallClock {
    /// A call arrived on this connection.
    pub fn mark(&self) {
        self.last_call_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// One accepted connection, holding its place under the cap until dropped.
pub struct Guarded {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    clock: CallClock,
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Pending => loop {
                if self.deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // Due: closed unless a call came since; then due `idle` after that call.
                let last = self.clock.last_call_ms.load(Ordering::Relaxed);
                let due = epoch() + Duration::from_millis(last) + self.idle;
                if due <= Instant::now() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "rate-limit service connection made no call",
                    )));
                }
                self.deadline.as_mut().reset(due);
            },
            other => other,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = CallClock;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.clock.clone()
    }
}

/// Resolves once `stop` says so (or its sender is gone).
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// The listener's connections as a stream for tonic: accepted until `stop` (then the listener
/// closes and connecting is refused), capped at `max_connections`, and each handed over only
/// once its peer has sent a byte (within [`FIRST_BYTES`], else closed). The graceful stop lasts
/// until every connection the server holds is closed, and the server would wait for a silent
/// connection's HTTP/2 preface for ever: one that has sent nothing by the stop has no call to
/// finish and is closed instead of holding the stop up. Accept errors (such as running out of
/// file descriptors) are logged and retried after a pause, never handed on.
pub fn incoming(
    listener: TcpListener,
    max_connections: usize,
    idle: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> impl futures::Stream<Item = io::Result<Guarded>> {
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let (tx, rx) = tokio::sync::mpsc::channel::<Guarded>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = stopped(&mut stop) => return,
            };
            let (io, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "rate-limit service: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "rate-limit service: connection cap reached; closed");
                drop(io);
                continue;
            };
            let _ = io.set_nodelay(true);
            let (tx, mut stop) = (tx.clone(), stop.clone());
            tokio::spawn(async move {
                // `peek`, not `readable`: readiness may be reported before any byte.
                let mut first = [0u8; 1];
                tokio::select! {
                    peeked = tokio::time::timeout(FIRST_BYTES, io.peek(&mut first)) => {
                        if matches!(peeked, Ok(Ok(n)) if n > 0) {
                            // Idle counts from here until the first call.
                            let clock = CallClock {
                                tcp: io.connect_info(),
                                last_call_ms: Arc::new(AtomicU64::new(now_ms())),
                            };
                            let guarded = Guarded {
                                io,
                                _permit: permit,
                                idle,
                                deadline: Box::pin(tokio::time::sleep(idle)),
                                clock,
                            };
                            let _ = tx.send(guarded).await;
                        }
                    }
                    () = stopped(&mut stop) => {}
                }
            });
        }
    });
    // Never ends by itself: the server is to stop on `stop` (its graceful path), not because
    // its connections ran out first.
    futures::StreamExt::chain(
        futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|guarded| (Ok(guarded), rx))
        }),
        futures::stream::pending(),
    )
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;

    /// tonic turns Nagle's algorithm off only on listeners it binds itself; a response written
    /// while an earlier one is unacknowledged would otherwise wait for the delayed ACK.
    #[tokio::test]
    async fn accepted_connections_have_nodelay_and_silent_ones_are_not_handed_over() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let address = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        let incoming = super::incoming(listener, 8, std::time::Duration::from_secs(60), stopped);
        let mut incoming = Box::pin(incoming);
        let _silent = tokio::net::TcpStream::connect(address)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..3 {
            let mut client = tokio::net::TcpStream::connect(address)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            client
                .write_all(b"P")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let accepted = incoming
                .next()
                .await
                .and_then(Result::ok)
                .unwrap_or_else(|| panic!("no connection"));
            assert!(accepted.io.nodelay().unwrap_or(false), "TCP_NODELAY is off");
            // Every one handed over has spoken: the silent one never is.
            let mut first = [0u8; 1];
            assert_eq!(accepted.io.peek(&mut first).await.ok(), Some(1));
        }
    }
}
