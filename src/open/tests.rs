//! Opening an engine on host memory, and the handle bookkeeping of its calls.

use std::path::{Path, PathBuf};

use spillway_runtime::engine::{Handle, Region, TensorKey};
use spillway_runtime::{DirectIo, Error};

use super::{open_engine, open_for_rank, storage_capacity, EngineBuilder, OpenedEngine};
use crate::rank::LocalRank;
use crate::settings::Settings;

fn open(paths: &[PathBuf], capacity: Option<u64>) -> Result<OpenedEngine, Error> {
    open_engine(paths, capacity, &small_host_settings().resolve().unwrap())
}

/// Host memory and a small engine.
fn small_host_settings() -> Settings {
    let mut settings = Settings::default();
    for (name, value) in [
        ("device", "host"),
        ("staging_bytes", "8MiB"),
        ("prefetch_bytes", "4MiB"),
        ("pack_extent_bytes", "1MiB"),
        // One file per directory, whatever filesystem holds the test's temporary
        // directory (a tmpfs one would be spread over several).
        ("spread_files", "1"),
    ] {
        settings.set(name, value).unwrap();
    }
    settings
}

fn region(buf: &mut [u8]) -> Vec<Region> {
    vec![Region::new(buf.as_mut_ptr() as u64, buf.len() as u64)]
}

/// Offloads `src`, drains, reads it back, checks the bytes and releases the handle.
fn round_trip(e: &OpenedEngine, mut src: Vec<u8>) {
    let mut back = vec![0u8; src.len()];
    // SAFETY: `src` outlives the engine's use of it (released below), `back` is live and
    // idle; no stream.
    let h = unsafe { e.offload(TensorKey::new(1, 0), &region(&mut src), None) }.unwrap();
    e.engine.drain().unwrap();
    // SAFETY: as above.
    unsafe { e.fetch(h, &region(&mut back), None) }.unwrap();
    assert!(back == src, "the bytes read back differ from those written");
    e.release(h).unwrap();
}

#[test]
fn a_directory_gets_an_anonymous_file_of_the_given_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let e = open(&[dir.path().to_path_buf()], Some((1 << 20) + 100)).unwrap();
    assert!(e.info.anonymous);
    assert_eq!(e.info.capacity, 1 << 20, "rounded down to the alignment");
    assert_eq!(
        (e.info.device.as_str(), e.info.backend.as_str()),
        ("host", "uring")
    );
    assert!(e.gpu().is_none());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing is left behind"
    );
}

#[test]
fn bad_paths_and_capacities_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let msg = |r: Result<OpenedEngine, Error>| r.unwrap_err().to_string();
    assert!(msg(open(&[], None)).contains("no storage path given"));
    assert!(msg(open(&[PathBuf::new()], None)).contains("storage path is empty"));
    assert!(msg(open(&[dir.path().to_path_buf()], Some(100))).contains("below one 4096-byte unit"));
}

#[test]
fn handles_track_their_source_until_the_last_one_of_a_key_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let e = open(&[dir.path().to_path_buf()], Some(64 << 20)).unwrap();
    let mut src: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let key = TensorKey::new(7, 1);
    // SAFETY: `src` outlives the engine's use of it (released below), no stream.
    let (h1, h2) = unsafe {
        (
            e.offload(key, &region(&mut src), None).unwrap(),
            e.offload(key, &region(&mut src), None).unwrap(),
        )
    };
    e.engine.drain().unwrap();
    assert!(e.wait_source_released(h1).unwrap());
    assert!(e.source_released(h2).unwrap());
    let mut back = vec![0u8; src.len()];
    // SAFETY: `back` is live and idle, no stream.
    unsafe { e.fetch(h2, &region(&mut back), None) }.unwrap();
    assert!(back == src);
    e.release(h1).unwrap();
    assert!(
        e.source_released(h2).unwrap(),
        "the other handle of the key lives on"
    );
    e.release(h2).unwrap();
    let gone = e.source_released(h2).unwrap_err().to_string();
    assert!(gone.contains("unknown or released handle"), "{gone}");
    // SAFETY: refused before the stream is used.
    let stream = unsafe { e.offload(TensorKey::new(8, 0), &region(&mut src), Some(1234)) };
    assert!(stream.unwrap_err().to_string().contains("CUDA stream was given"));
    assert!(e.release(Handle(987_654)).is_err());
}

#[test]
fn ranks_given_one_file_name_each_get_their_own_file() {
    let dir = tempfile::tempdir().unwrap();
    let settings = small_host_settings().resolve().unwrap();
    let shared = dir.path().join("spill.bin");
    let rank = |rank| {
        Some(LocalRank {
            rank,
            source: "LOCAL_RANK",
        })
    };
    let r0 = open_for_rank(std::slice::from_ref(&shared), Some(1 << 20), &settings, rank(0)).unwrap();
    let r1 = open_for_rank(std::slice::from_ref(&shared), Some(1 << 20), &settings, rank(1)).unwrap();
    assert_eq!(r0.info.path, dir.path().join("spill.rank0.bin"));
    assert_eq!(r1.info.path, dir.path().join("spill.rank1.bin"));
    assert!(
        r1.info
            .notes
            .iter()
            .any(|n| n.contains("local rank 1 (LOCAL_RANK)")),
        "{:?}",
        r1.info.notes
    );
    assert!(!shared.exists(), "the shared name itself is never made");
    // Without a launcher the name is used as given; a directory stays a directory.
    let alone = open_for_rank(std::slice::from_ref(&shared), Some(1 << 20), &settings, None).unwrap();
    assert_eq!(alone.info.path, shared);
    let anon = open_for_rank(&[dir.path().to_path_buf()], Some(1 << 20), &settings, rank(1)).unwrap();
    assert!(anon.info.anonymous && anon.info.path == dir.path());
    // A rank's own entry in rank_paths is used as written.
    let mut own = small_host_settings();
    let mine = dir.path().join("mine.bin");
    own.set("rank_paths", format!("1={}", mine.display()).as_str())
        .unwrap();
    let r1 = open_for_rank(&[shared], Some(1 << 20), &own.resolve().unwrap(), rank(1)).unwrap();
    assert_eq!(r1.info.path, mine);
}

#[test]
fn faults_wrap_the_backend_and_their_stats_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let plain = open_for_rank(
        &[dir.path().to_path_buf()],
        Some(16 << 20),
        &small_host_settings().resolve().unwrap(),
        None,
    )
    .unwrap();
    assert!(plain.stats_json().get("faults").is_none(), "absent when off");
    assert!(plain.fault_report().is_none());
    drop(plain);

    let mut settings = small_host_settings();
    settings.set("faults", "write_error=1").unwrap();
    let e = open_for_rank(
        &[dir.path().to_path_buf()],
        Some(16 << 20),
        &settings.resolve().unwrap(),
        None,
    )
    .unwrap();
    assert_eq!(e.info.backend, "uring+faults");
    assert!(
        e.info
            .notes
            .iter()
            .any(|n| n.starts_with("fault injection on: write_error=1")),
        "{:?}",
        e.info.notes
    );
    let mut src: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    // SAFETY: `src` outlives the engine's use of it (released below), no stream.
    let h = unsafe { e.offload(TensorKey::new(1, 0), &region(&mut src), None) }.unwrap();
    e.engine.drain().unwrap();
    assert!(
        !e.source_released(h).unwrap(),
        "a tensor whose write failed stays in its memory"
    );
    let mut back = vec![0u8; src.len()];
    // SAFETY: `back` is live and idle, no stream.
    unsafe { e.fetch(h, &region(&mut back), None) }.unwrap();
    assert!(back == src, "forwarded from its own memory");
    let json = e.stats_json();
    assert!(json["write_errors"].as_u64().unwrap() > 0, "{json}");
    assert_eq!(json["faults"]["plan"], "write_error=1", "{json}");
    assert!(
        json["faults"]["stats"]["injected_write_errors"].as_u64().unwrap() > 0,
        "{json}"
    );
    assert_eq!(json["faults"]["stats"]["passed"], 0, "{json}");
    assert!(json["faults"].get("members").is_none(), "one path: {json}");
    e.release(h).unwrap();
}

#[test]
fn each_path_of_a_striped_set_injects_faults_with_a_seed_of_its_own() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let paths: Vec<PathBuf> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
    let mut settings = small_host_settings();
    settings.set("faults", "short=0.5,seed=10").unwrap();
    let e = open_for_rank(&paths, Some(16 << 20), &settings.resolve().unwrap(), None).unwrap();
    let mut src: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    // SAFETY: `src` outlives the engine's use of it (released below), no stream.
    let h = unsafe { e.offload(TensorKey::new(1, 0), &region(&mut src), None) }.unwrap();
    e.engine.drain().unwrap();
    assert!(
        e.source_released(h).unwrap(),
        "short counts are resubmitted, not failures"
    );
    let mut back = vec![0u8; src.len()];
    // SAFETY: `back` is live and idle, no stream.
    unsafe { e.fetch(h, &region(&mut back), None) }.unwrap();
    assert!(back == src);
    let report = e.fault_report().expect("faults are on");
    assert_eq!(report.plan, "short=0.5,seed=10");
    let plans: Vec<&str> = report.members.iter().map(|m| m.plan.as_str()).collect();
    assert_eq!(plans, ["short=0.5,seed=10", "short=0.5,seed=11"]);
    let members: Vec<String> = report.members.iter().map(|m| m.path.clone()).collect();
    assert_eq!(
        members,
        e.member_stats()
            .iter()
            .map(|m| m.path.display().to_string())
            .collect::<Vec<_>>()
    );
    let total: u64 = report.members.iter().map(|m| m.stats.requests).sum();
    assert_eq!(report.stats.requests, total);
    assert!(report.stats.injected_short > 0, "{report:?}");
    assert!(
        e.info
            .notes
            .iter()
            .any(|n| n.contains("each of the 2 targets injects on its own (seeds 10 to 11")),
        "{:?}",
        e.info.notes
    );
    e.release(h).unwrap();
}

#[test]
fn waiting_for_a_source_kept_in_memory_says_so_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // 64 KiB of storage: a 1 MiB tensor does not fit, so it stays in its own memory.
    let e = open(&[dir.path().to_path_buf()], Some(64 << 10)).unwrap();
    let mut big = vec![3u8; 1 << 20];
    let mut small = vec![4u8; 4096];
    // SAFETY: both buffers outlive the engine's use of them (released below).
    let (kept, stored) = unsafe {
        (
            e.offload(TensorKey::new(1, 0), &region(&mut big), None).unwrap(),
            e.offload(TensorKey::new(2, 0), &region(&mut small), None)
                .unwrap(),
        )
    };
    e.engine.drain().unwrap();
    assert!(!e.wait_source_released(kept).unwrap(), "kept until release");
    assert!(e.engine.source_kept(kept).unwrap());
    assert!(e.wait_source_released(stored).unwrap(), "on storage");
    assert!(!e.engine.source_kept(stored).unwrap());
    assert_eq!(e.engine.stats().counters.resident_tensors, 1);
    e.release(kept).unwrap();
    e.release(stored).unwrap();
}

#[test]
fn a_striped_set_on_one_tmpfs_gets_half_of_it_once() {
    let shm = Path::new("/dev/shm");
    if !shm.exists() {
        eprintln!("skipped: there is no /dev/shm");
        return;
    }
    let fs = crate::fs::filesystem(shm).expect("statfs /dev/shm");
    assert!(fs.ram_backed, "/dev/shm is not tmpfs: {fs:?}");
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir_in(shm).unwrap()).collect();
    let paths: Vec<PathBuf> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
    let settings = small_host_settings().resolve().unwrap();
    let stripe = settings.stripe_bytes;
    // The capacity opening without capacity= takes. (Opening so would reserve all of it up
    // front: half of the tmpfs, in memory. The engine is opened small below.)
    let files: Vec<(PathBuf, bool)> = paths.iter().map(|p| (p.clone(), true)).collect();
    let free_before = crate::fs::free_space(shm).unwrap();
    let default = storage_capacity(&files, &[], stripe, None, 0).unwrap();
    let free = free_before.max(crate::fs::free_space(shm).unwrap());
    assert!(default > 0 && default.is_multiple_of(3 * stripe), "{default}");
    assert!(
        default <= free / 2,
        "three paths on one tmpfs get {default} bytes, more than half of its {free} free"
    );
    let e = open(&paths, Some(6 << 20)).unwrap();
    assert_eq!(e.info.capacity, 6 << 20);
    assert_eq!(e.member_stats().len(), 3);
    round_trip(&e, (0..2_500_000u32).map(|i| (i % 249) as u8).collect());
    drop(e);
    // More than the tmpfs holds is refused before anything is reserved.
    let too_much = free.saturating_mul(2).saturating_add(3 * stripe);
    let msg = open(&paths, Some(too_much)).unwrap_err().to_string();
    for want in [
        format!("capacity={too_much}"),
        "of the filesystem at /dev/shm".to_string(),
        "its space is RAM".to_string(),
    ] {
        assert!(msg.contains(&want), "{want:?} not in {msg}");
    }
    for d in &dirs {
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            0,
            "nothing is left behind"
        );
    }
}

#[test]
fn a_striped_set_takes_space_up_front_only_for_a_given_capacity() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("m{i}.bin"))).collect();
    let allocated = |paths: &[PathBuf]| -> u64 {
        paths
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().blocks() * 512)
            .sum()
    };
    // Without a capacity: half of the filesystem's free space, used as needed.
    let e = open(&paths, None).unwrap();
    assert!(e.info.capacity > 0);
    assert_eq!(allocated(&paths), 0, "nothing taken before it is written");
    drop(e);
    for p in &paths {
        std::fs::remove_file(p).unwrap();
    }
    // With one: each member's share reserved.
    let e = open(&paths, Some(8 << 20)).unwrap();
    assert!(
        allocated(&paths) >= 8 << 20,
        "{} bytes reserved",
        allocated(&paths)
    );
    drop(e);
}

fn open_with(
    paths: &[PathBuf],
    capacity: Option<u64>,
    extra: &[(&str, &str)],
) -> Result<OpenedEngine, Error> {
    let mut settings = small_host_settings();
    for (name, value) in extra {
        settings.set(name, *value).unwrap();
    }
    open_engine(paths, capacity, &settings.resolve().unwrap())
}

#[test]
fn a_directory_is_spread_over_the_files_spread_files_names_and_bytes_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let e = open_with(
        &[dir.path().to_path_buf()],
        Some(8 << 20),
        &[("spread_files", "3")],
    )
    .unwrap();
    assert_eq!(e.member_stats().len(), 3);
    assert!(e.info.anonymous && e.info.path == dir.path());
    assert!(
        e.info
            .notes
            .iter()
            .any(|n| n.contains("spread over 3 anonymous files")),
        "{:?}",
        e.info.notes
    );
    round_trip(&e, (0..3 << 20).map(|i| (i * 7 % 251) as u8).collect());
    drop(e);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing is left behind"
    );
}

#[test]
fn a_directory_on_a_memory_filesystem_is_spread_by_default_and_elsewhere_not() {
    let by_fs = [("spread_files", "0")];
    let dir = tempfile::tempdir().unwrap();
    let e = open_with(&[dir.path().to_path_buf()], Some(1 << 20), &by_fs).unwrap();
    let ram = crate::fs::filesystem(dir.path()).is_some_and(|f| f.ram_backed);
    let want = if ram { super::SPREAD_FILES_RAM as usize } else { 0 };
    assert_eq!(e.member_stats().len(), want, "{:?}", e.info.notes);
    drop(e);
    let shm = Path::new("/dev/shm");
    if crate::fs::filesystem(shm).is_some_and(|f| f.ram_backed) {
        let dir = tempfile::tempdir_in(shm).unwrap();
        let e = open_with(&[dir.path().to_path_buf()], None, &by_fs).unwrap();
        assert_eq!(e.member_stats().len(), super::SPREAD_FILES_RAM as usize);
        assert!(
            e.info.notes.iter().any(|n| n.contains("memory-backed")),
            "{:?}",
            e.info.notes
        );
        drop(e);
        let e = open_with(&[dir.path().to_path_buf()], None, &[("spread_files", "1")]).unwrap();
        assert_eq!(e.member_stats().len(), 0, "one file, not striped");
    }
}

#[test]
fn spread_files_past_the_path_limit_is_refused() {
    let mut settings = small_host_settings();
    let msg = settings.set("spread_files", "65").unwrap_err().to_string();
    assert!(
        msg.contains("spread_files") && msg.contains("more than 64"),
        "{msg}"
    );
}

#[test]
fn a_buffered_engine_opens_through_the_page_cache_and_its_probe_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let settings = small_host_settings().resolve().unwrap();
    let paths = [dir.path().join("spill.bin")];
    let prepared = EngineBuilder::new(&paths, Some(4 << 20), &settings)
        .direct(DirectIo::Off)
        .prepare()
        .unwrap();
    assert!(prepared.setup().memory.name() == "host");
    let probe = prepared.probe_direct_io().unwrap();
    assert!(!probe.direct_io, "{probe:?}");
    let e = prepared.start().unwrap();
    assert_eq!((e.info.capacity, e.info.anonymous), (4 << 20, false));
    round_trip(&e, (0..100_000u32).map(|i| (i % 253) as u8).collect());
}

#[test]
fn the_spdk_controller_is_the_path_or_given_apart_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = small_host_settings();
    settings.set("backend", "spdk").unwrap();
    let settings = settings.resolve().unwrap();
    let paths = [dir.path().to_path_buf()];
    // The path is no PCI address; with none given apart from it, the backend says so.
    let from_path = EngineBuilder::new(&paths, None, &settings).prepare().unwrap_err();
    assert!(from_path.to_string().contains("PCI address"), "{from_path}");
    let none = EngineBuilder::new(&paths, None, &settings)
        .controller(None)
        .prepare()
        .unwrap_err();
    assert!(none.to_string().contains("needs --pci"), "{none}");
    // A controller given with another backend is refused.
    let uring = small_host_settings().resolve().unwrap();
    let pci = "0000:00:04.0".parse().unwrap();
    let other = EngineBuilder::new(&paths, None, &uring)
        .controller(Some(pci))
        .prepare()
        .unwrap_err();
    assert!(other.to_string().contains("add --backend spdk"), "{other}");
}
