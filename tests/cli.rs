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
    assert!(v.get("gpus").is_some() && v.get("io_uring").is_some());
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
    if !is_root() {
        eprintln!("full_filesystem_is_reported needs root to mount a small tmpfs; not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().to_str().unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt])
        .status()
        .unwrap();
    assert!(status.success(), "mounting a 1 MiB tmpfs at {mnt}");
    let path = format!("{mnt}/f.dat");
    let out = spillway(&["bench", "--mem", "host", "--size", "8M", "--path", &path]);
    let _ = Command::new("umount").arg(mnt).status();
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
        err.contains("libcufile") && err.contains("--backend uring"),
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
        (&["--size", "1M", "--qd", "0"], "--qd 0 is out of range"),
        (&["--size", "1M", "--threads", "0"], "--threads 0 is out of range"),
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
