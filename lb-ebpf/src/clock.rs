//! The clock every stored timestamp uses: CLOCK_MONOTONIC_COARSE in nanoseconds, the value of
//! `bpf_ktime_get_coarse_ns` (user space reads the same clock with `clock_gettime`).
//!
//! That clock only moves at a timer tick, when jiffies moves too. So each CPU keeps the last
//! (jiffies, ns) pair it read and calls the helper only when jiffies has changed: once per tick
//! instead of once per packet. The verifier inlines `bpf_jiffies64` into one load, and the
//! per-CPU slot lookup into a few instructions; `bpf_ktime_get_coarse_ns` is a call into the
//! timekeeping code (about 5% of an established packet's time, measured with `perf`).
//! A reader that sees jiffies advance just before the timekeeper does keeps the previous tick's
//! time until the next tick: a few milliseconds, against ages counted in seconds.
//!
//! Kernels before 5.11 lack that helper: there the stamps are CLOCK_MONOTONIC
//! (`bpf_ktime_get_ns`), ahead of the coarse clock user space reads by less than a tick, which
//! its ages (compared saturating) absorb.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use lb_common::KF_COARSE_CLOCK;

use crate::{kernel, maps::CLOCK};

/// The kernel's clock, read through a helper call.
#[inline(always)]
fn read_clock() -> u64 {
    // SAFETY: no preconditions.
    unsafe {
        if kernel::has(KF_COARSE_CLOCK) { bpf_ktime_get_coarse_ns() } else { bpf_ktime_get_ns() }
    }
}

/// One CPU's last reading. Both fields start at 0, which jiffies never is (it starts 5 minutes
/// before its 32-bit wrap), so the first call reads the clock.
#[repr(C)]
pub struct ClockCache {
    pub jiffies: u64,
    pub ns: u64,
}

/// Now, in CLOCK_MONOTONIC_COARSE nanoseconds.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(slot) = CLOCK.get_ptr_mut(0) else { return read_clock() };
    // SAFETY: this CPU's slot. A program that interrupts this one between the two writes (a
    // socket hook can be interrupted by a device hook) reads a pair at most one tick old.
    let c = unsafe { &mut *slot };
    if c.jiffies != jiffies {
        c.ns = read_clock();
        c.jiffies = jiffies;
    }
    c.ns
}

/// How long before `now` the stamp `then` was taken. Another CPU's stamp may be ahead of this
/// CPU's `now` by up to a tick (see above): that is age 0, not an age near 2^64, which would
/// expire a live conntrack entry or affinity.
#[inline(always)]
pub fn age_ns(now: u64, then: u64) -> u64 {
    now.saturating_sub(then)
}
