//! The keyword settings of `spillway.Engine(...)`: storage, device, backend and every
//! engine setting, parsed and checked before anything is opened. Sizes are integers
//! (bytes) or strings with a unit ("512MiB", "4G").

use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use spillway::cli::{BackendChoice, MemChoice};
use spillway::select::Choices;
use spillway::size::parse_size;
use spillway_runtime::engine::EngineConfig;

use crate::errors::invalid;

/// Every keyword `Engine` takes besides `path` and `capacity`, for error messages and docs.
pub const NAMES: &[&str] = &[
    "device",
    "backend",
    "queue_depth",
    "threads",
    "pinned_bytes",
    "alignment",
    "staging_bytes",
    "prefetch_bytes",
    "pack_threshold",
    "pack_extent_bytes",
    "pack_flush_delay_ms",
    "direct_write_bytes",
    "pack",
    "dedup",
    "timeline",
    "timeline_capacity",
];

/// Parsed settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Device and backend choices, as `spillway bench` takes them.
    pub choices: Choices,
    /// The engine's settings.
    pub engine: EngineConfig,
}

const EXPECTED_BACKEND: &str = "expected \"auto\", \"uring\", \"cufile\" or \"spdk\"";

impl Settings {
    /// Parses `kwargs`, refusing unknown names and bad values with the reason.
    pub fn parse(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Settings> {
        let mut choices = Choices {
            backend: BackendChoice::Auto,
            mem: MemChoice::Auto,
            gpu: None,
            queue_depth: 16,
            threads: 1,
            pinned_bytes: None,
            pci: None,
        };
        let mut engine = EngineConfig::default();
        let Some(kwargs) = kwargs else {
            return Ok(Settings { choices, engine });
        };
        for (k, v) in kwargs.iter() {
            let name: String = k.extract()?;
            let bad = |what: &str| invalid(format!("spillway.Engine: {name}={v}: {what}"));
            match name.as_str() {
                "device" => {
                    let (mem, gpu) = parse_device(&v).map_err(|why| bad(&why))?;
                    choices.mem = mem;
                    choices.gpu = gpu;
                }
                "backend" => {
                    let s: String = v.extract().map_err(|_| bad(EXPECTED_BACKEND))?;
                    choices.backend = match s.as_str() {
                        "auto" => BackendChoice::Auto,
                        "uring" => BackendChoice::Uring,
                        "cufile" => BackendChoice::Cufile,
                        "spdk" => BackendChoice::Spdk,
                        _ => return Err(bad(EXPECTED_BACKEND)),
                    };
                }
                "queue_depth" => {
                    choices.queue_depth = u32::try_from(count(&v).map_err(|w| bad(&w))?)
                        .map_err(|_| bad("expected a queue depth that fits 32 bits"))?
                }
                "threads" => choices.threads = count(&v).map_err(|w| bad(&w))? as usize,
                "pinned_bytes" => choices.pinned_bytes = Some(size(&v).map_err(|w| bad(&w))?),
                "alignment" => engine.alignment = size(&v).map_err(|w| bad(&w))?,
                "staging_bytes" => engine.staging_bytes = size(&v).map_err(|w| bad(&w))?,
                "prefetch_bytes" => engine.prefetch_bytes = size(&v).map_err(|w| bad(&w))?,
                "pack_threshold" => engine.pack_threshold = size(&v).map_err(|w| bad(&w))?,
                "pack_extent_bytes" => engine.pack_extent_bytes = size(&v).map_err(|w| bad(&w))?,
                "direct_write_bytes" => engine.direct_write_bytes = size(&v).map_err(|w| bad(&w))?,
                "pack_flush_delay_ms" => {
                    let ms: f64 = v.extract().map_err(|_| bad("expected milliseconds (a number)"))?;
                    if !(ms.is_finite() && ms >= 0.0) {
                        return Err(bad("expected milliseconds, zero or more"));
                    }
                    engine.pack_flush_delay = Duration::from_secs_f64(ms / 1000.0);
                }
                "pack" => engine.pack = flag(&v).map_err(|w| bad(&w))?,
                "dedup" => engine.dedup = flag(&v).map_err(|w| bad(&w))?,
                "timeline" => engine.timeline = flag(&v).map_err(|w| bad(&w))?,
                "timeline_capacity" => engine.timeline_capacity = count(&v).map_err(|w| bad(&w))? as usize,
                _ => {
                    return Err(invalid(format!(
                        "spillway.Engine: unknown setting {name:?}; the settings are path, capacity, {}",
                        NAMES.join(", ")
                    )))
                }
            }
        }
        engine.validate().map_err(crate::errors::to_py)?;
        Ok(Settings { choices, engine })
    }
}

/// `"auto"`, `"host"`/`"cpu"`, `"cuda"`, `"cuda:N"`, or a GPU ordinal.
fn parse_device(v: &Bound<'_, PyAny>) -> Result<(MemChoice, Option<usize>), String> {
    const WANT: &str = "expected \"auto\", \"host\", \"cuda\", \"cuda:N\" or a GPU ordinal";
    if let Ok(n) = v.extract::<usize>() {
        return Ok((MemChoice::Gpu, Some(n)));
    }
    let s: String = v.extract().map_err(|_| WANT.to_string())?;
    match s.as_str() {
        "auto" => Ok((MemChoice::Auto, None)),
        "host" | "cpu" => Ok((MemChoice::Host, None)),
        "cuda" | "gpu" => Ok((MemChoice::Gpu, None)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok((MemChoice::Gpu, Some(n))),
            _ => Err(WANT.to_string()),
        },
    }
}

/// A size: an integer of bytes or a string with a unit.
pub fn size(v: &Bound<'_, PyAny>) -> Result<u64, String> {
    if v.is_instance_of::<PyString>() {
        let s: String = v.extract().map_err(|e: PyErr| e.to_string())?;
        return parse_size(&s);
    }
    if v.is_instance_of::<pyo3::types::PyBool>() {
        return Err("expected a size in bytes, not a bool".into());
    }
    v.extract::<u64>().map_err(|_| {
        "expected a size: bytes as a non-negative integer, or a string such as \"512MiB\"".into()
    })
}

fn count(v: &Bound<'_, PyAny>) -> Result<u64, String> {
    match v.extract::<u64>() {
        Ok(n) if n > 0 && !v.is_instance_of::<pyo3::types::PyBool>() => Ok(n),
        _ => Err("expected a positive integer".into()),
    }
}

fn flag(v: &Bound<'_, PyAny>) -> Result<bool, String> {
    if v.is_instance_of::<pyo3::types::PyBool>() {
        v.extract::<bool>().map_err(|e: PyErr| e.to_string())
    } else {
        Err("expected True or False".into())
    }
}
