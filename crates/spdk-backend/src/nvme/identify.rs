//! Identify data structures ("Identify Controller Data Structure", "Identify Namespace Data
//! Structure" of the NVM command set, "Active Namespace ID list").
//!
//! Each is 4096 bytes, little-endian. The parsers take a slice and check its length, keep
//! only the fields the driver uses, and validate what they keep (a namespace's selected LBA
//! format must exist and have a sane block size).

use thiserror::Error;

use crate::nvme::regs::Version;

/// Length of every Identify data structure.
pub const IDENTIFY_DATA_LEN: usize = 4096;

/// The most LBA formats a namespace can list: 16 in NVMe 1.4 (bytes 128..192), 64 in 2.0
/// (bytes 128..384).
pub const MAX_LBA_FORMATS: usize = 64;

/// Smallest LBA data size the specification allows (LBADS >= 9, 512 bytes).
pub const MIN_LBADS: u8 = 9;
/// Largest LBA data size accepted here (LBADS <= 31); larger values mean corrupt data.
pub const MAX_LBADS: u8 = 31;

/// Errors parsing Identify data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IdentifyError {
    /// The buffer is not 4096 bytes.
    #[error("Identify data is {IDENTIFY_DATA_LEN} bytes, got {len}")]
    Length {
        /// The length given.
        len: usize,
    },
    /// NSZE is 0: the namespace ID names no active namespace (an inactive namespace's
    /// Identify Namespace data is all zeros).
    #[error("the namespace is not active (its size, NSZE, is 0)")]
    InactiveNamespace,
    /// NLBAF claims more formats than the structure holds.
    #[error("the namespace lists {count} LBA formats; at most {MAX_LBA_FORMATS} exist")]
    FormatCount {
        /// NLBAF + 1.
        count: usize,
    },
    /// FLBAS selects a format beyond those NLBAF lists.
    #[error("FLBAS selects LBA format {index} but the namespace lists only {count}")]
    FormatIndex {
        /// The selected index.
        index: usize,
        /// The number of formats listed.
        count: usize,
    },
    /// The selected format's LBADS is outside 9..=31 (0 means the format is unavailable).
    #[error(
        "LBA format {index} has LBADS {lbads}, i.e. no usable block size \
         (blocks are 2^LBADS bytes with LBADS in {MIN_LBADS}..={MAX_LBADS})"
    )]
    BlockSize {
        /// The format's index.
        index: usize,
        /// Its LBADS.
        lbads: u8,
    },
}

fn check_len(data: &[u8]) -> Result<&[u8; IDENTIFY_DATA_LEN], IdentifyError> {
    data.try_into()
        .map_err(|_| IdentifyError::Length { len: data.len() })
}

fn u16_at(d: &[u8; IDENTIFY_DATA_LEN], at: usize) -> u16 {
    u16::from_le_bytes([d[at], d[at + 1]])
}

fn u32_at(d: &[u8; IDENTIFY_DATA_LEN], at: usize) -> u32 {
    u32::from_le_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]])
}

fn u64_at(d: &[u8; IDENTIFY_DATA_LEN], at: usize) -> u64 {
    u64::from(u32_at(d, at)) | u64::from(u32_at(d, at + 4)) << 32
}

/// An ASCII string field: padded with spaces by the specification (some devices pad with
/// NULs, or pad on the left); both are trimmed. Bytes that are not UTF-8 become U+FFFD.
fn ascii_field(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_matches(|c| c == ' ' || c == '\0')
        .to_string()
}

/// A queue entry size range from SQES or CQES: log2 of the required (minimum) and maximum
/// entry sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntrySizes {
    /// log2 of the required entry size (bits 3:0).
    pub required: u8,
    /// log2 of the largest entry size (bits 7:4).
    pub max: u8,
}

impl EntrySizes {
    fn from_byte(b: u8) -> Self {
        EntrySizes {
            required: b & 0xF,
            max: b >> 4,
        }
    }

    /// Whether an entry of `2 ^ log2` bytes is allowed.
    pub fn allows(self, log2: u8) -> bool {
        (self.required..=self.max).contains(&log2)
    }
}

/// The fields of the Identify Controller data structure (CNS 01h) the driver uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerInfo {
    /// VID, PCI Vendor ID (bytes 1:0).
    pub vid: u16,
    /// SSVID, PCI Subsystem Vendor ID (bytes 3:2).
    pub ssvid: u16,
    /// SN, Serial Number (bytes 23:4), trimmed.
    pub serial: String,
    /// MN, Model Number (bytes 63:24), trimmed.
    pub model: String,
    /// FR, Firmware Revision (bytes 71:64), trimmed.
    pub firmware: String,
    /// MDTS, Maximum Data Transfer Size (byte 77), as reported: see
    /// [`ControllerInfo::max_transfer_bytes`].
    pub mdts: u8,
    /// CNTLID, Controller ID (bytes 79:78).
    pub cntlid: u16,
    /// VER, Version (bytes 83:80); `None` when 0 (controllers before 1.2 need not report
    /// it here; read the VS register instead).
    pub version: Option<Version>,
    /// SQES, Submission Queue Entry Size (byte 512).
    pub sqes: EntrySizes,
    /// CQES, Completion Queue Entry Size (byte 513).
    pub cqes: EntrySizes,
    /// MAXCMD, Maximum Outstanding Commands (bytes 515:514); 0 when not reported.
    pub maxcmd: u16,
    /// NN, Number of Namespaces (bytes 519:516): the largest namespace ID.
    pub nn: u32,
    /// ONCS, Optional NVM Command Support (bytes 521:520).
    pub oncs: u16,
    /// VWC, Volatile Write Cache (byte 525).
    pub vwc: u8,
}

impl ControllerInfo {
    /// Parses an Identify Controller data structure.
    pub fn parse(data: &[u8]) -> Result<Self, IdentifyError> {
        let d = check_len(data)?;
        let ver = u32_at(d, 80);
        Ok(ControllerInfo {
            vid: u16_at(d, 0),
            ssvid: u16_at(d, 2),
            serial: ascii_field(&d[4..24]),
            model: ascii_field(&d[24..64]),
            firmware: ascii_field(&d[64..72]),
            mdts: d[77],
            cntlid: u16_at(d, 78),
            version: (ver != 0).then(|| Version::from_raw(ver)),
            sqes: EntrySizes::from_byte(d[512]),
            cqes: EntrySizes::from_byte(d[513]),
            maxcmd: u16_at(d, 514),
            nn: u32_at(d, 516),
            oncs: u16_at(d, 520),
            vwc: d[525],
        })
    }

    /// The largest data transfer of one command in bytes, `2 ^ MDTS` pages of the
    /// controller's minimum memory page size (`min_page_size`, from CAP.MPSMIN); `None` when
    /// MDTS is 0 (no limit). Saturates at `u64::MAX`.
    pub fn max_transfer_bytes(&self, min_page_size: u64) -> Option<u64> {
        if self.mdts == 0 {
            return None;
        }
        let pages = 1u64.checked_shl(u32::from(self.mdts)).unwrap_or(u64::MAX);
        Some(pages.saturating_mul(min_page_size))
    }

    /// Whether a volatile write cache is present (VWC bit 0): writes are durable only after
    /// a Flush (or with FUA).
    pub fn has_volatile_write_cache(&self) -> bool {
        self.vwc & 1 != 0
    }

    /// Whether Write Zeroes is supported (ONCS bit 3).
    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }

    /// Whether Dataset Management (deallocate) is supported (ONCS bit 2).
    pub fn supports_dataset_management(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }
}

/// One LBA format ("LBA Format Data Structure"): a block size and metadata size pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbaFormat {
    /// MS, Metadata Size per block in bytes (bits 15:0).
    pub ms: u16,
    /// LBADS, LBA Data Size: blocks are `2 ^ LBADS` bytes (bits 23:16); 0 when the format
    /// is not available.
    pub lbads: u8,
    /// RP, Relative Performance (bits 25:24): 0 best .. 3 degraded.
    pub rp: u8,
}

impl LbaFormat {
    /// Decodes the 32-bit format descriptor.
    pub const fn from_raw(raw: u32) -> Self {
        LbaFormat {
            ms: raw as u16,
            lbads: (raw >> 16) as u8,
            rp: ((raw >> 24) & 0x3) as u8,
        }
    }

    /// The block size in bytes, when LBADS is in 9..=31.
    pub fn block_size(self) -> Option<u32> {
        (MIN_LBADS..=MAX_LBADS)
            .contains(&self.lbads)
            .then(|| 1u32 << self.lbads)
    }
}

/// The fields of the Identify Namespace data structure (CNS 00h, NVM command set) the driver
/// uses, with the LBA format in use resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// NSZE, Namespace Size, in blocks (bytes 7:0).
    pub nsze: u64,
    /// NCAP, Namespace Capacity, in blocks (bytes 15:8).
    pub ncap: u64,
    /// NUSE, Namespace Utilization, in blocks (bytes 23:16).
    pub nuse: u64,
    /// NSFEAT, Namespace Features (byte 24).
    pub nsfeat: u8,
    /// FLBAS, Formatted LBA Size (byte 26), raw.
    pub flbas: u8,
    /// The LBA formats listed (NLBAF + 1 of them, from byte 128).
    pub formats: Vec<LbaFormat>,
    /// Index into `formats` of the format in use (from FLBAS).
    pub format_index: usize,
}

impl Namespace {
    /// Parses an Identify Namespace data structure.
    ///
    /// The format in use is FLBAS bits 3:0; when more than 16 formats are listed (NVMe 2.0),
    /// FLBAS bits 6:5 supply the index's upper two bits.
    pub fn parse(data: &[u8]) -> Result<Self, IdentifyError> {
        let d = check_len(data)?;
        let nsze = u64_at(d, 0);
        if nsze == 0 {
            return Err(IdentifyError::InactiveNamespace);
        }
        let count = usize::from(d[25]) + 1;
        if count > MAX_LBA_FORMATS {
            return Err(IdentifyError::FormatCount { count });
        }
        let formats: Vec<_> = (0..count)
            .map(|i| LbaFormat::from_raw(u32_at(d, 128 + 4 * i)))
            .collect();
        let flbas = d[26];
        let mut index = usize::from(flbas & 0xF);
        if count > 16 {
            index |= usize::from((flbas >> 5) & 0x3) << 4;
        }
        if index >= count {
            return Err(IdentifyError::FormatIndex { index, count });
        }
        let lbads = formats[index].lbads;
        if formats[index].block_size().is_none() {
            return Err(IdentifyError::BlockSize { index, lbads });
        }
        Ok(Namespace {
            nsze,
            ncap: u64_at(d, 8),
            nuse: u64_at(d, 16),
            nsfeat: d[24],
            flbas,
            formats,
            format_index: index,
        })
    }

    /// The LBA format in use.
    pub fn format(&self) -> LbaFormat {
        self.formats[self.format_index]
    }

    /// The block (logical block, LBA data) size in bytes.
    pub fn block_size(&self) -> u32 {
        // Validated by `parse`.
        self.format().block_size().unwrap_or(0)
    }

    /// Metadata bytes per block in the format in use.
    pub fn metadata_size(&self) -> u16 {
        self.format().ms
    }

    /// Whether metadata is transferred at the end of each block's data (FLBAS bit 4) rather
    /// than in a separate buffer.
    pub fn extended_lba(&self) -> bool {
        self.flbas & (1 << 4) != 0
    }

    /// The namespace's size in bytes (NSZE blocks), saturating at `u64::MAX`.
    pub fn capacity_bytes(&self) -> u64 {
        self.nsze.saturating_mul(u64::from(self.block_size()))
    }

    /// NSFEAT bit 0: NAWUN, NAWUPF and NACWU describe atomicity for this namespace.
    pub fn has_namespace_atomics(&self) -> bool {
        self.nsfeat & 1 != 0
    }
}

/// Parses an active namespace ID list (CNS 02h): the NSIDs, ascending, up to the first zero
/// entry (at most 1024).
pub fn parse_active_ns_list(data: &[u8]) -> Result<Vec<u32>, IdentifyError> {
    let d = check_len(data)?;
    Ok((0..IDENTIFY_DATA_LEN / 4)
        .map(|i| u32_at(d, 4 * i))
        .take_while(|&id| id != 0)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
        buf[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn controller_buf() -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_DATA_LEN];
        put(&mut b, 0, &0x144Du16.to_le_bytes());
        put(&mut b, 2, &0x144Du16.to_le_bytes());
        put(&mut b, 4, b"S4EWNX0R123456      ");
        put(
            &mut b,
            24,
            format!("{:<40}", "Samsung SSD 980 PRO 1TB").as_bytes(),
        );
        put(&mut b, 64, b"5B2QGXA7");
        b[77] = 5;
        put(&mut b, 78, &6u16.to_le_bytes());
        put(&mut b, 80, &0x0001_0400u32.to_le_bytes());
        b[512] = 0x66;
        b[513] = 0x44;
        put(&mut b, 514, &256u16.to_le_bytes());
        put(&mut b, 516, &1u32.to_le_bytes());
        put(&mut b, 520, &0x005Fu16.to_le_bytes());
        b[525] = 0x07;
        b
    }

    #[test]
    fn controller_fields() {
        let c = ControllerInfo::parse(&controller_buf()).unwrap();
        assert_eq!((c.vid, c.ssvid), (0x144D, 0x144D));
        assert_eq!(c.serial, "S4EWNX0R123456");
        assert_eq!(c.model, "Samsung SSD 980 PRO 1TB");
        assert_eq!(c.firmware, "5B2QGXA7");
        assert_eq!(c.mdts, 5);
        assert_eq!(c.cntlid, 6);
        assert_eq!(c.version, Some(Version::V1_4));
        assert_eq!(c.sqes, EntrySizes { required: 6, max: 6 });
        assert_eq!(c.cqes, EntrySizes { required: 4, max: 4 });
        assert!(c.sqes.allows(6) && !c.sqes.allows(7));
        assert_eq!(c.maxcmd, 256);
        assert_eq!(c.nn, 1);
        assert!(c.supports_write_zeroes());
        assert!(c.supports_dataset_management());
        assert!(c.has_volatile_write_cache());
    }

    #[test]
    fn mdts() {
        let mut b = controller_buf();
        let c = ControllerInfo::parse(&b).unwrap();
        assert_eq!(c.max_transfer_bytes(4096), Some(128 * 1024));
        assert_eq!(c.max_transfer_bytes(16384), Some(512 * 1024));
        b[77] = 0;
        let unlimited = ControllerInfo::parse(&b).unwrap();
        assert_eq!(unlimited.max_transfer_bytes(4096), None);
        b[77] = 0xFF;
        assert_eq!(
            ControllerInfo::parse(&b).unwrap().max_transfer_bytes(4096),
            Some(u64::MAX)
        );
        b[77] = 1;
        assert_eq!(
            ControllerInfo::parse(&b).unwrap().max_transfer_bytes(4096),
            Some(8192)
        );
    }

    #[test]
    fn string_trimming() {
        let mut b = controller_buf();
        put(&mut b, 4, b"   LEFTPADDED\0\0\0\0\0\0\0");
        put(&mut b, 24, &[b' '; 40]);
        put(&mut b, 64, b"1.0\0\0\0\0\0");
        let c = ControllerInfo::parse(&b).unwrap();
        assert_eq!(c.serial, "LEFTPADDED");
        assert_eq!(c.model, "");
        assert_eq!(c.firmware, "1.0");
        put(&mut b, 4, b"FULL-TWENTY-CHARS-SN");
        assert_eq!(ControllerInfo::parse(&b).unwrap().serial, "FULL-TWENTY-CHARS-SN");
        put(&mut b, 4, b"A B                 ");
        assert_eq!(
            ControllerInfo::parse(&b).unwrap().serial,
            "A B",
            "inner spaces kept"
        );
    }

    #[test]
    fn controller_without_version() {
        let mut b = controller_buf();
        put(&mut b, 80, &[0; 4]);
        assert_eq!(ControllerInfo::parse(&b).unwrap().version, None);
    }

    #[test]
    fn length_checked() {
        assert_eq!(
            ControllerInfo::parse(&[0; 4095]),
            Err(IdentifyError::Length { len: 4095 })
        );
        assert_eq!(
            Namespace::parse(&[0; 4097]),
            Err(IdentifyError::Length { len: 4097 })
        );
        assert_eq!(parse_active_ns_list(&[]), Err(IdentifyError::Length { len: 0 }));
    }

    fn lbaf(ms: u16, lbads: u8, rp: u8) -> [u8; 4] {
        (u32::from(ms) | u32::from(lbads) << 16 | u32::from(rp) << 24).to_le_bytes()
    }

    /// A namespace of `nsze` blocks listing 512-byte (index 0), 512+8 (1) and 4096-byte (2)
    /// formats, with FLBAS `flbas`.
    fn namespace_buf(nsze: u64, flbas: u8) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_DATA_LEN];
        put(&mut b, 0, &nsze.to_le_bytes());
        put(&mut b, 8, &nsze.to_le_bytes());
        put(&mut b, 16, &(nsze / 2).to_le_bytes());
        b[25] = 2;
        b[26] = flbas;
        put(&mut b, 128, &lbaf(0, 9, 2));
        put(&mut b, 132, &lbaf(8, 9, 2));
        put(&mut b, 136, &lbaf(0, 12, 0));
        b
    }

    #[test]
    fn namespace_512() {
        let ns = Namespace::parse(&namespace_buf(1_953_525_168, 0)).unwrap();
        assert_eq!(ns.formats.len(), 3);
        assert_eq!(ns.format_index, 0);
        assert_eq!(ns.block_size(), 512);
        assert_eq!(ns.metadata_size(), 0);
        assert_eq!(ns.capacity_bytes(), 1_953_525_168 * 512);
        assert_eq!(ns.ncap, 1_953_525_168);
        assert_eq!(ns.nuse, 1_953_525_168 / 2);
        assert_eq!(ns.format().rp, 2);
        assert!(!ns.extended_lba());
    }

    #[test]
    fn namespace_4096() {
        let ns = Namespace::parse(&namespace_buf(244_190_646, 2)).unwrap();
        assert_eq!(ns.format_index, 2);
        assert_eq!(ns.block_size(), 4096);
        assert_eq!(ns.capacity_bytes(), 244_190_646 * 4096);
        assert_eq!(
            ns.format(),
            LbaFormat {
                ms: 0,
                lbads: 12,
                rp: 0
            }
        );
    }

    #[test]
    fn namespace_with_metadata() {
        // Index 1 with FLBAS bit 4: metadata extends each block.
        let ns = Namespace::parse(&namespace_buf(1000, 0x11)).unwrap();
        assert_eq!(ns.block_size(), 512);
        assert_eq!(ns.metadata_size(), 8);
        assert!(ns.extended_lba());
    }

    #[test]
    fn namespace_errors() {
        assert_eq!(
            Namespace::parse(&namespace_buf(0, 0)),
            Err(IdentifyError::InactiveNamespace)
        );
        assert_eq!(
            Namespace::parse(&namespace_buf(8, 3)),
            Err(IdentifyError::FormatIndex { index: 3, count: 3 })
        );
        let mut b = namespace_buf(8, 0);
        put(&mut b, 128, &lbaf(0, 0, 0));
        assert_eq!(
            Namespace::parse(&b),
            Err(IdentifyError::BlockSize { index: 0, lbads: 0 })
        );
        put(&mut b, 128, &lbaf(0, 8, 0));
        assert_eq!(
            Namespace::parse(&b),
            Err(IdentifyError::BlockSize { index: 0, lbads: 8 })
        );
        b[25] = 64;
        assert_eq!(
            Namespace::parse(&b),
            Err(IdentifyError::FormatCount { count: 65 })
        );
    }

    #[test]
    fn flbas_upper_bits_only_past_16_formats() {
        // 3 formats (1.4 layout): bits 6:5 are ignored, so 0x62 still selects index 2.
        let ns = Namespace::parse(&namespace_buf(8, 0x62)).unwrap();
        assert_eq!(ns.format_index, 2);
        // 20 formats (2.0 layout): index = bits 6:5 << 4 | bits 3:0.
        let mut b = namespace_buf(8, 0x22);
        b[25] = 19;
        put(&mut b, 128 + 4 * 18, &lbaf(16, 12, 1));
        let ns = Namespace::parse(&b).unwrap();
        assert_eq!(ns.formats.len(), 20);
        assert_eq!(ns.format_index, 18);
        assert_eq!(ns.block_size(), 4096);
        assert_eq!(ns.metadata_size(), 16);
    }

    #[test]
    fn huge_namespace_saturates() {
        let ns = Namespace::parse(&namespace_buf(u64::MAX, 2)).unwrap();
        assert_eq!(ns.capacity_bytes(), u64::MAX);
    }

    #[test]
    fn active_namespace_list() {
        let mut b = vec![0u8; IDENTIFY_DATA_LEN];
        for (i, id) in [1u32, 2, 5, 0x100].iter().enumerate() {
            put(&mut b, 4 * i, &id.to_le_bytes());
        }
        put(&mut b, 20, &9u32.to_le_bytes()); // after the terminating zero: ignored
        assert_eq!(parse_active_ns_list(&b).unwrap(), vec![1, 2, 5, 0x100]);
        assert!(parse_active_ns_list(&[0; IDENTIFY_DATA_LEN]).unwrap().is_empty());
        let full: Vec<u8> = (1..=1024u32).flat_map(u32::to_le_bytes).collect();
        assert_eq!(parse_active_ns_list(&full).unwrap().len(), 1024);
    }
}
