//! The layers' order, and refusals naming the setting and where its value came from.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::*;

/// A layer of settings.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layer {
    File,
    Env,
    Argument,
}

/// A TOML file holding `text`, in `dir`.
fn file(dir: &TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("spillway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The environment naming `path` as the settings file.
fn config(path: &Path) -> (String, String) {
    (CONFIG_VAR.to_string(), path.display().to_string())
}

/// Settings with `setting` given `text` (as TOML text for the file) in each of `layers`.
fn layered(dir: &TempDir, setting: &str, given: &[(Layer, &str)]) -> Result<Settings, SettingsError> {
    let mut env = Vec::new();
    let mut args = Vec::new();
    for &(layer, text) in given {
        match layer {
            Layer::File => env.push(config(&file(dir, &format!("{setting} = {text}\n")))),
            Layer::Env => env.push((find(setting).unwrap().1.env_var(), text.to_string())),
            Layer::Argument => args.push(text),
        }
    }
    let mut settings = Settings::load_from(env)?;
    for text in args {
        settings.set(setting, text)?;
    }
    Ok(settings)
}

#[test]
fn defaults_resolve_and_round_trip() {
    let settings = Settings::default();
    let resolved = settings.resolve().unwrap();
    assert_eq!(resolved.engine, EngineConfig::default());
    assert_eq!(resolved.choices.queue_depth, 16);
    for (s, value, source) in settings.iter() {
        assert_eq!(*source, Source::Default, "{}", s.name);
        assert_eq!(value, s.default_value(), "{}", s.name);
        let mut again = Settings::default();
        again.set(s.name, value.clone()).unwrap();
        assert_eq!(again.value(s.name), Some(value), "{} does not round-trip", s.name);
    }
}

#[test]
fn sizes_left_at_their_defaults_fit_a_small_staging_and_given_ones_are_checked() {
    let mut small = Settings::default();
    small.set("staging_bytes", Value::Int(8 << 20)).unwrap();
    let r = small.resolve().unwrap();
    assert_eq!(
        (
            r.engine.prefetch_bytes,
            r.engine.pack_extent_bytes,
            r.engine.pack_threshold
        ),
        (4 << 20, 4 << 20, 1 << 20)
    );
    small.set("prefetch_bytes", Value::Int(16 << 20)).unwrap();
    let e = small.resolve().unwrap_err().to_string();
    assert!(e.contains("prefetch_bytes") && e.contains("argument"), "{e}");
}

#[test]
fn each_layer_overrides_the_ones_below() {
    let dir = TempDir::new().unwrap();
    let order = [Layer::File, Layer::Env, Layer::Argument];
    let source = |layer: Layer, path: &Path| match layer {
        Layer::File => Source::File(path.to_path_buf()),
        Layer::Env => Source::Env("SPILLWAY_THREADS".into()),
        Layer::Argument => Source::Argument,
    };
    let path = dir.path().join("spillway.toml");
    for (i, &low) in order.iter().enumerate() {
        // Over the default.
        let s = layered(&dir, "threads", &[(low, "2")]).unwrap();
        assert_eq!(
            s.value("threads"),
            Some(Value::Int(2)),
            "{low:?} over the default"
        );
        assert_eq!(s.source("threads"), Some(&source(low, &path)));
        for &high in &order[i + 1..] {
            let s = layered(&dir, "threads", &[(low, "2"), (high, "3")]).unwrap();
            assert_eq!(s.value("threads"), Some(Value::Int(3)), "{high:?} over {low:?}");
            assert_eq!(
                s.source("threads"),
                Some(&source(high, &path)),
                "{high:?} over {low:?}"
            );
            assert_eq!(s.resolve().unwrap().choices.threads, 3);
        }
    }
}

#[test]
fn all_layers_together_keep_each_settings_source() {
    let dir = TempDir::new().unwrap();
    let path = file(
        &dir,
        "staging_bytes = \"16MiB\"\nqueue_depth = 8\ndedup = false\npack_threshold = 65536\npack_extent_bytes = \"1MiB\"\n",
    );
    let env = [
        config(&path),
        ("SPILLWAY_STAGING_BYTES".into(), "12MiB".into()),
        ("SPILLWAY_QUEUE_DEPTH".into(), "4".into()),
        ("SPILLWAY_LOG".into(), "debug".into()),
        ("HOME".into(), "/root".into()),
    ];
    let mut s = Settings::load_from(env).unwrap();
    s.set("staging_bytes", "10MiB").unwrap();
    s.set("prefetch_bytes", Value::Int(1 << 20)).unwrap();
    let r = s.resolve().unwrap();
    assert_eq!(r.engine.staging_bytes, 10 << 20);
    assert_eq!(r.engine.prefetch_bytes, 1 << 20);
    assert_eq!(r.choices.queue_depth, 4);
    assert!(!r.engine.dedup);
    assert_eq!(r.engine.pack_threshold, 64 << 10);
    assert_eq!(s.source("staging_bytes"), Some(&Source::Argument));
    assert_eq!(
        s.source("queue_depth"),
        Some(&Source::Env("SPILLWAY_QUEUE_DEPTH".into()))
    );
    assert_eq!(s.source("dedup"), Some(&Source::File(path.clone())));
    assert_eq!(s.source("alignment"), Some(&Source::Default));
    assert_eq!(s.source("no_such_setting"), None);
}

#[test]
fn every_invalid_value_is_refused_in_every_layer_by_name() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("spillway.toml");
    for s in SETTINGS {
        let env_var = s.env_var();
        let cases: [(Layer, &str, String); 5] = [
            (
                Layer::File,
                "\"bogus\"",
                format!("{}: {} = \"bogus\"", path.display(), s.name),
            ),
            (Layer::File, "-1", format!("{}: {} = -1", path.display(), s.name)),
            (
                Layer::Env,
                "bogus",
                format!("environment variable {env_var}=\"bogus\""),
            ),
            (Layer::Env, "-1", format!("environment variable {env_var}=\"-1\"")),
            (Layer::Argument, "bogus", format!("argument {}=\"bogus\"", s.name)),
        ];
        for (layer, text, place) in cases {
            let e = layered(&dir, s.name, &[(layer, text)]).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with(&place),
                "{}: {msg:?} should start with {place:?}",
                s.name
            );
            assert!(
                msg.contains(&format!("{} takes {}", s.name, s.kind.accepts())),
                "{msg}"
            );
            assert_eq!(e.setting(), Some(s.name));
            assert!(e.reason().contains(s.name), "{}", e.reason());
        }
        for bad in [Value::Int(-1), Value::Float(f64::NAN), Value::Float(-0.5)] {
            let e = Settings::default().set(s.name, bad.clone()).unwrap_err();
            assert_eq!(e.source(), Some(&Source::Argument));
            assert!(e.to_string().contains(s.name), "{} = {bad}: {e}", s.name);
        }
    }
}

#[test]
fn a_refused_value_leaves_the_setting_as_it_was() {
    let mut s = Settings::default();
    s.set("queue_depth", 8i64).unwrap();
    assert!(s
        .set("queue_depth", 1i64 << 40)
        .unwrap_err()
        .to_string()
        .contains("at most 4096"));
    assert_eq!(s.value("queue_depth"), Some(Value::Int(8)));
    assert_eq!(s.source("queue_depth"), Some(&Source::Argument));
}

#[test]
fn unknown_names_are_refused_by_name_in_every_layer() {
    let dir = TempDir::new().unwrap();
    let path = file(&dir, "stagging_bytes = \"1GiB\"\n");
    let e = Settings::load_from([config(&path)]).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with(&path.display().to_string()), "{msg}");
    assert!(
        msg.contains("unknown key \"stagging_bytes\" (did you mean \"staging_bytes\"?)"),
        "{msg}"
    );
    assert_eq!(e.setting(), Some("stagging_bytes"));

    let path = file(&dir, "[engine]\nstaging_bytes = \"1GiB\"\n");
    let msg = Settings::load_from([config(&path)]).unwrap_err().to_string();
    assert!(msg.contains("unknown key \"engine\""), "{msg}");

    for var in [
        "SPILLWAY_STAGING_BYTE",
        "SPILLWAY_STAGING",
        "SPILLWAY_Queue_Depth",
    ] {
        let e = Settings::load_from([(var, "1")]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("environment variable {var} is not")),
            "{e}"
        );
        assert_eq!(e.source(), Some(&Source::Env(var.into())));
    }
    let e = Settings::default().set("stagging_bytes", "1GiB").unwrap_err();
    assert!(e
        .to_string()
        .contains("unknown setting \"stagging_bytes\" (did you mean \"staging_bytes\"?)"));
}

#[test]
fn other_spillway_variables_are_left_alone() {
    let env = [
        ("SPILLWAY_LOG", "debug"),
        ("SPILLWAY_TEST_DIR", "/tmp"),
        ("SPILLWAY_NO_NVCC", "1"),
        ("SPILLWAY_SOMETHING_ELSE", "x"),
        ("PATH", "/bin"),
    ];
    let s = Settings::load_from(env).unwrap();
    assert!(s.iter().all(|(_, _, source)| *source == Source::Default));
}

#[test]
fn the_settings_file_must_be_readable_toml_of_scalars() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("missing.toml");
    let msg = Settings::load_from([config(&missing)]).unwrap_err().to_string();
    assert!(
        msg.contains(&missing.display().to_string()) && msg.contains(CONFIG_VAR),
        "{msg}"
    );

    let msg = Settings::load_from([(CONFIG_VAR, " ")]).unwrap_err().to_string();
    assert!(msg.contains("SPILLWAY_CONFIG is set but empty"), "{msg}");

    let path = file(&dir, "staging_bytes = \n");
    let msg = Settings::load_from([config(&path)]).unwrap_err().to_string();
    assert!(msg.contains("not a valid TOML settings file"), "{msg}");

    let path = file(&dir, "threads = [1, 2]\n");
    let msg = Settings::load_from([config(&path)]).unwrap_err().to_string();
    assert!(
        msg.contains("threads = [1, 2]: a TOML array is not a value; threads takes"),
        "{msg}"
    );
}

#[test]
fn settings_that_disagree_are_refused_naming_each_and_its_source() {
    let dir = TempDir::new().unwrap();
    let path = file(&dir, "prefetch_bytes = \"1GiB\"\n");
    let mut s = Settings::load_from([config(&path)]).unwrap();
    let e = s.resolve().unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("prefetch_bytes 1073741824 exceeds staging_bytes"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("prefetch_bytes: file {}", path.display())),
        "{msg}"
    );
    assert!(msg.contains("staging_bytes: default"), "{msg}");
    assert_eq!(e.setting(), Some("prefetch_bytes"));
    // A higher layer may set it right: layers are checked together, at the end.
    s.set("staging_bytes", "2GiB").unwrap();
    s.set("pack_extent_bytes", "16MiB").unwrap();
    assert_eq!(s.resolve().unwrap().engine.staging_bytes, 2 << 30);

    let mut s = Settings::default();
    s.set("alignment", 1000i64).unwrap();
    let msg = s.resolve().unwrap_err().to_string();
    assert!(
        msg.contains("power of two") && msg.contains("alignment: argument"),
        "{msg}"
    );
}

#[test]
fn text_values_read_as_typed_ones() {
    let env = [
        ("SPILLWAY_DEVICE", "cuda:1"),
        ("SPILLWAY_BACKEND", "cufile"),
        ("SPILLWAY_PINNED_BYTES", "64MiB"),
        ("SPILLWAY_PACK", "false"),
        ("SPILLWAY_TIMELINE", "1"),
        ("SPILLWAY_PACK_FLUSH_DELAY_MS", "2.5"),
        ("SPILLWAY_TIMELINE_CAPACITY", "1000"),
    ];
    let r = Settings::load_from(env).unwrap().resolve().unwrap();
    assert_eq!((r.choices.mem, r.choices.gpu), (MemChoice::Gpu, Some(1)));
    assert_eq!(r.choices.backend, BackendChoice::Cufile);
    assert_eq!(r.choices.pinned_bytes, Some(64 << 20));
    assert!(!r.engine.pack && r.engine.timeline);
    assert_eq!(r.engine.pack_flush_delay, std::time::Duration::from_micros(2500));
    assert_eq!(r.engine.timeline_capacity, 1000);
    let mut s = Settings::default();
    s.set("device", "host").unwrap();
    s.set("pinned_bytes", "auto").unwrap();
    let r = s.resolve().unwrap();
    assert_eq!(
        (r.choices.mem, r.choices.gpu, r.choices.pinned_bytes),
        (MemChoice::Host, None, None)
    );
}

#[test]
fn the_documented_example_file_loads() {
    let dir = TempDir::new().unwrap();
    let path = file(&dir, docs::EXAMPLE);
    let s = Settings::load_from([config(&path)]).unwrap();
    let r = s.resolve().unwrap();
    assert_eq!(r.engine.staging_bytes, 1 << 30);
    assert_eq!(s.source("queue_depth"), Some(&Source::File(path)));
}

#[test]
fn every_setting_has_a_distinct_snake_case_name_and_a_meaning() {
    let mut seen = std::collections::HashSet::new();
    for s in SETTINGS {
        assert!(seen.insert(s.name), "{} twice", s.name);
        assert!(
            s.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{}",
            s.name
        );
        assert!(!s.meaning.is_empty());
        assert!(OTHER_VARIABLES.iter().all(|(v, _)| *v != s.env_var()));
    }
}

#[test]
fn faults_parse_into_a_plan_in_every_layer_and_default_to_none() {
    let r = Settings::default().resolve().unwrap();
    assert!(r.faults.is_none());
    assert_eq!(Settings::default().value("faults"), Some(Value::from("")));

    let dir = TempDir::new().unwrap();
    let s = layered(&dir, "faults", &[(Layer::File, "\"read_error=0.5,seed=9\"")]).unwrap();
    let r = s.resolve().unwrap();
    assert_eq!(
        (r.faults.read_error, r.faults.write_error, r.faults.seed),
        (0.5, 0.0, 9)
    );

    let s = layered(
        &dir,
        "faults",
        &[
            (Layer::File, "\"error=1\""),
            (Layer::Env, "short=0.25,enospc_after=1MiB,latency=2ms"),
        ],
    )
    .unwrap();
    let r = s.resolve().unwrap();
    assert_eq!(
        (r.faults.short, r.faults.read_error),
        (0.25, 0.0),
        "the environment wins"
    );
    assert_eq!(r.faults.enospc_after, Some(1 << 20));
    assert_eq!(r.faults.latency, std::time::Duration::from_millis(2));
    assert_eq!(
        s.value("faults"),
        Some(Value::from("short=0.25,enospc_after=1MiB,latency=2ms"))
    );
    assert_eq!(s.source("faults"), Some(&Source::Env("SPILLWAY_FAULTS".into())));

    for off in ["none", "off", " "] {
        let mut s = Settings::default();
        s.set("faults", off).unwrap();
        assert!(s.resolve().unwrap().faults.is_none(), "{off:?}");
        assert_eq!(s.value("faults"), Some(Value::from("")), "{off:?}");
    }

    for (bad, why) in [
        ("bogus=1", "unknown key \"bogus\""),
        ("read_error=2", "probability from 0 to 1"),
        ("write_error", "expected key=value"),
        ("latency_p=0.5", "latency_p needs latency"),
        ("ops=write,read_error=0.1", "no effect with ops=write"),
    ] {
        let e = layered(&dir, "faults", &[(Layer::Env, bad)]).unwrap_err();
        let msg = e.to_string();
        assert_eq!(e.setting(), Some("faults"), "{msg}");
        assert!(
            msg.starts_with(&format!("environment variable SPILLWAY_FAULTS=\"{bad}\": ")),
            "{msg}"
        );
        assert!(msg.contains(why) && msg.contains("faults takes"), "{bad}: {msg}");
    }
}

#[test]
fn io_retries_takes_zero_and_refuses_more_than_the_engine_allows() {
    let mut s = Settings::default();
    s.set("io_retries", 0i64).unwrap();
    assert_eq!(s.resolve().unwrap().engine.io_retries, 0);
    s.set("io_retries", "101").unwrap();
    let e = s.resolve().unwrap_err().to_string();
    assert!(e.contains("io_retries"), "{e}");
}

#[test]
fn resource_settings_are_capped_in_every_layer_by_name() {
    let dir = TempDir::new().unwrap();
    let cases: [(&str, &str, &str, &str); 6] = [
        ("threads", "256", "257", "at most 256"),
        ("threads", "1", "2147483648", "at most 256"),
        ("queue_depth", "4096", "100000", "at most 4096"),
        ("pinned_bytes", "1GiB", "2GiB", "at most 1GiB"),
        ("pack_flush_delay_ms", "10000", "1e12", "at most 10000"),
        ("timeline_capacity", "100000000", "100000001", "at most 100000000"),
    ];
    for (name, ok, bad, why) in cases {
        for layer in [Layer::File, Layer::Env, Layer::Argument] {
            let quoted = format!("\"{ok}\"");
            let text = if layer == Layer::File { quoted.as_str() } else { ok };
            layered(&dir, name, &[(layer, text)]).unwrap_or_else(|e| panic!("{name}={ok}: {e}"));
            let quoted = format!("\"{bad}\"");
            let text = if layer == Layer::File {
                quoted.as_str()
            } else {
                bad
            };
            let e = layered(&dir, name, &[(layer, text)]).unwrap_err();
            assert_eq!(e.setting(), Some(name), "{e}");
            assert!(e.to_string().contains(why), "{name}={bad} ({layer:?}): {e}");
        }
    }
    // An integer argument too (Python's threads=2**31 arrives as one).
    let e = Settings::default()
        .set("threads", Value::Int(1 << 31))
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("argument threads=2147483648: 2147483648 is too large: at most 256"),
        "{e}"
    );
    let e = Settings::default()
        .set("pack_flush_delay_ms", Value::Float(1e12))
        .unwrap_err();
    assert!(e.to_string().contains("too long: at most 10000"), "{e}");
}

#[test]
fn the_settings_file_must_be_a_small_regular_file() {
    // A device that never ends, read forever before.
    let e = Settings::load_from([(CONFIG_VAR, "/dev/zero")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/dev/zero")
            && e.contains(CONFIG_VAR)
            && e.contains("a character device, not a regular file"),
        "{e}"
    );
    // A directory.
    let dir = TempDir::new().unwrap();
    let e = Settings::load_from([config(dir.path())]).unwrap_err().to_string();
    assert!(e.contains("a directory, not a regular file"), "{e}");
    // A FIFO with no writer: the open itself used to wait for one.
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let env = [config(&fifo)];
    std::thread::spawn(move || {
        let _ = tx.send(Settings::load_from(env).map(|_| ()).map_err(|e| e.to_string()));
    });
    let e = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("a FIFO as the settings file hangs")
        .unwrap_err();
    assert!(
        e.contains("a FIFO, not a regular file") && e.contains(CONFIG_VAR),
        "{e}"
    );
    // Larger than 1 MiB.
    let big = dir.path().join("big.toml");
    std::fs::write(&big, vec![b'#'; (MAX_CONFIG_BYTES + 1) as usize]).unwrap();
    let e = Settings::load_from([config(&big)]).unwrap_err().to_string();
    assert!(
        e.contains("more than a settings file may") && e.contains(CONFIG_VAR),
        "{e}"
    );
    // A regular file within the limit still loads.
    let ok = file(&dir, "threads = 2\n");
    assert_eq!(
        Settings::load_from([config(&ok)])
            .unwrap()
            .resolve()
            .unwrap()
            .choices
            .threads,
        2
    );
}

#[test]
fn every_engine_refusal_names_settings_of_the_table() {
    // The engine's checks name the settings they refuse by their table names, and resolve()
    // blames one of them: the first the caller set, else the first named.
    let cases: &[&[(&str, &str)]] = &[
        &[("alignment", "1000")],
        &[("staging_bytes", "4KiB")],
        &[("prefetch_bytes", "1GiB"), ("staging_bytes", "512MiB")],
        &[("pack_extent_bytes", "0")],
        &[("pack_extent_bytes", "300MiB")],
        &[("pack_threshold", "32MiB")],
        &[("direct_write_bytes", "0")],
        &[("io_retries", "101")],
    ];
    for given in cases {
        let mut s = Settings::default();
        for (name, value) in *given {
            s.set(name, *value).unwrap();
        }
        let mut cfg = s.values.engine.clone();
        cfg.fit_to_staging(spillway_runtime::engine::SetSizes {
            prefetch_bytes: true,
            pack_extent_bytes: true,
            pack_threshold: true,
        });
        let refusal = cfg.check().unwrap_err();
        assert!(!refusal.settings.is_empty(), "{refusal}");
        for name in &refusal.settings {
            assert!(
                SETTINGS.iter().any(|s| s.name == *name),
                "{name} is not a setting"
            );
            assert!(refusal.message.contains(name), "{refusal} does not name {name}");
        }
        let e = s.resolve().unwrap_err().to_string();
        assert!(e.contains(given[0].0), "{e}");
    }
}
