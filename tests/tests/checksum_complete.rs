//! The skb checksum states a NIC hands packets over in, besides BPF_PROG_TEST_RUN's own
//! (CHECKSUM_NONE, every other test's): verified (CHECKSUM_UNNECESSARY) or summed
//! (CHECKSUM_COMPLETE). tc's in-place update (`rewrite::csum_in_place`) serves all three.
//!
//! Every rewrite the tc programs make keeps a CHECKSUM_COMPLETE skb right (BPF_PROG_TEST_RUN
//! with BPF_F_TEST_SKB_CHECKSUM_COMPLETE): NICs that sum each packet hand the stack that sum,
//! and a program that changes bytes without changing it makes the stack see a corrupt packet
//! ("hw csum failure", then the packet is summed again in software or dropped). First packets,
//! established ones, replies both ways, SNAT, both families, TCP, UDP and SCTP, fragments, ICMP errors
//! and the answers the node makes itself. Such packets take tc's in-place checksum update (no
//! checksum helpers: `rewrite::csum_in_place`), so every translated TCP/UDP packet's own
//! checksums are checked too (the kernel's check is of the skb's sum alone).

use etherparse::{Icmpv4Type, icmpv4};
use lb_agent::{
    dataplane::options::{Options, RejectTcpWith},
    model::plan::Protocol,
};
use lb_common::*;
use lb_tests::{
    addrs::*,
    kernel::Datapath,
    packets::*,
    plans::{backend, lb_plan},
    require_root,
};

fn datapath() -> Datapath {
    let mut dp = Datapath::load();
    dp.set_node(Some(NODE.into()), Some("fd00:1::11".parse().unwrap()));
    let services = [
        ("web", VIP.into(), 80, Protocol::Tcp, vec![backend(LOCAL_POD.into(), 8080, true)]),
        ("dns", VIP.into(), 53, Protocol::Udp, vec![backend(LOCAL_POD.into(), 5353, true)]),
        ("far", VIP.into(), 81, Protocol::Tcp, vec![backend(REMOTE_POD.into(), 8080, false)]),
        ("empty", VIP.into(), 82, Protocol::Tcp, vec![]),
        ("web6", VIP6.into(), 80, Protocol::Tcp, vec![backend(LOCAL6.into(), 8080, true)]),
        ("dns6", VIP6.into(), 53, Protocol::Udp, vec![backend(LOCAL6.into(), 5353, true)]),
        ("m3ua", VIP.into(), 2905, Protocol::Sctp, vec![backend(LOCAL_POD.into(), 3905, true)]),
        ("m3ua6", VIP6.into(), 2905, Protocol::Sctp, vec![backend(LOCAL6.into(), 3905, true)]),
    ];
    for (name, vip, port, proto, backends) in services {
        dp.program(name, &[lb_plan(name, vip, port, proto, backends)]);
    }
    dp
}

#[test]
fn every_translation_keeps_a_checksum_complete_sum_right() {
    require_root!();
    let mut dp = datapath();
    let big: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let mut steps: Vec<(&str, &str, Vec<u8>)> = vec![
        ("tcp4 first packet", PROG_TC_INGRESS, tcp4(CLIENT, 40000, VIP, 80, true, b"")),
        ("tcp4 established", PROG_TC_INGRESS, tcp4(CLIENT, 40000, VIP, 80, false, b"GET /")),
        ("tcp4 reply", PROG_TC_EGRESS, tcp4(LOCAL_POD, 8080, CLIENT, 40000, false, b"200")),
        ("udp4 query", PROG_TC_INGRESS, udp4(CLIENT, 5000, VIP, 53, b"query")),
        ("udp4 answer", PROG_TC_EGRESS, udp4(LOCAL_POD, 5353, CLIENT, 5000, b"answer")),
        // A UDP/IPv4 checksum of 0 (none) stays 0; the skb's sum still moves with the ports.
        (
            "udp4 query without checksum",
            PROG_TC_INGRESS,
            no_udp_checksum(udp4(CLIENT, 5002, VIP, 53, b"q")),
        ),
        (
            "udp4 again without checksum",
            PROG_TC_INGRESS,
            no_udp_checksum(udp4(CLIENT, 5002, VIP, 53, b"r")),
        ),
        (
            "udp4 answer without checksum",
            PROG_TC_EGRESS,
            no_udp_checksum(udp4(LOCAL_POD, 5353, CLIENT, 5002, b"a")),
        ),
        ("tcp4 to a remote pod (SNAT)", PROG_TC_INGRESS, tcp4(CLIENT, 40001, VIP, 81, true, b"")),
        ("tcp6 first packet", PROG_TC_INGRESS, tcp6(CLIENT6, 40000, VIP6, 80, true, b"")),
        ("tcp6 established", PROG_TC_INGRESS, tcp6(CLIENT6, 40000, VIP6, 80, false, b"GET /")),
        ("tcp6 reply", PROG_TC_EGRESS, tcp6(LOCAL6, 8080, CLIENT6, 40000, false, b"200")),
        ("udp6 query", PROG_TC_INGRESS, udp6(CLIENT6, 5000, VIP6, 53, b"query")),
        ("udp6 answer", PROG_TC_EGRESS, udp6(LOCAL6, 5353, CLIENT6, 5000, b"answer")),
        ("sctp4 INIT", PROG_TC_INGRESS, sctp4(CLIENT, 40000, VIP, 2905, SCTP_INIT)),
        ("sctp4 INIT ACK", PROG_TC_EGRESS, sctp4(LOCAL_POD, 3905, CLIENT, 40000, SCTP_INIT_ACK)),
        ("sctp6 INIT", PROG_TC_INGRESS, sctp6(CLIENT6, 40000, VIP6, 2905, SCTP_INIT)),
        ("sctp6 INIT ACK", PROG_TC_EGRESS, sctp6(LOCAL6, 3905, CLIENT6, 40000, SCTP_INIT_ACK)),
        // An answer as long as the packet keeps CHECKSUM_COMPLETE; one of another length does
        // not (the kernel's resize makes it CHECKSUM_NONE, and the stack sums it), which this
        // check of the kernel's does not model: it compares the sum whatever the state.
        (
            "no endpoint: port unreachable, as long as the SYN",
            PROG_TC_INGRESS,
            tcp4(CLIENT, 40002, VIP, 82, true, &[1u8; 16]),
        ),
    ];
    let frags = |name, frames: Vec<Vec<u8>>, steps: &mut Vec<(&str, &str, Vec<u8>)>| {
        for f in frames {
            steps.push((name, PROG_TC_INGRESS, f));
        }
    };
    frags("udp4 fragments", fragments(&udp4(CLIENT, 5001, VIP, 53, &big), 1232, 7), &mut steps);
    frags("udp6 fragments", fragments(&udp6(CLIENT6, 5001, VIP6, 53, &big), 1232, 7), &mut steps);
    let mut failures = Vec::new();
    let mut snat_port = None;
    for (what, prog, packet) in steps {
        match dp.run_checksum_complete(prog, &packet) {
            Ok(out) if out.packet == packet => failures.push(format!("{what}: not translated")),
            Ok(out) => {
                if let Err(e) = own_checksums(&out.packet) {
                    failures.push(format!("{what}: {e}"));
                }
                if what.contains("without checksum") && out.packet[14 + 20 + 6..][..2] != [0, 0] {
                    failures.push(format!("{what}: a checksum of 0 (none) was changed"));
                }
                if what.contains("SNAT") {
                    snat_port = summarize(&out.packet).map(|s| s.src.port());
                }
            }
            Err(e) => failures.push(format!("{what}: {e}")),
        }
    }
    // The remote pod's reply, and an ICMP error from the local pod about the DNS flow.
    let port = snat_port.expect("the SNAT flow's port");
    let late = [
        ("SNAT reply", PROG_TC_INGRESS, tcp4(REMOTE_POD, 8080, NODE, port, true, b"")),
        (
            "ICMP port unreachable from a pod",
            PROG_TC_EGRESS,
            icmp4_error(
                LOCAL_POD,
                CLIENT,
                Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port),
                &udp4(CLIENT, 5000, LOCAL_POD, 5353, b"query"),
            ),
        ),
    ];
    for (what, prog, packet) in late {
        match dp.run_checksum_complete(prog, &packet) {
            Ok(out) if out.packet == packet => failures.push(format!("{what}: not translated")),
            Ok(out) => {
                if let Err(e) = own_checksums(&out.packet) {
                    failures.push(format!("{what}: {e}"));
                }
            }
            Err(e) => failures.push(format!("{what}: {e}")),
        }
    }
    assert_eq!(dp.stat(STAT_FRAGMENT_TRANSLATED), 4, "the later fragments were translated");
    assert_eq!(dp.stat(STAT_REJECT_NO_BACKEND), 1);
    // A TCP reset (--reject-tcp-with reset) answers a bare SYN with as many bytes.
    let mut dp = dp;
    dp.set_options(&Options { reject_tcp_with: RejectTcpWith::Reset, ..Default::default() });
    let syn = tcp4(CLIENT, 40003, VIP, 82, true, b"");
    match dp.run_checksum_complete(PROG_TC_INGRESS, &syn) {
        Ok(out) if out.packet.len() == syn.len() && out.packet != syn => {}
        Ok(out) => failures.push(format!("TCP reset: {} bytes out", out.packet.len())),
        Err(e) => failures.push(format!("TCP reset: {e}")),
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// `packet` (UDP over IPv4) with a checksum of 0: none.
fn no_udp_checksum(mut packet: Vec<u8>) -> Vec<u8> {
    packet[14 + 20 + 6..][..2].copy_from_slice(&[0, 0]);
    packet
}

/// The checksums a translated TCP/UDP/SCTP packet carries (`checksums_ok`); others (ICMP)
/// pass.
fn own_checksums(packet: &[u8]) -> Result<(), String> {
    match summarize(packet) {
        Some(s) if [6, 17, 132].contains(&s.proto) => checksums_ok(packet),
        _ => Ok(()),
    }
}

/// A packet its device verified (CHECKSUM_UNNECESSARY, as most NICs hand packets over) gets
/// the same translation as an unverified one, its transport checksum updated in place rather
/// than by the checksum helpers: the same bytes, right sums, a UDP checksum of 0 left 0.
#[test]
fn a_verified_packet_gets_the_same_translation_with_its_checksums_updated_in_place() {
    require_root!();
    let (mut verified, mut plain) = (datapath(), datapath());
    let steps = [
        ("tcp4 first packet", tcp4(CLIENT, 41000, VIP, 80, true, b"")),
        ("tcp4 established", tcp4(CLIENT, 41000, VIP, 80, false, b"GET /")),
        ("udp4 query", udp4(CLIENT, 5100, VIP, 53, b"query")),
        ("udp4 without checksum", no_udp_checksum(udp4(CLIENT, 5101, VIP, 53, b"q"))),
        ("tcp6 first packet", tcp6(CLIENT6, 41000, VIP6, 80, true, b"")),
        ("tcp6 established", tcp6(CLIENT6, 41000, VIP6, 80, false, b"GET /")),
        ("udp6 query", udp6(CLIENT6, 5100, VIP6, 53, b"query")),
        ("sctp4 INIT (its CRC: no change)", sctp4(CLIENT, 41000, VIP, 2905, SCTP_INIT)),
    ];
    for (what, packet) in steps {
        let out = verified.run(PROG_BENCH_TC_INGRESS_VERIFIED, &packet);
        let want = plain.run(PROG_TC_INGRESS, &packet);
        assert_ne!(out.packet, packet, "{what}: not translated");
        assert_eq!((out.verdict, &out.packet), (want.verdict, &want.packet), "{what}");
        own_checksums(&out.packet).unwrap_or_else(|e| panic!("{what}: {e}"));
        if what.contains("without checksum") {
            assert_eq!(out.packet[14 + 20 + 6..][..2], [0, 0], "{what}");
        }
    }
    // A remote backend's flow (SNAT: its port is the node's choice), and its reply.
    let out =
        verified.run(PROG_BENCH_TC_INGRESS_VERIFIED, &tcp4(CLIENT, 41001, VIP, 81, true, b""));
    own_checksums(&out.packet).unwrap();
    let s = summarize(&out.packet).expect("a TCP packet");
    assert_eq!((s.src.ip(), s.dst), (NODE.into(), sa(REMOTE_POD, 8080)));
    let reply = tcp4(REMOTE_POD, 8080, NODE, s.src.port(), true, b"");
    let out = verified.run(PROG_BENCH_TC_INGRESS_VERIFIED, &reply);
    own_checksums(&out.packet).unwrap();
    let s = summarize(&out.packet).expect("a TCP packet");
    assert_eq!((s.src, s.dst), (sa(VIP, 81), sa(CLIENT, 41001)));
}
