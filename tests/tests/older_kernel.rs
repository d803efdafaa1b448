//! The datapath on older kernels, each booted in a VM (qemu through virtme-ng over the host's
//! filesystem; emulated rather than KVM, so it runs on any machine): 6.1 LTS (Debian 12, Amazon
//! Linux 2023, many managed node images), which has no TCX and a verifier of its day, and 5.10
//! LTS (Debian 11, Amazon Linux 2; the oldest Cilium supports), which also lacks three things the
//! programs use (`lb_agent::dataplane::kernel_features`: the agent probes for them and the
//! programs take their fallbacks). There the real agent loads and verifies every program,
//! attaches tc as clsact filters, XDP, the socket hooks and a pod device, serves a manifests
//! folder and stops cleanly; and the kernel tests of the device hooks and pods' devices
//! (BPF_PROG_TEST_RUN on crafted packets: every path's verdict, bytes, checksums and counters)
//! pass there too. Before this test, 6.1's verifier refused three programs, and without TCX the
//! agent failed to attach at all; since, it caught a change 6.18 ran right and 6.1 did not (see
//! `device::try_handle`). 5.10 refused an atomic OR even in code its verifier never walks.

use std::{path::PathBuf, process::Command, time::Instant};

use lb_agent::dataplane::kernel_features;
use lb_agent::dataplane::programs::VERIFIER_LIMIT;
use lb_common::{KF_ALL, PROG_TC_EGRESS, PROG_TC_FROM_POD, PROG_TC_INGRESS, PROG_XDP_INGRESS};
use lb_tests::{
    cluster::{host_of, parse_probe},
    require_root, setup_tool, tools_required, workspace_bin,
};

const MANIFESTS: &str = "apiVersion: v1
kind: Node
metadata: {name: n}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {type: LoadBalancer, clusterIP: 10.96.0.10, ports: [{name: http, port: 80, nodePort: 30080, targetPort: 8080}, {name: m3ua, protocol: SCTP, port: 2905, nodePort: 30905, targetPort: 3905}]}
status: {loadBalancer: {ingress: [{ip: 198.51.100.10}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: m3ua, protocol: SCTP, port: 3905}]
endpoints:
- {addresses: [10.0.2.5], nodeName: n}
";

/// What runs inside the VM; every result lands in the shared directory `$1`.
const SCRIPT: &str = r#"#!/bin/sh
D=$1
uname -r > $D/uname
mount -t bpf bpf /sys/fs/bpf
# A client outside the node (netns c) on d0; a pod (netns p) behind its device dp0.
ip netns add c && ip netns add p
ip link add d0 type veth peer name c0 netns c
ip addr add 10.0.0.1/24 dev d0 && ip link set d0 up
ip -n c addr add 10.0.0.9/24 dev c0 && ip -n c link set c0 up && ip -n c link set lo up
ip link add dp0 type veth peer name eth0 netns p
ip addr add 10.0.2.1/24 dev dp0 && ip link set dp0 up
ip -n p addr add 10.0.2.5/24 dev eth0 && ip -n p link set eth0 up && ip -n p link set lo up
ip -n p route add default via 10.0.2.1
echo 1 > /proc/sys/net/ipv4/ip_forward
# SCTP, summed in software by every sender and checked by every receiver: no device here
# offloads its CRC or vouches for it, so a translation that left it wrong loses the packet.
modprobe sctp
ip netns exec c ethtool -K c0 tx-checksum-sctp off rx off
ethtool -K d0 tx-checksum-sctp off rx off && ethtool -K dp0 tx-checksum-sctp off rx off
ip netns exec p ethtool -K eth0 tx-checksum-sctp off rx off
ethtool -k dp0 > $D/ethtool.out
ip netns exec p $D/lb-probe serve --name pod --tcp 0.0.0.0:8080 --sctp 0.0.0.0:3905 > /dev/null &
$D/lb-agent --manifests $D/manifests --node-name n --bpffs /sys/fs/bpf/lb --devices d0 \
  --pod-devices dp+ --socket-lb-host-namespace-only --cgroup /sys/fs/cgroup --xdp \
  --stats-interval 0 > $D/agent.log 2>&1 &
PID=$!
i=0
while [ $i -lt 600 ] && ! grep -q "initial sync done" $D/agent.log && kill -0 $PID 2>/dev/null; do
  sleep 1; i=$((i+1))
done
# Real traffic, all to the pod: a NodePort from outside (XDP, the tc filters of d0), the
# ClusterIP from the pod itself (the filters of its device: socket hooks are kept to the
# host's namespace, which every process here shares a cgroup with) and from the host (the
# socket hooks); a port the ClusterIP lacks, from the pod.
ip netns exec c $D/lb-probe connect 10.0.0.1:30080 --count 5 > $D/nodeport.out 2>&1
ip netns exec p $D/lb-probe connect 10.96.0.10:80 --count 5 > $D/from-pod.out 2>&1
$D/lb-probe connect 10.96.0.10:80 --count 5 > $D/from-host.out 2>&1
ip netns exec p $D/lb-probe connect 10.96.0.10:81 --count 2 > $D/unknown-port.out 2>&1
$D/lb-probe connect 10.96.0.10:81 > $D/host-unknown-port.out 2>&1
# SCTP: a NodePort from outside, the ClusterIP from the pod (its device's hooks: the kernel
# runs no socket hook for SCTP).
ip netns exec c $D/lb-probe connect 10.0.0.1:30905 --sctp --count 3 > $D/sctp-nodeport.out 2>&1
ip netns exec p $D/lb-probe connect 10.96.0.10:2905 --sctp --count 3 > $D/sctp-from-pod.out 2>&1
ip netns exec p cat /proc/net/sctp/snmp > $D/sctp-snmp.pod 2>&1
ip netns exec c cat /proc/net/sctp/snmp > $D/sctp-snmp.client 2>&1
# The LoadBalancer IP from outside, the client its router: answered pings, the service's
# port, and a port it lacks dropped (the node's default route would send it back).
ip route add default via 10.0.0.9
ip -n c route add 198.51.100.10/32 via 10.0.0.1
ip netns exec c $D/lb-probe ping 198.51.100.10 --count 2 > $D/ping.out 2>&1
ip netns exec c $D/lb-probe connect 198.51.100.10:80 --count 2 > $D/lb-ip.out 2>&1
ip netns exec c $D/lb-probe connect 198.51.100.10:81 --timeout-ms 500 > $D/lb-unknown.out 2>&1
$D/lbctl stats --bpffs /sys/fs/bpf/lb -o json > $D/stats.json 2>&1
$D/lbctl status --bpffs /sys/fs/bpf/lb -o json > $D/status.json 2>&1
tc -j filter show dev d0 ingress > $D/filters.json 2>&1
kill $PID; wait $PID; echo $? > $D/agent.rc
for t in $KERNEL_TESTS; do
  LB_REQUIRE_ROOT_TESTS=1 $D/$t --test-threads 1 $(cat $D/$t.args) > $D/$t.log 2>&1
  echo $? > $D/$t.rc
done
"#;

/// The kernel tests run on 6.1 too: the device hooks' every path, ICMP errors (where 6.1's
/// verifier refused the quote's length), pods' devices and service addresses (where 6.1 found
/// the chain of frames from ICMP handling to a drop's monitor event over 512 bytes). Emulated, each takes a minute or two; by hand
/// (2026-12-06) `pod_devices`, `fragments`, `checksum_complete` and `datapath_nat` passed
/// there as well (bar two of the last that age entries further back than a VM's uptime).
/// Each with the tests to skip there.
const KERNEL_TESTS_6_1: &[(&str, &[&str])] = &[
    ("device_test_run", &[]),
    ("icmp_errors", &[]),
    ("pod_devices", &[]),
    ("service_addresses", &[]),
    ("sctp", &[]),
    ("dsr", &["the_frontend_in_a_syn_keeps_a_checksum_complete_sum_right"]),
];

/// On 5.10, those whose packets need not arrive on a real device: its BPF_PROG_TEST_RUN refuses
/// a context naming one (`ifindex`: EINVAL), which every test in a routed namespace gives, so
/// `service_addresses` and one ICMP test stay on 6.1 and the host.
const KERNEL_TESTS_5_10: &[(&str, &[&str])] = &[
    ("device_test_run", &[]),
    ("icmp_errors", &["a_packet_too_big_for_the_route_to_a_remote_pod_gets_fragmentation_needed"]),
    ("pod_devices", &[]),
    ("dsr", &["the_frontend_in_a_syn_keeps_a_checksum_complete_sum_right"]),
];

/// The newest build of a sibling test binary (`deps/<name>-<hash>`).
fn test_binary(name: &str) -> Option<PathBuf> {
    newest_in_deps(&format!("{name}-"), "")
}

/// The newest file of this test's directory (`deps`) named `<prefix><hash><suffix>`; with no
/// suffix, one without a dot (an executable).
fn newest_in_deps(prefix: &str, suffix: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    std::fs::read_dir(exe.parent()?)
        .ok()?
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(prefix)
                && if suffix.is_empty() { !n.contains('.') } else { n.ends_with(suffix) }
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

fn modified(path: &std::path::Path) -> std::time::SystemTime {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    meta.modified().expect("modification times")
}

/// A kernel this test boots, and what the agent should find it lacks.
struct OldKernel {
    /// What `uname -r` starts with.
    series: &'static str,
    /// The variable `cargo xtask test` passes its image in (setup installs it).
    image_var: &'static str,
    /// The `KF_*` features the agent should probe there.
    features: u32,
    /// Whether the kernel reports how many instructions its verifier walked (5.16,
    /// `verified_insns`).
    reports_walks: bool,
    /// How a host process's connect() to a ClusterIP's missing port fails (a socket hook's
    /// refusal: ECONNREFUSED needs `bpf_set_retval`).
    refused_connect: &'static str,
    /// The kernel test binaries run there, each with the tests to skip.
    kernel_tests: &'static [(&'static str, &'static [&'static str])],
}

#[test]
fn the_datapath_loads_attaches_and_passes_its_kernel_tests_on_kernel_6_1() {
    run_on(&OldKernel {
        series: "6.1.",
        image_var: "LB_OLD_KERNEL",
        features: KF_ALL,
        reports_walks: true,
        refused_connect: "err ECONNREFUSED",
        kernel_tests: KERNEL_TESTS_6_1,
    });
}

#[test]
fn the_datapath_loads_attaches_and_passes_its_kernel_tests_on_kernel_5_10() {
    run_on(&OldKernel {
        series: "5.10.",
        image_var: "LB_KERNEL_5_10",
        features: 0,
        reports_walks: false,
        refused_connect: "err EPERM",
        kernel_tests: KERNEL_TESTS_5_10,
    });
}

fn run_on(k: &OldKernel) {
    require_root!();
    let series = k.series.trim_end_matches('.');
    let kernel = std::env::var_os(k.image_var).map(PathBuf::from);
    let (Some(kernel), Some(vng)) = (kernel, setup_tool("vng")) else {
        assert!(!tools_required(), "no {series} kernel or virtme-ng: run `cargo xtask setup`");
        eprintln!("SKIPPED: no {series} kernel or virtme-ng (`cargo xtask setup` installs them)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("lb-old-kernel-{}-{series}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Removed however the test ends (its logs are in the failure's message).
    let _cleanup = RemoveOnDrop(dir.clone());
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    std::fs::write(dir.join("manifests/web.yaml"), MANIFESTS).unwrap();
    std::fs::write(dir.join("run.sh"), SCRIPT).unwrap();
    // Copies beside the script: the VM sees the host's files, but this keeps its paths short.
    // The newest build of the agent's library, which holds the programs.
    let programs_built = newest_in_deps("liblb_agent-", ".rlib").map(|p| modified(&p));
    let tests = k.kernel_tests.iter().map(|(t, skip)| {
        let args: Vec<String> = skip.iter().map(|s| format!("--skip {s}")).collect();
        std::fs::write(dir.join(format!("{t}.args")), args.join(" ")).unwrap();
        let bin = test_binary(t).expect("kernel tests built");
        // `cargo test --test older_kernel` builds no other test: one built before the
        // agent's library would run another build's programs there.
        assert!(
            programs_built.is_none_or(|built| modified(&bin) >= built),
            "{} is older than the agent's library: build the kernel tests again (`cargo test \
             -p lb-tests --no-run`; `cargo xtask test` does)",
            bin.display()
        );
        (*t, bin)
    });
    let bins = ["lb-agent", "lbctl", "lb-probe"].map(|b| (b, workspace_bin(b)));
    for (name, from) in bins.into_iter().chain(tests) {
        std::fs::copy(&from, dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
    let d = dir.to_str().unwrap();
    let names: Vec<&str> = k.kernel_tests.iter().map(|(t, _)| *t).collect();
    // vng runs its sibling `virtme-run` by name: the venv's bin directory goes first on PATH
    // (a machine where no other copy is on PATH failed with "virtme-run: not found").
    let venv_bin = vng.parent().expect("vng's directory");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(
        std::iter::once(venv_bin.to_owned()).chain(std::env::split_paths(&path)),
    )
    .expect("PATH with the venv");
    let start = Instant::now();
    let out = Command::new("timeout")
        .env("PATH", path)
        .arg("1500")
        .arg(&vng)
        .arg("-r")
        .arg(&kernel)
        .args(["--disable-kvm", "--user", "root", "--memory", "2G", "--cpus", "1"])
        .args([
            "--rwdir",
            d,
            "-e",
            &format!("KERNEL_TESTS='{}' sh {d}/run.sh {d}", names.join(" ")),
        ])
        .output()
        .expect("run virtme-ng");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let said = format!(
        "vng exited {}: {}\nagent log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        read("agent.log")
    );
    println!("the VM ran for {:.0?}", start.elapsed());
    assert!(read("uname").starts_with(k.series), "booted {:?}; {said}", read("uname"));

    let log = read("agent.log");
    assert!(log.contains("initial sync done"), "{said}");
    // An older verifier walks the same code differently from 6.18's (`tests/tests/verifier.rs`
    // checks the host kernel's walks); each program must stay under half its limit there too
    // (where the kernel says how far it walked).
    let walks = verifier_walks(&log);
    println!("{series}'s verifier, instructions walked: {walks:?}");
    for name in [PROG_TC_INGRESS, PROG_XDP_INGRESS, PROG_TC_FROM_POD, PROG_TC_EGRESS] {
        let (_, walked) = walks.iter().find(|(n, _)| n == name).unwrap_or_else(|| {
            panic!("{name} not in {walks:?}; {said}");
        });
        match walked {
            Some(walked) => assert!(*walked < VERIFIER_LIMIT / 2, "{name}: {walked} on {series}"),
            None => assert!(!k.reports_walks, "{name}: no count of walked instructions; {said}"),
        }
    }
    // What the agent found missing, and said so.
    let warned: Vec<&str> = kernel_features::fallbacks(k.features)
        .into_iter()
        .filter(|fallback| log.contains(&format!("this kernel has {fallback}")))
        .collect();
    assert_eq!(warned, kernel_features::fallbacks(k.features), "{said}");
    assert_eq!(log.matches("this kernel has no").count(), warned.len(), "{said}");
    assert!(log.contains("attached as clsact filters"), "{said}");
    assert!(log.contains("XDP attached") || log.contains("attached in generic mode"), "{said}");
    assert_eq!(read("agent.rc").trim(), "0", "a clean stop: {said}");
    let status: serde_json::Value = serde_json::from_str(&read("status.json"))
        .unwrap_or_else(|e| panic!("{e}: {}", read("status.json")));
    let d0 = serde_json::json!([{"name": "d0", "xdp": true, "tc": "clsact"}]);
    assert_eq!(status["devices"], d0, "{status}");
    assert_eq!(status["pod_devices"], serde_json::json!(["dp0"]), "{status}");
    assert_eq!(status["socket_hooks"], serde_json::json!(["/"]), "{status}");
    assert_eq!(status["service_ports"], 2, "{status}");
    let fallbacks = serde_json::json!(kernel_features::fallbacks(k.features));
    assert_eq!(status["kernel_fallbacks"], fallbacks, "lbctl status tells them too: {status}");
    // Who answered, seeing whom, as whom: the pod, each time; the client's own address, the
    // node's for the pod reaching itself (hairpin SNAT), the host's route source; each client
    // saw the address it asked.
    for (file, seen, peer, count) in [
        ("nodeport.out", "10.0.0.9", "10.0.0.1:30080", 5),
        ("from-pod.out", "10.0.0.1", "10.96.0.10:80", 5),
        ("from-host.out", "10.0.2.1", "10.96.0.10:80", 5),
        ("sctp-nodeport.out", "10.0.0.9", "10.0.0.1:30905", 3),
        ("sctp-from-pod.out", "10.0.0.1", "10.96.0.10:2905", 3),
    ] {
        let r = parse_probe(&read(file).lines().map(str::to_owned).collect::<Vec<_>>());
        let r: Vec<_> = r.into_iter().map(|r| r.map(|(n, s, p)| (n, host_of(&s), p))).collect();
        let want = (String::from("pod"), seen.to_owned(), peer.to_owned());
        assert_eq!(r, vec![Ok(want); count], "{file} on {series}: {said}");
    }
    // SCTP's CRC was checked in software on every hop's receiver (no offload), and never
    // found wrong.
    let ethtool = read("ethtool.out");
    for off in ["tx-checksum-sctp: off", "rx-checksumming: off"] {
        assert!(ethtool.contains(off), "{off}: {ethtool}");
    }
    for side in ["pod", "client"] {
        let snmp = read(&format!("sctp-snmp.{side}"));
        let counter = |name: &str| -> Option<u64> {
            let line = snmp.lines().find(|l| l.split_whitespace().next() == Some(name))?;
            line.split_whitespace().nth(1)?.parse().ok()
        };
        assert_eq!(counter("SctpChecksumErrors"), Some(0), "{side}: {snmp}");
        assert!(counter("SctpInSCTPPacks").is_some_and(|n| n > 0), "{side}: {snmp}");
    }
    // A ClusterIP's missing port: the pod's device refuses it (a TCP reset), the socket hook
    // the host's connect().
    let refused = read("unknown-port.out");
    assert_eq!(refused.lines().collect::<Vec<_>>(), ["err ECONNREFUSED"; 2], "{said}");
    assert_eq!(read("host-unknown-port.out").trim(), k.refused_connect, "{said}");
    // The LoadBalancer IP: pings answered by the node, the service reached, the port it lacks
    // dropped on the node (XDP), once.
    let lines = |f: &str| read(f).lines().map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(lines("ping.out"), ["ok 198.51.100.10 ttl=64"; 2], "{said}");
    let r: Vec<_> =
        parse_probe(&lines("lb-ip.out")).into_iter().map(|r| r.map(|(n, ..)| n)).collect();
    assert_eq!(r, vec![Ok(String::from("pod")); 2], "{said}");
    assert_eq!(lines("lb-unknown.out"), ["err TIMEOUT"], "{said}");
    let stats: serde_json::Value = serde_json::from_str(&read("stats.json"))
        .unwrap_or_else(|e| panic!("{e}: {}", read("stats.json")));
    let counters = &stats["counters"];
    assert_eq!(
        (&counters["echo_reply"], &counters["drop_unknown_port"]),
        (&2.into(), &1.into()),
        "{stats}"
    );
    assert!(
        read("filters.json").contains("\"bpf_name\":\"tc_ingress\""),
        "{}",
        read("filters.json")
    );

    for t in names {
        let log = read(&format!("{t}.log"));
        assert_eq!(read(&format!("{t}.rc")).trim(), "0", "{t} on {series}:\n{log}");
        assert!(log.contains("test result: ok"), "{t} on {series}:\n{log}");
        let result = log.lines().find(|l| l.contains("test result")).unwrap_or("");
        println!("{t} on {series}: {result}");
    }
}

/// The agent's "programs verified" line, as (program, instructions the verifier walked, where
/// the kernel says: "?" before 5.16).
fn verifier_walks(log: &str) -> Vec<(String, Option<u32>)> {
    let Some(line) = log.lines().find(|l| l.contains("programs verified")) else {
        return Vec::new();
    };
    let line = strip_ansi(line);
    let Some((_, list)) = line.split_once("programs=") else { return Vec::new() };
    // Each: "<name> <instructions>/<walked> <ms> ms".
    list.split(", ")
        .filter_map(|p| {
            let mut words = p.split(' ');
            let name = words.next()?;
            let walked = words.next()?.split_once('/')?.1;
            Some((name.to_owned(), walked.parse().ok()))
        })
        .collect()
}

/// `s` without terminal colour sequences (ESC [ ... m), which the agent's log has.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
