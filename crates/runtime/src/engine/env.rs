//! [`Env`]: what the engine's state works with — its settings, the device and its two
//! streams, the backend and the paths of its targets, the threads that wait for device
//! events, the channel to the progress thread, and where statistics and the timeline are
//! recorded — and [`Msg`], what those threads and storage completions tell the progress
//! thread.
//!
//! Invariant: all of it is fixed when the engine starts. Nothing here is bookkeeping:
//! every field is a setting or a shared handle, and the state's methods only read it
//! (`&Env`), so the other parts can be changed while it is borrowed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Backend, IoOp, TargetId};
use crate::device::{Device, Event, Stream};
use crate::error::Result;

use super::config::EngineConfig;
use super::pending::PendingIo;
use super::stats::{Op, Stats};
use super::timeline::{Timeline, Track};
use super::waiter::Waiter;

/// Messages to the progress thread.
pub(crate) enum Msg {
    /// A write of the group completed.
    WriteIo(u64),
    /// A prefetch read of the group completed.
    ReadIo(u64),
    /// The offload stream has packed the group (or its producers are done): submit writes.
    Prepared(u64, Result<()>),
    /// The checksums of a prefetched extent's bytes have been computed: check them.
    Verified(u64, Result<()>),
    /// The read of a slot (by id) completed.
    SlotIo(u64),
    /// The checksums of a slot's bytes have been computed: check them.
    SlotVerified(u64, Result<()>),
    /// A fence event completed: deferred frees may proceed.
    Fence,
    /// A packed extent was opened: the progress thread must time its flush.
    Wake,
    /// Stop the progress thread.
    Shutdown,
}

/// The settings and shared resources of the engine, fixed when it starts.
pub(crate) struct Env {
    pub(crate) cfg: EngineConfig,
    pub(crate) device: Arc<dyn Device>,
    pub(crate) backend: Arc<dyn Backend>,
    /// The path of each storage target, for errors.
    pub(crate) paths: HashMap<TargetId, Arc<Path>>,
    pub(crate) offload_stream: Arc<dyn Stream>,
    pub(crate) fetch_stream: Arc<dyn Stream>,
    pub(crate) offload_waiter: Waiter,
    pub(crate) fetch_waiter: Waiter,
    pub(crate) tx: Sender<Msg>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) timeline: Arc<Timeline>,
}

impl Env {
    /// The path of a storage target, for errors.
    pub(crate) fn path(&self, target: TargetId) -> Arc<Path> {
        self.paths
            .get(&target)
            .cloned()
            .unwrap_or_else(|| Arc::from(Path::new(&format!("<target {}>", target.0))))
    }

    /// Has the progress thread told (a [`Msg::WriteIo`] or [`Msg::ReadIo`] for `gid`) when
    /// `io` completes.
    pub(crate) fn notify_on_complete(&self, io: &PendingIo, gid: u64, op: IoOp) {
        self.tell_on_complete(io, move || match op {
            IoOp::Write => Msg::WriteIo(gid),
            IoOp::Read => Msg::ReadIo(gid),
        });
    }

    /// Has the progress thread told `msg()` when `io` completes.
    pub(crate) fn tell_on_complete(&self, io: &PendingIo, msg: impl FnOnce() -> Msg + Send + 'static) {
        let tx = self.tx.clone();
        io.on_complete(move || {
            let _ = tx.send(msg());
        });
    }

    /// Counts a read ahead into staging (an extent or a slot) of `len` bytes that took
    /// `took`, and puts it on the timeline as `what`.
    pub(crate) fn record_read_ahead(&self, what: &'static str, len: u64, took: Duration) {
        Stats::add(&self.stats.c.bytes_read, len);
        Stats::add(&self.stats.c.read_ns, took.as_nanos() as u64);
        self.stats.record(Op::Read, took);
        let now = Instant::now();
        self.timeline.record(Track::Read, what, now - took, now, len);
    }

    /// Has `waiter` send the progress thread `msg` of the outcome once `event` has
    /// completed.
    pub(crate) fn tell_after(
        &self,
        waiter: &Waiter,
        event: Arc<dyn Event>,
        msg: impl FnOnce(Result<()>) -> Msg + Send + 'static,
    ) {
        let tx = self.tx.clone();
        waiter.after(event, move |r| {
            let _ = tx.send(msg(r));
        });
    }
}
