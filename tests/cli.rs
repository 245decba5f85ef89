//! Tests of the `spillway` command: real runs on temporary files, and every kind of bad
//! input, each of which must fail with a clear message and a non-zero exit.

use std::path::Path;
use std::process::{Command, Output};

fn spillway(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(args)
        .output()
        .expect("the spillway binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A small tmpfs mounted on a new temporary directory, unmounted when dropped; `None`
/// (saying so) when not root, since only root may mount.
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    fn mount(test: &str, options: &str) -> Option<Self> {
        if !is_root() {
            eprintln!("{test} needs root to mount a small tmpfs; not run");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a tmpfs ({options}) at {}",
            dir.path().display()
        );
        Some(SmallTmpfs { dir })
    }

    fn path(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Runs a bench expecting failure; returns stderr.
fn bench_fails(args: &[&str]) -> String {
    let out = spillway(&[&["bench"], args].concat());
    assert!(
        !out.status.success(),
        "expected failure for {args:?}, got:\n{}",
        stdout(&out)
    );
    let err = stderr(&out);
    assert!(err.contains("error"), "stderr names an error: {err}");
    err
}

fn host_bench(dir: &Path, extra: &[&str]) -> Output {
    let path = dir.join("bench.dat");
    let path = path.to_str().unwrap();
    spillway(
        &[
            &["bench", "--mem", "host", "--backend", "uring", "--path", path],
            extra,
        ]
        .concat(),
    )
}

#[test]
fn bench_json_reports_every_op_verified() {
    let dir = tempfile::tempdir().unwrap();
    let out = host_bench(
        dir.path(),
        &[
            "--size",
            "8M",
            "--block",
            "64K",
            "--qd",
            "4",
            "--threads",
            "2",
            "--op",
            "write,read,randwrite,randread",
            "--verify",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect();
    let ops: Vec<&str> = lines.iter().map(|v| v["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["write", "read", "randwrite", "randread"]);
    for v in &lines {
        for key in [
            "backend",
            "memory",
            "op",
            "bytes",
            "seconds",
            "throughput_gbps",
            "iops",
            "latency_us",
            "direct_io",
            "host_staging",
            "gds_mode",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        // A real 64 KiB I/O takes well over a microsecond; percentiles are ordered.
        let lat = |q: &str| v["latency_us"][q].as_f64().unwrap();
        assert!(lat("p50") >= 1.0, "latency in {v}");
        assert!(lat("p50") <= lat("p99") && lat("p99") <= lat("p999") && lat("p999") <= lat("max"));
        assert_eq!(v["backend"], "uring");
        assert_eq!(v["memory"], "host");
        assert_eq!(v["bytes"], 8 << 20);
        assert_eq!(v["verified"], true);
        assert_eq!(v["mismatched_bytes"], 0);
        assert_eq!(v["direct_io"], true);
        assert_eq!(v["host_staging"], false);
        assert!(v["gds_mode"].is_null());
        assert!(v["throughput_gbps"].as_f64().unwrap() > 0.0);
        assert!(v["iops"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn reading_an_existing_file_leaves_it_alone_unless_verifying() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.dat");
    let original: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &original).unwrap();
    // A file made by another tool is used once it is private (0644 is refused: see below).
    let private = |mode| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    private(0o644);
    let out = host_bench(dir.path(), &["--op", "read", "--size", "1M"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    private(0o600);
    let out = host_bench(
        dir.path(),
        &["--op", "read,randread", "--size", "1M", "--block", "64K"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        std::fs::read(&path).unwrap() == original,
        "a plain read must not rewrite the file"
    );

    let out = host_bench(dir.path(), &["--op", "read", "--size", "1M", "--verify"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        std::fs::read(&path).unwrap() != original,
        "--verify lays down its own data first"
    );
}

#[test]
fn a_small_buffer_is_cycled_through() {
    let dir = tempfile::tempdir().unwrap();
    let out = host_bench(
        dir.path(),
        &["--size", "4M", "--block", "64K", "--buffer", "200K", "--json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    for line in stdout(&out).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["buffer_bytes"], 3 * 65536, "rounded down to whole blocks: {v}");
        assert_eq!(v["bytes"], 4 << 20);
    }
}

#[test]
fn bench_table_with_odd_sizes_verifies() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB + 3 bytes in blocks of 4097: nothing is aligned.
    let out = host_bench(
        dir.path(),
        &["--size", "1048579", "--block", "4097", "--qd", "8", "--verify"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("GB/s") && text.contains("p99.9 us"), "{text}");
    assert_eq!(text.matches(" ok").count(), 2, "write and read verified: {text}");
}

#[test]
fn bench_defaults_to_a_temporary_file_and_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["bench", "--size", "4M", "--json"])
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 2, "write and read by default");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "temporary file removed"
    );
}

#[test]
fn info_reports_io_uring_and_o_direct() {
    let dir = tempfile::tempdir().unwrap();
    let out = spillway(&["info", "--path", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("io_uring:      available"), "{text}");
    assert!(text.contains("O_DIRECT:      supported"), "{text}");
    assert!(text.contains("cuFile:"), "{text}");

    let out = spillway(&["info", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(v.get("gpus").is_some());
    // Each feature is {"available": bool, and "detail" or "error"}: never Rust's Ok/Err.
    assert_eq!(v["io_uring"]["available"], true, "{v}");
    for feature in ["cuda_driver", "cufile"] {
        let f = &v[feature];
        match f["available"].as_bool() {
            Some(true) => assert!(f["detail"].is_string(), "{feature}: {f}"),
            Some(false) => assert!(
                f["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{feature}: {f}"
            ),
            None => panic!("{feature} has no \"available\": {f}"),
        }
    }
    assert!(!stdout(&out).contains("\"Ok\"") && !stdout(&out).contains("\"Err\""));
    assert!(v["cufile_details"].is_object(), "{v}");
}

#[test]
fn every_refusal_exits_with_the_status_of_the_readme_table() {
    // 2: bad input from any layer — a flag, an environment variable, a path.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>);
    let cases: Vec<Case> = vec![
        (vec!["--qd", "0"], vec![]),
        (vec!["--threads", "0"], vec![]),
        (vec![], vec![("SPILLWAY_QUEUE_DEPTH", "0")]),
        (vec!["--path", "/dev/null"], vec![]),
        (vec!["--path", "/nonexistent-dir-xyz/f.dat"], vec![]),
        (vec!["--path", "/proc"], vec![]),
        (vec!["--mem", "gpu", "--gpu", "7"], vec![]),
    ];
    for (flags, env) in cases {
        let mut args = vec!["bench", "--size", "1M"];
        if !flags.contains(&"--mem") {
            args.extend(["--mem", "host"]);
        }
        if !flags.contains(&"--path") {
            args.extend(["--path", path]);
        }
        args.extend(&flags);
        let out = spillway_with_env(&args, &env);
        assert_eq!(out.status.code(), Some(2), "{flags:?} {env:?}: {}", stderr(&out));
        assert!(stderr(&out).starts_with("error: "), "{flags:?}: {}", stderr(&out));
    }
    // A bad PCI address for the NVMe subcommands is bad input too.
    let out = spillway(&["nvme", "bind", "0000:ee:1f.7"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// Runs `spillway args` under `script`, so its stderr is a terminal; returns what it wrote.
fn on_a_terminal(args: &[&str]) -> (bool, String) {
    let mut cmd = vec![env!("CARGO_BIN_EXE_spillway").to_string()];
    cmd.extend(args.iter().map(|a| a.to_string()));
    let out = Command::new("script")
        .args(["-qec", &cmd.join(" "), "/dev/null"])
        .output()
        .expect("script (util-linux) runs");
    (out.status.success(), stdout(&out))
}

#[test]
fn an_operation_longer_than_a_second_shows_a_progress_bar_on_a_terminal_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    // 12 requests, one at a time, each completing 150 ms late: about 1.8 s of writing.
    let slow = [
        "bench",
        "--mem",
        "host",
        "--path",
        path,
        "--size",
        "12M",
        "--qd",
        "1",
        "--op",
        "write",
        "--faults",
        "latency=150ms",
    ];
    let (ok, terminal) = on_a_terminal(&slow);
    assert!(ok, "{terminal}");
    assert!(
        terminal.contains("eta") && terminal.contains("MiB/s"),
        "no bar on a terminal: {terminal:?}"
    );
    // Piped: results only.
    let out = spillway(&slow);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("eta"), "a bar on a pipe: {}", stderr(&out));
    // --json on a terminal: no bar either.
    let (ok, json) = on_a_terminal(&[&slow[..], &["--json"]].concat());
    assert!(ok && !json.contains("eta"), "{json:?}");
    // A short run on a terminal prints none.
    let (ok, short) = on_a_terminal(&["bench", "--mem", "host", "--path", path, "--size", "2M"]);
    assert!(ok && !short.contains("eta"), "{short:?}");
}

#[test]
fn missing_directory_is_named() {
    let err = bench_fails(&[
        "--mem",
        "host",
        "--size",
        "1M",
        "--path",
        "/nonexistent-dir-xyz/f.dat",
    ]);
    assert!(
        err.contains("/nonexistent-dir-xyz") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn unwritable_directory_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    let path = locked.join("f.dat");
    let path = path.to_str().unwrap();
    let args = ["bench", "--mem", "host", "--size", "1M", "--path", path];
    let out = if is_root() {
        // Root ignores permission bits: run as nobody, for whom the directory is read-only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                env!("CARGO_BIN_EXE_spillway"),
            ])
            .args(&args[..])
            .output()
            .expect("setpriv (util-linux) is installed by scripts/test.sh")
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
        spillway(&args)
    };
    assert!(
        !out.status.success(),
        "writing into a read-only directory must fail"
    );
    let err = stderr(&out);
    assert!(
        err.contains("permission denied") && err.contains("locked"),
        "{err}"
    );
}

#[test]
fn full_filesystem_is_reported() {
    let Some(mnt) = SmallTmpfs::mount("full_filesystem_is_reported", "size=1m") else {
        return;
    };
    let path = format!("{}/f.dat", mnt.path());
    let out = spillway(&["bench", "--mem", "host", "--size", "8M", "--path", &path]);
    drop(mnt);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("no space left"), "{err}");
}

#[test]
fn absent_gpu_is_reported() {
    let err = bench_fails(&["--gpu", "7", "--size", "1M"]);
    assert!(err.contains("GPU 7") || err.contains("CUDA"), "{err}");
}

#[test]
fn cufile_without_libcufile_is_reported() {
    let out = spillway(&["bench", "--backend", "cufile", "--size", "1M"]);
    if spillway_cufile::check_library().is_ok() {
        // libcufile is installed here: whatever happens must not be a crash.
        assert!(out.status.code().is_some());
        return;
    }
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("libcufile") && err.contains("the uring backend"),
        "{err}"
    );
}

#[test]
fn bad_sizes_are_refused() {
    let cases: [(&[&str], &str); 9] = [
        (&["--size", "0"], "at least 1 byte"),
        (&["--size", "12Q"], "unknown unit"),
        (&["--size", "lots"], "not a size"),
        (&["--block", "0"], "at least 1 byte"),
        (&["--size", "1M", "--block", "2M"], "larger than --size"),
        (
            &["--size", "1M", "--qd", "0"],
            "--qd 0: 0 is not a positive integer",
        ),
        (
            &["--size", "1M", "--threads", "0"],
            "--threads 0: 0 is not a positive integer",
        ),
        (
            &["--size", "1M", "--block", "64K", "--buffer", "4K"],
            "smaller than --block",
        ),
        (
            &["--size", "1M", "--buffer", "64K", "--block", "4K", "--verify"],
            "must be at least --size",
        ),
    ];
    for (args, expected) in cases {
        let err = bench_fails(&[&["--mem", "host"], args].concat());
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

#[test]
fn host_memory_with_a_gpu_ordinal_is_refused() {
    let err = bench_fails(&["--mem", "host", "--gpu", "0", "--size", "1M"]);
    assert!(err.contains("--gpu 0") && err.contains("--mem host"), "{err}");
}

/// A tensors run in host memory on a file in `dir`: small enough for a 2-core CI machine.
fn tensors_bench(dir: &Path, extra: &[&str]) -> Output {
    host_bench(
        dir,
        &[
            &[
                "--workload",
                "tensors",
                "--tensors",
                "300",
                "--max-size",
                "64K",
                "--staging",
                "32M",
            ],
            extra,
        ]
        .concat(),
    )
}

/// The one JSON object a tensors run with --json prints.
fn tensors_json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", stderr(out));
    let text = stdout(out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON object per run: {text}");
    serde_json::from_str(lines[0]).expect("the line is one JSON object")
}

#[test]
fn fetching_the_default_tensor_mix_reads_little_more_than_it_fetches() {
    // Random sizes and 10% duplicate offloads (the default mix): a duplicate's prefetch
    // comes long before the rest of its extent is wanted. Reading the whole extent for it
    // read every byte about ten times over; its fetch now reads the tensor alone. Nor is
    // an extent read twice when a duplicate's request starts the scan through it (the
    // scan's requests, queued behind, wait on the same load): 1.08 read per byte fetched
    // before, 1.02 now.
    let dir = tempfile::tempdir().unwrap();
    let out = host_bench(
        dir.path(),
        &[
            "--workload",
            "tensors",
            "--tensors",
            "3000",
            "--staging",
            "64M",
            "--json",
        ],
    );
    let v = tensors_json(&out);
    let read = v["engine_stats"]["bytes_read"].as_f64().unwrap();
    let fetched = v["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["op"] == "fetch")
        .and_then(|p| p["bytes"].as_f64())
        .unwrap();
    assert!(v["duplicate_calls"].as_u64().unwrap() > 0);
    assert!(
        read <= 1.06 * fetched,
        "read amplification {:.2}: {read} bytes read for {fetched} fetched",
        read / fetched
    );
}

#[test]
fn tensors_run_in_host_memory_verifies_and_reports_json() {
    let dir = tempfile::tempdir().unwrap();
    // The engine's own defaults (512 MiB staging…), 300 tensors of 4 KiB to 256 KiB.
    let out = host_bench(
        dir.path(),
        &["--workload", "tensors", "--tensors", "300", "--json"],
    );
    let v = tensors_json(&out);
    for key in [
        "backend",
        "memory",
        "device",
        "path",
        "command",
        "tensors",
        "offload_calls",
        "dup_fraction",
        "min_size",
        "max_size",
        "total_bytes",
        "pack",
        "dedup",
        "engine",
        "phases",
        "verified",
        "mismatched_bytes",
        "notes",
        "engine_stats",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(v["workload"], "tensors");
    assert_eq!(
        (v["backend"].as_str(), v["memory"].as_str()),
        (Some("uring"), Some("host"))
    );
    assert_eq!(
        (v["verified"].as_bool(), v["mismatched_bytes"].as_u64()),
        (Some(true), Some(0))
    );
    assert_eq!(
        (v["tensors"].as_u64(), v["dup_fraction"].as_f64()),
        (Some(300), Some(0.1))
    );
    assert_eq!(
        (v["min_size"].as_u64(), v["max_size"].as_u64()),
        (Some(4096), Some(256 << 10))
    );
    assert_eq!(
        (v["pack"].as_bool(), v["dedup"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(v["engine"]["staging_bytes"], 512 << 20);
    assert_eq!(v["engine"]["pack_extent_bytes"], 16 << 20);
    // 10% of the calls repeat a tensor: 300 tensors, 33 more calls.
    let calls = v["offload_calls"].as_u64().unwrap();
    assert_eq!(calls, 333);
    let total = v["total_bytes"].as_u64().unwrap();
    assert!((300 * 4096..=300 * (256 << 10)).contains(&total), "{v}");
    let phases = v["phases"].as_array().unwrap();
    let ops: Vec<&str> = phases.iter().map(|p| p["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["offload", "fetch"]);
    for p in phases {
        assert_eq!(p["tensors"].as_u64(), Some(calls), "{p}");
        assert!(p["bytes"].as_u64().unwrap() > total, "duplicates count: {p}");
        for key in ["seconds", "throughput_gbps", "tensors_per_s"] {
            assert!(p[key].as_f64().unwrap() > 0.0, "{key} in {p}");
        }
    }
    let s = &v["engine_stats"];
    assert_eq!(s["offloads"].as_u64(), Some(calls));
    assert_eq!(s["fetches"].as_u64(), Some(calls));
    assert_eq!(s["dedup_hits"].as_u64(), Some(33));
    assert_eq!(s["packed_tensors"].as_u64(), Some(300));
    assert_eq!(
        s["forwarded_fetches"].as_u64(),
        Some(0),
        "everything came from storage"
    );
    assert!(s["extents_written"].as_u64().unwrap() < 300, "packed: {s}");
    assert!(s.get("latency").is_some());
}

#[test]
fn tensors_without_packing_write_one_extent_per_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let v = tensors_json(&tensors_bench(dir.path(), &["--no-pack", "--json"]));
    assert_eq!(v["pack"], false);
    assert_eq!(v["verified"], true);
    let s = &v["engine_stats"];
    assert_eq!(s["extents_written"], v["tensors"], "{s}");
    assert_eq!(
        (s["packed_tensors"].as_u64(), s["direct_tensors"].as_u64()),
        (Some(0), Some(300)),
        "{s}"
    );
}

#[test]
fn tensors_duplicates_are_stored_once_unless_dedup_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let v = tensors_json(&tensors_bench(dir.path(), &["--dup", "0.5", "--json"]));
    assert_eq!(v["verified"], true);
    assert_eq!(v["offload_calls"], 600);
    let hits = v["engine_stats"]["dedup_hits"].as_u64().unwrap();
    assert!(hits > 0, "{v}");
    assert_eq!(hits, v["duplicate_calls"].as_u64().unwrap());

    let v = tensors_json(&tensors_bench(
        dir.path(),
        &["--dup", "0.5", "--no-dedup", "--json"],
    ));
    assert_eq!(
        (v["dedup"].as_bool(), v["verified"].as_bool()),
        (Some(false), Some(true))
    );
    let s = &v["engine_stats"];
    assert_eq!(s["dedup_hits"], 0);
    assert_eq!(s["packed_tensors"], 600, "every call written: {s}");
}

#[test]
fn tensors_trace_is_chrome_json() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.json");
    let v = tensors_json(&tensors_bench(
        dir.path(),
        &["--trace", trace.to_str().unwrap(), "--json"],
    ));
    assert_eq!(v["engine"]["timeline"], true);
    assert_eq!(v["trace"].as_str(), trace.to_str());
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let events = doc["traceEvents"].as_array().expect("traceEvents");
    assert!(events.iter().any(|e| e["ph"] == "X"), "spans recorded");
}

#[test]
fn a_trace_path_that_is_a_symlink_is_refused_and_its_file_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    let trace = dir.path().join("trace.json");
    std::os::unix::fs::symlink(&victim, &trace).unwrap();
    let out = tensors_bench(dir.path(), &["--trace", trace.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "creating the trace file {} (check --trace): {} is a symbolic link to {}",
            trace.display(),
            trace.display(),
            victim.display()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // A trace of one's own is replaced, and made private.
    std::fs::remove_file(&trace).unwrap();
    std::fs::write(&trace, b"an old trace").unwrap();
    let v = tensors_json(&tensors_bench(
        dir.path(),
        &["--trace", trace.to_str().unwrap(), "--json"],
    ));
    assert_eq!(v["trace"].as_str(), trace.to_str());
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    assert!(doc["traceEvents"].is_array());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&trace).unwrap().mode() & 0o7777, 0o600);
}

#[test]
fn tensors_table_verifies_and_the_temporary_file_goes() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args([
            "bench",
            "--mem",
            "host",
            "--workload",
            "tensors",
            "--tensors",
            "100",
            "--staging",
            "16M",
        ])
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("tensors/s") && text.contains("offload"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("fetch") && l.ends_with(" ok")),
        "{text}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "temporary file removed"
    );
}

#[test]
fn tensors_bad_flags_are_refused() {
    let cases: [(&[&str], &str); 12] = [
        (&["--min-size", "8K", "--max-size", "4K"], "--min-size"),
        (&["--tensors", "0"], "--tensors 0"),
        (&["--dup", "1"], "--dup 1 is outside [0, 1)"),
        (&["--dup", "-0.1"], "--dup -0.1 is outside"),
        (&["--dup", "nan"], "--dup NaN is outside"),
        (&["--dup", "half"], "--dup"),
        (&["--staging", "4K"], "--staging 4 KiB is too small"),
        (
            &["--staging", "64M", "--prefetch", "128M"],
            "--prefetch (128 MiB) exceeds --staging",
        ),
        (
            &["--staging", "64M", "--pack-extent", "64M"],
            "--pack-extent (64 MiB) must be at most half",
        ),
        (
            &["--pack-extent", "1M", "--pack-threshold", "2M"],
            "--pack-threshold (2 MiB) exceeds",
        ),
        (
            &["--op", "read", "--size", "1M"],
            "--op, --size apply to --workload seq only",
        ),
        (
            &["--tensors", "1000000", "--min-size", "1G", "--max-size", "1G"],
            "lower --tensors or --max-size",
        ),
    ];
    for (args, expected) in cases {
        let err = bench_fails(&[&["--mem", "host", "--workload", "tensors"], args].concat());
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("missing-dir/trace.json");
    let err = bench_fails(&[
        "--mem",
        "host",
        "--workload",
        "tensors",
        "--tensors",
        "10",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    assert!(err.contains("--trace") && err.contains("missing-dir"), "{err}");
}

#[test]
fn flags_of_the_other_workload_are_refused() {
    let err = bench_fails(&["--mem", "host", "--size", "1M", "--tensors", "5"]);
    assert!(
        err.contains("--tensors applies to --workload tensors only")
            && err.contains("add --workload tensors"),
        "{err}"
    );
    let err = bench_fails(&[
        "--mem",
        "host",
        "--workload",
        "seq",
        "--no-pack",
        "--trace",
        "t.json",
    ]);
    assert!(
        err.contains("--no-pack, --trace apply to --workload tensors only"),
        "{err}"
    );
    let err = bench_fails(&["--workload", "bulk"]);
    assert!(err.contains("--workload") && err.contains("tensors"), "{err}");
}

#[test]
fn pinned_memory_must_be_whole_chunks() {
    let out = spillway(&["bench", "--mem", "host", "--size", "1M", "--pinned", "1000"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--pinned 1000") && err.contains("staging chunks"),
        "{err}"
    );
}

#[test]
fn the_userspace_nvme_backend_needs_a_controller_and_says_which() {
    let err = bench_fails(&["--mem", "host", "--backend", "spdk"]);
    assert!(err.contains("--backend spdk needs --pci"), "{err}");
    let err = bench_fails(&["--mem", "host", "--pci", "0000:00:04.0"]);
    assert!(err.contains("add --backend spdk"), "{err}");
    let err = bench_fails(&[
        "--mem",
        "host",
        "--backend",
        "spdk",
        "--pci",
        "0000:00:04.0",
        "--path",
        "/tmp/x",
    ]);
    assert!(
        err.contains("--path /tmp/x") && err.contains("drop one of them"),
        "{err}"
    );
    let err = bench_fails(&[
        "--mem",
        "host",
        "--backend",
        "spdk",
        "--pci",
        "0000:00:04.0",
        "--buffered",
    ]);
    assert!(err.contains("drop --buffered"), "{err}");
    let err = bench_fails(&["--mem", "host", "--backend", "spdk", "--pci", "4.0"]);
    assert!(err.contains("bad PCI address"), "{err}");
    // No such controller here (and none bound to vfio-pci): named, with what to do.
    let err = bench_fails(&["--mem", "host", "--backend", "spdk", "--pci", "0000:99:1f.7"]);
    assert!(
        err.contains("0000:99:1f.7") && err.contains("spillway nvme list"),
        "{err}"
    );
}

#[test]
fn info_says_how_anonymous_files_are_made_in_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = spillway(&["info", "--path", d]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.starts_with("Offload files:"))
        .unwrap_or_else(|| panic!("an 'Offload files:' line: {text}"));
    assert!(
        line.contains(&format!("anonymous in {d}"))
            && (line.contains("O_TMPFILE") || line.contains("unlinked at once")),
        "{line}"
    );

    let out = spillway(&["info", "--json", "--path", d]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let mode = v["path"]["anonymous_mode"].as_str().unwrap_or_default();
    assert!(["tmpfile", "unlinked-at-once"].contains(&mode), "{}", v["path"]);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left");

    // A file has no anonymous mode.
    let file = dir.path().join("f.dat");
    std::fs::write(&file, vec![0u8; 4096]).unwrap();
    let out = spillway(&["info", "--json", "--path", file.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(v["path"].get("anonymous_mode").is_none(), "{}", v["path"]);
}

#[test]
fn bench_in_a_directory_uses_an_anonymous_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = spillway(&[
        "bench", "--mem", "host", "--size", "4M", "--verify", "--json", "--path", d,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for line in stdout(&out).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["path"], format!("<anonymous in {d}>"), "{v}");
        assert_eq!(v["verified"], true, "{v}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left");
}

/// Free bytes (root's reserve included) of the filesystem holding `dir`.
fn filesystem_free(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data; all-zero is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid statvfs to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 || st.f_blocks == 0 {
        return None;
    }
    Some((st.f_bfree as u64).saturating_mul(st.f_frsize as u64))
}

/// Bytes allocated to the largest file that process `pid` has open in `dir` (a file with no
/// name shows there as `DIR/#inode (deleted)` or `DIR/name (deleted)`).
fn largest_open_file_in(pid: u32, dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.filter_map(|fd| {
        let link = fd.ok()?.path();
        let to = std::fs::read_link(&link).ok()?;
        // metadata() follows the link to the open file, named or not.
        (to.parent() == Some(dir)).then(|| std::fs::metadata(&link).ok())?
    })
    .map(|m| m.blocks() * 512)
    .max()
    .unwrap_or(0)
}

#[test]
fn a_bench_killed_while_offloading_leaves_no_file_and_no_used_space() {
    use std::os::unix::process::ExitStatusExt;
    use std::time::{Duration, Instant};
    // The run below reserves about 1.2 GiB: 500 tensors of 64 to 192 KiB, each offloaded
    // ten times and stored every time (--no-dedup), twice over (the workload's slack), with
    // only 128 MiB of host memory for the two arenas.
    const FOOTPRINT: u64 = 1 << 30;
    let dir = tempfile::tempdir().unwrap();
    let dir_path = std::fs::canonicalize(dir.path()).unwrap();
    let Some(before) = filesystem_free(&dir_path) else {
        eprintln!(
            "the free space of {}'s filesystem cannot be measured; not run",
            dir_path.display()
        );
        return;
    };
    if before < 4 * FOOTPRINT {
        eprintln!(
            "{} has {} MiB free, under the 4 GiB this test needs; not run",
            dir_path.display(),
            before >> 20
        );
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args([
            "bench",
            "--mem",
            "host",
            "--backend",
            "uring",
            "--workload",
            "tensors",
            "--tensors",
            "500",
            "--min-size",
            "64K",
            "--max-size",
            "192K",
            "--dup",
            "0.9",
            "--no-dedup",
            "--staging",
            "32M",
            "--json",
            "--path",
        ])
        .arg(&dir_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the spillway binary runs");
    let ended_early = |child: &mut std::process::Child, what: &str| -> ! {
        use std::io::Read;
        let _ = child.kill();
        let status = child.wait().unwrap();
        let mut err = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = pipe.read_to_string(&mut err);
        }
        panic!("{what} ({status}): {err}");
    };

    // Wait until the engine has its storage: the target's space reserved (fallocate).
    let deadline = Instant::now() + Duration::from_secs(180);
    let held = loop {
        if child.try_wait().unwrap().is_some() {
            ended_early(&mut child, "the bench ended before it reserved its storage");
        }
        let held = largest_open_file_in(child.id(), &dir_path);
        let dropped = filesystem_free(&dir_path).map_or(0, |now| before.saturating_sub(now));
        if held >= FOOTPRINT || dropped >= FOOTPRINT {
            break held;
        }
        if Instant::now() > deadline {
            ended_early(&mut child, "the bench did not reserve its storage in time");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Into the offload phase (it writes about 600 MiB, for most of a second), then SIGKILL.
    std::thread::sleep(Duration::from_millis(150));
    if child.try_wait().unwrap().is_some() {
        ended_early(&mut child, "the bench ended before it could be killed");
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");

    let left: Vec<_> = std::fs::read_dir(&dir_path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");

    // The kernel frees the file when the last reference goes (io_uring drops its own
    // asynchronously): wait for the space to come back. Other activity on a shared
    // filesystem moves the free space too, so allow half the footprint of slack.
    let slack = FOOTPRINT / 2;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = filesystem_free(&dir_path).unwrap();
        if now.saturating_add(slack) >= before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the filesystem's free space did not come back: {} MiB free before the run, {} MiB now (the run held {} MiB)",
            before >> 20,
            now >> 20,
            held >> 20
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bench_stripes_over_several_paths_and_reports_each() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let out = spillway(&[
        "bench",
        "--mem",
        "host",
        "--size",
        "16M",
        "--stripe",
        "256K",
        "--verify",
        "--json",
        "--path",
        a.path().to_str().unwrap(),
        "--path",
        b.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for line in stdout(&out).lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(r["verified"], true, "{r}");
        let members = r["members"].as_array().unwrap();
        assert_eq!(members.len(), 2);
        for m in members {
            assert_eq!(m["bytes"], 8 << 20, "{r}");
        }
        assert!(r["path"].as_str().unwrap().contains(" + "), "{r}");
    }
    // Both were anonymous files: nothing is left.
    assert_eq!(std::fs::read_dir(a.path()).unwrap().count(), 0);
    // Weights 1,3: the second path takes three units for every one of the first.
    let out = spillway(&[
        "bench",
        "--mem",
        "host",
        "--size",
        "16M",
        "--stripe",
        "256K",
        "--stripe-weights",
        "1,3",
        "--op",
        "write",
        "--json",
        "--path",
        a.path().to_str().unwrap(),
        "--path",
        b.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_str(stdout(&out).lines().next().unwrap()).unwrap();
    assert_eq!(r["members"][0]["bytes"], 4 << 20, "{r}");
    assert_eq!(r["members"][1]["bytes"], 12 << 20, "{r}");
    let err = bench_fails(&[
        "--mem",
        "host",
        "--path",
        "/tmp",
        "--path",
        "/tmp",
        "--stripe-weights",
        "1,0",
    ]);
    assert!(err.contains("stripe_weights"), "{err}");
    let err = bench_fails(&[
        "--mem", "host", "--path", "/tmp", "--path", "/tmp", "--stripe", "1000",
    ]);
    assert!(err.contains("stripe_bytes") && err.contains("4096"), "{err}");
}

/// `spillway ARGS` with `env` as its only settings layers: the `SPILLWAY_*` and local-rank
/// variables of the test's own environment are removed first.
fn spillway_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_spillway"));
    for (var, _) in std::env::vars_os() {
        let name = var.to_string_lossy();
        let rank = ["LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"].contains(&name.as_ref());
        if rank || (name.starts_with("SPILLWAY_") && name != "SPILLWAY_LOG") {
            command.env_remove(&var);
        }
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("the spillway binary runs")
}

/// A 4 MiB write from host memory to an anonymous file in `dir`, with `extra` flags and
/// `env`: its one JSON object.
fn small_write(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let dir = dir.to_str().unwrap();
    let args = [
        &[
            "bench", "--mem", "host", "--size", "4MiB", "--op", "write", "--json", "--path", dir,
        ],
        extra,
    ]
    .concat();
    let out = spillway_with_env(&args, env);
    assert!(out.status.success(), "{args:?} {env:?}: {}", stderr(&out));
    serde_json::from_str(stdout(&out).trim()).expect("one JSON object")
}

/// The settings a report says came from the environment or the file, as
/// "setting=value from source".
fn taken(report: &serde_json::Value) -> Vec<String> {
    let taken = report["from_env_or_file"]
        .as_array()
        .expect("from_env_or_file is a list");
    taken
        .iter()
        .map(|t| {
            format!(
                "{}={} from {}",
                t["setting"].as_str().unwrap(),
                t["value"].as_str().unwrap(),
                t["source"].as_str().unwrap()
            )
        })
        .collect()
}

fn notes(report: &serde_json::Value) -> Vec<&str> {
    report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect()
}

#[test]
fn an_environment_variable_sets_a_flag_left_out_and_the_report_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let clean = small_write(dir.path(), &[], &[]);
    assert_eq!(clean["queue_depth"], 16, "{clean}");
    assert!(taken(&clean).is_empty(), "{clean}");

    let r = small_write(dir.path(), &[], &[("SPILLWAY_QUEUE_DEPTH", "4")]);
    assert_eq!(r["queue_depth"], 4, "{r}");
    assert_eq!(taken(&r), ["queue_depth=4 from SPILLWAY_QUEUE_DEPTH"]);
    assert!(
        notes(&r).contains(&"queue_depth=4 from SPILLWAY_QUEUE_DEPTH"),
        "{r}"
    );

    // The table says it too.
    let path = dir.path().to_str().unwrap();
    let args = [
        "bench", "--mem", "host", "--size", "4MiB", "--op", "write", "--path", path,
    ];
    let out = spillway_with_env(&args, &[("SPILLWAY_QUEUE_DEPTH", "4")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("note: queue_depth=4 from SPILLWAY_QUEUE_DEPTH"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_flag_given_overrides_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("SPILLWAY_QUEUE_DEPTH", "4"), ("SPILLWAY_THREADS", "2")];
    let r = small_write(dir.path(), &["--qd", "8"], &env);
    assert_eq!((&r["queue_depth"], &r["threads"]), (&8.into(), &2.into()), "{r}");
    assert_eq!(taken(&r), ["threads=2 from SPILLWAY_THREADS"]);
    // --mem host is the device: a GPU named by the environment is not used (nor needed).
    let r = small_write(dir.path(), &[], &[("SPILLWAY_DEVICE", "cuda:0")]);
    assert_eq!(r["memory"], "host", "{r}");
    assert!(taken(&r).is_empty(), "{r}");
}

#[test]
fn the_settings_file_named_by_spillway_config_is_read_under_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spillway.toml");
    std::fs::write(&file, "queue_depth = 3\nthreads = 2\nstripe_bytes = \"512KiB\"\n").unwrap();
    let config = file.to_str().unwrap();
    let r = small_write(
        dir.path(),
        &[],
        &[("SPILLWAY_CONFIG", config), ("SPILLWAY_QUEUE_DEPTH", "5")],
    );
    assert_eq!((&r["queue_depth"], &r["threads"]), (&5.into(), &2.into()), "{r}");
    assert_eq!(
        taken(&r),
        [
            "queue_depth=5 from SPILLWAY_QUEUE_DEPTH".to_string(),
            format!("threads=2 from file {config}"),
            format!("stripe_bytes=512KiB from file {config}"),
        ]
    );
}

#[test]
fn a_bad_setting_is_refused_with_status_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let args = ["bench", "--mem", "host", "--size", "4MiB", "--path", path];
    let out = spillway_with_env(&args, &[("SPILLWAY_QUEUE_DEPTH", "lots")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("SPILLWAY_QUEUE_DEPTH") && err.contains("queue_depth takes"),
        "{err}"
    );

    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "queue_depth = 0\n").unwrap();
    let out = spillway_with_env(&args, &[("SPILLWAY_CONFIG", file.to_str().unwrap())]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("bad.toml: queue_depth = 0"),
        "{}",
        stderr(&out)
    );

    // A value past a setting's cap: refused by the settings table, naming the variable.
    let out = spillway_with_env(&args, &[("SPILLWAY_THREADS", "1000")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("SPILLWAY_THREADS=\"1000\": 1000 is too large: at most 256"),
        "{err}"
    );
}

#[test]
fn rank_paths_give_the_local_rank_its_path_when_no_path_is_given() {
    let ranks = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let list = format!("0={};1={}", ranks[0].path().display(), ranks[1].path().display());
    let args = [
        "bench", "--mem", "host", "--size", "4MiB", "--op", "write", "--json",
    ];
    let env = [("SPILLWAY_RANK_PATHS", list.as_str()), ("LOCAL_RANK", "1")];
    let out = spillway_with_env(&args, &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(
        r["path"],
        format!("<anonymous in {}>", ranks[1].path().display()),
        "{r}"
    );
    assert!(
        notes(&r).iter().any(|n| n.contains("local rank 1 (LOCAL_RANK)")),
        "{r}"
    );
    assert_eq!(taken(&r), [format!("rank_paths={list} from SPILLWAY_RANK_PATHS")]);

    // --path wins; a rank the list lacks is refused like any bad setting.
    let r = small_write(ranks[0].path(), &[], &env);
    assert_eq!(
        r["path"],
        format!("<anonymous in {}>", ranks[0].path().display()),
        "{r}"
    );
    let out = spillway_with_env(&args, &[env[0], ("LOCAL_RANK", "2")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no entry for local rank 2"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_tensors_engine_takes_settings_that_have_no_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let args = [
        "bench",
        "--workload",
        "tensors",
        "--mem",
        "host",
        "--tensors",
        "300",
        "--max-size",
        "64K",
        "--staging",
        "32M",
        "--json",
        "--path",
        path,
    ];
    let env = [
        ("SPILLWAY_ALIGNMENT", "8KiB"),
        ("SPILLWAY_DIRECT_WRITE_BYTES", "8MiB"),
        ("SPILLWAY_STAGING_BYTES", "64MiB"),
        // Read by the seq workload's flags too, but this run's --staging is a flag: it wins.
        ("SPILLWAY_QUEUE_DEPTH", "8"),
    ];
    let out = spillway_with_env(&args, &env);
    let r = tensors_json(&out);
    assert_eq!(r["verified"], true, "{r}");
    let engine = &r["engine"];
    assert_eq!(engine["alignment"], 8192, "{r}");
    assert_eq!(engine["direct_write_bytes"], 8 << 20, "{r}");
    assert_eq!(engine["staging_bytes"], 32 << 20, "{r}");
    // Left to its default, prefetch still shrinks to fit the smaller staging.
    assert_eq!(engine["prefetch_bytes"], 16 << 20, "{r}");
    assert_eq!(r["queue_depth"], 8, "{r}");
    assert_eq!(
        taken(&r),
        [
            "queue_depth=8 from SPILLWAY_QUEUE_DEPTH",
            "alignment=8KiB from SPILLWAY_ALIGNMENT",
            "direct_write_bytes=8MiB from SPILLWAY_DIRECT_WRITE_BYTES",
        ]
    );
}

/// `spillway bench --mem host --size 4MiB --path DIR EXTRA`, with no settings from the test's
/// environment.
fn faulty_bench(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = dir.to_str().unwrap();
    let args = [
        &["bench", "--mem", "host", "--size", "4MiB", "--path", dir],
        extra,
    ]
    .concat();
    spillway_with_env(&args, env)
}

#[test]
fn an_injected_write_error_ends_the_run_naming_the_op_and_the_faults() {
    let dir = tempfile::tempdir().unwrap();
    let out = faulty_bench(dir.path(), &["--faults", "write_error=1"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("error: bench op write failed with fault injection on (faults=write_error=1;")
            && err.contains("write errors injected")
            && err.contains("injected fault: write of"),
        "{err}"
    );

    // The read of a run whose writes work, from the environment this time.
    let out = faulty_bench(
        dir.path(),
        &["--op", "write,read"],
        &[("SPILLWAY_FAULTS", "read_error=1")],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("bench op read failed with fault injection on (faults=read_error=1;")
            && err.contains("faults=read_error=1 from SPILLWAY_FAULTS"),
        "{err}"
    );

    // ENOSPC after 2 MiB of the 4 MiB written.
    let out = faulty_bench(dir.path(), &["--faults", "enospc_after=2MiB"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("faults=enospc_after=2MiB") && err.contains("no space left"),
        "{err}"
    );
}

#[test]
fn short_counts_are_resubmitted_and_the_round_trip_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let out = faulty_bench(
        dir.path(),
        &[
            "--faults",
            "short=0.5",
            "--block",
            "256K",
            "--op",
            "write,randread",
            "--verify",
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect();
    assert_eq!(lines.len(), 2);
    for r in &lines {
        assert_eq!(
            (&r["verified"], &r["mismatched_bytes"]),
            (&true.into(), &0.into()),
            "{r}"
        );
        assert_eq!(r["backend"], "uring+faults", "{r}");
        assert_eq!(r["faults"]["plan"], "short=0.5", "{r}");
        let stats = &r["faults"]["stats"];
        assert!(stats["injected_short"].as_u64().unwrap() > 0, "{r}");
        // Every short count had the rest of its request submitted again.
        assert!(
            stats["requests"].as_u64().unwrap() >= 16 + stats["injected_short"].as_u64().unwrap(),
            "{r}"
        );
        assert!(
            notes(r).contains(&"fault injection on: short=0.5 (for testing resilience only: requests fail, come up short or complete late on purpose)"),
            "{r}"
        );
    }

    // Without --faults the report says null.
    let r = small_write(dir.path(), &[], &[]);
    assert!(r["faults"].is_null(), "{r}");
}

#[test]
fn a_bad_fault_plan_is_refused_with_status_2_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let out = faulty_bench(dir.path(), &[], &[("SPILLWAY_FAULTS", "bogus=1")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("environment variable SPILLWAY_FAULTS=\"bogus=1\"")
            && err.contains("unknown key \"bogus\"")
            && err.contains("faults takes"),
        "{err}"
    );
    let out = faulty_bench(dir.path(), &["--faults", "short=2"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--faults") && stderr(&out).contains("probability"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn tensors_whose_writes_fail_stay_in_memory_and_are_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let run = |faults: &str, extra: &[&str]| {
        let args = [
            &[
                "bench",
                "--workload",
                "tensors",
                "--mem",
                "host",
                "--tensors",
                "300",
                "--max-size",
                "64K",
                "--staging",
                "32M",
                "--json",
                "--path",
                path,
                "--faults",
                faults,
            ],
            extra,
        ]
        .concat();
        tensors_json(&spillway_with_env(&args, &[]))
    };
    // One extent per tensor: 300 writes, a fifth of whose requests fail.
    let r = run("write_error=0.2,seed=3", &["--no-pack"]);
    assert_eq!(
        (&r["verified"], &r["mismatched_bytes"]),
        (&true.into(), &0.into()),
        "{r}"
    );
    assert_eq!(r["faults"]["plan"], "write_error=0.2,seed=3", "{r}");
    let injected = r["faults"]["stats"]["injected_write_errors"].as_u64().unwrap();
    assert!(injected > 0, "{r}");
    let s = &r["engine_stats"];
    // Each injected error is retried by the engine or fails its write for good (its tensor
    // stays in memory and is forwarded); an engine without retries counts no write_retries.
    let retries = s.get("write_retries").and_then(|v| v.as_u64()).unwrap_or(0);
    let errors = s["write_errors"].as_u64().unwrap();
    assert!((1..=injected).contains(&(retries + errors)), "{r}");
    assert_eq!(s["forwarded_fetches"].as_u64().unwrap() > 0, errors > 0, "{r}");
    assert!(
        s.get("read_errors").is_some() && s.get("resident_tensors").is_some(),
        "{r}"
    );

    // Every write fails: every tensor stays in memory, every fetch is forwarded.
    let r = run("write_error=1", &[]);
    assert_eq!(r["verified"], true, "{r}");
    let s = &r["engine_stats"];
    assert!(s["write_errors"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(s["forwarded_fetches"], s["fetches"], "{r}");
    assert_eq!(s["bytes_written"], 0, "{r}");
    assert!(
        notes(&r)
            .iter()
            .any(|n| n.starts_with("300 tensors stayed in their own memory")),
        "{r}"
    );
}

#[test]
fn a_file_another_process_holds_is_refused_naming_it() {
    // This test process holds the file as an engine would (the library's open takes the
    // lock); the bench, another process, must refuse it rather than share its offsets.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("same.bin");
    let held = spillway_runtime::open_target(&spillway_runtime::Target::new(&path).reserve(8 << 20)).unwrap();
    let pid = std::process::id();
    let p = path.to_str().unwrap();
    let tensors = [
        "--workload",
        "tensors",
        "--tensors",
        "50",
        "--max-size",
        "64K",
        "--staging",
        "32M",
    ];
    for (workload, flags) in [("seq", &["--size", "8M"][..]), ("tensors", &tensors[..])] {
        let out = spillway(&[&["bench", "--mem", "host", "--path", p], flags].concat());
        assert_eq!(out.status.code(), Some(2), "{workload}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "{p} is in use by another spillway engine (process {pid})"
            )) && err.contains("give each engine its own file, or use a directory"),
            "{workload}: {err}"
        );
    }
    drop(held);
    let out = spillway(&[
        "bench", "--mem", "host", "--size", "8M", "--op", "write", "--path", p,
    ]);
    assert!(out.status.success(), "free once closed: {}", stderr(&out));
}

#[test]
fn one_file_twice_as_path_is_refused_with_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.bin");
    let linked = dir.path().join("linked");
    std::os::unix::fs::symlink(dir.path(), &linked).unwrap();
    let dotted = dir.path().join(".").join("x.bin");
    let via_link = linked.join("x.bin");
    for exists in [false, true] {
        if exists {
            std::fs::write(&f, b"").unwrap();
            std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        }
        for second in [&f, &dotted, &via_link] {
            let (a, b) = (f.to_str().unwrap(), second.to_str().unwrap());
            let out = spillway(&[
                "bench", "--mem", "host", "--size", "8M", "--verify", "--path", a, "--path", b,
            ]);
            assert_eq!(out.status.code(), Some(2), "{a} {b}: {}", stderr(&out));
            let err = stderr(&out);
            let said = if a == b {
                format!("{a} is listed twice, the same file both times")
            } else {
                format!("{b} and {a} are the same file")
            };
            assert!(
                err.contains(&said) && err.contains("list each file once"),
                "{err}"
            );
        }
    }
}

#[test]
fn a_tensors_run_through_a_host_tier_smaller_than_its_data_spills_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    // 300 tensors up to 256 KiB (about 40 MiB) in 1 MiB packed extents through a 4 MiB host
    // tier: it fills, spills to the file, and every tensor reads back exact from one tier or
    // the other. (A write larger than the whole tier goes straight to storage.)
    let out = host_bench(
        dir.path(),
        &[
            "--workload",
            "tensors",
            "--tensors",
            "300",
            "--staging",
            "32M",
            "--pack-extent",
            "1M",
            "--host-tier",
            "4M",
            "--verify",
            "--json",
        ],
    );
    let v = tensors_json(&out);
    assert_eq!(v["verified"], true);
    let tier = &v["host_tier"];
    assert_eq!(tier["capacity"], 4 << 20, "{tier}");
    assert!(tier["bytes_in"].as_u64().unwrap() > 0, "{tier}");
    assert!(tier["bytes_spilled"].as_u64().unwrap() > 0, "{tier}");
    let read = tier["bytes_read_arena"].as_u64().unwrap() + tier["bytes_read_storage"].as_u64().unwrap();
    assert!(read > 0, "{tier}");
    // Without the flag there is no host tier.
    let plain = tensors_json(&tensors_bench(dir.path(), &["--json"]));
    assert!(plain["host_tier"].is_null());
}

#[test]
fn resource_flags_and_variables_past_their_caps_exit_2_naming_them() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 6] = [
        (
            &["--threads", "1000"],
            &[],
            "--threads 1000: 1000 is too large: at most 256",
        ),
        (
            &["--qd", "100000"],
            &[],
            "--qd 100000: 100000 is too large: at most 4096",
        ),
        (
            &["--pinned", "2GiB"],
            &[],
            "--pinned 2147483648: 2147483648 is too large: at most 1GiB",
        ),
        (
            &[],
            &[("SPILLWAY_QUEUE_DEPTH", "100000")],
            "SPILLWAY_QUEUE_DEPTH=\"100000\": 100000 is too large",
        ),
        (
            &[],
            &[("SPILLWAY_THREADS", "2147483648")],
            "SPILLWAY_THREADS=\"2147483648\"",
        ),
        (
            &[],
            &[("SPILLWAY_PACK_FLUSH_DELAY_MS", "1e12")],
            "too long: at most 10000",
        ),
    ];
    for (flags, env, expected) in cases {
        let args = [&["bench", "--mem", "host", "--size", "1M"], flags].concat();
        let out = spillway_with_env(&args, env);
        assert_eq!(out.status.code(), Some(2), "{flags:?} {env:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expected),
            "{flags:?} {env:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn rings_the_host_cannot_hold_are_refused_before_any_is_allocated() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (a, b) = (dirs[0].path().to_str().unwrap(), dirs[1].path().to_str().unwrap());
    // 2 paths × 256 rings × 64 MiB of pinned staging: 32 GiB, killed by the OOM killer before.
    let mem = spillway::fs::host_memory().expect("/proc/meminfo");
    if mem.available > 30 << 30 {
        eprintln!("the host has more than 30 GiB available: the 32 GiB case is not refused here; not run");
        return;
    }
    let out = spillway(&[
        "bench",
        "--mem",
        "host",
        "--size",
        "8M",
        "--path",
        a,
        "--path",
        b,
        "--threads",
        "256",
        "--qd",
        "4096",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("these settings need")
            && err.contains("threads=256")
            && err.contains("queue_depth=4096")
            && err.contains("2 paths")
            && err.contains("available"),
        "{err}"
    );
}

#[test]
fn more_paths_than_the_maximum_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<String> = (0..65)
        .map(|i| dir.path().join(format!("f{i}")).display().to_string())
        .collect();
    let mut args = vec!["bench", "--mem", "host", "--size", "1M"];
    for p in &paths {
        args.extend(["--path", p.as_str()]);
    }
    let out = spillway(&args);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("65 storage paths given: at most 64"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing created"
    );
}

#[test]
fn a_settings_file_that_is_a_device_or_a_fifo_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (file, kind) in [
        ("/dev/zero", "a character device"),
        (fifo.to_str().unwrap(), "a FIFO"),
    ] {
        let start = std::time::Instant::now();
        let out = spillway_with_env(
            &["bench", "--mem", "host", "--size", "1M"],
            &[("SPILLWAY_CONFIG", file)],
        );
        assert_eq!(out.status.code(), Some(2), "{file}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("SPILLWAY_CONFIG") && err.contains(&format!("{kind}, not a regular file")),
            "{err}"
        );
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{file} took {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn a_file_the_bench_made_is_removed_when_its_space_cannot_be_reserved() {
    let test = "a_file_the_bench_made_is_removed_when_its_space_cannot_be_reserved";
    let Some(mnt) = SmallTmpfs::mount(test, "size=64m,mode=0700") else {
        return;
    };
    let path = format!("{}/b.bin", mnt.path());
    let out = spillway(&["bench", "--mem", "host", "--size", "128MiB", "--path", &path]);
    let left = std::path::Path::new(&path).exists();
    drop(mnt);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("space"), "{}", stderr(&out));
    assert!(!left, "{path} was left behind");
}

#[test]
fn storage_paths_that_are_no_storage_are_refused_naming_why() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("{}/nonexist/", dir.path().display());
    let cases: [(&str, &str); 3] = [
        (&missing, "this directory does not exist: create it"),
        ("/proc", "is on procfs"),
        ("/proc/self/mem", "is on procfs"),
    ];
    for (path, expected) in cases {
        let out = spillway(&["bench", "--mem", "host", "--size", "1M", "--path", path]);
        assert!(!out.status.success(), "{path}");
        let err = stderr(&out);
        assert!(
            err.contains(expected) && !err.contains("panicked"),
            "{path}: {err}"
        );
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing made");
}

#[test]
fn a_directory_path_is_spread_over_the_files_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = spillway(&[
        "bench",
        "--mem",
        "host",
        "--backend",
        "uring",
        "--path",
        d,
        "--spread",
        "3",
        "--size",
        "8M",
        "--verify",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).lines().next().unwrap()).unwrap();
    let notes = v["notes"].to_string();
    assert!(notes.contains("spread over 3 anonymous files"), "{notes}");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing left behind"
    );
    let err = bench_fails(&["--path", d, "--spread", "65", "--size", "1M"]);
    assert!(err.contains("spread") && err.contains("64"), "{err}");
}

/// `spillway bench --sweep --mem host --size 2M` on an anonymous file in `dir`, with `extra`
/// flags and `env` as the only settings layers.
fn sweep(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = dir.to_str().unwrap();
    let args = [
        &["bench", "--sweep", "--mem", "host", "--size", "2M", "--path", dir],
        extra,
    ]
    .concat();
    spillway_with_env(&args, env)
}

/// The one JSON object a sweep with `--json` prints.
fn sweep_json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", stderr(out));
    let text = stdout(out);
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    serde_json::from_str(&text).expect("one JSON object")
}

#[test]
fn sweep_json_has_a_point_per_cell_a_result_per_op_and_the_best_of_each_op() {
    let dir = tempfile::tempdir().unwrap();
    let out = sweep(
        dir.path(),
        &[
            "--blocks",
            "64K,1M",
            "--qds",
            "1,4",
            "--thread-counts",
            "1",
            "--json",
        ],
        &[],
    );
    let v = sweep_json(&out);
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["best", "points", "sweep"]);
    let s = &v["sweep"];
    assert_eq!(s["blocks"], serde_json::json!([65536, 1048576]));
    assert_eq!(s["qds"], serde_json::json!([1, 4]));
    assert_eq!(s["threads"], serde_json::json!([1]));
    assert_eq!(s["size"], 2 << 20);
    assert_eq!(s["ops"], serde_json::json!(["write", "read"]));
    assert_eq!(
        (s["memory"].as_str(), s["backend"].as_str()),
        (Some("host"), Some("uring"))
    );
    assert!(s["path"].as_str().unwrap().contains("anonymous"), "{s}");

    let points = v["points"].as_array().unwrap();
    let cells: Vec<(u64, u64, u64)> = points
        .iter()
        .map(|p| {
            (
                p["block"].as_u64().unwrap(),
                p["qd"].as_u64().unwrap(),
                p["threads"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        cells,
        [(65536, 1, 1), (65536, 4, 1), (1048576, 1, 1), (1048576, 4, 1)]
    );
    for p in points {
        let results = p["results"].as_array().unwrap();
        let ops: Vec<&str> = results.iter().map(|r| r["op"].as_str().unwrap()).collect();
        assert_eq!(ops, ["write", "read"], "{p}");
        for r in results {
            // The objects a plain `bench --json` prints, at the point's values.
            assert_eq!(r["block_size"], p["block"]);
            assert_eq!(r["queue_depth"], p["qd"]);
            assert_eq!(r["threads"], p["threads"]);
            assert_eq!(r["bytes"], 2 << 20);
            for key in [
                "backend",
                "throughput_gbps",
                "iops",
                "latency_us",
                "notes",
                "from_env_or_file",
            ] {
                assert!(r.get(key).is_some(), "{key} missing from {r}");
            }
        }
    }

    let best = v["best"].as_object().unwrap();
    assert_eq!(best.len(), 2);
    assert!(
        stdout(&out).contains(r#""best":{"write":{"block":"#),
        "best in the order of the ops"
    );
    for (op, b) in best {
        let (max, at) = points
            .iter()
            .flat_map(|p| p["results"].as_array().unwrap().iter().map(move |r| (p, r)))
            .filter(|(_, r)| r["op"] == op.as_str())
            .map(|(p, r)| (r["throughput_gbps"].as_f64().unwrap(), p))
            .fold(
                (f64::MIN, None),
                |(m, at), (g, p)| if g > m { (g, Some(p)) } else { (m, at) },
            );
        let at = at.unwrap();
        assert_eq!(b["throughput_gbps"].as_f64(), Some(max), "{op}: {b}");
        for key in ["block", "qd", "threads"] {
            assert_eq!(b[key], at[key], "{op}: {b}");
        }
        assert!(b["iops"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn a_single_flag_given_fixes_its_dimension_of_the_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let v = sweep_json(&sweep(
        dir.path(),
        &[
            "--threads",
            "2",
            "--qd",
            "4",
            "--blocks",
            "64K,1M",
            "--op",
            "write",
            "--json",
        ],
        &[],
    ));
    assert_eq!(v["sweep"]["threads"], serde_json::json!([2]));
    assert_eq!(v["sweep"]["qds"], serde_json::json!([4]));
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    for p in points {
        assert_eq!(
            (p["qd"].as_u64(), p["threads"].as_u64()),
            (Some(4), Some(2)),
            "{p}"
        );
        assert_eq!(p["results"][0]["threads"], 2);
    }
    // Left out, a dimension takes its default list (block sizes up to --size): here 64 KiB
    // and 1 MiB.
    let v = sweep_json(&sweep(
        dir.path(),
        &["--qd", "1", "--threads", "1", "--op", "write", "--json"],
        &[],
    ));
    assert_eq!(v["sweep"]["blocks"], serde_json::json!([65536, 1048576]));
    // The sweep's values win over the environment's, which its points do not list as taken.
    let v = sweep_json(&sweep(
        dir.path(),
        &[
            "--blocks",
            "64K",
            "--qds",
            "2",
            "--thread-counts",
            "1",
            "--op",
            "write",
            "--json",
        ],
        &[("SPILLWAY_QUEUE_DEPTH", "8"), ("SPILLWAY_THREADS", "3")],
    ));
    let r = &v["points"][0]["results"][0];
    assert_eq!(
        (r["queue_depth"].as_u64(), r["threads"].as_u64()),
        (Some(2), Some(1)),
        "{r}"
    );
    assert_eq!(r["from_env_or_file"], serde_json::json!([]), "{r}");
    let notes = r["notes"].to_string();
    assert!(
        notes.contains("queue_depth=8 from SPILLWAY_QUEUE_DEPTH not used: the sweep sets queue_depth"),
        "{notes}"
    );
}

#[test]
fn sweep_lists_without_sweep_and_bad_list_values_exit_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out_file = dir.path().join("sweep.json");
    let out_file = out_file.to_str().unwrap();
    let nine = "1,2,3,4,5,6,7,8,9";
    type Case<'a> = (&'a [&'a str], &'a [&'a str]);
    let cases: [Case; 11] = [
        (
            &["--blocks", "64K,1M"],
            &["--blocks applies to --sweep only", "add --sweep"],
        ),
        (&["--qds", "1,4"], &["--qds applies to --sweep only"]),
        (
            &["--thread-counts", "1", "--out", out_file],
            &["--thread-counts, --out apply to --sweep only"],
        ),
        (
            &["--sweep", "--qds", "4,0"],
            &["--qds: the value 0 is refused", "not a positive integer"],
        ),
        (
            &["--sweep", "--thread-counts", "1,1000"],
            &["--thread-counts: the value 1000 is refused", "at most 256"],
        ),
        (
            &["--sweep", "--blocks", "64K,8M"],
            &["--blocks: the value 8 MiB is refused", "larger than --size"],
        ),
        (
            &["--sweep", "--blocks", "64K,64K"],
            &["--blocks lists 64 KiB twice"],
        ),
        (&["--sweep", "--blocks", "64K,lots"], &["--blocks"]),
        (&["--sweep", "--qds", "1,4", "--qd", "8"], &["--qds", "--qd"]),
        (
            &[
                "--sweep",
                "--blocks",
                "4K,8K,16K,32K,64K,128K,256K,512K",
                "--qds",
                nine,
                "--thread-counts",
                nine,
            ],
            &["648 points", "more than 512"],
        ),
        (
            &["--sweep", "--size", "16K"],
            &["smaller than every default block size", "--blocks"],
        ),
    ];
    for (flags, expected) in cases {
        let size = if flags.contains(&"--size") {
            &[][..]
        } else {
            &["--size", "2M"][..]
        };
        let args = [&["bench", "--mem", "host", "--path", d], size, flags].concat();
        let out = spillway_with_env(&args, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.starts_with("error: "), "{flags:?}: {err}");
        for e in expected {
            assert!(err.contains(e), "{flags:?}: {e:?} not in {err}");
        }
        assert!(stdout(&out).is_empty(), "{flags:?}: nothing run");
    }
    assert!(!Path::new(out_file).exists());
}

#[test]
fn sweep_out_writes_the_json_printed_and_refuses_a_symbolic_link() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sweep.json");
    let f = file.to_str().unwrap();
    let grid = ["--blocks", "64K", "--qds", "1,2", "--thread-counts", "1"];
    let out = sweep(dir.path(), &[&grid[..], &["--json", "--out", f]].concat(), &[]);
    let printed = sweep_json(&out);
    let written = std::fs::read(&file).unwrap();
    assert_eq!(written, out.stdout, "--out holds what --json printed");
    assert_eq!(printed["points"].as_array().unwrap().len(), 2);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o7777, 0o600);
    // With the table, too.
    std::fs::remove_file(&file).unwrap();
    let out = sweep(dir.path(), &[&grid[..], &["--out", f]].concat(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("best write:"), "{}", stdout(&out));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(v["sweep"]["qds"], serde_json::json!([1, 2]));

    // A symbolic link at the name is refused before anything runs, its file left alone.
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let out = sweep(
        dir.path(),
        &[&grid[..], &["--out", link.to_str().unwrap()]].concat(),
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "creating the sweep file {} (check --out): {} is a symbolic link",
            link.display(),
            link.display()
        )),
        "{err}"
    );
    assert!(stdout(&out).is_empty());
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn a_sweep_of_the_tensors_workload_is_refused() {
    let out = spillway_with_env(
        &["bench", "--sweep", "--workload", "tensors", "--mem", "host"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("--sweep applies to --workload seq only, but the workload is tensors"),
        "{err}"
    );
}

#[test]
fn a_failing_sweep_point_stops_the_sweep_naming_the_point() {
    let dir = tempfile::tempdir().unwrap();
    let out = sweep(
        dir.path(),
        &[
            "--blocks",
            "64K,1M",
            "--qds",
            "1",
            "--threads",
            "1",
            "--faults",
            "write_error=1",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: sweep point 1/2 (block 64 KiB, qd 1, threads 1): bench op write failed"),
        "{err}"
    );
    assert!(stdout(&out).is_empty(), "no table: {}", stdout(&out));
}

#[test]
fn the_sweep_table_has_a_row_per_point_and_op_and_each_point_shows_on_a_terminal_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let args = [
        "bench",
        "--sweep",
        "--mem",
        "host",
        "--size",
        "2M",
        "--path",
        d,
        "--blocks",
        "64K",
        "--qds",
        "1",
        "--thread-counts",
        "1,2",
    ];
    let out = spillway_with_env(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("point 1/2"),
        "a point line on a pipe: {}",
        stderr(&out)
    );
    let table = stdout(&out);
    let header = table
        .lines()
        .find(|l| l.contains("GB/s"))
        .unwrap_or_else(|| panic!("no header: {table}"));
    let columns: Vec<&str> = header
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        columns.join("|").replace(' ', "|"),
        "block|qd|threads|op|GB/s|IOPS|p50|us|p99|us",
        "{header}"
    );
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.trim_start().starts_with("64 KiB"))
        .collect();
    assert_eq!(rows.len(), 4, "2 points × 2 ops: {table}");
    assert!(
        table.contains("best write:") && table.contains("best read:"),
        "{table}"
    );

    let (ok, terminal) = on_a_terminal(&args);
    assert!(ok, "{terminal}");
    for i in 1..=2 {
        let line = format!("point {i}/2: block 64 KiB qd 1 threads {i}");
        assert!(
            terminal.contains(&line),
            "no {line:?} on a terminal: {terminal:?}"
        );
    }
    let (ok, json) = on_a_terminal(&[&args[..], &["--json"]].concat());
    assert!(ok && !json.contains("point 1/2"), "{json:?}");
}
