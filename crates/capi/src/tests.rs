//! The C ABI called as C would, on host memory in a temporary directory.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::{null, null_mut};

use crate::engine::*;
use crate::error::{guard, spillway_last_error};
use crate::ops::*;
use crate::settings::*;
use crate::status::*;
use crate::strings::*;

/// The last failure's message on this thread.
fn last_error() -> String {
    // SAFETY: the library returns a NUL-terminated string, valid until the next call.
    unsafe { CStr::from_ptr(spillway_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts that `status` is `want`, showing the message otherwise.
#[track_caller]
fn check(status: c_int, want: c_int) {
    assert_eq!(status, want, "status {status}, wanted {want}: {}", last_error());
}

/// Settings on host memory with small staging, as the Python tests use.
fn small_settings(extra: &[(&str, &str)]) -> *mut spillway_settings {
    let mut s = null_mut();
    // SAFETY: `s` is a variable to write the result to.
    check(unsafe { spillway_settings_new(&mut s) }, SPILLWAY_OK);
    let base = [
        ("device", "host"),
        ("staging_bytes", "8MiB"),
        ("prefetch_bytes", "4MiB"),
        ("pack_extent_bytes", "1MiB"),
        ("pack_threshold", "256KiB"),
    ];
    for (name, value) in base.iter().chain(extra) {
        let (name, value) = (CString::new(*name).unwrap(), CString::new(*value).unwrap());
        // SAFETY: live settings and NUL-terminated strings.
        check(
            unsafe { spillway_settings_set(s, name.as_ptr(), value.as_ptr()) },
            SPILLWAY_OK,
        );
    }
    s
}

/// Opens an engine on `dir` with `settings` (freed here); the status and the engine.
fn open(
    dir: &std::path::Path,
    capacity: u64,
    settings: *mut spillway_settings,
) -> (c_int, *mut spillway_engine) {
    let path = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let paths = [path.as_ptr()];
    let mut engine = null_mut();
    // SAFETY: one live path string, live settings, a variable for the result.
    let status = unsafe { spillway_engine_open(paths.as_ptr(), 1, capacity, settings, &mut engine) };
    // SAFETY: made by `spillway_settings_new`, not used after this.
    unsafe { spillway_settings_free(settings) };
    (status, engine)
}

fn open_small(dir: &std::path::Path) -> *mut spillway_engine {
    let (status, engine) = open(dir, 64 << 20, small_settings(&[]));
    check(status, SPILLWAY_OK);
    engine
}

fn region(buf: &mut [u8]) -> spillway_region {
    spillway_region {
        address: buf.as_mut_ptr().cast::<c_void>(),
        length: buf.len(),
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A string the library returned, freed.
fn take_string(p: *mut c_char) -> String {
    assert!(!p.is_null());
    // SAFETY: a NUL-terminated string from the library, freed right after.
    let text = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    // SAFETY: from the library, not yet freed.
    unsafe { spillway_string_free(p) };
    text
}

#[test]
fn buffers_round_trip_through_storage() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_small(dir.path());
    let sizes = [1usize, 4096, 300_000, 3 << 20];
    let mut sources: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(n, i as u8))
        .collect();
    let mut handles = Vec::new();
    for (i, src) in sources.iter_mut().enumerate() {
        let r = [region(src)];
        let mut h = 0;
        // SAFETY: the buffer outlives the engine's use of it (released below, after the
        // source is released).
        check(
            unsafe { spillway_engine_offload(engine, i as u64, 0, r.as_ptr(), 1, null_mut(), &mut h) },
            SPILLWAY_OK,
        );
        handles.push(h);
    }
    // SAFETY: an open engine.
    check(unsafe { spillway_engine_drain(engine) }, SPILLWAY_OK);
    for (&h, src) in handles.iter().zip(&sources) {
        let mut released = false;
        // SAFETY: an open engine, a variable for the result.
        check(
            unsafe { spillway_engine_wait_source_released(engine, h) },
            SPILLWAY_OK,
        );
        check(
            unsafe { spillway_engine_source_released(engine, h, &mut released) },
            SPILLWAY_OK,
        );
        assert!(released);
        // SAFETY: an open engine.
        check(unsafe { spillway_engine_prefetch(engine, h) }, SPILLWAY_OK);
        let mut back = vec![0u8; src.len()];
        let r = [region(&mut back)];
        // SAFETY: `back` is live and idle; no stream.
        check(
            unsafe { spillway_engine_fetch(engine, h, r.as_ptr(), 1, null_mut()) },
            SPILLWAY_OK,
        );
        assert!(
            back == *src,
            "fetched bytes differ for a tensor of {} bytes",
            src.len()
        );
        // SAFETY: an open engine.
        check(unsafe { spillway_engine_release(engine, h) }, SPILLWAY_OK);
    }
    let mut json = null_mut();
    // SAFETY: an open engine, a variable for the result.
    check(
        unsafe { spillway_engine_stats_json(engine, &mut json) },
        SPILLWAY_OK,
    );
    let stats: serde_json::Value = serde_json::from_str(&take_string(json)).unwrap();
    assert!(stats.is_object(), "{stats}");
    // SAFETY: as above.
    check(
        unsafe { spillway_engine_info_json(engine, &mut json) },
        SPILLWAY_OK,
    );
    let info: serde_json::Value = serde_json::from_str(&take_string(json)).unwrap();
    assert_eq!(info["device"], "host");
    assert_eq!(info["backend"], "uring");
    assert_eq!(info["anonymous"], true);
    assert_eq!(info["capacity"], 64 << 20);
    // SAFETY: open, used by no one else; closed once.
    check(unsafe { spillway_engine_close(engine) }, SPILLWAY_OK);
}

#[test]
fn threads_share_one_engine() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_small(dir.path());
    /// The engine pointer, sent to other threads (every call but close may be made there).
    #[derive(Clone, Copy)]
    struct Shared(*const spillway_engine);
    // SAFETY: the engine's calls are thread-safe (`OpenedEngine` is `Sync`).
    unsafe impl Send for Shared {}
    let shared = Shared(engine);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                let shared = shared;
                for i in 0..20u64 {
                    let mut src = pattern(10_000 + (t * 20 + i) as usize * 97, (t * 20 + i) as u8);
                    let r = [region(&mut src)];
                    let mut h = 0;
                    // SAFETY: `src` stays until its handle is released below.
                    check(
                        unsafe { spillway_engine_offload(shared.0, t, i, r.as_ptr(), 1, null_mut(), &mut h) },
                        SPILLWAY_OK,
                    );
                    let mut back = vec![0u8; src.len()];
                    let r = [region(&mut back)];
                    // SAFETY: `back` is live and idle.
                    check(
                        unsafe { spillway_engine_fetch(shared.0, h, r.as_ptr(), 1, null_mut()) },
                        SPILLWAY_OK,
                    );
                    assert!(back == src);
                    // SAFETY: an open engine.
                    check(unsafe { spillway_engine_release(shared.0, h) }, SPILLWAY_OK);
                }
            });
        }
    });
    // SAFETY: the threads are done.
    check(unsafe { spillway_engine_close(engine) }, SPILLWAY_OK);
}

#[test]
fn bad_settings_are_refused_by_name() {
    let mut s = null_mut();
    // SAFETY: a variable for the result.
    check(unsafe { spillway_settings_new(&mut s) }, SPILLWAY_OK);
    let set = |name: &[u8], value: &[u8]| {
        let (name, value) = (CString::new(name).unwrap(), CString::new(value).unwrap());
        // SAFETY: live settings, NUL-terminated strings.
        unsafe { spillway_settings_set(s, name.as_ptr(), value.as_ptr()) }
    };
    check(set(b"staging_bytes", b"lots"), SPILLWAY_ERROR_INVALID_ARGUMENT);
    let msg = last_error();
    assert!(
        msg.starts_with("spillway_settings_set: argument staging_bytes=\"lots\": "),
        "{msg}"
    );
    check(set(b"stagging_bytes", b"1MiB"), SPILLWAY_ERROR_INVALID_ARGUMENT);
    assert!(
        last_error().contains("did you mean \"staging_bytes\""),
        "{}",
        last_error()
    );
    check(set(b"device", b"tpu"), SPILLWAY_ERROR_INVALID_ARGUMENT);
    assert!(last_error().contains("device=\"tpu\""), "{}", last_error());
    check(set(b"device", b"\xff"), SPILLWAY_ERROR_INVALID_ARGUMENT);
    assert!(
        last_error().contains("value is not valid UTF-8"),
        "{}",
        last_error()
    );
    // SAFETY: a NULL name is refused, not read.
    check(
        unsafe { spillway_settings_set(s, null(), c"1".as_ptr()) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert!(last_error().contains("name is NULL"), "{}", last_error());
    // SAFETY: NULL settings are refused.
    check(
        unsafe { spillway_settings_set(null_mut(), c"device".as_ptr(), c"host".as_ptr()) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    // Settings that do not fit together are refused at open, naming both.
    check(set(b"device", b"host"), SPILLWAY_OK);
    check(set(b"staging_bytes", b"1MiB"), SPILLWAY_OK);
    check(set(b"prefetch_bytes", b"2MiB"), SPILLWAY_OK);
    let dir = tempfile::tempdir().unwrap();
    let (status, engine) = open(dir.path(), 1 << 20, s);
    check(status, SPILLWAY_ERROR_INVALID_ARGUMENT);
    assert!(engine.is_null());
    let msg = last_error();
    assert!(
        msg.contains("prefetch_bytes") && msg.contains("staging_bytes"),
        "{msg}"
    );
}

#[test]
fn bad_calls_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut out = null_mut();
    // SAFETY: NULL pointers are refused, not read.
    check(
        unsafe { spillway_engine_open(null(), 0, 0, null(), &mut out) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert!(last_error().contains("no storage path given"), "{}", last_error());
    // SAFETY: as above.
    check(
        unsafe { spillway_engine_open(null(), 2, 0, null(), &mut out) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert!(
        last_error().contains("paths is NULL but its count is 2"),
        "{}",
        last_error()
    );
    let paths = [null::<c_char>()];
    // SAFETY: as above.
    check(
        unsafe { spillway_engine_open(paths.as_ptr(), 1, 0, null(), &mut out) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert!(last_error().contains("paths[0] is NULL"), "{}", last_error());
    let (status, _) = open(&dir.path().join("huge.bin"), 1 << 60, small_settings(&[]));
    assert!(
        matches!(status, SPILLWAY_ERROR_NO_SPACE | SPILLWAY_ERROR_IO),
        "{status}: {}",
        last_error()
    );
    assert!(last_error().to_lowercase().contains("space"), "{}", last_error());

    let engine = open_small(dir.path());
    let mut src = pattern(4096, 1);
    let r = [region(&mut src)];
    let mut h = 0;
    // SAFETY: `src` outlives the engine (closed below).
    check(
        unsafe { spillway_engine_offload(engine, 1, 0, r.as_ptr(), 1, null_mut(), &mut h) },
        SPILLWAY_OK,
    );
    let short = [spillway_region {
        address: src.as_mut_ptr().cast(),
        length: 100,
    }];
    // SAFETY: refused before any byte is written.
    check(
        unsafe { spillway_engine_fetch(engine, h, short.as_ptr(), 1, null_mut()) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert!(
        last_error().contains("holds 100 bytes but the tensor has 4096"),
        "{}",
        last_error()
    );
    let stream = 1234usize as *mut c_void;
    // SAFETY: a stream on a host-memory engine is refused before it is used.
    check(
        unsafe { spillway_engine_offload(engine, 2, 0, r.as_ptr(), 1, stream, &mut h) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert!(last_error().contains("CUDA stream was given"), "{}", last_error());
    // SAFETY: an unknown handle is refused.
    check(
        unsafe { spillway_engine_release(engine, 987_654) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    let mut released = false;
    // SAFETY: as above.
    check(
        unsafe { spillway_engine_source_released(engine, 987_654, &mut released) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert!(
        last_error().contains("unknown or released handle 987654"),
        "{}",
        last_error()
    );
    // SAFETY: NULL out-parameters and engines are refused.
    check(
        unsafe { spillway_engine_offload(engine, 3, 0, r.as_ptr(), 1, null_mut(), null_mut()) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    // SAFETY: as above.
    check(
        unsafe { spillway_engine_drain(null()) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert_eq!(last_error(), "spillway_engine_drain: engine is NULL");
    // SAFETY: as above.
    check(
        unsafe { spillway_engine_stats_json(engine, null_mut()) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    // SAFETY: open, closed once; NULL is ignored.
    check(unsafe { spillway_engine_close(engine) }, SPILLWAY_OK);
    check(unsafe { spillway_engine_close(null_mut()) }, SPILLWAY_OK);
}

#[test]
fn the_last_error_is_per_thread_and_panics_are_caught() {
    // SAFETY: a NULL engine is refused.
    check(
        unsafe { spillway_engine_drain(null()) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    std::thread::spawn(|| assert_eq!(last_error(), ""))
        .join()
        .unwrap();
    assert!(last_error().contains("engine is NULL"));
    let status = guard("spillway_test", || panic!("boom"));
    check(status, SPILLWAY_ERROR_INTERNAL);
    assert!(
        last_error().starts_with("spillway_test: internal error"),
        "{}",
        last_error()
    );
    assert!(last_error().ends_with("boom"), "{}", last_error());
}

#[test]
fn every_status_has_a_name() {
    let name = |s| {
        // SAFETY: a static NUL-terminated string.
        unsafe { CStr::from_ptr(spillway_status_name(s)) }
            .to_str()
            .unwrap()
    };
    assert_eq!(name(SPILLWAY_OK), "SPILLWAY_OK");
    assert_eq!(name(SPILLWAY_ERROR_NO_SPACE), "SPILLWAY_ERROR_NO_SPACE");
    for s in SPILLWAY_ERROR_INVALID_ARGUMENT..=SPILLWAY_ERROR_INTERNAL {
        assert!(name(s).starts_with("SPILLWAY_ERROR_"));
    }
    assert_eq!(name(-1), "unknown status");
    // SAFETY: a static NUL-terminated string.
    let version = unsafe { CStr::from_ptr(spillway_version()) }.to_str().unwrap();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
}
