//! Where objects come from. Both sources produce the same [`Event`]s, which the agent applies to
//! the one [`crate::state::ClusterState`].

pub mod api_metrics;
pub mod kube;
pub mod manifests;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::state::{Affected, ClusterState, ObjKey};

/// An object of a kind the agent watches.
// Objects are large whatever the variant; boxing would add an allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
}

/// Which object, without its content.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectRef {
    Service(ObjKey),
    EndpointSlice(ObjKey),
    Node(String),
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObjectRef::Service(k) => write!(f, "Service {k}"),
            ObjectRef::EndpointSlice(k) => write!(f, "EndpointSlice {k}"),
            ObjectRef::Node(n) => write!(f, "Node {n}"),
        }
    }
}

impl Object {
    pub fn reference(&self) -> ObjectRef {
        let key = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            ObjKey::new(
                m.namespace.clone().unwrap_or_else(|| "default".into()),
                m.name.clone().unwrap_or_default(),
            )
        };
        match self {
            Object::Service(s) => ObjectRef::Service(key(&s.metadata)),
            Object::EndpointSlice(s) => ObjectRef::EndpointSlice(key(&s.metadata)),
            Object::Node(n) => ObjectRef::Node(n.metadata.name.clone().unwrap_or_default()),
        }
    }
}

/// A change reported by a source.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Apply(Object),
    Delete(ObjectRef),
}

impl ClusterState {
    pub fn apply_event(&mut self, event: Event) -> Affected {
        match event {
            Event::Apply(Object::Service(s)) => self.upsert_service(s),
            Event::Apply(Object::EndpointSlice(s)) => self.upsert_slice(s),
            Event::Apply(Object::Node(n)) => self.upsert_node(n),
            Event::Delete(ObjectRef::Service(k)) => self.remove_service(&k),
            Event::Delete(ObjectRef::EndpointSlice(k)) => self.remove_slice(&k),
            Event::Delete(ObjectRef::Node(n)) => self.remove_node(&n),
        }
    }
}
