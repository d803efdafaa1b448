//! The socket hooks with real TCP and UDP through the mini-cluster: host processes and pods of
//! node-0 (in its cgroup) reach ClusterIP services on pods of both nodes; applications see the
//! service address, servers see the real client; refusals are immediate.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_agent::{
    dataplane::{
        attach,
        conntrack_gc::UdpFlush,
        store::KernelStore,
        writer::{Writer, WriterConfig},
    },
    model::{maglev, plan::*},
    state::ObjKey,
};
use lb_common::*;
use lb_tests::{
    cluster::Cluster,
    kernel::Datapath,
    plans::{backend, cluster_ip_plan},
    proc::{Background, Server, probe},
    require_root,
};

struct Setup {
    cluster: Cluster,
    dp: Datapath,
    _servers: Vec<Server>,
}

fn setup() -> Setup {
    let cluster = Cluster::new(2, 2, 0);
    let mut servers = Vec::new();
    for node in &cluster.nodes {
        for pod in &node.pods {
            servers.push(Server::start(
                pod.ns.name(),
                &pod.name,
                &["0.0.0.0:8080", "[::]:8086"],
                &["0.0.0.0:5353", "[::]:5356"],
            ));
        }
    }
    let pods: Vec<(IpAddr, IpAddr, bool)> = cluster
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.pods.iter().map(move |p| (p.ip4, p.ip6, i == 0)))
        .collect();
    let v4 = |port| pods.iter().map(|&(a, _, local)| backend(a, port, local)).collect::<Vec<_>>();
    let v6 = |port| pods.iter().map(|&(_, a, local)| backend(a, port, local)).collect::<Vec<_>>();
    let mut dp = Datapath::load();
    let mut w = Writer::new(
        KernelStore::new(&dp.ebpf).unwrap(),
        WriterConfig {
            maglev_max_size: maglev::DEFAULT_MAX_SIZE,
            max_services: 1024,
            answer_service_pings: true,
        },
    )
    .unwrap();
    for plan in [
        cluster_ip_plan("web", "10.96.0.10", 80, Protocol::Tcp, v4(8080), None),
        cluster_ip_plan("dns", "10.96.0.10", 53, Protocol::Udp, v4(5353), None),
        cluster_ip_plan("dns2", "10.96.0.20", 53, Protocol::Udp, v4(5353), None),
        cluster_ip_plan("web6", "fd00:96::10", 80, Protocol::Tcp, v6(8086), None),
        cluster_ip_plan("empty", "10.96.0.11", 80, Protocol::Tcp, vec![], None),
        cluster_ip_plan("sticky", "10.96.0.12", 80, Protocol::Tcp, v4(8080), Some(10800)),
    ] {
        let key = ObjKey::new("default", plan.name.clone());
        w.apply_object(&key, &[plan]).unwrap();
    }
    dp.load_programs();
    attach::cgroup(&mut dp.ebpf, &cluster.nodes[0].cgroup.path, None).expect("attach socket hooks");
    Setup { cluster, dp, _servers: servers }
}

/// Parsed `lb-probe connect` lines: (server name, client address the server saw, peer the
/// client saw), or the error.
fn parse(lines: &[String]) -> Vec<Result<(String, String, String), String>> {
    lines
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                ["ok", name, seen, peer] => {
                    Ok((name.to_string(), seen.to_string(), peer.to_string()))
                }
                ["err", e] => Err(e.to_string()),
                _ => Err(format!("unparsable: {l}")),
            }
        })
        .collect()
}

fn by_server(results: &[Result<(String, String, String), String>]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (name, _, _) in results.iter().flatten() {
        *m.entry(name.clone()).or_insert(0) += 1;
    }
    m
}

fn host_ip(seen: &str) -> String {
    seen.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']']).to_owned()).unwrap_or_default()
}

#[test]
fn cluster_ip_from_host_and_pod_reaches_every_backend_and_shows_the_service_address() {
    require_root!();
    let s = setup();
    let node = &s.cluster.nodes[0];
    let cg = Some(node.cgroup.path.as_path());

    // A host process of node-0.
    let results =
        parse(&probe(Some(node.ns.name()), cg, &["connect", "10.96.0.10:80", "--count", "300"]));
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 300 failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let spread = by_server(&results);
    assert_eq!(spread.len(), 4, "every backend answers: {spread:?}");
    assert!(
        spread.values().all(|&n| n >= 40),
        "each of 4 backends gets >= 40 of 300 (expected 75): {spread:?}"
    );
    for (name, seen, peer) in results.iter().flatten() {
        assert_eq!(peer, "10.96.0.10:80", "the application sees the service address");
        let want = if name.starts_with("node-0") { "10.231.0.1" } else { "10.230.0.10" };
        assert_eq!(host_ip(seen), want, "{name} saw the node's own address, unNATed");
    }

    // A pod of node-0: the server sees the pod's own address.
    let pod = &node.pods[0];
    let results =
        parse(&probe(Some(pod.ns.name()), cg, &["connect", "10.96.0.10:80", "--count", "100"]));
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert!(by_server(&results).len() >= 3, "{:?}", by_server(&results));
    for (_, seen, peer) in results.iter().flatten() {
        assert_eq!(host_ip(seen), pod.ip4.to_string());
        assert_eq!(peer, "10.96.0.10:80");
    }
    assert!(s.dp.stat(STAT_SOCK_TRANSLATED) >= 400);
}

#[test]
fn udp_ipv6_refusals_affinity_and_untouched_traffic() {
    require_root!();
    let s = setup();
    let node = &s.cluster.nodes[0];
    let ns = Some(node.ns.name());
    let cg = Some(node.cgroup.path.as_path());

    // UDP: replies come back from the service address.
    let results = parse(&probe(ns, cg, &["connect", "10.96.0.10:53", "--udp", "--count", "60"]));
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert!(by_server(&results).len() >= 3, "{:?}", by_server(&results));
    assert!(results.iter().flatten().all(|(_, _, from)| from == "10.96.0.10:53"), "{results:?}");

    // IPv6.
    let results = parse(&probe(ns, cg, &["connect", "[fd00:96::10]:80", "--count", "40"]));
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert!(results.iter().flatten().all(|(_, _, peer)| peer == "[fd00:96::10]:80"), "{results:?}");
    assert!(by_server(&results).len() >= 3);

    // Refused at once: a ClusterIP port that does not exist (one no service has, which the
    // port filter decides, and one another ClusterIP has), and a service with no endpoint.
    let start = Instant::now();
    let unknown = probe(ns, cg, &["connect", "10.96.0.10:81", "--count", "3"]);
    let elsewhere = probe(ns, cg, &["connect", "10.96.0.12:53", "--count", "3"]);
    let empty = probe(ns, cg, &["connect", "10.96.0.11:80", "--count", "3"]);
    assert!(start.elapsed() < Duration::from_secs(1), "refusals took {:?}", start.elapsed());
    assert_eq!(unknown, vec!["err ECONNREFUSED"; 3]);
    assert_eq!(elsewhere, vec!["err ECONNREFUSED"; 3]);
    assert_eq!(empty, vec!["err ECONNREFUSED"; 3]);
    assert_eq!(s.dp.stat(STAT_SOCK_UNKNOWN_PORT), 6);
    assert_eq!(s.dp.stat(STAT_SOCK_NO_BACKEND), 3);

    // sessionAffinity ClientIP: one client keeps one backend.
    let sticky = parse(&probe(ns, cg, &["connect", "10.96.0.12:80", "--count", "30"]));
    assert_eq!(by_server(&sticky).len(), 1, "{:?}", by_server(&sticky));
    assert_eq!(by_server(&sticky).values().sum::<usize>(), 30);
    let pod = &node.pods[1];
    let other =
        parse(&probe(Some(pod.ns.name()), cg, &["connect", "10.96.0.12:80", "--count", "20"]));
    assert_eq!(by_server(&other).len(), 1, "another client is sticky too: {:?}", by_server(&other));

    // Pod IPs directly: untouched.
    let direct = parse(&probe(ns, cg, &["connect", "10.231.1.2:8080"]));
    assert_eq!(
        direct[0].as_ref().map(|(n, _, p)| (n.as_str(), p.as_str())),
        Ok(("node-1-pod-0", "10.231.1.2:8080"))
    );

    // A process outside the node's cgroup is not translated (no route to the ClusterIP).
    let outside = probe(ns, None, &["connect", "10.96.0.10:80", "--timeout-ms", "500"]);
    assert!(outside[0].starts_with("err"), "{outside:?}");
}

/// An IPv6 socket reaching an IPv4 service through its IPv4-mapped address (as Java, Node.js
/// and other dual-stack programs do): translated like an IPv4 one, and shown the mapped
/// service address back.
#[test]
fn dual_stack_sockets_reach_ipv4_services_through_mapped_addresses() {
    require_root!();
    let s = setup();
    let node = &s.cluster.nodes[0];
    let (ns, cg) = (Some(node.pods[0].ns.name()), Some(node.cgroup.path.as_path()));
    for args in [
        &["connect", "[::ffff:10.96.0.10]:80", "--count", "40"][..],
        &["connect", "[::ffff:10.96.0.10]:53", "--udp", "--count", "40"],
    ] {
        let results = parse(&probe(ns, cg, args));
        assert!(results.iter().all(|r| r.is_ok()), "{args:?}: {results:?}");
        assert!(by_server(&results).len() >= 3, "{args:?}: {:?}", by_server(&results));
        let port = if args.contains(&"--udp") { 53 } else { 80 };
        for (_, seen, peer) in results.iter().flatten() {
            assert_eq!(peer, &format!("[::ffff:10.96.0.10]:{port}"), "{args:?}");
            assert_eq!(host_ip(seen), node.pods[0].ip4.to_string(), "{args:?}");
        }
    }
}

#[test]
fn connected_udp_sockets_to_endpoints_gone_while_no_agent_ran_are_destroyed_at_its_start() {
    require_root!();
    let mut s = setup();
    let pod_ip6 = |n: usize, p: usize| s.cluster.nodes[n].pods[p].ip6;
    let (gone, left) = (pod_ip6(1, 0), pod_ip6(1, 1));
    let dns6 = |to: IpAddr| {
        let plan = cluster_ip_plan(
            "dns6",
            "fd00:96::53",
            53,
            Protocol::Udp,
            vec![backend(to, 5356, false)],
            None,
        );
        (ObjKey::new("default", "dns6"), plan)
    };
    let (key, plan) = dns6(gone);
    s.dp.writer().apply_object(&key, &[plan]).unwrap();
    // A resolver keeps an IPv6 socket connected through the ClusterIP (to the one endpoint).
    let node = &s.cluster.nodes[0];
    let rounds = ["--rounds", "30", "--interval-ms", "100"];
    let session = Background::start(
        Some(node.pods[0].ns.name()),
        Some(node.cgroup.path.as_path()),
        &[&["udp-session", "[fd00:96::53]:53"][..], &rounds].concat(),
    );
    std::thread::sleep(Duration::from_millis(1200));
    // The agent was down while the endpoint was replaced; the new one programs what is now.
    s.dp.restart_writer();
    let (key, plan) = dns6(left);
    s.dp.writer().apply_object(&key, &[plan]).unwrap();
    s.dp.writer().finish_initial_sync().unwrap();
    let in_use = UdpFlush::AllBut(s.dp.writer().udp_targets());
    let destroyed = s.dp.destroy_udp_sockets(&in_use);
    assert_eq!(destroyed.sockets, 1, "{destroyed:?}");
    assert!(destroyed.namespaces >= 5, "the pods' and the host's at least: {destroyed:?}");
    // Nothing is left to destroy: a second pass finds the socket gone.
    assert_eq!(s.dp.destroy_udp_sockets(&in_use).sockets, 0);

    let lines = session.finish();
    let torn = lines.iter().position(|l| l == "err ECONNABORTED" || l == "err EDESTADDRREQ");
    let torn = torn.unwrap_or_else(|| panic!("never torn down: {lines:?}"));
    let answers = |from: &[String]| -> Vec<(String, String)> {
        parse(from)
            .into_iter()
            .map(|r| r.map(|(n, _, p)| (n, p)).unwrap_or_else(|e| panic!("{e}: {lines:?}")))
            .collect()
    };
    let before = answers(&lines[..torn]);
    assert!(before.len() >= 5, "{lines:?}");
    assert!(
        before.iter().all(|(n, p)| n == "node-1-pod-0" && p == "[fd00:96::53]:53"),
        "{lines:?}"
    );
    assert_eq!(lines[torn + 1], "reconnected");
    let after = answers(&lines[torn + 2..]);
    assert!(after.len() >= 5, "{lines:?}");
    assert!(after.iter().all(|(n, p)| n == "node-1-pod-1" && p == "[fd00:96::53]:53"), "{lines:?}");
}

/// One unconnected UDP socket sending datagram after datagram (as resolvers do) to two
/// ClusterIPs whose backends are the same pods: every answer comes from the service its
/// datagram went to, though the socket's entry for a pod was made for the other service as
/// often as not (a datagram's translation rewrites an entry only when it differs), and every
/// pod answers.
#[test]
fn one_unconnected_udp_socket_sees_each_answer_from_the_service_it_sent_to() {
    require_root!();
    let s = setup();
    let node = &s.cluster.nodes[0];
    let cg = Some(node.cgroup.path.as_path());
    let before = s.dp.stat(STAT_SOCK_TRANSLATED);
    let args = [
        "connect",
        "10.96.0.10:53",
        "--udp",
        "--one-socket",
        "--alternate",
        "10.96.0.20:53",
        "--count",
        "80",
    ];
    let results = parse(&probe(Some(node.ns.name()), cg, &args));
    assert_eq!(results.len(), 80);
    for (i, r) in results.iter().enumerate() {
        let (_, _, peer) = r.as_ref().unwrap_or_else(|e| panic!("datagram {i}: {e}"));
        let want = if i % 2 == 0 { "10.96.0.10:53" } else { "10.96.0.20:53" };
        assert_eq!(peer, want, "datagram {i}'s answer");
    }
    assert_eq!(by_server(&results).len(), 4, "{:?}", by_server(&results));
    assert!(s.dp.stat(STAT_SOCK_TRANSLATED) - before >= 80);
}
