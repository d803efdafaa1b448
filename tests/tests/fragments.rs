//! Fragmented datagrams through the device hooks (BPF_PROG_TEST_RUN): every fragment of a
//! datagram to a frontend, and of its reply, gets the flow's translation, so the fragments that
//! come out reassemble into the translated datagram with a valid checksum. Only the first
//! fragment carries ports; the later ones are matched to it by the datagram's identity.

use std::net::{IpAddr, SocketAddr};

use lb_agent::model::plan::{Backend, Protocol};
use lb_common::*;
use lb_tests::{
    addrs::*,
    kernel::{Datapath, stat_deltas},
    packets::*,
    plans::{backend, lb_plan},
    require_root,
};

/// IP payload bytes per fragment: a 3,000-byte datagram comes in three.
const CHUNK: usize = 1232;

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// A UDP service on port 53 of `vip` with `backends` (port 5353).
fn dns(vip: IpAddr, backends: Vec<Backend>) -> Datapath {
    let mut dp = Datapath::load();
    dp.set_node(Some(NODE.into()), Some("fd00:1::11".parse().unwrap()));
    dp.program("dns", &[lb_plan("dns", vip, 53, Protocol::Udp, backends)]);
    dp
}

/// 3,000 bytes no two neighbouring fragments share.
fn payload() -> Vec<u8> {
    (0..3000u32).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => udp4(s, src.port(), d, dst.port(), payload),
        (IpAddr::V6(s), IpAddr::V6(d)) => udp6(s, src.port(), d, dst.port(), payload),
        _ => unreachable!("one family"),
    }
}

/// Runs every frame through `prog`, each with a verdict in `verdicts`: the frames that came out.
fn run_all(dp: &mut Datapath, prog: &str, frames: &[Vec<u8>], verdicts: &[i32]) -> Vec<Vec<u8>> {
    frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let out = dp.run(prog, f);
            assert!(verdicts.contains(&out.verdict), "{prog}, fragment {i}: {}", out.verdict);
            assert_eq!(out.packet.len(), f.len(), "{prog}, fragment {i}: length changed");
            out.packet
        })
        .collect()
}

/// Every fragment's addresses, then the reassembled datagram: its checksum, its ports, and the
/// payload as sent.
fn check_datagram(frames: &[Vec<u8>], src: SocketAddr, dst: SocketAddr, payload: &[u8]) {
    for (i, f) in frames.iter().enumerate() {
        let s = summarize(f).expect("an IP packet");
        assert_eq!((s.src.ip(), s.dst.ip()), (src.ip(), dst.ip()), "fragment {i}");
    }
    let whole = reassemble(frames).unwrap_or_else(|e| panic!("{e}"));
    checksums_ok(&whole).unwrap_or_else(|e| panic!("reassembled: {e}"));
    let s = summarize(&whole).unwrap();
    assert_eq!((s.src, s.dst), (src, dst), "reassembled");
    assert_eq!(whole[s.l4_off + 8..], *payload, "the payload as sent");
}

#[test]
fn every_fragment_of_a_datagram_and_of_its_reply_gets_the_flows_translation() {
    require_root!();
    let cases: [(IpAddr, IpAddr, IpAddr); 2] = [
        (CLIENT.into(), VIP.into(), LOCAL_POD.into()),
        (CLIENT6.into(), VIP6.into(), LOCAL6.into()),
    ];
    for (client, vip, pod) in cases {
        let mut dp = dns(vip, vec![backend(pod, 5353, true)]);
        let svc = dp.service_id("dns");
        let before = dp.stats();
        let query = fragments(&udp(sa(client, 5000), sa(vip, 53), &payload()), CHUNK, 0x1234);
        assert_eq!(query.len(), 3);
        let out = run_all(&mut dp, PROG_TC_INGRESS, &query, &[TC_ACT_OK]);
        check_datagram(&out, sa(client, 5000), sa(pod, 5353), &payload());
        // The pod's answer leaves through tc egress, fragmented by the pod: from the frontend.
        let answer = fragments(&udp(sa(pod, 5353), sa(client, 5000), &payload()), CHUNK, 0x4321);
        let out = run_all(&mut dp, PROG_TC_EGRESS, &answer, &[TC_ACT_OK]);
        check_datagram(&out, sa(vip, 53), sa(client, 5000), &payload());

        let moved = stat_deltas(&before, &dp.stats());
        let count = |name| moved.iter().find(|(n, _)| *n == name).map_or(0, |(_, d)| *d);
        assert_eq!(
            (count("ct_new"), count("ct_hit"), count("fragment_translated"), count("fragment")),
            (1, 1, 4, 0),
            "{client}: one flow, its first fragments through conntrack, the others through theirs: {moved:?}"
        );
        assert_eq!(dp.service_stats(svc).packets, 6, "{client}: every fragment counted");
    }
}

#[test]
fn fragments_to_a_remote_backend_and_back_get_snat_and_its_reversal() {
    require_root!();
    let mut dp = dns(VIP.into(), vec![backend(REMOTE_POD.into(), 5353, false)]);
    let query = fragments(&udp4(CLIENT, 5000, VIP, 53, &payload()), CHUNK, 0x1234);
    let sent = [TC_ACT_OK, TC_ACT_REDIRECT];
    let out = run_all(&mut dp, PROG_TC_INGRESS, &query, &sent);
    let nat_port = summarize(&out[0]).unwrap().src.port();
    check_datagram(&out, sa(NODE, nat_port), sa(REMOTE_POD, 5353), &payload());

    // The pod answers the node; its node's stack fragments the answer on the way.
    let answer = fragments(&udp4(REMOTE_POD, 5353, NODE, nat_port, &payload()), CHUNK, 0x4321);
    let out = run_all(&mut dp, PROG_TC_INGRESS, &answer, &sent);
    check_datagram(&out, sa(VIP, 53), sa(CLIENT, 5000), &payload());
    assert_eq!(dp.stat(STAT_FRAGMENT_TRANSLATED), 4);
}

#[test]
fn xdp_translates_a_first_fragment_and_hands_the_later_ones_to_tc() {
    require_root!();
    let mut dp = dns(VIP.into(), vec![backend(LOCAL_POD.into(), 5353, true)]);
    let query = fragments(&udp4(CLIENT, 5000, VIP, 53, &payload()), CHUNK, 0x1234);
    let first = run_all(&mut dp, PROG_XDP_INGRESS, &query[..1], &[XDP_PASS]);
    let later_xdp = run_all(&mut dp, PROG_XDP_INGRESS, &query[1..], &[XDP_PASS]);
    assert_eq!(later_xdp, query[1..], "XDP passes later fragments untouched");
    assert_eq!(dp.stat(STAT_FRAGMENT), 2);
    let later = run_all(&mut dp, PROG_TC_INGRESS, &later_xdp, &[TC_ACT_OK]);
    check_datagram(&[first, later].concat(), sa(CLIENT, 5000), sa(LOCAL_POD, 5353), &payload());
}

#[test]
fn later_fragments_of_datagrams_not_translated_here_pass_untouched() {
    require_root!();
    let mut dp = dns(VIP.into(), vec![backend(LOCAL_POD.into(), 5353, true)]);
    let query = fragments(&udp4(CLIENT, 5000, VIP, 53, &payload()), CHUNK, 0x1234);
    let untouched = |dp: &mut Datapath, frame: &Vec<u8>, why: &str| {
        let out = dp.run(PROG_TC_INGRESS, frame);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, frame), "{why}");
    };
    // Ahead of its first fragment: nothing to go by (the receiver loses the datagram, as it
    // would lose it to a reordering NAT; the sender's next one goes through).
    untouched(&mut dp, &query[2], "a later fragment ahead of its first");
    let first = run_all(&mut dp, PROG_TC_INGRESS, &query[..1], &[TC_ACT_OK]);
    assert_eq!(summarize(&first[0]).unwrap().dst, sa(LOCAL_POD, 5353));
    // Other datagrams: another identification, another client with the same one, a
    // datagram to the node itself.
    let other_id = fragments(&udp4(CLIENT, 5000, VIP, 53, &payload()), CHUNK, 0x1235);
    untouched(&mut dp, &other_id[1], "another datagram of the same flow, its first not seen");
    let other_client = fragments(&udp4(OTHER_CLIENT, 5000, VIP, 53, &payload()), CHUNK, 0x1234);
    untouched(&mut dp, &other_client[1], "another client's datagram with the same identification");
    let to_node = fragments(&udp4(CLIENT, 5000, NODE, 53, &payload()), CHUNK, 0x1234);
    untouched(&mut dp, &to_node[0], "a first fragment for no frontend");
    untouched(&mut dp, &to_node[1], "its later fragment");
    assert_eq!(dp.stat(STAT_FRAGMENT), 4);
    // The datagram's own later fragment still finds its flow.
    let later = run_all(&mut dp, PROG_TC_INGRESS, &query[1..2], &[TC_ACT_OK]);
    assert_eq!(summarize(&later[0]).unwrap().dst.ip(), IpAddr::from(LOCAL_POD));
    assert_eq!(dp.stat(STAT_FRAGMENT_TRANSLATED), 1);
}

/// IPv6 lets extension headers meant for the destination follow the fragment header, inside
/// the fragmented part: every fragment then names that header, not the transport, and the
/// later ones must still find their flow.
#[test]
fn ipv6_fragments_with_destination_options_inside_the_fragmented_part() {
    require_root!();
    let mut dp = dns(VIP6.into(), vec![backend(LOCAL6.into(), 5353, true)]);
    let datagram = with_ipv6_dest_opts(&udp(sa(CLIENT6, 5000), sa(VIP6, 53), &payload()));
    let query = fragments(&datagram, CHUNK, 0x1234);
    assert_eq!(query[1][14 + 40], 60, "the fragment header names destination options");
    let out = run_all(&mut dp, PROG_TC_INGRESS, &query, &[TC_ACT_OK]);
    check_datagram(&out, sa(CLIENT6, 5000), sa(LOCAL6, 5353), &payload());
    assert_eq!(dp.stat(STAT_FRAGMENT_TRANSLATED), 2);
}
