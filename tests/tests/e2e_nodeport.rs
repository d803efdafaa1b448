//! Outside clients through real agents on a two-node mini-cluster: NodePort with
//! externalTrafficPolicy Cluster (backends on both nodes, SNAT for the remote ones) and Local
//! (client address kept, only local pods, nodes without one stay silent); pods reaching a
//! ClusterIP through the same agents.

use std::time::{Duration, Instant};

use lb_tests::{
    cluster::{Cluster, Running, by_server, host_of, metric, parse_probe},
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
    let eps = cluster.all_pods(false);
    // The Local service has endpoints on node-0 only.
    let local_eps: Vec<_> = eps.iter().filter(|e| e.node == "node-0").cloned().collect();
    // SNAT source ports from a range of the operator's choosing (outside the ephemeral ports).
    // No conntrack sweep: the ports of ended flows are counted below, however slow the run.
    let run = Running::start_with(
        cluster,
        &[("web.yaml", CLUSTER_SVC.file(&eps)), ("local.yaml", LOCAL_SVC.file(&local_eps))],
        &["--nat-port-range", "20000-20999", "--conntrack-gc-interval", "0"],
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
        if !name.starts_with("node-0") {
            let port: u16 = seen.rsplit(':').next().unwrap().parse().unwrap();
            assert!((20000..=20999).contains(&port), "{name} saw {seen}");
        }
    }

    // lbctl counts node-0's SNAT ports per remote backend: one per connection it answered,
    // each closing (the client closed first, so the backend keeps no TIME_WAIT), of 1000. On
    // a loaded machine a connection can end in a reset instead (a retransmitted segment that
    // reaches a socket already closed is answered with one): it still holds its port.
    let ports = run.lbctl_json(0, &["nat", "--ports"]);
    let rows = ports.as_array().expect("rows");
    assert_eq!(rows.len(), 2, "node-1's two pods: {ports}");
    for pod in &run.cluster.nodes[1].pods {
        let backend = format!("{}:8080", pod.ip4);
        let row = rows.iter().find(|r| r["backend"] == backend.as_str()).expect(&backend);
        let answered = spread[&pod.name] as u64;
        assert_eq!(row["node"], node0.as_str(), "{row}");
        assert_eq!(row["capacity"], 1000, "{row}");
        assert_eq!(row["held"], answered, "{row}");
        let ended = row["closing"].as_u64().unwrap() + row["reset"].as_u64().unwrap();
        assert_eq!(ended, answered, "{row}");
        assert!(row["reset"].as_u64().unwrap() <= 2, "a rare reset, not the rule: {row}");
        assert_eq!(row["time_wait"], 0, "{row}");
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

#[test]
fn nodeport_cluster_policy_with_xdp_tx_sends_remote_flows_back_out_without_the_stack() {
    require_root!();
    let mut cluster = Cluster::new(2, 2, 1);
    cluster.like_a_wire_for_xdp_tx();
    let eps = cluster.all_pods(false);
    let files = [("web.yaml", CLUSTER_SVC.file(&eps))];
    let run = Running::start_with(cluster, &files, &["--xdp", "--xdp-tx", "on"]);
    let remote = cluster_policy_answers_every_connection(&run, 200, "10.230.0.10");

    // Each remote flow's packets both ways (SYN, SYN-ACK, request, answer, FINs...) left node-0
    // by XDP_TX; only the first ones, before node-0 knew the next hop's MAC, went through tc.
    let counters = run.counters(0);
    let (tx, to_tc) = (counters["xdp_tx"], counters["xdp_to_tc"]);
    assert!(tx as usize >= 6 * remote, "xdp_tx {tx} for {remote} remote flows: {counters:?}");
    assert!(to_tc <= 4, "xdp_to_tc {to_tc}: {counters:?}");
    let notes = explain_notes(&run);
    assert!(notes.contains("XDP_TX on"), "{notes}");
}

#[test]
fn nodeport_cluster_policy_with_xdp_redirects_flows_whose_route_leaves_by_another_device() {
    require_root!();
    let mut cluster = Cluster::new(2, 2, 1);
    // node-0 reaches node-1's pods through eth1, and SNATs those flows to its eth1 address
    // (10.232.0.10), as MASQUERADE would: node-1 answers there, on the same segment.
    cluster.second_segment();
    cluster.like_a_wire_for_xdp_tx();
    let eps = cluster.all_pods(false);
    let files = [("web.yaml", CLUSTER_SVC.file(&eps))];
    let args = ["--xdp", "--xdp-tx", "on", "--devices", "eth1"]; // appended: eth0 and eth1
    let run = Running::start_with(cluster, &files, &args);
    let remote = cluster_policy_answers_every_connection(&run, 200, "10.232.0.10");

    // A remote flow's packets from the client (SYN, ACK, request, FIN, ACK) came in on eth0 and
    // XDP redirected them to eth1; the backend's (SYN-ACK, answer, FIN) came back on eth1 and
    // XDP redirected them to eth0, towards the client. Only the first ones, before the next
    // hops' MACs were known, went through tc.
    let counters = run.counters(0);
    let (redirect, tx, to_tc) =
        (counters["xdp_redirect"], counters["xdp_tx"], counters["xdp_to_tc"]);
    assert!(
        redirect as usize >= 5 * remote,
        "xdp_redirect {redirect}, {remote} flows: {counters:?}"
    );
    assert_eq!(tx, 0, "nothing goes back out of the device it came by: {counters:?}");
    assert!(to_tc <= 8, "xdp_to_tc {to_tc}: {counters:?}");
}

/// On a node with two devices, a flow to a backend the route reaches by the second one is
/// SNATed to that device's address, as MASQUERADE would: the backend's node, which accepts a
/// packet only by the device it would answer by (strict reverse path filtering, common on
/// multi-homed hosts), takes it, and answers the same way. SNATed to the node's primary
/// address, as before, node-1 dropped every such packet (they came by eth1 from an address it
/// reaches by eth0).
#[test]
fn snat_takes_the_address_of_the_device_facing_the_backend_so_strict_reverse_path_filters_pass() {
    require_root!();
    let mut cluster = Cluster::new(2, 2, 1);
    cluster.second_segment();
    for dev in ["all", "eth0", "eth1"] {
        cluster.nodes[1].ns.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "1");
    }
    let eps = cluster.all_pods(false);
    let files = [("web.yaml", CLUSTER_SVC.file(&eps))];
    let run = Running::start_with(cluster, &files, &["--devices", "eth1"]);
    cluster_policy_answers_every_connection(&run, 60, "10.232.0.10");
}

#[test]
fn on_a_veth_xdp_leaves_remote_flows_to_tc_by_default_and_says_so() {
    require_root!();
    let cluster = Cluster::new(2, 2, 1);
    let eps = cluster.all_pods(false);
    let files = [("web.yaml", CLUSTER_SVC.file(&eps))];
    let run = Running::start_with(cluster, &files, &["--xdp"]);
    let said = run.agents[0].log().into_iter().find(|l| l.contains("XDP_TX")).unwrap_or_default();
    assert!(said.contains("XDP_TX off") && said.contains("veth"), "{said}");
    let remote = cluster_policy_answers_every_connection(&run, 60, "10.230.0.10");
    let counters = run.counters(0);
    assert_eq!(counters["xdp_tx"], 0, "{counters:?}");
    assert!(counters["xdp_to_tc"] as usize >= 3 * remote, "{counters:?}");
    let notes = explain_notes(&run);
    assert!(notes.contains("XDP_TX off"), "{notes}");
}

/// The notes of `lbctl explain` for an outside client's flow to node-0's NodePort.
fn explain_notes(run: &Running) -> String {
    explain(run, 45000)["notes"].to_string()
}

/// `lbctl explain` for the outside client's flow from `port` to node-0's NodePort, run in
/// node-0's network namespace as an operator would.
fn explain(run: &Running, port: u16) -> serde_json::Value {
    let lbctl = lb_tests::workspace_bin("lbctl");
    let node0 = &run.cluster.nodes[0];
    let out = lb_tests::proc::command_in(&lbctl, Some(node0.ns.name()), None)
        .args(["explain", &format!("10.230.0.100:{port}"), &format!("{}:30080", node0.ip4)])
        .args(["--bpffs", run.pins[0].path.to_str().unwrap(), "-o", "json"])
        .output()
        .expect("run lbctl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// `count` connections from the outside client to node-0's NodePort of the Cluster-policy
/// service: all answered, by all four pods, remote ones seeing node-0's address `snat` (that of
/// the device its route to them leaves by). Returns how many went to the other node.
fn cluster_policy_answers_every_connection(run: &Running, count: usize, snat: &str) -> usize {
    let target = format!("{}:30080", run.cluster.nodes[0].ip4);
    answers_every_connection(run, &target, count, &run.cluster.clients[0].ip4.to_string(), snat)
}

/// `count` connections from the client to `target`: every one answered, by all four pods, from
/// `target`; node-0's pods see the client as `local_sees`, node-1's as `remote_sees`. How many
/// node-1's pods answered.
fn answers_every_connection(
    run: &Running,
    target: &str,
    count: usize,
    local_sees: &str,
    remote_sees: &str,
) -> usize {
    let results =
        parse_probe(&run.from_client(0, &["connect", target, "--count", &count.to_string()]));
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    assert_eq!(by_server(&results).len(), 4, "{:?}", by_server(&results));
    let mut remote = 0;
    for (name, seen, peer) in results.iter().flatten() {
        assert_eq!(peer, target);
        let local = name.starts_with("node-0");
        assert_eq!(&host_of(seen), if local { local_sees } else { remote_sees }, "{name}");
        remote += usize::from(!local);
    }
    remote
}

/// Node-0's conntrack entries, as `lbctl conntrack` lists them.
fn conntrack_rows(run: &Running) -> Vec<serde_json::Value> {
    run.lbctl_json(0, &["conntrack"]).as_array().expect("rows").clone()
}

#[test]
fn the_conntrack_sweep_removes_ended_flows_and_keeps_a_live_one() {
    require_root!();
    let cluster = Cluster::new(2, 2, 1);
    let eps = cluster.all_pods(false);
    let files = [("web.yaml", CLUSTER_SVC.file(&eps))];
    let run = Running::start_with(cluster, &files, &["--conntrack-gc-interval", "1"]);
    let target = format!("{}:30080", run.cluster.nodes[0].ip4);

    // A connection open throughout: an exchange every 250 ms for 12 s.
    let session = {
        let (ns, target) = (run.cluster.clients[0].ns.name().to_owned(), target.clone());
        std::thread::spawn(move || {
            let args = ["session", &target, "--rounds", "48", "--interval-ms", "250"];
            lb_tests::proc::probe(Some(&ns), None, &args)
        })
    };
    // 20 connections the client ends with a reset: their entries expire a second later, and
    // the datapath sees no packet of theirs again.
    let results = parse_probe(
        &run.from_client(0, &["connect", &target, "--count", "20", "--close", "reset"]),
    );
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let reset = |rows: &[serde_json::Value]| rows.iter().filter(|r| r["state"] == "reset").count();
    let first = conntrack_rows(&run);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut rows = first.clone();
    while reset(&rows) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        rows = conntrack_rows(&run);
    }
    assert_eq!(reset(&rows), 0, "the reset flows' entries are gone: {rows:#?}");
    // Only the session's two entries are left, and it goes on working to its last exchange.
    let states: Vec<_> = rows.iter().map(|r| r["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["established", "established"], "{rows:#?}");
    let session = session.join().expect("session thread");
    assert!(
        session.last().is_some_and(|l| l.starts_with("ok ") && l.ends_with(" 48")),
        "{session:?}"
    );

    let metrics = run.metrics(0);
    let value = |name: &str| metric(&metrics, name);
    // Each reset flow's two entries, whether listed before they went or not.
    assert!(reset(&first) <= 40, "{first:#?}");
    assert!(value("lb_conntrack_gc_removed_entries_total") >= 40.0, "{metrics}");
    assert!(value("lb_conntrack_gc_runs_total") >= 1.0, "{metrics}");
    // The session's two entries, closing now (10 s to live).
    assert_eq!(value("lb_map_entries{map=\"LB_CT\"}"), 2.0, "{metrics}");
}

#[test]
fn big_segments_to_a_pod_behind_a_smaller_mtu_lower_the_clients_path_mtu() {
    require_root!();
    let mut cluster = Cluster::new(2, 1, 1);
    // node-0 reaches node-1's pods through eth1, a link of 1400 bytes (a tunnel's, say);
    // clients reach node-0 with 1500.
    cluster.second_segment();
    for node in &cluster.nodes {
        node.ns.ip(&["link", "set", "eth1", "mtu", "1400"]);
    }
    for peer in ["m0", "m1"] {
        cluster.lan.ip(&["link", "set", peer, "mtu", "1400"]);
    }
    // The client sends plain full-size segments, as a NIC puts them on a wire (a veth would
    // carry a GSO packet whole past any MTU).
    let client = &cluster.clients[0].ns;
    let out = client.exec("ethtool", &["-K", "eth0", "tso", "off", "gso", "off"]);
    assert!(out.status.success(), "{out:?}");
    let remote: Vec<_> =
        cluster.all_pods(false).into_iter().filter(|e| e.node == "node-1").collect();
    let run = Running::start(cluster, &[("web.yaml", CLUSTER_SVC.file(&remote))]);
    // 4000-byte exchanges: the client's 1500-byte segments cannot cross eth1. Told so, as the
    // kernel's forwarding would tell it, it sends smaller ones; otherwise they vanish.
    let args = ["session", "10.230.0.10:30080", "--rounds", "3", "--interval-ms", "10"];
    let lines = run.from_client(0, &[&args[..], &["--size", "4000"]].concat());
    assert_eq!(lines.last().map(String::as_str), Some("ok node-1-pod-0 3"), "{lines:?}");
    let told = run.counters(0)["too_big"];
    assert!(told >= 1, "too_big {told}");

    // Packets the client's kernel left whole (GSO) are judged by their segments' size, as the
    // kernel's forwarding judges them: told too (once per connection: its path MTU is kept).
    let client = &run.cluster.clients[0].ns;
    let out = client.exec("ip", &["route", "flush", "cache"]);
    assert!(out.status.success(), "{out:?}");
    let out = client.exec("ethtool", &["-K", "eth0", "tso", "on", "gso", "on"]);
    assert!(out.status.success(), "{out:?}");
    let lines = run.from_client(0, &[&args[..], &["--size", "4000"]].concat());
    assert_eq!(lines.last().map(String::as_str), Some("ok node-1-pod-0 3"), "{lines:?}");
    assert!(run.counters(0)["too_big"] > told);
}

#[test]
fn devices_auto_picks_the_default_routes_devices_and_the_node_ips() {
    require_root!();
    let ns = lb_tests::netns::NetNs::new("auto");
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth9"]);
    ns.ip(&["link", "add", "dev0", "type", "veth", "peer", "name", "dev8"]);
    ns.ip(&["link", "add", "dev1", "type", "veth", "peer", "name", "dev7"]);
    for (dev, addr) in
        [("eth0", "192.168.7.2/24"), ("dev0", "10.77.0.5/32"), ("dev1", "10.88.0.5/32")]
    {
        ns.ip(&["addr", "add", addr, "dev", dev]);
        ns.ip(&["link", "set", dev, "up"]);
    }
    for peer in ["eth9", "dev8", "dev7"] {
        ns.ip(&["link", "set", peer, "up"]);
    }
    ns.ip(&["route", "add", "default", "via", "192.168.7.1"]);
    let node_ip: std::net::IpAddr = "10.77.0.5".parse().unwrap();
    let found = ns.run(|| lb_agent::dataplane::netdev::detect_devices(&[node_ip]));
    assert_eq!(found, ["dev0", "eth0"], "--node-ip's and the default route's, no other");
}

#[test]
fn with_devices_auto_the_agent_also_attaches_where_the_default_route_leaves() {
    require_root!();
    let mut cluster = Cluster::new(2, 1, 1);
    // node-0 gets a second device, eth1, and its default route leaves by it; node-1 has none.
    cluster.second_segment();
    cluster.nodes[0].ns.ip(&["route", "add", "default", "via", "10.232.0.11", "dev", "eth1"]);
    let eps = cluster.all_pods(false);
    let run = Running::start_with(
        cluster,
        &[("web.yaml", CLUSTER_SVC.file(&eps))],
        &["--devices", "auto"],
    );
    let attached = |n: usize, dev: &str| {
        let page = run.metrics(n);
        let sample = format!("lb_program_attached{{program=\"tc\",target=\"{dev}\"}}");
        page.lines().any(|l| l.strip_prefix(&sample).is_some_and(|v| v.trim() == "1"))
    };
    assert!(attached(0, "eth0") && attached(0, "eth1"), "{}", run.metrics(0));
    assert!(attached(1, "eth0") && !attached(1, "eth1"), "{}", run.metrics(1));
    assert!(run.agents[0].log().iter().any(|l| l.contains("--devices auto") && l.contains("eth1")));
    // Said once, not at each device check (every 2 s); nothing found missing meanwhile.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(run.agents[0].count_log("--devices auto:"), 1);
    assert_eq!(run.agents[0].count_log("programs were missing"), 0);
    let r = parse_probe(&run.from_client(0, &["connect", "10.230.0.10:30080", "--count", "20"]));
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
}

#[test]
fn a_re_created_device_gets_its_programs_back_within_seconds() {
    require_root!();
    let cluster = Cluster::new(2, 1, 1);
    let eps = cluster.all_pods(false);
    let run = Running::start(cluster, &[("web.yaml", CLUSTER_SVC.file(&eps))]);
    let nodeport = ["connect", "10.230.0.10:30080", "--count", "10"];
    assert!(parse_probe(&run.from_client(0, &nodeport)).iter().all(|r| r.is_ok()));

    // node-0's eth0 goes and comes back (a NIC reset, a rebuilt bond): same name and
    // addresses, a new device without programs. NodePorts fail until the agent notices.
    run.cluster.recreate_node_device(0);
    let (start, once) = (Instant::now(), ["connect", "10.230.0.10:30080", "--timeout-ms", "300"]);
    while !run.from_client(0, &once)[0].starts_with("ok") {
        let waited = start.elapsed();
        assert!(waited < Duration::from_secs(10), "the NodePort never answered again");
    }
    println!("the NodePort answered again {:?} after its device was re-created", start.elapsed());
    let r = parse_probe(&run.from_client(0, &nodeport));
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    // Said right after the programs went in, which traffic may notice first; once, then in
    // place.
    said(&run, "programs were missing", 1);
    let log = run.agents[0].log().join("\n");
    assert!(log.contains("device=eth0") || log.contains("device=\"eth0\""), "{log}");
}

/// The external NodePort addresses node-0 programs for the web service, as `lbctl services`
/// lists them.
fn nodeport_addresses(run: &Running) -> Vec<String> {
    let services = run.lbctl_json(0, &["services"]);
    let web = services.as_array().unwrap().iter().find(|s| s["name"] == "default/web:p/TCP/IPv4");
    let mut found: Vec<String> = web
        .and_then(|s| s["frontends"].as_array())
        .into_iter()
        .flatten()
        .filter(|f| f["kind"] == "NodePort" && f["scope"] == "external")
        .filter_map(|f| f["address"].as_str().map(str::to_owned))
        .collect();
    found.sort();
    found
}

/// An address added to a device the agent attaches to (a VIP keepalived moves to this node, a
/// second address of the NIC) answers NodePorts within seconds, as kube-proxy answers on every
/// local address; flows to other nodes' pods still leave with the node's own address (the VIP
/// may move on). When the address goes, so do its frontends.
#[test]
fn a_nodeport_answers_on_an_address_added_to_the_device_until_it_goes() {
    require_root!();
    let cluster = Cluster::new(2, 1, 1);
    let eps = cluster.all_pods(false);
    let run = Running::start(cluster, &[("web.yaml", CLUSTER_SVC.file(&eps))]);
    assert_eq!(nodeport_addresses(&run), ["10.230.0.10:30080"]);
    let node0 = &run.cluster.nodes[0];
    node0.ns.ip(&["addr", "add", "10.230.0.200/24", "dev", "eth0"]);
    let (start, once) = (Instant::now(), ["connect", "10.230.0.200:30080", "--timeout-ms", "300"]);
    while !run.from_client(0, &once)[0].starts_with("ok") {
        assert!(start.elapsed() < Duration::from_secs(8), "the new address never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("the NodePort answered on the added address after {:?}", start.elapsed());
    let r = parse_probe(&run.from_client(0, &["connect", "10.230.0.200:30080", "--count", "40"]));
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    assert_eq!(by_server(&r).len(), 2, "{:?}", by_server(&r));
    let client = run.cluster.clients[0].ip4.to_string();
    for (name, seen, peer) in r.iter().flatten() {
        assert_eq!(peer, "10.230.0.200:30080");
        let want = if name.starts_with("node-0") { &client } else { "10.230.0.10" };
        assert_eq!(host_of(seen), want, "{name}: SNAT with the node's own address");
    }
    assert_eq!(nodeport_addresses(&run), ["10.230.0.10:30080", "10.230.0.200:30080"]);

    node0.ns.ip(&["addr", "del", "10.230.0.200/24", "dev", "eth0"]);
    let start = Instant::now();
    while nodeport_addresses(&run) != ["10.230.0.10:30080"] {
        assert!(start.elapsed() < Duration::from_secs(8), "{:?}", nodeport_addresses(&run));
        std::thread::sleep(Duration::from_millis(200));
    }
    // Both changes were said.
    said(&run, "addresses changed", 2);
}

/// Waits (5 s at most) until node-0's agent has logged `needle` `times` times, and checks it
/// did not more often: its log is read from its stderr a moment after it writes.
fn said(run: &Running, needle: &str, times: usize) {
    let start = Instant::now();
    while run.agents[0].count_log(needle) < times && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = run.agents[0].log().join("\n");
    assert_eq!(run.agents[0].count_log(needle), times, "{needle}: {log}");
}

/// `--devices` as a DaemonSet spreads it over unlike nodes: a prefix pattern (`eth+`) takes
/// every matching device, and a device named but absent does not keep the node without a
/// proxy: the agent starts, says so once, and attaches when the device appears.
#[test]
fn device_patterns_match_by_prefix_and_an_absent_device_is_attached_when_it_appears() {
    require_root!();
    let mut cluster = Cluster::new(2, 1, 1);
    cluster.second_segment();
    let eps = cluster.all_pods(false);
    let run = Running::start_with(
        cluster,
        &[("web.yaml", CLUSTER_SVC.file(&eps))],
        &["--devices", "eth+", "--devices", "late0"],
    );
    let node0 = &run.cluster.nodes[0];
    let bpffs = run.pins[0].path.clone();
    let missing = |dev: &'static str| {
        let bpffs = bpffs.clone();
        node0.ns.run(move || {
            // This agent's view of its pinned links (TCX).
            let pins = lb_agent::dataplane::links::LinkPins::new(&bpffs).expect("link pins");
            lb_agent::dataplane::attach::tc_missing(
                &pins,
                dev,
                lb_agent::dataplane::attach::TcRole::External,
            )
        })
    };
    assert!(!missing("eth0") && !missing("eth1"), "eth+ takes both");
    let r = parse_probe(&run.from_client(0, &["connect", "10.230.0.10:30080", "--count", "10"]));
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    assert_eq!(run.agents[0].count_log("device absent"), 1, "{}", run.agents[0].log().join("\n"));
    let attached = |dev: &str| {
        metric(&run.metrics(0), &format!("lb_program_attached{{program=\"tc\",target=\"{dev}\"}}"))
    };
    assert_eq!((attached("eth1"), attached("late0")), (1.0, 0.0), "absent: 0, for alerts");

    node0.ns.ip(&["link", "add", "late0", "type", "veth", "peer", "name", "late0p"]);
    node0.ns.ip(&["link", "set", "late0", "up"]);
    let start = Instant::now();
    while missing("late0") {
        assert!(start.elapsed() < Duration::from_secs(8), "late0 never got its programs");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Said right after the programs went in (the pin may show first).
    said(&run, "programs were missing", 1);
    assert_eq!(run.agents[0].count_log("device absent"), 1, "said once");
    assert_eq!(attached("late0"), 1.0);
    assert_eq!(run.agents[0].count_log("programs were missing"), 1);
}

/// `--external-clusterip`: a client outside the cluster whose network routes the service
/// range to a node (BGP-advertised ClusterIPs) reaches the ClusterIP through that node, as
/// through kube-proxy's rules: every endpoint, local ones seeing the client, other nodes'
/// ones the node (SNAT), and answers from the ClusterIP. Without the flag the device hooks
/// leave ClusterIPs alone.
#[test]
fn external_clusterip_serves_clients_routed_to_the_service_range() {
    require_root!();
    let cluster = Cluster::new(2, 2, 1);
    let eps = cluster.all_pods(false);
    let run = Running::start_with(
        cluster,
        &[("web.yaml", CLUSTER_SVC.file(&eps))],
        &["--external-clusterip"],
    );
    let node0 = run.cluster.nodes[0].ip4.to_string();
    let client = run.cluster.clients[0].ip4.to_string();
    run.cluster.clients[0].ns.ip(&["route", "add", "10.96.0.0/16", "via", &node0]);
    let r = parse_probe(&run.from_client(0, &["connect", "10.96.0.10:80", "--count", "60"]));
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    assert_eq!(by_server(&r).len(), 4, "{:?}", by_server(&r));
    for (name, seen, peer) in r.iter().flatten() {
        assert_eq!(peer, "10.96.0.10:80", "answers come from the ClusterIP");
        let want = if name.starts_with("node-0") { &client } else { &node0 };
        assert_eq!(&host_of(seen), want, "{name}");
    }

    // node-1 runs without the flag (the same manifests): routed there, the client gets nothing.
    let mut run = run;
    run.stop_agent(1);
    let node1 = run.cluster.nodes[1].ip4.to_string();
    let args: Vec<String> =
        run.agent_args[1].iter().filter(|a| *a != "--external-clusterip").cloned().collect();
    run.agent_args[1] = args;
    run.restart_agent(1);
    run.cluster.clients[0].ns.ip(&["route", "replace", "10.96.0.0/16", "via", &node1]);
    let once = ["connect", "10.96.0.10:80", "--timeout-ms", "500"];
    let r = parse_probe(&run.from_client(0, &once));
    assert!(r[0].is_err(), "translated without --external-clusterip: {r:?}");
}

/// Direct server return (`--lb-mode hybrid`): node-0 sends the flows it gives node-1's pods on
/// with the client's address, the SYN naming the NodePort; node-1 answers the client itself,
/// from node-0's address and NodePort. Every backend sees the client, and node-0 SNATs nothing.
#[test]
fn nodeport_cluster_policy_by_direct_server_return_keeps_the_clients_address() {
    require_root!();
    direct_server_return(false);
}

/// The same with XDP: node-0's XDP sends every packet of node-1's flows on itself (XDP_TX)
/// but their SYNs, which it leaves to tc to add the option.
#[test]
fn nodeport_by_direct_server_return_with_xdp_tx_leaves_only_syns_to_tc() {
    require_root!();
    let (remote, counters) = direct_server_return(true);
    let (tx, to_tc) = (counters["xdp_tx"], counters["xdp_to_tc"]);
    // Each remote flow: its SYN to tc; ACK, request, FIN, last ACK by XDP_TX (but the first
    // few, before node-0 knew the next hop's MAC).
    assert!(to_tc >= remote, "xdp_to_tc {to_tc}, {remote} remote flows: {counters:?}");
    assert!(to_tc <= remote + 8, "xdp_to_tc {to_tc}, {remote} remote flows: {counters:?}");
    assert!(tx >= 3 * remote, "xdp_tx {tx}, {remote} remote flows: {counters:?}");
}

/// IPv6: the SYN carries the NodePort in a destination options header; every backend sees
/// the client, every answer comes from node-0's NodePort.
#[test]
fn ipv6_nodeport_by_direct_server_return_keeps_the_clients_address() {
    require_root!();
    let cluster = Cluster::new(2, 2, 1);
    let eps = cluster.all_pods(true);
    let web6 = Svc::WEB6;
    let run =
        Running::start_with(cluster, &[("web6.yaml", web6.file(&eps))], &["--lb-mode", "hybrid"]);
    let target = format!("[{}]:30086", run.cluster.nodes[0].ip6);
    let client = run.cluster.clients[0].ip6.to_string();
    let remote = answers_every_connection(&run, &target, 100, &client, &client) as u64;
    let learned = run.counter(1, "dsr_learned");
    assert!((remote..=remote + 5).contains(&learned), "{learned} learned, {remote} remote flows");
}

/// A DSR flow's answers leave node-1 from node-0's NodePort; a router on the way to the client
/// that cannot forward them tells node-0 ("fragmentation needed", "packet too big"). node-0
/// sends it on to the pod, quoting what the pod sent, so the pod's path MTU drops and its
/// smaller segments get through; otherwise they would vanish, and the exchange with them.
#[test]
fn fragmentation_needed_about_dsr_answers_reaches_the_backend() {
    require_root!();
    let mut cluster = Cluster::new(2, 1, 0);
    let c = cluster.client_behind_router(1400);
    let remote: Vec<_> =
        cluster.all_pods(false).into_iter().filter(|e| e.node == "node-1").collect();
    let remote6: Vec<_> =
        cluster.all_pods(true).into_iter().filter(|e| e.node == "node-1").collect();
    let files = [("web.yaml", CLUSTER_SVC.file(&remote)), ("web6.yaml", Svc::WEB6.file(&remote6))];
    let run = Running::start_with(cluster, &files, &["--lb-mode", "hybrid"]);
    let node0 = (run.cluster.nodes[0].ip4, run.cluster.nodes[0].ip6);
    for (target, translated) in
        [(format!("{}:30080", node0.0), 1), (format!("[{}]:30086", node0.1), 2)]
    {
        // 4000-byte answers: the pod's 1500-byte segments cannot reach the client.
        let args = ["session", &target, "--rounds", "3", "--interval-ms", "10", "--size", "4000"];
        let lines = run.from_client(c, &args);
        assert_eq!(lines.last().map(String::as_str), Some("ok node-1-pod-0 3"), "{lines:?}");
        let told = run.counter(0, "icmp_error_translated");
        assert!(told >= translated, "{target}: icmp_error_translated {told}");
    }
    assert!(run.counter(1, "dsr_learned") >= 2);
}

/// 200 connections to node-0's NodePort with `--lb-mode hybrid` (and XDP): every one
/// answered, from the NodePort, each backend seeing the client. Node-1's flows and node-0's
/// counters.
fn direct_server_return(xdp: bool) -> (u64, std::collections::BTreeMap<&'static str, u64>) {
    let mut cluster = Cluster::new(2, 2, 1);
    let mut args = vec!["--lb-mode", "hybrid"];
    if xdp {
        cluster.like_a_wire_for_xdp_tx();
        args.extend(["--xdp", "--xdp-tx", "on"]);
    }
    let eps = cluster.all_pods(false);
    let files = [("web.yaml", CLUSTER_SVC.file(&eps))];
    let run = Running::start_with(cluster, &files, &args);
    // Every backend sees the client, node-1's as node-0's.
    let client = run.cluster.clients[0].ip4.to_string();
    let remote = cluster_policy_answers_every_connection(&run, 200, &client) as u64;
    // node-1 learned each of its flows from its SYN (a retransmitted one counts again).
    let learned = run.counter(1, "dsr_learned");
    assert!((remote..=remote + 5).contains(&learned), "{learned} learned, {remote} remote flows");
    assert_eq!(run.counter(0, "dsr_learned"), 0);
    let ports = run.lbctl_json(0, &["nat", "--ports"]);
    let rows = ports.as_array().expect("rows");
    assert!(rows.iter().all(|r| r["held"] == 0), "no SNAT port held: {ports}");
    // lbctl shows it: the mode, node-0's forward entries of node-1's flows, node-1's replies,
    // and explain's answer for a flow that goes to node-1.
    assert_eq!(run.lbctl_json(0, &["status"])["lb_mode"], "hybrid");
    let remote_pod = |e: &serde_json::Value| {
        let backend = e["backend"].as_str().unwrap_or_default();
        run.cluster.nodes[1].pods.iter().any(|p| backend.starts_with(&format!("{}:", p.ip4)))
    };
    let e =
        (45000..45050).map(|port| explain(&run, port)).find(remote_pod).expect("a flow to node-1");
    assert_eq!((&e["dsr"], &e["snat"]), (&true.into(), &false.into()), "{e}");
    for (n, direction) in [(0, "original"), (1, "reply")] {
        let rows = run.lbctl_json(n, &["conntrack"]);
        let dsr: Vec<_> =
            rows.as_array().expect("rows").iter().filter(|r| r["dsr"] == true).collect();
        assert!(!dsr.is_empty(), "node-{n}: {rows}");
        assert!(dsr.iter().all(|r| r["direction"] == direction), "node-{n}: {rows}");
        // Both nodes count the flow as the service's: node-1 found it by the NodePort's port.
        let web =
            |r: &&serde_json::Value| r["service"].as_str().is_some_and(|s| s.contains("/web:"));
        assert!(dsr.iter().all(web), "node-{n}: {rows}");
    }
    // node-1 translated its backends' answers (a SYN-ACK, the answer and a FIN at least a flow),
    // counted as the service's.
    let services = run.lbctl_json(1, &["services"]);
    let answers = services[0]["packets"].as_u64().expect("packets");
    assert!(answers >= 3 * remote, "{answers} packets for {remote} flows: {services}");
    (remote, run.counters(0))
}

/// Packets whose sender leaves the transport checksum to its device (CHECKSUM_PARTIAL: what a
/// veth or a VM's virtio NIC hands over from a sender on the same host, where the field holds
/// only the pseudo-header's sum) are translated on node-0 and then summed in software on their
/// way (transmit checksumming off on node-0's devices), and every receiver checks them
/// (receive checksumming off): TCP and UDP, IPv4 and IPv6, to a local pod and to node-1's
/// (SNAT, whose answers reach node-0 partial too). Every exchange is answered and no receiver
/// counts a bad checksum; a translation that treated the field as a whole checksum would be
/// off by the ports' change, and the receivers would drop every such packet. Then the same
/// with whole checksums that node-0 receives unverified (CHECKSUM_NONE), updated in place.
#[test]
fn packets_left_for_the_device_to_sum_are_summed_right_after_translation() {
    require_root!();
    let cluster = Cluster::new(2, 1, 1);
    let files = [
        ("web.yaml", CLUSTER_SVC.file(&cluster.all_pods(false))),
        ("web6.yaml", Svc::WEB6.file(&cluster.all_pods(true))),
        ("dns.yaml", Svc::DNS.file(&cluster.all_pods(false))),
    ];
    let run = Running::start(cluster, &files);
    let c = &run.cluster;
    let set = |ns: &lb_tests::netns::NetNs, dev: &str, what: &str| {
        let out = ns.exec("ethtool", &["-K", dev, what, "off"]);
        assert!(out.status.success(), "ethtool -K {dev} {what} off in {}: {out:?}", ns.name());
    };
    // Summed in software when node-0 sends them: to its pod, and onto the segment.
    set(&c.nodes[0].ns, "p0", "tx");
    set(&c.nodes[0].ns, "eth0", "tx");
    // Checked by every receiver (a veth marks what it receives verified, unless told not to).
    set(&c.lan, "n0", "rx");
    set(&c.nodes[1].ns, "eth0", "rx");
    set(&c.clients[0].ns, "eth0", "rx");
    for node in &c.nodes {
        set(&node.pods[0].ns, "eth0", "rx");
    }
    let errors = || -> u64 {
        let namespaces = c.nodes.iter().map(|n| &n.pods[0].ns).chain([&c.clients[0].ns]);
        namespaces.map(csum_errors).sum()
    };
    let node0 = &c.nodes[0];
    let exchanges = |what: &str| {
        let mut answered = std::collections::BTreeSet::new();
        for target in [format!("{}:30080", node0.ip4), format!("[{}]:30086", node0.ip6)] {
            // Sessions until both pods answered one (Maglev picks by the client's port).
            for _ in 0..12 {
                let args = ["session", &target, "--rounds", "3", "--size", "900"];
                let lines = run.from_client(0, &args);
                let last = lines.last().cloned().unwrap_or_default();
                let name = last.strip_prefix("ok ").and_then(|l| l.strip_suffix(" 3"));
                let name = name.unwrap_or_else(|| panic!("{what}: {target}: {lines:?}"));
                answered.insert((target.clone(), name.to_owned()));
            }
        }
        let udp = format!("{}:30053", node0.ip4);
        let args = ["connect", &udp, "--udp", "--size", "700", "--count", "12"];
        let results = parse_probe(&run.from_client(0, &args));
        assert!(results.iter().all(|r| r.is_ok()), "{what}: {results:?}");
        assert_eq!(answered.len(), 4, "{what}: both pods, both families: {answered:?}");
        assert_eq!(by_server(&results).len(), 2, "{what}: {:?}", by_server(&results));
    };
    let before = errors();
    exchanges("partial");
    assert_eq!(errors(), before, "partial: bad checksums received");
    // Whole checksums (the client sums in software), unverified at node-0 (CHECKSUM_NONE, as a
    // NIC without receive checksumming hands them over): updated in place, checked by the pods.
    set(&c.clients[0].ns, "eth0", "tx");
    set(&node0.ns, "eth0", "rx");
    exchanges("unverified");
    assert_eq!(errors(), before, "unverified: bad checksums received");
}

/// Segments and datagrams the kernel of the namespace `ns` refused for a bad checksum (TCP over
/// both families, UDP over IPv4 and IPv6).
fn csum_errors(ns: &lb_tests::netns::NetNs) -> u64 {
    let errors = ["Tcp", "Udp"].map(|proto| ns.snmp(proto, "InCsumErrors"));
    errors.iter().sum::<u64>() + ns.snmp("6", "Udp6InCsumErrors")
}
