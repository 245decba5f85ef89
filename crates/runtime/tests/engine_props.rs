//! Property test of the offload engine: random sequences of offload (new keys and keys
//! already held), prefetch, fetch, release and drain, with packing and dedup on or off,
//! checked against a simple model — fetched bytes always equal offloaded bytes, and once
//! everything is released all storage and staging space is returned.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use spillway_runtime::engine::{Engine, EngineConfig, Handle, Region, StorageTarget, TensorKey};
use spillway_runtime::{Device, DeviceBuffer, HostDevice, MemBackend, Target};

#[derive(Clone, Debug)]
enum Op {
    Offload { tensor: usize },
    Prefetch { pick: usize },
    Fetch { pick: usize },
    Release { pick: usize },
    Drain,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..12).prop_map(|tensor| Op::Offload { tensor }),
        2 => any::<usize>().prop_map(|pick| Op::Prefetch { pick }),
        3 => any::<usize>().prop_map(|pick| Op::Fetch { pick }),
        2 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => Just(Op::Drain),
    ]
}

/// Tensor `i`'s size: mostly small (packed), some over the 64 KiB threshold (direct).
fn len_of(i: usize, sizes: &[usize]) -> usize {
    sizes[i % sizes.len()]
}

proptest! {
    // 40 cases in the test suite; PROPTEST_CASES=N runs more.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(40),
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_matches_the_model(
        ops in prop::collection::vec(op(), 1..60),
        sizes in prop::collection::vec(1usize..200_000, 12),
        pack in any::<bool>(),
        dedup in any::<bool>(),
        delay_us in 0u64..300,
    ) {
        let dev: Arc<dyn Device> = Arc::new(HostDevice::new());
        let backend = Arc::new(MemBackend::new(dev.clone()).unwrap());
        backend.faults().delay_us.store(delay_us, std::sync::atomic::Ordering::SeqCst);
        let cfg = EngineConfig {
            staging_bytes: 1 << 20,
            prefetch_bytes: 512 << 10,
            pack_threshold: 64 << 10,
            pack_extent_bytes: 256 << 10,
            pack_flush_delay: Duration::from_micros(500),
            direct_write_bytes: 512 << 10,
            pack,
            dedup,
            ..Default::default()
        };
        let engine = Engine::new(dev.clone(), backend, vec![StorageTarget::new(Target::new("m"), 1 << 30)], cfg).unwrap();
        // The tensors: fixed contents per index, alive for the whole case.
        let tensors: Vec<DeviceBuffer> = (0..12)
            .map(|i| {
                let b = dev.alloc(len_of(i, &sizes)).unwrap();
                dev.fill_pattern(b.ptr(), b.len(), i as u64, 0).unwrap();
                b
            })
            .collect();
        // The model: live handles and the tensor each names.
        let mut live: Vec<(Handle, usize)> = Vec::new();
        for op in ops {
            match op {
                Op::Offload { tensor } => {
                    let t = &tensors[tensor];
                    // SAFETY: the tensors outlive the engine (dropped after it).
                    let h = unsafe {
                        engine.offload(TensorKey::new(tensor as u64, 0), &[Region::new(t.ptr(), t.len() as u64)], None)
                    }.unwrap();
                    live.push((h, tensor));
                }
                Op::Prefetch { pick } if !live.is_empty() => {
                    engine.prefetch(live[pick % live.len()].0).unwrap();
                }
                Op::Fetch { pick } if !live.is_empty() => {
                    let (h, tensor) = live[pick % live.len()];
                    let len = len_of(tensor, &sizes);
                    let out = dev.alloc(len).unwrap();
                    // SAFETY: `out` outlives the event.
                    unsafe { engine.fetch(h, &[Region::new(out.ptr(), len as u64)]) }.unwrap().synchronize().unwrap();
                    prop_assert_eq!(dev.count_pattern_mismatches(out.ptr(), len, tensor as u64, 0).unwrap(), 0);
                }
                Op::Release { pick } if !live.is_empty() => {
                    let (h, _) = live.swap_remove(pick % live.len());
                    engine.release(h).unwrap();
                }
                Op::Drain => engine.drain().unwrap(),
                _ => {}
            }
            prop_assert_eq!(engine.live_handles(), live.len());
        }
        // Every live handle still reads back right, then everything is returned.
        for &(h, tensor) in &live {
            let len = len_of(tensor, &sizes);
            let out = dev.alloc(len).unwrap();
            // SAFETY: as above.
            unsafe { engine.fetch(h, &[Region::new(out.ptr(), len as u64)]) }.unwrap().synchronize().unwrap();
            prop_assert_eq!(dev.count_pattern_mismatches(out.ptr(), len, tensor as u64, 0).unwrap(), 0);
        }
        for (h, _) in live.drain(..) {
            engine.release(h).unwrap();
        }
        engine.drain().unwrap();
        let used = engine.storage_usage();
        prop_assert_eq!(used.used, 0, "storage not returned: {:?}", used);
        prop_assert_eq!(engine.staging_in_use(), 0);
        prop_assert!(engine.stats().counters.staging_peak <= 1 << 20);
        drop(engine);
        drop(tensors);
    }
}
