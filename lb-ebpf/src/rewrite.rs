//! Rewriting addresses and ports of a parsed packet with correct checksums, the same way from
//! every hook: tc uses the kernel's checksum helpers (right for every skb checksum state,
//! including offloaded ones); XDP writes through packet pointers with incremental updates.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    programs::{TcContext, XdpContext},
};
use lb_common::{Addr, CtValue, PROTO_SCTP, PROTO_UDP};

use crate::{
    csum, fib,
    packet::{self, Bounds, FRAG_LATER, Flow},
    sctp,
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Src,
    Dst,
}

pub trait Rewrite {
    fn bounds(&self) -> Bounds;
    fn set_addr(&mut self, flow: &Flow, which: Which, old: &Addr, new: &Addr) -> Result<(), ()>;
    fn set_port(&mut self, flow: &Flow, which: Which, old: u16, new: u16) -> Result<(), ()>;
    /// Rewrites the whole tuple; by default field by field.
    #[inline(always)]
    fn set_tuple(&mut self, flow: &Flow, to: &Tuple) -> Result<(), ()> {
        if flow.saddr != to.saddr {
            self.set_addr(flow, Which::Src, &flow.saddr, &to.saddr)?;
        }
        if flow.daddr != to.daddr {
            self.set_addr(flow, Which::Dst, &flow.daddr, &to.daddr)?;
        }
        if flow.sport_be != to.sport_be {
            self.set_port(flow, Which::Src, flow.sport_be, to.sport_be)?;
        }
        if flow.dport_be != to.dport_be {
            self.set_port(flow, Which::Dst, flow.dport_be, to.dport_be)?;
        }
        Ok(())
    }
    /// Rewrites only the addresses, for a fragment after the first: it has no transport
    /// header (the first fragment's rewrite changed the ports and the transport checksum,
    /// which covers the whole datagram). By default with direct writes.
    #[inline(always)]
    fn set_addrs(&mut self, flow: &Flow, to: &Tuple) -> Result<(), ()> {
        let diff = addr_diff(flow, to);
        // SAFETY: the packet's own bounds.
        unsafe { write_addrs(&self.bounds(), flow, to, diff) }
    }
    /// Rewrites an SCTP packet's tuple, its CRC32c changed for the ports (`sctp.rs`). By
    /// default with direct writes (XDP: no skb sum to keep).
    #[inline(always)]
    fn set_sctp(&mut self, flow: &Flow, to: &Tuple) -> Result<(), ()> {
        let b = self.bounds();
        let (old, new) =
            (ports_word(flow.sport_be, flow.dport_be), ports_word(to.sport_be, to.dport_be));
        // SAFETY: the packet's own bounds; pointers checked by ptr_at.
        unsafe {
            write_addrs(&b, flow, to, addr_diff(flow, to))?;
            if old != new {
                let h = sctp::header(&b, flow)?;
                if let Some(crc) = sctp::checksum_after(&b, flow, (*h)[2], old, new)? {
                    (*h)[2] = crc;
                }
                (*h)[0] = new;
            }
        }
        Ok(())
    }
    /// Whether this hook can itself send the packet, once rewritten to `src` -> `dst`, towards
    /// its new destination (a flow with SNAT must not reach the stack). tc always can.
    fn can_forward(&self, flow: &Flow, src: &Addr, dst: &Addr) -> bool;
    /// The source a new flow with SNAT to `dst` takes, into `out` (`fib::snat_source`);
    /// `false` without a node address of the flow's family.
    fn snat_source(&self, flow: &Flow, dst: &Addr, out: &mut Addr) -> bool;
    /// Whether the stack would forward the packet as it is to another host
    /// (`fib::would_forward`).
    fn would_forward(&self, flow: &Flow) -> bool;
    /// The device the packet is on (for monitor events).
    fn ifindex(&self) -> u32;
}

#[inline(always)]
fn addr_off(flow: &Flow, which: Which) -> usize {
    match (flow.is_v6, which) {
        (false, Which::Src) => flow.l3() + 12,
        (false, Which::Dst) => flow.l3() + 16,
        (true, Which::Src) => flow.l3() + 8,
        (true, Which::Dst) => flow.l3() + 24,
    }
}

#[inline(always)]
fn port_off(flow: &Flow, which: Which) -> usize {
    match which {
        Which::Src => flow.l4(),
        Which::Dst => flow.l4() + 2,
    }
}

/// BPF_F_IPV6 for bpf_l4_csum_replace (newer than aya-ebpf's bindings).
const BPF_F_IPV6: u64 = 1 << 7;

/// Adds `diff`, the change of pseudo-header fields (addresses), to the transport checksum at
/// `csum_off`, with `flags` besides. IPv6 says so (BPF_F_IPV6): no header checksum covers its
/// addresses, so their change and the transport checksum's cancel in a CHECKSUM_COMPLETE
/// sum, which must then stay as it is (for IPv4 the helper moves it, rightly: the header
/// checksum absorbs the addresses' change). Kernels older than the flag refuse it and get
/// the call without, their old behaviour.
#[inline(always)]
pub fn l4_pseudo_replace(
    ctx: &TcContext,
    csum_off: usize,
    diff: u32,
    is_v6: bool,
    flags: u64,
) -> Result<(), ()> {
    let flags = BPF_F_PSEUDO_HDR as u64 | flags;
    if is_v6 && ctx.l4_csum_replace(csum_off, 0, diff as u64, flags | BPF_F_IPV6).is_ok() {
        return Ok(());
    }
    ctx.l4_csum_replace(csum_off, 0, diff as u64, flags).map_err(|_| ())
}

/// Flags for the L4 checksum helper: a UDP checksum of 0 (none, IPv4) stays 0.
#[inline(always)]
fn l4_flags(flow: &Flow) -> u64 {
    if flow.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 }
}

pub struct Tc<'a>(pub &'a TcContext);

impl Rewrite for Tc<'_> {
    fn bounds(&self) -> Bounds {
        Bounds { start: self.0.data(), end: self.0.data_end() }
    }

    /// One address (tc's own `set_tuple` rewrites the whole tuple with fewer calls).
    fn set_addr(&mut self, flow: &Flow, which: Which, old: &Addr, new: &Addr) -> Result<(), ()> {
        let ctx = self.0;
        let first = if flow.is_v6 { 0 } else { 3 };
        let mut diff = 0;
        for i in first..4 {
            diff = csum::diff4(diff, old[i], new[i]);
        }
        l4_pseudo_replace(ctx, flow.l4_csum_off(), diff, flow.is_v6, l4_flags(flow))?;
        if flow.is_v6 {
            ctx.store(addr_off(flow, which), new, 0).map_err(|_| ())
        } else {
            ctx.l3_csum_replace(flow.l3() + 10, old[3] as u64, new[3] as u64, 4).map_err(|_| ())?;
            ctx.store(addr_off(flow, which), &new[3], 0).map_err(|_| ())
        }
    }

    fn set_port(&mut self, flow: &Flow, which: Which, old: u16, new: u16) -> Result<(), ()> {
        let ctx = self.0;
        ctx.l4_csum_replace(flow.l4_csum_off(), old as u64, new as u64, 2 | l4_flags(flow))
            .map_err(|_| ())?;
        ctx.store(port_off(flow, which), &new, 0).map_err(|_| ())
    }

    /// IPv4 as by default (the header checksum's change cancels the addresses' in a
    /// CHECKSUM_COMPLETE sum); IPv6 addresses through the helper that keeps such a sum right,
    /// since no checksum in a later fragment makes up for their change.
    #[inline(always)]
    fn set_addrs(&mut self, flow: &Flow, to: &Tuple) -> Result<(), ()> {
        if !flow.is_v6 {
            let diff = addr_diff(flow, to);
            // SAFETY: the packet's own bounds; tc may write packet data.
            return unsafe { write_addrs(&self.bounds(), flow, to, diff) };
        }
        // SAFETY: Tuple holds the two addresses side by side from its start (checked below).
        let addrs = unsafe { &*(to as *const Tuple).cast::<[Addr; 2]>() };
        self.0.store(addr_off(flow, Which::Src), addrs, BPF_F_RECOMPUTE_CSUM as u64).map_err(|_| ())
    }

    fn can_forward(&self, _: &Flow, _: &Addr, _: &Addr) -> bool {
        true
    }

    /// Through the store helper, which keeps a CHECKSUM_COMPLETE sum right (nothing else
    /// would: SCTP's CRC is no part of it); IPv4's addresses as by default (the header
    /// checksum's change cancels theirs).
    #[inline(always)]
    fn set_sctp(&mut self, flow: &Flow, to: &Tuple) -> Result<(), ()> {
        let ctx = self.0;
        let diff = addr_diff(flow, to);
        if !flow.is_v6 {
            // SAFETY: the packet's own bounds; tc may write packet data.
            unsafe { write_addrs(&self.bounds(), flow, to, diff)? };
        } else if diff.0 {
            // SAFETY: Tuple holds the two addresses side by side from its start.
            let addrs = unsafe { &*(to as *const Tuple).cast::<[Addr; 2]>() };
            ctx.store(addr_off(flow, Which::Src), addrs, BPF_F_RECOMPUTE_CSUM as u64)
                .map_err(|_| ())?;
        }
        let (old, new) =
            (ports_word(flow.sport_be, flow.dport_be), ports_word(to.sport_be, to.dport_be));
        if old == new {
            return Ok(());
        }
        let b = self.bounds();
        // SAFETY: bounds checked by `header`.
        let cur = unsafe { (*sctp::header(&b, flow)?)[2] };
        if let Some(crc) = sctp::checksum_after(&b, flow, cur, old, new)? {
            ctx.store(flow.l4() + 8, &crc, BPF_F_RECOMPUTE_CSUM as u64).map_err(|_| ())?;
        }
        ctx.store(flow.l4(), &new, BPF_F_RECOMPUTE_CSUM as u64).map_err(|_| ())
    }

    fn would_forward(&self, flow: &Flow) -> bool {
        // SAFETY: the context's skb, valid for the program's run.
        let ifindex = unsafe { (*self.0.skb.skb).ingress_ifindex };
        fib::would_forward(self.0.as_ptr(), ifindex, flow)
    }

    fn snat_source(&self, flow: &Flow, dst: &Addr, out: &mut Addr) -> bool {
        // SAFETY: the context's skb, valid for the program's run.
        let ifindex = unsafe { (*self.0.skb.skb).ingress_ifindex };
        fib::snat_source(self.0.as_ptr(), ifindex, flow, dst, out)
    }

    fn ifindex(&self) -> u32 {
        // SAFETY: the context's skb, valid for the program's run.
        unsafe { (*self.0.skb.skb).ifindex }
    }

    /// Two checksum helper calls at most (the addresses' difference into the transport
    /// checksum as a pseudo-header change, the ports' as a plain one), then direct writes: the
    /// helpers keep every skb checksum state right, and a call per field would cost up to ten.
    /// The IPv4 header checksum is updated here: no offload state covers it, and its change
    /// cancels the addresses' in a CHECKSUM_COMPLETE sum, so the helper would only add a call.
    #[inline(always)]
    fn set_tuple(&mut self, flow: &Flow, to: &Tuple) -> Result<(), ()> {
        let ctx = self.0;
        let (addrs, addr_diff) = addr_diff(flow, to);
        let old_ports = ports_word(flow.sport_be, flow.dport_be);
        let new_ports = ports_word(to.sport_be, to.dport_be);
        let csum_off = flow.l4_csum_off();
        if addrs {
            l4_pseudo_replace(ctx, csum_off, addr_diff, flow.is_v6, l4_flags(flow))?;
        }
        if old_ports != new_ports {
            let diff = csum::diff4(0, old_ports, new_ports);
            ctx.l4_csum_replace(csum_off, 0, diff as u64, l4_flags(flow)).map_err(|_| ())?;
        }
        // The helpers may move packet data: fresh bounds for the writes.
        let b = Bounds { start: ctx.data(), end: ctx.data_end() };
        // SAFETY: every pointer bounds-checked by ptr_at; tc may write packet data directly
        // (the kernel unclones a shared skb before the program runs).
        unsafe {
            write_addrs(&b, flow, to, (addrs, addr_diff))?;
            if old_ports != new_ports {
                let p: *mut u32 = b.ptr_at(port_off(flow, Which::Src)).ok_or(())?;
                core::ptr::write_unaligned(p, new_ports);
            }
        }
        Ok(())
    }
}

/// Whether the addresses change from `flow`'s to `to`'s, and the one's complement difference
/// of that change (the form the checksum helpers take with size 0).
#[inline(always)]
fn addr_diff(flow: &Flow, to: &Tuple) -> (bool, u32) {
    let (mut addrs, mut diff) = (false, 0u32);
    let first = if flow.is_v6 { 0 } else { 3 };
    for i in first..4 {
        for (old, new) in [(flow.saddr[i], to.saddr[i]), (flow.daddr[i], to.daddr[i])] {
            if old != new {
                addrs = true;
                diff = csum::diff4(diff, old, new);
            }
        }
    }
    (addrs, diff)
}

/// Writes `to`'s addresses over the packet's when `diff` (from [`addr_diff`]) says they
/// change, with the IPv4 header checksum updated by that difference.
///
/// # Safety
/// `b` must be the packet's current bounds, and the hook allowed to write packet data.
#[inline(always)]
unsafe fn write_addrs(b: &Bounds, flow: &Flow, to: &Tuple, diff: (bool, u32)) -> Result<(), ()> {
    let (addrs, addr_diff) = diff;
    if !addrs {
        return Ok(());
    }
    // SAFETY: every pointer bounds-checked by ptr_at; writing is the caller's promise.
    unsafe {
        if flow.is_v6 {
            let p: *mut [Addr; 2] = b.ptr_at(addr_off(flow, Which::Src)).ok_or(())?;
            packet::write_addr_pair(p, &to.saddr, &to.daddr);
        } else {
            let ip_csum: *mut u16 = b.ptr_at(flow.l3() + 10).ok_or(())?;
            let cur = core::ptr::read_unaligned(ip_csum);
            core::ptr::write_unaligned(ip_csum, csum::apply_diff(cur, addr_diff));
            let p: *mut [u32; 2] = b.ptr_at(addr_off(flow, Which::Src)).ok_or(())?;
            core::ptr::write_unaligned(p, [to.saddr[3], to.daddr[3]]);
        }
    }
    Ok(())
}

/// Source and destination port as the 32-bit word they form in the transport header.
#[inline(always)]
pub fn ports_word(sport_be: u16, dport_be: u16) -> u32 {
    let (s, d) = (sport_be.to_ne_bytes(), dport_be.to_ne_bytes());
    u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
}

/// A rewritten tuple, as a conntrack entry holds it (a view into the entry: see [`apply`]).
#[repr(C)]
pub struct Tuple {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport_be: u16,
    pub dport_be: u16,
}

pub struct Xdp<'a>(pub &'a XdpContext);

impl Xdp<'_> {
    /// Updates the transport checksum for a change of `old` to `new` (32-bit words).
    #[inline(always)]
    fn l4_csum_words(&self, flow: &Flow, old: u32, new: u32) -> Result<(), ()> {
        let p: *mut u16 = self.bounds().ptr_at(flow.l4_csum_off()).ok_or(())?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let cur = core::ptr::read_unaligned(p);
            if flow.proto == PROTO_UDP && cur == 0 {
                return Ok(()); // no UDP checksum: nothing to keep right
            }
            let mut next = csum::replace4(cur, old, new);
            if flow.proto == PROTO_UDP && next == 0 {
                next = 0xffff;
            }
            core::ptr::write_unaligned(p, next);
        }
        Ok(())
    }
}

impl Rewrite for Xdp<'_> {
    fn bounds(&self) -> Bounds {
        Bounds { start: self.0.data(), end: self.0.data_end() }
    }

    fn set_addr(&mut self, flow: &Flow, which: Which, old: &Addr, new: &Addr) -> Result<(), ()> {
        if flow.is_v6 {
            for i in 0..4 {
                if old[i] != new[i] {
                    self.l4_csum_words(flow, old[i], new[i])?;
                }
            }
            let p: *mut Addr = self.bounds().ptr_at(addr_off(flow, which)).ok_or(())?;
            // SAFETY: bounds checked by ptr_at.
            unsafe { core::ptr::write_unaligned(p, *new) };
        } else {
            self.l4_csum_words(flow, old[3], new[3])?;
            let ip_csum: *mut u16 = self.bounds().ptr_at(flow.l3() + 10).ok_or(())?;
            let p: *mut u32 = self.bounds().ptr_at(addr_off(flow, which)).ok_or(())?;
            // SAFETY: bounds checked by ptr_at.
            unsafe {
                let cur = core::ptr::read_unaligned(ip_csum);
                core::ptr::write_unaligned(ip_csum, csum::replace4(cur, old[3], new[3]));
                core::ptr::write_unaligned(p, new[3]);
            }
        }
        Ok(())
    }

    fn set_port(&mut self, flow: &Flow, which: Which, old: u16, new: u16) -> Result<(), ()> {
        let csum_p: *mut u16 = self.bounds().ptr_at(flow.l4_csum_off()).ok_or(())?;
        let p: *mut u16 = self.bounds().ptr_at(port_off(flow, which)).ok_or(())?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let cur = core::ptr::read_unaligned(csum_p);
            if !(flow.proto == PROTO_UDP && cur == 0) {
                let mut next = csum::replace2(cur, old, new);
                if flow.proto == PROTO_UDP && next == 0 {
                    next = 0xffff;
                }
                core::ptr::write_unaligned(csum_p, next);
            }
            core::ptr::write_unaligned(p, new);
        }
        Ok(())
    }

    fn can_forward(&self, flow: &Flow, src: &Addr, dst: &Addr) -> bool {
        fib::xdp_can_tx(self.0, (flow.is_v6, flow.proto), src, dst)
    }

    fn would_forward(&self, flow: &Flow) -> bool {
        fib::would_forward(self.0.as_ptr(), self.0.ingress_ifindex() as u32, flow)
    }

    fn snat_source(&self, flow: &Flow, dst: &Addr, out: &mut Addr) -> bool {
        fib::snat_source(self.0.as_ptr(), self.0.ingress_ifindex() as u32, flow, dst, out)
    }

    fn ifindex(&self) -> u32 {
        self.0.ingress_ifindex() as u32
    }
}

/// Rewrites the packet's tuple from `flow`'s to the one `ct` records, touching only what
/// changes.
#[inline(always)]
pub fn apply<R: Rewrite>(pkt: &mut R, flow: &Flow, ct: &CtValue) -> Result<(), ()> {
    // SAFETY: CtValue holds the four fields of a Tuple, in its layout, from `new_saddr` on
    // (checked below): the entry is read in place, not copied to the stack.
    let to = unsafe { &*(&ct.new_saddr as *const Addr).cast::<Tuple>() };
    if flow.frag == FRAG_LATER {
        return pkt.set_addrs(flow, to);
    }
    if flow.proto == PROTO_SCTP {
        return pkt.set_sctp(flow, to);
    }
    pkt.set_tuple(flow, to)
}

const _: () = {
    use core::mem::offset_of;
    let base = offset_of!(CtValue, new_saddr);
    assert!(offset_of!(CtValue, new_daddr) - base == offset_of!(Tuple, daddr));
    assert!(offset_of!(CtValue, new_sport_be) - base == offset_of!(Tuple, sport_be));
    assert!(offset_of!(CtValue, new_dport_be) - base == offset_of!(Tuple, dport_be));
    assert!(offset_of!(Tuple, saddr) == 0 && size_of::<Tuple>() == 36);
    assert!(offset_of!(Tuple, daddr) == size_of::<Addr>());
};
