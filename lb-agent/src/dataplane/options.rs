//! Node-wide datapath switches (`LB_OPTIONS`), written by the agent at start from its flags.

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{Array, Map, MapData},
};
use lb_common::{
    CT_MIN_LIFETIME_S, CtTimeouts, HOST_NETNS_INITIAL, MAP_OPTIONS, MODE_DSR, MODE_TCP_RESET,
    NAT_PORT_MAX, NAT_PORT_MIN, OPT_CT_TCP_CLOSE_WAIT_S, OPT_CT_TCP_ESTABLISHED_S, OPT_CT_UDP_S,
    OPT_CT_UDP_STREAM_S, OPT_DEVICE_MODES, OPT_HOST_NETNS_COOKIE_HI, OPT_HOST_NETNS_COOKIE_LO,
    OPT_NAT_PORT_MAX, OPT_NAT_PORT_MIN, OPT_SOCK_HOST_NETNS_ONLY,
};

/// How a TCP connection to a service without endpoints is refused (`--reject-tcp-with`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RejectTcpWith {
    /// ICMP port unreachable, as kube-proxy's REJECT rule.
    #[default]
    Icmp,
    /// A TCP reset, as a closed port answers (gets through firewalls that drop ICMP).
    Reset,
}

/// How flows from outside reach another node's backends (`--lb-mode`, as Cilium's
/// `bpf-lb-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LbMode {
    /// Through this node both ways: DNAT and SNAT to a node address with a BPF port, as
    /// kube-proxy (the backend sees this node, not the client).
    #[default]
    Snat,
    /// Direct server return for TCP: the backend's node answers the client itself, from the
    /// frontend's address, and the backend sees the client's address. The network between
    /// nodes must pass packets whose source is a service address or another node's (no
    /// anti-spoofing filter there), IPv4 options and IPv6 destination options. UDP and SCTP as
    /// `snat`.
    Hybrid,
}

/// SNAT source ports for flows to other nodes' backends (`--nat-port-range FIRST-LAST`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        Self { first: NAT_PORT_MIN, last: NAT_PORT_MAX }
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Fewer ports than this would cap SNATed flows per backend at a toy level.
pub const MIN_NAT_PORTS: u16 = 256;

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s.split_once('-').ok_or("expected FIRST-LAST, e.g. 61000-65535")?;
        let port = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("{p:?}: {e}"));
        let r = PortRange { first: port(a)?, last: port(b)? };
        if r.first < 1024 {
            return Err(format!("{r}: ports below 1024 are for services"));
        }
        if r.last < r.first || r.last - r.first + 1 < MIN_NAT_PORTS {
            return Err(format!("{r}: want at least {MIN_NAT_PORTS} ports, first <= last"));
        }
        Ok(r)
    }
}

impl PortRange {
    /// Refuses a range that overlaps `ephemeral` (the node's `net.ipv4.ip_local_port_range`):
    /// the reply to a connection the node opened from such a port would be taken for a SNATed
    /// flow's.
    pub fn check_against(&self, ephemeral: PortRange) -> Result<()> {
        if self.first <= ephemeral.last && ephemeral.first <= self.last {
            anyhow::bail!(
                "--nat-port-range {self} overlaps the node's ephemeral ports {ephemeral} \
                 (net.ipv4.ip_local_port_range): replies to the node's own connections would be \
                 taken for SNATed flows. Choose ports outside it, or narrow it."
            );
        }
        Ok(())
    }
}

/// The node's ephemeral port range (`net.ipv4.ip_local_port_range` of this network namespace).
pub fn ephemeral_ports() -> Result<PortRange> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(first)), Some(Ok(last))) => Ok(PortRange { first, last }),
        _ => anyhow::bail!("{path}: unexpected content {text:?}"),
    }
}

/// A conntrack lifetime flag: whole seconds, written as kube-proxy's flags are (Go durations
/// of hours, minutes and seconds: `6h`, `90m`, `24h0m0s`) or as a number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeout(pub u32);

impl std::fmt::Display for Timeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        match (s / 3600, s % 3600 / 60, s % 60) {
            (h, 0, 0) if h > 0 => write!(f, "{h}h"),
            (0, m, 0) if m > 0 => write!(f, "{m}m"),
            _ => write!(f, "{s}s"),
        }
    }
}

impl std::str::FromStr for Timeout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected a duration such as 6h, 90m, 30s or 1h30m");
        let mut total: u64 = 0;
        if let Ok(secs) = s.parse::<u64>() {
            total = secs;
        } else {
            let mut rest = s;
            while !rest.is_empty() {
                let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
                let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
                let unit = match rest.as_bytes()[digits] {
                    b'h' => 3600,
                    b'm' => 60,
                    b's' => 1,
                    _ => return Err(bad()),
                };
                total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
                rest = &rest[digits + 1..];
            }
        }
        if total < CT_MIN_LIFETIME_S {
            return Err(format!("{s:?}: at least {CT_MIN_LIFETIME_S} s"));
        }
        u32::try_from(total).map(Timeout).map_err(|_| format!("{s:?}: at most {} s", u32::MAX))
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub reject_tcp_with: RejectTcpWith,
    pub lb_mode: LbMode,
    pub nat_ports: PortRange,
    /// Conntrack lifetimes (0: the datapath's defaults).
    pub ct_timeouts: CtTimeouts,
    /// The socket hooks leave pods' sockets alone (`--socket-lb-host-namespace-only`).
    pub sock_host_netns_only: bool,
}

/// The conntrack lifetimes configured in an `LB_OPTIONS` map (the sweep and lbctl judge
/// entries by them, as the datapath does).
pub fn ct_timeouts(options: &Map) -> Result<CtTimeouts> {
    let map: Array<&MapData, u32> = Array::try_from(options)?;
    let opt = |i| map.get(&i, 0).context("reading LB_OPTIONS");
    Ok(CtTimeouts {
        tcp_established_s: opt(OPT_CT_TCP_ESTABLISHED_S)?,
        udp_s: opt(OPT_CT_UDP_S)?,
        tcp_close_wait_s: opt(OPT_CT_TCP_CLOSE_WAIT_S)?,
        udp_stream_s: opt(OPT_CT_UDP_STREAM_S)?,
    })
}

/// Writes every option, so a restart with other flags replaces the previous agent's.
pub fn write(ebpf: &mut Ebpf, opts: &Options) -> Result<()> {
    let mut map: Array<_, u32> =
        Array::try_from(ebpf.map_mut(MAP_OPTIONS).context("no LB_OPTIONS map")?)?;
    let mut modes = 0;
    if opts.reject_tcp_with == RejectTcpWith::Reset {
        modes |= MODE_TCP_RESET;
    }
    if opts.lb_mode == LbMode::Hybrid {
        modes |= MODE_DSR;
    }
    let host_netns = host_netns_cookie()?;
    for (i, v) in [
        (OPT_DEVICE_MODES, modes),
        (OPT_NAT_PORT_MIN, opts.nat_ports.first.into()),
        (OPT_NAT_PORT_MAX, opts.nat_ports.last.into()),
        (OPT_CT_TCP_ESTABLISHED_S, opts.ct_timeouts.tcp_established_s),
        (OPT_CT_UDP_S, opts.ct_timeouts.udp_s),
        (OPT_CT_TCP_CLOSE_WAIT_S, opts.ct_timeouts.tcp_close_wait_s),
        (OPT_CT_UDP_STREAM_S, opts.ct_timeouts.udp_stream_s),
        (OPT_HOST_NETNS_COOKIE_LO, host_netns as u32),
        (OPT_HOST_NETNS_COOKIE_HI, (host_netns >> 32) as u32),
        (OPT_SOCK_HOST_NETNS_ONLY, opts.sock_host_netns_only.into()),
    ] {
        map.set(i, v, 0).context("writing LB_OPTIONS")?;
    }
    // Replies to SNATed flows arrive on these ports from now on.
    super::port_filters::note_nat_range(ebpf)
}

/// This namespace's cookie for the socket hooks: [`netns_cookie`], or where the kernel cannot
/// tell it (before Linux 5.14), [`HOST_NETNS_INITIAL`] in the initial namespace (where a
/// DaemonSet's agent with host networking runs), else 0: no socket is the host's then, so the
/// socket hooks leave loopback NodePorts alone (and, with `--socket-lb-host-namespace-only`,
/// every socket), which the log says.
fn host_netns_cookie() -> Result<u64> {
    match netns_cookie() {
        Ok(cookie) => Ok(cookie),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
            if in_initial_netns() {
                return Ok(HOST_NETNS_INITIAL);
            }
            tracing::warn!(
                "this kernel cannot tell the socket hooks which sockets are the host's (no \
                 SO_NETNS_COOKIE before Linux 5.14) and the agent is not in the initial network \
                 namespace: 127.0.0.1:NodePort is not translated, nor with \
                 --socket-lb-host-namespace-only any socket"
            );
            Ok(0)
        }
        Err(e) => Err(anyhow::Error::new(e).context("reading this network namespace's cookie")),
    }
}

/// Whether this thread is in the initial network namespace, whose inode number is fixed
/// (`PROC_NET_INIT_INO` in the kernel).
fn in_initial_netns() -> bool {
    const INITIAL_NETNS_INODE: u64 = 0xF000_0098;
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net").is_ok_and(|m| m.ino() == INITIAL_NETNS_INODE)
}

/// The cookie of the calling thread's network namespace (what `bpf_get_netns_cookie` returns
/// for sockets there).
fn netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: a datagram socket only serves as the handle for the option; closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: SO_NETNS_COOKIE into a u64 of the length given.
    let rc = unsafe {
        libc::getsockopt(
            sock,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(sock) };
    if rc != 0 {
        return Err(err);
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_refuse_what_would_break() {
        let r: PortRange = "20000-29999".parse().unwrap();
        assert_eq!((r.first, r.last), (20000, 29999));
        for bad in ["20000", "x-y", "500-2000", "30000-20000", "20000-20010", "1-99999"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        let ephemeral = PortRange { first: 32768, last: 60999 };
        assert!(PortRange::default().check_against(ephemeral).is_ok());
        assert!(r.check_against(ephemeral).is_ok());
        let e = PortRange { first: 40000, last: 62000 }.check_against(ephemeral).unwrap_err();
        assert!(
            e.to_string().contains("40000-62000 overlaps the node's ephemeral ports 32768-60999"),
            "{e}"
        );
    }

    #[test]
    fn timeouts_parse_as_kube_proxy_writes_them_and_refuse_nonsense() {
        for (text, secs) in [
            ("6h", 21600),
            ("90m", 5400),
            ("24h0m0s", 86400),
            ("1h30m", 5400),
            ("45s", 45),
            ("3600", 3600),
            ("1s", 1),
        ] {
            assert_eq!(text.parse::<Timeout>(), Ok(Timeout(secs)), "{text}");
        }
        for bad in ["", "0", "0s", "h", "5d", "1.5h", "-1h", "1h30", "9999999999h", "6 h"] {
            assert!(bad.parse::<Timeout>().is_err(), "{bad:?}");
        }
        for secs in [1, 59, 60, 3600, 5400, 21600] {
            let shown = Timeout(secs).to_string();
            assert_eq!(shown.parse::<Timeout>(), Ok(Timeout(secs)), "{shown}");
        }
    }
}
