//! Errors (reads past the end, a full filesystem, closed targets) and the life cycle of
//! requests (flush, close and drop with requests pending).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::{backend, open_direct, run, small_config, submit, MemKind, Memory, ALL_KINDS};
use spillway_runtime::{Backend, DirectIo, Error, IoOp, IoRequest, Target};
use spillway_uring::UringConfig;

#[test]
fn reads_past_the_end_fail_with_short_io() {
    let backend = backend(UringConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.dat");
    let mut contents = vec![0u8; 10_000];
    spillway_runtime::pattern::fill(&mut contents, 3, 0);
    std::fs::write(&path, &contents).unwrap();
    // Offload files must be private to be used.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (target, info) = backend
        .open(&Target::new(&path).direct(DirectIo::Required))
        .unwrap();
    assert_eq!(info.size, 10_000);

    for kind in ALL_KINDS {
        // Ending exactly at the (unaligned) end of the file is fine.
        let tail = Memory::new(kind, 10_000 - 4097);
        assert_eq!(
            run(&backend, target, IoOp::Read, 4097, &tail).unwrap(),
            10_000 - 4097
        );
        tail.assert_pattern(3, 4097, &format!("{kind:?}: the file's last bytes"));

        // Past the end: the error says how many bytes there were.
        let mem = Memory::new(kind, 20_000);
        match run(&backend, target, IoOp::Read, 0, &mem) {
            Err(Error::ShortIo {
                op,
                path: p,
                offset,
                done,
                wanted,
            }) => {
                assert_eq!(
                    (op, offset, done, wanted),
                    ("read", 0, 10_000, 20_000),
                    "{kind:?}"
                );
                assert_eq!(p, path);
            }
            other => panic!("{kind:?}: expected a short read, got {other:?}"),
        }
        // Entirely past the end, aligned and not.
        for (offset, len) in [(1 << 20, 4096), (10_000, 1), (12_288, 5000)] {
            let mem = Memory::new(kind, len);
            let err = run(&backend, target, IoOp::Read, offset, &mem).unwrap_err();
            assert!(
                matches!(err, Error::ShortIo { done: 0, .. }),
                "{kind:?}, {len} bytes at {offset}: {err}"
            );
        }
    }
}

/// A 1 MiB tmpfs mounted for the test and unmounted when dropped (also on failure).
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    fn mount() -> Option<SmallTmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: mounting a tmpfs needs root; the no-space test did not run");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=1m",
                "spillway-test",
                dir.path().to_str().unwrap(),
            ])
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a 1 MiB tmpfs on {} failed ({status}); the no-space test cannot run",
            dir.path().display()
        );
        Some(SmallTmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let status = Command::new("umount").arg(self.dir.path()).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("unmounting {} failed: {status:?}", self.dir.path().display());
        }
    }
}

#[test]
fn a_full_filesystem_fails_with_no_space() {
    let Some(tmpfs) = SmallTmpfs::mount() else { return };
    let backend = backend(small_config());
    let path: PathBuf = tmpfs.path().join("full.dat");
    let (target, _) = backend.open(&Target::new(&path)).unwrap();
    for kind in [MemKind::HostAligned, MemKind::Device] {
        let mem = Memory::with_pattern(kind, 2 << 20, 1, 0);
        match run(&backend, target, IoOp::Write, 0, &mem) {
            Err(Error::NoSpace {
                path: p,
                offset,
                needed,
            }) => {
                assert_eq!(p, path);
                assert_eq!((offset, needed), (0, 2 << 20));
            }
            other => panic!("{kind:?}: expected no space, got {other:?}"),
        }
    }
    backend.close(target).unwrap();
    drop(backend);
}

#[test]
fn flush_waits_for_earlier_requests() {
    let backend = backend(small_config());
    let dir = tempfile::tempdir().unwrap();
    let target = open_direct(&backend, &dir, "flush.dat");
    let requests: Vec<_> = (0..16u64)
        .map(|i| {
            let mem = Memory::with_pattern(ALL_KINDS[i as usize % 3], 100_000, i, i * 200_000 + 7);
            let ticket = submit(&backend, target, IoOp::Write, i * 200_000 + 7, &mem);
            (mem, ticket)
        })
        .collect();
    backend.flush(target).unwrap();
    assert!(
        requests.iter().all(|(_, t)| t.is_done()),
        "flush returned before earlier writes completed"
    );
    for (_, ticket) in requests {
        assert_eq!(ticket.wait().unwrap(), 100_000);
    }
}

#[test]
fn close_waits_for_pending_requests_and_then_refuses_more() {
    let backend = backend(small_config());
    let dir = tempfile::tempdir().unwrap();
    let target = open_direct(&backend, &dir, "close.dat");
    let requests: Vec<_> = (0..16u64)
        .map(|i| {
            let mem = Memory::with_pattern(ALL_KINDS[i as usize % 3], 70_000, i, i * 100_000 + 1);
            let ticket = submit(&backend, target, IoOp::Write, i * 100_000 + 1, &mem);
            (mem, ticket)
        })
        .collect();
    backend.close(target).unwrap();
    assert!(
        requests.iter().all(|(_, t)| t.is_done()),
        "close returned with requests pending"
    );
    for (_, ticket) in requests {
        assert_eq!(ticket.wait().unwrap(), 70_000);
    }
    let mem = Memory::new(MemKind::HostAligned, 4096);
    // SAFETY: the request is refused before it could touch the memory.
    let refused = unsafe {
        backend.submit(IoRequest {
            target,
            op: IoOp::Read,
            offset: 0,
            mem: mem.mem_ref(),
        })
    };
    assert!(matches!(refused, Err(Error::InvalidArgument(_))), "{refused:?}");
    assert!(matches!(backend.flush(target), Err(Error::InvalidArgument(_))));
    assert!(matches!(backend.close(target), Err(Error::InvalidArgument(_))));
}

#[test]
fn dropping_the_backend_with_pending_requests_does_not_hang() {
    let backend = backend(small_config());
    let dir = tempfile::tempdir().unwrap();
    let target = open_direct(&backend, &dir, "drop.dat");
    let requests: Vec<_> = (0..32u64)
        .map(|i| {
            let mem = Memory::with_pattern(ALL_KINDS[i as usize % 3], (1 << 20) + 3, i, i << 21);
            let ticket = submit(&backend, target, IoOp::Write, (i << 21) + 1, &mem);
            (mem, ticket)
        })
        .collect();
    let (done, dropped) = mpsc::channel();
    std::thread::spawn(move || {
        drop(backend);
        let _ = done.send(());
    });
    dropped
        .recv_timeout(Duration::from_secs(30))
        .expect("dropping the backend hung");
    let mut abandoned = 0;
    for (mem, ticket) in requests {
        match ticket
            .wait_timeout(Duration::from_secs(5))
            .expect("a ticket never completed")
        {
            Ok(n) => assert_eq!(n, (1 << 20) + 3),
            Err(Error::Abandoned(_)) => abandoned += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
        drop(mem);
    }
    eprintln!("{abandoned} of 32 requests were abandoned by the shutdown");
}

#[test]
fn bad_requests_are_refused() {
    let backend = backend(small_config());
    let dir = tempfile::tempdir().unwrap();
    let target = open_direct(&backend, &dir, "bad.dat");
    let empty = Memory::new(MemKind::HostAligned, 0);
    let err = run(&backend, target, IoOp::Write, 0, &empty).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let mem = Memory::new(MemKind::HostAligned, 4096);
    let err = run(&backend, target, IoOp::Write, u64::MAX - 10, &mem).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

#[test]
fn a_missing_directory_is_reported() {
    let backend = backend(small_config());
    let err = backend
        .open(&Target::new("/nonexistent-spillway-dir/x.dat"))
        .unwrap_err();
    assert!(matches!(err, Error::Target { .. }), "{err}");
}
