//! kube-proxy's datapaths, for side-by-side benchmarks: the same services written as kube-proxy
//! writes them in iptables mode (KUBE-SERVICES, per-service KUBE-SVC chains picking endpoints
//! with `statistic random`, KUBE-SEP DNAT chains, KUBE-NODEPORTS, KUBE-EXT, mark and masquerade,
//! hairpin masquerade) and in nftables mode (service-ips and service-nodeports verdict maps,
//! `numgen random` per service, masquerade by mark). Installed with iptables-restore / nft -f
//! inside the mini-cluster's node namespaces.

use std::{fmt::Write, net::Ipv4Addr};

use xxhash_rust::xxh3::xxh3_64;

/// A service port as the benchmark programs it.
#[derive(Clone, Debug)]
pub struct BenchService {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// The pod network of the mini-cluster: traffic from elsewhere to a ClusterIP is masqueraded.
pub const CLUSTER_CIDR: &str = "10.231.0.0/16";

/// kube-proxy names chains after a hash of the service port (16 characters).
fn chain_id(s: &str) -> String {
    format!("{:016X}", xxh3_64(s.as_bytes()))
}

/// The `nat` table of kube-proxy in iptables mode, for iptables-restore.
pub fn iptables(services: &[BenchService]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for c in ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] {
        writeln!(chains, ":{c} - [0:0]").unwrap();
    }
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    rules.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
    rules.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    for s in services {
        let id = chain_id(&format!("{}:p/tcp", s.name));
        let svc = format!("KUBE-SVC-{id}");
        writeln!(chains, ":{svc} - [0:0]").unwrap();
        writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{}:p cluster IP\" -m tcp --dport {} -j {svc}",
            s.cluster_ip, s.name, s.port
        )
        .unwrap();
        writeln!(
            rules,
            "-A {svc} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment \"{}:p cluster IP\" -m tcp --dport {} -j KUBE-MARK-MASQ",
            s.cluster_ip, s.name, s.port
        )
        .unwrap();
        let n = s.endpoints.len();
        for (i, (ip, port)) in s.endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", chain_id(&format!("{}:p/tcp/{ip}:{port}", s.name)));
            writeln!(chains, ":{sep} - [0:0]").unwrap();
            // kube-proxy: endpoint i of n is taken with probability 1/(n-i); the last always.
            let pick = if i + 1 < n {
                format!(" -m statistic --mode random --probability {:.11}", 1.0 / (n - i) as f64)
            } else {
                String::new()
            };
            writeln!(
                rules,
                "-A {svc} -m comment --comment \"{}:p -> {ip}:{port}\"{pick} -j {sep}",
                s.name
            )
            .unwrap();
            writeln!(
                rules,
                "-A {sep} -s {ip}/32 -m comment --comment \"{}:p\" -j KUBE-MARK-MASQ",
                s.name
            )
            .unwrap();
            writeln!(rules, "-A {sep} -p tcp -m comment --comment \"{}:p\" -m tcp -j DNAT --to-destination {ip}:{port}", s.name).unwrap();
        }
        if let Some(np) = s.node_port {
            let ext = format!("KUBE-EXT-{id}");
            writeln!(chains, ":{ext} - [0:0]").unwrap();
            writeln!(rules, "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{}:p\" -m tcp --dport {np} -j {ext}", s.name).unwrap();
            writeln!(rules, "-A {ext} -m comment --comment \"masquerade traffic for {}:p external destinations\" -j KUBE-MARK-MASQ", s.name).unwrap();
            writeln!(rules, "-A {ext} -j {svc}").unwrap();
        }
    }
    rules.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n{chains}{rules}COMMIT\n"
    )
}

/// kube-proxy's `ip kube-proxy` table in nftables mode, for nft -f (replacing any previous one).
pub fn nftables(services: &[BenchService]) -> String {
    let mut out = String::new();
    out.push_str("table ip kube-proxy\ndelete table ip kube-proxy\ntable ip kube-proxy {\n");
    out.push_str("  chain mark-for-masquerade {\n    meta mark set meta mark | 0x4000\n  }\n");
    out.push_str("  chain masquerading {\n    meta mark & 0x4000 == 0 return\n    meta mark set meta mark ^ 0x4000\n    masquerade fully-random\n  }\n");
    out.push_str("  chain nat-prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }\n");
    out.push_str("  chain nat-output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n");
    out.push_str("  chain nat-postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    jump masquerading\n  }\n");
    let mut ips = Vec::new();
    let mut nodeports = Vec::new();
    for s in services {
        let id = chain_id(&format!("{}:p/tcp", s.name));
        let svc = format!("service-{id}");
        ips.push(format!("{} . tcp . {} : goto {svc}", s.cluster_ip, s.port));
        let mut eps = Vec::new();
        for (i, (ip, port)) in s.endpoints.iter().enumerate() {
            let ep = format!("endpoint-{}", chain_id(&format!("{}:p/tcp/{ip}:{port}", s.name)));
            writeln!(out, "  chain {ep} {{\n    ip saddr {ip} jump mark-for-masquerade\n    meta l4proto tcp dnat to {ip}:{port}\n  }}").unwrap();
            eps.push(format!("{i} : goto {ep}"));
        }
        writeln!(out, "  chain {svc} {{\n    ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade", s.cluster_ip, s.port).unwrap();
        if !eps.is_empty() {
            writeln!(out, "    numgen random mod {} vmap {{ {} }}", eps.len(), eps.join(", "))
                .unwrap();
        }
        out.push_str("  }\n");
        if let Some(np) = s.node_port {
            let ext = format!("external-{id}");
            writeln!(out, "  chain {ext} {{\n    jump mark-for-masquerade\n    goto {svc}\n  }}")
                .unwrap();
            nodeports.push(format!("tcp . {np} : goto {ext}"));
        }
    }
    out.push_str("  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n");
    if !ips.is_empty() {
        writeln!(out, "    elements = {{ {} }}", ips.join(",\n      ")).unwrap();
    }
    out.push_str("  }\n  map service-nodeports {\n    type inet_proto . inet_service : verdict\n");
    if !nodeports.is_empty() {
        writeln!(out, "    elements = {{ {} }}", nodeports.join(",\n      ")).unwrap();
    }
    out.push_str("  }\n  chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n    fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n  }\n}\n");
    out
}

/// The mini-cluster's services as benchmark services: `extra` ClusterIP services of two
/// endpoints each plus the measured `web` service (ClusterIP 10.96.0.10:80, NodePort 30080, every
/// pod).
pub fn bench_services(cluster: &crate::cluster::Cluster, extra: usize) -> Vec<BenchService> {
    let pods: Vec<Ipv4Addr> = cluster
        .nodes
        .iter()
        .flat_map(|n| n.pods.iter())
        .map(|p| match p.ip4 {
            std::net::IpAddr::V4(v4) => v4,
            _ => unreachable!(),
        })
        .collect();
    let mut out = vec![BenchService {
        name: "default/web".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
        port: 80,
        node_port: Some(30080),
        endpoints: pods.iter().map(|ip| (*ip, 8080)).collect(),
    }];
    for i in 0..extra {
        out.push(BenchService {
            name: format!("bench/svc-{i}"),
            cluster_ip: Ipv4Addr::new(10, 97 + (i >> 16) as u8, (i >> 8) as u8, i as u8),
            port: 80,
            node_port: None,
            endpoints: vec![
                (Ipv4Addr::new(10, 240, (i >> 7) as u8, ((i & 0x7f) * 2) as u8), 8080),
                (Ipv4Addr::new(10, 240, (i >> 7) as u8, ((i & 0x7f) * 2 + 1) as u8), 8080),
            ],
        });
    }
    out
}

/// The same services as manifests for lb-agent.
pub fn manifests(services: &[BenchService], node_of: impl Fn(Ipv4Addr) -> String) -> String {
    let mut y = String::new();
    for s in services {
        let (ns, name) = s.name.split_once('/').unwrap();
        let (typ, np) = match s.node_port {
            Some(p) => ("NodePort", format!(", nodePort: {p}")),
            None => ("ClusterIP", String::new()),
        };
        writeln!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{type: {typ}, clusterIP: {}, ports: [{{name: p, port: {}, targetPort: 8080{np}}}]}}",
            s.cluster_ip, s.port
        )
        .unwrap();
        writeln!(
            y,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080}}]\nendpoints:"
        )
        .unwrap();
        for (ip, _) in &s.endpoints {
            writeln!(y, "- {{addresses: [\"{ip}\"], nodeName: {}}}", node_of(*ip)).unwrap();
        }
    }
    y
}

/// Installs rules in a namespace from a file; returns the time the tool took. `tool`:
/// "iptables" (iptables-restore, replacing the nat table), "iptables --noflush" (a partial
/// restore, as kube-proxy's partial syncs) or "nft" (nft -f).
pub fn install(ns: &crate::netns::NetNs, tool: &str, rules: &str) -> std::time::Duration {
    let path =
        std::env::temp_dir().join(format!("lb-kp-{}-{}.rules", std::process::id(), ns.name()));
    std::fs::write(&path, rules).unwrap();
    let p = path.to_str().unwrap();
    let t = std::time::Instant::now();
    let out = match tool {
        "iptables" => ns.exec("iptables-restore", &[p]),
        "iptables --noflush" => ns.exec("iptables-restore", &["--noflush", p]),
        "nft" => ns.exec("nft", &["-f", p]),
        other => panic!("unknown rule tool {other:?}"),
    };
    let took = t.elapsed();
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "{tool} in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// Removes kube-proxy's rules of either mode from a namespace.
pub fn uninstall(ns: &crate::netns::NetNs) {
    let _ = ns.exec("iptables", &["-t", "nat", "-F"]);
    let _ = ns.exec("iptables", &["-t", "nat", "-X"]);
    let _ = ns.exec("nft", &["delete", "table", "ip", "kube-proxy"]);
}

/// A partial iptables-restore input (`--noflush`) for one service whose endpoints changed from
/// `old` to the `services[changed]` entry, as kube-proxy's partial sync writes it: the
/// top-level KUBE-SERVICES and KUBE-NODEPORTS chains in full, the changed service's own chains,
/// and the removal of its endpoint chains that are gone.
pub fn iptables_service_update(
    services: &[BenchService],
    changed: usize,
    old: &BenchService,
) -> String {
    let s = &services[changed];
    let id = chain_id(&format!("{}:p/tcp", s.name));
    let own = [format!("KUBE-SVC-{id}"), format!("KUBE-EXT-{id}")];
    let seps: Vec<String> = s
        .endpoints
        .iter()
        .map(|(ip, port)| {
            format!("KUBE-SEP-{}", chain_id(&format!("{}:p/tcp/{ip}:{port}", s.name)))
        })
        .collect();
    let written = |chain: &str| {
        matches!(chain, "KUBE-SERVICES" | "KUBE-NODEPORTS")
            || own.iter().any(|c| c == chain)
            || seps.iter().any(|c| c == chain)
    };
    let mut out = String::from("*nat\n");
    let full = iptables(services);
    for line in full.lines() {
        let chain = line
            .strip_prefix(':')
            .and_then(|l| l.split_whitespace().next())
            .or_else(|| line.strip_prefix("-A ").and_then(|l| l.split_whitespace().next()));
        if chain.is_some_and(written) {
            writeln!(out, "{line}").unwrap();
        }
    }
    // A chain must be empty to be deleted: declared (which flushes it) first, as kube-proxy does.
    let gone: Vec<String> = old
        .endpoints
        .iter()
        .filter(|e| !s.endpoints.contains(e))
        .map(|(ip, port)| {
            format!("KUBE-SEP-{}", chain_id(&format!("{}:p/tcp/{ip}:{port}", s.name)))
        })
        .collect();
    let rules_at = out.find("\n-A ").map_or(out.len(), |i| i + 1);
    let declarations: String = gone.iter().map(|c| format!(":{c} - [0:0]\n")).collect();
    out.insert_str(rules_at, &declarations);
    for c in &gone {
        writeln!(out, "-X {c}").unwrap();
    }
    out.push_str("COMMIT\n");
    out
}

/// nft commands that rewrite one service's chains only (kube-proxy's nftables mode updates
/// incrementally): its endpoint chains and the service chain's endpoint choice.
pub fn nftables_service_update(s: &BenchService, old: &BenchService) -> String {
    let id = chain_id(&format!("{}:p/tcp", s.name));
    let svc = format!("service-{id}");
    let mut out = String::new();
    for (ip, port) in &s.endpoints {
        let ep = format!("endpoint-{}", chain_id(&format!("{}:p/tcp/{ip}:{port}", s.name)));
        writeln!(out, "add chain ip kube-proxy {ep}\nflush chain ip kube-proxy {ep}").unwrap();
        writeln!(out, "add rule ip kube-proxy {ep} ip saddr {ip} jump mark-for-masquerade")
            .unwrap();
        writeln!(out, "add rule ip kube-proxy {ep} meta l4proto tcp dnat to {ip}:{port}").unwrap();
    }
    writeln!(out, "flush chain ip kube-proxy {svc}").unwrap();
    writeln!(out, "add rule ip kube-proxy {svc} ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade", s.cluster_ip, s.port).unwrap();
    let eps: Vec<String> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, (ip, port))| {
            format!("{i} : goto endpoint-{}", chain_id(&format!("{}:p/tcp/{ip}:{port}", s.name)))
        })
        .collect();
    writeln!(
        out,
        "add rule ip kube-proxy {svc} numgen random mod {} vmap {{ {} }}",
        eps.len(),
        eps.join(", ")
    )
    .unwrap();
    for (ip, port) in &old.endpoints {
        if !s.endpoints.contains(&(*ip, *port)) {
            writeln!(
                out,
                "delete chain ip kube-proxy endpoint-{}",
                chain_id(&format!("{}:p/tcp/{ip}:{port}", s.name))
            )
            .unwrap();
        }
    }
    out
}
