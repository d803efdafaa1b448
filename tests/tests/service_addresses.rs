//! Service addresses outside clients reach (LoadBalancer IPs, ExternalIPs) behave like a host
//! owning them (BPF_PROG_TEST_RUN in a routed node namespace, where the programs' route
//! lookups see real routes): a port or protocol no service has there is dropped, not routed
//! back out towards the router that sent it (a loop until the TTL runs out), and pings are
//! answered. Addresses that are the node's own are left to the stack, as is everything when
//! the node does not forward.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_agent::model::plan::Protocol;
use lb_common::*;
use lb_tests::{
    addrs::*,
    kernel::Datapath,
    packets::*,
    plans::{Rng, backend, lb_plan, mutation_seed_and_runs},
    require_root,
    routed::RoutedNode,
};

const XDP_DROP: i32 = 1;
const ETH: usize = 14;

/// A datapath with `web` (TCP :80 on `VIP` and `VIP6`, a local backend each) and the node's
/// addresses.
fn datapath(answer_pings: bool) -> Datapath {
    let mut dp = Datapath::load();
    dp.answer_service_pings(answer_pings);
    dp.set_node(Some(NODE.into()), Some(NODE6.into()));
    dp.program(
        "web",
        &[
            lb_plan(
                "web",
                VIP.into(),
                80,
                Protocol::Tcp,
                vec![backend(LOCAL_POD.into(), 8080, true)],
            ),
            lb_plan(
                "web6",
                VIP6.into(),
                80,
                Protocol::Tcp,
                vec![backend(LOCAL6.into(), 8080, true)],
            ),
        ],
    );
    dp
}

/// A GRE packet (protocol 47) from `src` to `dst`: any protocol no frontend has.
fn gre4(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    with_ipv4_byte(&udp4(src, 1, dst, 1, b"tunnelled"), 9, 47)
}

/// Whether an IPv4 or IPv6 frame's checksums hold, taking what follows a 20-byte IPv4 header
/// (or the 40-byte IPv6 one) as an ICMP (ICMPv6) message, whatever its type.
fn icmp_sums_ok(frame: &[u8]) -> bool {
    if u16::from_be_bytes([frame[12], frame[13]]) == 0x0800 {
        let (ip, icmp) = (&frame[ETH..ETH + 20], &frame[ETH + 20..]);
        ones_complement_sum(ip) == 0xffff && ones_complement_sum(icmp) == 0xffff
    } else {
        let (ip, icmp) = (&frame[ETH..ETH + 40], &frame[ETH + 40..]);
        let mut pseudo = ip[8..40].to_vec();
        pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(icmp);
        ones_complement_sum(&pseudo) == 0xffff
    }
}

/// What an ICMP echo reply frame says: (source, destination, type, TTL or hop limit, payload),
/// after checking its network and ICMP checksums; `Err` for anything else.
fn echo_reply(frame: &[u8]) -> Result<(IpAddr, IpAddr, u8, u8, Vec<u8>), String> {
    if !icmp_sums_ok(frame) {
        return Err("bad checksums".into());
    }
    if u16::from_be_bytes([frame[12], frame[13]]) == 0x0800 {
        let (ip, icmp) = (&frame[ETH..ETH + 20], &frame[ETH + 20..]);
        if ip[9] != 1 {
            return Err(format!("not ICMP: protocol {}", ip[9]));
        }
        let (src, dst) =
            (<[u8; 4]>::try_from(&ip[12..16]).unwrap(), <[u8; 4]>::try_from(&ip[16..20]).unwrap());
        Ok((IpAddr::from(src), IpAddr::from(dst), icmp[0], ip[8], icmp[4..].to_vec()))
    } else {
        let (ip, icmp) = (&frame[ETH..ETH + 40], &frame[ETH + 40..]);
        if ip[6] != 58 {
            return Err(format!("not ICMPv6: next header {}", ip[6]));
        }
        let (src, dst) =
            (<[u8; 16]>::try_from(&ip[8..24]).unwrap(), <[u8; 16]>::try_from(&ip[24..40]).unwrap());
        Ok((IpAddr::from(src), IpAddr::from(dst), icmp[0], ip[7], icmp[4..].to_vec()))
    }
}

#[test]
fn a_load_balancer_ips_unknown_ports_and_protocols_are_dropped_not_routed_back_out() {
    require_root!();
    let node = RoutedNode::new();
    let mut dp = datapath(true);
    // Each is routed back out of n0 by the default route: the loop this prevents.
    let dropped = [
        tcp4(CLIENT, 40000, VIP, 81, true, b""),
        // The service's port, the other protocol.
        udp4(CLIENT, 40000, VIP, 80, b"dns?"),
        // Mid-connection, as a scan's ACK.
        tcp4(CLIENT, 40001, VIP, 22, false, b"data"),
        gre4(CLIENT, VIP),
        tcp6(CLIENT6, 40000, VIP6, 81, true, b""),
        udp6(CLIENT6, 40000, VIP6, 80, b"dns?"),
        // A later fragment whose first was not translated.
        as_ipv4_fragment(&udp4(CLIENT, 5000, VIP, 53, &[7; 64]), 8, false),
    ];
    for (i, p) in dropped.iter().enumerate() {
        let out = node.run_tc(&mut dp, p, 0);
        assert_eq!(out.verdict, TC_ACT_SHOT, "packet {i}: tc drops it");
        assert_eq!(dp.stat(STAT_DROP_UNKNOWN_PORT), i as u64 + 1);
    }
    // XDP drops what it parses (the later fragment goes on to tc, as every later fragment).
    for (i, p) in dropped[..6].iter().enumerate() {
        assert_eq!(node.run_xdp(&mut dp, p).verdict, XDP_DROP, "packet {i}: XDP drops it");
    }
    assert_eq!(dp.stat(STAT_DROP_UNKNOWN_PORT), dropped.len() as u64 + 6);
    assert_eq!(dp.stat(STAT_CT_NEW), 0);
    assert!(dp.conntrack().is_empty());

    // The service's own port works as before, on both hooks.
    for (p, pod) in [
        (tcp4(CLIENT, 40003, VIP, 80, true, b""), IpAddr::from(LOCAL_POD)),
        (tcp6(CLIENT6, 40003, VIP6, 80, true, b""), IpAddr::from(LOCAL6)),
    ] {
        let out = node.run_tc(&mut dp, &p, 0);
        checksums_ok(&out.packet).unwrap();
        assert_eq!((out.verdict, summarize(&out.packet).unwrap().dst.ip()), (TC_ACT_OK, pod));
    }

    // Addresses that are no service's pass untouched, also one whose bit in the address set
    // is the VIP's (the marker lookup says no).
    assert!(dp.addr_set(MAP_EXTERNAL_IPS, VIP.into()), "the VIP's bit is set");
    let twin = same_bit_in(VIP.into(), Ipv4Addr::new(198, 16, 0, 0));
    for p in [
        tcp4(CLIENT, 40004, twin, 81, true, b""),
        gre4(CLIENT, twin),
        tcp4(CLIENT, 40004, OTHER_CLIENT, 81, true, b""),
    ] {
        let out = node.run_tc(&mut dp, &p, 0);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, &p), "not a service address");
        assert_eq!(node.run_xdp(&mut dp, &p).verdict, XDP_PASS);
    }
    assert_eq!(dp.stat(STAT_DROP_UNKNOWN_PORT), dropped.len() as u64 + 6, "none more");
}

#[test]
fn pings_to_a_load_balancer_ip_are_answered_from_it() {
    require_root!();
    let node = RoutedNode::new();
    let mut dp = datapath(true);
    for (request, vip, client) in [
        (icmp4_echo(CLIENT, VIP), IpAddr::from(VIP), IpAddr::from(CLIENT)),
        (icmp6_echo(CLIENT6, VIP6), IpAddr::from(VIP6), IpAddr::from(CLIENT6)),
    ] {
        // XDP leaves ICMP to tc.
        assert_eq!(node.run_xdp(&mut dp, &request).verdict, XDP_PASS);
        let out = node.run_tc(&mut dp, &request, 0);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "sent back out of n0");
        let (src, dst, kind, ttl, payload) = echo_reply(&out.packet).unwrap();
        let reply_type = if vip.is_ipv4() { 0 } else { 129 };
        assert_eq!((src, dst, kind, ttl), (vip, client, reply_type, 64), "{vip}");
        assert_eq!(payload, echo_reply_payload(&request), "identifier, sequence, data echoed");
        assert_eq!((&out.packet[..6], &out.packet[6..12]), (&CLIENT_MAC[..], &NODE_MAC[..]));
        assert_eq!(out.packet.len(), request.len());
    }
    assert_eq!(dp.stat(STAT_ECHO_REPLY), 2);
    assert_eq!(dp.stat(STAT_DROP_UNKNOWN_PORT), 0);
    // The pings `lbctl explain ADDR/icmp` builds: well-formed, and answered alike.
    for (client, vip) in [(IpAddr::from(CLIENT), IpAddr::from(VIP)), (CLIENT6.into(), VIP6.into())]
    {
        let (src, dst) = (SocketAddr::new(client, 40000), SocketAddr::new(vip, 0));
        let request = lb_agent::explain::build_packet(src, dst, PROTO_ICMP).unwrap();
        assert!(icmp_sums_ok(&request), "{vip}");
        let out = node.run_tc(&mut dp, &request, 0);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{vip}");
        assert_eq!(echo_reply(&out.packet).unwrap().0, vip);
    }
    assert_eq!(dp.stat(STAT_ECHO_REPLY), 4);

    // Not answered: a fragment of a ping, an echo reply, an ICMP error about nothing here.
    let mut reply = icmp4_echo(CLIENT, VIP);
    reply[ETH + 20] = 0;
    for p in [as_ipv4_fragment(&icmp4_echo(CLIENT, VIP), 0, true), reply] {
        assert_eq!(node.run_tc(&mut dp, &p, 0).verdict, TC_ACT_SHOT);
    }
    assert_eq!(dp.stat(STAT_ECHO_REPLY), 4);
    assert_eq!(dp.stat(STAT_DROP_UNKNOWN_PORT), 2);

    // The answers share the ICMP error allowance (50 a CPU at once, one more a millisecond;
    // the test may move between CPUs): a flood is not answered one for one.
    let start = std::time::Instant::now();
    let mut dropped = 0;
    for _ in 0..1000 {
        let out = node.run_tc(&mut dp, &icmp4_echo(CLIENT, VIP), 0);
        if out.verdict == TC_ACT_SHOT {
            dropped += 1;
        } else {
            assert_eq!(echo_reply(&out.packet).unwrap().2, 0);
        }
    }
    let ms = start.elapsed().as_millis() as u64;
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let answered = dp.stat(STAT_ECHO_REPLY) - 4;
    assert!(answered >= 48 && answered <= cpus * (50 + ms + 10), "{answered} answered in {ms} ms");
    assert_eq!(answered + dropped, 1000);
    assert_eq!(dp.stat(STAT_ICMP_RATE_LIMITED), dropped);
}

/// The payload of an echo request frame after its type, code and checksum.
fn echo_reply_payload(request: &[u8]) -> Vec<u8> {
    let l4 = if request[12] == 0x08 { ETH + 20 } else { ETH + 40 };
    request[l4 + 4..].to_vec()
}

#[test]
fn without_answer_service_pings_a_ping_is_dropped_too() {
    require_root!();
    let node = RoutedNode::new();
    let mut dp = datapath(false);
    assert_eq!(node.run_tc(&mut dp, &icmp4_echo(CLIENT, VIP), 0).verdict, TC_ACT_SHOT);
    assert_eq!(node.run_tc(&mut dp, &icmp6_echo(CLIENT6, VIP6), 0).verdict, TC_ACT_SHOT);
    assert_eq!((dp.stat(STAT_ECHO_REPLY), dp.stat(STAT_DROP_UNKNOWN_PORT)), (0, 2));
}

#[test]
fn a_service_address_that_is_the_nodes_own_or_a_node_that_does_not_forward_is_left_to_the_stack() {
    require_root!();
    let node = RoutedNode::new();
    let mut dp = datapath(true);
    // A LoadBalancer IP that is the node's address (k3s ServiceLB, kube-vip): its other ports
    // are the node's own (SSH, the kubelet), and the stack answers pings.
    let on_node = vec![backend(LOCAL_POD.into(), 8443, true)];
    dp.program("on-node", &[lb_plan("on-node", NODE.into(), 443, Protocol::Tcp, on_node)]);
    let node6: Ipv6Addr = NODE6;
    for p in [
        tcp4(CLIENT, 40000, NODE, 22, true, b""),
        icmp4_echo(CLIENT, NODE),
        gre4(CLIENT, NODE),
        icmp6_echo(CLIENT6, node6),
    ] {
        let out = node.run_tc(&mut dp, &p, 0);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, &p), "the node's own address");
    }
    // Its service port is translated.
    let out = node.run_tc(&mut dp, &tcp4(CLIENT, 40001, NODE, 443, true, b""), 0);
    assert_eq!(summarize(&out.packet).unwrap().dst.ip(), IpAddr::from(LOCAL_POD));

    // A node that does not forward drops such packets itself: they are left to it.
    node.ns.sysctl("net.ipv4.ip_forward", "0");
    for p in [tcp4(CLIENT, 40002, VIP, 81, true, b""), icmp4_echo(CLIENT, VIP)] {
        let out = node.run_tc(&mut dp, &p, 0);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, &p), "no forwarding");
    }
    assert_eq!((dp.stat(STAT_DROP_UNKNOWN_PORT), dp.stat(STAT_ECHO_REPLY)), (0, 0));
}

#[test]
fn the_address_set_is_seeded_from_the_markers_when_an_agent_starts() {
    require_root!();
    let node = RoutedNode::new();
    let mut dp = datapath(true);
    // An upgrade from a build without the set: empty, while the markers are there.
    dp.clear_addr_bit(MAP_EXTERNAL_IPS, VIP.into());
    let p = tcp4(CLIENT, 40000, VIP, 81, true, b"");
    assert_eq!(node.run_tc(&mut dp, &p, 0).verdict, TC_ACT_OK, "bit clear: passed");
    let seeded = lb_agent::dataplane::port_filters::enable(&mut dp.ebpf).expect("enable");
    assert_eq!(seeded.external_ips, 2, "the VIP and VIP6");
    assert_eq!(node.run_tc(&mut dp, &p, 0).verdict, TC_ACT_SHOT);

    // Before the agent says the sets are complete, every address is looked up.
    let mut opts: aya::maps::Array<&mut aya::maps::MapData, u32> =
        aya::maps::Array::try_from(dp.ebpf.map_mut(MAP_OPTIONS).expect("map")).unwrap();
    opts.set(OPT_INGRESS_PORTS_READY, 0, 0).unwrap();
    dp.clear_addr_bit(MAP_EXTERNAL_IPS, VIP.into());
    assert_eq!(node.run_tc(&mut dp, &p, 0).verdict, TC_ACT_SHOT);
    assert_eq!(node.run_xdp(&mut dp, &p).verdict, XDP_DROP);

    // The service gone: its marker goes with it, and its address is no service's.
    dp.program("web", &[]);
    let out = node.run_tc(&mut dp, &p, 0);
    assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, &p));
    assert_eq!(node.run_tc(&mut dp, &icmp4_echo(CLIENT, VIP), 0).verdict, TC_ACT_OK);
}

/// Malformed packets to a service address (pings and a SYN to a port the address lacks, with
/// bytes anywhere mutated at random) never make the new path misbehave: XDP passes or drops,
/// tc passes, drops or answers; an answer is the request turned around (addresses and MACs
/// swapped, a reply's type, TTL 64, the rest as it came) whose checksums hold exactly when the
/// request's did; nothing reaches conntrack.
#[test]
fn mutated_packets_to_a_service_address_are_dropped_passed_or_answered_well() {
    require_root!();
    let node = RoutedNode::new();
    let mut dp = datapath(true);
    let seeds = [
        icmp4_echo(CLIENT, VIP),
        icmp6_echo(CLIENT6, VIP6),
        tcp4(CLIENT, 40000, VIP, 81, true, b""),
        tcp6(CLIENT6, 40000, VIP6, 81, true, b""),
    ];
    let (seed, runs) = mutation_seed_and_runs(21, 2000);
    let mut rng = Rng::new(seed);
    let (mut answered, mut dropped, mut passed) = (0, 0, 0);
    for i in 0..runs {
        let mut p = seeds[i as usize % seeds.len()].clone();
        for _ in 0..1 + rng.below(2) {
            let at = rng.below(p.len() as u64) as usize;
            p[at] = rng.next_u64() as u8;
        }
        // The kernel refuses some frames outright (a length its ethertype cannot hold).
        let Ok(xdp) = node.ns.run(|| dp.try_run_ctx(PROG_XDP_INGRESS, &p, None)) else {
            continue;
        };
        assert!([XDP_PASS, XDP_DROP].contains(&xdp.verdict), "XDP run {i}: {p:02x?}");
        let out = node.run_tc(&mut dp, &p, 0);
        match out.verdict {
            TC_ACT_REDIRECT => {
                answered += 1;
                let o = &out.packet;
                let v4 = p[12..14] == [0x08, 0x00];
                let (l3, l4, addrs, ttl, reply) =
                    if v4 { (ETH, ETH + 20, 12, 8, 0) } else { (ETH, ETH + 40, 8, 7, 129) };
                let n = if v4 { 4 } else { 16 };
                assert_eq!(o.len(), p.len(), "run {i}");
                assert_eq!((&o[..6], &o[6..12]), (&p[6..12], &p[..6]), "run {i}: MACs");
                let (a, b) = (l3 + addrs, l3 + addrs + n);
                assert_eq!((&o[a..b], &o[b..b + n]), (&p[b..b + n], &p[a..b]), "run {i}");
                assert_eq!((o[l3 + ttl], o[l4]), (64, reply), "run {i}");
                assert_eq!(o[l4 + 4..], p[l4 + 4..], "run {i}: identifier, sequence, data");
                assert_eq!(icmp_sums_ok(o), icmp_sums_ok(&p), "run {i}: {p:02x?}");
            }
            TC_ACT_SHOT => dropped += 1,
            TC_ACT_OK => passed += 1,
            v => panic!("tc run {i}: verdict {v}: {p:02x?}"),
        }
    }
    // A mutation that made a packet to the service's own port (80) started a flow, as any
    // such packet does; every entry must be one.
    let backends = [addr_from_ip(LOCAL_POD.into()), addr_from_ip(LOCAL6.into())];
    let vips = [addr_from_ip(VIP.into()), addr_from_ip(VIP6.into())];
    for (k, v) in dp.conntrack() {
        if v.flags & CT_F_REPLY == 0 {
            assert!(vips.contains(&k.daddr) && u16::from_be(k.dport_be) == 80, "{k:?}");
            assert!(backends.contains(&v.new_daddr), "{k:?} -> {v:?}");
            assert_eq!(u16::from_be(v.new_dport_be), 8080, "{k:?} -> {v:?}");
        } else {
            assert!(vips.contains(&v.new_saddr) && u16::from_be(v.new_sport_be) == 80, "{v:?}");
        }
    }
    assert!(answered > 50 && dropped > 50 && passed > 50, "{answered} {dropped} {passed}");
}
