//! SCTP services on the device hooks (BPF_PROG_TEST_RUN): an association's first packet (INIT),
//! its established packets and its replies are translated like TCP's, by tc and XDP, both
//! families, local and remote (SNAT) backends, pods' devices; and the CRC32c stays right
//! although ports change (no kernel helper sums SCTP: `lb_common::crc32c`). Every packet out
//! is checked against a CRC computed over its bytes. Also: a checksum of 0 (to be summed by
//! the device) stays 0, ABORT and SHUTDOWN COMPLETE end the flow, an INIT to a service without
//! endpoints is refused with ICMP port unreachable (an ABORT never is), and SCTP in IP
//! fragments is left untranslated.

use std::net::{IpAddr, Ipv4Addr};

use lb_agent::model::plan::{Protocol, ServicePlan};
use lb_common::*;
use lb_tests::{
    addrs::*,
    kernel::{Datapath, run_checked as run},
    packets::*,
    plans::{backend, lb_plan, simple_plan},
    require_root,
};

/// M3UA's port on the frontend; the pods listen on another, so every translation moves a port.
const PORT: u16 = 2905;
const POD_PORT: u16 = 3905;

fn sigtran(vip: IpAddr, backends: Vec<lb_agent::model::plan::Backend>) -> ServicePlan {
    lb_plan("sigtran", vip, PORT, Protocol::Sctp, backends)
}

fn datapath(plans: &[ServicePlan]) -> Datapath {
    let mut dp = Datapath::load();
    dp.set_node(Some(NODE.into()), Some(NODE6.into()));
    dp.program("sigtran", plans);
    dp
}

fn state_of(dp: &Datapath, client_port: u16) -> u8 {
    let ct = dp.conntrack();
    let (_, v) = ct.iter().find(|(k, _)| k.sport_be == client_port.to_be()).expect("forward entry");
    v.state
}

#[test]
fn an_association_to_a_local_backend_is_translated_both_ways_with_its_crc_kept_right() {
    require_root!();
    let mut dp = datapath(&[sigtran(VIP.into(), vec![backend(LOCAL_POD.into(), POD_PORT, true)])]);

    let (verdict, s) = run(&mut dp, PROG_TC_INGRESS, &sctp4(CLIENT, 40000, VIP, PORT, SCTP_INIT));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((s.src, s.dst), (sa(CLIENT, 40000), sa(LOCAL_POD, POD_PORT)));
    assert_eq!(dp.stat(STAT_CT_NEW), 1);
    let ct = dp.conntrack();
    assert_eq!(ct.len(), 2, "forward and reply entries: {ct:?}");
    assert!(ct.iter().all(|(k, _)| k.proto == PROTO_SCTP));
    assert_eq!(state_of(&dp, 40000), CT_STATE_NEW);

    // The pod's INIT ACK leaves with the frontend as its source, and establishes the flow.
    let (verdict, r) =
        run(&mut dp, PROG_TC_EGRESS, &sctp4(LOCAL_POD, POD_PORT, CLIENT, 40000, SCTP_INIT_ACK));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((r.src, r.dst), (sa(VIP, PORT), sa(CLIENT, 40000)));
    assert_eq!(state_of(&dp, 40000), CT_STATE_ESTABLISHED);

    // DATA follows the entry, on tc and on XDP (direct writes there).
    for prog in [PROG_TC_INGRESS, PROG_XDP_INGRESS] {
        let (_, s) = run(&mut dp, prog, &sctp4(CLIENT, 40000, VIP, PORT, SCTP_DATA));
        assert_eq!(s.dst, sa(LOCAL_POD, POD_PORT), "{prog}");
    }
    assert_eq!(dp.stat(STAT_CT_HIT), 3);

    // SHUTDOWN COMPLETE ends it; an INIT on the same tuple opens it again.
    run(&mut dp, PROG_TC_INGRESS, &sctp4(CLIENT, 40000, VIP, PORT, SCTP_SHUTDOWN_COMPLETE));
    assert_eq!(state_of(&dp, 40000), CT_STATE_CLOSING);
    let (_, s) = run(&mut dp, PROG_TC_INGRESS, &sctp4(CLIENT, 40000, VIP, PORT, SCTP_INIT));
    assert_eq!(s.dst, sa(LOCAL_POD, POD_PORT));
    assert_eq!(state_of(&dp, 40000), CT_STATE_NEW);
    // An ABORT resets it (both entries: the reply one holds no SNAT port here, but would).
    run(&mut dp, PROG_TC_INGRESS, &sctp4(CLIENT, 40000, VIP, PORT, SCTP_ABORT));
    assert!(dp.conntrack().iter().all(|(_, v)| v.state == CT_STATE_RESET), "{:?}", dp.conntrack());

    // XDP starts flows too.
    let (verdict, s) = run(&mut dp, PROG_XDP_INGRESS, &sctp4(CLIENT, 40001, VIP, PORT, SCTP_INIT));
    assert_eq!((verdict, s.dst), (XDP_PASS, sa(LOCAL_POD, POD_PORT)));
    // IPv6, both hooks.
    dp.program("sigtran6", &[sigtran(VIP6.into(), vec![backend(LOCAL6.into(), POD_PORT, true)])]);
    for (prog, sport) in [(PROG_TC_INGRESS, 40003), (PROG_XDP_INGRESS, 40004)] {
        let (_, s) = run(&mut dp, prog, &sctp6(CLIENT6, sport, VIP6, PORT, SCTP_INIT));
        assert_eq!((s.src, s.dst), (sa(CLIENT6, sport), sa(LOCAL6, POD_PORT)), "{prog}");
        let (_, r) =
            run(&mut dp, PROG_TC_EGRESS, &sctp6(LOCAL6, POD_PORT, CLIENT6, sport, SCTP_INIT_ACK));
        assert_eq!(r.src, sa(VIP6, PORT), "{prog}");
    }
    // Another service's port on the address, with SCTP: no frontend, untouched.
    let other = sctp4(CLIENT, 40002, VIP, PORT + 1, SCTP_INIT);
    assert_eq!(dp.run(PROG_TC_INGRESS, &other).packet, other);
}

#[test]
fn a_remote_backend_gets_snat_and_its_replies_are_reversed_in_both_families() {
    require_root!();
    let mut dp =
        datapath(&[sigtran(VIP.into(), vec![backend(REMOTE_POD.into(), POD_PORT, false)])]);
    let remote6 = vec![backend(REMOTE6.into(), POD_PORT, false)];
    dp.program("sigtran6", &[lb_plan("sigtran6", VIP6.into(), PORT, Protocol::Sctp, remote6)]);
    let (verdict, s) = run(&mut dp, PROG_TC_INGRESS, &sctp4(CLIENT, 40010, VIP, PORT, SCTP_INIT));
    assert!(verdict == TC_ACT_REDIRECT || verdict == TC_ACT_OK, "verdict {verdict}");
    assert_eq!(s.src.ip(), IpAddr::from(NODE), "SNAT to the node address");
    assert!((NAT_PORT_MIN..=NAT_PORT_MAX).contains(&s.src.port()), "port {}", s.src.port());
    assert_eq!(s.dst, sa(REMOTE_POD, POD_PORT));
    let (_, r) = run(
        &mut dp,
        PROG_TC_INGRESS,
        &sctp4(REMOTE_POD, POD_PORT, NODE, s.src.port(), SCTP_INIT_ACK),
    );
    assert_eq!((r.src, r.dst), (sa(VIP, PORT), sa(CLIENT, 40010)));

    let (_, s) = run(&mut dp, PROG_TC_INGRESS, &sctp6(CLIENT6, 40010, VIP6, PORT, SCTP_INIT));
    assert_eq!((s.src.ip(), s.dst), (IpAddr::from(NODE6), sa(REMOTE6, POD_PORT)));
    let (_, r) = run(
        &mut dp,
        PROG_TC_INGRESS,
        &sctp6(REMOTE6, POD_PORT, NODE6, s.src.port(), SCTP_INIT_ACK),
    );
    assert_eq!((r.src, r.dst), (sa(VIP6, PORT), sa(CLIENT6, 40010)));
    let (_, s) = run(&mut dp, PROG_TC_INGRESS, &sctp6(CLIENT6, 40010, VIP6, PORT, SCTP_DATA));
    assert_eq!(s.dst, sa(REMOTE6, POD_PORT));
}

#[test]
fn a_checksum_of_zero_is_left_for_the_device_to_fill() {
    require_root!();
    let mut dp = datapath(&[sigtran(VIP.into(), vec![backend(LOCAL_POD.into(), POD_PORT, true)])]);
    for (prog, sport) in [(PROG_TC_INGRESS, 40020), (PROG_XDP_INGRESS, 40021)] {
        let mut p = sctp4(CLIENT, sport, VIP, PORT, SCTP_INIT);
        p[14 + 20 + 8..14 + 20 + 12].fill(0);
        let out = dp.run(prog, &p);
        assert_eq!(&out.packet[14 + 20 + 8..14 + 20 + 12], &[0; 4], "{prog}");
        assert_eq!(summarize(&out.packet).unwrap().dst, sa(LOCAL_POD, POD_PORT), "{prog}");
    }
}

#[test]
fn an_init_to_a_service_without_endpoints_is_refused_and_an_abort_never_answered() {
    require_root!();
    let mut dp = datapath(&[sigtran(VIP.into(), vec![])]);
    let init = sctp4(CLIENT, 40030, VIP, PORT, SCTP_INIT);
    let out = dp.run(PROG_TC_INGRESS, &init);
    assert_port_unreachable(&out.packet, &init);
    assert_eq!(dp.stat(STAT_REJECT_NO_BACKEND), 1);
    let abort = sctp4(CLIENT, 40030, VIP, PORT, SCTP_ABORT);
    let out = dp.run(PROG_TC_INGRESS, &abort);
    assert_eq!((out.verdict, dp.stat(STAT_REJECT_NO_BACKEND)), (TC_ACT_SHOT, 1), "dropped");
}

#[test]
fn sctp_in_ip_fragments_is_left_untranslated() {
    require_root!();
    let mut dp = datapath(&[sigtran(VIP.into(), vec![backend(LOCAL_POD.into(), POD_PORT, true)])]);
    let first = as_ipv4_fragment(&sctp4(CLIENT, 40040, VIP, PORT, SCTP_DATA), 0, true);
    let out = dp.run(PROG_TC_INGRESS, &first);
    assert_eq!(summarize(&out.packet).unwrap().dst, sa(VIP, PORT), "not translated");
    assert!(dp.conntrack().is_empty());
}

/// With `--pod-devices`, a pod reaches an SCTP ClusterIP through its device's hooks (the
/// socket hooks never see SCTP), and the reply gets the ClusterIP back on its way in.
#[test]
fn a_pods_association_to_a_clusterip_is_translated_on_its_device() {
    require_root!();
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const CLIENT_POD: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 9);
    let mut plan = simple_plan(
        "sigtran",
        CLUSTER_IP.into(),
        NODE.into(),
        30905,
        vec![backend(REMOTE_POD.into(), POD_PORT, false)],
    );
    plan.protocol = Protocol::Sctp;
    for f in &mut plan.frontends {
        if f.address == IpAddr::from(CLUSTER_IP) {
            f.port = PORT;
        }
    }
    let mut dp = datapath(&[plan]);
    let (_, s) =
        run(&mut dp, PROG_TC_FROM_POD, &sctp4(CLIENT_POD, 40050, CLUSTER_IP, PORT, SCTP_INIT));
    assert_eq!((s.src, s.dst), (sa(CLIENT_POD, 40050), sa(REMOTE_POD, POD_PORT)));
    let (_, r) = run(
        &mut dp,
        PROG_TC_TO_POD,
        &sctp4(REMOTE_POD, POD_PORT, CLIENT_POD, 40050, SCTP_INIT_ACK),
    );
    assert_eq!((r.src, r.dst), (sa(CLUSTER_IP, PORT), sa(CLIENT_POD, 40050)));
}

/// `lbctl explain CLIENT VIP:PORT/sctp` builds an INIT with its CRC, which the datapath takes
/// as any client's.
#[test]
fn lbctl_explains_an_sctp_init_the_datapath_takes() {
    require_root!();
    let mut dp = datapath(&[sigtran(VIP.into(), vec![backend(LOCAL_POD.into(), POD_PORT, true)])]);
    let init =
        lb_agent::explain::build_packet(sa(CLIENT, 40060), sa(VIP, PORT), PROTO_SCTP).unwrap();
    checksums_ok(&init).unwrap();
    let (verdict, s) = run(&mut dp, PROG_TC_INGRESS, &init);
    assert_eq!((verdict, s.proto, s.dst), (TC_ACT_OK, PROTO_SCTP, sa(LOCAL_POD, POD_PORT)));
    assert_eq!(state_of(&dp, 40060), CT_STATE_NEW, "an INIT opened the flow");
}

/// An INIT nobody answered is forgotten after 30 s idle; an answered association lives on
/// (210 s, netfilter's lifetime).
#[test]
fn an_unanswered_init_expires_after_30_s_and_an_answered_association_does_not() {
    require_root!();
    let mut dp = datapath(&[sigtran(VIP.into(), vec![backend(LOCAL_POD.into(), POD_PORT, true)])]);
    run(&mut dp, PROG_TC_INGRESS, &sctp4(CLIENT, 40070, VIP, PORT, SCTP_INIT));
    run(&mut dp, PROG_TC_INGRESS, &sctp4(CLIENT, 40071, VIP, PORT, SCTP_INIT));
    run(&mut dp, PROG_TC_EGRESS, &sctp4(LOCAL_POD, POD_PORT, CLIENT, 40071, SCTP_INIT_ACK));
    let idle = lb_tests::kernel::secs_ago_ns(31);
    for (k, v) in dp.conntrack() {
        dp.set_conntrack(k, CtValue { last_seen_ns: idle, ..v });
    }
    for port in [40070, 40071] {
        run(&mut dp, PROG_TC_INGRESS, &sctp4(CLIENT, port, VIP, PORT, SCTP_DATA));
    }
    assert_eq!(dp.stat(STAT_CT_EXPIRED), 1, "the unanswered one");
    assert_eq!(state_of(&dp, 40071), CT_STATE_ESTABLISHED);
    let t = CtTimeouts::default();
    assert_eq!(t.lifetime_s(PROTO_SCTP, CT_STATE_ESTABLISHED), 210);
    assert_eq!(t.lifetime_s(PROTO_SCTP, CT_STATE_NEW), 30);
}

/// Path MTU discovery through SNAT: a router's "fragmentation needed" about node -> pod
/// reaches the client about client -> frontend, the quoted verification tag untouched (SCTP
/// matches the error to its association by it).
#[test]
fn fragmentation_needed_about_an_snated_association_reaches_its_client() {
    require_root!();
    const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 1, 255, 1);
    let mut dp =
        datapath(&[sigtran(VIP.into(), vec![backend(REMOTE_POD.into(), POD_PORT, false)])]);
    let data = dp.run(PROG_TC_INGRESS, &sctp4(CLIENT, 40080, VIP, PORT, SCTP_DATA)).packet;
    assert_eq!(summarize(&data).unwrap().src.ip(), IpAddr::from(NODE));
    let kind = etherparse::Icmpv4Type::DestinationUnreachable(
        etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
    );
    let out = dp.run(PROG_TC_INGRESS, &icmp4_error(ROUTER, NODE, kind, &data)).packet;
    let e = icmp_error(&out).unwrap();
    assert_eq!(
        (e.src, e.dst, e.quoted_src, e.quoted_dst),
        (IpAddr::from(ROUTER), IpAddr::from(CLIENT), sa(CLIENT, 40080), sa(VIP, PORT))
    );
    // The quoted verification tag: ICMP (8), IPv4 (20), then SCTP's bytes 4..8.
    let at = 14 + 20 + 8 + 20 + 4;
    assert_eq!(out[at..at + 4], 0x5eed_0001u32.to_be_bytes());
    assert_eq!(dp.stat(STAT_ICMP_ERROR_TRANSLATED), 1);
}
