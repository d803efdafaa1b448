//! Kubernetes manifests for the mini-cluster: Services and EndpointSlices written from the pods
//! the harness created.

use std::net::IpAddr;

/// One endpoint: address, node, and its conditions.
#[derive(Clone, Debug)]
pub struct Ep {
    pub addr: IpAddr,
    pub node: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Ep {
    pub fn ready(addr: IpAddr, node: &str) -> Self {
        Self { addr, node: node.into(), ready: true, serving: true, terminating: false }
    }
    pub fn terminating(addr: IpAddr, node: &str) -> Self {
        Self { addr, node: node.into(), ready: false, serving: true, terminating: true }
    }
}

/// A Service with one port (`name`), its ClusterIP(s) and extra `spec` lines.
pub struct Svc<'a> {
    pub name: &'a str,
    pub cluster_ips: &'a [&'a str],
    pub port: u16,
    pub protocol: &'a str,
    pub target_port: u16,
    pub node_port: Option<u16>,
    /// Extra YAML under `spec:` (indented two spaces), e.g. `  externalTrafficPolicy: Local`.
    pub spec: &'a str,
    /// Extra YAML at top level, e.g. a `status:` block.
    pub extra: &'a str,
}

impl Svc<'static> {
    /// The tests' usual service: web, ClusterIP 10.96.0.10:80 and NodePort 30080 -> pods' 8080/TCP.
    pub const WEB: Svc<'static> = Svc {
        name: "web",
        cluster_ips: &["10.96.0.10"],
        port: 80,
        protocol: "TCP",
        target_port: 8080,
        node_port: Some(30080),
        spec: "",
        extra: "",
    };

    /// The IPv6 web service: web6, ClusterIP fd00:96::80:80 and NodePort 30086 -> pods' 8086/TCP
    /// (their IPv6 listener).
    pub const WEB6: Svc<'static> = Svc {
        name: "web6",
        cluster_ips: &["fd00:96::80"],
        port: 80,
        protocol: "TCP",
        target_port: 8086,
        node_port: Some(30086),
        spec: "",
        extra: "",
    };

    /// The tests' UDP service: dns, ClusterIP 10.96.0.53:53 and NodePort 30053 -> pods' 5353.
    pub const DNS: Svc<'static> = Svc {
        name: "dns",
        cluster_ips: &["10.96.0.53"],
        port: 53,
        protocol: "UDP",
        target_port: 5353,
        node_port: Some(30053),
        spec: "",
        extra: "",
    };
}

impl Svc<'_> {
    pub fn yaml(&self) -> String {
        let ips: Vec<String> = self.cluster_ips.iter().map(|i| format!("\"{i}\"")).collect();
        let typ = if self.node_port.is_some() && !self.spec.contains("type:") {
            "  type: NodePort\n"
        } else {
            ""
        };
        let np = self.node_port.map(|p| format!(", nodePort: {p}")).unwrap_or_default();
        let families: Vec<&str> = self
            .cluster_ips
            .iter()
            .map(|i| if i.contains(':') { "IPv6" } else { "IPv4" })
            .collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: default}}\nspec:\n{typ}  clusterIP: \"{}\"\n  clusterIPs: [{}]\n  ipFamilies: [{}]\n  ports:\n  - {{name: p, port: {}, protocol: {}, targetPort: {}{np}}}\n{}{}",
            self.name,
            self.cluster_ips[0],
            ips.join(", "),
            families.join(", "),
            self.port,
            self.protocol,
            self.target_port,
            self.spec,
            self.extra
        )
    }

    /// EndpointSlices (one per family) for `eps`.
    pub fn slices(&self, eps: &[Ep]) -> String {
        let mut out = Vec::new();
        for (family, v6) in [("IPv4", false), ("IPv6", true)] {
            let mine: Vec<&Ep> = eps.iter().filter(|e| e.addr.is_ipv6() == v6).collect();
            if mine.is_empty() && !self.cluster_ips.iter().any(|i| i.contains(':') == v6) {
                continue;
            }
            let mut y = format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {}-{}, namespace: default, labels: {{kubernetes.io/service-name: {}}}}}\naddressType: {family}\nports: [{{name: p, port: {}, protocol: {}}}]\nendpoints:\n",
                self.name,
                family.to_lowercase(),
                self.name,
                self.target_port,
                self.protocol
            );
            if mine.is_empty() {
                y = y.replace("endpoints:\n", "endpoints: []\n");
            }
            for e in mine {
                y += &format!(
                    "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions: {{ready: {}, serving: {}, terminating: {}}}\n",
                    e.addr, e.node, e.ready, e.serving, e.terminating
                );
            }
            out.push(y);
        }
        out.join("---\n")
    }

    /// The Service and its slices as one file.
    pub fn file(&self, eps: &[Ep]) -> String {
        let slices = self.slices(eps);
        if slices.is_empty() { self.yaml() } else { format!("{}---\n{}", self.yaml(), slices) }
    }
}

/// The metric names each panel of `deploy/grafana-dashboard.json` queries, panel by panel
/// (identifiers of the agent's families: `lb_`, kube-proxy's, client-go's and `process_`).
pub fn dashboard_metrics() -> Vec<(String, Vec<String>)> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let prefixes = ["lb_", "kubeproxy_", "rest_client_", "process_"];
    let mut panels = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        let mut used = Vec::new();
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            used.extend(
                expr.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .filter(|w| prefixes.iter().any(|p| w.starts_with(p)))
                    .map(str::to_owned),
            );
        }
        panels.push((panel["title"].as_str().unwrap_or("").to_owned(), used));
    }
    panels
}
