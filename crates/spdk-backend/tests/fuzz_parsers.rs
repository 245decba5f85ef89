//! Property-based fuzzing of what the userspace NVMe driver decodes from the device: the
//! completion queue entry and its status field, submission entries read back, the
//! Identify Controller, Identify Namespace and active namespace list data, the controller's
//! registers, completion rings whose memory holds anything, command identifiers a completion
//! names, and the PRP and request arithmetic on any sizes and addresses; plus the PCI
//! address the user gives.
//!
//! Any bytes or words in must give a value or an error, never a panic, and each decoded
//! value must agree with the specification's layout (fields round-trip, errors say why).

use std::collections::VecDeque;

use proptest::prelude::*;
use spillway_spdk::nvme::cmd::{
    Command, CommandError, Completion, QueuePriority, COMMAND_SIZE, COMPLETION_SIZE,
};
use spillway_spdk::nvme::identify::{
    parse_active_ns_list, ControllerInfo, IdentifyError, LbaFormat, Namespace, IDENTIFY_DATA_LEN,
    MAX_LBA_FORMATS,
};
use spillway_spdk::nvme::prp::{build, list_pages_needed, pages_touched, split_by_mdts, PageSize, PrpError};
use spillway_spdk::nvme::queue::{new_completions, CidPool, CompletionRing, SubmissionRing};
use spillway_spdk::nvme::regs::{self, Aqa, Cap, Cc, Csts, DoorbellKind, Version};
use spillway_spdk::nvme::status::{check, StatusField, StatusKind};
use spillway_spdk::pci::PciAddress;

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const CASES: u32 = 2048;

/// The configuration of a property of `cases` cases. `PROPTEST_CASES=N` scales every
/// property of the file by N / [`CASES`] (the default leaves them as they are).
fn config(cases: u32) -> ProptestConfig {
    let scaled = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse::<u64>().ok())
        .map_or(cases, |n| {
            (u64::from(cases) * n / u64::from(CASES)).clamp(1, u64::from(u32::MAX)) as u32
        });
    ProptestConfig {
        // A failure is reproduced from the seed printed with it; no file is written.
        failure_persistence: None,
        ..ProptestConfig::with_cases(scaled)
    }
}

/// Any `u64`, with the edges more often.
fn any_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => any::<u64>(),
        1 => 0u64..4096,
        1 => (0u32..64).prop_map(|s| 1u64 << s),
        1 => (0u32..64).prop_map(|s| (1u64 << s).wrapping_sub(1)),
        1 => prop::sample::select(vec![0, 1, u64::MAX, u64::MAX - 1, 1 << 63, i64::MAX as u64]),
    ]
}

/// Identify data of any length: 4096 bytes mostly, or any other length.
fn identify_len() -> impl Strategy<Value = usize> {
    prop_oneof![8 => Just(IDENTIFY_DATA_LEN), 1 => 0usize..5000, 1 => Just(IDENTIFY_DATA_LEN + 1)]
}

/// `len` bytes drawn from `seed` (a generator of 4096 values per case is slow to run and
/// to shrink; a seed is neither), about one in eight of them zero and one in eight a space.
fn bytes_from(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32;
            match r & 7 {
                0 => 0,
                1 => b' ',
                _ => (r >> 8) as u8,
            }
        })
        .collect()
}

/// Identify data: bytes of any length from a seed, with these (offset, byte) patches.
fn identify_data(patches: impl Strategy<Value = Vec<(usize, u8)>>) -> impl Strategy<Value = Vec<u8>> {
    (identify_len(), any::<u64>(), patches).prop_map(|(len, seed, patches)| {
        let mut d = bytes_from(seed, len);
        for (at, b) in patches {
            if at < d.len() {
                d[at] = b;
            }
        }
        d
    })
}

/// Identify Controller data: any bytes, the ASCII fields often padded with spaces or NULs
/// on either side.
fn controller_data() -> impl Strategy<Value = Vec<u8>> {
    identify_data(prop::collection::vec(
        (
            prop_oneof![
                4..24usize,
                24..64usize,
                64..72usize,
                77..78usize,
                512..514usize,
                Just(80usize)
            ],
            prop_oneof![Just(b' '), Just(0u8), Just(b'A'), Just(0xFFu8), any::<u8>()],
        ),
        0..24,
    ))
}

/// Identify Namespace data: any bytes, with NLBAF, FLBAS and the LBA formats' LBADS often
/// near what a namespace holds, so that every check is reached.
fn namespace_data() -> impl Strategy<Value = Vec<u8>> {
    (
        identify_data(Just(Vec::new())),
        prop::option::weighted(0.8, prop_oneof![3 => 0u8..20, 1 => 60u8..70, 1 => any::<u8>()]),
        prop::option::weighted(0.8, any::<u8>()),
        prop::collection::vec(prop_oneof![3 => 9u8..=13, 1 => 0u8..40, 1 => any::<u8>()], 64),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(mut d, nlbaf, flbas, lbads, inactive)| {
            if d.len() >= IDENTIFY_DATA_LEN {
                if let Some(n) = nlbaf {
                    d[25] = n;
                }
                if let Some(f) = flbas {
                    d[26] = f;
                }
                for (i, l) in lbads.iter().enumerate() {
                    d[128 + 4 * i + 2] = *l;
                }
                if inactive {
                    d[..8].fill(0);
                }
            }
            d
        })
}

fn le_u32(d: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(d[at..at + 4].try_into().unwrap())
}

fn le_u64(d: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(d[at..at + 8].try_into().unwrap())
}

/// Trimmed as the specification pads: spaces (or NULs) around.
fn is_trimmed(s: &str) -> bool {
    !s.starts_with([' ', '\0']) && !s.ends_with([' ', '\0'])
}

proptest! {
    #![proptest_config(config(CASES))]

    /// A completion queue entry of any 16 bytes decodes, encodes back to the same bytes, and
    /// its status is checked as the status field says.
    #[test]
    fn completions_decode_any_bytes(bytes in any::<[u8; COMPLETION_SIZE]>()) {
        let c = Completion::from_bytes(&bytes);
        prop_assert_eq!(c.to_bytes(), bytes);
        let status = u16::from_le_bytes([bytes[14], bytes[15]]);
        prop_assert_eq!(c.phase(), status & 1 == 1);
        prop_assert_eq!(c.status(), StatusField(status >> 1));
        prop_assert_eq!(c.cid, u16::from_le_bytes([bytes[12], bytes[13]]));
        prop_assert_eq!(c.sq_head, u16::from_le_bytes([bytes[8], bytes[9]]));
        match c.check() {
            Ok(()) => prop_assert!(c.status().is_success()),
            Err(e) => {
                prop_assert!(!c.status().is_success());
                prop_assert_eq!(e.field, c.status());
            }
        }
        let (nsq, ncq) = c.queues_granted();
        prop_assert!((1..=65536).contains(&nsq) && (1..=65536).contains(&ncq));
        prop_assert_eq!(nsq - 1, le_u32(&bytes, 0) & 0xFFFF);
    }

    /// A status field of any 16 bits (the top one, beyond the field, included) decodes to
    /// success or an error whose kind gives back its type and code, whose flags are the
    /// field's, and whose message names the code.
    #[test]
    fn status_fields_decode_any_word(word in any::<u16>()) {
        let field = StatusField(word & 0x7FFF);
        let (sct, sc) = (field.sct(), field.sc());
        prop_assert_eq!(sct, ((word >> 8) & 0x7) as u8);
        prop_assert_eq!(sc, word as u8);
        prop_assert!(field.crd() <= 3);
        prop_assert_eq!(
            StatusField::new(sct, sc, field.crd(), field.more(), field.dnr()),
            field
        );
        match check(word) {
            Ok(()) => {
                prop_assert_eq!((sct, sc), (0, 0));
                prop_assert_eq!(StatusKind::from_codes(sct, sc), None);
            }
            Err(e) => {
                prop_assert_ne!((sct, sc), (0, 0));
                prop_assert_eq!(e.field, field);
                prop_assert_eq!(e.kind.codes(), (sct, sc));
                prop_assert_eq!(StatusKind::from_codes(sct, sc), Some(e.kind));
                prop_assert_eq!(e.kind.is_media_error(), sct == 2);
                prop_assert_eq!(e.is_retryable(), !field.dnr());
                prop_assert_eq!(e.retry_delay_index(), field.crd());
                prop_assert_eq!(e.has_more_info(), field.more());
                let text = e.to_string();
                prop_assert!(text.contains(&format!("{sc:#04x}")), "{text:?} does not name code {sc:#04x}");
                prop_assert_eq!(text.ends_with(" [do not retry]"), field.dnr(), "{}", text);
                let shown = format!("{field:?}");
                prop_assert!(!shown.is_empty());
            }
        }
    }

    /// A status field built from parts of any size keeps each part, masked to its width.
    #[test]
    fn status_fields_keep_their_parts(sct in any::<u8>(), sc in any::<u8>(), crd in any::<u8>(), more: bool, dnr: bool) {
        let f = StatusField::new(sct, sc, crd, more, dnr);
        prop_assert_eq!((f.sct(), f.sc(), f.crd(), f.more(), f.dnr()), (sct & 7, sc, crd & 3, more, dnr));
        prop_assert!(f.0 < 1 << 15);
        prop_assert_eq!(f.is_success(), sct & 7 == 0 && sc == 0);
        prop_assert_eq!(StatusKind::from_codes(sct, sc), StatusKind::from_codes(sct & 7, sc));
    }

    /// A submission queue entry of any 64 bytes decodes and encodes back to the same bytes,
    /// its CDW0 fields as the specification lays them out.
    #[test]
    fn commands_decode_any_bytes(bytes in prop::collection::vec(any::<u8>(), COMMAND_SIZE), cid: u16) {
        let bytes: [u8; COMMAND_SIZE] = bytes.try_into().unwrap();
        let mut c = Command::from_bytes(&bytes);
        prop_assert_eq!(c.to_bytes(), bytes);
        let cdw0 = le_u32(&bytes, 0);
        prop_assert_eq!(
            (c.opcode(), c.fuse(), c.psdt(), c.cid()),
            (cdw0 as u8, ((cdw0 >> 8) & 3) as u8, ((cdw0 >> 14) & 3) as u8, (cdw0 >> 16) as u16)
        );
        prop_assert_eq!(c.prp1, le_u64(&bytes, 24));
        c.set_cid(cid);
        prop_assert_eq!((c.cid(), c.opcode(), c.fuse()), (cid, cdw0 as u8, ((cdw0 >> 8) & 3) as u8));
    }

    /// The command builders take any arguments: a command with each field where it goes, or
    /// an error naming the value that does not fit.
    #[test]
    fn commands_build_from_any_arguments(
        cid: u16, nsid: u32, slba: u64, blocks in prop_oneof![any::<u32>(), 0u32..70000], prp1: u64, prp2: u64,
        qid: u16, cqid: u16, entries in prop_oneof![any::<u32>(), 0u32..70000], count in prop_oneof![any::<u32>(), 0u32..70000],
    ) {
        for (c, write) in [(Command::read(cid, nsid, slba, blocks, prp1, prp2), false),
                           (Command::write(cid, nsid, slba, blocks, prp1, prp2), true)] {
            match c {
                Ok(c) => {
                    prop_assert!((1..=65536).contains(&blocks));
                    prop_assert_eq!(c.opcode(), if write { 0x01 } else { 0x02 });
                    prop_assert_eq!((c.cid(), c.nsid, c.prp1, c.prp2), (cid, nsid, prp1, prp2));
                    prop_assert_eq!(u64::from(c.cdw10) | u64::from(c.cdw11) << 32, slba);
                    prop_assert_eq!(c.cdw12 & 0xFFFF, blocks - 1);
                    prop_assert_eq!(c.with_fua().cdw12 & !(1 << 30), c.cdw12);
                }
                Err(e) => {
                    prop_assert!(!(1..=65536).contains(&blocks));
                    prop_assert_eq!(e, CommandError::BlockCount { blocks });
                }
            }
        }
        let sizes_fit = (2..=65536).contains(&entries);
        match Command::create_io_cq(cid, qid, entries, prp1, true) {
            Ok(c) => {
                prop_assert!(qid != 0 && sizes_fit);
                prop_assert_eq!((c.cdw10 & 0xFFFF, c.cdw10 >> 16), (u32::from(qid), entries - 1));
            }
            Err(_) => prop_assert!(qid == 0 || !sizes_fit),
        }
        match Command::create_io_sq(cid, qid, entries, prp1, cqid, QueuePriority::Low) {
            Ok(c) => {
                prop_assert!(qid != 0 && cqid != 0 && sizes_fit);
                prop_assert_eq!(c.cdw11 >> 16, u32::from(cqid));
            }
            Err(_) => prop_assert!(qid == 0 || cqid == 0 || !sizes_fit),
        }
        prop_assert_eq!(Command::delete_io_sq(cid, qid).is_ok(), qid != 0);
        prop_assert_eq!(Command::delete_io_cq(cid, qid).is_ok(), qid != 0);
        match Command::set_features_num_queues(cid, count, entries) {
            Ok(c) => {
                prop_assert!((1..=0xFFFF).contains(&count) && (1..=0xFFFF).contains(&entries));
                let granted = Completion { dw0: c.cdw11, ..Completion::default() }.queues_granted();
                prop_assert_eq!(granted, (count, entries));
            }
            Err(e) => {
                prop_assert!(!(1..=0xFFFF).contains(&count) || !(1..=0xFFFF).contains(&entries));
                let named = matches!(e, CommandError::QueueCount { .. });
                prop_assert!(named, "{e:?}");
            }
        }
    }

    /// Identify Controller data of any bytes and length: the fields the driver keeps, where
    /// the specification puts them, or a length error.
    #[test]
    fn identify_controller_parses_any_bytes(
        data in controller_data(),
        page in any_u64(),
    ) {
        match ControllerInfo::parse(&data) {
            Ok(c) => {
                prop_assert_eq!(data.len(), IDENTIFY_DATA_LEN);
                prop_assert_eq!(c.vid, u16::from_le_bytes([data[0], data[1]]));
                prop_assert_eq!(c.mdts, data[77]);
                prop_assert_eq!(c.nn, le_u32(&data, 516));
                prop_assert_eq!(c.version.map(Version::to_raw), Some(le_u32(&data, 80)).filter(|&v| v != 0));
                prop_assert_eq!((c.sqes.required, c.sqes.max), (data[512] & 0xF, data[512] >> 4));
                prop_assert!(is_trimmed(&c.serial) && is_trimmed(&c.model) && is_trimmed(&c.firmware));
                prop_assert!(c.serial.chars().count() <= 20 && c.model.chars().count() <= 40);
                let want = (c.mdts != 0).then(|| {
                    let bytes = (1u128 << c.mdts.min(64)).saturating_mul(u128::from(page));
                    u64::try_from(bytes).unwrap_or(u64::MAX)
                });
                prop_assert_eq!(c.max_transfer_bytes(page), want);
                let _ = (c.has_volatile_write_cache(), c.supports_write_zeroes(), c.supports_dataset_management());
                prop_assert_eq!(c.sqes.allows(6), (c.sqes.required..=c.sqes.max).contains(&6));
            }
            Err(e) => {
                prop_assert_ne!(data.len(), IDENTIFY_DATA_LEN);
                prop_assert_eq!(e, IdentifyError::Length { len: data.len() });
            }
        }
    }

    /// Identify Namespace data of any bytes and length: a namespace whose format in use
    /// exists and has a block size of 2^9 to 2^31 bytes, as decoded by hand here, or the
    /// error that says which check failed.
    #[test]
    fn identify_namespace_parses_any_bytes(data in namespace_data()) {
        // The specification, by hand.
        let want: Result<usize, IdentifyError> = (|| {
            if data.len() != IDENTIFY_DATA_LEN {
                return Err(IdentifyError::Length { len: data.len() });
            }
            if le_u64(&data, 0) == 0 {
                return Err(IdentifyError::InactiveNamespace);
            }
            let count = usize::from(data[25]) + 1;
            if count > MAX_LBA_FORMATS {
                return Err(IdentifyError::FormatCount { count });
            }
            let flbas = data[26];
            let index = usize::from(flbas & 0xF) | if count > 16 { usize::from((flbas >> 5) & 3) << 4 } else { 0 };
            if index >= count {
                return Err(IdentifyError::FormatIndex { index, count });
            }
            let lbads = data[128 + 4 * index + 2];
            if !(9..=31).contains(&lbads) {
                return Err(IdentifyError::BlockSize { index, lbads });
            }
            Ok(index)
        })();
        let got = Namespace::parse(&data);
        match (&got, want) {
            (Ok(ns), Ok(index)) => {
                prop_assert_eq!(ns.format_index, index);
                prop_assert_eq!(ns.formats.len(), usize::from(data[25]) + 1);
                prop_assert_eq!(ns.nsze, le_u64(&data, 0));
                let block = ns.block_size();
                prop_assert!(block.is_power_of_two() && block >= 512);
                prop_assert_eq!(ns.format(), LbaFormat::from_raw(le_u32(&data, 128 + 4 * index)));
                prop_assert_eq!(ns.capacity_bytes(), ns.nsze.saturating_mul(u64::from(block)));
                prop_assert_eq!(ns.metadata_size(), ns.format().ms);
                prop_assert_eq!(ns.extended_lba(), data[26] & 0x10 != 0);
                let _ = ns.has_namespace_atomics();
            }
            (Err(e), Err(w)) => {
                prop_assert_eq!(*e, w);
                prop_assert!(!e.to_string().is_empty());
            }
            _ => prop_assert!(false, "parse gives {got:?}, the specification {want:?}"),
        }
    }

    /// An active namespace list of any bytes: the IDs before the first zero, at most 1024,
    /// or a length error.
    #[test]
    fn active_namespace_lists_parse_any_bytes(
        data in identify_data(Just(Vec::new())),
        ids in prop::collection::vec(any::<u32>(), 0..8),
        zero_at in prop::option::of(0usize..1100),
    ) {
        // Often a few IDs then zeros, as a controller writes; else anything.
        let mut data = data;
        if data.len() >= 4 * ids.len() + 4 && zero_at.is_some_and(|at| at % 2 == 0) {
            data.fill(0);
            for (i, id) in ids.iter().enumerate() {
                data[4 * i..4 * i + 4].copy_from_slice(&id.to_le_bytes());
            }
        } else if let Some(at) = zero_at.filter(|&at| 4 * at + 4 <= data.len()) {
            data[4 * at..4 * at + 4].fill(0);
        }
        match parse_active_ns_list(&data) {
            Ok(ids) => {
                prop_assert_eq!(data.len(), IDENTIFY_DATA_LEN);
                prop_assert!(ids.len() <= 1024);
                prop_assert!(ids.iter().all(|&id| id != 0));
                for (i, &id) in ids.iter().enumerate() {
                    prop_assert_eq!(id, le_u32(&data, 4 * i));
                }
                if ids.len() < 1024 {
                    prop_assert_eq!(le_u32(&data, 4 * ids.len()), 0);
                }
            }
            Err(e) => prop_assert_eq!(e, IdentifyError::Length { len: data.len() }),
        }
    }

    /// An LBA format descriptor of any 32 bits: its fields, and a block size only for LBADS
    /// 9 to 31.
    #[test]
    fn lba_formats_decode_any_word(raw: u32) {
        let f = LbaFormat::from_raw(raw);
        prop_assert_eq!((f.ms, f.lbads, f.rp), (raw as u16, (raw >> 16) as u8, ((raw >> 24) & 3) as u8));
        match f.block_size() {
            Some(b) => {
                prop_assert!((9..=31).contains(&f.lbads));
                prop_assert_eq!(b, 1u32 << f.lbads);
            }
            None => prop_assert!(!(9..=31).contains(&f.lbads)),
        }
    }

    /// The controller's registers read as any value: every field decodes within its width,
    /// and what the driver builds from them stays in range.
    #[test]
    fn registers_decode_any_value(cap: u64, csts: u32, vs: u32, aqa: u32, cc: u32, mps: u8, qid: u16, dstrd: u8,
                                  sq in any::<u32>(), cq in prop_oneof![any::<u32>(), 0u32..5000], addr in any_u64(), page in any_u64()) {
        let cap = Cap(cap);
        prop_assert_eq!(cap.max_queue_entries(), u32::from(cap.mqes()) + 1);
        prop_assert!(cap.doorbell_stride() >= 4 && cap.doorbell_stride() <= 4 << 15);
        prop_assert!(cap.min_page_size() >= 4096 && cap.max_page_size() <= 1 << 27);
        prop_assert!(cap.timeout().as_millis() <= 255 * 500);
        prop_assert_eq!(cap.supports_mps(mps), (cap.mpsmin()..=cap.mpsmax()).contains(&mps));
        let _ = (cap.cqr(), cap.ams(), cap.nssrs(), cap.css_nvm(), cap.bps(), format!("{cap:?}"));
        let csts = Csts(csts);
        let _ = (csts.ready(), csts.fatal(), csts.shutdown_status(), csts.nssro(), csts.processing_paused(), format!("{csts:?}"));
        prop_assert_eq!(csts.is_all_ones(), csts.0 == u32::MAX);
        prop_assert_eq!(Version::from_raw(vs).to_raw(), vs);
        prop_assert!(!Version::from_raw(vs).to_string().is_empty());
        let a = Aqa(aqa);
        prop_assert!((1..=4096).contains(&a.sq_entries()) && (1..=4096).contains(&a.cq_entries()));
        match Aqa::new(sq, cq) {
            Ok(a) => prop_assert_eq!((a.sq_entries(), a.cq_entries()), (sq, cq)),
            Err(_) => prop_assert!(!(2..=4096).contains(&sq) || !(2..=4096).contains(&cq)),
        }
        let c = Cc(cc).with_mps(mps).with_enable(true);
        prop_assert_eq!(c.mps(), mps & 0xF);
        prop_assert!(c.enabled());
        prop_assert_eq!(c.page_size(), regs::page_size_from_mps(mps));
        prop_assert_eq!(Cc::nvm(mps).iosqes(), regs::IOSQES_64B);
        let _ = (c.shn(), c.iocqes(), format!("{c:?}"));
        let sq_db = regs::doorbell_offset(qid, DoorbellKind::SqTail, dstrd);
        let cq_db = regs::doorbell_offset(qid, DoorbellKind::CqHead, dstrd);
        prop_assert_eq!(cq_db - sq_db, 4usize << (dstrd & 0xF));
        match regs::queue_base(addr, page) {
            Ok(a) => prop_assert!(page.is_power_of_two() && a % page == 0),
            Err(_) => prop_assert!(!page.is_power_of_two() || addr % page != 0),
        }
        prop_assert_eq!(PageSize::from_mps(mps).bytes(), regs::page_size_from_mps(mps));
    }

    /// Completions the controller wrote, anything at all in the ring's memory: the host
    /// takes the entries whose phase is the one expected, in order from its head, never
    /// more than the ring holds less one, and its head and phase follow them around.
    #[test]
    fn completion_rings_take_any_memory(
        ring in (2usize..40).prop_flat_map(|n| prop::collection::vec(any::<[u8; COMPLETION_SIZE]>(), n)),
        head: u16, phase: bool, max in 0usize..80,
    ) {
        let ring: Vec<Completion> = ring.iter().map(Completion::from_bytes).collect();
        let n = ring.len();
        let (new, new_head, new_phase) = new_completions(&ring, head, phase);
        prop_assert!(new.len() < n);
        let start = usize::from(head) % n;
        let mut expected = phase;
        for (k, c) in new.iter().enumerate() {
            let at = (start + k) % n;
            prop_assert_eq!(*c, ring[at]);
            prop_assert_eq!(c.phase(), expected);
            if at == n - 1 {
                expected = !expected;
            }
        }
        prop_assert_eq!(usize::from(new_head), (start + new.len()) % n);
        prop_assert_eq!(new_phase, expected);
        let mut cq = CompletionRing::at(n as u32, head, phase).unwrap();
        // Reaping goes on past N - 1 when the memory says so (at most one pass).
        let reaped = cq.reap(&ring, max);
        prop_assert!(reaped.len() <= max && reaped.len() <= n);
        let k = reaped.len().min(new.len());
        prop_assert_eq!(&reaped[..k], &new[..k]);
        prop_assert!(reaped.len() == max.min(new.len()) || reaped.len() == new.len() + 1);
        prop_assert!(usize::from(cq.head()) < n);
    }

    /// A queue of any size: refused outside 2..=65536 entries.
    #[test]
    fn rings_take_any_size(entries in prop_oneof![any::<u32>(), 0u32..70000], head: u16, phase: bool) {
        let fits = (2..=65536).contains(&entries);
        prop_assert_eq!(SubmissionRing::new(entries).is_ok(), fits);
        prop_assert_eq!(CompletionRing::new(entries).is_ok(), fits);
        if let Ok(cq) = CompletionRing::at(entries, head, phase) {
            prop_assert!(fits && u32::from(cq.head()) < entries);
            prop_assert_eq!(cq.phase(), phase);
        }
        prop_assert_eq!(CidPool::new(entries).is_ok(), (1..=0xFFFF).contains(&entries));
    }

    /// Submission queue heads reported by completions, any value at all (a stale or
    /// corrupt completion): one within the commands outstanding frees the slots before it,
    /// any other is refused and changes nothing.
    #[test]
    fn submission_heads_from_any_completion(
        entries in prop_oneof![2u32..40, Just(65536)],
        ops in prop::collection::vec(prop_oneof![2 => Just(None), 1 => any::<u16>().prop_map(Some), 1 => (0u16..40).prop_map(Some)], 1..100),
    ) {
        let mut sq = SubmissionRing::new(entries).unwrap();
        // The model: head and tail as counts of commands pushed and consumed.
        let (mut pushed, mut consumed) = (0u64, 0u64);
        for op in ops {
            match op {
                None => match sq.push() {
                    Ok(slot) => {
                        prop_assert_eq!(u64::from(slot), pushed % u64::from(entries));
                        pushed += 1;
                    }
                    Err(_) => prop_assert_eq!(pushed - consumed, u64::from(entries) - 1),
                },
                Some(head) => {
                    let before = sq.clone();
                    let advance = (u64::from(head) + u64::from(entries) - consumed % u64::from(entries)) % u64::from(entries);
                    match sq.update_head(head) {
                        Ok(()) => {
                            prop_assert!(u32::from(head) < entries && advance <= pushed - consumed);
                            consumed += advance;
                        }
                        Err(e) => {
                            prop_assert!(u32::from(head) >= entries || advance > pushed - consumed);
                            prop_assert_eq!(&sq, &before);
                            prop_assert!(!e.to_string().is_empty());
                        }
                    }
                }
            }
            prop_assert_eq!(u64::from(sq.outstanding()), pushed - consumed);
            prop_assert_eq!(sq.free_slots() + sq.outstanding(), entries - 1);
            prop_assert_eq!(sq.is_empty(), pushed == consumed);
        }
    }

    /// Command identifiers that completions name, any value (a late, duplicated or corrupt
    /// completion): one in flight is taken back, any other is refused; an identifier is
    /// never handed out twice at once, nor 0xFFFF, and identifiers come back in the order
    /// they were released.
    #[test]
    fn command_ids_from_any_completion(
        capacity in prop_oneof![8 => 1u32..40, 1 => Just(0xFFFF)],
        ops in prop::collection::vec(prop_oneof![2 => Just(None), 1 => any::<u16>().prop_map(Some), 2 => (0u16..40).prop_map(Some)], 1..80),
    ) {
        let mut pool = CidPool::new(capacity).unwrap();
        let mut in_flight: Vec<u16> = Vec::new();
        // The identifiers not in flight, in the order the pool hands them out.
        let mut free: VecDeque<u16> = (0..capacity as u16).collect();
        for op in ops {
            match op {
                None => match pool.alloc() {
                    Some(cid) => {
                        prop_assert!(cid != 0xFFFF && u32::from(cid) < capacity);
                        prop_assert!(!in_flight.contains(&cid), "{cid} handed out twice");
                        prop_assert_eq!(Some(cid), free.pop_front());
                        in_flight.push(cid);
                    }
                    None => prop_assert_eq!(in_flight.len() as u32, capacity),
                },
                Some(cid) => {
                    let was = in_flight.iter().position(|&c| c == cid);
                    prop_assert_eq!(pool.is_in_flight(cid), was.is_some());
                    match (pool.release(cid), was) {
                        (Ok(()), Some(i)) => {
                            in_flight.swap_remove(i);
                            free.push_back(cid);
                        }
                        (Err(e), None) => prop_assert!(!e.to_string().is_empty()),
                        (r, w) => prop_assert!(false, "release({cid}) gave {r:?} with {w:?} in flight"),
                    }
                }
            }
            prop_assert_eq!(pool.in_flight(), in_flight.len());
        }
    }

    /// PRPs for any length at any address, with any mapping of the transfer's pages and any
    /// list pages: an error saying what is wrong, or PRP1, PRP2 and lists a controller reads
    /// back as the transfer's pages.
    #[test]
    fn prps_for_any_transfer(
        page in prop_oneof![any::<u8>().prop_map(|m| PageSize::from_mps(m).bytes()), any_u64(), (4u32..14).prop_map(|s| 1u64 << s)],
        len in prop_oneof![0u64..70000, any_u64()],
        first in any_u64(),
        scatter in any::<u64>(),
        misalign in prop::bool::weighted(0.05),
        list_pages in prop::collection::vec(any_u64(), 0..6),
        aligned_lists in prop::bool::weighted(0.8),
    ) {
        let page = match PageSize::new(page) {
            Ok(p) => p,
            Err(e) => {
                prop_assert!(!page.is_power_of_two() || page < 16);
                prop_assert_eq!(e, PrpError::PageSize { bytes: page });
                return Ok(());
            }
        };
        let ps = page.bytes();
        // Byte `off` of the transfer: in the first page at `first`, then in pages scattered
        // over the address space (any address, wrapping), one of them off when `misalign`.
        let map = |off: u64| -> u64 {
            let in_first = ps - (first & (ps - 1));
            if off < in_first {
                return first.wrapping_add(off);
            }
            let k = (off - in_first) / ps;
            let base = (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ scatter) & !(ps - 1);
            base.wrapping_add((off - in_first) % ps).wrapping_add(u64::from(misalign && k == 1) * 8)
        };
        let lists: Vec<u64> = list_pages.iter().map(|&p| if aligned_lists { p & !(ps - 1) } else { p }).collect();
        let touched = pages_touched(first, len, page);
        let needed = list_pages_needed(first, len, page);
        if len > 0 {
            prop_assert!(touched >= 1);
        }
        // A transfer of millions of pages with enough list pages would build a list that
        // large: past 4096 pages only the refusals are tried.
        if touched > 4096 && lists.len() >= needed {
            return Ok(());
        }
        match build(len, page, map, &lists) {
            Ok(prps) => {
                prop_assert!(len > 0 && first & 3 == 0);
                prop_assert_eq!(prps.prp1, first);
                prop_assert_eq!(prps.list.len(), needed);
                // Read it back as a controller does: every page after the first, in order.
                let mut pages = Vec::new();
                match touched {
                    1 => prop_assert_eq!(prps.prp2, 0),
                    2 => pages.push(prps.prp2),
                    _ => {
                        prop_assert_eq!(prps.prp2, lists[0]);
                        for (k, l) in prps.list.iter().enumerate() {
                            prop_assert_eq!(l.iova, lists[k]);
                            prop_assert!(l.entries.len() as u64 <= page.entries_per_list_page());
                            prop_assert_eq!(l.to_bytes().len(), 8 * l.entries.len());
                            let chained = k + 1 < prps.list.len();
                            let data = if chained { &l.entries[..l.entries.len() - 1] } else { &l.entries[..] };
                            if chained {
                                prop_assert_eq!(*l.entries.last().unwrap(), lists[k + 1]);
                            }
                            pages.extend_from_slice(data);
                        }
                    }
                }
                prop_assert_eq!(pages.len() as u64, touched - 1);
                let in_first = ps - (first & (ps - 1));
                for (k, &p) in pages.iter().enumerate() {
                    prop_assert_eq!(p, map(in_first + k as u64 * ps));
                    prop_assert_eq!(p % ps, 0);
                }
            }
            Err(PrpError::ZeroLength) => prop_assert_eq!(len, 0),
            Err(PrpError::Unaligned { iova }) => prop_assert!(len > 0 && iova == first && first & 3 != 0),
            Err(PrpError::NotEnoughListPages { needed: n, given }) => {
                prop_assert_eq!((n, given), (needed, lists.len()));
            }
            Err(e @ (PrpError::PageUnaligned { .. } | PrpError::ListPageUnaligned { .. })) => {
                prop_assert!(misalign || !aligned_lists, "{e}");
            }
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }

    /// Requests of any offset, length, block size and maximum transfer: refused when they
    /// do not fit blocks, or cut into whole-block commands of at most the maximum that cover
    /// the request exactly.
    #[test]
    fn requests_split_whatever_their_size(
        offset in any_u64(), len in prop_oneof![any_u64(), 1u64..(1 << 30)],
        max in prop::option::of(any_u64()), shift in prop_oneof![9u32..13, 0u32..32], odd in prop::bool::weighted(0.05),
        blocks_offset in any::<u32>(), blocks_len in 1u32..5000,
    ) {
        let bs = (1u32 << shift) + u32::from(odd) * 3;
        // Half the requests block-aligned, half anything.
        let (offset, len) = if blocks_len % 2 == 0 && bs.is_power_of_two() {
            (u64::from(blocks_offset) << shift, u64::from(blocks_len) << shift)
        } else {
            (offset, len)
        };
        let split = match split_by_mdts(offset, len, max, bs) {
            Ok(split) => split,
            Err(e) => {
                let b = u64::from(bs);
                prop_assert!(
                    !bs.is_power_of_two() || len == 0 || offset % b != 0 || len % b != 0
                        || offset.checked_add(len).is_none() || max.is_some_and(|m| m < b),
                    "{e}"
                );
                return Ok(());
            }
        };
        let b = u64::from(bs);
        let chunk = max.map_or(65536 * b, |m| (m / b).min(65536) * b);
        let count = split.len();
        prop_assert_eq!(count as u64, len.div_ceil(chunk));
        if count > 10_000 {
            return Ok(());
        }
        let mut next = 0;
        for c in split {
            prop_assert_eq!(c.bytes.start, next);
            prop_assert_eq!(c.lba, (offset + next) / b);
            prop_assert!(c.blocks >= 1 && c.blocks <= 65536);
            prop_assert_eq!(c.bytes.end - c.bytes.start, u64::from(c.blocks) * b);
            prop_assert!(max.is_none_or(|m| c.bytes.end - c.bytes.start <= m));
            next = c.bytes.end;
        }
        prop_assert_eq!(next, len);
    }

    /// A PCI address of any text: one that prints as sysfs names it and parses back, or an
    /// error quoting the text.
    #[test]
    fn pci_addresses_parse_or_are_refused(
        text in prop_oneof![
            "[0-9a-fA-F]{0,9}:[0-9a-fA-F]{1,3}:[0-9a-fA-F]{1,3}\\.[0-9a-fA-F]{1,2}",
            "[0-9a-fA-F]{1,3}:[0-9a-fA-F]{1,3}\\.[0-9a-fA-F]{1,2}",
            "[0-9a-fA-F:.+ -]{0,16}",
            ".{0,16}",
        ],
    ) {
        match text.parse::<PciAddress>() {
            Ok(a) => {
                prop_assert!(a.device < 32 && a.function < 8);
                prop_assert_eq!(PciAddress::new(a.domain, a.bus, a.device, a.function), Some(a));
                let printed = a.to_string();
                prop_assert_eq!(printed.parse::<PciAddress>().ok(), Some(a), "printed as {}", printed);
            }
            Err(e) => prop_assert!(e.to_string().contains(&format!("{text:?}")), "{e}"),
        }
    }
}
