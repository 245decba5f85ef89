//! `spillway._native.Engine`: the offload engine for Python callers. Tensors cross the
//! boundary as raw memory regions `(address, length)` and CUDA streams as raw handles
//! (`torch.cuda.Stream.cuda_stream`); the GIL is released during every engine call.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use spillway::open::{open_engine, EngineInfo, OpenedEngine};
use spillway::size::format_size;
use spillway_runtime::engine::{Handle, Region, TensorKey};
use spillway_runtime::{Error, Event, PrivateFile};

use crate::errors::{invalid, to_py};
use crate::settings;

/// The offload engine on one device and one storage target.
///
/// `Engine(path, capacity=None, **settings)`: `path` is a directory (the engine then keeps
/// its data in a new file there, removed from the directory at once so nothing is left
/// behind), a file (created if missing, kept afterwards) or a block device. `capacity` is
/// the most bytes it may store there: a size reserved up front, or, by default, half of the
/// filesystem's free space, used as needed. The settings are documented in the package
/// (`spillway.SETTINGS`).
#[pyclass(name = "Engine", module = "spillway._native", frozen)]
pub struct PyEngine {
    open: Mutex<Option<Arc<OpenedEngine>>>,
    /// What it was opened on (still known once closed).
    info: EngineInfo,
}

/// A copy started by `Engine.fetch_ahead`: the memory holds the tensor once it is done.
#[pyclass(name = "Fetched", module = "spillway._native", frozen)]
pub struct PyFetched {
    open: Arc<OpenedEngine>,
    done: Arc<dyn Event>,
}

#[pymethods]
impl PyFetched {
    /// Makes `stream`'s later work (a raw CUDA stream handle) wait for the copy; without a
    /// stream, waits on the host until it is done.
    #[pyo3(signature = (stream=None))]
    fn wait(&self, py: Python<'_>, stream: Option<u64>) -> PyResult<()> {
        py.detach(|| {
            // SAFETY: the stream is a live one of the engine's GPU (this method's documented
            // contract, which torch's `Stream.cuda_stream` meets).
            unsafe { self.open.wait_on(self.done.as_ref(), stream) }
        })
        .map_err(to_py)
    }

    /// True once the copy is done.
    fn done(&self) -> PyResult<bool> {
        self.done.query().map_err(to_py)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn regions_of(regions: &[(u64, u64)]) -> Vec<Region> {
    regions.iter().map(|&(ptr, len)| Region::new(ptr, len)).collect()
}

impl PyEngine {
    fn open(&self) -> PyResult<Arc<OpenedEngine>> {
        lock(&self.open)
            .clone()
            .ok_or_else(|| invalid("this spillway Engine is closed; create a new one"))
    }
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (path, capacity=None, **settings))]
    fn new(
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        capacity: Option<&Bound<'_, PyAny>>,
        settings: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        // One path, or a list of them to stripe over.
        // None: the paths come from the rank's entry in `rank_paths`.
        let paths: Vec<PathBuf> = match path.extract::<PathBuf>() {
            _ if path.is_none() => Vec::new(),
            Ok(one) => vec![one],
            Err(_) => path.extract().map_err(|_| {
                invalid(format!(
                    "spillway.Engine: path={path}: expected a path (str or os.PathLike) or a list of paths to stripe over"
                ))
            })?,
        };
        let settings = settings::parse(settings)?;
        let capacity = capacity
            .map(|c| {
                // A whole number past i64 (up to u64) gets the message every binding gives.
                if let Ok(n) = c.extract::<u64>() {
                    spillway::open::check_capacity(n).map_err(to_py)?;
                }
                settings::size(c).map_err(|why| invalid(format!("spillway.Engine: capacity={c}: {why}")))
            })
            .transpose()?;
        let opened = py
            .detach(|| open_engine(&paths, capacity, &settings))
            .map_err(to_py)?;
        Ok(PyEngine {
            info: opened.info.clone(),
            open: Mutex::new(Some(Arc::new(opened))),
        })
    }

    /// Offloads a tensor: `storage` and `version` name its bytes (the same pair offloaded
    /// again with the same memory is stored once), `regions` are its `(address, length)`
    /// pieces, `stream` the raw handle of the CUDA stream that produces it (the engine reads
    /// the memory once the work queued there so far is done; `None`: ready now). Returns a
    /// handle at once. The memory must stay allocated and unmodified until
    /// `source_released(handle)` is true.
    #[pyo3(signature = (storage, version, regions, stream=None))]
    fn offload(
        &self,
        py: Python<'_>,
        storage: u64,
        version: u64,
        regions: Vec<(u64, u64)>,
        stream: Option<u64>,
    ) -> PyResult<u64> {
        let open = self.open()?;
        py.detach(|| -> Result<u64, Error> {
            // SAFETY: the caller keeps the memory allocated and unmodified until
            // `source_released` says so, and passes a live stream of the engine's GPU (this
            // method's documented contract, which torch's `Stream.cuda_stream` meets).
            let h = unsafe { open.offload(TensorKey::new(storage, version), &regions_of(&regions), stream)? };
            Ok(h.0)
        })
        .map_err(to_py)
    }

    /// True once the engine no longer reads the memory of the tensor behind `handle`: its
    /// owner may free or reuse it.
    fn source_released(&self, handle: u64) -> PyResult<bool> {
        let open = self.open()?;
        open.source_released(Handle(handle)).map_err(to_py)
    }

    /// Waits until the engine no longer reads the memory offloaded as `handle` (its write
    /// is done, or was dropped): true; false at once when the engine keeps it until the
    /// handle is released (no copy on storage).
    fn wait_source_released(&self, py: Python<'_>, handle: u64) -> PyResult<bool> {
        let open = self.open()?;
        py.detach(|| open.wait_source_released(Handle(handle)))
            .map_err(to_py)
    }

    /// Starts reading the tensor behind `handle` ahead into staging memory.
    fn prefetch(&self, py: Python<'_>, handle: u64) -> PyResult<()> {
        let open = self.open()?;
        py.detach(|| open.engine.prefetch(Handle(handle))).map_err(to_py)
    }

    /// Copies the tensor behind `handle` into `regions` (memory of its size). With
    /// `stream` (a raw CUDA stream handle), the copy waits for the work queued there so far
    /// (the memory's previous users) and the stream's later work waits for the copy: the
    /// call returns without waiting for the GPU. Without, it returns once the bytes are
    /// in place.
    #[pyo3(signature = (handle, regions, stream=None))]
    fn fetch(
        &self,
        py: Python<'_>,
        handle: u64,
        regions: Vec<(u64, u64)>,
        stream: Option<u64>,
    ) -> PyResult<()> {
        let open = self.open()?;
        py.detach(|| {
            // SAFETY: the memory is the caller's, used by nothing but its stream (or idle
            // without one), and the stream is a live one of the engine's GPU (this method's
            // documented contract).
            unsafe { open.fetch(Handle(handle), &regions_of(&regions), stream) }
        })
        .map_err(to_py)
    }

    /// Starts copying the tensor behind `handle` into `regions` ahead of its use: the copy
    /// waits for the work queued on `stream` so far (the memory's previous users), and no
    /// later work waits for it. Returns a :class:`Fetched`; call its ``wait(stream)`` before
    /// the memory is read. Returns once the bytes have left storage (or the host tier), so
    /// run it on a thread of its own to overlap it with compute.
    #[pyo3(signature = (handle, regions, stream=None))]
    fn fetch_ahead(
        &self,
        py: Python<'_>,
        handle: u64,
        regions: Vec<(u64, u64)>,
        stream: Option<u64>,
    ) -> PyResult<PyFetched> {
        let open = self.open()?;
        let done = py
            .detach(|| {
                // SAFETY: the memory is the caller's, used by nothing queued on its stream
                // after this call until `Fetched.wait` (this method's documented contract),
                // and the stream is a live one of the engine's GPU.
                unsafe { open.fetch_ahead(Handle(handle), &regions_of(&regions), stream) }
            })
            .map_err(to_py)?;
        Ok(PyFetched { open, done })
    }

    /// Drops a handle; the stored copy goes with its last handle. The last handle of a
    /// key returns once the engine no longer reads the tensor's memory (a write under way
    /// is finished first; one not yet started is dropped): the memory may be freed then.
    /// Other handles of the same key share that memory, which stays in use for them.
    fn release(&self, py: Python<'_>, handle: u64) -> PyResult<()> {
        let open = self.open()?;
        py.detach(|| open.release(Handle(handle))).map_err(to_py)
    }

    /// Waits until every accepted write has finished (or failed and been kept resident).
    fn drain(&self, py: Python<'_>) -> PyResult<()> {
        let open = self.open()?;
        py.detach(|| open.engine.drain()).map_err(to_py)
    }

    /// The engine's statistics as a JSON text.
    fn stats_json(&self) -> PyResult<String> {
        let open = self.open()?;
        Ok(open.stats_json().to_string())
    }

    /// Storage in use, as a JSON text.
    fn storage_usage_json(&self) -> PyResult<String> {
        let open = self.open()?;
        let u = open.engine.storage_usage();
        Ok(serde_json::json!({
            "capacity": u.capacity,
            "used": u.used,
            "free": u.free,
            "largest_free": u.largest_free,
            "free_ranges": u.free_ranges,
            "live_extents": u.live_extents,
            "fragmentation": u.fragmentation(),
        })
        .to_string())
    }

    /// Handles not yet released.
    fn live_handles(&self) -> PyResult<usize> {
        Ok(self.open()?.engine.live_handles())
    }

    /// Staging memory in use now (bytes).
    fn staging_in_use(&self) -> PyResult<u64> {
        Ok(self.open()?.engine.staging_in_use())
    }

    /// Writes the timeline (when the engine was made with `timeline=True`) as Chrome trace
    /// JSON, for Perfetto or chrome://tracing. The file is made mode 0600 in a directory
    /// checked like a data directory, and put in place by a rename: a symbolic link, another
    /// user's file or anything but a regular file at the path is refused, and an existing
    /// file of yours is replaced.
    fn write_trace(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let open = self.open()?;
        py.detach(|| -> Result<(), Error> {
            let mut file = PrivateFile::create(&path, "trace file")?;
            open.engine
                .timeline()
                .write_chrome_trace(std::io::BufWriter::new(&mut file))
                .map_err(|e| Error::io(format!("writing the trace file {}", path.display()), e))?;
            file.persist()
        })
        .map_err(to_py)
    }

    /// Waits for outstanding writes, then closes the storage target and frees the staging
    /// memory. Every later call raises. Closing twice is harmless.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let open = lock(&self.open).take();
        if let Some(open) = open {
            py.detach(move || drop(open));
        }
        Ok(())
    }

    /// True once `close` was called.
    #[getter]
    fn closed(&self) -> bool {
        lock(&self.open).is_none()
    }

    /// The storage target: a file or block device, or the directory of an anonymous file.
    #[getter]
    fn path(&self) -> String {
        self.info.path.display().to_string()
    }

    /// True when the data lives in an anonymous file (one that never has a name).
    #[getter]
    fn anonymous(&self) -> bool {
        self.info.anonymous
    }

    /// Bytes the engine may store.
    #[getter]
    fn capacity(&self) -> u64 {
        self.info.capacity
    }

    /// "cuda:N" or "host".
    #[getter]
    fn device(&self) -> String {
        self.info.device.clone()
    }

    /// The backend moving the bytes ("uring", "cufile").
    #[getter]
    fn backend(&self) -> String {
        self.info.backend.clone()
    }

    /// Choices made for the caller ("no GPU: using host memory", …).
    #[getter]
    fn notes(&self) -> Vec<String> {
        self.info.notes.clone()
    }

    /// The engine's settings as a JSON text: every setting of the table with its value
    /// (sizes and counts as numbers, text as text).
    fn settings_json(&self) -> String {
        use spillway::settings::{Value, SETTINGS};
        let resolved = &self.info.settings;
        let map: serde_json::Map<String, serde_json::Value> = SETTINGS
            .iter()
            .map(|s| {
                let v = match s.get(resolved) {
                    Value::Int(n) => serde_json::Value::from(n),
                    Value::Float(x) => serde_json::Value::from(x),
                    Value::Bool(b) => serde_json::Value::from(b),
                    Value::Str(t) => serde_json::Value::from(t),
                };
                (s.name.to_string(), v)
            })
            .collect();
        serde_json::Value::Object(map).to_string()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _t: Option<&Bound<'_, PyAny>>,
        _v: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "spillway.Engine(path={:?}, capacity={}, device={}, backend={}{})",
            self.info.path.display().to_string(),
            format_size(self.info.capacity),
            self.info.device,
            self.info.backend,
            if self.closed() { ", closed" } else { "" }
        )
    }
}
