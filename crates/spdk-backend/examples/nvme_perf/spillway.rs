//! The spillway side: this crate's userspace driver ([`spillway_spdk::controller`]) on the
//! same controller, bound to vfio-pci instead of the kernel's nvme driver.
//!
//! `main` calls [`run`] once per workload, with `nvme_perf --driver spillway`. What it gets:
//!
//! - The controller: its PCI address and VFIO group path, `opts.pci` and `opts.group`, come
//!   from the environment variables `NVMEVM_PCI` (e.g. `0000:00:01.0`) and `NVMEVM_GROUP`
//!   (e.g. `/dev/vfio/1`), which the VM harness (tests/nvme-vm/run.sh, default
//!   `NVMEVM_BIND=vfio`) sets, or from binding the controller (`--driver both`). Fails
//!   with a message naming the variable when one is missing. The controller is opened in
//!   `run` and closed before returning (one controller per call).
//! - `workload`: name, `block_bytes` (4096 or 1 MiB), `queue_depth` (I/Os to keep in
//!   flight: 32, or `--seq-qd`), `pattern` (random block-aligned or sequential wrapping)
//!   and `direction` (read or write).
//! - `opts`: `measure` and `warmup` (durations), `region` (requested bytes, `None` for
//!   the default) and `seq_qd`; `opts.block` is the kernel side's and is to be ignored.
//!   The region to use is `opts.region_bytes(workload, namespace_bytes)?`, where
//!   `namespace_bytes` is the namespace size (blocks × block size) from Identify.
//!
//! What it must return: the [`Measurement`] of the timed phase, as produced by
//! [`Meter::finish`](crate::workload::Meter::finish) (ios and bytes completed within
//! `opts.measure`, the phase's length, mean submit-to-completion latency), or `Err` with a
//! message that says what failed and what to do. `main` prints it as the `NVMEPERF` line.
//!
//! The easy way to get all of that right, and the same loop as the kernel side: implement
//! [`Engine`](crate::workload::Engine) for a struct holding the controller, one I/O queue
//! of at least `queue_depth` commands and `queue_depth` block-sized DMA buffers (`queue` =
//! the queue's `submit_read` / `submit_write` on the slot's buffer at LBA
//! `offset / block_size`, remembering command id → slot; `reap` = `wait_completions`,
//! mapping ids back to slots and turning a failed command into `Err`),
//! then return `run_workload(&mut engine, workload, region, opts)`. That does the warm-up,
//! the measurement, the data pattern for writes, and the untimed read-back check after
//! `seqwrite1m`. A hand-written loop must do the same: keep `queue_depth` I/Os in flight on
//! offsets from [`Offsets`](crate::workload::Offsets), write blocks made with
//! `fill_pattern` + `stamp_block`, and verify `sample_offsets` with `check_block` after a
//! write workload.

use spillway_spdk::controller::Controller;
use spillway_spdk::io_queue::IoQueue;
use spillway_spdk::vfio::DmaBuffer;

use crate::workload::{run_workload, Direction, Engine, Measurement, Options, Workload};

/// One I/O queue with a DMA buffer per slot. An I/O larger than one command moves (MDTS)
/// is cut into several commands, as the kernel cuts it into several requests; its slot is
/// done when all of them are.
struct Driver {
    // Field order is drop order: the queue goes before the controller and the buffers.
    queue: IoQueue,
    buffers: Vec<DmaBuffer>,
    block_bytes: usize,
    block_size: u64,
    /// The most bytes one command moves.
    command_bytes: usize,
    /// The slot of each command identifier in flight.
    slot_of: Vec<usize>,
    /// Commands still in flight per slot.
    pending: Vec<usize>,
}

impl Engine for Driver {
    fn buffer(&mut self, slot: usize) -> &mut [u8] {
        &mut self.buffers[slot].as_mut_slice()[..self.block_bytes]
    }

    fn queue(&mut self, slot: usize, direction: Direction, offset: u64) -> Result<(), String> {
        for start in (0..self.block_bytes).step_by(self.command_bytes) {
            let range = start..(start + self.command_bytes).min(self.block_bytes);
            let lba = (offset + start as u64) / self.block_size;
            // SAFETY: a slot's buffer belongs to its one I/O until `reap` hands the slot
            // back, and the buffers outlive the queue (field order).
            let cid = unsafe {
                match direction {
                    Direction::Read => self.queue.submit_read(lba, &mut self.buffers[slot], range),
                    Direction::Write => self.queue.submit_write(lba, &self.buffers[slot], range),
                }
            }
            .map_err(|e| e.to_string())?;
            self.slot_of[usize::from(cid)] = slot;
            self.pending[slot] += 1;
        }
        Ok(())
    }

    fn reap(&mut self, done: &mut Vec<usize>) -> Result<(), String> {
        let max = self.slot_of.len();
        for (cid, result) in self.queue.wait_completions(max).map_err(|e| e.to_string())? {
            result.map_err(|e| e.to_string())?;
            let slot = self.slot_of[usize::from(cid)];
            self.pending[slot] -= 1;
            if self.pending[slot] == 0 {
                done.push(slot);
            }
        }
        Ok(())
    }
}

fn given(value: &Option<String>, var: &str) -> Result<String, String> {
    value.clone().ok_or_else(|| {
        format!("{var} is not set: run in the nvme-vm VM (tests/nvme-vm/run.sh), or set it to the controller's PCI address / VFIO group file")
    })
}

/// Runs `workload` with this crate's driver on the controller named by `NVMEVM_PCI` and
/// `NVMEVM_GROUP`.
pub fn run(workload: &Workload, opts: &Options) -> Result<Measurement, String> {
    let (pci, group) = (
        given(&opts.pci, "NVMEVM_PCI")?,
        given(&opts.group, "NVMEVM_GROUP")?,
    );
    let ctrl = Controller::open(&pci, &group).map_err(|e| format!("open {pci}: {e}"))?;
    let ns = ctrl.namespace();
    let region = opts.region_bytes(workload, ns.capacity_bytes())?;
    let block_bytes = workload.block_bytes as usize;
    let command_bytes = (ctrl.max_command_bytes() as usize).min(block_bytes);
    let commands = workload.queue_depth * block_bytes.div_ceil(command_bytes);
    let queue = ctrl
        .create_io_queue(commands as u32 + 1)
        .map_err(|e| e.to_string())?;
    if queue.max_in_flight() < commands {
        return Err(format!(
            "the controller's queues hold {} commands, fewer than the {commands} queue depth {} needs",
            queue.max_in_flight(),
            workload.queue_depth
        ));
    }
    let buffers = (0..workload.queue_depth)
        .map(|_| DmaBuffer::new(ctrl.container(), block_bytes))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let mut driver = Driver {
        slot_of: vec![usize::MAX; queue.max_in_flight()],
        pending: vec![0; workload.queue_depth],
        command_bytes,
        queue,
        buffers,
        block_bytes,
        block_size: u64::from(ns.block_size()),
    };
    let measured = run_workload(&mut driver, workload, region, opts);
    drop(driver);
    ctrl.close().map_err(|e| e.to_string())?;
    measured
}
