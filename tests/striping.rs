//! Striping over real files with the io_uring backend: data spread over several targets
//! round-trips (through the offload engine too), and a target that loses its data mid-run
//! gives a clear error naming it, never wrong data.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use spillway_runtime::engine::{Engine, EngineConfig, Region, StorageTarget, TensorKey};
use spillway_runtime::{
    Backend, Device, Error, HostDevice, IoOp, IoRequest, MemRef, Member, StripedBackend, Target, TargetId,
};
use spillway_uring::{UringBackend, UringConfig};

const STRIPE: u64 = 64 << 10;

fn striped(files: &[PathBuf]) -> (Arc<StripedBackend>, PathBuf) {
    let device: Arc<dyn Device> = Arc::new(HostDevice::new());
    let members = files
        .iter()
        .map(|f| Member {
            target: Target::new(f),
            backend: Arc::new(UringBackend::new(device.clone(), UringConfig::default()).unwrap())
                as Arc<dyn Backend>,
        })
        .collect();
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let name = StripedBackend::set_name(&refs);
    (
        Arc::new(StripedBackend::new(name.clone(), members, STRIPE).unwrap()),
        name,
    )
}

fn io(
    b: &StripedBackend,
    id: TargetId,
    op: IoOp,
    offset: u64,
    buf: &mut [u8],
) -> spillway_runtime::Result<usize> {
    let req = IoRequest {
        target: id,
        op,
        offset,
        mem: MemRef::Host {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        },
    };
    // SAFETY: the buffer outlives the wait.
    unsafe { b.submit(req) }?.wait()
}

fn data(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect()
}

#[test]
fn data_spread_over_three_files_round_trips_and_lands_on_all_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("m{i}"))).collect();
    let (b, name) = striped(&files);
    let (id, info) = b.open(&Target::new(&name).reserve(12 << 20)).unwrap();
    assert!(info.size >= 12 << 20);
    let mut out = data(10 << 20);
    io(&b, id, IoOp::Write, 4096, &mut out).unwrap();
    b.flush(id).unwrap();
    let mut back = vec![0u8; out.len()];
    io(&b, id, IoOp::Read, 4096, &mut back).unwrap();
    assert!(back == out, "striped data read back differs");
    let stats = b.member_stats();
    let total: u64 = stats.iter().map(|s| s.bytes_written).sum();
    assert_eq!(total, out.len() as u64);
    for s in &stats {
        assert!(s.bytes_written > 3 << 20, "{s:?}");
        assert!(std::fs::metadata(&s.path).unwrap().len() >= s.bytes_written);
    }
    b.close(id).unwrap();
}

#[test]
fn a_member_that_loses_its_data_is_a_clear_error_not_wrong_data() {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("m{i}"))).collect();
    let (b, name) = striped(&files);
    let (id, _) = b.open(&Target::new(&name)).unwrap();
    let mut out = data(4 << 20);
    io(&b, id, IoOp::Write, 0, &mut out).unwrap();

    // Removed from the directory: the open file still holds the data, which reads back right.
    std::fs::remove_file(&files[0]).unwrap();
    let mut back = vec![0u8; out.len()];
    io(&b, id, IoOp::Read, 0, &mut back).unwrap();
    assert!(back == out);

    // Cut short under the engine's feet: the read fails, names the member and says that
    // the file changed underneath (it held those bytes, and now does not).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&files[1])
        .unwrap()
        .set_len(0)
        .unwrap();
    let err = io(&b, id, IoOp::Read, 0, &mut back).unwrap_err();
    assert!(
        matches!(&err, Error::Target { reason, .. } if reason.contains("changed underneath") && reason.contains("truncated")),
        "{err:?}"
    );
    assert!(err.to_string().contains(&files[1].display().to_string()), "{err}");
}

#[test]
fn the_engine_offloads_over_a_striped_set() {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("m{i}"))).collect();
    let (b, name) = striped(&files);
    let device: Arc<dyn Device> = Arc::new(HostDevice::new());
    let config = EngineConfig {
        staging_bytes: 8 << 20,
        prefetch_bytes: 4 << 20,
        pack_extent_bytes: 1 << 20,
        pack_threshold: 256 << 10,
        ..EngineConfig::default()
    };
    let engine = Engine::new(
        device,
        b.clone(),
        vec![StorageTarget::new(Target::new(&name), 64 << 20)],
        config,
    )
    .unwrap();
    let tensors: Vec<Vec<u8>> = (0..40).map(|i| data(3000 + i * 50_000)).collect();
    let handles: Vec<_> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            // The host device's memory is host memory: a Vec stands in for a tensor.
            let region = Region::new(t.as_ptr() as u64, t.len() as u64);
            // SAFETY: each tensor outlives its handle and is not written while offloaded.
            unsafe { engine.offload(TensorKey::new(i as u64, 0), &[region], None) }.unwrap()
        })
        .collect();
    engine.drain().unwrap();
    for (h, t) in handles.iter().zip(&tensors) {
        let mut back = vec![0u8; t.len()];
        let region = Region::new(back.as_mut_ptr() as u64, back.len() as u64);
        // SAFETY: `back` outlives the fetch, which is waited for.
        unsafe { engine.fetch(*h, &[region]) }
            .unwrap()
            .synchronize()
            .unwrap();
        assert!(&back == t);
        engine.release(*h).unwrap();
    }
    let stats = b.member_stats();
    assert!(
        stats.iter().all(|s| s.bytes_written > 0 && s.bytes_read > 0),
        "{stats:?}"
    );
}
