//! `spillway._native.Engine`: the offload engine for Python callers. Tensors cross the
//! boundary as raw memory regions `(address, length)` and CUDA streams as raw handles
//! (`torch.cuda.Stream.cuda_stream`); the GIL is released during every engine call.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use spillway::cli::BackendChoice;
use spillway::cuda::{CudaDevice, ForeignStream};
use spillway::select::{self, Memory, Setup};
use spillway::size::format_size;
use spillway_runtime::engine::{Engine, Handle, Region, StorageTarget, TensorKey};
use spillway_runtime::{DirectIo, Error, Event, Target};
use spillway_spdk::pci::PciAddress;

use crate::errors::{invalid, to_py};
use crate::settings::{self, Settings};

/// Without an explicit capacity, the engine may fill this fraction of the free space of
/// the filesystem holding its file (the file grows as tensors are written).
const DEFAULT_CAPACITY_FRACTION: u64 = 2;

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
    open: Mutex<Option<Arc<Open>>>,
    info: Info,
}

struct Open {
    engine: Engine,
    gpu: Option<Arc<CudaDevice>>,
    /// The live handles.
    handles: Mutex<Handles>,
}

/// What the Python side knows of its live handles.
#[derive(Default)]
struct Handles {
    /// Per handle: its key, and the flag set once the engine no longer reads its memory.
    live: HashMap<u64, ((u64, u64), Arc<SourceFlag>)>,
    /// Live handles per key: handles of one key share one copy and one memory (dedup).
    per_key: HashMap<(u64, u64), usize>,
}

impl Handles {
    fn flag(&self, handle: u64) -> PyResult<Arc<SourceFlag>> {
        self.live
            .get(&handle)
            .map(|(_, f)| f.clone())
            .ok_or_else(|| invalid(format!("unknown or released handle {handle}")))
    }
}

/// Set (by the engine's callback) once the engine no longer reads a tensor's memory.
#[derive(Default)]
struct SourceFlag {
    set: Mutex<bool>,
    changed: Condvar,
}

impl SourceFlag {
    fn set(&self) {
        *lock(&self.set) = true;
        self.changed.notify_all();
    }

    fn is_set(&self) -> bool {
        *lock(&self.set)
    }

    fn wait(&self) {
        let mut set = lock(&self.set);
        while !*set {
            set = self.changed.wait(set).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Info {
    path: PathBuf,
    anonymous: bool,
    capacity: u64,
    device: String,
    backend: String,
    notes: Vec<String>,
    settings: Settings,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn regions_of(regions: &[(u64, u64)]) -> Vec<Region> {
    regions.iter().map(|&(ptr, len)| Region::new(ptr, len)).collect()
}

impl PyEngine {
    fn open(&self) -> PyResult<Arc<Open>> {
        lock(&self.open)
            .clone()
            .ok_or_else(|| invalid("this spillway Engine is closed; create a new one"))
    }
}

impl Open {
    /// Checks that every region is memory of the engine's GPU.
    fn check(&self, what: &str, regions: &[Region]) -> Result<(), Error> {
        if let Some(gpu) = &self.gpu {
            for r in regions.iter().filter(|r| r.len > 0) {
                gpu.check_region(what, r.ptr, r.len)?;
            }
        }
        Ok(())
    }

    /// The caller's stream, borrowed; an error when it makes no sense here.
    fn stream(&self, stream: Option<u64>) -> Result<Option<ForeignStream>, Error> {
        match (&self.gpu, stream) {
            // SAFETY: the caller passes the handle of a live stream of this GPU's primary
            // context (the documented contract of the Python method, which torch's
            // `Stream.cuda_stream` meets), used only during this call.
            (Some(gpu), Some(s)) => Ok(Some(unsafe { ForeignStream::from_raw(gpu, s) })),
            (None, Some(_)) => Err(Error::invalid(
                "a CUDA stream was given, but this engine works on host memory: pass stream=None",
            )),
            (_, None) => Ok(None),
        }
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
        let paths: Vec<PathBuf> = match path.extract::<PathBuf>() {
            Ok(one) => vec![one],
            Err(_) => path.extract().map_err(|_| {
                invalid(format!(
                    "spillway.Engine: path={path}: expected a path (str or os.PathLike) or a list of paths to stripe over"
                ))
            })?,
        };
        let settings = Settings::parse(settings)?;
        let capacity = capacity
            .map(|c| {
                settings::size(c).map_err(|why| invalid(format!("spillway.Engine: capacity={c}: {why}")))
            })
            .transpose()?;
        py.detach(|| open_engine(paths, capacity, settings))
            .map_err(to_py)
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
            let regions = regions_of(&regions);
            open.check("offload region", &regions)?;
            let ready: Option<Arc<dyn Event>> = match open.stream(stream)? {
                Some(s) => Some(Arc::new(s.record_event()?)),
                None => None,
            };
            let freed = Arc::new(SourceFlag::default());
            let flag = freed.clone();
            // SAFETY: the caller keeps the memory allocated and unmodified until
            // `source_released` says so (this method's documented contract); the flag it
            // polls is set by this callback.
            let h = unsafe {
                open.engine.offload_with_callback(
                    TensorKey::new(storage, version),
                    &regions,
                    ready,
                    move || flag.set(),
                )?
            };
            let mut handles = lock(&open.handles);
            handles.live.insert(h.0, ((storage, version), freed));
            *handles.per_key.entry((storage, version)).or_default() += 1;
            Ok(h.0)
        })
        .map_err(to_py)
    }

    /// True once the engine no longer reads the memory of the tensor behind `handle`: its
    /// owner may free or reuse it.
    fn source_released(&self, handle: u64) -> PyResult<bool> {
        let open = self.open()?;
        let flag = lock(&open.handles).flag(handle)?;
        Ok(flag.is_set())
    }

    /// Waits until the engine no longer reads the memory offloaded as `handle` (its write
    /// is done, or was dropped).
    fn wait_source_released(&self, py: Python<'_>, handle: u64) -> PyResult<()> {
        let open = self.open()?;
        let flag = lock(&open.handles).flag(handle)?;
        py.detach(|| flag.wait());
        Ok(())
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
        py.detach(|| -> Result<(), Error> {
            let regions = regions_of(&regions);
            open.check("fetch region", &regions)?;
            match open.stream(stream)? {
                Some(s) => {
                    let free: Arc<dyn Event> = Arc::new(s.record_event()?);
                    // SAFETY: the memory is the caller's, not used by anything but its
                    // stream, whose later work waits for the returned event below.
                    let ev = unsafe { open.engine.fetch_into(Handle(handle), &regions, Some(free))? };
                    s.wait_event(ev.as_ref())
                }
                None => {
                    // SAFETY: the memory is the caller's and idle (the documented contract);
                    // the event is waited on before returning.
                    let ev = unsafe { open.engine.fetch(Handle(handle), &regions)? };
                    ev.synchronize()
                }
            }
        })
        .map_err(to_py)
    }

    /// Drops a handle; the stored copy goes with its last handle. The last handle of a
    /// key returns once the engine no longer reads the tensor's memory (a write under way
    /// is finished first; one not yet started is dropped): the memory may be freed then.
    /// Other handles of the same key share that memory, which stays in use for them.
    fn release(&self, py: Python<'_>, handle: u64) -> PyResult<()> {
        let open = self.open()?;
        py.detach(|| -> Result<(), Error> {
            open.engine.release(Handle(handle))?;
            let last = {
                let mut handles = lock(&open.handles);
                handles.live.remove(&handle).and_then(|(key, flag)| {
                    let n = handles.per_key.get_mut(&key)?;
                    *n -= 1;
                    if *n == 0 {
                        handles.per_key.remove(&key);
                        Some(flag)
                    } else {
                        None
                    }
                })
            };
            if let Some(flag) = last {
                flag.wait();
            }
            Ok(())
        })
        .map_err(to_py)
    }

    /// Waits until every accepted write has finished (or failed and been kept resident).
    fn drain(&self, py: Python<'_>) -> PyResult<()> {
        let open = self.open()?;
        py.detach(|| open.engine.drain()).map_err(to_py)
    }

    /// The engine's statistics as a JSON text.
    fn stats_json(&self) -> PyResult<String> {
        let open = self.open()?;
        serde_json::to_string(&open.engine.stats()).map_err(|e| invalid(e.to_string()))
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
    /// JSON, for Perfetto or chrome://tracing.
    fn write_trace(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let open = self.open()?;
        py.detach(|| -> Result<(), Error> {
            let file = std::fs::File::create(&path)
                .map_err(|e| Error::io(format!("creating the trace file {}", path.display()), e))?;
            open.engine
                .timeline()
                .write_chrome_trace(std::io::BufWriter::new(file))
                .map_err(|e| Error::io(format!("writing the trace file {}", path.display()), e))
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

    /// The engine's settings as a JSON text.
    fn settings_json(&self) -> String {
        let c = &self.info.settings.engine;
        serde_json::json!({
            "alignment": c.alignment,
            "staging_bytes": c.staging_bytes,
            "prefetch_bytes": c.prefetch_bytes,
            "pack_threshold": c.pack_threshold,
            "pack_extent_bytes": c.pack_extent_bytes,
            "pack_flush_delay_ms": c.pack_flush_delay.as_secs_f64() * 1000.0,
            "direct_write_bytes": c.direct_write_bytes,
            "pack": c.pack,
            "dedup": c.dedup,
            "timeline": c.timeline,
            "timeline_capacity": c.timeline_capacity,
            "queue_depth": self.info.settings.choices.queue_depth,
            "threads": self.info.settings.choices.threads,
            "pinned_bytes": self.info.settings.choices.pinned_bytes,
        })
        .to_string()
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

/// Sets up the device, backend and storage target, and starts the engine.
fn open_engine(
    paths: Vec<PathBuf>,
    capacity: Option<u64>,
    mut settings: Settings,
) -> Result<PyEngine, Error> {
    let path = match paths.as_slice() {
        [] => {
            return Err(Error::invalid(
                "no storage path given: pass a path or a list of paths",
            ))
        }
        [one] => one.clone(),
        _ => return open_striped(paths, capacity, settings),
    };
    if settings.choices.backend == BackendChoice::Spdk {
        settings.choices.pci = Some(controller_address(&path)?);
    }
    let setup = select::setup(settings.choices)?;
    if settings.choices.backend == BackendChoice::Spdk {
        return start(setup, path, false, capacity, None, settings);
    }
    let (path, anonymous) = storage_file(&path)?;
    let is_block = std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_block_device());
    let (capacity, reserve) = match capacity {
        Some(c) => (c, (!is_block).then_some(c)),
        None if is_block => {
            return Err(Error::invalid(format!(
                "{} is a block device: pass capacity= (the bytes the engine may use on it)",
                path.display()
            )))
        }
        None => {
            let dir = if anonymous {
                path.as_path()
            } else {
                path.parent().unwrap_or(Path::new("."))
            };
            let free = spillway::fs::free_space(dir).ok_or_else(|| {
                Error::invalid(format!(
                    "cannot tell how much space {} has: pass capacity= (bytes the engine may use)",
                    dir.display()
                ))
            })?;
            (free / DEFAULT_CAPACITY_FRACTION, None)
        }
    };
    start(setup, path, anonymous, Some(capacity), reserve, settings)
}

/// The engine on several paths striped into one set (`stripe_bytes` units), each with a
/// backend of its own. Without `capacity`, each path may give the set the same share of
/// its free space a single path would.
fn open_striped(paths: Vec<PathBuf>, capacity: Option<u64>, settings: Settings) -> Result<PyEngine, Error> {
    let mut files = Vec::with_capacity(paths.len());
    for p in &paths {
        let (file, anonymous) = storage_file(p)?;
        if std::fs::metadata(&file).is_ok_and(|m| m.file_type().is_block_device()) && capacity.is_none() {
            return Err(Error::invalid(format!(
                "{} is a block device: pass capacity= (the bytes the engine may use over all paths)",
                file.display()
            )));
        }
        files.push((file, anonymous));
    }
    let capacity = match capacity {
        Some(c) => c,
        None => {
            let mut smallest = u64::MAX;
            for (file, anonymous) in &files {
                let dir = if *anonymous {
                    file.as_path()
                } else {
                    file.parent().unwrap_or(Path::new("."))
                };
                let free = spillway::fs::free_space(dir).ok_or_else(|| {
                    Error::invalid(format!(
                        "cannot tell how much space {} has: pass capacity= (bytes the engine may use)",
                        dir.display()
                    ))
                })?;
                smallest = smallest.min(free / DEFAULT_CAPACITY_FRACTION);
            }
            // Every path holds the same share of the set.
            smallest * files.len() as u64
        }
    };
    let members: Vec<PathBuf> = files.into_iter().map(|(f, _)| f).collect();
    let (setup, name) = select::setup_striped(
        settings.choices,
        &members,
        settings.stripe_bytes,
        &settings.stripe_weights,
    )?;
    start(setup, name, false, Some(capacity), Some(capacity), settings)
}

/// With `backend="spdk"` the path names the NVMe controller by its PCI address.
fn controller_address(path: &Path) -> Result<PciAddress, Error> {
    let text = path.to_string_lossy();
    text.parse().map_err(|e| {
        Error::invalid(format!(
            "with backend=\"spdk\" the path is the NVMe controller's PCI address (e.g. \"0000:01:00.0\", see `spillway nvme list`), not {text:?}: {e}"
        ))
    })
}

/// Opens the storage target on the backend and starts the engine. Without `capacity`, the
/// engine may use all of the target (a controller's namespace).
fn start(
    setup: Setup,
    path: PathBuf,
    anonymous: bool,
    capacity: Option<u64>,
    reserve: Option<u64>,
    settings: Settings,
) -> Result<PyEngine, Error> {
    let capacity = match capacity {
        Some(c) => c,
        None => {
            let (id, info) = setup.backend.open(&Target::new(&path))?;
            setup.backend.close(id)?;
            info.size
        }
    };
    let align = settings.engine.alignment;
    let capacity = capacity / align * align;
    if capacity == 0 {
        return Err(Error::invalid(format!(
            "the storage capacity at {} is below one {align}-byte unit: free space there or pass a larger capacity=",
            path.display()
        )));
    }
    let target = Target {
        path: path.clone(),
        direct: DirectIo::Preferred,
        create: true,
        reserve,
    };
    let started = Engine::new(
        setup.device.clone(),
        setup.backend.clone(),
        vec![StorageTarget::new(target, capacity)],
        settings.engine.clone(),
    );
    let engine = started?;
    let (gpu, device) = match &setup.memory {
        Memory::Gpu(g) => (Some(g.clone()), format!("cuda:{}", g.ordinal())),
        Memory::Host => (None, "host".to_string()),
    };
    Ok(PyEngine {
        open: Mutex::new(Some(Arc::new(Open {
            engine,
            gpu,
            handles: Mutex::new(Handles::default()),
        }))),
        info: Info {
            path,
            anonymous,
            capacity,
            device,
            backend: setup.backend.info().name.to_string(),
            notes: setup.notes,
            settings,
        },
    })
}

/// The file to store in: a new anonymous file when `path` is a directory.
fn storage_file(path: &Path) -> Result<(PathBuf, bool), Error> {
    if path.as_os_str().is_empty() {
        return Err(Error::invalid(
            "the storage path is empty: pass a directory, file or block device on fast storage",
        ));
    }
    if !path.is_dir() {
        return Ok((path.to_path_buf(), false));
    }
    // A directory target opens as an anonymous file in it (O_TMPFILE, or created and
    // unlinked at once): it never has a name, so nothing is left behind even after a kill.
    Ok((path.to_path_buf(), true))
}
