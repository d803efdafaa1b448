//! Node-level settings the model needs (from flags), independent of any object.

use std::{net::IpAddr, ops::RangeInclusive};

use ipnet::IpNet;

use crate::model::maglev;

#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// This node's name (`--node-name`): decides which endpoints are local.
    pub node_name: String,
    /// `--nodeport-addresses`: only node addresses inside these CIDRs answer NodePorts (empty:
    /// every address of the node).
    pub nodeport_cidrs: Vec<IpNet>,
    /// `--node-ip`: addresses of this node in addition to those its Node object lists.
    pub extra_node_ips: Vec<IpAddr>,
    /// The cluster's service-node-port-range, for validating manifests.
    pub node_port_range: RangeInclusive<u16>,
    /// Largest Maglev table per backend set (a prime from `maglev::SIZES`).
    pub maglev_max_size: u32,
}

impl ModelConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            nodeport_cidrs: Vec::new(),
            extra_node_ips: Vec::new(),
            node_port_range: 30000..=32767,
            maglev_max_size: maglev::DEFAULT_MAX_SIZE,
        }
    }
}
