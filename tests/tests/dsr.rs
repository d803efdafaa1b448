//! Direct server return (`--lb-mode hybrid`) on the device hooks (BPF_PROG_TEST_RUN): the node
//! that chooses another node's backend sends the flow on with the client's address, its SYN
//! carrying the frontend in an IPv4 option; the backend's node learns the frontend from it and
//! gives the backend's answers the frontend's address. Checked: verdicts, bytes, checksums,
//! conntrack entries and their states, on both nodes; UDP keeps SNAT; without the mode,
//! nothing changes.

use std::net::{IpAddr, Ipv4Addr};

use lb_agent::dataplane::options::{LbMode, Options};
use lb_agent::model::plan::Protocol;
use lb_common::*;
use lb_tests::{
    addrs::*,
    kernel::{Datapath, run_checked as run},
    packets::*,
    plans::{backend, lb_plan, simple_plan},
    require_root,
};

/// A node whose one backend of `VIP:80` is `REMOTE_POD:8080`, on this node (`local`) or not.
fn node(local: bool, mode: LbMode) -> Datapath {
    let mut dp = Datapath::load();
    dp.set_node(Some(NODE.into()), Some("fd00:1::11".parse().unwrap()));
    dp.set_options(&Options { lb_mode: mode, ..Default::default() });
    let mut plans = vec![lb_plan(
        "web",
        VIP.into(),
        80,
        Protocol::Tcp,
        vec![backend(REMOTE_POD.into(), 8080, local)],
    )];
    plans.push(lb_plan(
        "web6",
        VIP6.into(),
        80,
        Protocol::Tcp,
        vec![backend(REMOTE6.into(), 8080, local)],
    ));
    plans.push(lb_plan(
        "dns",
        VIP.into(),
        53,
        Protocol::Udp,
        vec![backend(REMOTE_POD.into(), 5353, local)],
    ));
    dp.program("web", &plans);
    dp
}

/// The IPv4 header's length in bytes.
fn ihl(frame: &[u8]) -> usize {
    usize::from(frame[14] & 0x0f) * 4
}

#[test]
fn a_syn_carries_its_frontend_to_the_backends_node_which_answers_the_client_from_it() {
    require_root!();
    let mut a = node(false, LbMode::Hybrid);
    let mut b = node(true, LbMode::Hybrid);

    // Node A: DNAT only, the SYN grows by the option naming VIP:80.
    let syn = tcp4(CLIENT, 40001, VIP, 80, true, b"");
    let out = a.run(PROG_TC_INGRESS, &syn);
    // Sent on (redirect), or to the stack where the test context has no route.
    assert!(out.verdict == TC_ACT_REDIRECT || out.verdict == TC_ACT_OK, "{}", out.verdict);
    let sent = out.packet;
    checksums_ok(&sent).unwrap();
    let s = summarize(&sent).unwrap();
    assert_eq!((s.src, s.dst), (sa(CLIENT, 40001), sa(REMOTE_POD, 8080)), "client kept");
    assert_eq!((sent.len(), ihl(&sent)), (syn.len() + 8, 28));
    assert_eq!(u16::from_be_bytes([sent[16], sent[17]]) as usize, sent.len() - 14, "total length");
    let vip = VIP.octets();
    assert_eq!(&sent[34..42], &[0x9e, 8, 0, 80, vip[0], vip[1], vip[2], vip[3]], "the option");
    let ct = a.conntrack();
    assert_eq!(ct.len(), 1, "a forward entry only: {ct:?}");
    assert_eq!(ct[0].1.flags, CT_F_DSR);
    assert_eq!(a.stat(STAT_CT_NEW), 1);

    // The rest of the flow: DNAT, no option.
    let ack = tcp4(CLIENT, 40001, VIP, 80, false, b"GET /");
    let out = a.run(PROG_TC_INGRESS, &ack);
    checksums_ok(&out.packet).unwrap();
    assert_eq!((out.packet.len(), ihl(&out.packet)), (ack.len(), 20));
    assert_eq!(summarize(&out.packet).unwrap().dst, sa(REMOTE_POD, 8080));
    assert_eq!(a.conntrack()[0].1.state, CT_STATE_ESTABLISHED);
    // A retransmitted SYN carries the option again.
    let out = a.run(PROG_TC_INGRESS, &syn);
    assert_eq!(out.packet, sent);

    // Node B: the SYN passes untouched and leaves the reply entry.
    let out = b.run(PROG_TC_INGRESS, &sent);
    assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, &sent));
    assert_eq!(b.stat(STAT_DSR_LEARNED), 1);
    let ct = b.conntrack();
    assert_eq!(ct.len(), 1, "{ct:?}");
    let (k, v) = &ct[0];
    assert_eq!((k.sport_be, k.dport_be), (8080u16.to_be(), 40001u16.to_be()));
    assert_eq!(
        (v.flags, v.new_sport_be, v.new_dport_be),
        (CT_F_REPLY | CT_F_DSR, 80u16.to_be(), 40001u16.to_be())
    );
    let web = b.service_id("web");
    assert_eq!(v.service_id, web, "the answers are the frontend's service's");
    // The backend's answers leave node B from the frontend, to the client, counted as the
    // service's there.
    let (verdict, r) =
        run(&mut b, PROG_TC_EGRESS, &tcp4(REMOTE_POD, 8080, CLIENT, 40001, false, b"200 OK"));
    assert_eq!((verdict, r.src, r.dst), (TC_ACT_OK, sa(VIP, 80), sa(CLIENT, 40001)));
    assert_eq!(b.service_stats(web).packets, 1);
    // Node B's other packets of the flow are not its business.
    let out = b.run(PROG_TC_INGRESS, &tcp4(CLIENT, 40001, REMOTE_POD, 8080, false, b"x"));
    assert_eq!(b.stat(STAT_DSR_LEARNED), 1);
    assert_eq!(out.verdict, TC_ACT_OK);

    // A FIN closes the flow on each node (each sees one direction only).
    a.run(PROG_TC_INGRESS, &tcp4_end(CLIENT, 40001, VIP, 80, false));
    let ct = a.conntrack();
    let (_, v) = ct.iter().find(|(k, _)| k.sport_be == 40001u16.to_be()).expect("the flow");
    assert_eq!(v.state, CT_STATE_CLOSING);
    b.run(PROG_TC_EGRESS, &tcp4_end(REMOTE_POD, 8080, CLIENT, 40001, false));
    assert_eq!(b.conntrack()[0].1.state, CT_STATE_CLOSING);
}

/// A NodePort of node A's address is none of node B's frontends: B finds its service by the
/// port on its own address. A node that knows no such frontend still answers from it, counting
/// the answers under no service.
#[test]
fn a_nodeports_answers_count_as_its_service_on_the_backends_node() {
    require_root!();
    let node_b = Ipv4Addr::new(192, 168, 1, 12);
    let with_nodeport = |node: Ipv4Addr, local: bool| {
        let mut dp = Datapath::load();
        dp.set_node(Some(node.into()), None);
        dp.set_options(&Options { lb_mode: LbMode::Hybrid, ..Default::default() });
        let backends = vec![backend(REMOTE_POD.into(), 8080, local)];
        let plan =
            simple_plan("web", Ipv4Addr::new(10, 96, 0, 10).into(), node.into(), 30080, backends);
        dp.program("web", &[plan]);
        dp
    };
    let mut a = with_nodeport(NODE, false);
    let mut b = with_nodeport(node_b, true);
    let sent = a.run(PROG_TC_INGRESS, &tcp4(CLIENT, 40002, NODE, 30080, true, b"")).packet;
    assert_eq!(summarize(&sent).unwrap().dst, sa(REMOTE_POD, 8080));
    let answer = tcp4(REMOTE_POD, 8080, CLIENT, 40002, false, b"200 OK");
    b.run(PROG_TC_INGRESS, &sent);
    let web = b.service_id("web");
    assert_eq!(b.conntrack()[0].1.service_id, web);
    let (verdict, r) = run(&mut b, PROG_TC_EGRESS, &answer);
    assert_eq!((verdict, r.src, r.dst), (TC_ACT_OK, sa(NODE, 30080), sa(CLIENT, 40002)));
    assert_eq!(b.service_stats(web).packets, 1);

    // A node with another service on the backend's port, none on 30080.
    let mut c = node(true, LbMode::Hybrid);
    c.run(PROG_TC_INGRESS, &sent);
    assert_eq!(c.stat(STAT_DSR_LEARNED), 1);
    assert_eq!(c.conntrack()[0].1.service_id, 0);
    let (verdict, r) = run(&mut c, PROG_TC_EGRESS, &answer);
    assert_eq!((verdict, r.src, r.dst), (TC_ACT_OK, sa(NODE, 30080), sa(CLIENT, 40002)));
    let web_c = c.service_id("web");
    assert_eq!(c.service_stats(web_c).packets, 0);
}

/// A router on the way to the client cannot forward a DSR flow's big answer, which left the
/// backend's node from the frontend: its "fragmentation needed" (IPv4) or "packet too big"
/// (IPv6) goes to the frontend, the node that chose the backend, whose forward entry sends it
/// on to the backend, quoting the answer as the backend sent it, so the pod's path MTU drops.
/// The backend's node passes it to the pod untouched.
#[test]
fn fragmentation_needed_about_a_dsr_flows_answer_reaches_its_backend() {
    require_root!();
    let mut a = node(false, LbMode::Hybrid);
    let mut b = node(true, LbMode::Hybrid);
    let router = Ipv4Addr::new(198, 51, 100, 1);
    let sent = a.run(PROG_TC_INGRESS, &tcp4(CLIENT, 40003, VIP, 80, true, b"")).packet;
    b.run(PROG_TC_INGRESS, &sent);
    let answer = tcp4(REMOTE_POD, 8080, CLIENT, 40003, false, &[7; 1400]);
    let answer = b.run(PROG_TC_EGRESS, &answer).packet;
    assert_eq!(summarize(&answer).unwrap().src, sa(VIP, 80));
    let too_big = etherparse::Icmpv4Type::DestinationUnreachable(
        etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1280 },
    );
    let error = icmp4_error(router, VIP, too_big, &answer);
    let out = a.run(PROG_TC_INGRESS, &error);
    let e = icmp_error(&out.packet).unwrap();
    assert_eq!(
        (e.src, e.dst, e.quoted_src, e.quoted_dst),
        (IpAddr::from(router), IpAddr::from(REMOTE_POD), sa(REMOTE_POD, 8080), sa(CLIENT, 40003)),
        "to the backend, about what it sent"
    );
    assert_eq!(e.rest[2..], 1280u16.to_be_bytes(), "the MTU is kept");
    assert!(out.verdict == TC_ACT_OK || out.verdict == TC_ACT_REDIRECT, "{}", out.verdict);
    assert_eq!(a.stat(STAT_ICMP_ERROR_TRANSLATED), 1);
    let at_b = b.run(PROG_TC_INGRESS, &out.packet);
    assert_eq!((at_b.verdict, &at_b.packet), (TC_ACT_OK, &out.packet), "untouched on B");

    // IPv6: packet too big, quoting what fits in 1280 bytes.
    let router6: std::net::Ipv6Addr = "2001:db8:ff::1".parse().unwrap();
    let sent = a.run(PROG_TC_INGRESS, &tcp6(CLIENT6, 40003, VIP6, 80, true, b"")).packet;
    b.run(PROG_TC_INGRESS, &sent);
    let answer = tcp6(REMOTE6, 8080, CLIENT6, 40003, false, &[7; 1400]);
    let answer = b.run(PROG_TC_EGRESS, &answer).packet;
    assert_eq!(summarize(&answer).unwrap().src, sa(VIP6, 80));
    let error = icmp6_error(
        router6,
        VIP6,
        etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 },
        &answer[..14 + 1232],
    );
    let out = a.run(PROG_TC_INGRESS, &error);
    let e = icmp_error(&out.packet).unwrap();
    assert_eq!(
        (e.src, e.dst, e.quoted_src, e.quoted_dst),
        (IpAddr::from(router6), IpAddr::from(REMOTE6), sa(REMOTE6, 8080), sa(CLIENT6, 40003))
    );
    assert_eq!(a.stat(STAT_ICMP_ERROR_TRANSLATED), 2);
    let at_b = b.run(PROG_TC_INGRESS, &out.packet);
    assert_eq!((at_b.verdict, &at_b.packet), (TC_ACT_OK, &out.packet), "untouched on B");
}

#[test]
fn ipv6_syns_carry_their_frontend_in_a_destination_options_header() {
    require_root!();
    let mut a = node(false, LbMode::Hybrid);
    let mut b = node(true, LbMode::Hybrid);
    let syn = tcp6(CLIENT6, 40001, VIP6, 80, true, b"");
    let out = a.run(PROG_TC_INGRESS, &syn);
    assert!(out.verdict == TC_ACT_REDIRECT || out.verdict == TC_ACT_OK, "{}", out.verdict);
    let sent = out.packet;
    checksums_ok(&sent).unwrap();
    let s = summarize(&sent).unwrap();
    assert_eq!((s.src, s.dst), (sa(CLIENT6, 40001), sa(REMOTE6, 8080)), "client kept");
    assert_eq!(sent.len(), syn.len() + 24);
    assert_eq!(
        u16::from_be_bytes([sent[18], sent[19]]) as usize,
        sent.len() - 54,
        "payload length"
    );
    assert_eq!(sent[20], 60, "a destination options header first");
    let mut ext = vec![6, 2, 0x1e, 18, 0, 80];
    ext.extend(VIP6.octets());
    ext.extend([1, 0]);
    assert_eq!(&sent[54..78], &ext[..], "the header");
    assert_eq!(a.conntrack().len(), 1);
    assert_eq!(a.conntrack()[0].1.flags, CT_F_DSR);

    let out = b.run(PROG_TC_INGRESS, &sent);
    assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, &sent));
    assert_eq!(b.stat(STAT_DSR_LEARNED), 1);
    let (verdict, r) =
        run(&mut b, PROG_TC_EGRESS, &tcp6(REMOTE6, 8080, CLIENT6, 40001, false, b"200 OK"));
    assert_eq!((verdict, r.src, r.dst), (TC_ACT_OK, sa(VIP6, 80), sa(CLIENT6, 40001)));
    // The rest of the flow carries nothing.
    let ack = tcp6(CLIENT6, 40001, VIP6, 80, false, b"GET /");
    let out = a.run(PROG_TC_INGRESS, &ack);
    checksums_ok(&out.packet).unwrap();
    assert_eq!((out.packet.len(), out.packet[20]), (ack.len(), 6));
}

/// The kernel finds an skb's CHECKSUM_COMPLETE sum right after the option or the header went
/// in (BPF_F_TEST_SKB_CHECKSUM_COMPLETE, as `checksum_complete.rs`; not run in the older
/// kernels' VMs, as that test is not).
#[test]
fn the_frontend_in_a_syn_keeps_a_checksum_complete_sum_right() {
    require_root!();
    let mut a = node(false, LbMode::Hybrid);
    let out = a.run_checksum_complete(PROG_TC_INGRESS, &tcp4(CLIENT, 40003, VIP, 80, true, b""));
    assert_eq!(ihl(&out.expect("IPv4: sum kept right").packet), 28);
    let out = a.run_checksum_complete(PROG_TC_INGRESS, &tcp6(CLIENT6, 40003, VIP6, 80, true, b""));
    assert_eq!(out.expect("IPv6: sum kept right").packet[20], 60);
}

#[test]
fn xdp_leaves_a_dsr_syn_to_tc_and_udp_keeps_snat() {
    require_root!();
    let mut a = node(false, LbMode::Hybrid);
    let syn = tcp4(CLIENT, 40001, VIP, 80, true, b"");
    let out = a.run(PROG_XDP_INGRESS, &syn);
    assert_eq!((out.verdict, &out.packet), (XDP_PASS, &syn));
    assert_eq!(a.stat(STAT_XDP_TO_TC), 1);
    assert!(a.conntrack().is_empty());

    // UDP: SNAT to the node as before.
    let (_, s) = run(&mut a, PROG_TC_INGRESS, &udp4(CLIENT, 40002, VIP, 53, b"q"));
    assert_eq!((s.src.ip(), s.dst), (IpAddr::from(NODE), sa(REMOTE_POD, 5353)));
    assert!(
        a.conntrack()
            .iter()
            .all(|(_, v)| v.flags == CT_F_SNAT || v.flags == CT_F_SNAT | CT_F_REPLY)
    );
}

/// Without the mode a node SNATs, but still answers a DSR flow's SYN another node sent from
/// the frontend it names: switching the mode node by node (a DaemonSet's rolling update, either
/// way) breaks no connection between nodes that run this build. Only a SYN to one of its
/// backends' ports that carries the frontend whole is taken.
#[test]
fn without_the_mode_flows_are_snated_but_a_dsr_syn_is_still_answered_from_its_frontend() {
    require_root!();
    let mut a = node(false, LbMode::Snat);
    let (_, s) = run(&mut a, PROG_TC_INGRESS, &tcp4(CLIENT, 40001, VIP, 80, true, b""));
    assert_eq!(s.src.ip(), IpAddr::from(NODE));
    assert_eq!(ihl(&a.run(PROG_TC_INGRESS, &tcp4(CLIENT, 40009, VIP, 80, true, b"")).packet), 20);

    let mut hybrid = node(false, LbMode::Hybrid);
    let sent = hybrid.run(PROG_TC_INGRESS, &tcp4(CLIENT, 40001, VIP, 80, true, b"")).packet;
    let mut b = node(true, LbMode::Snat);
    // Not taken: the option's type or length changed, the packet no SYN, or to a port no
    // backend of this node's has. Each passes untouched.
    let altered = |at: usize, value: u8| {
        let mut p = sent.clone();
        p[at] = value;
        fix_ipv4_checksum(&mut p);
        p
    };
    let mut ack = sent.clone();
    ack[14 + 28 + 13] = 0x10;
    fix_l4_checksum(&mut ack);
    let mut other_port = sent.clone();
    other_port[14 + 28 + 2..14 + 28 + 4].copy_from_slice(&9090u16.to_be_bytes());
    fix_l4_checksum(&mut other_port);
    for p in [altered(34, 0x9f), altered(35, 12), ack, other_port] {
        let out = b.run(PROG_TC_INGRESS, &p);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, &p));
    }
    assert_eq!(b.stat(STAT_DSR_LEARNED), 0);
    assert!(b.conntrack().is_empty());
    // Taken.
    let out = b.run(PROG_TC_INGRESS, &sent);
    assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, &sent));
    assert_eq!(b.stat(STAT_DSR_LEARNED), 1);
    let (_, r) = run(&mut b, PROG_TC_EGRESS, &tcp4(REMOTE_POD, 8080, CLIENT, 40001, false, b"ok"));
    assert_eq!(r.src, sa(VIP, 80));
}

/// A SYN naming a frontend for the tuple of a live flow that the backend's node translates
/// itself (forged: that flow's client sends no new SYN on it) leaves the flow's reply entry
/// alone, counted, and passes on untouched; once the flow has ended, a DSR SYN on its tuple is
/// a new connection, and taken.
#[test]
fn a_dsr_syn_does_not_take_over_a_live_flow_of_the_backends_node() {
    require_root!();
    let mut a = node(false, LbMode::Hybrid);
    let mut b = node(true, LbMode::Hybrid);
    // B's own flow to its local backend, established.
    let (_, s) = run(&mut b, PROG_TC_INGRESS, &tcp4(CLIENT, 40007, VIP, 80, true, b""));
    assert_eq!(s.dst, sa(REMOTE_POD, 8080));
    run(&mut b, PROG_TC_INGRESS, &tcp4(CLIENT, 40007, VIP, 80, false, b"GET /"));
    let before = b.conntrack_sorted(true);
    // A's DSR SYN of that tuple, its option altered to name another frontend.
    let mut forged = a.run(PROG_TC_INGRESS, &tcp4(CLIENT, 40007, VIP, 80, true, b"")).packet;
    forged[36..38].copy_from_slice(&81u16.to_be_bytes());
    forged[38..42].copy_from_slice(&[198, 51, 100, 99]);
    fix_ipv4_checksum(&mut forged);
    let out = b.run(PROG_TC_INGRESS, &forged);
    assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, &forged), "passed on untouched");
    assert_eq!((b.stat(STAT_DSR_REFUSED), b.stat(STAT_DSR_LEARNED)), (1, 0));
    assert_eq!(b.conntrack_sorted(true), before, "the flow's entries as they were");
    let answer = tcp4(REMOTE_POD, 8080, CLIENT, 40007, false, b"200 OK");
    let (_, r) = run(&mut b, PROG_TC_EGRESS, &answer);
    assert_eq!((r.src, r.dst), (sa(VIP, 80), sa(CLIENT, 40007)), "answered from its frontend");

    // The client resets the flow; a new connection on the tuple by DSR takes the entry.
    b.run(PROG_TC_INGRESS, &tcp4_end(CLIENT, 40007, VIP, 80, true));
    let out = b.run(PROG_TC_INGRESS, &forged);
    assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, &forged));
    assert_eq!((b.stat(STAT_DSR_REFUSED), b.stat(STAT_DSR_LEARNED)), (1, 1));
    let (_, r) = run(&mut b, PROG_TC_EGRESS, &answer);
    assert_eq!(r.src, sa(Ipv4Addr::new(198, 51, 100, 99), 81), "the new flow's frontend");
}
