//! The mini-cluster: a faithful Kubernetes data path out of network namespaces.
//!
//! - one L2 segment (a bridge inside its own namespace `lan`), 10.230.0.0/24 and fd00:230::/64;
//! - node `i`: namespace with `eth0` on the segment (10.230.0.(10+i), fd00:230::(10+i)) and a
//!   cgroup v2 directory standing for its root cgroup; IP forwarding on;
//! - pods of node `i`: namespaces joined to the node by a veth, routed like a host-gw CNI
//!   (ptp): pod CIDR 10.231.i.0/24 and fd00:231:i::/64, pod `j` at .(j+2) / ::(j+2), the node
//!   side of every pod veth at .1 / ::1; nodes route the other nodes' pod CIDRs via their
//!   address on the segment;
//! - outside clients: namespaces on the segment (10.230.0.(100+c)) with no route to pods.
//!
//! Everything lives in namespaces and cgroups named after this process and is removed on drop
//! (or by the next run if this one was killed).

use std::net::IpAddr;

use crate::{
    cgroup::Cgroup,
    netns::{NetNs, veth},
};

pub struct Pod {
    pub ns: NetNs,
    pub name: String,
    pub ip4: IpAddr,
    pub ip6: IpAddr,
}

pub struct Node {
    pub ns: NetNs,
    pub name: String,
    pub ip4: IpAddr,
    pub ip6: IpAddr,
    pub cgroup: Cgroup,
    pub pods: Vec<Pod>,
}

pub struct Client {
    pub ns: NetNs,
    pub ip4: IpAddr,
    pub ip6: IpAddr,
}

pub struct Cluster {
    // Dropped last: pods and nodes go first (their veth peers vanish with them).
    pub nodes: Vec<Node>,
    pub clients: Vec<Client>,
    pub lan: NetNs,
}

fn ip(s: String) -> IpAddr {
    s.parse().expect("valid address")
}

impl Cluster {
    pub fn new(nodes: usize, pods_per_node: usize, clients: usize) -> Self {
        let lan = NetNs::new("lan");
        lan.ip(&["link", "add", "br0", "type", "bridge"]);
        lan.ip(&["link", "set", "br0", "up"]);
        let mut out = Cluster { nodes: Vec::new(), clients: Vec::new(), lan };
        for i in 0..nodes {
            out.nodes.push(out.add_node(i, pods_per_node, nodes));
        }
        for c in 0..clients {
            let ns = NetNs::new(&format!("out{c}"));
            let (ip4, ip6) =
                (ip(format!("10.230.0.{}", 100 + c)), ip(format!("fd00:230::{}", 100 + c)));
            veth(
                &ns,
                "eth0",
                &[&format!("{ip4}/24"), &format!("{ip6}/64")],
                &out.lan,
                &format!("c{c}"),
                &[],
            );
            out.lan.ip(&["link", "set", &format!("c{c}"), "master", "br0"]);
            out.clients.push(Client { ns, ip4, ip6 });
        }
        out
    }

    fn add_node(&self, i: usize, pods: usize, nodes: usize) -> Node {
        let name = format!("node-{i}");
        let ns = NetNs::new(&format!("n{i}"));
        let (ip4, ip6) = (ip(format!("10.230.0.{}", 10 + i)), ip(format!("fd00:230::{}", 10 + i)));
        veth(
            &ns,
            "eth0",
            &[&format!("{ip4}/24"), &format!("{ip6}/64")],
            &self.lan,
            &format!("n{i}"),
            &[],
        );
        self.lan.ip(&["link", "set", &format!("n{i}"), "master", "br0"]);
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            ns.sysctl(k, v);
        }
        for k in 0..nodes {
            if k != i {
                ns.ip(&[
                    "route",
                    "add",
                    &format!("10.231.{k}.0/24"),
                    "via",
                    &format!("10.230.0.{}", 10 + k),
                ]);
                ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    &format!("fd00:231:{k}::/64"),
                    "via",
                    &format!("fd00:230::{}", 10 + k),
                ]);
            }
        }
        let mut node_pods = Vec::new();
        for j in 0..pods {
            let pod_ns = NetNs::new(&format!("n{i}p{j}"));
            let (p4, p6) = (format!("10.231.{i}.{}", j + 2), format!("fd00:231:{i}::{}", j + 2));
            let (gw4, gw6) = (format!("10.231.{i}.1"), format!("fd00:231:{i}::1"));
            let host_if = format!("p{j}");
            veth(
                &pod_ns,
                "eth0",
                &[&format!("{p4}/32"), &format!("{p6}/128")],
                &ns,
                &host_if,
                &[&format!("{gw4}/32"), &format!("{gw6}/128")],
            );
            pod_ns.ip(&["route", "add", &gw4, "dev", "eth0"]);
            pod_ns.ip(&["route", "add", "default", "via", &gw4]);
            pod_ns.ip(&["-6", "route", "add", &gw6, "dev", "eth0"]);
            pod_ns.ip(&["-6", "route", "add", "default", "via", &gw6]);
            ns.ip(&["route", "add", &format!("{p4}/32"), "dev", &host_if, "src", &gw4]);
            ns.ip(&["-6", "route", "add", &format!("{p6}/128"), "dev", &host_if, "src", &gw6]);
            node_pods.push(Pod {
                ns: pod_ns,
                name: format!("{name}-pod-{j}"),
                ip4: ip(p4),
                ip6: ip(p6),
            });
        }
        Node { ns, name, ip4, ip6, cgroup: Cgroup::new(&format!("node-{i}")), pods: node_pods }
    }

    /// A Node object for the manifests folder (its InternalIP addresses).
    pub fn node_manifest(&self, i: usize) -> String {
        let n = &self.nodes[i];
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {}, labels: {{topology.kubernetes.io/zone: zone-{}}}}}\nstatus:\n  addresses:\n  - {{type: InternalIP, address: \"{}\"}}\n  - {{type: InternalIP, address: \"{}\"}}\n",
            n.name,
            i % 2,
            n.ip4,
            n.ip6
        )
    }
}
