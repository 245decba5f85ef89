//! The one way an engine is opened. [`EngineBuilder`] takes storage paths, a capacity and
//! resolved settings, and the few choices a caller makes beyond the settings;
//! [`EngineBuilder::prepare`] sets up the device, the backend and the storage (a directory
//! gets an anonymous file, or on tmpfs several, see [`spread_files`]; several paths are
//! striped over; the capacity is accounted per filesystem), and [`PreparedEngine::start`]
//! starts the engine on them. [`open_engine`](super::open_engine) (the Python package, the
//! C ABI) and `spillway bench --workload tensors` both open their engines here.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use spillway_runtime::engine::{Engine, StorageTarget};
use spillway_runtime::{
    open_target, Backend, DirectIo, Error, HostTierBackend, HostTierConfig, Result, Target,
};
use spillway_spdk::pci::PciAddress;

use super::error::OpenError;
use super::handles::Handles;
use super::{check_resources, spread_files, storage_capacity, EngineInfo, OpenedEngine};
use crate::choice::BackendChoice;
use crate::rank::{self, LocalRank};
use crate::select::{self, Choices, Memory, Setup};
use crate::settings::Resolved;
use crate::size::format_size;

/// How the spdk backend is told its NVMe controller.
#[derive(Clone, Copy, Debug)]
enum Controller {
    /// The storage path is the controller's PCI address (the library's way).
    FromPath,
    /// Given apart from the paths; `None`: none given, which the spdk backend refuses.
    Given(Option<PciAddress>),
}

/// What an engine is opened on: storage paths, a capacity and resolved settings, with the
/// few choices a caller may make beyond the settings (O_DIRECT, the local rank, the NVMe
/// controller). [`EngineBuilder::open`] opens it; [`EngineBuilder::prepare`] stops short of
/// starting the engine, for a caller that needs the device first.
#[derive(Clone, Debug)]
pub struct EngineBuilder<'a> {
    paths: &'a [PathBuf],
    capacity: Option<u64>,
    settings: &'a Resolved,
    direct: DirectIo,
    rank: Option<LocalRank>,
    controller: Controller,
}

impl<'a> EngineBuilder<'a> {
    /// An engine on `paths` of at most `capacity` bytes (`None`: half of the free space) with
    /// `settings`; see [`open_engine`](super::open_engine) for what the paths may be. By
    /// default O_DIRECT is preferred, no local rank is considered and with the spdk backend
    /// the path is the controller's PCI address.
    pub fn new(paths: &'a [PathBuf], capacity: Option<u64>, settings: &'a Resolved) -> Self {
        EngineBuilder {
            paths,
            capacity,
            settings,
            direct: DirectIo::Preferred,
            rank: None,
            controller: Controller::FromPath,
        }
    }

    /// Whether the storage is opened with O_DIRECT ([`DirectIo::Off`]: through the page
    /// cache, the bench's `--buffered`).
    pub fn direct(mut self, direct: DirectIo) -> Self {
        self.direct = direct;
        self
    }

    /// This process's local rank under a multi-process launcher: its entry in the
    /// `rank_paths` setting replaces the paths; without one, a file path is made the rank's
    /// own ([`rank::make_own`]) and a block device is left to rank 0.
    pub fn rank(mut self, rank: Option<LocalRank>) -> Self {
        self.rank = rank;
        self
    }

    /// The NVMe controller of the spdk backend, given apart from the paths (the bench's
    /// `--pci`) instead of as the path. `None` says none was given, which the spdk backend
    /// refuses; a controller given with another backend is refused too.
    pub fn controller(mut self, pci: Option<PciAddress>) -> Self {
        self.controller = Controller::Given(pci);
        self
    }

    /// Sets up the device, backend and storage and starts the engine.
    pub fn open(&self) -> Result<OpenedEngine> {
        self.prepare()?.start()
    }

    /// Sets up the device, backend and storage, checking the capacity against the space and
    /// memory they have, without starting the engine. A capacity the storage cannot hold is
    /// refused as [`OpenError::Capacity`], with the figures of the filesystem (or memory)
    /// short of it.
    pub fn prepare(&self) -> Result<PreparedEngine, OpenError> {
        let settings = self.settings;
        let (mut paths, note) = settings.rank_paths.choose(self.paths, self.rank)?;
        let mut notes: Vec<String> = note.into_iter().collect();
        // Paths every rank was given alike must not be shared: each rank gets its own file.
        // (A controller is claimed by one process anyway; rank_paths entries are the rank's.)
        let spdk = settings.choices.backend == BackendChoice::Spdk;
        if let Some(rank) = self.rank.filter(|_| notes.is_empty() && !spdk) {
            notes.extend(rank::make_own(&mut paths, rank)?);
        }
        let mut prepared = self.prepare_paths(&paths)?;
        prepared.notes.extend(notes);
        Ok(prepared)
    }

    fn prepare_paths(&self, paths: &[PathBuf]) -> Result<PreparedEngine, OpenError> {
        let (capacity, settings) = (self.capacity, self.settings);
        check_resources(paths.len(), capacity, settings)?;
        let path = match paths {
            [] => {
                return Err(Error::invalid(
                    "no storage path given: pass a path or a list of paths (or, under a launcher, set rank_paths with an entry for each local rank)",
                )
                .into())
            }
            [one] => one,
            _ => return self.prepare_striped(paths),
        };
        if settings.choices.backend != BackendChoice::Spdk && path.is_dir() {
            let (files, why) = spread_files(path, settings.spread_files);
            if files > 1 {
                return self.prepare_spread(path, files, why);
            }
        }
        if settings.choices.backend == BackendChoice::Spdk {
            return self.prepare_controller(path);
        }
        self.prepare_file(path)
    }

    /// Directory `dir` spread over `files` anonymous files, striped (`why`: for the note).
    fn prepare_spread(&self, dir: &Path, files: u32, why: &str) -> Result<PreparedEngine, OpenError> {
        let settings = self.settings;
        check_resources(files as usize, self.capacity, settings)?;
        let spread = vec![dir.to_path_buf(); files as usize];
        let mut prepared = self.prepare_striped(&spread)?;
        prepared.shown = dir.to_path_buf();
        prepared.anonymous = true;
        prepared.notes.push(format!(
            "{} spread over {files} anonymous files striped in {} units ({why})",
            dir.display(),
            format_size(settings.stripe_bytes)
        ));
        Ok(prepared)
    }

    /// The settings' device and backend choices, with the controller given apart from the
    /// paths, if one was.
    fn choices(&self) -> Choices {
        let mut choices = self.settings.choices;
        if let Controller::Given(pci) = self.controller {
            choices.pci = pci;
        }
        choices
    }

    /// The spdk backend on the controller `path` names (or the one given apart from it).
    fn prepare_controller(&self, path: &Path) -> Result<PreparedEngine, OpenError> {
        let mut choices = self.choices();
        if let Controller::FromPath = self.controller {
            choices.pci = Some(controller_address(path)?);
        }
        let setup = select::setup(choices, &self.settings.faults)?;
        // The userspace NVMe driver: no filesystem, no page cache; nothing to probe.
        let mut prepared = self.prepared(setup, path, self.capacity, None, None);
        prepared.settings.choices = choices;
        Ok(prepared)
    }

    /// One file, block device or directory (an anonymous file in it).
    fn prepare_file(&self, path: &Path) -> Result<PreparedEngine, OpenError> {
        let (capacity, settings) = (self.capacity, self.settings);
        let setup = select::setup(self.choices(), &settings.faults)?;
        let (path, anonymous) = storage_file(path)?;
        let is_block = std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_block_device());
        if is_block && capacity.is_none() {
            return Err(Error::invalid(format!(
                "{} is a block device: pass capacity= (the bytes the engine may use on it)",
                path.display()
            ))
            .into());
        }
        let reserve = capacity.filter(|_| !is_block);
        let capacity = storage_capacity(&[(path.clone(), anonymous)], &[], 1, capacity, settings.host_tier)?;
        let probe = self.target(&path, reserve);
        let mut prepared = self.prepared(setup, &path, Some(capacity), reserve, Some(probe));
        prepared.anonymous = anonymous;
        Ok(prepared)
    }

    /// Several paths striped into one set (`stripe_bytes` units, `stripe_weights` of them
    /// per path and round), each with a backend of its own. With a capacity, each path
    /// reserves its weight's share of it up front; without, the paths on each filesystem
    /// share half of its free space (see [`storage_capacity`]), used as needed: nothing is
    /// taken up front (on tmpfs that would be host memory held for nothing).
    fn prepare_striped(&self, paths: &[PathBuf]) -> Result<PreparedEngine, OpenError> {
        let (capacity, settings) = (self.capacity, self.settings);
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            let (file, anonymous) = storage_file(p)?;
            if std::fs::metadata(&file).is_ok_and(|m| m.file_type().is_block_device()) && capacity.is_none() {
                return Err(Error::invalid(format!(
                    "{} is a block device: pass capacity= (the bytes the engine may use over all paths)",
                    file.display()
                ))
                .into());
            }
            files.push((file, anonymous));
        }
        let members: Vec<PathBuf> = files.iter().map(|(f, _)| f.clone()).collect();
        let (setup, name) = select::setup_striped(
            self.choices(),
            &settings.faults,
            &members,
            settings.stripe_bytes,
            &settings.stripe_weights,
        )?;
        let total = storage_capacity(
            &files,
            &settings.stripe_weights,
            settings.stripe_bytes,
            capacity,
            settings.host_tier,
        )?;
        // The members are opened alike: the first stands for them all.
        let probe = self.target(&members[0], None);
        Ok(self.prepared(setup, &name, Some(total), capacity.map(|_| total), Some(probe)))
    }

    /// The storage target `path` as the engine opens it, reserving `reserve` bytes.
    fn target(&self, path: &Path, reserve: Option<u64>) -> Target {
        Target {
            path: path.to_path_buf(),
            direct: self.direct,
            create: true,
            reserve,
        }
    }

    /// The prepared engine on `path` (a file, a controller's address or a striped set's
    /// name) with the builder's settings, reserving `reserve` bytes of it up front.
    fn prepared(
        &self,
        setup: Setup,
        path: &Path,
        capacity: Option<u64>,
        reserve: Option<u64>,
        probe: Option<Target>,
    ) -> PreparedEngine {
        PreparedEngine {
            setup,
            target: self.target(path, reserve),
            shown: path.to_path_buf(),
            anonymous: false,
            capacity,
            notes: Vec::new(),
            settings: Resolved {
                choices: self.choices(),
                ..self.settings.clone()
            },
            probe,
        }
    }
}

/// An engine's device, backend and storage, set up and checked, before the engine starts
/// ([`PreparedEngine::start`]).
#[derive(Debug)]
pub struct PreparedEngine {
    setup: Setup,
    /// The storage target the engine opens.
    target: Target,
    /// The path reports name (the directory of a spread set rather than the set's name).
    shown: PathBuf,
    /// True when the data lives in anonymous files.
    anonymous: bool,
    /// Bytes the engine may store; `None`: all of the target (a controller's namespace).
    capacity: Option<u64>,
    /// Choices made besides the setup's (a spread directory, a rank's paths).
    notes: Vec<String>,
    settings: Resolved,
    /// A storage file opened as the engine opens it, to tell whether O_DIRECT is in effect;
    /// `None` for a controller.
    probe: Option<Target>,
}

/// Whether the storage of an engine is opened with O_DIRECT, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectIoProbe {
    /// O_DIRECT is in effect.
    pub direct_io: bool,
    /// Why not, when O_DIRECT was preferred but is not in effect.
    pub warning: Option<String>,
}

impl PreparedEngine {
    /// The device, the memory and the backend the engine will run on.
    pub fn setup(&self) -> &Setup {
        &self.setup
    }

    /// The choices made for the caller so far, as [`EngineInfo::notes`] will list them.
    pub fn notes(&self) -> impl Iterator<Item = &String> {
        self.setup.notes.iter().chain(&self.notes)
    }

    /// Opens the storage (its first file, for a striped set) as the engine will and closes
    /// it again, to say whether O_DIRECT is in effect. An anonymous file opened here is
    /// another one, gone once closed; a named file is created and its space reserved as the
    /// engine would. A controller (the spdk backend) has no page cache: always O_DIRECT.
    pub fn probe_direct_io(&self) -> Result<DirectIoProbe> {
        let Some(target) = &self.probe else {
            return Ok(DirectIoProbe {
                direct_io: true,
                warning: None,
            });
        };
        let opened = open_target(target)?;
        Ok(DirectIoProbe {
            direct_io: opened.direct_io,
            warning: opened.warning.clone(),
        })
    }

    /// Opens the storage target on the backend and starts the engine, with the `host_tier`
    /// setting's pinned host memory in front of the backend. Without a capacity, the engine
    /// may use all of the target (a controller's namespace).
    pub fn start(self) -> Result<OpenedEngine> {
        let PreparedEngine {
            setup,
            target,
            shown,
            anonymous,
            capacity,
            notes,
            settings,
            ..
        } = self;
        let capacity = aligned_capacity(&setup, &target.path, capacity, settings.engine.alignment)?;
        let host_tier = host_tier(&setup, settings.host_tier, settings.engine.alignment)?;
        let backend: Arc<dyn Backend> = match &host_tier {
            Some(tier) => tier.clone(),
            None => setup.backend.clone(),
        };
        let engine = Engine::new(
            setup.device.clone(),
            backend,
            vec![StorageTarget::new(target, capacity)],
            settings.engine.clone(),
        )?;
        if let Some(tier) = &host_tier {
            tier.record_on(engine.timeline_handle());
        }
        let device = match &setup.memory {
            Memory::Gpu(g) => format!("cuda:{}", g.ordinal()),
            Memory::Host => "host".to_string(),
        };
        Ok(OpenedEngine {
            engine,
            device: setup.device,
            memory: setup.memory,
            info: EngineInfo {
                path: shown,
                anonymous,
                capacity,
                device,
                backend: setup.backend.info().name.to_string(),
                notes: setup.notes.into_iter().chain(notes).collect(),
                settings,
            },
            striped: setup.striped,
            faults: setup.faults,
            host_tier,
            handles: Mutex::new(Handles::default()),
        })
    }
}

/// `capacity` (without one, the size of the target at `path` as `setup`'s backend opens
/// it) rounded down to whole `align`-byte units; refused when that is none.
fn aligned_capacity(setup: &Setup, path: &Path, capacity: Option<u64>, align: u64) -> Result<u64> {
    let capacity = match capacity {
        Some(c) => c,
        None => {
            let (id, info) = setup.backend.open(&Target::new(path))?;
            setup.backend.close(id)?;
            info.size
        }
    };
    let capacity = capacity / align * align;
    if capacity == 0 {
        return Err(Error::invalid(format!(
            "the storage capacity at {} is below one {align}-byte unit: free space there or pass a larger capacity=",
            path.display()
        )));
    }
    Ok(capacity)
}

/// A pinned host-memory tier of `bytes` (the `host_tier` setting) in front of `setup`'s
/// backend, taking writes aligned as the engine lays them out (`align`); `None` for 0.
/// [`check_resources`] checks first that the host can give that much memory, before
/// anything is allocated.
fn host_tier(setup: &Setup, bytes: u64, align: u64) -> Result<Option<Arc<HostTierBackend>>> {
    if bytes == 0 {
        return Ok(None);
    }
    let tier = HostTierBackend::new(
        setup.backend.clone(),
        setup.device.clone(),
        HostTierConfig {
            bytes,
            align,
            ..HostTierConfig::default()
        },
    )?;
    Ok(Some(Arc::new(tier)))
}

/// With `backend="spdk"` the path names the NVMe controller by its PCI address.
fn controller_address(path: &Path) -> Result<PciAddress> {
    let text = path.to_string_lossy();
    text.parse().map_err(|e| {
        Error::invalid(format!(
            "with backend=\"spdk\" the path is the NVMe controller's PCI address (e.g. \"0000:01:00.0\", see `spillway nvme list`), not {text:?}: {e}"
        ))
    })
}

/// The file to store in, and whether it is anonymous: a new anonymous file when `path` is
/// a directory.
fn storage_file(path: &Path) -> Result<(PathBuf, bool)> {
    if path.as_os_str().is_empty() {
        return Err(Error::invalid(
            "the storage path is empty: pass a directory, file or block device on fast storage",
        ));
    }
    spillway_runtime::check_storage_path(path)?;
    if !path.is_dir() {
        return Ok((path.to_path_buf(), false));
    }
    // A directory target opens as an anonymous file in it (O_TMPFILE, or created and
    // unlinked at once): it never has a name, so nothing is left behind even after a kill.
    Ok((path.to_path_buf(), true))
}
