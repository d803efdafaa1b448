//! The kube-proxy rule sets the benchmark compares against actually work: real traffic through
//! them in the mini-cluster reaches every backend, in iptables and in nftables mode.

use lb_tests::{
    cluster::{Cluster, by_server, parse_probe},
    kubeproxy::{self, bench_services},
    proc::{Server, probe},
    require_root,
};

#[test]
fn iptables_and_nftables_rules_serve_cluster_ip_and_nodeport() {
    require_root!();
    let cluster = Cluster::new(2, 2, 1);
    let _servers: Vec<Server> = cluster
        .nodes
        .iter()
        .flat_map(|n| n.pods.iter())
        .map(|p| Server::start(p.ns.name(), &p.name, &["0.0.0.0:8080"], &[]))
        .collect();
    let services = bench_services(&cluster, 100);
    for (tool, rules) in
        [("iptables", kubeproxy::iptables(&services)), ("nft", kubeproxy::nftables(&services))]
    {
        for n in &cluster.nodes {
            kubeproxy::uninstall(&n.ns);
            kubeproxy::install(&n.ns, tool, &rules);
        }
        let pod = &cluster.nodes[1].pods[0];
        let r = parse_probe(&probe(
            Some(pod.ns.name()),
            None,
            &["connect", "10.96.0.10:80", "--count", "60"],
        ));
        assert!(r.iter().all(|r| r.is_ok()), "{tool}: pod -> ClusterIP: {r:?}");
        assert_eq!(by_server(&r).len(), 4, "{tool}: {:?}", by_server(&r));
        let r = parse_probe(&probe(
            Some(cluster.clients[0].ns.name()),
            None,
            &["connect", "10.230.0.10:30080", "--count", "60"],
        ));
        assert!(r.iter().all(|r| r.is_ok()), "{tool}: client -> NodePort: {r:?}");
        assert_eq!(by_server(&r).len(), 4, "{tool}: {:?}", by_server(&r));

        // The one-service updates the benchmark times: the dropped endpoint stops answering,
        // the others keep answering, and putting it back restores it.
        let mut after = services.clone();
        let (gone_ip, _) = after[0].endpoints.pop().unwrap();
        let gone = cluster
            .nodes
            .iter()
            .flat_map(|n| n.pods.iter())
            .find(|p| p.ip4 == std::net::IpAddr::V4(gone_ip))
            .unwrap()
            .name
            .clone();
        let (update, back, partial_tool) = if tool == "iptables" {
            (
                kubeproxy::iptables_service_update(&after, 0, &services[0]),
                kubeproxy::iptables_service_update(&services, 0, &after[0]),
                "iptables --noflush",
            )
        } else {
            (
                kubeproxy::nftables_service_update(&after[0], &services[0]),
                kubeproxy::nftables_service_update(&services[0], &after[0]),
                "nft",
            )
        };
        for n in &cluster.nodes {
            kubeproxy::install(&n.ns, partial_tool, &update);
        }
        let r = parse_probe(&probe(
            Some(cluster.clients[0].ns.name()),
            None,
            &["connect", "10.230.0.10:30080", "--count", "60"],
        ));
        assert!(r.iter().all(|r| r.is_ok()), "{tool} after update: {r:?}");
        let answered = by_server(&r);
        assert_eq!(answered.len(), 3, "{tool} after update: {answered:?}");
        assert!(!answered.contains_key(&gone), "{tool}: {gone} still answers: {answered:?}");
        for n in &cluster.nodes {
            kubeproxy::install(&n.ns, partial_tool, &back);
        }
        let r = parse_probe(&probe(
            Some(pod.ns.name()),
            None,
            &["connect", "10.96.0.10:80", "--count", "60"],
        ));
        assert!(r.iter().all(|r| r.is_ok()), "{tool} after restore: {r:?}");
        assert_eq!(by_server(&r).len(), 4, "{tool} after restore: {:?}", by_server(&r));
    }
}
