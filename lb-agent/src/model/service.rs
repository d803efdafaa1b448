//! A Service object, validated and reduced to what the datapath needs.
//!
//! Errors name the field (`spec.ports[0].nodePort`) so that a bad manifest points at its line;
//! the API server validates objects too, so from a cluster these are rare.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;

use super::plan::Protocol;
use crate::{config::ModelConfig, state::ObjKey};

/// Services labelled with this belong to another proxy (kube-proxy honours it too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// kube-proxy's default sessionAffinity ClientIP timeout.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10800;
const MAX_AFFINITY_TIMEOUT_S: i32 = 86400;

/// What is wrong with an object, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, as written in the manifest (`spec.ports[0].nodePort`).
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.path, self.message)
    }
}

impl std::error::Error for FieldError {}

/// Services this proxy leaves alone, as kube-proxy does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    ExternalName,
    /// clusterIP: None.
    Headless,
    /// No cluster IP allocated yet.
    NoClusterIp,
    /// Labelled for another proxy.
    OtherProxy(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedService {
    pub key: ObjKey,
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    /// status.loadBalancer.ingress IPs (not those in ipMode Proxy).
    pub lb_ips: Vec<IpAddr>,
    pub ports: Vec<ParsedPort>,
    /// NodePort or LoadBalancer type, or external IPs: externalTrafficPolicy applies.
    pub externally_accessible: bool,
    pub node_ports_enabled: bool,
    pub internal_local: bool,
    pub external_local: bool,
    pub affinity_timeout_s: Option<u32>,
    pub source_ranges: Vec<IpNet>,
    pub health_check_node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Service(Box<ParsedService>),
    Skip(Skip),
}

fn parse_ip(path: &str, s: &str) -> Result<IpAddr, FieldError> {
    IpAddr::from_str(s.trim())
        .map_err(|_| FieldError::new(path, format!("{s:?} is not an IP address")))
}

fn port_u16(path: &str, p: i32) -> Result<u16, FieldError> {
    u16::try_from(p)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| FieldError::new(path, format!("{p} is outside 1-65535")))
}

pub fn parse(svc: &Service, cfg: &ModelConfig) -> Result<Parsed, FieldError> {
    let meta = &svc.metadata;
    let key = ObjKey::new(
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().ok_or_else(|| FieldError::new("metadata.name", "is missing"))?,
    );
    if let Some(owner) = meta.labels.as_ref().and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL)) {
        return Ok(Parsed::Skip(Skip::OtherProxy(owner.clone())));
    }
    let spec = svc.spec.clone().unwrap_or_default();
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    let (node_ports_enabled, is_lb) = match svc_type {
        "ClusterIP" => (false, false),
        "NodePort" => (true, false),
        "LoadBalancer" => (true, true),
        "ExternalName" => return Ok(Parsed::Skip(Skip::ExternalName)),
        other => {
            return Err(FieldError::new(
                "spec.type",
                format!("{other:?} is not ClusterIP, NodePort, LoadBalancer or ExternalName"),
            ));
        }
    };
    if spec.cluster_ip.as_deref() == Some("None") {
        return Ok(Parsed::Skip(Skip::Headless));
    }
    let cluster_ips: Vec<IpAddr> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| parse_ip(&format!("spec.clusterIPs[{i}]"), ip))
            .collect::<Result<_, _>>()?,
        _ => match spec.cluster_ip.as_deref() {
            Some(ip) if !ip.is_empty() => vec![parse_ip("spec.clusterIP", ip)?],
            _ => return Ok(Parsed::Skip(Skip::NoClusterIp)),
        },
    };
    if cluster_ips.len() > 2
        || (cluster_ips.len() == 2 && cluster_ips[0].is_ipv4() == cluster_ips[1].is_ipv4())
    {
        return Err(FieldError::new("spec.clusterIPs", "must hold at most one IP per family"));
    }

    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let path = format!("spec.ports[{i}]");
        let name = p.name.clone().unwrap_or_default();
        let port = port_u16(&format!("{path}.port"), p.port)?;
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            other => {
                return Err(FieldError::new(
                    format!("{path}.protocol"),
                    format!("{other:?} is not TCP, UDP or SCTP"),
                ));
            }
        };
        let node_port = match p.node_port {
            Some(np) if np != 0 && node_ports_enabled => {
                let range = &cfg.node_port_range;
                match u16::try_from(np).ok().filter(|p| range.contains(p)) {
                    Some(np) => Some(np),
                    None => {
                        return Err(FieldError::new(
                            format!("{path}.nodePort"),
                            format!("{np} is outside {}-{}", range.start(), range.end()),
                        ));
                    }
                }
            }
            _ => None,
        };
        if ports.iter().any(|q: &ParsedPort| q.name == name) {
            return Err(FieldError::new(
                format!("{path}.name"),
                format!("{name:?} is used by two ports"),
            ));
        }
        // The API server refuses these too: which of two ports would own the address?
        let proto_name = p.protocol.as_deref().unwrap_or("TCP");
        if ports.iter().any(|q| q.port == port && q.protocol == protocol) {
            return Err(FieldError::new(
                format!("{path}.port"),
                format!("{port}/{proto_name} is used by two ports"),
            ));
        }
        if node_port.is_some()
            && ports.iter().any(|q| q.node_port == node_port && q.protocol == protocol)
        {
            return Err(FieldError::new(
                format!("{path}.nodePort"),
                format!("{}/{proto_name} is used by two ports", node_port.unwrap_or_default()),
            ));
        }
        ports.push(ParsedPort { name, protocol, port, node_port });
    }

    let external_ips: Vec<IpAddr> = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, ip)| parse_ip(&format!("spec.externalIPs[{i}]"), ip))
        .collect::<Result<_, _>>()?;
    let mut lb_ips = Vec::new();
    if is_lb {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            // ipMode Proxy: the load balancer terminates traffic itself; the VIP is not ours.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(ip) = &ing.ip {
                lb_ips.push(parse_ip(&format!("status.loadBalancer.ingress[{i}].ip"), ip)?);
            }
        }
    }
    let externally_accessible = node_ports_enabled || !external_ips.is_empty();
    let external_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => externally_accessible,
        Some(other) => {
            return Err(FieldError::new(
                "spec.externalTrafficPolicy",
                format!("{other:?} is not Cluster or Local"),
            ));
        }
    };
    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(FieldError::new(
                "spec.internalTrafficPolicy",
                format!("{other:?} is not Cluster or Local"),
            ));
        }
    };
    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => Some(t as u32),
                Some(t) => {
                    return Err(FieldError::new(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is outside 1-{MAX_AFFINITY_TIMEOUT_S}"),
                    ));
                }
            }
        }
        Some(other) => {
            return Err(FieldError::new(
                "spec.sessionAffinity",
                format!("{other:?} is not None or ClientIP"),
            ));
        }
    };
    let source_ranges: Vec<IpNet> = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            IpNet::from_str(r.trim()).map(|n| n.trunc()).map_err(|_| {
                FieldError::new(
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("{r:?} is not a CIDR"),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let health_check_node_port = match spec.health_check_node_port {
        Some(p) if is_lb && external_local && p != 0 => {
            Some(port_u16("spec.healthCheckNodePort", p)?)
        }
        _ => None,
    };
    Ok(Parsed::Service(Box::new(ParsedService {
        key,
        cluster_ips,
        external_ips,
        lb_ips,
        ports,
        externally_accessible,
        node_ports_enabled,
        internal_local,
        external_local,
        affinity_timeout_s,
        source_ranges,
        health_check_node_port,
    })))
}
