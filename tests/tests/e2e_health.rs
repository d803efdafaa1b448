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
    // internalTrafficPolicy Local with its one endpoint on node-1.
    let pod1 = cluster.nodes[1].pods[0].ip4;
    let itp = Svc {
        name: "itp",
        cluster_ips: &["10.96.0.81"],
        node_port: None,
        spec: "  internalTrafficPolicy: Local\n",
        ..Svc::WEB
    };
    let files = [
        ("lb.yaml", lb.file(&[Ep::ready(pod0, "node-0")])),
        ("itp.yaml", itp.file(&[Ep::ready(pod1, "node-1")])),
    ];
    // The health port open to load balancers, as the DaemonSet sets it.
    let started = unix_now();
    let mut run = Running::start_with(cluster, &files, &["--health-bind-address", "0.0.0.0:10256"]);
    let node0 = &run.cluster.nodes[0];
    assert_eq!(http_get(&node0.ns, "127.0.0.1:10256", "/healthz").unwrap().0, 200);
    // Every address of both families: IPv6 load balancers probe over IPv6.
    for from_outside in ["10.230.0.10:10256", "[fd00:230::10]:10256"] {
        let (code, body) = http_get(&run.cluster.clients[0].ns, from_outside, "/healthz").unwrap();
        assert_eq!(code, 200, "{from_outside}: {body}");
    }
    // Metrics on their own port, as kube-proxy's: the health port is for load balancers.
    assert_eq!(http_get(&node0.ns, "127.0.0.1:10256", "/metrics").unwrap().0, 404);
    assert_eq!(http_get(&node0.ns, "127.0.0.1:10249", "/healthz").unwrap().0, 404);
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
    // Load balancers of IPv6 and dual-stack clusters ask over IPv6.
    let (code, body) = http_get(client, "[fd00:230::10]:32000", "/").unwrap();
    assert_eq!(code, 200, "{body}");

    // Traffic, then metrics.
    let r = parse_probe(&run.from_client(0, &["connect", "10.230.0.10:30080", "--count", "5"]));
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    let metrics = run.metrics(0);
    let value = |name: &str| metric(&metrics, name);
    assert_eq!(value("lb_datapath_events_total{event=\"ct_new\"}"), 5.0);
    assert!(value("lb_datapath_service_packets_total{service=\"default/lb:p/TCP/IPv4\"}") >= 15.0);
    assert_eq!(value("lb_objects{kind=\"Service\"}"), 2.0);
    // Local policies without a local endpoint here (kube-proxy's alerting metric): node-0
    // drops itp's traffic from its pods, node-1 lb's from outside.
    let no_local = |page: &str, policy: &str| {
        metric(page, &format!("lb_services_no_local_endpoints{{traffic_policy=\"{policy}\"}}"))
    };
    assert_eq!((no_local(&metrics, "internal"), no_local(&metrics, "external")), (1.0, 0.0));
    let node1 = run.metrics(1);
    assert_eq!((no_local(&node1, "internal"), no_local(&node1, "external")), (0.0, 1.0));
    assert_eq!(value("lb_map_capacity{map=\"LB_CT\"}"), 65536.0);
    assert!(value("lb_map_entries{map=\"LB_BACKENDS\"}") >= 1.0);
    assert_eq!(value("lb_program_attached{program=\"tc\",target=\"eth0\"}"), 1.0);
    assert!(metrics.trim_end().ends_with("# EOF"));

    // Every metric the dashboard in deploy/ charts. (Not the API requests': an agent reading
    // manifests makes none, and a labelled family without a sample is not written at all;
    // `kube_source` checks those on the agent's client against a mocked API server.)
    for (title, used) in lb_tests::manifests::dashboard_metrics() {
        for name in used.into_iter().filter(|n| !n.starts_with("rest_client_")) {
            assert!(
                lb_tests::cluster::exposes(&metrics, &name),
                "{title:?} charts {name}: not exported"
            );
        }
    }
    // Monitoring built for kube-proxy reads the same figures under kube-proxy's names.
    for (ours, kube_proxys) in [
        ("lb_sync_duration_seconds_count", "kubeproxy_sync_proxy_rules_duration_seconds_count"),
        ("lb_sync_last_timestamp_seconds", "kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
        (
            "lb_services_no_local_endpoints{traffic_policy=\"internal\"}",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"}",
        ),
    ] {
        assert_eq!(value(ours), value(kube_proxys), "{kube_proxys}");
    }
    // The first sync is one: its duration was observed.
    assert!(value("lb_sync_duration_seconds_count") >= 1.0);
    // Two services and one slice each, read at start; the health port asked three times.
    assert_eq!(value("kubeproxy_sync_proxy_rules_service_changes_total"), 2.0);
    assert_eq!(value("kubeproxy_sync_proxy_rules_endpoint_changes_total"), 2.0);
    assert_eq!(value("kubeproxy_proxy_healthz_total{code=\"200\"}"), 3.0);
    // The process figures, against what the kernel says of the agent's process.
    let pid = run.agents[0].pid();
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> f64 {
        let line = proc_status.lines().find_map(|l| l.strip_prefix(name)).unwrap();
        line.split_whitespace().next().unwrap().parse().unwrap()
    };
    let rss = value("process_resident_memory_bytes");
    let kernel_rss = field("VmRSS:") * 1024.0;
    assert!(rss > 1e6 && (rss / kernel_rss - 1.0).abs() < 0.5, "{rss} vs VmRSS {kernel_rss}");
    let start = value("process_start_time_seconds");
    assert!(
        (started - 2.0..unix_now()).contains(&start),
        "started at {start}, spawned at {started}"
    );
    let threads = value("process_threads");
    assert!(threads >= 2.0 && (threads - field("Threads:")).abs() <= 2.0, "{threads}");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as f64;
    let open_fds = value("process_open_fds");
    assert!(open_fds >= 5.0 && (open_fds - fds).abs() <= 10.0, "{open_fds} vs {fds}");
    assert!(value("process_max_fds") >= open_fds);
    let cpu = value("process_cpu_seconds_total");
    assert!(cpu > 0.0 && cpu < 2.0 * (unix_now() - started), "{cpu}");

    // A pod change the EndpointSlice controller stamps now (after the agent started: earlier
    // ones are not counted) and the agent sees 300 ms later: the network programming latency
    // counts it once, from that stamp to the maps written.
    let stamp = jiff::Timestamp::now();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let annotation = format!(
        "namespace: default, annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{stamp}\"}}, labels:"
    );
    let slices = lb.slices(&[Ep::ready(pod0, "node-0")]).replacen(
        "namespace: default, labels:",
        &annotation,
        1,
    );
    assert!(slices.contains("last-change-trigger-time"), "{slices}");
    run.update("lb.yaml", &format!("{}---\n{slices}", lb.yaml()));
    let metrics = run.metrics(0);
    let value = |name: &str| metric(&metrics, name);
    assert_eq!(value("lb_network_programming_duration_seconds_count"), 1.0);
    let latency = value("lb_network_programming_duration_seconds_sum");
    assert!((0.3..10.0).contains(&latency), "{latency}");
    let synced = value("lb_sync_last_timestamp_seconds");
    let now = jiff::Timestamp::now().as_second() as f64;
    assert!(synced <= now + 1.0 && synced > now - 10.0, "{synced} vs {now}");
    // The slice changed, its service did not (the manifests source hands over changes only).
    assert_eq!(value("kubeproxy_sync_proxy_rules_endpoint_changes_total"), 3.0);
    assert_eq!(value("kubeproxy_sync_proxy_rules_service_changes_total"), 2.0);

    // The endpoint goes away: node-0 now answers 503 too.
    run.update("lb.yaml", &lb.file(&[]));
    let (code, body) = http_get(&run.cluster.clients[0].ns, "10.230.0.10:32000", "/").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(value("lb_syncs_total") >= 0.0);
    // No endpoint anywhere: refused everywhere, not a local-policy drop any more.
    assert_eq!(no_local(&run.metrics(1), "external"), 0.0);
}

/// Seconds since the Unix epoch.
fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Polls `f` until it holds, for up to `secs` seconds.
fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// kube-proxy's own health port, as cloud load balancers and liveness probes use it: 503 from
/// `/healthz` and `/livez` while a change cannot reach the maps for longer than the timeout
/// (here: a full service map), retried until it does; 503 from `/healthz` only while the node
/// is marked for deletion by the cluster autoscaler.
#[test]
fn healthz_and_livez_answer_like_kube_proxys_for_failed_writes_and_draining_nodes() {
    require_root!();
    let cluster = Cluster::new(2, 1, 1);
    let eps = cluster.all_pods(false);
    let extra = Svc { name: "extra", cluster_ips: &["10.96.0.77"], node_port: None, ..Svc::WEB };
    // With a healthCheckNodePort: its answer includes the agent's health.
    let dns = Svc {
        spec: "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001\n",
        ..Svc::DNS
    };
    let files = [
        ("a-web.yaml", Svc::WEB.file(&eps)),
        ("b-dns.yaml", dns.file(&eps)),
        ("c-extra.yaml", extra.file(&eps)),
    ];
    // Room for two service ports (one of the three ids is reserved): the last in name order,
    // web, cannot be written.
    let mut run =
        Running::start_with(cluster, &files, &["--max-services", "3", "--health-timeout", "2s"]);
    let get = |run: &Running, n: usize, path: &str| {
        http_get(&run.cluster.nodes[n].ns, "127.0.0.1:10256", path).expect("GET")
    };
    let unprogrammed = |run: &Running| metric(&run.metrics(0), "lb_services_unprogrammed");
    assert_eq!(unprogrammed(&run), 1.0, "{}", run.agents[0].log().join("\n"));
    assert_eq!(run.agents[0].count_log("programming failed (retried every 2 s)"), 1);
    let refused = run.from_pod(0, 0, &["connect", "10.96.0.10:80"]);
    assert_eq!(refused, ["err ENETUNREACH"], "not programmed: a ClusterIP no node routes");

    // Past the timeout, both say so; the body is kube-proxy's.
    let synced = run.agents[0].count_log("synced");
    eventually(10, "/healthz 503", || get(&run, 0, "/healthz").0 == 503);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(run.agents[0].count_log("synced"), synced, "retries that write nothing: not syncs");
    let (code, body) = get(&run, 0, "/livez");
    assert_eq!(code, 503, "{body}");
    let (_, body) = get(&run, 0, "/healthz");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["nodeEligible"], true, "{body}");
    assert!(v["lastUpdated"].as_str().unwrap() < v["currentTime"].as_str().unwrap(), "{body}");
    assert_eq!(run.agents[0].count_log("programming failed"), 1, "logged once, not per retry");
    // Counted by answer, as kube-proxy's proxy_healthz_total / proxy_livez_total.
    let metrics = run.metrics(0);
    let answers = |path: &str, code: u16| {
        let name = format!("kubeproxy_proxy_{path}_total{{code=\"{code}\"}}");
        metrics.lines().find_map(|l| l.strip_prefix(&name)?.trim().parse::<f64>().ok())
    };
    assert_eq!(answers("livez", 503), Some(1.0), "{metrics}");
    assert_eq!(answers("healthz", 503), Some(2.0), "the poll's first 503 and the one after");
    assert_eq!(answers("livez", 200), None, "not asked before");
    // What an operator on the node sees.
    let status = lb_tests::proc::command_in(
        &lb_tests::workspace_bin("lbctl"),
        Some(run.cluster.nodes[0].ns.name()),
        None,
    )
    .args(["status", "--bpffs", run.pins[0].path.to_str().unwrap()])
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.starts_with("agent:        UNHEALTHY (a change waits for the maps"), "{text}");
    assert!(text.contains("\nmaps:         1 services NOT programmed (retried"), "{text}");
    let check = |run: &Running| {
        let (code, body) = http_get(&run.cluster.clients[0].ns, "10.230.0.10:32001", "/").unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        (code, v["localEndpoints"].as_u64().unwrap(), v["serviceProxyHealthy"].as_bool().unwrap())
    };
    assert_eq!(check(&run), (503, 1, false), "a local endpoint, but an unhealthy agent");

    // Room again: the retry gets it written, and health comes back without any new event
    // for that service.
    run.update("c-extra.yaml", "");
    eventually(10, "/healthz 200 after the retry", || get(&run, 0, "/healthz").0 == 200);
    // (node-1's agent retries on its own 2 s tick.)
    eventually(10, "node-1 healthy too", || get(&run, 1, "/healthz").0 == 200);
    assert_eq!(get(&run, 0, "/livez").0, 200);
    assert_eq!(check(&run), (200, 1, true));
    assert_eq!(unprogrammed(&run), 0.0);
    assert_eq!(run.agents[0].count_log("maps written after failing before"), 1);
    let ok = parse_probe(&run.from_pod(0, 0, &["connect", "10.96.0.10:80"]));
    assert!(ok.iter().all(|r| r.is_ok()), "{ok:?}");
    let (code, body) = get(&run, 0, "/healthz");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, &v["lastUpdated"]), (200, &v["currentTime"]), "{body}");

    // The autoscaler marks node-0 for deletion: its /healthz fails (load balancers drain it),
    // its /livez does not (the agent keeps running), node-1 is unaffected.
    let taint = "spec:\n  taints:\n  - {key: ToBeDeletedByClusterAutoscaler, value: \"1764988800\", effect: NoSchedule}\n";
    let nodes = |run: &Running, tainted: bool| {
        let mut n0 = run.cluster.node_manifest(0);
        if tainted {
            n0 += taint;
        }
        format!("{n0}---\n{}", run.cluster.node_manifest(1))
    };
    run.update("nodes.yaml", &nodes(&run, true));
    let (code, body) = get(&run, 0, "/healthz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"nodeEligible\": false"), "{body}");
    assert_eq!(get(&run, 0, "/livez").0, 200);
    assert_eq!(get(&run, 1, "/healthz").0, 200);
    assert_eq!(check(&run), (200, 1, true), "the node's eligibility aside, as kube-proxy's");
    run.update("nodes.yaml", &nodes(&run, false));
    assert_eq!(get(&run, 0, "/healthz").0, 200);
}
