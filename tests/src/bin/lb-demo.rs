//! The demo: a two-node mini-cluster in network namespaces, one `lb-agent` per node serving a
//! manifests folder, pods answering with their name, and an outside client. It walks through
//! what users of kube-proxy rely on and prints who answered and what each side saw.

use std::time::Instant;

use lb_agent::dataplane::counters;
use lb_tests::{
    cluster::{Cluster, Running, by_server, host_of, parse_probe},
    manifests::{Ep, Svc},
};

const WEB: Svc = Svc {
    name: "web",
    cluster_ips: &["10.96.0.10"],
    port: 80,
    protocol: "TCP",
    target_port: 8080,
    node_port: Some(30080),
    spec: "",
    extra: "",
};
const LOCAL: Svc = Svc {
    name: "web-local",
    cluster_ips: &["10.96.0.11"],
    port: 80,
    protocol: "TCP",
    target_port: 8080,
    node_port: Some(30081),
    spec: "  externalTrafficPolicy: Local\n",
    extra: "",
};
const EMPTY: Svc = Svc {
    name: "empty",
    cluster_ips: &["10.96.0.12"],
    port: 80,
    protocol: "TCP",
    target_port: 8080,
    node_port: None,
    spec: "",
    extra: "",
};

fn show(title: &str, lines: &[String]) -> Vec<Result<(String, String, String), String>> {
    let results = parse_probe(lines);
    let ok = results.iter().filter(|r| r.is_ok()).count();
    println!("\n{title}");
    println!("  {ok} of {} answered", results.len());
    for (server, n) in by_server(&results) {
        let seen: std::collections::BTreeSet<String> = results
            .iter()
            .flatten()
            .filter(|(s, _, _)| *s == server)
            .map(|(_, seen, _)| host_of(seen))
            .collect();
        println!(
            "  {server:<14} {n:>4} connections, saw the client as {}",
            seen.into_iter().collect::<Vec<_>>().join(",")
        );
    }
    let peers: std::collections::BTreeSet<&str> =
        results.iter().flatten().map(|(_, _, p)| p.as_str()).collect();
    if !peers.is_empty() {
        println!(
            "  the client saw its peer as {}",
            peers.into_iter().collect::<Vec<_>>().join(",")
        );
    }
    let errors: std::collections::BTreeSet<&str> =
        results.iter().filter_map(|r| r.as_ref().err()).map(String::as_str).collect();
    if !errors.is_empty() {
        println!("  errors: {}", errors.into_iter().collect::<Vec<_>>().join(","));
    }
    results
}

fn main() {
    println!("lb demo: 2 nodes x 2 pods and an outside client, in network namespaces");
    let cluster = Cluster::new(2, 2, 1);
    let eps: Vec<Ep> = cluster
        .nodes
        .iter()
        .flat_map(|n| n.pods.iter().map(move |p| Ep::ready(p.ip4, &n.name)))
        .collect();
    let local_eps: Vec<Ep> = eps.iter().filter(|e| e.node == "node-0").cloned().collect();
    for n in &cluster.nodes {
        let pods: Vec<String> = n.pods.iter().map(|p| format!("{} {}", p.name, p.ip4)).collect();
        println!("  {} {} (pods: {})", n.name, n.ip4, pods.join(", "));
    }
    println!("  outside client {}", cluster.clients[0].ip4);
    let mut run = Running::start(
        cluster,
        &[
            ("web.yaml", WEB.file(&eps)),
            ("local.yaml", LOCAL.file(&local_eps)),
            ("empty.yaml", EMPTY.file(&[])),
        ],
    );
    println!("  one lb-agent per node, serving {}", run.manifests.display());
    let node0 = run.cluster.nodes[0].ip4;

    show(
        "1. pod node-1-pod-0 -> ClusterIP web 10.96.0.10:80 (socket hooks), 200 connections",
        &run.from_pod(1, 0, &["connect", "10.96.0.10:80", "--count", "200"]),
    );
    show(
        &format!(
            "2. outside client -> NodePort {node0}:30080, externalTrafficPolicy Cluster, 200 connections"
        ),
        &run.from_client(0, &["connect", &format!("{node0}:30080"), "--count", "200"]),
    );
    show(
        &format!(
            "3. outside client -> NodePort {node0}:30081, externalTrafficPolicy Local, 100 connections"
        ),
        &run.from_client(0, &["connect", &format!("{node0}:30081"), "--count", "100"]),
    );
    show(
        &format!(
            "4. outside client -> NodePort {}:30081 (node-1 has no local endpoint), 2 attempts",
            run.cluster.nodes[1].ip4
        ),
        &run.from_client(
            0,
            &[
                "connect",
                &format!("{}:30081", run.cluster.nodes[1].ip4),
                "--count",
                "2",
                "--timeout-ms",
                "500",
            ],
        ),
    );

    let remaining: Vec<Ep> = eps
        .iter()
        .filter(|e| !e.addr.to_string().ends_with(".2") || e.node != "node-0")
        .cloned()
        .collect();
    let t = Instant::now();
    run.update("web.yaml", &WEB.file(&remaining));
    println!(
        "\n5. node-0-pod-0 removed from the EndpointSlice: all agents reprogrammed in {:?}",
        t.elapsed()
    );
    show(
        "   pod node-1-pod-0 -> ClusterIP again, 100 connections",
        &run.from_pod(1, 0, &["connect", "10.96.0.10:80", "--count", "100"]),
    );

    let t = Instant::now();
    let lines = run.from_host(0, &["connect", "10.96.0.12:80", "--count", "3"]);
    show(
        &format!(
            "6. host process of node-0 -> service without endpoints (answered in {:?})",
            t.elapsed()
        ),
        &lines,
    );

    println!("\ndatapath counters on node-0 (from its pinned maps):");
    for (name, value) in counters::global_pinned(&run.pins[0].path).expect("read counters") {
        if value > 0 {
            println!("  {name:<20} {value:>8}");
        }
    }
    drop(run);
    println!("\neverything created (namespaces, cgroups, pins) has been removed.");
}
