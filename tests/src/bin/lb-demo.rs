//! The demo: a two-node mini-cluster in network namespaces, one `lb-agent` per node serving the
//! example manifests of `deploy/examples/demo/`, pods answering with their name, and an outside
//! client. It sends traffic through ClusterIP, NodePort (both policies) and a LoadBalancer IP,
//! prints who answered and what each side saw, and shows `lbctl services` for a node.
//! Ctrl-C at any time stops it and removes everything it created.

use std::{
    collections::BTreeSet,
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use lb_tests::{
    cluster::{Cluster, Running, by_server, host_of, parse_probe},
    workspace_bin,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

struct Row {
    service: &'static str,
    path: String,
    answered: String,
    seen: String,
}

/// One step of the demo: runs lb-probe somewhere and returns its output lines.
type Probe = Box<dyn Fn(&Running) -> Vec<String>>;

fn measure(service: &'static str, path: String, lines: &[String], elapsed_ms: u128) -> Row {
    let r = parse_probe(lines);
    let total = r.len().max(1);
    let ok = r.iter().filter(|r| r.is_ok()).count();
    let answered = if ok == 0 {
        let errs: BTreeSet<&str> =
            r.iter().filter_map(|r| r.as_ref().err()).map(String::as_str).collect();
        format!(
            "nobody: {} (whole probe run {elapsed_ms} ms)",
            errs.into_iter().collect::<Vec<_>>().join(",")
        )
    } else {
        by_server(&r)
            .iter()
            .map(|(s, n)| format!("{s} {}%", 100 * n / total))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let seen: BTreeSet<String> = r.iter().flatten().map(|(_, seen, _)| host_of(seen)).collect();
    Row { service, path, answered, seen: seen.into_iter().collect::<Vec<_>>().join(", ") }
}

fn main() {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let examples =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/demo");
    let files: Vec<(String, String)> = std::fs::read_dir(&examples)
        .expect("deploy/examples/demo")
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    println!(
        "lb demo: 2 nodes x 2 pods and an outside client in network namespaces, one lb-agent per node"
    );
    println!("serving {}\n", examples.canonicalize().unwrap_or(examples.clone()).display());
    let cluster = Cluster::new(2, 2, 1);
    let borrowed: Vec<(&str, String)> =
        files.iter().map(|(n, c)| (n.as_str(), c.clone())).collect();
    let run = Running::start(cluster, &borrowed);
    run.cluster.clients[0].ns.ip(&["route", "add", "198.51.100.0/24", "via", "10.230.0.10"]);
    for n in &run.cluster.nodes {
        let pods: Vec<String> = n.pods.iter().map(|p| format!("{} {}", p.name, p.ip4)).collect();
        println!("  {} {}: {}", n.name, n.ip4, pods.join(", "));
    }
    println!("  outside client {}\n", run.cluster.clients[0].ip4);

    let steps: Vec<(&'static str, String, Probe)> = vec![
        (
            "web",
            "pod node-1-pod-0 -> ClusterIP 10.96.0.10:80".into(),
            Box::new(|r: &Running| {
                r.from_pod(1, 0, &["connect", "10.96.0.10:80", "--count", "200"])
            }),
        ),
        (
            "web",
            "host of node-0 -> ClusterIP 10.96.0.10:80".into(),
            Box::new(|r: &Running| r.from_host(0, &["connect", "10.96.0.10:80", "--count", "100"])),
        ),
        (
            "web",
            "client -> NodePort 10.230.0.10:30080 (policy Cluster)".into(),
            Box::new(|r: &Running| {
                r.from_client(0, &["connect", "10.230.0.10:30080", "--count", "200"])
            }),
        ),
        (
            "web-local",
            "client -> NodePort 10.230.0.10:30081 (policy Local)".into(),
            Box::new(|r: &Running| {
                r.from_client(0, &["connect", "10.230.0.10:30081", "--count", "100"])
            }),
        ),
        (
            "shop",
            "client -> LB IP 198.51.100.10:80".into(),
            Box::new(|r: &Running| {
                r.from_client(0, &["connect", "198.51.100.10:80", "--count", "100"])
            }),
        ),
        (
            "dns",
            "client -> NodePort 10.230.0.10:30053, UDP of 4,000 bytes (fragments) echoed".into(),
            Box::new(|r: &Running| {
                let args = ["connect", "10.230.0.10:30053", "--udp", "--size", "4000"];
                r.from_client(0, &[&args[..], &["--count", "40"]].concat())
            }),
        ),
        (
            "empty",
            "pod -> ClusterIP 10.96.0.12:80 (no endpoints)".into(),
            Box::new(|r: &Running| r.from_pod(0, 0, &["connect", "10.96.0.12:80", "--count", "1"])),
        ),
        (
            "empty",
            "client -> 10.230.0.10 port 80 (not a service)".into(),
            Box::new(|r: &Running| {
                r.from_client(0, &["connect", "10.230.0.10:80", "--count", "1"])
            }),
        ),
    ];
    // What node-0's datapath refuses or drops meanwhile, as an operator would follow it.
    let monitor = run.monitor(0, &[]);
    let mut rows = Vec::new();
    for (service, path, step) in steps {
        if INTERRUPTED.load(Ordering::SeqCst) {
            println!("interrupted: removing everything");
            return;
        }
        let t = Instant::now();
        let lines = step(&run);
        rows.push(measure(service, path, &lines, t.elapsed().as_millis()));
    }
    let w = rows.iter().map(|r| r.path.len()).max().unwrap_or(10);
    let a = rows.iter().map(|r| r.answered.len()).max().unwrap_or(20);
    println!("{:<10} {:<w$}  {:<a$}  servers saw", "service", "path", "answered by (share)");
    for r in &rows {
        let line = format!("{:<10} {:<w$}  {:<a$}  {}", r.service, r.path, r.answered, r.seen);
        println!("{}", line.trim_end());
    }

    let monitored = monitor.stop();
    println!(
        "\nlbctl monitor on node-0 while that ran (drops, rejects, refused connects; Ctrl-C ends it):"
    );
    print!(
        "{}{}",
        String::from_utf8_lossy(&monitored.stdout),
        String::from_utf8_lossy(&monitored.stderr)
    );

    println!("\nlbctl status on node-0 (in its network namespace):");
    let lbctl = workspace_bin("lbctl");
    let out = lb_tests::proc::command_in(&lbctl, Some(run.cluster.nodes[0].ns.name()), None)
        .args(["status", "--bpffs", run.pins[0].path.to_str().unwrap()])
        .output()
        .expect("lbctl");
    print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    println!("\nlbctl services on node-0 (read from its pinned maps):");
    let out = std::process::Command::new(workspace_bin("lbctl"))
        .args(["services", "--bpffs", run.pins[0].path.to_str().unwrap()])
        .output()
        .expect("lbctl");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!(
        "\nlbctl explain 10.230.0.100:40000 10.230.0.10:30080 on node-0 (in its network namespace):"
    );
    let out = lb_tests::proc::command_in(&lbctl, Some(run.cluster.nodes[0].ns.name()), None)
        .args([
            "explain",
            "10.230.0.100:40000",
            "10.230.0.10:30080",
            "--bpffs",
            run.pins[0].path.to_str().unwrap(),
        ])
        .output()
        .expect("lbctl");
    print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    drop(run);
    println!(
        "\neverything created (namespaces, cgroups, pinned programs and maps) has been removed."
    );
}
