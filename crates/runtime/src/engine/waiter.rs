//! [`Waiter`]: a thread that waits for device events, in the order given, and runs a
//! continuation after each. The engine uses one per stream: events of one stream complete
//! in order, so waiting for them one after another loses nothing.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use crate::device::Event;
use crate::error::{Error, Result};

type Continuation = Box<dyn FnOnce(Result<()>) + Send>;

/// Waits for events on a thread of its own.
#[derive(Debug)]
pub(crate) struct Waiter {
    tx: Option<mpsc::Sender<(Arc<dyn Event>, Continuation)>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Waiter {
    /// Starts the thread, named `name`.
    pub(crate) fn new(name: &str) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<(Arc<dyn Event>, Continuation)>();
        let thread = thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for (event, then) in rx {
                    then(event.synchronize());
                }
            })
            .map_err(|e| Error::io(format!("starting the {name} thread"), e))?;
        Ok(Waiter {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Runs `then` with the outcome once `event` has completed.
    pub(crate) fn after(&self, event: Arc<dyn Event>, then: impl FnOnce(Result<()>) + Send + 'static) {
        let sent = self.tx.as_ref().map(|tx| tx.send((event, Box::new(then))));
        if !matches!(sent, Some(Ok(()))) {
            tracing::error!("the event waiter has stopped; a continuation was dropped");
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
