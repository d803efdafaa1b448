//! The cluster as the agent knows it: Services, EndpointSlices and Nodes, kept as Kubernetes
//! objects and indexed so that a change finds the services it affects in O(log n).
//!
//! Both sources (the API server and a manifests folder) feed this one store. Every mutation
//! returns what it affects, so the agent re-plans only those services.
//!
//! EndpointSlices are kept in a compact form ([`SliceInfo`]: parsed addresses, conditions,
//! interned node and zone names) and Services without the metadata the model never reads: at
//! 100,000 endpoints the Kubernetes objects themselves would take most of the agent's memory.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Namespace and name of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl std::fmt::Display for ObjKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a change touches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Affected {
    /// Services whose plan may have changed.
    pub services: BTreeSet<ObjKey>,
    /// A Node changed: addresses and zones feed every service's plan.
    pub all: bool,
}

impl Affected {
    pub fn merge(&mut self, other: Affected) {
        self.services.extend(other.services);
        self.all |= other.all;
    }
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.all
    }
}

/// One port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: String,
    pub port: Option<u16>,
}

/// One endpoint of an EndpointSlice, as the model reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The first address (the only one kube-proxy uses), if it parses.
    pub addr: Option<IpAddr>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node: Option<Arc<str>>,
    pub zone_hints: Box<[Arc<str>]>,
    pub node_hints: Box<[Arc<str>]>,
}

/// An EndpointSlice, compact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub service: Option<ObjKey>,
    /// `IPv4`, `IPv6` or `FQDN`.
    pub address_type: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    services: BTreeMap<ObjKey, Service>,
    slices: BTreeMap<ObjKey, SliceInfo>,
    /// Node and zone names, shared by every endpoint that names them.
    names: HashSet<Arc<str>>,
    /// Service -> names of its slices (same namespace).
    slices_by_service: BTreeMap<ObjKey, BTreeSet<String>>,
    nodes: BTreeMap<String, Node>,
    /// The addresses of the devices the agent attaches to, as the kernel has them now (they
    /// come and go: a keepalived VIP, a DHCP renewal): NodePorts answer on them too.
    device_addresses: Vec<IpAddr>,
}

/// An object's key: its namespace ("default" when unset) and name.
pub fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjKey {
    ObjKey::new(
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The service an EndpointSlice belongs to, from its label.
pub fn slice_service(slice: &EndpointSlice) -> Option<ObjKey> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ObjKey::new(key_of(&slice.metadata).namespace, name.clone()))
}

impl ClusterState {
    pub fn service(&self, key: &ObjKey) -> Option<&Service> {
        self.services.get(key)
    }

    pub fn services(&self) -> impl Iterator<Item = (&ObjKey, &Service)> {
        self.services.iter()
    }

    /// The EndpointSlices of a service, in name order (the order kube-proxy merges them in).
    pub fn slices_of<'a>(&'a self, service: &ObjKey) -> impl Iterator<Item = &'a SliceInfo> {
        let names = self.slices_by_service.get(service);
        names.into_iter().flatten().filter_map(move |name| {
            self.slices.get(&ObjKey::new(service.namespace.clone(), name.clone()))
        })
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    pub fn counts(&self) -> (usize, usize, usize) {
        (self.services.len(), self.slices.len(), self.nodes.len())
    }

    pub fn upsert_service(&mut self, mut svc: Service) -> Affected {
        let key = key_of(&svc.metadata);
        // Only name, namespace, labels, spec and the load balancer status are read.
        let meta = &mut svc.metadata;
        meta.annotations = None;
        meta.managed_fields = None;
        meta.owner_references = None;
        meta.finalizers = None;
        if let Some(status) = &mut svc.status {
            status.conditions = None;
        }
        self.services.insert(key.clone(), svc);
        Affected { services: [key].into(), all: false }
    }

    pub fn remove_service(&mut self, key: &ObjKey) -> Affected {
        self.services.remove(key);
        Affected { services: [key.clone()].into(), all: false }
    }

    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(n.clone());
        n
    }

    pub fn upsert_slice(&mut self, slice: EndpointSlice) -> Affected {
        let key = key_of(&slice.metadata);
        let mut affected = self.remove_slice(&key);
        let service = slice_service(&slice);
        if let Some(svc) = &service {
            self.slices_by_service.entry(svc.clone()).or_default().insert(key.name.clone());
            affected.services.insert(svc.clone());
        }
        let ports = slice
            .ports
            .iter()
            .flatten()
            .map(|p| SlicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                port: p.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0),
            })
            .collect();
        let mut endpoints = Vec::with_capacity(slice.endpoints.len());
        for ep in &slice.endpoints {
            let cond = ep.conditions.clone().unwrap_or_default();
            let hints = ep.hints.as_ref();
            let zone_hints: Vec<Arc<str>> = hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| self.intern(&z.name))
                .collect();
            let node_hints: Vec<Arc<str>> = hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| self.intern(&n.name))
                .collect();
            endpoints.push(EndpointInfo {
                addr: ep.addresses.first().and_then(|a| a.parse().ok()),
                ready: cond.ready,
                serving: cond.serving,
                terminating: cond.terminating,
                node: ep.node_name.as_deref().map(|n| self.intern(n)),
                zone_hints: zone_hints.into(),
                node_hints: node_hints.into(),
            });
        }
        self.slices
            .insert(key, SliceInfo { service, address_type: slice.address_type, ports, endpoints });
        affected
    }

    pub fn remove_slice(&mut self, key: &ObjKey) -> Affected {
        let mut affected = Affected::default();
        if let Some(old) = self.slices.remove(key)
            && let Some(svc) = old.service
        {
            if let Some(names) = self.slices_by_service.get_mut(&svc) {
                names.remove(&key.name);
                if names.is_empty() {
                    self.slices_by_service.remove(&svc);
                }
            }
            affected.services.insert(svc);
        }
        affected
    }

    pub fn upsert_node(&mut self, node: Node) -> Affected {
        let name = node.metadata.name.clone().unwrap_or_default();
        self.nodes.insert(name, node);
        Affected { services: BTreeSet::new(), all: true }
    }

    pub fn remove_node(&mut self, name: &str) -> Affected {
        self.nodes.remove(name);
        Affected { services: BTreeSet::new(), all: true }
    }

    pub fn device_addresses(&self) -> &[IpAddr] {
        &self.device_addresses
    }

    /// Records the devices' addresses; every service is affected when they changed.
    pub fn set_device_addresses(&mut self, mut addresses: Vec<IpAddr>) -> Affected {
        addresses.sort();
        addresses.dedup();
        let all = addresses != self.device_addresses;
        self.device_addresses = addresses;
        Affected { services: BTreeSet::new(), all }
    }

    /// Replaces every object of one kind (a re-list from the API server): those absent from
    /// `objects` are removed, so nothing stale survives a 410 Gone or a reconnect.
    pub fn replace_kind(
        &mut self,
        kind: crate::sources::kube::Kind,
        objects: Vec<crate::sources::Object>,
    ) -> Affected {
        use crate::sources::{Object, kube::Kind};
        let mut affected = Affected::default();
        match kind {
            Kind::Service => {
                let keys: Vec<ObjKey> = self.services.keys().cloned().collect();
                for k in keys {
                    affected.merge(self.remove_service(&k));
                }
            }
            Kind::EndpointSlice => {
                let keys: Vec<ObjKey> = self.slices.keys().cloned().collect();
                for k in keys {
                    affected.merge(self.remove_slice(&k));
                }
            }
            Kind::Node => {
                self.nodes.clear();
                affected.all = true;
            }
        }
        for o in objects {
            affected.merge(match o {
                Object::Service(s) => self.upsert_service(s),
                Object::EndpointSlice(s) => self.upsert_slice(s),
                Object::Node(n) => self.upsert_node(n),
            });
        }
        affected
    }

    /// Replaces everything (a full re-list or a re-read of the manifests folder). Services that
    /// vanished are reported too, so their entries get removed.
    pub fn replace_all(
        &mut self,
        services: Vec<Service>,
        slices: Vec<EndpointSlice>,
        nodes: Vec<Node>,
    ) -> Affected {
        let mut affected =
            Affected { services: self.services.keys().cloned().collect(), all: true };
        *self = ClusterState::default();
        for s in services {
            affected.merge(self.upsert_service(s));
        }
        for s in slices {
            affected.merge(self.upsert_slice(s));
        }
        for n in nodes {
            self.upsert_node(n);
        }
        affected
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn slice(ns: &str, name: &str, svc: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), svc.to_string())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ..Default::default()
        }
    }

    #[test]
    fn slices_are_indexed_by_service_and_moves_affect_both_services() {
        let mut st = ClusterState::default();
        let a = st.upsert_slice(slice("ns", "web-1", "web"));
        assert_eq!(a.services, [ObjKey::new("ns", "web")].into());
        st.upsert_slice(slice("ns", "web-2", "web"));
        assert_eq!(st.slices_of(&ObjKey::new("ns", "web")).count(), 2);
        // Relabelled to another service: both services must be re-planned.
        let a = st.upsert_slice(slice("ns", "web-2", "api"));
        assert_eq!(a.services, [ObjKey::new("ns", "api"), ObjKey::new("ns", "web")].into());
        assert_eq!(st.slices_of(&ObjKey::new("ns", "web")).count(), 1);
        let a = st.remove_slice(&ObjKey::new("ns", "web-1"));
        assert_eq!(a.services, [ObjKey::new("ns", "web")].into());
        assert_eq!(st.slices_of(&ObjKey::new("ns", "web")).count(), 0);
        // Same service name in another namespace is another service.
        st.upsert_slice(slice("other", "web-1", "web"));
        assert_eq!(st.slices_of(&ObjKey::new("ns", "web")).count(), 0);
    }

    #[test]
    fn replace_all_reports_vanished_services() {
        let mut st = ClusterState::default();
        st.upsert_service(Service {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some("gone".into()),
                ..Default::default()
            },
            ..Default::default()
        });
        let a = st.replace_all(vec![], vec![slice("ns", "web-1", "web")], vec![]);
        assert!(a.services.contains(&ObjKey::new("ns", "gone")));
        assert!(a.services.contains(&ObjKey::new("ns", "web")));
        assert!(st.service(&ObjKey::new("ns", "gone")).is_none());
    }
}
