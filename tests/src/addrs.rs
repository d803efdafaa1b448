//! The addressing plan of the kernel tests (BPF_PROG_TEST_RUN): clients outside, a node and its
//! pod, another node's pod, a frontend address; and the programs' verdicts. A test that needs
//! another address defines its own (a local constant shadows these).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
pub const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);
pub const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);
/// The node the datapath runs on (its SNAT address).
pub const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 11);
pub const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x11);
pub const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 5);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 7);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x80);
pub const LOCAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 5);
pub const REMOTE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 1, 0, 0, 0, 0, 5);

/// An address of the /12 `prefix` starts whose bit in an address bit set
/// (`lb_common::addr_bit`) is `of`'s: the set says "maybe" for it, and the datapath must look
/// further.
pub fn same_bit_in(of: std::net::IpAddr, prefix: Ipv4Addr) -> Ipv4Addr {
    let bit = lb_common::addr_bit(&lb_common::addr_from_ip(of));
    let first = u32::from(prefix) & !(lb_common::ADDR_SET_BITS - 1);
    (first..first + lb_common::ADDR_SET_BITS)
        .map(Ipv4Addr::from)
        .find(|x| lb_common::addr_bit(&lb_common::addr_from_ip((*x).into())) == bit)
        .expect("a /12 holds every bit")
}

pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;
pub const XDP_PASS: i32 = 2;
pub const XDP_TX: i32 = 3;
pub const XDP_REDIRECT: i32 = 4;

/// A socket address, as the tests compare packets' endpoints.
pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}
