//! `lb-bench e2e`: new TCP connections per second and latency through three datapaths side by
//! side in one mini-cluster, at 0, 1,000 and 10,000 extra services: this product, kube-proxy's
//! iptables mode and its nftables mode (rules generated from the same services and installed in
//! the same namespaces). Also the time each takes to program everything and one endpoint change.

use std::{fmt::Write, net::Ipv4Addr, time::Duration};

use crate::{
    cluster::{Cluster, Running},
    kubeproxy::{self, BenchService, bench_services},
    proc::{Server, probe},
};

pub const SIZES: [usize; 3] = [0, 1_000, 10_000];
const SECONDS: &str = "3";
const CONCURRENCY: &str = "4";

#[derive(Clone, Debug, Default)]
pub struct Load {
    pub cps: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub errors: u64,
}

#[derive(Clone, Debug)]
pub struct Row {
    pub datapath: &'static str,
    pub services: usize,
    pub nodeport: Load,
    pub cluster_ip: Load,
    /// Programming everything from nothing.
    pub program: Duration,
    /// One endpoint change.
    pub change: Duration,
    /// lb only: re-reading the manifests file that carried the change (not in `change`: in a
    /// cluster the watch delivers the one changed object).
    pub source_read: Duration,
}

fn parse_load(lines: &[String]) -> Load {
    let line = lines.iter().find(|l| l.starts_with("load ")).cloned().unwrap_or_default();
    let get = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    Load {
        cps: get("conns") / get("seconds").max(0.001),
        p50_us: get("p50_us") as u64,
        p99_us: get("p99_us") as u64,
        errors: get("errors") as u64,
    }
}

fn measure(cluster: &Cluster, pod_cgroup: Option<&std::path::Path>) -> (Load, Load) {
    let np = parse_load(&probe(
        Some(cluster.clients[0].ns.name()),
        None,
        &["load", "10.230.0.10:30080", "--seconds", SECONDS, "--concurrency", CONCURRENCY],
    ));
    let pod = &cluster.nodes[1].pods[0];
    let cip = parse_load(&probe(
        Some(pod.ns.name()),
        pod_cgroup,
        &["load", "10.96.0.10:80", "--seconds", SECONDS, "--concurrency", CONCURRENCY],
    ));
    (np, cip)
}

fn node_of(cluster: &Cluster) -> impl Fn(Ipv4Addr) -> String + '_ {
    move |ip: Ipv4Addr| {
        cluster
            .nodes
            .iter()
            .find(|n| n.pods.iter().any(|p| p.ip4 == std::net::IpAddr::V4(ip)))
            .map(|n| n.name.clone())
            .unwrap_or_else(|| "node-9".into())
    }
}

/// One endpoint fewer for the measured service.
fn changed(services: &[BenchService]) -> Vec<BenchService> {
    let mut s = services.to_vec();
    s[0].endpoints.pop();
    s
}

/// Runs every datapath, or only `only` ("lb", "iptables" or "nftables").
pub fn run(only: Option<&str>) -> Vec<Row> {
    let wanted = |name: &str| only.is_none_or(|o| o == name);
    let mut rows = Vec::new();
    let cluster = Cluster::new(2, 2, 1);
    {
        let servers: Vec<Server> = cluster
            .nodes
            .iter()
            .flat_map(|n| n.pods.iter())
            .map(|p| Server::start(p.ns.name(), &p.name, &["0.0.0.0:8080"], &[]))
            .collect();
        for (datapath, tool) in
            [("kube-proxy iptables", "iptables"), ("kube-proxy nftables", "nft")]
                .into_iter()
                .filter(|(dp, _)| wanted(dp.trim_start_matches("kube-proxy ")))
        {
            for &size in &SIZES {
                let services = bench_services(&cluster, size);
                let rules = if tool == "iptables" {
                    kubeproxy::iptables(&services)
                } else {
                    kubeproxy::nftables(&services)
                };
                for n in &cluster.nodes {
                    kubeproxy::uninstall(&n.ns);
                }
                let program = kubeproxy::install(&cluster.nodes[0].ns, tool, &rules);
                kubeproxy::install(&cluster.nodes[1].ns, tool, &rules);
                // kube-proxy's iptables partial sync rewrites KUBE-SERVICES/KUBE-NODEPORTS and
                // the changed service's chains; nftables mode touches only that service's.
                let after = changed(&services);
                let change = if tool == "iptables" {
                    kubeproxy::install(
                        &cluster.nodes[0].ns,
                        "iptables --noflush",
                        &kubeproxy::iptables_service_update(&after, 0, &services[0]),
                    )
                } else {
                    kubeproxy::install(
                        &cluster.nodes[0].ns,
                        tool,
                        &kubeproxy::nftables_service_update(&after[0], &services[0]),
                    )
                };
                // Back to the full endpoint set before measuring.
                let restore = if tool == "iptables" {
                    kubeproxy::iptables_service_update(&services, 0, &after[0])
                } else {
                    kubeproxy::nftables_service_update(&services[0], &after[0])
                };
                let restore_tool = if tool == "iptables" { "iptables --noflush" } else { tool };
                kubeproxy::install(&cluster.nodes[0].ns, restore_tool, &restore);
                let (nodeport, cluster_ip) = measure(&cluster, None);
                eprintln!("{datapath} {size}: {:.0} / {:.0} conn/s", nodeport.cps, cluster_ip.cps);
                rows.push(Row {
                    datapath,
                    services: size,
                    nodeport,
                    cluster_ip,
                    program,
                    change,
                    source_read: Duration::ZERO,
                });
            }
            for n in &cluster.nodes {
                kubeproxy::uninstall(&n.ns);
            }
        }
        drop(servers);
    }
    if !wanted("lb") {
        return rows;
    }

    // This product: one agent per node serving a manifests folder.
    let first = kubeproxy::manifests(&bench_services(&cluster, 0), node_of(&cluster));
    let sizes = [
        "--max-services",
        "16384",
        "--max-frontends",
        "65536",
        "--max-backends",
        "65536",
        "--maglev-slots",
        "8388608",
        "--max-conntrack",
        "524288",
    ];
    let mut run = Running::start_with(cluster, &[("bench.yaml", first)], &sizes);
    for &size in &SIZES {
        let services = bench_services(&run.cluster, size);
        let yaml = kubeproxy::manifests(&services, node_of(&run.cluster));
        run.update("bench.yaml", &yaml);
        // Programming from nothing: a fresh agent on node-0 with empty maps.
        run.stop_agent(0);
        let _ = std::process::Command::new(crate::workspace_bin("lb-agent"))
            .args(["--cleanup", "--bpffs", run.pins[0].path.to_str().unwrap()])
            .output();
        run.restart_agent(0);
        let program = logged_elapsed(&run.agents[0], "initial sync done", 0);
        // One endpoint change, as the agent measured it (event to maps written), and the
        // re-read of the whole manifests file that produced the event.
        let (synced, read) =
            (run.agents[0].count_log("synced"), run.agents[0].count_log("manifests read"));
        run.update("bench.yaml", &kubeproxy::manifests(&changed(&services), node_of(&run.cluster)));
        let change = logged_elapsed(&run.agents[0], "synced", synced);
        let source_read = logged_elapsed(&run.agents[0], "manifests read", read);
        run.update("bench.yaml", &yaml);
        let cgroup = run.cluster.nodes[1].cgroup.path.clone();
        let (nodeport, cluster_ip) = measure(&run.cluster, Some(&cgroup));
        eprintln!("lb {size}: {:.0} / {:.0} conn/s", nodeport.cps, cluster_ip.cps);
        rows.push(Row {
            datapath: "lb (this product)",
            services: size,
            nodeport,
            cluster_ip,
            program,
            change,
            source_read,
        });
    }
    rows
}

/// The `elapsed_us` of the `nth` agent log line containing `what` (zero if there is none).
fn logged_elapsed(agent: &crate::agent::Agent, what: &str, nth: usize) -> Duration {
    let line = agent.log().into_iter().filter(|l| l.contains(what)).nth(nth).unwrap_or_default();
    let us = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("elapsed_us="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Duration::from_micros(us)
}

/// The results as a table.
pub fn table(rows: &[Row]) -> String {
    let mut t = String::new();
    writeln!(t, "| datapath | extra services | NodePort conn/s | p50 / p99 | ClusterIP conn/s | p50 / p99 | program all | one endpoint change |").unwrap();
    writeln!(t, "|---|---|---|---|---|---|---|---|").unwrap();
    for r in rows {
        writeln!(
            t,
            "| {} | {} | {:.0}{} | {} / {} us | {:.0}{} | {} / {} us | {:.1} ms | {:.2} ms |",
            r.datapath,
            r.services,
            r.nodeport.cps,
            if r.nodeport.errors > 0 {
                format!(" ({} errors)", r.nodeport.errors)
            } else {
                String::new()
            },
            r.nodeport.p50_us,
            r.nodeport.p99_us,
            r.cluster_ip.cps,
            if r.cluster_ip.errors > 0 {
                format!(" ({} errors)", r.cluster_ip.errors)
            } else {
                String::new()
            },
            r.cluster_ip.p50_us,
            r.cluster_ip.p99_us,
            r.program.as_secs_f64() * 1e3,
            r.change.as_secs_f64() * 1e3
        )
        .unwrap();
    }
    let reads: Vec<String> = rows
        .iter()
        .filter(|r| !r.source_read.is_zero())
        .map(|r| format!("{:.1} ms at {}", r.source_read.as_secs_f64() * 1e3, r.services))
        .collect();
    if !reads.is_empty() {
        writeln!(t, "\nlb's endpoint change is event to maps written; before it the agent re-read the whole manifests file ({}), which a cluster's watch does not need.", reads.join(", ")).unwrap();
    }
    t
}

/// The goals, checked against the rows: ratios lb / kube-proxy per size and path, and
/// programming times. Printed, never asserted (one noisy run on shared cores).
pub fn ratios(rows: &[Row]) -> String {
    let mut t = String::new();
    let find =
        |dp: &str, n: usize| rows.iter().find(|r| r.datapath.starts_with(dp) && r.services == n);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    type Path = (&'static str, fn(&Row) -> f64);
    let paths: [Path; 2] = [("NodePort", |r| r.nodeport.cps), ("ClusterIP", |r| r.cluster_ip.cps)];
    writeln!(t, "ratios of connection rates, lb / kube-proxy (> 1: lb faster):").unwrap();
    let mut above_all = true;
    for n in SIZES {
        let (Some(lb), Some(ipt), Some(nft)) =
            (find("lb", n), find("kube-proxy iptables", n), find("kube-proxy nftables", n))
        else {
            continue;
        };
        let mut parts = Vec::new();
        for (name, cps) in paths {
            let (a, b) = (cps(lb) / cps(ipt).max(1.0), cps(lb) / cps(nft).max(1.0));
            above_all &= a > 1.0 && b > 1.0;
            parts.push(format!("{name} {a:.2}x iptables, {b:.2}x nftables"));
        }
        writeln!(t, "  {n:>6} services: {}", parts.join("; ")).unwrap();
    }
    if let (Some(lb10k), Some(ipt0)) = (find("lb", 10_000), find("kube-proxy iptables", 0)) {
        let np = lb10k.nodeport.cps / ipt0.nodeport.cps.max(1.0);
        let cip = lb10k.cluster_ip.cps / ipt0.cluster_ip.cps.max(1.0);
        writeln!(t, "goal: lb at 10,000 services >= iptables at 0: NodePort {np:.2}x, ClusterIP {cip:.2}x: {}", verdict(np >= 1.0 && cip >= 1.0)).unwrap();
    }
    let compared =
        SIZES.iter().any(|&n| find("lb", n).is_some() && find("kube-proxy", n).is_some());
    if compared {
        writeln!(t, "goal: lb above iptables and nftables at every size: {}", verdict(above_all))
            .unwrap();
    }
    if let (Some(lb), Some(ipt), Some(nft)) = (
        find("lb", 10_000),
        find("kube-proxy iptables", 10_000),
        find("kube-proxy nftables", 10_000),
    ) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        writeln!(
            t,
            "goal: programming 10,000 services: lb {:.0} ms, iptables-restore {:.0} ms ({:.1}x), nft -f {:.0} ms ({:.0}x): {}",
            ms(lb.program),
            ms(ipt.program),
            ms(ipt.program) / ms(lb.program).max(0.001),
            ms(nft.program),
            ms(nft.program) / ms(lb.program).max(0.001),
            verdict(lb.program < ipt.program && lb.program * 10 < nft.program)
        )
        .unwrap();
    }
    t
}

/// A line chart (connections/s against services, one line per datapath, both paths) as SVG.
pub fn svg(rows: &[Row], title: &str) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 420.0, 70.0, 230.0, 40.0, 50.0);
    let max =
        rows.iter().flat_map(|r| [r.nodeport.cps, r.cluster_ip.cps]).fold(1.0f64, f64::max) * 1.1;
    let x = |i: usize| left + (w - left - right) * i as f64 / (SIZES.len() - 1) as f64;
    let y = |v: f64| top + (h - top - bottom) * (1.0 - v / max);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"22\" font-size=\"14\">{title}</text>\n"
    );
    for k in 0..=5 {
        let v = max * k as f64 / 5.0;
        let (gy, lx, ly) = (y(v), left - 6.0, y(v) + 4.0);
        writeln!(s, "<line x1=\"{left}\" x2=\"{}\" y1=\"{gy}\" y2=\"{gy}\" stroke=\"#ddd\"/><text x=\"{lx}\" y=\"{ly}\" text-anchor=\"end\">{v:.0}</text>", w - right).unwrap();
    }
    for (i, n) in SIZES.iter().enumerate() {
        writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{n}</text>",
            x(i),
            h - bottom + 18.0
        )
        .unwrap();
    }
    writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">extra services</text>",
        (left + w - right) / 2.0,
        h - 12.0
    )
    .unwrap();
    writeln!(s, "<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">new connections / s</text>", h / 2.0, h / 2.0).unwrap();
    let colors = [
        ("lb (this product)", "#d62728"),
        ("kube-proxy iptables", "#1f77b4"),
        ("kube-proxy nftables", "#2ca02c"),
    ];
    let mut legend_y = top + 10.0;
    for (dp, color) in colors {
        for (path, dash) in [("NodePort", ""), ("ClusterIP", " stroke-dasharray=\"6 4\"")] {
            let pts: Vec<String> = SIZES
                .iter()
                .enumerate()
                .filter_map(|(i, n)| {
                    rows.iter().find(|r| r.datapath == dp && r.services == *n).map(|r| (i, r))
                })
                .map(|(i, r)| {
                    format!(
                        "{:.1},{:.1}",
                        x(i),
                        y(if path == "NodePort" { r.nodeport.cps } else { r.cluster_ip.cps })
                    )
                })
                .collect();
            writeln!(s, "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"/>", pts.join(" ")).unwrap();
            writeln!(s, "<line x1=\"{}\" x2=\"{}\" y1=\"{legend_y}\" y2=\"{legend_y}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/><text x=\"{}\" y=\"{}\">{dp}, {path}</text>", w - right + 10.0, w - right + 40.0, w - right + 46.0, legend_y + 4.0).unwrap();
            legend_y += 18.0;
        }
    }
    s.push_str("</svg>\n");
    s
}
