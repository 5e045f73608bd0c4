//! The bounded CPU pool for pixel work.
//!
//! A fixed set of OS threads takes jobs from a bounded queue. Pixel work never runs on the tokio
//! reactor, and at most `capacity` calls wait or run at once: past that the worker answers
//! `unavailable` at once instead of queueing without bound, so the caller can go elsewhere.
//! (We write this instead of using `spawn_blocking`, whose pool grows to hundreds of threads,
//! because one long-lived thread per core is what lets per-thread buffers be reused.)
//!
//! A job that panics (a decoder bug met by one input) is contained: the panic is caught around
//! that job alone, its inputs are dropped, its caller gets [`PoolError::Panicked`], and the
//! thread goes on with the next job. Should a thread die anyway (a panic outside the job, e.g.
//! while dropping its result), a new one takes its place, so the pool keeps its size.
//! `pixmesh_worker_panics_total` counts the panics, `pixmesh_worker_pool_threads` the threads.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

type Task = Box<dyn FnOnce() + Send + 'static>;

#[derive(Clone)]
pub struct CpuPool {
    sender: mpsc::SyncSender<Task>,
    admission: Arc<Semaphore>,
    capacity: usize,
    threads: Arc<Threads>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("worker is at capacity ({0} calls in flight)")]
    Full(usize),
    #[error("worker pool is shutting down")]
    Closed,
    /// The job panicked; the message is the panic's, for the log (not for clients).
    #[error("the job panicked: {0}")]
    Panicked(String),
}

/// What the pool's threads share: the queue's receiving end and the count of live threads.
struct Threads {
    receiver: Mutex<mpsc::Receiver<Task>>,
    live: AtomicUsize,
    /// Names new threads (`pixmesh-cpu-N`), replacements included.
    next_index: AtomicUsize,
}

impl Threads {
    /// Starts one pool thread.
    fn spawn(self: &Arc<Self>) -> std::io::Result<()> {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(self);
        let now = self.live.fetch_add(1, Ordering::SeqCst) + 1;
        metrics::gauge!(crate::instruments::POOL_THREADS).set(now as f64);
        let spawned = std::thread::Builder::new().name(format!("pixmesh-cpu-{index}")).spawn(move || {
            let _sentinel = Sentinel(Arc::clone(&shared));
            loop {
                let task = {
                    let guard = shared.receiver.lock().unwrap_or_else(|p| p.into_inner());
                    guard.recv()
                };
                match task {
                    Ok(task) => task(),
                    // Every sender is gone: the pool was dropped.
                    Err(_) => return,
                }
            }
        });
        if let Err(e) = spawned {
            let now = self.live.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
            metrics::gauge!(crate::instruments::POOL_THREADS).set(now as f64);
            return Err(e);
        }
        Ok(())
    }

    fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
}

/// Lives on a pool thread's stack: when the thread ends it is counted out, and when it ends by
/// a panic, a replacement is started.
struct Sentinel(Arc<Threads>);

impl Drop for Sentinel {
    fn drop(&mut self) {
        let now = self.0.live.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        metrics::gauge!(crate::instruments::POOL_THREADS).set(now as f64);
        if std::thread::panicking() {
            metrics::counter!(crate::instruments::PANICS).increment(1);
            let name = std::thread::current().name().unwrap_or("pixmesh-cpu").to_string();
            match self.0.spawn() {
                Ok(()) => tracing::error!(thread = %name, "a pool thread died from a panic; a new one took its place"),
                Err(e) => tracing::error!(thread = %name, error = %e, "a pool thread died from a panic and could not be replaced"),
            }
        }
    }
}

/// The message of a panic payload (`panic!` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

impl CpuPool {
    pub fn new(threads: usize, capacity: usize) -> std::io::Result<CpuPool> {
        let threads = threads.max(1);
        let capacity = capacity.max(threads);
        let (sender, receiver) = mpsc::sync_channel::<Task>(capacity);
        let shared = Arc::new(Threads { receiver: Mutex::new(receiver), live: AtomicUsize::new(0), next_index: AtomicUsize::new(0) });
        // Shown from the start, at 0, so that an alert on it needs no `absent()`.
        metrics::counter!(crate::instruments::PANICS).increment(0);
        for _ in 0..threads {
            shared.spawn()?;
        }
        Ok(CpuPool { sender, admission: Arc::new(Semaphore::new(capacity)), capacity, threads: shared })
    }

    /// Calls in flight (running or queued).
    pub fn in_flight(&self) -> usize {
        self.capacity - self.admission.available_permits()
    }

    /// Runs `f` on a pool thread and returns its result; fails fast when the pool is full.
    /// A panic in `f` is caught and returned as [`PoolError::Panicked`]; the thread lives on.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let permit: OwnedSemaphorePermit = Arc::clone(&self.admission).try_acquire_owned().map_err(|_| PoolError::Full(self.capacity()))?;
        self.submit(permit, f).await
    }

    /// As [`CpuPool::run`], but waits for a slot instead of failing when the pool is full. For
    /// calls already bounded by another admission (the calls with URLs, see `Transfer::admit`),
    /// so the wait is bounded too.
    pub async fn run_queued<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let permit: OwnedSemaphorePermit = Arc::clone(&self.admission).acquire_owned().await.map_err(|_| PoolError::Closed)?;
        self.submit(permit, f).await
    }

    async fn submit<T, F>(&self, permit: OwnedSemaphorePermit, f: F) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let task: Task = Box::new(move || {
            // AssertUnwindSafe: nothing `f` touched is looked at after a panic. It owns its
            // inputs, which unwinding drops; its result is replaced by the error.
            let out = catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
                metrics::counter!(crate::instruments::PANICS).increment(1);
                PoolError::Panicked(panic_message(payload.as_ref()))
            });
            drop(permit);
            let _ = tx.send(out);
        });
        self.sender.try_send(task).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => PoolError::Full(self.capacity()),
            mpsc::TrySendError::Disconnected(_) => PoolError::Closed,
        })?;
        rx.await.map_err(|_| PoolError::Closed)?
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Pool threads alive now.
    pub fn threads(&self) -> usize {
        self.threads.live()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn runs_off_the_reactor_and_refuses_when_full() {
        let pool = CpuPool::new(1, 2).unwrap();
        let name = pool.run(|| std::thread::current().name().map(str::to_string)).await.unwrap();
        assert_eq!(name.as_deref(), Some("pixmesh-cpu-0"));

        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        let mut running = Vec::new();
        for _ in 0..2 {
            let rx = Arc::clone(&release_rx);
            let p = pool.clone();
            running.push(tokio::spawn(async move { p.run(move || rx.lock().unwrap().recv_timeout(Duration::from_secs(5)).is_ok()).await }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(pool.run(|| ()).await, Err(PoolError::Full(_))));
        for _ in 0..2 {
            release_tx.send(()).unwrap();
        }
        for r in running {
            assert_eq!(r.await.unwrap(), Ok(true));
        }
        assert!(pool.run(|| 1).await.is_ok());
    }

    #[tokio::test]
    async fn a_queued_run_waits_for_a_slot_instead_of_failing() {
        let pool = CpuPool::new(1, 1).unwrap();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let p = pool.clone();
        let busy = tokio::spawn(async move { p.run(move || release_rx.recv_timeout(Duration::from_secs(5)).is_ok()).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(pool.run(|| ()).await, Err(PoolError::Full(_))), "the plain run fails fast");
        let p = pool.clone();
        let queued = tokio::spawn(async move { p.run_queued(|| 7).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!queued.is_finished(), "the queued run waits while the slot is taken");
        release_tx.send(()).unwrap();
        assert_eq!(busy.await.unwrap(), Ok(true));
        assert_eq!(queued.await.unwrap(), Ok(7));
        assert_eq!(pool.in_flight(), 0);
    }

    /// Dropped on a pool thread.
    struct DropRecorder(Arc<AtomicUsize>);

    impl Drop for DropRecorder {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone_and_the_pool_keeps_its_threads() {
        let pool = CpuPool::new(2, 4).unwrap();
        let dropped = Arc::new(AtomicUsize::new(0));
        // More panics than threads: without containment the pool would be empty after two.
        for i in 0..5 {
            let input = DropRecorder(Arc::clone(&dropped));
            let err = pool
                .run(move || -> u32 {
                    let _owned = &input;
                    panic!("decoder bug {i}")
                })
                .await
                .unwrap_err();
            assert_eq!(err, PoolError::Panicked(format!("decoder bug {i}")));
        }
        assert_eq!(dropped.load(Ordering::SeqCst), 5, "the inputs of the panicked jobs were dropped");
        assert_eq!(pool.threads(), 2);
        assert_eq!(pool.in_flight(), 0, "the panicked jobs gave their slots back");
        // Every thread still takes work: two jobs that each wait for the other to start.
        let arrived = Arc::new(AtomicUsize::new(0));
        let both: Vec<_> = (0..2)
            .map(|_| {
                let arrived = Arc::clone(&arrived);
                let p = pool.clone();
                tokio::spawn(async move {
                    p.run(move || {
                        arrived.fetch_add(1, Ordering::SeqCst);
                        let deadline = std::time::Instant::now() + Duration::from_secs(10);
                        while arrived.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        arrived.load(Ordering::SeqCst)
                    })
                    .await
                })
            })
            .collect();
        for r in both {
            assert_eq!(r.await.unwrap(), Ok(2), "both threads ran at once");
        }
    }

    /// A result whose drop panics, after the job itself returned: the thread dies outside
    /// the job's containment.
    struct PanicsOnDrop;

    impl Drop for PanicsOnDrop {
        fn drop(&mut self) {
            panic!("panic while dropping");
        }
    }

    #[tokio::test]
    async fn a_thread_that_dies_anyway_is_replaced() {
        let pool = CpuPool::new(1, 2).unwrap();
        // The caller gives up on the answer, so the result is dropped on the pool thread when
        // the send fails: that panic is outside `catch_unwind`.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let call = {
            let p = pool.clone();
            tokio::spawn(async move {
                p.run(move || {
                    let _ = rx.recv_timeout(Duration::from_secs(5));
                    PanicsOnDrop
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        call.abort();
        let _ = call.await;
        tx.send(()).unwrap();
        // The old thread takes nothing after its job: the next one goes to its replacement.
        let name = pool.run(|| std::thread::current().name().map(str::to_string)).await.unwrap();
        assert_eq!(name.as_deref(), Some("pixmesh-cpu-1"));
        assert_eq!(pool.threads(), 1);
    }
}
