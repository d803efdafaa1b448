//! Datapath benchmark: nanoseconds per packet of each path, measured as toolchain.md says
//! holds on these machines: BPF_PROG_TEST_RUN with repeat = 1 (a rewritten packet must not be
//! fed back in), many single runs from one warm process, the interquartile mean of the
//! kernel-reported durations, every verdict checked; a no-op program measured the same way in
//! the same run is the floor, and ratios are against it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_agent::{
    dataplane::{attach::XdpTx, loader::MapSizes},
    model::plan::{BackendSet, Frontend, FrontendKind, Protocol, Scope},
};
use lb_common::*;

use crate::{
    kernel::{Datapath, RunOutput},
    packets::{SCTP_DATA, SCTP_INIT, sctp4, summarize, tcp4, tcp6},
    plans::{backend, lb_plan},
    prog_lines,
    routed::RoutedNode,
};

const RUNS: usize = 20_000;
const WARMUP: usize = 2_000;
const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// First-packet rows each use their own client, so no row meets flows an earlier one created.
const XDP_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 8);
const XDP_TX_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const DSR_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const LEAST_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const XDP_LEAST_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 12);
const SUMMED_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 13);
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 11);
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 7, 0, 0, 0, 0, 7);
const XDP_CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 7, 0, 0, 0, 0, 8);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x11);
const LOCAL_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 5);
/// A pod of the node as a client (`--pod-devices` rows); it reaches the NodePort on the
/// node's address, an internal frontend.
const CLIENT_POD: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 9);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 5);

/// One way of running the measured program on a packet (one build, one context).
type Runner<'a> = Box<dyn Fn(&[u8]) -> RunOutput + 'a>;

/// The mean of the middle half of `v` (the interquartile mean): as robust to outliers (an
/// interrupt, a cold cache) as the median, but finer. This machine's kernel reports durations
/// in steps of about 10 ns, so a median moves by whole steps, where the mean of many
/// durations spread across steps resolves differences of a few ns.
pub(crate) fn interquartile_mean(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    let middle = &v[v.len() / 4..v.len() - v.len() / 4];
    middle.iter().sum::<u64>() as f64 / middle.len() as f64
}

/// Interquartile mean ns of `prog` in each datapath over packets from `make(i)`, checking each verdict
/// with `ok`. The datapaths take turns on each packet, so noise falls on all of them alike, and
/// the order turns too: whichever runs first on a new packet pays more for it.
fn measure(
    dps: &[Datapath],
    prog: &str,
    make: &mut dyn FnMut(usize) -> Vec<u8>,
    ok: &dyn Fn(i32, &[u8]) -> bool,
) -> Vec<f64> {
    measure_with(prog, &runners(dps, move |dp, p| dp.run_loaded(prog, p)), make, ok)
}

/// Rows measured in the first builds only (the others lack the path), widened to `builds`
/// figures: NaN for the builds that sat them out.
/// A row: the program, the packets it gets, and the check of each verdict and output.
type Row<'a> = (&'static str, &'a mut dyn FnMut(usize) -> Vec<u8>, &'a dyn Fn(i32, &[u8]) -> bool);

/// `rows` measured in `builds`, the leading builds that have those paths (older baselines
/// without them sit the rows out: not measured, of the `total` builds).
fn measure_in_builds(builds: &[&Datapath], total: usize, rows: Vec<Row<'_>>) -> Vec<Vec<f64>> {
    rows.into_iter()
        .map(|(prog, make, ok)| {
            let runs = runners(builds.iter().copied(), move |dp, p| dp.run_loaded(prog, p));
            let mut row = measure_with(prog, &runs, make, ok);
            row.resize(total, f64::NAN);
            row
        })
        .collect()
}

/// One runner per datapath, each running `run` on its own datapath.
fn runners<'a>(
    dps: impl IntoIterator<Item = &'a Datapath>,
    run: impl Fn(&'a Datapath, &[u8]) -> RunOutput + Copy + 'a,
) -> Vec<Runner<'a>> {
    dps.into_iter().map(|dp| Box::new(move |p: &[u8]| run(dp, p)) as Runner<'a>).collect()
}

/// [`measure`] with the way of running the program given (a context, another namespace).
fn measure_with(
    prog: &str,
    runs: &[Runner<'_>],
    make: &mut dyn FnMut(usize) -> Vec<u8>,
    ok: &dyn Fn(i32, &[u8]) -> bool,
) -> Vec<f64> {
    let mut times = vec![Vec::with_capacity(RUNS); runs.len()];
    for i in 0..WARMUP + RUNS {
        let p = make(i);
        for k in 0..runs.len() {
            let b = (i + k) % runs.len();
            let out = runs[b](&p);
            assert!(
                ok(out.verdict, &out.packet),
                "{prog}: unexpected verdict {} on run {i}",
                out.verdict
            );
            if i >= WARMUP {
                times[b].push(out.duration_ns);
            }
        }
    }
    times.into_iter().map(interquartile_mean).collect()
}

/// A datapath with `n` services: the measured NodePort (local and remote backend) plus
/// LoadBalancer VIPs that fill the maps.
/// `object`: another build of the kernel programs instead of this one's.
pub(crate) fn datapath_with(n: usize, object: Option<&[u8]>) -> Datapath {
    datapath_sized(n, object, 1 << 20)
}

/// [`datapath_with`] with a conntrack map of `max_conntrack` entries.
fn datapath_sized(n: usize, object: Option<&[u8]>, max_conntrack: u32) -> Datapath {
    let sizes = MapSizes {
        max_services: (n as u32 + 16).next_power_of_two(),
        max_frontends: (4 * n as u32 + 64).next_power_of_two(),
        max_backends: (n as u32 + 256).next_power_of_two(),
        maglev_slots: (n as u32 + 16) * 256 + 8192 * 2,
        max_conntrack,
    };
    let mut dp = match object {
        Some(object) => Datapath::load_object(sizes, object),
        None => Datapath::load_with(sizes),
    };
    // Verified now, not inside the first timed run.
    dp.load_programs();
    dp.set_node(Some(NODE.into()), Some(NODE6.into()));
    let nodeport_of = |addr: IpAddr,
                       name: &str,
                       port: u16,
                       protocol,
                       backends: Vec<lb_agent::model::plan::Backend>| {
        let mut p = lb_plan(name, addr, port, protocol, backends);
        for f in &mut p.frontends {
            f.kind = FrontendKind::NodePort;
        }
        p
    };
    let nodeport_at = |addr: IpAddr, name: &str, port: u16, backends| {
        nodeport_of(addr, name, port, Protocol::Tcp, backends)
    };
    let nodeport = |name: &str, port, backends| nodeport_at(NODE.into(), name, port, backends);
    let nodeport6 = |name: &str, port, backends| nodeport_at(NODE6.into(), name, port, backends);
    dp.program(
        "np-local",
        &[nodeport("np-local", 30080, vec![backend(LOCAL_POD.into(), 8080, true)])],
    );
    let local = vec![backend(LOCAL_POD.into(), 8080, true)];
    dp.program("np-sctp", &[nodeport_of(NODE.into(), "np-sctp", 30082, Protocol::Sctp, local)]);
    let np6 = nodeport6("np-local6", 30080, vec![backend(LOCAL_POD6.into(), 8080, true)]);
    dp.program("np-local6", &[np6]);
    // Enough remote backends that tens of thousands of new SNATed flows find free ports (4536
    // per backend).
    let remote =
        (1..=64).map(|i| backend(Ipv4Addr::new(10, 1, 1, i).into(), 8080, false)).collect();
    dp.program("np-remote", &[nodeport("np-remote", 30081, remote)]);
    for i in 0..n.saturating_sub(2) {
        let vip = IpAddr::V4(Ipv4Addr::new(100, 64 + (i >> 16) as u8, (i >> 8) as u8, i as u8));
        let mut p = lb_plan(
            &format!("svc-{i}"),
            vip,
            80,
            Protocol::Tcp,
            vec![backend(Ipv4Addr::new(10, 2, (i >> 8) as u8, i as u8).into(), 8080, true)],
        );
        p.frontends = vec![Frontend {
            kind: FrontendKind::LoadBalancer,
            address: vip,
            port: 80,
            scope: Scope::External,
            backends: BackendSet::External,
        }];
        dp.program(&format!("svc-{i}"), &[p]);
    }
    dp
}

/// First packets of flows by direct server return (`--lb-mode hybrid`, on for this row alone)
/// to a remote backend, measured as the SNAT row before it is (no route here: not sent on):
/// this build only (the mode's bit means something else to older ones), NaN for the others.
fn dsr_first_packets(dps: &[Datapath], make: &mut dyn FnMut(usize) -> Vec<u8>) -> Vec<f64> {
    // DNAT only, the option added (IHL 7).
    let with_option = |v: i32, p: &[u8]| {
        (v == 0 || v == 7)
            && p.get(14).is_some_and(|b| b & 0x0f == 7)
            && summarize(p)
                .is_some_and(|s| s.dst.port() == 8080 && s.src.ip() == IpAddr::from(DSR_CLIENT))
    };
    // Builds without DSR (older baselines) sit the row out: their first packet has no option.
    let with_dsr: Vec<&Datapath> = dps
        .iter()
        .take_while(|dp| {
            set_device_modes(dp, MODE_DSR);
            let probe = tcp4(DSR_CLIENT, 999, NODE, 30081, true, b"");
            let out = dp.run_loaded(PROG_TC_INGRESS, &probe);
            with_option(out.verdict, &out.packet)
        })
        .collect();
    let rows = measure_in_builds(&with_dsr, dps.len(), vec![(PROG_TC_INGRESS, make, &with_option)]);
    for dp in dps {
        set_device_modes(dp, 0);
    }
    rows.into_iter().next().expect("one row")
}

/// Sets the device hooks' switches (`OPT_DEVICE_MODES`) of `dp`.
fn set_device_modes(dp: &Datapath, modes: u32) {
    use aya::maps::{Array, Map};
    let mut options: Array<_, u32> =
        Array::try_from(Map::Array(dp.map_handle(MAP_OPTIONS))).expect("the options map");
    options.set(OPT_DEVICE_MODES, modes, 0).expect("writing the options map");
}

/// Prints the table; with `baseline` (another build's ELF object) every path is also measured
/// in that build, interleaved with this one, and a second table gives their ratios.
pub fn datapath(baseline: Option<&[u8]>) {
    // One thread, warm, in a namespace without routes (as the kernel tests run).
    crate::kernel::in_quiet_netns(|| datapath_here(baseline))
}

fn datapath_here(baseline: Option<&[u8]>) {
    println!(
        "datapath bench: ns per packet, interquartile mean of {RUNS} single BPF_PROG_TEST_RUN runs after {WARMUP} warm-up runs (kernel-reported), every verdict checked"
    );
    println!(
        "kernel {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    );
    let sizes = [1usize, 1_000, 100_000];
    let names = [
        "xdp no-op (floor)",
        "tc no-op (floor)",
        "tc: not for a frontend",
        "tc: not for a frontend, to a frontend's port",
        "tc: first packet, local backend",
        "tc: first packet, remote backend (SNAT)",
        "tc: first packet, remote backend (DSR)",
        "tc: established packet",
        "tc egress: reply reverse NAT",
        "tc egress: not a reply (any pod's traffic)",
        "xdp: not for a frontend",
        "xdp: first packet, local backend",
        "xdp: established packet",
        "xdp: first packet, remote backend (XDP_TX)",
        "xdp: established packet, remote (XDP_TX)",
        "tc: established packet, remote (SNAT, redirect)",
        "tc: first packet, local backend, IPv6",
        "tc: established packet, IPv6",
        "xdp: first packet, local backend, IPv6",
        "xdp: established packet, IPv6",
        "pod: to another pod (not a service)",
        "pod: to another pod, on a service's port",
        "pod: first packet to a service",
        "pod: established packet",
        "to pod: reply reverse NAT",
        "tc: established packet, SCTP (CRC moved)",
        "xdp: established packet, SCTP (CRC moved)",
        "tc: least for an established packet",
        "xdp: least for an established packet",
        "tc: least for a first packet",
        "xdp: least for a first packet",
        "tc no-op, NIC-summed skb (CHECKSUM_COMPLETE)",
        "tc: first packet, local, NIC-summed skb",
        "tc: established packet, NIC-summed skb",
        "tc: established packet, verified skb (+ the marking call)",
    ];
    // XDP_TX needs a route and a known next hop on the device the packet arrives on.
    let routed = RoutedNode::new();
    let builds = if baseline.is_some() { 2 } else { 1 };
    // tables[build][row][size]
    let mut tables: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); names.len()]; builds];
    for &n in &sizes {
        eprintln!("programming {n} services ...");
        let mut dps = vec![datapath_with(n, None)];
        if let Some(object) = baseline {
            dps.push(datapath_with(n, Some(object)));
        }
        for dp in &mut dps {
            routed.xdp_tx(dp, "n0", XdpTx::On);
            dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 7, NODE, 30080, true, b""));
            dp.run(PROG_XDP_INGRESS, &tcp4(CLIENT, 8, NODE, 30080, true, b""));
            dp.run(PROG_TC_INGRESS, &tcp6(CLIENT6, 7, NODE6, 30080, true, b""));
            dp.run(PROG_XDP_INGRESS, &tcp6(CLIENT6, 8, NODE6, 30080, true, b""));
        }
        let dps = dps;
        let tc_ok = |v: i32, _: &[u8]| v == 0 || v == 7;
        let xdp_ok = |v: i32, _: &[u8]| v == 2;
        let translated = |v: i32, p: &[u8]| {
            (v == 0 || v == 7) && summarize(p).is_some_and(|s| s.dst.port() == 8080)
        };
        let xdp_translated =
            |v: i32, p: &[u8]| v == 2 && summarize(p).is_some_and(|s| s.dst.port() == 8080);
        let miss = tcp4(CLIENT, 5555, Ipv4Addr::new(10, 250, 0, 1), 443, false, b"");
        // The port filter lets this one through to both lookups (30080 is a NodePort).
        let miss_frontend_port =
            tcp4(CLIENT, 5555, Ipv4Addr::new(10, 250, 0, 1), 30080, false, b"");
        let est = tcp4(CLIENT, 7, NODE, 30080, false, b"payload");
        let reply = tcp4(LOCAL_POD, 8080, CLIENT, 7, false, b"answer");
        let outbound = tcp4(LOCAL_POD, 40000, Ipv4Addr::new(192, 0, 2, 1), 443, false, b"get");
        let xdp_est = tcp4(CLIENT, 8, NODE, 30080, false, b"payload");
        let mut rows: Vec<Vec<f64>> = vec![
            measure(&dps, PROG_BENCH_XDP_NOOP, &mut |_| miss.clone(), &xdp_ok),
            measure(&dps, PROG_BENCH_TC_NOOP, &mut |_| miss.clone(), &tc_ok),
            measure(&dps, PROG_TC_INGRESS, &mut |_| miss.clone(), &|v, p| v == 0 && *p == miss[..]),
            measure(&dps, PROG_TC_INGRESS, &mut |_| miss_frontend_port.clone(), &|v, p| {
                v == 0 && *p == miss_frontend_port[..]
            }),
            measure(&dps, PROG_TC_INGRESS, &mut syn_from(CLIENT, 30080), &translated),
            measure(&dps, PROG_TC_INGRESS, &mut syn_from(CLIENT, 30081), &translated),
            dsr_first_packets(&dps, &mut syn_from(DSR_CLIENT, 30081)),
            measure(&dps, PROG_TC_INGRESS, &mut |_| est.clone(), &translated),
            measure(&dps, PROG_TC_EGRESS, &mut |_| reply.clone(), &|v, p| {
                v == 0 && summarize(p).is_some_and(|s| s.src.port() == 30080)
            }),
            measure(&dps, PROG_TC_EGRESS, &mut |_| outbound.clone(), &|v, p| {
                v == 0 && *p == outbound[..]
            }),
            measure(&dps, PROG_XDP_INGRESS, &mut |_| miss.clone(), &xdp_ok),
            measure(
                &dps,
                PROG_XDP_INGRESS,
                &mut |i| tcp4(XDP_CLIENT, 1024 + (i % 60000) as u16, NODE, 30080, true, b""),
                &xdp_translated,
            ),
            measure(&dps, PROG_XDP_INGRESS, &mut |_| xdp_est.clone(), &xdp_translated),
        ];
        rows.extend(routed.ns.run(|| {
            let n0 = routed.n0;
            let on_n0 = runners(&dps, move |dp, p| dp.run_xdp_on_loaded(PROG_XDP_INGRESS, p, n0));
            let sent_out =
                |v: i32, p: &[u8]| v == 3 && summarize(p).is_some_and(|s| s.dst.port() == 8080);
            let est = tcp4(CLIENT, 9, NODE, 30081, false, b"payload");
            for run in &on_n0 {
                run(&tcp4(CLIENT, 9, NODE, 30081, true, b""));
            }
            // tc sends such flows on itself (bpf_redirect to the route's device), from the
            // next-hop cache.
            let tc_on_n0 =
                runners(&dps, move |dp, p| dp.run_tc_on_loaded(PROG_TC_INGRESS, p, n0, 0));
            let redirected =
                |v: i32, p: &[u8]| v == 7 && summarize(p).is_some_and(|s| s.dst.port() == 8080);
            let tc_est = tcp4(CLIENT, 10, NODE, 30081, false, b"payload");
            for run in &tc_on_n0 {
                run(&tcp4(CLIENT, 10, NODE, 30081, true, b""));
            }
            [
                measure_with(
                    PROG_XDP_INGRESS,
                    &on_n0,
                    &mut syn_from(XDP_TX_CLIENT, 30081),
                    &sent_out,
                ),
                measure_with(PROG_XDP_INGRESS, &on_n0, &mut |_| est.clone(), &sent_out),
                measure_with(PROG_TC_INGRESS, &tc_on_n0, &mut |_| tc_est.clone(), &redirected),
            ]
        }));
        let syn6 = |client: Ipv6Addr| {
            move |i: usize| tcp6(client, 1024 + (i % 60000) as u16, NODE6, 30080, true, b"")
        };
        let est6 = tcp6(CLIENT6, 7, NODE6, 30080, false, b"payload");
        let xdp_est6 = tcp6(CLIENT6, 8, NODE6, 30080, false, b"payload");
        rows.extend([
            measure(&dps, PROG_TC_INGRESS, &mut syn6(CLIENT6), &translated),
            measure(&dps, PROG_TC_INGRESS, &mut |_| est6.clone(), &translated),
            measure(&dps, PROG_XDP_INGRESS, &mut syn6(XDP_CLIENT6), &xdp_translated),
            measure(&dps, PROG_XDP_INGRESS, &mut |_| xdp_est6.clone(), &xdp_translated),
        ]);
        // Pods' devices: builds without those programs (older baselines) sit these rows out.
        let with_pods: Vec<&Datapath> =
            dps.iter().take_while(|dp| dp.ebpf.program(PROG_TC_FROM_POD).is_some()).collect();
        let direct = tcp4(CLIENT_POD, 40000, REMOTE_POD, 8080, false, b"to a pod");
        // The port filter lets this one through (30080 is a NodePort, pods' frontend too).
        let direct_frontend_port = tcp4(CLIENT_POD, 40000, REMOTE_POD, 30080, false, b"to a pod");
        let pod_est = tcp4(CLIENT_POD, 7, NODE, 30080, false, b"payload");
        let pod_reply = tcp4(LOCAL_POD, 8080, CLIENT_POD, 7, false, b"answer");
        for run in &runners(with_pods.iter().copied(), |dp, p| dp.run_loaded(PROG_TC_FROM_POD, p)) {
            run(&tcp4(CLIENT_POD, 7, NODE, 30080, true, b""));
        }
        let direct_ok = |v: i32, p: &[u8]| v == 0 && *p == direct[..];
        let direct_frontend_port_ok = |v: i32, p: &[u8]| v == 0 && *p == direct_frontend_port[..];
        let reversed =
            |v: i32, p: &[u8]| v == 0 && summarize(p).is_some_and(|s| s.src.port() == 30080);
        rows.extend(measure_in_builds(
            &with_pods,
            dps.len(),
            vec![
                (PROG_TC_FROM_POD, &mut |_| direct.clone(), &direct_ok),
                (PROG_TC_FROM_POD, &mut |_| direct_frontend_port.clone(), &direct_frontend_port_ok),
                (PROG_TC_FROM_POD, &mut syn_from(CLIENT_POD, 30080), &translated),
                (PROG_TC_FROM_POD, &mut |_| pod_est.clone(), &translated),
                (PROG_TC_TO_POD, &mut |_| pod_reply.clone(), &reversed),
            ],
        ));
        // SCTP: builds that do not translate it (older baselines) sit these rows out. Its
        // port changes (30082 -> 8080): the CRC32c arithmetic runs on every packet.
        let sctp_est = sctp4(CLIENT, 7, NODE, 30082, SCTP_DATA);
        let xdp_sctp_est = sctp4(CLIENT, 8, NODE, 30082, SCTP_DATA);
        let with_sctp: Vec<&Datapath> = dps
            .iter()
            .take_while(|dp| {
                let tc = dp.run_loaded(PROG_TC_INGRESS, &sctp4(CLIENT, 7, NODE, 30082, SCTP_INIT));
                dp.run_loaded(PROG_XDP_INGRESS, &sctp4(CLIENT, 8, NODE, 30082, SCTP_INIT));
                translated(tc.verdict, &tc.packet)
            })
            .collect();
        rows.extend(measure_in_builds(
            &with_sctp,
            dps.len(),
            vec![
                (PROG_TC_INGRESS, &mut |_| sctp_est.clone(), &translated),
                (PROG_XDP_INGRESS, &mut |_| xdp_sctp_est.clone(), &xdp_translated),
            ],
        ));
        // The least an established packet needs with this conntrack map (`bench_noop.rs`): what
        // the established rows cost beyond the least; and the least a first packet needs (a
        // local backend's two entries). Older baselines sit them out.
        let with_least = |prog: &str| -> Vec<&Datapath> {
            dps.iter().take_while(|dp| dp.ebpf.program(prog).is_some()).collect()
        };
        rows.extend(measure_in_builds(
            &with_least(PROG_BENCH_TC_LEAST_NAT),
            dps.len(),
            vec![
                (PROG_BENCH_TC_LEAST_NAT, &mut |_| est.clone(), &translated),
                (PROG_BENCH_XDP_LEAST_NAT, &mut |_| xdp_est.clone(), &xdp_translated),
            ],
        ));
        rows.extend(measure_in_builds(
            &with_least(PROG_BENCH_TC_LEAST_FIRST),
            dps.len(),
            vec![
                (PROG_BENCH_TC_LEAST_FIRST, &mut syn_from(LEAST_CLIENT, 30080), &translated),
                (
                    PROG_BENCH_XDP_LEAST_FIRST,
                    &mut syn_from(XDP_LEAST_CLIENT, 30080),
                    &xdp_translated,
                ),
            ],
        ));
        // The same paths for an skb a NIC summed (CHECKSUM_COMPLETE), whose sum the in-place
        // update moves (`rewrite::csum_in_place`); the other rows' skbs are CHECKSUM_NONE. The
        // kernel sums the packet before the timed run and checks the program kept the sum
        // right after it.
        let summed = |prog: &'static str| {
            runners(&dps, move |dp, p| {
                dp.run_checksum_complete_loaded(prog, p)
                    .unwrap_or_else(|e| panic!("{prog}, CHECKSUM_COMPLETE: {e}"))
            })
        };
        rows.extend([
            measure_with(
                PROG_BENCH_TC_NOOP,
                &summed(PROG_BENCH_TC_NOOP),
                &mut |_| miss.clone(),
                &tc_ok,
            ),
            measure_with(
                PROG_TC_INGRESS,
                &summed(PROG_TC_INGRESS),
                &mut syn_from(SUMMED_CLIENT, 30080),
                &translated,
            ),
            measure_with(
                PROG_TC_INGRESS,
                &summed(PROG_TC_INGRESS),
                &mut |_| est.clone(),
                &translated,
            ),
        ]);
        // On an skb its device verified (CHECKSUM_UNNECESSARY): tc ingress after one helper
        // call that marks the test run's skb so (`bench_tc_ingress_verified`), counted in.
        // Older baselines sit it out.
        rows.extend(measure_in_builds(
            &with_least(PROG_BENCH_TC_INGRESS_VERIFIED),
            dps.len(),
            vec![(PROG_BENCH_TC_INGRESS_VERIFIED, &mut |_| est.clone(), &translated)],
        ));
        for (r, per_build) in rows.into_iter().enumerate() {
            for (b, v) in per_build.into_iter().enumerate() {
                tables[b][r].push(v);
            }
        }
    }
    let table = &tables[0];
    println!(
        "\n{:<42} {:>16} {:>16} {:>16}",
        "path", "1 service", "1,000 services", "100,000 services"
    );
    for (i, name) in names.iter().enumerate() {
        let floor = |k: usize| if name.starts_with("xdp") { table[0][k] } else { table[1][k] };
        let cells: Vec<String> = (0..sizes.len())
            .map(|k| {
                if i < 2 {
                    format!("{:.0} ns", table[i][k])
                } else {
                    format!("{:.0} ns {:>4.1}x", table[i][k], table[i][k] / floor(k))
                }
            })
            .collect();
        println!("{:<42} {:>16} {:>16} {:>16}", name, cells[0], cells[1], cells[2]);
    }
    let row = |name: &str| names.iter().position(|n| *n == name).expect("a row of the table");
    let (est, first) = (row("tc: established packet"), row("tc: first packet, local backend"));
    println!(
        "\ntc established at 100,000 vs 1 service: {:.2}x; first packet (local): {:.2}x",
        table[est][2] / table[est][0],
        table[first][2] / table[first][0]
    );
    println!(
        "targets: established within 2.3x of the floor, first packet within 5x, 100,000 services within 10% of 1 service"
    );
    // What the datapath costs beyond the least the same conntrack map needs, at each size.
    let beyond = |path: &str, least: &str| {
        let r: Vec<String> = (0..sizes.len())
            .map(|k| format!("{:.2}", table[row(path)][k] / table[row(least)][k]))
            .collect();
        format!("{}x", r.join("/"))
    };
    println!(
        "against the least (1/1,000/100,000 services): tc established {}, xdp established {}, tc first packet {}, xdp first packet {}",
        beyond("tc: established packet", "tc: least for an established packet"),
        beyond("xdp: established packet", "xdp: least for an established packet"),
        beyond("tc: first packet, local backend", "tc: least for a first packet"),
        beyond("xdp: first packet, local backend", "xdp: least for a first packet"),
    );
    if let Some(base) = tables.get(1) {
        println!(
            "\nthis build vs the baseline, same run, interleaved packet by packet (ns, ratio < 1 is faster)"
        );
        println!(
            "{:<42} {:>20} {:>20} {:>20}",
            "path", "1 service", "1,000 services", "100,000 services"
        );
        for (i, name) in names.iter().enumerate() {
            let cells: Vec<String> = (0..sizes.len())
                .map(|k| {
                    let (new, old) = (table[i][k], base[i][k]);
                    if old.is_nan() {
                        return format!("{new:.0}/-   (none)");
                    }
                    format!("{new:.0}/{old:.0} {:>5.2}x", new / old)
                })
                .collect();
            println!("{:<42} {:>20} {:>20} {:>20}", name, cells[0], cells[1], cells[2]);
        }
        println!(
            "(two loads of one build, compared this way, agree within 3% on established rows but differ by up to 10% on first-packet rows: those touch the cold memory of a 1M-entry conntrack map, placed differently per load)"
        );
    }
    crate::bench_sock::socket_hooks(&[1, 100_000]);
}

/// Runs one path over and over for `secs`, for a profiler attached to this process
/// (`perf record -p`): `lb-bench profile tc-miss|tc-first|tc-est|tc-est6|tc-reply|xdp-est SECS`.
/// Fills a conntrack map to the brim with NodePort flows (forward and reply entry each) of
/// clients in 198.18.0.0/15: every other one live, the others ended a minute ago (closing: 10 s
/// to live), as a busy node's map looks without a sweep.
pub fn fill_conntrack_half_ended(ebpf: &mut aya::Ebpf) {
    use aya::maps::{HashMap, Map, MapData};
    let Some(Map::LruHashMap(data)) = ebpf.map_mut(MAP_CONNTRACK) else { panic!("no LB_CT") };
    let size = data.info().expect("map info").max_entries();
    let mut ct: HashMap<&mut MapData, CtKey, CtValue> =
        HashMap::try_from(ebpf.map_mut(MAP_CONNTRACK).expect("conntrack map")).expect("map type");
    let (now, a_minute_ago) = (crate::kernel::coarse_now_ns(), crate::kernel::secs_ago_ns(60));
    for i in 0..size / 2 {
        let client = Ipv4Addr::from(0xc612_0000 + (i >> 14));
        let sport = 1024 + (i & 0x3fff) as u16;
        let (state, last_seen_ns) =
            if i % 2 == 0 { (CT_STATE_ESTABLISHED, now) } else { (CT_STATE_CLOSING, a_minute_ago) };
        let forward = CtValue {
            last_seen_ns,
            new_saddr: addr_from_ip(client.into()),
            new_daddr: addr_from_ip(LOCAL_POD.into()),
            new_sport_be: sport.to_be(),
            new_dport_be: 8080u16.to_be(),
            state,
            ..Default::default()
        };
        let key = CtKey {
            saddr: forward.new_saddr,
            daddr: addr_from_ip(NODE.into()),
            sport_be: sport.to_be(),
            dport_be: 30080u16.to_be(),
            proto: PROTO_TCP,
            ..Default::default()
        };
        let reply = CtValue {
            new_saddr: key.daddr,
            new_daddr: key.saddr,
            new_sport_be: key.dport_be,
            new_dport_be: key.sport_be,
            flags: CT_F_REPLY,
            ..forward
        };
        ct.insert(key, forward, 0).expect("fill conntrack");
        ct.insert(forward.pair_key(PROTO_TCP), reply, 0).expect("fill conntrack");
    }
}

/// What the agent's conntrack sweep buys new flows: first packets (tc, local backend) into a
/// conntrack map of the agent's default size that is full, half of it ended flows, measured
/// against the same map after a sweep removed those (packet by packet, alternating). Without
/// the sweep every new flow's two inserts make the LRU evict; after it they take free entries.
pub fn first_packet_after_sweep() {
    crate::kernel::in_quiet_netns(first_packet_after_sweep_here)
}

fn first_packet_after_sweep_here() {
    let size = DEFAULT_MAX_CONNTRACK;
    let mut dps = [datapath_sized(1, None, size), datapath_sized(1, None, size)];
    for dp in &mut dps {
        fill_conntrack_half_ended(&mut dp.ebpf);
    }
    let swept = dps[1].sweep_conntrack();
    let translated =
        |v: i32, p: &[u8]| v == 0 && summarize(p).is_some_and(|s| s.dst.port() == 8080);
    let t = measure(
        &dps,
        PROG_TC_INGRESS,
        &mut |i| tcp4(CLIENT, 1024 + (i % 60000) as u16, NODE, 30080, true, b""),
        &translated,
    );
    println!(
        "first packet (tc, local backend), conntrack map of {size} entries full, half of them ended flows: {:.0} ns; after the sweep removed those {} entries: {:.0} ns ({:.2}x)",
        t[0],
        swept.removed,
        t[1],
        t[1] / t[0]
    );
}

/// What the conntrack map's size costs new flows: first packets (tc, local backend) through
/// the datapath and through the least program (`bench_tc_least_first`), into maps of 65,536
/// entries, the agent's default and 1,048,576, measured packet by packet side by side. No map
/// fills (a row inserts 44,000 entries into maps of its own).
pub fn first_packet_by_map_size() {
    crate::kernel::in_quiet_netns(first_packet_by_map_size_here)
}

fn first_packet_by_map_size_here() {
    let sizes = [1 << 16, DEFAULT_MAX_CONNTRACK, 1 << 20];
    let translated =
        |v: i32, p: &[u8]| (v == 0 || v == 7) && summarize(p).is_some_and(|s| s.dst.port() == 8080);
    for (what, prog) in
        [("datapath", PROG_TC_INGRESS), ("least program", PROG_BENCH_TC_LEAST_FIRST)]
    {
        // Fresh maps for each row: the other's entries would fill the smallest.
        let dps = sizes.map(|size| datapath_sized(1, None, size));
        let t = measure(&dps, prog, &mut syn_from(CLIENT, 30080), &translated);
        let cells: Vec<String> = sizes
            .iter()
            .zip(&t)
            .map(|(size, ns)| format!("{size} entries {ns:.0} ns ({:.2}x)", ns / t[0]))
            .collect();
        println!(
            "first packet (tc, local backend), {what}, by conntrack map size: {}",
            cells.join(", ")
        );
    }
}

/// First packets of new flows from `client` to the node's `port`: a new source port each.
fn syn_from(client: Ipv4Addr, port: u16) -> impl FnMut(usize) -> Vec<u8> {
    move |i: usize| tcp4(client, 1024 + (i % 60000) as u16, NODE, port, true, b"")
}

/// `lb-bench profile PATH SECS`: runs one path's packets through its program for SECS
/// seconds, for `perf` to watch (its pid is printed), and prints the mean time; with `perf`
/// installed, also where the program's own time went, by source line ([`prog_lines`]).
pub fn profile(path: &str, secs: u64) {
    crate::kernel::in_quiet_netns(|| profile_here(path, secs))
}

/// The paths `lb-bench profile` runs: name, program, and what it was given.
const PROFILE_PATHS: &[(&str, &str, &str)] = &[
    ("tc-miss", PROG_TC_INGRESS, "a packet to no frontend"),
    ("tc-first", PROG_TC_INGRESS, "a new flow's first packet, every packet"),
    ("tc-est", PROG_TC_INGRESS, "an established flow's packet (NodePort, local backend)"),
    ("tc-est-verified", PROG_BENCH_TC_INGRESS_VERIFIED, "tc-est's packet, verified by its device"),
    ("tc-est6", PROG_TC_INGRESS, "the same over IPv6"),
    ("tc-reply", PROG_TC_EGRESS, "the local backend's reply"),
    ("xdp-est", PROG_XDP_INGRESS, "an established flow's packet"),
    ("tc-least", PROG_BENCH_TC_LEAST_NAT, "tc-est's packet, the least it needs (bench_noop.rs)"),
    ("xdp-least", PROG_BENCH_XDP_LEAST_NAT, "xdp-est's packet, the least it needs"),
];

fn profile_here(path: &str, secs: u64) {
    let Some(&(_, prog, _)) = PROFILE_PATHS.iter().find(|(name, ..)| *name == path) else {
        eprintln!("usage: lb-bench profile PATH SECS, PATH one of:");
        for (name, prog, what) in PROFILE_PATHS {
            eprintln!("  {name:16} {prog}: {what}");
        }
        std::process::exit(2);
    };
    let mut dp = datapath_with(1, None);
    // The flows the established paths' packets belong to.
    dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 7, NODE, 30080, true, b""));
    dp.run(PROG_XDP_INGRESS, &tcp4(CLIENT, 8, NODE, 30080, true, b""));
    dp.run(PROG_TC_INGRESS, &tcp6(CLIENT6, 7, NODE6, 30080, true, b""));
    let miss = tcp4(CLIENT, 5555, Ipv4Addr::new(10, 250, 0, 1), 443, false, b"");
    let make: Box<dyn Fn(usize) -> Vec<u8>> = match path {
        "tc-miss" => Box::new(move |_| miss.clone()),
        // Every packet a new flow: clients from 198.18.0.0/15, ports 1024-61023.
        "tc-first" => Box::new(|i| {
            let client =
                Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (i / 60000) as u32);
            tcp4(client, 1024 + (i % 60000) as u16, NODE, 30080, true, b"")
        }),
        "tc-est6" => Box::new(|_| tcp6(CLIENT6, 7, NODE6, 30080, false, b"payload")),
        "tc-reply" => Box::new(|_| tcp4(LOCAL_POD, 8080, CLIENT, 7, false, b"answer")),
        "xdp-est" | "xdp-least" => Box::new(|_| tcp4(CLIENT, 8, NODE, 30080, false, b"payload")),
        _ => Box::new(|_| tcp4(CLIENT, 7, NODE, 30080, false, b"payload")),
    };
    let data = std::env::temp_dir().join(format!("lb-bench-profile-{}.data", std::process::id()));
    let recording = prog_lines::LineMap::of(dp.program_fd(prog))
        .and_then(|map| Ok((map, prog_lines::Recording::start(&data)?)));
    eprintln!("pid {}: running {path} ({prog}) for {secs} s", std::process::id());
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let (mut i, mut times) = (0, Vec::new());
    while std::time::Instant::now() < end {
        let out = dp.run(prog, &make(i));
        times.push(out.duration_ns);
        i += 1;
    }
    println!("{path}: {i} runs, interquartile mean {:.0} ns", interquartile_mean(times));
    let profiled = recording.and_then(|(map, recording)| Ok((map, recording.finish()?)));
    let (map, chains) = match profiled {
        Ok(profiled) => profiled,
        Err(e) => return println!("no profile by source line: {e:#}"),
    };
    let shares = prog_lines::shares(&map, &chains);
    let own: f64 = shares.functions.iter().map(|(share, _)| share).sum();
    println!(
        "{prog}: {} of {} samples on all CPUs were in it or in a kernel function it called \
         ({own:.0}% in its own code); by function, then the kernel functions it called:",
        shares.total,
        chains.len()
    );
    for (share, function) in shares.functions.iter().chain(shares.callees.iter().take(12)) {
        println!("{share:5.1}%  {function}");
    }
    println!("its own code by function and source line (a line's cost often shows on the next):");
    for (share, line) in shares.lines.iter().take(25) {
        println!("{share:5.1}%  {line}");
    }
}
