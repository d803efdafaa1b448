//! The pod-device hooks (BPF_PROG_TEST_RUN): `tc_from_pod` translates a pod's packets to
//! internal frontends (ClusterIP, NodePort on a node address) with DNAT alone, or DNAT and SNAT
//! when the pod reaches itself; `tc_to_pod` gives replies their frontend back; a backend pod's
//! reply leaving its own device is left for the egress that restores it; the filter
//! (`LB_POD_PORTS`) keeps other packets off the lookups; external-only frontends are not for
//! pods, and a service without endpoints is refused, as is a ClusterIP's port no service has.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_agent::{
    dataplane::kernel_features,
    model::plan::{Backend, Protocol, ServicePlan},
};
use lb_common::*;
use lb_tests::{
    addrs::*,
    kernel::{Datapath, run_checked as run},
    packets::*,
    plans::{backend, lb_plan, simple_plan},
    require_root,
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const NODE_PORT: u16 = 30080;
/// Another pod of this node, the client.
const CLIENT_POD: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 9);
const CLIENT_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 9);

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn datapath(plans: &[ServicePlan]) -> Datapath {
    let mut dp = Datapath::load();
    dp.set_node(Some(NODE.into()), Some(NODE6.into()));
    dp.program("svc", plans);
    dp
}

/// A ClusterIP (port 80) + NodePort service over `backends`.
fn web(cluster_ip: IpAddr, node: IpAddr, backends: Vec<Backend>) -> ServicePlan {
    let mut p = simple_plan("web", cluster_ip, node, NODE_PORT, backends);
    p.has_any_endpoints = !p.cluster_backends.is_empty();
    p
}

/// A pod's connection to a ClusterIP: DNAT to the backend, the pod's own address kept (the
/// backend answers it directly); the reply gets the ClusterIP back on its way into the pod,
/// and on its way out of a local backend's device it is left untouched for that.
#[test]
fn a_pods_connection_to_a_clusterip_is_translated_per_packet_both_ways() {
    require_root!();
    for (backend_addr, local) in [(REMOTE_POD, false), (LOCAL_POD, true)] {
        let mut dp = datapath(&[web(
            CLUSTER_IP.into(),
            NODE.into(),
            vec![backend(backend_addr.into(), 8080, local)],
        )]);
        let syn = tcp4(CLIENT_POD, 40000, CLUSTER_IP, 80, true, b"");
        let (verdict, s) = run(&mut dp, PROG_TC_FROM_POD, &syn);
        assert_eq!(verdict, TC_ACT_OK, "to the stack, which routes it to the backend");
        assert_eq!((s.src, s.dst), (sa(CLIENT_POD, 40000), sa(backend_addr, 8080)));
        assert_eq!(dp.stat(STAT_CT_NEW), 1);
        let ct = dp.conntrack();
        assert_eq!(ct.len(), 2, "forward and reply entries: {ct:?}");
        assert!(ct.iter().all(|(_, v)| v.flags & CT_F_SNAT == 0), "no SNAT: {ct:?}");

        // The backend's reply leaving its own device (a local backend): not restored there,
        // where a NodePort's node address as source would be refused by the stack.
        let reply = tcp4(backend_addr, 8080, CLIENT_POD, 40000, false, b"HTTP/1.1 200 OK");
        assert_eq!(dp.run(PROG_TC_FROM_POD, &reply).packet, reply, "left for the egress");
        // Entering the client's pod: from the ClusterIP.
        let (verdict, s) = run(&mut dp, PROG_TC_TO_POD, &reply);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!((s.src, s.dst), (sa(CLUSTER_IP, 80), sa(CLIENT_POD, 40000)));

        // The rest of the connection follows the entry.
        let data = tcp4(CLIENT_POD, 40000, CLUSTER_IP, 80, false, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(run(&mut dp, PROG_TC_FROM_POD, &data).1.dst, sa(backend_addr, 8080));
        assert_eq!(dp.stat(STAT_CT_NEW), 1, "one flow");
        assert_eq!(dp.stat(STAT_TC_FROM_POD_PACKETS), 3);
        assert_eq!(dp.stat(STAT_TC_TO_POD_PACKETS), 1);
    }
}

/// IPv6 and UDP (a pod's DNS query to the cluster DNS): the same, and the NodePort on the
/// node's address is a pod's frontend too.
#[test]
fn ipv6_udp_and_nodeports_on_node_addresses_are_translated_for_pods() {
    require_root!();
    let backends = vec![backend(REMOTE6.into(), 8080, false)];
    let mut dns = web(CLUSTER_IP6.into(), NODE6.into(), backends.clone());
    (dns.name, dns.protocol) = ("dns".into(), Protocol::Udp);
    let mut dp = datapath(&[web(CLUSTER_IP6.into(), NODE6.into(), backends), dns]);
    let q = udp6(CLIENT_POD6, 5353, CLUSTER_IP6, 80, b"a query");
    let (_, s) = run(&mut dp, PROG_TC_FROM_POD, &q);
    assert_eq!((s.src, s.dst), (sa(CLIENT_POD6, 5353), sa(REMOTE6, 8080)));
    let a = udp6(REMOTE6, 8080, CLIENT_POD6, 5353, b"an answer");
    assert_eq!(run(&mut dp, PROG_TC_TO_POD, &a).1.src, sa(CLUSTER_IP6, 80));

    let np = tcp6(CLIENT_POD6, 41000, NODE6, NODE_PORT, true, b"");
    let (_, s) = run(&mut dp, PROG_TC_FROM_POD, &np);
    assert_eq!(s.dst, sa(REMOTE6, 8080), "the NodePort on the node's address");
    let r = tcp6(REMOTE6, 8080, CLIENT_POD6, 41000, false, b"ok");
    assert_eq!(run(&mut dp, PROG_TC_TO_POD, &r).1.src, sa(NODE6, NODE_PORT));
}

/// A pod reaching itself through its service (hairpin): SNAT to the node address, so that its
/// answer leaves the pod and comes back translated, as kube-proxy masquerades it. Both
/// directions are sent on from the hook (the stack would refuse a node address as source).
#[test]
fn a_pod_reaching_itself_through_its_service_is_snatted_and_its_answer_restored() {
    require_root!();
    let mut dp = datapath(&[web(
        CLUSTER_IP.into(),
        NODE.into(),
        vec![backend(LOCAL_POD.into(), 8080, true)],
    )]);
    let syn = tcp4(LOCAL_POD, 40000, CLUSTER_IP, 80, true, b"");
    let out = dp.run(PROG_TC_FROM_POD, &syn);
    checksums_ok(&out.packet).unwrap();
    let s = summarize(&out.packet).unwrap();
    assert_eq!(s.dst, sa(LOCAL_POD, 8080));
    assert_eq!(s.src.ip(), IpAddr::from(NODE), "SNAT to the node");
    let port = s.src.port();
    assert!((NAT_PORT_MIN..=NAT_PORT_MAX).contains(&port), "a SNAT port: {port}");
    assert!(dp.conntrack().iter().all(|(_, v)| v.flags & CT_F_SNAT != 0));
    assert!(dp.port_set(MAP_POD_PORTS, port), "its answer passes the filter");

    // Its answer, out of the same device: restored and sent back in.
    let ans = tcp4(LOCAL_POD, 8080, NODE, port, false, b"hello me");
    let out = dp.run(PROG_TC_FROM_POD, &ans);
    checksums_ok(&out.packet).unwrap();
    let s = summarize(&out.packet).unwrap();
    assert_eq!((s.src, s.dst), (sa(CLUSTER_IP, 80), sa(LOCAL_POD, 40000)));
}

/// What is not a pod's frontend passes untouched: other pods, the internet, an LB IP's
/// external-only entry... and the device hooks do not take pods' frontends (ClusterIPs) for
/// theirs. The filter keeps conntrack entries of ports no frontend or backend has unread.
#[test]
fn other_traffic_passes_untouched_and_the_port_filter_holds() {
    require_root!();
    let mut dp = datapath(&[
        web(CLUSTER_IP.into(), NODE.into(), vec![backend(REMOTE_POD.into(), 8080, false)]),
        lb_plan(
            "lb",
            VIP.into(),
            443,
            Protocol::Tcp,
            vec![backend(REMOTE_POD.into(), 8443, false)],
        ),
    ]);
    // From pods: frontends' ports (and SNAT ports); to pods: backends' ports.
    let (from, to) = (MAP_POD_PORTS, MAP_POD_REPLY_PORTS);
    assert!(dp.port_set(from, 80) && dp.port_set(from, NODE_PORT) && dp.port_set(from, 443));
    assert!(dp.port_set(from, NAT_PORT_MIN) && dp.port_set(from, NAT_PORT_MAX));
    assert!(!dp.port_set(from, 8080) && !dp.port_set(from, 9999), "no backend's port");
    assert!(dp.port_set(to, 8080) && dp.port_set(to, 8443) && !dp.port_set(to, 80));
    for p in [
        tcp4(CLIENT_POD, 40000, REMOTE_POD, 8080, true, b""),
        tcp4(CLIENT_POD, 40000, OTHER_CLIENT, 80, true, b""),
        udp4(CLIENT_POD, 40000, OTHER_CLIENT, 9999, b"no frontend's port"),
    ] {
        assert_eq!(dp.run(PROG_TC_FROM_POD, &p).packet, p);
        assert_eq!(dp.run(PROG_TC_TO_POD, &p).packet, p);
    }
    assert_eq!(dp.stat(STAT_CT_NEW), 0);
    assert_eq!(dp.stat(STAT_SERVICE_MISS), 3, "counted as not for a frontend");
    // The LB IP from a pod: its internal entry (cluster traffic), as the socket hooks see it.
    let (_, s) = run(&mut dp, PROG_TC_FROM_POD, &tcp4(CLIENT_POD, 40001, VIP, 443, true, b""));
    assert_eq!(s.dst, sa(REMOTE_POD, 8443));
    // A ClusterIP reaching a device hook from outside: not its frontend (no --external-clusterip).
    let outside = tcp4(CLIENT, 40002, CLUSTER_IP, 80, true, b"");
    assert_eq!(dp.run(PROG_TC_INGRESS, &outside).packet, outside);

    // A reply entry as if for a backend on port 9999: never consulted.
    let (k, v) =
        dp.conntrack().into_iter().find(|(_, v)| v.flags & CT_F_REPLY != 0).expect("reply entry");
    let mut dp = dp;
    dp.set_conntrack(CtKey { sport_be: 9999u16.to_be(), ..k }, v);
    let other = tcp4(REMOTE_POD, 9999, CLIENT_POD, 40001, false, b"ok");
    assert_eq!(dp.run(PROG_TC_TO_POD, &other).packet, other, "9999 is no backend's port");
    // A forward entry as if for a frontend on port 8080: a pod's packets straight to a
    // backend (a mesh's sidecar connects to endpoints itself) are never looked up.
    let (k, v) =
        dp.conntrack().into_iter().find(|(_, v)| v.flags & CT_F_REPLY == 0).expect("forward entry");
    dp.set_conntrack(CtKey { dport_be: 8080u16.to_be(), ..k }, v);
    let direct = tcp4(CLIENT_POD, 40001, VIP, 8080, false, b"ok");
    assert_eq!(dp.run(PROG_TC_FROM_POD, &direct).packet, direct, "8080 is no frontend's port");
    // One as if to port 443 of a pod (a frontend's port, but no frontend's address): a pod's
    // packets to other pods on a port a service also exposes are not looked up either.
    let (k, v) = dp
        .conntrack()
        .into_iter()
        .find(|(k, v)| v.flags & CT_F_REPLY == 0 && k.dport_be == 443u16.to_be())
        .expect("forward entry to the LB IP");
    assert!(!dp.addr_set(MAP_FRONTEND_ADDRS, REMOTE_POD.into()));
    dp.set_conntrack(CtKey { daddr: addr_from_ip(REMOTE_POD.into()), ..k }, v);
    let to_pod = tcp4(CLIENT_POD, 40001, REMOTE_POD, 443, false, b"ok");
    let out = dp.run(PROG_TC_FROM_POD, &to_pod).packet;
    if *kernel_features::probed() & KF_ATOMICS != 0 {
        assert_eq!(out, to_pod, "a pod is no frontend");
    } else {
        // A kernel without atomics (5.10): the address filter is off, so the packet is looked
        // up, and the entry made for it translates it.
        let to = SocketAddr::new(addr_to_ip(&v.new_daddr), u16::from_be(v.new_dport_be));
        assert_eq!(summarize(&out).expect("TCP").dst, to, "without the address filter");
    }
}

/// A service without endpoints refuses a pod's connection at once (ICMP port unreachable back
/// into the pod), as kube-proxy's REJECT: not a timeout.
#[test]
fn a_service_without_endpoints_refuses_a_pods_connection() {
    require_root!();
    let mut dp = datapath(&[web(CLUSTER_IP.into(), NODE.into(), vec![])]);
    let syn = tcp4(CLIENT_POD, 40000, CLUSTER_IP, 80, true, b"");
    let out = dp.run(PROG_TC_FROM_POD, &syn);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "sent back into the pod");
    assert_port_unreachable(&out.packet, &syn);
    assert_eq!(dp.stat(STAT_REJECT_NO_BACKEND), 1);
}

/// A pod's packet to a ClusterIP on a port no service has there is refused at once (ICMP port
/// unreachable back into the pod), as the socket hooks refuse such a connect() and kube-proxy
/// rejects it: a port no frontend has (the filter's miss), another service's port (a lookup's
/// miss), the service's port with the other protocol; IPv6 alike. A reset is dropped, not
/// answered. Another address whose bit in `LB_CLUSTER_SET` is the ClusterIP's passes untouched.
#[test]
fn a_clusterip_refuses_a_pods_packets_to_a_port_it_has_no_service_for() {
    require_root!();
    let backends = vec![backend(REMOTE_POD.into(), 8080, false)];
    let mut dns = web(Ipv4Addr::new(10, 96, 0, 53).into(), NODE.into(), backends.clone());
    (dns.name, dns.protocol, dns.frontends[0].port) = ("dns".into(), Protocol::Udp, 53);
    dns.frontends.truncate(1);
    let web6 = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11);
    let mut v6 = web(web6.into(), NODE6.into(), vec![backend(REMOTE6.into(), 8080, false)]);
    v6.name = "web6".into();
    v6.frontends.truncate(1);
    let mut dp = datapath(&[web(CLUSTER_IP.into(), NODE.into(), backends), dns, v6]);
    assert!(!dp.port_set(MAP_POD_PORTS, 9999) && dp.port_set(MAP_POD_PORTS, 53));
    let refused = [
        tcp4(CLIENT_POD, 40000, CLUSTER_IP, 9999, true, b""),
        udp4(CLIENT_POD, 40001, CLUSTER_IP, 9999, b"no such port"),
        udp4(CLIENT_POD, 40002, CLUSTER_IP, 53, b"dns's port, not this ClusterIP's"),
        udp4(CLIENT_POD, 40003, CLUSTER_IP, 80, b"80 is TCP here"),
        tcp4(CLIENT_POD, 40004, CLUSTER_IP, 81, false, b"mid-connection"),
        tcp6(CLIENT_POD6, 40005, web6, 9999, true, b""),
        udp6(CLIENT_POD6, 40006, web6, 80, b"80 is TCP here"),
    ];
    for p in &refused {
        let out = dp.run(PROG_TC_FROM_POD, p);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "sent back into the pod: {:?}", summarize(p));
        assert_port_unreachable(&out.packet, p);
    }
    assert_eq!(dp.stat(STAT_REJECT_UNKNOWN_PORT), refused.len() as u64);
    assert!(dp.conntrack().is_empty(), "no flow for any of them");

    let rst = tcp4_end(CLIENT_POD, 40007, CLUSTER_IP, 9999, true);
    assert_eq!(dp.run(PROG_TC_FROM_POD, &rst).verdict, TC_ACT_SHOT, "a reset is not answered");
    assert_eq!(dp.stat(STAT_REJECT_UNKNOWN_PORT), refused.len() as u64 + 1);

    // An address of the pods' /12 whose bit is the ClusterIP's: passes untouched.
    assert!(dp.addr_set(MAP_CLUSTER_IPS, CLUSTER_IP.into()), "the ClusterIP's bit is set");
    let twin = same_bit_in(CLUSTER_IP.into(), Ipv4Addr::new(10, 0, 0, 0));
    let other = tcp4(CLIENT_POD, 40008, twin, 9999, true, b"");
    assert_eq!(dp.run(PROG_TC_FROM_POD, &other).packet, other, "{twin} is no ClusterIP");
    // The service's own port still works.
    let (_, s) =
        run(&mut dp, PROG_TC_FROM_POD, &tcp4(CLIENT_POD, 40009, CLUSTER_IP, 80, true, b""));
    assert_eq!(s.dst, sa(REMOTE_POD, 8080));
    assert_eq!(dp.stat(STAT_REJECT_UNKNOWN_PORT), refused.len() as u64 + 1);

    // An agent starting over maps without the set (an upgrade) fills it from the ClusterIPs'
    // marker entries before the datapath trusts it.
    dp.clear_addr_bit(MAP_CLUSTER_IPS, CLUSTER_IP.into());
    assert!(!dp.addr_set(MAP_CLUSTER_IPS, CLUSTER_IP.into()));
    let seeded = lb_agent::dataplane::port_filters::enable(&mut dp.ebpf).expect("enable");
    assert_eq!(seeded.cluster_ips, 3, "three ClusterIPs");
    assert!(dp.addr_set(MAP_CLUSTER_IPS, CLUSTER_IP.into()));
    assert_eq!(dp.run(PROG_TC_FROM_POD, &refused[0]).verdict, TC_ACT_REDIRECT);
}
