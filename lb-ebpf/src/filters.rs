//! The filter sets the agent keeps (`LB_*_PORTS`, `LB_*_SET`: bits of ports or addresses,
//! see the agent's `port_filters.rs`): a clear bit says a packet or call cannot concern a
//! frontend (or a conntrack entry), sparing it the hash lookups. A set is trusted only once
//! its `LB_OPTIONS` entry says the agent has completed it. Shared by the device hooks and the
//! socket hooks.

use aya_ebpf::maps::Array;

use crate::maps::OPTIONS;

/// Whether `port_be` is in the port set `ports`, or the agent has not yet filled it (its
/// `ready` option is unset): a packet whose port is not there cannot be ours, and skips the
/// lookups (`LB_REPLY_PORTS` on egress, `LB_INGRESS_PORTS` on ingress).
#[inline(always)]
pub fn port_may_match(ports: &Array<u64>, ready: u32, port_be: u16) -> bool {
    bit_may_be_set(ports, ready, u16::from_be(port_be).into())
}

/// Whether `bit` is set in the bit set `set`, or the agent has not yet filled it.
#[inline(always)]
pub fn bit_may_be_set(set: &Array<u64>, ready: u32, bit: u32) -> bool {
    if OPTIONS.get(ready).is_none_or(|ready| *ready == 0) {
        return true;
    }
    bit_set(set, bit)
}

/// Whether `bit` is set in the bit set `set` (known to be complete).
#[inline(always)]
pub fn bit_set(set: &Array<u64>, bit: u32) -> bool {
    set.get(bit / 64).is_none_or(|word| word & (1 << (bit % 64)) != 0)
}
