//! Pods' service traffic translated on their devices (`--pod-devices`), with the socket hooks
//! kept to the host's namespace (`--socket-lb-host-namespace-only`): what a service mesh needs.
//! Istio's sidecar takes a pod's connections to services with a redirect rule in the pod's
//! namespace that matches the service address; socket-level translation rewrites the address
//! at connect(), before that rule runs, and the mesh is bypassed. Real agents, real TCP/UDP.

use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TcAttachType};
use lb_tests::{
    cluster::{Cluster, Running, by_server, host_of, metric, parse_probe},
    manifests::{Ep, Svc},
    proc::Server,
    require_root,
};

const POD_FLAGS: &[&str] = &["--pod-devices", "p+", "--socket-lb-host-namespace-only"];

/// A ClusterIP service, port 80 to the pods' 8080/TCP.
fn web(name: &'static str, ip: &'static [&'static str]) -> Svc<'static> {
    Svc { name, cluster_ips: ip, node_port: None, ..Svc::WEB }
}

/// A UDP service whose endpoints have nothing listening on the target port.
fn closed(name: &'static str, ip: &'static [&'static str]) -> Svc<'static> {
    Svc { port: 53, protocol: "UDP", target_port: 5399, ..web(name, ip) }
}

fn all_ok(results: &[Result<(String, String, String), String>]) {
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(failed.is_empty(), "{} of {} failed: {:?}", failed.len(), results.len(), failed);
}

/// Puts an Istio-style redirect in pod (0, 1): its connections to 10.96.0.100:80 go to a
/// "sidecar" listening on port 15001 in the pod (returned: it serves while held). Then asks
/// that service 10 times from the pod: who answered?
fn through_a_sidecar(run: &Running) -> (Server, std::collections::BTreeMap<String, usize>) {
    let pod = &run.cluster.nodes[0].pods[1];
    let sidecar = Server::start(pod.ns.name(), "sidecar", &["0.0.0.0:15001"], &[]);
    for rule in [
        "add table ip mesh",
        "add chain ip mesh out { type nat hook output priority -100 ; }",
        "add rule ip mesh out ip daddr 10.96.0.100 tcp dport 80 redirect to :15001",
    ] {
        let out = pod.ns.exec("nft", &rule.split(' ').collect::<Vec<_>>());
        assert!(out.status.success(), "nft {rule}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let r = parse_probe(&run.from_pod(0, 1, &["connect", "10.96.0.100:80", "--count", "10"]));
    all_ok(&r);
    (sidecar, by_server(&r))
}

/// With socket-level translation everywhere (the default), the sidecar's rule never matches:
/// the backends answer. With the pod hooks and the socket hooks kept to the host, the sidecar
/// answers every connection.
#[test]
fn a_sidecars_redirect_sees_the_service_address_only_with_the_socket_hooks_kept_to_the_host() {
    require_root!();
    for flags in [&[][..], POD_FLAGS] {
        let cluster = Cluster::new(1, 2, 0);
        let files = [("web.yaml", web("web", &["10.96.0.100"]).file(&cluster.all_pods(false)))];
        let run = Running::start_with(cluster, &files, flags);
        let (_sidecar, answered) = through_a_sidecar(&run);
        if flags.is_empty() {
            assert!(!answered.contains_key("sidecar"), "bypassed: {answered:?}");
        } else {
            assert_eq!(answered.get("sidecar"), Some(&10), "{answered:?}");
        }
    }
}

/// Pods reach services through their devices' hooks: every endpoint (on both nodes) answers,
/// sees the pod's own address, and the pod sees the service as its peer; UDP (DNS) too; a pod
/// reaching itself is answered by itself (SNAT to the node, as kube-proxy's hairpin
/// masquerade); a service without endpoints refuses at once. The socket hooks translate none
/// of it, and still serve host processes. A pod created while the agent runs gets the hooks
/// within moments; a deleted pod's link pins go.
#[test]
fn pods_reach_services_through_their_devices_and_new_pods_are_hooked_as_they_come() {
    require_root!();
    let cluster = Cluster::new(2, 2, 0);
    let me = cluster.nodes[0].pods[0].ip4;
    let eps = cluster.all_pods(false);
    let web6 = Svc { target_port: 8086, ..web("web6", &["fd00:96::100"]) };
    let files = [
        ("web.yaml", web("web", &["10.96.0.100"]).file(&eps)),
        ("dns.yaml", Svc::DNS.file(&eps)),
        ("self.yaml", web("self", &["10.96.0.101"]).file(&[Ep::ready(me, "node-0")])),
        ("empty.yaml", web("empty", &["10.96.0.102"]).file(&[])),
        ("closed-local.yaml", closed("closed-local", &["10.96.0.103"]).file(&eps[0..1])),
        ("closed-remote.yaml", closed("closed-remote", &["10.96.0.104"]).file(&eps[2..3])),
        ("web6.yaml", web6.file(&cluster.all_pods(true))),
    ];
    let mut run = Running::start_with(cluster, &files, POD_FLAGS);
    assert_eq!(metric(&run.metrics(0), "lb_pod_devices_attached"), 2.0);
    let status = run.lbctl_json(0, &["status"]);
    assert_eq!(status["pod_devices"], serde_json::json!(["p0", "p1"]), "{status}");

    let r = parse_probe(&run.from_pod(0, 0, &["connect", "10.96.0.100:80", "--count", "60"]));
    all_ok(&r);
    assert_eq!(by_server(&r).len(), 4, "every endpoint, both nodes: {:?}", by_server(&r));
    let node0 = run.cluster.nodes[0].ip4.to_string();
    for (name, seen, peer) in r.iter().flatten() {
        // The pod itself is an endpoint too: reaching itself, it comes from the node (SNAT).
        let want = if name == "node-0-pod-0" { node0.clone() } else { me.to_string() };
        assert_eq!(host_of(seen), want, "{name}: the pod itself, no SNAT but for the hairpin");
        assert_eq!(peer, "10.96.0.100:80", "the pod's peer is the service");
    }
    // lbctl explain from a pod says what its device's hook does (run through it).
    let e = run.lbctl_json(0, &["explain", &me.to_string(), "10.96.0.100:80", "--from", "pod"]);
    assert_eq!(e["hook"], "tc ingress of the pod's device", "{e}");
    assert!(e["rewritten"].as_str().is_some_and(|r| r.ends_with(":8080")), "{e}");
    assert_eq!(e["snat"], false, "{e}");
    let r =
        parse_probe(&run.from_pod(1, 1, &["connect", "10.96.0.53:53", "--udp", "--count", "40"]));
    all_ok(&r);
    assert!(by_server(&r).len() >= 3, "{:?}", by_server(&r));
    assert!(r.iter().flatten().all(|(_, _, from)| from == "10.96.0.53:53"));

    let r = parse_probe(&run.from_pod(0, 0, &["connect", "10.96.0.101:80", "--count", "5"]));
    all_ok(&r);
    assert!(
        r.iter().flatten().all(|(n, seen, _)| n == "node-0-pod-0" && host_of(seen) == node0),
        "{r:?}"
    );
    let t = Instant::now();
    let r = run.from_pod(0, 1, &["connect", "10.96.0.102:80", "--count", "3"]);
    assert_eq!(r, vec!["err ECONNREFUSED"; 3]);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // A ClusterIP's port no service has: refused at once too, not routed out of the node to
    // time out; a port no frontend has (81), another service's port (53, the DNS service's).
    let t = Instant::now();
    for target in ["10.96.0.100:81", "10.96.0.100:53"] {
        let r = run.from_pod(0, 1, &["connect", target, "--count", "2"]);
        assert_eq!(r, vec!["err ECONNREFUSED"; 2], "{target}");
    }
    let udp = ["udp-session", "10.96.0.100:9999", "--rounds", "2", "--interval-ms", "50"];
    assert_eq!(run.from_pod(0, 1, &udp), ["err ECONNREFUSED"; 2]);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(run.counter(0, "reject_unknown_port"), 6, "one packet each");
    let e = run.lbctl_json(0, &["explain", &me.to_string(), "10.96.0.100:81", "--from", "pod"]);
    let verdict = e["verdict"].as_str().unwrap_or_default();
    assert!(verdict.starts_with("reject") && verdict.contains("no such port"), "{e}");

    // IPv6: the same, every endpoint, the pod's own address seen (but by itself).
    let r = parse_probe(&run.from_pod(0, 1, &["connect", "[fd00:96::100]:80", "--count", "60"]));
    all_ok(&r);
    assert_eq!(by_server(&r).len(), 4, "{:?}", by_server(&r));
    let (me6, node6) = (run.cluster.nodes[0].pods[1].ip6, run.cluster.nodes[0].ip6);
    for (name, seen, peer) in r.iter().flatten() {
        let want = if name == "node-0-pod-1" { node6 } else { me6 };
        assert_eq!(host_of(seen), want.to_string(), "{name}");
        assert_eq!(peer, "[fd00:96::100]:80");
    }

    // UDP to endpoints where nothing listens: their port unreachable reaches the pod as the
    // service's (translated where it enters the pod), at once.
    for ip in ["10.96.0.103:53", "10.96.0.104:53"] {
        let lines =
            run.from_pod(0, 1, &["udp-session", ip, "--rounds", "3", "--interval-ms", "50"]);
        assert_eq!(lines, ["err ECONNREFUSED"; 3], "{ip}");
    }

    assert_eq!(run.counter(0, "sock_translated"), 0, "pods' sockets are left alone");
    assert!(run.counter(0, "tc_from_pod_packets") > 0);
    let r = parse_probe(&run.from_host(0, &["connect", "10.96.0.100:80", "--count", "4"]));
    all_ok(&r);
    assert_eq!(
        run.counter(0, "sock_translated"),
        4,
        "host processes keep socket-level translation"
    );

    // A session from a pod across an agent stop and restart: the pod hooks stay, the flow
    // keeps its backend, and the new agent swaps its programs into the pinned links.
    let session = run.background_from_pod(
        0,
        1,
        &["session", "10.96.0.100:80", "--rounds", "60", "--interval-ms", "50"],
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(run.stop_agent(0).success());
    std::thread::sleep(Duration::from_millis(300));
    run.restart_agent(0);
    // Said once a hook for the node's own (eth0's two, the cgroup's eight), not for each pod.
    let replaced = run.agents[0].count_log("program replaced in the pinned link");
    assert_eq!(replaced, 10, "{}", run.agents[0].log().join("\n"));
    let summary = run.agents[0].count_log("pod devices changed");
    assert_eq!(summary, 1, "{}", run.agents[0].log().join("\n"));
    let out = session.finish();
    assert!(out.last().is_some_and(|l| l.starts_with("ok ") && l.ends_with(" 60")), "{out:?}");
    let tcx = |dev: &'static str, dir| {
        run.cluster.nodes[0].ns.run(move || {
            let (_, progs) = SchedClassifier::query_tcx(dev, dir).expect("query tcx");
            progs.iter().map(|p| p.name_as_str().unwrap_or("?").to_owned()).collect::<Vec<_>>()
        })
    };
    assert_eq!(tcx("p0", TcAttachType::Ingress), ["tc_from_pod"], "one program a hook");
    assert_eq!(tcx("p0", TcAttachType::Egress), ["tc_to_pod"]);
    assert_eq!(tcx("eth0", TcAttachType::Ingress), ["tc_ingress"]);

    // A pod scheduled now: hooked as its device appears.
    let j = run.cluster.add_pod(0);
    let start = Instant::now();
    while metric(&run.metrics(0), "lb_pod_devices_attached") != 3.0 {
        assert!(start.elapsed() < Duration::from_secs(3), "the new pod's device was not hooked");
        std::thread::sleep(Duration::from_millis(20));
    }
    let hooked_in = start.elapsed();
    let r = parse_probe(&run.from_pod(0, j, &["connect", "10.96.0.100:80", "--count", "8"]));
    all_ok(&r);
    let pin = run.pins[0].path.join("links").join(format!("pod-ingress@p{j}"));
    assert!(pin.exists(), "{}", pin.display());
    // Deleted: its links' pins go with it.
    drop(run.cluster.nodes[0].pods.pop());
    let start = Instant::now();
    while pin.exists() || metric(&run.metrics(0), "lb_pod_devices_attached") != 2.0 {
        assert!(start.elapsed() < Duration::from_secs(3), "the deleted pod's pins stayed");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("a new pod's device hooked in {hooked_in:?}");
}
