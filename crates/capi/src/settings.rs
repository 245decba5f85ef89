//! `spillway_settings`: the engine's settings, layered as everywhere in spillway —
//! defaults, then the TOML file named by `SPILLWAY_CONFIG`, then the `SPILLWAY_*`
//! environment variables, then the values set here. The settings are listed in
//! docs/settings.md; values are given as text, as in the environment ("512MiB", "host",
//! "true").

use std::ffi::{c_char, c_int};

use spillway::settings::{Resolved, Settings, Value, SETTINGS};

use crate::args;
use crate::error::guard;
use crate::strings::put_string;

/// Settings for `spillway_engine_open`. Made by `spillway_settings_new`, freed by
/// `spillway_settings_free`. Not to be used from several threads at once.
pub struct spillway_settings {
    pub(crate) layers: Settings,
}

/// Makes settings from the defaults, the TOML file named by `SPILLWAY_CONFIG` and the
/// `SPILLWAY_*` environment variables, and stores them in `*out` (NULL on failure). Fails
/// (SPILLWAY_ERROR_INVALID_ARGUMENT) when the file or a variable holds a bad setting.
///
/// # Safety
/// `out` is NULL or valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn spillway_settings_new(out: *mut *mut spillway_settings) -> c_int {
    guard("spillway_settings_new", || {
        // SAFETY: `out` is NULL or writable (the contract).
        unsafe { args::put(out, std::ptr::null_mut(), "out")? };
        let layers = Settings::load()?;
        let settings = Box::into_raw(Box::new(spillway_settings { layers }));
        // SAFETY: as above.
        unsafe { args::put(out, settings, "out") }
    })
}

/// Sets the setting `name` to `value` (text, as in a `SPILLWAY_*` environment variable:
/// "1GiB", "host", "true"), over the file and the environment. A refusal
/// (SPILLWAY_ERROR_INVALID_ARGUMENT) names the setting and says what it takes; settings
/// that do not fit together (prefetch_bytes above staging_bytes, ...) are refused by
/// `spillway_engine_open`.
///
/// # Safety
/// `settings` is NULL or a live `spillway_settings` used by no other thread meanwhile;
/// `name` and `value` are NULL or NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn spillway_settings_set(
    settings: *mut spillway_settings,
    name: *const c_char,
    value: *const c_char,
) -> c_int {
    guard("spillway_settings_set", || {
        // SAFETY: the pointers are NULL or valid (the contract).
        let (settings, name, value) = unsafe {
            (
                args::object_mut(settings, "settings")?,
                args::text(name, "name")?,
                args::text(value, "value")?,
            )
        };
        settings.layers.set(name, value)?;
        Ok(())
    })
}

/// The settings `settings` would open an engine with, checked together, as a JSON object
/// stored in `*out` (NULL on failure; free it with `spillway_string_free`): one key per
/// setting, each {"value": V, "source": S}, as `spillway_engine_settings_json` describes
/// (Python's `Engine.resolve_settings()`). Settings that do not fit together
/// (prefetch_bytes above staging_bytes, ...) are refused (SPILLWAY_ERROR_INVALID_ARGUMENT)
/// as `spillway_engine_open` would refuse them.
///
/// # Safety
/// `settings` is NULL or a live `spillway_settings` not written by another thread
/// meanwhile; `out` is NULL or valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn spillway_settings_json(
    settings: *const spillway_settings,
    out: *mut *mut c_char,
) -> c_int {
    guard("spillway_settings_json", || {
        // SAFETY: the pointers are NULL or valid (the contract).
        unsafe { args::put(out, std::ptr::null_mut(), "out")? };
        // SAFETY: as above.
        let layers = &unsafe { args::object(settings, "settings")? }.layers;
        let resolved = layers.resolve()?;
        // SAFETY: as above.
        unsafe { put_string(out, settings_json(&resolved, layers), "out") }
    })
}

/// Frees settings made by `spillway_settings_new`; NULL is ignored. Engines opened with
/// them keep their own copy.
///
/// # Safety
/// `settings` is NULL or a `spillway_settings` not yet freed, used by no other thread.
#[no_mangle]
pub unsafe extern "C" fn spillway_settings_free(settings: *mut spillway_settings) {
    guard("spillway_settings_free", || {
        if !settings.is_null() {
            // SAFETY: made by `Box::into_raw` in `spillway_settings_new` and not yet freed
            // (the contract).
            drop(unsafe { Box::from_raw(settings) });
        }
        Ok(())
    });
}

/// Every setting's value in `values` and where `layers` got it, as a JSON object: name ->
/// {"value": V, "source": S}.
pub(crate) fn settings_json(values: &Resolved, layers: &Settings) -> String {
    let json: serde_json::Map<String, serde_json::Value> = SETTINGS
        .iter()
        .map(|setting| {
            let value: serde_json::Value = match setting.get(values) {
                Value::Int(n) => n.into(),
                Value::Float(x) => x.into(),
                Value::Bool(b) => b.into(),
                Value::Str(s) => s.into(),
            };
            let source = layers
                .source(setting.name)
                .map_or_else(|| "default".to_string(), |s| s.to_string());
            let entry = serde_json::json!({"value": value, "source": source});
            (setting.name.to_string(), entry)
        })
        .collect();
    serde_json::Value::Object(json).to_string()
}
