//! Whole-service plans from manifests: the kube-proxy semantics end to end through the model.

use std::path::Path;

use super::{plan::*, service::Skip, *};
use crate::{config::ModelConfig, sources::manifests::parse_str, state::ClusterState};

const NODE: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-1, labels: {topology.kubernetes.io/zone: zone-a}}
status:
  addresses:
  - {type: InternalIP, address: 192.168.1.11}
  - {type: InternalIP, address: "fd00:1::11"}
  - {type: Hostname, address: node-1}
"#;

fn state(yaml: &str) -> ClusterState {
    let parsed = parse_str(&format!("{NODE}\n---\n{yaml}"), Path::new("test.yaml"), &cfg());
    assert!(parsed.errors.is_empty(), "fixture errors: {:?}", parsed.errors);
    let mut st = ClusterState::default();
    for (_, o) in parsed.objects {
        st.apply_event(crate::sources::Event::Apply(o));
    }
    st
}

fn cfg() -> ModelConfig {
    ModelConfig::new("node-1")
}

fn plan(yaml: &str) -> Vec<ServicePlan> {
    plan_with(yaml, &cfg())
}

fn plan_with(yaml: &str, cfg: &ModelConfig) -> Vec<ServicePlan> {
    let st = state(yaml);
    let node = node_view(&st, cfg);
    let key = st.services().next().expect("one service").0.clone();
    match plan_service(&st, &key, &node, cfg) {
        ServiceOutcome::Planned { plans, .. } => plans,
        other => panic!("not planned: {other:?}"),
    }
}

fn outcome(yaml: &str) -> ServiceOutcome {
    outcome_with(yaml, &cfg())
}

fn outcome_with(yaml: &str, cfg: &ModelConfig) -> ServiceOutcome {
    let st = state(yaml);
    let node = node_view(&st, cfg);
    let key = st.services().next().expect("one service").0.clone();
    plan_service(&st, &key, &node, cfg)
}

fn addrs(b: &[Backend]) -> Vec<String> {
    b.iter().map(|b| b.socket_addr().to_string()).collect()
}

fn fronts(p: &ServicePlan) -> Vec<String> {
    p.frontends
        .iter()
        .map(|f| format!("{:?} {}:{} {:?}->{:?}", f.kind, f.address, f.port, f.scope, f.backends))
        .collect()
}

/// A slice with endpoints given as `"ip node ready|terminating|serving-terminating"`.
fn slice(svc: &str, name: &str, family: &str, port_name: &str, port: u16, eps: &[&str]) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: {family}\nports: [{{name: \"{port_name}\", port: {port}, protocol: TCP}}]\nendpoints:\n"
    );
    for e in eps {
        let f: Vec<&str> = e.split_whitespace().collect();
        let (ready, serving, term) = match f[2] {
            "ready" => (true, true, false),
            "terminating" => (false, false, true),
            "serving-terminating" => (false, true, true),
            other => panic!("{other}"),
        };
        y += &format!(
            "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {term}}}\n",
            f[0], f[1]
        );
    }
    y
}

#[test]
fn cluster_ip_service_uses_ready_endpoints_and_retains_terminating_ones() {
    let p = plan(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n{}",
        slice(
            "web",
            "web-1",
            "IPv4",
            "http",
            8080,
            &[
                "10.1.1.5 node-1 ready",
                "10.1.2.5 node-2 ready",
                "10.1.2.6 node-2 serving-terminating",
                "10.1.2.7 node-2 terminating"
            ]
        )
    ));
    assert_eq!(p.len(), 1);
    let p = &p[0];
    assert_eq!((p.protocol, p.family, p.port_name.as_str()), (Protocol::Tcp, Family::IPv4, "http"));
    assert_eq!(fronts(p), ["ClusterIP 10.96.0.10:80 Internal->Internal"]);
    assert_eq!(addrs(&p.internal_backends), ["10.1.1.5:8080", "10.1.2.5:8080"]);
    assert_eq!(p.internal_backends, p.cluster_backends);
    assert!(p.internal_backends[0].local && !p.internal_backends[1].local);
    assert_eq!(
        addrs(&p.retained_backends),
        ["10.1.2.6:8080"],
        "serving+terminating kept for open flows"
    );
    assert!(p.has_any_endpoints);
    assert_eq!(p.affinity_timeout_s, None);
}

#[test]
fn nodeport_with_external_policy_local_sends_outside_traffic_to_local_endpoints_only() {
    let p = plan(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{type: NodePort, clusterIP: 10.96.0.10, externalTrafficPolicy: Local, ports: [{{port: 80, nodePort: 30080}}]}}\n---\n{}",
        slice(
            "web",
            "web-1",
            "IPv4",
            "",
            8080,
            &["10.1.1.5 node-1 ready", "10.1.2.5 node-2 ready"]
        )
    ));
    let p = &p[0];
    assert_eq!(
        fronts(p),
        [
            "ClusterIP 10.96.0.10:80 Internal->Internal",
            "NodePort 127.0.0.1:30080 Internal->Cluster",
            "NodePort 192.168.1.11:30080 Internal->Cluster",
            "NodePort 192.168.1.11:30080 External->External",
        ]
    );
    assert_eq!(addrs(&p.external_backends), ["10.1.1.5:8080"]);
    assert_eq!(
        addrs(&p.cluster_backends),
        ["10.1.1.5:8080", "10.1.2.5:8080"],
        "this node reaching its NodePort is cluster traffic"
    );
    assert_eq!(addrs(&p.internal_backends), ["10.1.1.5:8080", "10.1.2.5:8080"]);
    assert_eq!(p.external_traffic_policy, TrafficPolicy::Local);
}

#[test]
fn external_policy_local_without_local_endpoints_has_an_empty_external_set_but_endpoints_elsewhere()
{
    let p = plan(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{type: NodePort, clusterIP: 10.96.0.10, externalTrafficPolicy: Local, ports: [{{port: 80, nodePort: 30080}}]}}\n---\n{}",
        slice("web", "web-1", "IPv4", "", 8080, &["10.1.2.5 node-2 ready"])
    ));
    assert!(p[0].external_backends.is_empty());
    assert!(p[0].has_any_endpoints, "drop, not reject");
    assert_eq!(addrs(&p[0].cluster_backends), ["10.1.2.5:8080"]);
}

#[test]
fn internal_policy_local_limits_cluster_ip_to_local_endpoints() {
    let p = plan(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{clusterIP: 10.96.0.10, internalTrafficPolicy: Local, ports: [{{port: 80}}]}}\n---\n{}",
        slice(
            "web",
            "web-1",
            "IPv4",
            "",
            80,
            &["10.1.1.5 node-1 ready", "10.1.1.6 node-1 ready", "10.1.2.5 node-2 ready"]
        )
    ));
    assert_eq!(addrs(&p[0].internal_backends), ["10.1.1.5:80", "10.1.1.6:80"]);
    assert_eq!(p[0].internal_traffic_policy, TrafficPolicy::Local);
}

#[test]
fn internal_policy_local_falls_back_to_local_terminating_endpoints() {
    let p = plan(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{clusterIP: 10.96.0.10, internalTrafficPolicy: Local, ports: [{{port: 80}}]}}\n---\n{}",
        slice(
            "web",
            "web-1",
            "IPv4",
            "",
            80,
            &["10.1.1.5 node-1 serving-terminating", "10.1.2.5 node-2 ready"]
        )
    ));
    assert_eq!(addrs(&p[0].internal_backends), ["10.1.1.5:80"]);
    assert!(p[0].internal_backends[0].terminating);
}

#[test]
fn load_balancer_ips_source_ranges_and_health_check_port() {
    let p = plan(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: ["203.0.113.0/24", " 198.51.100.7/32 ", "2001:db8::/32"]
  externalIPs: [192.0.2.50]
  ports: [{{port: 443, nodePort: 30443}}]
status:
  loadBalancer:
    ingress:
    - ip: 198.51.100.10
    - ip: 198.51.100.11
      ipMode: Proxy
    - hostname: lb.example.com
---
{}"#,
        slice("lb", "lb-1", "IPv4", "", 8443, &["10.1.1.5 node-1 ready", "10.1.2.5 node-2 ready"])
    ));
    let p = &p[0];
    assert_eq!(
        fronts(p),
        [
            "ClusterIP 10.96.0.20:443 Internal->Internal",
            "NodePort 127.0.0.1:30443 Internal->Cluster",
            "NodePort 192.168.1.11:30443 Internal->Cluster",
            "NodePort 192.168.1.11:30443 External->External",
            "ExternalIP 192.0.2.50:443 Internal->Cluster",
            "ExternalIP 192.0.2.50:443 External->External",
            "LoadBalancer 198.51.100.10:443 Internal->Cluster",
            "LoadBalancer 198.51.100.10:443 External->External",
        ],
        "ipMode Proxy and hostname-only ingress are not ours"
    );
    let ranges: Vec<String> = p.source_ranges.iter().map(|r| r.to_string()).collect();
    assert_eq!(ranges, ["203.0.113.0/24", "198.51.100.7/32"], "IPv4 plan gets IPv4 ranges only");
    assert_eq!(p.health_check_node_port, Some(32000));
    assert_eq!(addrs(&p.external_backends), ["10.1.1.5:8443"]);
}

#[test]
fn dual_stack_service_is_planned_per_family_with_its_own_slices() {
    let p = plan(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{type: NodePort, clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, \"fd00:96::10\"], ipFamilies: [IPv4, IPv6], ports: [{{port: 80, nodePort: 30080}}]}}\n---\n{}\n---\n{}",
        slice("web", "web-v4", "IPv4", "", 8080, &["10.1.1.5 node-1 ready"]),
        slice(
            "web",
            "web-v6",
            "IPv6",
            "",
            8080,
            &["fd00:1:1::5 node-1 ready", "fd00:1:2::5 node-2 ready"]
        )
    ));
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].family, Family::IPv4);
    assert_eq!(addrs(&p[0].cluster_backends), ["10.1.1.5:8080"]);
    assert_eq!(p[1].family, Family::IPv6);
    assert_eq!(addrs(&p[1].cluster_backends), ["[fd00:1:1::5]:8080", "[fd00:1:2::5]:8080"]);
    assert_eq!(
        fronts(&p[1]),
        [
            "ClusterIP fd00:96::10:80 Internal->Internal",
            "NodePort fd00:1::11:30080 Internal->Cluster",
            "NodePort fd00:1::11:30080 External->External",
        ]
    );
}

#[test]
fn services_kube_proxy_skips_are_skipped() {
    let cases = [
        ("spec: {clusterIP: None, ports: [{port: 80}]}", Skip::Headless),
        ("spec: {type: ExternalName, externalName: example.com}", Skip::ExternalName),
        ("spec: {ports: [{port: 80}]}", Skip::NoClusterIp),
    ];
    for (spec, want) in cases {
        let y = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: default}}\n{spec}"
        );
        assert_eq!(outcome(&y), ServiceOutcome::Skipped(want), "{spec}");
    }
    let y = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: default, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}";
    assert_eq!(outcome(y), ServiceOutcome::Skipped(Skip::OtherProxy("other".into())));
}

#[test]
fn multi_port_services_match_slice_ports_by_name() {
    let p = plan(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{name: http, port: 80}}, {{name: metrics, port: 9090}}, {{name: dns, port: 53, protocol: UDP}}]}}\n---\n{}",
        slice("web", "web-1", "IPv4", "http", 8080, &["10.1.1.5 node-1 ready"])
    ));
    assert_eq!(p.len(), 3);
    let by_name = |n: &str| p.iter().find(|p| p.port_name == n).unwrap();
    assert_eq!(addrs(&by_name("http").cluster_backends), ["10.1.1.5:8080"]);
    assert!(by_name("metrics").cluster_backends.is_empty(), "no slice port named metrics");
    assert!(!by_name("metrics").has_any_endpoints, "reject, not drop");
    assert_eq!(by_name("dns").protocol, Protocol::Udp);
    assert!(by_name("dns").cluster_backends.is_empty(), "slice port http is TCP");
}

#[test]
fn session_affinity_timeouts() {
    let base = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: default}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}], sessionAffinity: ClientIP";
    assert_eq!(plan(&format!("{base}}}"))[0].affinity_timeout_s, Some(10800));
    assert_eq!(
        plan(&format!("{base}, sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 60}}}}}}"))[0]
            .affinity_timeout_s,
        Some(60)
    );
}

#[test]
fn nodeport_addresses_filter_and_extra_node_ips() {
    let mut cfg = cfg();
    cfg.nodeport_addresses =
        crate::config::NodePortAddresses::Cidrs(vec!["192.168.0.0/16".parse().unwrap()]);
    cfg.extra_node_ips = vec!["10.0.0.11".parse().unwrap(), "192.168.2.11".parse().unwrap()];
    let p = plan_with(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: default}\nspec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 30001}]}",
        &cfg,
    );
    let nodeports: Vec<String> = p[0]
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::NodePort && f.scope == Scope::External)
        .map(|f| f.address.to_string())
        .collect();
    assert_eq!(nodeports, ["192.168.1.11", "192.168.2.11"]);
}

#[test]
fn primary_addresses_answer_nodeports_with_primary_and_source_snat() {
    // An ExternalIP (a cloud's NAT address, say) listed first and lower than the InternalIP.
    let node = NODE.replace(
        "  - {type: InternalIP, address: 192.168.1.11}\n",
        "  - {type: ExternalIP, address: 10.200.0.1}\n  - {type: InternalIP, address: 192.168.1.11}\n  - {type: InternalIP, address: 192.168.1.12}\n",
    );
    let parsed = parse_str(&node, Path::new("node.yaml"), &cfg());
    let mut st = ClusterState::default();
    for (_, o) in parsed.objects {
        st.apply_event(crate::sources::Event::Apply(o));
    }
    let ips = |v: &[&str]| v.iter().map(|a| a.parse::<IpAddr>().unwrap()).collect::<Vec<_>>();
    let mut cfg = cfg();
    let view = node_view(&st, &cfg);
    assert_eq!(
        view.nodeport_addresses,
        ips(&["10.200.0.1", "192.168.1.11", "192.168.1.12", "fd00:1::11"])
    );
    assert_eq!(view.primary, ips(&["192.168.1.11", "fd00:1::11"]));
    assert_eq!(view.snat_address(false), Some(ips(&["192.168.1.11"])[0]));
    assert_eq!(view.snat_address(true), Some(ips(&["fd00:1::11"])[0]));

    cfg.nodeport_addresses = crate::config::NodePortAddresses::Primary;
    assert_eq!(node_view(&st, &cfg).nodeport_addresses, ips(&["192.168.1.11", "fd00:1::11"]));
    // --node-ip comes first.
    cfg.extra_node_ips = ips(&["192.168.1.12"]);
    let view = node_view(&st, &cfg);
    assert_eq!(view.nodeport_addresses, ips(&["192.168.1.12", "fd00:1::11"]));
    assert_eq!(view.snat_address(false), Some(ips(&["192.168.1.12"])[0]));
}

#[test]
fn the_devices_addresses_answer_nodeports_but_are_never_primary() {
    let parsed = parse_str(NODE, Path::new("node.yaml"), &cfg());
    let mut st = ClusterState::default();
    for (_, o) in parsed.objects {
        st.apply_event(crate::sources::Event::Apply(o));
    }
    let ips = |v: &[&str]| v.iter().map(|a| a.parse::<IpAddr>().unwrap()).collect::<Vec<_>>();
    // A VIP keepalived moved here, and the node's own address again.
    let changed = st.set_device_addresses(ips(&["192.168.1.200", "192.168.1.11", "fd00:1::200"]));
    assert!(changed.all, "every service follows");
    assert!(
        st.set_device_addresses(ips(&["fd00:1::200", "192.168.1.11", "192.168.1.200"])).is_empty()
    );
    let mut cfg = cfg();
    let view = node_view(&st, &cfg);
    assert_eq!(
        view.nodeport_addresses,
        ips(&["192.168.1.11", "192.168.1.200", "fd00:1::11", "fd00:1::200"])
    );
    assert_eq!(view.primary, ips(&["192.168.1.11", "fd00:1::11"]), "SNAT keeps the node's own");
    cfg.nodeport_addresses =
        crate::config::NodePortAddresses::Cidrs(vec!["fd00:1::/64".parse().unwrap()]);
    assert_eq!(node_view(&st, &cfg).nodeport_addresses, ips(&["fd00:1::11", "fd00:1::200"]));
    cfg.nodeport_addresses = crate::config::NodePortAddresses::Primary;
    assert_eq!(node_view(&st, &cfg).nodeport_addresses, ips(&["192.168.1.11", "fd00:1::11"]));
    // Without a Node or --node-ip, a device address is still no SNAT address.
    let mut bare = ClusterState::default();
    bare.set_device_addresses(ips(&["192.168.1.200"]));
    let view = node_view(&bare, &crate::config::ModelConfig::new("node-0"));
    assert_eq!((view.nodeport_addresses, view.primary), (ips(&["192.168.1.200"]), vec![]));
}

#[test]
fn external_clusterip_adds_a_device_frontend_with_the_internal_endpoints() {
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: default}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}";
    let external = |cfg: &ModelConfig, svc: &str| -> Vec<String> {
        plan_with(svc, cfg)[0]
            .frontends
            .iter()
            .filter(|f| f.scope == Scope::External)
            .map(|f| format!("{:?} {}:{} {:?}", f.kind, f.address, f.port, f.backends))
            .collect()
    };
    let mut cfg = cfg();
    assert!(external(&cfg, svc).is_empty(), "off by default: pods only");
    cfg.external_cluster_ips = true;
    assert_eq!(external(&cfg, svc), ["ClusterIP 10.96.0.1:80 Internal"]);
    // internalTrafficPolicy Local holds for outside clients too (the same set).
    let local = svc.replace("ports:", "internalTrafficPolicy: Local, ports:");
    let p = &plan_with(&local, &cfg)[0];
    assert_eq!(external(&cfg, &local), ["ClusterIP 10.96.0.1:80 Internal"]);
    assert_eq!(p.internal_traffic_policy, TrafficPolicy::Local);
}

#[test]
fn host_processes_reach_nodeports_on_localhost_unless_left_out() {
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: default}\nspec: {type: NodePort, clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, 'fd00:96::1'], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack, ports: [{port: 80, nodePort: 30001}]}";
    let localhost = |cfg: &ModelConfig| -> Vec<String> {
        plan_with(svc, cfg)
            .iter()
            .flat_map(|p| &p.frontends)
            .filter(|f| f.address.is_loopback())
            .map(|f| {
                format!("{:?} {}:{} {:?}->{:?}", f.kind, f.address, f.port, f.scope, f.backends)
            })
            .collect()
    };
    let mut cfg = cfg();
    // IPv4 only, as kube-proxy; for the socket hooks, with every cluster endpoint.
    assert_eq!(localhost(&cfg), ["NodePort 127.0.0.1:30001 Internal->Cluster"]);
    cfg.nodeport_addresses =
        crate::config::NodePortAddresses::Cidrs(vec!["127.0.0.0/8".parse().unwrap()]);
    assert_eq!(localhost(&cfg).len(), 1);
    for left_out in [
        crate::config::NodePortAddresses::Cidrs(vec!["192.168.0.0/16".parse().unwrap()]),
        crate::config::NodePortAddresses::Primary,
    ] {
        cfg.nodeport_addresses = left_out;
        assert!(localhost(&cfg).is_empty());
    }
    cfg.nodeport_addresses = crate::config::NodePortAddresses::All;
    cfg.localhost_nodeports = false;
    assert!(localhost(&cfg).is_empty());
}

#[test]
fn zone_hints_follow_the_node_zone_label() {
    let s =
        slice("web", "web-1", "IPv4", "", 80, &["10.1.1.5 node-1 ready", "10.1.2.5 node-2 ready"])
            .replace(
                "  nodeName: node-2\n",
                "  nodeName: node-2\n  hints: {forZones: [{name: zone-b}]}\n",
            )
            .replace(
                "  nodeName: node-1\n",
                "  nodeName: node-1\n  hints: {forZones: [{name: zone-a}]}\n",
            );
    let p = plan(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: 80}}]}}\n---\n{s}"
    ));
    assert_eq!(addrs(&p[0].cluster_backends), ["10.1.1.5:80"]);
    assert_eq!(
        addrs(&p[0].retained_backends),
        ["10.1.2.5:80"],
        "filtered by topology, kept for open flows"
    );
}

#[test]
fn an_endpoint_in_two_slices_counts_once_with_the_local_copy_winning() {
    let p = plan(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: 80}}]}}\n---\n{}\n---\n{}",
        slice("web", "web-a", "IPv4", "", 80, &["10.1.1.5 node-9 ready"]),
        slice("web", "web-b", "IPv4", "", 80, &["10.1.1.5 node-1 ready", "10.1.1.6 node-2 ready"])
    ));
    assert_eq!(addrs(&p[0].cluster_backends), ["10.1.1.5:80", "10.1.1.6:80"]);
    assert!(p[0].cluster_backends[0].local);
}

/// SCTP ports are planned like the others; without pods' devices the agent says what pods of
/// this node cannot reach (the kernel runs no socket hook for SCTP).
#[test]
fn sctp_ports_are_planned_and_without_pod_devices_their_clusterip_gap_is_said() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: default}\nspec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{name: a, port: 80}, {name: b, port: 9, protocol: SCTP, nodePort: 30009}, {name: c, port: 9, protocol: UDP}]}";
    let ServiceOutcome::Planned { plans, warnings } = outcome(yaml) else { panic!() };
    let protocols: Vec<_> = plans.iter().map(|p| (p.port_name.as_str(), p.protocol)).collect();
    assert_eq!(protocols, [("a", Protocol::Tcp), ("b", Protocol::Sctp), ("c", Protocol::Udp)]);
    let sctp = &plans[1];
    let fronts: Vec<_> = sctp.frontends.iter().map(|f| (f.kind, f.port)).collect();
    assert!(fronts.contains(&(FrontendKind::ClusterIP, 9)), "{fronts:?}");
    assert!(fronts.contains(&(FrontendKind::NodePort, 30009)), "{fronts:?}");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with(
            "port b:9/SCTP: this node's pods reach its ClusterIP only with --pod-devices"
        ),
        "{warnings:?}"
    );

    let mut with_pod_devices = cfg();
    with_pod_devices.pod_devices = true;
    let ServiceOutcome::Planned { plans, warnings } = outcome_with(yaml, &with_pod_devices) else {
        panic!()
    };
    assert_eq!((plans.len(), warnings.len()), (3, 0));
}

#[test]
fn external_ips_on_a_cluster_ip_service_honour_external_policy_local() {
    let p = plan(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{clusterIP: 10.96.0.10, externalIPs: [192.0.2.9], externalTrafficPolicy: Local, ports: [{{port: 80}}]}}\n---\n{}",
        slice("web", "web-1", "IPv4", "", 80, &["10.1.1.5 node-1 ready", "10.1.2.5 node-2 ready"])
    ));
    assert_eq!(addrs(&p[0].external_backends), ["10.1.1.5:80"]);
    assert_eq!(p[0].external_traffic_policy, TrafficPolicy::Local);
}

#[test]
fn a_service_without_slices_has_no_endpoints_anywhere() {
    let p = plan(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: default}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}",
    );
    assert!(p[0].cluster_backends.is_empty() && !p[0].has_any_endpoints);
}
