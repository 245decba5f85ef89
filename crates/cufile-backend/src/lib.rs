//! spillway-cufile: the NVIDIA cuFile (GPUDirect Storage) backend of spillway.
//!
//! [`CufileBackend`] implements [`spillway_runtime::Backend`] with `cuFileRead` and
//! `cuFileWrite`, through cudarc's `cufile` module (libcufile is loaded at run time, so the
//! crate builds and its GPU-less tests run where no CUDA is installed).
//!
//! - The cuFile driver is opened once per process, on first use, and left open until the
//!   process exits (`cuFileDriverOpen` affects every user of libcufile in the process).
//! - Targets are opened with [`spillway_runtime::open_target`] (O_DIRECT preferred: cuFile's
//!   direct path needs it) and registered with `cuFileHandleRegister`.
//! - Requests larger than [`CufileConfig::split_size`] are split into pieces that a pool of
//!   [`CufileConfig::threads`] I/O threads moves in parallel; each thread makes the GPU's
//!   context current before every cuFile call. The ticket completes when every piece has.
//! - Device buffers are registered with `cuFileBufRegister` once per allocation (whole
//!   allocation, byte length), unless [`CufileConfig::register_buffers`] is off; when
//!   registration fails the backend carries on with unregistered buffers.
//! - Whether cuFile moves data directly (nvidia-fs or PCI P2PDMA) or through host bounce
//!   buffers (compatibility mode) is read from the driver, never guessed: see
//!   [`CufileBackend::gds_mode`] and the rule in the `driver` module's source documentation.
//! - Host memory ([`spillway_runtime::MemRef::Host`]): cufile.h documents `cuFileRead` and
//!   `cuFileWrite` buffers as "device or host memory" since GDS 1.8 (CUDA 12.3). The backend
//!   accepts host memory when the loaded libcufile reports version 1.8 or later
//!   ([`CufileBackend::host_memory`]) and refuses it otherwise with
//!   [`Error::InvalidArgument`] pointing at the uring backend.
//!
//! cudarc panics when a library or a symbol is missing; every call into it here is either
//! preceded by a presence check or contained, so no panic leaves this crate.

#![warn(missing_docs)]

mod buffers;
mod driver;
mod handle;
mod mode;
mod request;
mod status;
mod worker;

use std::collections::HashMap;
use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaContext;
use spillway_runtime::{
    open_target, ticket, Backend, BackendInfo, Error, IoRequest, MemRef, Result, Target, TargetId,
    TargetInfo, Ticket,
};

use crate::buffers::{BufferCache, Resolved};
use crate::driver::{with_context, Driver};
use crate::handle::RegisteredFile;
use crate::request::{split, Inflight, Piece, PieceGuard, PieceResult, Request, Transfer};
use crate::worker::{Job, Pool, Prepare, Start};

pub use crate::driver::check_library;
pub use crate::mode::GdsMode;

/// The message for host memory on a libcufile that does not take it.
const HOST_MEMORY_REFUSED: &str =
    "the cufile backend moves device memory; use the uring backend for host memory";

/// How the cuFile backend runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CufileConfig {
    /// I/O threads (at least 1). Default 4.
    pub threads: usize,
    /// Requests larger than this are split into pieces of at most this many bytes, moved by
    /// the threads in parallel. A positive multiple of 4096. Default 16 MiB.
    pub split_size: usize,
    /// Register device buffers with `cuFileBufRegister` (once per allocation). Default true.
    pub register_buffers: bool,
}

impl Default for CufileConfig {
    fn default() -> Self {
        CufileConfig {
            threads: 4,
            split_size: 16 << 20,
            register_buffers: true,
        }
    }
}

/// What [`probe`] found about cuFile on this machine.
#[derive(Clone, Debug)]
pub struct CufileProbe {
    /// The loaded libcufile's path, or why it could not be loaded.
    pub library: std::result::Result<String, String>,
    /// libcufile's version ("1.15.1"), where the library reports it (GDS ≥ 1.8).
    pub version: Option<String>,
    /// The data path cuFile takes, when the driver could be opened.
    pub gds_mode: Option<GdsMode>,
    /// The nvidia-fs kernel module's version, as cuFile reports it.
    pub nvfs_version: Option<(u32, u32)>,
    /// Driver properties and settings: poll mode, max direct I/O size, flags, compat mode…
    pub details: Vec<(String, String)>,
}

/// Probes libcufile for `spillway info`: loads it if it can, opens the driver if it can and
/// reads `cuFileDriverGetProperties`. Never panics; needs no GPU context.
pub fn probe() -> CufileProbe {
    let empty = |library| CufileProbe {
        library,
        version: None,
        gds_mode: None,
        nvfs_version: None,
        details: Vec::new(),
    };
    match driver::guarded("probing libcufile", probe_inner) {
        Ok(p) => p,
        Err(e) => empty(Err(unavailable_reason(e))),
    }
}

fn unavailable_reason(e: Error) -> String {
    match e {
        Error::Unavailable { reason, .. } => reason,
        other => other.to_string(),
    }
}

fn nvfs_module() -> (String, String) {
    let state = std::fs::read_to_string(driver::NVFS_PROC)
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .map(|l| format!("loaded ({l})"))
        .unwrap_or_else(|| "not loaded".into());
    ("nvidia-fs module".into(), state)
}

fn probe_inner() -> CufileProbe {
    if let Err(e) = check_library() {
        return CufileProbe {
            library: Err(unavailable_reason(e)),
            version: None,
            gds_mode: None,
            nvfs_version: None,
            details: vec![nvfs_module()],
        };
    }
    let library = driver::library_path();
    let version = driver::library_version().map(driver::version_string);
    match driver::driver() {
        Ok(d) => CufileProbe {
            library: Ok(library),
            version,
            gds_mode: Some(d.mode),
            nvfs_version: d.nvfs_version(),
            details: d.details(),
        },
        Err(e) => CufileProbe {
            library: Ok(library),
            version,
            gds_mode: None,
            nvfs_version: None,
            details: vec![("driver".into(), e.to_string()), nvfs_module()],
        },
    }
}

/// A target opened on the backend.
struct OpenTarget {
    id: TargetId,
    path: PathBuf,
    file: RegisteredFile,
    inflight: Arc<Inflight>,
}

/// The cuFile backend. See the crate documentation.
pub struct CufileBackend {
    ctx: Arc<CudaContext>,
    config: CufileConfig,
    driver: &'static Driver,
    pool: Pool,
    buffers: Arc<BufferCache>,
    targets: Mutex<HashMap<TargetId, Arc<OpenTarget>>>,
    next_id: AtomicU32,
    requests: AtomicU64,
    pieces: AtomicU64,
}

impl CufileBackend {
    /// Opens the cuFile driver (once per process) and starts the I/O threads.
    ///
    /// `context` is the GPU's primary context (cudarc `CudaContext`), made current on each
    /// I/O thread before cuFile calls; device memory passed to [`Backend::submit`] must
    /// belong to it.
    ///
    /// Errors: libcufile missing → [`Error::Unavailable`] (`what` "cuFile") whose reason
    /// names libcufile and says what to do; `cuFileDriverOpen` failing →
    /// [`Error::Unavailable`] with cuFile's error text; a zero `threads` or a `split_size`
    /// that is not a positive multiple of 4096 → [`Error::InvalidArgument`].
    pub fn new(context: Arc<CudaContext>, config: CufileConfig) -> Result<Self> {
        if config.threads == 0 {
            return Err(Error::invalid("CufileConfig.threads must be at least 1"));
        }
        if config.split_size == 0 || !config.split_size.is_multiple_of(4096) {
            return Err(Error::invalid(format!(
                "CufileConfig.split_size must be a positive multiple of 4096 (got {})",
                config.split_size
            )));
        }
        check_library()?;
        let driver = with_context(&context, driver::driver)??;
        let max_register = driver
            .inputs
            .props
            .map(|p| u64::from(p.max_device_pinned_mem_kb) * 1024)
            .filter(|b| *b > 0)
            .unwrap_or(u64::MAX);
        let buffers = Arc::new(BufferCache::new(config.register_buffers, max_register));
        let bind = context.clone();
        let prepare: Prepare =
            Arc::new(move || driver::make_current(&bind).map_err(|e| format!("on a cufile I/O thread: {e}")));
        let pool = Pool::new(config.threads, "spillway-cufile", prepare)?;
        tracing::info!(
            mode = driver.mode.as_str(),
            threads = config.threads,
            split_size = config.split_size,
            register_buffers = config.register_buffers,
            "cufile backend ready"
        );
        Ok(CufileBackend {
            ctx: context,
            config,
            driver,
            pool,
            buffers,
            targets: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            pieces: AtomicU64::new(0),
        })
    }

    /// The data path cuFile takes for local NVMe, from the driver's own reports:
    ///
    /// 1. [`GdsMode::Compat`] if compatibility mode is forced: `CUFILE_FORCE_COMPAT_MODE`
    ///    is true, cuFile's `force_compat_mode` parameter is true, or the driver's control
    ///    flags select plain POSIX I/O;
    /// 2. [`GdsMode::P2pDma`] if the driver reports NVMe through PCI P2PDMA
    ///    (`CU_FILE_NVME_P2P_SUPPORTED` status flag, or `CUFILE_P2PDMA` in
    ///    `cuFileDriverGetP2PFlags`) and `use_pci_p2pdma` is not false (when nvidia-fs is
    ///    available too, only if `use_pci_p2pdma` is true);
    /// 3. [`GdsMode::NvidiaFs`] if `/proc/driver/nvidia-fs/version` exists, the driver
    ///    properties carry a non-zero nvidia-fs version and report NVMe support
    ///    (`CU_FILE_NVME_SUPPORTED`, or `CUFILE_NVFS` in the P2P flags);
    /// 4. [`GdsMode::Compat`] otherwise (e.g. no nvidia-fs and no P2PDMA: cuFile does
    ///    POSIX I/O through host bounce buffers).
    ///
    /// The reason is in [`Backend::info`]'s details ("gds mode because").
    pub fn gds_mode(&self) -> GdsMode {
        self.driver.mode
    }

    /// Whether [`Backend::submit`] accepts [`MemRef::Host`] (libcufile ≥ 1.8).
    pub fn host_memory(&self) -> bool {
        self.driver.host_memory()
    }

    fn target(&self, id: TargetId) -> Result<Arc<OpenTarget>> {
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::invalid(format!("target {} is not open on the cufile backend", id.0)))
    }

    /// Waits for the target's requests; refuses on an I/O thread, where waiting could
    /// deadlock the pool.
    fn wait_idle(&self, t: &OpenTarget, what: &str) -> Result<()> {
        if self.pool.is_pool_thread() && t.inflight.count() > 0 {
            return Err(Error::invalid(format!(
                "{what} of {} was called on a cufile I/O thread (from a completion callback) while requests are pending; call it from another thread",
                t.path.display()
            )));
        }
        t.inflight.wait_idle();
        Ok(())
    }
}

/// A warning when a target is not on an NVMe device, where cuFile's direct paths apply.
fn non_nvme_warning(file: &std::fs::File, path: &std::path::Path) -> Option<String> {
    let meta = file.metadata().ok()?;
    let dev = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    let sys = format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev));
    let resolved = std::fs::canonicalize(&sys).ok();
    if resolved
        .as_ref()
        .is_some_and(|p| p.to_string_lossy().contains("/nvme"))
    {
        return None;
    }
    Some(format!(
        "{} is not on an NVMe device ({}); cuFile's direct path covers local NVMe, so I/O to this target probably runs in compatibility mode",
        path.display(),
        resolved.map(|p| p.display().to_string()).unwrap_or_else(|| "no block device".into())
    ))
}

/// Runs one piece on an I/O thread.
fn run_piece(
    start: Start,
    guard: PieceGuard,
    target: Arc<OpenTarget>,
    buffers: &BufferCache,
    addr: u64,
    host: bool,
    p: Piece,
) {
    let result = match start {
        Start::Cancelled => PieceResult::Failed(Error::Abandoned(
            "the cufile backend was shut down before this request ran".into(),
        )),
        Start::Failed(e) => PieceResult::Failed(Error::Device(e)),
        Start::Run => {
            let ptr = addr + p.mem_offset as u64;
            let r = if host {
                Resolved::plain(ptr)
            } else {
                buffers.resolve(ptr, p.len)
            };
            let op = guard.op();
            let span = tracing::debug_span!(
                "cufile_io",
                op = op.as_str(),
                target = target.id.0,
                offset = p.file_offset,
                len = p.len,
                registered = r.registered
            );
            let _in_span = span.enter();
            let t = Transfer {
                fh: target.file.raw(),
                op,
                base: r.base,
                buf_offset: r.offset,
                file_offset: p.file_offset,
                len: p.len,
                path: &target.path,
                host,
            };
            // SAFETY: the handle lives as long as `target`; the memory is
            // [addr + mem_offset, + len) of a request whose submitter promised it valid until
            // the ticket completes (Backend::submit), which happens only after this piece
            // settles; `r` points at the same bytes (base + offset), and the context is
            // current on this thread (Start::Run).
            unsafe { t.run() }
        }
    };
    // The target goes before the piece settles, so that once a request completes no I/O
    // thread holds the target and close() releases its handle and file itself.
    drop(target);
    guard.settle(result);
}

impl Backend for CufileBackend {
    fn info(&self) -> BackendInfo {
        let mode = self.driver.mode;
        let mut details = self.driver.details();
        details.push(("threads".into(), self.config.threads.to_string()));
        details.push(("split size".into(), format!("{} bytes", self.config.split_size)));
        let (n, bytes, unregistered) = self.buffers.stats();
        details.push((
            "buffer registration".into(),
            if self.config.register_buffers {
                format!("on: {n} allocations ({bytes} bytes) registered, {unregistered} left unregistered")
            } else {
                "off".into()
            },
        ));
        details.push((
            "host memory".into(),
            if self.host_memory() {
                "accepted".into()
            } else {
                "refused (libcufile before 1.8)".into()
            },
        ));
        details.push((
            "requests".into(),
            self.requests.load(Ordering::Relaxed).to_string(),
        ));
        details.push(("pieces".into(), self.pieces.load(Ordering::Relaxed).to_string()));
        BackendInfo {
            name: "cufile",
            host_staging: mode == GdsMode::Compat,
            transfer_mode: Some(mode.as_str()),
            details,
        }
    }

    fn open(&self, target: &Target) -> Result<(TargetId, TargetInfo)> {
        // cuFile refuses a descriptor opened with O_TMPFILE or O_NOFOLLOW (how spillway opens
        // its files): the file is registered through a second descriptor on it, without them.
        let opened = open_target(target)?.without_refused_flags()?;
        let mut warnings: Vec<String> = opened.warning.iter().cloned().collect();
        if !opened.direct_io {
            warnings.push(format!(
                "{}: without O_DIRECT cuFile cannot move data directly for this target; it uses compatibility mode",
                opened.path.display()
            ));
        } else if self.driver.mode != GdsMode::Compat {
            warnings.extend(non_nvme_warning(&opened.file, &opened.path));
        }
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let path = opened.path.clone();
        let file = with_context(&self.ctx, || RegisteredFile::register(opened.file, &path))??;
        let id = TargetId(self.next_id.fetch_add(1, Ordering::Relaxed));
        tracing::debug!(target = id.0, path = %path.display(), direct_io = opened.direct_io, "cufile target open");
        let info = TargetInfo {
            direct_io: opened.direct_io,
            offset_align: opened.offset_align,
            size: opened.size,
            warning: (!warnings.is_empty()).then(|| warnings.join("; ")),
        };
        self.targets.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            Arc::new(OpenTarget {
                id,
                path,
                file,
                inflight: Arc::new(Inflight::default()),
            }),
        );
        Ok((id, info))
    }

    unsafe fn submit(&self, req: IoRequest) -> Result<Ticket> {
        let target = self.target(req.target)?;
        let len = req.mem.len();
        if len == 0 {
            return Err(Error::invalid("an I/O of 0 bytes"));
        }
        if !fits_off_t(req.offset, len) {
            return Err(Error::invalid(format!(
                "offset {} + length {len} is beyond the largest file offset",
                req.offset
            )));
        }
        let (addr, host) = match req.mem {
            MemRef::Device { ptr, .. } => (ptr, false),
            MemRef::Host { ptr, .. } => {
                if !self.host_memory() {
                    let why = match self.driver.version {
                        Some(v) => format!(
                            " (libcufile {} predates host-memory support, added in 1.8)",
                            driver::version_string(v)
                        ),
                        None => " (this libcufile predates host-memory support, added in 1.8)".into(),
                    };
                    return Err(Error::invalid(format!("{HOST_MEMORY_REFUSED}{why}")));
                }
                (ptr as u64, true)
            }
        };
        if addr == 0 || addr.checked_add(len as u64).is_none() {
            return Err(Error::invalid(format!(
                "memory region {addr:#x} + {len} is not valid"
            )));
        }
        let pieces = split(req.offset, len, self.config.split_size);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.pieces.fetch_add(pieces.len() as u64, Ordering::Relaxed);
        tracing::debug!(
            op = req.op.as_str(),
            target = req.target.0,
            offset = req.offset,
            len,
            pieces = pieces.len(),
            host,
            "cufile submit"
        );
        let (ticket, completer) = ticket();
        let request = Request::new(
            req.op,
            target.path.clone(),
            req.offset,
            len,
            pieces.len(),
            completer,
            target.inflight.clone(),
        );
        let jobs: Vec<Job> = pieces
            .into_iter()
            .map(|p| {
                let guard = PieceGuard::new(request.clone(), p.file_offset);
                let target = target.clone();
                let buffers = self.buffers.clone();
                Box::new(move |start: Start| run_piece(start, guard, target, &buffers, addr, host, p)) as Job
            })
            .collect();
        drop(request);
        drop(target);
        self.pool.submit(jobs);
        Ok(ticket)
    }

    fn flush(&self, target: TargetId) -> Result<()> {
        let t = self.target(target)?;
        self.wait_idle(&t, "flush")?;
        t.file
            .file()
            .sync_data()
            .map_err(|e| Error::io(format!("fdatasync of {}", t.path.display()), e))
    }

    fn close(&self, target: TargetId) -> Result<()> {
        let t = self.target(target)?;
        self.wait_idle(&t, "close")?;
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&target);
        // Requests submitted between the wait and the removal hold the target too; the last
        // of them releases it if this runs on an I/O thread, where waiting could deadlock.
        if !self.pool.is_pool_thread() {
            t.inflight.wait_idle();
        }
        tracing::debug!(target = target.0, path = %t.path.display(), "cufile target closed");
        drop(t);
        Ok(())
    }
}

/// Whether `offset + len` fits `off_t`, cuFile's file offset type.
fn fits_off_t(offset: u64, len: usize) -> bool {
    offset
        .checked_add(len as u64)
        .is_some_and(|end| end <= i64::MAX as u64)
}

impl Drop for CufileBackend {
    fn drop(&mut self) {
        self.pool.shutdown();
        let targets: Vec<Arc<OpenTarget>> = self
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, t)| t)
            .collect();
        drop(targets);
        if self.config.register_buffers {
            let buffers = &self.buffers;
            if let Err(e) = with_context(&self.ctx, || buffers.deregister_all()) {
                tracing::warn!("could not deregister cuFile buffers: {e}");
            }
        }
    }
}

impl fmt::Debug for CufileBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CufileBackend")
            .field("gds_mode", &self.driver.mode)
            .field("config", &self.config)
            .field(
                "targets",
                &self.targets.lock().map(|t| t.len()).unwrap_or_default(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults() {
        let c = CufileConfig::default();
        assert_eq!(c.threads, 4);
        assert_eq!(c.split_size, 16 << 20);
        assert!(c.register_buffers);
    }

    /// CI and developer machines have no libcufile; on a machine that has one this checks
    /// nothing and says so.
    #[test]
    fn a_missing_library_is_reported_with_what_to_do() {
        match check_library() {
            Ok(()) => eprintln!("libcufile is present here; the missing-library message is not exercised"),
            Err(Error::Unavailable { what, reason }) => {
                eprintln!("{reason}");
                assert_eq!(what, "cuFile");
                assert!(reason.starts_with("libcufile.so not found"), "{reason}");
                assert!(reason.contains("the uring backend"), "{reason}");
                if !reason.contains(" is there") {
                    assert_eq!(reason, driver::MISSING_LIBRARY);
                }
                let shown = Error::Unavailable { what, reason }.to_string();
                assert!(
                    shown.starts_with("cuFile is unavailable: libcufile.so not found"),
                    "{shown}"
                );
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }

    #[test]
    fn probe_never_panics_and_names_libcufile_when_missing() {
        let p = probe();
        match &p.library {
            Ok(path) => eprintln!("libcufile present at {path}: {p:?}"),
            Err(why) => {
                assert!(why.contains("libcufile"), "{why}");
                assert!(p.gds_mode.is_none() && p.version.is_none() && p.nvfs_version.is_none());
                assert!(p.details.iter().any(|(k, _)| k == "nvidia-fs module"));
            }
        }
        // A second probe gives the same answer (nothing cached wrongly, no panic).
        assert_eq!(probe().library.is_ok(), p.library.is_ok());
    }

    #[test]
    fn off_t_overflow_is_detected() {
        assert!(!fits_off_t(u64::MAX, 1));
        assert!(!fits_off_t(i64::MAX as u64, 1));
        assert!(fits_off_t(1 << 40, 4096));
    }
}
