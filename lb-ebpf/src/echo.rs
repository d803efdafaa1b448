//! A ping from outside to a service address (a LoadBalancer IP, an ExternalIP) that is not the
//! node's own is answered here, as the host owning the address would answer it: kube-proxy's
//! IPVS mode puts service addresses on a dummy device, so its nodes answer; without an answer
//! the request went back out by the routes, to loop until its TTL ran out. The request becomes
//! its reply in place (addresses and MACs swapped, type changed, TTL reset) and goes back out
//! of the device it came in on. Answers share the ICMP error allowance (`reject.rs`): a flood
//! of pings cannot make the node a reflector. `--answer-service-pings=false` drops them instead.

use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::bpf_redirect, programs::TcContext};
use lb_common::{Addr, STAT_ECHO_REPLY};

use crate::{
    csum,
    maps::FLOW,
    packet::{self, Bounds, Flow},
    reject, stats,
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// The TTL (hop limit) of the answer, as Linux's default.
const TTL: u8 = 64;

/// Answers the echo request tc ingress met (`device::Action::Echo`; parsed in `FLOW`).
#[inline(never)]
pub fn reply(ctx: &TcContext) -> i32 {
    let Some(flow) = FLOW.get_ptr(0) else { return TC_ACT_SHOT };
    // SAFETY: this CPU's slot, filled for this packet by device::handle.
    let flow = unsafe { &*flow };
    if !reject::icmp_allowed() {
        return TC_ACT_SHOT;
    }
    match turn_around(ctx, flow) {
        Some(()) => {
            stats::count(STAT_ECHO_REPLY);
            // SAFETY: the context's skb, valid for the program's run.
            unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
        }
        None => TC_ACT_SHOT,
    }
}

/// Rewrites the request into its reply. Each checksum is updated by what its header's change
/// adds, so the sum of the packet's bytes stays what it was, and with it a receive checksum
/// (CHECKSUM_COMPLETE) the skb carries: direct writes need no checksum helper.
#[inline(always)]
fn turn_around(ctx: &TcContext, flow: &Flow) -> Option<()> {
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    let (l3, l4) = (flow.l3(), flow.l4());
    // SAFETY: every pointer bounds-checked by ptr_at; tc may write packet data directly.
    unsafe {
        let eth: *mut [u8; 12] = b.ptr_at(0)?;
        let macs = core::ptr::read_unaligned(eth);
        let mut swapped = [0u8; 12];
        swapped[..6].copy_from_slice(&macs[6..]);
        swapped[6..].copy_from_slice(&macs[..6]);
        core::ptr::write_unaligned(eth, swapped);
        // The ICMP type and code, then the checksum.
        let icmp: *mut [u8; 4] = b.ptr_at(l4)?;
        let mut h = core::ptr::read_unaligned(icmp);
        let old = u16::from_ne_bytes([h[0], h[1]]);
        h[0] = if flow.is_v6 { ICMPV6_ECHO_REPLY } else { ICMP_ECHO_REPLY };
        let new = u16::from_ne_bytes([h[0], h[1]]);
        let c = csum::replace2(u16::from_ne_bytes([h[2], h[3]]), old, new);
        h[2..4].copy_from_slice(&c.to_ne_bytes());
        core::ptr::write_unaligned(icmp, h);
        // Addresses swapped: no sum changes (ICMPv6's pseudo-header holds both).
        if flow.is_v6 {
            let ip: *mut [u8; 8] = b.ptr_at(l3)?;
            (*ip)[7] = TTL;
            let addrs: *mut [Addr; 2] = b.ptr_at(l3 + 8)?;
            packet::write_addr_pair(addrs, &flow.daddr, &flow.saddr);
        } else {
            // TTL and protocol form one word of the header, the checksum follows.
            let ttl: *mut [u8; 4] = b.ptr_at(l3 + 8)?;
            let mut w = core::ptr::read_unaligned(ttl);
            let old = u16::from_ne_bytes([w[0], w[1]]);
            w[0] = TTL;
            let new = u16::from_ne_bytes([w[0], w[1]]);
            let c = csum::replace2(u16::from_ne_bytes([w[2], w[3]]), old, new);
            w[2..4].copy_from_slice(&c.to_ne_bytes());
            core::ptr::write_unaligned(ttl, w);
            let addrs: *mut [u32; 2] = b.ptr_at(l3 + 12)?;
            core::ptr::write_unaligned(addrs, [flow.daddr[3], flow.saddr[3]]);
        }
    }
    Some(())
}
