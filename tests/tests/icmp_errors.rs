//! ICMP errors about translated flows (BPF_PROG_TEST_RUN): each must reach whoever sent the
//! packet it quotes, quoting it as that side sent it, with every checksum right; anything else
//! ICMP passes untouched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use etherparse::{Icmpv4Type, Icmpv6Type, icmpv4, icmpv6};
use lb_agent::dataplane::attach::XdpTx;
use lb_agent::model::plan::{Backend, Protocol};
use lb_common::*;
use lb_tests::{
    addrs::*,
    kernel::Datapath,
    packets::*,
    plans::{backend, lb_plan},
    require_root,
    routed::RoutedNode,
};

const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 1, 255, 1);
const NODE6: &str = "fd00:1::11";
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0xff, 0, 0, 0, 0, 1);

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn datapath(
    name: &str,
    vip: IpAddr,
    port: u16,
    proto: Protocol,
    backends: Vec<Backend>,
) -> Datapath {
    let mut dp = Datapath::load();
    dp.set_node(Some(NODE.into()), Some(NODE6.parse().unwrap()));
    dp.program(name, &[lb_plan(name, vip, port, proto, backends)]);
    dp
}

fn port_unreachable() -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port)
}

fn fragmentation_needed(mtu: u16) -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: mtu,
    })
}

/// Runs `prog` on `packet`, which must come out a well-formed ICMP error.
fn run_error(dp: &mut Datapath, prog: &str, packet: &[u8]) -> (i32, IcmpError) {
    let out = dp.run(prog, packet);
    let e = icmp_error(&out.packet).unwrap_or_else(|e| panic!("{prog}: {e}"));
    (out.verdict, e)
}

#[test]
fn a_local_pods_port_unreachable_reaches_the_client_from_the_frontend() {
    require_root!();
    let mut dp =
        datapath("dns", VIP.into(), 53, Protocol::Udp, vec![backend(LOCAL_POD.into(), 5353, true)]);
    let query = dp.run(PROG_TC_INGRESS, &udp4(CLIENT, 5000, VIP, 53, b"query")).packet;
    assert_eq!(summarize(&query).unwrap().dst, sa(LOCAL_POD, 5353));

    // Nothing listens in the pod: its kernel answers from the pod, about client -> pod.
    let error = icmp4_error(LOCAL_POD, CLIENT, port_unreachable(), &query);
    let (verdict, e) = run_error(&mut dp, PROG_TC_EGRESS, &error);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        (e.src, e.dst, e.icmp_type, e.quoted_src, e.quoted_dst),
        (IpAddr::from(VIP), IpAddr::from(CLIENT), 3, sa(CLIENT, 5000), sa(VIP, 53)),
        "as if the frontend itself had no listener"
    );
    assert_eq!(dp.stat(STAT_ICMP_ERROR_TRANSLATED), 1);
    // With pod devices (`--pod-devices`), the error passes the pod's own device first: left
    // untouched there (its new source could be a node address, which the stack would refuse
    // as input), for the egress above.
    assert_eq!(dp.run(PROG_TC_FROM_POD, &error).packet, error);
    assert_eq!(dp.stat(STAT_ICMP_ERROR_TRANSLATED), 1);
}

#[test]
fn fragmentation_needed_on_the_way_to_a_remote_pod_goes_back_to_the_client() {
    require_root!();
    let mut dp = datapath(
        "web",
        VIP.into(),
        80,
        Protocol::Tcp,
        vec![backend(REMOTE_POD.into(), 8080, false)],
    );
    let syn = dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 40001, VIP, 80, true, b"")).packet;
    let snat = summarize(&syn).unwrap();
    assert_eq!((snat.src.ip(), snat.dst), (IpAddr::from(NODE), sa(REMOTE_POD, 8080)));

    // A router on the way to the pod cannot forward 1500 bytes: it tells the node, quoting
    // node -> pod. The client must hear it, about client -> frontend, or its big segments
    // vanish.
    let error = icmp4_error(ROUTER, NODE, fragmentation_needed(1400), &syn);
    let (verdict, e) = run_error(&mut dp, PROG_TC_INGRESS, &error);
    assert!(verdict == TC_ACT_REDIRECT || verdict == TC_ACT_OK, "sent on like replies: {verdict}");
    assert_eq!(
        (e.src, e.dst, e.quoted_src, e.quoted_dst),
        (IpAddr::from(ROUTER), IpAddr::from(CLIENT), sa(CLIENT, 40001), sa(VIP, 80))
    );
    assert_eq!(e.rest[2..], 1400u16.to_be_bytes(), "the MTU is kept");

    // The pod's own error (from the pod) comes from the frontend.
    let error = icmp4_error(REMOTE_POD, NODE, port_unreachable(), &syn);
    let (_, e) = run_error(&mut dp, PROG_TC_INGRESS, &error);
    assert_eq!((e.src, e.dst), (IpAddr::from(VIP), IpAddr::from(CLIENT)));
    assert_eq!((e.quoted_src, e.quoted_dst), (sa(CLIENT, 40001), sa(VIP, 80)));
    assert_eq!(dp.stat(STAT_ICMP_ERROR_TRANSLATED), 2);
    assert_eq!(dp.conntrack().len(), 2, "errors create no flows");
}

#[test]
fn an_error_about_a_reply_reaches_the_pod_that_sent_it() {
    require_root!();
    for (pod, local) in [(LOCAL_POD, true), (REMOTE_POD, false)] {
        let mut dp =
            datapath("web", VIP.into(), 80, Protocol::Tcp, vec![backend(pod.into(), 8080, local)]);
        let syn = dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 40000, VIP, 80, true, b"")).packet;
        let to_pod = summarize(&syn).unwrap();
        // The reply as it leaves towards the client: from the frontend.
        let reply_in = tcp4(
            pod,
            8080,
            to_pod.src.ip().to_string().parse().unwrap(),
            to_pod.src.port(),
            true,
            b"",
        );
        let prog = if local { PROG_TC_EGRESS } else { PROG_TC_INGRESS };
        let reply = dp.run(prog, &reply_in).packet;
        assert_eq!(summarize(&reply).unwrap().src, sa(VIP, 80));

        // A router on the client's side cannot forward it, and tells the frontend.
        let error = icmp4_error(ROUTER, VIP, fragmentation_needed(1280), &reply);
        let (verdict, e) = run_error(&mut dp, PROG_TC_INGRESS, &error);
        assert_eq!(
            (e.src, e.dst, e.quoted_src, e.quoted_dst),
            (IpAddr::from(ROUTER), IpAddr::from(pod), sa(pod, 8080), to_pod.src),
            "local {local}"
        );
        let expected = if local { [TC_ACT_OK].as_slice() } else { &[TC_ACT_OK, TC_ACT_REDIRECT] };
        assert!(expected.contains(&verdict), "local {local}: {verdict}");
    }
}

/// web6 ([2001:db8::80]:80) with its one backend on another node.
fn web6_remote() -> Datapath {
    datapath("web6", VIP6.into(), 80, Protocol::Tcp, vec![backend(REMOTE6.into(), 8080, false)])
}

/// [`web6_remote`] and the client's SYN as tc ingress forwarded it (SNATed to the node).
fn web6_remote_syn() -> (Datapath, Vec<u8>) {
    let mut dp = web6_remote();
    let syn = dp.run(PROG_TC_INGRESS, &tcp6(CLIENT6, 40001, VIP6, 80, true, b"")).packet;
    (dp, syn)
}

#[test]
fn ipv6_packet_too_big_and_port_unreachable() {
    require_root!();
    let node6: Ipv6Addr = NODE6.parse().unwrap();

    let (mut dp, syn) = web6_remote_syn();
    let snat = summarize(&syn).unwrap();
    assert_eq!(snat.src.ip(), IpAddr::from(node6));
    let error = icmp6_error(ROUTER6, node6, Icmpv6Type::PacketTooBig { mtu: 1280 }, &syn);
    let (_, e) = run_error(&mut dp, PROG_TC_INGRESS, &error);
    assert_eq!(
        (e.src, e.dst, e.icmp_type, e.quoted_src, e.quoted_dst),
        (IpAddr::from(ROUTER6), IpAddr::from(CLIENT6), 2, sa(CLIENT6, 40001), sa(VIP6, 80))
    );
    assert_eq!(e.rest, 1280u32.to_be_bytes());

    let mut dp =
        datapath("dns6", VIP6.into(), 53, Protocol::Udp, vec![backend(LOCAL6.into(), 5353, true)]);
    let query = dp.run(PROG_TC_INGRESS, &udp6(CLIENT6, 5000, VIP6, 53, b"query")).packet;
    let unreachable = Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port);
    let error = icmp6_error(LOCAL6, CLIENT6, unreachable, &query);
    let (verdict, e) = run_error(&mut dp, PROG_TC_EGRESS, &error);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        (e.src, e.dst, e.icmp_type, e.quoted_src, e.quoted_dst),
        (IpAddr::from(VIP6), IpAddr::from(CLIENT6), 1, sa(CLIENT6, 5000), sa(VIP6, 53))
    );
}

/// An error quoting an IPv6 packet with extension headers (hop-by-hop options, the first
/// fragment of a larger datagram) is translated like one quoting a plain packet; one quoting a
/// later fragment, which carries no ports, is left alone.
#[test]
fn ipv6_errors_quoting_extension_headers_are_translated_too() {
    require_root!();
    let node6: Ipv6Addr = NODE6.parse().unwrap();
    let (mut dp, syn) = web6_remote_syn();
    let too_big = Icmpv6Type::PacketTooBig { mtu: 1280 };
    for (what, quoted) in [
        ("hop-by-hop options", with_ipv6_hop_by_hop(&syn)),
        ("a first fragment", with_ipv6_fragment(&syn, 0, true)),
        ("both", with_ipv6_hop_by_hop(&with_ipv6_fragment(&syn, 0, true))),
    ] {
        let error = icmp6_error(ROUTER6, node6, too_big, &quoted);
        let (_, e) = run_error(&mut dp, PROG_TC_INGRESS, &error);
        assert_eq!(
            (e.src, e.dst, e.quoted_src, e.quoted_dst),
            (IpAddr::from(ROUTER6), IpAddr::from(CLIENT6), sa(CLIENT6, 40001), sa(VIP6, 80)),
            "{what}"
        );
    }
    let translated = dp.stat(STAT_ICMP_ERROR_TRANSLATED);
    assert_eq!(translated, 3);
    let later = icmp6_error(ROUTER6, node6, too_big, &with_ipv6_fragment(&syn, 100, false));
    let out = dp.run(PROG_TC_INGRESS, &later);
    assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, &later), "untouched");
    assert_eq!(dp.stat(STAT_ICMP_ERROR_TRANSLATED), translated);
}

#[test]
fn icmp_that_is_not_an_error_about_a_tracked_flow_passes_untouched() {
    require_root!();
    let mut dp =
        datapath("dns", VIP.into(), 53, Protocol::Udp, vec![backend(LOCAL_POD.into(), 5353, true)]);
    let query = dp.run(PROG_TC_INGRESS, &udp4(CLIENT, 5000, VIP, 53, b"query")).packet;
    let tracked = icmp4_error(LOCAL_POD, CLIENT, port_unreachable(), &query);
    let untracked_flow = udp4(CLIENT, 5001, LOCAL_POD, 5353, b"direct");

    let mut truncated = tracked.clone();
    truncated.truncate(tracked.len() - 6); // the quoted ports cut off
    let tot = (truncated.len() - 14) as u16;
    truncated[16..18].copy_from_slice(&tot.to_be_bytes());
    fix_ipv4_checksum(&mut truncated);
    let mut quoted_icmp = tracked.clone();
    quoted_icmp[14 + 20 + 8 + 9] = 1; // the quoted packet is ICMP itself
    let mut quoted_v6_in_v4 = tracked.clone();
    quoted_v6_in_v4[14 + 20 + 8] = 0x60;
    let cases: [(&str, Vec<u8>); 6] = [
        ("echo request", icmp4_echo(CLIENT, VIP)),
        (
            "echo request v6",
            icmp6_echo("2001:db8::7".parse().unwrap(), "2001:db8::80".parse().unwrap()),
        ),
        (
            "error about an untracked flow",
            icmp4_error(LOCAL_POD, CLIENT, port_unreachable(), &untracked_flow),
        ),
        ("quoted ports cut off", truncated),
        ("quotes an ICMP packet", quoted_icmp),
        ("quotes something not IPv4", quoted_v6_in_v4),
    ];
    for prog in [PROG_TC_INGRESS, PROG_TC_EGRESS] {
        for (name, packet) in &cases {
            let out = dp.run(prog, packet);
            assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, packet), "{prog}: {name}");
        }
    }
    // XDP leaves even a translatable error to tc.
    let out = dp.run(PROG_XDP_INGRESS, &tracked);
    assert_eq!((out.verdict, &out.packet), (XDP_PASS, &tracked));
    assert_eq!(dp.stat(STAT_ICMP_ERROR_TRANSLATED), 0);
    assert_eq!(dp.stat(STAT_OTHER_L4), 2 * cases.len() as u64 + 1);
}

/// `packet` with IPv4 "don't fragment" set or cleared.
fn with_df(packet: &[u8], df: bool) -> Vec<u8> {
    let mut p = packet.to_vec();
    p[14 + 6] = if df { p[14 + 6] | 0x40 } else { p[14 + 6] & !0x40 };
    fix_ipv4_checksum(&mut p);
    p
}

#[test]
fn a_packet_too_big_for_the_route_to_a_remote_pod_gets_fragmentation_needed() {
    require_root!();
    // The route to the pods leaves by n0, now with an MTU of 1400 (a tunnel's, say).
    let node = RoutedNode::new();
    node.ns.ip(&["link", "set", "n0", "mtu", "1400"]);
    let mut dp = datapath(
        "web",
        VIP.into(),
        80,
        Protocol::Tcp,
        vec![backend(REMOTE_POD.into(), 8080, false)],
    );
    let syn = tcp4(CLIENT, 40001, VIP, 80, true, b"");
    let out = node.run_tc(&mut dp, &syn, 0);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "fits: SNATed and sent on");

    // 1450 bytes that must not be fragmented: the client is told, about what it sent.
    let big = with_df(&tcp4(CLIENT, 40001, VIP, 80, false, &[7u8; 1410]), true);
    assert_eq!(big.len() - 14, 1450);
    let out = node.run_tc(&mut dp, &big, 0);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "sent back out of n0");
    let e = icmp_error(&out.packet).unwrap();
    assert_eq!(
        (e.src, e.dst, e.icmp_type, e.quoted_src, e.quoted_dst),
        (IpAddr::from(VIP), IpAddr::from(CLIENT), 3, sa(CLIENT, 40001), sa(VIP, 80))
    );
    assert_eq!(e.rest, [0, 0, 0x05, 0x78], "next-hop MTU 1400");
    assert_eq!(dp.stat(STAT_TOO_BIG), 1);

    // The same to a next hop whose neighbour is not known yet (192.168.1.13): judged all the
    // same, before the kernel is left to resolve it.
    let unresolved = Ipv4Addr::new(192, 168, 1, 13);
    let mut dp2 =
        datapath("web", VIP.into(), 80, Protocol::Tcp, vec![backend(unresolved.into(), 80, false)]);
    let out = node.run_tc(&mut dp2, &big, 0);
    let e = icmp_error(&out.packet).expect("fragmentation needed, not the packet sent on");
    assert_eq!((e.icmp_type, e.rest), (3, [0, 0, 0x05, 0x78]));
    let fits = tcp4(CLIENT, 40001, VIP, 80, false, b"fits");
    let s = summarize(&node.run_tc(&mut dp2, &fits, 0).packet).unwrap();
    assert_eq!(s.dst, sa(unresolved, 80), "a packet that fits is sent on");

    // Without "don't fragment", and as a GSO packet (segments of 1000), it goes on as before.
    for (p, gso) in [(with_df(&big, false), 0), (big.clone(), 1000)] {
        let out = node.run_tc(&mut dp, &p, gso);
        let s = summarize(&out.packet).expect("the packet itself");
        assert_eq!((out.verdict, s.dst), (TC_ACT_REDIRECT, sa(REMOTE_POD, 8080)), "gso {gso}");
    }
    assert_eq!(dp.stat(STAT_TOO_BIG), 1);

    // XDP leaves it to tc, which tells the client.
    node.xdp_tx(&mut dp, "n0", XdpTx::On);
    let out = node.run_xdp(&mut dp, &big);
    assert_eq!((out.verdict, &out.packet), (XDP_PASS, &big));
    assert_eq!(dp.stat(STAT_XDP_TO_TC), 1);
    let small = tcp4(CLIENT, 40001, VIP, 80, false, b"fits");
    assert_eq!(node.run_xdp(&mut dp, &small).verdict, 3, "XDP_TX");

    // IPv6: packet too big.
    let mut dp = web6_remote();
    let big6 = tcp6(CLIENT6, 40001, VIP6, 80, false, &[7u8; 1400]);
    assert_eq!(
        node.run_tc(&mut dp, &tcp6(CLIENT6, 40001, VIP6, 80, true, b""), 0).verdict,
        TC_ACT_REDIRECT
    );
    let out = node.run_tc(&mut dp, &big6, 0);
    let e = icmp_error(&out.packet).unwrap();
    assert_eq!(
        (e.src, e.dst, e.icmp_type, e.quoted_src, e.quoted_dst),
        (IpAddr::from(VIP6), IpAddr::from(CLIENT6), 2, sa(CLIENT6, 40001), sa(VIP6, 80))
    );
    assert_eq!(e.rest, 1400u32.to_be_bytes());
}

/// ICMP errors about tracked flows (IPv4 and IPv6, from both sides) with one to three header
/// bytes overwritten at random, or cut short, through tc ingress and egress: whatever parsing
/// makes of them, each passes (or is sent on), keeps its length, and conntrack is left exactly
/// as it was; the clean errors are still translated after the storm.
#[test]
fn mutated_icmp_errors_never_break_the_programs_or_conntrack() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_node(Some(NODE.into()), Some(NODE6.parse().unwrap()));
    let local = backend(LOCAL_POD.into(), 5353, true);
    dp.program("dns", &[lb_plan("dns", VIP.into(), 53, Protocol::Udp, vec![local])]);
    let remote = backend(REMOTE_POD.into(), 8080, false);
    dp.program("web", &[lb_plan("web", VIP.into(), 80, Protocol::Tcp, vec![remote])]);
    let remote6 = backend(REMOTE6.into(), 8080, false);
    dp.program("web6", &[lb_plan("web6", VIP6.into(), 80, Protocol::Tcp, vec![remote6])]);
    let query = dp.run(PROG_TC_INGRESS, &udp4(CLIENT, 5000, VIP, 53, b"query")).packet;
    let syn = dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 40001, VIP, 80, true, b"")).packet;
    let syn6 = dp.run(PROG_TC_INGRESS, &tcp6(CLIENT6, 40001, VIP6, 80, true, b"")).packet;
    let node6: Ipv6Addr = NODE6.parse().unwrap();
    let seeds = [
        icmp4_error(LOCAL_POD, CLIENT, port_unreachable(), &query),
        icmp4_error(ROUTER, NODE, fragmentation_needed(1400), &syn),
        icmp4_error(REMOTE_POD, NODE, port_unreachable(), &syn),
        icmp6_error(
            "fd00:10:ff::1".parse().unwrap(),
            node6,
            Icmpv6Type::PacketTooBig { mtu: 1280 },
            &syn6,
        ),
    ];
    let before = dp.conntrack_sorted(true);
    let (seed, runs) = lb_tests::plans::mutation_seed_and_runs(0x5851f42d4c957f2d, 3000);
    let mut rng = lb_tests::plans::Rng::new(seed);
    let (mut changed, mut unchanged) = (0, 0);
    for i in 0..runs {
        let mut p = seeds[(i % seeds.len() as u64) as usize].clone();
        // Anywhere in the headers: outer, ICMP, quoted network and transport.
        rng.mutate(&mut p, 110);
        for prog in [PROG_TC_INGRESS, PROG_TC_EGRESS] {
            let Ok(out) = dp.try_run(prog, &p) else { continue }; // no skb from a stub
            assert!(
                [TC_ACT_OK, TC_ACT_REDIRECT].contains(&out.verdict),
                "{prog} run {i}: {p:02x?}"
            );
            assert_eq!(out.packet.len(), p.len(), "{prog} run {i}");
            if out.packet == p { unchanged += 1 } else { changed += 1 }
        }
    }
    assert!(changed > 100 && unchanged > 100, "{changed} changed, {unchanged} unchanged");
    assert_eq!(dp.conntrack_sorted(true), before, "conntrack as it was");
    let (_, e) = run_error(&mut dp, PROG_TC_EGRESS, &seeds[0]);
    assert_eq!((e.src, e.quoted_dst), (IpAddr::from(VIP), sa(VIP, 53)));
    let (_, e) = run_error(&mut dp, PROG_TC_INGRESS, &seeds[1]);
    assert_eq!((e.dst, e.quoted_src), (IpAddr::from(CLIENT), sa(CLIENT, 40001)));
}

/// The node's own ICMP errors (port unreachable for a service without endpoints, "too big")
/// come from a per-CPU allowance as the kernel's do (a burst of 50, then one a millisecond): a
/// flood of 1,000 SYNs to an empty service is not answered one for one.
#[test]
fn the_icmp_errors_the_node_sends_are_rate_limited_like_the_kernels() {
    require_root!();
    let mut dp = datapath("empty", VIP.into(), 80, Protocol::Tcp, vec![]);
    let (mut answered, mut dropped) = (0u64, 0u64);
    // Verified before the clock starts (an emulated 6.1 takes seconds).
    dp.load_program(PROG_TC_INGRESS);
    let start = std::time::Instant::now();
    // Runs back to back, in one visit to the test namespace (an emulated kernel is slow
    // enough without two setns a run to refill the allowance as fast as it is spent).
    let outs: Vec<lb_tests::kernel::RunOutput> = lb_tests::kernel::in_quiet_netns(|| {
        (0..1000u16)
            .map(|port| dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 20000 + port, VIP, 80, true, b"")))
            .collect()
    });
    for out in outs {
        match icmp_error(&out.packet) {
            Ok(e) => {
                assert_eq!((e.icmp_type, e.quoted_dst), (3, sa(VIP, 80)));
                answered += 1;
            }
            Err(_) => {
                assert_eq!(out.verdict, 2, "TC_ACT_SHOT");
                dropped += 1;
            }
        }
    }
    // 50 a CPU at once (the test may move between the CPUs), and one more a millisecond each
    // (and a clock tick of slack).
    let ms = start.elapsed().as_millis() as u64;
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let most = cpus * (50 + ms + 10);
    assert!(answered >= 50 && answered <= most, "{answered} answered in {ms} ms");
    // Where the runs outpaced the refill (here, not in an emulated kernel on a slow machine,
    // which once took 10 ms a run: the allowance never ran out), some were not answered.
    if 1000 > most {
        assert!(dropped > 0, "nothing dropped in {ms} ms");
    }
    assert_eq!(dp.stat(STAT_ICMP_RATE_LIMITED), dropped);
    assert_eq!(dp.stat(STAT_REJECT_NO_BACKEND), 1000);
    std::thread::sleep(std::time::Duration::from_millis(30));
    let out = dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 30000, VIP, 80, true, b""));
    assert!(icmp_error(&out.packet).is_ok(), "answered again after a pause");
}
