//! Crafted packets: valid ones built with etherparse (checksums included), and the malformed
//! or unusual variants the datapath must survive, made by editing those bytes.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::PacketBuilder;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ETH_LEN: usize = 14;
const TTL: u8 = 64;

pub fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.octets(), dst.octets(), TTL)
        .udp(sport, dport);
    write(b, payload)
}

/// A TCP segment; `syn` makes it the first packet of a connection, otherwise it is an ACK.
pub fn tcp4(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.octets(), dst.octets(), TTL)
        .tcp(sport, dport, 1000, 64240);
    if syn { write(b.syn(), payload) } else { write(b.ack(1), payload) }
}

/// SCTP chunk types the tests send.
pub const SCTP_DATA: u8 = 0;
pub const SCTP_INIT: u8 = 1;
pub const SCTP_INIT_ACK: u8 = 2;
pub const SCTP_ABORT: u8 = 6;
pub const SCTP_SHUTDOWN_COMPLETE: u8 = 14;

/// An SCTP packet (common header and one chunk of `chunk_type` with 16 bytes of value), its
/// CRC32c filled in. etherparse builds the frame up to the IP header.
pub fn sctp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, chunk_type: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv4(src.octets(), dst.octets(), TTL);
    sctp_frame(b, sport, dport, chunk_type)
}

pub fn sctp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, chunk_type: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv6(src.octets(), dst.octets(), TTL);
    sctp_frame(b, sport, dport, chunk_type)
}

fn sctp_frame(
    ip: etherparse::PacketBuilderStep<etherparse::IpHeaders>,
    sport: u16,
    dport: u16,
    chunk_type: u8,
) -> Vec<u8> {
    let mut out = Vec::new();
    ip.write(&mut out, etherparse::IpNumber(132), &sctp_segment(sport, dport, chunk_type))
        .expect("valid packet");
    out
}

fn sctp_segment(sport: u16, dport: u16, chunk_type: u8) -> Vec<u8> {
    let mut s = Vec::with_capacity(32);
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    // An INIT's verification tag is 0; others carry the peer's.
    let vtag: u32 = if chunk_type == SCTP_INIT { 0 } else { 0x5eed_0001 };
    s.extend_from_slice(&vtag.to_be_bytes());
    s.extend_from_slice(&[0; 4]);
    s.extend_from_slice(&[chunk_type, 0]);
    s.extend_from_slice(&20u16.to_be_bytes());
    s.extend_from_slice(&[
        0x11, 0x22, 0x33, 0x44, 0, 1, 0, 0, 0, 10, 0, 10, 0x0a, 0x0b, 0x0c, 0x0d,
    ]);
    let crc = sctp_crc(&s);
    s[8..12].copy_from_slice(&crc.to_le_bytes());
    s
}

/// The CRC32c an SCTP packet (common header and chunks) should carry: computed with its
/// checksum field as zeros; the field holds it little-endian.
pub fn sctp_crc(segment: &[u8]) -> u32 {
    let mut seg = segment.to_vec();
    seg[8..12].fill(0);
    lb_common::crc32c::checksum(&seg)
}

/// A TCP segment with RST (and ACK 1), or with FIN (and ACK 1): a connection ending.
pub fn tcp4_end(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, rst: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.octets(), dst.octets(), TTL)
        .tcp(sport, dport, 1000, 64240)
        .ack(1);
    if rst { write(b.rst(), b"") } else { write(b.fin(), b"") }
}

pub fn udp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(src.octets(), dst.octets(), TTL)
        .udp(sport, dport);
    write(b, payload)
}

pub fn tcp6(
    src: Ipv6Addr,
    sport: u16,
    dst: Ipv6Addr,
    dport: u16,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(src.octets(), dst.octets(), TTL)
        .tcp(sport, dport, 1000, 64240);
    if syn { write(b.syn(), payload) } else { write(b.ack(1), payload) }
}

pub fn icmp4_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.octets(), dst.octets(), TTL)
        .icmpv4_echo_request(1, 1);
    write(b, b"ping")
}

pub fn icmp6_echo(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(src.octets(), dst.octets(), TTL)
        .icmpv6_echo_request(1, 1);
    write(b, b"ping")
}

/// An ICMP error from `src` to `dst` about the packet of the frame `about`, quoting its IPv4
/// header and first 8 transport bytes, as routers do.
pub fn icmp4_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: etherparse::Icmpv4Type,
    about: &[u8],
) -> Vec<u8> {
    let ihl = (about[ETH_LEN] & 0x0f) as usize * 4;
    let quoted = &about[ETH_LEN..(ETH_LEN + ihl + 8).min(about.len())];
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.octets(), dst.octets(), TTL)
        .icmpv4(kind);
    write(b, quoted)
}

/// An ICMPv6 error from `src` to `dst` quoting the whole packet of the frame `about`.
pub fn icmp6_error(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    kind: etherparse::Icmpv6Type,
    about: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(src.octets(), dst.octets(), TTL)
        .icmpv6(kind);
    write(b, &about[ETH_LEN..])
}

/// What an ICMP or ICMPv6 error says, read from a frame whose every checksum was checked (the
/// outer IPv4 header, the ICMP message, the quoted IPv4 header).
#[derive(Debug, PartialEq, Eq)]
pub struct IcmpError {
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
    pub icmp_type: u8,
    /// Bytes 4..8 of the ICMP header (the MTU of "fragmentation needed" and "packet too big").
    pub rest: [u8; 4],
    pub quoted_src: std::net::SocketAddr,
    pub quoted_dst: std::net::SocketAddr,
}

pub fn icmp_error(p: &[u8]) -> Result<IcmpError, String> {
    use std::net::{IpAddr, SocketAddr};
    let short = || "short packet".to_string();
    let (src, dst, icmp, end, quoted_v6): (IpAddr, IpAddr, usize, usize, bool);
    let mut pseudo = Vec::new();
    match u16::from_be_bytes([p[12], p[13]]) {
        0x0800 => {
            let ihl = (p[ETH_LEN] & 0x0f) as usize * 4;
            let h = p.get(ETH_LEN..ETH_LEN + ihl).ok_or_else(short)?;
            if ones_complement_sum(h) != 0xffff {
                return Err("bad IPv4 header checksum".into());
            }
            if h[9] != 1 {
                return Err(format!("protocol {} is not ICMP", h[9]));
            }
            src = IpAddr::from(<[u8; 4]>::try_from(&h[12..16]).unwrap());
            dst = IpAddr::from(<[u8; 4]>::try_from(&h[16..20]).unwrap());
            icmp = ETH_LEN + ihl;
            end = ETH_LEN + u16::from_be_bytes([h[2], h[3]]) as usize;
            quoted_v6 = false;
        }
        0x86dd => {
            let h = p.get(ETH_LEN..ETH_LEN + 40).ok_or_else(short)?;
            if h[6] != 58 {
                return Err(format!("next header {} is not ICMPv6", h[6]));
            }
            src = IpAddr::from(<[u8; 16]>::try_from(&h[8..24]).unwrap());
            dst = IpAddr::from(<[u8; 16]>::try_from(&h[24..40]).unwrap());
            icmp = ETH_LEN + 40;
            end = p.len();
            pseudo.extend_from_slice(&h[8..40]);
            pseudo.extend_from_slice(&((end - icmp) as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 58]);
            quoted_v6 = true;
        }
        other => return Err(format!("ethertype {other:#06x}")),
    }
    let msg = p.get(icmp..end).ok_or_else(short)?;
    if ones_complement_sum(&[pseudo, msg.to_vec()].concat()) != 0xffff {
        return Err("bad ICMP checksum".into());
    }
    let q = msg.get(8..).ok_or_else(short)?;
    let (qsrc, qdst, ports): (IpAddr, IpAddr, &[u8]) = if quoted_v6 {
        // Over the quoted packet's extension headers (hop-by-hop, routing, destination
        // options: length in 8-byte units after the first 8; fragment: 8 bytes).
        let (mut next, mut at) = (*q.get(6).ok_or_else(short)?, 40);
        while matches!(next, 0 | 43 | 44 | 60) {
            let ext = q.get(at..at + 2).ok_or_else(short)?;
            let len = if next == 44 { 8 } else { (ext[1] as usize + 1) * 8 };
            (next, at) = (ext[0], at + len);
        }
        (
            IpAddr::from(<[u8; 16]>::try_from(q.get(8..24).ok_or_else(short)?).unwrap()),
            IpAddr::from(<[u8; 16]>::try_from(q.get(24..40).ok_or_else(short)?).unwrap()),
            q.get(at..at + 4).ok_or_else(short)?,
        )
    } else {
        let ihl = (q[0] & 0x0f) as usize * 4;
        if ones_complement_sum(q.get(..ihl).ok_or_else(short)?) != 0xffff {
            return Err("bad quoted IPv4 header checksum".into());
        }
        (
            IpAddr::from(<[u8; 4]>::try_from(&q[12..16]).unwrap()),
            IpAddr::from(<[u8; 4]>::try_from(&q[16..20]).unwrap()),
            q.get(ihl..ihl + 4).ok_or_else(short)?,
        )
    };
    Ok(IcmpError {
        src,
        dst,
        icmp_type: msg[0],
        rest: [msg[4], msg[5], msg[6], msg[7]],
        quoted_src: SocketAddr::new(qsrc, u16::from_be_bytes([ports[0], ports[1]])),
        quoted_dst: SocketAddr::new(qdst, u16::from_be_bytes([ports[2], ports[3]])),
    })
}

/// An ARP request (not IP at all).
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut p = Vec::with_capacity(42);
    p.extend_from_slice(&[0xff; 6]);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&0x0806u16.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&sender.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target.octets());
    p
}

/// `packet` with an 802.1Q tag (VLAN `vid`) inserted after the MAC addresses.
pub fn with_vlan_tag(packet: &[u8], vid: u16) -> Vec<u8> {
    let mut p = packet[..12].to_vec();
    p.extend_from_slice(&0x8100u16.to_be_bytes());
    p.extend_from_slice(&vid.to_be_bytes());
    p.extend_from_slice(&packet[12..]);
    p
}

/// An IPv4 packet with `words` 4-byte words of NOP options (IHL and checksum fixed up).
pub fn with_ipv4_options(packet: &[u8], words: u8) -> Vec<u8> {
    let ihl = (packet[ETH_LEN] & 0x0f) as usize * 4;
    let mut p = packet[..ETH_LEN + ihl].to_vec();
    p.extend(std::iter::repeat_n(1u8, words as usize * 4));
    p.extend_from_slice(&packet[ETH_LEN + ihl..]);
    p[ETH_LEN] += words;
    let tot = u16::from_be_bytes([p[ETH_LEN + 2], p[ETH_LEN + 3]]) + words as u16 * 4;
    p[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&tot.to_be_bytes());
    fix_ipv4_checksum(&mut p);
    p
}

/// An IPv4 packet turned into a fragment at `offset_units` (8-byte units) with the MF flag.
pub fn as_ipv4_fragment(packet: &[u8], offset_units: u16, more_fragments: bool) -> Vec<u8> {
    let mut p = packet.to_vec();
    let frags = (offset_units & 0x1fff) | if more_fragments { 0x2000 } else { 0 };
    p[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&frags.to_be_bytes());
    fix_ipv4_checksum(&mut p);
    p
}

/// Overwrites one byte of the IPv4 header (then fixes its checksum): for bad versions,
/// lengths and so on.
pub fn with_ipv4_byte(packet: &[u8], offset_in_header: usize, value: u8) -> Vec<u8> {
    let mut p = packet.to_vec();
    p[ETH_LEN + offset_in_header] = value;
    fix_ipv4_checksum(&mut p);
    p
}

/// An IPv6 packet with an 8-byte hop-by-hop options header in front of its transport header.
pub fn with_ipv6_hop_by_hop(packet: &[u8]) -> Vec<u8> {
    // Next header, length 0 (8 bytes), PadN option filling the rest.
    insert_ipv6_ext(packet, 0, |next| [next, 0, 1, 4, 0, 0, 0, 0])
}

/// An IPv6 packet with an 8-byte destination options header in front of its transport header.
pub fn with_ipv6_dest_opts(packet: &[u8]) -> Vec<u8> {
    insert_ipv6_ext(packet, 60, |next| [next, 0, 1, 4, 0, 0, 0, 0])
}

/// An IPv6 packet with a fragment header at `offset_units` (8-byte units).
pub fn with_ipv6_fragment(packet: &[u8], offset_units: u16, more_fragments: bool) -> Vec<u8> {
    with_ipv6_fragment_id(packet, offset_units, more_fragments, 7)
}

/// [`with_ipv6_fragment`] with the fragment identification `id`.
pub fn with_ipv6_fragment_id(packet: &[u8], offset: u16, more: bool, id: u32) -> Vec<u8> {
    let [f0, f1] = ((offset << 3) | more as u16).to_be_bytes();
    let [i0, i1, i2, i3] = id.to_be_bytes();
    insert_ipv6_ext(packet, 44, |next| [next, 0, f0, f1, i0, i1, i2, i3])
}

/// An IPv4 packet with the identification `id` (the checksum fixed up).
pub fn with_ipv4_id(packet: &[u8], id: u16) -> Vec<u8> {
    let mut p = packet.to_vec();
    p[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&id.to_be_bytes());
    fix_ipv4_checksum(&mut p);
    p
}

/// Splits a whole IPv4 or IPv6 datagram (an Ethernet frame, IPv6 without extension headers)
/// into fragments of `chunk` bytes of its IP payload (a multiple of 8; the last holds the
/// rest), as a sender's stack does, with identification `id` (16 bits for IPv4).
pub fn fragments(frame: &[u8], chunk: usize, id: u32) -> Vec<Vec<u8>> {
    assert!(chunk.is_multiple_of(8) && chunk > 0);
    let v6 = frame[12..14] == [0x86, 0xdd];
    let header = if v6 { 40 } else { (frame[ETH_LEN] & 0x0f) as usize * 4 };
    let payload = &frame[ETH_LEN + header..];
    let pieces: Vec<&[u8]> = payload.chunks(chunk).collect();
    let last = pieces.len() - 1;
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let (offset, more) = ((i * chunk / 8) as u16, i < last);
            let mut p = frame[..ETH_LEN + header].to_vec();
            if v6 {
                p.extend_from_slice(piece);
                p[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&(piece.len() as u16).to_be_bytes());
                with_ipv6_fragment_id(&p, offset, more, id)
            } else {
                p.extend_from_slice(piece);
                let tot = (header + piece.len()) as u16;
                p[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&tot.to_be_bytes());
                let p = with_ipv4_id(&p, id as u16);
                as_ipv4_fragment(&p, offset, more)
            }
        })
        .collect()
}

/// Puts fragments (in any order) back into one datagram, as the receiver's stack does: every
/// fragment must name the same addresses, protocol and identification, and together they
/// must cover the datagram without gaps.
pub fn reassemble(frames: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    // (offset in bytes, more fragments, identity, header bytes to keep, payload)
    let mut parts = Vec::new();
    for f in frames {
        let v6 = f[12..14] == [0x86, 0xdd];
        if v6 {
            if f[ETH_LEN + 6] != 44 {
                return Err("an IPv6 frame without a fragment header".into());
            }
            let e = &f[ETH_LEN + 40..ETH_LEN + 48];
            let field = u16::from_be_bytes([e[2], e[3]]);
            let mut header = f[..ETH_LEN + 40].to_vec();
            header[ETH_LEN + 6] = e[0];
            let identity = [&f[ETH_LEN + 8..ETH_LEN + 40], &[e[0]][..], &e[4..8]].concat();
            parts.push((
                (field >> 3) as usize * 8,
                field & 1 != 0,
                identity,
                header,
                &f[ETH_LEN + 48..],
            ));
        } else {
            let ihl = (f[ETH_LEN] & 0x0f) as usize * 4;
            if ones_complement_sum(&f[ETH_LEN..ETH_LEN + ihl]) != 0xffff {
                return Err("a fragment with a bad IPv4 header checksum".into());
            }
            let field = u16::from_be_bytes([f[ETH_LEN + 6], f[ETH_LEN + 7]]);
            let identity = [
                &f[ETH_LEN + 12..ETH_LEN + 20],
                &[f[ETH_LEN + 9]][..],
                &f[ETH_LEN + 4..ETH_LEN + 6],
            ]
            .concat();
            let header = f[..ETH_LEN + ihl].to_vec();
            parts.push((
                (field & 0x1fff) as usize * 8,
                field & 0x2000 != 0,
                identity,
                header,
                &f[ETH_LEN + ihl..],
            ));
        }
    }
    parts.sort_by_key(|p| p.0);
    let Some(first) = parts.first() else { return Err("no fragments".into()) };
    if first.0 != 0 {
        return Err("no first fragment".into());
    }
    let mut payload = Vec::new();
    for (i, (offset, more, identity, _, data)) in parts.iter().enumerate() {
        if *identity != first.2 {
            return Err(format!("fragment at {offset} names another datagram"));
        }
        if *offset != payload.len() {
            return Err(format!("a gap or overlap at {offset} (have {})", payload.len()));
        }
        if *more != (i + 1 < parts.len()) {
            return Err(format!("fragment at {offset}: wrong more-fragments flag"));
        }
        payload.extend_from_slice(data);
    }
    let mut p = first.3.clone();
    let v6 = p[12..14] == [0x86, 0xdd];
    if v6 {
        p[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    } else {
        let ihl = (p[ETH_LEN] & 0x0f) as usize * 4;
        p[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&((ihl + payload.len()) as u16).to_be_bytes());
        p[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&[0, 0]);
        fix_ipv4_checksum(&mut p);
    }
    p.extend_from_slice(&payload);
    Ok(p)
}

fn insert_ipv6_ext(packet: &[u8], ext_type: u8, ext: impl FnOnce(u8) -> [u8; 8]) -> Vec<u8> {
    let l4 = ETH_LEN + 40;
    let next = packet[ETH_LEN + 6];
    let mut p = packet[..l4].to_vec();
    p.extend_from_slice(&ext(next));
    p.extend_from_slice(&packet[l4..]);
    p[ETH_LEN + 6] = ext_type;
    let plen = u16::from_be_bytes([p[ETH_LEN + 4], p[ETH_LEN + 5]]) + 8;
    p[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&plen.to_be_bytes());
    p
}

/// Recomputes the IPv4 header checksum of an Ethernet frame carrying IPv4.
pub fn fix_ipv4_checksum(p: &mut [u8]) {
    let ihl = (p[ETH_LEN] & 0x0f) as usize * 4;
    let end = (ETH_LEN + ihl).min(p.len());
    p[ETH_LEN + 10] = 0;
    p[ETH_LEN + 11] = 0;
    let sum = ones_complement_sum(&p[ETH_LEN..end]);
    p[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&(!sum).to_be_bytes());
}

/// The 16-bit one's complement sum of `bytes` (RFC 1071), folded.
pub fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn write<B: Writable>(b: B, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write_vec(&mut out, payload);
    out
}

/// The etherparse builder steps we end on (transport layers).
trait Writable {
    fn size(&self, payload_len: usize) -> usize;
    fn write_vec(self, out: &mut Vec<u8>, payload: &[u8]);
}

macro_rules! writable {
    ($($step:ty),*) => {$(
        impl Writable for etherparse::PacketBuilderStep<$step> {
            fn size(&self, payload_len: usize) -> usize {
                etherparse::PacketBuilderStep::<$step>::size(self, payload_len)
            }
            fn write_vec(self, out: &mut Vec<u8>, payload: &[u8]) {
                self.write(out, payload).expect("valid packet");
            }
        }
    )*};
}
writable!(
    etherparse::UdpHeader,
    etherparse::TcpHeader,
    etherparse::Icmpv4Header,
    etherparse::Icmpv6Header
);

/// What a test needs to know about a packet that came out of a program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub src: std::net::SocketAddr,
    pub dst: std::net::SocketAddr,
    pub proto: u8,
    /// Offset of the transport header.
    pub l4_off: usize,
    /// A (first) fragment: the transport checksum covers bytes this frame does not hold.
    pub fragment: bool,
    /// A fragment after the first: it has no ports (0 in `src` and `dst`).
    pub later_fragment: bool,
}

/// Parses an Ethernet frame with IPv4 (options) or IPv6 (extension headers) and TCP/UDP.
pub fn summarize(p: &[u8]) -> Option<Summary> {
    use std::net::{IpAddr, SocketAddr};
    let ethertype = u16::from_be_bytes([*p.get(12)?, *p.get(13)?]);
    let (src, dst, mut proto, mut off, mut fragment, mut later_fragment);
    match ethertype {
        0x0800 => {
            let ihl = (*p.get(ETH_LEN)? & 0x0f) as usize * 4;
            let h = p.get(ETH_LEN..ETH_LEN + ihl)?;
            src = IpAddr::from(<[u8; 4]>::try_from(&h[12..16]).ok()?);
            dst = IpAddr::from(<[u8; 4]>::try_from(&h[16..20]).ok()?);
            proto = h[9];
            off = ETH_LEN + ihl;
            fragment = u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0;
            later_fragment = u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0;
        }
        0x86dd => {
            let h = p.get(ETH_LEN..ETH_LEN + 40)?;
            src = IpAddr::from(<[u8; 16]>::try_from(&h[8..24]).ok()?);
            dst = IpAddr::from(<[u8; 16]>::try_from(&h[24..40]).ok()?);
            proto = h[6];
            off = ETH_LEN + 40;
            (fragment, later_fragment) = (false, false);
            while matches!(proto, 0 | 43 | 44 | 60) {
                let e = p.get(off..off + 8)?;
                if proto == 44 {
                    fragment = true;
                    later_fragment = u16::from_be_bytes([e[2], e[3]]) >> 3 != 0;
                    off += 8;
                } else {
                    off += (e[1] as usize + 1) * 8;
                }
                proto = e[0];
            }
        }
        _ => return None,
    }
    let l4 = if later_fragment { &[0u8; 4][..] } else { p.get(off..off + 4)? };
    Some(Summary {
        src: SocketAddr::new(src, u16::from_be_bytes([l4[0], l4[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([l4[2], l4[3]])),
        proto,
        l4_off: off,
        fragment,
        later_fragment,
    })
}

/// The transport length a frame's network header declares (IPv4's total length less its
/// header, IPv6's payload length less the extension headers before the transport's), if the
/// frame holds it all.
fn declared_l4_len(p: &[u8], s: &Summary) -> Option<usize> {
    let end = if s.src.is_ipv4() {
        ETH_LEN + u16::from_be_bytes([*p.get(ETH_LEN + 2)?, *p.get(ETH_LEN + 3)?]) as usize
    } else {
        ETH_LEN + 40 + u16::from_be_bytes([*p.get(ETH_LEN + 4)?, *p.get(ETH_LEN + 5)?]) as usize
    };
    (end <= p.len()).then_some(end.checked_sub(s.l4_off)?)
}

/// Checks the IPv4 header checksum and the TCP/UDP checksum (pseudo-header included) or
/// SCTP's CRC32c of a frame, over the length its network header declares (as the receiving
/// kernel does). A UDP/IPv4 checksum of 0 means "none" and passes (SCTP's does not: the
/// tests' packets are summed). Whatever cannot be checked (lengths past the frame) is an error.
pub fn checksums_ok(p: &[u8]) -> Result<(), String> {
    let s = summarize(p).ok_or("not a TCP/UDP packet")?;
    let l4_len = declared_l4_len(p, &s).ok_or("lengths past the frame")?;
    let seg = &p[s.l4_off..s.l4_off + l4_len];
    if s.src.is_ipv4() {
        let ihl = (p[ETH_LEN] & 0x0f) as usize * 4;
        let header = p.get(ETH_LEN..ETH_LEN + ihl).ok_or("IPv4 header cut short")?;
        if ones_complement_sum(header) != 0xffff {
            return Err("bad IPv4 header checksum".into());
        }
    }
    if s.proto == 132 {
        let field = seg.get(8..12).ok_or("SCTP header cut short")?;
        let field = u32::from_le_bytes(field.try_into().expect("4 bytes"));
        let want = sctp_crc(seg);
        return match field == want {
            true => Ok(()),
            false => Err(format!("bad SCTP checksum {field:#010x}, should be {want:#010x}")),
        };
    }
    if s.fragment {
        return Ok(());
    }
    if s.proto == 17 && s.src.is_ipv4() && seg.get(6..8) == Some(&[0, 0]) {
        return Ok(());
    }
    let mut all = pseudo_header(&s, l4_len).ok_or("mixed families")?;
    all.extend_from_slice(seg);
    match ones_complement_sum(&all) {
        0xffff => Ok(()),
        other => Err(format!("bad transport checksum (sum {other:#06x})")),
    }
}

/// Recomputes the TCP/UDP checksum (or SCTP's CRC32c) of a frame (after a test edited the
/// transport header), over the length its network header declares.
pub fn fix_l4_checksum(p: &mut [u8]) {
    let Some(s) = summarize(p) else { return };
    let Some(l4_len) = declared_l4_len(p, &s) else { return };
    let (start, end) = (s.l4_off, s.l4_off + l4_len);
    if s.proto == 132 {
        if l4_len >= 12 {
            let crc = sctp_crc(&p[start..end]);
            p[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
        }
        return;
    }
    let csum_off = start + if s.proto == 6 { 16 } else { 6 };
    if csum_off + 2 > end
        || (s.proto == 17 && s.src.is_ipv4() && p[csum_off..csum_off + 2] == [0, 0])
    {
        return;
    }
    p[csum_off..csum_off + 2].fill(0);
    let Some(mut all) = pseudo_header(&s, l4_len) else { return };
    all.extend_from_slice(&p[start..end]);
    let mut c = !ones_complement_sum(&all);
    if c == 0 && s.proto == 17 {
        c = 0xffff;
    }
    p[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
}

/// The TCP/UDP pseudo-header of a packet whose transport part is `l4_len` bytes; `None` for
/// mixed families.
fn pseudo_header(s: &Summary, l4_len: usize) -> Option<Vec<u8>> {
    let mut all = Vec::with_capacity(40);
    match (s.src.ip(), s.dst.ip()) {
        (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => {
            all.extend_from_slice(&a.octets());
            all.extend_from_slice(&b.octets());
            all.extend_from_slice(&[0, s.proto]);
            all.extend_from_slice(&(l4_len as u16).to_be_bytes());
        }
        (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b)) => {
            all.extend_from_slice(&a.octets());
            all.extend_from_slice(&b.octets());
            all.extend_from_slice(&(l4_len as u32).to_be_bytes());
            all.extend_from_slice(&[0, 0, 0, s.proto]);
        }
        _ => return None,
    }
    Some(all)
}

/// Checks an ICMP/ICMPv6 port-unreachable frame answering `original`.
pub fn assert_port_unreachable(out: &[u8], original: &[u8]) {
    assert_eq!(&out[0..6], &original[6..12], "back to the sender's MAC");
    assert_eq!(&out[6..12], &original[0..6]);
    let orig = summarize(original).unwrap();
    let quote_len = orig.l4_off - 14 + 8;
    if out[12..14] == [0x08, 0x00] {
        assert_eq!(out[14] >> 4, 4);
        assert_eq!(out[14 + 9], 1, "ICMP");
        assert_eq!(&out[14 + 12..14 + 16], &original[14 + 16..14 + 20], "from the frontend");
        assert_eq!(&out[14 + 16..14 + 20], &original[14 + 12..14 + 16], "to the client");
        assert_eq!(ones_complement_sum(&out[14..34]), 0xffff, "IPv4 header checksum");
        assert_eq!(&out[34..36], &[3, 3], "destination unreachable, port unreachable");
        assert_eq!(ones_complement_sum(&out[34..]), 0xffff, "ICMP checksum");
        assert_eq!(&out[42..], &original[14..14 + quote_len], "quotes header + 8 bytes");
    } else {
        assert_eq!(&out[12..14], &[0x86, 0xdd]);
        assert_eq!(out[14 + 6], 58, "ICMPv6");
        assert_eq!(&out[14 + 8..14 + 24], &original[14 + 24..14 + 40], "from the frontend");
        assert_eq!(&out[14 + 24..14 + 40], &original[14 + 8..14 + 24], "to the client");
        assert_eq!(&out[54..56], &[1, 4], "destination unreachable, port unreachable");
        let mut pseudo = out[14 + 8..14 + 40].to_vec();
        pseudo.extend_from_slice(&((out.len() - 54) as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(&out[54..]);
        assert_eq!(ones_complement_sum(&pseudo), 0xffff, "ICMPv6 checksum");
        assert_eq!(&out[62..], &original[14..14 + quote_len]);
    }
}
