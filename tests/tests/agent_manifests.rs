//! The real agent binary serving a manifests folder: initial sync into pinned maps, changes
//! picked up, a restart that rewrites nothing, and removal; flag values it refuses.

use std::{net::IpAddr, path::Path, time::Duration};

use lb_agent::dataplane::{
    store::{KernelStore, MapStore},
    writer::{CanonicalDump, canonical},
};
use lb_tests::{agent::Agent, kernel::PinDir, require_root, wait_until};

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus: {addresses: [{type: InternalIP, address: 10.210.0.11}]}\n";
const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {type: NodePort, clusterIP: 10.96.0.10, ports: [{port: 80, nodePort: 30080}]}\n";

fn slice(ips: &[&str]) -> String {
    let eps: String =
        ips.iter().map(|ip| format!("- {{addresses: [{ip}], nodeName: node-b}}\n")).collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{eps}"
    )
}

fn dump(pins: &Path) -> CanonicalDump {
    canonical(&KernelStore::open_pinned(pins).unwrap().snapshot().unwrap()).unwrap()
}

/// The distinct backends every frontend balances over.
fn backends_per_frontend(d: &CanonicalDump) -> Vec<Vec<IpAddr>> {
    d.frontends
        .values()
        .map(|(_, _, _, slots)| {
            let mut v: Vec<IpAddr> = slots.iter().map(|(ip, _)| *ip).collect();
            v.sort();
            v.dedup();
            v
        })
        .collect()
}

/// The flags of an agent serving the manifests folder `dir` with its maps pinned under `pins`.
fn agent_args(dir: &Path, pins: &Path) -> Vec<String> {
    let (dir, pins) = (dir.to_str().unwrap(), pins.to_str().unwrap());
    [
        "--manifests",
        dir,
        "--node-name",
        "node-a",
        "--bpffs",
        pins,
        "--stats-interval",
        "0",
        "--poll-interval-ms",
        "20",
        "--health-bind-address",
        "127.0.0.1:0",
        "--metrics-bind-address",
        "127.0.0.1:0",
        // Small maps: tests run side by side.
        "--max-services",
        "1024",
        "--max-frontends",
        "4096",
        "--max-backends",
        "1024",
        "--maglev-slots",
        "65536",
    ]
    .map(String::from)
    .to_vec()
}

fn start(args: &[String]) -> Agent {
    Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>(), None, None)
}

/// A manifests folder, removed when dropped (a failing test too).
struct Folder(std::path::PathBuf);

impl std::ops::Deref for Folder {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh manifests folder holding the node and the web service with endpoints `ips`.
fn web_folder(tag: &str, ips: &[&str]) -> Folder {
    let dir = std::env::temp_dir().join(format!("lb-agent-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("node.yaml"), NODE).unwrap();
    std::fs::write(dir.join("web.yaml"), format!("{SERVICE}---\n{}", slice(ips))).unwrap();
    Folder(dir)
}

#[test]
fn agent_programs_changes_survives_restart_and_cleans_up() {
    require_root!();
    let pins = PinDir::new("agent");
    let dir = web_folder("restart", &["10.244.2.10", "10.244.2.11"]);
    let args = agent_args(&dir, &pins.path);
    let mut agent = start(&args);
    agent.wait_for_log("initial sync done", Duration::from_secs(20));
    let d = dump(&pins.path);
    assert_eq!(
        d.frontends.len(),
        4,
        "ClusterIP, NodePort internal/external, 127.0.0.1:NodePort: {:?}",
        d.frontends.keys()
    );
    let two: Vec<IpAddr> = vec!["10.244.2.10".parse().unwrap(), "10.244.2.11".parse().unwrap()];
    assert!(backends_per_frontend(&d).iter().all(|b| *b == two), "{:?}", backends_per_frontend(&d));

    // Scale up: the agent notices the file change.
    std::fs::write(
        dir.join("web.yaml"),
        format!("{SERVICE}---\n{}", slice(&["10.244.2.10", "10.244.2.11", "10.244.2.12"])),
    )
    .unwrap();
    wait_until("the third endpoint is programmed", Duration::from_secs(4), || {
        backends_per_frontend(&dump(&pins.path)).iter().all(|b| b.len() == 3)
    });
    let before_restart = dump(&pins.path);

    // A bad document is logged with file, document and field; the rest keeps being served.
    std::fs::write(dir.join("bad.yaml"), "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {clusterIP: 10.96.0.99, ports: [{port: 0}]}\n").unwrap();
    let line = agent.wait_for_log("bad.yaml document 1", Duration::from_secs(5));
    assert!(line.contains("spec.ports[0].port 0 is outside 1-65535"), "{line}");
    assert_eq!(dump(&pins.path), before_restart);

    // Stop: maps stay pinned with their content.
    assert!(agent.stop().success());
    assert_eq!(dump(&pins.path), before_restart, "maps survive the agent");

    // Restart over the same folder: it adopts everything and writes nothing. (Logging JSON
    // this time, one object a line, as log pipelines take it.)
    let json_args = [&args[..], &["--log-format".into(), "json".into()]].concat();
    let mut agent = start(&json_args);
    let line = agent.wait_for_log("initial sync done", Duration::from_secs(20));
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(
        (&v["level"], &v["message"]),
        (&"INFO".into(), &"initial sync done".into()),
        "{line}"
    );
    assert_eq!(
        (&v["entries_written"], &v["maglev_slots_written"]),
        (&0.into(), &0.into()),
        "{line}"
    );
    assert_eq!(dump(&pins.path), before_restart);

    // Removing the service removes its entries.
    std::fs::remove_file(dir.join("web.yaml")).unwrap();
    wait_until("the maps are empty", Duration::from_secs(4), || {
        dump(&pins.path).frontends.is_empty()
    });
    let d = dump(&pins.path);
    assert!(d.backends.is_empty() && d.unreferenced_tables == 0, "{d:?}");
    assert!(agent.stop().success());
}

/// One agent per pin directory: a second one (a debugging run on a node, a stray second
/// DaemonSet) would overwrite the first's maps with its own view of the cluster and hand out
/// the ids the first gave. It is refused, naming the agent that holds the directory, and
/// changes nothing; so is `--cleanup`, which would detach the running agent's programs. Once
/// that agent has stopped, both go ahead.
#[test]
fn a_second_agent_on_the_same_pins_is_refused_and_changes_nothing() {
    require_root!();
    let pins = PinDir::new("second");
    let first_dir = web_folder("first", &["10.244.2.10", "10.244.2.11"]);
    let second_dir = web_folder("second", &["10.244.2.20"]);
    let first_args = agent_args(&first_dir, &pins.path);
    let second_args = agent_args(&second_dir, &pins.path);
    let mut first = start(&first_args);
    first.wait_for_log("initial sync done", Duration::from_secs(20));
    let programmed = dump(&pins.path);
    let holder = format!("pid {}", first.pid());

    let mut second = start(&second_args);
    let status = second.wait_exit(Duration::from_secs(20));
    let log = second.log().join("\n");
    assert_eq!(status.and_then(|s| s.code()), Some(1), "refused:\n{log}");
    assert!(log.contains(&holder) && log.contains("--bpffs"), "names the holder:\n{log}");
    assert_eq!(dump(&pins.path), programmed, "the first agent's maps untouched");

    let cleanup = std::process::Command::new(lb_tests::workspace_bin("lb-agent"))
        .args(["--cleanup", "--bpffs", pins.path.to_str().unwrap()])
        .output()
        .expect("run lb-agent --cleanup");
    let stderr = String::from_utf8_lossy(&cleanup.stderr);
    assert_eq!(cleanup.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&holder), "{stderr}");
    assert_eq!(dump(&pins.path), programmed, "nothing removed under a running agent");

    // Stopped, the first agent lets the next one in at once.
    assert!(first.stop().success());
    let mut next = start(&second_args);
    next.wait_for_log("initial sync done", Duration::from_secs(20));
    let twenty: Vec<IpAddr> = vec!["10.244.2.20".parse().unwrap()];
    let d = dump(&pins.path);
    assert!(backends_per_frontend(&d).iter().all(|b| *b == twenty), "{d:?}");
    assert!(next.stop().success());
}

/// Flags with values that make no sense stop the agent before it touches anything, saying why.
#[test]
fn nonsense_flag_values_are_refused_with_the_reason() {
    for (flag, value, reason) in [
        ("--conntrack-tcp-timeout-established", "0s", "at least 1 s"),
        ("--conntrack-udp-timeout", "5d", "expected a duration such as 6h"),
        ("--nat-port-range", "30000-20000", "first <= last"),
        ("--nodeport-addresses", "primary,10.0.0.0/8", "cannot be combined"),
        ("--nodeport-addresses", "eth0", "a CIDR or primary"),
    ] {
        let out = std::process::Command::new(lb_tests::workspace_bin("lb-agent"))
            .args(["--node-name", "n", flag, value])
            .output()
            .expect("run lb-agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(reason) && stderr.contains(flag), "{flag} {value}: {stderr}");
    }
}

/// A free port of 127.0.0.1 (free when asked: the caller binds it soon after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// kube-proxy's own file (`--kube-proxy-config`): what it sets is used unless a flag says
/// otherwise, and the log names what it set and what it left unused.
#[test]
fn a_kube_proxy_config_file_is_read_as_flags_the_command_line_overrides() {
    require_root!();
    let (metrics, healthz) = (free_port(), free_port());
    let dir = web_folder("kpc", &["10.244.2.10"]);
    let file = dir.join("kube-proxy.conf");
    std::fs::write(
        &file,
        format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             mode: ipvs\nmetricsBindAddress: 127.0.0.1:{metrics}\n\
             healthzBindAddress: 127.0.0.1:{healthz}\nconntrack: {{udpTimeout: 45s}}\n"
        ),
    )
    .unwrap();
    let pins = PinDir::new("kpc");
    let mut args = agent_args(&dir, &pins.path);
    // The file's metrics address is used; the command line's health address wins.
    let at = args.iter().position(|a| a == "--metrics-bind-address").unwrap();
    args.drain(at..at + 2);
    args.extend(["--kube-proxy-config".into(), file.to_str().unwrap().into()]);
    let mut agent = start(&args);
    agent.wait_for_log("initial sync done", Duration::from_secs(30));
    let (code, body) = lb_tests::netns::http_get_here(&format!("127.0.0.1:{metrics}"), "/metrics")
        .expect("metrics on the file's address");
    assert_eq!(code, 200);
    assert!(body.contains("lb_"), "{body}");
    let refused = lb_tests::netns::http_get_here(&format!("127.0.0.1:{healthz}"), "/healthz");
    assert!(refused.is_err(), "the file's health address, which the flag overrode: {refused:?}");
    let log = agent.log().join("\n");
    assert!(log.contains("--conntrack-udp-timeout=45s"), "{log}");
    assert!(log.contains("mode ipvs: this agent replaces every kube-proxy mode"), "{log}");
}

/// A file that is no KubeProxyConfiguration, or whose value a flag refuses, stops the agent
/// with the reason before anything is made.
#[test]
fn a_wrong_kube_proxy_config_file_is_refused_with_the_reason() {
    let dir = web_folder("kpc-bad", &[]);
    let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
    for (yaml, reason) in [
        ("apiVersion: v1\nkind: ConfigMap\n".to_string(), "not a KubeProxyConfiguration"),
        (format!("{head}nodePortAddresses: 10.0.0.0/8\n"), "nodePortAddresses: a list"),
        (format!("{head}conntrack: {{udpTimeout: 5d}}\n"), "--conntrack-udp-timeout"),
    ] {
        let file = dir.join("kube-proxy.conf");
        std::fs::write(&file, &yaml).unwrap();
        let out = std::process::Command::new(lb_tests::workspace_bin("lb-agent"))
            .args(["--node-name", "n", "--kube-proxy-config", file.to_str().unwrap()])
            .output()
            .expect("run lb-agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{yaml}: {stderr}");
        assert!(stderr.contains(reason) && stderr.contains("kube-proxy.conf"), "{yaml}: {stderr}");
    }
}

/// Keeping the socket hooks to the host without pod devices would leave pods' service traffic
/// untranslated: refused, as is `auto` for pod devices (which devices are pods' is no route's
/// business).
#[test]
fn socket_hooks_kept_to_the_host_need_pod_devices() {
    for (args, code, reason) in [
        (&["--socket-lb-host-namespace-only"][..], 2, "--pod-devices"),
        (&["--socket-lb-host-namespace-only", "--pod-devices", ""], 1, "needs --pod-devices"),
        (&["--pod-devices", "auto"], 1, "not auto"),
    ] {
        let out = std::process::Command::new(lb_tests::workspace_bin("lb-agent"))
            .args(["--node-name", "n", "--manifests", "/"])
            .args(args)
            .output()
            .expect("run lb-agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
}

/// A `--bpffs` off a bpf filesystem, or a `--cgroup` that is no cgroup v2 directory, is refused
/// with the reason before anything is created (the kernel's own answers, EPERM from a pin and
/// EBADF from a link, came after pin directories had been made on the wrong filesystem).
#[test]
fn paths_on_the_wrong_filesystem_are_refused_before_anything_is_made() {
    let scratch = std::env::temp_dir().join(format!("lb-agent-fs-{}", std::process::id()));
    let pins = scratch.join("pins");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let bpffs = pins.to_str().unwrap();
    let tmp = scratch.to_str().unwrap();
    for (args, reason) in [
        (&["--bpffs", bpffs][..], "is not on a bpf filesystem"),
        (&["--bpffs", bpffs, "--cleanup"][..], "nothing pinned"),
        (&["--cgroup", tmp][..], "not a cgroup v2 directory"),
    ] {
        let out = std::process::Command::new(lb_tests::workspace_bin("lb-agent"))
            .args(["--node-name", "n", "--manifests", tmp])
            .args(args)
            .output()
            .expect("run lb-agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
        assert!(!pins.exists(), "{args:?}: nothing made");
    }
    std::fs::create_dir_all(&pins).unwrap();
    let out = std::process::Command::new(lb_tests::workspace_bin("lb-agent"))
        .args(["--cleanup", "--bpffs", bpffs])
        .output()
        .expect("run lb-agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not on a bpf filesystem"), "{stderr}");
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// The health port answers while the agent is busy: from the moment it listens, through the
/// programs' load and an initial sync of thousands of services, until it is ready. (On one
/// thread, as the agent ran before, a probe waited until the initial sync was over.)
#[test]
fn the_health_port_answers_throughout_a_long_initial_sync() {
    require_root!();
    const SERVICES: usize = 4000;
    let dir = web_folder("busy", &["10.244.2.10"]);
    // Numbered services only (the web service's ClusterIP is among their addresses).
    std::fs::remove_file(dir.join("web.yaml")).unwrap();
    let many: String = (0..SERVICES).map(|i| lb_tests::numbered::yaml(i, &[true])).collect();
    std::fs::write(dir.join("many.yaml"), many).unwrap();
    let pins = PinDir::new("busy");
    let mut args = agent_args(&dir, &pins.path);
    for (flag, value) in [
        ("--max-services", "8192"),
        ("--max-frontends", "16384"),
        ("--max-backends", "8192"),
        ("--maglev-slots", "4194304"),
    ] {
        let at = args.iter().position(|a| a == flag).unwrap();
        args[at + 1] = value.into();
    }
    let mut agent = start(&args);
    let line = agent.wait_for_log("serving", Duration::from_secs(20));
    let port: String = line
        .split("127.0.0.1:")
        .nth(1)
        .expect("the health address in the log")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let address = format!("127.0.0.1:{port}");
    let started = std::time::Instant::now();
    // Probed every 10 ms until the initial sync is done: each answer's time.
    let mut answers = Vec::new();
    while agent.count_log("initial sync done") == 0 {
        assert!(started.elapsed() < Duration::from_secs(120), "{}", agent.log().join("\n"));
        let asked = std::time::Instant::now();
        let answer = lb_tests::netns::http_get_here(&address, "/livez");
        answers.push((asked.elapsed(), answer.map(|(code, _)| code).map_err(|e| e.to_string())));
        std::thread::sleep(Duration::from_millis(10));
    }
    let busy = started.elapsed();
    let slowest = answers.iter().map(|(took, _)| *took).max().unwrap_or_default();
    println!(
        "{} probes over {busy:?} of start-up, the slowest answered in {slowest:?}",
        answers.len()
    );
    // Long enough that a server waiting for the sync loop would have been caught.
    assert!(busy > Duration::from_secs(1), "start-up took only {busy:?}: nothing to judge");
    assert!(answers.iter().all(|(_, a)| a == &Ok(200)), "{answers:?}");
    assert!(slowest < Duration::from_millis(500), "a probe waited {slowest:?}: {answers:?}");
    agent.wait_for_log("initial sync done", Duration::from_secs(1));
    assert_eq!(lb_tests::netns::http_get_here(&address, "/readyz").unwrap().0, 200);
}
