//! `lbctl status`: one screen on a node's load balancer. The agent's health, asked over its
//! health port (what load balancers and probes see); what is attached where, from the pinned
//! links; what the maps hold and what the datapath dropped, from the pinned maps. The maps
//! part works while no agent runs (the datapath keeps working then).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData};
use lb_common::*;
use serde::Serialize;

use crate::{
    dataplane::{
        attach::{TcRole, agent_filters_present, link_name},
        batch,
        conntrack_gc::datapath_now_ns,
        kernel_features,
        links::{is_filter_record, links_pin_dir},
        pin_lock,
        port_filters::FILTER_SETS,
    },
    explain::attached_devices,
    inspect::Inspection,
    monitor::find_cgroup,
};

#[derive(Clone, Debug, Serialize)]
pub struct StatusView {
    pub agent: AgentView,
    /// Devices with tc programs, and whether XDP is attached there too.
    pub devices: Vec<DeviceView>,
    /// cgroups with the socket hooks.
    pub socket_hooks: Vec<String>,
    /// Pods' devices with the pod hooks (`--pod-devices`).
    pub pod_devices: Vec<String>,
    pub service_ports: usize,
    pub frontends: usize,
    pub backends: usize,
    pub conntrack_entries: u64,
    pub conntrack_capacity: u32,
    /// Datapath drops and rejects since the maps were created, by reason (those not zero).
    pub drops: BTreeMap<&'static str, u64>,
    /// Seconds left on a running `lbctl monitor`'s lease.
    pub monitor_lease_s: Option<u32>,
    /// The bit sets that spare packets their lookups (`port_filters.rs`): a set nearly full
    /// spares few.
    pub filters: Vec<FilterView>,
    /// What the programs do instead of what this kernel lacks (`kernel_features`; empty on
    /// 5.18 and later).
    pub kernel_fallbacks: Vec<&'static str>,
    /// How flows from outside reach other nodes' backends (`--lb-mode`): `snat` or `hybrid`.
    pub lb_mode: &'static str,
}

/// One filter set: bits set of how many, and whether the datapath trusts it yet (until then
/// it looks every packet up).
#[derive(Clone, Debug, Serialize)]
pub struct FilterView {
    pub name: &'static str,
    pub map: &'static str,
    pub set: u64,
    pub bits: u64,
    pub on: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeviceView {
    pub name: String,
    pub xdp: bool,
    pub tc: TcKind,
}

/// How a device's tc programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum TcKind {
    /// TCX links.
    #[serde(rename = "tcx")]
    Tcx,
    /// clsact filters (without TCX).
    #[serde(rename = "clsact")]
    Clsact,
    /// Recorded as filters, but the kernel has them no more (their qdisc was deleted; a
    /// running agent puts them back).
    #[serde(rename = "clsact MISSING")]
    ClsactMissing,
}

impl TcKind {
    /// How `dev`'s tc programs are attached, from its ingress pin and the kernel's filters.
    fn of(bpffs: &Path, dev: &str) -> Self {
        let record = links_pin_dir(bpffs).join(link_name(TcRole::External.labels()[0], dev));
        if !is_filter_record(&record) {
            return TcKind::Tcx;
        }
        let present = crate::dataplane::netdev::ifindex(dev)
            .is_ok_and(|ifindex| agent_filters_present(ifindex, TcRole::External));
        if present { TcKind::Clsact } else { TcKind::ClsactMissing }
    }
}

/// The agent as its health port shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AgentView {
    pub address: String,
    /// None when nothing answered.
    pub healthz: Option<u16>,
    pub livez: Option<u16>,
    pub ready: Option<bool>,
    pub node_eligible: Option<bool>,
    /// Services whose maps could not be written.
    pub services_unprogrammed: Option<u64>,
    /// Seconds since a sync left the maps matching the cluster (the last change written, on an
    /// idle cluster).
    pub synced_s_ago: Option<f64>,
    /// Why nothing answered.
    pub error: Option<String>,
    /// The process holding the pin directory (the running agent), if any.
    pub pid: Option<u32>,
}

/// A GET over HTTP/1.0 (the agent's server closes the connection after answering): status
/// code and body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP answer from {addr}{path}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((code, body))
}

/// The value of an unlabelled metric in a Prometheus text page.
fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// What the agent's health port (`address`) and metrics port (`metrics`) say.
pub fn agent(address: SocketAddr, metrics: SocketAddr) -> AgentView {
    let mut v = AgentView { address: address.to_string(), ..Default::default() };
    match http_get(address, "/healthz") {
        Ok((code, body)) => {
            v.healthz = Some(code);
            v.node_eligible = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|j| j["nodeEligible"].as_bool());
        }
        Err(e) => {
            v.error = Some(format!("{e:#}"));
            return v;
        }
    }
    v.livez = http_get(address, "/livez").ok().map(|(c, _)| c);
    v.ready = http_get(address, "/readyz").ok().map(|(c, _)| c == 200);
    if let Ok((200, page)) = http_get(metrics, "/metrics") {
        v.services_unprogrammed = metric(&page, "lb_services_unprogrammed").map(|n| n as u64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        v.synced_s_ago = metric(&page, "lb_sync_last_timestamp_seconds")
            .filter(|t| *t > 0.0)
            .map(|t| (now - t).max(0.0));
    }
    v
}

/// The whole status: the agent at `health` and `metrics`, the rest from the pins under `bpffs`.
pub fn status(bpffs: &Path, health: SocketAddr, metrics: SocketAddr) -> Result<StatusView> {
    let ins = Inspection::open(bpffs)?;
    let stats = ins.stats()?;
    let drops = stats
        .counters
        .iter()
        .filter(|(n, v)| **v > 0 && (n.starts_with("drop_") || n.starts_with("reject_")))
        .map(|(n, v)| (*n, *v))
        .collect();
    let conntrack = stats.maps.iter().find(|m| m.map == MAP_CONNTRACK);
    let services = ins.services();
    let cgroup_root = crate::monitor::cgroup_root();
    let socket_hooks = std::fs::read_dir(links_pin_dir(bpffs))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.split_once("@cgroup-").and_then(|(_, ino)| ino.parse::<u64>().ok()))
        .collect::<std::collections::BTreeSet<u64>>()
        .into_iter()
        .map(|ino| find_cgroup(&cgroup_root, ino).unwrap_or_else(|| format!("cgroup {ino}")))
        .collect();
    Ok(StatusView {
        agent: AgentView { pid: pin_lock::holder_of(bpffs), ..agent(health, metrics) },
        devices: attached_devices(bpffs)
            .into_iter()
            .map(|(name, xdp)| DeviceView { tc: TcKind::of(bpffs, &name), name, xdp })
            .collect(),
        socket_hooks,
        pod_devices: crate::explain::pod_devices(bpffs),
        service_ports: services.len(),
        frontends: services.iter().map(|s| s.frontends.len()).sum(),
        backends: ins.backends().len(),
        conntrack_entries: conntrack.map_or(0, |m| m.entries),
        conntrack_capacity: conntrack.map_or(0, |m| m.capacity),
        drops,
        monitor_lease_s: monitor_lease(bpffs),
        filters: filters(bpffs),
        kernel_fallbacks: kernel_features::fallbacks(*kernel_features::probed()),
        lb_mode: if device_modes(bpffs) & MODE_DSR != 0 { "hybrid" } else { "snat" },
    })
}

/// The device hooks' switches (`OPT_DEVICE_MODES`; 0 without pins).
fn device_modes(bpffs: &Path) -> u32 {
    crate::inspect::open_pinned(bpffs, MAP_OPTIONS)
        .ok()
        .and_then(|data| Array::<MapData, u32>::try_from(Map::Array(data)).ok())
        .and_then(|o| o.get(&OPT_DEVICE_MODES, 0).ok())
        .unwrap_or(0)
}

/// The filter sets the pins hold (an older agent's lack some), read a chunk of words a call.
fn filters(bpffs: &Path) -> Vec<FilterView> {
    let options = crate::inspect::open_pinned(bpffs, MAP_OPTIONS)
        .ok()
        .and_then(|data| Array::<MapData, u32>::try_from(Map::Array(data)).ok());
    FILTER_SETS
        .iter()
        .filter_map(|&(name, map, option, ready_bits)| {
            let data = crate::inspect::open_pinned(bpffs, map).ok()?;
            let bits = u64::from(data.info().ok()?.max_entries()) * 64;
            let mut set = 0u64;
            batch::for_each_chunk::<u32, u64>(&data, |_, words| {
                set += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
                Ok(())
            })
            .ok()?;
            let ready = options.as_ref().and_then(|o| o.get(&option, 0).ok()).unwrap_or(0);
            Some(FilterView { name, map, set, bits, on: ready & ready_bits != 0 })
        })
        .collect()
}

/// Seconds left on a monitor's lease, if one holds it.
fn monitor_lease(bpffs: &Path) -> Option<u32> {
    let data = crate::inspect::open_pinned(bpffs, MAP_OPTIONS).ok()?;
    let options: Array<MapData, u32> = Array::try_from(Map::Array(data)).ok()?;
    let kinds = options.get(&OPT_MONITOR_KINDS, 0).ok()?;
    let until = options.get(&OPT_MONITOR_UNTIL_S, 0).ok()?;
    let now = (datapath_now_ns() / 1_000_000_000) as u32;
    (kinds != 0 && until >= now).then(|| until - now)
}

impl std::fmt::Display for StatusView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = &self.agent;
        match (a.healthz, &a.error) {
            (Some(code), _) => {
                let health = match (code, a.livez) {
                    (200, _) => "healthy".to_string(),
                    (_, Some(200)) => "healthy, but /healthz fails (node not eligible)".into(),
                    _ => {
                        "UNHEALTHY (a change waits for the maps, or the sync loop is stuck)".into()
                    }
                };
                write!(f, "agent:        {health}; /healthz {code}")?;
                if let Some(l) = a.livez {
                    write!(f, ", /livez {l}")?;
                }
                match a.ready {
                    Some(true) => write!(f, ", ready")?,
                    Some(false) => write!(f, ", NOT READY (initial sync)")?,
                    None => {}
                }
                write!(f, " ({})", a.address)?;
                match a.pid {
                    Some(pid) => writeln!(f, ", pid {pid}")?,
                    None => writeln!(f)?,
                }
                if a.node_eligible == Some(false) {
                    writeln!(f, "node:         being deleted or drained by the autoscaler")?;
                }
                match (a.services_unprogrammed, a.synced_s_ago) {
                    (Some(n), _) if n > 0 => writeln!(
                        f,
                        "maps:         {n} services NOT programmed (retried; see the agent's log)"
                    )?,
                    (_, Some(s)) => {
                        writeln!(f, "maps:         up to date; last change written {s:.0} s ago")?
                    }
                    _ => {}
                }
            }
            (None, e) => {
                let why = e.as_deref().unwrap_or("?");
                match a.pid {
                    // Running, but not where asked: another --health-bind-address, or stuck.
                    Some(pid) => writeln!(
                        f,
                        "agent:        pid {pid} runs on these maps but does not answer at {} ({why}): give lbctl its --health-bind-address",
                        a.address
                    )?,
                    None => writeln!(
                        f,
                        "agent:        NOT RUNNING (nothing answers at {} ({why}), no process holds the maps): the datapath keeps its last state",
                        a.address
                    )?,
                }
            }
        }
        let devices: Vec<String> = self
            .devices
            .iter()
            .map(|d| {
                let tc = match d.tc {
                    TcKind::Tcx => "tc",
                    TcKind::Clsact => "tc as clsact filters",
                    TcKind::ClsactMissing => "tc as clsact filters, MISSING from the kernel",
                };
                if d.xdp { format!("{} ({tc}, XDP)", d.name) } else { format!("{} ({tc})", d.name) }
            })
            .collect();
        let none = || "none".to_string();
        let list = |v: &[String]| if v.is_empty() { none() } else { v.join(", ") };
        writeln!(f, "devices:      {}", list(&devices))?;
        let mode = match self.lb_mode {
            "hybrid" => "hybrid: TCP by direct server return, UDP and SCTP SNATed",
            _ => "snat: flows to other nodes' backends SNATed to this node",
        };
        writeln!(f, "lb mode:      {mode}")?;
        if self.kernel_fallbacks.is_empty() {
            writeln!(f, "kernel:       has everything the programs use")?;
        } else {
            writeln!(f, "kernel:       {}", self.kernel_fallbacks.join("; "))?;
        }
        writeln!(f, "socket hooks: {}", list(&self.socket_hooks))?;
        if !self.pod_devices.is_empty() {
            // A node runs many pods: the count, and a few names.
            const SHOWN: usize = 6;
            let more = self.pod_devices.len().saturating_sub(SHOWN);
            let names = self.pod_devices[..self.pod_devices.len().min(SHOWN)].join(", ");
            let more = if more > 0 { format!(", {more} more") } else { String::new() };
            writeln!(f, "pod devices:  {} ({names}{more})", self.pod_devices.len())?;
        }
        writeln!(
            f,
            "services:     {} service ports, {} frontends, {} backends",
            self.service_ports, self.frontends, self.backends
        )?;
        let pct = 100.0 * self.conntrack_entries as f64 / self.conntrack_capacity.max(1) as f64;
        writeln!(
            f,
            "conntrack:    {} of {} entries ({pct:.1}%)",
            self.conntrack_entries, self.conntrack_capacity
        )?;
        let drops: Vec<String> = self.drops.iter().map(|(n, v)| format!("{n} {v}")).collect();
        writeln!(f, "drops:        {}", if drops.is_empty() { none() } else { drops.join(", ") })?;
        match self.monitor_lease_s {
            Some(s) => writeln!(f, "monitor:      an lbctl monitor is running (lease {s} s)")?,
            None => writeln!(f, "monitor:      none running")?,
        }
        let filters: Vec<String> = self
            .filters
            .iter()
            .map(|s| {
                let pct = 100.0 * s.set as f64 / s.bits.max(1) as f64;
                let off = if s.on { "" } else { ", off" };
                format!("{} {} ({pct:.1}%{off})", s.name, s.set)
            })
            .collect();
        writeln!(f, "filters:      {}", list(&filters))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::kernel_features::fallbacks;

    #[test]
    fn metrics_are_read_by_exact_name() {
        let page = "# HELP x\nlb_services_unprogrammed 2\nlb_services_unprogrammed_total 9\nlb_sync_last_timestamp_seconds 1796515200.5\n";
        assert_eq!(metric(page, "lb_services_unprogrammed"), Some(2.0));
        assert_eq!(metric(page, "lb_sync_last_timestamp_seconds"), Some(1_796_515_200.5));
        assert_eq!(metric(page, "lb_sync"), None);
    }

    #[test]
    fn an_agent_that_does_not_answer_is_said_so_and_the_rest_still_shows() {
        // Nothing listens on port 1 of this address.
        let a = agent("127.0.0.1:1".parse().unwrap(), "127.0.0.1:1".parse().unwrap());
        assert!(a.healthz.is_none() && a.error.is_some(), "{a:?}");
        let s = StatusView {
            agent: a,
            devices: vec![DeviceView { name: "eth0".into(), xdp: true, tc: TcKind::Tcx }],
            socket_hooks: vec!["/".into()],
            pod_devices: (0..8).map(|i| format!("lxc{i}")).collect(),
            service_ports: 3,
            frontends: 7,
            backends: 4,
            conntrack_entries: 10,
            conntrack_capacity: 1000,
            drops: [("drop_source_range", 2)].into(),
            monitor_lease_s: None,
            kernel_fallbacks: vec![],
            lb_mode: "hybrid",
            filters: vec![
                FilterView { name: "ingress ports", map: "", set: 4538, bits: 65536, on: true },
                FilterView {
                    name: "frontend addresses",
                    map: "",
                    set: 3,
                    bits: 1 << 20,
                    on: false,
                },
            ],
        };
        let text = s.to_string();
        assert!(
            text.starts_with("agent:        NOT RUNNING (nothing answers at 127.0.0.1:1 ("),
            "{text}"
        );
        let running =
            StatusView { agent: AgentView { pid: Some(42), ..s.agent.clone() }, ..s.clone() };
        let text = running.to_string();
        assert!(
            text.starts_with(
                "agent:        pid 42 runs on these maps but does not answer at 127.0.0.1:1 ("
            ),
            "{text}"
        );
        for line in [
            "devices:      eth0 (tc, XDP)",
            "pod devices:  8 (lxc0, lxc1, lxc2, lxc3, lxc4, lxc5, 2 more)",
            "services:     3 service ports, 7 frontends, 4 backends",
            "conntrack:    10 of 1000 entries (1.0%)",
            "drops:        drop_source_range 2",
            "filters:      ingress ports 4538 (6.9%), frontend addresses 3 (0.0%, off)",
            "monitor:      none running",
            "kernel:       has everything the programs use",
            "lb mode:      hybrid: TCP by direct server return, UDP and SCTP SNATed",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        let old = StatusView { kernel_fallbacks: fallbacks(0), ..s.clone() }.to_string();
        let line = format!("kernel:       {}", fallbacks(0).join("; "));
        assert!(old.contains(&line), "{line}\n{old}");
        assert!(line.contains("refused connects fail with EPERM"), "{line}");
    }
}
