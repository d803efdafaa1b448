//! A node namespace for the forwarding decisions programs take in BPF_PROG_TEST_RUN (route
//! and neighbour lookups happen in the namespace of the thread that runs the program):
//! - `n0` (MAC [`N0_MAC`]) holds the node address 192.168.1.11/24; packets "arrive" on it;
//! - the pod network 10.1.1.0/24 is behind router 192.168.1.12 ([`ROUTER_MAC`]), everything
//!   else behind gateway 192.168.1.1 ([`GATEWAY_MAC`]), both neighbours known;
//! - 172.16.0.0/24 is on another device, `d0` (MAC [`D0_MAC`]; 172.16.0.2 known as
//!   [`D0_PEER_MAC`]);
//! - 192.168.1.13 is on `n0` with no neighbour entry;
//! - IPv6 likewise: fd00:1::11/64 on `n0`, pods fd00:10:1::/64 behind router fd00:1::12
//!   ([`ROUTER_MAC`]), default route via fd00:1::1 ([`GATEWAY_MAC`]).

use lb_agent::dataplane::attach::{self, XdpAttachMode, XdpTx};
use lb_common::PROG_XDP_INGRESS;

use crate::{
    kernel::{Datapath, RunOutput},
    netns::NetNs,
};

pub const N0_MAC: &str = "02:00:00:00:00:11";
pub const ROUTER_MAC: &str = "02:00:00:00:00:12";
pub const GATEWAY_MAC: &str = "02:00:00:00:00:01";
pub const D0_MAC: &str = "02:00:00:00:00:21";
pub const D0_PEER_MAC: &str = "02:00:00:00:00:02";

pub struct RoutedNode {
    pub ns: NetNs,
    /// Interface index of `n0`.
    pub n0: u32,
}

impl RoutedNode {
    pub fn new() -> Self {
        let ns = NetNs::new("xn");
        ns.ip(&["link", "add", "n0", "address", N0_MAC, "type", "veth", "peer", "name", "n1"]);
        ns.ip(&["link", "add", "d0", "address", D0_MAC, "type", "veth", "peer", "name", "d1"]);
        ns.ip(&["addr", "add", "192.168.1.11/24", "dev", "n0"]);
        ns.ip(&["addr", "add", "fd00:1::11/64", "dev", "n0", "nodad"]);
        ns.ip(&["addr", "add", "172.16.0.1/24", "dev", "d0"]);
        for dev in ["n0", "n1", "d0", "d1"] {
            ns.ip(&["link", "set", dev, "up"]);
        }
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        for (addr, mac, dev) in [
            ("192.168.1.12", ROUTER_MAC, "n0"),
            ("192.168.1.1", GATEWAY_MAC, "n0"),
            ("172.16.0.2", D0_PEER_MAC, "d0"),
            ("fd00:1::12", ROUTER_MAC, "n0"),
            ("fd00:1::1", GATEWAY_MAC, "n0"),
        ] {
            ns.ip(&["neigh", "replace", addr, "lladdr", mac, "nud", "permanent", "dev", dev]);
        }
        ns.ip(&["route", "add", "10.1.1.0/24", "via", "192.168.1.12", "dev", "n0"]);
        ns.ip(&["route", "add", "default", "via", "192.168.1.1", "dev", "n0"]);
        ns.ip(&["-6", "route", "add", "fd00:10:1::/64", "via", "fd00:1::12", "dev", "n0"]);
        ns.ip(&["-6", "route", "add", "default", "via", "fd00:1::1", "dev", "n0"]);
        let n0 = ns.run(|| lb_agent::dataplane::netdev::ifindex("n0")).expect("n0 exists");
        Self { ns, n0 }
    }
}

impl RoutedNode {
    /// The agent's XDP_TX decision for device `dev` (attached natively) under `setting`,
    /// written into `dp`'s maps; returns it.
    pub fn xdp_tx(&self, dp: &mut Datapath, dev: &str, setting: XdpTx) -> bool {
        self.ns
            .run(|| attach::xdp_tx(&mut dp.ebpf, dev, XdpAttachMode::Native, setting))
            .unwrap_or_else(|e| panic!("XDP_TX decision for {dev}: {e:#}"))
    }

    /// The agent's record of the devices its hooks are on (`LB_SNAT_DEVICES`), written into
    /// `dp`'s maps.
    pub fn snat_devices(&self, dp: &mut Datapath, devices: &[&str]) {
        let devices: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
        self.ns
            .run(|| attach::snat_devices(&mut dp.ebpf, &devices))
            .unwrap_or_else(|e| panic!("SNAT devices {devices:?}: {e:#}"));
    }

    /// Runs `dp`'s tc ingress on `packet` as arriving on `n0` (`gso_size`: see
    /// [`Datapath::run_tc_on`]).
    pub fn run_tc(&self, dp: &mut Datapath, packet: &[u8], gso_size: u32) -> RunOutput {
        self.ns.run(|| dp.run_tc_on(lb_common::PROG_TC_INGRESS, packet, self.n0, gso_size))
    }

    /// Runs `dp`'s XDP program on `packet` as arriving on `n0`.
    pub fn run_xdp(&self, dp: &mut Datapath, packet: &[u8]) -> RunOutput {
        self.ns.run(|| dp.run_xdp_on(PROG_XDP_INGRESS, packet, self.n0))
    }
}

impl Default for RoutedNode {
    fn default() -> Self {
        Self::new()
    }
}

/// "02:00:..." as bytes.
pub fn mac(s: &str) -> Vec<u8> {
    s.split(':').map(|b| u8::from_str_radix(b, 16).expect("hex byte")).collect()
}
