//! Numbered Services and EndpointSlices for scale: the control-plane bench and tests that need
//! thousands of services.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// Service `i`: ClusterIP 10.96.0.0/11 numbered by `i`, port 80 (`http`).
pub fn service(i: usize) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}")),
            namespace: Some("bench".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Service `i`'s EndpointSlice: one endpoint per entry of `ready` (ready and serving as it
/// says), port 8080, addresses from 10.128.0.0/9, on 50 nodes in turn.
pub fn slice(i: usize, ready: &[bool]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}-abc")),
            namespace: Some("bench".into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                format!("svc-{i}"),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            ..Default::default()
        }]),
        endpoints: ready
            .iter()
            .enumerate()
            .map(|(e, &r)| {
                let n = i * ready.len() + e;
                Endpoint {
                    addresses: vec![format!(
                        "10.{}.{}.{}",
                        128 + n / 65536,
                        (n / 256) % 256,
                        n % 256
                    )],
                    node_name: Some(format!("node-{}", n % 50)),
                    conditions: Some(EndpointConditions {
                        ready: Some(r),
                        serving: Some(r),
                        terminating: Some(false),
                    }),
                    ..Default::default()
                }
            })
            .collect(),
    }
}

/// Service `i` and its slice (endpoints as in [`slice`]) as YAML documents, each ended by `---`.
pub fn yaml(i: usize, ready: &[bool]) -> String {
    let service = serde_yaml_ng::to_string(&service(i)).expect("a Service serializes");
    let slice = serde_yaml_ng::to_string(&slice(i, ready)).expect("a slice serializes");
    format!("{service}---\n{slice}---\n")
}
