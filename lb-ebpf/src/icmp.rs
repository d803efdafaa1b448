//! ICMP errors about tracked flows get their flow's translation, as kube-proxy's conntrack gives
//! RELATED packets theirs: an error quotes the packet it is about (network header and the first
//! transport bytes), and that packet carried the addresses of one side of the translation only.
//! Without this, a "fragmentation needed" or "packet too big" about a translated flow reaches
//! nobody who can use it (path MTU discovery breaks: large packets vanish), and a client is
//! never told that a pod's port is closed (a UDP client waits for its timeout).
//!
//! The quoted packet went one way of a flow, so the entry of the other way (its tuple reversed)
//! holds the rewrite that makes the error match what its receiver sent: the error goes to that
//! entry's new destination, the quoted source becomes that destination, the quoted destination
//! that entry's new source. An error sent by the quoted packet's own destination (a pod's port
//! unreachable) takes the translated address as its source too. Examples:
//! - a local pod's port unreachable about client -> pod (tc egress): quoted destination and
//!   error source become the frontend;
//! - a router's "fragmentation needed" about node -> remote pod, SNATed (tc ingress): the error
//!   goes to the client, quoting client -> frontend, and is sent on like the flow's replies;
//! - an error about frontend -> client, a reply (tc ingress): it goes to the backend, quoting
//!   backend -> client (or -> node when SNATed).
//!
//! tc only: XDP hands ICMP to tc untouched. The quoted transport checksum is left as it is
//! (receivers do not check it; SCTP's checks the quoted verification tag, which no translation
//! touches); every checksum of the packet itself is kept right.

use aya_ebpf::programs::TcContext;
use lb_common::{
    Addr, CT_F_SNAT, CtKey, PROTO_SCTP, PROTO_TCP, PROTO_UDP, STAT_ICMP_ERROR_TRANSLATED,
    addr_from_v4_raw,
};

use crate::{
    conntrack, csum,
    device::{Action, Hook},
    maps::FLOW,
    packet::{self, Bounds, Flow},
    rewrite::{self, ports_word},
    stats,
};

// Error types: destination unreachable, time exceeded, parameter problem (ICMPv6 also packet
// too big). Everything else (echo, redirects, neighbour discovery) is not about a flow.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
/// ICMP header before the quoted packet.
const ICMP_HEADER: usize = 8;
const IPV4_MIN: usize = 20;
const IPV6_HEADER: usize = 40;
/// Where a quoted transport header may start at most (bounds the packet offsets the verifier
/// follows; an error quotes the first bytes of a packet: its headers fit well before).
const MAX_QUOTED_L4: usize = 512;

/// The quoted packet's tuple and where its fields are.
struct Quoted {
    saddr: Addr,
    daddr: Addr,
    /// Its ports as the 32-bit word they form.
    ports: u32,
    proto: u8,
    l3: usize,
    l4: usize,
}

/// Handles an ICMP message tc ingress or egress met (the outer header is parsed in `FLOW`).
/// `Redirect`: translated, bound for a client through a SNATed flow, to be sent on as that
/// flow's replies are. `Icmp`: not an error about a tracked flow, untouched, for the caller
/// (`device::other_icmp`; called there, where the hook is a constant: from here, 6.1 found
/// the chain of frames to a drop's monitor event over 512 bytes).
#[inline(never)]
pub fn translate_error(ctx: &TcContext, hook: Hook) -> Action {
    let Some(flow) = FLOW.get_ptr(0) else { return Action::Pass };
    // SAFETY: this CPU's slot, filled for this packet by device::handle.
    let flow = unsafe { &*flow };
    match translate(ctx, flow) {
        Ok(snat) => {
            stats::count(STAT_ICMP_ERROR_TRANSLATED);
            if snat && !hook.is_egress() { Action::Redirect } else { Action::Pass }
        }
        Err(()) => Action::Icmp,
    }
}

/// Rewrites an error about a tracked flow; returns whether that flow is SNATed. `Err` leaves
/// the packet as it was.
#[inline(always)]
fn translate(ctx: &TcContext, flow: &Flow) -> Result<bool, ()> {
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    let q = quoted(&b, flow)?;
    // The entry of the direction opposite to the quoted packet's.
    let mut key = CtKey::default();
    let p = q.ports.to_ne_bytes();
    let (sport_be, dport_be) = (u16::from_ne_bytes([p[0], p[1]]), u16::from_ne_bytes([p[2], p[3]]));
    conntrack::fill_key(&mut key, &q.daddr, &q.saddr, (dport_be, sport_be), q.proto);
    let e = conntrack::get(&key).ok_or(())?;
    let snat = e.flags & CT_F_SNAT != 0;
    // What the error and the packet it quotes become.
    let out_src = if flow.saddr == q.daddr { e.new_saddr } else { flow.saddr };
    let out_dst = e.new_daddr;
    let (q_src, q_dst) = (e.new_daddr, e.new_saddr);
    let q_ports = ports_word(e.new_dport_be, e.new_sport_be);

    let first = if flow.is_v6 { 0 } else { 3 };
    let (mut outer_diff, mut quoted_diff) = (0u32, 0u32);
    for i in first..4 {
        outer_diff = csum::diff4(outer_diff, flow.saddr[i], out_src[i]);
        outer_diff = csum::diff4(outer_diff, flow.daddr[i], out_dst[i]);
        quoted_diff = csum::diff4(quoted_diff, q.saddr[i], q_src[i]);
        quoted_diff = csum::diff4(quoted_diff, q.daddr[i], q_dst[i]);
    }
    let ports_diff = csum::diff4(0, q.ports, q_ports);
    let icmp_csum = flow.l4() + 2;
    if flow.is_v6 {
        // ICMPv6 sums a pseudo-header (the outer addresses) and everything quoted.
        rewrite::l4_pseudo_replace(ctx, icmp_csum, outer_diff, true, 0)?;
        let payload = csum::add(quoted_diff, ports_diff);
        ctx.l4_csum_replace(icmp_csum, 0, payload as u64, 0).map_err(|_| ())?;
    } else {
        // ICMP sums no pseudo-header; the quoted header's own checksum absorbs its address
        // change, which leaves the ports'.
        ctx.l4_csum_replace(icmp_csum, 0, ports_diff as u64, 0).map_err(|_| ())?;
    }
    // The helper may move packet data: fresh bounds for the writes.
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    // SAFETY: every pointer bounds-checked by ptr_at; tc may write packet data directly.
    unsafe {
        if flow.is_v6 {
            let outer: *mut [Addr; 2] = b.ptr_at(flow.l3() + 8).ok_or(())?;
            core::ptr::write_unaligned(outer, [out_src, out_dst]);
            let inner: *mut [Addr; 2] = b.ptr_at(q.l3 + 8).ok_or(())?;
            core::ptr::write_unaligned(inner, [q_src, q_dst]);
        } else {
            let outer_csum: *mut u16 = b.ptr_at(flow.l3() + 10).ok_or(())?;
            let cur = core::ptr::read_unaligned(outer_csum);
            core::ptr::write_unaligned(outer_csum, csum::apply_diff(cur, outer_diff));
            let outer: *mut [u32; 2] = b.ptr_at(flow.l3() + 12).ok_or(())?;
            core::ptr::write_unaligned(outer, [out_src[3], out_dst[3]]);
            let inner_csum: *mut u16 = b.ptr_at(q.l3 + 10).ok_or(())?;
            let cur = core::ptr::read_unaligned(inner_csum);
            core::ptr::write_unaligned(inner_csum, csum::apply_diff(cur, quoted_diff));
            let inner: *mut [u32; 2] = b.ptr_at(q.l3 + 12).ok_or(())?;
            core::ptr::write_unaligned(inner, [q_src[3], q_dst[3]]);
        }
        let ports: *mut u32 = b.ptr_at(q.l4).ok_or(())?;
        core::ptr::write_unaligned(ports, q_ports);
    }
    Ok(snat)
}

/// The TCP, UDP or SCTP packet an ICMP error quotes, if the message is an error and quotes one (of
/// the outer header's family, with at least its ports).
#[inline(always)]
fn quoted(b: &Bounds, flow: &Flow) -> Result<Quoted, ()> {
    // The whole ICMP header: a 1-byte bounds check compiles to a form the verifier rejects.
    let header: *const [u8; ICMP_HEADER] = b.ptr_at(flow.l4()).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    let icmp_type = unsafe { (*header)[0] };
    let l3 = flow.l4() + ICMP_HEADER;
    let (saddr, daddr, proto, l4) = if flow.is_v6 {
        if !(ICMPV6_DEST_UNREACH..=ICMPV6_PARAMETER_PROBLEM).contains(&icmp_type) {
            return Err(());
        }
        let ip: *const [u8; IPV6_HEADER] = b.ptr_at(l3).ok_or(())?;
        // SAFETY: bounds checked by ptr_at; the version nibble, next header, addresses.
        let (mut s, mut d) = ([0; 4], [0; 4]);
        let next = unsafe {
            let h = ip.cast::<u8>();
            if *h >> 4 != 6 {
                return Err(());
            }
            packet::read_addr_pair(h.add(8).cast(), &mut s, &mut d);
            *h.add(6)
        };
        // The quoted packet's extension headers, as the packet parser steps over them.
        let t = packet::ipv6_transport(b, l3 + IPV6_HEADER, next).map_err(|_| ())?;
        // A later fragment's quote has no ports.
        if t.frag == packet::FRAG_LATER || t.off > MAX_QUOTED_L4 {
            return Err(());
        }
        (s, d, t.proto, t.off)
    } else {
        if !matches!(icmp_type, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM) {
            return Err(());
        }
        let ip: *const [u8; IPV4_MIN] = b.ptr_at(l3).ok_or(())?;
        // SAFETY: bounds checked by ptr_at; version and length, protocol, addresses.
        unsafe {
            let h = ip.cast::<u8>();
            let vihl = *h;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            // A later fragment's quote (a fragment offset) has no ports.
            let frag_off = u16::from_be_bytes([*h.add(6), *h.add(7)]) & 0x1fff;
            if vihl >> 4 != 4 || ihl < IPV4_MIN || frag_off != 0 {
                return Err(());
            }
            let s = core::ptr::read_unaligned(h.add(12).cast::<u32>());
            let d = core::ptr::read_unaligned(h.add(16).cast::<u32>());
            (addr_from_v4_raw(s), addr_from_v4_raw(d), *h.add(9), l3 + ihl)
        }
    };
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_SCTP {
        return Err(());
    }
    let ports: *const u32 = b.ptr_at(l4).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { core::ptr::read_unaligned(ports) };
    Ok(Quoted { saddr, daddr, ports, proto, l3, l4 })
}
