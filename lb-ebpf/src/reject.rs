//! Rejecting a new connection to a service without endpoints, as kube-proxy's REJECT does:
//! the packet is turned into an ICMP (v4: destination unreachable, port unreachable) or ICMPv6
//! (destination unreachable, port unreachable) error from the frontend to the client, quoting
//! the offending packet's network header and first 8 transport bytes, and sent back out of the
//! device it came in on. TCP clients see ECONNREFUSED at once instead of a timeout.
//!
//! With `--reject-tcp-with reset` a TCP packet gets a TCP reset instead (what a closed port
//! answers; it also gets through firewalls that drop ICMP).

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_RECOMPUTE_CSUM, TC_ACT_SHOT},
    helpers::{
        bpf_csum_diff, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
    programs::TcContext,
};
use lb_common::{
    Addr, EVENT_DROP, EVENT_NO_SERVICE, HOOK_TC_INGRESS, MODE_TCP_RESET, OPT_DEVICE_MODES,
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, STAT_ICMP_RATE_LIMITED, STAT_TOO_BIG,
};

use crate::{
    bounds, clock, conntrack,
    maps::{FLOW, ICMP_RATE, OPTIONS, REJECT_BUF},
    monitor,
    packet::{ETH_P_IP, ETH_P_IPV6, Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

/// The answer is built in the reject buffer from here on; the pseudo-header of its transport
/// checksum goes before it.
const FRAME: usize = 40;
const ETH: usize = 14;
const TCP_LEN: usize = 20;

#[inline(always)]
fn fold(c: u32) -> u16 {
    let mut c = c as u64;
    c = (c & 0xffff) + (c >> 16);
    c = (c & 0xffff) + (c >> 16);
    c = (c & 0xffff) + (c >> 16);
    !(c as u16)
}

/// One's complement sum of `len` bytes (a multiple of 4) at `p`, added to `seed`.
#[inline(always)]
fn sum(p: *const u8, len: u32, seed: u32) -> u32 {
    // SAFETY: `p` points into the per-CPU reject buffer with at least `len` bytes after it.
    let s = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p as *mut u32, len, seed) };
    s as u32
}

/// Answers the packet handled by tc ingress (a new connection to a service without endpoints):
/// a TCP reset or an ICMP port unreachable, redirected back; TC_ACT_SHOT if that fails.
#[inline(never)]
pub fn reject(ctx: &TcContext) -> i32 {
    let Some(flow) = FLOW.get_ptr(0) else { return TC_ACT_SHOT };
    // SAFETY: this CPU's slot, filled for this packet by device::handle.
    let flow = unsafe { &*flow };
    let reset = flow.proto == PROTO_TCP
        && OPTIONS.get(OPT_DEVICE_MODES).is_some_and(|&v| v & MODE_TCP_RESET != 0);
    let answer = if reset {
        tcp_reset(ctx, flow)
    } else if icmp_allowed() {
        port_unreachable(ctx, flow)
    } else {
        None
    };
    answer.unwrap_or(TC_ACT_SHOT)
}

/// ICMP errors one CPU may send in a burst, and how many more each millisecond: the kernel's
/// own ICMP limits (`net.ipv4.icmp_msgs_burst`, `icmp_msgs_per_sec`), which kube-proxy's REJECT
/// and the kernel's "fragmentation needed" go through. A flood of packets that each call for
/// an error (SYNs to a service without endpoints, oversized packets) must not make the node a
/// reflector.
const ICMP_BURST: u64 = 50;
const ICMP_PER_MS: u64 = 1;

/// A CPU's ICMP error allowance (token bucket).
#[repr(C)]
pub struct IcmpBucket {
    tokens: u64,
    refilled_ns: u64,
}

/// Takes one ICMP error from this CPU's allowance; false (counted) when there is none left.
#[inline(always)]
pub fn icmp_allowed() -> bool {
    let Some(b) = ICMP_RATE.get_ptr_mut(0) else { return true };
    // SAFETY: this CPU's slot; programs do not preempt each other on one CPU.
    let b = unsafe { &mut *b };
    let now = clock::now_ns();
    // Whole milliseconds since the last refill (all of them when the slot is new: full).
    let ms = clock::age_ns(now, b.refilled_ns) / 1_000_000;
    if ms > 0 {
        let add = ms.saturating_mul(ICMP_PER_MS);
        b.tokens = if add >= ICMP_BURST { ICMP_BURST } else { (b.tokens + add).min(ICMP_BURST) };
        b.refilled_ns = now;
    }
    if b.tokens == 0 {
        stats::count(STAT_ICMP_RATE_LIMITED);
        return false;
    }
    b.tokens -= 1;
    true
}

/// Writes Ethernet (back to the sender) and the IP header (frontend -> client, `payload` bytes
/// of `proto`) of the answer, and the transport checksum's pseudo-header before the frame (for
/// ICMPv6 and TCP). Returns the sum of that pseudo-header (0 for ICMPv4, which has none).
#[inline(always)]
fn start_answer(
    ctx: &TcContext,
    flow: &Flow,
    buf: &mut [u8; 512],
    proto: u8,
    payload: u16,
) -> Option<u32> {
    // Uninitialised: the helper fills it (zeroed first, it cost a memset call).
    let mut macs = MaybeUninit::<[u8; 12]>::uninit();
    // SAFETY: reading the first 12 bytes of the frame into a buffer of 12; on success every
    // byte of it is written.
    let macs = unsafe {
        if bpf_skb_load_bytes(ctx.as_ptr(), 0, macs.as_mut_ptr().cast(), 12) != 0 {
            return None;
        }
        macs.assume_init()
    };
    let (src, dst): (Addr, Addr) = (flow.daddr, flow.saddr);
    let f = &mut buf[FRAME..];
    f[0..6].copy_from_slice(&macs[6..12]);
    f[6..12].copy_from_slice(&macs[0..6]);
    if !flow.is_v6 {
        f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        let ip = &mut f[ETH..ETH + 20];
        ip[0] = 0x45;
        ip[1] = 0;
        ip[2..4].copy_from_slice(&(20 + payload).to_be_bytes());
        ip[4..8].copy_from_slice(&[0, 0, 0x40, 0]);
        ip[8] = 64;
        ip[9] = proto;
        ip[10] = 0;
        ip[11] = 0;
        ip[12..16].copy_from_slice(&src[3].to_ne_bytes());
        ip[16..20].copy_from_slice(&dst[3].to_ne_bytes());
        let c = fold(sum(f[ETH..].as_ptr(), 20, 0));
        f[ETH + 10..ETH + 12].copy_from_slice(&c.to_ne_bytes());
        if proto == PROTO_ICMP {
            return Some(0);
        }
        let p = &mut buf[..12];
        p[0..4].copy_from_slice(&src[3].to_ne_bytes());
        p[4..8].copy_from_slice(&dst[3].to_ne_bytes());
        p[8..10].copy_from_slice(&[0, proto]);
        p[10..12].copy_from_slice(&payload.to_be_bytes());
        Some(sum(buf.as_ptr(), 12, 0))
    } else {
        f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        let ip = &mut f[ETH..ETH + 40];
        ip[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
        ip[4..6].copy_from_slice(&payload.to_be_bytes());
        ip[6] = proto;
        ip[7] = 64;
        for i in 0..4 {
            ip[8 + i * 4..12 + i * 4].copy_from_slice(&src[i].to_ne_bytes());
            ip[24 + i * 4..28 + i * 4].copy_from_slice(&dst[i].to_ne_bytes());
        }
        let p = &mut buf[..40];
        for i in 0..4 {
            p[i * 4..i * 4 + 4].copy_from_slice(&src[i].to_ne_bytes());
            p[16 + i * 4..20 + i * 4].copy_from_slice(&dst[i].to_ne_bytes());
        }
        p[32..36].copy_from_slice(&(payload as u32).to_be_bytes());
        p[36..40].copy_from_slice(&[0, 0, 0, proto]);
        Some(sum(buf.as_ptr(), 40, 0))
    }
}

/// Replaces the packet with the `len`-byte answer built in `buf` and sends it back out of the
/// device it came in on.
#[inline(always)]
fn send_back(ctx: &TcContext, buf: &[u8; 512], len: usize) -> Option<i32> {
    // Bounded for the verifier: a frame with headers, inside the buffer after FRAME. In 64
    // bits: a length computed as u32 may reach a helper with junk above bit 31 (LLVM need not
    // clear what a u32 argument ignores), which 6.1's verifier refuses.
    let len = bounds::within(len, 54, 512 - FRAME)?;
    // SAFETY: resizing and rewriting the skb we own; lengths bounded above.
    unsafe {
        if bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) != 0 {
            return None;
        }
        // The Ethernet header as is; the rest with the skb's sum kept right (a NIC's
        // CHECKSUM_COMPLETE covers the packet from its network header).
        let frame = buf.as_ptr().add(FRAME);
        if bpf_skb_store_bytes(ctx.skb.skb, 0, frame.cast(), ETH as u32, 0) != 0 {
            return None;
        }
        let (net, net_len) = (frame.add(ETH).cast(), (len - ETH) as u32);
        let recompute = BPF_F_RECOMPUTE_CSUM as u64;
        if bpf_skb_store_bytes(ctx.skb.skb, ETH as u32, net, net_len, recompute) != 0 {
            return None;
        }
        Some(bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32)
    }
}

/// ICMP / ICMPv6 port unreachable quoting the packet's network header and 8 transport bytes.
#[inline(always)]
fn port_unreachable(ctx: &TcContext, flow: &Flow) -> Option<i32> {
    let kind = if flow.is_v6 { [1u8, 4] } else { [3u8, 3] };
    icmp_error(ctx, flow, kind, [0; 4])
}

/// Answers a packet of a translated flow that is larger than the MTU of the route it would
/// leave by (`fib::Redirect::TooBig`), as the kernel's forwarding would: ICMP fragmentation
/// needed / ICMPv6 packet too big with that MTU, from the frontend, quoting the packet as the
/// client sent it. Its sender's path MTU drops, and its next packets fit.
#[inline(never)]
pub fn too_big(ctx: &TcContext, mtu: u32) -> i32 {
    let Some(flow) = FLOW.get_ptr(0) else { return TC_ACT_SHOT };
    // SAFETY: this CPU's slot, filled for this packet by device::handle.
    let flow = unsafe { &*flow };
    stats::count(STAT_TOO_BIG);
    if monitor::wanted(EVENT_DROP) {
        // The flow's entry (the packet carries its translation by now) names the service.
        let ct = conntrack::get(flow.ct_key());
        let service_id = ct.map_or(EVENT_NO_SERVICE, |c| c.service_id);
        let what = monitor::what(EVENT_DROP, HOOK_TC_INGRESS, STAT_TOO_BIG);
        // SAFETY: the context's skb, valid for the program's run.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        monitor::packet(what, service_id, ct, monitor::at(ifindex, ctx.len()), mtu);
    }
    if !icmp_allowed() {
        // Too big to send on, and no answer allowed now: as the kernel's forwarding does.
        return TC_ACT_SHOT;
    }
    let (kind, rest) = if flow.is_v6 {
        ([2u8, 0], mtu.to_be_bytes())
    } else {
        let m = (mtu.min(0xffff) as u16).to_be_bytes();
        ([3u8, 4], [0, 0, m[0], m[1]])
    };
    icmp_error(ctx, flow, kind, rest).unwrap_or(TC_ACT_SHOT)
}

/// An ICMP / ICMPv6 error of `kind` (type, code) with `rest` (the header's last 4 bytes), from
/// the frontend to the client, quoting the packet's network header and 8 transport bytes with
/// the addresses and ports the client sent (the packet may have been translated since).
#[inline(always)]
fn icmp_error(ctx: &TcContext, flow: &Flow, kind: [u8; 2], rest: [u8; 4]) -> Option<i32> {
    // SAFETY: this CPU's slot (see maps::REJECT_BUF).
    let buf = unsafe { &mut *REJECT_BUF.get_ptr_mut(0)? };
    let l3 = flow.l3();
    // The quote: network header(s) and 8 transport bytes. Bounded by comparing the difference
    // itself (the verifier does not relate two registers, and LLVM would drop a mask).
    let net_len = bounds::within(flow.l4().wrapping_sub(l3), 20, 256)?;
    let quote = net_len + 8;
    let (icmp, proto) =
        if flow.is_v6 { (FRAME + ETH + 40, PROTO_ICMPV6) } else { (FRAME + ETH + 20, PROTO_ICMP) };
    // SAFETY: reading packet bytes into the buffer, length bounded above.
    unsafe {
        let to = buf.as_mut_ptr().add(icmp + 8).cast();
        if bpf_skb_load_bytes(ctx.as_ptr(), l3 as u32, to, quote as u32) != 0 {
            return None;
        }
    }
    restore_quote(buf, icmp + 8, net_len, flow)?;
    let seed = start_answer(ctx, flow, buf, proto, (8 + quote) as u16)?;
    // One 8-byte store: copied as bytes, its zeros compiled to a memset call.
    let h = u64::from_ne_bytes([kind[0], kind[1], 0, 0, rest[0], rest[1], rest[2], rest[3]]);
    // SAFETY: icmp + 8 is within the buffer (a constant offset far below its 512 bytes).
    unsafe { core::ptr::write_unaligned(buf[icmp..icmp + 8].as_mut_ptr().cast::<u64>(), h) };
    let c = fold(sum(buf[icmp..].as_ptr(), (8 + quote) as u32, seed));
    buf[icmp + 2..icmp + 4].copy_from_slice(&c.to_ne_bytes());
    send_back(ctx, buf, icmp - FRAME + 8 + quote)
}

/// Writes the client's own addresses and ports (the parsed flow, from before any translation)
/// into the quote at `at` (network header `net_len` bytes long), and the IPv4 header's
/// checksum to match.
#[inline(always)]
fn restore_quote(buf: &mut [u8; 512], at: usize, net_len: usize, flow: &Flow) -> Option<()> {
    let q = &mut buf[at..at + 40];
    if flow.is_v6 {
        for i in 0..4 {
            q[8 + i * 4..12 + i * 4].copy_from_slice(&flow.saddr[i].to_ne_bytes());
            q[24 + i * 4..28 + i * 4].copy_from_slice(&flow.daddr[i].to_ne_bytes());
        }
    } else {
        q[12..16].copy_from_slice(&flow.saddr[3].to_ne_bytes());
        q[16..20].copy_from_slice(&flow.daddr[3].to_ne_bytes());
        q[10..12].copy_from_slice(&[0, 0]);
        // The header with its options: net_len bytes, 20 to 60 (a multiple of 4).
        let ihl = (net_len as u32) & 0x3c;
        let c = fold(sum(q.as_ptr(), ihl, 0));
        buf[at + 10..at + 12].copy_from_slice(&c.to_ne_bytes());
    }
    // The ports, after the network header; bounded for the verifier.
    let ports = (at + net_len) & 0x1ff;
    if ports > 512 - 4 {
        return None;
    }
    // SAFETY: inside the buffer (checked above).
    unsafe {
        let p = buf.as_mut_ptr().add(ports);
        core::ptr::write_unaligned(p.cast::<u16>(), flow.sport_be);
        core::ptr::write_unaligned(p.add(2).cast::<u16>(), flow.dport_be);
    }
    Some(())
}

/// A TCP reset as a closed port sends it (RFC 9293 3.10.7.1): to a segment with ACK, seq = its
/// ack; otherwise RST+ACK acknowledging everything it carried (SYN and FIN count one).
#[inline(always)]
fn tcp_reset(ctx: &TcContext, flow: &Flow) -> Option<i32> {
    // SAFETY: this CPU's slot (see maps::REJECT_BUF).
    let buf = unsafe { &mut *REJECT_BUF.get_ptr_mut(0)? };
    // Uninitialised, as in `start_answer`.
    let mut th = MaybeUninit::<[u8; 16]>::uninit();
    let mut ip_len = MaybeUninit::<[u8; 2]>::uninit();
    let l3 = flow.l3();
    let len_off = if flow.is_v6 { l3 + 4 } else { l3 + 2 };
    // SAFETY: reading packet bytes into stack buffers of the lengths given; on success every
    // byte of each is written.
    let (th, ip_len) = unsafe {
        if bpf_skb_load_bytes(ctx.as_ptr(), flow.l4() as u32, th.as_mut_ptr().cast(), 16) != 0
            || bpf_skb_load_bytes(ctx.as_ptr(), len_off as u32, ip_len.as_mut_ptr().cast(), 2) != 0
        {
            return None;
        }
        (th.assume_init(), ip_len.assume_init())
    };
    // Payload bytes: what the IP length covers beyond the transport header (for IPv6 the
    // length excludes the fixed header but includes extension headers).
    let ip_len = u16::from_be_bytes(ip_len) as u32;
    let headers = (flow.l4() - l3) as u32 + ((th[12] >> 4) as u32) * 4;
    let covered = if flow.is_v6 { ip_len + 40 } else { ip_len };
    let mut seg_len = covered.saturating_sub(headers);
    let flags = th[13];
    seg_len += (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
    let (seq, ack, out_flags) = if flags & TCP_ACK != 0 {
        ([th[8], th[9], th[10], th[11]], 0u32, TCP_RST)
    } else {
        let their_seq = u32::from_be_bytes([th[4], th[5], th[6], th[7]]);
        ([0; 4], their_seq.wrapping_add(seg_len), TCP_RST | TCP_ACK)
    };
    let tcp = if flow.is_v6 { FRAME + ETH + 40 } else { FRAME + ETH + 20 };
    let seed = start_answer(ctx, flow, buf, PROTO_TCP, TCP_LEN as u16)?;
    let t = &mut buf[tcp..tcp + TCP_LEN];
    t[0..2].copy_from_slice(&flow.dport_be.to_ne_bytes());
    t[2..4].copy_from_slice(&flow.sport_be.to_ne_bytes());
    t[4..8].copy_from_slice(&seq);
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    // Data offset, flags, then window, checksum (summed below) and urgent pointer all zero:
    // one 8-byte store (the zeros as bytes compiled to a memset call).
    let rest = u64::from_ne_bytes([5 << 4, out_flags, 0, 0, 0, 0, 0, 0]);
    // SAFETY: bytes 12..20 of the TCP header, within `t` (TCP_LEN bytes).
    unsafe { core::ptr::write_unaligned(t[12..20].as_mut_ptr().cast::<u64>(), rest) };
    let c = fold(sum(buf[tcp..].as_ptr(), TCP_LEN as u32, seed));
    buf[tcp + 16..tcp + 18].copy_from_slice(&c.to_ne_bytes());
    send_back(ctx, buf, tcp - FRAME + TCP_LEN)
}
