//! Cross-checks the userspace driver against Linux's nvme driver on the same controller,
//! handing the controller between them with the library's bind and unbind (as `spillway
//! nvme bind/unbind` does):
//!
//! 0. tries to bind to vfio-pci while the namespace holds a mounted filesystem, and while
//!    it is in use as swap — both must be refused, naming the use;
//! 1. with the kernel driver bound, writes pattern K through the block device (O_DIRECT);
//! 2. tries to bind to vfio-pci while another process holds the block device open — this
//!    must be refused, naming that process;
//! 3. binds to vfio-pci, reads K back with the userspace driver, writes pattern S
//!    elsewhere, and shuts the controller down;
//! 4. tries to unbind while another process holds the VFIO group open — refused too;
//! 5. gives the controller back to the kernel and reads S through the block device.
//!
//! Both reads must be byte-identical to what the other driver wrote. Runs in the VM with
//! NVMEVM_BIND=nvme (the harness then also loads the vfio modules).
//!
//! Usage: `nvme_crosscheck [PCI_ADDRESS]`, defaulting to `NVMEVM_PCI`.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode};

use common::random_io::Rng;
use spillway_spdk::controller::{Controller, IO_QUEUE_ENTRIES};
use spillway_spdk::pci::{bind_vfio, unbind_vfio, PciAddress, PciError, SysRoots};
use spillway_spdk::vfio::DmaBuffer;

/// Bytes per region, and where the regions are on the namespace.
const REGION: usize = 1 << 20;
const KERNEL_WRITES_AT: u64 = 8 << 20;
const DRIVER_WRITES_AT: u64 = 24 << 20;

type Outcome = Result<bool, String>;

fn pattern(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; REGION];
    Rng(seed).fill(&mut v);
    v
}

/// A 4096-byte aligned copy of `len` bytes for O_DIRECT, as (storage, offset of the
/// aligned start).
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + 4096];
    let skew = (4096 - v.as_ptr() as usize % 4096) % 4096;
    (v, skew)
}

fn open_direct(path: &PathBuf, write: bool) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("open {} with O_DIRECT: {e}", path.display()))
}

fn kernel_write(dev: &PathBuf, at: u64, data: &[u8]) -> Result<(), String> {
    let f = open_direct(dev, true)?;
    let (mut buf, skew) = aligned(data.len());
    buf[skew..skew + data.len()].copy_from_slice(data);
    f.write_all_at(&buf[skew..skew + data.len()], at)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("write {} at {at}: {e}", dev.display()))
}

fn kernel_read(dev: &PathBuf, at: u64, len: usize) -> Result<Vec<u8>, String> {
    let f = open_direct(dev, false)?;
    let (mut buf, skew) = aligned(len);
    f.read_exact_at(&mut buf[skew..skew + len], at)
        .map_err(|e| format!("read {} at {at}: {e}", dev.display()))?;
    Ok(buf[skew..skew + len].to_vec())
}

/// A process that holds `path` open until killed.
fn holder(path: &str) -> Result<Child, String> {
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 3<>{path}; echo ready; exec sleep 60"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("start a process holding {path}: {e}"))?;
    // Wait until it has the file open.
    let mut child = child;
    let mut line = String::new();
    if let Some(out) = child.stdout.as_mut() {
        use std::io::BufRead;
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .map_err(|e| format!("wait for the holder: {e}"))?;
    }
    Ok(child)
}

fn expect_in_use(name: &str, outcome: Result<impl std::fmt::Debug, PciError>, naming: &str) -> bool {
    match outcome {
        Err(e @ PciError::InUse { .. }) if e.to_string().contains(naming) => {
            println!("{name}: refused as expected:\n{e}");
            true
        }
        other => {
            println!("{name}: expected a refusal naming {naming:?}, got {other:?}");
            false
        }
    }
}

/// Runs a shell command in the guest (busybox applets).
fn sh(command: &str) -> Result<(), String> {
    let status = Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
        .map_err(|e| format!("run {command:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed: {status}"))
    }
}

/// Binding must be refused while the namespace is mounted, and while it is swap.
fn refused_while_mounted_or_swap(roots: &SysRoots, addr: PciAddress, dev: &str) -> Result<bool, String> {
    sh(&format!(
        "mke2fs -q {dev} >/dev/null && mkdir -p /mnt/ns && mount -t ext2 {dev} /mnt/ns"
    ))?;
    let ok = expect_in_use(
        "bind while mounted",
        bind_vfio(roots, addr),
        "is mounted at /mnt/ns",
    );
    sh("umount /mnt/ns")?;
    sh(&format!("mkswap {dev} >/dev/null && swapon {dev}"))?;
    let ok2 = expect_in_use(
        "bind while used as swap",
        bind_vfio(roots, addr),
        "in use as swap",
    );
    sh(&format!("swapoff {dev}"))?;
    Ok(ok && ok2)
}

fn run(pci: &str) -> Outcome {
    let roots = SysRoots::default();
    let addr: PciAddress = pci.parse().map_err(|e: PciError| e.to_string())?;
    let mut ok = true;

    // 0. Refused while mounted or swap.
    let dev = common::wait_block_device(&roots, addr)?;
    ok &= refused_while_mounted_or_swap(&roots, addr, &dev.to_string_lossy())?;

    // 1. The kernel writes K.
    let k = pattern(0x4B45_524E);
    kernel_write(&dev, KERNEL_WRITES_AT, &k)?;
    println!(
        "kernel nvme driver: wrote {} bytes at {KERNEL_WRITES_AT} through {}",
        REGION,
        dev.display()
    );

    // 2. Refused while another process holds the namespace open.
    let mut h = holder(&dev.to_string_lossy())?;
    ok &= expect_in_use(
        "bind while the block device is open",
        bind_vfio(&roots, addr),
        &format!("pid {}", h.id()),
    );
    let _ = h.kill();
    let _ = h.wait();

    // 3. The userspace driver reads K and writes S.
    let bound = bind_vfio(&roots, addr).map_err(|e| e.to_string())?;
    let group = bound
        .function
        .vfio_group_path(&roots)
        .ok_or("bound to vfio-pci but no VFIO group file")?;
    println!(
        "bound {addr} to vfio-pci (was {:?}), group {}",
        bound.previous_driver,
        group.display()
    );
    let s = pattern(0x5350_444B);
    {
        let ctrl = Controller::open(pci, &group).map_err(|e| e.to_string())?;
        let mut q = ctrl
            .create_io_queue(IO_QUEUE_ENTRIES)
            .map_err(|e| e.to_string())?;
        let bs = u64::from(ctrl.namespace().block_size());
        let mut buf = DmaBuffer::new(ctrl.container(), REGION).map_err(|e| e.to_string())?;
        q.read(KERNEL_WRITES_AT / bs, &mut buf, 0..REGION)
            .map_err(|e| e.to_string())?;
        let same = buf.as_slice() == k.as_slice();
        println!(
            "userspace driver: read what the kernel wrote: {}",
            if same { "byte-identical" } else { "DIFFERENT" }
        );
        ok &= same;
        buf.as_mut_slice().copy_from_slice(&s);
        q.write(DRIVER_WRITES_AT / bs, &buf, 0..REGION)
            .map_err(|e| e.to_string())?;
        q.flush().map_err(|e| e.to_string())?;
        println!("userspace driver: wrote {REGION} bytes at {DRIVER_WRITES_AT}");

        // 4. Refused while another process holds the group open (this one does).
        drop(q);
        ctrl.close().map_err(|e| e.to_string())?;
    }
    let mut h = holder(&group.to_string_lossy())?;
    ok &= expect_in_use(
        "unbind while the VFIO group is open",
        unbind_vfio(&roots, addr),
        &format!("pid {}", h.id()),
    );
    let _ = h.kill();
    let _ = h.wait();

    // 5. Back to the kernel, which reads S.
    let back = unbind_vfio(&roots, addr).map_err(|e| e.to_string())?;
    println!(
        "gave {addr} back to the kernel: driver {:?}",
        back.function.driver
    );
    let dev = common::wait_block_device(&roots, addr)?;
    let got = kernel_read(&dev, DRIVER_WRITES_AT, REGION)?;
    let same = got == s;
    println!(
        "kernel nvme driver: read what the userspace driver wrote through {}: {}",
        dev.display(),
        if same { "byte-identical" } else { "DIFFERENT" }
    );
    ok &= same;
    Ok(ok)
}

fn main() -> ExitCode {
    let pci = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("NVMEVM_PCI").ok());
    let Some(pci) = pci else {
        eprintln!("nvme_crosscheck: pass the PCI address or set NVMEVM_PCI");
        return ExitCode::FAILURE;
    };
    common::exit_status("nvme_crosscheck", run(&pci), "PASS")
}
