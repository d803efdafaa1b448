//! The mini-cluster: a faithful Kubernetes data path out of network namespaces.
//!
//! - one L2 segment (a bridge inside its own namespace `lan`), 10.230.0.0/24 and fd00:230::/64;
//! - node `i`: namespace with `eth0` on the segment (10.230.0.(10+i), fd00:230::(10+i)) and a
//!   cgroup v2 directory standing for its root cgroup; IP forwarding on;
//! - pods of node `i`: namespaces joined to the node by a veth, routed like a host-gw CNI
//!   (ptp): pod CIDR 10.231.i.0/24 and fd00:231:i::/64, pod `j` at .(j+2) / ::(j+2), the node
//!   side of every pod veth at .1 / ::1; nodes route the other nodes' pod CIDRs via their
//!   address on the segment;
//! - outside clients: namespaces on the segment (10.230.0.(100+c)) with no route to pods.
//!
//! Everything lives in namespaces and cgroups named after this process and is removed on drop
//! (or by the next run if this one was killed).

use std::net::IpAddr;

use crate::{
    cgroup::Cgroup,
    netns::{NetNs, veth},
};

pub struct Pod {
    pub ns: NetNs,
    pub name: String,
    pub ip4: IpAddr,
    pub ip6: IpAddr,
}

pub struct Node {
    pub ns: NetNs,
    pub name: String,
    pub ip4: IpAddr,
    pub ip6: IpAddr,
    pub cgroup: Cgroup,
    pub pods: Vec<Pod>,
}

pub struct Client {
    pub ns: NetNs,
    pub ip4: IpAddr,
    pub ip6: IpAddr,
}

pub struct Cluster {
    // Dropped last: pods and nodes go first (their veth peers vanish with them).
    pub nodes: Vec<Node>,
    pub clients: Vec<Client>,
    pub lan: NetNs,
    /// The pass-through XDP program on the segment's side of the nodes' veths, once
    /// [`Cluster::accept_xdp_tx`] attached it (detached on drop).
    xdp_peers: Option<aya::Ebpf>,
}

fn ip(s: String) -> IpAddr {
    s.parse().expect("valid address")
}

impl Cluster {
    pub fn new(nodes: usize, pods_per_node: usize, clients: usize) -> Self {
        let lan = NetNs::new("lan");
        lan.ip(&["link", "add", "br0", "type", "bridge"]);
        lan.ip(&["link", "set", "br0", "up"]);
        let mut out = Cluster { nodes: Vec::new(), clients: Vec::new(), lan, xdp_peers: None };
        for i in 0..nodes {
            out.nodes.push(out.add_node(i, pods_per_node, nodes));
        }
        for c in 0..clients {
            let ns = NetNs::new(&format!("out{c}"));
            let (ip4, ip6) =
                (ip(format!("10.230.0.{}", 100 + c)), ip(format!("fd00:230::{}", 100 + c)));
            veth(
                &ns,
                "eth0",
                &[&format!("{ip4}/24"), &format!("{ip6}/64")],
                &out.lan,
                &format!("c{c}"),
                &[],
            );
            out.lan.ip(&["link", "set", &format!("c{c}"), "master", "br0"]);
            out.clients.push(Client { ns, ip4, ip6 });
        }
        out
    }

    fn add_node(&self, i: usize, pods: usize, nodes: usize) -> Node {
        let name = format!("node-{i}");
        let ns = NetNs::new(&format!("n{i}"));
        let (ip4, ip6) = (ip(format!("10.230.0.{}", 10 + i)), ip(format!("fd00:230::{}", 10 + i)));
        self.wire_node(&ns, i, nodes);
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            ns.sysctl(k, v);
        }
        let node_pods = (0..pods).map(|j| Self::make_pod(&ns, &name, i, j)).collect();
        Node { ns, name, ip4, ip6, cgroup: Cgroup::new(&format!("node-{i}")), pods: node_pods }
    }

    /// Adds a pod to node `i` (as a CNI does when one is scheduled there), without a server;
    /// returns its index.
    pub fn add_pod(&mut self, i: usize) -> usize {
        let node = &mut self.nodes[i];
        let j = node.pods.len();
        node.pods.push(Self::make_pod(&node.ns, &node.name, i, j));
        j
    }

    /// Pod `j` of node `i` (namespace `ns`, named `node`): its namespace, and a veth to the node
    /// (`p<j>` on the node's side), routed both ways.
    fn make_pod(ns: &NetNs, node: &str, i: usize, j: usize) -> Pod {
        let pod_ns = NetNs::new(&format!("n{i}p{j}"));
        let (p4, p6) = (format!("10.231.{i}.{}", j + 2), format!("fd00:231:{i}::{}", j + 2));
        let (gw4, gw6) = (format!("10.231.{i}.1"), format!("fd00:231:{i}::1"));
        let host_if = format!("p{j}");
        veth(
            &pod_ns,
            "eth0",
            &[&format!("{p4}/32"), &format!("{p6}/128")],
            ns,
            &host_if,
            &[&format!("{gw4}/32"), &format!("{gw6}/128")],
        );
        pod_ns.ip(&["route", "add", &gw4, "dev", "eth0"]);
        pod_ns.ip(&["route", "add", "default", "via", &gw4]);
        pod_ns.ip(&["-6", "route", "add", &gw6, "dev", "eth0"]);
        pod_ns.ip(&["-6", "route", "add", "default", "via", &gw6]);
        ns.ip(&["route", "add", &format!("{p4}/32"), "dev", &host_if, "src", &gw4]);
        ns.ip(&["-6", "route", "add", &format!("{p6}/128"), "dev", &host_if, "src", &gw6]);
        Pod { ns: pod_ns, name: format!("{node}-pod-{j}"), ip4: ip(p4), ip6: ip(p6) }
    }

    /// Node `i`'s eth0, on the segment, and its routes to the other nodes' pods.
    fn wire_node(&self, ns: &NetNs, i: usize, nodes: usize) {
        let (ip4, ip6) = (format!("10.230.0.{}/24", 10 + i), format!("fd00:230::{}/64", 10 + i));
        veth(ns, "eth0", &[&ip4, &ip6], &self.lan, &format!("n{i}"), &[]);
        self.lan.ip(&["link", "set", &format!("n{i}"), "master", "br0"]);
        for k in (0..nodes).filter(|&k| k != i) {
            let (via4, via6) = (format!("10.230.0.{}", 10 + k), format!("fd00:230::{}", 10 + k));
            ns.ip(&["route", "add", &format!("10.231.{k}.0/24"), "via", &via4]);
            ns.ip(&["-6", "route", "add", &format!("fd00:231:{k}::/64"), "via", &via6]);
        }
    }

    /// Deletes node `i`'s eth0 and makes it again, as a NIC reset or a rebuilt bond does: the
    /// same name and addresses on a new device.
    pub fn recreate_node_device(&self, i: usize) {
        let ns = &self.nodes[i].ns;
        let out = ns.exec("cat", &["/sys/class/net/eth0/address"]);
        let mac = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(out.status.success() && !mac.is_empty(), "eth0's address: {out:?}");
        ns.ip(&["link", "del", "eth0"]);
        self.wire_node(ns, i, self.nodes.len());
        // A NIC keeps its MAC address across a reset (neighbours need not learn a new one).
        ns.ip(&["link", "set", "eth0", "address", &mac]);
    }

    /// A Node object for the manifests folder (its InternalIP addresses).
    pub fn node_manifest(&self, i: usize) -> String {
        let n = &self.nodes[i];
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {}, labels: {{topology.kubernetes.io/zone: zone-{}}}}}\nstatus:\n  addresses:\n  - {{type: InternalIP, address: \"{}\"}}\n  - {{type: InternalIP, address: \"{}\"}}\n",
            n.name,
            i % 2,
            n.ip4,
            n.ip6
        )
    }
}

/// A running `lbctl monitor` (see [`Running::monitor`]).
pub struct Monitor {
    child: Option<std::process::Child>,
}

impl Monitor {
    /// Stops it as Ctrl-C does, once what was sent has had time to be read, and returns its
    /// exit status and output.
    pub fn stop(mut self) -> std::process::Output {
        let child = self.child.take().expect("running");
        std::thread::sleep(std::time::Duration::from_millis(300));
        // SAFETY: signalling our own child, which has not been waited for.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        child.wait_with_output().expect("wait for lbctl monitor")
    }
}

impl Monitor {
    /// Waits for it to stop by itself (`--count`, `--duration`); killed after 10 s.
    pub fn finish(mut self) -> std::process::Output {
        let mut child = self.child.take().expect("running");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while child.try_wait().expect("lbctl monitor").is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.wait_with_output().expect("wait for lbctl monitor")
    }
}

impl Drop for Monitor {
    /// Not stopped (a failed test): killed, so it does not outlive the cluster.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The kinds of event an agent's datapath sends (non-zero while a monitor holds the lease),
/// from the maps pinned under `bpffs`.
pub fn monitor_kinds(bpffs: &std::path::Path) -> u32 {
    use aya::maps::{Array, Map, MapData};
    let path = lb_agent::dataplane::loader::maps_pin_dir(bpffs).join(lb_common::MAP_OPTIONS);
    let map = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let options: Array<_, u32> = Array::try_from(Map::Array(map)).unwrap();
    options.get(&lb_common::OPT_MONITOR_KINDS, 0).unwrap()
}

/// The mini-cluster with an `lb-agent` on every node serving one manifests folder, and an
/// `lb-probe` server in every pod (TCP 8080 and UDP 5353 on IPv4, TCP 8086 and UDP 5356 on IPv6, answering
/// with the pod's name and the client address it saw).
pub struct Running {
    pub cluster: Cluster,
    pub manifests: std::path::PathBuf,
    pub agents: Vec<crate::agent::Agent>,
    /// Each node's agent command line.
    pub agent_args: Vec<Vec<String>>,
    /// Each node's agent pins its maps here.
    pub pins: Vec<crate::kernel::PinDir>,
    _servers: Vec<crate::proc::Server>,
}

impl Running {
    /// Starts servers and agents; `files` are (name, content) written before the agents start.
    pub fn start(cluster: Cluster, files: &[(&str, String)]) -> Self {
        Self::start_with(cluster, files, &[])
    }

    /// As [`Running::start`], with more agent flags (later flags win, e.g. bigger map sizes).
    pub fn start_with(cluster: Cluster, files: &[(&str, String)], extra_args: &[&str]) -> Self {
        Self::start_from(cluster, files, extra_args, &crate::workspace_bin("lb-agent"))
    }

    /// As [`Running::start_with`], running another build of the agent (`restart_agent` runs
    /// this workspace's).
    pub fn start_from(
        cluster: Cluster,
        files: &[(&str, String)],
        extra_args: &[&str],
        agent_bin: &std::path::Path,
    ) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "lb-e2e-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let nodes: String = (0..cluster.nodes.len())
            .map(|i| cluster.node_manifest(i))
            .collect::<Vec<_>>()
            .join("---\n");
        write_manifest(&dir.join("nodes.yaml"), &nodes);
        for (name, content) in files {
            write_manifest(&dir.join(name), content);
        }
        let mut servers = Vec::new();
        for node in &cluster.nodes {
            for pod in &node.pods {
                servers.push(crate::proc::Server::start(
                    pod.ns.name(),
                    &pod.name,
                    &["0.0.0.0:8080", "[::]:8086"],
                    &["0.0.0.0:5353", "[::]:5356"],
                ));
            }
        }
        let mut pins = Vec::new();
        let mut agents = Vec::new();
        let mut agent_args = Vec::new();
        for node in &cluster.nodes {
            let pin = crate::kernel::PinDir::new(&node.name);
            let args: Vec<String> = [
                "--manifests",
                dir.to_str().unwrap(),
                "--node-name",
                &node.name,
                "--devices",
                "eth0",
                "--cgroup",
                node.cgroup.path.to_str().unwrap(),
                "--bpffs",
                pin.path.to_str().unwrap(),
                "--stats-interval",
                "0",
                "--poll-interval-ms",
                "50",
                // Files here are replaced by rename (write_manifest), never caught half-written.
                "--manifests-settle-ms",
                "0",
                "--max-services",
                "1024",
                "--max-frontends",
                "4096",
                "--max-backends",
                "4096",
                "--maglev-slots",
                "262144",
                "--max-conntrack",
                "65536",
            ]
            .iter()
            .chain(extra_args)
            .map(|s| s.to_string())
            .collect();
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            agents.push(crate::agent::Agent::start_bin(
                agent_bin,
                &argv,
                Some(node.ns.name()),
                None,
            ));
            agent_args.push(args);
            pins.push(pin);
        }
        for a in &mut agents {
            a.wait_for_log("initial sync done", std::time::Duration::from_secs(30));
        }
        Running { cluster, manifests: dir, agents, agent_args, pins, _servers: servers }
    }

    /// Stops node `n`'s agent (SIGTERM) and returns how it exited.
    pub fn stop_agent(&mut self, n: usize) -> std::process::ExitStatus {
        let placeholder = crate::agent::Agent::idle();
        std::mem::replace(&mut self.agents[n], placeholder).stop()
    }

    /// Kills node `n`'s agent with SIGKILL.
    pub fn kill_agent(&mut self, n: usize) {
        std::mem::replace(&mut self.agents[n], crate::agent::Agent::idle()).kill();
    }

    /// Starts node `n`'s agent again with the same command line and waits for its first sync.
    pub fn restart_agent(&mut self, n: usize) {
        let argv: Vec<&str> = self.agent_args[n].iter().map(String::as_str).collect();
        let mut agent =
            crate::agent::Agent::start(&argv, Some(self.cluster.nodes[n].ns.name()), None);
        agent.wait_for_log("initial sync done", std::time::Duration::from_secs(30));
        self.agents[n] = agent;
    }

    /// Rewrites a manifest file and waits until every agent has applied it.
    pub fn update(&mut self, name: &str, content: &str) {
        let path = self.manifests.join(name);
        if std::fs::read_to_string(&path).is_ok_and(|c| c == content) {
            return;
        }
        let before: Vec<usize> = self.agents.iter().map(|a| a.count_log("synced")).collect();
        if content.is_empty() {
            let _ = std::fs::remove_file(path);
        } else {
            write_manifest(&path, content);
        }
        for (a, n) in self.agents.iter_mut().zip(before) {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while a.count_log("synced") <= n {
                assert!(
                    std::time::Instant::now() < deadline,
                    "agent did not apply {name}:\n{}",
                    a.log().join("\n")
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }

    /// Node `n`'s agent's `/metrics` page.
    pub fn metrics(&self, n: usize) -> String {
        let (code, text) =
            crate::netns::http_get(&self.cluster.nodes[n].ns, "127.0.0.1:10249", "/metrics")
                .expect("GET /metrics");
        assert_eq!(code, 200, "{text}");
        text
    }

    /// `lbctl <args> -o json` against node `n`'s pinned maps, as JSON (the command must succeed).
    pub fn lbctl_json(&self, n: usize, args: &[&str]) -> serde_json::Value {
        // In the node's network namespace, as an operator runs it there (the DaemonSet's host
        // network): device names are the node's.
        let node = Some(self.cluster.nodes[n].ns.name());
        let out = crate::proc::command_in(&crate::workspace_bin("lbctl"), node, None)
            .args(args)
            .args(["--bpffs", self.pins[n].path.to_str().unwrap(), "-o", "json"])
            .output()
            .expect("run lbctl");
        assert!(out.status.success(), "lbctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("lbctl {args:?}: not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
        })
    }

    /// Starts `lbctl monitor` with `args` for node `n`'s agent, in the node's network namespace
    /// (as an operator runs it there: device names), and waits until it holds its lease.
    pub fn monitor(&self, n: usize, args: &[&str]) -> Monitor {
        let pins = self.pins[n].path.clone();
        let child = crate::proc::command_in(
            &crate::workspace_bin("lbctl"),
            Some(self.cluster.nodes[n].ns.name()),
            None,
        )
        .arg("monitor")
        .args(args)
        .arg("--bpffs")
        .arg(&pins)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start lbctl monitor");
        let start = std::time::Instant::now();
        while monitor_kinds(&pins) == 0 {
            assert!(start.elapsed().as_secs() < 10, "lbctl monitor never took its lease");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Monitor { child: Some(child) }
    }

    /// Node `n`'s datapath counters, by name (from its pinned maps).
    pub fn counters(&self, n: usize) -> std::collections::BTreeMap<&'static str, u64> {
        let path = &self.pins[n].path;
        lb_agent::dataplane::counters::global_pinned(path).unwrap().into_iter().collect()
    }

    /// Node `n`'s datapath counter `name`.
    pub fn counter(&self, n: usize, name: &str) -> u64 {
        *self.counters(n).get(name).unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Runs lb-probe `connect` from outside client `c`.
    pub fn from_client(&self, c: usize, args: &[&str]) -> Vec<String> {
        crate::proc::probe(Some(self.cluster.clients[c].ns.name()), None, args)
    }

    /// Runs lb-probe `connect` from pod `p` of node `n` (in the node's cgroup).
    pub fn from_pod(&self, n: usize, p: usize, args: &[&str]) -> Vec<String> {
        let node = &self.cluster.nodes[n];
        crate::proc::probe(Some(node.pods[p].ns.name()), Some(&node.cgroup.path), args)
    }

    /// Runs lb-probe `connect` as a host process of node `n` (in its cgroup).
    pub fn from_host(&self, n: usize, args: &[&str]) -> Vec<String> {
        let node = &self.cluster.nodes[n];
        crate::proc::probe(Some(node.ns.name()), Some(&node.cgroup.path), args)
    }

    /// Starts `lb-probe` from pod `p` of node `n` in the background.
    pub fn background_from_pod(
        &self,
        n: usize,
        p: usize,
        args: &[&str],
    ) -> crate::proc::Background {
        let node = &self.cluster.nodes[n];
        crate::proc::Background::start(Some(node.pods[p].ns.name()), Some(&node.cgroup.path), args)
    }

    /// Starts `lb-probe` from outside client `c` in the background.
    pub fn background_from_client(&self, c: usize, args: &[&str]) -> crate::proc::Background {
        crate::proc::Background::start(Some(self.cluster.clients[c].ns.name()), None, args)
    }

    /// Every pod as a ready endpoint on port 0 (the slice sets the port).
    pub fn all_pods(&self, v6: bool) -> Vec<crate::manifests::Ep> {
        self.cluster.all_pods(v6)
    }
}

impl Cluster {
    /// Gives every node a second device, `eth1` (10.232.0.1x, fd00:232::1x) on a second
    /// segment, and makes node-0 reach the other nodes' pods through it: a flow node-0 forwards
    /// to a remote backend arrives on eth0 and leaves by eth1 (XDP_REDIRECT rather than
    /// XDP_TX). The other nodes still answer node-0's address through eth0. Call before
    /// [`Cluster::like_a_wire_for_xdp_tx`], and start the agents with `--devices eth0,eth1`.
    pub fn second_segment(&mut self) {
        self.lan.ip(&["link", "add", "br1", "type", "bridge"]);
        self.lan.ip(&["link", "set", "br1", "up"]);
        for (i, node) in self.nodes.iter().enumerate() {
            let (a4, a6) = (format!("10.232.0.{}/24", 10 + i), format!("fd00:232::{}/64", 10 + i));
            veth(&node.ns, "eth1", &[&a4, &a6], &self.lan, &format!("m{i}"), &[]);
            self.lan.ip(&["link", "set", &format!("m{i}"), "master", "br1"]);
        }
        for k in 1..self.nodes.len() {
            let ns = &self.nodes[0].ns;
            let (gw4, gw6) = (format!("10.232.0.{}", 10 + k), format!("fd00:232::{}", 10 + k));
            ns.ip(&["route", "replace", &format!("10.231.{k}.0/24"), "via", &gw4, "dev", "eth1"]);
            ns.ip(&[
                "-6",
                "route",
                "replace",
                &format!("fd00:231:{k}::/64"),
                "via",
                &gw6,
                "dev",
                "eth1",
            ]);
        }
    }

    /// Adds a client behind a router, the `lan` namespace (10.230.0.1 and fd00:230::1 on the
    /// segment): the client at 10.240.0.2 / fd00:240::2 on a link whose router side takes
    /// packets of `mtu` bytes at most (the client's side 1500, so it announces a full-size
    /// MSS: a VPN's or tunnel's link on the way, say); the nodes route 10.240.0.0/24 and
    /// fd00:240::/64 through the router. A segment bigger than `mtu` on its way to the client
    /// gets "fragmentation needed" / "packet too big" from the router, sent to its source.
    /// Returns the client's index.
    pub fn client_behind_router(&mut self, mtu: u32) -> usize {
        self.lan.ip(&["addr", "add", "10.230.0.1/24", "dev", "br0"]);
        self.lan.ip(&["addr", "add", "fd00:230::1/64", "dev", "br0", "nodad"]);
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            self.lan.sysctl(k, v);
        }
        let c = self.clients.len();
        let ns = NetNs::new(&format!("far{c}"));
        let (ip4, ip6) = (ip("10.240.0.2".into()), ip("fd00:240::2".into()));
        veth(
            &ns,
            "eth0",
            &["10.240.0.2/24", "fd00:240::2/64"],
            &self.lan,
            "f0",
            &["10.240.0.1/24", "fd00:240::1/64"],
        );
        self.lan.ip(&["link", "set", "f0", "mtu", &mtu.to_string()]);
        ns.ip(&["route", "add", "default", "via", "10.240.0.1"]);
        ns.ip(&["-6", "route", "add", "default", "via", "fd00:240::1"]);
        for node in &self.nodes {
            node.ns.ip(&["route", "add", "10.240.0.0/24", "via", "10.230.0.1"]);
            node.ns.ip(&["-6", "route", "add", "fd00:240::/64", "via", "fd00:230::1"]);
        }
        self.clients.push(Client { ns, ip4, ip6 });
        c
    }

    /// Makes the nodes' veths behave like NICs on a wire for XDP_TX (agents with `--xdp
    /// --xdp-tx on`): a veth delivers a frame sent back out by XDP only when its peer runs XDP
    /// itself, so a pass-through program goes on the segment's side of every node's veth; and
    /// pods and clients finish their checksums before sending (tx offload off), as frames on a
    /// wire carry them, since an XDP_TX frame leaves with the checksum it arrived with.
    pub fn like_a_wire_for_xdp_tx(&mut self) {
        let senders = self.clients.iter().map(|c| &c.ns);
        for ns in senders.chain(self.nodes.iter().flat_map(|n| n.pods.iter().map(|p| &p.ns))) {
            let out = ns.exec("ethtool", &["-K", "eth0", "tx", "off"]);
            assert!(out.status.success(), "ethtool -K eth0 tx off in {}: {out:?}", ns.name());
        }
        use aya::programs::{Xdp, XdpMode};
        let sizes = crate::kernel::TEST_MAP_SIZES;
        let opts = lb_agent::dataplane::loader::LoadOptions { bpffs: None, sizes };
        let mut ebpf = lb_agent::dataplane::loader::load(&opts).expect("load the eBPF object");
        let prog: &mut Xdp = ebpf
            .program_mut(lb_common::PROG_BENCH_XDP_NOOP)
            .expect("pass-through XDP program")
            .try_into()
            .expect("an XDP program");
        prog.load().expect("verify the pass-through XDP program");
        // The segment's side of each node's links: n<i> (eth0) and m<i> (eth1, if any).
        let peers = (0..self.nodes.len()).flat_map(|i| [format!("n{i}"), format!("m{i}")]);
        let exists = |p: &String| self.lan.exec("ip", &["link", "show", p]).status.success();
        for ifname in peers.filter(exists) {
            self.lan
                .run(|| prog.attach(&ifname, XdpMode::Driver).map(|_| ()))
                .unwrap_or_else(|e| panic!("attach XDP to {ifname} in lan: {e}"));
        }
        self.xdp_peers = Some(ebpf);
    }

    /// Every pod as a ready endpoint on its node.
    pub fn all_pods(&self, v6: bool) -> Vec<crate::manifests::Ep> {
        self.nodes
            .iter()
            .flat_map(|n| {
                n.pods.iter().map(move |p| {
                    crate::manifests::Ep::ready(if v6 { p.ip6 } else { p.ip4 }, &n.name)
                })
            })
            .collect()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Agents first (they hold the cgroup and devices), then their pinned links and maps
        // (unpinning detaches the programs), then the folder; namespaces and cgroups go last.
        self.agents.clear();
        self.pins.clear();
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}

/// Parses `lb-probe connect` output: Ok((server, client address the server saw, peer the client
/// saw)) or Err(error).
pub fn parse_probe(lines: &[String]) -> Vec<Result<(String, String, String), String>> {
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

/// How many answers each server gave.
pub fn by_server(
    results: &[Result<(String, String, String), String>],
) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for (name, _, _) in results.iter().flatten() {
        *m.entry(name.clone()).or_insert(0) += 1;
    }
    m
}

/// The IP part of `ip:port` / `[ip]:port`.
/// The value of the sample `name` (with its labels, as printed) in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{page}"))
}

/// Whether a scraped page has a sample of the metric `name` (such as `x_total`, `x_bucket`).
pub fn exposes(page: &str, name: &str) -> bool {
    page.lines().any(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
}

pub fn host_of(addr: &str) -> String {
    addr.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']']).to_owned()).unwrap_or_default()
}

/// Replaces a manifests file whole (a temporary file renamed over it), as a ConfigMap volume
/// does: the agent never sees it half-written.
fn write_manifest(path: &std::path::Path, content: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
