//! Compiling the embedded CUDA C source with NVRTC, for kernels the build could not compile
//! with nvcc. NVRTC (libnvrtc) is loaded at run time, only when needed.
//!
//! When NVRTC knows the GPU's architecture it produces a CUBIN for it (`sm_XY`): machine code
//! that also loads on a driver older than NVRTC (CUDA minor-version compatibility), which
//! PTX would not. For a GPU newer than NVRTC it produces PTX for the newest architecture it
//! knows (`compute_XY`), which the driver JIT-compiles. Results are cached per (module,
//! target) for the life of the process.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, CString};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::result::{self as rtc, NvrtcError};
use cudarc::nvrtc::sys::{self, nvrtcProgram};
use spillway_runtime::{Error, Result};

use super::probe::panic_message;

/// What NVRTC produced.
#[derive(Debug)]
pub(crate) enum Code {
    /// Machine code for one architecture (an ELF image).
    Cubin(Vec<u8>),
    /// PTX, NUL-terminated.
    Ptx(CString),
}

/// A module compiled by NVRTC.
#[derive(Debug)]
pub(crate) struct Compiled {
    /// The code.
    pub(crate) code: Code,
    /// What it was compiled for: "sm_90" (CUBIN) or "compute_90" (PTX).
    pub(crate) target: String,
    /// NVRTC's version, (major, minor).
    pub(crate) version: (u32, u32),
}

/// Compiles the source of kernel module `name` for a GPU of compute capability `cc`, or
/// returns the code compiled earlier for the same target.
pub(crate) fn compile(name: &str, source: &str, cc: (u32, u32)) -> Result<Arc<Compiled>> {
    check_library()?;
    match std::panic::catch_unwind(|| compile_cached(name, source, cc)) {
        Ok(result) => result,
        Err(panic) => Err(Error::Device(format!(
            "NVRTC failed while compiling kernels/{name}.cu: {}",
            panic_message(&*panic)
        ))),
    }
}

/// Compiled code by (module name, target).
type Cache = HashMap<(String, String), Arc<Compiled>>;

fn compile_cached(name: &str, source: &str, cc: (u32, u32)) -> Result<Arc<Compiled>> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let version = version()?;
    let target = pick_target(cc, version, &supported_archs())?;
    let key = (name.to_string(), target.clone());
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(hit.clone());
    }
    let _span = tracing::debug_span!("nvrtc_compile", module = name, target = %target).entered();
    let failed = |what: &str, e: NvrtcError| {
        Error::Device(format!(
            "NVRTC {}.{}: {what} for kernels/{name}.cu ({target}) failed: {e:?}",
            version.0, version.1
        ))
    };
    let program = Program::new(name, source).map_err(|e| failed("nvrtcCreateProgram", e))?;
    program
        .compile(&[format!("--gpu-architecture={target}")])
        .map_err(|(e, log)| {
            Error::Device(format!(
                "NVRTC {}.{} failed to compile kernels/{name}.cu for {target}: {e:?}\n{log}",
                version.0, version.1
            ))
        })?;
    let code = if target.starts_with("sm_") {
        Code::Cubin(program.cubin().map_err(|e| failed("nvrtcGetCUBIN", e))?)
    } else {
        Code::Ptx(program.ptx().map_err(|e| failed("nvrtcGetPTX", e))?)
    };
    let compiled = Arc::new(Compiled {
        code,
        target,
        version,
    });
    tracing::debug!(
        module = name,
        target = %compiled.target,
        "compiled kernels with NVRTC {}.{}",
        version.0,
        version.1
    );
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, compiled.clone());
    Ok(compiled)
}

/// An NVRTC program, destroyed on drop.
struct Program {
    prog: nvrtcProgram,
    // Read by NVRTC until the program is destroyed.
    _source: CString,
    _name: CString,
}

impl Program {
    fn new(name: &str, source: &str) -> std::result::Result<Self, NvrtcError> {
        let invalid = NvrtcError(sys::nvrtcResult::NVRTC_ERROR_INVALID_INPUT);
        let source = CString::new(source).map_err(|_| invalid)?;
        let name = CString::new(format!("{name}.cu")).map_err(|_| invalid)?;
        let prog = rtc::create_program(&source, Some(&name))?;
        Ok(Program {
            prog,
            _source: source,
            _name: name,
        })
    }

    /// Compiles; the error comes with NVRTC's log.
    fn compile(&self, options: &[String]) -> std::result::Result<(), (NvrtcError, String)> {
        // SAFETY: `prog` is live (created in `new`, destroyed in drop); the options hold no NUL.
        unsafe { rtc::compile_program(self.prog, options) }.map_err(|e| (e, self.log()))
    }

    fn log(&self) -> String {
        // SAFETY: `prog` is live.
        match unsafe { rtc::get_program_log(self.prog) } {
            Ok(chars) => c_chars_to_string(&chars),
            Err(e) => format!("(no log: {e:?})"),
        }
    }

    fn ptx(&self) -> std::result::Result<CString, NvrtcError> {
        // SAFETY: `prog` is live and compiled.
        let chars = unsafe { rtc::get_ptx(self.prog) }?;
        CString::new(c_chars_to_string(&chars))
            .map_err(|_| NvrtcError(sys::nvrtcResult::NVRTC_ERROR_INVALID_PROGRAM))
    }

    fn cubin(&self) -> std::result::Result<Vec<u8>, NvrtcError> {
        let mut size: usize = 0;
        // SAFETY: `prog` is live and compiled; writes one size through a valid pointer.
        unsafe { sys::nvrtcGetCUBINSize(self.prog, &mut size) }.result()?;
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` has room for the `size` bytes the call writes.
        unsafe { sys::nvrtcGetCUBIN(self.prog, cubin.as_mut_ptr().cast::<c_char>()) }.result()?;
        Ok(cubin)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: `prog` was created in `new` and is destroyed only here.
        if let Err(e) = unsafe { rtc::destroy_program(self.prog) } {
            tracing::warn!("nvrtcDestroyProgram failed: {e:?}");
        }
    }
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// [`Error::Unavailable`] unless libnvrtc can be loaded.
pub(crate) fn check_library() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the candidate names of libnvrtc.
    if *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() }) {
        return Ok(());
    }
    let mut names: Vec<String> = cudarc::get_lib_name_candidates("nvrtc")
        .into_iter()
        .filter(|n| n.starts_with("libnvrtc.so"))
        .collect();
    names.dedup();
    Err(Error::Unavailable {
        what: "NVRTC".to_string(),
        reason: format!(
            "libnvrtc not found (searched the library path for {}): this build carries its GPU kernels \
             as CUDA C source ({}), which NVRTC compiles at first use; install NVRTC (the CUDA \
             toolkit, the cuda-nvrtc package, or pip's nvidia-cuda-nvrtc-cu12) and set \
             LD_LIBRARY_PATH to your CUDA toolkit's lib64 (or that package's lib directory), or \
             rebuild spillway where nvcc is available",
            names.join(", "),
            super::kernels::kernel_build()
        ),
    })
}

/// NVRTC's version (the library must be loadable).
fn version() -> Result<(u32, u32)> {
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints through valid pointers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Device(format!("nvrtcVersion failed: {e:?}")))?;
    Ok((major.max(0) as u32, minor.max(0) as u32))
}

/// The architectures NVRTC can compile for, e.g. [75, 80, 86, 89, 90, …] (empty if it
/// cannot say).
fn supported_archs() -> Vec<u32> {
    let mut n: c_int = 0;
    // SAFETY: writes one int through a valid pointer.
    if unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }
        .result()
        .is_err()
        || n <= 0
    {
        return Vec::new();
    }
    let mut archs: Vec<c_int> = vec![0; n as usize];
    // SAFETY: `archs` has room for the `n` ints the call writes.
    if unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .is_err()
    {
        return Vec::new();
    }
    archs.into_iter().filter(|a| *a > 0).map(|a| a as u32).collect()
}

/// "sm_XY" when NVRTC knows the GPU's architecture (or cannot list what it knows), else
/// "compute_XY" for the newest architecture it knows that the GPU can run.
fn pick_target(cc: (u32, u32), version: (u32, u32), archs: &[u32]) -> Result<String> {
    let want = cc.0 * 10 + cc.1;
    if archs.is_empty() || archs.contains(&want) {
        return Ok(format!("sm_{want}"));
    }
    match archs.iter().copied().filter(|a| *a <= want).max() {
        Some(best) => Ok(format!("compute_{best}")),
        None => Err(Error::Unavailable {
            what: "NVRTC".to_string(),
            reason: format!(
                "NVRTC {}.{} cannot generate code for a GPU of compute capability {}.{} (it supports \
                 {archs:?}); use an older CUDA toolkit's NVRTC",
                version.0, version.1, cc.0, cc.1
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::MODULES;

    #[test]
    fn the_target_is_the_gpus_own_architecture_when_nvrtc_knows_it() {
        let archs = [75, 80, 86, 89, 90, 100, 120];
        assert_eq!(pick_target((9, 0), (12, 9), &archs).unwrap(), "sm_90");
        assert_eq!(pick_target((8, 6), (12, 9), &archs).unwrap(), "sm_86");
        // A GPU newer than NVRTC: PTX for the newest architecture NVRTC knows.
        assert_eq!(pick_target((8, 7), (12, 9), &archs).unwrap(), "compute_86");
        assert_eq!(pick_target((13, 0), (12, 9), &archs).unwrap(), "compute_120");
        // NVRTC that cannot list its architectures: trust the GPU's.
        assert_eq!(pick_target((9, 0), (11, 0), &[]).unwrap(), "sm_90");
        // A GPU older than anything NVRTC supports.
        let e = pick_target((6, 0), (13, 0), &archs).unwrap_err();
        assert!(e.to_string().contains("compute capability 6.0"), "{e}");
    }

    /// Compiles every embedded kernel file for the architectures spillway targets, where
    /// libnvrtc is loadable (no GPU needed); elsewhere checks the error says what to do.
    #[test]
    fn nvrtc_compiles_the_embedded_kernels_or_says_what_is_missing() {
        if let Err(e) = check_library() {
            let text = e.to_string();
            assert!(
                matches!(&e, Error::Unavailable { what, .. } if what == "NVRTC"),
                "{e:?}"
            );
            assert!(
                text.contains("libnvrtc") && text.contains("LD_LIBRARY_PATH"),
                "{text}"
            );
            eprintln!("libnvrtc not found; compilation not tested: {text}");
            return;
        }
        assert!(!MODULES.is_empty());
        let newest = supported_archs().into_iter().max().unwrap_or(90);
        for module in MODULES {
            for cc in [
                (7, 5),
                (8, 0),
                (8, 6),
                (8, 9),
                (9, 0),
                (newest / 10, newest % 10),
                (99, 9),
            ] {
                let compiled = compile(module.name, module.source, cc)
                    .unwrap_or_else(|e| panic!("kernels/{}.cu for {cc:?}: {e}", module.name));
                let size = match &compiled.code {
                    Code::Cubin(cubin) => {
                        assert!(compiled.target.starts_with("sm_"), "{}", compiled.target);
                        assert_eq!(&cubin[..4], b"\x7fELF", "a CUBIN is an ELF image");
                        cubin.len()
                    }
                    Code::Ptx(ptx) => {
                        assert!(compiled.target.starts_with("compute_"), "{}", compiled.target);
                        let ptx = ptx.to_string_lossy();
                        assert!(ptx.contains(".target sm_"), "{}: not PTX", module.name);
                        let entries: &[&str] = match module.name {
                            "pattern" => &["fill_pattern", "count_pattern_mismatches"],
                            "pack" => &["pack_pieces", "unpack_pieces"],
                            _ => &[],
                        };
                        for entry in entries {
                            assert!(
                                ptx.contains(&format!(".entry {entry}(")),
                                "no unmangled entry {entry} in kernels/{}.cu",
                                module.name
                            );
                        }
                        ptx.len()
                    }
                };
                eprintln!(
                    "kernels/{}.cu for {cc:?}: {} ({size} bytes)",
                    module.name, compiled.target
                );
            }
        }
    }
}
