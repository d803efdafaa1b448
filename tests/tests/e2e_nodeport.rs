//! Outside clients through real agents on a two-node mini-cluster: NodePort with
//! externalTrafficPolicy Cluster (backends on both nodes, SNAT for the remote ones) and Local
//! (client address kept, only local pods, nodes without one stay silent); pods reaching a
//! ClusterIP through the same agents.

use lb_tests::{
    cluster::{Cluster, Running, by_server, host_of, parse_probe},
    manifests::Svc,
    require_root,
};

const CLUSTER_SVC: Svc = Svc::WEB;

const LOCAL_SVC: Svc = Svc {
    name: "local",
    cluster_ips: &["10.96.0.11"],
    port: 80,
    protocol: "TCP",
    target_port: 8080,
    node_port: Some(30081),
    spec: "  externalTrafficPolicy: Local\n",
    extra: "",
};

#[test]
fn nodeport_cluster_and_local_policies_from_an_outside_client() {
    require_root!();
    let cluster = Cluster::new(2, 2, 1);
    let pods: Vec<_> = cluster
        .nodes
        .iter()
        .flat_map(|n| n.pods.iter().map(move |p| (p.ip4, n.name.clone())))
        .collect();
    let eps: Vec<_> = pods.iter().map(|(ip, n)| lb_tests::manifests::Ep::ready(*ip, n)).collect();
    // The Local service has endpoints on node-0 only.
    let local_eps: Vec<_> = eps.iter().filter(|e| e.node == "node-0").cloned().collect();
    let run = Running::start(
        cluster,
        &[("web.yaml", CLUSTER_SVC.file(&eps)), ("local.yaml", LOCAL_SVC.file(&local_eps))],
    );
    let node0 = run.cluster.nodes[0].ip4.to_string();
    let node1 = run.cluster.nodes[1].ip4.to_string();
    let client = run.cluster.clients[0].ip4.to_string();

    // Cluster policy: every backend, remote ones see node-0's address, local ones the client.
    let results =
        parse_probe(&run.from_client(0, &["connect", &format!("{node0}:30080"), "--count", "200"]));
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    let spread = by_server(&results);
    assert_eq!(spread.len(), 4, "{spread:?}");
    assert!(spread.values().all(|&n| n >= 20), "{spread:?}");
    for (name, seen, peer) in results.iter().flatten() {
        assert_eq!(peer, &format!("{node0}:30080"), "the client talks to the NodePort");
        let want = if name.starts_with("node-0") { &client } else { &node0 };
        assert_eq!(&host_of(seen), want, "{name}");
    }

    // The same NodePort on node-1 works too.
    let results =
        parse_probe(&run.from_client(0, &["connect", &format!("{node1}:30080"), "--count", "40"]));
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");

    // Local policy: only node-0's pods, the client's own address.
    let results =
        parse_probe(&run.from_client(0, &["connect", &format!("{node0}:30081"), "--count", "60"]));
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert!(
        by_server(&results).keys().all(|n| n.starts_with("node-0")),
        "{:?}",
        by_server(&results)
    );
    assert!(results.iter().flatten().all(|(_, seen, _)| host_of(seen) == client));
    // node-1 has no local endpoint: it drops (the client times out).
    let dropped = run.from_client(
        0,
        &["connect", &format!("{node1}:30081"), "--count", "2", "--timeout-ms", "400"],
    );
    assert!(dropped.iter().all(|l| l.starts_with("err")), "{dropped:?}");

    // A pod on node-1 reaches the ClusterIP (socket hooks via the agent), all four backends.
    let results = parse_probe(&run.from_pod(1, 0, &["connect", "10.96.0.10:80", "--count", "100"]));
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(by_server(&results).len(), 4, "{:?}", by_server(&results));
}
