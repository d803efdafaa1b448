//! IP fragments of translated flows. Only a datagram's first fragment carries its ports, so a
//! later fragment cannot find its flow's conntrack entry by itself. When a first fragment is
//! translated, its ports are remembered under the datagram's identity (addresses, protocol,
//! fragment identification, which every fragment repeats); a later fragment that finds them
//! gets its flow's translation, on its addresses only (the first fragment's rewrite changed
//! the ports and the transport checksum, which covers the whole datagram). Nothing is
//! reassembled: the fragments go on as they came, each translated, as netfilter's conntrack
//! (kube-proxy) handles them after reassembling. tc does the later fragments; XDP translates
//! first fragments like any packet and hands later ones to tc.
//!
//! A later fragment that arrives before its first, or whose datagram is not ours, passes
//! untouched (counted as `fragment`). Entries are not removed: a datagram's fragments may come
//! in any order, and the LRU map makes room (a few seconds of fragmented traffic fit).

use lb_common::Addr;

use crate::{
    maps::{Aligned, FRAGMENTS},
    packet::Flow,
};

/// One datagram, as its every fragment names it.
#[repr(C)]
pub struct FragKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub id: u32,
    pub proto: u8,
    pub _pad8: u8,
    pub _pad16: u16,
}

/// The transport of a datagram's flow, from its first fragment: its ports, and its protocol
/// (an IPv6 fragment names the next header, which may be an extension header before it).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FragPorts {
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// How many datagrams' ports are kept (Cilium's default too).
pub const MAX_DATAGRAMS: u32 = 8192;

#[inline(always)]
fn key_of(flow: &Flow) -> Aligned<FragKey> {
    Aligned(FragKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        id: flow.frag_id,
        proto: flow.frag_proto,
        _pad8: 0,
        _pad16: 0,
    })
}

/// Remembers the ports of a first fragment just translated, for the later fragments of its
/// datagram. A subprogram: its key stays off the caller's stack frame.
#[inline(never)]
pub fn remember(flow: &Flow) {
    let ports = FragPorts {
        sport_be: flow.sport_be,
        dport_be: flow.dport_be,
        proto: flow.proto,
        _pad: [0; 3],
    };
    // A full map evicts the oldest datagram; a failure leaves the later fragments untranslated.
    let _ = FRAGMENTS.insert(&key_of(flow).0, ports, 0);
}

/// The ports of a later fragment's flow, if its datagram's first fragment was translated here.
#[inline(always)]
pub fn ports(flow: &Flow) -> Option<FragPorts> {
    // SAFETY: a live map value, copied out at once.
    FRAGMENTS.get_ptr(&key_of(flow).0).map(|p| unsafe { *p })
}
