//! Monitor events from the device hooks (BPF_PROG_TEST_RUN against the real object): sent only
//! while a lease is held and only of the kinds it asks for, each with the packet's tuple, the
//! translation, service, reason and device; a full ring buffer counts what it lost and costs
//! nothing else. The socket hooks' events are checked with real sockets in `lbctl_live.rs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{Array, Map, MapData, RingBuf};
use lb_agent::{
    model::plan::Protocol,
    monitor::{self, Kind, Lease},
};
use lb_common::*;
use lb_tests::{
    addrs::*,
    kernel::{Datapath, coarse_now_ns},
    packets::*,
    plans::{backend, lb_plan},
    require_root,
    routed::RoutedNode,
};

const OUTSIDER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 7);
const XDP_DROP: i32 = 1;
/// BPF_PROG_TEST_RUN runs skb programs on the loopback device unless told otherwise.
const LO: u32 = 1;

/// web (VIP:80, a local pod, only 203.0.113.0/24 may connect), remote (VIP:81, a pod of
/// another node: SNAT), empty (VIP:82 and [VIP6]:82, no endpoints).
fn datapath() -> Datapath {
    let mut dp = Datapath::load();
    dp.set_node(Some(NODE.into()), None);
    let mut web =
        lb_plan("web", VIP.into(), 80, Protocol::Tcp, vec![backend(LOCAL_POD.into(), 8080, true)]);
    web.source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
    let remote = lb_plan(
        "remote",
        VIP.into(),
        81,
        Protocol::Tcp,
        vec![backend(REMOTE_POD.into(), 8080, false)],
    );
    let empty = lb_plan("empty", VIP.into(), 82, Protocol::Tcp, vec![]);
    let empty6 = lb_plan("empty6", VIP6.into(), 82, Protocol::Tcp, vec![]);
    dp.program("web", &[web]);
    dp.program("remote", &[remote]);
    dp.program("empty", &[empty]);
    dp.program("empty6", &[empty6]);
    dp
}

fn lease(dp: &mut Datapath, kinds: &[Kind]) -> anyhow::Result<Lease> {
    lease_forced(dp, kinds, false)
}

fn lease_forced(dp: &mut Datapath, kinds: &[Kind], force: bool) -> anyhow::Result<Lease> {
    let options = Array::try_from(Map::Array(dp.map_handle(MAP_OPTIONS))).unwrap();
    Lease::on(options, monitor::mask(kinds), force)
}

fn ring(dp: &mut Datapath) -> RingBuf<MapData> {
    RingBuf::try_from(Map::RingBuf(dp.map_handle(MAP_EVENTS))).unwrap()
}

/// Every event waiting in the ring buffer.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<MonitorEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        out.push(monitor::decode(&item).expect("a record of this build's layout"));
    }
    out
}

fn addr(ip: impl Into<IpAddr>) -> Addr {
    match ip.into() {
        IpAddr::V4(a) => addr_from_v4_raw(u32::from_ne_bytes(a.octets())),
        IpAddr::V6(a) => {
            let o = a.octets();
            core::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }
    }
}

#[test]
fn device_hooks_report_only_while_a_lease_asks_and_only_the_kinds_it_asks_for() {
    require_root!();
    let mut dp = datapath();
    let web = dp.service_id("web");
    let mut dp = dp;
    let mut ring = ring(&mut dp);
    let denied = tcp4(OUTSIDER, 4000, VIP, 80, true, b"");

    // No monitor: counted, not reported.
    assert_eq!(dp.run(PROG_TC_INGRESS, &denied).verdict, TC_ACT_SHOT);
    assert_eq!(dp.stat(STAT_DROP_SOURCE_RANGE), 1);
    assert_eq!(drain(&mut ring), vec![]);

    // Drops only.
    let held = lease(&mut dp, &[Kind::Drop]).unwrap();
    let err = lease(&mut dp, &[Kind::All]).err().expect("a second monitor is refused");
    assert!(err.to_string().contains("another lbctl monitor is running"), "{err}");
    let before = coarse_now_ns();
    assert_eq!(dp.run(PROG_TC_INGRESS, &denied).verdict, TC_ACT_SHOT);
    let allowed = dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 4001, VIP, 80, true, b""));
    assert_eq!(allowed.verdict, TC_ACT_OK);
    assert_eq!(
        dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 4002, VIP, 82, true, b"")).verdict,
        7,
        "reject"
    );
    let events = drain(&mut ring);
    assert_eq!(events.len(), 1, "the drop alone (not the new flow, not the reject): {events:?}");
    let e = events[0];
    assert_eq!(
        (e.kind, e.hook, e.reason, e.service_id, e.proto, e.flags),
        (EVENT_DROP, HOOK_TC_INGRESS, STAT_DROP_SOURCE_RANGE, web, PROTO_TCP, 0)
    );
    assert_eq!((e.saddr, e.sport_be), (addr(OUTSIDER), 4000u16.to_be()));
    assert_eq!((e.daddr, e.dport_be), (addr(VIP), 80u16.to_be()));
    assert_eq!((e.new_daddr, e.new_dport_be), ([0; 4], 0), "nothing translated");
    assert_eq!((e.ifindex, e.len, e.pid, e.cookie), (LO, denied.len() as u32, 0, 0));
    assert!(e.time_ns >= before - 10_000_000 && e.time_ns <= coarse_now_ns(), "{}", e.time_ns);
    let v = monitor::view(&e, &LoNames, 0);
    assert_eq!(
        (v.device.as_deref(), v.why),
        (Some("lo"), "client outside loadBalancerSourceRanges")
    );

    // XDP's drop says so.
    assert_eq!(
        dp.run(PROG_XDP_INGRESS, &tcp4(OUTSIDER, 4003, VIP, 80, true, b"")).verdict,
        XDP_DROP
    );
    let events = drain(&mut ring);
    assert_eq!(
        events.iter().map(|e| (e.kind, e.hook)).collect::<Vec<_>>(),
        [(EVENT_DROP, HOOK_XDP)]
    );

    // Taken over (--force): the first monitor notices at its next renewal, and stopping
    // leaves the new holder's lease alone.
    let mut first = held;
    let second = lease_forced(&mut dp, &[Kind::Reject], true).unwrap();
    let err = first.renew().expect_err("taken over");
    assert!(err.to_string().contains("another lbctl monitor took over"), "{err}");
    drop(first);
    assert_eq!(dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 4004, VIP, 82, true, b"")).verdict, 7);
    let events = drain(&mut ring);
    assert_eq!(events.iter().map(|e| e.kind).collect::<Vec<_>>(), [EVENT_REJECT], "second's kinds");
    // A pod's device (`--pod-devices`) names itself: a pod's connection to the empty service.
    let from_pod = tcp4(LOCAL_POD, 4005, VIP, 82, true, b"");
    assert_eq!(dp.run(PROG_TC_FROM_POD, &from_pod).verdict, 7);
    let events = drain(&mut ring);
    assert_eq!(
        events.iter().map(|e| (e.kind, e.hook)).collect::<Vec<_>>(),
        [(EVENT_REJECT, HOOK_TC_FROM_POD)]
    );
    assert_eq!(monitor::view(&events[0], &LoNames, 0).hook, "from-pod");
    let held = second;

    // Released: nothing more.
    drop(held);
    assert_eq!(dp.run(PROG_TC_INGRESS, &denied).verdict, TC_ACT_SHOT);
    assert_eq!(drain(&mut ring), vec![]);
    assert_eq!(dp.stat(STAT_DROP_SOURCE_RANGE), 4, "counted all along");
}

struct LoNames;
impl monitor::Names for LoNames {
    fn service(&self, _: u32) -> Option<String> {
        None
    }
    fn device(&self, ifindex: u32) -> Option<String> {
        (ifindex == LO).then(|| "lo".into())
    }
    fn cgroup(&self, _: u64) -> Option<String> {
        None
    }
}

#[test]
fn new_flows_carry_their_translation_and_rejects_their_service_in_both_families() {
    require_root!();
    let mut dp = datapath();
    let ids: Vec<u32> = ["web", "remote", "empty", "empty6"].map(|s| dp.service_id(s)).into();
    let mut dp = dp;
    let mut ring = ring(&mut dp);
    let _held = lease(&mut dp, &[Kind::All]).unwrap();

    let first = tcp4(CLIENT, 5000, VIP, 80, true, b"");
    assert_eq!(dp.run(PROG_TC_INGRESS, &first).verdict, TC_ACT_OK);
    // Its next packet and a packet for no frontend: not events.
    assert_eq!(
        dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 5000, VIP, 80, false, b"x")).verdict,
        TC_ACT_OK
    );
    assert_eq!(
        dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 5000, VIP, 9999, true, b"")).verdict,
        TC_ACT_OK
    );
    let snat = dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 5001, VIP, 81, true, b""));
    // (No route to the other node here: the stack gets the translated packet.)
    assert_eq!(snat.verdict, TC_ACT_OK);
    let sent = summarize(&snat.packet).unwrap();
    assert_eq!(
        dp.run(PROG_TC_INGRESS, &tcp4(CLIENT, 5002, VIP, 82, true, b"")).verdict,
        7,
        "reject"
    );
    assert_eq!(
        dp.run(PROG_TC_INGRESS, &tcp6(CLIENT6, 5003, VIP6, 82, true, b"")).verdict,
        7,
        "reject"
    );

    let events = drain(&mut ring);
    let kinds: Vec<_> = events.iter().map(|e| (e.kind, e.reason)).collect();
    assert_eq!(
        kinds,
        [
            (EVENT_NEW_FLOW, STAT_CT_NEW),
            (EVENT_NEW_FLOW, STAT_CT_NEW),
            (EVENT_REJECT, STAT_REJECT_NO_BACKEND),
            (EVENT_REJECT, STAT_REJECT_NO_BACKEND)
        ]
    );
    let (local, remote, empty, empty6) = (events[0], events[1], events[2], events[3]);
    assert_eq!(local.service_id, ids[0]);
    assert_eq!(
        (local.new_saddr, local.new_sport_be),
        (addr(CLIENT), 5000u16.to_be()),
        "client kept"
    );
    assert_eq!((local.new_daddr, local.new_dport_be), (addr(LOCAL_POD), 8080u16.to_be()));
    assert_eq!(local.flags, 0);
    assert_eq!(remote.service_id, ids[1]);
    assert_eq!(remote.flags, EVENT_F_SNAT);
    // The event says what the packet became.
    assert_eq!(remote.new_saddr, addr(sent.src.ip()));
    assert_eq!(u16::from_be(remote.new_sport_be), sent.src.port());
    assert_eq!((remote.new_daddr, remote.new_dport_be), (addr(REMOTE_POD), 8080u16.to_be()));
    assert_eq!(sent.src.ip(), IpAddr::from(NODE));
    assert_eq!((empty.service_id, empty.dport_be), (ids[2], 82u16.to_be()));
    assert_eq!((empty6.service_id, empty6.flags), (ids[3], EVENT_F_V6));
    assert_eq!((empty6.saddr, empty6.daddr), (addr(CLIENT6), addr(VIP6)));
}

#[test]
fn an_expired_lease_stops_the_events_and_a_full_ring_counts_what_it_lost() {
    require_root!();
    let mut dp = datapath();
    let mut ring = ring(&mut dp);
    let denied = |port| tcp4(OUTSIDER, port, VIP, 80, true, b"");
    let _held = lease(&mut dp, &[Kind::Drop]).unwrap();

    // A monitor that died without clearing its lease: past its deadline, nothing is sent.
    let mut options: Array<MapData, u32> =
        Array::try_from(Map::Array(dp.map_handle(MAP_OPTIONS))).unwrap();
    let now_s = (coarse_now_ns() / 1_000_000_000) as u32;
    options.set(OPT_MONITOR_UNTIL_S, now_s - 1, 0).unwrap();
    dp.run(PROG_TC_INGRESS, &denied(1));
    assert_eq!(drain(&mut ring), vec![]);

    // Nobody reading: the ring fills, the rest is counted, every packet still dropped.
    options.set(OPT_MONITOR_UNTIL_S, now_s + 60, 0).unwrap();
    let sent = 5000u32;
    for i in 0..sent {
        assert_eq!(dp.run(PROG_TC_INGRESS, &denied(10_000 + i as u16)).verdict, TC_ACT_SHOT);
    }
    let kept = drain(&mut ring);
    let lost = dp.stat(STAT_MONITOR_LOST);
    assert!(lost > 0, "the ring holds fewer than {sent} events");
    assert_eq!(kept.len() as u64 + lost, sent as u64, "each event kept or counted lost");
    // What was kept is in order, from the first packet on.
    let ports: Vec<u16> = kept.iter().map(|e| u16::from_be(e.sport_be)).collect();
    assert_eq!(ports, (0..kept.len() as u16).map(|i| 10_000 + i).collect::<Vec<_>>());
    assert!(kept.len() * size_of::<MonitorEvent>() <= EVENTS_BYTES as usize);
    // Read: room again.
    dp.run(PROG_TC_INGRESS, &denied(2));
    assert_eq!(drain(&mut ring).len(), 1);
    assert_eq!(dp.stat(STAT_DROP_SOURCE_RANGE), sent as u64 + 2);
}

#[test]
fn a_packet_too_big_for_its_route_is_reported_with_the_mtu_and_the_flow() {
    require_root!();
    // The route to the pods leaves by n0, with an MTU of 1400 (a tunnel's, say).
    let node = RoutedNode::new();
    node.ns.ip(&["link", "set", "n0", "mtu", "1400"]);
    let mut dp = datapath();
    let remote = dp.service_id("remote");
    let mut dp = dp;
    let mut ring = ring(&mut dp);
    assert_eq!(node.run_tc(&mut dp, &tcp4(CLIENT, 6000, VIP, 81, true, b""), 0).verdict, 7);
    let _held = lease(&mut dp, &[Kind::Drop]).unwrap();
    let mut big = tcp4(CLIENT, 6000, VIP, 81, false, &[7u8; 1410]);
    big[14 + 6] |= 0x40; // don't fragment
    fix_ipv4_checksum(&mut big);
    assert_eq!(node.run_tc(&mut dp, &big, 0).verdict, 7, "fragmentation needed sent back");
    assert_eq!(dp.stat(STAT_TOO_BIG), 1);
    let events = drain(&mut ring);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!((e.kind, e.reason, e.hook), (EVENT_DROP, STAT_TOO_BIG, HOOK_TC_INGRESS));
    assert_eq!((e.mtu, e.len, e.ifindex), (1400, big.len() as u32, node.n0));
    assert_eq!((e.service_id, e.saddr, e.dport_be), (remote, addr(CLIENT), 81u16.to_be()));
    assert_eq!(
        (e.new_daddr, e.new_saddr),
        (addr(REMOTE_POD), addr(NODE)),
        "the flow's translation"
    );
}

#[test]
fn a_dropped_packet_to_a_service_addresss_unknown_port_is_reported_without_a_service() {
    require_root!();
    // The node forwards, by a default route: the drop's condition.
    let node = RoutedNode::new();
    let mut dp = datapath();
    let mut ring = ring(&mut dp);
    let _held = lease(&mut dp, &[Kind::Drop]).unwrap();
    let p = tcp4(CLIENT, 6001, VIP, 9999, true, b"");
    assert_eq!(node.run_tc(&mut dp, &p, 0).verdict, TC_ACT_SHOT);
    let events = drain(&mut ring);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(
        (e.kind, e.reason, e.hook, e.service_id),
        (EVENT_DROP, STAT_DROP_UNKNOWN_PORT, HOOK_TC_INGRESS, EVENT_NO_SERVICE)
    );
    assert_eq!((e.daddr, e.dport_be, e.ifindex), (addr(VIP), 9999u16.to_be(), node.n0));
    let v = monitor::view(&e, &LoNames, 0);
    assert!(v.why.starts_with("no such port or protocol on this service address"), "{}", v.why);
}
