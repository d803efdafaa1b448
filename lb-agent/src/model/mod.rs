//! The model: a pure function from cluster state and node settings to the plan of what the
//! datapath must do. No I/O here.
//!
//! `service.rs` validates a Service, `endpoints.rs` decides which endpoints serve which traffic
//! (kube-proxy's rules), `maglev.rs` builds lookup tables, `plan.rs` holds the result types.

pub mod endpoints;
pub mod maglev;
pub mod plan;
pub mod service;

use std::{collections::BTreeSet, net::IpAddr, str::FromStr};

use plan::{
    Backend, BackendSet, Family, Frontend, FrontendKind, Protocol, Scope, ServicePlan,
    TrafficPolicy,
};
use service::{FieldError, Parsed, ParsedService, Skip};

use crate::{
    config::{ModelConfig, NodePortAddresses},
    state::{ClusterState, ObjKey},
};

/// The node label kube-proxy reads its zone from.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Where host processes reach NodePorts besides the node's addresses (`--localhost-nodeports`).
const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// What the model needs to know about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub zone: Option<String>,
    /// Every address of this node (Node object, `--node-ip`, the attached devices'), sorted.
    pub addresses: Vec<IpAddr>,
    /// Its primary address of each family (IPv4 first): the first `--node-ip` of the family,
    /// else the Node's first InternalIP of it, else its first ExternalIP (kubelet's order).
    pub primary: Vec<IpAddr>,
    /// Addresses NodePorts answer on (after `--nodeport-addresses`).
    pub nodeport_addresses: Vec<IpAddr>,
    /// Whether host processes reach NodePorts on 127.0.0.1 too.
    pub localhost_nodeports: bool,
}

impl NodeView {
    /// The address SNATed flows leave with, per family: the primary one (an ExternalIP may be
    /// a cloud's NAT address, which other nodes could not answer).
    pub fn snat_address(&self, v6: bool) -> Option<IpAddr> {
        self.primary.iter().copied().find(|ip| ip.is_ipv6() == v6)
    }
}

/// This node as seen in the state (its Node object, if any) and the flags.
pub fn node_view(state: &ClusterState, cfg: &ModelConfig) -> NodeView {
    let node = state.node(&cfg.node_name);
    let zone = node
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(ZONE_LABEL))
        .filter(|z| !z.is_empty())
        .cloned();
    let listed = node.and_then(|n| n.status.as_ref()).and_then(|s| s.addresses.as_ref());
    let of_type = |kind: &'static str| {
        listed
            .into_iter()
            .flatten()
            .filter(move |a| a.type_ == kind)
            .filter_map(|a| IpAddr::from_str(&a.address).ok())
    };
    // In order of preference.
    let all = || {
        cfg.extra_node_ips.iter().copied().chain(of_type("InternalIP")).chain(of_type("ExternalIP"))
    };
    // The devices' own addresses answer NodePorts too (as kube-proxy answers on every local
    // address), but never become primary: one may be a VIP that moves to another node, and
    // SNATed flows would lose their replies with it.
    let addresses: Vec<IpAddr> = all()
        .chain(state.device_addresses().iter().copied())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let primary: Vec<IpAddr> =
        [false, true].into_iter().filter_map(|v6| all().find(|ip| ip.is_ipv6() == v6)).collect();
    let nodeport_addresses = match &cfg.nodeport_addresses {
        NodePortAddresses::All => addresses.clone(),
        NodePortAddresses::Cidrs(cidrs) => {
            addresses.iter().copied().filter(|ip| cidrs.iter().any(|c| c.contains(ip))).collect()
        }
        NodePortAddresses::Primary => primary.clone(),
    };
    let localhost_nodeports = cfg.localhost_nodeports
        && match &cfg.nodeport_addresses {
            NodePortAddresses::All => true,
            NodePortAddresses::Cidrs(cidrs) => cidrs.iter().any(|c| c.contains(&LOCALHOST)),
            NodePortAddresses::Primary => false,
        };
    NodeView {
        name: cfg.node_name.clone(),
        zone,
        addresses,
        primary,
        nodeport_addresses,
        localhost_nodeports,
    }
}

/// The outcome of planning one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceOutcome {
    /// One plan per port and IP family (empty when the service has no usable port).
    Planned { plans: Vec<ServicePlan>, warnings: Vec<String> },
    /// Left alone on purpose (headless, ExternalName, another proxy's, no cluster IP).
    Skipped(Skip),
    /// The object is invalid; nothing is programmed for it.
    Invalid(FieldError),
    /// No such service (deleted).
    Absent,
}

impl ServiceOutcome {
    pub fn plans(&self) -> &[ServicePlan] {
        match self {
            ServiceOutcome::Planned { plans, .. } => plans,
            _ => &[],
        }
    }
}

/// Plans one service.
pub fn plan_service(
    state: &ClusterState,
    key: &ObjKey,
    node: &NodeView,
    cfg: &ModelConfig,
) -> ServiceOutcome {
    let Some(svc) = state.service(key) else { return ServiceOutcome::Absent };
    let parsed = match service::parse(svc, cfg) {
        Ok(Parsed::Service(p)) => p,
        Ok(Parsed::Skip(skip)) => return ServiceOutcome::Skipped(skip),
        Err(e) => return ServiceOutcome::Invalid(e),
    };
    let warnings = sctp_warnings(&parsed, cfg);
    let mut plans = Vec::new();
    for family in families(&parsed) {
        for port in &parsed.ports {
            plans.push(plan_port(state, &parsed, port, family, node, cfg.external_cluster_ips));
        }
    }
    ServiceOutcome::Planned { plans, warnings }
}

/// What a service's SCTP ports lack on this node: the kernel runs no socket hook for SCTP
/// (`sctp_inet_connect` calls none), so only the device hooks translate it, and pods' own
/// packets reach theirs only with `--pod-devices`.
fn sctp_warnings(svc: &ParsedService, cfg: &ModelConfig) -> Vec<String> {
    if cfg.pod_devices {
        return Vec::new();
    }
    svc.ports
        .iter()
        .filter(|p| p.protocol == Protocol::Sctp)
        .map(|p| {
            format!(
                "port {}:{}/SCTP: this node's pods reach its ClusterIP only with --pod-devices (the \
                 kernel runs no socket hook for SCTP); outside clients reach its NodePort, \
                 ExternalIPs and LoadBalancer IPs",
                p.name, p.port
            )
        })
        .collect()
}

/// Every service in the state, planned, in key order.
pub fn plan_all(state: &ClusterState, cfg: &ModelConfig) -> Vec<(ObjKey, ServiceOutcome)> {
    let node = node_view(state, cfg);
    state.services().map(|(k, _)| (k.clone(), plan_service(state, k, &node, cfg))).collect()
}

fn families(svc: &ParsedService) -> Vec<Family> {
    svc.cluster_ips.iter().map(Family::of).collect()
}

fn plan_port(
    state: &ClusterState,
    svc: &ParsedService,
    port: &service::ParsedPort,
    family: Family,
    node: &NodeView,
    external_cluster_ips: bool,
) -> ServicePlan {
    let in_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> =
            ips.iter().copied().filter(|ip| Family::of(ip) == family).collect();
        v.sort();
        v.dedup();
        v
    };
    let mut frontends = BTreeSet::new();
    for ip in in_family(&svc.cluster_ips) {
        frontends.insert(Frontend {
            kind: FrontendKind::ClusterIP,
            address: ip,
            port: port.port,
            scope: Scope::Internal,
            backends: BackendSet::Internal,
        });
        // From outside (`--external-clusterip`): the same endpoints as from inside, as
        // kube-proxy's ClusterIP rules match whatever the source.
        if external_cluster_ips {
            frontends.insert(Frontend {
                kind: FrontendKind::ClusterIP,
                address: ip,
                port: port.port,
                scope: Scope::External,
                backends: BackendSet::Internal,
            });
        }
    }
    let mut external = |kind: FrontendKind, ip: IpAddr, port: u16| {
        frontends.insert(Frontend {
            kind,
            address: ip,
            port,
            scope: Scope::Internal,
            backends: BackendSet::Cluster,
        });
        frontends.insert(Frontend {
            kind,
            address: ip,
            port,
            scope: Scope::External,
            backends: BackendSet::External,
        });
    };
    if let Some(np) = port.node_port {
        for ip in in_family(&node.nodeport_addresses) {
            external(FrontendKind::NodePort, ip, np);
        }
    }
    for ip in in_family(&svc.external_ips) {
        external(FrontendKind::ExternalIP, ip, port.port);
    }
    for ip in in_family(&svc.lb_ips) {
        external(FrontendKind::LoadBalancer, ip, port.port);
    }
    // For host processes only (the socket hooks translate it in the host's namespace).
    if let Some(np) = port.node_port
        && node.localhost_nodeports
        && family == Family::IPv4
    {
        frontends.insert(Frontend {
            kind: FrontendKind::NodePort,
            address: LOCALHOST,
            port: np,
            scope: Scope::Internal,
            backends: BackendSet::Cluster,
        });
    }

    let eps = endpoints::for_port(state.slices_of(&svc.key), port, family, &node.name);
    let cat = endpoints::categorize(&eps, &node.name, node.zone.as_deref());
    let to_backends = |set: &[endpoints::Endpoint]| -> Vec<Backend> {
        let mut v: Vec<Backend> = set
            .iter()
            .map(|e| Backend { addr: e.addr, port: e.port, local: e.local, terminating: !e.ready })
            .collect();
        v.sort();
        v
    };
    let cluster_backends = to_backends(&cat.cluster);
    let local_backends = to_backends(&cat.local);
    let internal_backends =
        if svc.internal_local { local_backends.clone() } else { cluster_backends.clone() };
    let external_backends =
        if svc.external_local { local_backends } else { cluster_backends.clone() };
    let selected: BTreeSet<(IpAddr, u16)> = internal_backends
        .iter()
        .chain(&external_backends)
        .chain(&cluster_backends)
        .map(|b| (b.addr, b.port))
        .collect();
    let retained_backends = to_backends(
        &eps.iter()
            .filter(|e| (e.ready || e.serving) && !selected.contains(&(e.addr, e.port)))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let policy = |local: bool| if local { TrafficPolicy::Local } else { TrafficPolicy::Cluster };
    ServicePlan {
        namespace: svc.key.namespace.clone(),
        name: svc.key.name.clone(),
        port_name: port.name.clone(),
        protocol: port.protocol,
        family,
        frontends: frontends.into_iter().collect(),
        internal_backends,
        external_backends,
        cluster_backends,
        retained_backends,
        internal_traffic_policy: policy(svc.internal_local),
        external_traffic_policy: policy(svc.external_local),
        has_any_endpoints: cat.has_any,
        affinity_timeout_s: svc.affinity_timeout_s,
        source_ranges: svc
            .source_ranges
            .iter()
            .copied()
            .filter(|n| Family::of(&n.addr()) == family)
            .collect(),
        health_check_node_port: svc.health_check_node_port,
    }
}

#[cfg(test)]
mod tests;
