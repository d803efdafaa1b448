//! Sending a translated packet straight out of the right device, from tc (redirect) and from XDP
//! (XDP_TX): used when the rewritten source is one the stack would refuse on input (a node
//! address after SNAT, a NodePort address on replies).

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::xdp_action::XDP_TX,
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, bpf_fib_lookup as FibParams},
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
};
use lb_common::{Addr, PROTO_SCTP, PROTO_TCP, STAT_XDP_REDIRECT, STAT_XDP_TX};

use crate::{
    clock,
    maps::{
        FLOW, NEXT_HOPS, NextHop, NextHopEntry, NextHopKey, SCRATCH, SNAT_BY_ROUTE, SNAT_DEVICES,
        XDP_TX_DEVICES,
    },
    packet::{Bounds, Flow},
    stats, words,
};

const ETH_LEN: u32 = 14;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
/// Not forwarded (what a lookup without its scratch space answers: cannot happen).
const BPF_FIB_LKUP_RET_NOT_FWDED: i64 = 4;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
/// tc: the route is found (device and MACs filled in) but the packet is larger than the
/// device's MTU; also what a lookup with a length over the route's MTU answers.
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;
/// IPv6 with `BPF_FIB_LOOKUP_SRC`: the route is found but no source address suits it.
const BPF_FIB_LKUP_RET_NO_SRC_ADDR: i64 = 9;
/// Ask the lookup for the route's preferred source address too (kernel 6.7+; older kernels
/// refuse the flag, and the lookup is made again without it).
const BPF_FIB_LOOKUP_SRC: u32 = 1 << 4;
/// What the helper returns for flags it does not know (and for nothing else a valid call
/// here can meet: an unknown device is -ENODEV).
const EINVAL: i64 = 22;
/// IPv4 "don't fragment", in the header's flags byte.
const IPV4_DF: u8 = 0x40;

/// Looks up the route of a packet `src` -> `dst` as if it had arrived on `ifindex` (the
/// kernel's forwarding decision, `p` receives egress device and MACs, and with
/// `BPF_FIB_LOOKUP_SRC` in `flags` the route's source address). With `tot_len`, only checks it
/// against the route's MTU (`mtu_result` then says it). Returns the helper's code.
#[inline(always)]
fn lookup(
    ctx: *mut c_void,
    ifindex: u32,
    flow: (bool, u8),
    (src, dst): (&Addr, &Addr),
    (tot_len, flags): (u16, u32),
    p: &mut FibParams,
) -> i64 {
    let (v6, proto) = flow;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.family = if v6 { AF_INET6 } else { AF_INET };
    p.l4_protocol = proto;
    p.ifindex = ifindex;
    // Unions written as the kernel documents them; an IPv4 address is the last word of `Addr`.
    if v6 {
        p.__bindgen_anon_3.ipv6_src = *src;
        p.__bindgen_anon_4.ipv6_dst = *dst;
    } else {
        p.__bindgen_anon_3.ipv4_src = src[3];
        p.__bindgen_anon_4.ipv4_dst = dst[3];
    }
    // SAFETY: p is a valid bpf_fib_lookup of the size passed; ctx is the program's context.
    unsafe { bpf_fib_lookup(ctx, p, size_of::<FibParams>() as i32, flags) }
}

/// The source and destination address the packet holds now (after rewriting).
#[inline(always)]
fn packet_addrs(b: &Bounds, v6: bool, l3_off: usize) -> Option<(Addr, Addr)> {
    if v6 {
        let src: *const Addr = b.ptr_at(l3_off + 8)?;
        let dst: *const Addr = b.ptr_at(l3_off + 24)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { Some((core::ptr::read_unaligned(src), core::ptr::read_unaligned(dst))) }
    } else {
        let src: *const u32 = b.ptr_at(l3_off + 12)?;
        let dst: *const u32 = b.ptr_at(l3_off + 16)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let (s, d) = (core::ptr::read_unaligned(src), core::ptr::read_unaligned(dst));
            Some(([0, 0, 0, s], [0, 0, 0, d]))
        }
    }
}

/// How long a next hop found by bpf_fib_lookup is reused: the lookup costs several hundred ns
/// per packet, a cache hit one hash lookup. A changed route or neighbour MAC is seen within
/// this time.
const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;

/// The next hop of a packet `src` -> `dst` arriving on `ifindex`, from the cache or the
/// kernel's routing (`BPF_FIB_LKUP_RET_*`). On success `out` holds egress device, MACs and the
/// route's MTU; on NO_NEIGH the egress device and the MTU (not cached: the neighbour is
/// resolved by the redirect).
#[inline(always)]
fn next_hop(
    ctx: *mut c_void,
    ifindex: u32,
    flow: (bool, u8),
    src: &Addr,
    dst: &Addr,
    out: &mut NextHop,
) -> i64 {
    let key = NextHopKey { ifindex, family: flow.0 as u32, dst: *dst };
    let now = clock::now_ns();
    // SAFETY: a copy of a live value is taken at once.
    if let Some(e) = unsafe { NEXT_HOPS.get(&key) }
        && clock::age_ns(now, e.looked_up_ns) < NEXT_HOP_TTL_NS
    {
        // Word by word: this runs on every packet XDP sends on.
        words::copy(&e.hop, out);
        return BPF_FIB_LKUP_RET_SUCCESS;
    }
    let Some(s) = SCRATCH.get_ptr_mut(0) else { return BPF_FIB_LKUP_RET_NOT_FWDED };
    // SAFETY: this CPU's scratch slot; `out` may be its `next_hop`, another field. An
    // all-zero bpf_fib_lookup is a valid starting point.
    let p = unsafe { &mut (*s).fib };
    // SAFETY: plain data (bpf_fib_lookup's fields and unions are integers).
    unsafe { words::zero(p) };
    let mut rc = lookup(ctx, ifindex, flow, (src, dst), (0, BPF_FIB_LOOKUP_SRC), p);
    // SAFETY: an address, plain data.
    unsafe { words::zero(&mut out.src) };
    if rc == -EINVAL || rc == BPF_FIB_LKUP_RET_NO_SRC_ADDR {
        // A kernel without BPF_FIB_LOOKUP_SRC refuses the flag, and a route without a source
        // address fails the lookup: the route alone (the redirect needs it all the same).
        // SAFETY: as above.
        unsafe { words::zero(p) };
        rc = lookup(ctx, ifindex, flow, (src, dst), (0, 0), p);
    } else if rc >= 0 {
        // SAFETY: the helper wrote the source member of the union (BPF_FIB_LOOKUP_SRC).
        unsafe {
            if flow.0 {
                words::copy(&p.__bindgen_anon_3.ipv6_src, &mut out.src);
            } else {
                out.src[3] = p.__bindgen_anon_3.ipv4_src;
            }
        }
    }
    out.ifindex = p.ifindex;
    // tc's lookup also checks this packet against the device's MTU: the route is found all
    // the same, and the packet's size is judged by the caller against the route's MTU.
    let neighbour_known = rc != BPF_FIB_LKUP_RET_NO_NEIGH;
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_FRAG_NEEDED && neighbour_known {
        return rc;
    }
    write_hop_macs(p, &mut out.macs);
    // The route's MTU (a route's own, a learned path MTU, else its device's): asked with a
    // length no route takes. 0 (unchecked) if one does.
    // SAFETY: as above.
    unsafe { words::zero(p) };
    let rc = lookup(ctx, ifindex, flow, (src, dst), (u16::MAX, 0), p);
    // SAFETY: the helper wrote the union's MTU member on this answer.
    out.mtu = if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        unsafe { p.__bindgen_anon_1.mtu_result as u32 }
    } else {
        0
    };
    if !neighbour_known {
        return BPF_FIB_LKUP_RET_NO_NEIGH;
    }
    let _ = NEXT_HOPS.insert(&key, &NextHopEntry { hop: *out, looked_up_ns: now }, 0);
    BPF_FIB_LKUP_RET_SUCCESS
}

/// Whether a packet whose network part is `l3_len` bytes exceeds the hop's MTU.
#[inline(always)]
fn too_big(hop: &NextHop, l3_len: u32) -> bool {
    hop.mtu != 0 && l3_len > hop.mtu
}

/// What tc did with a packet to send on.
pub enum Redirect {
    /// Redirected (or handed to the kernel to resolve the neighbour): the verdict.
    Sent(i32),
    /// No route, or the headers cannot be read: let the stack decide.
    NoRoute,
    /// Larger than the route's MTU (this MTU) and not to be fragmented: its sender must be
    /// told (`reject::too_big`), as the kernel's forwarding would.
    TooBig(u32),
}

/// tc: looks the route to the packet's (rewritten) destination up and redirects the packet to
/// its device, filling in MAC addresses (or letting the kernel resolve the neighbour).
#[inline(never)]
pub fn redirect(ctx: &TcContext) -> Redirect {
    let Some(flow) = FLOW.get_ptr(0) else { return Redirect::NoRoute };
    // SAFETY: this CPU's slot, filled by device::handle for this very packet.
    let flow = unsafe { &*flow };
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    let Some((src, dst)) = packet_addrs(&b, flow.is_v6, flow.l3()) else {
        return Redirect::NoRoute;
    };
    // SAFETY: reading fields of the skb context.
    let (ifindex, gso_size) = unsafe { ((*ctx.skb.skb).ingress_ifindex, (*ctx.skb.skb).gso_size) };
    // The hop in this CPU's scratch slot: one built on the stack was zeroed first, by a
    // byte-by-byte memset subprogram (36 bytes) on every packet sent on. `next_hop` fills
    // every field on the answers read below.
    let Some(s) = SCRATCH.get_ptr_mut(0) else { return Redirect::NoRoute };
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    let hop = unsafe { &mut (*s).next_hop };
    let rc = next_hop(ctx.as_ptr(), ifindex, (flow.is_v6, flow.proto), &src, &dst, hop);
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return Redirect::NoRoute;
    }
    // A GSO packet leaves as segments of its sender's size, judged as the kernel's forwarding
    // judges them; an IPv4 packet that may be fragmented is sent on as before (the device
    // decides). Judged whether the neighbour is known or not (the first packets to a new next
    // hop are as big as the others).
    let l3_len = if gso_size == 0 {
        ctx.len() - flow.l3() as u32
    } else {
        segment_l3_len(&b, flow, gso_size)
    };
    if too_big(hop, l3_len) && !may_fragment(&b, flow) {
        return Redirect::TooBig(hop.mtu);
    }
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            // A direct write (was a bpf_skb_store_bytes call), with bounds taken after the
            // helper calls above.
            let b = Bounds { start: ctx.data(), end: ctx.data_end() };
            if write_macs(&b, &hop.macs).is_none() {
                return Redirect::NoRoute;
            }
            // SAFETY: redirecting to a device the route named.
            Redirect::Sent(unsafe { bpf_redirect(hop.ifindex, 0) } as i32)
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // SAFETY: the kernel resolves the neighbour of the route's next hop.
            let rc = unsafe { bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) };
            Redirect::Sent(if rc == TC_ACT_REDIRECT as i64 { TC_ACT_REDIRECT } else { TC_ACT_OK })
        }
        _ => Redirect::NoRoute,
    }
}

/// The network length of one segment of a GSO packet: its headers and `gso_size` payload bytes.
/// SCTP's are cut by its sender, chunk by chunk, to the association's path MTU (`gso_size` is
/// `GSO_BY_FRAGS` there): never judged too big.
#[inline(always)]
fn segment_l3_len(b: &Bounds, flow: &Flow, gso_size: u32) -> u32 {
    if flow.proto == PROTO_SCTP {
        return 0;
    }
    let l4_header = if flow.proto == PROTO_TCP {
        // SAFETY: bounds checked by ptr_at; the data offset is byte 12's high nibble.
        b.ptr_at::<[u8; 20]>(flow.l4()).map_or(20, |h| ((unsafe { (*h)[12] } >> 4) as u32) * 4)
    } else {
        8
    };
    (flow.l4() - flow.l3()) as u32 + l4_header + gso_size
}

/// An IPv4 packet without "don't fragment" (IPv6 packets are never fragmented on the way).
#[inline(always)]
fn may_fragment(b: &Bounds, flow: &Flow) -> bool {
    if flow.is_v6 {
        return false;
    }
    // SAFETY: bounds checked by ptr_at; the flags byte of the IPv4 header.
    b.ptr_at::<[u8; 8]>(flow.l3()).is_some_and(|h| unsafe { (*h)[6] } & IPV4_DF == 0)
}

/// Destination then source MAC, as they start an Ethernet header, into `macs` (in place: a
/// local array built and copied was zeroed first, by a memset call).
#[inline(always)]
fn write_hop_macs(p: &FibParams, macs: &mut [u8; 12]) {
    macs[..6].copy_from_slice(&p.dmac);
    macs[6..].copy_from_slice(&p.smac);
}

/// Whether SNAT sources are chosen by route (`snat_source`): only where the hooks are on
/// several devices; with one, flows take the node's primary address, as they always did,
/// without a route lookup.
#[inline(always)]
pub fn snat_by_route() -> bool {
    SNAT_BY_ROUTE.get(0).is_some_and(|on| *on != 0)
}

/// The source address a new SNATed flow `flow` to backend `dst` takes, written to `out`: the
/// one the kernel prefers for the route to the backend (what MASQUERADE would take: on a node
/// with several devices, the address of the one the route leaves by) when the route leaves by
/// a device the hooks are on (`LB_SNAT_DEVICES`, so the replies come back through them); else
/// the node's primary address. `false` when the node has no address of the family. The route
/// is looked up as for the packet it will be (from the node's address), through the next-hop
/// cache the redirect reads next.
#[inline(never)]
pub fn snat_source(
    ctx: *mut c_void,
    ifindex: u32,
    flow: &Flow,
    dst: &Addr,
    out: &mut Addr,
) -> bool {
    let Some(node) = crate::nat::node_addr(flow.is_v6) else { return false };
    words::copy(&node, out);
    // The hop in this CPU's scratch slot, not on the stack (XDP's own lookup, after this one,
    // fills it again).
    let Some(s) = SCRATCH.get_ptr_mut(0) else { return true };
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    let hop = unsafe { &mut (*s).next_hop };
    let rc = next_hop(ctx, ifindex, (flow.is_v6, flow.proto), &node, dst, hop);
    let found = if flow.is_v6 { hop.src.iter().any(|w| *w != 0) } else { hop.src[3] != 0 };
    // SAFETY: a plain lookup; the value is not used.
    if (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH)
        && found
        && unsafe { SNAT_DEVICES.get(hop.ifindex) }.is_some()
    {
        if flow.is_v6 {
            words::copy(&hop.src, out);
        } else {
            // The node's address is IPv4-mapped: only its last word is the address.
            out[3] = hop.src[3];
        }
    }
    true
}

/// Whether the kernel would forward `flow`'s packet, arriving on `ifindex`, to another host: a
/// route other than a local or unreachable one, forwarding on. A local address (a service
/// address that is also the node's, or one a tool like kube-vip put on a device) is for the
/// stack to answer.
#[inline(never)]
pub fn would_forward(ctx: *mut c_void, ifindex: u32, flow: &Flow) -> bool {
    let Some(s) = SCRATCH.get_ptr_mut(0) else { return false };
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile. An all-zero
    // bpf_fib_lookup is a valid starting point.
    let p = unsafe { &mut (*s).fib };
    // SAFETY: plain data (bpf_fib_lookup's fields and unions are integers).
    unsafe { words::zero(p) };
    let rc = lookup(ctx, ifindex, (flow.is_v6, flow.proto), (&flow.saddr, &flow.daddr), (0, 0), p);
    // tc's lookup also judges the packet against the route's device MTU: routed all the same.
    matches!(
        rc,
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FRAG_NEEDED
    )
}

/// XDP: whether a packet rewritten to `src` -> `dst` can be sent on by XDP itself: the next
/// hop's MAC is known and the route leaves by the device it arrived on (XDP_TX) or by another
/// one (XDP_REDIRECT), each a device where the agent allows it (`LB_XDP_TX`). If so the next
/// hop waits in this CPU's scratch slot for [`xdp_forward`]. Otherwise tc handles the packet
/// (it lets the kernel resolve neighbours and reaches every device).
#[inline(never)]
pub fn xdp_can_tx(ctx: &XdpContext, flow: (bool, u8), src: &Addr, dst: &Addr) -> bool {
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: a plain lookup; the value is not used.
    if unsafe { XDP_TX_DEVICES.get(ifindex) }.is_none() {
        return false;
    }
    let Some(s) = SCRATCH.get_ptr_mut(0) else { return false };
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    let s = unsafe { &mut *s };
    let rc = next_hop(ctx.as_ptr(), ifindex, flow, src, dst, &mut s.next_hop);
    let out = s.next_hop.ifindex;
    // Too big for the route: tc tells the sender (a frame here is never GSO).
    let l3_len = (ctx.data_end() - ctx.data()) as u32 - ETH_LEN;
    // SAFETY: a plain lookup; the value is not used.
    rc == BPF_FIB_LKUP_RET_SUCCESS
        && !too_big(&s.next_hop, l3_len)
        && (out == ifindex || unsafe { XDP_TX_DEVICES.get(out) }.is_some())
}

/// Writes the next hop's `macs` (destination, then source) over the frame's, with direct
/// writes: word by word, since copying a byte array to an address of unknown alignment
/// compiles to a call to a byte-loop memmove. `None` if the frame is shorter than the MACs.
#[inline(always)]
fn write_macs(b: &Bounds, macs: &[u8; 12]) -> Option<()> {
    let eth = b.ptr_at::<[u32; 3]>(0)? as *mut u32;
    for i in 0..3 {
        let w =
            u32::from_ne_bytes([macs[4 * i], macs[4 * i + 1], macs[4 * i + 2], macs[4 * i + 3]]);
        // SAFETY: bounds checked by ptr_at; the caller's hook may write packet data.
        unsafe { core::ptr::write_unaligned(eth.add(i), w) };
    }
    Some(())
}

/// XDP: sends the rewritten packet to the next hop [`xdp_can_tx`] found: its MACs written,
/// back out of its device (XDP_TX) or redirected to the route's (XDP_REDIRECT). `None` if the
/// frame is too short (cannot happen for a parsed packet).
#[inline(always)]
pub fn xdp_forward(ctx: &XdpContext) -> Option<u32> {
    let s = SCRATCH.get_ptr(0)?;
    // SAFETY: this CPU's scratch slot.
    let hop = unsafe { &(*s).next_hop };
    write_macs(&Bounds { start: ctx.data(), end: ctx.data_end() }, &hop.macs)?;
    let hop = hop.ifindex;
    if hop == ctx.ingress_ifindex() as u32 {
        stats::count(STAT_XDP_TX);
        return Some(XDP_TX);
    }
    stats::count(STAT_XDP_REDIRECT);
    // SAFETY: redirecting to a device the route named, one where XDP runs natively.
    Some(unsafe { bpf_redirect(hop, 0) } as u32)
}
