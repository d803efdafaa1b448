//! Rewriting addresses and ports of a parsed packet with correct checksums, the same way from
//! every hook: XDP writes through packet pointers with incremental updates; tc too unless the
//! skb may have its transport checksum left to the device (`csum_in_place`), where it takes
//! the kernel's checksum helpers (right for every skb checksum state, offloaded ones
//! included).

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    helpers::bpf_csum_update,
    programs::{TcContext, XdpContext},
};
use lb_common::{Addr, CtValue, PROTO_SCTP, PROTO_UDP};

use crate::{
    csum, fib,
    packet::{self, Bounds, FRAG_LATER, Flow},
    sctp,
};

/// Whether a part of the tuple changes, and the one's complement difference of its change
/// (the form the checksum helpers take with size 0; 0 when it does not change).
pub type Change = (bool, u32);

pub trait Rewrite {
    fn bounds(&self) -> Bounds;
    /// Adds to the transport checksum the change of the addresses (a pseudo-header change) and
    /// of the ports word, before [`Rewrite::set_tuple`] writes them.
    fn l4_csum_change(&mut self, flow: &Flow, addrs: Change, ports: Change) -> Result<(), ()>;
    /// Rewrites the whole tuple: the transport checksum for every change at once
    /// ([`Rewrite::l4_csum_change`]), then the addresses with the IPv4 header checksum, and
    /// the ports as one word.
    #[inline(always)]
    fn set_tuple(&mut self, flow: &Flow, to: &Tuple) -> Result<(), ()> {
        let addrs = addr_diff(flow, to);
        let old_ports = ports_word(flow.sport_be, flow.dport_be);
        let new_ports = ports_word(to.sport_be, to.dport_be);
        let ports = if old_ports != new_ports {
            (true, csum::diff4(0, old_ports, new_ports))
        } else {
            (false, 0)
        };
        if !addrs.0 && !ports.0 {
            return Ok(());
        }
        self.l4_csum_change(flow, addrs, ports)?;
        // After the checksum helpers (tc), which may move packet data: fresh bounds.
        let b = self.bounds();
        // SAFETY: every pointer bounds-checked by ptr_at; both hooks may write packet data
        // (tc: the kernel unclones a shared skb before the program runs).
        unsafe {
            write_addrs(&b, flow, to, addrs)?;
            if ports.0 {
                let p: *mut u32 = b.ptr_at(flow.l4()).ok_or(())?;
                core::ptr::write_unaligned(p, new_ports);
            }
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

/// Where the packet's address pair (source, then destination) starts.
#[inline(always)]
fn addrs_off(flow: &Flow) -> usize {
    if flow.is_v6 { flow.l3() + 8 } else { flow.l3() + 12 }
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

/// tc's rewrites.
pub struct Tc<'a>(pub &'a TcContext);

/// Updates the transport checksum of the packet in `ctx` for changes summing to `addrs` (the
/// addresses') and `ports` (the ports'; see [`Change`]) in place, without the checksum helpers
/// (two calls into the kernel, about a third of an established packet's time), unless the
/// skb may be one whose sender left the checksum to its device (CHECKSUM_PARTIAL: a veth's or
/// a virtio NIC's from a sender on the same host, and segments GRO merged): there the field
/// holds the pseudo-header's sum alone, which the ports must not move (the device sums them),
/// and only the helpers, which know the skb's state, update it right. No helper tells that
/// state apart, but the field does ([`may_be_partial`]). In every other state in place is
/// right: CHECKSUM_NONE (the stack checks the whole checksum later) and CHECKSUM_UNNECESSARY
/// (verified) need nothing else; CHECKSUM_COMPLETE (the device's sum of the bytes from the
/// network header on) moves by what the rewrite changes there, through bpf_csum_update, which
/// does nothing (and fails) in the other states: one helper call where there were up to four.
/// `false`, nothing changed: may be partial.
#[inline(always)]
fn csum_in_place(ctx: &TcContext, flow: &Flow, addrs: u32, ports: u32) -> bool {
    let skb = ctx.skb.skb;
    // A GSO packet is partial; BIG TCP's IPv4 ones declare no length to check it by.
    // SAFETY: the context's skb, valid for the program's run.
    if unsafe { (*skb).gso_size } != 0 {
        return false;
    }
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    let Some(p) = b.ptr_at::<u16>(flow.l4_csum_off()) else { return false };
    // SAFETY: bounds checked by ptr_at.
    let cur = unsafe { core::ptr::read_unaligned(p) };
    if may_be_partial(&b, flow, cur) {
        return false;
    }
    let next = l4_csum_after(flow, cur, csum::add(addrs, ports));
    // The ports' change and the field's; IPv4's addresses change the sum as much as its
    // header checksum takes back, IPv6's (no header checksum) do not.
    let mut moved = csum::diff4(ports, cur as u32, next as u32);
    if flow.is_v6 {
        moved = csum::add(moved, addrs);
    }
    // SAFETY: the context's skb. Fails (-ENOTSUPP) unless CHECKSUM_COMPLETE: nothing to move.
    unsafe { bpf_csum_update(skb, moved) };
    // Bounds again: the verifier forgets packet pointers over helper calls. (It changed no
    // byte of the packet nor its length: this check passes as the first did.)
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    let Some(p) = b.ptr_at::<u16>(flow.l4_csum_off()) else { return false };
    // SAFETY: bounds checked by ptr_at; tc may write packet data.
    unsafe { core::ptr::write_unaligned(p, next) };
    true
}

/// Whether the transport checksum field `field` may hold the pseudo-header's sum alone, as a
/// packet its sender left for the device to sum has it (CHECKSUM_PARTIAL: the kernel's TCP and
/// UDP, and any sender relying on that offload, put it there): it equals that sum, folded.
/// A whole checksum equal to it by chance (1 in 65,536 packets) is taken for one too: the
/// helpers are right in every state. So is a packet with IPv4 options or IPv6 extension
/// headers (rare; a routing header would change the pseudo-header's destination).
#[inline(always)]
fn may_be_partial(b: &Bounds, flow: &Flow, field: u16) -> bool {
    let (fixed, len_off) = if flow.is_v6 { (40, 4) } else { (20, 2) };
    if flow.l4() != flow.l3() + fixed {
        return true;
    }
    let Some(p) = b.ptr_at::<u16>(flow.l3() + len_off) else { return true };
    // SAFETY: bounds checked by ptr_at.
    let len = u16::from_be(unsafe { core::ptr::read_unaligned(p) });
    // The transport length: IPv6's payload length, IPv4's total length less its header.
    let l4_len = if flow.is_v6 { len } else { len.wrapping_sub(20) }.to_be_bytes();
    // The pseudo-header: addresses, then the protocol and the length as 16-bit words (IPv6's
    // 32-bit length and 8-bit next header sum to the same words).
    let mut sum = u32::from_ne_bytes([0, flow.proto, l4_len[0], l4_len[1]]);
    let first = if flow.is_v6 { 0 } else { 3 };
    for i in first..4 {
        sum = csum::add(sum, csum::add(flow.saddr[i], flow.daddr[i]));
    }
    csum::fold(sum) == field
}

impl Rewrite for Tc<'_> {
    fn bounds(&self) -> Bounds {
        Bounds { start: self.0.data(), end: self.0.data_end() }
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
        self.0.store(addrs_off(flow), addrs, BPF_F_RECOMPUTE_CSUM as u64).map_err(|_| ())
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
            ctx.store(addrs_off(flow), addrs, BPF_F_RECOMPUTE_CSUM as u64).map_err(|_| ())?;
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

    /// In place where [`csum_in_place`] can, else two checksum helper calls at most (the
    /// addresses' difference as a pseudo-header change, the ports' as a plain one), for a
    /// packet that may be partial: the helpers keep every skb checksum state right,
    /// where a call per field would cost up to ten. The IPv4 header checksum is updated by the
    /// writes: no offload state covers it, and its change cancels the addresses' in a
    /// CHECKSUM_COMPLETE sum, so the helper would only add a call.
    #[inline(always)]
    fn l4_csum_change(&mut self, flow: &Flow, addrs: Change, ports: Change) -> Result<(), ()> {
        if csum_in_place(self.0, flow, addrs.1, ports.1) {
            return Ok(());
        }
        let ctx = self.0;
        let csum_off = flow.l4_csum_off();
        if flow.proto == PROTO_UDP {
            zero_udp_csum_sum(ctx, flow, addrs.1, ports.1);
        }
        if addrs.0 {
            l4_pseudo_replace(ctx, csum_off, addrs.1, flow.is_v6, l4_flags(flow))?;
        }
        if ports.0 {
            ctx.l4_csum_replace(csum_off, 0, ports.1 as u64, l4_flags(flow)).map_err(|_| ())?;
        }
        Ok(())
    }
}

/// A UDP checksum of 0 (none) is left alone by the checksum helpers, and with it a
/// CHECKSUM_COMPLETE skb's sum, which the ports' change (and IPv6's addresses', which no header
/// checksum takes back) still moves: moved here (`bpf_csum_update` does nothing in other
/// states).
#[inline(always)]
fn zero_udp_csum_sum(ctx: &TcContext, flow: &Flow, addrs: u32, ports: u32) {
    let b = Bounds { start: ctx.data(), end: ctx.data_end() };
    let Some(p) = b.ptr_at::<u16>(flow.l4_csum_off()) else { return };
    // SAFETY: bounds checked by ptr_at.
    if unsafe { core::ptr::read_unaligned(p) } != 0 {
        return;
    }
    let moved = if flow.is_v6 { csum::add(ports, addrs) } else { ports };
    // SAFETY: the context's skb. Fails (-ENOTSUPP, ignored) unless CHECKSUM_COMPLETE.
    unsafe { bpf_csum_update(ctx.skb.skb, moved) };
}

/// The transport checksum `cur` after changes summing to `diff`. A UDP checksum of 0 is none
/// (IPv4): nothing to keep right; one that comes out 0 is sent as its other form.
#[inline(always)]
fn l4_csum_after(flow: &Flow, cur: u16, diff: u32) -> u16 {
    if flow.proto == PROTO_UDP && cur == 0 {
        return 0;
    }
    match csum::apply_diff(cur, diff) {
        0 if flow.proto == PROTO_UDP => 0xffff,
        next => next,
    }
}

/// The addresses' [`Change`] from `flow`'s to `to`'s.
#[inline(always)]
fn addr_diff(flow: &Flow, to: &Tuple) -> Change {
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
unsafe fn write_addrs(b: &Bounds, flow: &Flow, to: &Tuple, diff: Change) -> Result<(), ()> {
    let (addrs, addr_diff) = diff;
    if !addrs {
        return Ok(());
    }
    // SAFETY: every pointer bounds-checked by ptr_at; writing is the caller's promise.
    unsafe {
        if flow.is_v6 {
            let p: *mut [Addr; 2] = b.ptr_at(addrs_off(flow)).ok_or(())?;
            packet::write_addr_pair(p, &to.saddr, &to.daddr);
        } else {
            let ip_csum: *mut u16 = b.ptr_at(flow.l3() + 10).ok_or(())?;
            let cur = core::ptr::read_unaligned(ip_csum);
            core::ptr::write_unaligned(ip_csum, csum::apply_diff(cur, addr_diff));
            let p: *mut [u32; 2] = b.ptr_at(addrs_off(flow)).ok_or(())?;
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

impl Rewrite for Xdp<'_> {
    fn bounds(&self) -> Bounds {
        Bounds { start: self.0.data(), end: self.0.data_end() }
    }

    /// One update of the checksum in place for both changes.
    #[inline(always)]
    fn l4_csum_change(&mut self, flow: &Flow, addrs: Change, ports: Change) -> Result<(), ()> {
        let p: *mut u16 = self.bounds().ptr_at(flow.l4_csum_off()).ok_or(())?;
        // SAFETY: bounds checked by ptr_at; XDP may write packet data.
        unsafe {
            let cur = core::ptr::read_unaligned(p);
            // Unchanged parts add 0: no test for each.
            core::ptr::write_unaligned(p, l4_csum_after(flow, cur, csum::add(addrs.1, ports.1)));
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
