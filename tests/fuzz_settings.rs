//! Property-based fuzzing of every parser that takes a user's settings: the layers of
//! [`Settings`] (environment pairs, the TOML file, API arguments, then `resolve`), and the
//! parsers they share ([`FaultPlan::parse`], [`RankPaths::parse`], [`parse_size`]).
//!
//! Arbitrary input must give a value or an error naming what is wrong, never a panic; what is
//! accepted must read back as given (a setting's reported value sets it again to the same
//! value, a fault plan and a rank list print as text that parses back to them).
//!
//! Bugs they found are kept as tests at the end: an `alignment` of 2^63 overflowed
//! `EngineConfig::validate`, and a size setting past `i64::MAX` was reported as `i64::MAX`.

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use spillway::rank::RankPaths;
use spillway::settings::{Settings, Source, Value, CONFIG_VAR, OTHER_VARIABLES, SETTINGS};
use spillway_runtime::FaultPlan;
use spillway_runtime::{parse_bytes, parse_size};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const CASES: u32 = 2048;

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

// ---------------------------------------------------------------------------------------
// Strategies: text that looks like what each layer takes, near misses, and anything at all.
// ---------------------------------------------------------------------------------------

/// Any text: control characters, NULs, any scalar value.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter),
        ".{0,24}",
        "[ \t\r\n,;=:.0-9a-zA-Z_-]{0,24}",
    ]
}

/// The name of a setting.
fn setting_name() -> impl Strategy<Value = String> {
    prop::sample::select(SETTINGS.iter().map(|s| s.name).collect::<Vec<_>>()).prop_map(str::to_string)
}

/// A setting's name, a near miss of one (case, a letter off, a part added or missing), or
/// anything.
fn name_like() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => setting_name(),
        2 => (setting_name(), 0usize..6, any::<char>(), any::<prop::sample::Index>()).prop_map(
            |(name, how, c, at)| {
                let mut chars: Vec<char> = name.chars().collect();
                let i = at.index(chars.len() + 1);
                match how {
                    0 => name.to_ascii_uppercase(),
                    1 => format!("{name}_bytes"),
                    2 => name.split('_').next().unwrap_or("").to_string(),
                    3 => {
                        chars.insert(i, c);
                        chars.into_iter().collect()
                    }
                    4 => {
                        if i < chars.len() {
                            chars.remove(i);
                        }
                        chars.into_iter().collect()
                    }
                    _ => format!(" {name}"),
                }
            }
        ),
        1 => any_text(),
    ]
}

/// Digits: small, large, past `u64::MAX`, with leading zeros, or none.
fn digits() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => (0u64..10_000).prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        2 => (0u32..64).prop_map(|s| (1u64 << s).to_string()),
        1 => "[0-9]{0,30}",
        // The edges of the integer types the settings are stored in.
        2 => prop::sample::select(vec![
            "0", "1", "511", "512", "4095", "4096", "65535", "65536", "4294967295", "4294967296",
            "9223372036854775807", "9223372036854775808", "18446744073709551615", "18446744073709551616",
            "00000000000000000000000001",
        ])
        .prop_map(str::to_string),
    ]
}

/// Size units, spelt right or nearly.
fn unit() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "", "b", "B", "k", "K", "KiB", "kib", "KB", "M", "MiB", "MB", "G", "GiB", "gB", "T", "TiB", "TB",
        "P", "PiB", "Ki", "iB", "bytes", "e3", " K", "K ", "µ", "\u{0}", ".5K", "-1",
    ])
}

/// A size as text: digits, spaces and a unit.
fn size_text() -> impl Strategy<Value = String> {
    (digits(), unit(), prop::sample::select(vec!["", " ", "\t", "\n "]))
        .prop_map(|(d, u, pad)| format!("{pad}{d}{u}{pad}"))
}

/// A float as text, ordinary or odd.
fn float_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (0.0f64..2.0).prop_map(|x| x.to_string()),
        prop::num::f64::ANY.prop_map(|x| x.to_string()),
        prop::num::f64::ANY.prop_map(|x| format!("{x:e}")),
        prop::sample::select(vec![
            "NaN", "inf", "-inf", "infinity", "-0", "+0.5", "1e-400", "1e400", ".5", "5.", "0x1p3", "1_0",
            "", " 1", "0.1.2",
        ])
        .prop_map(str::to_string),
    ]
}

/// A duration as `parse_duration` reads it, or nearly.
fn duration_text() -> impl Strategy<Value = String> {
    (
        prop_oneof![digits(), float_text()],
        prop::sample::select(vec![
            "ns", "us", "µs", "ms", "s", "", "m", "h", " ms", "ms ", "S", "sec",
        ]),
    )
        .prop_map(|(n, u)| format!("{n}{u}"))
}

/// A fault plan as text: `key=value` items, with keys and values right or nearly, or
/// anything.
fn faults_text() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "read_error",
        "write_error",
        "error",
        "short",
        "enospc_after",
        "latency",
        "latency_p",
        "seed",
        "ops",
        "Error",
        "",
        "unknown",
    ]);
    let value = prop_oneof![
        float_text(),
        size_text(),
        duration_text(),
        digits(),
        prop::sample::select(vec!["read", "write", "both", "Read", "none", ""]).prop_map(str::to_string),
        any_text(),
    ];
    let item = (key, value, prop::sample::select(vec!["=", " = ", "==", ":", ""]))
        .prop_map(|(k, v, eq)| format!("{k}{eq}{v}"));
    prop_oneof![
        4 => prop::collection::vec(item, 0..6).prop_map(|items| items.join(",")),
        1 => prop::sample::select(vec!["", "none", "off", "NONE", " Off ", ",", ",,"]).prop_map(str::to_string),
        1 => any_text(),
    ]
}

/// Rank paths as text: `RANK=PATH[,PATH...]` entries separated by `;`, or nearly, or
/// anything.
fn rank_paths_text() -> impl Strategy<Value = String> {
    let rank = prop_oneof![
        (0usize..8).prop_map(|n| n.to_string()),
        digits(),
        Just("-1".to_string()),
        Just("+2".to_string()),
        Just(" 3 ".to_string()),
        Just(String::new()),
    ];
    let path = prop_oneof![
        "/[a-z0-9/ ._-]{0,12}",
        "[^,;]{0,8}",
        Just(" ".to_string()),
        Just(String::new()),
    ];
    let entry = (
        rank,
        prop::collection::vec(path, 0..3),
        prop::sample::select(vec!["=", "", "=="]),
    )
        .prop_map(|(r, paths, eq)| format!("{r}{eq}{}", paths.join(",")));
    prop_oneof![
        4 => prop::collection::vec(entry, 0..4).prop_map(|e| e.join(";")),
        1 => any_text(),
    ]
}

/// Any value of a setting's text: sizes, numbers, words of each kind, plans, lists, or
/// anything.
fn value_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => size_text(),
        1 => digits(),
        1 => float_text(),
        1 => prop::sample::select(vec![
            "true", "False", "1", "0", "yes", "NO", "on", "off", "auto", "host", "cpu", "cuda", "gpu", "cuda:0",
            "cuda:3", "cuda:-1", "cuda:", "cuda:18446744073709551616", " host ", "uring", "cufile", "spdk",
            "Uring", "1,2", "1, 2 ,3", "0,1", ",", "4294967296", "-1",
        ])
        .prop_map(str::to_string),
        1 => faults_text(),
        1 => rank_paths_text(),
        1 => any_text(),
    ]
}

/// A [`Value`] of any type: integers over their whole range, every kind of float, booleans
/// and text.
fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        2 => any::<i64>().prop_map(Value::Int),
        1 => prop::sample::select(vec![0i64, 1, -1, 512, 4096, 1 << 20, 1 << 62, i64::MAX, i64::MIN])
            .prop_map(Value::Int),
        1 => prop::num::f64::ANY.prop_map(Value::Float),
        1 => prop::sample::select(vec![0.0, -0.0, 0.5, 2.0, 1e-9, 1e300, f64::MAX, f64::MIN_POSITIVE, 5e-324])
            .prop_map(Value::Float),
        1 => any::<bool>().prop_map(Value::Bool),
        6 => value_text().prop_map(Value::Str),
    ]
}

/// A setting with a value it takes, as TOML and as environment text: files and
/// environments of several of them get past the parsers to `resolve`.
fn valid_pair() -> impl Strategy<Value = (&'static str, &'static str)> {
    prop::sample::select(vec![
        ("device", "\"host\""),
        ("device", "1"),
        ("backend", "\"uring\""),
        ("queue_depth", "32"),
        ("threads", "\"2\""),
        ("pinned_bytes", "\"auto\""),
        ("alignment", "512"),
        ("alignment", "\"1MiB\""),
        ("staging_bytes", "\"64MiB\""),
        ("staging_bytes", "\"1GiB\""),
        ("prefetch_bytes", "1048576"),
        ("prefetch_bytes", "\"1TiB\""),
        ("pack_threshold", "\"64KiB\""),
        ("pack_extent_bytes", "\"4MiB\""),
        ("pack_extent_bytes", "\"512MiB\""),
        ("pack_flush_delay_ms", "0.5"),
        ("io_retries", "0"),
        ("io_retries", "100"),
        ("direct_write_bytes", "\"1MiB\""),
        ("stripe_bytes", "\"1MiB\""),
        ("stripe_weights", "\"1,2\""),
        ("rank_paths", "\"0=/a;1=/b,/c\""),
        ("pack", "false"),
        ("dedup", "true"),
        ("timeline", "\"on\""),
        ("timeline_capacity", "10"),
        ("faults", "\"write_error=0.1,seed=3\""),
    ])
}

/// A TOML value as written in a file: every TOML type, and literals TOML refuses.
fn toml_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => any::<i64>().prop_map(|n| n.to_string()),
        1 => digits(),
        1 => prop::sample::select(vec![
            "0x1000", "0o777", "0b1010", "1_024", "+16", "-0", "9223372036854775808", "inf", "-inf", "nan", "1e3",
            "1.5", "-2.5", "1979-05-27T07:32:00Z", "1979-05-27", "07:32:00", "true", "false", "True", "[]",
            "[1, 2]", "[\"a\", 1]", "{}", "{ a = 1 }", "'''x'''", "\"\"\"\nmulti\n\"\"\"", "\"\\u0000\"",
            "\"\\uD800\"", "'single'", "", "=", "\"unterminated",
        ])
        .prop_map(str::to_string),
        4 => value_text().prop_map(|s| format!("{s:?}")),
        1 => float_text(),
    ]
}

/// The text of a settings file: `key = value` lines with right, near and odd keys, tables,
/// or bytes that are not TOML (nor UTF-8) at all.
fn toml_bytes() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        4 => setting_name(),
        1 => name_like(),
        1 => setting_name().prop_map(|n| format!("\"{n}\"")),
        1 => prop::sample::select(vec!["[engine]", "[[x]]", "a.b", "\"\"", "# comment"]).prop_map(str::to_string),
    ];
    let line = prop_oneof![
        2 => (key, toml_literal()).prop_map(|(k, v)| format!("{k} = {v}")),
        3 => valid_pair().prop_map(|(k, v)| format!("{k} = {v}")),
    ];
    prop_oneof![
        6 => prop::collection::vec(line, 0..8).prop_map(|lines| lines.join("\n").into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => any_text().prop_map(String::into_bytes),
    ]
}

/// A `SPILLWAY_*` variable name: a setting's, one read elsewhere, a near miss, or anything.
fn env_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => setting_name().prop_map(|n| format!("SPILLWAY_{}", n.to_ascii_uppercase())),
        2 => name_like().prop_map(|n| format!("SPILLWAY_{}", n.to_ascii_uppercase())),
        1 => name_like().prop_map(|n| format!("SPILLWAY_{n}")),
        1 => prop::sample::select(OTHER_VARIABLES.iter().map(|(v, _)| *v).collect::<Vec<_>>())
            .prop_map(str::to_string),
        1 => any_text().prop_map(|t| format!("SPILLWAY_{t}")),
        1 => any_text(),
    ]
}

/// What `SPILLWAY_CONFIG` names, if it is set. Only files of this test: a fuzzed path could
/// name `/dev/zero`.
#[derive(Clone, Debug)]
enum ConfigFile {
    /// A file holding these bytes.
    Holding(Vec<u8>),
    /// A file that does not exist.
    Missing,
    /// A directory.
    Directory,
    /// This text, blank.
    Blank(String),
}

fn config_file() -> impl Strategy<Value = Option<ConfigFile>> {
    prop::option::of(prop_oneof![
        6 => toml_bytes().prop_map(ConfigFile::Holding),
        1 => Just(ConfigFile::Missing),
        1 => Just(ConfigFile::Directory),
        1 => prop::sample::select(vec!["", " ", "\t\n"]).prop_map(|s| ConfigFile::Blank(s.to_string())),
    ])
}

// ---------------------------------------------------------------------------------------
// Checks shared by the properties.
// ---------------------------------------------------------------------------------------

/// Resolves `settings`: a value or an error naming a setting, never a panic.
fn check_resolve(settings: &Settings) -> Result<(), TestCaseError> {
    match settings.resolve() {
        Ok(resolved) => {
            prop_assert!(resolved.engine.validate().is_ok());
        }
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            if let Some(name) = e.setting() {
                prop_assert!(
                    settings.source(name).is_some(),
                    "blames {name:?}, which is no setting"
                );
            }
        }
    }
    Ok(())
}

/// Every setting's reported value, set again as an argument, is accepted and reads back the
/// same: what `Settings::iter` (and the C ABI's and Python's settings) report can be given
/// back, values past `i64::MAX` too.
fn check_round_trip(settings: &Settings) -> Result<(), TestCaseError> {
    for (setting, value, _) in settings.iter() {
        let mut again = settings.clone();
        if let Err(e) = again.set(setting.name, value.clone()) {
            return Err(TestCaseError::fail(format!(
                "{} reads {value} but setting that back is refused: {e}",
                setting.name
            )));
        }
        prop_assert_eq!(
            again.value(setting.name),
            Some(value),
            "{} does not read back",
            setting.name
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Properties.
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(CASES))]

    /// `Settings::set` takes any name and any value: it accepts one of a setting's values
    /// (the source is then "argument") and refuses anything else with a message, naming the
    /// setting; `resolve` then checks them together without panicking.
    #[test]
    fn set_takes_any_name_and_value(ops in prop::collection::vec((name_like(), value()), 1..8)) {
        let mut settings = Settings::default();
        for (name, value) in ops {
            match settings.set(&name, value.clone()) {
                Ok(()) => {
                    prop_assert_eq!(settings.source(&name), Some(&Source::Argument));
                    prop_assert!(settings.value(&name).is_some());
                }
                Err(e) => {
                    prop_assert!(!e.to_string().is_empty());
                    prop_assert!(!e.reason().is_empty());
                    prop_assert_eq!(e.setting(), Some(name.as_str()));
                    prop_assert_eq!(e.source(), Some(&Source::Argument));
                }
            }
        }
        check_round_trip(&settings)?;
        check_resolve(&settings)?;
    }

    /// `Settings::load_from` takes any environment, with `SPILLWAY_CONFIG` naming any file
    /// (or a missing one, a directory, nothing): settings or an error, never a panic. A
    /// setting's variable that is accepted is the setting's source.
    #[test]
    fn load_from_takes_any_environment(
        env in prop::collection::vec(prop_oneof![
            2 => (env_key(), value_text()),
            3 => valid_pair().prop_map(|(name, value)| {
                (format!("SPILLWAY_{}", name.to_ascii_uppercase()), value.trim_matches('"').to_string())
            }),
        ], 0..8),
        file in config_file(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut env = env;
        if let Some(file) = &file {
            let path = dir.path().join("spillway.toml");
            let value = match file {
                ConfigFile::Holding(bytes) => {
                    std::fs::write(&path, bytes).unwrap();
                    path.display().to_string()
                }
                ConfigFile::Missing => path.display().to_string(),
                ConfigFile::Directory => dir.path().display().to_string(),
                ConfigFile::Blank(text) => text.clone(),
            };
            env.push((CONFIG_VAR.to_string(), value));
        }
        match Settings::load_from(env.clone()) {
            Ok(settings) => {
                for setting in SETTINGS {
                    let var = setting.env_var();
                    if env.iter().any(|(k, _)| *k == var) {
                        prop_assert_eq!(settings.source(setting.name), Some(&Source::Env(var)));
                    }
                }
                check_round_trip(&settings)?;
                check_resolve(&settings)?;
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// `Settings::apply_file` takes a file of any bytes: settings whose every key is a
    /// setting taken from the file, or an error, never a panic.
    #[test]
    fn apply_file_takes_any_bytes(bytes in toml_bytes()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spillway.toml");
        std::fs::write(&path, &bytes).unwrap();
        let mut settings = Settings::default();
        match settings.apply_file(&path) {
            Ok(()) => {
                let text = std::str::from_utf8(&bytes).expect("an accepted file is UTF-8");
                let table: toml::Table = toml::from_str(text).expect("an accepted file is TOML");
                for key in table.keys() {
                    prop_assert_eq!(settings.source(key), Some(&Source::File(path.clone())));
                }
                check_round_trip(&settings)?;
                check_resolve(&settings)?;
            }
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                prop_assert!(e.to_string().contains(&path.display().to_string()), "{e}");
            }
        }
    }

    /// `FaultPlan::parse` takes any text: a plan that passes its own check and prints as text
    /// that parses back to it, or an error saying which item is wrong, never a panic.
    #[test]
    fn fault_plans_parse_or_are_refused(text in faults_text()) {
        match FaultPlan::parse(&text) {
            Ok(plan) => {
                prop_assert!(plan.check().is_ok());
                let printed = plan.to_string();
                prop_assert_eq!(FaultPlan::parse(&printed), Ok(plan), "printed as {:?}", printed);
            }
            Err(e) => prop_assert!(e.starts_with("faults: "), "{e}"),
        }
    }

    /// `RankPaths::parse` takes any text: a list that prints as text that parses back to it,
    /// or an error naming the setting, never a panic.
    #[test]
    fn rank_paths_parse_or_are_refused(text in rank_paths_text(), what in "[a-z_]{1,12}") {
        match RankPaths::parse(&text, &what) {
            Ok(paths) => {
                let printed = paths.to_string();
                prop_assert_eq!(RankPaths::parse(&printed, &what).ok(), Some(paths), "printed as {:?}", printed);
            }
            Err(e) => prop_assert!(e.to_string().contains(&format!("{what}: ")), "{e}"),
        }
    }

    /// `parse_size` takes any text: at least one byte, or an error quoting the text, never a
    /// panic; it agrees with `parse_bytes` but for 0.
    #[test]
    fn sizes_parse_or_are_refused(text in prop_oneof![size_text(), any_text()]) {
        let size = parse_size(&text);
        match (&size, parse_bytes(&text)) {
            (Ok(n), Ok(m)) => {
                prop_assert!(*n >= 1);
                prop_assert_eq!(*n, m);
            }
            (Err(e), Ok(0)) | (Err(e), Err(_)) => prop_assert!(!e.is_empty()),
            (Err(e), Ok(m)) => prop_assert!(false, "parse_bytes gives {m}, parse_size refuses: {e}"),
            (Ok(n), Err(e)) => prop_assert!(false, "parse_size gives {n}, parse_bytes refuses: {e}"),
        }
    }

    /// A size written as a number and a unit means the number times the unit, or is refused
    /// as too large.
    #[test]
    fn sizes_with_units_multiply(n in any::<u64>(), unit_index in 0usize..13) {
        const UNITS: [(&str, u64); 13] = [
            ("", 1), ("B", 1), ("K", 1 << 10), ("KiB", 1 << 10), ("M", 1 << 20), ("mib", 1 << 20),
            ("G", 1 << 30), ("GiB", 1 << 30), ("T", 1 << 40), ("KB", 1_000), ("MB", 1_000_000),
            ("GB", 1_000_000_000), ("TB", 1_000_000_000_000),
        ];
        let (unit, mult) = UNITS[unit_index];
        let text = format!("{n}{unit}");
        match n.checked_mul(mult) {
            Some(0) => prop_assert!(parse_size(&text).is_err()),
            Some(bytes) => prop_assert_eq!(parse_size(&text), Ok(bytes)),
            None => prop_assert!(parse_size(&text).is_err()),
        }
    }
}

/// An `alignment` of 2^63 (a power of two, so accepted by the setting) made
/// `EngineConfig::validate` compute `2 * self.alignment`, which overflowed: a panic in debug
/// builds ("attempt to multiply with overflow", through `Settings::resolve`, the C ABI's
/// `spillway_settings_json`/`spillway_engine_open` and Python), and in release builds the
/// product wrapped to 0 and the alignment was accepted. It is refused: an alignment is at
/// most 1 GiB.
#[test]
fn alignment_of_two_to_the_63_is_refused_by_resolve() {
    let mut settings = Settings::default();
    settings.set("alignment", "9223372036854775808").unwrap();
    let resolved = std::panic::catch_unwind(|| settings.resolve());
    match resolved {
        Ok(Err(e)) => assert!(e.to_string().contains("alignment"), "{e}"),
        Ok(Ok(_)) => panic!("an alignment of 2^63 bytes was accepted"),
        Err(_) => panic!("resolve panicked on an alignment of 2^63 bytes"),
    }
}

/// A size setting takes any `u64` (`"9223372036854775808"`, `"16383P"`…), but reported its
/// value as an `i64` that saturated (`int` in src/settings/table.rs): past `i64::MAX`,
/// `Settings::value`, `Settings::iter`, the C ABI's
/// `spillway_settings_json`/`spillway_engine_settings_json` and Python's `Engine.settings`
/// reported 9223372036854775807, which is not the value in use; for `stripe_bytes` (a
/// multiple of 4096) the reported value was not even accepted back. Such values are
/// reported as they are (as text of their digits, as TOML and Python give them).
#[test]
fn values_past_i64_max_are_reported_as_they_are() {
    let mut settings = Settings::default();
    settings.set("stripe_bytes", "9223372036854775808").unwrap();
    settings.set("staging_bytes", "18446744073709551615").unwrap();
    let reported_stripe = settings.value("stripe_bytes").unwrap();
    let reported_staging = settings.value("staging_bytes").unwrap();
    assert_eq!(
        reported_stripe.size(),
        Ok(1 << 63),
        "stripe_bytes reads {reported_stripe}"
    );
    assert_eq!(
        reported_staging.size(),
        Ok(u64::MAX),
        "staging_bytes reads {reported_staging}"
    );
    let mut again = Settings::default();
    again
        .set("stripe_bytes", reported_stripe.clone())
        .unwrap_or_else(|e| panic!("stripe_bytes reads {reported_stripe} but that is refused: {e}"));
    again.set("staging_bytes", reported_staging.clone()).unwrap();
    assert_eq!(
        again.resolve().unwrap().engine.staging_bytes,
        u64::MAX,
        "staging_bytes is u64::MAX but reads {reported_staging}"
    );
}

/// The file layer and `CONFIG_VAR` work on the paths the properties use (a guard against
/// the properties passing by refusing everything).
#[test]
fn a_valid_file_and_environment_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spillway.toml");
    std::fs::write(
        &path,
        "staging_bytes = \"64MiB\"\nprefetch_bytes = 1048576\npack = false\n",
    )
    .unwrap();
    let settings = Settings::load_from([
        (CONFIG_VAR.to_string(), path.display().to_string()),
        ("SPILLWAY_QUEUE_DEPTH".to_string(), "8".to_string()),
    ])
    .unwrap();
    assert_eq!(
        settings.source("staging_bytes"),
        Some(&Source::File(path.clone()))
    );
    assert_eq!(
        settings.source("queue_depth"),
        Some(&Source::Env("SPILLWAY_QUEUE_DEPTH".into()))
    );
    settings.resolve().unwrap();
}
