//! The hash that picks a device flow's Maglev slot. Shared by the datapath and `lbctl explain`
//! (which must name the same slot), and identical on every node, so that a flow lands on the
//! same backend whichever node receives it.

use crate::Addr;

#[inline(always)]
const fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a flow's tuple as the packet carries it (addresses as [`Addr`], ports in network
/// byte order).
#[inline(always)]
pub fn flow_hash(saddr: &Addr, daddr: &Addr, sport_be: u16, dport_be: u16, proto: u8) -> u32 {
    let mut h = 0x9e37_79b9u32;
    let mut i = 0;
    while i < 4 {
        h = mix(h ^ saddr[i]);
        i += 1;
    }
    let mut i = 0;
    while i < 4 {
        h = mix(h ^ daddr[i]);
        i += 1;
    }
    mix(h ^ (((sport_be as u32) << 16) | dport_be as u32) ^ ((proto as u32) << 8))
}
