//! Agent restarts and uninstall: programs and maps stay when the agent stops (traffic keeps
//! flowing, open connections survive), a new agent swaps its programs into the pinned links
//! (no duplicate attachment), an upgrade from the previous release under traffic fails nothing,
//! and `lb-agent --cleanup` removes everything.

use std::time::Duration;

use aya::programs::{SchedClassifier, TcAttachType};
use lb_tests::{
    cluster::{Cluster, Running, by_server, parse_probe},
    manifests::{Ep, Svc},
    require_root, workspace_bin,
};

#[test]
fn traffic_survives_agent_restarts_and_cleanup_removes_everything() {
    require_root!();
    let cluster = Cluster::new(1, 2, 1);
    let eps: Vec<Ep> = cluster.nodes[0].pods.iter().map(|p| Ep::ready(p.ip4, "node-0")).collect();
    let web = Svc::WEB;
    let mut run = Running::start(cluster, &[("web.yaml", web.file(&eps))]);
    let ok = |run: &Running, what: &str| {
        let from_client =
            parse_probe(&run.from_client(0, &["connect", "10.230.0.10:30080", "--count", "20"]));
        let from_pod =
            parse_probe(&run.from_pod(0, 1, &["connect", "10.96.0.10:80", "--count", "20"]));
        for (who, r) in [("client", from_client), ("pod", from_pod)] {
            assert!(r.iter().all(|r| r.is_ok()), "{what}, from {who}: {r:?}");
            assert_eq!(by_server(&r).len(), 2, "{what}, from {who}");
        }
    };
    ok(&run, "agent running");

    // Sessions open across the stop and the restart.
    let sessions = [
        run.background_from_client(
            0,
            &["session", "10.230.0.10:30080", "--rounds", "30", "--interval-ms", "50"],
        ),
        run.background_from_pod(
            0,
            1,
            &["session", "10.96.0.10:80", "--rounds", "30", "--interval-ms", "50"],
        ),
    ];
    std::thread::sleep(Duration::from_millis(200));
    assert!(run.stop_agent(0).success());
    ok(&run, "agent stopped");
    run.restart_agent(0);
    let log = run.agents[0].log();
    let replaced = log.iter().filter(|l| l.contains("program replaced in the pinned link")).count();
    assert_eq!(replaced, 10, "2 tc + 8 socket hooks swapped in place:\n{}", log.join("\n"));
    ok(&run, "agent restarted");
    for s in sessions {
        let out = s.finish();
        assert!(out.last().is_some_and(|l| l.starts_with("ok ") && l.ends_with(" 30")), "{out:?}");
    }

    // One program per hook, not two.
    let node = &run.cluster.nodes[0];
    let tcx = |dir| {
        node.ns.run(move || {
            let (_, progs) = SchedClassifier::query_tcx("eth0", dir).expect("query tcx");
            progs.iter().map(|p| p.name_as_str().unwrap_or("?").to_owned()).collect::<Vec<_>>()
        })
    };
    assert_eq!(tcx(TcAttachType::Ingress), ["tc_ingress"]);
    assert_eq!(tcx(TcAttachType::Egress), ["tc_egress"]);
    let cg = std::process::Command::new("bpftool")
        .args(["cgroup", "show", node.cgroup.path.to_str().unwrap()])
        .output()
        .unwrap();
    let cg = String::from_utf8_lossy(&cg.stdout);
    assert_eq!(cg.matches("connect4").count(), 1, "{cg}");

    // Uninstall: stop, clean up, and nothing answers for the services any more.
    assert!(run.stop_agent(0).success());
    let pins = run.pins[0].path.to_str().unwrap().to_owned();
    let out = std::process::Command::new(workspace_bin("lb-agent"))
        .args(["--cleanup", "--bpffs", &pins])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!std::path::Path::new(&pins).exists(), "{pins} left behind");
    // The kernel releases a link whose last pin went from a work queue: a moment later.
    let left = || {
        run.cluster.nodes[0].ns.run(|| {
            SchedClassifier::query_tcx("eth0", TcAttachType::Ingress)
                .map(|(_, p)| p.len())
                .unwrap_or(0)
        })
    };
    let start = std::time::Instant::now();
    while left() > 0 && start.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(left(), 0, "tc programs still attached");
    let r = run.from_client(0, &["connect", "10.230.0.10:30080", "--timeout-ms", "500"]);
    assert!(r[0].starts_with("err"), "{r:?}");
    let r = run.from_pod(0, 1, &["connect", "10.96.0.10:80", "--timeout-ms", "500"]);
    assert!(r[0].starts_with("err"), "{r:?}");
}

#[test]
fn kill_9_during_traffic_fails_nothing() {
    require_root!();
    let run = two_nodes_with_web(None);
    traffic_through_node_0_fails_nothing(run, |run| {
        run.kill_agent(0);
        std::thread::sleep(Duration::from_millis(300));
        run.restart_agent(0);
    });
}

#[test]
fn upgrading_from_the_previous_release_under_traffic_fails_nothing() {
    require_root!();
    let Some(previous) = std::env::var_os("LB_UPGRADE_FROM_AGENT") else {
        eprintln!(
            "SKIPPED: LB_UPGRADE_FROM_AGENT is not set (`cargo xtask test` builds the previous release's agent and sets it)"
        );
        return;
    };
    let run = two_nodes_with_web(Some(std::path::Path::new(&previous)));
    let run = traffic_through_node_0_fails_nothing(run, |run| {
        // A rolling update: the old agent gets SIGTERM, then the new one starts.
        assert!(run.stop_agent(0).success());
        run.restart_agent(0);
    });
    let log = run.agents[0].log();
    // Maps an older build had and this one replaced are gone; their successors are pinned.
    let maps = lb_agent::dataplane::loader::maps_pin_dir(&run.pins[0].path);
    for (old, now) in lb_common::RETIRED_ADDRESS_SETS {
        assert!(!maps.join(old).exists() && maps.join(now).exists(), "{old} -> {now}");
    }
    // The new build's programs went into the links the old one pinned, over its maps.
    let replaced = log.iter().filter(|l| l.contains("program replaced in the pinned link")).count();
    assert!(replaced >= 3, "tc ingress, tc egress, socket hooks: {log:#?}");
    assert!(!log.iter().any(|l| l.contains("attaching anew")), "{log:#?}");
    assert!(!log.iter().any(|l| l.contains("another layout version")), "{log:#?}");
}

/// Two nodes with one pod each behind `Svc::WEB`, agents from `agent_bin` (default: this
/// workspace's).
fn two_nodes_with_web(agent_bin: Option<&std::path::Path>) -> Running {
    let cluster = Cluster::new(2, 1, 1);
    let eps: Vec<Ep> = cluster.nodes.iter().map(|n| Ep::ready(n.pods[0].ip4, &n.name)).collect();
    let files = [("web.yaml", Svc::WEB.file(&eps))];
    match agent_bin {
        Some(bin) => Running::start_from(cluster, &files, &[], bin),
        None => Running::start(cluster, &files),
    }
}

/// Runs `change` on node-0's agent while a long connection and streams of new ones, from
/// outside and from a pod, go through node-0; asserts none failed. Returns the cluster, still
/// running.
fn traffic_through_node_0_fails_nothing(
    mut run: Running,
    change: impl FnOnce(&mut Running),
) -> Running {
    let traffic = [
        run.background_from_client(
            0,
            &["session", "10.230.0.10:30080", "--rounds", "40", "--interval-ms", "50"],
        ),
        run.background_from_client(
            0,
            &["connect", "10.230.0.10:30080", "--count", "200", "--interval-ms", "10"],
        ),
        run.background_from_pod(
            0,
            0,
            &["connect", "10.96.0.10:80", "--count", "200", "--interval-ms", "10"],
        ),
    ];
    std::thread::sleep(Duration::from_millis(300));
    change(&mut run);
    let mut outs = traffic.into_iter().map(|t| t.finish());
    let session = outs.next().unwrap();
    assert!(
        session.last().is_some_and(|l| l.starts_with("ok ") && l.ends_with(" 40")),
        "{session:?}"
    );
    for out in outs {
        let r = parse_probe(&out);
        assert_eq!(r.len(), 200);
        assert!(
            r.iter().all(|r| r.is_ok()),
            "{:?}",
            r.iter().filter(|r| r.is_err()).take(3).collect::<Vec<_>>()
        );
        assert_eq!(by_server(&r).len(), 2);
    }
    run
}
