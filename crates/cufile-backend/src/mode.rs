//! Which data path cuFile runs: true GPUDirect Storage (through nvidia-fs or the kernel's
//! PCI P2PDMA) or its compatibility mode.

/// How a cuFile transfer actually ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GdsMode {
    /// True GPUDirect Storage through the nvidia-fs kernel module.
    NvidiaFs,
    /// True GPUDirect Storage through the kernel's PCI P2PDMA.
    P2pDma,
    /// cuFile's compatibility mode: POSIX I/O through a host bounce buffer inside libcufile.
    Compat,
}

impl GdsMode {
    /// Short name for reports: "gds-nvfs", "gds-p2pdma" or "compat".
    pub fn as_str(self) -> &'static str {
        match self {
            GdsMode::NvidiaFs => "gds-nvfs",
            GdsMode::P2pDma => "gds-p2pdma",
            GdsMode::Compat => "compat",
        }
    }
}
