//! The process-wide cuFile driver: whether libcufile can be loaded, `cuFileDriverOpen`
//! (once per process, never closed by spillway), the driver properties, and which data path
//! cuFile takes.
//!
//! # GDS vs compat: the rule
//!
//! The mode is read from what cuFile and the kernel report, never guessed
//! ([`detect_mode`]; sources: cufile.h of GDS 1.20, the cuFile API reference's
//! "cuFile Compatibility Mode" section, the GDS configuration guide, the "GDS support for
//! NVMe using PCI P2PDMA" guide). First rule that matches wins:
//!
//! 1. **Compat, forced**: the environment variable `CUFILE_FORCE_COMPAT_MODE` is true
//!    (`true`/`1`/`yes`/`on`), or cuFile's parameter `force_compat_mode`
//!    (`properties.force_compat_mode` in cufile.json, read back with
//!    `cuFileGetParameterBool` where the library has it, GDS ≥ 1.14) is true, or the
//!    driver's control flags (`nvfs.dcontrolflags`) carry `CU_FILE_VANILLA_POSIX_IO_MODE`
//!    (bit 2, `properties.posix_io_mode`).
//! 2. **P2PDMA**: the driver reports NVMe over PCI P2PDMA — status flag
//!    `CU_FILE_NVME_P2P_SUPPORTED` (bit 11 of `nvfs.dstatusflags`, GDS 1.12–1.15) or the
//!    `CUFILE_P2PDMA` bit of `cuFileDriverGetP2PFlags(CU_FILE_NVME_SUPPORTED)` (GDS ≥ 1.16) —
//!    and the parameter `use_pci_p2pdma` is not false; when rule 3 holds as well, P2PDMA
//!    wins only if `use_pci_p2pdma` is known to be true.
//! 3. **nvidia-fs**: `/proc/driver/nvidia-fs/version` exists (the module is loaded), the
//!    driver properties report an nvidia-fs version other than 0.0 (cuFile talks to it), and
//!    NVMe is supported through it: status flag `CU_FILE_NVME_SUPPORTED` (bit 4 of
//!    `nvfs.dstatusflags`) or the `CUFILE_NVFS` bit of the P2P flags above.
//! 4. **Compat** otherwise: cuFile moves the data with POSIX I/O through host bounce
//!    buffers inside libcufile (what it does when nvidia-fs is not loaded, per the API
//!    reference).
//!
//! The mode is the one cuFile uses for local NVMe (ext4/xfs). A target on another kind of
//! storage may still go through compat mode: `Backend::open` warns when the mode is a direct
//! one but the target is not on an NVMe device.

use std::ffi::{c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cudarc::cufile::sys;
use cudarc::driver::CudaContext;
use spillway_runtime::{Error, Result};

use crate::GdsMode;

use crate::status::status_text;

/// The reason given when libcufile cannot be loaded.
pub(crate) const MISSING_LIBRARY: &str = "libcufile.so not found: install NVIDIA GPUDirect Storage (libcufile) or add its directory (e.g. /usr/local/cuda/lib64) to LD_LIBRARY_PATH; or use the uring backend";

/// Where the nvidia-fs kernel module shows its version while it is loaded.
pub(crate) const NVFS_PROC: &str = "/proc/driver/nvidia-fs/version";

/// The environment variable with which cuFile forces compatibility mode.
pub(crate) const FORCE_COMPAT_ENV: &str = "CUFILE_FORCE_COMPAT_MODE";

/// Bits of `CUfileDrvProps`' flag words (each flag is `1 << enum value`, as in cufile.h).
pub(crate) mod bits {
    use cudarc::cufile::sys::{CUfileDriverControlFlags as C, CUfileDriverStatusFlags as S};

    /// `CU_FILE_NVME_SUPPORTED` in `nvfs.dstatusflags`.
    pub const NVME: u32 = 1 << S::CU_FILE_NVME_SUPPORTED as u32;
    /// `CU_FILE_NVME_P2P_SUPPORTED` in `nvfs.dstatusflags` (deprecated in GDS 1.16).
    pub const NVME_P2P: u32 = 1 << S::CU_FILE_NVME_P2P_SUPPORTED as u32;
    /// `CU_FILE_USE_POLL_MODE` in `nvfs.dcontrolflags`.
    pub const POLL_MODE: u32 = 1 << C::CU_FILE_USE_POLL_MODE as u32;
    /// `CU_FILE_ALLOW_COMPAT_MODE` in `nvfs.dcontrolflags`.
    pub const ALLOW_COMPAT: u32 = 1 << C::CU_FILE_ALLOW_COMPAT_MODE as u32;
    /// `CU_FILE_VANILLA_POSIX_IO_MODE` (= 2) in `nvfs.dcontrolflags` (GDS ≥ 1.16; the CUDA 13.0
    /// bindings predate it).
    pub const POSIX_IO_MODE: u32 = 1 << 2;
    /// `CU_FILE_FALLBACK_IO_MODE` (= 4) in `nvfs.dcontrolflags` (GDS ≥ 1.16).
    pub const FALLBACK_IO_MODE: u32 = 1 << 4;
    /// `CU_FILE_P2P_FLAG_PCI_P2PDMA` of `cuFileDriverGetP2PFlags`.
    pub const P2P_PCI_P2PDMA: u32 = 1 << 0;
    /// `CU_FILE_P2P_FLAG_NVFS` of `cuFileDriverGetP2PFlags`.
    pub const P2P_NVFS: u32 = 1 << 1;
}

const STATUS_NAMES: &[(u32, &str)] = &[
    (0, "lustre"),
    (1, "wekafs"),
    (2, "nfs"),
    (3, "gpfs"),
    (4, "nvme"),
    (5, "nvmeof"),
    (6, "scsi"),
    (7, "scaleflux-csd"),
    (8, "nvmesh"),
    (9, "beegfs"),
    (11, "nvme-p2pdma"),
    (12, "scatefs"),
    (13, "virtiofs"),
    (14, "panfs"),
];

const FEATURE_NAMES: &[(u32, &str)] = &[
    (0, "dynamic-routing"),
    (1, "batch-io"),
    (2, "streams"),
    (3, "parallel-io"),
    (4, "pci-p2pdma"),
];

/// The fields of `CUfileDrvProps` spillway reads, as plain numbers (sizes in KiB, as cuFile
/// keeps them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DriverProps {
    pub nvfs_major: u32,
    pub nvfs_minor: u32,
    pub poll_thresh_kb: usize,
    pub max_direct_io_kb: usize,
    pub dstatusflags: u32,
    pub dcontrolflags: u32,
    pub fflags: u32,
    pub max_device_cache_kb: u32,
    pub per_buffer_cache_kb: u32,
    pub max_device_pinned_mem_kb: u32,
    pub max_batch_io_size: u32,
}

impl From<sys::CUfileDrvProps> for DriverProps {
    fn from(p: sys::CUfileDrvProps) -> Self {
        DriverProps {
            nvfs_major: p.nvfs.major_version,
            nvfs_minor: p.nvfs.minor_version,
            poll_thresh_kb: p.nvfs.poll_thresh_size,
            max_direct_io_kb: p.nvfs.max_direct_io_size,
            dstatusflags: p.nvfs.dstatusflags,
            dcontrolflags: p.nvfs.dcontrolflags,
            fflags: p.fflags,
            max_device_cache_kb: p.max_device_cache_size,
            per_buffer_cache_kb: p.per_buffer_cache_size,
            max_device_pinned_mem_kb: p.max_device_pinned_mem_size,
            max_batch_io_size: p.max_batch_io_size,
        }
    }
}

/// Everything [`detect_mode`] looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ModeInputs {
    /// `cuFileDriverGetProperties` after `cuFileDriverOpen` (`None`: the call failed).
    pub props: Option<DriverProps>,
    /// Whether [`NVFS_PROC`] exists.
    pub nvfs_loaded: bool,
    /// The value of [`FORCE_COMPAT_ENV`], if set.
    pub force_compat_env: Option<String>,
    /// `cuFileGetParameterBool(CUFILE_PARAM_FORCE_COMPAT_MODE)`, where available.
    pub force_compat_param: Option<bool>,
    /// `cuFileGetParameterBool(CUFILE_PARAM_USE_PCIP2PDMA)`, where available.
    pub use_pci_p2pdma_param: Option<bool>,
    /// `cuFileDriverGetP2PFlags(CU_FILE_NVME_SUPPORTED)`, where available.
    pub nvme_p2p_flags: Option<u32>,
}

/// True for the values cuFile and spillway read as "on".
pub(crate) fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// The data path cuFile takes, and why (see the module documentation for the rule).
pub(crate) fn detect_mode(i: &ModeInputs) -> (GdsMode, String) {
    if let Some(v) = i.force_compat_env.as_deref().filter(|v| truthy(v)) {
        return (
            GdsMode::Compat,
            format!("{FORCE_COMPAT_ENV}={v} forces compatibility mode"),
        );
    }
    if i.force_compat_param == Some(true) {
        return (
            GdsMode::Compat,
            "cuFile's force_compat_mode parameter is true (cufile.json properties.force_compat_mode)".into(),
        );
    }
    let Some(p) = i.props else {
        return (
            GdsMode::Compat,
            "cuFileDriverGetProperties failed, so no direct path is known to be available".into(),
        );
    };
    if p.dcontrolflags & bits::POSIX_IO_MODE != 0 {
        return (
            GdsMode::Compat,
            "the driver's control flags select plain POSIX I/O (properties.posix_io_mode)".into(),
        );
    }
    let p2p_flags = i.nvme_p2p_flags.unwrap_or(0);
    let nvfs_version = (p.nvfs_major, p.nvfs_minor) != (0, 0);
    let nvfs_nvme = p.dstatusflags & bits::NVME != 0 || p2p_flags & bits::P2P_NVFS != 0;
    let nvfs = i.nvfs_loaded && nvfs_version && nvfs_nvme;
    let p2p_reported = p.dstatusflags & bits::NVME_P2P != 0 || p2p_flags & bits::P2P_PCI_P2PDMA != 0;
    let p2p = p2p_reported && i.use_pci_p2pdma_param != Some(false);

    if p2p && (!nvfs || i.use_pci_p2pdma_param == Some(true)) {
        let source = if p2p_flags & bits::P2P_PCI_P2PDMA != 0 {
            "cuFileDriverGetP2PFlags(NVMe) has CUFILE_P2PDMA"
        } else {
            "the driver status flags have CU_FILE_NVME_P2P_SUPPORTED"
        };
        return (GdsMode::P2pDma, format!("{source}: NVMe through PCI P2PDMA"));
    }
    if nvfs {
        return (
            GdsMode::NvidiaFs,
            format!(
                "nvidia-fs {}.{} is loaded ({NVFS_PROC}) and the driver reports NVMe support through it",
                p.nvfs_major, p.nvfs_minor
            ),
        );
    }
    let mut missing = Vec::new();
    if !i.nvfs_loaded {
        missing.push(format!("nvidia-fs is not loaded (no {NVFS_PROC})"));
    } else if !nvfs_version {
        missing
            .push("nvidia-fs is loaded but cuFile reports no nvidia-fs version (it is not using it)".into());
    } else if !nvfs_nvme {
        missing.push("the driver reports no NVMe support through nvidia-fs".into());
    }
    if p2p_reported {
        missing.push("PCI P2PDMA is reported but use_pci_p2pdma is false".into());
    } else {
        missing.push("the driver reports no NVMe PCI P2PDMA support".into());
    }
    (
        GdsMode::Compat,
        format!("{}: cuFile uses compatibility mode", missing.join("; ")),
    )
}

/// Runs `f`, turning a panic (cudarc panics when a library or symbol is missing) into
/// [`Error::Unavailable`].
pub(crate) fn guarded<R>(what: &str, f: impl FnOnce() -> R) -> Result<R> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Error::Unavailable {
            what: "cuFile".into(),
            reason: format!("{what} failed inside the CUDA bindings: {msg}"),
        }
    })
}

/// Checks that libcufile can be loaded, without calling into it.
///
/// The error is [`Error::Unavailable`] with `what` "cuFile" and a reason that names
/// libcufile and says what to do.
pub fn check_library() -> Result<()> {
    // SAFETY: is_culib_present only tries to dlopen the candidate library names.
    let present = catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
    if present {
        Ok(())
    } else {
        Err(Error::Unavailable {
            what: "cuFile".into(),
            reason: missing_reason(),
        })
    }
}

fn missing_reason() -> String {
    match find_versioned_only() {
        Some(found) => {
            let dir = found.parent().unwrap_or(Path::new("."));
            format!(
                "libcufile.so not found, but {} is there: cudarc loads libcufile.so (the name the CUDA toolkit's development files add); run `ln -s {} {}/libcufile.so` (or install the libcufile development package) and add {} to LD_LIBRARY_PATH; or use the uring backend",
                found.display(),
                found.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                dir.display(),
                dir.display()
            )
        }
        None => MISSING_LIBRARY.to_string(),
    }
}

/// A runtime-only `libcufile.so.0` in a usual directory, which cudarc's loader does not try.
fn find_versioned_only() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    for d in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
        "/usr/local/cuda/targets/sbsa-linux/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter()
        .map(|d| d.join("libcufile.so.0"))
        .find(|p| p.exists())
}

/// Whether the loaded libcufile exports `name` (newer entry points are looked up before use,
/// since cudarc panics on a missing symbol). Call only after [`check_library`] succeeded.
pub(crate) fn has_symbol(name: &str) -> bool {
    catch_unwind(|| {
        // SAFETY: the library is present (checked by the caller); `get` only looks the
        // symbol up, and the pointer type matches the size libloading requires.
        unsafe { sys::culib().get::<*const c_void>(name.as_bytes()) }.is_ok()
    })
    .unwrap_or(false)
}

/// The path of the loaded libcufile (from `dladdr` on one of its functions), or its name.
pub(crate) fn library_path() -> String {
    let found = catch_unwind(|| {
        // SAFETY: library present (checked by the caller); only looks the symbol up.
        let sym = unsafe { sys::culib().get::<unsafe extern "C" fn()>(b"cuFileDriverOpen") }.ok()?;
        let addr = *sym as *const c_void;
        // SAFETY: Dl_info is plain old data that dladdr fills.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: addr is the address of a function in a loaded library; info is writable.
        let rc = unsafe { libc::dladdr(addr, &mut info) };
        if rc == 0 || info.dli_fname.is_null() {
            return None;
        }
        // SAFETY: dladdr set dli_fname to a NUL-terminated string owned by the loader.
        Some(
            unsafe { CStr::from_ptr(info.dli_fname) }
                .to_string_lossy()
                .into_owned(),
        )
    })
    .ok()
    .flatten();
    found.unwrap_or_else(|| "libcufile.so".into())
}

/// `cuFileGetVersion` (GDS ≥ 1.8): 1000 × major + 10 × minor + patch.
pub(crate) fn library_version() -> Option<i32> {
    if !has_symbol("cuFileGetVersion") {
        return None;
    }
    let mut v: libc::c_int = 0;
    // SAFETY: the symbol exists; v is a valid out-pointer.
    let st = guarded("cuFileGetVersion", || unsafe { sys::cuFileGetVersion(&mut v) }).ok()?;
    (st.err == sys::CUfileOpError::CU_FILE_SUCCESS && v > 0).then_some(v)
}

/// "1.15.1" for 1151.
pub(crate) fn version_string(v: i32) -> String {
    format!("{}.{}.{}", v / 1000, (v % 1000) / 10, v % 10)
}

/// The first libcufile whose `cuFileRead`/`cuFileWrite` take host memory: GDS 1.8 (CUDA
/// 12.3), whose cufile.h renamed `devPtr_base` to `bufPtr_base`, "base address of buffer in
/// device or host memory", and which added `cuFileGetVersion`.
pub(crate) const HOST_MEMORY_SINCE: i32 = 1080;

fn param_bool(p: sys::CUFileBoolConfigParameter_t) -> Option<bool> {
    if !has_symbol("cuFileGetParameterBool") {
        return None;
    }
    let mut v = false;
    // SAFETY: the symbol exists; v is a valid bool out-pointer (cuFile writes 0 or 1).
    let st = guarded("cuFileGetParameterBool", || unsafe {
        sys::cuFileGetParameterBool(p, &mut v)
    })
    .ok()?;
    (st.err == sys::CUfileOpError::CU_FILE_SUCCESS).then_some(v)
}

/// `CUfileError_t` with plain integers, so that a status code unknown to the bindings is
/// still a valid value.
#[repr(C)]
struct RawStatus {
    err: u32,
    cu_err: u32,
}

/// `cuFileDriverGetP2PFlags(CU_FILE_NVME_SUPPORTED, &flags)` (GDS ≥ 1.16, newer than the
/// CUDA 13.0 bindings, so looked up by name with the signature from cufile.h).
fn nvme_p2p_flags() -> Option<u32> {
    type GetP2PFlags = unsafe extern "C" fn(u32, *mut u32) -> RawStatus;
    guarded("cuFileDriverGetP2PFlags", || {
        // SAFETY: library present; the type is the C signature (two enums passed as
        // 32-bit integers, a 32-bit enum out-pointer, a struct of two 32-bit enums).
        let f = unsafe { sys::culib().get::<GetP2PFlags>(b"cuFileDriverGetP2PFlags") }.ok()?;
        let mut flags = 0u32;
        // SAFETY: flags is a valid out-pointer; the driver is open (the caller opened it).
        let st = unsafe {
            f(
                sys::CUfileDriverStatusFlags::CU_FILE_NVME_SUPPORTED as u32,
                &mut flags,
            )
        };
        let _ = st.cu_err;
        (st.err == 0).then_some(flags)
    })
    .ok()
    .flatten()
}

fn read_props() -> std::result::Result<DriverProps, String> {
    let mut props = std::mem::MaybeUninit::<sys::CUfileDrvProps>::zeroed();
    // SAFETY: props is writable and sized for the struct; all its fields are integers, so
    // the zeroed value is valid even if the call writes nothing.
    let st = guarded("cuFileDriverGetProperties", || unsafe {
        sys::cuFileDriverGetProperties(props.as_mut_ptr())
    })
    .map_err(|e| e.to_string())?;
    if st.err != sys::CUfileOpError::CU_FILE_SUCCESS {
        return Err(status_text(&st));
    }
    // SAFETY: zero-initialised integers, possibly overwritten by the library.
    Ok(unsafe { props.assume_init() }.into())
}

/// The opened driver and what was found about it.
#[derive(Debug)]
pub(crate) struct Driver {
    pub library: String,
    pub version: Option<i32>,
    pub props_error: Option<String>,
    pub inputs: ModeInputs,
    pub mode: GdsMode,
    pub why: String,
    pub allow_system_memory: Option<bool>,
}

static DRIVER: OnceLock<Driver> = OnceLock::new();
static OPENING: Mutex<()> = Mutex::new(());

/// The process-wide driver, opened on first use. A failed open is not remembered, so a later
/// call (e.g. once a CUDA context is current) tries again.
pub(crate) fn driver() -> Result<&'static Driver> {
    if let Some(d) = DRIVER.get() {
        return Ok(d);
    }
    let _one_at_a_time = OPENING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = DRIVER.get() {
        return Ok(d);
    }
    check_library()?;
    let d = guarded("opening the cuFile driver", open_now)??;
    Ok(DRIVER.get_or_init(|| d))
}

fn open_now() -> Result<Driver> {
    // libcufile (seen with 1.20) reads /proc/modules while opening and loops forever when it
    // cannot; some sandboxes have no such file. Refuse up front instead of hanging.
    if std::fs::File::open("/proc/modules").is_err() {
        return Err(Error::Unavailable {
            what: "cuFile".into(),
            reason: "/proc/modules cannot be read here (a sandbox or restricted container?), and libcufile does not return from cuFileDriverOpen without it; use the uring backend".into(),
        });
    }
    // SAFETY: the library is present (checked); cuFileDriverOpen takes no arguments.
    let st = unsafe { sys::cuFileDriverOpen() };
    if st.err != sys::CUfileOpError::CU_FILE_SUCCESS {
        return Err(Error::Unavailable {
            what: "cuFile".into(),
            reason: format!(
                "cuFileDriverOpen failed: {}; check the GDS installation with gdscheck -p (in /usr/local/cuda/gds/tools), or use the uring backend",
                status_text(&st)
            ),
        });
    }
    let (props, props_error) = match read_props() {
        Ok(p) => (Some(p), None),
        Err(e) => (None, Some(e)),
    };
    let inputs = ModeInputs {
        props,
        nvfs_loaded: Path::new(NVFS_PROC).exists(),
        force_compat_env: std::env::var(FORCE_COMPAT_ENV).ok(),
        force_compat_param: param_bool(sys::CUFileBoolConfigParameter_t::CUFILE_PARAM_FORCE_COMPAT_MODE),
        use_pci_p2pdma_param: param_bool(sys::CUFileBoolConfigParameter_t::CUFILE_PARAM_USE_PCIP2PDMA),
        nvme_p2p_flags: nvme_p2p_flags(),
    };
    let (mode, why) = detect_mode(&inputs);
    let d = Driver {
        library: library_path(),
        version: library_version(),
        props_error,
        allow_system_memory: param_bool(
            sys::CUFileBoolConfigParameter_t::CUFILE_PARAM_PROPERTIES_ALLOW_SYSTEM_MEMORY,
        ),
        inputs,
        mode,
        why,
    };
    tracing::info!(mode = mode.as_str(), why = %d.why, library = %d.library, "cuFile driver opened");
    Ok(d)
}

impl Driver {
    /// The nvidia-fs version cuFile reports, when it reports one.
    pub fn nvfs_version(&self) -> Option<(u32, u32)> {
        self.inputs
            .props
            .map(|p| (p.nvfs_major, p.nvfs_minor))
            .filter(|v| *v != (0, 0))
    }

    /// Whether `cuFileRead`/`cuFileWrite` of this library take host memory.
    pub fn host_memory(&self) -> bool {
        self.version.is_some_and(|v| v >= HOST_MEMORY_SINCE)
    }

    /// Versions, properties and the mode decision, for reports.
    pub fn details(&self) -> Vec<(String, String)> {
        let mut d = vec![
            ("library".to_string(), self.library.clone()),
            (
                "libcufile version".to_string(),
                self.version
                    .map(version_string)
                    .unwrap_or_else(|| "unknown (no cuFileGetVersion: GDS before 1.8)".into()),
            ),
            ("gds mode".to_string(), self.mode.as_str().to_string()),
            ("gds mode because".to_string(), self.why.clone()),
            (
                "nvidia-fs".to_string(),
                match (self.nvfs_version(), self.inputs.nvfs_loaded) {
                    (Some((a, b)), _) => format!("{a}.{b}"),
                    (None, true) => "loaded, but cuFile reports no version".into(),
                    (None, false) => "not loaded".into(),
                },
            ),
        ];
        if let Some(e) = &self.props_error {
            d.push(("driver properties".into(), format!("unavailable: {e}")));
        }
        if let Some(p) = self.inputs.props {
            d.push((
                "poll mode".into(),
                if p.dcontrolflags & bits::POLL_MODE != 0 {
                    format!("on (up to {} KiB)", p.poll_thresh_kb)
                } else {
                    "off".into()
                },
            ));
            d.push((
                "allow compat mode".into(),
                (p.dcontrolflags & bits::ALLOW_COMPAT != 0).to_string(),
            ));
            if p.dcontrolflags & bits::FALLBACK_IO_MODE != 0 {
                d.push(("gds fallback io".into(), "true".into()));
            }
            d.push(("max direct io size".into(), format!("{} KiB", p.max_direct_io_kb)));
            d.push((
                "max device cache size".into(),
                format!("{} KiB", p.max_device_cache_kb),
            ));
            d.push((
                "per buffer cache size".into(),
                format!("{} KiB", p.per_buffer_cache_kb),
            ));
            d.push((
                "max pinned memory".into(),
                format!("{} KiB", p.max_device_pinned_mem_kb),
            ));
            d.push(("max batch io size".into(), p.max_batch_io_size.to_string()));
            d.push((
                "supported storage".into(),
                flag_names(p.dstatusflags, STATUS_NAMES),
            ));
            d.push(("features".into(), flag_names(p.fflags, FEATURE_NAMES)));
        }
        if let Some(f) = self.inputs.nvme_p2p_flags {
            d.push(("nvme p2p flags".into(), format!("{f:#x}")));
        }
        for (k, v) in [
            ("force compat mode", self.inputs.force_compat_param),
            ("use pci p2pdma", self.inputs.use_pci_p2pdma_param),
            ("allow system memory", self.allow_system_memory),
        ] {
            if let Some(v) = v {
                d.push((k.into(), v.to_string()));
            }
        }
        if let Some(v) = &self.inputs.force_compat_env {
            d.push((FORCE_COMPAT_ENV.into(), v.clone()));
        }
        d
    }
}

fn flag_names(word: u32, names: &[(u32, &str)]) -> String {
    let mut out: Vec<String> = names
        .iter()
        .filter(|(bit, _)| word & (1 << bit) != 0)
        .map(|(_, n)| n.to_string())
        .collect();
    let known = names.iter().fold(0u32, |m, (bit, _)| m | (1 << bit));
    if word & !known != 0 {
        out.push(format!("other bits {:#x}", word & !known));
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

/// Makes `ctx` current on the calling thread. Unlike `CudaContext::bind_to_thread` it leaves
/// the context's recorded asynchronous errors alone: those belong to the code that caused
/// them, not to the I/O that happens to run next.
pub(crate) fn make_current(ctx: &CudaContext) -> std::result::Result<(), String> {
    use cudarc::driver::result::ctx as cuctx;
    let current = cuctx::get_current().map_err(|e| format!("cuCtxGetCurrent failed: {e}"))?;
    if current != Some(ctx.cu_ctx()) {
        // SAFETY: the context is alive (we hold a reference to its owner).
        unsafe { cuctx::set_current(ctx.cu_ctx()) }
            .map_err(|e| format!("making the GPU's CUDA context current failed: {e}"))?;
    }
    Ok(())
}

/// Runs `f` with `ctx` current on the calling thread, then makes the previously current
/// context (if any) current again, so callers' threads are left as they were.
pub(crate) fn with_context<R>(ctx: &CudaContext, f: impl FnOnce() -> R) -> Result<R> {
    use cudarc::driver::result::ctx as cuctx;
    let prev = guarded("cuCtxGetCurrent", cuctx::get_current)?
        .map_err(|e| Error::Device(format!("cuCtxGetCurrent failed: {e}")))?;
    guarded("cuCtxSetCurrent", || make_current(ctx))?.map_err(Error::Device)?;
    let r = f();
    if prev != Some(ctx.cu_ctx()) {
        // SAFETY: prev was current on this thread a moment ago (or null, which unbinds).
        let _ = unsafe { cuctx::set_current(prev.unwrap_or(std::ptr::null_mut())) };
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props() -> DriverProps {
        DriverProps {
            max_direct_io_kb: 16384,
            dcontrolflags: bits::ALLOW_COMPAT,
            ..DriverProps::default()
        }
    }

    fn inputs(p: DriverProps) -> ModeInputs {
        ModeInputs {
            props: Some(p),
            ..ModeInputs::default()
        }
    }

    #[test]
    fn no_nvidia_fs_and_no_p2pdma_is_compat() {
        let (mode, why) = detect_mode(&inputs(props()));
        assert_eq!(mode, GdsMode::Compat);
        assert!(why.contains("nvidia-fs is not loaded"), "{why}");
        // The library may report NVMe support (e.g. staged defaults) while nvidia-fs is absent.
        let mut p = props();
        p.dstatusflags = bits::NVME;
        p.nvfs_major = 2;
        assert_eq!(detect_mode(&inputs(p)).0, GdsMode::Compat);
    }

    #[test]
    fn nvidia_fs_needs_the_module_a_version_and_nvme_support() {
        let mut p = props();
        p.nvfs_major = 2;
        p.nvfs_minor = 26;
        p.dstatusflags = bits::NVME;
        let mut i = inputs(p);
        i.nvfs_loaded = true;
        let (mode, why) = detect_mode(&i);
        assert_eq!(mode, GdsMode::NvidiaFs);
        assert!(why.contains("2.26"), "{why}");

        let mut no_version = i.clone();
        no_version.props.as_mut().unwrap().nvfs_major = 0;
        no_version.props.as_mut().unwrap().nvfs_minor = 0;
        let (mode, why) = detect_mode(&no_version);
        assert_eq!(mode, GdsMode::Compat);
        assert!(why.contains("no nvidia-fs version"), "{why}");

        let mut no_nvme = i.clone();
        no_nvme.props.as_mut().unwrap().dstatusflags = 0;
        assert_eq!(detect_mode(&no_nvme).0, GdsMode::Compat);
        no_nvme.nvme_p2p_flags = Some(bits::P2P_NVFS);
        assert_eq!(detect_mode(&no_nvme).0, GdsMode::NvidiaFs);
    }

    #[test]
    fn p2pdma_from_the_status_flag_or_the_p2p_flags() {
        let mut p = props();
        p.dstatusflags = bits::NVME_P2P;
        assert_eq!(detect_mode(&inputs(p)).0, GdsMode::P2pDma);

        let mut i = inputs(props());
        i.nvme_p2p_flags = Some(bits::P2P_PCI_P2PDMA);
        assert_eq!(detect_mode(&i).0, GdsMode::P2pDma);

        i.use_pci_p2pdma_param = Some(false);
        let (mode, why) = detect_mode(&i);
        assert_eq!(mode, GdsMode::Compat);
        assert!(why.contains("use_pci_p2pdma is false"), "{why}");
    }

    #[test]
    fn with_both_paths_p2pdma_wins_only_when_asked_for() {
        let mut p = props();
        p.nvfs_major = 2;
        p.nvfs_minor = 17;
        p.dstatusflags = bits::NVME | bits::NVME_P2P;
        let mut i = inputs(p);
        i.nvfs_loaded = true;
        assert_eq!(detect_mode(&i).0, GdsMode::NvidiaFs);
        i.use_pci_p2pdma_param = Some(true);
        assert_eq!(detect_mode(&i).0, GdsMode::P2pDma);
    }

    #[test]
    fn forcing_compat_wins_over_everything() {
        let mut p = props();
        p.nvfs_major = 2;
        p.dstatusflags = bits::NVME | bits::NVME_P2P;
        let mut i = inputs(p);
        i.nvfs_loaded = true;

        let mut env = i.clone();
        env.force_compat_env = Some("TRUE".into());
        let (mode, why) = detect_mode(&env);
        assert_eq!(mode, GdsMode::Compat);
        assert!(why.contains(FORCE_COMPAT_ENV), "{why}");
        env.force_compat_env = Some("false".into());
        assert_ne!(detect_mode(&env).0, GdsMode::Compat);

        let mut param = i.clone();
        param.force_compat_param = Some(true);
        assert_eq!(detect_mode(&param).0, GdsMode::Compat);

        let mut posix = i.clone();
        posix.props.as_mut().unwrap().dcontrolflags |= bits::POSIX_IO_MODE;
        assert_eq!(detect_mode(&posix).0, GdsMode::Compat);

        let mut no_props = i;
        no_props.props = None;
        assert_eq!(detect_mode(&no_props).0, GdsMode::Compat);
    }

    #[test]
    fn the_flag_bits_match_cufile_h() {
        assert_eq!(bits::NVME, 1 << 4);
        assert_eq!(bits::NVME_P2P, 1 << 11);
        assert_eq!(bits::POLL_MODE, 1);
        assert_eq!(bits::ALLOW_COMPAT, 2);
        assert_eq!(
            flag_names(bits::NVME | bits::NVME_P2P, STATUS_NAMES),
            "nvme, nvme-p2pdma"
        );
        assert_eq!(flag_names(0, FEATURE_NAMES), "none");
        assert_eq!(flag_names(1 << 20, FEATURE_NAMES), "other bits 0x100000");
    }

    #[test]
    fn versions_are_spelled_out() {
        assert_eq!(version_string(1151), "1.15.1");
        assert_eq!(version_string(1070), "1.7.0");
        assert!(truthy(" Yes ") && truthy("1") && !truthy("0") && !truthy("no"));
    }
}
