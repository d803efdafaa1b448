//! What the running kernel offers the programs, probed once per process (helpers by aya's
//! probe, atomics by loading a six-instruction program) and written into the object's
//! `LB_KERNEL_FEATURES` constant before it loads: the programs then use only what is there.
//! Probing rather than comparing version numbers, because distributions backport.
//!
//! Everything the programs need is in Linux 5.10 but three things, each with a fallback:
//! - `bpf_ktime_get_coarse_ns` (5.11): CLOCK_MONOTONIC instead (`lb-ebpf/src/clock.rs`);
//! - `bpf_set_retval` (5.18): a refused connect() fails with EPERM, not ECONNREFUSED;
//! - atomic OR (5.12): the ingress address filter stays off (`port_filters`). Such a kernel
//!   refuses the instruction wherever it is, even where the verifier would never walk, so
//!   [`fit_object`] turns it into a no-op in the object before loading: what the branch does
//!   there anyway.

use std::{
    borrow::Cow,
    os::fd::{FromRawFd, OwnedFd},
    sync::OnceLock,
};

use anyhow::{Context, Result};
use object::{Object, ObjectSection, SectionFlags, elf::SHF_EXECINSTR};

use aya::{
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported},
};
use lb_common::{KF_ATOMICS, KF_COARSE_CLOCK, KF_SET_RETVAL};

use super::sys_bpf;

/// The features (`KF_*` bits) of the running kernel (a static: the loader borrows it).
pub fn probed() -> &'static u32 {
    static FEATURES: OnceLock<u32> = OnceLock::new();
    FEATURES.get_or_init(probe)
}

/// A probe that cannot run (no privilege for BPF, say) counts the feature as present, the
/// programs' default: loading them fails then anyway, and says why.
fn probe() -> u32 {
    let helper = |program, helper| is_helper_supported(program, helper).unwrap_or(true);
    let mut features = 0;
    if helper(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_ktime_get_coarse_ns) {
        features |= KF_COARSE_CLOCK;
    }
    if helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_set_retval) {
        features |= KF_SET_RETVAL;
    }
    if atomic_or_loads() {
        features |= KF_ATOMICS;
    }
    features
}

/// What a kernel lacking `features`' complement does instead, one line each (for the log and
/// `lbctl status`).
pub fn fallbacks(features: u32) -> Vec<&'static str> {
    [
        (
            KF_COARSE_CLOCK,
            "no bpf_ktime_get_coarse_ns (Linux 5.11): entries stamped by CLOCK_MONOTONIC",
        ),
        (
            KF_SET_RETVAL,
            "no bpf_set_retval (Linux 5.18): refused connects fail with EPERM, not ECONNREFUSED",
        ),
        (KF_ATOMICS, "no BPF atomics (Linux 5.12): the ingress address filter stays off"),
    ]
    .into_iter()
    .filter(|(bit, _)| features & bit == 0)
    .map(|(_, what)| what)
    .collect()
}

/// `object` as the kernel with `features` can load it: without atomics, every atomic operation
/// other than a plain add (which older kernels know as XADD) becomes `ja +0`, a no-op. Only
/// `nat::note_snat_source` has one, behind a branch the verifier removes on such a kernel.
pub fn fit_object(object: &[u8], features: u32) -> Result<Cow<'_, [u8]>> {
    if features & KF_ATOMICS != 0 {
        return Ok(Cow::Borrowed(object));
    }
    let mut fitted = object.to_vec();
    for code in code_ranges(object)? {
        for insn in fitted[code].chunks_exact_mut(8) {
            if is_atomic_beyond_add(insn) {
                insn.copy_from_slice(&NOP);
            }
        }
    }
    Ok(Cow::Owned(fitted))
}

/// Where the object's instructions are (its executable sections), as byte ranges of it.
fn code_ranges(object: &[u8]) -> Result<Vec<std::ops::Range<usize>>> {
    let elf = object::File::parse(object).context("parsing the eBPF object")?;
    let mut ranges = Vec::new();
    for section in elf.sections() {
        let SectionFlags::Elf { sh_flags } = section.flags() else { continue };
        let Some((start, len)) = section.file_range() else { continue };
        if sh_flags & u64::from(SHF_EXECINSTR) != 0 {
            ranges.push(start as usize..(start + len) as usize);
        }
    }
    Ok(ranges)
}

/// `ja +0`.
const NOP: [u8; 8] = [0x05, 0, 0, 0, 0, 0, 0, 0];

/// BPF_STX | BPF_ATOMIC (word or double word) with an operation other than BPF_ADD (0).
fn is_atomic_beyond_add(insn: &[u8]) -> bool {
    const CLASS_MODE_MASK: u8 = 0x07 | 0xe0;
    const STX_ATOMIC: u8 = 0x03 | 0xc0;
    let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
    insn[0] & CLASS_MODE_MASK == STX_ATOMIC && imm != 0
}

/// `struct bpf_insn`: opcode, destination register (low nibble) and source (high), offset,
/// immediate.
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: dst | src << 4, off, imm }
}

/// The `union bpf_attr` fields BPF_PROG_LOAD reads, as far as `prog_flags`.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// Whether the kernel loads an atomic OR (a socket filter ORing into its own stack): refused
/// as invalid where the kernel does not know it.
fn atomic_or_loads() -> bool {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
    const MOV64_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const STX_DW: u8 = 0x7b; // BPF_STX | BPF_MEM | BPF_DW
    const ATOMIC_DW: u8 = 0xdb; // BPF_STX | BPF_ATOMIC | BPF_DW
    const BPF_OR: i32 = 0x40;
    const EXIT: u8 = 0x95;
    let insns = [
        insn(MOV64_IMM, 1, 0, 0, 0),
        insn(STX_DW, 10, 1, -8, 0),
        insn(MOV64_IMM, 1, 0, 0, 1),
        insn(ATOMIC_DW, 10, 1, -8, BPF_OR),
        insn(MOV64_IMM, 0, 0, 0, 0),
        insn(EXIT, 0, 0, 0, 0),
    ];
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
    };
    // SAFETY: a BPF_PROG_LOAD attr, no padding, pointing at the instructions and license above,
    // which outlive the call.
    match unsafe { sys_bpf::bpf(BPF_PROG_LOAD, &mut attr) } {
        Ok(fd) => {
            // SAFETY: the program's fd, ours alone; closed here.
            drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            true
        }
        Err(e) => e.raw_os_error() != Some(libc::EINVAL),
    }
}

#[cfg(test)]
mod tests {
    use lb_common::KF_ALL;

    use super::*;

    /// Atomic operations beyond add in the object's code.
    fn atomics(object: &[u8]) -> usize {
        let code = code_ranges(object).unwrap();
        code.into_iter()
            .flat_map(|r| object[r].chunks_exact(8))
            .filter(|i| is_atomic_beyond_add(i))
            .count()
    }

    #[test]
    fn without_atomics_the_object_keeps_none_and_nothing_else_changes() {
        let Ok(object) = crate::ebpf_object() else {
            eprintln!("SKIPPED: built without the eBPF object");
            return;
        };
        let found = atomics(object);
        assert!(found > 0, "the object has an atomic OR (nat::note_snat_source)");
        let fitted = fit_object(object, KF_COARSE_CLOCK | KF_SET_RETVAL).unwrap();
        assert_eq!(atomics(&fitted), 0);
        assert_eq!(fitted.len(), object.len());
        let changed = object.iter().zip(fitted.iter()).filter(|(a, b)| a != b).count();
        assert!(changed <= found * 8, "{changed} bytes changed for {found} instructions");
        assert!(matches!(fit_object(object, KF_ALL).unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn each_missing_feature_names_its_fallback() {
        assert_eq!(fallbacks(0).len(), 3);
        assert_eq!(fallbacks(KF_ATOMICS | KF_COARSE_CLOCK), [fallbacks(0)[1]]);
    }
}
