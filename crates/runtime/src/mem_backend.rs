//! [`MemBackend`]: a [`Backend`] whose targets are byte arrays in host memory, completing
//! on a worker thread like a real backend, with faults that can be switched on. It lets
//! the engine's tests (and property tests) run fast and without a disk, and check what
//! went to "storage" byte for byte.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::backend::{
    ticket, Backend, BackendInfo, Completer, IoOp, IoRequest, TargetId, TargetInfo, Ticket,
};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::memory::MemRef;
use crate::target::Target;

/// Faults a [`MemBackend`] injects.
#[derive(Debug, Default)]
pub struct Faults {
    /// Writes still allowed to succeed before every later one fails (`u64::MAX`: never fail).
    pub writes_left: AtomicU64,
    /// Reads still allowed to succeed before every later one fails.
    pub reads_left: AtomicU64,
    /// Submissions still accepted before every later one is refused at once.
    pub submits_left: AtomicU64,
    /// Delay before each completion, in microseconds.
    pub delay_us: AtomicU64,
    /// While closed, no request is carried out: for tests that need I/O in flight for
    /// as long as they look, whatever the machine's load.
    pub gate: Gate,
}

/// A gate requests wait at; open unless closed.
#[derive(Debug, Default)]
pub struct Gate {
    closed: Mutex<bool>,
    changed: std::sync::Condvar,
}

impl Gate {
    /// Holds every request not yet carried out until [`Gate::open`].
    pub fn close(&self) {
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Lets requests through again.
    pub fn open(&self) {
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.changed.notify_all();
    }

    fn pass(&self) {
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        while *closed {
            closed = self.changed.wait(closed).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Job {
    req: IoRequest,
    done: Completer,
}

// SAFETY: the submitter keeps the request's memory valid until the ticket completes
// (Backend::submit's contract); the job only carries the address.
unsafe impl Send for Job {}

#[derive(Default)]
struct Stores {
    next: u32,
    targets: HashMap<TargetId, (String, Vec<u8>)>,
}

/// A backend on host memory. Targets grow as they are written; a read past what was written
/// moves the bytes that were, and reports that count, as a read at the end of a file does.
pub struct MemBackend {
    stores: Arc<Mutex<Stores>>,
    faults: Arc<Faults>,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    worker: Mutex<Option<thread::JoinHandle<()>>>,
    /// Bytes written and read, for tests.
    pub written: Arc<AtomicU64>,
    /// Bytes read.
    pub read: Arc<AtomicU64>,
}

impl MemBackend {
    /// A backend moving data of `device` memory through host copies.
    pub fn new(device: Arc<dyn Device>) -> Result<Self> {
        let stores = Arc::new(Mutex::new(Stores::default()));
        let faults = Arc::new(Faults {
            writes_left: AtomicU64::new(u64::MAX),
            reads_left: AtomicU64::new(u64::MAX),
            submits_left: AtomicU64::new(u64::MAX),
            delay_us: AtomicU64::new(0),
            gate: Gate::default(),
        });
        let written = Arc::new(AtomicU64::new(0));
        let read = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel::<Job>();
        let worker = {
            let (stores, faults, written, read) =
                (stores.clone(), faults.clone(), written.clone(), read.clone());
            thread::Builder::new()
                .name("spillway-mem-backend".into())
                .spawn(move || {
                    for job in rx {
                        faults.gate.pass();
                        let delay = faults.delay_us.load(Ordering::Relaxed);
                        if delay > 0 {
                            thread::sleep(Duration::from_micros(delay));
                        }
                        let r = run(&stores, &faults, &*device, job.req);
                        if let Ok(n) = r {
                            let counter = if job.req.op == IoOp::Write {
                                &written
                            } else {
                                &read
                            };
                            counter.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        job.done.complete(r);
                    }
                })
                .map_err(|e| Error::io("starting the memory backend thread", e))?
        };
        Ok(MemBackend {
            stores,
            faults,
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
            written,
            read,
        })
    }

    /// The fault switches.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// A copy of `len` bytes of a target from `offset` (zeros where nothing was written).
    pub fn contents(&self, target: TargetId, offset: u64, len: usize) -> Vec<u8> {
        let stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = vec![0u8; len];
        if let Some((_, data)) = stores.targets.get(&target) {
            let start = (offset as usize).min(data.len());
            let end = (offset as usize + len).min(data.len());
            out[..end - start].copy_from_slice(&data[start..end]);
        }
        out
    }
}

fn run(stores: &Mutex<Stores>, faults: &Faults, device: &dyn Device, req: IoRequest) -> Result<usize> {
    let left = if req.op == IoOp::Write {
        &faults.writes_left
    } else {
        &faults.reads_left
    };
    if left
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_err()
    {
        return Err(Error::io(
            format!("injected {} failure at offset {}", req.op.as_str(), req.offset),
            std::io::Error::from_raw_os_error(libc::EIO),
        ));
    }
    let len = req.mem.len();
    let mut stores = stores.lock().unwrap_or_else(|e| e.into_inner());
    let (_, data) = stores
        .targets
        .get_mut(&req.target)
        .ok_or_else(|| Error::invalid(format!("target {:?} is not open", req.target)))?;
    let (start, end) = (req.offset as usize, req.offset as usize + len);
    match req.op {
        IoOp::Write => {
            if data.len() < end {
                data.resize(end, 0);
            }
            let dst = &mut data[start..end];
            match req.mem {
                // SAFETY: the submitter keeps the memory valid for len bytes (submit's contract).
                MemRef::Host { ptr, .. } => {
                    dst.copy_from_slice(unsafe { std::slice::from_raw_parts(ptr, len) })
                }
                // SAFETY: as above; dst is len bytes.
                MemRef::Device { ptr, .. } => unsafe {
                    device.copy_to_host_sync(dst.as_mut_ptr(), ptr, len)?
                },
            }
        }
        IoOp::Read => {
            // What was written of the range (nothing past the end).
            let moved = data.len().saturating_sub(start).min(len);
            if moved == 0 {
                return Ok(0);
            }
            let src = &data[start..start + moved];
            let len = moved;
            match req.mem {
                // SAFETY: the submitter keeps the memory valid and unaliased (submit's contract).
                MemRef::Host { ptr, .. } => {
                    unsafe { std::slice::from_raw_parts_mut(ptr, len) }.copy_from_slice(src)
                }
                // SAFETY: as above.
                MemRef::Device { ptr, .. } => unsafe { device.copy_from_host_sync(ptr, src.as_ptr(), len)? },
            }
            return Ok(len);
        }
    }
    Ok(len)
}

impl std::fmt::Debug for MemBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemBackend")
    }
}

impl Backend for MemBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "memory",
            host_staging: true,
            transfer_mode: None,
            details: Vec::new(),
        }
    }

    fn open(&self, target: &Target) -> Result<(TargetId, TargetInfo)> {
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        stores.next += 1;
        let id = TargetId(stores.next);
        stores
            .targets
            .insert(id, (target.path.display().to_string(), Vec::new()));
        Ok((
            id,
            TargetInfo {
                direct_io: false,
                offset_align: 1,
                size: 0,
                warning: None,
            },
        ))
    }

    unsafe fn submit(&self, req: IoRequest) -> Result<Ticket> {
        if self
            .faults
            .submits_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_err()
        {
            return Err(Error::Abandoned("injected submission failure".into()));
        }
        let (t, done) = ticket();
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.as_ref()
            .ok_or_else(|| Error::Abandoned("the memory backend has shut down".into()))?
            .send(Job { req, done })
            .map_err(|_| Error::Abandoned("the memory backend has shut down".into()))?;
        Ok(t)
    }

    fn flush(&self, _target: TargetId) -> Result<()> {
        Ok(())
    }

    fn close(&self, target: TargetId) -> Result<()> {
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        stores
            .targets
            .remove(&target)
            .map(|_| ())
            .ok_or_else(|| Error::invalid(format!("target {target:?} is not open")))
    }
}

impl Drop for MemBackend {
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
    }
}
