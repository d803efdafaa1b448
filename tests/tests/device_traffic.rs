//! The device hooks attached to a real veth in a network namespace, with real TCP and UDP
//! traffic from a client namespace: frontends on the node's own address whose backend is that
//! same address and port (so translation is the identity and the node's own sockets answer);
//! the programs count what arrives and never disturb it.

use std::{
    io::{Read, Write},
    net::{IpAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use lb_agent::dataplane::attach;
use lb_agent::model::plan::Protocol;
use lb_common::*;
use lb_tests::{
    kernel::Datapath,
    netns::{NetNs, veth},
    plans::{backend, lb_plan},
    require_root,
};

const NODE4: &str = "10.200.0.2";
const NODE6: &str = "fd00:200::2";
const UDP_PORT: u16 = 8080;
const TCP_PORT: u16 = 8081;

/// A client and a node namespace joined by a veth, and a datapath with three frontends on the
/// node's addresses.
fn setup() -> (NetNs, NetNs, Datapath) {
    let client = NetNs::new("cl");
    let node = NetNs::new("nd");
    veth(
        &client,
        "cl0",
        &["10.200.0.1/24", "fd00:200::1/64"],
        &node,
        "nd0",
        &["10.200.0.2/24", "fd00:200::2/64"],
    );
    let mut dp = Datapath::load();
    for (name, ip, port, proto) in [
        ("udp4", NODE4, UDP_PORT, Protocol::Udp),
        ("udp6", NODE6, UDP_PORT, Protocol::Udp),
        ("tcp4", NODE4, TCP_PORT, Protocol::Tcp),
    ] {
        let ip: IpAddr = ip.parse().unwrap();
        dp.program(name, &[lb_plan(name, ip, port, proto, vec![backend(ip, port, true)])]);
    }
    (client, node, dp)
}

/// Sends `count` datagrams `ping-NNN` from the client namespace to `to`.
fn udp_send(client: &NetNs, to: &str, count: usize) {
    let to = to.to_owned();
    client.run(move || {
        let bind = if to.starts_with('[') { "[::]:0" } else { "0.0.0.0:0" };
        let sock = UdpSocket::bind(bind).unwrap();
        for i in 0..count {
            sock.send_to(format!("ping-{i:03}").as_bytes(), &to).unwrap();
        }
    });
}

/// Sends `count` datagrams and returns what the server socket received (payloads), proving the
/// packets went through unchanged.
fn udp_round(client: &NetNs, server: &UdpSocket, to: &str, count: usize) -> Vec<String> {
    udp_send(client, to, count);
    server.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < count {
        let Ok((n, _)) = server.recv_from(&mut buf) else { break };
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got
}

fn expected_pings(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("ping-{i:03}")).collect()
}

#[test]
fn tc_ingress_counts_real_traffic_and_leaves_it_intact() {
    require_root!();
    let (client, node, mut dp) = setup();
    dp.load_programs();
    node.run(|| attach::tc(&mut dp.ebpf, "nd0", None)).expect("attach tc ingress");
    let (udp4, udp6, tcp) = node.run(|| {
        (
            UdpSocket::bind((NODE4, UDP_PORT)).unwrap(),
            UdpSocket::bind(format!("[{NODE6}]:{UDP_PORT}")).unwrap(),
            TcpListener::bind((NODE4, TCP_PORT)).unwrap(),
        )
    });

    assert_eq!(udp_round(&client, &udp4, &format!("{NODE4}:{UDP_PORT}"), 20), expected_pings(20));
    assert_eq!(udp_round(&client, &udp6, &format!("[{NODE6}]:{UDP_PORT}"), 10), expected_pings(10));
    // Datagrams to a port that is no frontend (nobody listens: the node answers ICMP, on egress).
    let misses_before = dp.stat(STAT_SERVICE_MISS);
    udp_send(&client, &format!("{NODE4}:9999"), 5);

    // A real TCP exchange through the hooked device.
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = tcp.accept().unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(b"world").unwrap();
        (peer, buf)
    });
    let reply = client.run(|| {
        let mut s = TcpStream::connect((NODE4, TCP_PORT)).unwrap();
        s.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        buf
    });
    let (peer, request) = server.join().unwrap();
    assert_eq!(&reply, b"world");
    assert_eq!(&request, b"hello");
    assert_eq!(peer.ip().to_string(), "10.200.0.1", "the server saw the client's own address");

    // Ethernet + IPv4/IPv6 + UDP headers + "ping-000".
    let s4 = {
        let i = dp.service_id("udp4");
        dp.service_stats(i)
    };
    assert_eq!((s4.packets, s4.bytes), (20, 20 * (14 + 20 + 8 + 8)), "IPv4 UDP frontend");
    let s6 = {
        let i = dp.service_id("udp6");
        dp.service_stats(i)
    };
    assert_eq!((s6.packets, s6.bytes), (10, 10 * (14 + 40 + 8 + 8)), "IPv6 UDP frontend");
    let t = {
        let i = dp.service_id("tcp4");
        dp.service_stats(i)
    };
    assert!(t.packets >= 3, "SYN, ACK and data at least: {t:?}");
    assert!(dp.stat(STAT_SERVICE_MISS) >= misses_before + 5);
    assert!(dp.stat(STAT_NOT_IP) >= 1, "the client's ARP request");
    assert!(dp.stat(STAT_OTHER_L4) >= 1, "the client's IPv6 neighbour solicitation");
    assert_eq!(dp.stat(STAT_MALFORMED), 0);
}

#[test]
fn xdp_counts_real_traffic_and_leaves_it_intact() {
    require_root!();
    let (client, node, mut dp) = setup();
    dp.load_programs();
    let mode = node.run(|| attach::xdp_ingress(&mut dp.ebpf, "nd0", None)).expect("attach xdp");
    eprintln!("XDP attached to a veth in {mode:?} mode");
    let udp4 = node.run(|| UdpSocket::bind((NODE4, UDP_PORT)).unwrap());
    assert_eq!(udp_round(&client, &udp4, &format!("{NODE4}:{UDP_PORT}"), 15), expected_pings(15));
    let s4 = {
        let i = dp.service_id("udp4");
        dp.service_stats(i)
    };
    assert_eq!((s4.packets, s4.bytes), (15, 15 * (14 + 20 + 8 + 8)));
    assert!(dp.stat(STAT_XDP_PACKETS) >= 15);
    assert_eq!(dp.stat(STAT_TC_INGRESS_PACKETS), 0, "only XDP is attached");
}
