//! What the kernel the programs run on offers, as the agent probed it (`GLOBAL_KERNEL_FEATURES`
//! in lb-common). A `.rodata` constant, frozen before the programs load: the verifier knows its
//! value, walks only the branch the kernel supports and removes the other, so a helper or
//! instruction a kernel lacks is never checked there (Linux 5.10 lacks three; the host kernels
//! have all, the default).

use aya_ebpf::Global;
use lb_common::KF_ALL;

#[unsafe(no_mangle)]
static LB_KERNEL_FEATURES: Global<u32> = Global::new(KF_ALL);

/// Whether the kernel has `feature` (a `KF_*` bit).
#[inline(always)]
pub fn has(feature: u32) -> bool {
    LB_KERNEL_FEATURES.load() & feature != 0
}
