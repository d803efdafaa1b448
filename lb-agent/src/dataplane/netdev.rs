//! Facts about the network devices of the calling thread's network namespace, asked of the
//! kernel, which of them `--devices auto` picks, and word of their changes (`NetWatch`).

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::{Context, Result, bail};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::io::unix::AsyncFd;

/// The device's interface index; an error names the device when it is not in this namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).context("device name with a NUL byte")?;
    // SAFETY: a NUL-terminated name; if_nametoindex only reads it.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        bail!("no device {name} in this network namespace");
    }
    Ok(ifindex)
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x3;

/// `struct ethtool_drvinfo` (linux/ethtool.h).
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// `struct ifreq` with the data pointer member of its union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut DrvInfo,
    _rest: [u8; 16],
}

/// The device's driver as `ethtool -i` names it ("veth", "mlx5_core", "virtio_net", ...).
pub fn driver(name: &str) -> Result<String> {
    if name.len() >= libc::IFNAMSIZ {
        bail!("device name {name} is too long");
    }
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: &mut info, _rest: [0; 16] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: a datagram socket only serves as the handle for the ioctl; closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for the ethtool ioctl");
    }
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO fills the drvinfo `req` points to, which lives
    // until the call returns.
    let rc = unsafe { libc::ioctl(sock, SIOCETHTOOL as _, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(sock) };
    if rc < 0 {
        return Err(err).with_context(|| format!("asking the driver of {name} (ethtool)"));
    }
    let len = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..len]).into_owned())
}

/// Every address on an interface of this network namespace, with the interface's name.
pub fn addresses() -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, walked read-only below and freed once.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cur = list;
        while let Some(ifa) = cur.as_ref() {
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
            if let Some(sa) = ifa.ifa_addr.as_ref() {
                match sa.sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        let ip = IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes());
                        out.push((name, ip));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        out.push((name, IpAddr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

/// The names of this network namespace's interfaces.
pub fn interfaces() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array ended by a zeroed entry, walked read-only and
    // freed once.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut cur = list;
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            out.push(std::ffi::CStr::from_ptr((*cur).if_name).to_string_lossy().into_owned());
            cur = cur.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// The devices `--devices` names now: `auto` as [`detect_devices`] finds them, `PREFIX+`
/// every interface whose name starts with PREFIX (Cilium's syntax; never the loopback), any
/// other entry itself, present or not (it is attached when it appears). Sorted.
pub fn resolve_devices(named: &[String], node_ips: &[IpAddr]) -> Vec<String> {
    let present = if named.iter().any(|d| d.ends_with('+')) { interfaces() } else { Vec::new() };
    let mut out = matching(named, &present);
    if named.iter().any(|d| d == "auto") {
        out.extend(detect_devices(node_ips));
    }
    out.sort();
    out.dedup();
    out
}

/// The interfaces present now that `named` (names and `PREFIX+` patterns, as `--devices`
/// takes them; `auto` means nothing here) matches, sorted.
pub fn matching_present(named: &[String]) -> Vec<String> {
    let present = interfaces();
    let mut out: Vec<String> =
        matching(named, &present).into_iter().filter(|d| present.contains(d)).collect();
    out.sort();
    out.dedup();
    out
}

/// The entries of `named` that are device names, and the `present` interfaces its prefix
/// patterns match.
fn matching(named: &[String], present: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for entry in named {
        match entry.strip_suffix('+') {
            Some(prefix) => {
                out.extend(present.iter().filter(|i| i.starts_with(prefix) && *i != "lo").cloned())
            }
            // An empty entry (`--devices ""`, a trailing comma) names nothing.
            None if entry != "auto" && !entry.is_empty() => out.push(entry.clone()),
            None => {}
        }
    }
    out
}

/// The addresses of `devices` that can take NodePort traffic: neither loopback nor
/// link-local (an IPv6 link-local address needs a scope no client names), sorted.
pub fn device_addresses(devices: &[String]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = addresses()
        .into_iter()
        .filter(|(name, ip)| devices.contains(name) && answers_nodeports(ip))
        .map(|(_, ip)| ip)
        .collect();
    out.sort();
    out.dedup();
    out
}

fn answers_nodeports(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified()),
        IpAddr::V6(v6) => {
            !(v6.is_loopback() || v6.is_unicast_link_local() || v6.is_unspecified())
                && v6.to_ipv4_mapped().is_none()
        }
    }
}

/// `--devices auto`: the devices outside clients reach this node by, as Cilium picks them:
/// those the default routes (IPv4 and IPv6) leave by, and those holding one of `node_ips`
/// (`--node-ip`). Sorted; never the loopback.
pub fn detect_devices(node_ips: &[IpAddr]) -> Vec<String> {
    let read = |path| std::fs::read_to_string(path).unwrap_or_default();
    let mut found: BTreeSet<String> = default_route_devices_v4(&read("/proc/net/route"))
        .into_iter()
        .chain(default_route_devices_v6(&read("/proc/net/ipv6_route")))
        .collect();
    found.extend(addresses().into_iter().filter(|(_, ip)| node_ips.contains(ip)).map(|(n, _)| n));
    found.remove("lo");
    found.into_iter().collect()
}

/// Devices of IPv4 default routes, from `/proc/net/route` (a header line, then
/// `Iface Destination Gateway Flags RefCnt Use Metric Mask ...`, addresses in hex).
fn default_route_devices_v4(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_owned())
        })
        .collect()
}

/// Devices of IPv6 default routes, from `/proc/net/ipv6_route` (`destination prefix-length
/// source prefix-length next-hop metric refcount use flags device`, hex).
fn default_route_devices_v6(table: &str) -> Vec<String> {
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let default = f.len() == 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00";
            // The kernel lists unreachable defaults (no route) on the loopback.
            (default && f[9] != "lo").then(|| f[9].to_owned())
        })
        .collect()
}

/// Netlink notifications of link and address changes (RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR,
/// RTNLGRP_IPV6_IFADDR), and without TCX of tc changes (RTNLGRP_TC): a device added, removed or
/// re-created, an address added or removed, a qdisc or filter removed (the agent's own filters
/// may go with it).
/// Only that something changed matters (the agent then reads the interfaces anew), so messages
/// are not parsed.
pub struct NetWatch {
    socket: AsyncFd<Socket>,
}

impl NetWatch {
    /// Subscribes to link and address changes, and with `tc_filters` to tc changes, in the
    /// calling thread's network namespace.
    pub fn new(tc_filters: bool) -> Result<Self> {
        // uapi/linux/rtnetlink.h: RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR,
        // RTMGRP_TC.
        const GROUPS: u32 = 0x1 | 0x10 | 0x100;
        const TC: u32 = 0x8;
        let groups = if tc_filters { GROUPS | TC } else { GROUPS };
        let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
        socket
            .bind(&SocketAddr::new(0, groups))
            .context("joining netlink link and address events")?;
        socket.set_non_blocking(true)?;
        // SAFETY: the socket owns its descriptor, which stays open as long as the AsyncFd
        // holding it lives.
        let socket = unsafe { AsyncFd::register(socket) }
            .map_err(|e| anyhow::anyhow!("registering the netlink socket: {e}"))?;
        Ok(Self { socket })
    }

    /// Waits until something changed (any message, or lost ones: the socket's buffer overflowed),
    /// then reads out everything queued. Cancel-safe.
    pub async fn changed(&self) -> Result<()> {
        let mut buf = Vec::with_capacity(8192);
        loop {
            let mut ready = self.socket.readable().await?;
            let mut any = false;
            loop {
                buf.clear();
                match self.socket.get_ref().recv(&mut buf, 0) {
                    Ok(_) => any = true,
                    // Notifications were lost: something changed.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => any = true,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e).context("reading netlink events"),
                }
            }
            ready.clear_ready();
            if any {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_are_read_from_the_kernels_tables() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  ens5\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                  ens5\t0000A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
                  vxlan0\t00000000\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n";
        assert_eq!(default_route_devices_v4(v4), ["ens5"]);
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 bond0\n\
                  fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 bond0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        assert_eq!(default_route_devices_v6(v6), ["bond0"]);
        assert!(
            default_route_devices_v4("").is_empty()
                && default_route_devices_v6("garbage").is_empty()
        );
    }

    #[test]
    fn device_patterns_match_by_prefix_and_names_stand_for_themselves() {
        let s = |v: &[&str]| v.iter().map(|d| d.to_string()).collect::<Vec<_>>();
        let present = s(&["lo", "eth0", "eth1", "ens3", "lxc12ab", "bond0"]);
        assert_eq!(
            matching(&s(&["eth+", "bond0", "absent9"]), &present),
            s(&["eth0", "eth1", "bond0", "absent9"])
        );
        assert_eq!(matching(&s(&["en+", "auto"]), &present), s(&["ens3"]));
        assert_eq!(
            matching(&s(&["+"]), &present),
            s(&["eth0", "eth1", "ens3", "lxc12ab", "bond0"])
        );
        assert!(matching(&s(&["wlan+"]), &present).is_empty());
        assert_eq!(matching(&s(&["", "eth0", ""]), &present), s(&["eth0"]));
        // This namespace's interfaces are read: the loopback is one of them.
        assert!(interfaces().contains(&"lo".to_string()));
        assert!(!resolve_devices(&s(&["l+"]), &[]).contains(&"lo".to_string()));
        // Pod devices: only those present, never a named one that is absent, nor `auto`.
        assert_eq!(matching_present(&s(&["lo", "absent9", "auto", "lo"])), s(&["lo"]));
    }

    #[test]
    fn device_addresses_leave_out_loopback_and_link_local_ones() {
        let ok = |s: &str| answers_nodeports(&s.parse().unwrap());
        assert!(ok("10.230.0.100") && ok("fd00:230::100") && ok("2001:db8::1"));
        assert!(!ok("127.0.0.1") && !ok("::1") && !ok("169.254.3.4") && !ok("fe80::1"));
        assert!(!ok("0.0.0.0") && !ok("::"));
        // The loopback device's own addresses are all loopback.
        assert_eq!(device_addresses(&["lo".to_string()]), Vec::<IpAddr>::new());
    }

    #[test]
    fn auto_detection_never_picks_the_loopback() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(!detect_devices(&[lo]).contains(&"lo".to_string()));
    }

    #[test]
    fn loopback_has_an_index_and_a_missing_device_is_named() {
        assert_eq!(ifindex("lo").unwrap(), 1);
        let e = ifindex("no-such-dev0").unwrap_err().to_string();
        assert!(e.contains("no-such-dev0"), "{e}");
        assert!(driver("no-such-dev0").is_err());
        assert!(driver("a-name-longer-than-ifnamsiz").is_err());
    }
}
