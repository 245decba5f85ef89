//! `spillway._native`: the PyO3 extension behind the `spillway` Python package (abi3: one
//! wheel serves CPython 3.9 and later). It exposes the offload engine (`engine`) with
//! its settings (`settings`); the package's Python code (`python/spillway/`) builds the
//! PyTorch integration on it.

use pyo3::prelude::*;

mod engine;
mod errors;
mod settings;

/// Logs the runtime's `tracing` events to stderr, filtered by `filter` (e.g. "info",
/// "spillway_runtime=debug"; default: the SPILLWAY_LOG environment variable, else "warn").
/// Returns False when logging was already set up.
#[pyfunction]
#[pyo3(signature = (filter=None))]
fn init_logging(filter: Option<String>) -> PyResult<bool> {
    let filter = match filter {
        Some(f) => tracing_subscriber::EnvFilter::try_new(&f)
            .map_err(|e| errors::invalid(format!("bad log filter {f:?}: {e}")))?,
        None => tracing_subscriber::EnvFilter::try_from_env("SPILLWAY_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
    };
    Ok(tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init()
        .is_ok())
}

/// Parses a size such as "512MiB" or "4G" into bytes.
#[pyfunction]
fn parse_size(text: &str) -> PyResult<u64> {
    spillway::size::parse_size(text).map_err(errors::invalid)
}

/// The module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<engine::PyFetched>()?;
    m.add("SpillwayError", m.py().get_type::<errors::SpillwayError>())?;
    m.add("CorruptDataError", m.py().get_type::<errors::CorruptDataError>())?;
    settings::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(parse_size, m)?)?;
    Ok(())
}
