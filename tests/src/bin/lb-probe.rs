//! A tiny traffic tool for tests and the demo.
//!
//! `lb-probe serve --name NAME [--tcp ADDR]... [--udp ADDR]...` answers every TCP connection
//! and UDP datagram with `NAME <client address as seen by the server>`.
//!
//! `lb-probe connect ADDR [--udp] [--count N] [--timeout-ms T]` prints one line per attempt:
//! `ok <server name> <client address the server saw> <peer address the client sees>` or
//! `err <error>` (the peer address is getpeername() for TCP and recvfrom()'s source for UDP).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("connect") => connect(&args[1..]),
        _ => {
            eprintln!(
                "usage: lb-probe serve --name N [--tcp ADDR].. [--udp ADDR].. | connect ADDR [--udp] [--count N] [--timeout-ms T]"
            );
            std::process::exit(2);
        }
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Vec<&'a str> {
    args.windows(2).filter(|w| w[0] == name).map(|w| w[1].as_str()).collect()
}

fn serve(args: &[String]) {
    let name = flag(args, "--name").first().copied().unwrap_or("server").to_owned();
    let mut threads = Vec::new();
    for addr in flag(args, "--tcp") {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                let _ = conn.write_all(format!("{name} {peer}\n").as_bytes());
            }
        }));
    }
    for addr in flag(args, "--udp") {
        let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            loop {
                let Ok((_, peer)) = sock.recv_from(&mut buf) else { continue };
                let _ = sock.send_to(format!("{name} {peer}").as_bytes(), peer);
            }
        }));
    }
    println!("serving");
    for t in threads {
        let _ = t.join();
    }
}

fn errname(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EAGAIN) => "TIMEOUT".into(),
        _ if e.kind() == std::io::ErrorKind::TimedOut
            || e.kind() == std::io::ErrorKind::WouldBlock =>
        {
            "TIMEOUT".into()
        }
        _ => format!("{:?}", e.kind()),
    }
}

fn connect(args: &[String]) {
    let target: SocketAddr = args.first().and_then(|a| a.parse().ok()).expect("connect ADDR:PORT");
    let udp = args.iter().any(|a| a == "--udp");
    let count: usize = flag(args, "--count").first().and_then(|c| c.parse().ok()).unwrap_or(1);
    let timeout = Duration::from_millis(
        flag(args, "--timeout-ms").first().and_then(|c| c.parse().ok()).unwrap_or(2000),
    );
    for _ in 0..count {
        let line = if udp { udp_once(target, timeout) } else { tcp_once(target, timeout) };
        println!("{}", line.unwrap_or_else(|e| format!("err {}", errname(&e))));
    }
}

fn tcp_once(target: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&target, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let peer = s.peer_addr()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(format!("ok {} {peer}", reply.trim()))
}

fn udp_once(target: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let bind = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(b"ping", target)?;
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok(format!("ok {} {from}", String::from_utf8_lossy(&buf[..n]).trim()))
}
