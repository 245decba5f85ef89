//! The C ABI called as C would, on host memory in a temporary directory.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::{null, null_mut};

use crate::engine::*;
use crate::error::{guard, spillway_last_error};
use crate::ops::*;
use crate::settings::*;
use crate::stats::*;
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
            unsafe { spillway_engine_wait_source_released(engine, h, null_mut()) },
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
    // More than the filesystem has free is refused before anything is reserved.
    let (status, _) = open(&dir.path().join("huge.bin"), 1 << 60, small_settings(&[]));
    assert_eq!(status, SPILLWAY_ERROR_INVALID_ARGUMENT, "{}", last_error());
    assert!(
        last_error().contains("capacity=") && last_error().contains("available"),
        "{}",
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
    for s in SPILLWAY_ERROR_INVALID_ARGUMENT..=SPILLWAY_ERROR_CORRUPT {
        assert!(name(s).starts_with("SPILLWAY_ERROR_"));
    }
    assert_eq!(name(-1), "unknown status");
    // SAFETY: a static NUL-terminated string.
    let version = unsafe { CStr::from_ptr(spillway_version()) }.to_str().unwrap();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
}

/// Offloads `n` buffers of `size` bytes (kept in `sources`) and drains; their handles.
fn offload_some(engine: *const spillway_engine, sources: &mut [Vec<u8>]) -> Vec<spillway_handle> {
    let mut handles = Vec::new();
    for (i, src) in sources.iter_mut().enumerate() {
        let r = [region(src)];
        let mut h = 0;
        // SAFETY: the caller keeps `sources` until the handles are released.
        check(
            unsafe { spillway_engine_offload(engine, 100 + i as u64, 0, r.as_ptr(), 1, null_mut(), &mut h) },
            SPILLWAY_OK,
        );
        handles.push(h);
    }
    // SAFETY: an open engine.
    check(unsafe { spillway_engine_drain(engine) }, SPILLWAY_OK);
    handles
}

/// An engine as [`open_small`]'s that writes a partly filled packed extent only when drained,
/// so that the number of extents does not hang on timing.
fn open_packing_until_drained(dir: &std::path::Path) -> *mut spillway_engine {
    let (status, engine) = open(dir, 64 << 20, small_settings(&[("pack_flush_delay_ms", "10000")]));
    check(status, SPILLWAY_OK);
    engine
}

fn stats_of(engine: *const spillway_engine) -> spillway_stats {
    let mut stats = spillway_stats::default();
    // SAFETY: an open engine and a struct of the size given.
    check(
        unsafe { spillway_engine_stats(engine, &mut stats, size_of::<spillway_stats>()) },
        SPILLWAY_OK,
    );
    stats
}

fn usage_of(engine: *const spillway_engine) -> spillway_storage_usage {
    let mut usage = spillway_storage_usage::default();
    // SAFETY: an open engine and a struct of the size given.
    check(
        unsafe { spillway_engine_storage_usage(engine, &mut usage, size_of::<spillway_storage_usage>()) },
        SPILLWAY_OK,
    );
    usage
}

fn json_of(call: impl FnOnce(*mut *mut c_char) -> c_int) -> serde_json::Value {
    let mut json = null_mut();
    check(call(&mut json), SPILLWAY_OK);
    serde_json::from_str(&take_string(json)).unwrap()
}

#[test]
fn storage_usage_follows_what_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_packing_until_drained(dir.path());
    let empty = usage_of(engine);
    assert_eq!(
        empty,
        spillway_storage_usage {
            capacity: 64 << 20,
            used: 0,
            free: 64 << 20,
            largest_free: 64 << 20,
            free_ranges: 1,
            live_extents: 0,
            fragmentation: 0.0,
        }
    );
    // One packed extent (small tensors) and one extent of its own (a large one).
    let mut sources = vec![pattern(4096, 1), pattern(10_000, 2), pattern(2 << 20, 3)];
    let handles = offload_some(engine, &mut sources);
    let held = usage_of(engine);
    assert_eq!(held.capacity, 64 << 20);
    assert!(held.used >= (2 << 20) + 14_096, "{held:?}");
    assert_eq!(held.used + held.free, held.capacity, "{held:?}");
    assert_eq!(held.live_extents, 2, "{held:?}");
    assert!(held.largest_free <= held.free && (0.0..=1.0).contains(&held.fragmentation));
    for h in handles {
        // SAFETY: an open engine.
        check(unsafe { spillway_engine_release(engine, h) }, SPILLWAY_OK);
    }
    assert_eq!(usage_of(engine), empty);
    // SAFETY: open, closed once.
    check(unsafe { spillway_engine_close(engine) }, SPILLWAY_OK);
}

#[test]
fn stats_count_what_the_engine_did() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_packing_until_drained(dir.path());
    assert_eq!(
        stats_of(engine),
        spillway_stats {
            staging_budget: 8 << 20,
            ..Default::default()
        }
    );
    let mut sources = vec![pattern(4096, 1), pattern(10_000, 2), pattern(2 << 20, 3)];
    let handles = offload_some(engine, &mut sources);
    // The same storage and version again: stored once.
    let mut again = 0;
    let r = [region(&mut sources[0])];
    // SAFETY: `sources` outlives the engine's use of it.
    check(
        unsafe { spillway_engine_offload(engine, 100, 0, r.as_ptr(), 1, null_mut(), &mut again) },
        SPILLWAY_OK,
    );
    let mut back = vec![0u8; 2 << 20];
    let r = [region(&mut back)];
    // SAFETY: `back` is live and idle.
    check(
        unsafe { spillway_engine_fetch(engine, handles[2], r.as_ptr(), 1, null_mut()) },
        SPILLWAY_OK,
    );
    let s = stats_of(engine);
    assert_eq!(s.offloads, 4, "{s:?}");
    assert_eq!(s.offload_bytes, 4096 * 2 + 10_000 + (2 << 20), "{s:?}");
    assert_eq!((s.dedup_hits, s.dedup_bytes), (1, 4096), "{s:?}");
    assert_eq!((s.packed_tensors, s.direct_tensors), (2, 1), "{s:?}");
    assert_eq!(s.extents_written, 2, "{s:?}");
    assert!(s.bytes_written >= (2 << 20) + 14_096 && s.writes >= 2, "{s:?}");
    assert_eq!((s.fetches, s.fetch_bytes), (1, 2 << 20), "{s:?}");
    assert!(s.bytes_read >= 2 << 20 && s.reads >= 1, "{s:?}");
    assert_eq!(s.write_latency.count, s.writes, "{s:?}");
    assert_eq!(s.fetch_latency.count, 1, "{s:?}");
    assert!(s.fetch_latency.max_us >= s.fetch_latency.p50_us && s.fetch_latency.mean_us > 0.0);
    assert_eq!(s.live_handles, 4, "{s:?}");
    assert_eq!(s.staging_budget, 8 << 20);

    // The JSON holds the same counters under the same names, and the struct every one of
    // them: 8 bytes each, and latency per operation.
    let json = json_of(|out| {
        // SAFETY: an open engine, a variable for the result.
        unsafe { spillway_engine_stats_json(engine, out) }
    });
    // Latency is one nested object; `members` (a striped set's) is not a counter.
    assert_eq!(json["members"], serde_json::json!([]), "one path: no members");
    let counters = json.as_object().unwrap().len() - 2;
    assert_eq!(
        size_of::<spillway_stats>(),
        8 * (counters + 2) + 4 * size_of::<spillway_latency>(),
        "spillway_stats does not have every counter of the JSON ({json})"
    );
    for (name, value) in [
        ("offloads", s.offloads),
        ("dedup_bytes", s.dedup_bytes),
        ("packed_tensors", s.packed_tensors),
        ("bytes_written", s.bytes_written),
        ("fetch_bytes", s.fetch_bytes),
        ("staging_budget", s.staging_budget),
    ] {
        assert_eq!(json[name], value, "{name} in {json}");
    }
    assert_eq!(json["latency"]["fetch"]["count"], 1, "{json}");

    for h in handles.into_iter().chain([again]) {
        // SAFETY: an open engine.
        check(unsafe { spillway_engine_release(engine, h) }, SPILLWAY_OK);
    }
    assert_eq!(stats_of(engine).live_handles, 0);
    // SAFETY: open, closed once.
    check(unsafe { spillway_engine_close(engine) }, SPILLWAY_OK);
}

#[test]
fn stats_and_usage_refuse_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_small(dir.path());
    let mut stats = spillway_stats {
        offloads: 77,
        ..Default::default()
    };
    let size = size_of::<spillway_stats>();
    // SAFETY: NULL pointers are refused, not used.
    check(
        unsafe { spillway_engine_stats(null(), &mut stats, size) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert_eq!(last_error(), "spillway_engine_stats: engine is NULL");
    // SAFETY: as above.
    check(
        unsafe { spillway_engine_stats(engine, null_mut(), size) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert!(
        last_error().starts_with("spillway_engine_stats: out is NULL"),
        "{}",
        last_error()
    );
    // A struct of another size (another spillway.h) is refused and left alone.
    for wrong in [0, size - 8, size + 8] {
        // SAFETY: refused before anything is written.
        check(
            unsafe { spillway_engine_stats(engine, &mut stats, wrong) },
            SPILLWAY_ERROR_INVALID_ARGUMENT,
        );
        assert!(
            last_error().contains(&format!("size is {wrong} but a spillway_stats is {size} bytes")),
            "{}",
            last_error()
        );
    }
    assert_eq!(stats.offloads, 77, "a refused call wrote to the struct");

    let mut usage = spillway_storage_usage::default();
    let size = size_of::<spillway_storage_usage>();
    // SAFETY: as above.
    check(
        unsafe { spillway_engine_storage_usage(null(), &mut usage, size) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert_eq!(last_error(), "spillway_engine_storage_usage: engine is NULL");
    // SAFETY: as above.
    check(
        unsafe { spillway_engine_storage_usage(engine, null_mut(), size) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    // SAFETY: as above.
    check(
        unsafe { spillway_engine_storage_usage(engine, &mut usage, size_of::<spillway_stats>()) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert!(
        last_error().contains("pass sizeof(spillway_storage_usage)"),
        "{}",
        last_error()
    );
    assert_eq!(usage, spillway_storage_usage::default());
    let mut json = c"untouched".as_ptr().cast_mut();
    // SAFETY: as above; `*out` is set to NULL first.
    check(
        unsafe { spillway_engine_stats_json(null(), &mut json) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert!(json.is_null());
    // SAFETY: open, closed once.
    check(unsafe { spillway_engine_close(engine) }, SPILLWAY_OK);
}

#[test]
fn the_timeline_is_written_as_chrome_trace_json() {
    let dir = tempfile::tempdir().unwrap();
    let (status, engine) = open(dir.path(), 64 << 20, small_settings(&[("timeline", "true")]));
    check(status, SPILLWAY_OK);
    let mut sources = vec![pattern(100_000, 1)];
    let handles = offload_some(engine, &mut sources);
    let mut back = vec![0u8; 100_000];
    let r = [region(&mut back)];
    // SAFETY: `back` is live and idle.
    check(
        unsafe { spillway_engine_fetch(engine, handles[0], r.as_ptr(), 1, null_mut()) },
        SPILLWAY_OK,
    );
    let trace = dir.path().join("trace.json");
    let path = CString::new(trace.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: an open engine and a NUL-terminated path.
    check(
        unsafe { spillway_engine_write_trace(engine, path.as_ptr()) },
        SPILLWAY_OK,
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let names: Vec<&str> = doc["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for want in ["pack", "write", "demand read"] {
        assert!(names.contains(&want), "no {want:?} span in {names:?}");
    }
    // Made private; written again, the file of ours is replaced.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(std::fs::metadata(&trace).unwrap().mode() & 0o7777, 0o600);
    std::fs::write(&trace, b"an old trace").unwrap();
    std::fs::set_permissions(&trace, std::fs::Permissions::from_mode(0o644)).unwrap();
    // SAFETY: an open engine and a NUL-terminated path.
    check(
        unsafe { spillway_engine_write_trace(engine, path.as_ptr()) },
        SPILLWAY_OK,
    );
    let again: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    assert!(again["traceEvents"].is_array());
    assert_eq!(std::fs::metadata(&trace).unwrap().mode() & 0o7777, 0o600);
    // A symbolic link at the path (another user's, in a shared directory) is refused, and
    // the file it leads to is left alone.
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    let link = dir.path().join("linked-trace.json");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let link_c = CString::new(link.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: as above.
    check(
        unsafe { spillway_engine_write_trace(engine, link_c.as_ptr()) },
        SPILLWAY_ERROR_IO,
    );
    let msg = last_error();
    assert!(
        msg.starts_with("spillway_engine_write_trace: creating the trace file")
            && msg.contains(&format!(
                "{} is a symbolic link to {}",
                link.display(),
                victim.display()
            )),
        "{msg}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // A file that cannot be made is an I/O error, named.
    let nowhere = CString::new(
        dir.path()
            .join("no/such/dir/trace.json")
            .as_os_str()
            .as_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: as above.
    check(
        unsafe { spillway_engine_write_trace(engine, nowhere.as_ptr()) },
        SPILLWAY_ERROR_IO,
    );
    assert!(
        last_error().starts_with("spillway_engine_write_trace: creating the trace file"),
        "{}",
        last_error()
    );
    // SAFETY: NULL pointers are refused, not read.
    check(
        unsafe { spillway_engine_write_trace(engine, null()) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert!(last_error().contains("path is NULL"), "{}", last_error());
    // SAFETY: as above.
    check(
        unsafe { spillway_engine_write_trace(engine, c"".as_ptr()) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert!(last_error().contains("path is empty"), "{}", last_error());
    // SAFETY: as above.
    check(
        unsafe { spillway_engine_write_trace(null(), path.as_ptr()) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    // SAFETY: an open engine.
    check(
        unsafe { spillway_engine_release(engine, handles[0]) },
        SPILLWAY_OK,
    );
    // SAFETY: open, closed once.
    check(unsafe { spillway_engine_close(engine) }, SPILLWAY_OK);
}

#[test]
fn a_trace_without_the_timeline_is_refused_with_the_setting_to_use() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_small(dir.path());
    let trace = dir.path().join("trace.json");
    let path = CString::new(trace.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: an open engine and a NUL-terminated path.
    check(
        unsafe { spillway_engine_write_trace(engine, path.as_ptr()) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    let msg = last_error();
    assert!(
        msg.starts_with("spillway_engine_write_trace: the engine's timeline is off")
            && msg.contains("timeline = true"),
        "{msg}"
    );
    assert!(!trace.exists(), "a refused trace left a file");
    // SAFETY: open, closed once.
    check(unsafe { spillway_engine_close(engine) }, SPILLWAY_OK);
}

#[test]
fn settings_read_back_with_their_sources() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<&str> = spillway::settings::names().collect();
    let settings = small_settings(&[("timeline", "on")]);
    let before = json_of(|out| {
        // SAFETY: live settings, a variable for the result.
        unsafe { spillway_settings_json(settings, out) }
    });
    let (status, engine) = open(dir.path(), 64 << 20, settings);
    check(status, SPILLWAY_OK);
    let json = json_of(|out| {
        // SAFETY: an open engine, a variable for the result.
        unsafe { spillway_engine_settings_json(engine, out) }
    });
    assert_eq!(json, before, "the engine runs with the settings it was given");
    let mut keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = names.clone();
    want.sort_unstable();
    assert_eq!(keys, want, "one key per setting");
    let setting = |name: &str| (json[name]["value"].clone(), json[name]["source"].clone());
    assert_eq!(setting("staging_bytes"), ((8u64 << 20).into(), "argument".into()));
    assert_eq!(setting("device"), ("host".into(), "argument".into()));
    assert_eq!(setting("timeline"), (true.into(), "argument".into()));
    assert_eq!(setting("pack_flush_delay_ms").0, 2.0);
    for name in ["alignment", "pack", "queue_depth"] {
        // Unless the environment running the tests sets them.
        if std::env::var_os(format!("SPILLWAY_{}", name.to_uppercase())).is_none()
            && std::env::var_os("SPILLWAY_CONFIG").is_none()
        {
            assert_eq!(json[name]["source"], "default", "{name}: {json}");
        }
    }
    assert_eq!(json["alignment"]["value"].as_u64().unwrap() % 512, 0);
    // SAFETY: open, closed once.
    check(unsafe { spillway_engine_close(engine) }, SPILLWAY_OK);
}

#[test]
fn settings_json_refuses_what_open_would() {
    let mut out = null_mut();
    // SAFETY: NULL pointers are refused, not used.
    check(
        unsafe { spillway_settings_json(null(), &mut out) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert_eq!(last_error(), "spillway_settings_json: settings is NULL");
    assert!(out.is_null());
    let settings = small_settings(&[("prefetch_bytes", "16MiB")]);
    // SAFETY: live settings, a variable for the result.
    check(
        unsafe { spillway_settings_json(settings, &mut out) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    let msg = last_error();
    assert!(
        msg.starts_with("spillway_settings_json: ")
            && msg.contains("prefetch_bytes")
            && msg.contains("staging_bytes"),
        "{msg}"
    );
    // SAFETY: as above.
    check(
        unsafe { spillway_settings_json(settings, null_mut()) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    // SAFETY: as above.
    check(
        unsafe { spillway_engine_settings_json(null(), &mut out) },
        SPILLWAY_ERROR_INVALID_ARGUMENT,
    );
    assert_eq!(last_error(), "spillway_engine_settings_json: engine is NULL");
    // SAFETY: made by `spillway_settings_new`, freed once.
    unsafe { spillway_settings_free(settings) };
}

#[test]
fn a_file_another_engine_has_open_or_listed_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("same.bin");
    let first = open_small(&file);
    let (status, second) = open(&file, 64 << 20, small_settings(&[]));
    check(status, SPILLWAY_ERROR_IO);
    assert!(second.is_null());
    let msg = last_error();
    assert!(
        msg.starts_with("spillway_engine_open:")
            && msg.contains(&format!(
                "{} is in use by another spillway engine (process {}, this process)",
                file.display(),
                std::process::id()
            )),
        "{msg}"
    );
    // SAFETY: open, closed once.
    check(unsafe { spillway_engine_close(first) }, SPILLWAY_OK);

    // One file twice in a striped set.
    let path = CString::new(file.as_os_str().as_encoded_bytes()).unwrap();
    let paths = [path.as_ptr(), path.as_ptr()];
    let mut engine = null_mut();
    let settings = small_settings(&[]);
    // SAFETY: two live path strings, live settings, a variable for the result.
    let status = unsafe { spillway_engine_open(paths.as_ptr(), 2, 64 << 20, settings, &mut engine) };
    // SAFETY: made by `spillway_settings_new`, not used after this.
    unsafe { spillway_settings_free(settings) };
    check(status, SPILLWAY_ERROR_IO);
    assert!(engine.is_null());
    let msg = last_error();
    assert!(
        msg.contains(&format!(
            "{} is listed twice, the same file both times",
            file.display()
        )) && msg.contains("list each file once"),
        "{msg}"
    );
}

#[test]
fn a_null_region_or_lengths_that_overflow_are_invalid_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_small(dir.path());
    let mut h = 0;
    let null_region = spillway_region {
        address: null_mut(),
        length: 4096,
    };
    // SAFETY: an open engine, one region (refused before it is read), a handle variable.
    let status = unsafe { spillway_engine_offload(engine, 1, 0, &null_region, 1, null_mut(), &mut h) };
    check(status, SPILLWAY_ERROR_INVALID_ARGUMENT);
    assert!(
        last_error().contains("offload region 0 has address 0"),
        "{}",
        last_error()
    );
    let mut buf = pattern(4096, 3);
    let huge = [
        spillway_region {
            address: buf.as_mut_ptr().cast(),
            length: 1 << 63,
        },
        spillway_region {
            address: buf.as_mut_ptr().cast(),
            length: 1 << 63,
        },
    ];
    // SAFETY: as above; refused before the memory is read.
    let status = unsafe { spillway_engine_offload(engine, 2, 0, huge.as_ptr(), 2, null_mut(), &mut h) };
    check(status, SPILLWAY_ERROR_INVALID_ARGUMENT);
    assert!(
        last_error().contains("add up to more than 2^64"),
        "{}",
        last_error()
    );
    // SAFETY: opened above, not used after this.
    check(unsafe { spillway_engine_close(engine) }, SPILLWAY_OK);
}

#[test]
fn resource_settings_past_their_caps_and_a_huge_capacity_are_invalid_arguments() {
    let s = small_settings(&[]);
    for (name, value, why) in [
        ("threads", "2147483648", "at most 256"),
        ("queue_depth", "100000", "at most 4096"),
        ("pack_flush_delay_ms", "1e12", "at most 10000"),
    ] {
        let (n, v) = (CString::new(name).unwrap(), CString::new(value).unwrap());
        // SAFETY: live settings, NUL-terminated strings.
        check(
            unsafe { spillway_settings_set(s, n.as_ptr(), v.as_ptr()) },
            SPILLWAY_ERROR_INVALID_ARGUMENT,
        );
        assert!(
            last_error().contains(name) && last_error().contains(why),
            "{}",
            last_error()
        );
    }
    // SAFETY: made by `spillway_settings_new`, not used after this.
    unsafe { spillway_settings_free(s) };
    let dir = tempfile::tempdir().unwrap();
    let (status, engine) = open(dir.path(), u64::MAX, small_settings(&[]));
    check(status, SPILLWAY_ERROR_INVALID_ARGUMENT);
    assert!(engine.is_null());
    assert!(
        last_error()
            .contains("capacity=18446744073709551615 is too large: at most 9223372036854775807 bytes"),
        "{}",
        last_error()
    );
}
