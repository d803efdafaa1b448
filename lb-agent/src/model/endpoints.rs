//! Which endpoints serve which traffic: kube-proxy's `CategorizeEndpoints`, rule for rule.
//!
//! - cluster endpoints: ready ones, filtered by topology hints when every ready endpoint has
//!   hints and one matches this node (same-node hints first, then zone hints); when none is
//!   ready anywhere, the serving-and-terminating ones.
//! - local endpoints: ready local ones, else serving-and-terminating local ones.

use std::{collections::BTreeSet, net::IpAddr};

use super::{plan::Family, service::ParsedPort};
use crate::state::SliceInfo;

/// One endpoint of one service port, as the slices describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub local: bool,
    pub zone_hints: BTreeSet<String>,
    pub node_hints: BTreeSet<String>,
}

impl Endpoint {
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// The endpoints of `port` in `family`, merged over the service's slices (given in name order):
/// an address:port listed twice counts once, the local copy winning, else the first.
pub fn for_port<'a>(
    slices: impl Iterator<Item = &'a SliceInfo>,
    port: &ParsedPort,
    family: Family,
    node_name: &str,
) -> Vec<Endpoint> {
    let address_type = match family {
        Family::IPv4 => "IPv4",
        Family::IPv6 => "IPv6",
    };
    let protocol = lb_common::proto_name(port.protocol.number());
    let mut out: Vec<Endpoint> = Vec::new();
    for slice in slices {
        if slice.address_type != address_type {
            continue;
        }
        // The slice port that carries this service port: same name and protocol.
        let target = slice.ports.iter().find(|p| p.name == port.name && p.protocol == protocol);
        let Some(target) = target.and_then(|p| p.port) else {
            continue;
        };
        for ep in &slice.endpoints {
            let Some(addr) = ep.addr else { continue };
            if Family::of(&addr) != family {
                continue;
            }
            let ready = ep.ready.unwrap_or(true);
            let endpoint = Endpoint {
                addr,
                port: target,
                ready,
                serving: ep.serving.unwrap_or(ready),
                terminating: ep.terminating.unwrap_or(false),
                local: ep.node.as_deref() == Some(node_name),
                zone_hints: ep.zone_hints.iter().map(|z| z.to_string()).collect(),
                node_hints: ep.node_hints.iter().map(|n| n.to_string()).collect(),
            };
            match out.iter_mut().find(|e| e.addr == addr && e.port == target) {
                Some(existing) if endpoint.local => *existing = endpoint,
                Some(_) => {}
                None => out.push(endpoint),
            }
        }
    }
    out
}

/// The endpoint sets of one service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    pub cluster: Vec<Endpoint>,
    pub local: Vec<Endpoint>,
    /// Some endpoint is ready, or serving and terminating, somewhere.
    pub has_any: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    None,
    Node,
    Zone,
}

fn topology_mode(endpoints: &[Endpoint], node: &str, zone: Option<&str>) -> Topology {
    let ready = endpoints.iter().filter(|e| e.ready);
    let (mut all_node_hints, mut for_node, mut all_zone_hints, mut for_zone) =
        (true, false, true, false);
    for e in ready {
        if e.node_hints.is_empty() {
            all_node_hints = false;
        } else if e.node_hints.contains(node) {
            for_node = true;
        }
        if e.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if zone.is_some_and(|z| e.zone_hints.contains(z)) {
            for_zone = true;
        }
    }
    if all_node_hints && for_node {
        Topology::Node
    } else if all_zone_hints && for_zone {
        Topology::Zone
    } else {
        Topology::None
    }
}

/// Splits endpoints into cluster and local sets. `node` and `zone` are this node's name and
/// `topology.kubernetes.io/zone` label. The cluster set is always computed: this node reaching
/// its own external frontends is cluster traffic whatever the policies say.
pub fn categorize(endpoints: &[Endpoint], node: &str, zone: Option<&str>) -> Categorized {
    let mode = topology_mode(endpoints, node, zone);
    let in_topology = |e: &Endpoint| match mode {
        Topology::None => true,
        Topology::Node => e.node_hints.contains(node),
        Topology::Zone => zone.is_some_and(|z| e.zone_hints.contains(z)),
    };
    let mut cluster: Vec<Endpoint> =
        endpoints.iter().filter(|e| e.ready && in_topology(e)).cloned().collect();
    if cluster.is_empty() {
        cluster = endpoints.iter().filter(|e| e.serving_terminating()).cloned().collect();
    }
    let has_any = endpoints.iter().any(|e| e.ready || e.serving_terminating());
    let local_ready: Vec<Endpoint> =
        endpoints.iter().filter(|e| e.local && e.ready).cloned().collect();
    let local = if !local_ready.is_empty() {
        local_ready
    } else {
        endpoints.iter().filter(|e| e.local && e.serving_terminating()).cloned().collect()
    };
    Categorized { cluster, local, has_any }
}

#[cfg(test)]
mod tests {
    //! The categorization table, modelled on kube-proxy's TestCategorizeEndpoints.

    use super::*;

    /// `"10.0.0.1 ready local zones=a,b nodes=n1"`: address then flags. `ready` also implies
    /// serving; `serving` alone is serving-but-not-ready; `term` marks terminating.
    fn ep(spec: &str) -> Endpoint {
        let mut parts = spec.split_whitespace();
        let addr: IpAddr = parts.next().unwrap().parse().unwrap();
        let mut e = Endpoint {
            addr,
            port: 80,
            ready: false,
            serving: false,
            terminating: false,
            local: false,
            zone_hints: BTreeSet::new(),
            node_hints: BTreeSet::new(),
        };
        for p in parts {
            match p {
                "ready" => {
                    e.ready = true;
                    e.serving = true;
                }
                "serving" => e.serving = true,
                "term" => e.terminating = true,
                "local" => e.local = true,
                z if z.starts_with("zones=") => {
                    e.zone_hints = z[6..].split(',').map(String::from).collect()
                }
                n if n.starts_with("nodes=") => {
                    e.node_hints = n[6..].split(',').map(String::from).collect()
                }
                other => panic!("unknown flag {other}"),
            }
        }
        e
    }

    fn addrs(v: &[Endpoint]) -> Vec<String> {
        let mut a: Vec<String> = v.iter().map(|e| e.addr.to_string()).collect();
        a.sort();
        a
    }

    struct Case {
        name: &'static str,
        zone: Option<&'static str>,
        endpoints: &'static [&'static str],
        cluster: &'static [&'static str],
        local: &'static [&'static str],
        has_any: bool,
    }

    const NODE: &str = "node-1";

    const CASES: &[Case] = &[
        Case {
            name: "no endpoints",
            zone: Some("a"),
            endpoints: &[],
            cluster: &[],
            local: &[],
            has_any: false,
        },
        Case {
            name: "zone hints: only this zone's endpoints",
            zone: Some("a"),
            endpoints: &[
                "10.0.0.1 ready zones=a",
                "10.0.0.2 ready zones=b",
                "10.0.0.3 ready zones=c",
                "10.0.0.4 ready zones=a",
            ],
            cluster: &["10.0.0.1", "10.0.0.4"],
            local: &[],
            has_any: true,
        },
        Case {
            name: "zone hints with several zones per endpoint",
            zone: Some("b"),
            endpoints: &["10.0.0.1 ready zones=a,b", "10.0.0.2 ready zones=c"],
            cluster: &["10.0.0.1"],
            local: &[],
            has_any: true,
        },
        Case {
            name: "node without zone label ignores hints",
            zone: None,
            endpoints: &["10.0.0.1 ready zones=a", "10.0.0.2 ready zones=b"],
            cluster: &["10.0.0.1", "10.0.0.2"],
            local: &[],
            has_any: true,
        },
        Case {
            name: "no hint for this zone ignores hints",
            zone: Some("z"),
            endpoints: &["10.0.0.1 ready zones=a", "10.0.0.2 ready zones=b"],
            cluster: &["10.0.0.1", "10.0.0.2"],
            local: &[],
            has_any: true,
        },
        Case {
            name: "one ready endpoint without hints ignores hints",
            zone: Some("a"),
            endpoints: &["10.0.0.1 ready zones=a", "10.0.0.2 ready", "10.0.0.3 ready zones=b"],
            cluster: &["10.0.0.1", "10.0.0.2", "10.0.0.3"],
            local: &[],
            has_any: true,
        },
        Case {
            name: "hints of not-ready endpoints do not count",
            zone: Some("a"),
            endpoints: &[
                "10.0.0.1 ready zones=a",
                "10.0.0.2 ready zones=b",
                "10.0.0.3 serving term",
            ],
            cluster: &["10.0.0.1"],
            local: &[],
            has_any: true,
        },
        Case {
            name: "same-node hints win over zone hints",
            zone: Some("a"),
            endpoints: &[
                "10.0.0.1 ready zones=a nodes=node-1",
                "10.0.0.2 ready zones=a nodes=node-2",
            ],
            cluster: &["10.0.0.1"],
            local: &[],
            has_any: true,
        },
        Case {
            name: "same-node hints for another node fall back to zone hints",
            zone: Some("a"),
            endpoints: &[
                "10.0.0.1 ready zones=a nodes=node-2",
                "10.0.0.2 ready zones=b nodes=node-3",
            ],
            cluster: &["10.0.0.1"],
            local: &[],
            has_any: true,
        },
        Case {
            name: "only some endpoints with node hints: zone hints decide",
            zone: Some("b"),
            endpoints: &["10.0.0.1 ready zones=a nodes=node-1", "10.0.0.2 ready zones=b"],
            cluster: &["10.0.0.2"],
            local: &[],
            has_any: true,
        },
        Case {
            name: "not-ready, not-serving endpoints are never used",
            zone: None,
            endpoints: &["10.0.0.1", "10.0.0.2 local", "10.0.0.3 term"],
            cluster: &[],
            local: &[],
            has_any: false,
        },
        Case {
            name: "some ready: terminating ones are left out",
            zone: None,
            endpoints: &[
                "10.0.0.1 ready",
                "10.0.0.2 serving term",
                "10.0.0.3 ready local",
                "10.0.0.4 serving term local",
            ],
            cluster: &["10.0.0.1", "10.0.0.3"],
            local: &["10.0.0.3"],
            has_any: true,
        },
        Case {
            name: "none ready: serving terminating ones are used",
            zone: None,
            endpoints: &[
                "10.0.0.1 serving term",
                "10.0.0.2 term",
                "10.0.0.3 serving term local",
                "10.0.0.4",
            ],
            cluster: &["10.0.0.1", "10.0.0.3"],
            local: &["10.0.0.3"],
            has_any: true,
        },
        Case {
            name: "remote ready, local only terminating: local falls back to it",
            zone: None,
            endpoints: &["10.0.0.1 ready", "10.0.0.2 serving term local"],
            cluster: &["10.0.0.1"],
            local: &["10.0.0.2"],
            has_any: true,
        },
        Case {
            name: "all endpoints remote",
            zone: None,
            endpoints: &["10.0.0.1 ready", "10.0.0.2 ready"],
            cluster: &["10.0.0.1", "10.0.0.2"],
            local: &[],
            has_any: true,
        },
        Case {
            name: "all endpoints remote and terminating",
            zone: None,
            endpoints: &["10.0.0.1 serving term", "10.0.0.2 serving term"],
            cluster: &["10.0.0.1", "10.0.0.2"],
            local: &[],
            has_any: true,
        },
        Case {
            name: "local endpoints are not filtered by topology",
            zone: Some("a"),
            endpoints: &["10.0.0.1 ready zones=a", "10.0.0.2 ready local zones=b"],
            cluster: &["10.0.0.1"],
            local: &["10.0.0.2"],
            has_any: true,
        },
        Case {
            name: "ready but not serving cannot happen; serving but not ready is unused when ready exist",
            zone: None,
            endpoints: &["10.0.0.1 ready", "10.0.0.2 serving"],
            cluster: &["10.0.0.1"],
            local: &[],
            has_any: true,
        },
    ];

    #[test]
    fn categorization_table() {
        let mut failures = Vec::new();
        for c in CASES {
            let eps: Vec<Endpoint> = c.endpoints.iter().map(|s| ep(s)).collect();
            let got = categorize(&eps, NODE, c.zone);
            let want_cluster: Vec<String> = c.cluster.iter().map(|s| s.to_string()).collect();
            let want_local: Vec<String> = c.local.iter().map(|s| s.to_string()).collect();
            if addrs(&got.cluster) != want_cluster {
                failures.push(format!(
                    "{}: cluster {:?}, want {want_cluster:?}",
                    c.name,
                    addrs(&got.cluster)
                ));
            }
            if addrs(&got.local) != want_local {
                failures.push(format!(
                    "{}: local {:?}, want {want_local:?}",
                    c.name,
                    addrs(&got.local)
                ));
            }
            if got.has_any != c.has_any {
                failures.push(format!("{}: has_any {}, want {}", c.name, got.has_any, c.has_any));
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }
}
