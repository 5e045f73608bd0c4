//! The bounded CPU pool for pixel work.
//!
//! A fixed set of OS threads takes jobs from a bounded queue. Pixel work never runs on the tokio
//! reactor, and at most `capacity` calls wait or run at once: past that the worker answers
//! `unavailable` at once instead of queueing without bound, so the caller can go elsewhere.
//! (We write this instead of using `spawn_blocking`, whose pool grows to hundreds of threads,
//! because one long-lived thread per core is what lets per-thread buffers be reused.)

use std::sync::Arc;
use std::sync::mpsc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

type Task = Box<dyn FnOnce() + Send + 'static>;

#[derive(Clone)]
pub struct CpuPool {
    sender: mpsc::SyncSender<Task>,
    admission: Arc<Semaphore>,
    capacity: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("worker is at capacity ({0} calls in flight)")]
    Full(usize),
    #[error("worker pool is shutting down")]
    Closed,
}

impl CpuPool {
    pub fn new(threads: usize, capacity: usize) -> std::io::Result<CpuPool> {
        let threads = threads.max(1);
        let capacity = capacity.max(threads);
        let (sender, receiver) = mpsc::sync_channel::<Task>(capacity);
        let receiver = Arc::new(std::sync::Mutex::new(receiver));
        for i in 0..threads {
            let receiver = Arc::clone(&receiver);
            std::thread::Builder::new().name(format!("pixmesh-cpu-{i}")).spawn(move || {
                loop {
                    let task = {
                        let guard = receiver.lock().unwrap_or_else(|p| p.into_inner());
                        guard.recv()
                    };
                    match task {
                        Ok(task) => task(),
                        Err(_) => return,
                    }
                }
            })?;
        }
        Ok(CpuPool { sender, admission: Arc::new(Semaphore::new(capacity)), capacity })
    }

    /// Calls in flight (running or queued).
    pub fn in_flight(&self) -> usize {
        self.capacity - self.admission.available_permits()
    }

    /// Runs `f` on a pool thread and returns its result; fails fast when the pool is full.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let permit: OwnedSemaphorePermit = Arc::clone(&self.admission).try_acquire_owned().map_err(|_| PoolError::Full(self.capacity()))?;
        let (tx, rx) = oneshot::channel();
        let task: Task = Box::new(move || {
            let out = f();
            drop(permit);
            let _ = tx.send(out);
        });
        self.sender.try_send(task).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => PoolError::Full(self.capacity()),
            mpsc::TrySendError::Disconnected(_) => PoolError::Closed,
        })?;
        rx.await.map_err(|_| PoolError::Closed)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
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
}
