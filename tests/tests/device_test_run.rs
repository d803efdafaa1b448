//! Parsing in the device hooks (tc ingress and XDP) on crafted packets (BPF_PROG_TEST_RUN):
//! which counter moved, the verdict, and the bytes that came out: a packet to a frontend is
//! translated to its (local) backend with valid checksums however its headers are laid out;
//! every other packet passes byte for byte unchanged. Every case runs through both programs.
//! Cases are data: adding one needs no code. Random and mutated packets also go through the
//! egress hooks and pods' devices' programs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_agent::model::plan::Protocol;
use lb_common::*;
use lb_tests::{
    addrs::{TC_ACT_REDIRECT, TC_ACT_SHOT},
    kernel::{Datapath, RunOutput, SummedRunError, stat_deltas},
    packets::*,
    plans::{Rng, backend, lb_plan, mutation_seed_and_runs},
    require_root,
};

const TC_ACT_OK: i32 = 0;
const XDP_PASS: i32 = 2;
/// (program, its packet counter, its pass verdict)
const HOOKS: [(&str, &str, i32); 2] = [
    (PROG_TC_INGRESS, "tc_ingress_packets", TC_ACT_OK),
    (PROG_XDP_INGRESS, "xdp_packets", XDP_PASS),
];
/// The hooks that start flows, pods' devices' included (`tc_from_pod` takes the same
/// frontends' internal entries: `lb_plan` has both).
const FLOW_HOOKS: [(&str, &str, i32); 3] =
    [HOOKS[0], HOOKS[1], (PROG_TC_FROM_POD, "tc_from_pod_packets", TC_ACT_OK)];
/// Every device hook.
const ALL_HOOKS: [(&str, &str, i32); 5] = [
    FLOW_HOOKS[0],
    FLOW_HOOKS[1],
    FLOW_HOOKS[2],
    (PROG_TC_EGRESS, "tc_egress_packets", TC_ACT_OK),
    (PROG_TC_TO_POD, "tc_to_pod_packets", TC_ACT_OK),
];
const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
const SVC_TCP4: &str = "tcp4";
const SVC_UDP4: &str = "udp4";
const SVC_TCP6: &str = "tcp6";
const SVC_UDP6: &str = "udp6";

struct Case {
    name: &'static str,
    packet: Vec<u8>,
    /// The counter that must move by one (besides tc_ingress_packets).
    counter: &'static str,
    /// The service whose counters must count this packet (it is translated).
    service: Option<&'static str>,
    /// The kernel (6.18) refuses to build an skb from this frame (an IP ethertype without a
    /// complete IP header), so only XDP can be tested with it there; older kernels (6.1) hand
    /// it to tc too.
    skb_refused: bool,
}

fn case(
    name: &'static str,
    packet: Vec<u8>,
    counter: &'static str,
    service: Option<&'static str>,
) -> Case {
    Case { name, packet, counter, service, skb_refused: false }
}

fn xdp_only(name: &'static str, packet: Vec<u8>) -> Case {
    Case { name, packet, counter: "malformed", service: None, skb_refused: true }
}

const BACKEND4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 5);
const BACKEND_PORT: u16 = 8080;

/// Four LoadBalancer frontends (VIP4/VIP6 x TCP/UDP port 80), each with one local backend, and
/// a ClusterIP-only port 8080 on VIP4 (internal scope: invisible to device hooks).
fn datapath_with_services() -> Datapath {
    let mut dp = Datapath::load();
    for (name, ip, proto) in [
        ("tcp4", IpAddr::V4(VIP4), Protocol::Tcp),
        ("udp4", IpAddr::V4(VIP4), Protocol::Udp),
        ("tcp6", IpAddr::V6(VIP6), Protocol::Tcp),
        ("udp6", IpAddr::V6(VIP6), Protocol::Udp),
        ("sctp4", IpAddr::V4(VIP4), Protocol::Sctp),
        ("sctp6", IpAddr::V6(VIP6), Protocol::Sctp),
    ] {
        let b: IpAddr = if ip.is_ipv4() { BACKEND4.into() } else { BACKEND6.into() };
        dp.program(name, &[lb_plan(name, ip, 80, proto, vec![backend(b, BACKEND_PORT, true)])]);
    }
    let internal =
        lb_tests::plans::simple_plan("internal", VIP4.into(), CLIENT4.into(), 30001, vec![]);
    let mut internal = internal;
    internal.frontends.retain(|f| f.kind == lb_agent::model::plan::FrontendKind::ClusterIP);
    internal.frontends[0].port = 8080;
    dp.program("internal", &[internal]);
    dp
}

fn cases() -> Vec<Case> {
    let tcp4_syn = tcp4(CLIENT4, 40000, VIP4, 80, true, b"");
    let udp4_q = udp4(CLIENT4, 40000, VIP4, 80, b"query");
    let tcp6_syn = tcp6(CLIENT6, 40000, VIP6, 80, true, b"");
    let udp6_q = udp6(CLIENT6, 40000, VIP6, 80, b"query");
    vec![
        // Frontends.
        case("ipv4 tcp syn to frontend", tcp4_syn.clone(), "service_hit", Some(SVC_TCP4)),
        case(
            "ipv4 tcp data to frontend",
            tcp4(CLIENT4, 40000, VIP4, 80, false, b"GET /"),
            "service_hit",
            Some(SVC_TCP4),
        ),
        case("ipv4 udp to frontend", udp4_q.clone(), "service_hit", Some(SVC_UDP4)),
        case(
            "ipv4 sctp init to frontend",
            sctp4(CLIENT4, 40000, VIP4, 80, SCTP_INIT),
            "service_hit",
            Some("sctp4"),
        ),
        case(
            "ipv6 sctp data to frontend",
            sctp6(CLIENT6, 40000, VIP6, 80, SCTP_DATA),
            "service_hit",
            Some("sctp6"),
        ),
        // Its network header says the SCTP packet is shorter than its own header.
        case(
            "ipv4 sctp shorter than declared",
            with_ipv4_byte(
                &with_ipv4_byte(&sctp4(CLIENT4, 40000, VIP4, 80, SCTP_INIT), 2, 0),
                3,
                28,
            ),
            "malformed",
            None,
        ),
        case(
            "ipv6 sctp shorter than declared",
            {
                let mut p = sctp6(CLIENT6, 40000, VIP6, 80, SCTP_DATA);
                // Payload length 12: the common header, no chunk.
                p[14 + 4..14 + 6].copy_from_slice(&12u16.to_be_bytes());
                p
            },
            "malformed",
            None,
        ),
        case(
            "ipv4 with 3 words of options",
            with_ipv4_options(&tcp4_syn, 3),
            "service_hit",
            Some(SVC_TCP4),
        ),
        case(
            "ipv4 with 10 words of options (max)",
            with_ipv4_options(&udp4_q, 10),
            "service_hit",
            Some(SVC_UDP4),
        ),
        case(
            "ipv4 first fragment",
            as_ipv4_fragment(&udp4_q, 0, true),
            "service_hit",
            Some(SVC_UDP4),
        ),
        case("ipv6 tcp syn to frontend", tcp6_syn.clone(), "service_hit", Some(SVC_TCP6)),
        case("ipv6 udp to frontend", udp6_q.clone(), "service_hit", Some(SVC_UDP6)),
        case(
            "ipv6 hop-by-hop then udp",
            with_ipv6_hop_by_hop(&udp6_q),
            "service_hit",
            Some(SVC_UDP6),
        ),
        case(
            "ipv6 first fragment",
            with_ipv6_fragment(&tcp6_syn, 0, true),
            "service_hit",
            Some(SVC_TCP6),
        ),
        case(
            "ipv6 hop-by-hop then first fragment",
            with_ipv6_hop_by_hop(&with_ipv6_fragment(&udp6_q, 0, true)),
            "service_hit",
            Some(SVC_UDP6),
        ),
        // Not frontends: untouched.
        case(
            "ipv4 tcp to other port",
            tcp4(CLIENT4, 40000, VIP4, 81, true, b""),
            "service_miss",
            None,
        ),
        case(
            "ipv4 tcp to internal-only frontend",
            tcp4(CLIENT4, 40000, VIP4, 8080, true, b""),
            "service_miss",
            None,
        ),
        case(
            "ipv4 tcp to other address",
            tcp4(CLIENT4, 40000, CLIENT4, 80, true, b""),
            "service_miss",
            None,
        ),
        case("ipv6 udp to other port", udp6(CLIENT6, 40000, VIP6, 53, b"q"), "service_miss", None),
        case("ipv4 icmp echo", icmp4_echo(CLIENT4, VIP4), "other_l4", None),
        case("ipv6 icmp echo", icmp6_echo(CLIENT6, VIP6), "other_l4", None),
        case("ipv4 unknown protocol", with_ipv4_byte(&udp4_q, 9, 47), "other_l4", None),
        // SCTP is known: a header cut short (no chunk) is malformed.
        case("ipv4 sctp cut short", with_ipv4_byte(&udp4_q, 9, 132), "malformed", None),
        case("arp", arp_request(CLIENT4, VIP4), "not_ip", None),
        case("vlan-tagged ipv4", with_vlan_tag(&tcp4_syn, 100), "not_ip", None),
        // Of datagrams whose first fragment was not seen (fragments.rs has those that were).
        case(
            "ipv4 later fragment",
            as_ipv4_fragment(&with_ipv4_id(&udp4_q, 999), 185, false),
            "fragment",
            None,
        ),
        case(
            "ipv6 later fragment",
            with_ipv6_fragment_id(&udp6_q, 185, false, 999),
            "fragment",
            None,
        ),
        // Its header says 60 bytes (and its total length 100), the frame holds 33: were its
        // datagram's first fragment translated, its addresses would be rewritten in a header
        // the kernel drops.
        case(
            "ipv4 later fragment cut inside its options",
            with_ipv4_byte(
                &with_ipv4_byte(
                    &with_ipv4_byte(
                        &as_ipv4_fragment(&with_ipv4_id(&udp4_q, 999), 185, false),
                        0,
                        0x4f,
                    ),
                    2,
                    0,
                ),
                3,
                100,
            ),
            "malformed",
            None,
        ),
        // Malformed: counted, passed to the stack (which drops them itself), never misread.
        xdp_only("ipv4 ethertype, ethernet header only", tcp4_syn[..14].to_vec()),
        xdp_only("ipv6 ethertype, ethernet header only", tcp6_syn[..14].to_vec()),
        xdp_only("ipv4 header cut at 10 bytes", tcp4_syn[..24].to_vec()),
        xdp_only("ipv6 header cut at 39 bytes", tcp6_syn[..14 + 39].to_vec()),
        case(
            "ipv4 tcp header cut at 19 bytes",
            tcp4_syn[..14 + 20 + 19].to_vec(),
            "malformed",
            None,
        ),
        case("ipv4 udp header cut at 7 bytes", udp4_q[..14 + 20 + 7].to_vec(), "malformed", None),
        case(
            "ipv4 options longer than the packet",
            with_ipv4_byte(&udp4_q[..14 + 20 + 8], 0, 0x4f),
            "malformed",
            None,
        ),
        case("ipv4 ihl below 5", with_ipv4_byte(&tcp4_syn, 0, 0x44), "malformed", None),
        case(
            "ipv4 version 6 in an ipv4 frame",
            with_ipv4_byte(&tcp4_syn, 0, 0x65),
            "malformed",
            None,
        ),
        case(
            "ipv4 total length below header",
            with_ipv4_byte(&with_ipv4_byte(&tcp4_syn, 2, 0), 3, 10),
            "malformed",
            None,
        ),
        case("ipv6 tcp header cut", tcp6_syn[..14 + 40 + 10].to_vec(), "malformed", None),
        case(
            "ipv6 extension header cut",
            with_ipv6_hop_by_hop(&udp6_q)[..14 + 40 + 1].to_vec(),
            "malformed",
            None,
        ),
        case(
            "ipv6 version 4 in an ipv6 frame",
            {
                let mut p = udp6_q.clone();
                p[14] = 0x40;
                p
            },
            "malformed",
            None,
        ),
    ]
}

#[test]
fn every_case_is_counted_once_and_translated_or_passed_unchanged() {
    require_root!();
    let mut failures = Vec::new();
    for (prog, packets_counter, pass) in HOOKS {
        // Fresh maps per hook: no conntrack entry carries over from the other program.
        let mut dp = datapath_with_services();
        for (i, c) in cases().into_iter().enumerate() {
            // A distinct client port per translated case: each is a new flow.
            let mut packet = c.packet.clone();
            let sport = 20000 + i as u16;
            if c.service.is_some()
                && let Some(s) = summarize(&packet)
            {
                packet[s.l4_off..s.l4_off + 2].copy_from_slice(&sport.to_be_bytes());
                fix_l4_checksum(&mut packet);
            }
            let before = dp.stats();
            let svc = c.service.map(|n| dp.service_id(n));
            let svc_before = svc.map(|id| dp.service_stats(id));
            let name = format!("{prog}: {}", c.name);
            let out = match dp.try_run(prog, &packet) {
                // Older kernels (6.1) hand such a frame over: then it is passed and counted
                // as any malformed packet.
                Ok(out) => out,
                Err(_) if c.skb_refused && prog == PROG_TC_INGRESS => continue,
                Err(e) => {
                    failures.push(format!("{name}: test run failed: {e}"));
                    continue;
                }
            };
            let deltas = stat_deltas(&before, &dp.stats());
            let mut expected = vec![(packets_counter, 1), (c.counter, 1)];
            if c.service.is_some() {
                expected.push(("ct_new", 1));
            }
            if out.verdict != pass {
                failures.push(format!("{name}: verdict {} (want {pass})", out.verdict));
            }
            if sorted(deltas.clone()) != sorted(expected.clone()) {
                failures.push(format!("{name}: counters moved {deltas:?}, want {expected:?}"));
            }
            match (svc, svc_before) {
                (Some(id), Some(b)) => {
                    let a = dp.service_stats(id);
                    let want = (b.packets + 1, b.bytes + packet.len() as u64);
                    if (a.packets, a.bytes) != want {
                        failures.push(format!("{name}: service counters {a:?}, want {want:?}"));
                    }
                    // Translated to the backend, the rest intact, checksums right.
                    let s_in = summarize(&packet).unwrap();
                    match summarize(&out.packet) {
                        Some(s)
                            if s.dst.port() == BACKEND_PORT
                                && (s.dst.ip() == IpAddr::from(BACKEND4)
                                    || s.dst.ip() == IpAddr::from(BACKEND6))
                                && s.src == s_in.src => {}
                        other => failures
                            .push(format!("{name}: not translated to the backend: {other:?}")),
                    }
                    if out.packet.len() != packet.len() {
                        failures.push(format!("{name}: length changed"));
                    }
                    if let Err(e) = checksums_ok(&out.packet) {
                        failures.push(format!("{name}: {e}"));
                    }
                }
                _ => {
                    if out.packet != packet {
                        failures.push(format!("{name}: packet changed"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

fn sorted(mut v: Vec<(&'static str, u64)>) -> Vec<(&'static str, u64)> {
    v.sort();
    v
}

#[test]
fn services_not_hit_keep_zero_counters() {
    require_root!();
    let mut dp = datapath_with_services();
    dp.run(PROG_TC_INGRESS, &tcp4(CLIENT4, 1, VIP4, 80, true, b""));
    let (tcp4, udp4, internal) =
        (dp.service_id(SVC_TCP4), dp.service_id(SVC_UDP4), dp.service_id("internal"));
    assert_eq!(dp.service_stats(tcp4).packets, 1);
    assert_eq!(dp.service_stats(udp4).packets, 0);
    assert_eq!(
        dp.service_stats(internal).packets,
        0,
        "internal-scope frontend counted on a device"
    );
}

#[test]
fn frames_shorter_than_ethernet_are_refused_by_the_kernel_and_count_nothing() {
    require_root!();
    let mut dp = datapath_with_services();
    let before = dp.stats();
    for len in [0usize, 1, 13] {
        let packet = vec![0u8; len];
        assert!(dp.try_run(PROG_TC_INGRESS, &packet).is_err(), "{len}-byte frame accepted");
    }
    assert_eq!(stat_deltas(&before, &dp.stats()), vec![]);
}

/// Runs `prog` on `p`: what came out and how many runs that took (below); `None` when the
/// kernel builds no skb from it (tc only: XDP must take every frame).
///
/// Odd runs (`i`) of tc programs get the skb a NIC that sums every packet hands over
/// (CHECKSUM_COMPLETE; BPF_PROG_TEST_RUN's own are CHECKSUM_NONE): whatever the program does to
/// the packet must keep that sum right, or the stack would take it for a corrupt one. But for
/// an answer of another length (an ICMP error quoting the packet): resizing the skb makes it
/// CHECKSUM_NONE, which the stack sums itself, while the test run's check compares the sum
/// whatever the state. Such a run is told apart by running the packet again as CHECKSUM_NONE
/// (two runs), whose answer must then be longer than the packet (a shorter one keeps
/// CHECKSUM_COMPLETE: the kernel's trim moves the sum, and so must the program's writes).
/// (Not for `bench_tc_ingress_verified`, which is there for its verified skbs.)
fn run_unless_refused(dp: &mut Datapath, prog: &str, p: &[u8], i: u64) -> Option<(RunOutput, u64)> {
    let plain = |dp: &mut Datapath| match dp.try_run(prog, p) {
        Ok(out) => Some(out),
        Err(_) if prog != PROG_XDP_INGRESS => None,
        Err(e) => panic!("{prog} run {i}: {e}"),
    };
    if i.is_multiple_of(2) || [PROG_XDP_INGRESS, PROG_BENCH_TC_INGRESS_VERIFIED].contains(&prog) {
        return plain(dp).map(|out| (out, 1));
    }
    match dp.run_checksum_complete(prog, p) {
        Ok(out) => Some((out, 1)),
        // Or a kernel without the flag (5.10): as CHECKSUM_NONE.
        Err(SummedRunError::Refused(_)) => plain(dp).map(|out| (out, 1)),
        Err(SummedRunError::SumLeftWrong) => {
            let out = plain(dp).expect("run again");
            // Longer (grown), or dropped this time (the ICMP allowance spent by then).
            let excused = out.packet.len() > p.len() || out.verdict == TC_ACT_SHOT;
            assert!(excused, "{prog} run {i}: CHECKSUM_COMPLETE sum left wrong: {p:02x?}");
            Some((out, 2))
        }
    }
}

#[test]
fn random_bytes_never_break_any_device_program() {
    require_root!();
    let mut dp = datapath_with_services();
    // A deterministic xorshift stream: garbage of every length, two thirds of it with an IPv4 or
    // IPv6 ethertype so that parsing goes deeper.
    let (seed, runs) = mutation_seed_and_runs(0x9e3779b97f4a7c15, 2000);
    let mut rng = Rng::new(seed);
    let mut next = || rng.next_u64();
    for (prog, packets_counter, pass) in ALL_HOOKS {
        let mut ran = 0;
        for i in 0..runs {
            let len = 14 + (next() % 120) as usize;
            let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            match i % 3 {
                0 => p[12..14].copy_from_slice(&[0x08, 0x00]),
                1 => p[12..14].copy_from_slice(&[0x86, 0xdd]),
                _ => {}
            }
            let before = dp.stats();
            let Some((out, _)) = run_unless_refused(&mut dp, prog, &p, i) else { continue };
            ran += 1;
            assert_eq!(out.verdict, pass, "{prog} run {i}");
            assert_eq!(out.packet, p, "{prog} run {i}: packet changed");
            // Counted once, and in exactly one outcome; but a packet leaving the node that
            // parses whole and is no reply has none (what every such packet pays is kept to
            // the parse): one that random bytes made a TCP, UDP or SCTP header of.
            let deltas = stat_deltas(&before, &dp.stats());
            let outcomes: Vec<_> = deltas.iter().filter(|(n, _)| *n != packets_counter).collect();
            assert!(deltas.contains(&(packets_counter, 1)), "{prog} run {i}: {deltas:?}");
            match outcomes[..] {
                [(_, 1)] => {}
                [] if [PROG_TC_EGRESS, PROG_TC_TO_POD].contains(&prog) => {
                    let s = summarize(&p);
                    assert!(
                        s.is_some_and(|s| [6, 17, 132].contains(&s.proto) && !s.later_fragment),
                        "{prog} run {i}: no outcome for {p:02x?}"
                    );
                }
                _ => panic!("{prog} run {i}: outcomes {deltas:?} for {p:02x?}"),
            }
        }
        assert!(ran > runs / 2, "{prog}: only {ran} of {runs} runs accepted");
    }
}

/// Valid packets to frontends (IPv4 and IPv6, TCP and UDP, with IPv4 options and IPv6
/// extension headers), each with one to three header bytes overwritten at random or cut short.
/// Whatever parsing makes of them: every packet lands in exactly one outcome, passes unchanged
/// or comes out translated to the backend (same length), and afterwards every conntrack entry
/// records a rewrite to a backend (forward) or back to a frontend (reply), while a clean new
/// flow is still translated (tc ingress on verified skbs too, which updates checksums in
/// place). VIP4 is also a ClusterIP: from a pod, a port mutated to one no
/// service has there is refused (an ICMP port unreachable quoting the packet, or dropped when
/// it is a reset or the ICMP allowance is spent). Parsing reads whole words at any alignment, so this walks it over
/// header layouts the crafted cases do not.
#[test]
fn mutated_frontend_packets_never_mistranslate_or_corrupt_conntrack() {
    require_root!();
    let mut dp = datapath_with_services();
    let seeds = [
        tcp4(CLIENT4, 41000, VIP4, 80, true, b""),
        udp4(CLIENT4, 41000, VIP4, 80, b"query"),
        with_ipv4_options(&tcp4(CLIENT4, 41001, VIP4, 80, false, b"data"), 2),
        tcp6(CLIENT6, 41000, VIP6, 80, true, b""),
        with_ipv6_hop_by_hop(&udp6(CLIENT6, 41000, VIP6, 80, b"query")),
        with_ipv6_fragment(&tcp6(CLIENT6, 41001, VIP6, 80, true, b""), 0, true),
        // A datagram in fragments: the first translated, the later ones by it.
        as_ipv4_fragment(&with_ipv4_id(&udp4(CLIENT4, 41002, VIP4, 80, b"big query"), 77), 0, true),
        as_ipv4_fragment(
            &with_ipv4_id(&udp4(CLIENT4, 41002, VIP4, 80, b"rest of it"), 77),
            3,
            false,
        ),
        sctp4(CLIENT4, 41003, VIP4, 80, SCTP_INIT),
        sctp6(CLIENT6, 41003, VIP6, 80, SCTP_DATA),
    ];
    let backends = [
        std::net::SocketAddr::new(BACKEND4.into(), BACKEND_PORT),
        std::net::SocketAddr::new(BACKEND6.into(), BACKEND_PORT),
    ];
    let (seed, runs) = mutation_seed_and_runs(0x2545f4914f6cdd1d, 3000);
    let mut rng = Rng::new(seed);
    let (mut translated, mut unchanged, mut refused) = (0, 0, 0);
    // And tc ingress on skbs their device verified, whose checksums it updates in place
    // (`bench_tc_ingress_verified`; its entry counts no packets of its own).
    let verified = (PROG_BENCH_TC_INGRESS_VERIFIED, "tc_ingress_packets", TC_ACT_OK);
    for (prog, packets_counter, pass) in FLOW_HOOKS.into_iter().chain([verified]) {
        let before = dp.stats();
        let mut ran = 0;
        for i in 0..runs {
            let mut p = seeds[i as usize % seeds.len()].clone();
            // Anywhere from the ethertype to the end of the transport header.
            rng.mutate(&mut p, 100);
            let Some((out, made)) = run_unless_refused(&mut dp, prog, &p, i) else { continue };
            ran += made;
            if prog == PROG_TC_FROM_POD && out.verdict != pass {
                let s = summarize(&p).unwrap_or_else(|| panic!("run {i}: refused {p:02x?}"));
                assert_eq!(s.dst.ip(), IpAddr::from(VIP4), "run {i}: refused {s:?}");
                assert!(![80, 8080].contains(&s.dst.port()), "run {i}: refused {s:?}");
                if out.verdict == TC_ACT_REDIRECT {
                    // The quote's IPv4 header checksum is recomputed (a mutation broke it).
                    let mut quoted = p.clone();
                    if quoted[12..14] == [0x08, 0x00] {
                        fix_ipv4_checksum(&mut quoted);
                    }
                    assert_port_unreachable(&out.packet, &quoted);
                } else {
                    assert_eq!(out.verdict, TC_ACT_SHOT, "run {i}: {p:02x?}");
                }
                refused += 1;
                continue;
            }
            assert_eq!(out.verdict, pass, "{prog} run {i}: {p:02x?}");
            if out.packet == p {
                unchanged += 1;
                continue;
            }
            translated += 1;
            assert_eq!(out.packet.len(), p.len(), "{prog} run {i}");
            let s = summarize(&out.packet).unwrap_or_else(|| {
                panic!("{prog} run {i}: unparsable {p:02x?} -> {:02x?}", out.packet)
            });
            if s.later_fragment {
                // Made a later fragment of the seed's datagram, whose first fragment was
                // translated: its addresses only, the rest as it came.
                assert!(backends.iter().any(|b| b.ip() == s.dst.ip()), "{prog} run {i}: {s:?}");
                assert_eq!(out.packet[s.l4_off..], p[s.l4_off..], "{prog} run {i}");
                continue;
            }
            assert!(backends.contains(&s.dst), "{prog} run {i}: translated to {}", s.dst);
            // The sums are changed, never recomputed: right ones stay right.
            if checksums_ok(&p).is_ok() {
                let sums = checksums_ok(&out.packet);
                assert!(sums.is_ok(), "{prog} run {i}: {sums:?}: {p:02x?}");
            }
        }
        let deltas = stat_deltas(&before, &dp.stats());
        // A new flow counts service_hit and ct_new: the outcome is ct_new (and one that
        // replaced an expired entry, ct_expired too: a slow machine, such as the emulated 6.1,
        // sees closing flows' 10 s run out mid-test). A refusal the ICMP allowance stopped
        // counts icmp_rate_limited too: the outcome is the refusal.
        let annotations = [packets_counter, "service_hit", "icmp_rate_limited", "ct_expired"];
        let outcomes: u64 =
            deltas.iter().filter(|(n, _)| !annotations.contains(n)).map(|(_, d)| d).sum();
        assert!(ran > runs / 2, "{prog}: only {ran} of {runs} runs accepted");
        assert_eq!(outcomes, ran, "{prog}: each packet lands in exactly one outcome: {deltas:?}");
    }
    // The mutations reach both outcomes (a test that only ever saw one would prove little).
    assert!(translated > 100 && unchanged > 100, "{translated} translated, {unchanged} unchanged");
    assert!(refused > 0, "no mutation refused from a pod");

    let vips = [addr_from_ip(VIP4.into()), addr_from_ip(VIP6.into())];
    let backend_addrs = [addr_from_ip(BACKEND4.into()), addr_from_ip(BACKEND6.into())];
    let ct = dp.conntrack();
    assert!(!ct.is_empty());
    for (k, v) in &ct {
        assert!([PROTO_TCP, PROTO_UDP, PROTO_SCTP].contains(&k.proto), "{k:?}");
        if v.flags & CT_F_REPLY == 0 {
            assert!(backend_addrs.contains(&v.new_daddr), "forward entry {k:?} -> {v:?}");
            assert_eq!(u16::from_be(v.new_dport_be), BACKEND_PORT, "{k:?} -> {v:?}");
        } else {
            assert!(vips.contains(&v.new_saddr), "reply entry {k:?} -> {v:?}");
            assert_eq!(u16::from_be(v.new_sport_be), 80, "{k:?} -> {v:?}");
        }
    }
    for (prog, _, _) in FLOW_HOOKS {
        let fresh = tcp4(CLIENT4, 42000, VIP4, 80, true, b"");
        let s = summarize(&dp.run(prog, &fresh).packet).expect("a TCP packet");
        assert_eq!(s.dst, backends[0], "{prog}: a clean new flow after the storm");
    }
}

/// Replies from the backends of established flows (TCP, UDP and SCTP, both families; from a
/// flow started on the device and from one a pod started), one to three header bytes
/// overwritten at random or cut short, through the programs that reverse them (tc egress on
/// the device, tc on the pods' devices towards the pod): each passes, unchanged or reversed to
/// the frontend's address and port with its destination and length kept (a reply's right sums
/// stay right), and conntrack keeps every flow's translation.
#[test]
fn mutated_replies_never_mistranslate_or_corrupt_conntrack() {
    require_root!();
    let mut dp = datapath_with_services();
    // Flows first: on tc ingress (device) and from a pod (pods' devices), one of each kind.
    let starts = |sport| {
        [
            tcp4(CLIENT4, sport, VIP4, 80, true, b""),
            udp4(CLIENT4, sport, VIP4, 80, b"query"),
            sctp4(CLIENT4, sport, VIP4, 80, SCTP_INIT),
            tcp6(CLIENT6, sport, VIP6, 80, true, b""),
            udp6(CLIENT6, sport, VIP6, 80, b"query"),
            sctp6(CLIENT6, sport, VIP6, 80, SCTP_INIT),
        ]
    };
    let replies = |sport| {
        [
            tcp4(BACKEND4, BACKEND_PORT, CLIENT4, sport, false, b"answer"),
            udp4(BACKEND4, BACKEND_PORT, CLIENT4, sport, b"answer"),
            sctp4(BACKEND4, BACKEND_PORT, CLIENT4, sport, SCTP_DATA),
            tcp6(BACKEND6, BACKEND_PORT, CLIENT6, sport, false, b"answer"),
            udp6(BACKEND6, BACKEND_PORT, CLIENT6, sport, b"answer"),
            sctp6(BACKEND6, BACKEND_PORT, CLIENT6, sport, SCTP_DATA),
        ]
    };
    // (the hook that starts the flow, the hook its replies take, the flows' client port)
    let legs =
        [(PROG_TC_INGRESS, PROG_TC_EGRESS, 43000), (PROG_TC_FROM_POD, PROG_TC_TO_POD, 43001)];
    for (start, _, sport) in legs {
        for p in starts(sport) {
            let s = summarize(&dp.run(start, &p).packet).expect("translated");
            assert_eq!(s.dst.port(), BACKEND_PORT, "{start}: {s:?}");
        }
    }
    let mut watch = dp.watch_conntrack();
    let first_states = dp.conntrack_sorted(true);
    assert_eq!(first_states.len(), 2 * 2 * 6, "a forward and a reply entry per flow");

    let (seed, runs) = mutation_seed_and_runs(0x6a09e667f3bcc909, 3000);
    let mut rng = Rng::new(seed);
    let (mut reversed, mut unchanged) = (0, 0);
    for (_, prog, sport) in legs {
        let seeds = replies(sport);
        for i in 0..runs {
            if i % 64 == 0 {
                watch.look(&dp);
            }
            let mut p = seeds[i as usize % seeds.len()].clone();
            rng.mutate(&mut p, 100);
            let Some((out, _)) = run_unless_refused(&mut dp, prog, &p, i) else { continue };
            assert_eq!(out.verdict, TC_ACT_OK, "{prog} run {i}: {p:02x?}");
            if out.packet == p {
                unchanged += 1;
                continue;
            }
            reversed += 1;
            assert_eq!(out.packet.len(), p.len(), "{prog} run {i}");
            let (s_in, s) = (summarize(&p), summarize(&out.packet));
            let (Some(s_in), Some(s)) = (s_in, s) else {
                panic!("{prog} run {i}: {p:02x?} -> {:02x?}", out.packet)
            };
            let vip: IpAddr = if s.src.is_ipv4() { VIP4.into() } else { VIP6.into() };
            if s.later_fragment {
                // Made a later fragment of a datagram whose first fragment (another mutation)
                // was reversed: its addresses only, the rest as it came.
                assert_eq!(s.src.ip(), vip, "{prog} run {i}: {p:02x?}");
                assert_eq!(out.packet[s.l4_off..], p[s.l4_off..], "{prog} run {i}");
                continue;
            }
            assert_eq!(s.src, std::net::SocketAddr::new(vip, 80), "{prog} run {i}: {p:02x?}");
            assert_eq!((s.dst, s.proto), (s_in.dst, s_in.proto), "{prog} run {i}");
            if checksums_ok(&p).is_ok() {
                let sums = checksums_ok(&out.packet);
                assert!(sums.is_ok(), "{prog} run {i}: {sums:?}: {p:02x?}");
            }
        }
    }
    assert!(reversed > 100 && unchanged > 100, "{reversed} reversed, {unchanged} unchanged");
    watch.check(&dp);
    // Flows a mutated reset or FIN ended would expire before the clean replies on a slow VM.
    dp.restore_conntrack(&first_states);
    for (_, prog, sport) in legs {
        let s = summarize(&dp.run(prog, &replies(sport)[0]).packet).expect("a TCP packet");
        assert_eq!(s.src, std::net::SocketAddr::new(VIP4.into(), 80), "{prog}: a clean reply");
    }
}

/// The bench's least programs (`bench_noop.rs`) rewrite an established packet as the
/// datapath does, byte for byte, checksums included: their figures measure that same work.
#[test]
fn the_benchs_least_programs_rewrite_an_established_packet_as_the_datapath_does() {
    require_root!();
    let mut dp = datapath_with_services();
    let syn = tcp4(CLIENT4, 40000, VIP4, 80, true, b"");
    dp.run(PROG_TC_INGRESS, &syn);
    let est = tcp4(CLIENT4, 40000, VIP4, 80, false, b"payload");
    let want = dp.run(PROG_TC_INGRESS, &est);
    assert_eq!(want.verdict, TC_ACT_OK);
    checksums_ok(&want.packet).unwrap();
    for prog in [PROG_BENCH_TC_LEAST_NAT, PROG_BENCH_XDP_LEAST_NAT] {
        let out = dp.run(prog, &est);
        assert_eq!(out.packet, want.packet, "{prog}");
    }
}

/// The bench's least-first programs (`bench_noop.rs`) make a new flow's two conntrack entries
/// as the datapath makes a local backend's, and rewrite its first packet the same, byte for
/// byte: their figures measure that same work. A retransmitted SYN finds the entry made.
#[test]
fn the_benchs_least_first_programs_make_a_flow_as_the_datapath_does() {
    require_root!();
    let least_backend = (Ipv4Addr::from(BENCH_LEAST_BACKEND4), BENCH_LEAST_BACKEND_PORT);
    assert_eq!(least_backend, (BACKEND4, BACKEND_PORT), "the services' backend");
    // Ids and clock stamps are the datapath's bookkeeping, which the least leaves out.
    let flows = |dp: &Datapath| -> Vec<(CtKey, CtValue)> {
        let ct = dp.conntrack_sorted(true).into_iter();
        ct.map(|(k, v)| (k, CtValue { backend_id: 0, service_id: 0, ..v })).collect()
    };
    let syn = tcp4(CLIENT4, 40000, VIP4, 80, true, b"");
    let mut dp = datapath_with_services();
    let want = dp.run(PROG_TC_INGRESS, &syn);
    assert_eq!(want.verdict, TC_ACT_OK);
    checksums_ok(&want.packet).unwrap();
    let want_flows = flows(&dp);
    assert_eq!(want_flows.len(), 2, "{want_flows:?}");
    for prog in [PROG_BENCH_TC_LEAST_FIRST, PROG_BENCH_XDP_LEAST_FIRST] {
        let mut least = datapath_with_services();
        for run in ["first", "retransmitted"] {
            let out = least.run(prog, &syn);
            assert_eq!(out.packet, want.packet, "{prog}, {run} SYN");
            assert_eq!(flows(&least), want_flows, "{prog}, {run} SYN");
        }
    }
}
