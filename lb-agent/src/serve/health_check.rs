//! healthCheckNodePort servers, answering exactly as kube-proxy does: for a LoadBalancer service
//! with externalTrafficPolicy Local, 200 when this node has local endpoints and 503 when it has
//! none, with a JSON body naming the service and the count, so that load balancers send traffic
//! only to nodes that serve it.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use http::StatusCode;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{reply, serve};

/// What one health check port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// kube-proxy's body, byte for byte (tab-indented JSON).
pub fn body(h: &Health) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {:?},\n\t\t\"name\": {:?}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": true\n}}",
        h.namespace, h.name, h.local_endpoints
    )
}

#[derive(Default)]
pub struct HealthServers {
    running: BTreeMap<u16, (Arc<Mutex<Health>>, JoinHandle<()>)>,
}

impl HealthServers {
    /// Makes the running servers match `desired` (port -> health): new ports start listening,
    /// gone ones stop, the others just update what they report.
    pub async fn update(&mut self, desired: &BTreeMap<u16, Health>) {
        let gone: Vec<u16> =
            self.running.keys().filter(|p| !desired.contains_key(p)).copied().collect();
        for port in gone {
            if let Some((_, task)) = self.running.remove(&port) {
                task.abort();
                info!(port, "healthCheckNodePort closed");
            }
        }
        for (&port, health) in desired {
            if let Some((shared, _)) = self.running.get(&port) {
                *shared.lock().unwrap() = health.clone();
                continue;
            }
            let listener = match tokio::net::TcpListener::bind(SocketAddr::from((
                Ipv4Addr::UNSPECIFIED,
                port,
            )))
            .await
            {
                Ok(l) => l,
                Err(e) => {
                    warn!(port, error = %e, service = %format!("{}/{}", health.namespace, health.name), "cannot open healthCheckNodePort");
                    continue;
                }
            };
            let shared = Arc::new(Mutex::new(health.clone()));
            let state = shared.clone();
            let task = tokio::spawn(serve(listener, move |_req| {
                let h = state.lock().unwrap().clone();
                async move {
                    let status = if h.local_endpoints > 0 {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    reply(status, "application/json", body(&h))
                }
            }));
            info!(port, service = %format!("{}/{}", health.namespace, health.name), "healthCheckNodePort open");
            self.running.insert(port, (shared, task));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_kube_proxys() {
        let h = Health { namespace: "default".into(), name: "web".into(), local_endpoints: 2 };
        assert_eq!(
            body(&h),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value = serde_json::from_str(&body(&h)).unwrap();
        assert_eq!(v["localEndpoints"], 2);
    }
}
