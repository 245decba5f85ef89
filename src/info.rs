//! `spillway info`: what this machine offers spillway — GPUs, driver, kernels, cuFile and
//! GDS, io_uring, NVMe controllers, and O_DIRECT on a path (and, for a directory, how
//! anonymous offload files are made in it).

use std::path::{Path, PathBuf};

use serde::Serialize;
use spillway_runtime::{anonymous_mode, open_target, AnonymousMode, DirectIo, Result, Target};

use crate::cli::InfoArgs;
use crate::cuda;
use crate::nvme::{self, NvmeController};
use crate::size::format_size;

/// Everything `spillway info` reports; `--json` prints it as is.
#[derive(Debug, Serialize)]
pub struct InfoReport {
    /// spillway's version.
    pub version: String,
    /// CUDA driver version ("13.0") or why there is none.
    #[serde(serialize_with = "availability")]
    pub cuda_driver: std::result::Result<String, String>,
    /// The GPUs the driver sees.
    pub gpus: Vec<Gpu>,
    /// How the kernels were built into this binary.
    pub kernels: String,
    /// libcufile: loaded (with its version) or why not.
    #[serde(serialize_with = "availability")]
    pub cufile: std::result::Result<String, String>,
    /// "gds-nvfs", "gds-p2pdma" or "compat" when cuFile loaded.
    pub gds_mode: Option<String>,
    /// cuFile driver properties, by name.
    #[serde(serialize_with = "by_name")]
    pub cufile_details: Vec<(String, String)>,
    /// io_uring: usable, or why not.
    #[serde(serialize_with = "availability")]
    pub io_uring: std::result::Result<(), String>,
    /// NVMe controllers, their drivers and VFIO groups.
    pub nvme: Vec<NvmeController>,
    /// Why the NVMe controllers could not be listed, when they could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvme_error: Option<String>,
    /// Whether `--path`, when given, can be a target, and its O_DIRECT support.
    pub path: Option<PathCheck>,
}

/// A feature in the JSON: `{"available": true, "detail": ...}` (no `detail` when there is
/// nothing more to say), or `{"available": false, "error": "why, and what to do"}`.
fn availability<T: Serialize, S: serde::Serializer>(
    r: &std::result::Result<T, String>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(None)?;
    match r {
        Ok(detail) => {
            map.serialize_entry("available", &true)?;
            let value = serde_json::to_value(detail).map_err(serde::ser::Error::custom)?;
            if !value.is_null() {
                map.serialize_entry("detail", &value)?;
            }
        }
        Err(e) => {
            map.serialize_entry("available", &false)?;
            map.serialize_entry("error", e)?;
        }
    }
    map.end()
}

/// Name–value pairs as one JSON object, in their order.
fn by_name<S: serde::Serializer>(pairs: &[(String, String)], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

/// One GPU.
#[derive(Debug, Serialize)]
pub struct Gpu {
    /// CUDA ordinal.
    pub ordinal: usize,
    /// Product name.
    pub name: String,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// "9.0".
    pub compute_capability: String,
    /// PCI bus id.
    pub pci_bus_id: String,
}

/// Whether a path can be a storage target, and whether it supports O_DIRECT.
#[derive(Debug, Serialize)]
pub struct PathCheck {
    /// The path checked.
    pub path: PathBuf,
    /// True when a file there opened with O_DIRECT.
    pub direct_io: bool,
    /// Offset/length alignment O_DIRECT needs there, in bytes.
    pub offset_align: Option<usize>,
    /// Memory alignment O_DIRECT needs there, in bytes.
    pub mem_align: Option<usize>,
    /// Why not, when it does not: the error opening the target.
    pub error: Option<String>,
    /// True when the target was refused whatever the O_DIRECT setting: a file that others
    /// may read (its owner or mode: `chmod 600`), a kind of file that cannot hold data, a
    /// path that cannot be opened at all. `error` then says why; O_DIRECT was not what
    /// failed, and is not known.
    pub refused: bool,
    /// For a directory: how anonymous offload files are made in it, "tmpfile" (O_TMPFILE)
    /// or "unlinked-at-once" (created 0600 with O_EXCL and unlinked right away).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymous_mode: Option<AnonymousMode>,
    /// For a directory: why no anonymous file could be made in it, when none could.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymous_error: Option<String>,
}

/// Gathers the report.
pub fn gather(path: Option<&Path>) -> InfoReport {
    let probe = cuda::probe();
    let cufile = spillway_cufile::probe();
    let (nvme, nvme_error) = match nvme::gather(&spillway_spdk::pci::SysRoots::default()) {
        Ok(list) => (list, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    InfoReport {
        version: env!("CARGO_PKG_VERSION").to_string(),
        cuda_driver: probe
            .driver
            .map(|d| format!("{}.{} ({})", d.cuda_version.0, d.cuda_version.1, d.library)),
        gpus: probe
            .gpus
            .into_iter()
            .map(|g| Gpu {
                ordinal: g.ordinal,
                name: g.name,
                memory_bytes: g.total_memory,
                compute_capability: format!("{}.{}", g.compute_capability.0, g.compute_capability.1),
                pci_bus_id: g.pci_bus_id,
            })
            .collect(),
        kernels: cuda::kernel_build().to_string(),
        cufile: cufile.library.map(|lib| match &cufile.version {
            Some(v) => format!("{lib} (version {v})"),
            None => lib,
        }),
        gds_mode: cufile.gds_mode.map(|m| m.as_str().to_string()),
        cufile_details: cufile.details,
        io_uring: spillway_uring::probe(),
        nvme,
        nvme_error,
        path: path.map(check_path),
    }
}

/// Opens a file at `path` (for a directory, an anonymous file in it, which leaves nothing
/// behind) with O_DIRECT required; for a directory also finds how anonymous files are made.
pub fn check_path(path: &Path) -> PathCheck {
    let is_dir = path.is_dir();
    let target = if is_dir {
        Target::anonymous_in(path).direct(DirectIo::Required)
    } else {
        Target {
            path: path.to_path_buf(),
            direct: DirectIo::Required,
            create: false,
            reserve: None,
        }
    };
    let attempt = |direct: DirectIo| -> Result<(usize, usize)> {
        let opened = open_target(&Target {
            direct,
            ..target.clone()
        })?;
        Ok((opened.offset_align, opened.mem_align))
    };
    let (anonymous_mode, anonymous_error) = match is_dir.then(|| anonymous_mode(path)) {
        Some(Ok(mode)) => (Some(mode), None),
        Some(Err(e)) => (None, Some(e.to_string())),
        None => (None, None),
    };
    match attempt(DirectIo::Required) {
        Ok((offset_align, mem_align)) => PathCheck {
            path: path.to_path_buf(),
            direct_io: true,
            offset_align: Some(offset_align),
            mem_align: Some(mem_align),
            error: None,
            refused: false,
            anonymous_mode,
            anonymous_error,
        },
        Err(e) => {
            // Only a target that opens without O_DIRECT is refused for O_DIRECT; else the
            // target itself is refused, and that error says why.
            let refused = attempt(DirectIo::Off).err();
            PathCheck {
                path: path.to_path_buf(),
                direct_io: false,
                offset_align: None,
                mem_align: None,
                error: Some(refused.as_ref().unwrap_or(&e).to_string()),
                refused: refused.is_some(),
                anonymous_mode,
                anonymous_error,
            }
        }
    }
}

/// `spillway info`.
pub fn run(args: &InfoArgs) -> Result<()> {
    let report = gather(args.path.as_deref());
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report)
                .map_err(|e| spillway_runtime::Error::invalid(e.to_string()))?
        );
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &InfoReport) {
    println!("spillway {}", r.version);
    match &r.cuda_driver {
        Ok(v) => println!("CUDA driver:   {v}"),
        Err(e) => println!("CUDA driver:   unavailable: {e}"),
    }
    if r.gpus.is_empty() {
        println!("GPUs:          none");
    }
    for g in &r.gpus {
        println!(
            "GPU {}:         {}, {}, compute capability {}, PCI {}",
            g.ordinal,
            g.name,
            format_size(g.memory_bytes),
            g.compute_capability,
            g.pci_bus_id
        );
    }
    println!("Kernels:       {}", r.kernels);
    match &r.cufile {
        Ok(v) => println!("cuFile:        {v}"),
        Err(e) => println!("cuFile:        unavailable: {e}"),
    }
    if let Some(mode) = &r.gds_mode {
        let meaning = match mode.as_str() {
            "compat" => "compat mode: POSIX I/O through host memory inside libcufile, not GPUDirect",
            _ => "true GPUDirect Storage: DMA between GPU memory and storage, no CPU bounce buffer",
        };
        println!("GDS mode:      {mode} ({meaning})");
    }
    for (k, v) in &r.cufile_details {
        println!("  {k}: {v}");
    }
    match &r.io_uring {
        Ok(()) => println!("io_uring:      available"),
        Err(e) => println!("io_uring:      unavailable: {e}"),
    }
    print_nvme(r);
    for line in r.path.iter().flat_map(path_lines) {
        println!("{line}");
    }
}

/// The lines about `--path`: the target refused and why, or its O_DIRECT support; for a
/// directory, how offload files are made in it.
fn path_lines(p: &PathCheck) -> Vec<String> {
    let path = p.path.display();
    let mut lines = Vec::new();
    match (&p.error, p.offset_align, p.mem_align) {
        (Some(e), _, _) if p.refused => {
            lines.push(format!("Target:        refused: {e}"));
            lines.push(format!(
                "O_DIRECT:      not checked at {path}: the target was refused"
            ));
        }
        (Some(e), _, _) => lines.push(format!("O_DIRECT:      not usable at {path}: {e}")),
        (None, Some(o), Some(m)) => lines.push(format!(
            "O_DIRECT:      supported at {path} (offset alignment {o} B, memory alignment {m} B)"
        )),
        _ => {}
    }
    match (p.anonymous_mode, &p.anonymous_error) {
        (Some(mode), _) => lines.push(format!(
            "Offload files: anonymous in {path}: {}; nothing is left behind, even by a killed job",
            mode.describe()
        )),
        (None, Some(e)) => lines.push(format!(
            "Offload files: no anonymous file can be made in {path}: {e}"
        )),
        (None, None) => {}
    }
    lines
}

/// The "NVMe controllers" section: each controller's driver and what it offers spillway.
fn print_nvme(r: &InfoReport) {
    for line in nvme_lines(&r.nvme, r.nvme_error.as_deref()) {
        println!("{line}");
    }
}

/// The lines of the "NVMe controllers" section.
fn nvme_lines(list: &[NvmeController], error: Option<&str>) -> Vec<String> {
    if let Some(e) = error {
        return vec![format!("NVMe controllers: cannot list: {e}")];
    }
    if list.is_empty() {
        return vec!["NVMe controllers: none".into()];
    }
    let mut lines = vec!["NVMe controllers:".to_string()];
    for c in list {
        let driver = c.driver.as_deref().unwrap_or("no driver");
        let state = match (&c.vfio_group, c.iommu_group) {
            (Some(group), _) => format!(
                "vfio-pci, {}: usable by the userspace driver (--backend spdk --pci {})",
                group.display(),
                c.address
            ),
            (None, None) => {
                format!("{driver}, no IOMMU group (IOMMU off): not usable by the userspace driver")
            }
            (None, Some(g)) => format!(
                "{driver} ({}), IOMMU group {g}; `spillway nvme bind {}` hands it to the userspace driver",
                c.devices(),
                c.address
            ),
        };
        lines.push(format!("  {} ({}:{}): {state}", c.address, c.vendor, c.device));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvme_section_marks_controllers_usable_by_the_userspace_driver() {
        let kernel = NvmeController {
            address: "0000:01:00.0".into(),
            vendor: "144d".into(),
            device: "a80a".into(),
            driver: Some("nvme".into()),
            iommu_group: Some(3),
            controller: Some("nvme0".into()),
            namespaces: vec!["nvme0n1".into()],
            vfio_group: None,
            userspace_ready: false,
        };
        let vfio = NvmeController {
            address: "0000:02:00.0".into(),
            driver: Some("vfio-pci".into()),
            iommu_group: Some(4),
            controller: None,
            namespaces: Vec::new(),
            vfio_group: Some("/dev/vfio/4".into()),
            userspace_ready: true,
            ..kernel.clone()
        };
        assert_eq!(
            nvme_lines(&[kernel, vfio], None),
            [
                "NVMe controllers:",
                "  0000:01:00.0 (144d:a80a): nvme (nvme0: nvme0n1), IOMMU group 3; `spillway nvme bind \
                 0000:01:00.0` hands it to the userspace driver",
                "  0000:02:00.0 (144d:a80a): vfio-pci, /dev/vfio/4: usable by the userspace driver \
                 (--backend spdk --pci 0000:02:00.0)",
            ]
        );
        assert_eq!(nvme_lines(&[], None), ["NVMe controllers: none"]);
    }

    #[test]
    fn a_refused_target_is_reported_as_refused_not_as_o_direct() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.dat");
        std::fs::write(&file, vec![0u8; 4096]).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let check = check_path(&file);
        let error = check.error.clone().unwrap_or_default();
        assert!(check.refused && !check.direct_io, "{check:?}");
        assert!(
            error.contains("mode 0644") && error.contains("chmod 600"),
            "{error}"
        );
        let lines = path_lines(&check);
        assert_eq!(
            lines,
            [
                format!("Target:        refused: {error}"),
                format!(
                    "O_DIRECT:      not checked at {}: the target was refused",
                    file.display()
                ),
            ]
        );

        // Mode 0600: the target is fine; O_DIRECT works, or is what failed.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let check = check_path(&file);
        assert!(!check.refused, "{check:?}");
        let lines = path_lines(&check);
        assert!(
            lines.len() == 1
                && (lines[0].starts_with("O_DIRECT:      supported at")
                    || lines[0].starts_with("O_DIRECT:      not usable at")),
            "{lines:?}"
        );
    }

    #[test]
    fn a_path_refusing_o_direct_alone_says_so() {
        let check = PathCheck {
            path: "/mnt/f.dat".into(),
            direct_io: false,
            offset_align: None,
            mem_align: None,
            error: Some("the filesystem does not support O_DIRECT".into()),
            refused: false,
            anonymous_mode: None,
            anonymous_error: None,
        };
        assert_eq!(
            path_lines(&check),
            ["O_DIRECT:      not usable at /mnt/f.dat: the filesystem does not support O_DIRECT"]
        );
    }
}
