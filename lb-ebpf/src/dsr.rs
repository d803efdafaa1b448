//! Direct server return (`MODE_DSR`, `--lb-mode hybrid`) for TCP flows from outside to another
//! node's backend. On the node that chose the backend, the flow gets a forward entry only (DNAT,
//! the client's address kept, sent on like a SNATed flow) and its SYN the frontend, in an IPv4
//! option or an IPv6 destination options header ([`add_option`], tc). On the backend's node, tc
//! ingress reads it ([`learn`]) and makes the reply entry with which tc egress gives the
//! backend's answers the frontend's address, straight to the client. The flow's other packets
//! carry nothing: the first node forwards them by its entry, the backend's node routes them as
//! any packet to a pod. Linux skips IPv4 options it does not know on packets it receives, and
//! IPv6 options whose type says so (ours), so the pod's stack does too.

use aya_ebpf::{
    bindings::{BPF_F_RECOMPUTE_CSUM, bpf_adj_room_mode::BPF_ADJ_ROOM_NET},
    programs::TcContext,
};
use lb_common::{
    Addr, CT_F_DSR, CT_F_REPLY, CT_STATE_NEW, DSR_OPTION_LEN, DSR_OPTION_TYPE, DSR6_HEADER_LEN,
    DSR6_OPTION_LEN, DSR6_OPTION_TYPE, MODE_DSR, OPT_DEVICE_MODES, OPT_REPLY_PORTS_READY,
    PROTO_TCP, SCOPE_EXTERNAL, STAT_DSR_LEARNED, STAT_DSR_REFUSED, addr_from_v4_raw,
    ct_state_ended,
};

use crate::{
    clock, conntrack, csum, lookup,
    maps::{FLOW, OPTIONS, REPLY_PORTS, SCRATCH},
    nat,
    packet::{Bounds, Flow, IPV6_DEST_OPTS, IPV6_LEN, TCP_ACK, TCP_RST, TCP_SYN},
    rewrite::Rewrite,
    stats,
};

/// Whether a new flow from outside to another node's backend goes by DSR (no SNAT).
#[inline(always)]
pub fn applies(flow: &Flow) -> bool {
    flow.proto == PROTO_TCP && OPTIONS.get(OPT_DEVICE_MODES).is_some_and(|m| *m & MODE_DSR != 0)
}

/// [`applies`] for XDP, which leaves such a flow to tc (its SYN needs the option). A
/// subprogram: inlined, the registers its tests leave behind made the verifier walk the rest
/// of every new flow twice.
#[inline(never)]
pub fn xdp_leaves_to_tc(flow: &Flow) -> bool {
    applies(flow)
}

/// Whether the packet opens its connection (a SYN, not its answer): the one that carries the
/// frontend to the backend's node. A retransmitted SYN carries it again.
#[inline(always)]
pub fn opens(flow: &Flow) -> bool {
    flow.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
}

/// Whether tc ingress should look for the frontend: a TCP SYN with IPv4 options or IPv6
/// extension headers.
#[inline(always)]
pub fn may_carry(flow: &Flow) -> bool {
    let base = if flow.is_v6 { IPV6_LEN } else { 20 };
    flow.proto == PROTO_TCP && opens(flow) && flow.l4() > flow.l3() + base
}

/// Where an IPv6 header's next header field is.
const IPV6_NEXT_HEADER: usize = 6;

/// Inserts the frontend (the parsed packet's destination, in `maps::FLOW`) after the fixed
/// part of the IP header of the packet tc ingress just rewrote, and fixes the header.
#[inline(never)]
pub fn add_option(ctx: &TcContext) -> Result<(), ()> {
    let flow = FLOW.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's slot, filled by device::handle for this very packet.
    let flow = unsafe { &mut *flow };
    if flow.is_v6 {
        add_v6(ctx, flow)?;
        flow.l4_off += DSR6_HEADER_LEN as usize;
    } else {
        add_v4(ctx, flow)?;
        flow.l4_off += DSR_OPTION_LEN as usize;
    }
    Ok(())
}

/// IPv4: the option, with the header's length fields and checksum. A CHECKSUM_COMPLETE sum
/// stays right: the room comes zeroed, and a valid header sums to the same before and after.
#[inline(always)]
fn add_v4(ctx: &TcContext, flow: &Flow) -> Result<(), ()> {
    let l3 = flow.l3();
    // IHL counts 4-byte words, 15 at most: room for 8 more bytes up to 52.
    if flow.l4() > l3 + 52 {
        return Err(());
    }
    ctx.adjust_room(DSR_OPTION_LEN as i32, BPF_ADJ_ROOM_NET, 0).map_err(|_| ())?;
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    let head: *mut [u16; 6] = b.ptr_at(l3).ok_or(())?;
    let opt: *mut [u16; 4] = b.ptr_at(l3 + 20).ok_or(())?;
    let port = flow.dport_be.to_ne_bytes();
    let addr = flow.daddr[3].to_ne_bytes();
    let words = [
        u16::from_ne_bytes([DSR_OPTION_TYPE, DSR_OPTION_LEN]),
        u16::from_ne_bytes(port),
        u16::from_ne_bytes([addr[0], addr[1]]),
        u16::from_ne_bytes([addr[2], addr[3]]),
    ];
    // SAFETY: both pointers bounds-checked by ptr_at; tc may write packet data.
    unsafe {
        let h = &mut *head;
        // Version and IHL, then the total length: both grow by the option's two words.
        let (old0, old1) = (h[0], h[1]);
        let ver_ihl = old0.to_ne_bytes();
        let new0 = u16::from_ne_bytes([ver_ihl[0] + 2, ver_ihl[1]]);
        let new1 = (u16::from_be(old1) + DSR_OPTION_LEN as u16).to_be();
        let mut sum = csum::replace2(h[5], old0, new0);
        sum = csum::replace2(sum, old1, new1);
        for w in words {
            sum = csum::replace2(sum, 0, w);
        }
        (h[0], h[1], h[5]) = (new0, new1, sum);
        *opt = words;
    }
    Ok(())
}

/// IPv6: a destination options header first, holding the option (`DSR6_*`); the header's
/// payload length and next header follow. Written by the store helper, which keeps a
/// CHECKSUM_COMPLETE sum right (no header checksum makes up for these bytes).
#[inline(always)]
fn add_v6(ctx: &TcContext, flow: &Flow) -> Result<(), ()> {
    let l3 = flow.l3();
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    // Payload length, next header, hop limit.
    let fixed: *const [u8; 4] = b.ptr_at(l3 + 4).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    let [len_hi, len_lo, next, hops] = unsafe { *fixed };
    let len = u16::from_be_bytes([len_hi, len_lo]).checked_add(DSR6_HEADER_LEN as u16).ok_or(())?;
    // Built as words (the stack takes only aligned stores): next header, length, the option's
    // type and length; the port and the address, from the third byte on; a PadN of no data.
    let port = flow.dport_be.to_ne_bytes();
    let a = |i: usize| flow.daddr[i].to_ne_bytes();
    let (a0, a1, a2, a3) = (a(0), a(1), a(2), a(3));
    let ext: [u32; 6] = [
        u32::from_ne_bytes([next, DSR6_HEADER_LEN / 8 - 1, DSR6_OPTION_TYPE, DSR6_OPTION_LEN]),
        u32::from_ne_bytes([port[0], port[1], a0[0], a0[1]]),
        u32::from_ne_bytes([a0[2], a0[3], a1[0], a1[1]]),
        u32::from_ne_bytes([a1[2], a1[3], a2[0], a2[1]]),
        u32::from_ne_bytes([a2[2], a2[3], a3[0], a3[1]]),
        u32::from_ne_bytes([a3[2], a3[3], 1, 0]),
    ];
    ctx.adjust_room(DSR6_HEADER_LEN as i32, BPF_ADJ_ROOM_NET, 0).map_err(|_| ())?;
    let len = len.to_be_bytes();
    let fixed = u32::from_ne_bytes([len[0], len[1], IPV6_DEST_OPTS, hops]);
    let recompute = BPF_F_RECOMPUTE_CSUM as u64;
    ctx.store(l3 + 4, &fixed, recompute).map_err(|_| ())?;
    ctx.store(l3 + IPV6_LEN, &ext, recompute).map_err(|_| ())
}

/// On the backend's node (tc ingress, a packet [`may_carry`] says may): if it carries a
/// frontend of ours ([`read_frontend`]) and its destination port is one of this node's
/// backends' (`LB_REPLY_PORTS`), makes the reply entry that gives the backend's answers the
/// frontend's address, replacing an older one of the tuple (a retransmitted SYN, a tuple
/// reused), but not a live flow's that this node translates otherwise. Whatever this node's
/// own mode: switching it node by node (a DaemonSet's rolling update) then breaks no flow
/// another node sends by DSR. The packet itself goes on untouched.
/// The entry counts the answers under the frontend's service ([`frontend_service`]).
#[inline(never)]
pub fn learn<R: Rewrite>(pkt: &R, flow: &Flow) {
    if !crate::filters::port_may_match(&REPLY_PORTS, OPT_REPLY_PORTS_READY, flow.dport_be) {
        return;
    }
    let Some(s) = SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    let frontend = unsafe { &mut (*s).value.new_saddr };
    let Some(frontend_port) = read_frontend(&pkt.bounds(), flow, frontend) else { return };
    if frontend_port == 0 || frontend.iter().all(|w| *w == 0) {
        return;
    }
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    let s = unsafe { &mut *s };
    let ports = (flow.dport_be, flow.sport_be);
    conntrack::fill_key(&mut s.reply_key, &flow.daddr, &flow.saddr, ports, PROTO_TCP);
    // The reply entry of a live flow this node translates itself (it chose the backend, or a
    // pod of its reached the service) is not taken over: a client of that flow sends no new
    // SYN on its tuple, so the option is forged or stray, and taking it would give the flow's
    // answers another source. Another DSR flow's entry is (a retransmitted SYN, another
    // node's), and so is one of a flow that ended (its tuple reused).
    if let Some(old) = conntrack::get(&s.reply_key)
        && old.flags & CT_F_DSR == 0
        && !ct_state_ended(old.state)
    {
        stats::count(STAT_DSR_REFUSED);
        return;
    }
    let v = &mut s.value;
    v.last_seen_ns = clock::now_ns();
    v.new_daddr = flow.saddr;
    v.new_sport_be = frontend_port;
    v.new_dport_be = flow.sport_be;
    v.backend_id = 0;
    v.service_id = frontend_service(&v.new_saddr, frontend_port, flow.is_v6);
    v.flags = CT_F_REPLY | CT_F_DSR;
    v.state = CT_STATE_NEW;
    v._pad = [0; 2];
    if conntrack::insert(&s.reply_key, &s.value, false).is_ok() {
        stats::count(STAT_DSR_LEARNED);
    }
}

/// This node's id of the service whose frontend a DSR SYN names, so that its answers are counted
/// as that service's (`LB_SVC_STATS`, per-service metrics) as the first node counts the rest of
/// the flow: an ExternalIP or LoadBalancer IP by its address, a NodePort of the first node's
/// address by its port on this node's own (NodePorts are the same on every node). 0 (no
/// service) when this node has no such frontend (yet).
#[inline(always)]
fn frontend_service(addr: &Addr, port_be: u16, is_v6: bool) -> u32 {
    if let Some(svc) = lookup::service(*addr, port_be, PROTO_TCP, SCOPE_EXTERNAL) {
        return svc.service_id;
    }
    let node = nat::node_addr(is_v6);
    node.and_then(|node| lookup::service(node, port_be, PROTO_TCP, SCOPE_EXTERNAL))
        .map_or(0, |svc| svc.service_id)
}

/// The frontend a SYN carries (`add_option`'s bytes) into `addr`, and its port; `None` when the
/// packet carries none of ours.
#[inline(always)]
fn read_frontend(b: &Bounds, flow: &Flow, addr: &mut Addr) -> Option<u16> {
    let l3 = flow.l3();
    if !flow.is_v6 {
        let opt = b.ptr_at::<[u8; 8]>(l3 + 20)?;
        // SAFETY: bounds checked by ptr_at.
        let opt = unsafe { *opt };
        if opt[0] != DSR_OPTION_TYPE || opt[1] != DSR_OPTION_LEN {
            return None;
        }
        *addr = addr_from_v4_raw(u32::from_ne_bytes([opt[4], opt[5], opt[6], opt[7]]));
        return Some(u16::from_ne_bytes([opt[2], opt[3]]));
    }
    let next = b.ptr_at::<[u8; 8]>(l3)?;
    let ext = b.ptr_at::<[u8; 24]>(l3 + IPV6_LEN)?;
    // SAFETY: both bounds-checked by ptr_at.
    unsafe {
        let e = &*ext;
        if (*next)[IPV6_NEXT_HEADER] != IPV6_DEST_OPTS
            || e[1] != DSR6_HEADER_LEN / 8 - 1
            || e[2] != DSR6_OPTION_TYPE
            || e[3] != DSR6_OPTION_LEN
        {
            return None;
        }
        for (i, word) in addr.iter_mut().enumerate() {
            let at = 6 + 4 * i;
            *word = u32::from_ne_bytes([e[at], e[at + 1], e[at + 2], e[at + 3]]);
        }
        Some(u16::from_ne_bytes([e[4], e[5]]))
    }
}
