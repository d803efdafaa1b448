//! Programs for benchmarks only, never attached by the agent: ones that do nothing, so
//! benchmarks can measure the cost of running any program at all (the floor) the same way they
//! measure the datapath; and ones that do the least an established flow's packet needs with
//! this datapath's conntrack map (one lookup of its key, the rewrite with its checksums, no
//! state, clock or counters), so the figures say how much of a packet's cost is that least
//! and how much the rest of the datapath's work.

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT, xdp_action::XDP_PASS},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{CtKey, CtValue, addr_from_v4_raw};

use crate::{csum, maps::CONNTRACK, packet::Bounds};

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

/// The conntrack entry of an IPv4 TCP packet's tuple (`None`: another packet, or no entry).
#[inline(always)]
fn least_lookup(b: &Bounds) -> Option<&'static CtValue> {
    let hdr: *const [u8; L4 + 20] = b.ptr_at(0)?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &*hdr };
    if h[12..14] != [0x08, 0x00] || h[L3] != 0x45 || h[L3 + 9] != 6 {
        return None;
    }
    let word = |at: usize| u32::from_ne_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let port = |at: usize| u16::from_ne_bytes([h[at], h[at + 1]]);
    let key = CtKey {
        saddr: addr_from_v4_raw(word(L3 + 12)),
        daddr: addr_from_v4_raw(word(L3 + 16)),
        sport_be: port(L4),
        dport_be: port(L4 + 2),
        proto: 6,
        _pad8: 0,
        _pad16: 0,
    };
    // SAFETY: a live map value, only read.
    CONNTRACK.get_ptr(key).map(|v| unsafe { &*v })
}

/// What a packet's rewrite to its entry's tuple changes: the addresses' and the ports' one's
/// complement differences, and the new ports word. Read once from the packet, used by the
/// checksum helpers (tc) and the writes.
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
/// where `l4_csum` says so, the transport checksum (XDP: no skb state to keep right).
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
/// lookup, two checksum helper calls (addresses as a pseudo-header change, ports as a plain
/// one: what keeps every skb checksum state right), the writes.
#[classifier]
pub fn bench_tc_least_nat(ctx: TcContext) -> i32 {
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    let Some(ct) = least_lookup(&b) else { return TC_ACT_OK };
    let Some(change) = least_change(&b, ct) else { return TC_ACT_OK };
    let csum_off = L4 + 16;
    if ctx.l4_csum_replace(csum_off, 0, change.addrs as u64, BPF_F_PSEUDO_HDR as u64).is_err()
        || ctx.l4_csum_replace(csum_off, 0, change.ports as u64, 0).is_err()
    {
        return TC_ACT_SHOT;
    }
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    // SAFETY: fresh bounds after the helpers; tc may write packet data.
    match unsafe { least_write(&b, ct, &change, false) } {
        Some(()) => TC_ACT_OK,
        None => TC_ACT_SHOT,
    }
}

/// The same for XDP, checksums updated in place.
#[xdp]
pub fn bench_xdp_least_nat(ctx: XdpContext) -> u32 {
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    if let Some(ct) = least_lookup(&b)
        && let Some(change) = least_change(&b, ct)
    {
        // SAFETY: the packet's own bounds; XDP may write packet data.
        let _ = unsafe { least_write(&b, ct, &change, true) };
    }
    XDP_PASS
}
