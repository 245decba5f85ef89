//! The choices made by name — which backend moves the bytes, where tensors live — each
//! spelt once, here: the settings table, the command line (`--backend`, `--mem`) and the
//! bindings all read these names.

/// Which backend moves the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring with O_DIRECT; GPU memory staged through pinned host buffers.
    Uring,
    /// NVIDIA cuFile (GPUDirect Storage, or its compat mode).
    Cufile,
    /// spillway's userspace NVMe driver on a controller bound to vfio-pci (`spillway nvme
    /// bind`); its namespace 1 is the target.
    Spdk,
    /// cuFile when it runs true GDS for GPU memory, io_uring otherwise.
    Auto,
}

impl BackendChoice {
    /// Every choice, in the order `--help` lists them.
    pub const ALL: [BackendChoice; 4] = [Self::Uring, Self::Cufile, Self::Spdk, Self::Auto];

    /// Its name, as settings, flags and reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Uring => "uring",
            Self::Cufile => "cufile",
            Self::Spdk => "spdk",
            Self::Auto => "auto",
        }
    }

    /// The choice named `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// One line on what it does, for `--help`.
    pub fn help(self) -> &'static str {
        match self {
            Self::Uring => "io_uring with O_DIRECT; GPU memory staged through pinned host buffers",
            Self::Cufile => "NVIDIA cuFile (GPUDirect Storage, or its compat mode)",
            Self::Spdk => {
                "spillway's userspace NVMe driver on the controller given by --pci (bound to vfio-pci \
                 first with `spillway nvme bind`); its namespace 1 is the target"
            }
            Self::Auto => "cuFile when it runs true GDS for GPU memory, io_uring otherwise",
        }
    }
}

/// Where tensors (or the benchmark's buffers) live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemChoice {
    /// GPU memory.
    Gpu,
    /// Host memory.
    Host,
    /// GPU memory when a GPU is present, host memory otherwise.
    Auto,
}

impl MemChoice {
    /// Every choice, in the order `--help` lists them.
    pub const ALL: [MemChoice; 3] = [Self::Gpu, Self::Host, Self::Auto];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gpu => "gpu",
            Self::Host => "host",
            Self::Auto => "auto",
        }
    }

    /// One line on what it does, for `--help`.
    pub fn help(self) -> &'static str {
        match self {
            Self::Gpu => "GPU memory (device --gpu)",
            Self::Host => "host memory",
            Self::Auto => "GPU memory when a GPU is present, host memory otherwise",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_backend_name_reads_back_as_its_choice() {
        for c in BackendChoice::ALL {
            assert_eq!(BackendChoice::from_name(c.name()), Some(c));
        }
        assert_eq!(BackendChoice::from_name("nvme"), None);
    }
}
