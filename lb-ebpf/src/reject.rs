//! Rejecting a new connection to a service without endpoints, as kube-proxy's REJECT does:
//! the packet is turned into an ICMP (v4: destination unreachable, port unreachable) or ICMPv6
//! (destination unreachable, port unreachable) error from the frontend to the client, quoting
//! the offending packet's network header and first 8 transport bytes, and sent back out of the
//! device it came in on. TCP clients see ECONNREFUSED at once instead of a timeout.

use aya_ebpf::{
    EbpfContext,
    bindings::TC_ACT_SHOT,
    helpers::{
        bpf_csum_diff, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
    programs::TcContext,
};

use crate::{
    maps::{FLOW, REJECT_BUF},
    packet::{ETH_P_IP, ETH_P_IPV6},
};

/// Bytes of the new frame before the quote: Ethernet, IP header, ICMP header.
const ETH: usize = 14;
const V4_HDRS: usize = ETH + 20 + 8;
const V6_HDRS: usize = ETH + 40 + 8;
/// The IPv6 pseudo-header for the ICMPv6 checksum is built just before the ICMPv6 header.
const V6_PSEUDO: usize = 40;

#[inline(always)]
fn fold(mut c: u64) -> u16 {
    c = (c & 0xffff_ffff) + (c >> 32);
    c = (c & 0xffff) + (c >> 16);
    c = (c & 0xffff) + (c >> 16);
    c = (c & 0xffff) + (c >> 16);
    !(c as u16)
}

/// One's complement sum of `len` bytes (a multiple of 4) at `p`.
#[inline(always)]
fn sum(p: *mut u8, len: u32) -> u64 {
    // SAFETY: `p` points into the per-CPU reject buffer with at least `len` bytes after it.
    let s = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p.cast(), len, 0) };
    s as u32 as u64
}

/// Rewrites the packet into the ICMP error and redirects it back; TC_ACT_SHOT if that fails.
#[inline(never)]
pub fn port_unreachable(ctx: &TcContext) -> i32 {
    try_reject(ctx).unwrap_or(TC_ACT_SHOT)
}

fn try_reject(ctx: &TcContext) -> Option<i32> {
    // SAFETY: this CPU's slots, filled for this packet by device::handle.
    let flow = unsafe { &*FLOW.get_ptr(0)? };
    let buf = unsafe { &mut *REJECT_BUF.get_ptr_mut(0)? };
    let l3 = flow.l3();
    // The quote: network header(s) and 8 transport bytes. Bounded by comparing the difference
    // itself (the verifier does not relate two registers, and LLVM would drop a mask).
    let net_len = flow.l4().wrapping_sub(l3);
    if !(20..=256).contains(&net_len) {
        return None;
    }
    let quote = net_len + 8;
    let hdrs = if flow.is_v6 { V6_HDRS } else { V4_HDRS };
    // SAFETY: reading packet bytes into the buffer, length bounded above.
    unsafe {
        let rc = bpf_skb_load_bytes(
            ctx.as_ptr(),
            l3 as u32,
            buf.as_mut_ptr().add(V6_PSEUDO + hdrs).cast(),
            quote as u32,
        );
        if rc != 0 {
            return None;
        }
    }
    // Ethernet: back to the sender.
    let mut macs = [0u8; 12];
    // SAFETY: reading the first 12 bytes of the frame.
    if unsafe { bpf_skb_load_bytes(ctx.as_ptr(), 0, macs.as_mut_ptr().cast(), 12) } != 0 {
        return None;
    }
    let f = &mut buf[V6_PSEUDO..];
    f[0..6].copy_from_slice(&macs[6..12]);
    f[6..12].copy_from_slice(&macs[0..6]);
    let (src, dst) = (flow.daddr, flow.saddr);
    let total;
    if !flow.is_v6 {
        f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        let ip_len = (20 + 8 + quote) as u16;
        let ip = &mut f[ETH..ETH + 20];
        ip[0] = 0x45;
        ip[1] = 0;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[4..8].copy_from_slice(&[0, 0, 0x40, 0]);
        ip[8] = 64;
        ip[9] = 1;
        ip[10] = 0;
        ip[11] = 0;
        ip[12..16].copy_from_slice(&src[3].to_ne_bytes());
        ip[16..20].copy_from_slice(&dst[3].to_ne_bytes());
        let c = fold(sum(f[ETH..].as_mut_ptr(), 20));
        f[ETH + 10..ETH + 12].copy_from_slice(&c.to_ne_bytes());
        let icmp = ETH + 20;
        f[icmp..icmp + 8].copy_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
        let c = fold(sum(f[icmp..].as_mut_ptr(), (8 + quote) as u32));
        f[icmp + 2..icmp + 4].copy_from_slice(&c.to_ne_bytes());
        total = V4_HDRS + quote;
    } else {
        f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        let payload = (8 + quote) as u16;
        let ip = &mut f[ETH..ETH + 40];
        ip[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
        ip[4..6].copy_from_slice(&payload.to_be_bytes());
        ip[6] = 58;
        ip[7] = 64;
        for i in 0..4 {
            ip[8 + i * 4..12 + i * 4].copy_from_slice(&src[i].to_ne_bytes());
            ip[24 + i * 4..28 + i * 4].copy_from_slice(&dst[i].to_ne_bytes());
        }
        let icmp = ETH + 40;
        f[icmp..icmp + 8].copy_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
        // Pseudo-header (addresses, length, next header) right before the ICMPv6 header.
        let p = &mut buf[V6_PSEUDO + icmp - 40..V6_PSEUDO + icmp];
        for i in 0..4 {
            p[i * 4..i * 4 + 4].copy_from_slice(&src[i].to_ne_bytes());
            p[16 + i * 4..20 + i * 4].copy_from_slice(&dst[i].to_ne_bytes());
        }
        p[32..36].copy_from_slice(&(payload as u32).to_be_bytes());
        p[36..40].copy_from_slice(&[0, 0, 0, 58]);
        let c = fold(sum(buf[V6_PSEUDO + icmp - 40..].as_mut_ptr(), (40 + 8 + quote) as u32));
        // The pseudo-header overwrote the IPv6 header's addresses: write them again.
        let f = &mut buf[V6_PSEUDO..];
        for i in 0..4 {
            f[ETH + 8 + i * 4..ETH + 12 + i * 4].copy_from_slice(&src[i].to_ne_bytes());
            f[ETH + 24 + i * 4..ETH + 28 + i * 4].copy_from_slice(&dst[i].to_ne_bytes());
        }
        f[ETH + 4..ETH + 6].copy_from_slice(&payload.to_be_bytes());
        f[ETH + 6] = 58;
        f[ETH + 7] = 64;
        f[icmp + 2..icmp + 4].copy_from_slice(&c.to_ne_bytes());
        total = V6_HDRS + quote;
    }
    let total = (total & 0x3ff) as u32;
    // SAFETY: resizing and rewriting the skb we own; lengths bounded above.
    unsafe {
        if bpf_skb_change_tail(ctx.skb.skb, total, 0) != 0 {
            return None;
        }
        if bpf_skb_store_bytes(ctx.skb.skb, 0, buf.as_ptr().add(V6_PSEUDO).cast(), total, 0) != 0 {
            return None;
        }
        Some(bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32)
    }
}
