//! Programs for benchmarks only, never attached by the agent: ones that do nothing, so
//! benchmarks can measure the cost of running any program at all (the floor) the same way they
//! measure the datapath; and ones that do the least an established flow's packet needs with
//! this datapath's conntrack map (one lookup of its key, the rewrite with its checksums, no
//! state, clock or counters) and the least a new flow's first packet needs (the same lookup,
//! missing, then the flow's two entries inserted, then that rewrite), so the figures say how
//! much of a packet's cost is that least and how much the rest of the datapath's work.
//!
//! They call no datapath function: a caller more of a shared (not inlined) function changes
//! what LLVM emits for it in every program, which once made 6.1's verifier run xdp_ingress's
//! IPv4 rewrite down its IPv6 branch (ARCHITECTURE.md).

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT, xdp_action::XDP_PASS},
    helpers::bpf_csum_update,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    BENCH_LEAST_BACKEND_PORT, BENCH_LEAST_BACKEND4, CT_F_REPLY, CT_STATE_NEW, CtKey, CtValue,
    addr_from_v4_raw,
};

use crate::{
    csum,
    maps::{CONNTRACK, SCRATCH},
    packet::Bounds,
};

#[xdp]
pub fn bench_xdp_noop(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[classifier]
pub fn bench_tc_noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Ethernet, IPv4 without options, TCP: the only packets these programs take.
const L3: usize = 14;
const L4: usize = L3 + 20;

/// The conntrack key of an IPv4 TCP packet's tuple (`None`: another packet).
#[inline(always)]
fn least_key(b: &Bounds) -> Option<CtKey> {
    let hdr: *const [u8; L4 + 20] = b.ptr_at(0)?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &*hdr };
    if h[12..14] != [0x08, 0x00] || h[L3] != 0x45 || h[L3 + 9] != 6 {
        return None;
    }
    let word = |at: usize| u32::from_ne_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let port = |at: usize| u16::from_ne_bytes([h[at], h[at + 1]]);
    Some(CtKey {
        saddr: addr_from_v4_raw(word(L3 + 12)),
        daddr: addr_from_v4_raw(word(L3 + 16)),
        sport_be: port(L4),
        dport_be: port(L4 + 2),
        proto: 6,
        _pad8: 0,
        _pad16: 0,
    })
}

/// The conntrack entry of an IPv4 TCP packet's tuple (`None`: another packet, or no entry).
#[inline(always)]
fn least_lookup(b: &Bounds) -> Option<&'static CtValue> {
    let key = least_key(b)?;
    // SAFETY: a live map value, only read.
    CONNTRACK.get_ptr(key).map(|v| unsafe { &*v })
}

/// The entry of an IPv4 TCP packet's flow: its own if it has one, else the flow's two entries
/// made as the datapath makes a local backend's (the reply's, then the forward one, in one
/// value turned from the first into the second), to [`BENCH_LEAST_BACKEND4`]. Keys and value
/// are built in this CPU's scratch slot, as the datapath builds them (on the stack, LLVM
/// merges their stores into ones the verifier refuses as misaligned).
#[inline(always)]
fn least_first(b: &Bounds) -> Option<&'static CtValue> {
    let s = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    let s = unsafe { &mut *s };
    s.forward_key = least_key(b)?;
    let key = &s.forward_key;
    if let Some(v) = CONNTRACK.get_ptr(key) {
        // SAFETY: a live map value, only read.
        return Some(unsafe { &*v });
    }
    let backend = addr_from_v4_raw(u32::from_ne_bytes(BENCH_LEAST_BACKEND4));
    let backend_port_be = BENCH_LEAST_BACKEND_PORT.to_be();
    let v = &mut s.value;
    v.last_seen_ns = 0;
    v.new_saddr = key.daddr;
    v.new_daddr = key.saddr;
    v.new_sport_be = key.dport_be;
    v.new_dport_be = key.sport_be;
    v.backend_id = 0;
    v.service_id = 0;
    v.flags = CT_F_REPLY;
    v.state = CT_STATE_NEW;
    v._pad = [0; 2];
    let r = &mut s.reply_key;
    r.saddr = backend;
    r.daddr = key.saddr;
    r.sport_be = backend_port_be;
    r.dport_be = key.sport_be;
    r.proto = key.proto;
    r._pad8 = 0;
    r._pad16 = 0;
    let (reply, value) = (&s.reply_key, &s.value);
    CONNTRACK.insert(reply, value, 0).ok()?;
    let v = &mut s.value;
    v.new_saddr = key.saddr;
    v.new_daddr = backend;
    v.new_sport_be = key.sport_be;
    v.new_dport_be = backend_port_be;
    v.flags = 0;
    let value = &s.value;
    CONNTRACK.insert(key, value, 0).ok()?;
    Some(&s.value)
}

/// What a packet's rewrite to its entry's tuple changes: the addresses' and the ports' one's
/// complement differences, and the new ports word. Read once from the packet, used by the
/// checksum updates and the writes.
struct Change {
    addrs: u32,
    ports: u32,
    new_ports: u32,
}

#[inline(always)]
fn least_change(b: &Bounds, ct: &CtValue) -> Option<Change> {
    let hdr: *const [u32; 10] = b.ptr_at(L3)?;
    let tcp: *const [u32; 5] = b.ptr_at(L4)?;
    // SAFETY: bounds checked by ptr_at.
    let (old_s, old_d, old_ports) = unsafe { ((*hdr)[3], (*hdr)[4], (*tcp)[0]) };
    let addrs = csum::diff4(csum::diff4(0, old_s, ct.new_saddr[3]), old_d, ct.new_daddr[3]);
    let new_ports = crate::rewrite::ports_word(ct.new_sport_be, ct.new_dport_be);
    Some(Change { addrs, ports: csum::diff4(0, old_ports, new_ports), new_ports })
}

/// Writes the entry's tuple over the packet's, with the IPv4 header checksum (tc and XDP) and,
/// where `l4_csum` says so, the transport checksum (in place: XDP, and tc where the skb is not
/// partial).
///
/// # Safety
/// `b` must be the packet's current bounds, and the hook allowed to write packet data.
#[inline(always)]
unsafe fn least_write(b: &Bounds, ct: &CtValue, change: &Change, l4_csum: bool) -> Option<()> {
    let hdr: *mut [u32; 10] = b.ptr_at(L3)?;
    let tcp: *mut [u32; 5] = b.ptr_at(L4)?;
    // SAFETY: bounds checked by ptr_at; writing is the caller's promise.
    unsafe {
        let ip_csum = hdr.cast::<u16>().add(5);
        *ip_csum = csum::apply_diff(*ip_csum, change.addrs);
        (*hdr)[3] = ct.new_saddr[3];
        (*hdr)[4] = ct.new_daddr[3];
        if l4_csum {
            let c = tcp.cast::<u16>().add(8);
            *c = csum::apply_diff(*c, csum::add(change.addrs, change.ports));
        }
        (*tcp)[0] = change.new_ports;
    }
    Some(())
}

/// The least an established IPv4 TCP flow's packet needs from tc with this conntrack map: the
/// lookup, then [`tc_least_rewrite`].
#[classifier]
pub fn bench_tc_least_nat(ctx: TcContext) -> i32 {
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    match least_lookup(&b) {
        Some(ct) => tc_least_rewrite(&ctx, &b, ct),
        None => TC_ACT_OK,
    }
}

/// The least a new IPv4 TCP flow's first packet needs from tc: [`least_first`], then
/// [`tc_least_rewrite`].
#[classifier]
pub fn bench_tc_least_first(ctx: TcContext) -> i32 {
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    match least_first(&b) {
        Some(ct) => tc_least_rewrite(&ctx, &b, ct),
        None => TC_ACT_OK,
    }
}

/// Rewrites a packet to its entry `ct`'s tuple as the datapath's tc does
/// (`rewrite::csum_in_place`): the transport checksum in place with one helper call that moves
/// a CHECKSUM_COMPLETE skb's sum, unless the field holds the pseudo-header's sum alone
/// (CHECKSUM_PARTIAL), where two checksum helper calls (addresses as a pseudo-header change,
/// ports as a plain one) keep every state right; then the writes.
#[inline(always)]
fn tc_least_rewrite(ctx: &TcContext, b: &Bounds, ct: &CtValue) -> i32 {
    let Some(change) = least_change(b, ct) else { return TC_ACT_OK };
    let csum_off = L4 + 16;
    let Some(partial) = least_may_be_partial(b) else { return TC_ACT_OK };
    if partial {
        let addrs = ctx.l4_csum_replace(csum_off, 0, change.addrs as u64, BPF_F_PSEUDO_HDR as u64);
        if addrs.is_err() || ctx.l4_csum_replace(csum_off, 0, change.ports as u64, 0).is_err() {
            return TC_ACT_SHOT;
        }
    } else {
        let Some(c) = b.ptr_at::<u16>(csum_off) else { return TC_ACT_OK };
        // SAFETY: bounds checked by ptr_at.
        let cur = unsafe { *c };
        let next = csum::apply_diff(cur, csum::add(change.addrs, change.ports));
        // SAFETY: the context's skb. Fails unless CHECKSUM_COMPLETE: nothing to move.
        unsafe { bpf_csum_update(ctx.skb.skb, csum::diff4(change.ports, cur as u32, next as u32)) };
    }
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    // SAFETY: fresh bounds after the helpers; tc may write packet data.
    match unsafe { least_write(&b, ct, &change, !partial) } {
        Some(()) => TC_ACT_OK,
        None => TC_ACT_SHOT,
    }
}

/// Whether an IPv4 TCP packet's checksum field holds its pseudo-header's sum alone, as
/// `rewrite::may_be_partial` tells (`None`: too short).
#[inline(always)]
fn least_may_be_partial(b: &Bounds) -> Option<bool> {
    let hdr: *const [u16; 10] = b.ptr_at(L3)?;
    let field: *const u16 = b.ptr_at(L4 + 16)?;
    // SAFETY: bounds checked by ptr_at.
    let (h, field) = unsafe { (&*hdr, *field) };
    let len = (u16::from_be(h[1]).wrapping_sub(20)).to_be_bytes();
    let mut sum = u32::from_ne_bytes([0, 6, len[0], len[1]]);
    for w in &h[6..10] {
        sum = csum::add(sum, *w as u32);
    }
    Some(csum::fold(sum) == field)
}

/// The same as [`bench_tc_least_nat`] for XDP, checksums updated in place.
#[xdp]
pub fn bench_xdp_least_nat(ctx: XdpContext) -> u32 {
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    if let Some(ct) = least_lookup(&b) {
        xdp_least_rewrite(&b, ct);
    }
    XDP_PASS
}

/// The same as [`bench_tc_least_first`] for XDP.
#[xdp]
pub fn bench_xdp_least_first(ctx: XdpContext) -> u32 {
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    if let Some(ct) = least_first(&b) {
        xdp_least_rewrite(&b, ct);
    }
    XDP_PASS
}

#[inline(always)]
fn xdp_least_rewrite(b: &Bounds, ct: &CtValue) {
    if let Some(change) = least_change(b, ct) {
        // SAFETY: the packet's own bounds; XDP may write packet data.
        let _ = unsafe { least_write(b, ct, &change, true) };
    }
}
