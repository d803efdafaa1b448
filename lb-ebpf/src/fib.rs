//! Sending a translated packet straight out of the right device (tc): used when the rewritten
//! source is one the stack would refuse on input (a node address after SNAT, a NodePort
//! address on replies).

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, bpf_fib_lookup as FibParams},
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use lb_common::Addr;

use crate::{maps::FLOW, packet::Bounds};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// Looks the route to the packet's (rewritten) destination up and redirects the packet to its
/// device, filling in MAC addresses (or letting the kernel resolve the neighbour). `None` when
/// there is no route or the headers cannot be read.
#[inline(never)]
pub fn redirect(ctx: &TcContext) -> Option<i32> {
    // SAFETY: this CPU's slot, filled by device::handle for this very packet.
    let flow = unsafe { &*FLOW.get_ptr(0)? };
    let (v6, l3_off, proto) = (flow.is_v6, flow.l3(), flow.proto);
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    // SAFETY: an all-zero bpf_fib_lookup is a valid starting point.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = if v6 { AF_INET6 } else { AF_INET };
    p.l4_protocol = proto;
    // SAFETY: reading a field of the skb context.
    p.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // Addresses as the packet now holds them; unions written as the kernel documents them.
    if v6 {
        let src: *const Addr = b.ptr_at(l3_off + 8)?;
        let dst: *const Addr = b.ptr_at(l3_off + 24)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            p.__bindgen_anon_3.ipv6_src = core::ptr::read_unaligned(src);
            p.__bindgen_anon_4.ipv6_dst = core::ptr::read_unaligned(dst);
        }
    } else {
        let src: *const u32 = b.ptr_at(l3_off + 12)?;
        let dst: *const u32 = b.ptr_at(l3_off + 16)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            p.__bindgen_anon_3.ipv4_src = core::ptr::read_unaligned(src);
            p.__bindgen_anon_4.ipv4_dst = core::ptr::read_unaligned(dst);
        }
    }
    // SAFETY: p is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut p, size_of::<FibParams>() as i32, 0) };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&p.dmac);
            macs[6..].copy_from_slice(&p.smac);
            ctx.store(0, &macs, 0).ok()?;
            // SAFETY: redirecting to a device the route named.
            Some(unsafe { bpf_redirect(p.ifindex, 0) } as i32)
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // SAFETY: the kernel resolves the neighbour of the route's next hop.
            let rc = unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) };
            Some(if rc == TC_ACT_REDIRECT as i64 { TC_ACT_REDIRECT } else { TC_ACT_OK })
        }
        _ => None,
    }
}
