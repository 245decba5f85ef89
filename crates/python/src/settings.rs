//! The settings of `spillway.Engine(...)`, over spillway's settings table
//! (`spillway::settings`): defaults, then the TOML file named by `SPILLWAY_CONFIG`, then the
//! `SPILLWAY_*` environment variables, then the keywords. Everything is parsed and checked
//! before anything is opened. Sizes are integers (bytes) or strings with a unit ("512MiB").

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};
use pyo3::IntoPyObjectExt;
use spillway::settings::{self as registry, Kind, Value, SETTINGS};

use crate::errors::invalid;

/// Parsed settings: spillway's, resolved and checked.
pub use spillway::settings::Resolved as Settings;

/// Loads the file and environment layers and applies `kwargs` over them, refusing unknown
/// names and bad values with the reason.
pub fn parse(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Settings> {
    layers(kwargs)?
        .resolve()
        .map_err(|e| invalid(format!("spillway.Engine: {e}")))
}

/// Defaults, file and environment, then `kwargs`; not yet checked together.
fn layers(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<registry::Settings> {
    let mut layers = registry::Settings::load().map_err(|e| invalid(format!("spillway.Engine: {e}")))?;
    for (k, v) in kwargs.into_iter().flat_map(|d| d.iter()) {
        let name: String = k.extract()?;
        let Some((_, setting)) = registry::find(&name) else {
            let hint = registry::suggest(&name)
                .map(|s| format!(" (did you mean {s:?}?)"))
                .unwrap_or_default();
            return Err(invalid(format!(
                "spillway.Engine: unknown setting {name:?}{hint}; the settings are path, capacity, {}",
                registry::names().collect::<Vec<_>>().join(", ")
            )));
        };
        let bad = |why: &str| invalid(format!("spillway.Engine: {name}={v}: {why}"));
        let value =
            value_of(&v).map_err(|why| bad(&format!("{why}; {name} takes {}", setting.kind.accepts())))?;
        layers.set(&name, value).map_err(|e| bad(e.reason()))?;
    }
    Ok(layers)
}

/// A Python value as a setting's value: bool, int, float or str.
fn value_of(v: &Bound<'_, PyAny>) -> Result<Value, String> {
    if v.is_instance_of::<PyBool>() {
        return v.extract().map(Value::Bool).map_err(|e: PyErr| e.to_string());
    }
    if v.is_instance_of::<PyString>() {
        return v.extract().map(Value::Str).map_err(|e: PyErr| e.to_string());
    }
    if let Ok(list) = v.extract::<Vec<i64>>() {
        // A list of whole numbers (stripe weights) reads like its text, "1,2".
        let text: Vec<String> = list.iter().map(i64::to_string).collect();
        return Ok(Value::Str(text.join(",")));
    }
    if v.is_instance_of::<PyFloat>() {
        return v.extract().map(Value::Float).map_err(|e: PyErr| e.to_string());
    }
    match v.extract::<i64>() {
        Ok(n) => Ok(Value::Int(n)),
        Err(_) if v.is_instance_of::<PyInt>() => Err(format!("{v} is too large")),
        Err(_) => Err(format!(
            "a {} is not a setting's value",
            v.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        )),
    }
}

/// A setting's value as a Python object.
fn py_value(py: Python<'_>, v: &Value) -> PyResult<Py<PyAny>> {
    match v {
        Value::Int(n) => n.into_py_any(py),
        Value::Float(x) => x.into_py_any(py),
        Value::Bool(b) => b.into_py_any(py),
        Value::Str(s) => s.into_py_any(py),
    }
}

/// A size: an integer of bytes or a string with a unit.
pub fn size(v: &Bound<'_, PyAny>) -> Result<u64, String> {
    value_of(v)
        .and_then(|value| value.size())
        .map_err(|why| format!("{why}; expected {}", Kind::Size.accepts()))
}

/// Every setting's value and where it came from, for `Engine.resolve_settings`: a list of
/// `(name, value, source)`, the source as "default", "file PATH", "environment variable
/// NAME" or "argument".
#[pyfunction]
#[pyo3(signature = (**kwargs))]
fn resolve_settings(
    py: Python<'_>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<Vec<(String, Py<PyAny>, String)>> {
    let layers = layers(kwargs)?;
    layers
        .resolve()
        .map_err(|e| invalid(format!("spillway.Engine: {e}")))?;
    layers
        .iter()
        .map(|(s, value, source)| Ok((s.name.to_string(), py_value(py, &value)?, source.to_string())))
        .collect()
}

/// Adds the settings table to the module: `SETTINGS_TABLE`, a list of `(name, default,
/// meaning, environment variable)`; `SETTING_NAMES`; and `resolve_settings(**kwargs)`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let table = SETTINGS
        .iter()
        .map(|s| Ok((s.name, py_value(py, &s.default_value())?, s.meaning, s.env_var())))
        .collect::<PyResult<Vec<_>>>()?;
    m.add("SETTINGS_TABLE", table)?;
    m.add("SETTING_NAMES", registry::names().collect::<Vec<_>>())?;
    m.add_function(wrap_pyfunction!(resolve_settings, m)?)?;
    Ok(())
}
