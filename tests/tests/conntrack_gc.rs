//! The agent's conntrack sweep (`dataplane::conntrack_gc`) and batch reader
//! (`dataplane::batch`) on the real maps: flows made by the real programs from packets, then
//! aged by moving their stamps back.

use std::{collections::HashSet, net::Ipv4Addr};

use lb_agent::{
    dataplane::{
        batch,
        conntrack_gc::{self, Sweep},
    },
    model::plan::Protocol,
};
use lb_common::*;
use lb_tests::{
    addrs::*,
    kernel::{Datapath, TEST_MAP_SIZES, coarse_now_ns, secs_ago_ns},
    packets::*,
    plans::{backend, lb_plan},
    require_root,
};

/// A datapath on NODE (its SNAT address), with no service yet.
fn node_datapath() -> Datapath {
    let mut dp = Datapath::load();
    dp.set_node(Some(NODE.into()), None);
    dp
}

/// TCP "web" on VIP:80 to a local pod; UDP "dns" on VIP:53 to another node's pod (SNAT).
fn datapath() -> Datapath {
    let mut dp = node_datapath();
    let web =
        lb_plan("web", VIP.into(), 80, Protocol::Tcp, vec![backend(LOCAL_POD.into(), 8080, true)]);
    let dns = lb_plan(
        "dns",
        VIP.into(),
        53,
        Protocol::Udp,
        vec![backend(REMOTE_POD.into(), 5353, false)],
    );
    dp.program("web", &[web]);
    dp.program("dns", &[dns]);
    dp
}

/// The client port of the flow an entry belongs to (forward: its source; reply: the port it
/// restores as destination).
fn client_port(k: &CtKey, v: &CtValue) -> u16 {
    u16::from_be(if v.flags & CT_F_REPLY != 0 { v.new_dport_be } else { k.sport_be })
}

/// Moves back by `secs` the stamps of the entries of client port `port` (`reply`: which
/// direction; `None`: both).
fn age(dp: &mut Datapath, port: u16, reply: Option<bool>, secs: u64) {
    let old = secs_ago_ns(secs);
    for (k, v) in dp.conntrack() {
        let is_reply = v.flags & CT_F_REPLY != 0;
        if client_port(&k, &v) == port && reply.is_none_or(|r| r == is_reply) {
            dp.set_conntrack(k, CtValue { last_seen_ns: old, ..v });
        }
    }
}

/// Client ports of the flows in conntrack, one per entry, sorted.
fn ports(dp: &mut Datapath) -> Vec<u16> {
    let mut p: Vec<u16> = dp.conntrack().iter().map(|(k, v)| client_port(k, v)).collect();
    p.sort();
    p
}

fn pass(dp: &mut Datapath, packet: &[u8]) {
    assert_eq!(dp.run(PROG_TC_INGRESS, packet).verdict, TC_ACT_OK);
}

#[test]
fn a_sweep_removes_the_flows_whose_entries_all_expired_and_keeps_the_others() {
    require_root!();
    let mut dp = datapath();
    for port in [1001, 1002, 1004, 1005] {
        pass(&mut dp, &tcp4(CLIENT, port, VIP, 80, true, b""));
    }
    pass(&mut dp, &tcp4_end(CLIENT, 1004, VIP, 80, true)); // reset: 1 s to live
    pass(&mut dp, &tcp4_end(CLIENT, 1005, VIP, 80, false)); // closing: 10 s to live
    // One-way UDP to a SNATed backend: the client keeps sending, the backend never answers.
    pass(&mut dp, &udp4(CLIENT, 1003, VIP, 53, b"q"));
    assert_eq!(ports(&mut dp), [1001, 1001, 1002, 1002, 1003, 1003, 1004, 1004, 1005, 1005]);

    age(&mut dp, 1001, None, 61); // a SYN that never got further: both expired (60 s)
    age(&mut dp, 1004, None, 2);
    age(&mut dp, 1005, None, 5);
    age(&mut dp, 1003, Some(true), 61); // its reply entry (which holds the SNAT port) only
    let sweep = dp.sweep_conntrack();
    assert_eq!(sweep, Sweep { entries: 10, live: 5, removed: 4, kept_for_pair: 1 });
    assert_eq!(ports(&mut dp), [1002, 1002, 1003, 1003, 1005, 1005]);
    let snat_reply = CT_F_REPLY | CT_F_SNAT;
    assert!(dp.conntrack().iter().any(|(_, v)| v.flags & snat_reply == snat_reply));

    // The datapath never met an expired entry: the sweep took them. A removed flow's next
    // packet starts a new one; a kept flow's packets follow their entries.
    let new_before = dp.stat(STAT_CT_NEW);
    pass(&mut dp, &tcp4(CLIENT, 1001, VIP, 80, true, b""));
    assert_eq!(dp.stat(STAT_CT_NEW), new_before + 1);
    let hits_before = dp.stat(STAT_CT_HIT);
    pass(&mut dp, &tcp4(CLIENT, 1002, VIP, 80, false, b"more"));
    pass(&mut dp, &udp4(CLIENT, 1003, VIP, 53, b"again"));
    assert_eq!(dp.stat(STAT_CT_HIT), hits_before + 2);
    assert_eq!(dp.stat(STAT_CT_EXPIRED), 0);

    // Nothing left to remove: a second sweep only reads.
    let again = dp.sweep_conntrack();
    assert_eq!(again, Sweep { entries: 8, live: 7, removed: 0, kept_for_pair: 1 });
}

/// Between the batch read and the removal the datapath may refresh an entry, or meet it
/// expired and start the flow afresh under the same keys: neither may be removed.
#[test]
fn an_entry_refreshed_or_replaced_after_the_read_is_kept() {
    require_root!();
    let mut dp = datapath();
    for port in [2001, 2002] {
        pass(&mut dp, &tcp4(CLIENT, port, VIP, 80, true, b""));
        age(&mut dp, port, None, 61);
    }
    let now = coarse_now_ns();
    let dead: Vec<(CtKey, CtValue)> = dp
        .conntrack()
        .into_iter()
        .filter(|(k, v)| CtTimeouts::default().expired(k.proto, v.state, now - v.last_seen_ns))
        .collect();
    assert_eq!(dead.len(), 4, "both flows read as dead");

    // Now 2001's forward entry is refreshed (the stamp a packet leaves on an entry that was
    // still live at its arrival, the read having come a hair after), and 2002's client opens
    // again (the datapath meets the expired entries, removes them and creates new ones).
    let (k, v) = dp
        .conntrack()
        .into_iter()
        .find(|(k, v)| client_port(k, v) == 2001 && v.flags & CT_F_REPLY == 0)
        .expect("2001's forward entry");
    dp.set_conntrack(k, CtValue { last_seen_ns: coarse_now_ns(), ..v });
    pass(&mut dp, &tcp4(CLIENT, 2002, VIP, 80, true, b""));
    assert_eq!(dp.stat(STAT_CT_EXPIRED), 1, "2002's old flow");

    let mut ct = conntrack_gc::handle(dp.conntrack_map()).expect("handle");
    let mut sweep = Sweep::default();
    conntrack_gc::remove_dead(&mut ct, &dead, &dp.ct_timeouts(), &mut sweep).expect("remove");
    assert_eq!(sweep.removed, 0, "{sweep:?}");
    assert_eq!(ports(&mut dp), [2001, 2001, 2002, 2002]);
    // 2001's reply entry is still expired but kept, as its forward direction lives; 2002's two
    // each found the other new.
    assert_eq!(sweep.kept_for_pair, 3, "{sweep:?}");
    let now = coarse_now_ns();
    let fresh = dp
        .conntrack()
        .iter()
        .filter(|(k, v)| !CtTimeouts::default().expired(k.proto, v.state, now - v.last_seen_ns))
        .count();
    assert_eq!(fresh, 3, "2001's forward entry and 2002's new two");
}

#[test]
fn the_batch_reader_returns_every_entry_once_across_chunks() {
    require_root!();
    let mut dp = Datapath::load();
    let n = 10_000u32; // three chunks of batch::CHUNK
    for i in 0..n {
        let mut key =
            CtKey { proto: PROTO_TCP, sport_be: (i as u16).to_be(), ..Default::default() };
        key.saddr[3] = (i >> 16).to_be();
        key.daddr[3] = 0x0a000001u32.to_be();
        let value = CtValue { backend_id: i, ..Default::default() };
        assert!(dp.insert_conntrack(key, value));
    }
    let (mut seen, mut chunks) = (HashSet::new(), 0);
    let total = batch::for_each_chunk::<CtKey, CtValue>(dp.conntrack_map(), |keys, values| {
        chunks += 1;
        assert_eq!(keys.len(), values.len());
        for (k, v) in keys.iter().zip(values) {
            let i = (u32::from_be(k.saddr[3]) << 16) | u16::from_be(k.sport_be) as u32;
            assert_eq!(v.backend_id, i, "value read with its own key");
            assert!(seen.insert(i), "entry {i} twice");
        }
        Ok(())
    })
    .expect("batch read");
    assert_eq!((total, seen.len()), (n as u64, n as usize));
    assert!(chunks >= 3, "{chunks} chunks");
    let aya: HashSet<u32> = dp.conntrack().iter().map(|(_, v)| v.backend_id).collect();
    assert_eq!(aya, seen, "the same entries as aya's one-by-one iteration");

    // Types of another size than the map's are refused, not misread.
    let err = batch::for_each_chunk::<u32, u32>(dp.conntrack_map(), |_, _| Ok(())).unwrap_err();
    assert!(format!("{err:#}").contains("40-byte keys"), "{err:#}");
}

/// Why the sweep exists: short connections that end keep filling the map, and a long-lived
/// connection, idle meanwhile, keeps its entries only because the sweep removes the ended
/// flows before the LRU has to evict (which it does by last use, so the idle one would go
/// first; checked by skipping the sweep: its entries were gone by the end, and the map was
/// full of ended flows' entries).
#[test]
fn an_idle_connection_outlives_ended_flows_that_fill_the_map_twice_over() {
    require_root!();
    let mut dp = datapath();
    pass(&mut dp, &tcp4(CLIENT, 7, VIP, 80, true, b""));
    pass(&mut dp, &tcp4(CLIENT, 7, VIP, 80, false, b"hello"));
    let capacity = TEST_MAP_SIZES.max_conntrack as u16; // two entries a flow
    let per_round = capacity / 8;
    let mut port = 1024u16;
    for _ in 0..8 {
        for _ in 0..per_round {
            pass(&mut dp, &tcp4(CLIENT, port, VIP, 80, true, b""));
            pass(&mut dp, &tcp4_end(CLIENT, port, VIP, 80, true));
            port += 1;
        }
        // A second later the resets have expired (1 s); moved back instead of waited for.
        let old = secs_ago_ns(2);
        for (k, v) in dp.conntrack() {
            if v.state == CT_STATE_RESET {
                dp.set_conntrack(k, CtValue { last_seen_ns: old, ..v });
            }
        }
        dp.sweep_conntrack();
    }
    let entries_made = 2 * u32::from(port - 1024);
    assert_eq!(entries_made, 2 * TEST_MAP_SIZES.max_conntrack, "twice the map");
    let left = ports(&mut dp);
    let idle = left.iter().filter(|&&p| p == 7).count();
    assert_eq!((left.len(), idle), (2, 2), "entries left, of which the idle connection's");
    let hits = dp.stat(STAT_CT_HIT);
    pass(&mut dp, &tcp4(CLIENT, 7, VIP, 80, false, b"still there"));
    assert_eq!(dp.stat(STAT_CT_HIT), hits + 1);
}

/// `--conntrack-tcp-timeout-established`, `--conntrack-udp-timeout`,
/// `--conntrack-udp-timeout-stream` and `--conntrack-tcp-timeout-close-wait` reach the datapath
/// and the sweep alike; the same flows under the default lifetimes live on.
#[test]
fn configured_lifetimes_expire_flows_in_the_datapath_and_the_sweep_alike() {
    require_root!();
    use lb_agent::dataplane::options::Options;
    let short = CtTimeouts { tcp_established_s: 5, udp_s: 2, tcp_close_wait_s: 3, udp_stream_s: 4 };
    for configured in [Some(short), None] {
        let mut dp = datapath();
        if let Some(t) = configured {
            dp.set_options(&Options { ct_timeouts: t, ..Default::default() });
        }
        assert_eq!(dp.ct_timeouts(), configured.unwrap_or_default());
        for port in [3001, 3002, 3005, 3007, 3008] {
            // Both directions established: the client's ACK, the backend's answer.
            pass(&mut dp, &tcp4(CLIENT, port, VIP, 80, true, b""));
            pass(&mut dp, &tcp4(CLIENT, port, VIP, 80, false, b"ack"));
            let answer = dp.run(PROG_TC_EGRESS, &tcp4(LOCAL_POD, 8080, CLIENT, port, false, b"ok"));
            assert_eq!(answer.verdict, TC_ACT_OK);
        }
        // Half-closed by the client: the backend may go on sending.
        for port in [3007, 3008] {
            pass(&mut dp, &tcp4_end(CLIENT, port, VIP, 80, false));
        }
        for port in [3003, 3004, 3006, 3009, 3010] {
            pass(&mut dp, &udp4(CLIENT, port, VIP, 53, b"q"));
        }
        // Answered: streams.
        for port in [3009, 3010] {
            let nat_port = dp
                .conntrack()
                .iter()
                .find(|(k, v)| v.flags & CT_F_REPLY == 0 && u16::from_be(k.sport_be) == port)
                .map(|(_, v)| u16::from_be(v.new_sport_be))
                .expect("the flow's SNAT port");
            let answer = dp.run(PROG_TC_INGRESS, &udp4(REMOTE_POD, 5353, NODE, nat_port, b"a"));
            assert!(answer.verdict == TC_ACT_OK || answer.verdict == TC_ACT_REDIRECT);
        }
        let aged = [
            (3001, 6),
            (3002, 4),
            (3005, 6),
            (3003, 3),
            (3004, 1),
            (3006, 3),
            (3007, 4),
            (3008, 2),
            (3009, 3),
            (3010, 5),
        ];
        for (port, secs) in aged {
            age(&mut dp, port, None, secs);
        }
        let (expired, new) = (dp.stat(STAT_CT_EXPIRED), dp.stat(STAT_CT_NEW));
        for port in [3001, 3002, 3007, 3008] {
            pass(&mut dp, &tcp4(CLIENT, port, VIP, 80, false, b"more"));
        }
        for port in [3003, 3004, 3009] {
            pass(&mut dp, &udp4(CLIENT, port, VIP, 53, b"again"));
        }
        let swept = dp.sweep_conntrack();
        let left = ports(&mut dp);
        if configured.is_some() {
            // 3001 (6 s, established), 3003 (3 s, UDP) and 3007 (4 s, half-closed) start
            // afresh, 3009 (3 s, an answered UDP stream) lives on; 3005, 3006 and 3010 (5 s,
            // a stream) are swept.
            assert_eq!(dp.stat(STAT_CT_EXPIRED) - expired, 3);
            assert_eq!(dp.stat(STAT_CT_NEW) - new, 3);
            assert_eq!(swept.removed, 6, "{swept:?}");
            let want = [
                3001, 3001, 3002, 3002, 3003, 3003, 3004, 3004, 3007, 3007, 3008, 3008, 3009, 3009,
            ];
            assert_eq!(left, want);
        } else {
            assert_eq!((dp.stat(STAT_CT_EXPIRED), dp.stat(STAT_CT_NEW)), (expired, new));
            assert_eq!(swept.removed, 0, "{swept:?}");
            assert_eq!(left.len(), 20);
        }
    }
}

/// Where the datapath sends this packet (tc ingress), as `addr:port`.
fn sent_to(dp: &mut Datapath, packet: &[u8]) -> std::net::SocketAddr {
    let out = dp.run(PROG_TC_INGRESS, packet);
    assert!(out.verdict == TC_ACT_OK || out.verdict == 7, "verdict {}", out.verdict);
    summarize(&out.packet).expect("a TCP/UDP packet").dst
}

/// A UDP endpoint its service stops using takes its flows' entries with it (both directions,
/// SNATed ones too), so a client that keeps sending from one port reaches a live endpoint, as
/// kube-proxy's conntrack flush makes happen; TCP flows keep their endpoint until they end.
#[test]
fn flows_to_a_udp_endpoint_the_service_dropped_move_to_a_live_one() {
    require_root!();
    let mut dp = node_datapath();
    let (a, b) = (Ipv4Addr::new(10, 1, 0, 5), Ipv4Addr::new(10, 1, 0, 6));
    let (c, d) = (Ipv4Addr::new(10, 1, 1, 5), Ipv4Addr::new(10, 1, 1, 6));
    let program = |dp: &mut Datapath, local: Ipv4Addr, remote: Ipv4Addr| {
        let be = |ip: Ipv4Addr, port, local| vec![backend(ip.into(), port, local)];
        dp.program("dns", &[lb_plan("dns", VIP.into(), 53, Protocol::Udp, be(local, 5353, true))]);
        let dns2 = lb_plan("dns2", VIP.into(), 54, Protocol::Udp, be(remote, 5353, false));
        dp.program("dns2", &[dns2]);
        dp.program("web", &[lb_plan("web", VIP.into(), 80, Protocol::Tcp, be(local, 8080, true))]);
    };
    program(&mut dp, a, c);
    assert_eq!(sent_to(&mut dp, &udp4(CLIENT, 4001, VIP, 53, b"q")), sa(a, 5353));
    assert_eq!(sent_to(&mut dp, &udp4(CLIENT, 4003, VIP, 54, b"q")), sa(c, 5353));
    assert_eq!(sent_to(&mut dp, &tcp4(CLIENT, 4002, VIP, 80, true, b"")), sa(a, 8080));
    assert_eq!(dp.conntrack().len(), 6);

    // a and c leave their services; b and d take their places.
    program(&mut dp, b, d);
    // Until the flush, the UDP flows still go to the endpoints that left.
    assert_eq!(sent_to(&mut dp, &udp4(CLIENT, 4001, VIP, 53, b"q")), sa(a, 5353));
    assert_eq!(dp.flush_stale_udp(), 4, "two UDP flows, two entries each");
    assert_eq!(sent_to(&mut dp, &udp4(CLIENT, 4001, VIP, 53, b"q")), sa(b, 5353));
    assert_eq!(sent_to(&mut dp, &udp4(CLIENT, 4003, VIP, 54, b"q")), sa(d, 5353));
    assert_eq!(sent_to(&mut dp, &tcp4(CLIENT, 4002, VIP, 80, false, b"more")), sa(a, 8080));
    assert_eq!(dp.flush_stale_udp(), 0, "nothing new to flush");
}

fn sa(ip: Ipv4Addr, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(ip.into(), port)
}

/// An agent that starts flushes the UDP flows to endpoints that went while no agent ran; flows
/// to endpoints still in use, and TCP flows, stay.
#[test]
fn after_a_restart_udp_flows_to_endpoints_gone_meanwhile_are_flushed() {
    require_root!();
    let mut dp = node_datapath();
    let (a, b) = (Ipv4Addr::new(10, 1, 0, 5), Ipv4Addr::new(10, 1, 0, 6));
    let dns = |bs: &[Ipv4Addr]| {
        let bs = bs.iter().map(|ip| backend((*ip).into(), 5353, true)).collect();
        lb_plan("dns", VIP.into(), 53, Protocol::Udp, bs)
    };
    dp.program("dns", &[dns(&[a, b])]);
    let web = vec![backend(a.into(), 8080, true)];
    dp.program("web", &[lb_plan("web", VIP.into(), 80, Protocol::Tcp, web)]);
    let on_a: Vec<u16> = (5001..5021)
        .filter(|&port| sent_to(&mut dp, &udp4(CLIENT, port, VIP, 53, b"q")) == sa(a, 5353))
        .collect();
    assert!(!on_a.is_empty() && on_a.len() < 20, "both endpoints get flows: {on_a:?}");
    assert_eq!(sent_to(&mut dp, &tcp4(CLIENT, 5100, VIP, 80, true, b"")), sa(a, 8080));

    // The agent stops; a leaves the service; an agent starts.
    dp.restart_writer();
    dp.program("dns", &[dns(&[b])]);
    dp.program(
        "web",
        &[lb_plan("web", VIP.into(), 80, Protocol::Tcp, vec![backend(b.into(), 8080, true)])],
    );
    assert_eq!(dp.finish_restart(), 2 * on_a.len() as u64);
    let hits = dp.stat(STAT_CT_HIT);
    for port in 5001..5021 {
        assert_eq!(sent_to(&mut dp, &udp4(CLIENT, port, VIP, 53, b"q")), sa(b, 5353), "{port}");
    }
    assert_eq!(dp.stat(STAT_CT_HIT) - hits, 20 - on_a.len() as u64, "b's flows kept theirs");
    assert_eq!(sent_to(&mut dp, &tcp4(CLIENT, 5100, VIP, 80, false, b"more")), sa(a, 8080));
}
