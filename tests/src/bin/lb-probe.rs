//! A tiny traffic tool for tests and the demo.
//!
//! `lb-probe serve --name NAME [--tcp ADDR]... [--udp ADDR]... [--sctp ADDR]...` answers every
//! TCP connection, SCTP association (one-to-one style, as a TCP connection) and UDP datagram
//! with `NAME <client address as seen by the server>`; a datagram of more than 4 bytes is
//! echoed after that line (`\n` then its bytes).
//!
//! `lb-probe connect ADDR [--udp | --sctp] [--count N] [--timeout-ms T] [--interval-ms I] [--close reset]`
//! prints one line per attempt (`--close reset` ends each TCP connection with a reset instead
//! of a FIN; UDP: a new socket per datagram, or with `--one-socket` one unconnected socket for
//! all, which with `--alternate ADDR2` sends every other datagram there):
//! `ok <server name> <client address the server saw> <peer address the client sees>` or
//! `err <error>` (the peer address is getpeername() for TCP and recvfrom()'s source for UDP).
//! UDP with `--size B`: each datagram is B bytes, and the answer must echo them all
//! (`err EchoMismatch` otherwise): big ones cross the network in fragments.
//!
//! `lb-probe udp-session ADDR --rounds N --interval-ms M` keeps one *connected* UDP socket and
//! sends a datagram every M ms; prints a line per round like `connect` (`ok ...` or
//! `err <error>`). When the socket is torn down under it (ECONNABORTED, or EDESTADDRREQ once
//! it is no longer connected) it prints `reconnected` and goes on with a new socket, as a
//! resolver would.
//!
//! `lb-probe load ADDR --seconds S --concurrency C` opens TCP connections back to back (one
//! greeting per connection) from C threads for S seconds and prints
//! `load conns=N errors=E p50_us=X p99_us=Y`.
//!
//! `lb-probe session ADDR --rounds N --interval-ms M [--size B]` keeps one TCP connection open
//! and exchanges a line (of B bytes) every M ms (the server echoes after its greeting); prints
//! `ok <server name> <rounds>` or `err <error> after <rounds>`.
//!
//! `lb-probe ping ADDR [--count N] [--timeout-ms T]` sends ICMP or ICMPv6 echo requests (a raw
//! socket: root) and prints a line per request: `ok <address the reply came from>` with
//! ` ttl=<TTL>` for IPv4, or `err TIMEOUT`.

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
        Some("session") => session(&args[1..]),
        Some("udp-session") => udp_session(&args[1..]),
        Some("load") => load(&args[1..]),
        Some("ping") => ping(&args[1..]),
        _ => {
            eprintln!(
                "usage: lb-probe serve --name N [--tcp ADDR].. [--udp ADDR].. [--sctp ADDR].. | connect ADDR [--udp | --sctp] [--count N] [--timeout-ms T]"
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
    let tcp = flag(args, "--tcp")
        .into_iter()
        .map(|addr| TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}")));
    let sctp = flag(args, "--sctp").into_iter().map(|addr| {
        sctp_listener(addr.parse().expect("an SCTP address"))
            .unwrap_or_else(|e| panic!("bind sctp {addr}: {e}"))
    });
    for listener in tcp.chain(sctp) {
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                let _ = conn.write_all(format!("{name} {peer}\n").as_bytes());
                // Echo whatever follows until the client closes (sessions); a client that only
                // wanted the greeting closes at once.
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
                    let mut buf = [0u8; 256];
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        }));
    }
    for addr in flag(args, "--udp") {
        let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else { continue };
                let mut answer = format!("{name} {peer}").into_bytes();
                if n > 4 {
                    answer.push(b'\n');
                    answer.extend_from_slice(&buf[..n]);
                }
                let _ = sock.send_to(&answer, peer);
            }
        }));
    }
    println!("serving");
    for t in threads {
        let _ = t.join();
    }
}

/// SCTP's one-to-one sockets (RFC 6458) take the stream calls TCP's do: std's TCP types carry
/// them once made.
fn sctp_socket(addr: &SocketAddr) -> std::io::Result<socket2::Socket> {
    let sctp = socket2::Protocol::from(libc::IPPROTO_SCTP);
    socket2::Socket::new(socket2::Domain::for_address(*addr), socket2::Type::STREAM, Some(sctp))
}

fn sctp_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = sctp_socket(&addr)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    Ok(s.into())
}

fn errname(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ECONNABORTED) => "ECONNABORTED".into(),
        Some(libc::EDESTADDRREQ) => "EDESTADDRREQ".into(),
        Some(libc::EAGAIN) => "TIMEOUT".into(),
        _ if e.kind() == std::io::ErrorKind::TimedOut
            || e.kind() == std::io::ErrorKind::WouldBlock =>
        {
            "TIMEOUT".into()
        }
        // This tool's own findings (EchoMismatch:...).
        _ if e.kind() == std::io::ErrorKind::Other => e.to_string(),
        _ => format!("{:?}", e.kind()),
    }
}

fn connect(args: &[String]) {
    let target: SocketAddr = args.first().and_then(|a| a.parse().ok()).expect("connect ADDR:PORT");
    let udp = args.iter().any(|a| a == "--udp");
    let sctp = args.iter().any(|a| a == "--sctp");
    let count: usize = flag(args, "--count").first().and_then(|c| c.parse().ok()).unwrap_or(1);
    let timeout = Duration::from_millis(
        flag(args, "--timeout-ms").first().and_then(|c| c.parse().ok()).unwrap_or(2000),
    );
    let interval = Duration::from_millis(
        flag(args, "--interval-ms").first().and_then(|c| c.parse().ok()).unwrap_or(0),
    );
    // UDP only: a fixed client port (to replay a flow `lbctl explain` described).
    let sport: u16 = flag(args, "--sport").first().and_then(|c| c.parse().ok()).unwrap_or(0);
    let reset = flag(args, "--close").first() == Some(&"reset");
    // UDP only: bytes per datagram, echoed back (default: a 4-byte "ping", not echoed).
    let size: usize = flag(args, "--size").first().and_then(|c| c.parse().ok()).unwrap_or(0);
    // UDP only: one unconnected socket for every datagram (as a resolver sends), to ADDR and,
    // every other one, to `--alternate ADDR2`.
    let one_socket = args.iter().any(|a| a == "--one-socket");
    let alternate: Option<SocketAddr> = flag(args, "--alternate")
        .first()
        .map(|a| a.parse().unwrap_or_else(|_| panic!("--alternate {a}: not an address and port")));
    let shared = (udp && one_socket).then(|| udp_socket(target, timeout, sport).expect("a socket"));
    for i in 0..count {
        std::thread::sleep(interval);
        let to = if i % 2 == 1 { alternate.unwrap_or(target) } else { target };
        let line = match &shared {
            Some(s) => udp_exchange(s, to, size),
            None if udp => udp_once(to, timeout, sport, size),
            None => tcp_once(to, timeout, reset, sctp),
        };
        println!("{}", line.unwrap_or_else(|e| format!("err {}", errname(&e))));
    }
}

/// Reads one line (the greeting) byte by byte, so nothing after it is consumed.
fn read_line(s: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => break,
            _ if b[0] == b'\n' => break,
            _ => line.push(b[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn tcp_once(
    target: SocketAddr,
    timeout: Duration,
    reset: bool,
    sctp: bool,
) -> std::io::Result<String> {
    let mut s = if sctp {
        let s = sctp_socket(&target)?;
        s.connect_timeout(&target.into(), timeout)?;
        TcpStream::from(s)
    } else {
        TcpStream::connect_timeout(&target, timeout)?
    };
    if reset {
        // Linger on, for 0 s: close() sends a reset and keeps no state.
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: a valid socket and a linger struct of the size given.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const libc::linger as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    s.set_read_timeout(Some(timeout))?;
    let peer = s.peer_addr()?;
    let reply = read_line(&mut s)?;
    if reply.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no greeting"));
    }
    Ok(format!("ok {} {peer}", reply.trim()))
}

fn ping(args: &[String]) {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let target: std::net::IpAddr = args.first().and_then(|a| a.parse().ok()).expect("ping ADDR");
    let count: u16 = flag(args, "--count").first().and_then(|c| c.parse().ok()).unwrap_or(1);
    let timeout = Duration::from_millis(
        flag(args, "--timeout-ms").first().and_then(|c| c.parse().ok()).unwrap_or(1000),
    );
    let v4 = target.is_ipv4();
    let (domain, proto, request, reply) = if v4 {
        (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8)
    } else {
        (Domain::IPV6, Protocol::ICMPV6, 128, 129)
    };
    let sock = Socket::new(domain, Type::RAW, Some(proto)).expect("raw ICMP socket (root)");
    let id = (std::process::id() as u16).to_be_bytes();
    for seq in 0..count {
        let seq = seq.to_be_bytes();
        let mut msg = vec![request, 0, 0, 0, id[0], id[1], seq[0], seq[1]];
        msg.extend_from_slice(b"lb-probe");
        if v4 {
            // ICMPv6's checksum the kernel fills in (it covers a pseudo-header).
            let sum = !lb_tests::packets::ones_complement_sum(&msg);
            msg[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        sock.send_to(&msg, &SockAddr::from(SocketAddr::new(target, 0))).expect("send");
        let deadline = std::time::Instant::now() + timeout;
        let line = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break "err TIMEOUT".to_owned();
            }
            sock.set_read_timeout(Some(left)).expect("timeout");
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
            let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
            // SAFETY: recv_from initialised the first n bytes.
            let buf: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
            // An IPv4 raw socket hands over the IP header too.
            let (icmp, ttl) = if v4 {
                let ihl = (buf[0] & 0x0f) as usize * 4;
                (&buf[ihl.min(n)..], format!(" ttl={}", buf[8]))
            } else {
                (&buf[..], String::new())
            };
            if icmp.len() >= 8 && icmp[0] == reply && icmp[4..6] == id && icmp[6..8] == seq {
                let from = from.as_socket().map(|s| s.ip().to_string()).unwrap_or_default();
                break format!("ok {from}{ttl}");
            }
        };
        println!("{line}");
    }
}

fn session(args: &[String]) {
    let target: SocketAddr = args.first().and_then(|a| a.parse().ok()).expect("session ADDR:PORT");
    let rounds: usize = flag(args, "--rounds").first().and_then(|c| c.parse().ok()).unwrap_or(10);
    let interval = Duration::from_millis(
        flag(args, "--interval-ms").first().and_then(|c| c.parse().ok()).unwrap_or(100),
    );
    // Bytes per exchange (default: a short line).
    let size: usize = flag(args, "--size").first().and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut done = 0;
    let result = (|| -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let greeting = read_line(&mut s)?;
        let name = greeting.split_whitespace().next().unwrap_or("?").to_owned();
        println!("started {name}");
        for i in 0..rounds {
            std::thread::sleep(interval);
            let msg = if size > 1 {
                format!("{}\n", "x".repeat(size - 1))
            } else {
                format!("round-{i}\n")
            };
            s.write_all(msg.as_bytes())?;
            let mut buf = vec![0u8; msg.len()];
            s.read_exact(&mut buf)?;
            if buf != msg.as_bytes() {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "echo mismatch"));
            }
            done += 1;
        }
        Ok(name)
    })();
    match result {
        Ok(name) => println!("ok {name} {done}"),
        Err(e) => println!("err {} after {done}", errname(&e)),
    }
}

fn udp_session(args: &[String]) {
    let target: SocketAddr =
        args.first().and_then(|a| a.parse().ok()).expect("udp-session ADDR:PORT");
    let rounds: usize = flag(args, "--rounds").first().and_then(|c| c.parse().ok()).unwrap_or(10);
    let interval = Duration::from_millis(
        flag(args, "--interval-ms").first().and_then(|c| c.parse().ok()).unwrap_or(100),
    );
    let open = || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        s.connect(target)?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        Ok(s)
    };
    let mut sock = open().unwrap_or_else(|e| panic!("udp connect {target}: {e}"));
    for _ in 0..rounds {
        std::thread::sleep(interval);
        let round = (|| -> std::io::Result<String> {
            sock.send(b"ping")?;
            let mut buf = [0u8; 512];
            let n = sock.recv(&mut buf)?;
            let peer = sock.peer_addr()?;
            Ok(format!("ok {} {peer}", String::from_utf8_lossy(&buf[..n]).trim()))
        })();
        match round {
            Ok(line) => println!("{line}"),
            Err(e) => {
                println!("err {}", errname(&e));
                if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EDESTADDRREQ)) {
                    sock = open().unwrap_or_else(|e| panic!("udp connect {target}: {e}"));
                    println!("reconnected");
                }
            }
        }
    }
}

fn udp_once(
    target: SocketAddr,
    timeout: Duration,
    sport: u16,
    size: usize,
) -> std::io::Result<String> {
    udp_exchange(&udp_socket(target, timeout, sport)?, target, size)
}

/// An unconnected UDP socket of `target`'s family, on port `sport` (0: any).
fn udp_socket(target: SocketAddr, timeout: Duration, sport: u16) -> std::io::Result<UdpSocket> {
    let bind = if target.is_ipv4() { format!("0.0.0.0:{sport}") } else { format!("[::]:{sport}") };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

/// One datagram to `target` from `s` and its answer, as a `connect` line.
fn udp_exchange(s: &UdpSocket, target: SocketAddr, size: usize) -> std::io::Result<String> {
    // A pattern that differs from fragment to fragment, so a misplaced one shows.
    let datagram: Vec<u8> = if size > 4 {
        (0..size).map(|i| (i * 7 + i / 251) as u8).collect()
    } else {
        b"ping".to_vec()
    };
    s.send_to(&datagram, target)?;
    let mut buf = vec![0u8; 65536];
    let (n, from) = s.recv_from(&mut buf)?;
    let answer = &buf[..n];
    let line_end = if size > 4 {
        let Some(at) = answer.iter().position(|&b| b == b'\n') else {
            return Err(std::io::Error::other("EchoMismatch:no-echo"));
        };
        if answer[at + 1..] != datagram[..] {
            return Err(std::io::Error::other(format!("EchoMismatch:{}-bytes", n - at - 1)));
        }
        at
    } else {
        n
    };
    Ok(format!("ok {} {from}", String::from_utf8_lossy(&answer[..line_end]).trim()))
}

fn load(args: &[String]) {
    let target: SocketAddr = args.first().and_then(|a| a.parse().ok()).expect("load ADDR:PORT");
    let seconds: f64 = flag(args, "--seconds").first().and_then(|c| c.parse().ok()).unwrap_or(3.0);
    let threads: usize =
        flag(args, "--concurrency").first().and_then(|c| c.parse().ok()).unwrap_or(4);
    let deadline = std::time::Instant::now() + Duration::from_secs_f64(seconds);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                while std::time::Instant::now() < deadline {
                    let t = std::time::Instant::now();
                    match tcp_abort_after_greeting(target, Duration::from_secs(2)) {
                        Ok(()) => lat.push(t.elapsed().as_micros() as u64),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (lat, e) = w.join().unwrap();
        all.extend(lat);
        errors += e;
    }
    all.sort_unstable();
    let pct =
        |p: f64| all.get(((all.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0);
    println!(
        "load conns={} errors={errors} p50_us={} p99_us={} seconds={seconds}",
        all.len(),
        pct(0.5),
        pct(0.99)
    );
}

/// One request per connection, closed with a reset: a load generator must not run out of ports
/// to TIME_WAIT (tens of thousands of connections a second from one address), which would time
/// the kernel's port search instead of the datapath.
fn tcp_abort_after_greeting(target: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut s = TcpStream::connect_timeout(&target, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let line = read_line(&mut s)?;
    if line.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no greeting"));
    }
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setting SO_LINGER on our own socket with a valid option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            size_of::<libc::linger>() as u32,
        );
    }
    Ok(())
}
