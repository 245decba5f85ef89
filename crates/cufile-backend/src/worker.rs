//! A small pool of I/O threads fed from one queue. Each thread makes the backend's CUDA
//! context current before every job (cheap when it already is). Threads sleep on a condition
//! variable while the queue is empty; dropping the pool cancels the jobs that have not
//! started, lets running ones finish, and joins the threads.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{JoinHandle, ThreadId};

use spillway_runtime::{Error, Result};

/// How a job is started.
#[derive(Debug)]
pub(crate) enum Start {
    /// Do the work.
    Run,
    /// Don't: the pool is shutting down.
    Cancelled,
    /// Don't: the thread could not be prepared (the CUDA context could not be made current).
    Failed(String),
}

/// One unit of work. It must settle whatever it stands for in every [`Start`] case.
pub(crate) type Job = Box<dyn FnOnce(Start) + Send + 'static>;

/// Prepares the calling thread before a job (binds the CUDA context).
pub(crate) type Prepare = Arc<dyn Fn() -> std::result::Result<(), String> + Send + Sync>;

struct Queue {
    jobs: VecDeque<Job>,
    stopping: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// The I/O threads.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    ids: Vec<ThreadId>,
}

impl Pool {
    /// Starts `n` threads named `{name}-{i}`.
    pub fn new(n: usize, name: &str, prepare: Prepare) -> Result<Pool> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                stopping: false,
            }),
            ready: Condvar::new(),
        });
        let mut pool = Pool {
            shared: shared.clone(),
            threads: Mutex::new(Vec::with_capacity(n)),
            ids: Vec::with_capacity(n),
        };
        for i in 0..n {
            let shared = shared.clone();
            let prepare = prepare.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker(&shared, &*prepare))
                .map_err(|e| Error::io("starting a cufile I/O thread", e))?;
            pool.ids.push(handle.thread().id());
            pool.threads
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .push(handle);
        }
        Ok(pool)
    }

    /// Queues jobs (cancelled at once if the pool is shutting down).
    pub fn submit(&self, jobs: impl IntoIterator<Item = Job>) {
        let mut q = self.lock();
        if q.stopping {
            drop(q);
            jobs.into_iter().for_each(|j| run_job(j, Start::Cancelled));
            return;
        }
        let before = q.jobs.len();
        q.jobs.extend(jobs);
        let added = q.jobs.len() - before;
        drop(q);
        if added == 1 {
            self.shared.ready.notify_one();
        } else if added > 1 {
            self.shared.ready.notify_all();
        }
    }

    /// Jobs queued and not yet started.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Cancels queued jobs, waits for running ones and joins the threads. Idempotent. A
    /// pool thread shutting its own pool down is not joined (it finishes on its own).
    pub fn shutdown(&self) {
        let cancelled: Vec<Job> = {
            let mut q = self.lock();
            q.stopping = true;
            q.jobs.drain(..).collect()
        };
        self.shared.ready.notify_all();
        cancelled.into_iter().for_each(|j| run_job(j, Start::Cancelled));
        let me = std::thread::current().id();
        let threads: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }

    /// Whether the calling thread is one of the pool's.
    pub fn is_pool_thread(&self) -> bool {
        self.ids.contains(&std::thread::current().id())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn worker(shared: &Shared, prepare: &(dyn Fn() -> std::result::Result<(), String> + Send + Sync)) {
    loop {
        let job = {
            let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if q.stopping {
                    let rest: Vec<Job> = q.jobs.drain(..).collect();
                    drop(q);
                    rest.into_iter().for_each(|j| run_job(j, Start::Cancelled));
                    return;
                }
                if let Some(j) = q.jobs.pop_front() {
                    break j;
                }
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let start = match catch_unwind(AssertUnwindSafe(prepare)) {
            Ok(Ok(())) => Start::Run,
            Ok(Err(e)) => Start::Failed(e),
            Err(_) => Start::Failed("preparing the I/O thread panicked".into()),
        };
        run_job(job, start);
    }
}

/// Runs a job, containing a panic (the job's own guards settle what it stood for).
fn run_job(job: Job, start: Start) {
    if catch_unwind(AssertUnwindSafe(move || job(start))).is_err() {
        tracing::error!("a cufile I/O job panicked; its request fails");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    fn ok_prepare() -> Prepare {
        Arc::new(|| Ok(()))
    }

    #[test]
    fn jobs_run_on_the_pool_threads() {
        let pool = Pool::new(3, "t", ok_prepare()).unwrap();
        let (tx, rx) = mpsc::channel();
        let jobs: Vec<Job> = (0..20)
            .map(|i| {
                let tx = tx.clone();
                Box::new(move |s: Start| {
                    assert!(matches!(s, Start::Run));
                    let name = std::thread::current().name().unwrap().to_string();
                    tx.send((i, name)).unwrap();
                }) as Job
            })
            .collect();
        pool.submit(jobs);
        let mut got: Vec<(i32, String)> = (0..20)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        got.sort();
        assert_eq!(got.len(), 20);
        assert!(got.iter().all(|(_, n)| n.starts_with("t-")));
    }

    #[test]
    fn dropping_the_pool_cancels_queued_jobs_without_hanging() {
        let pool = Pool::new(1, "t", ok_prepare()).unwrap();
        let (block_tx, block_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let ran = Arc::new(AtomicUsize::new(0));
        let cancelled = Arc::new(AtomicUsize::new(0));
        pool.submit([Box::new(move |_s: Start| {
            started_tx.send(()).unwrap();
            let _ = block_rx.recv_timeout(Duration::from_secs(10));
        }) as Job]);
        started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let jobs: Vec<Job> = (0..5)
            .map(|_| {
                let (ran, cancelled) = (ran.clone(), cancelled.clone());
                Box::new(move |s: Start| match s {
                    Start::Run => {
                        ran.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        cancelled.fetch_add(1, Ordering::SeqCst);
                    }
                }) as Job
            })
            .collect();
        pool.submit(jobs);
        assert_eq!(pool.queued(), 5);
        let unblock = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            block_tx.send(()).unwrap();
        });
        drop(pool);
        unblock.join().unwrap();
        assert_eq!(cancelled.load(Ordering::SeqCst), 5);
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_failed_preparation_is_passed_to_the_job_and_a_panic_is_contained() {
        let pool = Pool::new(1, "t", Arc::new(|| Err("no context".to_string()))).unwrap();
        let (tx, rx) = mpsc::channel();
        let tx2 = tx.clone();
        pool.submit([
            Box::new(|_s: Start| panic!("boom")) as Job,
            Box::new(move |s: Start| tx2.send(format!("{s:?}")).unwrap()) as Job,
        ]);
        let got = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(got.contains("no context"), "{got}");
        drop(tx);
    }

    #[test]
    fn jobs_submitted_after_shutdown_are_cancelled() {
        let pool = Pool::new(2, "t", ok_prepare()).unwrap();
        pool.shutdown();
        let (tx, rx) = mpsc::channel();
        pool.submit([Box::new(move |s: Start| tx.send(matches!(s, Start::Cancelled)).unwrap()) as Job]);
        assert!(rx.recv_timeout(Duration::from_secs(1)).unwrap());
    }
}
