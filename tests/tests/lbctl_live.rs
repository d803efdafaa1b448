//! `lbctl` against the maps of real agents in the mini-cluster after real traffic: every
//! command's JSON parsed and checked against what was programmed and what happened.

use std::process::Command;

use lb_tests::{
    cgroup::cgroup2_root,
    cluster::{Cluster, Running, monitor_kinds, parse_probe},
    manifests::{Ep, Svc},
    proc::command_in,
    require_root, workspace_bin,
};
use serde_json::Value;

fn lbctl(args: &[&str]) -> Value {
    run_lbctl(Command::new(workspace_bin("lbctl")), args)
}

/// lbctl in a node's network namespace, as an operator on that node runs it (explain needs the
/// agent's devices).
fn lbctl_in(netns: &str, args: &[&str]) -> Value {
    run_lbctl(command_in(&workspace_bin("lbctl"), Some(netns), None), args)
}

fn run_lbctl(mut cmd: Command, args: &[&str]) -> Value {
    let out = cmd.args(args).output().expect("run lbctl");
    assert!(out.status.success(), "lbctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("lbctl {args:?}: not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
    })
}

#[test]
fn lbctl_reports_services_backends_flows_affinity_and_counters() {
    require_root!();
    let cluster = Cluster::new(2, 1, 1);
    let eps: Vec<Ep> = cluster.nodes.iter().map(|n| Ep::ready(n.pods[0].ip4, &n.name)).collect();
    let web = Svc { spec: "  sessionAffinity: ClientIP\n", ..Svc::WEB };
    let dns = Svc::DNS;
    // A UDP lifetime of the operator's choosing: lbctl judges entries by it, as the datapath.
    let files = [("web.yaml", web.file(&eps)), ("dns.yaml", dns.file(&eps))];
    let run = Running::start_with(cluster, &files, &["--conntrack-udp-timeout", "45s"]);
    let r = parse_probe(&run.from_client(0, &["connect", "10.230.0.10:30080", "--count", "10"]));
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    let backend = r[0].as_ref().unwrap().0.clone();
    let pins = run.pins[0].path.to_str().unwrap().to_owned();
    let node0 = run.cluster.nodes[0].ns.name().to_owned();

    let services = lbctl(&["services", "--bpffs", &pins, "-o", "json"]);
    let svc = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "default/web:p/TCP/IPv4")
        .unwrap();
    assert_eq!(svc["name"], "default/web:p/TCP/IPv4");
    assert!(svc["packets"].as_u64().unwrap() >= 30, "{svc}");
    let fronts: Vec<String> = svc["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{} {} {}",
                f["kind"].as_str().unwrap(),
                f["address"].as_str().unwrap(),
                f["scope"].as_str().unwrap()
            )
        })
        .collect();
    for want in [
        "ClusterIP 10.96.0.10:80 internal",
        "NodePort 10.230.0.10:30080 internal",
        "NodePort 10.230.0.10:30080 external",
    ] {
        assert!(fronts.iter().any(|f| f == want), "{want} missing in {fronts:?}");
    }
    let f0 = &svc["frontends"][0];
    assert_eq!(f0["flags"], serde_json::json!(["affinity"]));
    assert_eq!(f0["backends"].as_array().unwrap().len(), 2);
    let slots: u64 =
        f0["backends"].as_array().unwrap().iter().map(|b| b["slots"].as_u64().unwrap()).sum();
    assert_eq!(slots, f0["maglev_size"].as_u64().unwrap());

    let backends = lbctl(&["backends", "--bpffs", &pins, "-o", "json"]);
    assert_eq!(backends.as_array().unwrap().len(), 4, "2 pods x 2 ports: {backends}");
    let local: Vec<bool> =
        backends.as_array().unwrap().iter().map(|b| b["local"].as_bool().unwrap()).collect();
    assert_eq!(local.iter().filter(|l| **l).count(), 2, "node-0's pod is local: {backends}");
    // The 10 connections (one backend: affinity) ended with FIN: closing, none open.
    let flows =
        |b: &Value| (b["open_flows"].as_u64().unwrap(), b["closing_flows"].as_u64().unwrap());
    let with_flows: Vec<(String, (u64, u64))> = backends
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| flows(b) != (0, 0))
        .map(|b| (b["address"].as_str().unwrap().to_owned(), flows(b)))
        .collect();
    let pod_ip = |name: &str| {
        let n: usize = name[5..6].parse().unwrap();
        run.cluster.nodes[n].pods[0].ip4.to_string()
    };
    assert_eq!(with_flows, [(format!("{}:8080", pod_ip(&backend)), (0, 10))], "{backends}");

    let ct = lbctl(&["conntrack", "--bpffs", &pins, "-o", "json", "--protocol", "tcp"]);
    let rows = ct.as_array().unwrap();
    assert_eq!(rows.len(), 20, "10 flows x 2 directions: {ct}");
    assert!(rows.iter().all(|r| r["service"] == "default/web:p/TCP/IPv4"));
    let originals: Vec<&Value> = rows.iter().filter(|r| r["direction"] == "original").collect();
    assert!(originals.iter().all(|r| r["to"] == "10.230.0.10:30080"
        && r["from"].as_str().unwrap().starts_with("10.230.0.100:")));
    let snat = lbctl(&["nat", "--bpffs", &pins, "-o", "json"]);
    let remote = backend.starts_with("node-1");
    assert_eq!(
        snat.as_array().unwrap().len(),
        if remote { 20 } else { 0 },
        "affinity sent all 10 to {backend}: {snat}"
    );

    let aff = lbctl(&["affinity", "--bpffs", &pins, "-o", "json"]);
    let aff_rows = aff.as_array().unwrap();
    assert_eq!(aff_rows.len(), 1, "{aff}");
    assert_eq!(aff_rows[0]["client"], "10.230.0.100");

    let stats = lbctl(&["stats", "--bpffs", &pins, "-o", "json"]);
    assert_eq!(stats["counters"]["ct_new"], 10);
    assert_eq!(stats["counters"]["affinity_hit"], 9);
    let ct_fill =
        stats["maps"].as_array().unwrap().iter().find(|m| m["map"] == "LB_CT").unwrap().clone();
    assert_eq!(ct_fill["entries"], 20);
    assert_eq!(ct_fill["capacity"], 65536);

    let maglev = lbctl(&["maglev", "web", "--bpffs", &pins, "-o", "json", "--table"]);
    let t = &maglev.as_array().unwrap()[0];
    assert_eq!(t["slots"].as_array().unwrap().len() as u64, t["size"].as_u64().unwrap());

    // explain: the live program on the packet, against the live maps, changing none of them.
    let state = |pins: &str| {
        (
            lbctl(&["conntrack", "--bpffs", pins, "-o", "json"]),
            lbctl(&["affinity", "--bpffs", pins, "-o", "json"]),
            lbctl(&["stats", "--bpffs", pins, "-o", "json"]),
        )
    };
    let before = state(&pins);
    // An established-by-affinity client: explain names the affinity entry and the sticky backend.
    let e = lbctl_in(
        &node0,
        &["explain", "10.230.0.100:45000", "10.230.0.10:30080", "--bpffs", &pins, "-o", "json"],
    );
    assert_eq!(e["service"], "default/web:p/TCP/IPv4");
    assert!(
        e["decided_by"].as_str().unwrap().contains("sessionAffinity entry of client 10.230.0.100"),
        "{e}"
    );
    assert_eq!(e["backend"], format!("{}:8080", pod_ip(&backend)));
    // A fresh UDP flow: explain names the Maglev slot; the real datagram from the same port
    // goes to the same backend.
    for sport in ["41000", "41001", "41002", "41003"] {
        let e = lbctl_in(
            &node0,
            &[
                "explain",
                &format!("10.230.0.100:{sport}"),
                "10.230.0.10:30053/udp",
                "--bpffs",
                &pins,
                "-o",
                "json",
            ],
        );
        assert!(e["decided_by"].as_str().unwrap().starts_with("Maglev slot"), "{e}");
        let real = parse_probe(
            &run.from_client(0, &["connect", "10.230.0.10:30053", "--udp", "--sport", sport]),
        );
        let answered_by = &real[0].as_ref().unwrap().0;
        assert_eq!(
            e["backend"],
            format!("{}:5353", pod_ip(answered_by)),
            "explain and real traffic agree for port {sport}"
        );
        let local = answered_by.starts_with("node-0");
        let expected_rewrite = if local { "10.230.0.100" } else { "10.230.0.10" };
        assert!(e["rewritten"].as_str().unwrap().starts_with(expected_rewrite), "{e}");
        // Run as arriving on the agent's device: a remote backend's packet is routed out of it
        // by the program itself, as real traffic is; a local one goes up the stack.
        assert_eq!(e["device"], "eth0", "{e}");
        let verdict = if local { "pass to the stack" } else { "redirect out of the routed device" };
        assert_eq!(e["verdict"], verdict, "{e}");
    }
    // The device must be one the agent attached to, and lbctl must run in the agent's network
    // namespace: the outside client's namespace has an eth0 too (same interface number).
    let explain_err = |netns: &str, extra: &[&str]| {
        let mut args =
            vec!["explain", "10.230.0.100:41000", "10.230.0.10:30053/udp", "--bpffs", &pins];
        args.extend_from_slice(extra);
        let out =
            command_in(&workspace_bin("lbctl"), Some(netns), None).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = explain_err(&node0, &["--device", "eth9"]);
    assert!(err.contains("--device eth9: the agent attached to eth0 only"), "{err}");
    let err = explain_err(run.cluster.clients[0].ns.name(), &[]);
    assert!(err.contains("this is not the agent's network namespace"), "{err}");
    let err = explain_err(&node0, &["--device", "eth0", "--from", "pod"]);
    assert!(err.contains("--device is for packets from outside"), "{err}");

    // Not a frontend, and a drop reason.
    let e = lbctl_in(
        &node0,
        &["explain", "10.230.0.100", "10.230.0.10:22", "--bpffs", &pins, "-o", "json"],
    );
    assert_eq!(e["verdict"], "not for a frontend: passed untouched");
    let e = lbctl_in(
        &node0,
        &[
            "explain",
            "10.230.0.100",
            "10.96.0.10:80",
            "--from",
            "pod",
            "--bpffs",
            &pins,
            "-o",
            "json",
        ],
    );
    assert!(e["decided_by"].as_str().unwrap().contains("sessionAffinity per pod"), "{e}");
    let e = lbctl_in(
        &node0,
        &[
            "explain",
            "10.230.0.100",
            "10.96.0.10:81",
            "--from",
            "pod",
            "--bpffs",
            &pins,
            "-o",
            "json",
        ],
    );
    assert!(e["verdict"].as_str().unwrap().contains("ECONNREFUSED"), "{e}");
    // Explaining left conntrack, affinity and counters as they were, except for what the real
    // datagrams above did.
    let after = state(&pins);
    let real_flows = 4 * 2;
    assert_eq!(after.0.as_array().unwrap().len(), before.0.as_array().unwrap().len() + real_flows);
    let udp: Vec<&Value> =
        after.0.as_array().unwrap().iter().filter(|r| r["protocol"] == "UDP").collect();
    assert_eq!(udp.len(), real_flows, "{udp:?}");
    for r in &udp {
        let (idle, left) = (r["idle_s"].as_u64().unwrap(), r["expires_in_s"].as_u64().unwrap());
        assert!(idle + left <= 45 && idle + left >= 44, "45 s to live: {r}");
    }
    let without_idle = |v: &Value| -> Vec<Value> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.as_object_mut().unwrap().remove("idle_s");
                r
            })
            .collect()
    };
    assert_eq!(without_idle(&after.1), without_idle(&before.1), "affinity entries untouched");
    assert_eq!(
        after.2["counters"]["ct_new"].as_u64().unwrap(),
        before.2["counters"]["ct_new"].as_u64().unwrap() + 4
    );

    // Errors are clear.
    let out = Command::new(workspace_bin("lbctl"))
        .args(["services", "--bpffs", "/sys/fs/bpf/nonexistent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is an agent running with --bpffs"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two nodes, each with a pod serving web (ClusterIP 10.96.0.10, NodePort 30080), and a
/// service without endpoints, empty (ClusterIP 10.96.0.91, NodePort 30091).
fn web_and_empty() -> Running {
    let cluster = Cluster::new(2, 1, 1);
    let eps: Vec<Ep> = cluster.nodes.iter().map(|n| Ep::ready(n.pods[0].ip4, &n.name)).collect();
    let empty =
        Svc { name: "empty", cluster_ips: &["10.96.0.91"], node_port: Some(30091), ..Svc::WEB };
    let files = [("web.yaml", Svc::WEB.file(&eps)), ("empty.yaml", empty.file(&[]))];
    Running::start(cluster, &files)
}

#[test]
fn lbctl_monitor_follows_drops_refusals_and_new_flows_with_who_and_why_and_then_lets_go() {
    require_root!();
    let run = web_and_empty();
    let pins = run.pins[0].path.to_str().unwrap().to_owned();
    let node0 = run.cluster.nodes[0].ns.name().to_owned();
    assert_eq!(monitor_kinds(&run.pins[0].path), 0);
    let monitor = run.monitor(0, &["--type", "all", "-o", "json"]);
    // One at a time.
    let second = Command::new(workspace_bin("lbctl"))
        .args(["monitor", "--bpffs", &pins, "--count", "1"])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(2));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another lbctl monitor is running"), "{err}");

    let ok = |lines: Vec<String>| {
        let r = parse_probe(&lines);
        assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        r[0].as_ref().unwrap().0.clone()
    };
    let refused = |lines: Vec<String>| {
        assert_eq!(parse_probe(&lines), [Err("ECONNREFUSED".to_string())], "{lines:?}");
    };
    let outside_backend = ok(run.from_client(0, &["connect", "10.230.0.10:30080"]));
    refused(run.from_client(0, &["connect", "10.230.0.10:30091"]));
    let pod_backend = ok(run.from_pod(0, 0, &["connect", "10.96.0.10:80"]));
    refused(run.from_pod(0, 0, &["connect", "10.96.0.91:80"]));
    refused(run.from_pod(0, 0, &["connect", "10.96.0.10:81"]));

    // Ctrl-C: it stops, successfully, and gives the lease back.
    let out = monitor.stop();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(monitor_kinds(&run.pins[0].path), 0, "lease released");
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let find = |kind: &str, to: &str| -> Vec<&Value> {
        events.iter().filter(|e| e["kind"] == kind && e["to"] == to).collect()
    };
    let pod_ip = |name: &str| {
        let n: usize = name[5..6].parse().unwrap();
        run.cluster.nodes[n].pods[0].ip4.to_string()
    };

    // The outside client's new flow, once, with the backend that answered it.
    let flow = find("flow", "10.230.0.10:30080");
    assert_eq!(flow.len(), 1, "{events:#?}");
    let flow = flow[0];
    assert_eq!((&flow["hook"], &flow["device"]), (&"tc-ingress".into(), &"eth0".into()), "{flow}");
    assert!(flow["from"].as_str().unwrap().starts_with("10.230.0.100:"), "{flow}");
    assert_eq!(flow["new_to"], format!("{}:8080", pod_ip(&outside_backend)), "{flow}");
    assert_eq!(flow["snat"], !outside_backend.starts_with("node-0"), "{flow}");
    assert_eq!(flow["service"], "default/web:p/TCP/IPv4");
    assert!(flow["bytes"].as_u64().unwrap() >= 54, "{flow}");

    let reject = find("reject", "10.230.0.10:30091");
    assert_eq!(reject.len(), 1, "{events:#?}");
    assert_eq!(reject[0]["service"], "default/empty:p/TCP/IPv4");
    assert_eq!(reject[0]["reason"], "reject_no_backend");

    // The pod's calls, with the process that made them.
    let connect = find("connect", "10.96.0.10:80");
    assert_eq!(connect.len(), 1, "{events:#?}");
    assert_eq!(connect[0]["new_to"], format!("{}:8080", pod_ip(&pod_backend)));
    let no_endpoint = find("refused", "10.96.0.91:80");
    let no_port = find("refused", "10.96.0.10:81");
    assert_eq!((no_endpoint.len(), no_port.len()), (1, 1), "{events:#?}");
    assert_eq!(no_endpoint[0]["reason"], "sock_no_backend");
    assert_eq!(no_endpoint[0]["service"], "default/empty:p/TCP/IPv4");
    assert_eq!(no_port[0]["reason"], "sock_unknown_port");
    assert_eq!(no_port[0]["service"], Value::Null);
    // The pods of this mini-cluster live in their node's cgroup.
    let node_cgroup = &run.cluster.nodes[0].cgroup.path;
    let cgroup = format!("/{}", node_cgroup.strip_prefix(cgroup2_root()).unwrap().display());
    for e in [connect[0], no_endpoint[0], no_port[0]] {
        assert_eq!((&e["hook"], &e["command"]), (&"connect".into(), &"lb-probe".into()), "{e}");
        assert_eq!(e["cgroup"], cgroup, "{e}");
        assert!(e["pid"].as_u64().unwrap() > 1, "{e}");
        assert_eq!(e["device"], Value::Null);
    }

    // Filters: only what concerns one address, and a monitor that stops after one event.
    let monitor = run.monitor(0, &["--type", "all", "--address", "10.96.0.91", "--count", "1"]);
    ok(run.from_pod(0, 0, &["connect", "10.96.0.10:80"]));
    refused(run.from_pod(0, 0, &["connect", "10.96.0.91:80"]));
    let out = monitor.finish();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains(" refused connect     TCP -> 10.96.0.91:80  default/empty:p/TCP/IPv4: no usable endpoint: ECONNREFUSED  pid "),
        "{lines:?}"
    );
    assert_eq!(monitor_kinds(&run.pins[0].path), 0, "stopped by its count: lease released");

    // Read through a pipe whose reader leaves (`| head -n 1`): it stops cleanly, lease given
    // back.
    let line = format!(
        "set -o pipefail; {} monitor --type connect --bpffs {pins} | head -n 1",
        workspace_bin("lbctl").display()
    );
    let mut piped = command_in(std::path::Path::new("/bin/bash"), Some(&node0), None)
        .args(["-c", &line])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while monitor_kinds(&run.pins[0].path) == 0 {
        assert!(start.elapsed().as_secs() < 10, "the piped monitor never took its lease");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Events until it notices the reader is gone (its next write after head's exit).
    let start = std::time::Instant::now();
    while piped.try_wait().unwrap().is_none() {
        if start.elapsed().as_secs() >= 10 {
            let _ =
                std::process::Command::new("pkill").args(["-f", "monitor --type connect"]).status();
            panic!("the piped monitor never stopped");
        }
        ok(run.from_pod(0, 0, &["connect", "10.96.0.10:80"]));
    }
    let out = piped.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    assert_eq!(monitor_kinds(&run.pins[0].path), 0, "lease released");

    // After it: nothing is sent (a monitor started now sees only what happens from now on).
    refused(run.from_pod(0, 0, &["connect", "10.96.0.91:80"]));
    let out = command_in(&workspace_bin("lbctl"), Some(&node0), None)
        .args(["monitor", "--bpffs", &pins, "--duration", "1s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "events from before it started");
    assert_eq!(monitor_kinds(&run.pins[0].path), 0);
}

#[test]
fn lbctl_status_shows_health_attachments_maps_and_drops_and_the_maps_once_the_agent_is_gone() {
    require_root!();
    let mut run = web_and_empty();
    let pins = run.pins[0].path.to_str().unwrap().to_owned();
    let node0 = run.cluster.nodes[0].ns.name().to_owned();
    let r = parse_probe(&run.from_client(0, &["connect", "10.230.0.10:30080", "--count", "3"]));
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    let refused = run.from_client(0, &["connect", "10.230.0.10:30091"]);
    assert_eq!(refused, ["err ECONNREFUSED"]);

    let s = lbctl_in(&node0, &["status", "--bpffs", &pins, "-o", "json"]);
    let a = &s["agent"];
    assert_eq!(
        (&a["healthz"], &a["livez"], &a["ready"]),
        (&200.into(), &200.into(), &true.into()),
        "{s}"
    );
    assert_eq!(
        (&a["node_eligible"], &a["services_unprogrammed"]),
        (&true.into(), &0.into()),
        "{s}"
    );
    assert!(a["synced_s_ago"].as_f64().unwrap() < 60.0, "{s}");
    assert_eq!(s["devices"], serde_json::json!([{"name": "eth0", "xdp": false, "tc": "tcx"}]));
    let node_cgroup = &run.cluster.nodes[0].cgroup.path;
    let cgroup = format!("/{}", node_cgroup.strip_prefix(cgroup2_root()).unwrap().display());
    assert_eq!(s["socket_hooks"], serde_json::json!([cgroup]));
    assert_eq!((&s["service_ports"], &s["backends"]), (&2.into(), &2.into()), "{s}");
    assert_eq!(s["drops"], serde_json::json!({"reject_no_backend": 1}), "{s}");
    assert!(s["conntrack_entries"].as_u64().unwrap() >= 6, "three flows, two entries each: {s}");
    assert_eq!(s["monitor_lease_s"], Value::Null);
    assert_eq!(s["kernel_fallbacks"], serde_json::json!([]), "6.18 has everything: {s}");
    // The filters, all trusted: the two ClusterIPs; the frontend addresses: those, the node's
    // (NodePorts, SNAT source) and 127.0.0.1 (NodePorts from the host); the ingress ports: the
    // two NodePorts and the SNAT range.
    let filter = |name: &str| {
        let f = s["filters"].as_array().unwrap().iter().find(|f| f["name"] == name).cloned();
        f.unwrap_or_else(|| panic!("no filter {name}: {s}"))
    };
    assert!(s["filters"].as_array().unwrap().iter().all(|f| f["on"] == true), "{s}");
    assert_eq!(filter("ClusterIPs")["set"], 2, "{s}");
    assert_eq!(filter("ingress ports")["set"], 2 + 4536, "{s}");
    assert_eq!(filter("frontend addresses")["set"], 4, "{s}");
    let out = command_in(&workspace_bin("lbctl"), Some(&node0), None)
        .args(["status", "--bpffs", &pins])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let pid = run.agents[0].pid();
    assert_eq!(s["agent"]["pid"], pid, "the process holding the pins: {s}");
    let healthy = format!(
        "agent:        healthy; /healthz 200, /livez 200, ready (127.0.0.1:10256), pid {pid}\n"
    );
    assert!(text.starts_with(&healthy), "{text}");
    assert!(text.contains("\ndevices:      eth0 (tc)\n"), "{text}");
    let filters = "\nfilters:      reply ports 1 (0.0%), ingress ports 4538 (6.9%), pod ports 4539";
    assert!(text.contains(filters), "{text}");

    // The agent dies: its health port is silent, the datapath and what it holds remain.
    run.kill_agent(0);
    let s = lbctl_in(&node0, &["status", "--bpffs", &pins, "-o", "json"]);
    assert_eq!(s["agent"]["healthz"], Value::Null, "{s}");
    assert!(s["agent"]["error"].as_str().unwrap().contains("refused"), "{s}");
    assert_eq!(s["agent"]["pid"], Value::Null, "nothing holds the pins: {s}");
    assert_eq!((&s["service_ports"], &s["devices"][0]["name"]), (&2.into(), &"eth0".into()));
}
