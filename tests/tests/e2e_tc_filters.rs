//! Kernels without TCX (before 6.6: the 6.1 LTS kernels of Debian 12, Amazon Linux 2023 and
//! many managed node images) get the tc programs as filters of a clsact qdisc. `--enable-tcx
//! =false` takes that path on this kernel: real traffic through it, a restart that replaces
//! the programs in place under traffic, a re-created device, a pod device, a device dropped
//! from the flags, `lbctl`, and `--cleanup`.

use std::time::Duration;

use aya::programs::{SchedClassifier, TcAttachType};
use lb_tests::{
    cluster::{Cluster, Running, by_server, metric, parse_probe},
    manifests::Svc,
    require_root, wait_until, workspace_bin,
};

/// (program name, program id, priority, handle) of each bpf filter on node-0's `dev` at its
/// `dir` ("ingress"/"egress") hook, as `tc -j filter show` lists them.
fn filters(run: &Running, dev: &str, dir: &str) -> Vec<(String, u64, u64, String)> {
    let out = run.cluster.nodes[0].ns.exec("tc", &["-j", "filter", "show", "dev", dev, dir]);
    if !out.status.success() {
        return Vec::new(); // no clsact qdisc (any more)
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["kind"] == "bpf" && f["options"].is_object())
        .map(|f| {
            let o = &f["options"];
            let name = o["bpf_name"].as_str().unwrap_or("?").to_owned();
            let id = o["prog"]["id"].as_u64().unwrap_or(0);
            let handle = o["handle"].as_str().unwrap_or("?").to_owned();
            (name, id, f["pref"].as_u64().unwrap_or(0), handle)
        })
        .collect()
}

/// The programs on node-0's `dev` as TCX links.
fn tcx_programs(run: &Running, dev: &str) -> usize {
    let ns = &run.cluster.nodes[0].ns;
    [TcAttachType::Ingress, TcAttachType::Egress]
        .into_iter()
        .map(|dir| {
            ns.run(|| SchedClassifier::query_tcx(dev, dir).map(|(_, p)| p.len()).unwrap_or(0))
        })
        .sum()
}

#[test]
fn without_tcx_the_programs_are_clsact_filters_that_live_through_restarts_until_cleanup() {
    require_root!();
    let cluster = Cluster::new(2, 1, 1);
    let eps = cluster.all_pods(false);
    let mut run = Running::start_with(
        cluster,
        &[("web.yaml", Svc::WEB.file(&eps))],
        &["--enable-tcx=false", "--pod-devices", "p+"],
    );
    let nodeport = ["connect", "10.230.0.10:30080", "--count", "40"];
    let r = parse_probe(&run.from_client(0, &nodeport));
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    assert_eq!(by_server(&r).len(), 2, "the local pod and node-1's (SNAT): {:?}", by_server(&r));
    run.agents[0].wait_for_log("attached as clsact filters", Duration::from_secs(5));

    // One filter each way, first in line, under the agent's handle; no TCX link anywhere.
    let ingress = filters(&run, "eth0", "ingress");
    assert_eq!(ingress.len(), 1, "{ingress:?}");
    assert_eq!(
        (ingress[0].0.as_str(), ingress[0].2, ingress[0].3.as_str()),
        ("tc_ingress", 1, "0x4c42")
    );
    let egress = filters(&run, "eth0", "egress");
    assert_eq!(egress.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(), ["tc_egress"]);
    assert_eq!(tcx_programs(&run, "eth0"), 0);
    let pod_dev = "p0";
    let on_pod: Vec<String> = filters(&run, pod_dev, "ingress").into_iter().map(|f| f.0).collect();
    assert_eq!(on_pod, ["tc_from_pod"], "the pod device's hook");
    let status = run.lbctl_json(0, &["status"]);
    let eth0 = serde_json::json!([{"name": "eth0", "xdp": false, "tc": "clsact"}]);
    assert_eq!(status["devices"], eth0, "{status}");
    assert_eq!(status["pod_devices"], serde_json::json!([pod_dev]), "{status}");

    // A restart under traffic: the filters get the new agent's programs in place (same
    // filter, another program), and no connection fails meanwhile.
    let long = run.background_from_client(
        0,
        &["session", "10.230.0.10:30080", "--rounds", "40", "--interval-ms", "25"],
    );
    let many = run.background_from_client(0, &["connect", "10.230.0.10:30080", "--count", "300"]);
    std::thread::sleep(Duration::from_millis(100));
    run.kill_agent(0);
    run.restart_agent(0);
    let out = long.finish();
    assert!(out.last().is_some_and(|l| l.starts_with("ok ") && l.ends_with(" 40")), "{out:?}");
    let during = parse_probe(&many.finish());
    let failed = during.iter().filter(|r| r.is_err()).count();
    assert_eq!(failed, 0, "{failed} of {} failed across the restart", during.len());
    let after = filters(&run, "eth0", "ingress");
    assert_eq!(after.len(), 1, "replaced, not added: {after:?}");
    assert_ne!(after[0].1, ingress[0].1, "the new agent's program");
    assert_eq!(filters(&run, pod_dev, "ingress").len(), 1);

    // The device re-created (a NIC reset): its filters come back.
    run.cluster.recreate_node_device(0);
    wait_until("the NodePort answers again", Duration::from_secs(10), || {
        run.from_client(0, &["connect", "10.230.0.10:30080", "--timeout-ms", "300"])[0]
            .starts_with("ok")
    });
    assert_eq!(filters(&run, "eth0", "ingress").len(), 1);

    // The clsact qdiscs deleted under the agent (a tool resetting devices' queueing): every
    // filter goes with its qdisc, and nothing tells the agent but netlink's word of the
    // change; it puts them back within moments, and `lbctl status` says when they are gone.
    let del_clsact = |run: &Running, dev: &str| {
        let out = run.cluster.nodes[0].ns.exec("tc", &["qdisc", "del", "dev", dev, "clsact"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    for dev in ["eth0", pod_dev] {
        del_clsact(&run, dev);
    }
    let started = std::time::Instant::now();
    wait_until("the filters are back", Duration::from_secs(5), || {
        filters(&run, "eth0", "ingress").len() == 1
            && filters(&run, "eth0", "egress").len() == 1
            && filters(&run, pod_dev, "ingress").len() == 1
            && filters(&run, pod_dev, "egress").len() == 1
    });
    println!("filters back {:?} after their qdiscs were deleted", started.elapsed());
    // Counted (just after the filters show): the re-created device above, then the node's and
    // the pod's device here.
    wait_until("three restorations counted", Duration::from_secs(2), || {
        metric(&run.metrics(0), "lb_hooks_restored_total") == 3.0
    });
    let r = parse_probe(&run.from_client(0, &nodeport));
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    assert_eq!(run.lbctl_json(0, &["status"])["devices"], eth0);
    // Gone with no agent to notice: said so.
    assert!(run.stop_agent(0).success());
    del_clsact(&run, "eth0");
    let status = run.lbctl_json(0, &["status"]);
    assert_eq!(status["devices"][0]["tc"], "clsact MISSING", "{status}");
    run.restart_agent(0);
    assert_eq!(filters(&run, "eth0", "ingress").len(), 1, "a new agent attaches them");

    // Dropped from the flags: the pod device's filters go at the next start.
    run.agent_args[0].retain(|a| a != "--pod-devices" && a != "p+");
    run.kill_agent(0);
    run.restart_agent(0);
    assert_eq!(filters(&run, pod_dev, "ingress"), [], "detached with its record");
    assert_eq!(filters(&run, "eth0", "ingress").len(), 1);

    // Uninstall, from the node's network namespace (as the DaemonSet's host network).
    assert!(run.stop_agent(0).success());
    let pins = run.pins[0].path.to_str().unwrap().to_owned();
    // Not `ip netns exec`, which mounts a /sys of its own, without the bpffs.
    let out = lb_tests::proc::command_in(
        &workspace_bin("lb-agent"),
        Some(run.cluster.nodes[0].ns.name()),
        None,
    )
    .args(["--cleanup", "--bpffs", &pins])
    .output()
    .expect("run lb-agent --cleanup");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(filters(&run, "eth0", "ingress"), [], "filters removed");
    assert_eq!(filters(&run, "eth0", "egress"), []);
    let r = run.from_client(0, &["connect", "10.230.0.10:30080", "--timeout-ms", "500"]);
    assert!(r[0].starts_with("err"), "nothing translates any more: {r:?}");
}

/// Switching between TCX links and clsact filters at a restart (a kernel upgrade, or the flag
/// changed) leaves one program per hook: the new kind goes in, then the old one goes.
#[test]
fn switching_between_links_and_filters_at_a_restart_leaves_one_program_per_hook() {
    require_root!();
    let cluster = Cluster::new(1, 1, 1);
    let eps = cluster.all_pods(false);
    let mut run = Running::start(cluster, &[("web.yaml", Svc::WEB.file(&eps))]);
    let answers = |run: &Running| {
        let r =
            parse_probe(&run.from_client(0, &["connect", "10.230.0.10:30080", "--count", "10"]));
        r.iter().all(|r| r.is_ok())
    };
    assert!(answers(&run));
    assert_eq!((tcx_programs(&run, "eth0"), filters(&run, "eth0", "ingress").len()), (2, 0));

    run.agent_args[0].push("--enable-tcx=false".into());
    run.kill_agent(0);
    run.restart_agent(0);
    // The kernel releases a link whose last pin went from a work queue: a moment later.
    wait_until("the links are released", Duration::from_secs(10), || {
        tcx_programs(&run, "eth0") == 0
    });
    assert_eq!(filters(&run, "eth0", "ingress").len(), 1);
    assert_eq!(filters(&run, "eth0", "egress").len(), 1);
    assert!(answers(&run));

    run.agent_args[0].pop();
    run.kill_agent(0);
    run.restart_agent(0);
    assert_eq!(filters(&run, "eth0", "ingress").len() + filters(&run, "eth0", "egress").len(), 0);
    assert_eq!(tcx_programs(&run, "eth0"), 2);
    assert!(answers(&run));
}

/// The agent asks for each device's filters every 2 s through one netlink socket per thread
/// (`tc_query`), kept while the thread stays in one network namespace: a thread that moves
/// to another must get that namespace's answer, not the first one's (both devices here have
/// the same interface index, as the first device of every fresh namespace does).
#[test]
fn the_filter_query_answers_for_its_threads_current_network_namespace() {
    use lb_agent::dataplane::{netdev, tc_query};
    use std::os::fd::AsRawFd;
    require_root!();
    let (with, without) =
        (lb_tests::netns::NetNs::new("tcqa"), lb_tests::netns::NetNs::new("tcqb"));
    for ns in [&with, &without] {
        ns.ip(&["link", "add", "t0", "type", "veth", "peer", "name", "t1"]);
        let out = ns.exec("tc", &["qdisc", "add", "dev", "t0", "clsact"]);
        assert!(out.status.success(), "{out:?}");
    }
    // A classic BPF filter (accept all): kind "bpf", as the agent's.
    let filter = ["filter", "add", "dev", "t0", "ingress", "prio", "7", "handle", "3", "bpf"];
    let out = with.exec("tc", &[&filter[..], &["bytecode", "1,6 0 0 4294967295,"]].concat());
    assert!(out.status.success(), "{out:?}");
    let enter = |ns: &lb_tests::netns::NetNs| {
        let f = std::fs::File::open(format!("/run/netns/{}", ns.name())).unwrap();
        // SAFETY: a valid namespace fd; affects only this thread.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        netdev::ifindex("t0").unwrap()
    };
    let answers = std::thread::scope(|s| {
        s.spawn(|| {
            [&with, &without, &with].map(|ns| {
                let ifindex = enter(ns);
                (ifindex, tc_query::bpf_filters(ifindex, TcAttachType::Ingress).unwrap())
            })
        })
        .join()
        .unwrap()
    });
    let ours = vec![tc_query::BpfFilter { priority: 7, handle: 3 }];
    assert_eq!(answers[0].0, answers[1].0, "the same index in both: {answers:?}");
    assert_eq!([&answers[0].1, &answers[1].1, &answers[2].1], [&ours, &vec![], &ours]);
}
