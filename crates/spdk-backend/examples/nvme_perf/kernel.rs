//! The kernel side: Linux's nvme driver, driven by io_uring the way
//! `fio --ioengine=io_uring --direct=1 --fixedbufs` drives it. One ring with one entry
//! per in-flight I/O, the block device opened with `O_DIRECT`, and one block-sized buffer
//! per slot in anonymous memory, registered with the ring and used through
//! `ReadFixed` / `WriteFixed`. Completions are waited for with interrupts (no polling),
//! as fio does by default.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::ptr::NonNull;

use io_uring::{opcode, types, IoUring};

use crate::workload::{run_workload, Direction, Engine, Measurement, Options, Workload};

/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`: the device size in bytes (not in `libc`).
const BLKGETSIZE64: libc::c_ulong = (2 << 30) | (8 << 16) | (0x12 << 8) | 114;

/// Runs `workload` on the block device `opts.block`.
pub fn run(workload: &Workload, opts: &Options) -> Result<Measurement, String> {
    let device = BlockDevice::open(&opts.block, workload.direction)?;
    let region = opts.region_bytes(workload, device.size)?;
    if !workload.block_bytes.is_multiple_of(device.logical_block) {
        return Err(format!(
            "{}: blocks of {} bytes are not a multiple of {}'s logical block size ({} bytes)",
            workload.name, workload.block_bytes, opts.block, device.logical_block
        ));
    }
    let mut engine = UringEngine::new(device, workload)?;
    run_workload(&mut engine, workload, region, opts)
}

/// A block device opened for direct I/O.
struct BlockDevice {
    file: File,
    path: String,
    size: u64,
    logical_block: u64,
}

impl BlockDevice {
    /// Opens `path` with `O_DIRECT`, read-only unless `direction` is a write.
    fn open(path: &str, direction: Direction) -> Result<Self, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?;
        if !meta.file_type().is_block_device() {
            return Err(format!(
                "{path} is not a block device: pass the kernel driver's namespace, e.g. \
                 --block /dev/nvme0n1 (a loop device works for a trial run)"
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(direction == Direction::Write)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => format!("{path} cannot be opened with O_DIRECT: {e}"),
                _ => format!("cannot open {path} with O_DIRECT: {e}"),
            })?;
        let size = ioctl_u64(&file, BLKGETSIZE64).map_err(|e| format!("BLKGETSIZE64 on {path}: {e}"))?;
        let mut logical: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which points at `logical`.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut logical) };
        if rc != 0 || logical <= 0 {
            return Err(format!("BLKSSZGET on {path}: {}", io::Error::last_os_error()));
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
            logical_block: logical as u64,
        })
    }
}

/// Runs an ioctl that returns one `u64` through its argument.
fn ioctl_u64(file: &File, request: libc::c_ulong) -> io::Result<u64> {
    let mut value: u64 = 0;
    // SAFETY: `request` is an _IOR ioctl of 8 bytes, written to `value`, which outlives the
    // call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, &mut value) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// `count` page-aligned buffers of `len` bytes each, in one anonymous mapping.
struct Buffers {
    base: NonNull<u8>,
    len: usize,
    count: usize,
}

impl Buffers {
    fn new(len: usize, count: usize) -> Result<Self, String> {
        let total = len * count;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing; no
        // existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "cannot map {total} bytes of I/O buffers: {}",
                io::Error::last_os_error()
            ));
        }
        let base = NonNull::new(ptr.cast()).ok_or("mmap returned a null buffer")?;
        Ok(Self { base, len, count })
    }

    fn ptr(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.count, "buffer slot {slot} out of {}", self.count);
        // SAFETY: `slot < count`, so the offset stays inside the mapping.
        unsafe { self.base.as_ptr().add(slot * self.len) }
    }

    fn slice(&mut self, slot: usize) -> &mut [u8] {
        // SAFETY: `ptr(slot)` starts `len` mapped bytes owned by this struct; `&mut self`
        // keeps other Rust references out, and the engine only hands out idle slots.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(slot), self.len) }
    }

    /// One iovec per buffer, for `register_buffers`.
    fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count)
            .map(|slot| libc::iovec {
                iov_base: self.ptr(slot).cast(),
                iov_len: self.len,
            })
            .collect()
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no slice of it outlives `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len * self.count) };
    }
}

/// One io_uring over a [`BlockDevice`], with registered buffers.
struct UringEngine {
    // Field order is drop order: the ring goes first, so the kernel is done with the
    // buffers (they stay pinned until then) before they are unmapped.
    ring: IoUring,
    buffers: Buffers,
    device: BlockDevice,
    /// Direction and offset of the I/O on each slot, for error messages.
    pending: Vec<(Direction, u64)>,
    /// Completions taken off the ring, reused so that reaping does not allocate.
    completed: Vec<(usize, i32)>,
}

impl UringEngine {
    fn new(device: BlockDevice, workload: &Workload) -> Result<Self, String> {
        let slots = workload.queue_depth;
        if slots > usize::from(u16::MAX) {
            return Err(format!(
                "queue depth {slots} is too large: registered buffers are indexed by u16"
            ));
        }
        let entries = u32::try_from(slots.next_power_of_two())
            .map_err(|_| format!("queue depth {slots} is too large for an io_uring"))?;
        let ring = IoUring::new(entries).map_err(|e| {
            format!(
                "cannot create an io_uring of {entries} entries: {e} (is io_uring disabled? \
                 see /proc/sys/kernel/io_uring_disabled)"
            )
        })?;
        let buffers = Buffers::new(workload.block_len(), slots)?;
        let iovecs = buffers.iovecs();
        // SAFETY: every iovec describes memory of `buffers`, which the ring outlives only
        // while it is being dropped (see the field order of `UringEngine`).
        unsafe { ring.submitter().register_buffers(&iovecs) }.map_err(|e| {
            format!(
                "cannot register {slots} buffers of {} bytes with io_uring: {e} (on ENOMEM, \
                 raise the locked-memory limit, `ulimit -l`)",
                workload.block_bytes
            )
        })?;
        Ok(Self {
            ring,
            buffers,
            device,
            pending: vec![(Direction::Read, 0); slots],
            completed: Vec::with_capacity(slots),
        })
    }

    /// Pushes `entry`, first submitting what is queued when the ring is full.
    fn push(&mut self, entry: &io_uring::squeue::Entry) -> Result<(), String> {
        for _ in 0..2 {
            // SAFETY: the entry's buffer is a registered slot buffer that stays mapped until
            // the ring is gone, and the slot is not handed out again until it completes.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.ring
                .submit()
                .map_err(|e| format!("io_uring submit on {}: {e}", self.device.path))?;
        }
        Err("the io_uring submission queue stays full: more I/Os queued than slots".into())
    }

    /// Checks one completion's result against the I/O that was queued on `slot`.
    fn check(&self, slot: usize, result: i32) -> Result<(), String> {
        let (direction, offset) = self.pending[slot];
        let what = match direction {
            Direction::Read => "read",
            Direction::Write => "write",
        };
        let len = self.buffers.len;
        if result < 0 {
            return Err(format!(
                "{what} of {len} bytes at offset {offset} on {} failed: {}",
                self.device.path,
                io::Error::from_raw_os_error(-result)
            ));
        }
        if result as usize != len {
            return Err(format!(
                "short {what} at offset {offset} on {}: {result} of {len} bytes",
                self.device.path
            ));
        }
        Ok(())
    }
}

impl Engine for UringEngine {
    fn buffer(&mut self, slot: usize) -> &mut [u8] {
        self.buffers.slice(slot)
    }

    fn queue(&mut self, slot: usize, direction: Direction, offset: u64) -> Result<(), String> {
        let fd = types::Fd(self.device.file.as_raw_fd());
        let len = self.buffers.len as u32;
        let index = slot as u16;
        let entry = match direction {
            Direction::Read => opcode::ReadFixed::new(fd, self.buffers.ptr(slot), len, index)
                .offset(offset)
                .build(),
            Direction::Write => opcode::WriteFixed::new(fd, self.buffers.ptr(slot), len, index)
                .offset(offset)
                .build(),
        };
        self.pending[slot] = (direction, offset);
        self.push(&entry.user_data(slot as u64))
    }

    fn reap(&mut self, done: &mut Vec<usize>) -> Result<(), String> {
        let first = done.len();
        while done.len() == first {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(format!("io_uring wait on {}: {e}", self.device.path)),
            }
            let mut completed = std::mem::take(&mut self.completed);
            completed.clear();
            completed.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data() as usize, cqe.result())),
            );
            let checked = completed.iter().try_for_each(|&(slot, result)| {
                if slot >= self.pending.len() {
                    return Err(format!("io_uring completion for unknown slot {slot}"));
                }
                self.check(slot, result)?;
                done.push(slot);
                Ok(())
            });
            self.completed = completed;
            checked?;
        }
        Ok(())
    }
}
