//! Safe packet parsing shared by every device hook (tc and XDP).
//!
//! Every read goes through [`Bounds::ptr_at`], which the verifier can follow; parsing never
//! trusts a length field without checking it against the end of the packet.

use core::mem::size_of;

use lb_common::{
    Addr, CtKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, STAT_FRAGMENT,
    STAT_MALFORMED, STAT_NOT_IP, STAT_OTHER_L4, addr_from_v4_raw,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
const ETH_LEN: usize = size_of::<EthHdr>();
pub const IPV6_LEN: usize = size_of::<Ipv6Hdr>();
/// SCTP's common header (12 bytes) and the type, flags and length of a chunk: a packet has one.
const SCTP_MIN_LEN: usize = 16;
/// IPv4 "more fragments", and the fragment offset, in the flags and offset field.
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV4_OFFSET: u16 = 0x1fff;

// IPv6 extension headers we step over to find the transport header.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_DEST_OPTS: u8 = 60;
/// More than this many extension headers: not a packet for a service (passed untouched).
const IPV6_MAX_EXT_HEADERS: usize = 4;

/// An IPv6 header's source and destination addresses (32 bytes at `at`), read a word at a
/// time: read as one 32-byte value they compiled to byte loads and a call to a byte-by-byte
/// `memmove` subprogram (a tenth of an established IPv6 packet's time in tc).
///
/// # Safety
/// `at` must point to 32 readable bytes.
#[inline(always)]
pub unsafe fn read_addr_pair(at: *const [Addr; 2], src: &mut Addr, dst: &mut Addr) {
    let words = at.cast::<u32>();
    for i in 0..4 {
        // SAFETY: within the 32 bytes the caller vouches for.
        unsafe {
            src[i] = words.add(i).read_unaligned();
            dst[i] = words.add(4 + i).read_unaligned();
        }
    }
}

/// Writes `src` and `dst` as an IPv6 header's address pair at `at`, a word at a time (see
/// [`read_addr_pair`]).
///
/// # Safety
/// `at` must point to 32 writable bytes of packet data.
#[inline(always)]
pub unsafe fn write_addr_pair(at: *mut [Addr; 2], src: &Addr, dst: &Addr) {
    let words = at.cast::<u32>();
    for i in 0..4 {
        // SAFETY: within the 32 bytes the caller vouches for.
        unsafe {
            words.add(i).write_unaligned(src[i]);
            words.add(4 + i).write_unaligned(dst[i]);
        }
    }
}

/// The packet's linear data, as the verifier sees it.
#[derive(Clone, Copy)]
pub struct Bounds {
    pub start: usize,
    pub end: usize,
}

impl Bounds {
    /// A pointer to a `T` at `offset`, if the whole `T` lies inside the packet.
    #[inline(always)]
    pub fn ptr_at<T>(&self, offset: usize) -> Option<*mut T> {
        let at = self.start + offset;
        if at + size_of::<T>() > self.end {
            return None;
        }
        Some(at as *mut T)
    }
}

/// The transport flow of a packet, with where its headers start. It starts with the fields of
/// a [`CtKey`], in its layout, so the conntrack lookup takes its key straight from the parsed
/// flow (see [`Flow::ct_key`]) instead of building one on the stack.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// Always 0: the key's padding.
    pub _pad8: u8,
    pub _pad16: u16,
    /// TCP flags byte (0 for UDP; for SCTP, the flag its first chunk stands for: see
    /// [`sctp_flags`]).
    pub tcp_flags: u8,
    pub is_v6: bool,
    /// `FRAG_*`: whether the packet is a fragment, and which.
    pub frag: u8,
    /// The protocol every fragment of the datagram names (IPv4: the header's; IPv6: the
    /// fragment header's next header, which extension headers may still follow before the
    /// transport header in the first fragment). Like `frag_id`, read only for fragments.
    pub frag_proto: u8,
    /// The fragment identification (IPv4: the header's 16 bits; IPv6: the fragment header's
    /// 32), which the fragments of one datagram share. Left as it was for a packet that is
    /// no fragment (one store less on every packet): read it only when `frag` says so.
    pub frag_id: u32,
    pub l3_off: usize,
    pub l4_off: usize,
}

const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(Flow, saddr) == offset_of!(CtKey, saddr));
    assert!(offset_of!(Flow, daddr) == offset_of!(CtKey, daddr));
    assert!(offset_of!(Flow, sport_be) == offset_of!(CtKey, sport_be));
    assert!(offset_of!(Flow, dport_be) == offset_of!(CtKey, dport_be));
    assert!(offset_of!(Flow, proto) == offset_of!(CtKey, proto));
    assert!(offset_of!(Flow, _pad8) == offset_of!(CtKey, _pad8));
    assert!(offset_of!(Flow, _pad16) == offset_of!(CtKey, _pad16));
    assert!(size_of::<CtKey>() == 40 && align_of::<Flow>() >= align_of::<CtKey>());
};

/// Not a fragment (an IPv6 atomic fragment, offset 0 and no more to come, included).
pub const FRAG_NONE: u8 = 0;
/// The first fragment of a datagram: it carries the transport header.
pub const FRAG_FIRST: u8 = 1;
/// A later fragment: no transport header (ports 0); see fragment.rs.
pub const FRAG_LATER: u8 = 2;

/// Where a packet's transport header is, after its IPv6 extension headers.
pub struct Transport {
    pub proto: u8,
    pub off: usize,
    pub frag: u8,
    pub frag_proto: u8,
    pub frag_id: u32,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

// SCTP chunk types that open or end an association (RFC 9260 section 3.2).
const SCTP_INIT: u8 = 1;
const SCTP_ABORT: u8 = 6;
const SCTP_SHUTDOWN_COMPLETE: u8 = 14;

/// The TCP flag an SCTP packet's first chunk stands for, so conntrack and the refusals read
/// one field: INIT opens (SYN), ABORT resets (RST, never answered), SHUTDOWN COMPLETE ends
/// (FIN); any other chunk carries the association on (ACK).
#[inline(always)]
pub fn sctp_flags(chunk_type: u8) -> u8 {
    match chunk_type {
        SCTP_INIT => TCP_SYN,
        SCTP_ABORT => TCP_RST,
        SCTP_SHUTDOWN_COMPLETE => TCP_FIN,
        _ => TCP_ACK,
    }
}

/// Deepest transport header we translate: parsing gives up beyond (counted as other_l4). Also
/// lets offsets read back from a map be masked into a range the verifier accepts.
pub const MAX_L4_OFF: usize = 255;

impl Flow {
    /// Sets everything but the addresses, ports and fragment facts, the key's padding
    /// included.
    #[inline(always)]
    fn set_layout(&mut self, proto: u8, is_v6: bool, l3_off: usize, l4_off: usize) {
        self.proto = proto;
        (self._pad8, self._pad16) = (0, 0);
        self.is_v6 = is_v6;
        self.l3_off = l3_off;
        self.l4_off = l4_off;
    }

    /// The conntrack key of the packet's own direction.
    #[inline(always)]
    pub fn ct_key(&self) -> &CtKey {
        // SAFETY: Flow is repr(C) and starts with CtKey's fields at CtKey's offsets (checked
        // above); parse zeroes the padding.
        unsafe { &*(self as *const Flow).cast::<CtKey>() }
    }

    /// The network header offset, bounded for the verifier (always 14 today).
    #[inline(always)]
    pub fn l3(&self) -> usize {
        self.l3_off & 0x3f
    }

    /// The transport header offset, bounded for the verifier.
    #[inline(always)]
    pub fn l4(&self) -> usize {
        self.l4_off & MAX_L4_OFF
    }

    /// Offset of the transport checksum (TCP and UDP; SCTP's is rewritten by `sctp.rs`).
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == PROTO_TCP { self.l4() + 16 } else { self.l4() + 6 }
    }
}

/// Why a packet has no flow to act on. Each reason has its own counter.
#[derive(Clone, Copy)]
pub enum Skip {
    NotIp,
    OtherL4,
    /// A fragment other than the first: the flow holds its addresses, protocol and
    /// identification (ports 0); tc may translate it (`fragment.rs`).
    Fragment,
    Malformed,
    /// An ICMP or ICMPv6 message: the flow holds its network header's addresses and offsets
    /// (ports 0); an error about a tracked flow is translated by tc (`icmp.rs`).
    Icmp,
}

impl Skip {
    pub fn stat(self) -> u32 {
        match self {
            Skip::NotIp => STAT_NOT_IP,
            Skip::OtherL4 | Skip::Icmp => STAT_OTHER_L4,
            Skip::Fragment => STAT_FRAGMENT,
            Skip::Malformed => STAT_MALFORMED,
        }
    }
}

/// Parses Ethernet, IPv4/IPv6 (with options and extension headers) and the TCP/UDP ports.
/// Writes the result to `out` (the per-CPU slot), field by field, and reads addresses as
/// words straight from the packet: inlined into the hooks, it adds almost nothing to their
/// stack frames (which share 512 bytes with the new-flow call chain).
#[inline(always)]
pub fn parse(b: &Bounds, out: &mut Flow) -> Result<(), Skip> {
    let eth: *const EthHdr = b.ptr_at(0).ok_or(Skip::Malformed)?;
    // SAFETY: `ptr_at` checked that the header lies inside the packet.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    match ether_type {
        ETH_P_IP => parse_ipv4(b, ETH_LEN, out),
        ETH_P_IPV6 => parse_ipv6(b, ETH_LEN, out),
        _ => Err(Skip::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4(b: &Bounds, l3_off: usize, out: &mut Flow) -> Result<(), Skip> {
    let ip: *const Ipv4Hdr = b.ptr_at(l3_off).ok_or(Skip::Malformed)?;
    // SAFETY: bounds checked above; every field is a byte array (alignment 1).
    let (vihl, tot_len, frags_ne, proto, saddr, daddr) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).tot_len),
            u16::from_ne_bytes((*ip).frags),
            (*ip).proto,
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
        )
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    // An SCTP packet declared too short for a chunk is malformed (whether a fragment or not:
    // SCTP in fragments is never translated). Folded into this test, it adds no stack.
    let l4_min = if proto == PROTO_SCTP { SCTP_MIN_LEN } else { 0 };
    if vihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() || (tot_len as usize) < ihl + l4_min {
        return Err(Skip::Malformed);
    }
    let l4_off = l3_off + ihl;
    // Most packets are no fragment: one test of the field as it lies in memory, and what a
    // fragment is goes straight to `out` (nothing held in registers across the parsing).
    // Only the first fragment carries the transport header; "more fragments" marks it.
    let mut later = false;
    if frags_ne & (IPV4_MORE_FRAGMENTS | IPV4_OFFSET).to_be() == 0 {
        out.frag = FRAG_NONE;
    } else {
        later = frags_ne & IPV4_OFFSET.to_be() != 0;
        out.frag = if later { FRAG_LATER } else { FRAG_FIRST };
        // SAFETY: bounds checked above.
        out.frag_id = u16::from_ne_bytes(unsafe { (*ip).id }) as u32;
        out.frag_proto = proto;
    }
    let ports = if later {
        // Only its header is read and rewritten, so it must be whole: the kernel drops one
        // whose options the frame cuts.
        if b.ptr_at::<()>(l4_off).is_some() { Err(Skip::Fragment) } else { Err(Skip::Malformed) }
    } else {
        parse_ports(b, l4_off, proto, PROTO_ICMP, out.frag)
    };
    // Field by field: a `Flow` built first would take stack in the hook's frame.
    let fill = |ports: (u16, u16, u8)| {
        (out.sport_be, out.dport_be, out.tcp_flags) = ports;
        out.saddr = addr_from_v4_raw(saddr);
        out.daddr = addr_from_v4_raw(daddr);
        out.set_layout(proto, false, l3_off, l4_off);
    };
    finish(ports, fill)
}

#[inline(always)]
fn parse_ipv6(b: &Bounds, l3_off: usize, out: &mut Flow) -> Result<(), Skip> {
    let ip: *const Ipv6Hdr = b.ptr_at(l3_off).ok_or(Skip::Malformed)?;
    // SAFETY: bounds checked above.
    let (vcf0, next) = unsafe { ((*ip).vcf[0], (*ip).next_hdr) };
    if vcf0 >> 4 != 6 {
        return Err(Skip::Malformed);
    }
    let t = ipv6_transport(b, l3_off + IPV6_LEN, next)?;
    (out.frag, out.frag_id, out.frag_proto) = (t.frag, t.frag_id, t.frag_proto);
    let ports = if t.frag == FRAG_LATER {
        Err(Skip::Fragment)
    } else if t.proto == PROTO_SCTP
        // SAFETY: bounds checked above.
        && l3_off + IPV6_LEN + (u16::from_be_bytes(unsafe { (*ip).payload_len }) as usize)
            < t.off + SCTP_MIN_LEN
    {
        Err(Skip::Malformed)
    } else {
        parse_ports(b, t.off, t.proto, PROTO_ICMPV6, t.frag)
    };
    let fill = |ports: (u16, u16, u8)| {
        (out.sport_be, out.dport_be, out.tcp_flags) = ports;
        // SAFETY: bounds checked above; addresses are bytes 8..40 of the header.
        unsafe { read_addr_pair(ip.cast::<u8>().add(8).cast(), &mut out.saddr, &mut out.daddr) };
        out.set_layout(t.proto, true, l3_off, t.off);
    };
    finish(ports, fill)
}

/// Steps over the extension headers of an IPv6 packet (up to `IPV6_MAX_EXT_HEADERS`) from
/// `off`, where a header of kind `next` starts: the transport protocol and where it starts. A
/// fragment other than the first has no transport header: its protocol and `off` are those
/// its fragment header names, and `frag` says `FRAG_LATER`.
#[inline(always)]
pub fn ipv6_transport(b: &Bounds, mut off: usize, mut next: u8) -> Result<Transport, Skip> {
    let (mut frag, mut frag_id, mut frag_proto) = (FRAG_NONE, 0, 0);
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let ext: *const [u8; 2] = b.ptr_at(off).ok_or(Skip::Malformed)?;
                // SAFETY: bounds checked above.
                let (nh, len) = unsafe { ((*ext)[0], (*ext)[1]) };
                next = nh;
                off += (len as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let ext: *const [u8; 8] = b.ptr_at(off).ok_or(Skip::Malformed)?;
                // SAFETY: bounds checked above: next header, offset and M flag, identification.
                let (nh, field, id) = unsafe {
                    let e = &*ext;
                    (
                        e[0],
                        u16::from_be_bytes([e[2], e[3]]),
                        u32::from_ne_bytes([e[4], e[5], e[6], e[7]]),
                    )
                };
                next = nh;
                off += 8;
                (frag_id, frag_proto) = (id, nh);
                if field >> 3 != 0 {
                    // What follows is the middle of a datagram, not headers.
                    frag = FRAG_LATER;
                    break;
                }
                if field & 1 != 0 {
                    frag = FRAG_FIRST;
                }
            }
            _ => break,
        }
    }
    Ok(Transport { proto: next, off, frag, frag_proto, frag_id })
}

/// Fills the flow with the ports `parse_ports` found; the network header of an ICMP message,
/// a later fragment or another protocol is filled all the same (for icmp.rs, fragment.rs, and
/// the service address check of `device::no_frontend`), in a branch off the path of TCP and
/// UDP.
#[inline(always)]
fn finish(
    ports: Result<(u16, u16, u8), Skip>,
    fill: impl FnOnce((u16, u16, u8)),
) -> Result<(), Skip> {
    match ports {
        Ok(ports) => {
            fill(ports);
            Ok(())
        }
        Err(skip @ (Skip::Icmp | Skip::Fragment | Skip::OtherL4)) => {
            fill((0, 0, 0));
            Err(skip)
        }
        Err(skip) => Err(skip),
    }
}

/// Source and destination port (network byte order) and TCP flags of a complete TCP or UDP
/// header, or of an SCTP packet's common header and first chunk's (the flag it stands for);
/// `Skip::Icmp` for the family's ICMP (`icmp`) within reach. SCTP in IP fragments is not
/// translated (`frag`): its checksum covers the whole datagram, whose length the first
/// fragment does not tell. (SCTP sizes its packets to the path MTU itself; Linux sends them
/// with "don't fragment".) An SCTP packet whose network header declares it shorter than
/// `SCTP_MIN_LEN` is malformed (`parse_ipv4` and `parse_ipv6` tell, where it costs the hooks'
/// frames nothing): its checksum could not be kept right.
#[inline(always)]
fn parse_ports(
    b: &Bounds,
    l4_off: usize,
    proto: u8,
    icmp: u8,
    frag: u8,
) -> Result<(u16, u16, u8), Skip> {
    if l4_off > MAX_L4_OFF {
        return Err(Skip::OtherL4);
    }
    let (ports, flags): (*const [u16; 2], u8) = match proto {
        PROTO_TCP => {
            let tcp = b.ptr_at::<TcpHdr>(l4_off).ok_or(Skip::Malformed)?;
            // SAFETY: the whole TCP header is inside the packet; byte 13 holds the flags.
            let flags = unsafe { *tcp.cast::<u8>().add(13) };
            (tcp.cast(), flags)
        }
        PROTO_UDP => (b.ptr_at::<UdpHdr>(l4_off).ok_or(Skip::Malformed)?.cast(), 0),
        PROTO_SCTP if frag == FRAG_NONE => {
            // The common header (12 bytes) and the first chunk's type: a packet has one.
            let sctp = b.ptr_at::<[u8; 16]>(l4_off).ok_or(Skip::Malformed)?;
            // SAFETY: the 16 bytes are inside the packet.
            (sctp.cast(), sctp_flags(unsafe { (*sctp)[12] }))
        }
        _ if proto == icmp => return Err(Skip::Icmp),
        _ => return Err(Skip::OtherL4),
    };
    // SAFETY: the whole transport header is inside the packet; ports are its first 4 bytes.
    // Unaligned: the header is not 2-byte aligned after an odd-length option area (one load
    // all the same: misaligned accesses are allowed in this build).
    let raw: [u8; 4] = unsafe { core::ptr::read_unaligned(ports.cast()) };
    Ok((u16::from_ne_bytes([raw[0], raw[1]]), u16::from_ne_bytes([raw[2], raw[3]]), flags))
}
