//! Node-level settings the model needs (from flags), independent of any object.

use std::{net::IpAddr, ops::RangeInclusive};

use ipnet::IpNet;

use crate::model::maglev;

#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// This node's name (`--node-name`): decides which endpoints are local.
    pub node_name: String,
    /// `--nodeport-addresses`: which node addresses answer NodePorts.
    pub nodeport_addresses: NodePortAddresses,
    /// `--localhost-nodeports`: host processes reach NodePorts on 127.0.0.1 too (IPv4, as
    /// kube-proxy's iptables mode by default), unless `nodeport_addresses` leaves loopback out.
    pub localhost_nodeports: bool,
    /// `--node-ip`: addresses of this node in addition to those its Node object lists.
    pub extra_node_ips: Vec<IpAddr>,
    /// The cluster's service-node-port-range, for validating manifests.
    pub node_port_range: RangeInclusive<u16>,
    /// Largest Maglev table per backend set (a prime from `maglev::SIZES`).
    pub maglev_max_size: u32,
    /// `--external-clusterip`: the device hooks translate ClusterIPs too, for clients outside
    /// the cluster that the network routes the service range to (BGP-advertised ClusterIPs).
    pub external_cluster_ips: bool,
    /// `--pod-devices`: pods' packets are translated on their devices (the socket hooks alone
    /// never see SCTP: without these, pods cannot reach an SCTP ClusterIP).
    pub pod_devices: bool,
}

impl ModelConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            nodeport_addresses: NodePortAddresses::All,
            localhost_nodeports: true,
            extra_node_ips: Vec::new(),
            node_port_range: 30000..=32767,
            maglev_max_size: maglev::DEFAULT_MAX_SIZE,
            external_cluster_ips: false,
            pod_devices: false,
        }
    }
}

/// Which of this node's addresses answer NodePorts (`--nodeport-addresses`, as kube-proxy's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every address of the node: its Node object's InternalIPs and ExternalIPs, and
    /// `--node-ip`.
    #[default]
    All,
    /// Those inside any of these CIDRs.
    Cidrs(Vec<IpNet>),
    /// The node's primary address of each family (kube-proxy's `primary`).
    Primary,
}

impl NodePortAddresses {
    /// From the flag's value: comma-separated CIDRs, or `primary` alone.
    pub fn parse(flag: &str) -> Result<Self, String> {
        let values: Vec<&str> = flag.split(',').map(str::trim).filter(|v| !v.is_empty()).collect();
        match values[..] {
            [] => Ok(Self::All),
            ["primary"] => Ok(Self::Primary),
            _ if values.contains(&"primary") => {
                Err("\"primary\" cannot be combined with CIDRs".into())
            }
            _ => values
                .iter()
                .map(|v| v.parse::<IpNet>().map_err(|e| format!("{v:?}: {e} (a CIDR or primary)")))
                .collect::<Result<_, _>>()
                .map(Self::Cidrs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodeport_addresses_flag() {
        let from = |v: &[&str]| NodePortAddresses::parse(&v.join(","));
        assert_eq!(from(&[]), Ok(NodePortAddresses::All));
        assert_eq!(from(&["primary"]), Ok(NodePortAddresses::Primary));
        assert_eq!(
            from(&["10.0.0.0/8", "fd00::/8"]),
            Ok(NodePortAddresses::Cidrs(vec![
                "10.0.0.0/8".parse().unwrap(),
                "fd00::/8".parse().unwrap()
            ]))
        );
        assert_eq!(
            from(&["primary", "10.0.0.0/8"]),
            Err("\"primary\" cannot be combined with CIDRs".into())
        );
        assert!(from(&["10.0.0.0/33"]).unwrap_err().contains("a CIDR or primary"));
        assert!(from(&["eth0"]).is_err());
    }
}
