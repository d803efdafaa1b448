//! Translation on the device hooks (BPF_PROG_TEST_RUN): first packet, established packet,
//! replies (egress for local backends, ingress for SNATed remote ones), affinity, terminating
//! backends, no endpoints, source ranges, IPv6, XDP hand-off and a full conntrack map. Each test
//! checks verdict, rewritten bytes, checksums and conntrack state.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_agent::dataplane::attach::XdpTx;
use lb_agent::model::plan::{Backend, Protocol, ServicePlan, TrafficPolicy};
use lb_common::*;
use lb_tests::{
    addrs::*,
    kernel::{Datapath, TEST_MAP_SIZES, run_checked as run},
    packets::*,
    plans::{backend, lb_plan},
    require_root,
    routed::{self, RoutedNode, mac},
};

/// How long the datapath reuses a next hop (fib.rs NEXT_HOP_TTL_NS), and a little more.
const NEXT_HOP_TTL: std::time::Duration = std::time::Duration::from_millis(1100);

fn web(backends: Vec<Backend>) -> ServicePlan {
    lb_plan("web", VIP.into(), 80, Protocol::Tcp, backends)
}

fn datapath(backends: Vec<Backend>) -> Datapath {
    let mut dp = Datapath::load();
    dp.set_node(Some(NODE.into()), Some("fd00:1::11".parse().unwrap()));
    dp.program("web", &[web(backends)]);
    dp
}

#[test]
fn local_backend_first_packet_established_and_reply() {
    require_root!();
    let mut dp = datapath(vec![backend(LOCAL_POD.into(), 8080, true)]);

    let (verdict, s) = run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 40000, VIP, 80, true, b""));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        (s.src, s.dst),
        (sa(CLIENT, 40000), sa(LOCAL_POD, 8080)),
        "DNAT only: client address kept"
    );
    assert_eq!(dp.stat(STAT_CT_NEW), 1);
    let ct = dp.conntrack();
    assert_eq!(ct.len(), 2, "forward and reply entries: {ct:?}");
    let (_, fwd) = ct.iter().find(|(k, _)| k.sport_be == 40000u16.to_be()).expect("forward entry");
    assert_eq!(fwd.flags, 0);
    let (rk, rv) = ct.iter().find(|(_, v)| v.flags & CT_F_REPLY != 0).expect("reply entry");
    assert_eq!((rk.sport_be, rk.dport_be), (8080u16.to_be(), 40000u16.to_be()));
    assert_eq!(rv.new_sport_be, 80u16.to_be());

    // The rest of the connection follows the entry.
    let (_, s) = run(
        &mut dp,
        PROG_TC_INGRESS,
        &tcp4(CLIENT, 40000, VIP, 80, false, b"GET / HTTP/1.1\r\n\r\n"),
    );
    assert_eq!(s.dst, sa(LOCAL_POD, 8080));
    assert_eq!(dp.stat(STAT_CT_HIT), 1);

    // The pod's reply leaves the node with the frontend as source.
    let (verdict, s) = run(
        &mut dp,
        PROG_TC_EGRESS,
        &tcp4(LOCAL_POD, 8080, CLIENT, 40000, false, b"HTTP/1.1 200 OK\r\n\r\n"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!((s.src, s.dst), (sa(VIP, 80), sa(CLIENT, 40000)));
    assert_eq!(dp.stat(STAT_CT_HIT), 2);

    // Egress traffic that is no reply passes untouched.
    let other = tcp4(LOCAL_POD, 8080, OTHER_CLIENT, 1234, false, b"x");
    assert_eq!(dp.run(PROG_TC_EGRESS, &other).packet, other);
}

/// Entries carry CLOCK_MONOTONIC_COARSE, the clock ageing and `lbctl` compare against. The
/// datapath reads it through a per-CPU cache refreshed when jiffies moves (clock.rs): a stamp
/// must be the time of its packet, never a reading left from an earlier tick.
#[test]
fn conntrack_entries_are_stamped_with_the_coarse_clock_of_their_packet() {
    require_root!();
    let mut dp = datapath(vec![backend(LOCAL_POD.into(), 8080, true)]);
    // A reader may see jiffies move just before the timekeeper: one tick late (10 ms at HZ=100).
    const SLACK_NS: u64 = 20_000_000;
    let stamp = |dp: &mut Datapath, port: u16| {
        let ct = dp.conntrack();
        let (_, v) = ct.iter().find(|(k, _)| k.sport_be == port.to_be()).expect("forward entry");
        v.last_seen_ns
    };
    let mut stamps = Vec::new();
    for port in 41000..41005 {
        let before = lb_tests::kernel::coarse_now_ns();
        run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, port, VIP, 80, true, b""));
        let after = lb_tests::kernel::coarse_now_ns();
        let s = stamp(&mut dp, port);
        assert!((before - SLACK_NS..=after).contains(&s), "{before} <= {s} <= {after}");
        stamps.push(s);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for w in stamps.windows(2) {
        assert!(w[1] - w[0] >= 50_000_000 - SLACK_NS, "stamps 50 ms apart: {stamps:?}");
    }

    // An established packet refreshes a stamp older than a second to its own time.
    let (key, value) = dp
        .conntrack()
        .into_iter()
        .find(|(k, _)| k.sport_be == 41000u16.to_be())
        .expect("forward entry");
    let old = lb_tests::kernel::secs_ago_ns(5);
    dp.set_conntrack(key, CtValue { last_seen_ns: old, ..value });
    let before = lb_tests::kernel::coarse_now_ns();
    run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 41000, VIP, 80, false, b"x"));
    let after = lb_tests::kernel::coarse_now_ns();
    let s = stamp(&mut dp, 41000);
    assert!((before - SLACK_NS..=after).contains(&s), "refreshed: {before} <= {s} <= {after}");
}

/// Another CPU may stamp an entry with the next tick's time while this CPU's clock still reads
/// the previous tick (clock.rs): such an entry is live, not 2^64 ns old and expired.
#[test]
fn an_entry_stamped_a_tick_ahead_by_another_cpu_stays_live() {
    require_root!();
    let mut dp = datapath(vec![backend(LOCAL_POD.into(), 8080, true)]);
    run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 41010, VIP, 80, true, b""));
    let ahead = lb_tests::kernel::coarse_now_ns() + 10_000_000;
    for (k, v) in dp.conntrack() {
        dp.set_conntrack(k, CtValue { last_seen_ns: ahead, ..v });
    }
    let (_, s) = run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 41010, VIP, 80, false, b"more"));
    assert_eq!(s.dst, sa(LOCAL_POD, 8080));
    let (_, s) = run(&mut dp, PROG_TC_EGRESS, &tcp4(LOCAL_POD, 8080, CLIENT, 41010, false, b"ok"));
    assert_eq!(s.src, sa(VIP, 80));
    assert_eq!((dp.stat(STAT_CT_EXPIRED), dp.stat(STAT_CT_NEW)), (0, 1), "expired, new");
    assert_eq!(dp.stat(STAT_CT_HIT), 2);
}

#[test]
fn remote_backend_gets_snat_with_a_bpf_port_and_its_reply_is_reversed() {
    require_root!();
    let mut dp = datapath(vec![backend(REMOTE_POD.into(), 8080, false)]);
    let (verdict, s) = run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 40001, VIP, 80, true, b""));
    // Redirected out of the routed device, or handed to the stack when the test context has no
    // route (BPF_PROG_TEST_RUN); either way rewritten.
    assert!(verdict == TC_ACT_REDIRECT || verdict == TC_ACT_OK, "verdict {verdict}");
    assert_eq!(s.src.ip(), IpAddr::from(NODE), "SNAT to the node address");
    assert!((NAT_PORT_MIN..=NAT_PORT_MAX).contains(&s.src.port()), "port {}", s.src.port());
    assert_eq!(s.dst, sa(REMOTE_POD, 8080));
    let nat_port = s.src.port();
    let ct = dp.conntrack();
    assert!(ct.iter().all(|(_, v)| v.flags & CT_F_SNAT != 0), "{ct:?}");

    // The backend answers the node; the client gets it from the frontend.
    let (_, s) =
        run(&mut dp, PROG_TC_INGRESS, &tcp4(REMOTE_POD, 8080, NODE, nat_port, false, b"ok"));
    assert_eq!((s.src, s.dst), (sa(VIP, 80), sa(CLIENT, 40001)));

    // A second flow gets another port.
    let (_, s2) = run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 40002, VIP, 80, true, b""));
    assert_ne!(s2.src.port(), nat_port);
}

#[test]
fn snat_ports_come_from_the_configured_range_and_run_out_cleanly() {
    require_root!();
    use lb_agent::dataplane::options::{Options, PortRange};
    let mut dp = datapath(vec![backend(REMOTE_POD.into(), 8080, false)]);
    dp.set_options(&Options {
        nat_ports: PortRange { first: 20000, last: 20003 },
        ..Default::default()
    });
    let mut ports: Vec<u16> = (0..4)
        .map(|i| {
            run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 41000 + i, VIP, 80, true, b"")).1.src.port()
        })
        .collect();
    ports.sort();
    assert_eq!(ports, vec![20000, 20001, 20002, 20003], "every port of the range, once");
    let (verdict, _) = run_raw(&mut dp, &tcp4(CLIENT, 41004, VIP, 80, true, b""));
    assert_eq!((verdict, dp.stat(STAT_DROP_NAT_EXHAUSTED)), (TC_ACT_SHOT, 1));
}

#[test]
fn without_a_node_address_a_flow_needing_snat_is_dropped_and_counted() {
    require_root!();
    let mut dp = Datapath::load();
    dp.program("web", &[web(vec![backend(REMOTE_POD.into(), 8080, false)])]);
    let syn = tcp4(CLIENT, 40001, VIP, 80, true, b"");
    assert_eq!(dp.run(PROG_XDP_INGRESS, &syn).packet, syn, "XDP leaves it to tc");
    assert_eq!(run_raw(&mut dp, &syn).0, TC_ACT_SHOT);
    assert_eq!(dp.stat(STAT_DROP_NO_NODE_ADDR), 1);
    assert!(dp.conntrack().is_empty());
}

/// A datapath whose only backend is remote, with one SNAT port (20000): whether it is free
/// decides whether a new flow gets through.
fn one_snat_port() -> Datapath {
    use lb_agent::dataplane::options::{Options, PortRange};
    let mut dp = datapath(vec![backend(REMOTE_POD.into(), 8080, false)]);
    dp.set_options(&Options {
        nat_ports: PortRange { first: 20000, last: 20000 },
        ..Default::default()
    });
    dp
}

/// The verdict on the SYN of a new flow from CLIENT:`sport`.
fn new_flow(dp: &mut Datapath, sport: u16) -> i32 {
    run_raw(dp, &tcp4(CLIENT, sport, VIP, 80, true, b"")).0
}

/// Every conntrack entry silent for `secs` seconds, as if that much time had passed.
fn age(dp: &mut Datapath, secs: u64) {
    let then = lb_tests::kernel::secs_ago_ns(secs);
    for (k, v) in dp.conntrack() {
        dp.set_conntrack(k, CtValue { last_seen_ns: then, ..v });
    }
}

/// The TCP states of every conntrack entry.
fn states(dp: &mut Datapath) -> Vec<u8> {
    dp.conntrack().iter().map(|(_, v)| v.state).collect()
}

#[test]
fn a_snat_port_whose_backend_closed_first_waits_out_the_backends_time_wait() {
    require_root!();
    let mut dp = one_snat_port();

    // The backend answers, then closes its side first: half-closed, the flow lives on (the
    // client may still send), and keeps its port.
    assert_ne!(new_flow(&mut dp, 42000), TC_ACT_SHOT);
    run(&mut dp, PROG_TC_INGRESS, &tcp4(REMOTE_POD, 8080, NODE, 20000, false, b"answer"));
    run(&mut dp, PROG_TC_INGRESS, &tcp4_end(REMOTE_POD, 8080, NODE, 20000, false));
    assert_eq!(states(&mut dp), vec![CT_STATE_FIN_BACKEND; 2]);
    age(&mut dp, 61);
    assert_eq!(new_flow(&mut dp, 42001), TC_ACT_SHOT, "a half-closed flow keeps its port");
    // The client's FIN closes it; the backend, which closed first, keeps (node, 20000) in
    // TIME_WAIT.
    let (_, s) = run(&mut dp, PROG_TC_INGRESS, &tcp4_end(CLIENT, 42000, VIP, 80, false));
    assert_eq!(s.dst, sa(REMOTE_POD, 8080), "translated after a minute half-closed");
    assert_eq!(states(&mut dp), vec![CT_STATE_TIME_WAIT; 2]);
    // Past a FIN's 10 s the port is still the old connection's; past 60 s it is free.
    age(&mut dp, 11);
    assert_eq!(new_flow(&mut dp, 42004), TC_ACT_SHOT, "another client would meet TIME_WAIT");
    assert_eq!(dp.stat(STAT_DROP_NAT_EXHAUSTED), 2);
    age(&mut dp, 61);
    let (_, s) = run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 42002, VIP, 80, true, b""));
    assert_eq!((s.src, s.dst), (sa(NODE, 20000), sa(REMOTE_POD, 8080)));

    // When the client closes first, the backend keeps no TIME_WAIT: 10 s free the port.
    run(&mut dp, PROG_TC_INGRESS, &tcp4(REMOTE_POD, 8080, NODE, 20000, false, b"answer"));
    run(&mut dp, PROG_TC_INGRESS, &tcp4_end(CLIENT, 42002, VIP, 80, false));
    assert_eq!(states(&mut dp), vec![CT_STATE_FIN_CLIENT; 2]);
    run(&mut dp, PROG_TC_INGRESS, &tcp4_end(REMOTE_POD, 8080, NODE, 20000, false));
    assert_eq!(states(&mut dp), vec![CT_STATE_CLOSING; 2]);
    age(&mut dp, 11);
    let (_, s) = run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 42003, VIP, 80, true, b""));
    assert_eq!(s.src, sa(NODE, 20000));
}

/// A client that sends its request and half-closes (shutdown(SHUT_WR), HTTP/1.0 style) while
/// the backend takes its time to answer: the flow lives like an open one for as long as
/// `--conntrack-tcp-timeout-close-wait` allows (an hour by default, kube-proxy's), not a FIN's
/// 10 s; the answer still reaches the client from the frontend. The lifetime is set to 30 s
/// here: entries are aged by moving their stamps back, and the clock starts at boot, so an
/// hour could not be reached on a machine up for less (as CI's may be).
#[test]
fn a_half_closed_flow_keeps_its_translation_for_the_close_wait_lifetime() {
    require_root!();
    let mut dp = datapath(vec![backend(LOCAL_POD.into(), 8080, true)]);
    let close_wait = CtTimeouts { tcp_close_wait_s: 30, ..Default::default() };
    dp.set_options(&lb_agent::dataplane::options::Options {
        ct_timeouts: close_wait,
        ..Default::default()
    });
    assert_eq!(
        CtTimeouts::default().lifetime_s(PROTO_TCP, CT_STATE_FIN_CLIENT),
        3600,
        "the default, as kube-proxy's --conntrack-tcp-timeout-close-wait"
    );
    run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 43000, VIP, 80, true, b""));
    run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 43000, VIP, 80, false, b"GET / HTTP/1.0\r\n\r\n"));
    run(&mut dp, PROG_TC_INGRESS, &tcp4_end(CLIENT, 43000, VIP, 80, false));
    assert_eq!(states(&mut dp), vec![CT_STATE_FIN_CLIENT; 2]);
    age(&mut dp, 25);
    let answer = tcp4(LOCAL_POD, 8080, CLIENT, 43000, false, b"HTTP/1.0 200 OK");
    let (_, s) = run(&mut dp, PROG_TC_EGRESS, &answer);
    assert_eq!(s.src, sa(VIP, 80), "25 s later (past a FIN's 10 s), still from the frontend");
    run(&mut dp, PROG_TC_EGRESS, &tcp4_end(LOCAL_POD, 8080, CLIENT, 43000, false));
    assert_eq!(states(&mut dp), vec![CT_STATE_CLOSING; 2], "both sides closed: the last packets");

    // Past the lifetime, a half-closed flow is over.
    run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 43001, VIP, 80, true, b""));
    run(&mut dp, PROG_TC_INGRESS, &tcp4_end(CLIENT, 43001, VIP, 80, false));
    age(&mut dp, 31);
    let late = tcp4(LOCAL_POD, 8080, CLIENT, 43001, false, b"too late");
    let out = dp.run(PROG_TC_EGRESS, &late);
    assert_eq!(out.packet, late, "expired: left untranslated");
}

#[test]
fn a_reset_frees_its_flows_snat_port_within_a_second_and_fins_close_both_directions() {
    require_root!();
    let mut dp = one_snat_port();
    assert_ne!(new_flow(&mut dp, 41000), TC_ACT_SHOT);
    run(&mut dp, PROG_TC_INGRESS, &tcp4(REMOTE_POD, 8080, NODE, 20000, false, b"syn-ack"));
    run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 41000, VIP, 80, false, b"request"));
    assert_eq!(new_flow(&mut dp, 41001), TC_ACT_SHOT, "the only port is taken");

    // The client aborts: both directions' entries are marked, though only one saw the RST.
    run(&mut dp, PROG_TC_INGRESS, &tcp4_end(CLIENT, 41000, VIP, 80, true));
    assert_eq!(states(&mut dp), vec![CT_STATE_RESET; 2]);
    assert_eq!(new_flow(&mut dp, 41002), TC_ACT_SHOT, "not before its reset timeout");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_ne!(new_flow(&mut dp, 41003), TC_ACT_SHOT, "the port is taken over after a second");
    assert_eq!(dp.stat(STAT_DROP_NAT_EXHAUSTED), 2);

    // A FIN from the client half-closes both directions' entries; the backend's closes them.
    run(&mut dp, PROG_TC_INGRESS, &tcp4_end(CLIENT, 41003, VIP, 80, false));
    assert_eq!(states(&mut dp), vec![CT_STATE_FIN_CLIENT; 2], "{:?}", dp.conntrack());
    run(&mut dp, PROG_TC_INGRESS, &tcp4_end(REMOTE_POD, 8080, NODE, 20000, false));
    assert_eq!(states(&mut dp), vec![CT_STATE_CLOSING; 2], "{:?}", dp.conntrack());
    // The client reopens the same tuple: both entries live again, same backend and port.
    let (_, s) = run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 41003, VIP, 80, true, b""));
    assert_eq!((s.src, s.dst), (sa(NODE, 20000), sa(REMOTE_POD, 8080)));
    assert_eq!(states(&mut dp), vec![CT_STATE_NEW; 2]);
}

#[test]
fn snat_ports_of_flows_that_ended_are_reused_and_live_ones_never_are() {
    require_root!();
    let mut dp = datapath(vec![backend(REMOTE_POD.into(), 8080, false)]);
    let (_, s) = run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 40001, VIP, 80, true, b""));
    let nat_port = s.src.port();
    let (reply_key, reply) =
        dp.conntrack().into_iter().find(|(_, v)| v.flags & CT_F_REPLY != 0).expect("reply entry");
    // Every other NAT port towards this backend is held by the reply entry of a flow that
    // ended long ago and was never seen again (client ports 1000.., silent since boot).
    let mut dead = Vec::new();
    for (i, port) in (NAT_PORT_MIN..=NAT_PORT_MAX).filter(|p| *p != nat_port).enumerate() {
        let key = CtKey { dport_be: port.to_be(), ..reply_key };
        let value = CtValue {
            last_seen_ns: 0,
            state: CT_STATE_CLOSING,
            new_dport_be: (1000 + i as u16).to_be(),
            ..reply
        };
        assert!(dp.insert_conntrack(key, value), "port {port} was free");
        dead.push((key, value));
    }
    let (verdict, s) = run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 40002, VIP, 80, true, b""));
    assert_ne!(verdict, TC_ACT_SHOT, "a dead flow's port is taken over");
    assert_eq!(s.src.ip(), IpAddr::from(NODE));
    assert!((NAT_PORT_MIN..=NAT_PORT_MAX).contains(&s.src.port()));
    assert_ne!(s.src.port(), nat_port, "the live flow keeps its port");
    assert_eq!(dp.stat(STAT_DROP_NAT_EXHAUSTED), 0);
    assert!(dp.stat(STAT_CT_EXPIRED) >= 1);
    // The live flow is untouched: its reply still reaches its client.
    let (_, back) =
        run(&mut dp, PROG_TC_INGRESS, &tcp4(REMOTE_POD, 8080, NODE, nat_port, false, b"ok"));
    assert_eq!(back.dst, sa(CLIENT, 40001));

    // Now every port belongs to a live flow: a new flow is dropped and counted, never given
    // a port in use.
    let now = lb_tests::kernel::coarse_now_ns();
    let current: std::collections::HashMap<CtKey, CtValue> = dp.conntrack().into_iter().collect();
    for (key, value) in &dead {
        // Ports taken over by the flow above hold its entry now; leave those alone.
        if current.get(key) == Some(value) {
            dp.set_conntrack(*key, CtValue { last_seen_ns: now, ..*value });
        }
    }
    let before = dp.conntrack().len();
    let (verdict, _) = run_raw(&mut dp, &tcp4(CLIENT, 40003, VIP, 80, true, b""));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(dp.stat(STAT_DROP_NAT_EXHAUSTED), 1);
    assert_eq!(dp.conntrack().len(), before, "nothing claimed, nothing overwritten");
}

/// Runs tc ingress without expecting a translated packet.
fn run_raw(dp: &mut Datapath, packet: &[u8]) -> (i32, Vec<u8>) {
    let out = dp.run(PROG_TC_INGRESS, packet);
    (out.verdict, out.packet)
}

#[test]
fn ipv6_remote_backend_snat_and_reply() {
    require_root!();
    let vip6: Ipv6Addr = "2001:db8::80".parse().unwrap();
    let client6: Ipv6Addr = "2001:db8:ffff::7".parse().unwrap();
    let pod6: Ipv6Addr = "fd00:10:1::5".parse().unwrap();
    let mut dp = Datapath::load();
    dp.set_node(Some(NODE.into()), Some("fd00:1::11".parse().unwrap()));
    dp.program(
        "web6",
        &[lb_plan("web6", vip6.into(), 80, Protocol::Udp, vec![backend(pod6.into(), 5353, false)])],
    );
    let (_, s) = run(&mut dp, PROG_TC_INGRESS, &udp6(client6, 5000, vip6, 80, b"query"));
    assert_eq!(s.src.ip(), "fd00:1::11".parse::<IpAddr>().unwrap());
    assert_eq!(s.dst, sa(pod6, 5353));
    let (_, r) = run(
        &mut dp,
        PROG_TC_INGRESS,
        &udp6(pod6, 5353, "fd00:1::11".parse().unwrap(), s.src.port(), b"answer"),
    );
    assert_eq!((r.src, r.dst), (sa(vip6, 80), sa(client6, 5000)));
}

#[test]
fn udp_without_checksum_stays_without_checksum() {
    require_root!();
    let mut dp = Datapath::load();
    dp.program(
        "dns",
        &[lb_plan(
            "dns",
            VIP.into(),
            53,
            Protocol::Udp,
            vec![backend(LOCAL_POD.into(), 5353, true)],
        )],
    );
    let mut p = udp4(CLIENT, 5000, VIP, 53, b"query");
    p[14 + 20 + 6] = 0;
    p[14 + 20 + 7] = 0;
    let out = dp.run(PROG_TC_INGRESS, &p);
    assert_eq!(&out.packet[14 + 20 + 6..14 + 20 + 8], &[0, 0], "a zero UDP checksum means none");
    assert_eq!(summarize(&out.packet).unwrap().dst, sa(LOCAL_POD, 5353));
    checksums_ok(&out.packet).unwrap();
    let out = dp.run(PROG_XDP_INGRESS, &udp4(CLIENT, 5001, VIP, 53, b"q"));
    checksums_ok(&out.packet).unwrap();
}

#[test]
fn affinity_keeps_a_client_on_its_backend_across_connections() {
    require_root!();
    let backends: Vec<Backend> =
        (1..=5).map(|i| backend(Ipv4Addr::new(10, 1, 0, i).into(), 8080, true)).collect();
    let mut plan = web(backends.clone());
    plan.affinity_timeout_s = Some(10800);
    let mut dp = Datapath::load();
    dp.program("web", &[plan]);
    let first = run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 10000, VIP, 80, true, b"")).1.dst;
    for port in 10001..10030 {
        assert_eq!(
            run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, port, VIP, 80, true, b"")).1.dst,
            first
        );
    }
    assert_eq!(dp.stat(STAT_AFFINITY_HIT), 29);
    // Without affinity the same 30 connections spread.
    let mut dp = datapath(backends);
    let spread: std::collections::BTreeSet<SocketAddr> = (10000..10030)
        .map(|p| run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, p, VIP, 80, true, b"")).1.dst)
        .collect();
    assert!(spread.len() >= 3, "{spread:?}");
}

#[test]
fn a_removed_backend_keeps_its_flows_and_gets_no_new_ones() {
    require_root!();
    let a = backend(Ipv4Addr::new(10, 1, 0, 1).into(), 8080, true);
    let b = backend(Ipv4Addr::new(10, 1, 0, 2).into(), 8080, true);
    let mut dp = datapath(vec![a.clone(), b.clone()]);
    // Find a flow on `a`.
    let port = (30000..30100)
        .find(|&p| {
            run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, p, VIP, 80, true, b"")).1.dst
                == a.socket_addr()
        })
        .expect("some flow lands on a");
    // `a` starts terminating: out of the set, kept for open flows.
    let mut plan = web(vec![b.clone()]);
    let mut terminating = a.clone();
    terminating.terminating = true;
    plan.retained_backends = vec![terminating];
    dp.program("web", &[plan]);
    assert_eq!(
        run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, port, VIP, 80, false, b"more")).1.dst,
        a.socket_addr()
    );
    for p in 31000..31020 {
        assert_eq!(
            run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, p, VIP, 80, true, b"")).1.dst,
            b.socket_addr()
        );
    }
}

#[test]
fn no_endpoints_anywhere_is_rejected_with_icmp_port_unreachable() {
    require_root!();
    let mut dp = datapath(vec![]);
    let syn = tcp4(CLIENT, 1, VIP, 80, true, b"");
    let out = dp.run(PROG_TC_INGRESS, &syn);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "sent back out of the device");
    assert_port_unreachable(&out.packet, &syn);
    assert_eq!(dp.stat(STAT_REJECT_NO_BACKEND), 1);
    // XDP leaves it to tc.
    assert_eq!(dp.run(PROG_XDP_INGRESS, &syn).packet, syn);

    let vip6: Ipv6Addr = "2001:db8::80".parse().unwrap();
    let client6: Ipv6Addr = "2001:db8:ffff::7".parse().unwrap();
    let mut dp = Datapath::load();
    dp.program("web6", &[lb_plan("web6", vip6.into(), 80, Protocol::Udp, vec![])]);
    let q = udp6(client6, 5000, vip6, 80, b"a query with some payload");
    let out = dp.run(PROG_TC_INGRESS, &q);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_port_unreachable(&out.packet, &q);
    // With IPv4 options the whole header is quoted.
    let opt = with_ipv4_options(&tcp4(CLIENT, 2, VIP, 80, true, b""), 2);
    let mut dp = datapath(vec![]);
    let out = dp.run(PROG_TC_INGRESS, &opt);
    assert_port_unreachable(&out.packet, &opt);
}

/// Checks a TCP reset answering `original`: back to the sender, frontend -> client, ports
/// swapped, checksums right; returns (seq, ack, flags).
fn assert_tcp_reset(out: &[u8], original: &[u8]) -> (u32, u32, u8) {
    assert_eq!(&out[0..6], &original[6..12], "back to the sender's MAC");
    assert_eq!(&out[6..12], &original[0..6]);
    checksums_ok(out).unwrap();
    let (o, r) = (summarize(original).unwrap(), summarize(out).unwrap());
    assert_eq!((r.src, r.dst, r.proto), (o.dst, o.src, 6));
    let t = &out[r.l4_off..];
    assert_eq!(t.len(), 20, "a bare TCP header");
    assert_eq!(t[12] >> 4, 5);
    let word = |i: usize| u32::from_be_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
    (word(4), word(8), t[13])
}

#[test]
fn no_endpoints_with_reset_configured_answers_tcp_with_a_reset_and_udp_with_icmp() {
    require_root!();
    use lb_agent::dataplane::options::{Options, RejectTcpWith};
    let reset = Options { reject_tcp_with: RejectTcpWith::Reset, ..Default::default() };
    let mut dp = datapath(vec![]);
    dp.set_options(&reset);
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;

    // A SYN (seq 1000): RST+ACK acknowledging the SYN, and data it carried.
    let syn = tcp4(CLIENT, 1, VIP, 80, true, b"");
    let out = dp.run(PROG_TC_INGRESS, &syn);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "sent back out of the device");
    assert_eq!(assert_tcp_reset(&out.packet, &syn), (0, 1001, RST | ACK));
    let syn_data = tcp4(CLIENT, 2, VIP, 80, true, b"hello");
    let out = dp.run(PROG_TC_INGRESS, &syn_data);
    assert_eq!(assert_tcp_reset(&out.packet, &syn_data), (0, 1006, RST | ACK));
    // A segment with ACK (ack 1): a bare RST whose seq is that ack.
    let ack = tcp4(CLIENT, 3, VIP, 80, false, b"data");
    let out = dp.run(PROG_TC_INGRESS, &ack);
    assert_eq!(assert_tcp_reset(&out.packet, &ack), (1, 0, RST));
    // IPv4 options are not copied; the reset still matches the segment.
    let opt = with_ipv4_options(&tcp4(CLIENT, 4, VIP, 80, true, b""), 2);
    let out = dp.run(PROG_TC_INGRESS, &opt);
    assert_eq!(assert_tcp_reset(&out.packet, &opt), (0, 1001, RST | ACK));
    assert_eq!(dp.stat(STAT_REJECT_NO_BACKEND), 4);

    // IPv6 TCP gets a reset, UDP still ICMP.
    let vip6: Ipv6Addr = "2001:db8::80".parse().unwrap();
    let client6: Ipv6Addr = "2001:db8:ffff::7".parse().unwrap();
    let mut dp = Datapath::load();
    dp.set_options(&reset);
    dp.program("web6", &[lb_plan("web6", vip6.into(), 80, Protocol::Tcp, vec![])]);
    let syn6 = tcp6(client6, 5000, vip6, 80, true, b"");
    let out = dp.run(PROG_TC_INGRESS, &syn6);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(assert_tcp_reset(&out.packet, &syn6), (0, 1001, RST | ACK));
    dp.program("dns6", &[lb_plan("dns6", vip6.into(), 53, Protocol::Udp, vec![])]);
    let q = udp6(client6, 5000, vip6, 53, b"query");
    assert_port_unreachable(&dp.run(PROG_TC_INGRESS, &q).packet, &q);

    // Back to ICMP for TCP when the option is off again.
    dp.set_options(&Options::default());
    assert_port_unreachable(&dp.run(PROG_TC_INGRESS, &syn6).packet, &syn6);
}

#[test]
fn no_local_endpoint_and_source_ranges_drop_with_a_reason() {
    require_root!();
    let mut dp = datapath(vec![]);

    // ETP Local on a node without local endpoints: dropped too (flagged drop, not reject).
    let mut plan = web(vec![]);
    plan.cluster_backends = vec![backend(REMOTE_POD.into(), 8080, false)];
    plan.external_traffic_policy = TrafficPolicy::Local;
    plan.has_any_endpoints = true;
    dp.program("web", &[plan]);
    assert_eq!(dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 2, VIP, 80, true, b"")).verdict, TC_ACT_SHOT);

    let mut plan = web(vec![backend(LOCAL_POD.into(), 8080, true)]);
    plan.source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
    dp.program("web", &[plan]);
    let allowed = dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 3, VIP, 80, true, b""));
    assert_eq!(allowed.verdict, TC_ACT_OK);
    assert_eq!(summarize(&allowed.packet).unwrap().dst, sa(LOCAL_POD, 8080));
    let denied = dp.run(PROG_TC_INGRESS, &tcp4(OTHER_CLIENT, 4, VIP, 80, true, b""));
    assert_eq!(denied.verdict, TC_ACT_SHOT);
    assert_eq!(dp.stat(STAT_DROP_SOURCE_RANGE), 1);
}

#[test]
fn xdp_translates_local_flows_and_leaves_snat_flows_to_tc() {
    require_root!();
    let mut dp = datapath(vec![backend(LOCAL_POD.into(), 8080, true)]);
    let (verdict, s) = run(&mut dp, PROG_XDP_INGRESS, &tcp4(CLIENT, 40000, VIP, 80, true, b""));
    assert_eq!((verdict, s.dst), (XDP_PASS, sa(LOCAL_POD, 8080)));

    let mut dp = datapath(vec![backend(REMOTE_POD.into(), 8080, false)]);
    let p = tcp4(CLIENT, 40000, VIP, 80, true, b"");
    let out = dp.run(PROG_XDP_INGRESS, &p);
    assert_eq!((out.verdict, &out.packet), (XDP_PASS, &p), "untouched: tc will SNAT it");
    assert!(dp.conntrack().is_empty(), "XDP created no entry for tc to trip on");
    let (_, s) = run(&mut dp, PROG_TC_INGRESS, &p);
    assert_eq!(s.src.ip(), IpAddr::from(NODE));
}

/// Destination and source MAC of a frame.
fn macs_of(frame: &[u8]) -> (Vec<u8>, Vec<u8>) {
    (frame[..6].to_vec(), frame[6..12].to_vec())
}

#[test]
fn xdp_forwards_snat_flows_back_out_of_their_device_when_the_next_hop_is_known() {
    require_root!();
    let node = RoutedNode::new();
    let ns = &node.ns;
    let mut dp = datapath(vec![backend(REMOTE_POD.into(), 8080, false)]);
    let svc = dp.service_id("web");
    // The agent's decision for a veth is "no" unless told otherwise.
    assert!(!node.xdp_tx(&mut dp, "n0", XdpTx::Auto), "auto on a veth");
    let p = tcp4(CLIENT, 40001, VIP, 80, true, b"");
    let out = node.run_xdp(&mut dp, &p);
    assert_eq!((out.verdict, &out.packet), (XDP_PASS, &p), "XDP_TX not allowed: left to tc");
    assert!(dp.conntrack().is_empty());
    assert!(node.xdp_tx(&mut dp, "n0", XdpTx::On));
    // Runs XDP in the node namespace; checks checksums.
    let xdp = |dp: &mut Datapath, p: &[u8]| {
        let out = node.run_xdp(dp, p);
        checksums_ok(&out.packet).unwrap();
        out
    };

    // First packet: DNAT + SNAT, sent back out of n0 to the router of the pod network.
    let out = xdp(&mut dp, &tcp4(CLIENT, 40001, VIP, 80, true, b""));
    assert_eq!(out.verdict, XDP_TX);
    assert_eq!(macs_of(&out.packet), (mac(routed::ROUTER_MAC), mac(routed::N0_MAC)));
    let s = summarize(&out.packet).unwrap();
    assert_eq!((s.src.ip(), s.dst), (IpAddr::from(NODE), sa(REMOTE_POD, 8080)));
    let nat_port = s.src.port();
    assert!((NAT_PORT_MIN..=NAT_PORT_MAX).contains(&nat_port));
    assert_eq!(dp.conntrack().len(), 2);

    // The rest of the flow, and the backend's reply towards the client's gateway.
    let out = xdp(&mut dp, &tcp4(CLIENT, 40001, VIP, 80, false, b"GET /"));
    assert_eq!((out.verdict, summarize(&out.packet).unwrap().src), (XDP_TX, s.src));
    let out = xdp(&mut dp, &tcp4(REMOTE_POD, 8080, NODE, nat_port, false, b"200 OK"));
    assert_eq!(out.verdict, XDP_TX);
    assert_eq!(macs_of(&out.packet), (mac(routed::GATEWAY_MAC), mac(routed::N0_MAC)));
    let r = summarize(&out.packet).unwrap();
    assert_eq!((r.src, r.dst), (sa(VIP, 80), sa(CLIENT, 40001)));
    assert_eq!((dp.stat(STAT_XDP_TX), dp.stat(STAT_XDP_TO_TC)), (3, 1));

    // Next hops are cached for a second: a new router MAC is used once that has passed.
    let moved = "02:00:00:00:00:13";
    ns.ip(&["neigh", "replace", "192.168.1.12", "lladdr", moved, "nud", "permanent", "dev", "n0"]);
    let data = tcp4(CLIENT, 40001, VIP, 80, false, b"GET /");
    assert_eq!(macs_of(&xdp(&mut dp, &data).packet).0, mac(routed::ROUTER_MAC), "cached");
    std::thread::sleep(NEXT_HOP_TTL);
    assert_eq!(macs_of(&xdp(&mut dp, &data).packet).0, mac(moved), "looked up again");

    // The router's MAC is forgotten: XDP hands the packet to tc untouched, tc translates it
    // and lets the kernel resolve the neighbour. The packet is counted once, by tc.
    ns.ip(&["neigh", "del", "192.168.1.12", "dev", "n0"]);
    std::thread::sleep(NEXT_HOP_TTL);
    let p = tcp4(CLIENT, 40001, VIP, 80, false, b"more");
    let out = xdp(&mut dp, &p);
    assert_eq!((out.verdict, &out.packet), (XDP_PASS, &p));
    assert_eq!(dp.stat(STAT_XDP_TO_TC), 2);
    assert_eq!(dp.service_stats(svc).packets, 5, "not counted by XDP");
    let (_, s2) = run(&mut dp, PROG_TC_INGRESS, &p);
    assert_eq!(s2.src, s.src, "tc: the same translation");
    assert_eq!(dp.service_stats(svc).packets, 6);
}

#[test]
fn xdp_forwards_ipv6_snat_flows_too() {
    require_root!();
    let node = RoutedNode::new();
    let vip6: Ipv6Addr = "2001:db8::80".parse().unwrap();
    let client6: Ipv6Addr = "2001:db8:ffff::7".parse().unwrap();
    let pod6: Ipv6Addr = "fd00:10:1::5".parse().unwrap();
    let node6: Ipv6Addr = "fd00:1::11".parse().unwrap();
    let mut dp = Datapath::load();
    dp.set_node(Some(NODE.into()), Some(node6.into()));
    let backends = vec![backend(pod6.into(), 8080, false)];
    dp.program("web6", &[lb_plan("web6", vip6.into(), 80, Protocol::Tcp, backends)]);
    node.xdp_tx(&mut dp, "n0", XdpTx::On);
    let xdp = |dp: &mut Datapath, p: &[u8]| {
        let out = node.run_xdp(dp, p);
        checksums_ok(&out.packet).unwrap();
        out
    };
    let out = xdp(&mut dp, &tcp6(client6, 40001, vip6, 80, true, b""));
    assert_eq!(out.verdict, XDP_TX);
    assert_eq!(macs_of(&out.packet), (mac(routed::ROUTER_MAC), mac(routed::N0_MAC)));
    let s = summarize(&out.packet).unwrap();
    assert_eq!((s.src.ip(), s.dst), (IpAddr::from(node6), sa(pod6, 8080)));
    let out = xdp(&mut dp, &tcp6(pod6, 8080, node6, s.src.port(), false, b"200 OK"));
    assert_eq!(out.verdict, XDP_TX);
    assert_eq!(macs_of(&out.packet), (mac(routed::GATEWAY_MAC), mac(routed::N0_MAC)));
    let r = summarize(&out.packet).unwrap();
    assert_eq!((r.src, r.dst), (sa(vip6, 80), sa(client6, 40001)));
}

#[test]
fn xdp_redirects_to_another_device_only_where_the_agent_allows_xdp() {
    require_root!();
    let node = RoutedNode::new();
    let backend_ip = Ipv4Addr::new(172, 16, 0, 2); // routed out of d0
    let mut dp = datapath(vec![backend(backend_ip.into(), 8080, false)]);
    node.xdp_tx(&mut dp, "n0", XdpTx::On);
    // d0 runs no XDP of ours: tc takes it.
    let p = tcp4(CLIENT, 40001, VIP, 80, true, b"");
    let out = node.run_xdp(&mut dp, &p);
    assert_eq!((out.verdict, &out.packet), (XDP_PASS, &p));
    // It does: redirected there, with d0's MACs.
    node.xdp_tx(&mut dp, "d0", XdpTx::On);
    let out = node.run_xdp(&mut dp, &p);
    assert_eq!(out.verdict, XDP_REDIRECT);
    checksums_ok(&out.packet).unwrap();
    assert_eq!(macs_of(&out.packet), (mac(routed::D0_PEER_MAC), mac(routed::D0_MAC)));
    let s = summarize(&out.packet).unwrap();
    assert_eq!((s.src.ip(), s.dst), (IpAddr::from(NODE), sa(backend_ip, 8080)));
    assert_eq!((dp.stat(STAT_XDP_REDIRECT), dp.stat(STAT_XDP_TX)), (1, 0));
}

#[test]
fn xdp_leaves_to_tc_a_new_snat_flow_whose_route_leaves_by_another_device_or_lacks_a_neighbour() {
    require_root!();
    let node = RoutedNode::new();
    for backend_ip in [Ipv4Addr::new(172, 16, 0, 2), Ipv4Addr::new(192, 168, 1, 13)] {
        let mut dp = datapath(vec![backend(backend_ip.into(), 8080, false)]);
        node.xdp_tx(&mut dp, "n0", XdpTx::On);
        let p = tcp4(CLIENT, 40001, VIP, 80, true, b"");
        let out = node.run_xdp(&mut dp, &p);
        assert_eq!((out.verdict, &out.packet), (XDP_PASS, &p), "{backend_ip}: untouched");
        assert!(dp.conntrack().is_empty(), "{backend_ip}: tc creates the flow");
        assert_eq!((dp.stat(STAT_XDP_TO_TC), dp.stat(STAT_SERVICE_HIT)), (1, 0));
        let (_, s) = run(&mut dp, PROG_TC_INGRESS, &p);
        assert_eq!((s.src.ip(), s.dst), (IpAddr::from(NODE), sa(backend_ip, 8080)));
    }
}

/// A SNATed flow takes the source address of the route to its backend, as MASQUERADE would,
/// when the route leaves by a device the hooks are on (its replies come back through them):
/// on a node with two devices, the one facing the backend. By a device without the hooks, the
/// node's primary address, as before; and on a node whose hooks are on one device, always.
#[test]
fn a_snat_flow_takes_the_address_of_the_device_its_route_leaves_by_when_the_hooks_are_there() {
    require_root!();
    let node = RoutedNode::new();
    let backend_ip = Ipv4Addr::new(172, 16, 0, 2);
    let d0_addr = Ipv4Addr::new(172, 16, 0, 1);
    let mut dp = datapath(vec![backend(backend_ip.into(), 8080, false)]);
    let first = |dp: &mut Datapath, port: u16| {
        let out = node.run_tc(dp, &tcp4(CLIENT, port, VIP, 80, true, b""), 0);
        checksums_ok(&out.packet).unwrap();
        // Sent on by tc itself, to the backend's neighbour on d0, from d0.
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(macs_of(&out.packet), (mac(routed::D0_PEER_MAC), mac(routed::D0_MAC)));
        summarize(&out.packet).unwrap()
    };
    // Hooks on n0 alone: the route to the backend leaves by d0, without them.
    node.snat_devices(&mut dp, &["n0"]);
    let s = first(&mut dp, 40001);
    assert_eq!((s.src.ip(), s.dst), (IpAddr::from(NODE), sa(backend_ip, 8080)));
    // Hooks on d0 too: its address.
    node.snat_devices(&mut dp, &["n0", "d0"]);
    let s = first(&mut dp, 40002);
    assert_eq!((s.src.ip(), s.dst), (IpAddr::from(d0_addr), sa(backend_ip, 8080)));
    let port = s.src.port();
    // The reply to that address comes back translated to the client, from the frontend.
    let reply = tcp4(backend_ip, 8080, d0_addr, port, true, b"");
    let (_, r) = run(&mut dp, PROG_TC_INGRESS, &reply);
    assert_eq!((r.src, r.dst), (sa(VIP, 80), sa(CLIENT, 40002)));
    // The device gone from the record: the primary address again. And with the hooks on one
    // device, even the one the route leaves by: the primary address, as always (no lookup).
    node.snat_devices(&mut dp, &["n0"]);
    assert_eq!(first(&mut dp, 40003).src.ip(), IpAddr::from(NODE));
    node.snat_devices(&mut dp, &["d0"]);
    assert_eq!(first(&mut dp, 40005).src.ip(), IpAddr::from(NODE));
    // A node address of the other family only: no source for this flow (a counted drop).
    dp.set_node(None, Some(NODE6.into()));
    node.snat_devices(&mut dp, &["n0", "d0"]);
    let out = node.run_tc(&mut dp, &tcp4(CLIENT, 40004, VIP, 80, true, b""), 0);
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(dp.stat(STAT_DROP_NO_NODE_ADDR), 1);
}

#[test]
fn a_full_conntrack_map_evicts_old_flows_and_never_mistranslates() {
    require_root!();
    let mut sizes = TEST_MAP_SIZES;
    sizes.max_conntrack = 64;
    let mut dp = Datapath::load_with(sizes);
    let backends: Vec<Backend> =
        (1..=3).map(|i| backend(Ipv4Addr::new(10, 1, 0, i).into(), 8080, true)).collect();
    dp.program("web", &[web(backends.clone())]);
    let valid: Vec<SocketAddr> = backends.iter().map(|b| b.socket_addr()).collect();
    for p in 1000..1500u16 {
        let (verdict, s) = run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, p, VIP, 80, true, b""));
        assert_eq!(verdict, TC_ACT_OK);
        assert!(valid.contains(&s.dst), "{s:?}");
    }
    assert!(dp.conntrack().len() <= 64 + 2);
    assert_eq!(dp.stat(STAT_DROP_CT_FULL), 0, "LRU eviction, not drops");
}

/// Whether `LB_REPLY_PORTS` has `port` (what tc egress checks before its conntrack lookup).
fn reply_port_set(dp: &mut Datapath, port: u16) -> bool {
    dp.port_set(MAP_REPLY_PORTS, port)
}

/// Whether `LB_INGRESS_PORTS` has `port` (what tc ingress and XDP check before their lookups).
fn ingress_port_set(dp: &mut Datapath, port: u16) -> bool {
    dp.port_set(MAP_INGRESS_PORTS, port)
}

/// tc egress looks up conntrack only for packets from a local backend's port: an entry for any
/// other source port is never consulted (the node's other outgoing traffic skips the lookup).
/// The ports are only ever added: when the service and its backend are deleted, the replies of
/// a flow still open keep their frontend as source.
#[test]
fn egress_looks_up_only_local_backend_ports_and_keeps_them_for_flows_that_outlive_their_service() {
    require_root!();
    let mut dp = datapath(vec![backend(LOCAL_POD.into(), 8080, true)]);
    assert!(reply_port_set(&mut dp, 8080) && !reply_port_set(&mut dp, 9999));
    run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 43000, VIP, 80, true, b""));
    let reply = tcp4(LOCAL_POD, 8080, CLIENT, 43000, false, b"ok");
    assert_eq!(run(&mut dp, PROG_TC_EGRESS, &reply).1.src, sa(VIP, 80));

    // A reply entry as if for a backend on port 9999, which no backend uses: not consulted.
    let (k, v) =
        dp.conntrack().into_iter().find(|(_, v)| v.flags & CT_F_REPLY != 0).expect("reply entry");
    dp.set_conntrack(CtKey { sport_be: 9999u16.to_be(), ..k }, v);
    let other = tcp4(LOCAL_POD, 9999, CLIENT, 43000, false, b"ok");
    assert_eq!(dp.run(PROG_TC_EGRESS, &other).packet, other, "9999 is no backend's port");

    // The service goes away with its backend; the open flow's replies are still translated.
    dp.program("web", &[]);
    assert!(reply_port_set(&mut dp, 8080), "ports are never removed");
    assert_eq!(run(&mut dp, PROG_TC_EGRESS, &reply).1.src, sa(VIP, 80));
}

/// tc ingress and XDP look a packet up only when its destination port is an external
/// frontend's or a SNAT port: a conntrack entry for any other port is never consulted, and the
/// packet counts as not for a frontend. Ports are only ever added: a flow whose service is
/// deleted keeps its translation.
#[test]
fn ingress_looks_up_only_frontend_and_snat_ports_and_keeps_them_for_flows_that_outlive_their_service()
 {
    require_root!();
    let mut dp = datapath(vec![backend(LOCAL_POD.into(), 8080, true)]);
    assert!(ingress_port_set(&mut dp, 80), "the frontend's port");
    assert!(ingress_port_set(&mut dp, NAT_PORT_MIN) && ingress_port_set(&mut dp, NAT_PORT_MAX));
    assert!(!ingress_port_set(&mut dp, NAT_PORT_MIN - 1) && !ingress_port_set(&mut dp, 8080));
    run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 43002, VIP, 80, true, b""));

    // A forward entry as if for a frontend on port 9999, which no frontend uses: not consulted.
    let (k, v) =
        dp.conntrack().into_iter().find(|(_, v)| v.flags & CT_F_REPLY == 0).expect("forward");
    dp.set_conntrack(CtKey { dport_be: 9999u16.to_be(), ..k }, v);
    let other = tcp4(CLIENT, 43002, VIP, 9999, false, b"ok");
    let misses = dp.stat(STAT_SERVICE_MISS);
    for prog in [PROG_TC_INGRESS, PROG_XDP_INGRESS] {
        assert_eq!(dp.run(prog, &other).packet, other, "{prog}: 9999 is no frontend's port");
    }
    assert_eq!(dp.stat(STAT_SERVICE_MISS), misses + 2, "counted as not for a frontend");

    // The service goes away; the open flow is still translated.
    dp.program("web", &[]);
    assert!(ingress_port_set(&mut dp, 80), "ports are never removed");
    let (_, s) = run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 43002, VIP, 80, false, b"more"));
    assert_eq!(s.dst, sa(LOCAL_POD, 8080));
}

/// tc ingress and XDP look a packet to a frontend's port up only when its destination is in
/// `LB_FRONTEND_SET`, an external frontend's address or a SNAT source: one to another address on
/// that port (pod to pod traffic to a port a service also exposes) skips both lookups, even
/// with a conntrack entry for it. The datapath sets a SNAT source's bit when it makes the flow
/// (the agent cannot know every source a route picks), so the flow's replies pass; an agent
/// starting over an older build's flows finds their sources in conntrack.
#[test]
fn ingress_looks_up_only_frontend_addresses_and_snat_sources() {
    require_root!();
    const OTHER_POD: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 9);
    let mut dp = datapath(vec![backend(REMOTE_POD.into(), 8080, false)]);
    assert!(dp.addr_set(MAP_FRONTEND_ADDRS, VIP.into()), "the frontend's address");
    assert!(!dp.addr_set(MAP_FRONTEND_ADDRS, NODE.into()), "no frontend on the node's address");
    let (_, s) = run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 43010, VIP, 80, true, b""));
    assert_eq!((s.src.ip(), s.dst), (IpAddr::from(NODE), sa(REMOTE_POD, 8080)), "SNAT");
    assert!(dp.addr_set(MAP_FRONTEND_ADDRS, NODE.into()), "set by the datapath");
    let reply = tcp4(REMOTE_POD, 8080, NODE, s.src.port(), false, b"answer");
    assert_eq!(run(&mut dp, PROG_TC_INGRESS, &reply).1.src, sa(VIP, 80));
    // The agent adding a frontend whose bit shares the node's word keeps the datapath's bit
    // (its writer's view of the set predates that bit).
    let next = Ipv4Addr::new(192, 168, 1, 10);
    let word = |ip: Ipv4Addr| addr_bit(&addr_from_ip(ip.into())) / 64;
    assert_eq!(word(next), word(NODE));
    dp.program("next", &[lb_plan("next", next.into(), 80, Protocol::Tcp, vec![])]);
    assert!(dp.addr_set(MAP_FRONTEND_ADDRS, next.into()));
    assert!(dp.addr_set(MAP_FRONTEND_ADDRS, NODE.into()), "the datapath's bit kept");
    assert_eq!(run(&mut dp, PROG_TC_INGRESS, &reply).1.src, sa(VIP, 80));

    // A forward entry as if for port 80 of another address (a pod's): not consulted.
    let (k, v) =
        dp.conntrack().into_iter().find(|(_, v)| v.flags & CT_F_REPLY == 0).expect("forward");
    let pod = IpAddr::from(OTHER_POD);
    assert!(!dp.addr_set(MAP_FRONTEND_ADDRS, pod));
    dp.set_conntrack(CtKey { daddr: addr_from_ip(pod), ..k }, v);
    let to_pod = tcp4(CLIENT, 43010, OTHER_POD, 80, false, b"ok");
    let misses = dp.stat(STAT_SERVICE_MISS);
    for prog in [PROG_TC_INGRESS, PROG_XDP_INGRESS] {
        assert_eq!(dp.run(prog, &to_pod).packet, to_pod, "{prog}: {pod} is no frontend");
    }
    assert_eq!(dp.stat(STAT_SERVICE_MISS), misses + 2, "counted as not for a frontend");

    // An older build made the SNATed flow (no bit set): the agent starting over it finds the
    // source in conntrack, and until it has looked, every address is looked up.
    dp.clear_addr_bit(MAP_FRONTEND_ADDRS, NODE.into());
    assert_eq!(dp.run(PROG_TC_INGRESS, &reply).packet, reply, "bit clear: passed untranslated");
    lb_agent::dataplane::port_filters::enable(&mut dp.ebpf).expect("enable");
    // As if the old programs made the flow after that first look, while still attached.
    dp.clear_addr_bit(MAP_FRONTEND_ADDRS, NODE.into());
    assert_eq!(run(&mut dp, PROG_TC_INGRESS, &reply).1.src, sa(VIP, 80), "not yet trusted");
    let set = lb_agent::dataplane::port_filters::complete_frontend_addrs(&mut dp.ebpf)
        .expect("complete")
        .expect("the object has the set");
    assert_eq!(set, 4, "the two VIPs, the node (SNAT source), the pod (the entry set above)");
    assert!(dp.addr_set(MAP_FRONTEND_ADDRS, NODE.into()));
    assert_eq!(run(&mut dp, PROG_TC_INGRESS, &reply).1.src, sa(VIP, 80));
}

/// At start the agent fills both filters from what the maps already hold (an upgrade from a
/// build without them, frontends or backends deleted meanwhile, an earlier SNAT range) before
/// they take effect: reply ports from local backends and their flows' reply entries, ingress
/// ports from external frontends, the SNAT range and every other entry's destination port.
#[test]
fn enabling_the_port_filters_seeds_them_from_frontends_and_existing_flows() {
    require_root!();
    let mut dp = datapath(vec![backend(LOCAL_POD.into(), 8080, true)]);
    run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 43001, VIP, 80, true, b""));
    let ct = dp.conntrack();
    let (rk, rv) = *ct.iter().find(|(_, v)| v.flags & CT_F_REPLY != 0).expect("reply entry");
    let (fk, fv) = *ct.iter().find(|(_, v)| v.flags & CT_F_REPLY == 0).expect("forward entry");
    dp.set_conntrack(CtKey { sport_be: 7777u16.to_be(), ..rk }, rv);
    dp.set_conntrack(CtKey { dport_be: 7000u16.to_be(), ..fk }, fv);
    // A SNATed flow's reply entry on a port of an earlier --nat-port-range.
    let snat_reply = CtValue { flags: CT_F_REPLY | CT_F_SNAT, ..rv };
    dp.set_conntrack(
        CtKey { sport_be: 6000u16.to_be(), dport_be: 20000u16.to_be(), ..rk },
        snat_reply,
    );
    assert!(!reply_port_set(&mut dp, 7777) && !ingress_port_set(&mut dp, 7000));
    let seeded = lb_agent::dataplane::port_filters::enable(&mut dp.ebpf).expect("enable");

    assert!(reply_port_set(&mut dp, 7777) && reply_port_set(&mut dp, 8080));
    assert_eq!(seeded.reply_ports, 2, "8080 and 7777");
    for port in [80, 7000, 20000, NAT_PORT_MIN, NAT_PORT_MAX] {
        assert!(ingress_port_set(&mut dp, port), "ingress port {port}");
    }
    assert!(!ingress_port_set(&mut dp, 43001), "a local backend's reply leaves through egress");
    assert!(!reply_port_set(&mut dp, 6000), "a SNATed reply arrives on ingress");
    let nat_range = (NAT_PORT_MAX - NAT_PORT_MIN) as usize + 1;
    assert_eq!(seeded.ingress_ports, nat_range + 3, "80, 7000, 20000 and the SNAT range");
    // The pod sets: the frontend is internal too (the LB IP from inside), flows' ports as
    // ingress's; every reply's source port for packets to pods.
    for port in [80, 7000, 20000, NAT_PORT_MIN] {
        assert!(dp.port_set(MAP_POD_PORTS, port), "pod port {port}");
    }
    assert_eq!(seeded.pod_ports, nat_range + 3);
    assert!([8080, 7777, 6000].iter().all(|&p| dp.port_set(MAP_POD_REPLY_PORTS, p)));
    assert_eq!(seeded.pod_reply_ports, 3, "8080, 7777 and 6000");

    let (_, s) = run(&mut dp, PROG_TC_EGRESS, &tcp4(LOCAL_POD, 7777, CLIENT, 43001, false, b"ok"));
    assert_eq!(s.src, sa(VIP, 80));
    let (_, s) = run(&mut dp, PROG_TC_INGRESS, &tcp4(CLIENT, 43001, VIP, 7000, false, b"ok"));
    assert_eq!(s.dst, sa(LOCAL_POD, 8080));
}

/// Replies from remote backends to the node's SNAT ports (TCP, UDP and SCTP, both families),
/// one to three header bytes overwritten at random or cut short, through tc ingress and XDP
/// (in a routed node, XDP_TX allowed): each is passed or sent on, unchanged or reversed to
/// frontend -> client of the flow whose SNAT port it names (length kept, right sums kept
/// right, XDP_TX towards the clients' gateway), and every flow keeps its translation.
#[test]
fn mutated_snat_replies_never_mistranslate_or_corrupt_conntrack() {
    require_root!();
    let mut dp = Datapath::load();
    dp.set_node(Some(NODE.into()), Some(NODE6.into()));
    let mut plans = Vec::new();
    for (name, vip, pod, proto) in [
        ("tcp4", IpAddr::from(VIP), IpAddr::from(REMOTE_POD), Protocol::Tcp),
        ("udp4", VIP.into(), REMOTE_POD.into(), Protocol::Udp),
        ("sctp4", VIP.into(), REMOTE_POD.into(), Protocol::Sctp),
        ("tcp6", VIP6.into(), REMOTE6.into(), Protocol::Tcp),
        ("udp6", VIP6.into(), REMOTE6.into(), Protocol::Udp),
        ("sctp6", VIP6.into(), REMOTE6.into(), Protocol::Sctp),
    ] {
        plans.push(lb_plan(name, vip, 80, proto, vec![backend(pod, 8080, false)]));
    }
    dp.program("all", &plans);
    let starts = [
        tcp4(CLIENT, 43000, VIP, 80, true, b""),
        udp4(CLIENT, 43000, VIP, 80, b"query"),
        sctp4(CLIENT, 43000, VIP, 80, SCTP_INIT),
        tcp6(CLIENT6, 43000, VIP6, 80, true, b""),
        udp6(CLIENT6, 43000, VIP6, 80, b"query"),
        sctp6(CLIENT6, 43000, VIP6, 80, SCTP_INIT),
    ];
    // Each flow's reply, from its backend to its SNAT port; and who it must reach, as whom.
    let mut seeds = Vec::new();
    let mut flows_by_port = std::collections::HashMap::new();
    for p in &starts {
        let (_, s) = run(&mut dp, PROG_TC_INGRESS, p);
        let (vip, client): (IpAddr, IpAddr) = if s.dst.is_ipv4() {
            (VIP.into(), CLIENT.into())
        } else {
            (VIP6.into(), CLIENT6.into())
        };
        assert!(matches!(s.src.ip(), a if a == IpAddr::from(NODE) || a == IpAddr::from(NODE6)));
        flows_by_port.insert((s.proto, s.src.port()), (sa(vip, 80), sa(client, 43000)));
        seeds.push(match (s.proto, s.dst.ip(), s.src.ip()) {
            (6, IpAddr::V4(b), IpAddr::V4(n)) => tcp4(b, 8080, n, s.src.port(), false, b"answer"),
            (17, IpAddr::V4(b), IpAddr::V4(n)) => udp4(b, 8080, n, s.src.port(), b"answer"),
            (132, IpAddr::V4(b), IpAddr::V4(n)) => sctp4(b, 8080, n, s.src.port(), SCTP_DATA),
            (6, IpAddr::V6(b), IpAddr::V6(n)) => tcp6(b, 8080, n, s.src.port(), false, b"answer"),
            (17, IpAddr::V6(b), IpAddr::V6(n)) => udp6(b, 8080, n, s.src.port(), b"answer"),
            (132, IpAddr::V6(b), IpAddr::V6(n)) => sctp6(b, 8080, n, s.src.port(), SCTP_DATA),
            other => panic!("{other:?}"),
        });
    }
    let mut watch = dp.watch_conntrack();
    let first_states = dp.conntrack_sorted(true);
    assert_eq!(first_states.len(), 2 * starts.len(), "a forward and a reply entry per flow");

    let (seed, runs) = lb_tests::plans::mutation_seed_and_runs(0xbb67ae8584caa73b, 3000);
    let mut rng = lb_tests::plans::Rng::new(seed);
    let (mut reversed, mut unchanged) = (0, 0);
    // XDP reverses a reply and sends it back out itself where the next hop is known: in a
    // routed node's namespace, with XDP_TX allowed on its device (the clients' default route
    // has a known gateway).
    let node = RoutedNode::new();
    assert!(node.xdp_tx(&mut dp, "n0", XdpTx::On));
    let mut by_hook = [0; 2];
    let hooks = [
        (PROG_TC_INGRESS, &[TC_ACT_OK, TC_ACT_REDIRECT][..]),
        (PROG_XDP_INGRESS, &[XDP_PASS, XDP_TX, XDP_REDIRECT][..]),
    ];
    for i in 0..runs * 2 {
        if i % 64 == 0 {
            watch.look(&dp);
        }
        let (prog, verdicts) = hooks[(i / runs) as usize];
        let mut p = seeds[i as usize % seeds.len()].clone();
        rng.mutate(&mut p, 100);
        // The kernel refuses some frames outright (a length its ethertype cannot hold).
        let out = if prog == PROG_XDP_INGRESS {
            node.run_xdp(&mut dp, &p)
        } else {
            let Ok(out) = dp.try_run(prog, &p) else { continue };
            out
        };
        assert!(verdicts.contains(&out.verdict), "{prog} run {i}: {}: {p:02x?}", out.verdict);
        if out.packet[12..] == p[12..] {
            unchanged += 1;
            continue;
        }
        reversed += 1;
        by_hook[(i / runs) as usize] += 1;
        if out.verdict == XDP_TX {
            // Back out towards the clients' gateway.
            assert_eq!(out.packet[..6], mac(routed::GATEWAY_MAC)[..], "{prog} run {i}");
        }
        assert_eq!(out.packet.len(), p.len(), "run {i}");
        let (Some(s_in), Some(s)) = (summarize(&p), summarize(&out.packet)) else {
            panic!("run {i}: {p:02x?} -> {:02x?}", out.packet)
        };
        if s.later_fragment {
            // A later fragment of a datagram whose first fragment (another mutation) was
            // reversed: its addresses only.
            assert_eq!(out.packet[s.l4_off..], p[s.l4_off..], "run {i}");
            continue;
        }
        let want = flows_by_port.get(&(s_in.proto, s_in.dst.port()));
        assert_eq!(Some(&(s.src, s.dst)), want, "run {i}: {p:02x?}");
        if checksums_ok(&p).is_ok() {
            let sums = checksums_ok(&out.packet);
            assert!(sums.is_ok(), "run {i}: {sums:?}: {p:02x?}");
        }
    }
    assert!(reversed > 100 && unchanged > 100, "{reversed} reversed, {unchanged} unchanged");
    assert!(by_hook.iter().all(|&n| n > 50), "reversed by tc and XDP: {by_hook:?}");
    watch.check(&dp);
    // Flows a mutated reset or FIN ended would expire before the clean reply on a slow machine.
    dp.restore_conntrack(&first_states);
    let (_, s) = run(&mut dp, PROG_TC_INGRESS, &seeds[0]);
    assert_eq!((s.src, s.dst), (sa(VIP, 80), sa(CLIENT, 43000)), "a clean reply");
}
