//! Events for `lbctl monitor` (see `lb_common::events`): a drop, a refusal or a new flow, sent
//! only while a monitor holds the lease in `LB_OPTIONS` and wants that kind. Without a
//! monitor, the cost is one option read on the paths that send events (none of them is an
//! established flow's).
//!
//! Events are written straight into the ring buffer: no copy on the stack, whose frames the
//! callers' subprograms already use.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_socket_cookie,
        generated::bpf_get_current_comm,
    },
    maps::ring_buf::RingBufEntry,
    programs::SockAddrContext,
};
use lb_common::{
    Addr, BackendValue, CtValue, EVENT_F_SNAT, EVENT_F_V6, MonitorEvent, OPT_MONITOR_KINDS,
    OPT_MONITOR_UNTIL_S, STAT_MONITOR_LOST,
};

use crate::{
    clock,
    device::Hook,
    maps::{EVENTS, FLOW, OPTIONS},
    stats, words,
};

const NS: u64 = 1_000_000_000;

/// Whether a monitor wants events of `kind` now.
#[inline(always)]
pub fn wanted(kind: u8) -> bool {
    let kinds = OPTIONS.get(OPT_MONITOR_KINDS).copied().unwrap_or(0);
    if kinds & (1 << kind) == 0 {
        return false;
    }
    let until = OPTIONS.get(OPT_MONITOR_UNTIL_S).copied().unwrap_or(0) as u64;
    clock::now_ns() / NS <= until
}

/// What happened, for [`packet`] and [`socket`]: kind, hook and reason in one register (a
/// subprogram takes five arguments at most).
#[inline(always)]
pub fn what(kind: u8, hook: u8, reason: u32) -> u32 {
    kind as u32 | (hook as u32) << 8 | reason << 16
}

/// A device hook's `HOOK_*`.
#[inline(always)]
pub fn hook_id(hook: Hook) -> u8 {
    match hook {
        Hook::TcIngress => lb_common::HOOK_TC_INGRESS,
        Hook::TcEgress => lb_common::HOOK_TC_EGRESS,
        Hook::Xdp => lb_common::HOOK_XDP,
        Hook::FromPod => lb_common::HOOK_TC_FROM_POD,
        Hook::ToPod => lb_common::HOOK_TC_TO_POD,
    }
}

/// Room for one event in the ring buffer; a full ring counts the event lost.
#[inline(always)]
fn reserve() -> Option<RingBufEntry<MonitorEvent>> {
    let entry = EVENTS.reserve::<MonitorEvent>(0);
    if entry.is_none() {
        stats::count(STAT_MONITOR_LOST);
    }
    entry
}

/// Where a packet is, for [`packet`]: its device and length in one register.
#[inline(always)]
pub fn at(ifindex: u32, len: u32) -> u64 {
    ifindex as u64 | (len as u64) << 32
}

/// Sends an event about the packet a device hook is handling (its flow is in `maps::FLOW`);
/// `ct`: the flow's translation; `mtu`: the route's, for a packet too big for it. Call it when
/// [`wanted`].
#[inline(never)]
pub fn packet(what: u32, service_id: u32, ct: Option<&CtValue>, at: u64, mtu: u32) {
    let Some(flow) = FLOW.get_ptr(0) else { return };
    // SAFETY: this CPU's slot, filled for this packet by device::handle.
    let flow = unsafe { &*flow };
    let Some(mut entry) = reserve() else { return };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved record (plain data): zeroed whole (see `words`: field by
    // field, the zero fields compiled to memset calls), then its other fields written.
    unsafe {
        words::zero(&mut *e);
        (*e).time_ns = clock::now_ns();
        words::copy(&flow.saddr, &mut (*e).saddr);
        words::copy(&flow.daddr, &mut (*e).daddr);
        (*e).sport_be = flow.sport_be;
        (*e).dport_be = flow.dport_be;
        let mut flags = if flow.is_v6 { EVENT_F_V6 } else { 0 };
        if let Some(ct) = ct {
            words::copy(&ct.new_saddr, &mut (*e).new_saddr);
            words::copy(&ct.new_daddr, &mut (*e).new_daddr);
            (*e).new_sport_be = ct.new_sport_be;
            (*e).new_dport_be = ct.new_dport_be;
            if ct.flags & lb_common::CT_F_SNAT != 0 {
                flags |= EVENT_F_SNAT;
            }
        }
        (*e).service_id = service_id;
        (*e).reason = what >> 16;
        (*e).ifindex = at as u32;
        (*e).len = (at >> 32) as u32;
        (*e).mtu = mtu;
        (*e).kind = what as u8;
        (*e).hook = (what >> 8) as u8;
        (*e).proto = flow.proto;
        (*e).flags = flags;
    }
    entry.submit(0);
}

/// A socket call a hook handles, for [`socket`].
pub struct SockCall<'a> {
    pub hook: u8,
    pub proto: u8,
    pub v6: bool,
    pub daddr: &'a Addr,
    pub dport_be: u16,
}

/// Sends an event about a socket call, with the calling process; `what`: kind and reason (as
/// [`what`] packs them); `backend`: where a translated call goes. Call it when [`wanted`]. A
/// subprogram: each hook has four call sites.
#[inline(never)]
pub fn socket(
    ctx: &SockAddrContext,
    call: &SockCall,
    what: u32,
    service_id: u32,
    backend: Option<&BackendValue>,
) {
    let Some(mut entry) = reserve() else { return };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved record: zeroed whole (as in `packet`), then its other fields
    // written; the helpers are allowed in socket hooks, which run in the calling process's
    // context.
    unsafe {
        words::zero(&mut *e);
        (*e).time_ns = clock::now_ns();
        (*e).cookie = bpf_get_socket_cookie(ctx.as_ptr());
        (*e).cgroup_id = bpf_get_current_cgroup_id();
        words::copy(call.daddr, &mut (*e).daddr);
        (*e).dport_be = call.dport_be;
        if let Some(b) = backend {
            words::copy(&b.addr, &mut (*e).new_daddr);
            (*e).new_dport_be = b.port_be;
        }
        (*e).service_id = service_id;
        (*e).reason = what >> 16;
        (*e).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        // Straight into the record (zeroed by the helper if it fails).
        let comm = &raw mut (*e).comm;
        bpf_get_current_comm(comm.cast(), size_of::<[u8; 16]>() as u32);
        (*e).kind = what as u8;
        (*e).hook = call.hook;
        (*e).proto = call.proto;
        (*e).flags = if call.v6 { EVENT_F_V6 } else { 0 };
    }
    entry.submit(0);
}
