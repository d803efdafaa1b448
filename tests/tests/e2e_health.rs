//! Health, readiness, metrics and healthCheckNodePorts of real agents in the mini-cluster.

use lb_tests::{
    cluster::{Cluster, Running, metric, parse_probe},
    manifests::{Ep, Svc},
    netns::http_get,
    require_root,
};

#[test]
fn health_ready_metrics_and_health_check_node_ports() {
    require_root!();
    let cluster = Cluster::new(2, 1, 1);
    let pod0 = cluster.nodes[0].pods[0].ip4;
    let lb = Svc {
        name: "lb",
        cluster_ips: &["10.96.0.80"],
        port: 80,
        protocol: "TCP",
        target_port: 8080,
        node_port: Some(30080),
        spec: "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
        extra: "",
    };
    let mut run = Running::start(cluster, &[("lb.yaml", lb.file(&[Ep::ready(pod0, "node-0")]))]);
    let node0 = &run.cluster.nodes[0];
    assert_eq!(http_get(&node0.ns, "127.0.0.1:10256", "/healthz").unwrap().0, 200);
    assert_eq!(
        http_get(&node0.ns, "127.0.0.1:10256", "/readyz").unwrap().0,
        200,
        "ready after the initial sync"
    );

    // The outside world asks each node whether it serves the service.
    let client = &run.cluster.clients[0].ns;
    let (code, body) = http_get(client, "10.230.0.10:32000", "/").unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"lb\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": true\n}"
    );
    let (code, body) = http_get(client, "10.230.0.11:32000", "/").unwrap();
    assert_eq!(code, 503, "node-1 has no local endpoint: {body}");
    assert!(body.contains("\"localEndpoints\": 0"));

    // Traffic, then metrics.
    let r = parse_probe(&run.from_client(0, &["connect", "10.230.0.10:30080", "--count", "5"]));
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    let metrics = run.metrics(0);
    let value = |name: &str| metric(&metrics, name);
    assert_eq!(value("lb_datapath_events_total{event=\"ct_new\"}"), 5.0);
    assert!(value("lb_datapath_service_packets_total{service=\"default/lb:p/TCP/IPv4\"}") >= 15.0);
    assert_eq!(value("lb_objects{kind=\"Service\"}"), 1.0);
    assert_eq!(value("lb_map_capacity{map=\"LB_CT\"}"), 65536.0);
    assert!(value("lb_map_entries{map=\"LB_BACKENDS\"}") >= 1.0);
    assert_eq!(value("lb_program_attached{program=\"tc\",target=\"eth0\"}"), 1.0);
    assert!(metrics.trim_end().ends_with("# EOF"));

    // The endpoint goes away: node-0 now answers 503 too.
    run.update("lb.yaml", &lb.file(&[]));
    let (code, body) = http_get(&run.cluster.clients[0].ns, "10.230.0.10:32000", "/").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(value("lb_syncs_total") >= 0.0);
}
