//! The thread that completes delayed tickets: one queue ordered by deadline, one thread
//! sleeping until the earliest deadline. Nobody else waits on it: a request is scheduled
//! from the inner backend's completion (or at submission, for an injected error) and the
//! submitting thread never blocks.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Instant;

use crate::backend::Completer;
use crate::error::{Error, Result};

/// A completion waiting for its deadline.
struct Entry {
    deadline: Instant,
    /// Order of scheduling: entries with the same deadline complete in that order.
    seq: u64,
    done: Completer,
    result: Result<usize>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed, so that the std max-heap pops the earliest deadline first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.deadline, other.seq).cmp(&(self.deadline, self.seq))
    }
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Entry>,
    next_seq: u64,
    shut_down: bool,
}

/// The side of the timer that schedules: shared with the completion callbacks of the inner
/// backend's tickets, which may run after the wrapper is gone.
#[derive(Default)]
pub(super) struct TimerShared {
    queue: Mutex<Queue>,
    changed: Condvar,
    /// Set by the thread as it leaves its loop, for the tests.
    #[cfg(test)]
    pub(super) ended: std::sync::atomic::AtomicBool,
}

impl TimerShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Completes `done` with `result` at `deadline`, or at once when the timer has shut
    /// down (the wrapper was dropped): a delay never outlives the wrapper.
    pub(super) fn schedule(&self, deadline: Instant, done: Completer, result: Result<usize>) {
        let mut queue = self.lock();
        if queue.shut_down {
            drop(queue);
            done.complete(result);
            return;
        }
        let seq = queue.next_seq;
        queue.next_seq += 1;
        let earliest = queue.heap.peek().is_none_or(|e| deadline < e.deadline);
        queue.heap.push(Entry {
            deadline,
            seq,
            done,
            result,
        });
        drop(queue);
        if earliest {
            self.changed.notify_one();
        }
    }

    /// The thread's loop: completes entries as their deadlines pass (outside the lock,
    /// since completing runs the ticket's waker); on shutdown completes every entry left.
    fn run(&self) {
        let mut queue = self.lock();
        loop {
            let now = Instant::now();
            let mut due = Vec::new();
            while queue
                .heap
                .peek()
                .is_some_and(|e| queue.shut_down || e.deadline <= now)
            {
                due.push(queue.heap.pop().expect("peeked"));
            }
            if !due.is_empty() {
                drop(queue);
                for e in due {
                    e.done.complete(e.result);
                }
                queue = self.lock();
                continue;
            }
            if queue.shut_down {
                return;
            }
            queue = match queue.heap.peek().map(|e| e.deadline) {
                Some(deadline) => {
                    self.changed
                        .wait_timeout(queue, deadline.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.changed.wait(queue).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// The timer thread and its queue. Dropping it completes every delayed ticket at once
/// (with the result it was going to have) and joins the thread.
pub(super) struct Timer {
    pub(super) shared: Arc<TimerShared>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Timer {
    /// Starts the thread.
    pub(super) fn start() -> Result<Timer> {
        let shared = Arc::new(TimerShared::default());
        let thread = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("spillway-faults".into())
                .spawn(move || {
                    shared.run();
                    #[cfg(test)]
                    shared.ended.store(true, std::sync::atomic::Ordering::SeqCst);
                })
                .map_err(|e| Error::io("starting the fault injector's timer thread", e))?
        };
        Ok(Timer {
            shared,
            thread: Some(thread),
        })
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.shared.lock().shut_down = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            // A ticket's waker, run by the timer thread, may drop the last handle on the
            // wrapper: that thread cannot join itself, and leaves its loop once the
            // wakers it is running return, since the queue is marked shut down.
            if t.thread().id() != thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ticket;
    use std::time::Duration;

    #[test]
    fn faults_timer_completes_in_deadline_order_and_everything_on_drop() {
        let timer = Timer::start().unwrap();
        let now = Instant::now();
        let (late, late_done) = ticket();
        let (soon, soon_done) = ticket();
        // Scheduled late first: the earlier deadline must wake the thread anyway.
        timer
            .shared
            .schedule(now + Duration::from_secs(3600), late_done, Ok(1));
        timer
            .shared
            .schedule(now + Duration::from_millis(1), soon_done, Ok(2));
        assert_eq!(soon.wait().unwrap(), 2);
        assert!(!late.is_done(), "an hour has not passed");
        let weak = Arc::downgrade(&timer.shared);
        drop(timer);
        assert_eq!(
            late.wait().unwrap(),
            1,
            "dropping the timer completes what it held"
        );
        assert!(
            weak.upgrade().is_none(),
            "the thread has ended and let go of the queue"
        );
    }

    #[test]
    fn faults_timer_completes_at_once_after_shutdown() {
        let timer = Timer::start().unwrap();
        let shared = timer.shared.clone();
        drop(timer);
        let (t, done) = ticket();
        shared.schedule(Instant::now() + Duration::from_secs(3600), done, Ok(5));
        assert_eq!(t.wait().unwrap(), 5);
    }
}
