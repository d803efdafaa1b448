//! What the socket hooks cost a process, per call: UDP `connect()` and `sendto()` timed in user
//! space, from a socket made outside the hooks' cgroup (no program runs: the floor), from one
//! made inside it to a pod's address (the hook runs and finds no service), and from one made
//! inside it to a ClusterIP (the hook translates it). The three take turns call by call, so the
//! machine's noise falls on all alike; every translated call is checked (the socket's peer is
//! the ClusterIP, the translation counter moved by the number of calls). `connect()` is what
//! every TCP and connected UDP client pays once a flow; `sendto()` what an unconnected UDP
//! client (a DNS resolver) pays on every datagram. Runs in the bench's quiet namespace, where a
//! device routes the pods' addresses (connect() needs a route; what is sent is dropped).

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::Instant,
};

use lb_agent::{dataplane::attach, model::plan::Protocol};
use lb_common::STAT_SOCK_TRANSLATED;

use crate::{
    bench::{datapath_with, interquartile_mean},
    cgroup::Cgroup,
    plans::{backend, cluster_ip_plan},
};

const RUNS: usize = 20_000;
const WARMUP: usize = 2_000;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const POD: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const DEVICE: &str = "lbbench0";

/// One call of a kind: the socket it is made on and where to.
struct Call<'a> {
    sock: &'a UdpSocket,
    to: SocketAddr,
}

/// `lb-bench sock`: [`socket_hooks`] at 1 and 100,000 services, in the quiet namespace.
pub fn run() {
    crate::kernel::in_quiet_netns(|| socket_hooks(&[1, 100_000]))
}

/// Prints the table (this build only: the figures are syscalls, not a program's runs).
pub fn socket_hooks(sizes: &[usize]) {
    println!(
        "\nsocket hooks: ns per UDP call, interquartile mean of {RUNS} calls timed in user space, after {WARMUP}, the three kinds in turn"
    );
    let device = Device::new();
    println!(
        "{:<42} {}",
        "call",
        sizes.iter().map(|&n| format!("{:>22}", services(n))).collect::<String>()
    );
    let mut rows: Vec<(&str, Vec<String>)> = [
        "connect(): no hook (floor)",
        "connect(): hooked, to a pod (no service)",
        "connect(): hooked, to a ClusterIP",
        "sendto(): no hook (floor)",
        "sendto(): hooked, to a pod (no service)",
        "sendto(): hooked, to a ClusterIP",
    ]
    .into_iter()
    .map(|name| (name, Vec::new()))
    .collect();
    for &n in sizes {
        for (row, t) in rows.chunks_mut(3).zip(measure_at(n)) {
            for ((_, cells), (ns, over)) in row.iter_mut().zip(t) {
                let over = if over == 0.0 { String::new() } else { format!(" ({over:+.0})") };
                cells.push(format!("{ns:.0} ns{over}"));
            }
        }
    }
    for (name, cells) in rows {
        println!("{name:<42} {}", cells.iter().map(|c| format!("{c:>22}")).collect::<String>());
    }
    println!("(in parentheses: ns over the floor, the hook's own cost)");
    drop(device);
}

/// "1 service", "100,000 services".
fn services(n: usize) -> String {
    let digits = n.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    if n == 1 { "1 service".into() } else { format!("{grouped} services") }
}

/// (ns, ns over the floor) of each kind of connect() and of sendto(), with `n` services.
fn measure_at(n: usize) -> [[(f64, f64); 3]; 2] {
    let mut dp = datapath_with(n, None);
    let pods = vec![backend(POD.into(), 5353, true)];
    let dns = cluster_ip_plan("dns", &CLUSTER_IP.to_string(), 53, Protocol::Udp, pods, None);
    dp.program("dns", &[dns]);
    let cg = Cgroup::new("bench-sock");
    attach::cgroup(&mut dp.ebpf, &cg.path, None).expect("attaching the socket hooks");
    let hooked = || in_cgroup(&cg, || UdpSocket::bind("0.0.0.0:0").expect("a UDP socket"));
    let plain = UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
    let (hooked_pod, hooked_ip) = (hooked(), hooked());
    let pod = SocketAddr::new(POD.into(), 5353);
    let service = SocketAddr::new(CLUSTER_IP.into(), 53);
    let calls = [
        Call { sock: &plain, to: pod },
        Call { sock: &hooked_pod, to: pod },
        Call { sock: &hooked_ip, to: service },
    ];
    let before = dp.stat(STAT_SOCK_TRANSLATED);
    let connect = timed(&calls, |c| c.sock.connect(c.to).expect("connect()"));
    let peer = hooked_ip.peer_addr().expect("the hooked socket's peer");
    assert_eq!(peer, service, "the application sees the ClusterIP");
    let (plain, hooked_pod, hooked_ip) =
        (UdpSocket::bind("0.0.0.0:0").expect("a UDP socket"), hooked(), hooked());
    let calls = [
        Call { sock: &plain, to: pod },
        Call { sock: &hooked_pod, to: pod },
        Call { sock: &hooked_ip, to: service },
    ];
    let sendto = timed(&calls, |c| {
        c.sock.send_to(b"q", c.to).expect("sendto()");
    });
    let translated = dp.stat(STAT_SOCK_TRANSLATED) - before;
    assert!(
        translated >= 2 * (RUNS + WARMUP) as u64,
        "each call to the ClusterIP translated: {translated}"
    );
    [connect, sendto]
}

/// Interquartile mean ns of `call` on each of `calls` (in turn, the order turning too), and
/// its excess over the first's.
fn timed(calls: &[Call<'_>; 3], call: impl Fn(&Call<'_>)) -> [(f64, f64); 3] {
    let mut times = vec![Vec::with_capacity(RUNS); calls.len()];
    for i in 0..WARMUP + RUNS {
        for k in 0..calls.len() {
            let b = (i + k) % calls.len();
            let t = Instant::now();
            call(&calls[b]);
            let ns = t.elapsed().as_nanos() as u64;
            if i >= WARMUP {
                times[b].push(ns);
            }
        }
    }
    let ns: Vec<f64> = times.into_iter().map(interquartile_mean).collect();
    [(ns[0], 0.0), (ns[1], ns[1] - ns[0]), (ns[2], ns[2] - ns[0])]
}

/// Runs `f` with this process in `cg` (sockets made meanwhile belong to it), then moves it back.
fn in_cgroup<R>(cg: &Cgroup, f: impl FnOnce() -> R) -> R {
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let own = own.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup v2 path").trim();
    let home = crate::cgroup::cgroup2_root().join(own.trim_start_matches('/'));
    let move_to = |dir: &std::path::Path| {
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .unwrap_or_else(|e| panic!("moving into {}: {e}", dir.display()))
    };
    move_to(&cg.path);
    let r = f();
    move_to(&home);
    r
}

/// A device in the quiet namespace routing the pods' addresses, removed on drop: one end of a
/// veth pair whose other end stays down, so what is sent is dropped at once (this kernel has
/// no dummy devices), to a neighbour entry of its own (no ARP). None routes the ClusterIP: a
/// call the hook left untranslated fails.
struct Device;

const PEER: &str = "lbbench1";

impl Device {
    fn new() -> Self {
        let ip = |args: &[&str]| {
            let ok =
                std::process::Command::new("ip").args(args).status().is_ok_and(|s| s.success());
            assert!(ok, "ip {}", args.join(" "));
        };
        Self::remove();
        ip(&["link", "add", DEVICE, "type", "veth", "peer", "name", PEER]);
        ip(&["addr", "add", "10.1.0.1/16", "dev", DEVICE]);
        ip(&["link", "set", DEVICE, "up"]);
        ip(&["neigh", "replace", &POD.to_string(), "lladdr", "02:00:00:00:00:05", "dev", DEVICE]);
        Device
    }

    fn remove() {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", DEVICE])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        Self::remove();
    }
}
