//! [`SlowDevice`]: the host device with streams that wait before every copy, so that a
//! backend which uses a staging buffer before its copy's event completes reads or
//! overwrites the wrong bytes, and the tests see it.

use std::any::Any;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use spillway_runtime::{
    Device, DeviceBuffer, DeviceInfo, DevicePtr, Error, Event, HostDevice, HostRegistration, PackPiece,
    PinnedBuffer, Result, Stream,
};

/// The host device, with copies delayed by `delay` each.
#[derive(Debug)]
pub struct SlowDevice {
    inner: HostDevice,
    delay: Duration,
}

impl SlowDevice {
    pub fn new(delay: Duration) -> Self {
        SlowDevice {
            inner: HostDevice::new(),
            delay,
        }
    }
}

impl Device for SlowDevice {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    fn alloc(&self, len: usize) -> Result<DeviceBuffer> {
        self.inner.alloc(len)
    }

    fn alloc_pinned(&self, len: usize) -> Result<PinnedBuffer> {
        self.inner.alloc_pinned(len)
    }

    unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> Result<HostRegistration> {
        // SAFETY: forwarded contract.
        unsafe { self.inner.register_host(ptr, len) }
    }

    fn create_stream(&self) -> Result<Arc<dyn Stream>> {
        Ok(Arc::new(SlowStream::new(self.delay)))
    }

    fn fill_pattern(&self, dst: DevicePtr, len: usize, seed: u64, offset: u64) -> Result<()> {
        self.inner.fill_pattern(dst, len, seed, offset)
    }

    fn count_pattern_mismatches(&self, src: DevicePtr, len: usize, seed: u64, offset: u64) -> Result<u64> {
        self.inner.count_pattern_mismatches(src, len, seed, offset)
    }

    unsafe fn pack(&self, _: &dyn Stream, _: DevicePtr, _: u64, _: &[PackPiece]) -> Result<()> {
        Err(Error::invalid(
            "the slow test device does not pack (the backend tests never need it)",
        ))
    }

    unsafe fn unpack(&self, _: &dyn Stream, _: DevicePtr, _: u64, _: &[PackPiece]) -> Result<()> {
        Err(Error::invalid(
            "the slow test device does not unpack (the backend tests never need it)",
        ))
    }
}

#[derive(Debug, Default)]
struct Signal {
    done: Mutex<bool>,
    cv: Condvar,
}

enum Task {
    Copy { dst: usize, src: usize, len: usize },
    Signal(Arc<Signal>),
}

#[derive(Debug)]
struct SlowStream {
    tasks: Mutex<Option<mpsc::Sender<Task>>>,
    worker: Mutex<Option<thread::JoinHandle<()>>>,
}

impl SlowStream {
    fn new(delay: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<Task>();
        let worker = thread::spawn(move || {
            for task in rx {
                match task {
                    Task::Copy { dst, src, len } => {
                        thread::sleep(delay);
                        // SAFETY: the submitter keeps both regions valid until the copy's
                        // event completes (the Stream contract).
                        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, len) };
                    }
                    Task::Signal(signal) => {
                        *signal.done.lock().unwrap() = true;
                        signal.cv.notify_all();
                    }
                }
            }
        });
        SlowStream {
            tasks: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        }
    }

    fn push(&self, task: Task) -> Result<()> {
        self.tasks
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|tx| tx.send(task).ok())
            .ok_or_else(|| Error::Device("slow stream closed".into()))
    }
}

impl Drop for SlowStream {
    fn drop(&mut self) {
        self.tasks.lock().unwrap().take();
        if let Some(worker) = self.worker.lock().unwrap().take() {
            let _ = worker.join();
        }
    }
}

impl Stream for SlowStream {
    unsafe fn copy_d2h(&self, dst: *mut u8, src: DevicePtr, len: usize) -> Result<()> {
        self.push(Task::Copy {
            dst: dst as usize,
            src: src as usize,
            len,
        })
    }

    unsafe fn copy_h2d(&self, dst: DevicePtr, src: *const u8, len: usize) -> Result<()> {
        self.push(Task::Copy {
            dst: dst as usize,
            src: src as usize,
            len,
        })
    }

    unsafe fn copy_d2d(&self, dst: DevicePtr, src: DevicePtr, len: usize) -> Result<()> {
        self.push(Task::Copy {
            dst: dst as usize,
            src: src as usize,
            len,
        })
    }

    fn record(&self) -> Result<Box<dyn Event>> {
        let signal = Arc::new(Signal::default());
        self.push(Task::Signal(signal.clone()))?;
        Ok(Box::new(SlowEvent { signal }))
    }

    fn wait_event(&self, _event: &dyn Event) -> Result<()> {
        Err(Error::invalid("the slow test stream cannot wait on events"))
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

#[derive(Debug)]
struct SlowEvent {
    signal: Arc<Signal>,
}

impl Event for SlowEvent {
    fn query(&self) -> Result<bool> {
        Ok(*self.signal.done.lock().unwrap())
    }

    fn synchronize(&self) -> Result<()> {
        let mut done = self.signal.done.lock().unwrap();
        while !*done {
            done = self.signal.cv.wait(done).unwrap();
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
