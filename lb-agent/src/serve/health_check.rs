//! healthCheckNodePort servers, answering exactly as kube-proxy does: for a LoadBalancer service
//! with externalTrafficPolicy Local, 200 when this node has local endpoints and the agent is
//! healthy (`proxy_health.rs`, the node's eligibility aside), else 503, with a JSON body naming
//! the service, the count and the agent's health, so that load balancers send traffic only to
//! nodes that serve it.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Instant,
};

use http::StatusCode;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{endpoints::Status, listen, reply, serve};

/// What one health check port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// kube-proxy's answer, byte for byte (tab-indented JSON).
pub fn answer(h: &Health, proxy_healthy: bool) -> (StatusCode, String) {
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {:?},\n\t\t\"name\": {:?}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        h.namespace, h.name, h.local_endpoints
    );
    let serving = h.local_endpoints > 0 && proxy_healthy;
    (if serving { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body)
}

pub struct HealthServers {
    running: BTreeMap<u16, (Arc<Mutex<Health>>, JoinHandle<()>)>,
    /// The agent's health, which every answer includes.
    status: Arc<Status>,
}

impl HealthServers {
    pub fn new(status: Arc<Status>) -> Self {
        Self { running: BTreeMap::new(), status }
    }

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
            let listener = match listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(port, error = %e, service = %format!("{}/{}", health.namespace, health.name), "cannot open healthCheckNodePort");
                    continue;
                }
            };
            let shared = Arc::new(Mutex::new(health.clone()));
            let state = shared.clone();
            let status = self.status.clone();
            let task = tokio::spawn(serve(listener, move |_req| {
                let h = state.lock().unwrap().clone();
                let (code, body) = answer(&h, status.proxy().healthy(Instant::now()));
                async move { reply(code, "application/json", body) }
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
    fn answers_are_kube_proxys() {
        let h = Health { namespace: "default".into(), name: "web".into(), local_endpoints: 2 };
        let (code, body) = answer(&h, true);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["localEndpoints"], 2);
        // An unhealthy agent does not vouch for its endpoints; none local is 503 anyway.
        let (code, body) = answer(&h, false);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.ends_with("\"serviceProxyHealthy\": false\n}"), "{body}");
        let none = Health { local_endpoints: 0, ..h };
        assert_eq!(answer(&none, true).0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
