//! Benchmarks that print figures (never asserted): `lb-bench control-plane | datapath`.
//! Run through `cargo xtask bench ...` (release build, root).

use std::time::{Duration, Instant};

use lb_agent::{
    config::ModelConfig,
    dataplane::{
        loader::{self, LoadOptions, MapSizes},
        store::KernelStore,
        writer::{Writer, WriterConfig},
    },
    model::maglev,
    sources::{Event, Object},
    sync::Syncer,
};
use lb_tests::{
    numbered::{self, service, slice},
    plans::Rng,
};

fn main() {
    let what = std::env::args().nth(1).unwrap_or_default();
    match what.as_str() {
        "control-plane" => control_plane(),
        "manifests" => manifests_reread(10_000, 10),
        "conntrack" => {
            conntrack_sweep();
            lb_tests::bench::first_packet_after_sweep();
            lb_tests::bench::first_packet_by_map_size();
            udp_socket_flush();
        }
        "datapath" => datapath(),
        "sock" => lb_tests::bench_sock::run(),
        "profile" => lb_tests::bench::profile(
            &std::env::args().nth(2).unwrap_or_default(),
            std::env::args().nth(3).and_then(|s| s.parse().ok()).unwrap_or(10),
        ),
        "e2e" => e2e(),
        _ => {
            eprintln!(
                "usage: lb-bench control-plane | manifests | conntrack | datapath | sock | e2e [--svg PATH] | profile PATH SECS"
            );
            std::process::exit(2);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A memory figure of this process from /proc/self/status, in MB.
fn status_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn control_plane() {
    const SERVICES: usize = 10_000;
    const ENDPOINTS: usize = 10;
    const CHANGES: usize = 1_000;
    let m = maglev::table_size(ENDPOINTS, maglev::DEFAULT_MAX_SIZE);
    let sizes = MapSizes {
        max_services: 16_384,
        max_frontends: 32_768,
        max_backends: 131_072,
        // Room for every table plus a quarter for tables being resized.
        maglev_slots: (SERVICES as u32 + 64) * m * 5 / 4,
        max_conntrack: 65_536,
    };
    println!(
        "control-plane bench: {SERVICES} services x {ENDPOINTS} endpoints (ClusterIP, Maglev M={m}), then {CHANGES} single-endpoint changes"
    );
    println!(
        "machine: {} CPUs, kernel {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        kernel()
    );
    let ebpf =
        loader::load(&LoadOptions { bpffs: None, sizes }).expect("load the datapath (root?)");
    let writer = Writer::new(
        KernelStore::new(&ebpf).unwrap(),
        WriterConfig {
            maglev_max_size: maglev::DEFAULT_MAX_SIZE,
            max_services: sizes.max_services,
            answer_service_pings: true,
        },
    )
    .unwrap();
    let mut syncer = Syncer::new(ModelConfig::new("node-0"), writer);

    let mut ready: Vec<Vec<bool>> = vec![vec![true; ENDPOINTS]; SERVICES];
    // Objects arrive in list pages of 500, as from the API server.
    let t = Instant::now();
    let (mut entries_written, mut slots_written) = (0, 0);
    for page in (0..SERVICES).collect::<Vec<_>>().chunks(500) {
        let events: Vec<Event> = page
            .iter()
            .flat_map(|&i| {
                [
                    Event::Apply(Object::Service(service(i))),
                    Event::Apply(Object::EndpointSlice(slice(i, &ready[i]))),
                ]
            })
            .collect();
        let report = syncer.apply(events);
        assert!(report.errors.is_empty(), "{:?}", &report.errors[..report.errors.len().min(5)]);
        entries_written += report.writes.entries();
        slots_written += report.writes.maglev_slots;
    }
    syncer.finish_initial_sync().unwrap();
    let full = t.elapsed();
    println!(
        "full programming: {:.0} ms for {} service ports ({entries_written} entries, {slots_written} Maglev slots)",
        full.as_secs_f64() * 1e3,
        syncer.writer.port_count(),
    );

    let mut rng = Rng::new(42);
    let mut times = Vec::with_capacity(CHANGES);
    let mut entries = Vec::with_capacity(CHANGES);
    let mut slots = 0u64;
    for _ in 0..CHANGES {
        let i = rng.below(SERVICES as u64) as usize;
        let e = rng.below(ENDPOINTS as u64) as usize;
        // Flip one endpoint's readiness, keeping at least 9 ready (the table size stays).
        if ready[i].iter().filter(|r| **r).count() < ENDPOINTS && ready[i][e] {
            ready[i] = vec![true; ENDPOINTS];
        } else {
            ready[i][e] = !ready[i][e];
        }
        let ev = Event::Apply(Object::EndpointSlice(slice(i, &ready[i])));
        let t = Instant::now();
        let r = syncer.apply([ev]);
        times.push(t.elapsed());
        entries.push(r.writes.entries());
        slots += r.writes.maglev_slots;
    }
    times.sort();
    entries.sort();
    println!(
        "endpoint change, event to maps written: p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        percentile(&times, 0.5).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6,
        times.last().unwrap().as_secs_f64() * 1e6
    );
    println!(
        "map writes per change (excluding Maglev slots): p50 {}, max {}; Maglev slots moved per change: mean {:.0} (share of one backend: {})",
        entries[entries.len() / 2],
        entries.last().unwrap(),
        slots as f64 / CHANGES as f64,
        m as usize / ENDPOINTS
    );
    println!(
        "memory: peak RSS {:.0} MB, of which now {:.0} MB is the agent's own heap (RssAnon) and {:.0} MB kernel map pages it maps (RssFile + RssShmem)",
        status_mb("VmHWM:"),
        status_mb("RssAnon:"),
        status_mb("RssFile:") + status_mb("RssShmem:")
    );
    println!("targets: full < 2000 ms, p99 < 5000 us, < 5 writes per change, RSS < 150 MB");
    manifests_reread(SERVICES, ENDPOINTS);
    conntrack_sweep();
    lb_tests::bench::first_packet_after_sweep();
    lb_tests::bench::first_packet_by_map_size();
    udp_socket_flush();
}

/// The agent's conntrack sweep on a full map of the default size, half of its flows ended:
/// reading it in batches against aya's one-by-one iteration (same map, alternating), then
/// sweeps that remove the ended half and find nothing.
fn conntrack_sweep() {
    use aya::maps::{HashMap, Map, MapData};
    use lb_agent::dataplane::{batch, conntrack_gc};
    use lb_common::{CtKey, CtValue};

    let n = lb_common::DEFAULT_MAX_CONNTRACK;
    let sizes = MapSizes {
        max_services: 64,
        max_frontends: 64,
        max_backends: 64,
        maglev_slots: 1 << 16,
        max_conntrack: n,
    };
    let mut ebpf =
        loader::load(&LoadOptions { bpffs: None, sizes }).expect("load the datapath (root?)");
    lb_tests::bench::fill_conntrack_half_ended(&mut ebpf);
    let Some(Map::LruHashMap(map)) = ebpf.map(lb_common::MAP_CONNTRACK) else { unreachable!() };
    let (mut batched, mut one_by_one) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        let read = batch::for_each_chunk::<CtKey, CtValue>(map, |_, _| Ok(())).unwrap();
        batched.push(t.elapsed());
        assert_eq!(read, n as u64);
        let t = Instant::now();
        let ct: HashMap<&MapData, CtKey, CtValue> =
            HashMap::try_from(ebpf.map(lb_common::MAP_CONNTRACK).unwrap()).unwrap();
        let read = ct.iter().filter(|r| r.is_ok()).count();
        one_by_one.push(t.elapsed());
        assert_eq!(read, n as usize);
    }
    batched.sort();
    one_by_one.sort();
    let (b, o) = (batched[1].as_secs_f64() * 1e3, one_by_one[1].as_secs_f64() * 1e3);
    println!(
        "conntrack read, {n} entries (full map, agent default size): in batches {b:.0} ms, one by one (aya) {o:.0} ms ({:.1}x faster), median of 3",
        o / b
    );
    let t = Instant::now();
    let first = conntrack_gc::sweep(map, &Default::default()).unwrap();
    let first_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let again = conntrack_gc::sweep(map, &Default::default()).unwrap();
    let again_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "conntrack sweep: {first_ms:.0} ms removing {} entries of ended flows ({} live kept); then {again_ms:.0} ms finding none to remove ({} read)",
        first.removed, first.live, again.entries
    );
}

/// The socket half of a UDP endpoint's flush (on the conntrack worker, after the sync):
/// finding candidate sockets in a full `LB_SOCK_RNAT` when none is for that endpoint (what
/// every UDP endpoint removal pays), then searching network namespaces of 10 connected UDP
/// sockets each, finding nothing and destroying one socket in each.
fn udp_socket_flush() {
    use std::{collections::HashSet, net::UdpSocket, os::fd::AsRawFd};

    use aya::maps::{HashMap, Map, MapData};
    use lb_agent::dataplane::{conntrack_gc::UdpFlush, sock_destroy, writer::UdpTarget};
    use lb_common::{SockRevNatKey, SockRevNatValue, addr_from_ip};

    let sizes = MapSizes {
        max_services: 64,
        max_frontends: 64,
        max_backends: 64,
        maglev_slots: 1 << 16,
        max_conntrack: 1024,
    };
    let mut ebpf =
        loader::load(&LoadOptions { bpffs: None, sizes }).expect("load the datapath (root?)");
    let n = lb_common::DEFAULT_MAX_SOCK_REVNAT;
    let mut revnat: HashMap<&mut MapData, SockRevNatKey, SockRevNatValue> =
        HashMap::try_from(ebpf.map_mut(lb_common::MAP_SOCK_REVNAT).unwrap()).unwrap();
    for i in 0..n {
        let addr = addr_from_ip(std::net::Ipv4Addr::from(0x0a00_0000 + (i % 4096)).into());
        let key =
            SockRevNatKey { cookie: i as u64, addr, port_be: 53u16.to_be(), ..Default::default() };
        revnat
            .insert(key, SockRevNatValue { service_id: 1 + i % 64, ..Default::default() }, 0)
            .unwrap();
    }
    let Some(Map::LruHashMap(map)) = ebpf.map(lb_common::MAP_SOCK_REVNAT) else { unreachable!() };
    let gone = UdpTarget { service_id: 1000, addr: "10.9.9.9".parse().unwrap(), port: 53 };
    let stale = UdpFlush::To(vec![gone]).stale().unwrap();
    let mut reads: Vec<Duration> = (0..3)
        .map(|_| {
            let t = Instant::now();
            assert!(sock_destroy::recorded_sockets(map, &stale).unwrap().is_empty());
            t.elapsed()
        })
        .collect();
    reads.sort();
    println!(
        "UDP flush, socket candidates: {:.0} ms to read a full LB_SOCK_RNAT ({n} entries) finding none, median of 3",
        reads[1].as_secs_f64() * 1e3
    );

    let namespaces: Vec<lb_tests::netns::NetNs> =
        (0..100).map(|_| lb_tests::netns::NetNs::new("sk")).collect();
    let mut doomed = HashSet::new();
    let mut sockets = Vec::new();
    for ns in &namespaces {
        let (socks, first) = ns.run(|| {
            let socks: Vec<UdpSocket> = (0..10)
                .map(|j| {
                    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                    s.connect(("127.0.0.1", 9000 + j)).unwrap();
                    s
                })
                .collect();
            let mut cookie = 0u64;
            let mut len = size_of::<u64>() as libc::socklen_t;
            // SAFETY: SO_COOKIE into a u64 of the length given, on our own socket.
            let rc = unsafe {
                libc::getsockopt(
                    socks[0].as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_COOKIE,
                    &mut cookie as *mut u64 as *mut libc::c_void,
                    &mut len,
                )
            };
            assert_eq!(rc, 0);
            (socks, cookie)
        });
        let addr = addr_from_ip("127.0.0.1".parse().unwrap());
        doomed.insert(SockRevNatKey {
            cookie: first,
            addr,
            port_be: 9000u16.to_be(),
            ..Default::default()
        });
        sockets.push(socks);
    }
    let paths: Vec<std::path::PathBuf> =
        namespaces.iter().map(|ns| format!("/run/netns/{}", ns.name()).into()).collect();
    let t = Instant::now();
    let none = sock_destroy::destroy_in(&paths, &HashSet::new()).unwrap();
    let search = t.elapsed();
    let t = Instant::now();
    let some = sock_destroy::destroy_in(&paths, &doomed).unwrap();
    let destroy = t.elapsed();
    assert_eq!((none.sockets, some.sockets, some.failed), (0, 100, 0), "{some:?}");
    let t = Instant::now();
    let on_this_machine = sock_destroy::network_namespaces().len();
    let listing = t.elapsed();
    println!(
        "UDP flush, socket search: 100 network namespaces of 10 connected UDP sockets each: {:.1} ms finding nothing, {:.1} ms destroying one in each ({:.0} us a namespace); listing this machine's {on_this_machine} namespaces: {:.1} ms",
        search.as_secs_f64() * 1e3,
        destroy.as_secs_f64() * 1e3,
        destroy.as_secs_f64() * 1e6 / 100.0,
        listing.as_secs_f64() * 1e3
    );
    drop(sockets);
}

/// A manifests folder holding every service and slice in one file: the first read, then a
/// re-read after one slice changed (only changed documents are parsed again).
fn manifests_reread(services: usize, endpoints: usize) {
    let dir = std::env::temp_dir().join(format!("lb-bench-manifests-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("all.yaml");
    let write = |ready: &dyn Fn(usize) -> Vec<bool>| {
        let mut text = String::new();
        for i in 0..services {
            text += &numbered::yaml(i, &ready(i));
        }
        // Replaced by rename, as the agent expects of tools.
        let tmp = dir.join("all.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write(&|_| vec![true; endpoints]);
    let mut m = lb_agent::sources::manifests::ManifestsDir::new(&dir, ModelConfig::new("node-0"))
        .with_settle(Duration::ZERO);
    let t = Instant::now();
    let first = m.poll().unwrap();
    let first_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(first.events.len(), 2 * services);
    let changed = services / 2;
    write(&|i| {
        let mut r = vec![true; endpoints];
        r[0] = i != changed;
        r
    });
    let t = Instant::now();
    let again = m.poll().unwrap();
    let again_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(again.events.len(), 1, "one slice changed");
    println!(
        "manifests folder, one file of {} documents: first read {first_ms:.0} ms; re-read after one EndpointSlice changed {again_ms:.0} ms ({:.0}x faster; {} documents reused, not parsed)",
        2 * services,
        first_ms / again_ms,
        again.documents_reused
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `lb-bench datapath [--baseline OBJECT]`: OBJECT is another build's `lb.bpf.o`, measured
/// side by side (`cargo xtask bench datapath --against REV` builds and passes it).
fn datapath() {
    let path = match (std::env::args().nth(2).as_deref(), std::env::args().nth(3)) {
        (None, _) => None,
        (Some("--baseline"), Some(path)) => Some(path),
        _ => {
            eprintln!("usage: lb-bench datapath [--baseline OBJECT]");
            std::process::exit(2);
        }
    };
    let Some(path) = path else { return lb_tests::bench::datapath(None) };
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        eprintln!("cannot read {path}: {e}");
        std::process::exit(1);
    });
    if !bytes.starts_with(b"\x7fELF") {
        eprintln!("{path} is not an ELF object (expected an lb.bpf.o)");
        std::process::exit(1);
    }
    // Copied into 8-byte aligned memory, as the ELF parser expects.
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: the u64 buffer viewed as bytes; it is at least bytes.len() long.
    let aligned =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, bytes.len()) };
    aligned.copy_from_slice(&bytes);
    lb_tests::bench::datapath(Some(aligned))
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned()
}

fn e2e() {
    use lb_tests::bench_e2e;
    // Flags are checked before the minutes-long run, not after it.
    let usage = || -> ! {
        eprintln!("usage: lb-bench e2e [--svg PATH] [--only lb|iptables|nftables]");
        std::process::exit(2);
    };
    let (mut svg_path, mut only) = (None, None);
    let mut args = std::env::args().skip(2);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--svg", Some(path)) => svg_path = Some(path),
            ("--only", Some(dp)) if matches!(dp.as_str(), "lb" | "iptables" | "nftables") => {
                only = Some(dp)
            }
            _ => usage(),
        }
    }
    println!(
        "e2e bench: new TCP connections/s (one request each, 4 concurrent clients, 3 s) through three datapaths in the same mini-cluster"
    );
    println!(
        "machine: {} CPUs, kernel {}; iptables: {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        kernel(),
        std::process::Command::new("iptables")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    );
    println!(
        "commands: lb-probe load 10.230.0.10:30080 (outside client -> NodePort) and lb-probe load 10.96.0.10:80 (pod on node-1 -> ClusterIP); rules installed with iptables-restore / nft -f in the node namespaces"
    );
    let rows = bench_e2e::run(only.as_deref());
    println!();
    print!("{}", bench_e2e::table(&rows));
    println!();
    print!("{}", bench_e2e::ratios(&rows));
    if let Some(path) = svg_path {
        let svg = bench_e2e::svg(&rows, "New TCP connections/s vs services (2 cores, one machine)");
        match std::fs::write(&path, svg) {
            Ok(()) => println!("plot written to {path}"),
            Err(e) => {
                eprintln!("cannot write {path}: {e}");
                std::process::exit(1);
            }
        }
    }
}
