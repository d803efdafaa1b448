//! cgroup socket hooks: ClusterIP, and this node reaching NodePorts, ExternalIPs and LB IPs.
//!
//! The backend is chosen once, at connect() (or at each unconnected UDP sendmsg()), and the
//! socket then talks to the pod directly: no per-packet NAT, no conntrack. getpeername() and UDP
//! recvmsg() are given the service address back, so applications never see the backend.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use lb_common::{
    AFFINITY_BY_NETNS, Addr, AffinityKey, EVENT_NO_SERVICE, EVENT_SOCK_REFUSED,
    EVENT_SOCK_TRANSLATED, HOOK_SOCK_CONNECT, HOOK_SOCK_SENDMSG, HOST_NETNS_INITIAL, KF_SET_RETVAL,
    OPT_HOST_NETNS_COOKIE_HI, OPT_HOST_NETNS_COOKIE_LO, OPT_POD_PORTS_READY,
    OPT_SOCK_HOST_NETNS_ONLY, PROTO_TCP, PROTO_UDP, READY_FRONTEND_ADDRS, SCOPE_INTERNAL,
    STAT_SOCK_NO_BACKEND, STAT_SOCK_REVERSED, STAT_SOCK_TRANSLATED, STAT_SOCK_UNKNOWN_PORT,
    SVC_F_ADDR_MARKER, SockRevNatKey, SockRevNatValue, addr_bit, addr_from_v4_raw, addr_is_v4,
};

use crate::{
    filters, kernel, lookup,
    maps::{self, CLUSTER_IPS, FRONTEND_ADDRS, POD_PORTS, SOCK_REVNAT},
    monitor::{self, SockCall},
    select, stats,
};

/// Let the call go on (with the address as we left it).
const PROCEED: i32 = 1;
/// Fail the call; `bpf_set_retval` chooses the errno (EPERM where the kernel lacks it).
const FAIL: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, false, HOOK_SOCK_CONNECT)
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, true, HOOK_SOCK_CONNECT)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, false, HOOK_SOCK_SENDMSG)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, true, HOOK_SOCK_SENDMSG)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}

/// The user-supplied destination (or peer) of the call.
#[inline(always)]
fn user_addr(ctx: &SockAddrContext, v6: bool) -> (Addr, u16) {
    // SAFETY: the context is valid for the program's run; the verifier checks field access.
    let sa = unsafe { &*ctx.sock_addr };
    let addr = if v6 { sa.user_ip6 } else { addr_from_v4_raw(sa.user_ip4) };
    (addr, sa.user_port as u16)
}

/// Rewrites the user-supplied address; false when it cannot be expressed in the socket's family.
#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, v6: bool, addr: &Addr, port_be: u16) -> bool {
    // SAFETY: as above; these fields are writable in sock_addr programs.
    let sa = unsafe { &mut *ctx.sock_addr };
    if v6 {
        sa.user_ip6[0] = addr[0];
        sa.user_ip6[1] = addr[1];
        sa.user_ip6[2] = addr[2];
        sa.user_ip6[3] = addr[3];
    } else {
        if !addr_is_v4(addr) {
            return false;
        }
        sa.user_ip4 = addr[3];
    }
    sa.user_port = port_be as u32;
    true
}

/// Fails the call with ECONNREFUSED, as a kube-proxy REJECT would make it (EPERM on kernels
/// before 5.18, which cannot choose the errno); counted by
/// `reason` and reported to a monitor.
#[inline(always)]
fn refuse(ctx: &SockAddrContext, call: &SockCall, reason: u32, service_id: u32) -> i32 {
    stats::count(reason);
    if monitor::wanted(EVENT_SOCK_REFUSED) {
        let what = monitor::what(EVENT_SOCK_REFUSED, call.hook, reason);
        monitor::socket(ctx, call, what, service_id, None);
    }
    if kernel::has(KF_SET_RETVAL) {
        // SAFETY: allowed in cgroup hooks.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    FAIL
}

#[inline(always)]
fn forward(ctx: &SockAddrContext, v6: bool, hook: u8) -> i32 {
    // SAFETY: as in `user_addr`.
    let proto = unsafe { (*ctx.sock_addr).protocol } as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return PROCEED;
    }
    if host_netns_only() && netns_cookie(ctx) != host_netns() {
        // A pod's socket keeps the service address; its device's hooks translate the packets.
        return PROCEED;
    }
    let (daddr, dport_be) = user_addr(ctx, v6);
    let call = SockCall { hook, proto, v6, daddr: &daddr, dport_be };
    // Most calls are to no service (a pod's to another pod, anyone's to the world), and the
    // filter sets say so without a hash lookup, where the agent has completed them: no
    // internal frontend has the port (left: a ClusterIP's unknown port), or none the address.
    let ready = maps::OPTIONS.get(OPT_POD_PORTS_READY).map_or(0, |ready| *ready);
    if ready != 0 && !filters::bit_set(&POD_PORTS, u16::from_be(dport_be).into()) {
        if !filters::bit_set(&CLUSTER_IPS, addr_bit(&daddr)) {
            return PROCEED;
        }
        return refuse_if_cluster_ip(ctx, &call, &daddr);
    }
    if ready & READY_FRONTEND_ADDRS != 0 && !filters::bit_set(&FRONTEND_ADDRS, addr_bit(&daddr)) {
        return PROCEED;
    }
    let Some(svc) = lookup::service(daddr, dport_be, proto, SCOPE_INTERNAL) else {
        return refuse_if_cluster_ip(ctx, &call, &daddr);
    };
    let netns = netns_cookie(ctx);
    // 127.0.0.1:NodePort is the host's alone: a pod's loopback is its own.
    if is_loopback(&daddr) && netns != host_netns() {
        return PROCEED;
    }
    let client = AffinityKey {
        client: [netns as u32, (netns >> 32) as u32, 0, 0],
        service_id: svc.service_id,
        kind: AFFINITY_BY_NETNS,
        _pad8: 0,
        _pad16: 0,
    };
    // SAFETY: no preconditions.
    let hash = unsafe { bpf_get_prandom_u32() };
    let Ok(sel) = select::with_affinity(svc, &client, hash) else {
        return refuse(ctx, &call, STAT_SOCK_NO_BACKEND, svc.service_id);
    };
    let backend = sel.backend;
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey {
        cookie,
        addr: backend.addr,
        port_be: backend.port_be,
        _pad16: 0,
        _pad32: 0,
    };
    let value = maps::Aligned(SockRevNatValue {
        addr: daddr,
        port_be: dport_be,
        _pad: 0,
        service_id: svc.service_id,
    });
    if !(hook == HOOK_SOCK_SENDMSG && recorded(&key, &value.0)) {
        // By reference: a value passed by value would be copied to an unaligned slot first.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let _ = SOCK_REVNAT.insert(key, &value.0, 0);
    }
    if !set_user_addr(ctx, v6, &backend.addr, backend.port_be) {
        // An IPv6 backend for an IPv4 socket: the plan never does this; refuse, counted.
        return refuse(ctx, &call, STAT_SOCK_NO_BACKEND, svc.service_id);
    }
    stats::count(STAT_SOCK_TRANSLATED);
    stats::count_service(svc.service_id, 0);
    if monitor::wanted(EVENT_SOCK_TRANSLATED) {
        let what = monitor::what(EVENT_SOCK_TRANSLATED, hook, STAT_SOCK_TRANSLATED);
        monitor::socket(ctx, &call, what, svc.service_id, Some(backend));
    }
    PROCEED
}

/// A call to a port no service has at `daddr`: refused if `daddr` is a ClusterIP (rather than
/// let it leave the node to an address nothing answers), else let go on.
#[inline(always)]
fn refuse_if_cluster_ip(ctx: &SockAddrContext, call: &SockCall, daddr: &Addr) -> i32 {
    if let Some(marker) = lookup::service(*daddr, 0, 0, SCOPE_INTERNAL)
        && marker.flags & SVC_F_ADDR_MARKER != 0
    {
        return refuse(ctx, call, STAT_SOCK_UNKNOWN_PORT, EVENT_NO_SERVICE);
    }
    PROCEED
}

/// Whether `SOCK_REVNAT` holds `value` for `key` already. An unconnected UDP socket sends
/// datagram after datagram to its service, and each of its backends' entries is there after
/// the first: writing it again would take a new element of the LRU map each time (an update
/// replaces the element; about a third of a microsecond here), where the lookup marks the
/// entry used all the same. Not asked at connect(): a new socket's entries are all new.
#[inline(always)]
fn recorded(key: &SockRevNatKey, value: &SockRevNatValue) -> bool {
    // SAFETY: read of a value replaced whole.
    let Some(old) = (unsafe { SOCK_REVNAT.get(key) }) else { return false };
    // Word by word: comparing the arrays whole copies them to the stack first.
    (0..4).all(|i| old.addr[i] == value.addr[i])
        && old.port_be == value.port_be
        && old.service_id == value.service_id
}

/// An IPv4 loopback address (127.0.0.0/8).
#[inline(always)]
fn is_loopback(addr: &Addr) -> bool {
    addr_is_v4(addr) && addr[3].to_ne_bytes()[0] == 127
}

/// The network namespace of the calling socket.
#[inline(always)]
fn netns_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: a helper valid for sock_addr programs.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// `--socket-lb-host-namespace-only` (`LB_OPTIONS`).
#[inline(always)]
fn host_netns_only() -> bool {
    maps::OPTIONS.get(OPT_SOCK_HOST_NETNS_ONLY).is_some_and(|on| *on != 0)
}

/// The agent's network namespace (`LB_OPTIONS`; 0, which no namespace has, before it is set;
/// `HOST_NETNS_INITIAL`: the initial namespace, whose cookie the agent could not read).
#[inline(always)]
fn host_netns() -> u64 {
    let opt = |i| maps::OPTIONS.get(i).copied().unwrap_or(0) as u64;
    let cookie = opt(OPT_HOST_NETNS_COOKIE_LO) | opt(OPT_HOST_NETNS_COOKIE_HI) << 32;
    if cookie == HOST_NETNS_INITIAL {
        // SAFETY: a null context asks for the initial namespace's cookie (sock_addr's
        // argument is a context or null).
        return unsafe { bpf_get_netns_cookie(core::ptr::null_mut()) };
    }
    cookie
}

#[inline(always)]
fn reverse(ctx: &SockAddrContext, v6: bool) -> i32 {
    let (peer, port_be) = user_addr(ctx, v6);
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey { cookie, addr: peer, port_be, _pad16: 0, _pad32: 0 };
    // SAFETY: read of a value replaced whole.
    if let Some(v) = unsafe { SOCK_REVNAT.get(key) } {
        let (addr, port) = (v.addr, v.port_be);
        if set_user_addr(ctx, v6, &addr, port) {
            stats::count(STAT_SOCK_REVERSED);
        }
    }
    PROCEED
}
