//! Rewriting addresses and ports of a parsed packet with correct checksums, the same way from
//! every hook: tc uses the kernel's checksum helpers (right for every skb checksum state,
//! including offloaded ones); XDP writes through packet pointers with incremental updates.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use lb_common::{Addr, PROTO_UDP};

use crate::{
    csum, fib,
    packet::{Bounds, Flow},
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
    /// Whether this hook can itself send the packet, once rewritten to `src` -> `dst`, towards
    /// its new destination (a flow with SNAT must not reach the stack). tc always can.
    fn can_forward(&self, flow: &Flow, src: &Addr, dst: &Addr) -> bool;
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

    fn set_addr(&mut self, flow: &Flow, which: Which, old: &Addr, new: &Addr) -> Result<(), ()> {
        let ctx = self.0;
        let csum = flow.l4_csum_off();
        let pseudo = BPF_F_PSEUDO_HDR as u64 | 4 | l4_flags(flow);
        if flow.is_v6 {
            for i in 0..4 {
                if old[i] != new[i] {
                    ctx.l4_csum_replace(csum, old[i] as u64, new[i] as u64, pseudo)
                        .map_err(|_| ())?;
                }
            }
            ctx.store(addr_off(flow, which), new, 0).map_err(|_| ())
        } else {
            ctx.l4_csum_replace(csum, old[3] as u64, new[3] as u64, pseudo).map_err(|_| ())?;
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

    fn can_forward(&self, _: &Flow, _: &Addr, _: &Addr) -> bool {
        true
    }
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
}

/// Rewrites the packet's tuple from `flow`'s to the given one, touching only what changes.
#[inline(always)]
pub fn apply<R: Rewrite>(
    pkt: &mut R,
    flow: &Flow,
    saddr: &Addr,
    daddr: &Addr,
    sport_be: u16,
    dport_be: u16,
) -> Result<(), ()> {
    if flow.saddr != *saddr {
        pkt.set_addr(flow, Which::Src, &flow.saddr, saddr)?;
    }
    if flow.daddr != *daddr {
        pkt.set_addr(flow, Which::Dst, &flow.daddr, daddr)?;
    }
    if flow.sport_be != sport_be {
        pkt.set_port(flow, Which::Src, flow.sport_be, sport_be)?;
    }
    if flow.dport_be != dport_be {
        pkt.set_port(flow, Which::Dst, flow.dport_be, dport_be)?;
    }
    Ok(())
}
