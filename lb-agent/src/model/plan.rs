//! The plan: what the datapath must do for each service port and IP family. Produced by the
//! model, consumed by the dataplane writer and printed by `lbctl plan`.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Serialize, Serializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(lb_common::proto_name(self.number()))
    }
}

impl Protocol {
    /// The IP protocol number (as in `lb_common::PROTO_*`).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
            Protocol::Sctp => lb_common::PROTO_SCTP,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Family {
    IPv4,
    IPv6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() { Family::IPv4 } else { Family::IPv6 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum FrontendKind {
    ClusterIP,
    NodePort,
    ExternalIP,
    LoadBalancer,
}

/// Which traffic a frontend entry serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// From processes of this node (socket hooks).
    Internal,
    /// From outside, arriving on a node device (tc/XDP).
    External,
}

/// Which of the service port's backend sets a frontend balances over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendSet {
    /// internalTrafficPolicy applied (ClusterIP from this node).
    Internal,
    /// All cluster endpoints (this node reaching its NodePorts, ExternalIPs and LB IPs).
    Cluster,
    /// externalTrafficPolicy applied (outside clients).
    External,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub address: IpAddr,
    pub port: u16,
    pub scope: Scope,
    pub backends: BackendSet,
}

/// One endpoint serving a service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// Runs on this node.
    pub local: bool,
    /// Serving but terminating: used only when nothing ready is left (or for existing flows).
    pub terminating: bool,
}

impl Backend {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }
}

impl Serialize for Backend {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.socket_addr())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

/// Everything the datapath needs for one service port in one IP family.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePlan {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub protocol: Protocol,
    pub family: Family,
    pub frontends: Vec<Frontend>,
    /// For ClusterIP from this node (internalTrafficPolicy applied).
    pub internal_backends: Vec<Backend>,
    /// For outside clients (externalTrafficPolicy applied).
    pub external_backends: Vec<Backend>,
    /// Every usable endpoint in the cluster: this node reaching its own NodePorts, ExternalIPs
    /// and LB IPs is cluster traffic, whatever externalTrafficPolicy says.
    pub cluster_backends: Vec<Backend>,
    /// Endpoints still alive (ready, or serving while terminating) that no set selects now
    /// (terminating while ready ones exist, filtered out by topology): their backend entries
    /// stay so that connections already on them can finish.
    pub retained_backends: Vec<Backend>,
    pub internal_traffic_policy: TrafficPolicy,
    pub external_traffic_policy: TrafficPolicy,
    /// Some endpoint (ready, or serving and terminating) exists somewhere: an empty set then
    /// means "not here" (drop) rather than "nowhere" (reject).
    pub has_any_endpoints: bool,
    /// sessionAffinity ClientIP timeout.
    pub affinity_timeout_s: Option<u32>,
    /// loadBalancerSourceRanges (this family), enforced on LoadBalancer frontends from outside.
    pub source_ranges: Vec<IpNet>,
    pub health_check_node_port: Option<u16>,
}

impl ServicePlan {
    pub fn backends(&self, set: BackendSet) -> &[Backend] {
        match set {
            BackendSet::Internal => &self.internal_backends,
            BackendSet::Cluster => &self.cluster_backends,
            BackendSet::External => &self.external_backends,
        }
    }

    /// Identity of this service port and family (stable across changes of everything else).
    pub fn port_key(&self) -> PortKey {
        PortKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            port_name: self.port_name.clone(),
            protocol: self.protocol,
            family: self.family,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub protocol: Protocol,
    pub family: Family,
}

impl std::fmt::Display for PortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}/{:?}", self.protocol, self.family)
    }
}
