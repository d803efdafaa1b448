//! What the device hooks (tc ingress, tc egress, XDP) do with a packet, in the order of its
//! journey: parse; a tracked flow gets its recorded rewrite; otherwise, on ingress, a packet to
//! a frontend starts a flow (source ranges, backend choice with affinity, conntrack entries,
//! SNAT when the backend is on another node) and is rewritten. Everything else passes
//! untouched. tc and XDP share this code, so they never disagree about a packet; XDP hands a
//! packet to tc untouched when it cannot finish the job (see `leave_to_tc`). Pods' devices
//! (`tc_pod.rs`) run it too, for pods' own service traffic: internal frontends, SNAT only for
//! a pod reaching itself.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::*;

use crate::{
    conntrack, dsr, fib,
    filters::{bit_may_be_set, bit_set, port_may_match},
    fragment, lookup,
    maps::{
        CLUSTER_IPS, EXTERNAL_IPS, FLOW, FRONTEND_ADDRS, INGRESS_PORTS, OPTIONS, POD_PORTS,
        POD_REPLY_PORTS, REPLY_PORTS, SCRATCH, SOURCE_RANGES,
    },
    monitor,
    nat::{self, NatError},
    packet::{self, FRAG_FIRST, FRAG_NONE, Flow, Skip, TCP_RST},
    rewrite::{self, Rewrite},
    select, stats, words,
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    TcIngress,
    TcEgress,
    Xdp,
    /// tc ingress on a pod's device: the pod's packets.
    FromPod,
    /// tc egress on a pod's device: packets to the pod.
    ToPod,
}

impl Hook {
    /// Hooks that only restore frontends on replies (packets leaving the node, or entering a
    /// pod); the others start flows.
    #[inline(always)]
    pub fn is_egress(self) -> bool {
        matches!(self, Hook::TcEgress | Hook::ToPod)
    }
}

// Fieldless on purpose: an enum with payload returned through memory lets LLVM store
// undefined registers for the unused fields, which the verifier rejects.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Hand it to the kernel stack (rewritten or not).
    Pass,
    Drop,
    /// Rewritten to a source the stack would refuse on input: send it straight towards its
    /// new destination, which the packet now carries (tc ingress: the parsed flow is in
    /// `maps::FLOW`; XDP: back out of its device, the next hop's MACs are in `maps::SCRATCH`).
    Redirect,
    /// A DSR flow's SYN (tc ingress only): `Redirect` once it carries its frontend in an
    /// option (`dsr::add_option`).
    RedirectDsr,
    /// A new connection to a service without endpoints: answer with ICMP port unreachable
    /// (tc ingress; XDP passes such packets on to tc).
    Reject,
    /// An ICMP message (tc; XDP passes them on): an error about a tracked flow gets its
    /// translation (`icmp.rs`; the outer header is parsed in `maps::FLOW`), anything else
    /// goes to `other_icmp` (`icmp::translate_error` answers `Icmp` again for those).
    Icmp,
    /// An ICMP echo request to a service address that answers pings: answered (tc, `echo.rs`;
    /// XDP passes it on).
    Echo,
}

/// Handles one packet; `len` is its full length (for byte counters).
#[inline(always)]
pub fn handle<R: Rewrite>(pkt: &mut R, len: u32, hook: Hook) -> Action {
    match try_handle(pkt, len, hook) {
        Ok(action) => action,
        Err(skip) => {
            stats::count(skip.stat());
            Action::Pass
        }
    }
}

/// A pod's packet to a port its destination has no frontend for, whose address's bit in
/// `LB_CLUSTER_SET` is set: if it is a ClusterIP, refused, as the socket hooks refuse such a
/// connect() and kube-proxy rejects it, rather than routed out of the node to an address
/// nothing answers (a client's timeout). The bit set spares other pods' packets this lookup.
#[inline(never)]
fn unknown_port<R: Rewrite>(pkt: &R, flow: &Flow, len: u32) -> Action {
    let marker = lookup::service(flow.daddr, 0, 0, SCOPE_INTERNAL);
    if marker.is_none_or(|m| m.flags & SVC_F_ADDR_MARKER == 0) {
        stats::count(STAT_SERVICE_MISS);
        return Action::Pass;
    }
    // Never answer a reset (nor one's ICMP error): both ends would be left guessing.
    if flow.tcp_flags & TCP_RST != 0 {
        return dropped(pkt, Hook::FromPod, STAT_REJECT_UNKNOWN_PORT, EVENT_NO_SERVICE, len);
    }
    stats::count(STAT_REJECT_UNKNOWN_PORT);
    report(
        pkt,
        Hook::FromPod,
        EVENT_REJECT,
        STAT_REJECT_UNKNOWN_PORT,
        (EVENT_NO_SERVICE, None),
        len,
    );
    Action::Reject
}

/// An ICMP message tc met that is no error about a tracked flow (`icmp::translate_error`):
/// on ingress, for `no_frontend` (to a service address: dropped, or an echo request answered);
/// elsewhere passed.
#[inline(always)]
pub fn other_icmp<R: Rewrite>(pkt: &R, len: u32, hook: Hook) -> Action {
    let Some(flow) = FLOW.get_ptr(0) else { return Action::Pass };
    // SAFETY: this CPU's slot, filled for this packet by `handle`.
    let flow = unsafe { &*flow };
    if hook == Hook::TcIngress {
        return no_frontend(pkt, flow, len, hook, STAT_OTHER_L4);
    }
    stats::count(STAT_OTHER_L4);
    Action::Pass
}

/// A packet from outside that no frontend takes (ingress hooks; `miss` is the counter it
/// belongs to then): for `unknown_external` if its destination's bit in `LB_EXTERNAL_SET` is
/// set, else passed.
#[inline(always)]
pub fn no_frontend<R: Rewrite>(pkt: &R, flow: &Flow, len: u32, hook: Hook, miss: u32) -> Action {
    if bit_may_be_set(&EXTERNAL_IPS, OPT_INGRESS_PORTS_READY, addr_bit(&flow.daddr)) {
        return unknown_external(pkt, flow, len, hook, miss);
    }
    stats::count(miss);
    Action::Pass
}

/// A packet from outside to a port or protocol no frontend has, whose destination's bit in
/// `LB_EXTERNAL_SET` is set: if that is a service address outside clients reach (its external
/// marker: a LoadBalancer IP, an ExternalIP) and the stack would forward the packet rather
/// than take it (the address is not the node's), dropped, as Cilium does. Passed on, it would
/// go back out by the routes, usually to the router that sent it here: a loop until its TTL
/// runs out. An echo request is answered instead where the address answers pings
/// (`Action::Echo`). Anything else is counted as `miss` and passed.
#[inline(never)]
fn unknown_external<R: Rewrite>(pkt: &R, flow: &Flow, len: u32, hook: Hook, miss: u32) -> Action {
    let marker = lookup::service(flow.daddr, 0, 0, SCOPE_EXTERNAL);
    let Some(marker) = marker.filter(|m| m.flags & SVC_F_ADDR_MARKER != 0) else {
        stats::count(miss);
        return Action::Pass;
    };
    if !pkt.would_forward(flow) {
        stats::count(miss);
        return Action::Pass;
    }
    if marker.flags & SVC_F_ANSWER_PING != 0 && is_echo_request(pkt, flow) {
        return Action::Echo;
    }
    dropped(pkt, hook, STAT_DROP_UNKNOWN_PORT, EVENT_NO_SERVICE, len)
}

/// Whether the packet is an ICMP or ICMPv6 echo request of one piece, without IPv4 options or
/// IPv6 extension headers (what `echo.rs` answers in place).
#[inline(always)]
fn is_echo_request<R: Rewrite>(pkt: &R, flow: &Flow) -> bool {
    let (proto, header, request) = if flow.is_v6 {
        (PROTO_ICMPV6, 40, ICMPV6_ECHO_REQUEST)
    } else {
        (PROTO_ICMP, 20, ICMP_ECHO_REQUEST)
    };
    if flow.proto != proto || flow.frag != FRAG_NONE || flow.l4() != flow.l3() + header {
        return false;
    }
    // The whole echo header: a 1-byte bounds check compiles to a form the verifier rejects.
    let Some(echo) = pkt.bounds().ptr_at::<[u8; 8]>(flow.l4()) else { return false };
    // SAFETY: bounds checked by ptr_at.
    unsafe { (*echo)[0] == request }
}

#[inline(always)]
fn source_allowed(service_id: u32, saddr: &Addr) -> bool {
    let key = Key::new(32 + 128, SourceRangeKey { service_id, addr: *saddr });
    SOURCE_RANGES.get(&key).is_some()
}

#[inline(always)]
fn apply<R: Rewrite>(pkt: &mut R, flow: &Flow, ct: &CtValue, hook: Hook, len: u32) -> Action {
    if rewrite::apply(pkt, flow, ct).is_err() {
        return dropped(pkt, hook, STAT_DROP_REWRITE, ct.service_id, len);
    }
    if flow.frag == FRAG_FIRST {
        fragment::remember(flow);
    }
    if ct.flags & (CT_F_SNAT | CT_F_DSR) != 0 && !hook.is_egress() {
        if ct.flags & CT_F_DSR != 0 && hook == Hook::TcIngress && dsr::opens(flow) {
            return Action::RedirectDsr;
        }
        return Action::Redirect;
    }
    Action::Pass
}

/// A flow with SNAT that this hook cannot forward itself (XDP without a known next hop on the
/// arrival device): the packet goes on untouched, and tc ingress translates it the same way.
#[inline(always)]
fn leave_to_tc<R: Rewrite>(pkt: &R, flow: &Flow, src: &Addr, dst: &Addr) -> bool {
    if pkt.can_forward(flow, src, dst) {
        return false;
    }
    stats::count(STAT_XDP_TO_TC);
    true
}

/// Tells a monitor about this packet, if one wants `kind` (`lbctl monitor`).
#[inline(always)]
fn report<R: Rewrite>(
    pkt: &R,
    hook: Hook,
    kind: u8,
    reason: u32,
    ct: (u32, Option<&CtValue>),
    len: u32,
) {
    if monitor::wanted(kind) {
        let what = monitor::what(kind, monitor::hook_id(hook), reason);
        monitor::packet(what, ct.0, ct.1, monitor::at(pkt.ifindex(), len), 0);
    }
}

/// A packet dropped for `reason` (a `STAT_DROP_*` counter), reported to a monitor. A
/// subprogram: the established path, which reaches it only when a rewrite fails, keeps its
/// code and registers as they were.
#[inline(never)]
fn dropped<R: Rewrite>(pkt: &R, hook: Hook, reason: u32, service_id: u32, len: u32) -> Action {
    stats::count(reason);
    report(pkt, hook, EVENT_DROP, reason, (service_id, None), len);
    Action::Drop
}

/// A new flow's packet that goes no further: counted for its service and by `reason`, reported
/// to a monitor; refused (`Action::Reject`) or dropped.
#[inline(always)]
fn stopped<R: Rewrite>(
    pkt: &R,
    hook: Hook,
    reject: bool,
    reason: u32,
    svc: u32,
    len: u32,
) -> Action {
    count_service_hit(svc, len);
    if !reject {
        return dropped(pkt, hook, reason, svc, len);
    }
    stats::count(reason);
    report(pkt, hook, EVENT_REJECT, reason, (svc, None), len);
    Action::Reject
}

/// Counts a packet of a new flow to a frontend, for the service and in total.
#[inline(always)]
fn count_service_hit(service_id: u32, len: u32) {
    stats::count(STAT_SERVICE_HIT);
    stats::count_service(service_id, len);
}

#[inline(always)]
fn try_handle<R: Rewrite>(pkt: &mut R, len: u32, hook: Hook) -> Result<Action, Skip> {
    let slot = FLOW.get_ptr_mut(0).ok_or(Skip::Malformed)?;
    // SAFETY: this CPU's slot (see maps::FLOW); the parsed flow lives there, off the stack.
    let flow = unsafe { &mut *slot };
    match packet::parse(&pkt.bounds(), flow) {
        Ok(()) => {}
        // From a pod, an error about a flow is translated where it enters its client's pod or
        // leaves the node (egress), like the flow's replies (see `tracked`).
        Err(Skip::Icmp) if hook != Hook::Xdp && hook != Hook::FromPod => return Ok(Action::Icmp),
        // XDP hands later fragments to tc, untouched.
        Err(Skip::Fragment) if hook != Hook::Xdp => {
            return Ok(match later_fragment(pkt, flow, len, hook) {
                Some(action) => action,
                // Its first fragment was not translated: dropped with it if to a service
                // address. (Called here, where the hook is a constant: from `later_fragment`,
                // 6.1 found the chain of frames to a drop's monitor event over 512 bytes.)
                None if hook == Hook::TcIngress => no_frontend(pkt, flow, len, hook, STAT_FRAGMENT),
                None => {
                    stats::count(STAT_FRAGMENT);
                    Action::Pass
                }
            });
        }
        // A protocol no frontend has (GRE, SCTP, ESP...), maybe to a service address.
        Err(Skip::OtherL4) if matches!(hook, Hook::TcIngress | Hook::Xdp) => {
            return Ok(no_frontend(pkt, flow, len, hook, STAT_OTHER_L4));
        }
        Err(skip) => return Err(skip),
    }
    let flow = &*flow;
    // The SYN of a flow another node sends to a backend here by DSR names its frontend.
    if hook == Hook::TcIngress && dsr::may_carry(flow) {
        dsr::learn(pkt, flow);
    }
    // 0. Most packets are not ours, and their port says so without a hash lookup.
    match hook {
        // Not from a local backend's port: no conntrack entry can match (every packet leaving
        // the node takes this path).
        Hook::TcEgress if !port_may_match(&REPLY_PORTS, OPT_REPLY_PORTS_READY, flow.sport_be) => {
            return Ok(Action::Pass);
        }
        // Not from a backend's port.
        Hook::ToPod if !port_may_match(&POD_REPLY_PORTS, OPT_POD_PORTS_READY, flow.sport_be) => {
            return Ok(Action::Pass);
        }
        Hook::TcEgress | Hook::ToPod => {}
        Hook::TcIngress | Hook::Xdp | Hook::FromPod => {
            // Ingress: external frontends' ports; from a pod: internal ones'. Both: SNAT ports.
            // The option, read once, says which of the port and address sets are complete.
            let from_pod = hook == Hook::FromPod;
            let (ports, ready) = if from_pod {
                (&POD_PORTS, OPT_POD_PORTS_READY)
            } else {
                (&INGRESS_PORTS, OPT_INGRESS_PORTS_READY)
            };
            let ready = OPTIONS.get(ready).map_or(0, |ready| *ready);
            // Neither a frontend's port nor a SNAT port: no frontend and no conntrack entry can
            // match. The sets are complete (else the port would have matched): a clear bit in
            // the address sets says no too.
            if ready != 0 && !bit_set(ports, u16::from_be(flow.dport_be).into()) {
                if from_pod && bit_set(&CLUSTER_IPS, addr_bit(&flow.daddr)) {
                    return Ok(unknown_port(pkt, flow, len));
                }
                if !from_pod && bit_set(&EXTERNAL_IPS, addr_bit(&flow.daddr)) {
                    return Ok(unknown_external(pkt, flow, len, hook, STAT_SERVICE_MISS));
                }
                stats::count(STAT_SERVICE_MISS);
                return Ok(Action::Pass);
            }
            // A frontend's port, but to an address that is no frontend's nor a SNAT source (pod
            // to pod traffic to a port a service exposes too): nothing to look up. (Not a
            // ClusterIP either: from a pod, nothing to refuse.)
            if ready & READY_FRONTEND_ADDRS != 0 && !bit_set(&FRONTEND_ADDRS, addr_bit(&flow.daddr))
            {
                stats::count(STAT_SERVICE_MISS);
                return Ok(Action::Pass);
            }
        }
    }
    // 1. A tracked flow, either direction: its recorded rewrite, whatever the backend's state.
    if let Some(action) = tracked(pkt, flow, len, hook) {
        return Ok(action);
    }
    if hook.is_egress() {
        // Egress only restores frontends on replies; anything else is not ours.
        return Ok(Action::Pass);
    }
    // 2. A new flow to a frontend? A pod reaches services as the socket hooks would have it:
    // internal frontends. (Looked up here, where `hook` is a constant, so that only
    // `tc_from_pod` holds the refusal below: with it inside `new_flow`, whose code every
    // device program shares, calling a subprogram dead in all but one, 6.1 ran tc_ingress's
    // IPv4 rewrite wrong: addresses written at IPv6 offsets. 6.18 ran it right.)
    let scope = if hook == Hook::FromPod { SCOPE_INTERNAL } else { SCOPE_EXTERNAL };
    let Some(svc) = frontend(flow, scope) else {
        // Another frontend's port, or this one's with another protocol.
        if hook != Hook::FromPod {
            return Ok(no_frontend(pkt, flow, len, hook, STAT_SERVICE_MISS));
        }
        if bit_may_be_set(&CLUSTER_IPS, OPT_POD_PORTS_READY, addr_bit(&flow.daddr)) {
            return Ok(unknown_port(pkt, flow, len));
        }
        stats::count(STAT_SERVICE_MISS);
        return Ok(Action::Pass);
    };
    Ok(new_flow(pkt, flow, svc, len, hook))
}

// Separate functions (BPF subprograms): each keeps its own stack frame under the 512-byte limit.
#[inline(never)]
fn tracked<R: Rewrite>(pkt: &mut R, flow: &Flow, len: u32, hook: Hook) -> Option<Action> {
    let ct = conntrack::lookup(flow.ct_key(), flow.tcp_flags)?;
    if hook == Hook::FromPod && ct.flags & (CT_F_REPLY | CT_F_SNAT) == CT_F_REPLY {
        // A backend pod's reply: restored where it leaves the node or enters its client's pod
        // (tc egress), as without pod devices. Here its new source could be a node address
        // (a NodePort), which the stack would refuse on input.
        return Some(Action::Pass);
    }
    // The stack would refuse a packet whose source is now a node address: it must be forwarded
    // from here (checked before counting: tc counts what XDP hands over).
    if ct.flags & (CT_F_SNAT | CT_F_DSR) != 0
        && leave_to_tc(pkt, flow, &ct.new_saddr, &ct.new_daddr)
    {
        return Some(Action::Pass);
    }
    // A DSR flow's SYN again (retransmitted): tc adds the option.
    if hook == Hook::Xdp && ct.flags & CT_F_DSR != 0 && dsr::opens(flow) {
        stats::count(STAT_XDP_TO_TC);
        return Some(Action::Pass);
    }
    stats::count(STAT_CT_HIT);
    stats::count_service(ct.service_id, len);
    Some(apply(pkt, flow, ct, hook, len))
}

/// A fragment after the first (tc): its datagram's flow, through the ports the first
/// fragment left (`fragment.rs`), gets its translation; the conntrack entry is only read
/// (no TCP flags here). `None`: the first fragment left no ports (it was not translated).
#[inline(never)]
fn later_fragment<R: Rewrite>(
    pkt: &mut R,
    flow: &mut Flow,
    len: u32,
    hook: Hook,
) -> Option<Action> {
    let ports = fragment::ports(flow)?;
    (flow.sport_be, flow.dport_be, flow.proto) = (ports.sport_be, ports.dport_be, ports.proto);
    let Some(ct) = conntrack::lookup(flow.ct_key(), 0) else {
        stats::count(STAT_FRAGMENT);
        return Some(Action::Pass);
    };
    stats::count(STAT_FRAGMENT_TRANSLATED);
    stats::count_service(ct.service_id, len);
    Some(apply(pkt, flow, ct, hook, len))
}

/// The frontend of a flow's destination. A subprogram: its key stays off the program's own
/// frame, the first of `new_flow`'s chain of frames (512 bytes in all; 6.1 rounds each up to
/// 32).
#[inline(never)]
fn frontend(flow: &Flow, scope: u8) -> Option<&'static ServiceValue> {
    lookup::service(flow.daddr, flow.dport_be, flow.proto, scope)
}

/// A new flow's packet to the frontend `svc`.
#[inline(never)]
fn new_flow<R: Rewrite>(
    pkt: &mut R,
    flow: &Flow,
    svc: &ServiceValue,
    len: u32,
    hook: Hook,
) -> Action {
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed(svc.service_id, &flow.saddr) {
        return stopped(pkt, hook, false, STAT_DROP_SOURCE_RANGE, svc.service_id, len);
    }
    let Some(client) = SCRATCH.get_ptr_mut(0) else { return Action::Pass };
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    let client = unsafe { &mut (*client).client };
    client.client = flow.saddr;
    client.service_id = svc.service_id;
    client.kind = AFFINITY_BY_ADDR;
    client._pad8 = 0;
    client._pad16 = 0;
    let hash = flow_hash(&flow.saddr, &flow.daddr, flow.sport_be, flow.dport_be, flow.proto);
    let Ok(sel) = select::with_affinity(svc, client, hash) else {
        // No endpoint anywhere: reject (kube-proxy's REJECT). Policy Local without a local
        // endpoint, or the maps disagreeing: drop.
        if svc.flags & SVC_F_NO_ENDPOINT_DROP == 0 && flow.tcp_flags & TCP_RST == 0 {
            if hook == Hook::Xdp {
                return Action::Pass;
            }
            return stopped(pkt, hook, true, STAT_REJECT_NO_BACKEND, svc.service_id, len);
        }
        return stopped(pkt, hook, false, STAT_DROP_NO_BACKEND, svc.service_id, len);
    };
    let backend = sel.backend;
    if addr_is_v4(&backend.addr) == flow.is_v6 {
        return stopped(pkt, hook, false, STAT_DROP_NO_BACKEND, svc.service_id, len);
    }
    // Policy Cluster to another node's backend: SNAT, so its replies come back through here.
    // From a pod, only to the pod itself: its answer would otherwise stay inside the pod,
    // from an address its socket does not know (kube-proxy masquerades this hairpin too);
    // other backends answer the pod's own address, routed back to its device.
    let snat = if hook == Hook::FromPod {
        // Word by word: comparing the arrays whole copies them to the stack first.
        (0..4).all(|i| backend.addr[i] == flow.saddr[i])
    } else {
        backend.flags & BE_F_LOCAL == 0 && svc.flags & SVC_F_LOCAL_ONLY == 0
    };
    // From outside, by direct server return where the mode says so (`nat::create` decides, so
    // that the verifier walks what follows once): its SYN needs the option only tc adds.
    if snat && hook == Hook::Xdp && dsr::xdp_leaves_to_tc(flow) {
        stats::count(STAT_XDP_TO_TC);
        return Action::Pass;
    }
    // On a node whose hooks are on several devices, the source of the route to the backend
    // (`fib::snat_source`), else the node's primary address.
    let by_route = snat && fib::snat_by_route();
    if by_route {
        let Some(s) = SCRATCH.get_ptr_mut(0) else { return Action::Pass };
        // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
        let src = unsafe { &mut (*s).snat_src };
        // Left all zero without a node address: nat::create says so (a counted drop).
        // SAFETY: an address, plain data.
        unsafe { words::zero(src) };
        let have_node = pkt.snat_source(flow, &backend.addr, src);
        // Without a node address XDP leaves it to tc, which counts the drop.
        if hook == Hook::Xdp && (!have_node || leave_to_tc(pkt, flow, src, &backend.addr)) {
            return Action::Pass;
        }
    } else if snat && hook == Hook::Xdp {
        // Without a node address XDP leaves it to tc, which counts the drop.
        let Some(node) = nat::node_addr(flow.is_v6) else { return Action::Pass };
        if leave_to_tc(pkt, flow, &node, &backend.addr) {
            return Action::Pass;
        }
    }
    count_service_hit(svc.service_id, len);
    let outside = hook != Hook::FromPod;
    let ids =
        nat::Ids { backend_id: sel.id, service_id: svc.service_id, snat, outside, by_route, hash };
    let ct = match nat::create(flow, backend, &ids) {
        Ok(ct) => ct,
        Err(e) => {
            let reason = match e {
                NatError::NoNodeAddr => STAT_DROP_NO_NODE_ADDR,
                NatError::PortsExhausted => STAT_DROP_NAT_EXHAUSTED,
                NatError::CtFull => STAT_DROP_CT_FULL,
            };
            return dropped(pkt, hook, reason, svc.service_id, len);
        }
    };
    stats::count(STAT_CT_NEW);
    report(pkt, hook, EVENT_NEW_FLOW, STAT_CT_NEW, (svc.service_id, Some(ct)), len);
    apply(pkt, flow, ct, hook, len)
}
