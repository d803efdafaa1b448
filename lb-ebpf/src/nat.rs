//! Creating the conntrack entries of a new device flow, with SNAT to a node address and a
//! source port chosen in BPF when the backend is on another node (so that its replies come
//! back through this node).

use core::{intrinsics::AtomicOrdering, num::NonZeroU32};

use lb_common::*;

use crate::{
    clock, conntrack, dsr, kernel,
    maps::{FRONTEND_ADDRS, NODE, OPTIONS, SCRATCH},
    packet::Flow,
};

#[derive(Clone, Copy)]
pub enum NatError {
    NoNodeAddr,
    PortsExhausted,
    CtFull,
}

/// This node's address of the flow's family, for SNAT.
#[inline(always)]
pub fn node_addr(v6: bool) -> Option<Addr> {
    let node = NODE.get(0)?;
    let a = if v6 { node.addr6 } else { node.addr4 };
    if a == [0; 4] || (!v6 && a[3] == 0) { None } else { Some(a) }
}

/// Sets a SNAT source's bit in `LB_FRONTEND_SET`, so that replies to it pass the device hooks'
/// address filter: the agent cannot know in time every source a route picks. Not on a kernel
/// without atomics, where the agent leaves that filter off.
#[inline(always)]
fn note_snat_source(addr: &Addr) {
    if !kernel::has(KF_ATOMICS) {
        return;
    }
    let bit = addr_bit(addr);
    let Some(word) = FRONTEND_ADDRS.get_ptr_mut(bit / 64) else { return };
    let mask = 1u64 << (bit % 64);
    // SAFETY: a word of an array map's value, valid while the program runs. Other CPUs (and
    // the agent) set bits of it too, hence an atomic OR, and only when the bit is missing.
    unsafe {
        if core::ptr::read_volatile(word) & mask == 0 {
            core::intrinsics::atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(word, mask);
        }
    }
}

/// SNAT source ports as (first, how many): the agent's `--nat-port-range`, else the default.
/// Non-zero by type: a division by a possible zero would compile to a panic, which the
/// verifier refuses.
#[inline(always)]
fn port_range() -> (u32, NonZeroU32) {
    let opt = |i| OPTIONS.get(i).copied().unwrap_or(0);
    let (first, count) = nat_ports(opt(OPT_NAT_PORT_MIN), opt(OPT_NAT_PORT_MAX));
    (first, NonZeroU32::new(count).unwrap_or(NonZeroU32::MIN))
}

/// Records the flow `flow` -> `backend` (both directions) and returns the forward entry (the
/// copy in this CPU's scratch slot that was stored: looking it up again would cost a third
/// hash operation per new flow). Keys and values are built in per-CPU scratch space, not on the stack.
#[inline(never)]
pub fn create(
    flow: &Flow,
    backend: &BackendValue,
    ids: &Ids,
) -> Result<&'static CtValue, NatError> {
    let s = SCRATCH.get_ptr_mut(0).ok_or(NatError::CtFull)?;
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    let s = unsafe { &mut *s };
    // Decided here, not by the caller: the verifier then walks the caller's rest once.
    let dsr = ids.snat && ids.outside && dsr::applies(flow);
    let snat = ids.snat && !dsr;
    let flags = if snat {
        CT_F_SNAT
    } else if dsr {
        CT_F_DSR
    } else {
        0
    };
    // Field by field into the scratch slot: whole-struct literals would be built on the stack
    // first, and this function's frame is part of a call chain bounded to 512 bytes.
    let ports = (flow.sport_be, flow.dport_be);
    conntrack::fill_key(&mut s.forward_key, &flow.saddr, &flow.daddr, ports, flow.proto);
    // First the reply (restores frontend as source, client as destination), then the same
    // value turned into the forward entry.
    let v = &mut s.value;
    v.last_seen_ns = clock::now_ns();
    v.new_saddr = flow.daddr;
    v.new_daddr = flow.saddr;
    v.new_sport_be = flow.dport_be;
    v.new_dport_be = flow.sport_be;
    v.backend_id = ids.backend_id;
    v.service_id = ids.service_id;
    v.flags = flags | CT_F_REPLY;
    v.state = CT_STATE_NEW;
    v._pad = [0; 2];
    // The reply arrives from the backend to the (possibly SNATed) client side.
    let ports = (backend.port_be, flow.sport_be);
    conntrack::fill_key(&mut s.reply_key, &backend.addr, &flow.saddr, ports, flow.proto);
    let mut sport_be = flow.sport_be;
    if dsr {
        // The backend's node makes the reply entry, from the SYN's option (`dsr.rs`).
    } else if !snat {
        conntrack::insert(&s.reply_key, &s.value, false).map_err(|_| NatError::CtFull)?;
    } else {
        if ids.by_route {
            // The source `fib::snat_source` chose (the caller put it in the slot).
            if s.snat_src.iter().all(|w| *w == 0) {
                return Err(NatError::NoNodeAddr);
            }
            s.reply_key.daddr = s.snat_src;
        } else {
            s.reply_key.daddr = node_addr(flow.is_v6).ok_or(NatError::NoNodeAddr)?;
        }
        let (first, range) = port_range();
        let start = ids.hash % range;
        // A stride from the hash too, so that flows starting at nearby ports do not walk the
        // same sequence; odd, so that in an even range it visits distinct ports before wrapping.
        let stride = ((ids.hash >> 16) % range) | 1;
        let mut claimed = false;
        for i in 0..NAT_PORT_TRIES {
            let port = (first + (start + i * stride) % range) as u16;
            s.reply_key.dport_be = port.to_be();
            // Claim the port: the reply tuple must be unique. A port still held by a flow that
            // ended long ago (expired, never looked up since) is taken over.
            if conntrack::insert(&s.reply_key, &s.value, true).is_ok()
                || (conntrack::reclaim_if_expired(&s.reply_key, &mut s.expired)
                    && conntrack::insert(&s.reply_key, &s.value, true).is_ok())
            {
                claimed = true;
                sport_be = port.to_be();
                break;
            }
        }
        if !claimed {
            return Err(NatError::PortsExhausted);
        }
        note_snat_source(&s.reply_key.daddr);
    }
    s.value.new_saddr = s.reply_key.daddr;
    s.value.new_daddr = backend.addr;
    s.value.new_sport_be = sport_be;
    s.value.new_dport_be = backend.port_be;
    s.value.flags = flags;
    if conntrack::insert(&s.forward_key, &s.value, false).is_err() {
        if !dsr {
            conntrack::remove(&s.reply_key);
        }
        return Err(NatError::CtFull);
    }
    Ok(&s.value)
}

/// Who the new flow belongs to (bundled: BPF functions take at most five arguments).
pub struct Ids {
    pub backend_id: u32,
    pub service_id: u32,
    pub snat: bool,
    /// From outside the node (a device hook, not a pod's): a flow that needs SNAT goes by
    /// direct server return instead where the mode says so (`dsr.rs`): a forward entry only.
    pub outside: bool,
    /// SNAT from the source the caller left in `SCRATCH.snat_src` (`fib::snat_source`), not
    /// the node's primary address.
    pub by_route: bool,
    pub hash: u32,
}
