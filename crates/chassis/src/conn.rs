//! Book-keeping for the HTTP accept loop in [`crate::serve`]: which connections are open, which
//! have a request in flight, how long the others have waited, and the watchdog that closes a
//! connection whose client is too slow or gone quiet.
//!
//! Written here rather than taken from a crate: neither hyper, hyper-util nor tower-http has an
//! idle timeout that spares keep-alive connections while still timing request heads, or a
//! connection cap that evicts idle connections instead of refusing newcomers.

use crate::serve::ConnectionLimits;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Why the server closed a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The client or hyper ended it (not counted as a server close).
    Ended,
    /// A request head did not arrive in time (slow or silent client).
    HeaderTimeout,
    /// No request for the idle timeout.
    Idle,
    /// Closed to make room at the connection cap.
    Evicted,
}

impl Close {
    pub fn as_str(self) -> &'static str {
        match self {
            Close::Ended => "ended",
            Close::HeaderTimeout => "header_timeout",
            Close::Idle => "idle",
            Close::Evicted => "evicted",
        }
    }
}

/// A connection idle this short is not evicted: a client that has just connected gets the
/// chance to send its request.
const MIN_IDLE_TO_EVICT: Duration = Duration::from_millis(250);
/// At most one warning per this period about the cap or failing accepts.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// One open connection.
pub struct Conn {
    id: u64,
    table: Arc<ConnTable>,
    /// Requests in flight (a response counts until its body is sent).
    in_flight: AtomicUsize,
    /// Has it ever started a request.
    served: AtomicBool,
    /// Speaks HTTP/2 (no per-request head timing: frames interleave).
    h2: AtomicBool,
    /// Milliseconds (on the table's clock) since when no request has been in flight.
    waiting_since: AtomicU64,
    /// When the first byte of the next request head arrived while waiting (0: none yet).
    head_started: AtomicU64,
    close: CancellationToken,
    why: Mutex<Close>,
}

impl Conn {
    /// Marks a request as started; the returned guard marks it done when dropped.
    pub fn request_started(self: &Arc<Self>) -> Busy {
        let mut inner = self.table.lock();
        if self.in_flight.fetch_add(1, Ordering::SeqCst) == 0 {
            inner.waiting.remove(&(self.waiting_since.load(Ordering::SeqCst), self.id));
        }
        self.served.store(true, Ordering::SeqCst);
        self.head_started.store(0, Ordering::SeqCst);
        Busy { conn: Some(Arc::clone(self)) }
    }

    fn request_done(&self) {
        let mut inner = self.table.lock();
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            let now = self.table.now_ms();
            self.waiting_since.store(now, Ordering::SeqCst);
            if inner.open.contains_key(&self.id) {
                inner.waiting.insert((now, self.id));
            }
            drop(inner);
            self.table.freed.notify_one();
        }
    }

    fn bytes_read(&self, first: &[u8]) {
        if !self.served.load(Ordering::Relaxed) && self.head_started.load(Ordering::Relaxed) == 0 && first.starts_with(b"PRI * HTTP/2") {
            self.h2.store(true, Ordering::Relaxed);
        }
        if self.in_flight.load(Ordering::Relaxed) == 0 && self.head_started.load(Ordering::Relaxed) == 0 {
            self.head_started.store(self.table.now_ms().max(1), Ordering::Relaxed);
        }
    }

    /// Resolves when the table closes this connection (evicted at the cap); for the time
    /// before its watchdog runs, such as a TLS handshake.
    pub fn close_requested(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.close.cancelled()
    }

    fn shut(&self, why: Close) {
        if let Ok(mut w) = self.why.lock() {
            *w = why;
        }
        self.close.cancel();
    }

    /// When the watchdog must look again, or why the connection must close now.
    fn check(&self, now: u64) -> Result<u64, Close> {
        let limits = &self.table.limits;
        let (header, idle) = (limits.header_read_timeout_ms, limits.idle_timeout_ms);
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Ok(now + idle);
        }
        let head = self.head_started.load(Ordering::SeqCst);
        let waiting = self.waiting_since.load(Ordering::SeqCst);
        let (deadline, why) = if !self.served.load(Ordering::SeqCst) {
            // A new connection: its first request head within the header timeout.
            (waiting + header, Close::HeaderTimeout)
        } else if head != 0 && !self.h2.load(Ordering::SeqCst) {
            (head + header, Close::HeaderTimeout)
        } else {
            (waiting + idle, Close::Idle)
        };
        if now >= deadline { Err(why) } else { Ok(deadline) }
    }
}

/// Held while a request is in flight.
pub struct Busy {
    conn: Option<Arc<Conn>>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.request_done();
        }
    }
}

/// A response body that keeps its request counted as in flight until it is sent (or dropped).
pub struct Tracked<B> {
    inner: B,
    _busy: Busy,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, busy: Busy) -> Self {
        Tracked { inner, _busy: busy }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Default)]
struct Inner {
    open: HashMap<u64, Arc<Conn>>,
    /// Connections with no request in flight, oldest first: (waiting since, id).
    waiting: BTreeSet<(u64, u64)>,
    next_id: u64,
    last_warning: Option<Instant>,
    suppressed: u64,
}

/// The open connections of one listener.
pub struct ConnTable {
    name: &'static str,
    cap: usize,
    limits: ConnectionLimits,
    epoch: Instant,
    inner: Mutex<Inner>,
    freed: Notify,
    open_gauge: metrics::Gauge,
}

impl ConnTable {
    pub fn new(name: &'static str, cap: usize, limits: ConnectionLimits) -> Arc<ConnTable> {
        metrics::gauge!(crate::instruments::HTTP_CONNECTION_LIMIT, "listener" => name).set(cap as f64);
        Arc::new(ConnTable {
            name,
            cap,
            limits,
            epoch: Instant::now(),
            inner: Mutex::new(Inner::default()),
            freed: Notify::new(),
            open_gauge: metrics::gauge!(crate::instruments::HTTP_CONNECTIONS, "listener" => name),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain book-keeping behind: keep using it.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn len(&self) -> usize {
        self.lock().open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_full(&self) -> bool {
        self.len() >= self.cap
    }

    /// Registers a new connection.
    pub fn open(self: &Arc<Self>) -> Arc<Conn> {
        let now = self.now_ms();
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        let conn = Arc::new(Conn {
            id,
            table: Arc::clone(self),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            waiting_since: AtomicU64::new(now),
            head_started: AtomicU64::new(0),
            close: CancellationToken::new(),
            why: Mutex::new(Close::Ended),
        });
        inner.open.insert(id, Arc::clone(&conn));
        inner.waiting.insert((now, id));
        self.open_gauge.set(inner.open.len() as f64);
        conn
    }

    /// Forgets a connection that has ended.
    pub fn close(&self, conn: &Conn, why: Close) {
        let mut inner = self.lock();
        inner.open.remove(&conn.id);
        inner.waiting.remove(&(conn.waiting_since.load(Ordering::SeqCst), conn.id));
        self.open_gauge.set(inner.open.len() as f64);
        drop(inner);
        if why != Close::Ended {
            metrics::counter!(crate::instruments::HTTP_CONNECTIONS_CLOSED, "listener" => self.name, "reason" => why.as_str()).increment(1);
        }
        self.freed.notify_one();
    }

    /// At the cap: closes the connection that has waited longest with no request in flight.
    /// False when every connection is busy (or has only just connected).
    pub fn make_room(&self) -> bool {
        metrics::counter!(crate::instruments::HTTP_CONNECTION_LIMIT_REACHED, "listener" => self.name).increment(1);
        let now = self.now_ms();
        let min_idle = u64::try_from(MIN_IDLE_TO_EVICT.as_millis()).unwrap_or(250);
        let mut inner = self.lock();
        let victim = inner.waiting.first().copied().filter(|(since, _)| now.saturating_sub(*since) >= min_idle);
        let evicted = victim.and_then(|key| {
            inner.waiting.remove(&key);
            inner.open.remove(&key.1)
        });
        let open = inner.open.len();
        self.open_gauge.set(open as f64);
        let warn = inner.last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if warn {
            inner.last_warning = Some(Instant::now());
        }
        let suppressed = std::mem::take(&mut inner.suppressed);
        if !warn {
            inner.suppressed = suppressed + 1;
        }
        drop(inner);
        if warn {
            tracing::warn!(
                listener = self.name,
                open,
                max_connections = self.cap,
                evicted_idle = evicted.is_some(),
                since_last_warning = suppressed,
                "connection limit reached; closing the longest-idle connection, or pausing accepts while all are busy"
            );
        }
        match evicted {
            Some(conn) => {
                // Counted by `close` when its task ends.
                conn.shut(Close::Evicted);
                true
            }
            None => false,
        }
    }

    /// Resolves when a connection ended or a request finished.
    pub async fn freed(&self) {
        self.freed.notified().await;
    }

    pub fn accept_failed(&self, e: &io::Error) {
        metrics::counter!(crate::instruments::HTTP_ACCEPT_ERRORS, "listener" => self.name).increment(1);
        let mut inner = self.lock();
        let warn = inner.last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if warn {
            inner.last_warning = Some(Instant::now());
            drop(inner);
            tracing::warn!(listener = self.name, error = %e, "cannot accept connections; backing off");
        }
    }
}

/// The pause after an accept that failed for want of descriptors or memory, so an accept loop
/// does not spin: 5 ms, doubling up to 1 s, and 5 ms again after an accept that worked.
#[derive(Debug)]
pub struct AcceptBackoff(std::time::Duration);

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff(AcceptBackoff::FIRST)
    }
}

impl AcceptBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(5);
    const MOST: std::time::Duration = std::time::Duration::from_secs(1);

    pub fn accepted(&mut self) {
        self.0 = AcceptBackoff::FIRST;
    }

    /// Waits when `e` is a resource error (see [`is_resource_error`]); other errors concern one
    /// connection only and are passed at once.
    pub async fn failed(&mut self, e: &io::Error) {
        if is_resource_error(e) {
            tokio::time::sleep(self.0).await;
            self.0 = (self.0 * 2).min(AcceptBackoff::MOST);
        }
    }
}

/// True for accept errors that mean the process or the system is out of something.
pub fn is_resource_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == libc_codes::EMFILE || code == libc_codes::ENFILE || code == libc_codes::ENOBUFS || code == libc_codes::ENOMEM)
}

mod libc_codes {
    pub const EMFILE: i32 = nix::errno::Errno::EMFILE as i32;
    pub const ENFILE: i32 = nix::errno::Errno::ENFILE as i32;
    pub const ENOBUFS: i32 = nix::errno::Errno::ENOBUFS as i32;
    pub const ENOMEM: i32 = nix::errno::Errno::ENOMEM as i32;
}

/// Raises the soft file-descriptor limit to the hard one (as Go and nginx's
/// `worker_rlimit_nofile` do) and returns the limit now in force.
pub fn raise_file_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// The watchdog of one connection: resolves with the reason when the server must close it.
pub struct Watch {
    conn: Arc<Conn>,
}

impl Watch {
    pub async fn closed(&self) -> Close {
        loop {
            let now = self.conn.table.now_ms();
            let next = match self.conn.check(now) {
                Ok(next) => next,
                Err(why) => {
                    self.conn.shut(why);
                    return why;
                }
            };
            tokio::select! {
                _ = self.conn.close.cancelled() => {
                    return self.conn.why.lock().map(|w| *w).unwrap_or(Close::Evicted);
                }
                _ = tokio::time::sleep(Duration::from_millis(next.saturating_sub(now).max(1))) => {}
            }
        }
    }
}

/// The socket (plain TCP, or TLS over it), with reads reported to the connection's
/// book-keeping, and its watchdog.
pub fn watched<IO>(tcp: IO, conn: Arc<Conn>) -> (Watched<IO>, Watch) {
    (Watched { tcp, conn: Arc::clone(&conn) }, Watch { conn })
}

pub struct Watched<IO = TcpStream> {
    tcp: IO,
    conn: Arc<Conn>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.bytes_read(&buf.filled()[before..]);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}
