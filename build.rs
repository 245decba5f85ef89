//! Build script: embeds the CUDA kernels of `kernels/*.cu` into the crate: today
//! `pattern.cu` (the test-pattern kernels), `pack.cu` (the pack/unpack kernels) and
//! `crc32c.cu` (the CRC-32C kernel), the last two sharing the warp helpers of `warp.cuh`. Every
//! `.cu` file there is embedded the same way, and `src/cuda/kernels.rs` loads one by its
//! stem; a file listed in [`REQUIRED`] that is missing gets a cargo warning (the build still
//! succeeds, and using those kernels is then an error at run time).
//!
//! A kernel file may share code through headers of its own directory: a line
//! `#include "warp.cuh"` names `kernels/warp.cuh`. NVRTC has no include path for those, so
//! the script pastes each such header in place of its `#include` line (recursively; each
//! header at most once per kernel file; `#line` lines keep compiler messages pointing at the
//! real files) and writes the result to `$OUT_DIR/<name>.cu`: the one self-contained source
//! that nvcc compiles and that is embedded. A header that is not in `kernels/`, or an include
//! cycle, fails the build. `#include <...>` lines are left as they are. A kernel file without
//! includes is copied unchanged.
//!
//! The (expanded) CUDA C source of every kernel file is always embedded. In addition, when a
//! CUDA toolkit is found, each file is compiled to PTX and that PTX is embedded as well:
//!
//! - nvcc is looked for, in order, at `$NVCC`, `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`,
//!   `/usr/local/cuda/bin/nvcc`, then `nvcc` on `PATH`.
//! - It is run as `nvcc -ptx -arch=compute_75 -O3 -o $OUT_DIR/<name>.ptx $OUT_DIR/<name>.cu`.
//!   PTX for a virtual architecture is JIT-compiled by the driver for the GPU it finds, so
//!   one build serves Turing (sm_75), Ampere (sm_80/86), Ada (sm_89), Hopper (sm_90) and
//!   newer GPUs. `SPILLWAY_NVCC_ARCH=compute_90` (say) overrides the architecture.
//! - `SPILLWAY_NO_NVCC=1` skips nvcc altogether.
//!
//! Files without PTX (no nvcc, nvcc failed, or `SPILLWAY_NO_NVCC=1`) are compiled at run time
//! by NVRTC, on first use, for the GPU's own architecture. An nvcc failure is reported as a
//! cargo warning, never as a build failure: the build succeeds on a machine with no CUDA at
//! all.
//!
//! The result is `$OUT_DIR/kernels.rs`, included by `src/cuda/kernels.rs`: a table of the
//! embedded modules and `KERNEL_BUILD`, a sentence saying how the kernels were built.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The default virtual architecture of nvcc-built PTX (the oldest GPUs CUDA 13 supports).
const DEFAULT_ARCH: &str = "compute_75";

/// Environment variables that change what this script does.
const ENV_VARS: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "SPILLWAY_NO_NVCC",
    "SPILLWAY_NVCC_ARCH",
];

/// The kernel files `src/cuda` loads (by stem).
const REQUIRED: &[&str] = &["pattern", "pack", "crc32c"];

/// A kernel file and what became of it.
struct Kernel {
    /// File stem: the module's name.
    name: String,
    /// `$OUT_DIR/<name>.cu`: the `.cu` file with its headers pasted in (see [`expand_includes`]).
    expanded: PathBuf,
    /// The PTX file, when nvcc compiled it.
    ptx: Option<PathBuf>,
}

/// A usable nvcc.
struct Nvcc {
    path: PathBuf,
    version: String,
}

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_dir = manifest_dir.join("kernels");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let sources = kernel_sources(&kernel_dir);
    for name in REQUIRED {
        if !sources
            .iter()
            .any(|s| s.file_stem().is_some_and(|stem| stem == *name))
        {
            warn(&format!(
                "{} is missing: the CUDA device will report its kernels as not embedded",
                kernel_dir.join(format!("{name}.cu")).display()
            ));
        }
    }
    let arch = env::var("SPILLWAY_NVCC_ARCH")
        .ok()
        .filter(|a| !a.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ARCH.to_string());

    let (nvcc, why_not) = if env_flag("SPILLWAY_NO_NVCC") {
        (None, "SPILLWAY_NO_NVCC=1 at build time".to_string())
    } else {
        match find_nvcc() {
            Some(nvcc) => {
                println!("cargo:rerun-if-changed={}", nvcc.path.display());
                (Some(nvcc), String::new())
            }
            None => (None, "no nvcc found at build time".to_string()),
        }
    };

    let mut kernels = Vec::new();
    let mut failed = Vec::new();
    for source in sources {
        let name = source
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let expanded = out_dir.join(format!("{name}.cu"));
        write_expanded(&kernel_dir, &source, &expanded);
        let ptx = nvcc.as_ref().and_then(|nvcc| {
            let out = out_dir.join(format!("{name}.ptx"));
            match compile_ptx(nvcc, &arch, &expanded, &out) {
                Ok(()) => Some(out),
                Err(e) => {
                    warn(&format!(
                        "nvcc failed on {}; it will be compiled by NVRTC at run time instead:",
                        source.display()
                    ));
                    for line in e.lines().filter(|l| !l.trim().is_empty()).take(20) {
                        warn(&format!("  {line}"));
                    }
                    failed.push(name.clone());
                    None
                }
            }
        });
        kernels.push(Kernel { name, expanded, ptx });
    }

    let description = describe(&kernels, nvcc.as_ref(), &arch, &why_not, &failed);
    let generated = generate(&kernels, &arch, &description);
    let path = out_dir.join("kernels.rs");
    if let Err(e) = fs::write(&path, generated) {
        panic!("cannot write {}: {e}", path.display());
    }
}

/// The `.cu` files of `dir`, sorted.
fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cu") && p.is_file())
            .collect(),
        Err(e) => {
            warn(&format!(
                "cannot read {}: {e}; no kernels are embedded",
                dir.display()
            ));
            Vec::new()
        }
    };
    files.sort();
    files
}

/// Writes the self-contained source of kernel file `source` to `out`; an include that cannot
/// be resolved fails the build, since neither nvcc nor NVRTC could compile the file.
fn write_expanded(kernel_dir: &Path, source: &Path, out: &Path) {
    let file = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = expand_includes(kernel_dir, &file).unwrap_or_else(|e| panic!("{e}"));
    if let Err(e) = fs::write(out, text) {
        panic!("cannot write {}: {e}", out.display());
    }
}

/// The text of kernel file `kernels/<file>` with every `#include "<header>"` line replaced by
/// the text of `kernels/<header>`, itself expanded the same way, between `#line` lines that
/// name the real file and line. A header already pasted into this kernel file is not pasted
/// again (its `#include` line becomes an empty line), as with `#pragma once`. A file without
/// includes comes back byte for byte.
fn expand_includes(kernel_dir: &Path, file: &str) -> Result<String, String> {
    let mut expansion = Expansion {
        kernel_dir,
        chain: Vec::new(),
        pasted: Vec::new(),
        text: String::new(),
    };
    expansion.paste(file)?;
    Ok(expansion.text)
}

/// The state of one kernel file's [`expand_includes`].
struct Expansion<'a> {
    /// `kernels/`: where every quoted include is looked up.
    kernel_dir: &'a Path,
    /// The files being pasted, outermost first: an include of one of them is a cycle.
    chain: Vec<String>,
    /// The headers pasted so far.
    pasted: Vec<String>,
    /// The expanded text so far.
    text: String,
}

impl Expansion<'_> {
    /// Appends file `name` of `kernels/`, with its includes expanded.
    fn paste(&mut self, name: &str) -> Result<(), String> {
        let path = self.kernel_dir.join(name);
        println!("cargo:rerun-if-changed={}", path.display());
        let source = fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        self.chain.push(name.to_string());
        for (index, line) in source.split_inclusive('\n').enumerate() {
            match included_header(line) {
                None => self.text.push_str(line),
                Some(header) => self.include(name, index + 1, header)?,
            }
        }
        self.chain.pop();
        Ok(())
    }

    /// Replaces line `line` of file `from`, an `#include` of `header`, by that header's text.
    fn include(&mut self, from: &str, line: usize, header: &str) -> Result<(), String> {
        let at = format!("kernels/{from}, line {line}");
        if self.chain.iter().any(|f| f == header) {
            return Err(format!(
                "{at}: include cycle: {} -> {header}",
                self.chain.join(" -> ")
            ));
        }
        if self.pasted.iter().any(|h| h == header) {
            self.text.push('\n');
            return Ok(());
        }
        // A plain file name, so that `chain` and `pasted` name each header one way only.
        if header.contains(['/', '\\']) || !self.kernel_dir.join(header).is_file() {
            return Err(format!(
                "{at}: #include \"{header}\": {} has no such file (a kernel file can include \
                 only headers of that directory, by file name)",
                self.kernel_dir.display()
            ));
        }
        self.pasted.push(header.to_string());
        self.text.push_str(&format!("#line 1 \"kernels/{header}\"\n"));
        self.paste(header)?;
        if !self.text.ends_with('\n') {
            self.text.push('\n');
        }
        // Back in `from`, at the line after the include.
        self.text
            .push_str(&format!("#line {} \"kernels/{from}\"\n", line + 1));
        Ok(())
    }
}

/// `warp.cuh` for the line `#include "warp.cuh"` (spaces allowed around `#` and before the
/// name, a comment after it); `None` for any other line, `#include <...>` included.
fn included_header(line: &str) -> Option<&str> {
    let directive = line.trim_start().strip_prefix('#')?.trim_start();
    let rest = directive.strip_prefix("include")?.trim_start();
    let quoted = rest.strip_prefix('"')?;
    let end = quoted.find('"')?;
    Some(&quoted[..end])
}

/// True when the variable is set to something other than "", "0", "false" or "no".
fn env_flag(var: &str) -> bool {
    env::var(var)
        .map(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false" | "no"))
        .unwrap_or(false)
}

/// The first nvcc that exists and answers `--version`.
fn find_nvcc() -> Option<Nvcc> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(nvcc) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        candidates.push(PathBuf::from(nvcc));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var).filter(|v| !v.is_empty()) {
            candidates.push(PathBuf::from(root).join("bin").join("nvcc"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|dir| dir.join("nvcc")));
    }
    candidates.into_iter().filter(|p| p.is_file()).find_map(|path| {
        let version = nvcc_version(&path)?;
        Some(Nvcc { path, version })
    })
}

/// "12.4" from `nvcc --version` ("Cuda compilation tools, release 12.4, V12.4.131").
fn nvcc_version(nvcc: &Path) -> Option<String> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split("release ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "(unknown version)".to_string());
    Some(version)
}

/// Runs nvcc; the error is its output.
fn compile_ptx(nvcc: &Nvcc, arch: &str, source: &Path, out: &Path) -> Result<(), String> {
    let output = Command::new(&nvcc.path)
        .arg("-ptx")
        .arg(format!("-arch={arch}"))
        .arg("-O3")
        .arg("-o")
        .arg(out)
        .arg(source)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.path.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} exited with {}\n{}{}",
            nvcc.path.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    match fs::metadata(out) {
        Ok(m) if m.len() > 0 => Ok(()),
        _ => Err(format!(
            "{} wrote no PTX to {}",
            nvcc.path.display(),
            out.display()
        )),
    }
}

/// The sentence `kernel_build()` returns.
fn describe(kernels: &[Kernel], nvcc: Option<&Nvcc>, arch: &str, why_not: &str, failed: &[String]) -> String {
    let with_ptx: Vec<&str> = kernels
        .iter()
        .filter(|k| k.ptx.is_some())
        .map(|k| k.name.as_str())
        .collect();
    let without: Vec<&str> = kernels
        .iter()
        .filter(|k| k.ptx.is_none())
        .map(|k| k.name.as_str())
        .collect();
    let ptx_text = nvcc.map(|n| {
        format!(
            "PTX from nvcc {} ({arch}; the driver JIT-compiles it for the GPU)",
            n.version
        )
    });
    let nvrtc_reason = if failed.is_empty() {
        why_not.to_string()
    } else {
        format!("nvcc failed at build time on {}", failed.join(", "))
    };
    let nvrtc_text = format!("CUDA C source, compiled by NVRTC at first use ({nvrtc_reason})");
    match (with_ptx.is_empty(), without.is_empty()) {
        (_, true) if kernels.is_empty() => "no kernels embedded".to_string(),
        (false, true) => ptx_text.unwrap_or_default(),
        (true, _) => nvrtc_text,
        (false, false) => format!(
            "{} for {}; {} for {}",
            ptx_text.unwrap_or_default(),
            with_ptx.join(", "),
            nvrtc_text,
            without.join(", ")
        ),
    }
}

/// The Rust source of `$OUT_DIR/kernels.rs`.
fn generate(kernels: &[Kernel], arch: &str, description: &str) -> String {
    let mut s = String::from("// Generated by build.rs: the kernels embedded in this build.\n\n");
    s.push_str(&format!(
        "pub(crate) const KERNEL_BUILD: &str = {description:?};\n\n"
    ));
    s.push_str("pub(crate) static MODULES: &[EmbeddedModule] = &[\n");
    for k in kernels {
        let source = k.expanded.display().to_string();
        let ptx = match &k.ptx {
            Some(p) => format!("Some(include_str!({:?}))", p.display().to_string()),
            None => "None".to_string(),
        };
        let ptx_arch = if k.ptx.is_some() {
            format!("Some({arch:?})")
        } else {
            "None".to_string()
        };
        s.push_str(&format!(
            "    EmbeddedModule {{\n        name: {:?},\n        source: include_str!({source:?}),\n        \
             ptx: {ptx},\n        ptx_arch: {ptx_arch},\n    }},\n",
            k.name
        ));
    }
    s.push_str("];\n");
    s
}

fn warn(msg: &str) {
    println!("cargo:warning={msg}");
}
