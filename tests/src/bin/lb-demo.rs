//! The demo: the datapath in a throwaway pair of network namespaces, with real traffic.
//!
//! A "node" namespace gets the tc ingress program on its device and two frontends on its
//! address; a "client" namespace sends UDP and TCP to them and to a port that is no frontend.
//! The demo prints what the kernel program counted. (The mini-cluster demo replaces this once
//! translation lands.)

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use lb_agent::dataplane::{attach, counters};
use lb_common::*;
use lb_tests::{
    kernel::{Datapath, external_key},
    netns::{NetNs, veth},
};

fn main() {
    println!("lb demo: loading the datapath into a throwaway network namespace\n");
    let client = NetNs::new("democl");
    let node = NetNs::new("demond");
    veth(&client, "cl0", &["10.201.0.1/24"], &node, "nd0", &["10.201.0.2/24"]);
    println!("  client namespace {}  cl0 10.201.0.1", client.name());
    println!("  node namespace   {}  nd0 10.201.0.2 (tc ingress attached)\n", node.name());

    let mut dp = Datapath::load();
    let node_ip = "10.201.0.2".parse().unwrap();
    let frontends = [(1u32, 30080u16, PROTO_TCP, "tcp"), (2, 30053, PROTO_UDP, "udp")];
    for &(id, port, proto, _) in &frontends {
        let value = ServiceValue { service_id: id, flags: SVC_F_NODE_PORT, ..Default::default() };
        dp.insert_service(external_key(node_ip, port, proto), value);
    }
    node.run(|| attach::tc(&mut dp.ebpf, "nd0")).expect("attach tc ingress");

    let (tcp, udp) = node.run(|| {
        (
            TcpListener::bind("10.201.0.2:30080").unwrap(),
            UdpSocket::bind("10.201.0.2:30053").unwrap(),
        )
    });
    let server = std::thread::spawn(move || {
        for _ in 0..10 {
            let (mut conn, _) = tcp.accept().unwrap();
            let mut buf = [0u8; 4];
            conn.read_exact(&mut buf).unwrap();
            conn.write_all(b"pong").unwrap();
        }
    });
    let answered = client.run(|| {
        let mut answered = 0;
        for _ in 0..10 {
            let mut s = TcpStream::connect("10.201.0.2:30080").unwrap();
            s.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).unwrap();
            answered += (&buf == b"pong") as u32;
        }
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..25 {
            sock.send_to(b"query", "10.201.0.2:30053").unwrap();
            sock.send_to(b"other", "10.201.0.2:9999").unwrap();
        }
        answered
    });
    server.join().unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut received = 0;
    let mut buf = [0u8; 16];
    while received < 25 && udp.recv_from(&mut buf).is_ok() {
        received += 1;
    }

    println!("traffic sent from the client:");
    println!("  10 TCP connections to 10.201.0.2:30080   answered: {answered}");
    println!("  25 UDP datagrams   to 10.201.0.2:30053   received: {received}");
    println!("  25 UDP datagrams   to 10.201.0.2:9999    (no frontend)\n");
    println!("per-frontend counters (summed over CPUs):");
    for &(id, port, _, proto) in &frontends {
        let s = dp.service_stats(id);
        println!("  10.201.0.2:{port}/{proto:<4} packets {:>4}  bytes {:>6}", s.packets, s.bytes);
    }
    println!("\nglobal counters:");
    for (name, value) in counters::global(&dp.ebpf).expect("read counters") {
        println!("  {name:<20} {value:>6}");
    }
    println!("\nnamespaces removed; nothing was left on this machine.");
}
