//! Finding the CUDA driver and the GPUs. Nothing here panics, also with no driver
//! installed: cudarc loads libcuda lazily and panics when it is missing, so every path
//! checks for the library first ([`driver_library`]).

use std::ffi::{c_void, CStr};
use std::sync::OnceLock;

use cudarc::driver::result::DriverError;
use cudarc::driver::sys::{self, CUdevice_attribute, CUresult};
use spillway_runtime::{Error, Result};

use super::error::{describe, explain};
use super::raw;

/// What [`probe`] found: the driver and the GPUs it sees.
#[derive(Clone, Debug)]
pub struct CudaProbe {
    /// The driver, or why there is none usable (no libcuda, cuInit failed…).
    pub driver: std::result::Result<DriverInfo, String>,
    /// The GPUs the driver sees, by ordinal (empty without a driver).
    pub gpus: Vec<GpuInfo>,
    /// Problems that did not stop the probe (a GPU that could not be queried, no GPU
    /// visible to a working driver…).
    pub warnings: Vec<String>,
}

/// The CUDA driver in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverInfo {
    /// The CUDA version the driver supports (cuDriverGetVersion), e.g. (12, 4).
    pub cuda_version: (u32, u32),
    /// The libcuda that was loaded: its path, and the file it links to when it is a link,
    /// e.g. "/usr/lib/x86_64-linux-gnu/libcuda.so.1 (libcuda.so.550.54.15)".
    pub library: String,
}

/// One GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// CUDA ordinal (after CUDA_VISIBLE_DEVICES).
    pub ordinal: usize,
    /// Product name, e.g. "NVIDIA H200".
    pub name: String,
    /// Total memory in bytes.
    pub total_memory: u64,
    /// Compute capability (major, minor), e.g. (9, 0).
    pub compute_capability: (u32, u32),
    /// PCI address, e.g. "0000:17:00.0".
    pub pci_bus_id: String,
}

/// Reports the CUDA driver and the GPUs. Never panics, also with no driver installed (then
/// `driver` is an error that names libcuda and says what to install).
pub fn probe() -> CudaProbe {
    match std::panic::catch_unwind(probe_unguarded) {
        Ok(probe) => probe,
        Err(panic) => CudaProbe {
            driver: Err(format!(
                "probing the CUDA driver failed: {}",
                panic_message(&*panic)
            )),
            gpus: Vec::new(),
            warnings: Vec::new(),
        },
    }
}

fn probe_unguarded() -> CudaProbe {
    let mut probe = CudaProbe {
        driver: Err(String::new()),
        gpus: Vec::new(),
        warnings: Vec::new(),
    };
    let library = match driver_library() {
        Ok(library) => library.to_string(),
        Err(e) => {
            probe.driver = Err(e);
            return probe;
        }
    };
    let cuda_version = match raw::driver_version() {
        Ok(v) => v,
        Err(e) => {
            probe.driver = Err(format!(
                "{library} loaded, but cuDriverGetVersion failed: {}",
                explain(e)
            ));
            return probe;
        }
    };
    if let Err(e) = raw::init() {
        let (major, minor) = cuda_version;
        if e.0 == CUresult::CUDA_ERROR_NO_DEVICE {
            probe
                .warnings
                .push(format!("the driver sees no GPU{}", visible_devices_note()));
            probe.driver = Ok(DriverInfo {
                cuda_version,
                library,
            });
        } else {
            probe.driver = Err(format!(
                "{library} (CUDA {major}.{minor}) loaded, but cuInit failed: {}{}",
                explain(e),
                visible_devices_note()
            ));
        }
        return probe;
    }
    probe.driver = Ok(DriverInfo {
        cuda_version,
        library,
    });
    let count = match raw::device_count() {
        Ok(n) => n,
        Err(e) => {
            probe
                .warnings
                .push(format!("cuDeviceGetCount failed: {}", describe(e)));
            0
        }
    };
    if count == 0 {
        probe
            .warnings
            .push(format!("the driver sees no GPU{}", visible_devices_note()));
    }
    for ordinal in 0..count {
        match gpu_info(ordinal) {
            Ok(gpu) => probe.gpus.push(gpu),
            Err(e) => probe
                .warnings
                .push(format!("cannot query GPU {ordinal}: {}", describe(e))),
        }
    }
    probe
}

/// Describes GPU `ordinal` (the driver must be initialized).
pub(crate) fn gpu_info(ordinal: usize) -> std::result::Result<GpuInfo, DriverError> {
    let dev = raw::device(ordinal)?;
    let attr = |a| raw::device_attribute(dev, a).map(|v| v.max(0) as u32);
    Ok(GpuInfo {
        ordinal,
        name: raw::device_name(dev)?,
        total_memory: raw::device_total_memory(dev)?,
        compute_capability: (
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ),
        pci_bus_id: raw::device_pci_bus_id(dev)?,
    })
}

/// The loaded libcuda (see [`DriverInfo::library`]), or why there is none. Looked up once.
pub(crate) fn driver_library() -> std::result::Result<&'static str, String> {
    static LIBRARY: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    LIBRARY
        .get_or_init(|| {
            // SAFETY: only tries to dlopen the candidate names of libcuda.
            if unsafe { sys::is_culib_present() } {
                Ok(loaded_library().unwrap_or_else(|| "libcuda".to_string()))
            } else {
                Err(missing_library_message())
            }
        })
        .as_ref()
        .map(|s| s.as_str())
        .map_err(|e| e.clone())
}

/// Loads libcuda when present and initializes the driver. The errors are
/// [`Error::Unavailable`] with what to do.
pub(crate) fn init() -> Result<()> {
    let library = driver_library().map_err(unavailable)?;
    raw::init().map_err(|e| {
        if e.0 == CUresult::CUDA_ERROR_NO_DEVICE {
            unavailable(format!(
                "the NVIDIA driver ({library}) sees no GPU{}: check `nvidia-smi` and the /dev/nvidia* \
                 device files (in a container, run it with the GPUs passed through)",
                visible_devices_note()
            ))
        } else {
            unavailable(format!(
                "the NVIDIA driver ({library}) loaded, but cuInit failed: {}{}",
                explain(e),
                visible_devices_note()
            ))
        }
    })
}

/// An [`Error::Unavailable`] for CUDA.
pub(crate) fn unavailable(reason: String) -> Error {
    Error::Unavailable {
        what: "CUDA".to_string(),
        reason,
    }
}

/// " (CUDA_VISIBLE_DEVICES=…)" when that variable is set, else "".
pub(crate) fn visible_devices_note() -> String {
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) => format!(" (CUDA_VISIBLE_DEVICES={v})"),
        Err(_) => String::new(),
    }
}

fn missing_library_message() -> String {
    let mut names: Vec<String> = cudarc::get_lib_name_candidates("cuda")
        .into_iter()
        .filter(|n| n.starts_with("libcuda.so"))
        .collect();
    names.dedup();
    format!(
        "libcuda.so not found (searched the library path for {}): install the NVIDIA driver, or add \
         the directory holding libcuda.so.1 to LD_LIBRARY_PATH",
        names.join(", ")
    )
}

/// The path of the loaded libcuda, from the address of one of its symbols.
fn loaded_library() -> Option<String> {
    // SAFETY: only called once the library is known to load, so culib() does not panic;
    // `cuInit` is looked up as an address and never called here.
    let addr: *mut c_void = unsafe {
        let lib = sys::culib();
        let symbol = lib.get::<*mut c_void>(b"cuInit").ok()?;
        *symbol
    };
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: dladdr only reads `addr` and fills `info`.
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: on success dli_fname is a NUL-terminated path owned by the dynamic loader.
    let path = unsafe { CStr::from_ptr(info.dli_fname) }
        .to_string_lossy()
        .into_owned();
    let target = std::fs::canonicalize(&path)
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()));
    Some(match target {
        Some(file) if !path.ends_with(&file) => format!("{path} ({file})"),
        _ => path,
    })
}

/// The text of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
