//! [`HostDevice`]: a [`Device`] whose "device memory" is ordinary host memory. Its streams
//! run copies asynchronously on a worker thread, so code that forgets to wait on an event
//! fails under it just as it would on a GPU. Used by tests and on machines with no GPU.

use std::any::Any;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use crate::device::{Device, DeviceInfo, DeviceKind, Event, HostRegistration, PendingChecksums, Stream};
use crate::error::{Error, Result};
use crate::memory::{AlignedBuf, DeviceBuffer, DevicePtr, PinnedBuffer};
use crate::pack::{self, PackPiece};
use crate::pattern;

/// Alignment of every host-device allocation.
const ALIGN: usize = 4096;

/// Host memory standing in for a GPU.
#[derive(Debug, Default, Clone)]
pub struct HostDevice;

impl HostDevice {
    /// A new host device.
    pub fn new() -> Self {
        HostDevice
    }
}

fn leak_aligned(len: usize) -> Result<(*mut u8, impl FnOnce() + Send + Sync + 'static)> {
    let buf = AlignedBuf::new(len, ALIGN)?;
    let ptr = buf.as_ptr();
    Ok((ptr, move || drop(buf)))
}

impl Device for HostDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            kind: DeviceKind::Host,
            ordinal: 0,
            name: "host memory".into(),
            total_memory: 0,
        }
    }

    fn alloc(&self, len: usize) -> Result<DeviceBuffer> {
        let (ptr, release) = leak_aligned(len)?;
        Ok(DeviceBuffer::from_raw(ptr as DevicePtr, len, release))
    }

    fn host_addressable(&self) -> bool {
        true
    }

    fn alloc_pinned(&self, len: usize) -> Result<PinnedBuffer> {
        let (ptr, release) = leak_aligned(len)?;
        // SAFETY: ptr is valid for len bytes until release drops the AlignedBuf.
        Ok(unsafe { PinnedBuffer::from_raw(ptr, len, release) })
    }

    unsafe fn register_host(&self, _ptr: *mut u8, _len: usize) -> Result<HostRegistration> {
        Ok(HostRegistration::new(|| {}))
    }

    fn create_stream(&self) -> Result<Arc<dyn Stream>> {
        Ok(Arc::new(HostStream::new()?))
    }

    fn fill_pattern(&self, dst: DevicePtr, len: usize, seed: u64, offset: u64) -> Result<()> {
        // SAFETY: for the host device a DevicePtr is a host address; the caller owns the
        // region (a DeviceBuffer of this device).
        let slice = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, len) };
        pattern::fill(slice, seed, offset);
        Ok(())
    }

    fn count_pattern_mismatches(&self, src: DevicePtr, len: usize, seed: u64, offset: u64) -> Result<u64> {
        // SAFETY: as in fill_pattern.
        let slice = unsafe { std::slice::from_raw_parts(src as *const u8, len) };
        Ok(pattern::count_mismatches(slice, seed, offset))
    }

    unsafe fn pack(
        &self,
        stream: &dyn Stream,
        extent: DevicePtr,
        extent_len: u64,
        pieces: &[PackPiece],
    ) -> Result<()> {
        pack::check_pack_layout(pieces, extent_len)?;
        let pieces = pieces.to_vec();
        host_stream(stream)?.run(move || {
            // SAFETY: the caller keeps the extent and the pieces live and disjoint until the
            // stream reaches this task (Device::pack's contract); the layout was checked.
            let extent = unsafe { std::slice::from_raw_parts_mut(extent as *mut u8, extent_len as usize) };
            // SAFETY: as above.
            if let Err(e) = unsafe { pack::pack_host(extent, &pieces) } {
                tracing::error!("host pack failed after its layout was checked: {e}");
            }
        })
    }

    unsafe fn unpack(
        &self,
        stream: &dyn Stream,
        extent: DevicePtr,
        extent_len: u64,
        pieces: &[PackPiece],
    ) -> Result<()> {
        pack::check_unpack_layout(pieces, extent_len)?;
        let pieces = pieces.to_vec();
        host_stream(stream)?.run(move || {
            // SAFETY: Device::unpack's contract, as in `pack`.
            let extent = unsafe { std::slice::from_raw_parts(extent as *const u8, extent_len as usize) };
            // SAFETY: as above.
            if let Err(e) = unsafe { pack::unpack_host(extent, &pieces) } {
                tracing::error!("host unpack failed after its layout was checked: {e}");
            }
        })
    }

    unsafe fn crc32c(&self, stream: &dyn Stream, pieces: &[(DevicePtr, u64)]) -> Result<PendingChecksums> {
        let stream = host_stream(stream)?;
        let pieces = pieces.to_vec();
        let sums = Arc::new(Mutex::new(Vec::new()));
        let out = sums.clone();
        stream.run(move || {
            let computed = pieces
                .iter()
                .map(|&(ptr, len)| {
                    // SAFETY: for the host device a DevicePtr is a host address; the caller
                    // keeps each piece live and unwritten until the stream reaches this task
                    // (Device::crc32c's contract).
                    crc32c::crc32c(unsafe { std::slice::from_raw_parts(ptr as *const u8, len as usize) })
                })
                .collect();
            *out.lock().unwrap_or_else(|e| e.into_inner()) = computed;
        })?;
        let done = stream.record()?;
        Ok(PendingChecksums::new(done, move || {
            Ok(std::mem::take(
                &mut *sums.lock().unwrap_or_else(|e| e.into_inner()),
            ))
        }))
    }
}

fn host_stream(stream: &dyn Stream) -> Result<&HostStream> {
    stream
        .as_any()
        .downcast_ref::<HostStream>()
        .ok_or_else(|| Error::invalid("the host device can only run work on its own streams"))
}

/// Completion state shared by a [`HostEvent`] and the stream worker.
#[derive(Debug, Default)]
struct Signal {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Signal {
    fn set(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }

    fn wait(&self) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            done = self.cv.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn is_set(&self) -> bool {
        *self.done.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Copy {
    dst: *mut u8,
    src: *const u8,
    len: usize,
}

// SAFETY: the submitter of the copy guarantees both regions stay valid until it has run
// (the contract of the unsafe Stream copy methods).
unsafe impl Send for Copy {}

enum Task {
    Copy(Copy),
    Run(Box<dyn FnOnce() + Send>),
    Signal(Arc<Signal>),
    Wait(Arc<Signal>),
}

/// A stream of the host device: a worker thread that runs its tasks in order.
#[derive(Debug)]
pub struct HostStream {
    tx: Mutex<Option<mpsc::Sender<Task>>>,
    worker: Mutex<Option<thread::JoinHandle<()>>>,
}

impl HostStream {
    fn new() -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Task>();
        let worker = thread::Builder::new()
            .name("spillway-host-stream".into())
            .spawn(move || {
                for task in rx {
                    match task {
                        // SAFETY: see `Copy`'s Send impl: the regions are valid and do not
                        // overlap (device copies never alias in the runtime).
                        Task::Copy(c) => unsafe { std::ptr::copy(c.src, c.dst, c.len) },
                        Task::Run(f) => f(),
                        Task::Signal(s) => s.set(),
                        Task::Wait(s) => s.wait(),
                    }
                }
            })
            .map_err(|e| Error::io("starting a host stream thread", e))?;
        Ok(HostStream {
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        })
    }

    fn push(&self, task: Task) -> Result<()> {
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .as_ref()
            .and_then(|tx| tx.send(task).ok())
            .ok_or_else(|| Error::Device("host stream is closed".into()))
    }

    fn copy(&self, dst: *mut u8, src: *const u8, len: usize) -> Result<()> {
        self.push(Task::Copy(Copy { dst, src, len }))
    }

    fn run(&self, f: impl FnOnce() + Send + 'static) -> Result<()> {
        self.push(Task::Run(Box::new(f)))
    }
}

impl Drop for HostStream {
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(worker) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = worker.join();
        }
    }
}

impl Stream for HostStream {
    unsafe fn copy_d2h(&self, dst: *mut u8, src: DevicePtr, len: usize) -> Result<()> {
        self.copy(dst, src as *const u8, len)
    }

    unsafe fn copy_h2d(&self, dst: DevicePtr, src: *const u8, len: usize) -> Result<()> {
        self.copy(dst as *mut u8, src, len)
    }

    unsafe fn copy_d2d(&self, dst: DevicePtr, src: DevicePtr, len: usize) -> Result<()> {
        self.copy(dst as *mut u8, src as *const u8, len)
    }

    fn record(&self) -> Result<Box<dyn Event>> {
        let signal = Arc::new(Signal::default());
        self.push(Task::Signal(signal.clone()))?;
        Ok(Box::new(HostEvent { signal }))
    }

    fn wait_event(&self, event: &dyn Event) -> Result<()> {
        let event = event
            .as_any()
            .downcast_ref::<HostEvent>()
            .ok_or_else(|| Error::invalid("a host stream can only wait on host events"))?;
        self.push(Task::Wait(event.signal.clone()))
    }

    fn synchronize(&self) -> Result<()> {
        self.record()?.synchronize()
    }

    fn raw_handle(&self) -> u64 {
        0
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// An event of a host stream, or one completed by hand ([`HostEvent::manual`]).
#[derive(Debug)]
pub struct HostEvent {
    signal: Arc<Signal>,
}

impl HostEvent {
    /// An event that completes when its [`HostEventTrigger`] fires: work finished on the
    /// host, signalled to the engine and to host streams.
    pub fn manual() -> (HostEvent, HostEventTrigger) {
        let signal = Arc::new(Signal::default());
        (
            HostEvent {
                signal: signal.clone(),
            },
            HostEventTrigger { signal },
        )
    }
}

/// Completes the [`HostEvent`] made with it by [`HostEvent::manual`].
#[derive(Debug)]
pub struct HostEventTrigger {
    signal: Arc<Signal>,
}

impl HostEventTrigger {
    /// Completes the event (again: a no-op).
    pub fn fire(&self) {
        self.signal.set();
    }
}

impl Event for HostEvent {
    fn query(&self) -> Result<bool> {
        Ok(self.signal.is_set())
    }

    fn synchronize(&self) -> Result<()> {
        self.signal.wait();
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_run_in_order_and_events_complete() {
        let dev = HostDevice::new();
        let a = dev.alloc(1 << 20).unwrap();
        let b = dev.alloc(1 << 20).unwrap();
        dev.fill_pattern(a.ptr(), a.len(), 9, 0).unwrap();
        let s = dev.create_stream().unwrap();
        let mut host = vec![0u8; 1 << 20];
        // SAFETY: all regions are live and 1 MiB long; we synchronize before reading.
        unsafe {
            s.copy_d2d(b.ptr(), a.ptr(), a.len()).unwrap();
            s.copy_d2h(host.as_mut_ptr(), b.ptr(), b.len()).unwrap();
        }
        let ev = s.record().unwrap();
        ev.synchronize().unwrap();
        assert!(ev.query().unwrap());
        assert_eq!(pattern::count_mismatches(&host, 9, 0), 0);
        assert_eq!(dev.count_pattern_mismatches(b.ptr(), b.len(), 9, 0).unwrap(), 0);
    }

    #[test]
    fn a_stream_waits_on_another_streams_event() {
        let dev = HostDevice::new();
        let s1 = dev.create_stream().unwrap();
        let s2 = dev.create_stream().unwrap();
        let src = dev.alloc(4096).unwrap();
        dev.fill_pattern(src.ptr(), 4096, 3, 0).unwrap();
        let mid = dev.alloc(4096).unwrap();
        let mut out = vec![0u8; 4096];
        // SAFETY: live regions; synchronized before reading.
        unsafe {
            s1.copy_d2d(mid.ptr(), src.ptr(), 4096).unwrap();
            let ev = s1.record().unwrap();
            s2.wait_event(ev.as_ref()).unwrap();
            s2.copy_d2h(out.as_mut_ptr(), mid.ptr(), 4096).unwrap();
        }
        s2.synchronize().unwrap();
        assert_eq!(pattern::count_mismatches(&out, 3, 0), 0);
    }
}
