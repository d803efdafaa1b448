//! The mini-cluster acceptance scenarios: what users of kube-proxy rely on, through real agents,
//! real TCP/UDP and the real kernel. Each asserts who answered and which client address the
//! server saw.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_tests::{
    cluster::{Cluster, Running, by_server, host_of, metric, parse_probe},
    manifests::{Ep, Svc},
    require_root,
};

fn svc<'a>(
    name: &'a str,
    ip: &'a [&'a str],
    node_port: Option<u16>,
    spec: &'a str,
    extra: &'a str,
) -> Svc<'a> {
    Svc {
        name,
        cluster_ips: ip,
        port: 80,
        protocol: "TCP",
        target_port: 8080,
        node_port,
        spec,
        extra,
    }
}

fn pods(cluster: &Cluster, v6: bool) -> Vec<Ep> {
    cluster
        .nodes
        .iter()
        .flat_map(|n| {
            n.pods.iter().map(move |p| Ep::ready(if v6 { p.ip6 } else { p.ip4 }, &n.name))
        })
        .collect()
}

fn all_ok(results: &[Result<(String, String, String), String>]) {
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        results.len(),
        &failed[..failed.len().min(5)]
    );
}

#[test]
fn external_ips_and_load_balancer_ips_with_both_policies() {
    require_root!();
    let cluster = Cluster::new(2, 2, 1);
    let eps = pods(&cluster, false);
    let lb_status = "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.10\n";
    let lb_status_local = "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.11\n";
    let cluster_svc = svc(
        "ext",
        &["10.96.0.20"],
        Some(30090),
        "  type: LoadBalancer\n  externalIPs: [192.0.2.10]\n",
        lb_status,
    );
    let local_svc = svc(
        "ext-local",
        &["10.96.0.21"],
        Some(30091),
        "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  externalIPs: [192.0.2.11]\n",
        lb_status_local,
    );
    // Endpoints on both nodes: policy Local must narrow outside traffic to node-0's own.
    let run = Running::start(
        cluster,
        &[("ext.yaml", cluster_svc.file(&eps)), ("local.yaml", local_svc.file(&eps))],
    );
    // The outside world routes the VIPs to node-0.
    for vip in ["192.0.2.0/24", "198.51.100.0/24"] {
        run.cluster.clients[0].ns.ip(&["route", "add", vip, "via", "10.230.0.10"]);
    }
    let client = run.cluster.clients[0].ip4.to_string();
    for vip in ["192.0.2.10:80", "198.51.100.10:80"] {
        let r = parse_probe(&run.from_client(0, &["connect", vip, "--count", "80"]));
        all_ok(&r);
        assert_eq!(by_server(&r).len(), 4, "{vip}: {:?}", by_server(&r));
        assert!(r.iter().flatten().all(|(_, _, peer)| peer == vip), "{vip}");
        for (name, seen, _) in r.iter().flatten() {
            let want =
                if name.starts_with("node-0") { client.clone() } else { "10.230.0.10".to_string() };
            assert_eq!(host_of(seen), want, "{vip} {name}");
        }
    }
    for vip in ["192.0.2.11:80", "198.51.100.11:80"] {
        let r = parse_probe(&run.from_client(0, &["connect", vip, "--count", "40"]));
        all_ok(&r);
        assert!(
            by_server(&r).keys().all(|n| n.starts_with("node-0")),
            "{vip}: {:?}",
            by_server(&r)
        );
        assert!(
            r.iter().flatten().all(|(_, seen, _)| host_of(seen) == client),
            "{vip}: client address kept"
        );
    }
    // A pod reaching the Local service's LB IP is cluster traffic: every endpoint, on both
    // nodes, answers it (40 connections over 4 backends: all miss one with p < 1e-4).
    let r = parse_probe(&run.from_pod(1, 0, &["connect", "198.51.100.11:80", "--count", "40"]));
    all_ok(&r);
    assert_eq!(by_server(&r).len(), 4, "{:?}", by_server(&r));
    assert!(r.iter().flatten().all(|(_, _, peer)| peer == "198.51.100.11:80"));
}

#[test]
fn internal_traffic_policy_local_and_session_affinity() {
    require_root!();
    let cluster = Cluster::new(2, 2, 1);
    let eps = pods(&cluster, false);
    // ITP Local with endpoints on node-0 only.
    let local_eps: Vec<Ep> = eps.iter().filter(|e| e.node == "node-0").cloned().collect();
    let itp = svc("itp", &["10.96.0.30"], None, "  internalTrafficPolicy: Local\n", "");
    let sticky = svc("sticky", &["10.96.0.31"], Some(30031), "  sessionAffinity: ClientIP\n", "");
    let run = Running::start(
        cluster,
        &[("itp.yaml", itp.file(&local_eps)), ("sticky.yaml", sticky.file(&eps))],
    );

    let r = parse_probe(&run.from_pod(0, 1, &["connect", "10.96.0.30:80", "--count", "40"]));
    all_ok(&r);
    assert!(by_server(&r).keys().all(|n| n.starts_with("node-0")), "{:?}", by_server(&r));
    assert_eq!(by_server(&r).len(), 2);
    // node-1 has no local endpoint for it: refused at once (kube-proxy would drop; an in-node
    // client is better served by an immediate error).
    let r = run.from_pod(1, 0, &["connect", "10.96.0.30:80", "--count", "2"]);
    assert_eq!(r, vec!["err ECONNREFUSED"; 2]);

    // sessionAffinity: one pod keeps its backend over many connections (socket hooks)...
    let r = parse_probe(&run.from_pod(1, 1, &["connect", "10.96.0.31:80", "--count", "30"]));
    all_ok(&r);
    assert_eq!(by_server(&r).len(), 1, "{:?}", by_server(&r));
    // ...and so does an outside client through the NodePort (device hooks, by client address).
    let r = parse_probe(&run.from_client(0, &["connect", "10.230.0.10:30031", "--count", "30"]));
    all_ok(&r);
    assert_eq!(by_server(&r).len(), 1, "{:?}", by_server(&r));
}

#[test]
fn terminating_endpoints_keep_open_connections_and_get_new_ones_only_when_nothing_is_ready() {
    require_root!();
    let cluster = Cluster::new(2, 1, 1);
    let (a, b) = (cluster.nodes[0].pods[0].ip4, cluster.nodes[1].pods[0].ip4);
    let web = svc("web", &["10.96.0.40"], Some(30040), "", "");
    let mut run = Running::start(
        cluster,
        &[("web.yaml", web.file(&[Ep::ready(a, "node-0"), Ep::ready(b, "node-1")]))],
    );

    // Long sessions through the ClusterIP (socket) and the NodePort (device, conntrack).
    let sessions: Vec<_> = (0..6)
        .map(|i| {
            if i % 2 == 0 {
                run.background_from_pod(
                    1,
                    0,
                    &["session", "10.96.0.40:80", "--rounds", "20", "--interval-ms", "60"],
                )
            } else {
                run.background_from_client(
                    0,
                    &["session", "10.230.0.10:30040", "--rounds", "20", "--interval-ms", "60"],
                )
            }
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // node-0's pod starts terminating while they run.
    run.update("web.yaml", &web.file(&[Ep::terminating(a, "node-0"), Ep::ready(b, "node-1")]));
    let fresh =
        parse_probe(&run.from_client(0, &["connect", "10.230.0.10:30040", "--count", "30"]));
    all_ok(&fresh);
    assert_eq!(
        by_server(&fresh).keys().collect::<Vec<_>>(),
        vec!["node-1-pod-0"],
        "no new connection to a terminating pod"
    );
    for s in sessions {
        let out = s.finish();
        assert!(
            out.last().is_some_and(|l| l.starts_with("ok ") && l.ends_with(" 20")),
            "session broke: {out:?}"
        );
    }

    // Nothing ready any more: the serving-but-terminating pods take new connections.
    run.update(
        "web.yaml",
        &web.file(&[Ep::terminating(a, "node-0"), Ep::terminating(b, "node-1")]),
    );
    let r = parse_probe(&run.from_pod(1, 0, &["connect", "10.96.0.40:80", "--count", "30"]));
    all_ok(&r);
    assert_eq!(by_server(&r).len(), 2, "{:?}", by_server(&r));
}

#[test]
fn scaling_while_traffic_runs_fails_nothing_and_new_backends_get_traffic() {
    require_root!();
    let cluster = Cluster::new(2, 2, 1);
    let eps = pods(&cluster, false);
    let web = svc("web", &["10.96.0.50"], Some(30050), "", "");
    let mut run = Running::start(cluster, &[("web.yaml", web.file(&eps[..1]))]);
    // 400 connections each, one every 5 ms (about 2 s), while the service scales 1-2-3-4-2-4.
    let from_pod = run.background_from_pod(
        1,
        1,
        &["connect", "10.96.0.50:80", "--count", "400", "--interval-ms", "5"],
    );
    let from_client = run.background_from_client(
        0,
        &["connect", "10.230.0.10:30050", "--count", "400", "--interval-ms", "5"],
    );
    for n in [2, 3, 4, 2, 4] {
        std::thread::sleep(Duration::from_millis(250));
        run.update("web.yaml", &web.file(&eps[..n]));
    }
    for (who, out) in [("pod", from_pod.finish()), ("client", from_client.finish())] {
        let r = parse_probe(&out);
        assert_eq!(r.len(), 400, "{who}");
        all_ok(&r);
        assert!(by_server(&r).len() >= 3, "{who}: new backends got traffic: {:?}", by_server(&r));
    }
}

#[test]
fn udp_via_cluster_ip_and_nodeport() {
    require_root!();
    let cluster = Cluster::new(2, 2, 1);
    let eps = pods(&cluster, false);
    let dns = Svc::DNS;
    let run = Running::start(cluster, &[("dns.yaml", dns.file(&eps))]);
    let r =
        parse_probe(&run.from_pod(0, 0, &["connect", "10.96.0.53:53", "--udp", "--count", "60"]));
    all_ok(&r);
    assert!(by_server(&r).len() >= 3, "{:?}", by_server(&r));
    assert!(r.iter().flatten().all(|(_, _, from)| from == "10.96.0.53:53"));
    let r = parse_probe(
        &run.from_client(0, &["connect", "10.230.0.11:30053", "--udp", "--count", "60"]),
    );
    all_ok(&r);
    assert!(by_server(&r).len() >= 3, "{:?}", by_server(&r));
    assert!(
        r.iter().flatten().all(|(_, _, from)| from == "10.230.0.11:30053"),
        "answers come from the NodePort"
    );
}

/// Datagrams larger than the path MTU cross in fragments, each given its flow's translation
/// (kube-proxy gets this from netfilter's defragmentation): 4,000-byte queries from outside
/// through a NodePort reach every endpoint whole, the local ones (DNAT) and the remote ones
/// (SNAT), and their 4,000-byte echoes come back whole from the NodePort. IPv4 and IPv6; with
/// tc alone, then with XDP in front (which translates first fragments and leaves the later
/// ones to tc).
#[test]
fn udp_datagrams_larger_than_the_mtu_cross_a_nodeport_in_fragments_both_ways() {
    require_root!();
    let (tc_alone, remote_tc) = big_udp_datagrams_through_a_nodeport(&[]);
    let (with_xdp, remote_xdp) = big_udp_datagrams_through_a_nodeport(&["--xdp"]);
    // Later fragments passed on untouched (`fragment`): with tc alone, only those of flows
    // node-0 itself translated and sent out again, which its tc egress sees too (the two of
    // each request to a remote pod and of its reply: 4 a remote datagram); with XDP also every
    // later fragment XDP handed on to tc: the client's 160, and a remote reply's two. Which
    // datagrams went to a remote pod varies run to run (the client's ports do).
    let beyond_remote = |fragments: u64, per_remote: u64, remote: u64| {
        fragments.saturating_sub(per_remote * remote)
    };
    let (tc_rest, xdp_rest) =
        (beyond_remote(tc_alone, 4, remote_tc), beyond_remote(with_xdp, 6, remote_xdp));
    assert!(
        xdp_rest >= tc_rest + 40 * 2 * 2,
        "{tc_alone} ({remote_tc} remote) then {with_xdp} ({remote_xdp} remote)"
    );
}

/// 40 big datagrams each family through node-0's NodePort, each answered whole: how many
/// later fragments node-0 passed on untouched, and how many datagrams a pod of the other node
/// answered.
fn big_udp_datagrams_through_a_nodeport(agent_args: &[&str]) -> (u64, u64) {
    let cluster = Cluster::new(2, 2, 1);
    let (eps, eps6) = (pods(&cluster, false), pods(&cluster, true));
    let dns6 = Svc {
        name: "dns6",
        cluster_ips: &["fd00:96::53"],
        target_port: 5356,
        node_port: Some(30056),
        ..Svc::DNS
    };
    let run = Running::start_with(
        cluster,
        &[("dns.yaml", Svc::DNS.file(&eps)), ("dns6.yaml", dns6.file(&eps6))],
        agent_args,
    );
    let node0 = (run.cluster.nodes[0].ip4, run.cluster.nodes[0].ip6);
    let mut remote = 0;
    for nodeport in [format!("{}:30053", node0.0), format!("[{}]:30056", node0.1)] {
        let before = run.counter(0, "fragment_translated");
        let args = ["connect", &nodeport, "--udp", "--count", "40", "--size", "4000"];
        let r = parse_probe(&run.from_client(0, &args));
        all_ok(&r);
        assert_eq!(
            by_server(&r).len(),
            4,
            "{nodeport}: every endpoint, local and remote: {:?}",
            by_server(&r)
        );
        assert!(
            r.iter().flatten().all(|(_, _, from)| *from == nodeport),
            "answers come from the NodePort"
        );
        // Three fragments a datagram each way: the two later ones of each went through
        // conntrack by their datagram's first.
        let translated = run.counter(0, "fragment_translated") - before;
        assert!(
            translated >= 40 * 4,
            "{nodeport} {agent_args:?}: {translated} later fragments translated"
        );
        let node1 = format!("{}-", run.cluster.nodes[1].name);
        remote += r.iter().flatten().filter(|(name, ..)| name.starts_with(&node1)).count();
    }
    (run.counter(0, "fragment"), remote as u64)
}

/// A UDP client that keeps its source port (a resolver reusing its socket) moves to a live
/// endpoint once its endpoint leaves the service, instead of sending into the void: the agent
/// flushes the flow's conntrack entries, as kube-proxy flushes conntrack for deleted UDP
/// endpoints. From outside, through a NodePort (the device hooks' conntrack).
#[test]
fn a_udp_client_keeping_its_port_moves_on_when_its_endpoint_leaves() {
    require_root!();
    let cluster = Cluster::new(2, 2, 1);
    let eps = pods(&cluster, false);
    let dns = Svc::DNS;
    let mut run = Running::start(cluster, &[("dns.yaml", dns.file(&eps))]);
    let ask = |run: &Running| {
        let args = ["connect", "10.230.0.10:30053", "--udp", "--sport", "41234"];
        let r = parse_probe(&run.from_client(0, &args));
        r[0].clone().unwrap_or_else(|e| panic!("no answer: {e}")).0
    };
    let first = ask(&run);
    assert_eq!(ask(&run), first, "one flow, one endpoint");

    // Its endpoint leaves the service; the pod itself still answers (as one being replaced
    // does for a while), so a flow left on it would still be answered by it.
    let pod_ip =
        run.cluster.nodes.iter().flat_map(|n| &n.pods).find(|p| p.name == first).unwrap().ip4;
    let rest: Vec<Ep> = eps.iter().filter(|e| e.addr != pod_ip).cloned().collect();
    run.update("dns.yaml", &dns.file(&rest));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now_answering = ask(&run);
    while now_answering == first && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        now_answering = ask(&run);
    }
    assert_ne!(now_answering, first, "the flow stayed on the endpoint that left");
    assert_eq!(ask(&run), now_answering, "and keeps its new endpoint");
    let expired = run.counter(0, "ct_expired");
    assert_eq!(expired, 0, "moved by the flush, not by expiry");
}

#[test]
fn a_connected_udp_socket_whose_endpoint_leaves_is_torn_down_and_reconnects_to_a_live_one() {
    require_root!();
    let cluster = Cluster::new(2, 2, 0);
    let all = pods(&cluster, false);
    let (a, b) = (all[2].clone(), all[3].clone()); // node-1-pod-0, node-1-pod-1
    let dns = Svc::DNS;
    let mut run = Running::start(cluster, &[("dns.yaml", dns.file(std::slice::from_ref(&a)))]);
    // A resolver in a pod of node 0 keeps one socket connected through the ClusterIP (the
    // socket hooks connect it to the pod itself); another socket there is connected to that
    // pod's own address, not through the service.
    let rounds = ["--rounds", "60", "--interval-ms", "100"];
    let through_service =
        run.background_from_pod(0, 1, &[&["udp-session", "10.96.0.53:53"][..], &rounds].concat());
    let a_direct = format!("{}:5353", a.addr);
    let direct =
        run.background_from_pod(0, 1, &[&["udp-session", &a_direct][..], &rounds].concat());
    std::thread::sleep(Duration::from_millis(1500));
    // An endpoint joins: nothing connected is disturbed.
    run.update("dns.yaml", &dns.file(&[a.clone(), b.clone()]));
    std::thread::sleep(Duration::from_millis(1000));
    // The first endpoint leaves (its pod still answers, as one being replaced does for a while).
    run.update("dns.yaml", &dns.file(std::slice::from_ref(&b)));
    let through_service = through_service.finish();
    let direct = direct.finish();

    let pos = |l: &str| through_service.iter().position(|x| x == l);
    let torn = pos("err ECONNABORTED").or_else(|| pos("err EDESTADDRREQ"));
    let torn =
        torn.unwrap_or_else(|| panic!("the socket was never torn down: {through_service:?}"));
    let (before, after) = (&through_service[..torn], &through_service[torn + 1..]);
    // Every line an answer from `who`, whose address the client sees as `peer`; 5 at least.
    let only = |lines: &[String], who: &str, peer: &str| {
        let results = parse_probe(lines);
        assert!(results.len() >= 5, "{lines:?}");
        for r in results {
            let (name, _, seen_peer) = r.unwrap_or_else(|e| panic!("{e}: {lines:?}"));
            assert_eq!((name.as_str(), seen_peer.as_str()), (who, peer), "{lines:?}");
        }
    };
    // Before: the first endpoint only, through 2.5 s and one change, seen as the service.
    only(before, "node-1-pod-0", "10.96.0.53:53");
    // Then one new socket, on the endpoint left, to the end.
    assert_eq!(after.first().map(String::as_str), Some("reconnected"), "{through_service:?}");
    only(&after[1..], "node-1-pod-1", "10.96.0.53:53");
    // The socket connected to the pod itself was left alone: answered by it every round.
    assert_eq!(direct.len(), 60, "{direct:?}");
    only(&direct, "node-1-pod-0", &a_direct);

    let metrics = run.metrics(0);
    assert_eq!(metric(&metrics, "lb_udp_sockets_destroyed_total"), 1.0, "{metrics}");
}

#[test]
fn a_udp_client_of_a_pod_with_nothing_listening_is_told_at_once_as_with_kube_proxy() {
    require_root!();
    let cluster = Cluster::new(2, 1, 1);
    let all = pods(&cluster, false);
    // Nothing listens on the target port: each pod's kernel answers "port unreachable".
    let closed = |name, ip, node_port| Svc {
        name,
        cluster_ips: ip,
        port: 53,
        protocol: "UDP",
        target_port: 5399,
        node_port: Some(node_port),
        spec: "",
        extra: "",
    };
    let (local, remote) =
        (closed("local", &["10.96.0.60"], 30060), closed("remote", &["10.96.0.61"], 30061));
    let run = Running::start(
        cluster,
        &[
            ("local.yaml", local.file(std::slice::from_ref(&all[0]))),
            ("remote.yaml", remote.file(std::slice::from_ref(&all[1]))),
        ],
    );
    // Through node-0: its own pod (translated back on egress), and node-1's (SNATed, the
    // error comes back to node-0 and is sent on to the client).
    for node_port in ["30060", "30061"] {
        let target = format!("10.230.0.10:{node_port}");
        let args = ["udp-session", &target, "--rounds", "3", "--interval-ms", "50"];
        let lines = run.from_client(0, &args);
        assert_eq!(lines, ["err ECONNREFUSED"; 3], "NodePort {node_port}");
    }
    let translated = run.counter(0, "icmp_error_translated");
    assert_eq!(translated, 6, "{:?}", run.counters(0));
}

#[test]
fn load_balancer_source_ranges_admit_only_listed_clients() {
    require_root!();
    let cluster = Cluster::new(2, 1, 2);
    let eps = pods(&cluster, false);
    let lb = svc(
        "ranged",
        &["10.96.0.70"],
        Some(30070),
        "  type: LoadBalancer\n  loadBalancerSourceRanges: [10.230.0.100/32]\n",
        "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.70\n",
    );
    let run = Running::start(cluster, &[("lb.yaml", lb.file(&eps))]);
    for c in &run.cluster.clients {
        c.ns.ip(&["route", "add", "198.51.100.70/32", "via", "10.230.0.10"]);
    }
    let allowed =
        parse_probe(&run.from_client(0, &["connect", "198.51.100.70:80", "--count", "10"]));
    all_ok(&allowed);
    let denied =
        run.from_client(1, &["connect", "198.51.100.70:80", "--count", "2", "--timeout-ms", "400"]);
    assert!(denied.iter().all(|l| l.starts_with("err")), "{denied:?}");
}

#[test]
fn headless_services_and_non_service_traffic_are_left_alone() {
    require_root!();
    let cluster = Cluster::new(1, 2, 0);
    let eps = pods(&cluster, false);
    let headless = svc("headless", &["None"], None, "", "");
    let yaml = headless.file(&eps).replace("  clusterIPs: [\"None\"]\n  ipFamilies: [IPv4]\n", "");
    let run = Running::start(cluster, &[("headless.yaml", yaml), (
        "external-name.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: default}\nspec: {type: ExternalName, externalName: example.com}\n".into(),
    )]);
    assert!(
        run.agents[0].log().iter().any(|l| l.contains("service_ports=0")),
        "{:?}",
        run.agents[0].log()
    );
    let pod = run.cluster.nodes[0].pods[1].ip4;
    let r = parse_probe(&run.from_pod(0, 0, &["connect", &format!("{pod}:8080"), "--count", "5"]));
    all_ok(&r);
    assert!(
        r.iter()
            .flatten()
            .all(|(n, _, peer)| n == "node-0-pod-1" && *peer == format!("{pod}:8080"))
    );
}

#[test]
fn ipv6_cluster_ip_and_nodeport() {
    require_root!();
    let cluster = Cluster::new(2, 2, 1);
    let eps = pods(&cluster, true);
    let web6 = Svc::WEB6;
    let run = Running::start(cluster, &[("web6.yaml", web6.file(&eps))]);
    let r = parse_probe(&run.from_pod(1, 0, &["connect", "[fd00:96::80]:80", "--count", "80"]));
    all_ok(&r);
    assert_eq!(by_server(&r).len(), 4, "{:?}", by_server(&r));
    let node0 = run.cluster.nodes[0].ip6;
    let client = run.cluster.clients[0].ip6;
    let r = parse_probe(
        &run.from_client(0, &["connect", &format!("[{node0}]:30086"), "--count", "80"]),
    );
    all_ok(&r);
    assert_eq!(by_server(&r).len(), 4, "{:?}", by_server(&r));
    for (name, seen, _) in r.iter().flatten() {
        let want: IpAddr = if name.starts_with("node-0") { client } else { node0 };
        assert_eq!(host_of(seen), want.to_string(), "{name}");
    }
}

#[test]
fn hairpin_and_no_endpoint_refusal() {
    require_root!();
    let cluster = Cluster::new(1, 1, 1);
    let me = cluster.nodes[0].pods[0].ip4;
    let node = cluster.nodes[0].ip4;
    let web = svc("web", &["10.96.0.90"], Some(30090), "", "");
    let empty = svc("empty", &["10.96.0.91"], Some(30091), "", "");
    let run = Running::start(
        cluster,
        &[("web.yaml", web.file(&[Ep::ready(me, "node-0")])), ("empty.yaml", empty.file(&[]))],
    );
    // The only backend reaches its own service, by ClusterIP and by its node's NodePort.
    for target in ["10.96.0.90:80".to_string(), format!("{node}:30090")] {
        let r = parse_probe(&run.from_pod(0, 0, &["connect", &target, "--count", "5"]));
        all_ok(&r);
        assert!(r.iter().flatten().all(|(n, seen, peer)| n == "node-0-pod-0"
            && host_of(seen) == me.to_string()
            && *peer == target));
    }
    // No endpoint: refused at once, from a pod (socket hooks) and from outside (ICMP port
    // unreachable from the device hook).
    let t = Instant::now();
    let r = run.from_pod(0, 0, &["connect", "10.96.0.91:80", "--count", "3"]);
    assert_eq!(r, vec!["err ECONNREFUSED"; 3]);
    let r = run.from_client(0, &["connect", &format!("{node}:30091"), "--count", "3"]);
    assert_eq!(r, vec!["err ECONNREFUSED"; 3]);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[test]
fn a_tcp_reset_refuses_clients_whose_firewall_drops_icmp() {
    require_root!();
    let cluster = Cluster::new(1, 1, 1);
    let node = cluster.nodes[0].ip4;
    // The outside client's firewall drops every ICMP message.
    let fw = cluster.clients[0].ns.exec("iptables", &["-A", "INPUT", "-p", "icmp", "-j", "DROP"]);
    assert!(fw.status.success(), "{fw:?}");
    let empty = svc("empty", &["10.96.0.91"], Some(30091), "", "");
    let mut run = Running::start(cluster, &[("empty.yaml", empty.file(&[]))]);
    let target = format!("{node}:30091");

    // kube-proxy's way (ICMP port unreachable) never reaches it: the client waits.
    let r = run.from_client(0, &["connect", &target, "--count", "2", "--timeout-ms", "300"]);
    assert!(r.iter().all(|l| l.starts_with("err") && !l.contains("REFUSED")), "{r:?}");

    // A TCP reset does: refused at once.
    run.stop_agent(0);
    run.agent_args[0].extend(["--reject-tcp-with".to_string(), "reset".to_string()]);
    run.restart_agent(0);
    let t = Instant::now();
    let r = run.from_client(0, &["connect", &target, "--count", "3"]);
    assert_eq!(r, vec!["err ECONNREFUSED"; 3]);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[test]
fn host_processes_reach_nodeports_on_localhost_and_pods_keep_their_own_loopback() {
    require_root!();
    let cluster = Cluster::new(2, 1, 0);
    let eps = pods(&cluster, false);
    let web = svc("web", &["10.96.0.10"], Some(30080), "  type: NodePort\n", "");
    let run = Running::start(cluster, &[("web.yaml", web.file(&eps))]);
    // As with kube-proxy's iptables rules: a node's own processes reach 127.0.0.1:NodePort.
    let r = parse_probe(&run.from_host(0, &["connect", "127.0.0.1:30080", "--count", "40"]));
    all_ok(&r);
    assert_eq!(by_server(&r).len(), 2, "every endpoint, both nodes: {:?}", by_server(&r));
    assert!(r.iter().flatten().all(|(_, _, peer)| peer == "127.0.0.1:30080"), "{r:?}");
    // A pod's 127.0.0.1 is its own: nothing listens there.
    let r = run.from_pod(0, 0, &["connect", "127.0.0.1:30080", "--timeout-ms", "500"]);
    assert_eq!(r, ["err ECONNREFUSED"]);
}

/// Endpoints on the nodes' own addresses (hostNetwork pods; the `kubernetes` service's API
/// servers): reached by ClusterIP from pods and host processes, and by NodePort from outside,
/// where node-0's own endpoint gets the packet delivered to itself and node-1's gets SNAT.
#[test]
fn host_network_endpoints_answer_by_cluster_ip_from_pods_and_hosts_and_by_nodeport() {
    require_root!();
    let cluster = Cluster::new(2, 1, 1);
    let eps: Vec<Ep> = cluster.nodes.iter().map(|n| Ep::ready(n.ip4, &n.name)).collect();
    let _servers: Vec<_> = cluster
        .nodes
        .iter()
        .map(|n| {
            lb_tests::proc::Server::start(
                n.ns.name(),
                &format!("host-{}", n.name),
                &["0.0.0.0:6443"],
                &[],
            )
        })
        .collect();
    let api = Svc {
        name: "kubernetes",
        cluster_ips: &["10.96.0.1"],
        port: 443,
        protocol: "TCP",
        target_port: 6443,
        node_port: Some(30443),
        spec: "",
        extra: "",
    };
    let run = Running::start(cluster, &[("api.yaml", api.file(&eps))]);
    let node0 = run.cluster.nodes[0].ip4.to_string();
    let pod = run.cluster.nodes[1].pods[0].ip4.to_string();
    let r = parse_probe(&run.from_pod(1, 0, &["connect", "10.96.0.1:443", "--count", "30"]));
    all_ok(&r);
    assert_eq!(by_server(&r).len(), 2, "{:?}", by_server(&r));
    assert!(
        r.iter().flatten().all(|(_, seen, from)| host_of(seen) == pod && from == "10.96.0.1:443"),
        "{r:?}"
    );
    let r = parse_probe(&run.from_host(0, &["connect", "10.96.0.1:443", "--count", "30"]));
    all_ok(&r);
    assert_eq!(by_server(&r).len(), 2, "{:?}", by_server(&r));
    let client = run.cluster.clients[0].ip4.to_string();
    let target = format!("{node0}:30443");
    let r = parse_probe(&run.from_client(0, &["connect", &target, "--count", "30"]));
    all_ok(&r);
    assert_eq!(by_server(&r).len(), 2, "{:?}", by_server(&r));
    for (name, seen, from) in r.iter().flatten() {
        assert_eq!(from, &target);
        let want = if name == "host-node-0" { &client } else { &node0 };
        assert_eq!(&host_of(seen), want, "{name}");
    }
}

/// The packets a namespace forwarded so far (`Ip: ForwDatagrams` of its /proc/net/snmp),
/// once that stops moving (two reads 100 ms apart agree; 3 s at most): the
/// closing segments of connections just ended may still be crossing the router.
fn forwarded_settled(ns: &lb_tests::netns::NetNs) -> u64 {
    let forwarded = || ns.snmp("Ip", "ForwDatagrams");
    let mut last = forwarded();
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        let now = forwarded();
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// A LoadBalancer IP behaves like an address a host owns: it answers pings, and a port no
/// service has is dropped on the node. Before, such packets went back out by the node's
/// routes; where the default route leads to the router that sent them (here a second client
/// is that router), they looped between the two until their TTL ran out.
#[test]
fn a_load_balancer_ip_answers_pings_and_its_unknown_ports_do_not_loop() {
    require_root!();
    let cluster = Cluster::new(1, 1, 2);
    let eps = pods(&cluster, false);
    let lb = svc(
        "vip",
        &["10.96.0.90"],
        Some(30090),
        "  type: LoadBalancer\n",
        "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.90\n",
    );
    let run = Running::start(cluster, &[("lb.yaml", lb.file(&eps))]);
    let (client, router, node) =
        (&run.cluster.clients[0], &run.cluster.clients[1], &run.cluster.nodes[0]);
    client.ns.ip(&["route", "add", "198.51.100.90/32", "via", "10.230.0.101"]);
    router.ns.ip(&["route", "add", "198.51.100.90/32", "via", "10.230.0.10"]);
    router.ns.sysctl("net.ipv4.ip_forward", "1");
    router.ns.sysctl("net.ipv4.conf.all.send_redirects", "0");
    router.ns.sysctl("net.ipv4.conf.eth0.send_redirects", "0");
    node.ns.ip(&["route", "add", "default", "via", "10.230.0.101"]);

    let pings =
        run.from_client(0, &["ping", "198.51.100.90", "--count", "3", "--timeout-ms", "500"]);
    // TTL 64 from the node, one less through the router.
    assert_eq!(pings, ["ok 198.51.100.90 ttl=63"; 3], "answered by the node, from the VIP");
    assert_eq!(run.counter(0, "echo_reply"), 3);
    // The service's port works.
    all_ok(&parse_probe(&run.from_client(0, &["connect", "198.51.100.90:80", "--count", "3"])));

    let before = forwarded_settled(&router.ns);
    let t = Instant::now();
    let tcp = run.from_client(0, &["connect", "198.51.100.90:81", "--timeout-ms", "300"]);
    let udp = run.from_client(0, &["connect", "198.51.100.90:81", "--udp", "--timeout-ms", "300"]);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!([tcp[0].as_str(), udp[0].as_str()], ["err TIMEOUT"; 2], "no answer");
    assert_eq!(
        router.ns.snmp("Ip", "ForwDatagrams") - before,
        2,
        "each forwarded once, none came back"
    );
    assert_eq!(run.counter(0, "drop_unknown_port"), 2, "the SYN and the datagram");
    let e = run.lbctl_json(0, &["explain", "10.230.0.100:45000", "198.51.100.90:81"]);
    assert!(e["verdict"].as_str().unwrap_or_default().starts_with("drop"), "{e}");
    // lbctl explains pings too: the VIP's answered, the node's own address left to its stack.
    let verdict = |dst: &str| {
        let e = run.lbctl_json(0, &["explain", "10.230.0.100", dst]);
        let to = dst.trim_end_matches("/icmp");
        assert_eq!(e["packet"], format!("10.230.0.100 -> {to} ICMP echo request"), "{e}");
        e["verdict"].as_str().unwrap_or_default().to_string()
    };
    let vip = verdict("198.51.100.90/icmp");
    assert!(vip.starts_with("answered: an echo reply from 198.51.100.90"), "{vip}");
    let own = verdict("10.230.0.10/icmp");
    assert!(own.starts_with("pass to the stack"), "{own}");
    assert_eq!(run.counter(0, "echo_reply"), 3, "explained on private copies, not counted");
}
