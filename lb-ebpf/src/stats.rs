//! Per-CPU counters: no atomics needed, user space sums the CPUs.

use lb_common::ServiceStats;

use crate::maps::{SERVICE_STATS, STATS};

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and programs do not preempt
        // each other on one CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn count_service(service_id: u32, bytes: u32) {
    if let Some(slot) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: as in `count`.
        unsafe {
            let s: &mut ServiceStats = &mut *slot;
            s.packets += 1;
            s.bytes += bytes as u64;
        }
    }
}
