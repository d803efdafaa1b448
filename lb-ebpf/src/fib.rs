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
use lb_common::{Addr, STAT_XDP_REDIRECT, STAT_XDP_TX};

use crate::{
    clock,
    maps::{FLOW, NEXT_HOPS, NextHop, NextHopEntry, NextHopKey, SCRATCH, XDP_TX_DEVICES},
    packet::Bounds,
    stats,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// Looks up the route of a packet `src` -> `dst` as if it had arrived on `ifindex` (the
/// kernel's forwarding decision, `p` receives egress device and MACs). Returns the helper's
/// code.
#[inline(always)]
fn lookup(
    ctx: *mut c_void,
    ifindex: u32,
    flow: (bool, u8),
    src: &Addr,
    dst: &Addr,
    p: &mut FibParams,
) -> i64 {
    let (v6, proto) = flow;
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
    unsafe { bpf_fib_lookup(ctx, p, size_of::<FibParams>() as i32, 0) }
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

/// `*to = *from`, word by word: a plain struct copy compiles to a call to a byte-loop memmove,
/// and this runs on every packet XDP sends on.
#[inline(always)]
fn copy_hop(from: &NextHop, to: &mut NextHop) {
    const WORDS: usize = core::mem::size_of::<NextHop>() / 4;
    let (from, to) = (from as *const NextHop as *const u32, to as *mut NextHop as *mut u32);
    for i in 0..WORDS {
        // SAFETY: NextHop is repr(C), 4-aligned and a whole number of words long.
        unsafe { *to.add(i) = *from.add(i) };
    }
}

/// How long a next hop found by bpf_fib_lookup is reused: the lookup costs several hundred ns
/// per packet, a cache hit one hash lookup. A changed route or neighbour MAC is seen within
/// this time.
const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;

/// The next hop of a packet `src` -> `dst` arriving on `ifindex`, from the cache or the
/// kernel's routing (`BPF_FIB_LKUP_RET_*`). On success `out` holds egress device and MACs; on
/// NO_NEIGH only the egress device.
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
        copy_hop(&e.hop, out);
        return BPF_FIB_LKUP_RET_SUCCESS;
    }
    // SAFETY: an all-zero bpf_fib_lookup is a valid starting point.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    let rc = lookup(ctx, ifindex, flow, src, dst, &mut p);
    out.ifindex = p.ifindex;
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        out.macs = macs(&p);
        let _ = NEXT_HOPS.insert(&key, &NextHopEntry { hop: *out, looked_up_ns: now }, 0);
    }
    rc
}

/// tc: looks the route to the packet's (rewritten) destination up and redirects the packet to
/// its device, filling in MAC addresses (or letting the kernel resolve the neighbour). `None`
/// when there is no route or the headers cannot be read.
#[inline(never)]
pub fn redirect(ctx: &TcContext) -> Option<i32> {
    // SAFETY: this CPU's slot, filled by device::handle for this very packet.
    let flow = unsafe { &*FLOW.get_ptr(0)? };
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    let (src, dst) = packet_addrs(&b, flow.is_v6, flow.l3())?;
    // SAFETY: reading a field of the skb context.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let mut hop = NextHop { ifindex: 0, macs: [0; 12] };
    match next_hop(ctx.as_ptr(), ifindex, (flow.is_v6, flow.proto), &src, &dst, &mut hop) {
        BPF_FIB_LKUP_RET_SUCCESS => {
            ctx.store(0, &hop.macs, 0).ok()?;
            // SAFETY: redirecting to a device the route named.
            Some(unsafe { bpf_redirect(hop.ifindex, 0) } as i32)
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // SAFETY: the kernel resolves the neighbour of the route's next hop.
            let rc = unsafe { bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) };
            Some(if rc == TC_ACT_REDIRECT as i64 { TC_ACT_REDIRECT } else { TC_ACT_OK })
        }
        _ => None,
    }
}

/// Destination then source MAC, as they start an Ethernet header.
#[inline(always)]
fn macs(p: &FibParams) -> [u8; 12] {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&p.dmac);
    macs[6..].copy_from_slice(&p.smac);
    macs
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
    // SAFETY: a plain lookup; the value is not used.
    rc == BPF_FIB_LKUP_RET_SUCCESS
        && (out == ifindex || unsafe { XDP_TX_DEVICES.get(out) }.is_some())
}

/// XDP: sends the rewritten packet to the next hop [`xdp_can_tx`] found: its MACs written,
/// back out of its device (XDP_TX) or redirected to the route's (XDP_REDIRECT). `None` if the
/// frame is too short (cannot happen for a parsed packet).
#[inline(always)]
pub fn xdp_forward(ctx: &XdpContext) -> Option<u32> {
    let s = SCRATCH.get_ptr(0)?;
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    let eth = b.ptr_at::<[u32; 3]>(0)?;
    // SAFETY: bounds checked by ptr_at; this CPU's scratch slot. Word by word: copying a
    // byte array to an address of unknown alignment compiles to a call to a byte-loop memmove.
    let hop = unsafe {
        let macs = (*s).next_hop.macs;
        let eth = eth as *mut u32;
        for i in 0..3 {
            let w = u32::from_ne_bytes([
                macs[4 * i],
                macs[4 * i + 1],
                macs[4 * i + 2],
                macs[4 * i + 3],
            ]);
            core::ptr::write_unaligned(eth.add(i), w);
        }
        (*s).next_hop.ifindex
    };
    if hop == ctx.ingress_ifindex() as u32 {
        stats::count(STAT_XDP_TX);
        return Some(XDP_TX);
    }
    stats::count(STAT_XDP_REDIRECT);
    // SAFETY: redirecting to a device the route named, one where XDP runs natively.
    Some(unsafe { bpf_redirect(hop, 0) } as u32)
}
