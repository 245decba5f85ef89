//! `spillway_engine`: opening and closing the offload engine, and what it reports.

use std::ffi::{c_char, c_int, OsStr};
use std::io::BufWriter;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use spillway::open::{open_engine, OpenedEngine};
use spillway::settings::Settings;
use spillway_runtime::{Error, PrivateFile};

use crate::args;
use crate::error::guard;
use crate::settings::{settings_json, spillway_settings};
use crate::status::Failure;
use crate::strings::put_string;

/// The offload engine on one device and one storage target. Made by
/// `spillway_engine_open`, freed by `spillway_engine_close`. Every other call on it may be
/// made from several threads at once.
pub struct spillway_engine {
    pub(crate) opened: OpenedEngine,
    /// The settings it was opened with, layer on layer: where each value came from.
    pub(crate) layers: Settings,
}

/// The engine behind `engine`, for a call named `function`.
///
/// # Safety
/// `engine` is NULL or an open `spillway_engine` that stays open for `'a`.
pub(crate) unsafe fn opened<'a>(engine: *const spillway_engine) -> Result<&'a OpenedEngine, Failure> {
    // SAFETY: forwarded contract.
    let engine = unsafe { args::object(engine, "engine")? };
    Ok(&engine.opened)
}

/// Opens the engine on `n_paths` storage paths and stores it in `*out` (NULL on failure).
///
/// One path is a directory (the engine keeps its data in a new file there, removed from
/// the directory at once so nothing is left behind), a file (created if missing, kept
/// afterwards) or a block device; several paths are striped over (setting `stripe_bytes`).
/// With the setting `backend` = "spdk" the path is the NVMe controller's PCI address.
/// Paths are byte strings, as the operating system takes them.
///
/// `capacity` is the most bytes the engine may store: a size reserved up front, or, when 0,
/// half of the filesystem's free space, used as needed (a block device needs one).
/// `settings` NULL means the defaults, the file named by `SPILLWAY_CONFIG` and the
/// `SPILLWAY_*` environment variables. With `device` = "auto" (the default) the engine
/// works on the memory of the local rank's GPU (under torchrun, Slurm or Open MPI), else
/// GPU 0's, or on host memory when there is no GPU.
///
/// # Safety
/// `paths` is NULL (with `n_paths` 0) or an array of `n_paths` NUL-terminated strings (or
/// NULLs, refused); `settings` is NULL or a live `spillway_settings` not written by another
/// thread meanwhile; `out` is NULL or valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn spillway_engine_open(
    paths: *const *const c_char,
    n_paths: usize,
    capacity: u64,
    settings: *const spillway_settings,
    out: *mut *mut spillway_engine,
) -> c_int {
    guard("spillway_engine_open", || {
        // SAFETY: `out` is NULL or writable (the contract).
        unsafe { args::put(out, std::ptr::null_mut(), "out")? };
        // SAFETY: `paths` is NULL or an array of `n_paths` (the contract).
        let list = unsafe { args::array(paths, n_paths, "paths")? };
        let mut paths = Vec::with_capacity(list.len());
        for (i, &p) in list.iter().enumerate() {
            // SAFETY: each entry is NULL or a NUL-terminated string (the contract).
            let bytes = unsafe { args::bytes(p, &format!("paths[{i}]"))? };
            paths.push(PathBuf::from(OsStr::from_bytes(bytes)));
        }
        let layers = if settings.is_null() {
            Settings::load()?
        } else {
            // SAFETY: not NULL, so a live `spillway_settings` (the contract).
            unsafe { &(*settings).layers }.clone()
        };
        let resolved = layers.resolve()?;
        let opened = open_engine(&paths, (capacity > 0).then_some(capacity), &resolved)?;
        let engine = Box::into_raw(Box::new(spillway_engine { opened, layers }));
        // SAFETY: as above.
        unsafe { args::put(out, engine, "out") }
    })
}

/// Closes the engine: waits for the writes under way, closes the storage target and frees
/// the staging memory and `engine` itself. NULL is ignored. No other thread may use the
/// engine during or after this call.
///
/// # Safety
/// `engine` is NULL or a `spillway_engine` from `spillway_engine_open` not yet closed, used
/// by no other thread.
#[no_mangle]
pub unsafe extern "C" fn spillway_engine_close(engine: *mut spillway_engine) -> c_int {
    guard("spillway_engine_close", || {
        if !engine.is_null() {
            // SAFETY: made by `Box::into_raw` in `spillway_engine_open` and not yet closed
            // (the contract).
            drop(unsafe { Box::from_raw(engine) });
        }
        Ok(())
    })
}

/// What the engine was opened on, as a JSON object stored in `*out` (free it with
/// `spillway_string_free`): "path", "anonymous" (true when the data lives in a file that
/// never has a name), "capacity" (bytes), "device" ("cuda:N" or "host"), "backend"
/// ("uring", "cufile", "spdk") and "notes" (choices made for the caller).
///
/// # Safety
/// `engine` is NULL or an open `spillway_engine`; `out` is NULL or valid for a write of a
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn spillway_engine_info_json(
    engine: *const spillway_engine,
    out: *mut *mut c_char,
) -> c_int {
    guard("spillway_engine_info_json", || {
        // SAFETY: the pointers are NULL or valid (the contract).
        unsafe { args::put(out, std::ptr::null_mut(), "out")? };
        // SAFETY: as above.
        let info = &unsafe { opened(engine)? }.info;
        let json = serde_json::json!({
            "path": info.path.to_string_lossy(),
            "anonymous": info.anonymous,
            "capacity": info.capacity,
            "device": info.device,
            "backend": info.backend,
            "notes": info.notes,
        });
        // SAFETY: as above.
        unsafe { put_string(out, json.to_string(), "out") }
    })
}

/// The settings the engine runs with, as a JSON object stored in `*out` (free it with
/// `spillway_string_free`): one key per setting (docs/settings.md lists them), each
/// {"value": V, "source": S}. V is what the engine was opened with: a number (sizes in
/// bytes), true/false or text ("auto", "host", ...; the device and backend "auto" chose are
/// in `spillway_engine_info_json`). S says where it came from: "default",
/// "file PATH" (the TOML file named by `SPILLWAY_CONFIG`), "environment variable
/// SPILLWAY_NAME" or "argument" (`spillway_settings_set`). In Python, `Engine.settings` gives
/// the values and `Engine.resolve_settings()` the sources.
///
/// # Safety
/// `engine` is NULL or an open `spillway_engine`; `out` is NULL or valid for a write of a
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn spillway_engine_settings_json(
    engine: *const spillway_engine,
    out: *mut *mut c_char,
) -> c_int {
    guard("spillway_engine_settings_json", || {
        // SAFETY: the pointers are NULL or valid (the contract).
        unsafe { args::put(out, std::ptr::null_mut(), "out")? };
        // SAFETY: as above.
        let engine = unsafe { args::object(engine, "engine")? };
        let json = settings_json(&engine.opened.info.settings, &engine.layers);
        // SAFETY: as above.
        unsafe { put_string(out, json, "out") }
    })
}

/// Writes the engine's timeline to the file at `path` as Chrome trace JSON, for Perfetto
/// (ui.perfetto.dev) or chrome://tracing: one row per stage (pack, write, read, ...), one
/// span per piece of work. The timeline is recorded only when the engine was opened with the
/// setting timeline = true (at most timeline_capacity spans; later ones are counted in the
/// trace's "otherData" and dropped): without it the call fails with
/// SPILLWAY_ERROR_INVALID_ARGUMENT and writes nothing. The file is made mode 0600 in a
/// directory checked like a data directory and put in place by a rename, so an existing
/// file of yours is replaced; a symbolic link, another user's file or anything but a regular
/// file at `path` is refused, as is a file that cannot be written: SPILLWAY_ERROR_IO.
///
/// # Safety
/// `engine` is NULL or an open `spillway_engine`; `path` is NULL or a NUL-terminated
/// string.
#[no_mangle]
pub unsafe extern "C" fn spillway_engine_write_trace(
    engine: *const spillway_engine,
    path: *const c_char,
) -> c_int {
    guard("spillway_engine_write_trace", || {
        // SAFETY: the pointers are NULL or valid (the contract).
        let (opened, path) = unsafe { (opened(engine)?, args::bytes(path, "path")?) };
        if path.is_empty() {
            return Err(Failure::invalid(
                "path is empty: pass the name of the file to write the trace to",
            ));
        }
        let timeline = opened.engine.timeline();
        if !timeline.enabled() {
            return Err(Failure::invalid(
                "the engine's timeline is off, so there is no trace to write: open the engine with \
                 the setting timeline = true (spillway_settings_set(settings, \"timeline\", \"true\") \
                 or SPILLWAY_TIMELINE=1)",
            ));
        }
        let path = PathBuf::from(OsStr::from_bytes(path));
        let mut file = PrivateFile::create(&path, "trace file")?;
        timeline
            .write_chrome_trace(BufWriter::new(&mut file))
            .map_err(|e| Error::io(format!("writing the trace file {}", path.display()), e))?;
        file.persist()?;
        Ok(())
    })
}
