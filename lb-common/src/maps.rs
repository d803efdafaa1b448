//! Map keys and values.
//!
//! Addresses are 16 bytes in network byte order, IPv4 stored IPv4-mapped (`::ffff:a.b.c.d`), so
//! that one key type and one code path serve both families. Ports are kept in network byte order,
//! exactly as they sit in the packet, so the datapath never swaps bytes.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv6 address, or an IPv4-mapped one, as four 32-bit words in network byte order.
pub type Addr = [u32; 4];

/// The third word of an IPv4-mapped address (bytes `00 00 ff ff`).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The mapped form of an IPv4 address given as its four bytes read straight from a packet.
#[inline(always)]
pub const fn addr_from_v4_raw(raw: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, raw]
}

#[inline(always)]
pub const fn addr_is_v4(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

pub const fn addr_from_ip(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => addr_from_v4_raw(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            [
                u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
                u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
                u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
                u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
            ]
        }
    }
}

/// An address's bit in an address bit set (`MAP_CLUSTER_IPS`, [`crate::ADDR_SET_BITS`]): its
/// words folded to one, read as a number, and its top 12 bits folded onto its low 20.
/// Addresses that differ only in their last 20 bits (one /12 of ClusterIPs, one /108) get
/// distinct bits; a set bit says "maybe", a clear one "no".
#[inline(always)]
pub const fn addr_bit(addr: &Addr) -> u32 {
    // Numeric order, so that an address range's varying bits are the low ones.
    let x = u32::from_be(addr[0] ^ addr[1] ^ addr[2] ^ addr[3]);
    (x ^ (x >> 20)) & (crate::ADDR_SET_BITS - 1)
}

pub const fn addr_to_ip(addr: &Addr) -> IpAddr {
    if addr_is_v4(addr) {
        let b = addr[3].to_ne_bytes();
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        let mut o = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = addr[i].to_ne_bytes();
            o[i * 4] = b[0];
            o[i * 4 + 1] = b[1];
            o[i * 4 + 2] = b[2];
            o[i * 4 + 3] = b[3];
            i += 1;
        }
        IpAddr::V6(Ipv6Addr::from_octets(o))
    }
}

/// A frontend: the address, port and protocol a client sends to, and which traffic it serves.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Network byte order.
    pub port_be: u16,
    /// `PROTO_TCP`, `PROTO_UDP` or `PROTO_SCTP`.
    pub proto: u8,
    /// `SCOPE_EXTERNAL` or `SCOPE_INTERNAL`.
    pub scope: u8,
}

impl ServiceKey {
    pub const fn new(ip: IpAddr, port: u16, proto: u8, scope: u8) -> Self {
        Self { addr: addr_from_ip(ip), port_be: port.to_be(), proto, scope }
    }
    pub const fn ip(&self) -> IpAddr {
        addr_to_ip(&self.addr)
    }
    pub const fn port(&self) -> u16 {
        u16::from_be(self.port_be)
    }
}

/// What a frontend leads to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// The service port's id (per IP family): index of its counters, key of its names and
    /// reverse NAT.
    pub service_id: u32,
    /// The backend set this frontend balances over (key of `LB_TABLES`). Frontends of one
    /// service share a set when their traffic policy gives them the same backends, so an
    /// endpoint change rewrites the set, not every frontend.
    pub table_id: u32,
    /// `SVC_F_*`.
    pub flags: u32,
    /// sessionAffinity ClientIP timeout in seconds (when `SVC_F_AFFINITY`).
    pub affinity_timeout_s: u32,
}

/// A backend set: where its Maglev table lies in `LB_MAGLEV`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TableValue {
    /// First slot of the table in `LB_MAGLEV`.
    pub maglev_offset: u32,
    /// Table size M (a prime); 0 when the set is empty.
    pub maglev_size: u32,
    /// Backends in the set; 0 means "no endpoint" (reject or drop per the frontend's flags).
    pub backend_count: u32,
    pub _pad: u32,
}

/// One backend (endpoint address and target port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendValue {
    pub addr: Addr,
    /// Network byte order.
    pub port_be: u16,
    /// `BE_F_*`.
    pub flags: u8,
    pub _pad: u8,
}

impl BackendValue {
    pub const fn new(ip: IpAddr, port: u16, flags: u8) -> Self {
        Self { addr: addr_from_ip(ip), port_be: port.to_be(), flags, _pad: 0 }
    }
    pub const fn ip(&self) -> IpAddr {
        addr_to_ip(&self.addr)
    }
    pub const fn port(&self) -> u16 {
        u16::from_be(self.port_be)
    }
}

/// Who a sessionAffinity entry is for.
pub const AFFINITY_BY_ADDR: u8 = 0;
/// Socket-level clients are identified by their network namespace cookie (one per pod).
pub const AFFINITY_BY_NETNS: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// Client address, or the netns cookie in the first two words (`AFFINITY_BY_NETNS`).
    pub client: Addr,
    pub service_id: u32,
    pub kind: u8,
    // Padding as aligned fields, not [u8; 3]: a byte array at an odd offset makes the BPF
    // target zero it through a call to a byte-loop memset on every packet.
    pub _pad8: u8,
    pub _pad16: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// bpf_ktime_get_coarse_ns() of the last connection that used it.
    pub last_used_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityMatchKey {
    pub backend_id: u32,
    pub service_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    pub cookie: u64,
    /// The backend the socket was sent to.
    pub addr: Addr,
    pub port_be: u16,
    // Aligned padding fields (see AffinityKey).
    pub _pad16: u16,
    pub _pad32: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatValue {
    /// The frontend the application asked for.
    pub addr: Addr,
    pub port_be: u16,
    pub _pad: u16,
    pub service_id: u32,
}

/// A device-hook flow as a packet carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    // Aligned padding fields (see AffinityKey).
    pub _pad8: u8,
    pub _pad16: u16,
}

/// What to do with packets of a tracked flow: rewrite their tuple to these values.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// bpf_ktime_get_coarse_ns() of the last packet (refreshed at most once a second).
    pub last_seen_ns: u64,
    pub new_saddr: Addr,
    pub new_daddr: Addr,
    pub new_sport_be: u16,
    pub new_dport_be: u16,
    pub backend_id: u32,
    pub service_id: u32,
    /// `CT_F_*`.
    pub flags: u8,
    /// `CT_STATE_*`.
    pub state: u8,
    pub _pad: [u8; 2],
}

impl CtValue {
    /// The key of the opposite direction's entry: this entry's rewritten tuple, reversed.
    #[inline(always)]
    pub fn pair_key(&self, proto: u8) -> CtKey {
        CtKey {
            saddr: self.new_daddr,
            daddr: self.new_saddr,
            sport_be: self.new_dport_be,
            dport_be: self.new_sport_be,
            proto,
            _pad8: 0,
            _pad16: 0,
        }
    }
}

/// The data of an LPM key for loadBalancerSourceRanges: the service id always matches in full
/// (the first 32 bits of the prefix), then the client address bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub service_id: u32,
    pub addr: Addr,
}

/// Prefix length of a source range: 32 bits of service id plus the CIDR's bits (an IPv4 CIDR
/// counts the 96 bits of the IPv4-mapped prefix too).
pub const fn source_range_prefix(cidr_prefix: u8, v4: bool) -> u32 {
    32 + if v4 { 96 } else { 0 } + cidr_prefix as u32
}

/// A service port's name, `namespace/name:port/PROTO/Family`, UTF-8, truncated to fit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName {
    pub len: u32,
    pub bytes: [u8; 124],
}

impl ServiceName {
    pub fn new(name: &str) -> Self {
        let mut bytes = [0u8; 124];
        let mut n = name.len().min(bytes.len());
        while !name.is_char_boundary(n) {
            n -= 1;
        }
        bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
        Self { len: n as u32, bytes }
    }

    pub fn as_str(&self) -> &str {
        let n = (self.len as usize).min(self.bytes.len());
        core::str::from_utf8(&self.bytes[..n]).unwrap_or("?")
    }
}

impl Default for ServiceName {
    fn default() -> Self {
        Self { len: 0, bytes: [0; 124] }
    }
}

/// This node's addresses, used as SNAT source for flows to remote backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// IPv4-mapped; all zero when the node has no IPv4 address.
    pub addr4: Addr,
    /// All zero when the node has no IPv6 address.
    pub addr6: Addr,
}

/// Per-CPU traffic counters of one service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub packets: u64,
    pub bytes: u64,
}

// Layouts are part of the map ABI (see MAP_ABI_VERSION): any change must be deliberate.
const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<ServiceKey>() == 20 && align_of::<ServiceKey>() == 4);
    assert!(size_of::<ServiceValue>() == 16 && align_of::<ServiceValue>() == 4);
    assert!(size_of::<TableValue>() == 16 && align_of::<TableValue>() == 4);
    assert!(size_of::<BackendValue>() == 20 && align_of::<BackendValue>() == 4);
    assert!(size_of::<ServiceStats>() == 16 && align_of::<ServiceStats>() == 8);
    assert!(size_of::<AffinityKey>() == 24 && align_of::<AffinityKey>() == 4);
    assert!(size_of::<AffinityValue>() == 16 && align_of::<AffinityValue>() == 8);
    assert!(size_of::<AffinityMatchKey>() == 8);
    assert!(size_of::<SockRevNatKey>() == 32 && align_of::<SockRevNatKey>() == 8);
    assert!(size_of::<SockRevNatValue>() == 24 && align_of::<SockRevNatValue>() == 4);
    assert!(size_of::<CtKey>() == 40 && align_of::<CtKey>() == 4);
    assert!(size_of::<CtValue>() == 56 && align_of::<CtValue>() == 8);
    assert!(size_of::<NodeConfig>() == 32);
    assert!(size_of::<SourceRangeKey>() == 20);
    assert!(size_of::<ServiceName>() == 128);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is repr(C), made only of integers, with explicit padding fields and no
    // implicit padding (checked by the size assertions above); every bit pattern is valid.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::TableValue {}
    unsafe impl aya::Pod for super::BackendValue {}
    unsafe impl aya::Pod for super::ServiceStats {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::AffinityMatchKey {}
    unsafe impl aya::Pod for super::SockRevNatKey {}
    unsafe impl aya::Pod for super::SockRevNatValue {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::SourceRangeKey {}
    unsafe impl aya::Pod for super::ServiceName {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every address of a /12 (Kubernetes' default service range 10.96.0.0/12) and of an IPv6
    /// /108 gets its own bit: a set of ClusterIPs or LoadBalancer IPs from one range has as
    /// many bits set as addresses, and an address outside it is told apart by the rest.
    #[test]
    fn addresses_of_one_range_get_distinct_bits() {
        fn all_distinct(first: IpAddr, nth: impl Fn(IpAddr, u32) -> IpAddr) {
            let mut seen = [0u64; crate::ADDR_SET_WORDS as usize];
            for i in 0..crate::ADDR_SET_BITS {
                let ip = nth(first, i);
                let bit = addr_bit(&addr_from_ip(ip));
                let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
                assert!(seen[word] & mask == 0, "{ip}: bit {bit} twice");
                seen[word] |= mask;
            }
        }
        all_distinct(Ipv4Addr::new(10, 96, 0, 0).into(), |first, i| match first {
            IpAddr::V4(a) => Ipv4Addr::from(u32::from(a) + i).into(),
            IpAddr::V6(_) => unreachable!(),
        });
        let v6: Ipv6Addr = "fd00:10:96::".parse().unwrap();
        all_distinct(v6.into(), |first, i| match first {
            IpAddr::V6(a) => Ipv6Addr::from(u128::from(a) + u128::from(i)).into(),
            IpAddr::V4(_) => unreachable!(),
        });
        // Two ranges' addresses collide only where their folded top bits say.
        let a = addr_bit(&addr_from_ip(Ipv4Addr::new(10, 96, 0, 10).into()));
        let b = addr_bit(&addr_from_ip(Ipv4Addr::new(100, 64, 0, 10).into()));
        assert_ne!(a, b);
    }

    #[test]
    fn v4_addresses_are_mapped_and_round_trip() {
        let ip: IpAddr = Ipv4Addr::new(10, 96, 0, 10).into();
        let a = addr_from_ip(ip);
        assert!(addr_is_v4(&a));
        let bytes: [u8; 4] = a[2].to_ne_bytes();
        assert_eq!(bytes, [0, 0, 0xff, 0xff]);
        assert_eq!(a[3].to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(addr_to_ip(&a), ip);
    }

    #[test]
    fn v6_addresses_round_trip_and_are_not_v4() {
        let ip: IpAddr = "fd00:10:96::a".parse::<Ipv6Addr>().unwrap().into();
        let a = addr_from_ip(ip);
        assert!(!addr_is_v4(&a));
        assert_eq!(addr_to_ip(&a), ip);
    }

    #[test]
    fn ports_are_network_order() {
        let k = ServiceKey::new(Ipv4Addr::LOCALHOST.into(), 8080, crate::PROTO_TCP, 0);
        assert_eq!(k.port_be.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(k.port(), 8080);
    }
}
