//! Property-based fuzzing of the C ABI: every exported function called as C would, with
//! NULL wherever the contract allows it, strings of any bytes (not UTF-8, odd, near misses),
//! any region lists, lengths, handles and struct sizes, on engines in host memory in
//! temporary directories. Nothing the contract forbids is passed (a pointer to memory that
//! is not there): only NULL, or valid memory holding anything.
//!
//! Every call must return a status: `SPILLWAY_OK`, or an error with a message from
//! `spillway_last_error()` naming the function. A panic is caught at the boundary and
//! reported as `SPILLWAY_ERROR_INTERNAL`: that status, or a message saying "internal error",
//! fails the property like a panic would.
//!
//! The crate builds a C library only (no rlib to link a test against), so its sources are
//! compiled into this test as modules, as the library compiles them.
//!
//! Bugs they found are kept as tests at the end: waiting for the source of a tensor whose
//! every handle fetched it before its write started never returned (the engine keeps the
//! memory until release; the wait now says so at once), an `alignment` of 2^63 overflowed
//! in `EngineConfig::validate`, and a striped set whose `stripe_bytes` times its weights
//! passes 2^64 overflowed in `StripedBackend::open`.
//!
//! Opening engines here never reserves much storage: cases that would give a file more
//! than 256 MiB up front (a striped set without a capacity reserves half the free space of
//! each path) are left out, as are thread counts past 3 and sizes from 64 MiB to 2^62
//! bytes (allocated before anything refuses them).

#![allow(non_camel_case_types)]

#[path = "../src/args.rs"]
mod args;
#[path = "../src/engine.rs"]
pub mod engine;
#[path = "../src/error.rs"]
pub mod error;
#[path = "../src/ops.rs"]
pub mod ops;
#[path = "../src/settings.rs"]
pub mod settings;
#[path = "../src/stats.rs"]
pub mod stats;
#[path = "../src/status.rs"]
pub mod status;
#[path = "../src/strings.rs"]
pub mod strings;

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::ptr::{null, null_mut};

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use spillway::settings::{Settings, Value, SETTINGS};

use engine::*;
use error::spillway_last_error;
use ops::*;
use settings::*;
use stats::*;
use status::*;
use strings::*;

/// Cases per property of cheap calls, unless `PROPTEST_CASES` says otherwise.
const CASES: u32 = 2048;
/// Cases per property that opens an engine per case.
const ENGINE_CASES: u32 = 160;

/// The configuration of a property of `cases` cases. `PROPTEST_CASES=N` scales every
/// property of the file by N / [`CASES`] (the default leaves them as they are).
fn config(cases: u32) -> ProptestConfig {
    let scaled = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse::<u64>().ok())
        .map_or(cases, |n| {
            (u64::from(cases) * n / u64::from(CASES)).clamp(1, u64::from(u32::MAX)) as u32
        });
    ProptestConfig {
        // A failure is reproduced from the seed printed with it; no file is written.
        failure_persistence: None,
        ..ProptestConfig::with_cases(scaled)
    }
}

/// Runs `test` on `cases` inputs from `strategy` (for properties with a fixture made once).
fn run<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(config(cases));
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------
// Statuses and messages.
// ---------------------------------------------------------------------------------------

/// The last failure's message on this thread.
fn last_error() -> String {
    // SAFETY: the library returns a NUL-terminated string, valid until the next call.
    unsafe { CStr::from_ptr(spillway_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Checks the outcome of a call to `function`: true for `SPILLWAY_OK`; false for an error
/// status with a message naming `function`. A caught panic (`SPILLWAY_ERROR_INTERNAL`, or a
/// message saying so) or an unknown status fails.
fn outcome(function: &str, status: c_int) -> Result<bool, TestCaseError> {
    if status == SPILLWAY_OK {
        return Ok(true);
    }
    let message = last_error();
    prop_assert!(
        status != SPILLWAY_ERROR_INTERNAL && !message.contains("internal error (a bug in spillway"),
        "{function} panicked: status {status}: {message}"
    );
    prop_assert!(
        (SPILLWAY_ERROR_INVALID_ARGUMENT..=SPILLWAY_ERROR_DEVICE).contains(&status),
        "{function} returned the unknown status {status}: {message}"
    );
    prop_assert!(
        message.starts_with(&format!("{function}: ")) && message.len() > function.len() + 2,
        "{function} failed with status {status} but the message is {message:?}"
    );
    Ok(false)
}

/// Checks that a call to `function` failed with `want`, its message holding `says`.
fn refused(function: &str, status: c_int, want: c_int, says: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        !outcome(function, status)?,
        "{function} accepted what it should refuse ({says})"
    );
    let message = last_error();
    prop_assert_eq!(status, want, "{}", message);
    prop_assert!(
        message.contains(says),
        "{function}: {message:?} does not say {says:?}"
    );
    Ok(())
}

/// Checks that a call to `function` succeeded.
fn accepted(function: &str, status: c_int) -> Result<(), TestCaseError> {
    prop_assert!(outcome(function, status)?, "{function} failed: {}", last_error());
    Ok(())
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

/// Calls a function that stores a JSON string in `*out`, with NULL for `out` when
/// `out_null`: checks the outcome, parses and frees the string. `None` on failure.
fn json_call(
    function: &str,
    out_null: bool,
    call: impl FnOnce(*mut *mut c_char) -> c_int,
) -> Result<Option<serde_json::Value>, TestCaseError> {
    if out_null {
        refused(
            function,
            call(null_mut()),
            SPILLWAY_ERROR_INVALID_ARGUMENT,
            "out is NULL",
        )?;
        return Ok(None);
    }
    let mut out = std::ptr::dangling_mut::<c_char>(); // Not NULL, so that a failure must clear it.
    let status = call(&mut out);
    if !outcome(function, status)? {
        prop_assert!(out.is_null(), "{function} failed but left *out set");
        return Ok(None);
    }
    let text = take_string(out);
    match serde_json::from_str(&text) {
        Ok(json) => Ok(Some(json)),
        Err(e) => Err(TestCaseError::fail(format!(
            "{function} gave invalid JSON ({e}): {text}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// Strategies.
// ---------------------------------------------------------------------------------------

/// Bytes for a C string (no NUL): text, near misses, and bytes that are not UTF-8.
fn c_bytes(text: impl Strategy<Value = String>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => text.prop_map(String::into_bytes),
        1 => prop::collection::vec(1u8..=255, 0..24),
        1 => prop::sample::select(vec![
            &b"\xff"[..], b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"device\xff", b"\xf4\x90\x80\x80", b"host\x80",
            b"\xef\xbb\xbfhost", b"1\xe2\x80\xafMiB",
        ])
        .prop_map(<[u8]>::to_vec),
    ]
    .prop_map(|mut bytes| {
        bytes.retain(|&b| b != 0);
        bytes
    })
}

/// The name of a setting.
fn setting_name() -> impl Strategy<Value = String> {
    prop::sample::select(SETTINGS.iter().map(|s| s.name).collect::<Vec<_>>()).prop_map(str::to_string)
}

/// A setting's name, a near miss, or anything.
fn name_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => setting_name(),
        1 => setting_name().prop_map(|n| n.to_ascii_uppercase()),
        1 => setting_name().prop_map(|n| format!("{n} ")),
        1 => ".{0,16}",
    ]
}

/// A value of any setting as text, or anything.
fn value_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (
            prop_oneof![
                (0u64..5000).prop_map(|n| n.to_string()),
                any::<u64>().prop_map(|n| n.to_string()),
                (0u32..63).prop_map(|s| (1u64 << s).to_string()),
                Just("18446744073709551616".to_string()),
            ],
            prop::sample::select(vec!["", "K", "KiB", "MiB", "M", "GB", "T", "x", " "]),
        )
            .prop_map(|(n, u)| format!("{n}{u}")),
        2 => prop::sample::select(vec![
            "true", "false", "0", "1", "on", "auto", "host", "cpu", "cuda", "cuda:0", "cuda:x", "uring", "spdk",
            "cufile", "1,2", "0=/x", "0=;", "write_error=0.5", "error=2", "latency_p=0.5", "0.5", "-1", "NaN",
            "inf", "1e308", "",
        ])
        .prop_map(str::to_string),
        1 => ".{0,16}",
        1 => prop::collection::vec(any::<char>(), 0..8).prop_map(String::from_iter),
    ]
}

/// A pointer argument: NULL, or a C string of these bytes.
fn c_string_arg(text: impl Strategy<Value = String>) -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![1 => Just(None), 12 => c_bytes(text).prop_map(Some)]
}

fn c_string(bytes: &Option<Vec<u8>>) -> Option<CString> {
    bytes
        .as_ref()
        .map(|b| CString::new(b.clone()).expect("no NUL in the strategy's bytes"))
}

fn ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(null(), |s| s.as_ptr())
}

// ---------------------------------------------------------------------------------------
// Settings the engines are opened with.
// ---------------------------------------------------------------------------------------

/// The settings of every engine here: host memory, small staging (and two 1 MiB staging
/// buffers for its io_uring ring, not sixteen: opening takes a third of the time).
const BASE: [(&str, &str); 6] = [
    ("device", "host"),
    ("pinned_bytes", "2MiB"),
    ("staging_bytes", "8MiB"),
    ("prefetch_bytes", "4MiB"),
    ("pack_extent_bytes", "1MiB"),
    ("pack_threshold", "256KiB"),
];

/// Settings from `spillway_settings_new` with `pairs` set (each must be accepted).
fn new_settings(pairs: &[(&str, &str)]) -> *mut spillway_settings {
    let mut s = null_mut();
    // SAFETY: `s` is a variable for the result.
    let status = unsafe { spillway_settings_new(&mut s) };
    assert_eq!(status, SPILLWAY_OK, "{}", last_error());
    for (name, value) in pairs {
        let (n, v) = (CString::new(*name).unwrap(), CString::new(*value).unwrap());
        // SAFETY: live settings and NUL-terminated strings.
        let status = unsafe { spillway_settings_set(s, n.as_ptr(), v.as_ptr()) };
        assert_eq!(status, SPILLWAY_OK, "{name}={value}: {}", last_error());
    }
    s
}

/// Opens an engine on `dir` with the base settings and `extra`.
fn open_engine(dir: &Path, extra: &[(&str, &str)]) -> *mut spillway_engine {
    let pairs: Vec<(&str, &str)> = BASE.iter().chain(extra).copied().collect();
    let settings = new_settings(&pairs);
    let path = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let paths = [path.as_ptr()];
    let mut engine = null_mut();
    // SAFETY: one live path, live settings, a variable for the result.
    let status = unsafe { spillway_engine_open(paths.as_ptr(), 1, 64 << 20, settings, &mut engine) };
    // SAFETY: from `spillway_settings_new`, freed once.
    unsafe { spillway_settings_free(settings) };
    assert_eq!(status, SPILLWAY_OK, "{}", last_error());
    engine
}

/// Whether opening an engine with settings `shadow` on `n_paths` paths and `capacity`
/// reserves little: no file is given more than 256 MiB up front, or more than a file can
/// hold (refused before anything is reserved). A striped set reserves on each path its
/// weight's share of the capacity in whole rounds of stripes, and without a capacity half
/// the free space of each path: such cases would fill the disk for a while, and are left
/// out. One path without a capacity reserves nothing.
fn reserves_little(shadow: &Settings, n_paths: usize, capacity: u64) -> bool {
    let Ok(resolved) = shadow.resolve() else {
        return true;
    };
    if n_paths < 2 {
        return capacity <= 256 << 20 || capacity >= 1 << 63;
    }
    if capacity == 0 {
        return false;
    }
    let weights: Vec<u64> = if resolved.stripe_weights.is_empty() {
        vec![1; n_paths]
    } else if resolved.stripe_weights.len() == n_paths {
        resolved.stripe_weights.iter().map(|&w| u64::from(w)).collect()
    } else {
        return true; // refused before any path is opened
    };
    let stripe = u128::from(resolved.stripe_bytes);
    let round = weights.iter().map(|&w| u128::from(w)).sum::<u128>() * stripe;
    let rounds = u128::from(capacity).div_ceil(round.max(1));
    weights.iter().all(|&w| {
        let share = rounds * u128::from(w) * stripe;
        share <= 256 << 20 || share >= 1 << 63
    })
}

// ---------------------------------------------------------------------------------------
// Properties: strings and settings.
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(CASES))]

    /// Every status, known or not, has a static name; the version is the crate's.
    #[test]
    fn every_status_has_a_name(status in prop_oneof![-2i32..10, any::<i32>()]) {
        // SAFETY: the library returns a static NUL-terminated string.
        let name = unsafe { CStr::from_ptr(spillway_status_name(status)) }.to_str().unwrap();
        if (SPILLWAY_OK..=SPILLWAY_ERROR_CORRUPT).contains(&status) {
            prop_assert!(name.starts_with("SPILLWAY_"), "{name}");
        } else {
            prop_assert_eq!(name, "unknown status");
        }
        // SAFETY: as above.
        let version = unsafe { CStr::from_ptr(spillway_version()) }.to_str().unwrap();
        prop_assert_eq!(version, env!("CARGO_PKG_VERSION"));
    }

    /// `spillway_settings_set` takes any strings (NULL, not UTF-8, unknown names, bad
    /// values) and agrees with the Rust API on what it accepts; `spillway_settings_json`
    /// then gives every setting, or refuses what `resolve` refuses.
    #[test]
    fn settings_take_any_strings(
        sets in prop::collection::vec((any::<bool>(), c_string_arg(name_text()), c_string_arg(value_text())), 1..8),
        json_out_null in any::<bool>(),
    ) {
        let settings = new_settings(&[]);
        let mut shadow = Settings::load().unwrap();
        let f = "spillway_settings_set";
        for (settings_null, name, value) in &sets {
            let (name_c, value_c) = (c_string(name), c_string(value));
            let target = if *settings_null { null_mut() } else { settings };
            // SAFETY: the settings are NULL or live; the strings NULL or NUL-terminated.
            let status = unsafe { spillway_settings_set(target, ptr(&name_c), ptr(&value_c)) };
            let name_text = name.as_deref().map(std::str::from_utf8);
            let value_text = value.as_deref().map(std::str::from_utf8);
            match (settings_null, name_text, value_text) {
                (true, _, _) => refused(f, status, SPILLWAY_ERROR_INVALID_ARGUMENT, "settings is NULL")?,
                (_, None, _) => refused(f, status, SPILLWAY_ERROR_INVALID_ARGUMENT, "name is NULL")?,
                (_, Some(Err(_)), _) => {
                    refused(f, status, SPILLWAY_ERROR_INVALID_ARGUMENT, "name is not valid UTF-8")?
                }
                (_, _, None) => refused(f, status, SPILLWAY_ERROR_INVALID_ARGUMENT, "value is NULL")?,
                (_, _, Some(Err(_))) => {
                    refused(f, status, SPILLWAY_ERROR_INVALID_ARGUMENT, "value is not valid UTF-8")?
                }
                (false, Some(Ok(name)), Some(Ok(value))) => match shadow.set(name, value) {
                    Ok(()) => accepted(f, status)?,
                    Err(e) => refused(f, status, SPILLWAY_ERROR_INVALID_ARGUMENT, &e.to_string())?,
                },
            }
        }
        {
            let f = "spillway_settings_json";
            // SAFETY: live settings; `out` is NULL or a variable.
            let json = json_call(f, json_out_null, |out| unsafe { spillway_settings_json(settings, out) })?;
            match (shadow.resolve(), json) {
                (Ok(resolved), Some(json)) => {
                    // The values the engine would run with: sizes left at their defaults
                    // fitted to the staging memory.
                    for (setting, _, source) in shadow.iter() {
                        let value = setting.get(&resolved);
                        let entry = &json[setting.name];
                        prop_assert_eq!(&entry["source"], &serde_json::json!(source.to_string()));
                        let want = match value {
                            Value::Int(n) => serde_json::json!(n),
                            Value::Float(x) => serde_json::json!(x),
                            Value::Bool(b) => serde_json::json!(b),
                            Value::Str(s) => serde_json::json!(s),
                        };
                        match (entry["value"].as_f64(), &want) {
                            // serde_json parses floats to within an ulp (its float_roundtrip
                            // feature is off): the text is exact, the parse here may not be.
                            (Some(got), serde_json::Value::Number(n)) if n.is_f64() => {
                                let want = n.as_f64().unwrap();
                                prop_assert!(
                                    (got - want).abs() <= want.abs() * 4.0 * f64::EPSILON,
                                    "{}: {} for {}", setting.name, got, want
                                );
                            }
                            _ => prop_assert_eq!(&entry["value"], &want, "{}", setting.name),
                        }
                    }
                }
                (Err(e), None) if !json_out_null => {
                    prop_assert!(last_error().contains(&e.to_string()), "{}", last_error());
                }
                (_, None) => prop_assert!(json_out_null),
                (Err(e), Some(json)) => prop_assert!(false, "resolve refuses ({e}) what the ABI gives: {json}"),
            }
        }
        // SAFETY: settings NULL are refused; `out` is a variable.
        let mut out = std::ptr::dangling_mut::<c_char>();
        let status = unsafe { spillway_settings_json(null(), &mut out) };
        refused("spillway_settings_json", status, SPILLWAY_ERROR_INVALID_ARGUMENT, "settings is NULL")?;
        prop_assert!(out.is_null());
        // SAFETY: from `spillway_settings_new`, freed once; NULL is ignored.
        unsafe {
            spillway_settings_free(settings);
            spillway_settings_free(null_mut());
            spillway_string_free(null_mut());
        }
        let mut none = std::ptr::dangling_mut::<spillway_settings>();
        // SAFETY: NULL is refused.
        refused("spillway_settings_new", unsafe { spillway_settings_new(null_mut()) },
            SPILLWAY_ERROR_INVALID_ARGUMENT, "out is NULL")?;
        // SAFETY: a variable for the result.
        accepted("spillway_settings_new", unsafe { spillway_settings_new(&mut none) })?;
        // SAFETY: from `spillway_settings_new`, freed once.
        unsafe { spillway_settings_free(none) };
    }
}

// ---------------------------------------------------------------------------------------
// Regions, handles and struct sizes.
// ---------------------------------------------------------------------------------------

/// How a call's region array is given.
#[derive(Clone, Debug)]
enum Regions {
    /// NULL, with this count.
    Null(usize),
    /// Pieces of a buffer: (offset, length), each inside it.
    Pieces(Vec<(usize, usize)>),
    /// The same pieces, in an array at a misaligned address.
    Misaligned(Vec<(usize, usize)>),
}

/// Pieces of a buffer of `len` bytes: any offsets and lengths inside it, empty ones
/// included.
fn pieces(len: usize) -> impl Strategy<Value = Vec<(usize, usize)>> {
    prop::collection::vec((0..=len).prop_flat_map(move |at| (Just(at), 0..=len - at)), 0..5)
}

fn regions(len: usize) -> impl Strategy<Value = Regions> {
    prop_oneof![
        1 => prop_oneof![Just(0usize), 1usize..4, Just(usize::MAX)].prop_map(Regions::Null),
        6 => pieces(len).prop_map(Regions::Pieces),
        1 => pieces(len).prop_map(Regions::Misaligned),
    ]
}

/// The region array for `spec` over `buf`, kept alive by the returned storage; the pointer
/// and count to pass.
struct RegionArg {
    _storage: Vec<u8>,
    _aligned: Vec<spillway_region>,
    ptr: *const spillway_region,
    n: usize,
}

fn region_arg(spec: &Regions, buf: &mut [u8]) -> RegionArg {
    let base = buf.as_mut_ptr();
    let to_region = |&(at, len): &(usize, usize)| spillway_region {
        // SAFETY: `at` is at most the buffer's length (the strategy).
        address: unsafe { base.add(at) }.cast::<c_void>(),
        length: len,
    };
    match spec {
        Regions::Null(n) => RegionArg {
            _storage: Vec::new(),
            _aligned: Vec::new(),
            ptr: null(),
            n: *n,
        },
        Regions::Pieces(p) => {
            let aligned: Vec<spillway_region> = p.iter().map(to_region).collect();
            RegionArg {
                ptr: aligned.as_ptr(),
                n: aligned.len(),
                _aligned: aligned,
                _storage: Vec::new(),
            }
        }
        Regions::Misaligned(p) => {
            // The regions, as C lays them out, one byte past an aligned address (at least
            // one, so that the array the library is given is all there).
            let (size, align) = (
                std::mem::size_of::<spillway_region>(),
                std::mem::align_of::<spillway_region>(),
            );
            let n = p.len().max(1);
            let mut storage = vec![0u8; n * size + 2 * align];
            let start = (storage.as_ptr() as usize).next_multiple_of(align) - storage.as_ptr() as usize + 1;
            for (i, r) in p.iter().map(to_region).enumerate() {
                let at = start + i * size;
                storage[at..at + 8].copy_from_slice(&(r.address as usize).to_ne_bytes());
                storage[at + 8..at + 16].copy_from_slice(&r.length.to_ne_bytes());
            }
            RegionArg {
                // SAFETY: inside `storage`, which holds `n` regions from there.
                ptr: unsafe { storage.as_ptr().add(start) }.cast::<spillway_region>(),
                n,
                _storage: storage,
                _aligned: Vec::new(),
            }
        }
    }
}

impl Regions {
    /// Whether the library must refuse the array itself.
    fn refused(&self) -> Option<&'static str> {
        match self {
            Regions::Null(0) => None,
            Regions::Null(_) => Some("regions is NULL"),
            Regions::Misaligned(_) => Some("misaligned"),
            Regions::Pieces(_) => None,
        }
    }
}

/// Where a struct is to be filled.
#[derive(Clone, Copy, Debug)]
enum Out {
    Null,
    Aligned,
    Misaligned,
}

fn out_kind() -> impl Strategy<Value = Out> {
    prop_oneof![1 => Just(Out::Null), 4 => Just(Out::Aligned), 1 => Just(Out::Misaligned)]
}

/// Bytes of the buffer a struct is filled in: the size argument stays within it.
const STRUCT_BUF: usize = 1024;

/// A struct size: the right one, near it, or any within the buffer (any at all with NULL).
fn struct_size(right: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => Just(right),
        2 => right - 8..=right + 8,
        2 => 0..STRUCT_BUF,
        1 => any::<usize>(),
    ]
}

/// Fills a struct of `T` through `call(out, size)` at `out`; checks the outcome against
/// the pointer and size given.
fn struct_call<T>(
    function: &str,
    out: Out,
    size: usize,
    call: impl FnOnce(*mut T, usize) -> c_int,
) -> Result<(), TestCaseError> {
    let mut buf = vec![0u64; STRUCT_BUF / 8 + 1];
    let right = std::mem::size_of::<T>();
    let (p, size) = match out {
        Out::Null => (null_mut(), size),
        // The buffer holds `size` bytes from there: a size past it is not passed.
        Out::Aligned => (buf.as_mut_ptr().cast::<T>(), size.min(STRUCT_BUF)),
        // SAFETY: one byte into the buffer, which still holds `size` bytes from there.
        Out::Misaligned => (
            unsafe { buf.as_mut_ptr().cast::<u8>().add(1) }.cast::<T>(),
            size.min(STRUCT_BUF),
        ),
    };
    let status = call(p, size);
    match out {
        Out::Null => refused(function, status, SPILLWAY_ERROR_INVALID_ARGUMENT, "out is NULL"),
        _ if size != right => refused(function, status, SPILLWAY_ERROR_INVALID_ARGUMENT, "sizeof"),
        Out::Misaligned => refused(function, status, SPILLWAY_ERROR_INVALID_ARGUMENT, "misaligned"),
        Out::Aligned => accepted(function, status),
    }
}

/// A handle: small numbers (as the engine hands out), or any.
fn handle() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..64, any::<u64>(), Just(u64::MAX)]
}

/// A CUDA stream for a host engine: NULL or not (refused without being used: the engine
/// has no GPU).
fn stream_of(bogus: bool) -> *mut c_void {
    if bogus {
        0x10usize as *mut c_void
    } else {
        null_mut()
    }
}

/// One call on an engine that holds no handle.
#[derive(Clone, Debug)]
enum Call {
    Prefetch(u64),
    Release(u64),
    Wait(u64),
    SourceReleased {
        handle: u64,
        out_null: bool,
    },
    Fetch {
        handle: u64,
        dst: Regions,
        stream: bool,
    },
    Offload {
        storage: u64,
        version: u64,
        src: Regions,
        stream: bool,
        handle_null: bool,
    },
    Drain,
    Stats {
        out: Out,
        size: usize,
    },
    Usage {
        out: Out,
        size: usize,
    },
    StatsJson {
        out_null: bool,
    },
    InfoJson {
        out_null: bool,
    },
    SettingsJson {
        out_null: bool,
    },
    WriteTrace {
        path: Option<Vec<u8>>,
    },
}

/// Length of the buffer regions are cut from.
const BUF: usize = 8192;

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        handle().prop_map(Call::Prefetch),
        handle().prop_map(Call::Release),
        handle().prop_map(Call::Wait),
        (handle(), any::<bool>()).prop_map(|(handle, out_null)| Call::SourceReleased { handle, out_null }),
        (handle(), regions(BUF), any::<bool>()).prop_map(|(handle, dst, stream)| Call::Fetch {
            handle,
            dst,
            stream
        }),
        (
            any::<u64>(),
            any::<u64>(),
            regions(BUF),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(storage, version, src, stream, handle_null)| Call::Offload {
                storage,
                version,
                src,
                stream,
                handle_null
            }),
        Just(Call::Drain),
        (out_kind(), struct_size(std::mem::size_of::<spillway_stats>()))
            .prop_map(|(out, size)| Call::Stats { out, size }),
        (
            out_kind(),
            struct_size(std::mem::size_of::<spillway_storage_usage>())
        )
            .prop_map(|(out, size)| Call::Usage { out, size }),
        any::<bool>().prop_map(|out_null| Call::StatsJson { out_null }),
        any::<bool>().prop_map(|out_null| Call::InfoJson { out_null }),
        any::<bool>().prop_map(|out_null| Call::SettingsJson { out_null }),
        c_string_arg(".{0,12}").prop_map(|path| Call::WriteTrace { path }),
    ]
}

/// The engine, shared by the cases of a property (a raw pointer, sent between threads as C
/// would: every call but close may be made from several threads at once).
struct Shared(*mut spillway_engine);
// SAFETY: the engine's calls are thread-safe (`OpenedEngine` is `Sync`).
unsafe impl Sync for Shared {}
// SAFETY: as above.
unsafe impl Send for Shared {}

/// Makes `call` on `engine` (NULL when `engine_null`), which holds no handle and has its
/// timeline off: every call on a handle is refused, and so is every call with a NULL the
/// contract allows but the call cannot do without.
fn call_on_empty_engine(
    engine: *mut spillway_engine,
    engine_null: bool,
    call: &Call,
) -> Result<(), TestCaseError> {
    let e: *mut spillway_engine = if engine_null { null_mut() } else { engine };
    let invalid = SPILLWAY_ERROR_INVALID_ARGUMENT;
    let mut buf = vec![0u8; BUF];
    // What a call on a handle the engine does not have says, unless the engine is NULL.
    let no_handle = |f: &str, status: c_int| {
        if engine_null {
            refused(f, status, invalid, "engine is NULL")
        } else {
            refused(f, status, invalid, "handle")
        }
    };
    // SAFETY (every call below): the engine is NULL or open; pointers are NULL or point to
    // live memory of the size given; a stream is NULL or refused unused (host memory).
    match call {
        Call::Prefetch(h) => no_handle("spillway_engine_prefetch", unsafe {
            spillway_engine_prefetch(e, *h)
        })?,
        Call::Release(h) => no_handle("spillway_engine_release", unsafe {
            spillway_engine_release(e, *h)
        })?,
        Call::Wait(h) => no_handle("spillway_engine_wait_source_released", unsafe {
            spillway_engine_wait_source_released(e, *h, null_mut())
        })?,
        Call::SourceReleased { handle, out_null } => {
            let mut released = false;
            let out: *mut bool = if *out_null { null_mut() } else { &mut released };
            let status = unsafe { spillway_engine_source_released(e, *handle, out) };
            let f = "spillway_engine_source_released";
            match (engine_null, out_null) {
                (true, _) => refused(f, status, invalid, "engine is NULL")?,
                (false, true) => refused(f, status, invalid, "released is NULL")?,
                (false, false) => no_handle(f, status)?,
            }
        }
        Call::Fetch { handle, dst, stream } => {
            let arg = region_arg(dst, &mut buf);
            let status = unsafe { spillway_engine_fetch(e, *handle, arg.ptr, arg.n, stream_of(*stream)) };
            // Refused for the engine, the regions, the stream or the handle: whichever the
            // library looks at first.
            let f = "spillway_engine_fetch";
            match (engine_null, dst.refused()) {
                (true, _) => refused(f, status, invalid, "engine is NULL")?,
                (false, Some(why)) => refused(f, status, invalid, why)?,
                (false, None) => refused(f, status, invalid, "")?,
            }
        }
        Call::Offload {
            storage,
            version,
            src,
            stream,
            handle_null,
        } => {
            let arg = region_arg(src, &mut buf);
            // The engine must stay without handles: with valid regions and no stream, the
            // handle is NULL (refused, nothing offloaded).
            let handle_null = *handle_null || (!*stream && src.refused().is_none());
            let mut h: spillway_handle = 7;
            let hp: *mut spillway_handle = if handle_null { null_mut() } else { &mut h };
            let status = unsafe {
                spillway_engine_offload(e, *storage, *version, arg.ptr, arg.n, stream_of(*stream), hp)
            };
            let f = "spillway_engine_offload";
            match (engine_null, src.refused(), handle_null) {
                (true, _, _) => refused(f, status, invalid, "engine is NULL")?,
                (false, Some(why), _) => refused(f, status, invalid, why)?,
                (false, None, true) => refused(f, status, invalid, "handle is NULL")?,
                (false, None, false) => refused(f, status, invalid, "CUDA stream")?,
            }
            prop_assert_eq!(h, 7, "a refused offload wrote a handle");
        }
        Call::Drain => {
            let status = unsafe { spillway_engine_drain(e) };
            if engine_null {
                refused("spillway_engine_drain", status, invalid, "engine is NULL")?;
            } else {
                accepted("spillway_engine_drain", status)?;
            }
        }
        Call::Stats { out, size } => {
            let f = "spillway_engine_stats";
            if engine_null {
                let mut s = spillway_stats::default();
                let status =
                    unsafe { spillway_engine_stats(e, &mut s, std::mem::size_of::<spillway_stats>()) };
                refused(f, status, invalid, "engine is NULL")?;
            } else {
                struct_call(f, *out, *size, |p, n| unsafe { spillway_engine_stats(e, p, n) })?;
            }
        }
        Call::Usage { out, size } => {
            let f = "spillway_engine_storage_usage";
            if engine_null {
                let mut u = spillway_storage_usage::default();
                let n = std::mem::size_of::<spillway_storage_usage>();
                refused(
                    f,
                    unsafe { spillway_engine_storage_usage(e, &mut u, n) },
                    invalid,
                    "engine is NULL",
                )?;
            } else {
                struct_call(f, *out, *size, |p, n| unsafe {
                    spillway_engine_storage_usage(e, p, n)
                })?;
            }
        }
        Call::StatsJson { out_null } => {
            let f = "spillway_engine_stats_json";
            let json = json_call(f, *out_null, |out| unsafe { spillway_engine_stats_json(e, out) })?;
            if engine_null && !out_null {
                prop_assert!(last_error().contains("engine is NULL"));
            }
            if let Some(json) = json {
                prop_assert!(json["members"].is_array(), "{json}");
            }
        }
        Call::InfoJson { out_null } => {
            let f = "spillway_engine_info_json";
            let json = json_call(f, *out_null, |out| unsafe { spillway_engine_info_json(e, out) })?;
            if let Some(json) = json {
                prop_assert_eq!(&json["device"], "host");
            }
        }
        Call::SettingsJson { out_null } => {
            let f = "spillway_engine_settings_json";
            let json = json_call(f, *out_null, |out| unsafe {
                spillway_engine_settings_json(e, out)
            })?;
            if let Some(json) = json {
                prop_assert_eq!(&json["device"]["value"], "host");
            }
        }
        Call::WriteTrace { path } => {
            // The timeline is off: refused before anything is written, whatever the path.
            let path_c = c_string(path);
            let status = unsafe { spillway_engine_write_trace(e, ptr(&path_c)) };
            let f = "spillway_engine_write_trace";
            let why = match (engine_null, path.as_deref()) {
                (true, _) => "engine is NULL",
                (false, None) => "path is NULL",
                (false, Some([])) => "path is empty",
                (false, Some(_)) => "timeline is off",
            };
            refused(f, status, invalid, why)?;
        }
    }
    Ok(())
}

/// Every call on an engine that holds no handle — with NULL for the engine or an
/// out-parameter, any handle, any regions (NULL, misaligned, any pieces of live memory), a
/// stream on host memory, any struct size — is refused with a message or done, never a
/// panic; the engine still works afterwards.
#[test]
fn calls_on_an_engine_without_handles() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Shared(open_engine(dir.path(), &[]));
    let strategy = prop::collection::vec((any::<bool>(), call()), 1..8);
    run(CASES, strategy, |calls| {
        let engine = &engine;
        for (engine_null, call) in &calls {
            call_on_empty_engine(engine.0, *engine_null, call)?;
        }
        Ok(())
    });
    let mut usage = spillway_storage_usage::default();
    let n = std::mem::size_of::<spillway_storage_usage>();
    // SAFETY: an open engine, a struct of its size.
    assert_eq!(
        unsafe { spillway_engine_storage_usage(engine.0, &mut usage, n) },
        SPILLWAY_OK
    );
    assert_eq!(usage.used, 0, "{usage:?}");
    // SAFETY: open, used by no one else; closed once.
    assert_eq!(
        unsafe { spillway_engine_close(engine.0) },
        SPILLWAY_OK,
        "{}",
        last_error()
    );
}

/// The staging rule through the C ABI, as in the CLI and Python: sizes left at their
/// defaults shrink to fit a small staging memory; a size given that does not fit is
/// refused, naming it.
#[test]
fn staging_sizes_follow_the_one_rule() {
    let settings = new_settings(&[("staging_bytes", "64MiB")]);
    let mut out = null_mut();
    // SAFETY: live settings, a variable for the result.
    let status = unsafe { spillway_settings_json(settings, &mut out) };
    assert_eq!(status, SPILLWAY_OK, "{}", last_error());
    let json: serde_json::Value = serde_json::from_str(&take_string(out)).unwrap();
    assert_eq!(json["prefetch_bytes"]["value"], 32 << 20, "{json}");
    assert_eq!(json["pack_extent_bytes"]["value"], 16 << 20, "{json}");
    // SAFETY: from `spillway_settings_new`, freed once.
    unsafe { spillway_settings_free(settings) };

    let settings = new_settings(&[("staging_bytes", "64MiB"), ("prefetch_bytes", "128MiB")]);
    let mut out = null_mut();
    // SAFETY: as above.
    let status = unsafe { spillway_settings_json(settings, &mut out) };
    assert_eq!(status, SPILLWAY_ERROR_INVALID_ARGUMENT);
    assert!(last_error().contains("prefetch_bytes"), "{}", last_error());
    // SAFETY: as above.
    unsafe { spillway_settings_free(settings) };
}

// ---------------------------------------------------------------------------------------
// Opening engines.
// ---------------------------------------------------------------------------------------

/// A storage path given to `spillway_engine_open`, inside the case's directory.
#[derive(Clone, Debug)]
enum PathArg {
    Null,
    Empty,
    /// The directory itself (an anonymous file there).
    Dir,
    /// A name in the directory: any bytes but NUL and '/' (a new file there).
    Name(Vec<u8>),
    /// A file under a directory that does not exist.
    Missing,
    /// A file under a file.
    UnderFile,
    /// A file of the directory readable by others (refused).
    Public,
}

fn path_arg() -> impl Strategy<Value = PathArg> {
    prop_oneof![
        1 => Just(PathArg::Null),
        1 => Just(PathArg::Empty),
        4 => Just(PathArg::Dir),
        3 => prop_oneof![
            prop::collection::vec(prop::num::u8::ANY.prop_filter("no NUL or '/'", |b| *b != 0 && *b != b'/'), 1..12),
            "[a-z]{1,8}(\\.bin)?".prop_map(String::into_bytes),
        ]
        .prop_filter("not . or ..", |n| n != b"." && n != b"..")
        .prop_map(PathArg::Name),
        1 => Just(PathArg::Missing),
        1 => Just(PathArg::UnderFile),
        1 => Just(PathArg::Public),
    ]
}

impl PathArg {
    /// The path's bytes in `dir` (NULL for `Null`), making what it needs there.
    fn make(&self, dir: &Path) -> Option<CString> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::PermissionsExt;
        let bytes = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
        match self {
            PathArg::Null => None,
            PathArg::Empty => Some(CString::default()),
            PathArg::Dir => Some(bytes(dir)),
            PathArg::Name(name) => Some(bytes(&dir.join(std::ffi::OsStr::from_bytes(name)))),
            PathArg::Missing => Some(bytes(&dir.join("missing/spill.bin"))),
            PathArg::UnderFile => {
                let file = dir.join("plain");
                std::fs::write(&file, b"x").unwrap();
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
                Some(bytes(&file.join("spill.bin")))
            }
            PathArg::Public => {
                let file = dir.join("public.bin");
                std::fs::write(&file, b"").unwrap();
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
                Some(bytes(&file))
            }
        }
    }
}

/// A setting and a value an engine may be opened with: bounded so that no case reserves
/// much storage or memory, starts many threads or waits long (huge thread counts, sizes and
/// delays are refused only after they are tried), with the edges that must be refused.
fn open_setting() -> impl Strategy<Value = (&'static str, String)> {
    let size = |values: &'static [&'static str]| prop::sample::select(values).prop_map(str::to_string);
    let sizes: &'static [&'static str] = &[
        "0",
        "1",
        "4096",
        "65536",
        "1MiB",
        "2MiB",
        "4MiB",
        "8MiB",
        "16MiB",
        "64MiB",
        "4611686018427387904",
        "18446744073709551615",
        "1000",
    ];
    prop_oneof![
        size(&["host", "cpu", "auto", "cuda:7", "7", "cuda", "gpu"]).prop_map(|v| ("device", v)),
        size(&["uring", "auto", "cufile", "spdk"]).prop_map(|v| ("backend", v)),
        size(&["1", "2", "16", "64", "0", "4294967295", "100000"]).prop_map(|v| ("queue_depth", v)),
        size(&["1", "2", "3", "0"]).prop_map(|v| ("threads", v)),
        size(&["auto", "1MiB", "2MiB", "0", "1000", "1099511627776"]).prop_map(|v| ("pinned_bytes", v)),
        size(&[
            "512",
            "4096",
            "65536",
            "1MiB",
            "1000",
            "0",
            "256",
            "4611686018427387904"
        ])
        .prop_map(|v| ("alignment", v)),
        size(sizes).prop_map(|v| ("staging_bytes", v)),
        size(sizes).prop_map(|v| ("prefetch_bytes", v)),
        size(sizes).prop_map(|v| ("pack_threshold", v)),
        size(sizes).prop_map(|v| ("pack_extent_bytes", v)),
        size(sizes).prop_map(|v| ("direct_write_bytes", v)),
        size(&["0", "0.5", "2", "5"]).prop_map(|v| ("pack_flush_delay_ms", v)),
        size(&["0", "3", "100", "101", "4294967296"]).prop_map(|v| ("io_retries", v)),
        // Stripes of any size, weights of any size: the reservation of each member is one
        // weight of stripes at least, so the product stays small, or past 2^64 (a set
        // refused when it is made).
        size(&[
            "4096",
            "1MiB",
            "4097",
            "0",
            "9223372036854775808",
            "18446744073709547520"
        ])
        .prop_map(|v| ("stripe_bytes", v)),
        size(&[
            "",
            "1",
            "1,1",
            "1,2",
            "2,1,1",
            "0,1",
            "4294967295,4294967295",
            "x"
        ])
        .prop_map(|v| ("stripe_weights", v)),
        size(&["true", "false"]).prop_map(|v| ("pack", v)),
        size(&["true", "false"]).prop_map(|v| ("dedup", v)),
        size(&["true", "false"]).prop_map(|v| ("timeline", v)),
        size(&["1", "1000", "18446744073709551615"]).prop_map(|v| ("timeline_capacity", v)),
        size(&[
            "",
            "none",
            "write_error=0.5,seed=3",
            "short=0.5",
            "latency=100us",
            "ops=read,write_error=0.1"
        ])
        .prop_map(|v| ("faults", v)),
    ]
}

/// Which capacity to ask for: none (a share of the free space, used as needed), a few
/// bytes to 64 MiB, or more than a file can hold (refused before anything is reserved).
fn capacity() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        1u64..(64 << 20),
        prop::sample::select(vec![1u64, 4095, 4096, 1 << 20, 64 << 20, 1 << 63, u64::MAX]),
    ]
}

#[derive(Clone, Debug)]
struct OpenCase {
    /// None: `paths` is NULL, with this count.
    paths: Result<Vec<PathArg>, usize>,
    capacity: u64,
    /// None: `settings` is NULL.
    settings: Option<Vec<(&'static str, String)>>,
    out_null: bool,
}

fn open_case() -> impl Strategy<Value = OpenCase> {
    (
        prop_oneof![
            6 => prop::collection::vec(path_arg(), 1..4).prop_map(Ok),
            1 => prop_oneof![Just(0usize), 1usize..3, Just(usize::MAX)].prop_map(Err),
        ],
        capacity(),
        prop::option::weighted(0.9, prop::collection::vec(open_setting(), 0..5)),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(paths, capacity, settings, out_null)| OpenCase {
            paths,
            capacity,
            settings,
            out_null,
        })
}

/// `spillway_engine_open` takes any paths (NULL, empty, missing, unusable, any bytes),
/// capacity, settings and NULLs: an engine that works, or a refusal with a message, never
/// a panic; it refuses what `resolve` refuses. An engine opened answers every query and
/// closes.
#[test]
fn open_takes_any_arguments() {
    run(ENGINE_CASES, open_case(), |case| {
        let dir = tempfile::tempdir().unwrap();
        let path_args = match &case.paths {
            Ok(args) => args.iter().map(|a| a.make(dir.path())).collect(),
            Err(_) => Vec::new(),
        };
        let path_ptrs: Vec<*const c_char> = path_args.iter().map(ptr).collect();
        let (paths, n_paths) = match &case.paths {
            Ok(_) => (path_ptrs.as_ptr(), path_ptrs.len()),
            Err(n) => (null(), *n),
        };
        // Settings NULL are the process's (defaults: 512 MiB of staging) and are read only
        // after the paths and `out`: given only where those are refused.
        let settings_null = case.settings.is_none()
            && (case.out_null || paths.is_null() && n_paths > 0 || path_ptrs.iter().any(|p| p.is_null()));
        let pairs = case.settings.clone().unwrap_or_default();
        let mut shadow = Settings::load().unwrap();
        for (name, value) in BASE.iter().map(|(n, v)| (*n, v.to_string())).chain(pairs.clone()) {
            if shadow.set(name, value.as_str()).is_err() {
                return Ok(()); // only values the setting takes: the rest is `settings_take_any_strings`
            }
        }
        // A NULL array of paths (of any count) is refused before anything is reserved.
        if case.paths.is_ok() && !reserves_little(&shadow, n_paths, case.capacity) {
            return Ok(());
        }
        let settings = if settings_null {
            null_mut()
        } else {
            let pairs: Vec<(&str, &str)> = BASE
                .iter()
                .copied()
                .chain(pairs.iter().map(|(n, v)| (*n, v.as_str())))
                .collect();
            new_settings(&pairs)
        };
        let mut engine = std::ptr::dangling_mut::<spillway_engine>(); // Not NULL, so that a failure must clear it.
        let out: *mut *mut spillway_engine = if case.out_null { null_mut() } else { &mut engine };
        // SAFETY: `paths` is NULL or an array of `n_paths` strings or NULLs; the settings
        // are NULL or live; `out` is NULL or a variable.
        let status = unsafe { spillway_engine_open(paths, n_paths, case.capacity, settings, out) };
        // SAFETY: NULL or from `spillway_settings_new`, freed once.
        unsafe { spillway_settings_free(settings) };
        let f = "spillway_engine_open";
        if !outcome(f, status)? {
            if !case.out_null {
                prop_assert!(engine.is_null(), "a failed open left *out set");
            }
            if shadow.resolve().is_err() || case.out_null || paths.is_null() {
                prop_assert_eq!(status, SPILLWAY_ERROR_INVALID_ARGUMENT, "{}", last_error());
            }
            return Ok(());
        }
        prop_assert!(shadow.resolve().is_ok(), "opened with settings resolve refuses");
        prop_assert!(!engine.is_null());
        let result = queries_on_an_open_engine(engine, dir.path(), case.capacity);
        // SAFETY: open, used by no one else; closed once.
        accepted("spillway_engine_close", unsafe { spillway_engine_close(engine) })?;
        result
    });
}

/// What an engine just opened answers.
fn queries_on_an_open_engine(
    engine: *mut spillway_engine,
    dir: &Path,
    capacity: u64,
) -> Result<(), TestCaseError> {
    // SAFETY (every call): an open engine; out-parameters are variables of their size.
    let info = json_call("spillway_engine_info_json", false, |out| unsafe {
        spillway_engine_info_json(engine, out)
    })?
    .expect("info of an open engine");
    let held = info["capacity"].as_u64().expect("a capacity");
    prop_assert!(held > 0 && (capacity == 0 || held <= capacity), "{info}");
    let settings = json_call("spillway_engine_settings_json", false, |out| unsafe {
        spillway_engine_settings_json(engine, out)
    })?
    .expect("settings of an open engine");
    let timeline = settings["timeline"]["value"] == true;
    let mut stats = spillway_stats::default();
    let n = std::mem::size_of::<spillway_stats>();
    accepted("spillway_engine_stats", unsafe {
        spillway_engine_stats(engine, &mut stats, n)
    })?;
    prop_assert_eq!(stats.live_handles, 0);
    let mut usage = spillway_storage_usage::default();
    let n = std::mem::size_of::<spillway_storage_usage>();
    accepted("spillway_engine_storage_usage", unsafe {
        spillway_engine_storage_usage(engine, &mut usage, n)
    })?;
    prop_assert_eq!(usage.capacity, held);
    accepted("spillway_engine_drain", unsafe { spillway_engine_drain(engine) })?;
    let trace = CString::new(dir.join("trace.json").into_os_string().into_encoded_bytes()).unwrap();
    let status = unsafe { spillway_engine_write_trace(engine, trace.as_ptr()) };
    if timeline {
        accepted("spillway_engine_write_trace", status)?;
    } else {
        refused(
            "spillway_engine_write_trace",
            status,
            SPILLWAY_ERROR_INVALID_ARGUMENT,
            "timeline is off",
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Offloading and fetching.
// ---------------------------------------------------------------------------------------

/// Sizes of the tensors a case offloads, by storage id.
const TENSOR_SIZES: [usize; 5] = [0, 1, 4096, 300_000, 2 << 20];

/// A step of a case: offload, fetch, prefetch, release, wait, ask, drain.
#[derive(Clone, Debug)]
enum Step {
    /// Offloads storage `storage % 5` (of `TENSOR_SIZES`) at `version`, cut into pieces at
    /// these fractions of its length (a piece may repeat: overlapping reads are fine), from
    /// the buffer `buffer % 2` of the pair each storage has.
    Offload {
        storage: usize,
        version: u64,
        cuts: Vec<(u16, u16)>,
        buffer: usize,
        stream: bool,
    },
    /// Fetches handle `pick` (an index into the handles handed out so far, or any number),
    /// into a buffer `delta` bytes off its size, cut into pieces at these fractions.
    Fetch {
        pick: Pick,
        delta: i64,
        cuts: Vec<u16>,
    },
    Prefetch(Pick),
    Release(Pick),
    Wait(Pick),
    Released(Pick),
    Drain,
    Stats,
}

#[derive(Clone, Copy, Debug)]
enum Pick {
    Handed(usize),
    Any(u64),
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![6 => any::<usize>().prop_map(Pick::Handed), 1 => handle().prop_map(Pick::Any)]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (0usize..5, 0u64..3, prop::collection::vec((any::<u16>(), any::<u16>()), 0..4), 0usize..2,
            prop::bool::weighted(0.05))
            .prop_map(|(storage, version, cuts, buffer, stream)| Step::Offload { storage, version, cuts, buffer, stream }),
        4 => (pick(), prop_oneof![6 => Just(0i64), 1 => -2i64..=2], prop::collection::vec(any::<u16>(), 0..4))
            .prop_map(|(pick, delta, cuts)| Step::Fetch { pick, delta, cuts }),
        1 => pick().prop_map(Step::Prefetch),
        3 => pick().prop_map(Step::Release),
        1 => pick().prop_map(Step::Wait),
        1 => pick().prop_map(Step::Released),
        1 => Just(Step::Drain),
        1 => Just(Step::Stats),
    ]
}

/// `at` (a fraction in 1/65536ths) of `len`.
fn fraction(at: u16, len: usize) -> usize {
    (len as u128 * u128::from(at) / 65536) as usize
}

/// A handle handed out: its key, the stored copy it names (handles of one key share one
/// with dedup), whether it was fetched, and what fetching it must give (`None` once
/// released).
struct Held {
    handle: spillway_handle,
    key: (usize, u64),
    entry: usize,
    fetched: bool,
    expect: Option<Vec<u8>>,
}

/// A piece of a source: (buffer, offset, length).
type Piece = (usize, usize, usize);

/// What the engine holds, as the caller knows it.
struct Model {
    dedup: bool,
    /// Faults are injected: a fetch may fail with an I/O error, a source may never be
    /// released before its handle is.
    faults: bool,
    held: Vec<Held>,
    /// With dedup, per key with live handles: the pieces (empty ones left out) it was
    /// offloaded from, its live handles and its stored copy.
    keys: HashMap<(usize, u64), (Vec<Piece>, usize, usize)>,
    /// Stored copies numbered so far.
    entries: usize,
    /// Stored copies whose every live handle was fetched at some point: the engine may
    /// have dropped their write and keep their source until their last handle is released
    /// (the known hang of `waiting_for_a_fetched_source_returns`).
    kept_until_release: std::collections::HashSet<usize>,
}

impl Model {
    /// The handle `pick` names, and its place in `held` if it was handed out.
    fn resolve(&self, pick: Pick) -> (spillway_handle, Option<usize>) {
        match pick {
            Pick::Handed(i) if !self.held.is_empty() => {
                let i = i % self.held.len();
                (self.held[i].handle, Some(i))
            }
            Pick::Handed(i) => (i as u64, None),
            Pick::Any(h) => (h, self.held.iter().rposition(|x| x.handle == h)),
        }
    }

    /// Whether `at` names a handle not yet released.
    fn live(&self, at: Option<usize>) -> bool {
        at.is_some_and(|i| self.held[i].expect.is_some())
    }

    fn live_count(&self) -> usize {
        self.held.iter().filter(|h| h.expect.is_some()).count()
    }

    /// Records a fetch of `held[i]`.
    fn fetched(&mut self, i: usize) {
        self.held[i].fetched = true;
        let entry = self.held[i].entry;
        let live = || {
            self.held
                .iter()
                .filter(|h| h.entry == entry && h.expect.is_some())
        };
        if live().all(|h| h.fetched) {
            self.kept_until_release.insert(entry);
        }
    }

    fn release(&mut self, i: usize) {
        self.held[i].expect = None;
        let key = self.held[i].key;
        if let Some((_, n, _)) = self.keys.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.keys.remove(&key);
            }
        }
    }
}

/// Offloads, fetches, prefetches, waits and releases in any order and with any regions,
/// handles and sizes, on engines with packing, dedup and the timeline on or off and with
/// storage faults injected: every call is done or refused with a message, never a panic;
/// every fetch that succeeds gives the bytes offloaded; at the end every handle is released
/// and the engine holds nothing.
#[test]
fn offload_fetch_release_in_any_order() {
    let case = (
        prop::collection::vec(step(), 1..16),
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec![
            "",
            "",
            "write_error=0.3,seed=1",
            "short=0.5,seed=2",
            "read_error=0.3,seed=3",
        ]),
    );
    // Two buffers per storage id, filled differently, never written: they outlive every
    // case's engine.
    let sources: Vec<[Vec<u8>; 2]> = TENSOR_SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            [0u8, 1].map(|b| {
                (0..n)
                    .map(|j| (j as u8).wrapping_mul(31) ^ (i as u8 * 2 + b))
                    .collect()
            })
        })
        .collect();
    run(ENGINE_CASES, case, |(steps, pack, dedup, faults)| {
        let dir = tempfile::tempdir().unwrap();
        let (pack, dedup) = (pack.to_string(), dedup.to_string());
        let engine = open_engine(
            dir.path(),
            &[
                ("pack", &pack),
                ("dedup", &dedup),
                ("faults", faults),
                ("pack_flush_delay_ms", "1"),
            ],
        );
        let mut model = Model {
            dedup: dedup == "true",
            faults: !faults.is_empty(),
            held: Vec::new(),
            keys: HashMap::new(),
            entries: 0,
            kept_until_release: Default::default(),
        };
        let result = steps_on(engine, &steps, &sources, &mut model);
        // Release what is left, then the engine holds nothing.
        let end = (|| {
            for h in model.held.iter().filter(|h| h.expect.is_some()) {
                // SAFETY: an open engine.
                let status = unsafe { spillway_engine_release(engine, h.handle) };
                accepted("spillway_engine_release", status)?;
            }
            // SAFETY: an open engine; structs of their size.
            accepted("spillway_engine_drain", unsafe { spillway_engine_drain(engine) })?;
            let mut stats = spillway_stats::default();
            let n = std::mem::size_of::<spillway_stats>();
            accepted("spillway_engine_stats", unsafe {
                spillway_engine_stats(engine, &mut stats, n)
            })?;
            prop_assert_eq!(stats.live_handles, 0);
            let mut usage = spillway_storage_usage::default();
            let n = std::mem::size_of::<spillway_storage_usage>();
            accepted("spillway_engine_storage_usage", unsafe {
                spillway_engine_storage_usage(engine, &mut usage, n)
            })?;
            prop_assert_eq!(
                usage.used,
                0,
                "storage still used after every handle was released: {:?}",
                usage
            );
            Ok(())
        })();
        // SAFETY: open, used by no one else; closed once.
        let closed = unsafe { spillway_engine_close(engine) };
        result?;
        end?;
        accepted("spillway_engine_close", closed)
    });
}

fn steps_on(
    engine: *mut spillway_engine,
    steps: &[Step],
    sources: &[[Vec<u8>; 2]],
    model: &mut Model,
) -> Result<(), TestCaseError> {
    let invalid = SPILLWAY_ERROR_INVALID_ARGUMENT;
    for step in steps {
        match step {
            Step::Offload {
                storage,
                version,
                cuts,
                buffer,
                stream,
            } => {
                let len = TENSOR_SIZES[*storage];
                let buf = &sources[*storage][*buffer];
                let pieces: Vec<Piece> = if cuts.is_empty() {
                    vec![(*buffer, 0, len)]
                } else {
                    cuts.iter()
                        .map(|&(a, b)| {
                            let (a, b) = (fraction(a, len), fraction(b, len));
                            (*buffer, a.min(b), a.max(b) - a.min(b))
                        })
                        .collect()
                };
                // Read only: the engine never writes a source.
                let base = buf.as_ptr().cast_mut();
                let regions: Vec<spillway_region> = pieces
                    .iter()
                    .map(|&(_, at, n)| spillway_region {
                        // SAFETY: `at` is at most the buffer's length.
                        address: unsafe { base.add(at) }.cast(),
                        length: n,
                    })
                    .collect();
                let expect: Vec<u8> = pieces
                    .iter()
                    .flat_map(|&(_, at, n)| buf[at..at + n].to_vec())
                    .collect();
                let mut h = 0;
                // SAFETY: an open engine; the regions are pieces of a buffer that outlives
                // the engine and is never written; a stream on host memory is refused
                // unused.
                let status = unsafe {
                    spillway_engine_offload(
                        engine,
                        *storage as u64,
                        *version,
                        regions.as_ptr(),
                        regions.len(),
                        stream_of(*stream),
                        &mut h,
                    )
                };
                let f = "spillway_engine_offload";
                let key = (*storage, *version);
                let nonempty: Vec<Piece> = pieces.iter().copied().filter(|p| p.2 > 0).collect();
                if *stream {
                    refused(f, status, invalid, "CUDA stream")?;
                    continue;
                }
                model.entries += 1;
                let mut entry = model.entries;
                if model.dedup {
                    if let Some((before, n, e)) = model.keys.get_mut(&key) {
                        if *before != nonempty {
                            refused(f, status, invalid, "other memory")?;
                            continue;
                        }
                        *n += 1;
                        entry = *e;
                    } else {
                        model.keys.insert(key, (nonempty, 1, entry));
                    }
                }
                accepted(f, status)?;
                prop_assert!(
                    model.held.iter().all(|x| x.handle != h),
                    "handle {h} handed out twice"
                );
                model.held.push(Held {
                    handle: h,
                    key,
                    entry,
                    fetched: false,
                    expect: Some(expect),
                });
            }
            Step::Fetch { pick, delta, cuts } => {
                let (h, at) = model.resolve(*pick);
                let want = at.and_then(|i| model.held[i].expect.clone());
                let size = want.as_ref().map_or(0, Vec::len);
                let len = (size as i64 + delta).max(0) as usize;
                let mut dst = vec![0xA5u8; len];
                let mut bounds: Vec<usize> = cuts.iter().map(|&c| fraction(c, len)).collect();
                bounds.extend([0, len]);
                bounds.sort_unstable();
                let base = dst.as_mut_ptr();
                let regions: Vec<spillway_region> = bounds
                    .windows(2)
                    .map(|w| spillway_region {
                        // SAFETY: `w[0]` is at most the buffer's length.
                        address: unsafe { base.add(w[0]) }.cast(),
                        length: w[1] - w[0],
                    })
                    .collect();
                // SAFETY: an open engine; the regions are disjoint pieces of a live buffer
                // used by nothing else; no stream.
                let status =
                    unsafe { spillway_engine_fetch(engine, h, regions.as_ptr(), regions.len(), null_mut()) };
                let f = "spillway_engine_fetch";
                match want {
                    Some(want) if len == want.len() => {
                        if outcome(f, status)? {
                            prop_assert!(dst == want, "fetched bytes differ ({} bytes)", want.len());
                            model.fetched(at.expect("a live handle"));
                        } else {
                            prop_assert!(model.faults, "fetch failed without faults: {}", last_error());
                            prop_assert_eq!(status, SPILLWAY_ERROR_IO, "{}", last_error());
                        }
                    }
                    Some(_) => refused(f, status, invalid, "fetch destination holds")?,
                    None => refused(f, status, invalid, "handle")?,
                }
            }
            Step::Prefetch(p) => {
                let (h, at) = model.resolve(*p);
                // SAFETY: an open engine.
                let status = unsafe { spillway_engine_prefetch(engine, h) };
                expect_live("spillway_engine_prefetch", status, model.live(at))?;
            }
            Step::Release(p) => {
                let (h, at) = model.resolve(*p);
                // SAFETY: an open engine.
                let status = unsafe { spillway_engine_release(engine, h) };
                let live = model.live(at);
                expect_live("spillway_engine_release", status, live)?;
                if let Some(i) = at.filter(|_| live) {
                    model.release(i);
                }
            }
            Step::Wait(p) => {
                let (h, at) = model.resolve(*p);
                let live = model.live(at);
                // A tensor whose write failed (with faults) or was dropped after its fetch may
                // stay in its own memory until released: the wait then says so at once.
                let may_keep = model.faults
                    || at.is_some_and(|i| model.kept_until_release.contains(&model.held[i].entry));
                if live && !may_keep {
                    // A source never released would hang the wait: a failure instead.
                    released_soon(engine, h)?;
                }
                let mut released = false;
                // SAFETY: an open engine, a variable for the result.
                let status = unsafe { spillway_engine_wait_source_released(engine, h, &mut released) };
                expect_live("spillway_engine_wait_source_released", status, live)?;
                prop_assert!(
                    !live || may_keep || released,
                    "handle {} not released after the wait",
                    h
                );
            }
            Step::Released(p) => {
                let (h, at) = model.resolve(*p);
                let mut released = false;
                // SAFETY: an open engine, a variable for the result.
                let status = unsafe { spillway_engine_source_released(engine, h, &mut released) };
                expect_live("spillway_engine_source_released", status, model.live(at))?;
            }
            Step::Drain => {
                // SAFETY: an open engine.
                accepted("spillway_engine_drain", unsafe { spillway_engine_drain(engine) })?;
            }
            Step::Stats => {
                let mut stats = spillway_stats::default();
                let n = std::mem::size_of::<spillway_stats>();
                // SAFETY: an open engine, a struct of its size.
                accepted("spillway_engine_stats", unsafe {
                    spillway_engine_stats(engine, &mut stats, n)
                })?;
                prop_assert_eq!(stats.live_handles, model.live_count() as u64);
                // SAFETY: an open engine; `out` is a variable.
                json_call("spillway_engine_stats_json", false, |out| unsafe {
                    spillway_engine_stats_json(engine, out)
                })?;
            }
        }
    }
    Ok(())
}

/// Checks that the engine stops reading the source of the live handle `h` within a few
/// seconds (it has nothing else to do).
fn released_soon(engine: *mut spillway_engine, h: spillway_handle) -> Result<(), TestCaseError> {
    let start = std::time::Instant::now();
    loop {
        let mut released = false;
        // SAFETY: an open engine, a variable for the result.
        let status = unsafe { spillway_engine_source_released(engine, h, &mut released) };
        accepted("spillway_engine_source_released", status)?;
        if released {
            return Ok(());
        }
        if start.elapsed() > std::time::Duration::from_secs(3) {
            // SAFETY: an open engine; `out` is a variable.
            let stats = json_call("spillway_engine_stats_json", false, |out| unsafe {
                spillway_engine_stats_json(engine, out)
            })?;
            return Err(TestCaseError::fail(format!(
                "the source of handle {h} is still held after 3 s: spillway_engine_wait_source_released \
                 would never return; stats {}",
                stats.unwrap_or_default()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Checks a call on a handle: done when `live`, else refused naming the handle.
fn expect_live(function: &str, status: c_int, live: bool) -> Result<(), TestCaseError> {
    if live {
        accepted(function, status)
    } else {
        refused(function, status, SPILLWAY_ERROR_INVALID_ARGUMENT, "handle")
    }
}

// ---------------------------------------------------------------------------------------
// Known bugs.
// ---------------------------------------------------------------------------------------

/// Once every handle of a tensor has fetched it before its write started, the engine drops
/// the write ("cancelled_tensors") and keeps reading the tensor's own memory until the last
/// handle is released. `spillway_engine_wait_source_released` used to wait for that memory
/// forever (found by `offload_fetch_release_in_any_order`: offload 4 KiB packed, fetch,
/// wait); it now returns at once with `released` false, as it does for a tensor kept in
/// memory because the storage was full.
#[test]
fn waiting_for_a_fetched_source_returns() {
    let dir = tempfile::tempdir().unwrap();
    // A long flush delay: the packed extent is still open when the fetch comes.
    let engine = Shared(open_engine(
        dir.path(),
        &[("dedup", "false"), ("pack_flush_delay_ms", "1000")],
    ));
    let src = vec![7u8; 4096];
    let mut back = vec![0u8; 4096];
    let r = [spillway_region {
        address: src.as_ptr().cast_mut().cast(),
        length: src.len(),
    }];
    let d = [spillway_region {
        address: back.as_mut_ptr().cast(),
        length: back.len(),
    }];
    let mut h = 0;
    // SAFETY: an open engine; `src` outlives the engine's use of it (until the release
    // below); `back` is live and idle; no stream.
    unsafe {
        assert_eq!(
            spillway_engine_offload(engine.0, 1, 0, r.as_ptr(), 1, null_mut(), &mut h),
            SPILLWAY_OK
        );
        assert_eq!(
            spillway_engine_fetch(engine.0, h, d.as_ptr(), 1, null_mut()),
            SPILLWAY_OK
        );
    }
    assert_eq!(back, src);
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = &engine;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            // SAFETY: an open engine (the calls but close may come from any thread).
            let mut released = true;
            let status = unsafe { spillway_engine_wait_source_released(waiter.0, h, &mut released) };
            let _ = tx.send((status, released));
        });
        let done = rx.recv_timeout(std::time::Duration::from_secs(5));
        // SAFETY: an open engine. Releasing lets the waiter go, so that the scope ends.
        unsafe { spillway_engine_release(engine.0, h) };
        assert_eq!(
            done,
            Ok((SPILLWAY_OK, false)),
            "spillway_engine_wait_source_released did not say within 5 s that the memory stays in use"
        );
    });
    // SAFETY: open, used by no one else; closed once.
    unsafe { spillway_engine_close(engine.0) };
}

/// An `alignment` of 2^63 is accepted by `spillway_settings_set` (a power of two), then
/// `EngineConfig::validate` computed `2 * self.alignment`, which overflowed: in a debug
/// build the panic was caught and `spillway_settings_json` / `spillway_engine_open`
/// returned SPILLWAY_ERROR_INTERNAL ("attempt to multiply with overflow"); in a release
/// build the product wrapped to 0 and the alignment passed the check. It is refused: an
/// alignment is at most 1 GiB.
#[test]
fn an_alignment_of_two_to_the_63_is_refused() {
    let settings = new_settings(&[("alignment", "9223372036854775808")]);
    let mut out = null_mut();
    // SAFETY: live settings, a variable for the result.
    let status = unsafe { spillway_settings_json(settings, &mut out) };
    let message = last_error();
    // SAFETY: from `spillway_settings_new`, freed once.
    unsafe { spillway_settings_free(settings) };
    assert_eq!(status, SPILLWAY_ERROR_INVALID_ARGUMENT, "{message}");
    assert!(message.contains("alignment 9223372036854775808"), "{message}");
}

/// Striping over several paths with `stripe_bytes` times the sum of `stripe_weights` (or
/// the number of paths) past 2^64 — e.g. two paths and stripe_bytes = 2^63, a positive
/// multiple of 4096, so accepted — overflowed `self.round * self.stripe` in
/// `StripedBackend::open` (crates/runtime/src/striped/mod.rs, the reservation of each member):
/// a debug build panicked ("attempt to multiply with overflow"; caught here as
/// SPILLWAY_ERROR_INTERNAL); in a release build the product wrapped (here to 0, and
/// `div_ceil(0)` panicked: "attempt to divide by zero"). Every engine opened on several
/// paths with a capacity goes there: `spillway::open::open_engine`, so the C ABI and
/// Python's `Engine` too. Such a set is refused when it is made, naming stripe_bytes.
#[test]
fn a_stripe_too_large_for_its_set_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    let pairs: Vec<(&str, &str)> = BASE
        .iter()
        .copied()
        .chain([("stripe_bytes", "9223372036854775808")])
        .collect();
    let settings = new_settings(&pairs);
    let a = CString::new(a.into_os_string().into_encoded_bytes()).unwrap();
    let b = CString::new(b.into_os_string().into_encoded_bytes()).unwrap();
    let paths = [a.as_ptr(), b.as_ptr()];
    let mut engine = null_mut();
    // SAFETY: two live paths, live settings, a variable for the result.
    let status = unsafe { spillway_engine_open(paths.as_ptr(), 2, 1 << 20, settings, &mut engine) };
    let message = last_error();
    // SAFETY: from `spillway_settings_new`, freed once; NULL or open, closed once.
    unsafe {
        spillway_settings_free(settings);
        spillway_engine_close(engine);
    }
    assert_eq!(status, SPILLWAY_ERROR_INVALID_ARGUMENT, "{message}");
    assert!(message.contains("stripe_bytes 9223372036854775808"), "{message}");
}
