//! `lbctl monitor`: what the datapath drops, refuses and translates, event by event, read from
//! the agent's pinned ring buffer (`LB_EVENTS`, see `lb_common::events`).
//!
//! The datapath sends events only while a lease in `LB_OPTIONS` lasts: the monitor takes it
//! (the kinds it wants, and until when), renews it every second and clears it when it stops.
//! A monitor killed without clearing it stops the events within [`LEASE_S`] seconds. One
//! monitor at a time: two readers of one ring buffer would each see part of the events.

use std::{
    ffi::CStr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf};
use lb_common::*;
use serde::Serialize;

use crate::dataplane::conntrack_gc::datapath_now_ns;

/// Seconds a lease lasts without renewal.
pub const LEASE_S: u32 = 3;
/// Events read before the other branches of the loop (renewal, signals) get their turn.
const MAX_READ_AT_ONCE: usize = 1024;

/// Kinds of event, as `lbctl monitor --type` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Packets a device hook dropped (source ranges, policy Local without a local endpoint,
    /// no SNAT port, conntrack full, ...).
    Drop,
    /// New connections from outside refused for want of endpoints (ICMP / TCP reset sent).
    Reject,
    /// New flows from outside and the backend each was given.
    Flow,
    /// connect()/sendmsg() calls of this node's pods and host refused (ECONNREFUSED).
    Refused,
    /// connect()/sendmsg() calls sent to a backend (every translated call: can be many).
    Connect,
    /// Everything above.
    All,
}

/// The `OPT_MONITOR_KINDS` bits for `kinds`.
pub fn mask(kinds: &[Kind]) -> u32 {
    kinds.iter().fold(0, |m, k| {
        m | match k {
            Kind::Drop => 1 << EVENT_DROP,
            Kind::Reject => 1 << EVENT_REJECT,
            Kind::Flow => 1 << EVENT_NEW_FLOW,
            Kind::Refused => 1 << EVENT_SOCK_REFUSED,
            Kind::Connect => 1 << EVENT_SOCK_TRANSLATED,
            Kind::All => (1 << EVENT_KINDS) - 1,
        }
    })
}

/// What a `STAT_*` reason means, in words.
pub fn why(reason: u32) -> &'static str {
    match reason {
        STAT_DROP_NO_BACKEND => {
            "no usable endpoint on this node (policy Local) or maps inconsistent"
        }
        STAT_DROP_SOURCE_RANGE => "client outside loadBalancerSourceRanges",
        STAT_DROP_NAT_EXHAUSTED => "no free SNAT port",
        STAT_DROP_CT_FULL => "conntrack full",
        STAT_DROP_NO_NODE_ADDR => "no node address to SNAT to",
        STAT_DROP_REWRITE => "packet rewrite failed",
        STAT_TOO_BIG => {
            "too big for the route to the backend: fragmentation needed / packet too big sent back"
        }
        STAT_REJECT_NO_BACKEND => "no endpoint: refused (ICMP port unreachable or TCP reset)",
        STAT_SOCK_NO_BACKEND => "no usable endpoint: ECONNREFUSED",
        STAT_SOCK_UNKNOWN_PORT => "no such port on this ClusterIP: ECONNREFUSED",
        STAT_REJECT_UNKNOWN_PORT => {
            "no such port on this ClusterIP: refused (ICMP port unreachable or TCP reset)"
        }
        STAT_DROP_UNKNOWN_PORT => {
            "no such port or protocol on this service address: dropped (the stack would send it \
             back out)"
        }
        STAT_CT_NEW => "new flow",
        STAT_SOCK_TRANSLATED => "sent to a backend",
        _ => "",
    }
}

/// The name of a `STAT_*` counter.
fn counter_name(index: u32) -> &'static str {
    STAT_NAMES.iter().find(|(i, _)| *i == index).map_or("?", |(_, n)| n)
}

/// The right to the datapath's events, held in `LB_OPTIONS`; given back when dropped.
pub struct Lease {
    options: Array<MapData, u32>,
    kinds: u32,
    /// This holder's token in `OPT_MONITOR_OWNER`.
    token: u32,
}

/// A token no other running monitor is likely to have chosen (never 0).
fn token() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (nanos ^ std::process::id().rotate_left(16)) | 1
}

/// Now, in the datapath's clock's whole seconds.
fn now_s() -> u32 {
    (datapath_now_ns() / 1_000_000_000) as u32
}

impl Lease {
    /// Takes the lease for `kinds`; refuses while another monitor's lasts, unless `force`.
    pub fn take(bpffs: &Path, kinds: u32, force: bool) -> Result<Self> {
        let data = crate::inspect::open_pinned(bpffs, MAP_OPTIONS)?;
        Self::on(Array::try_from(Map::Array(data))?, kinds, force)
    }

    /// [`Self::take`] on an open `LB_OPTIONS`.
    pub fn on(options: Array<MapData, u32>, kinds: u32, force: bool) -> Result<Self> {
        let held = options.get(&OPT_MONITOR_KINDS, 0)?;
        let until = options.get(&OPT_MONITOR_UNTIL_S, 0)?;
        let now = now_s();
        if held != 0 && until >= now && !force {
            bail!(
                "another lbctl monitor is running (its lease ends in {} s unless renewed); two \
                 would each see only part of the events. Stop it, or take over with --force.",
                until - now
            );
        }
        let mut lease = Self { options, kinds, token: token() };
        lease.options.set(OPT_MONITOR_OWNER, lease.token, 0)?;
        lease.renew()?;
        Ok(lease)
    }

    /// Whether this monitor still holds the lease (another may have taken it over).
    fn held(&self) -> bool {
        self.options.get(&OPT_MONITOR_OWNER, 0).is_ok_and(|owner| owner == self.token)
    }

    /// Extends the lease by [`LEASE_S`] from now; fails once another monitor took it over.
    pub fn renew(&mut self) -> Result<()> {
        if !self.held() {
            bail!("another lbctl monitor took over (--force): stopping");
        }
        // The deadline first: a reader seeing the kinds must not see a stale deadline.
        self.options.set(OPT_MONITOR_UNTIL_S, now_s() + LEASE_S, 0)?;
        self.options.set(OPT_MONITOR_KINDS, self.kinds, 0).context("writing LB_OPTIONS")
    }
}

impl Drop for Lease {
    /// Gives the lease back, unless another monitor holds it now.
    fn drop(&mut self) {
        if self.held() {
            let _ = self.options.set(OPT_MONITOR_KINDS, 0, 0);
            let _ = self.options.set(OPT_MONITOR_UNTIL_S, 0, 0);
            let _ = self.options.set(OPT_MONITOR_OWNER, 0, 0);
        }
    }
}

/// One event as `lbctl monitor` shows it (the stable JSON of `-o json`, one object per line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventView {
    /// UTC, millisecond precision (the datapath's clock moves by timer ticks).
    pub time: String,
    /// `drop`, `reject`, `flow`, `refused` or `connect`.
    pub kind: &'static str,
    /// `tc-ingress`, `tc-egress`, `xdp`, `connect` or `sendmsg`.
    pub hook: &'static str,
    /// The device (device hooks).
    pub device: Option<String>,
    pub protocol: &'static str,
    /// The packet's source (device hooks).
    pub from: Option<String>,
    /// The packet's destination, or the address the application asked for.
    pub to: String,
    /// The translated tuple (new flows), or the backend a call was sent to.
    pub new_from: Option<String>,
    pub new_to: Option<String>,
    /// The new flow is SNATed to this node (its backend is on another node).
    pub snat: bool,
    /// `namespace/name:port/PROTO/Family`; none for an unknown ClusterIP port.
    pub service: Option<String>,
    /// The datapath counter that counted it.
    pub reason: &'static str,
    /// What that means.
    pub why: &'static str,
    /// The packet's length (device hooks).
    pub bytes: Option<u32>,
    /// The calling process and its socket (socket hooks).
    pub pid: Option<u32>,
    pub command: Option<String>,
    /// Its cgroup, under the cgroup v2 mount (a pod's names its UID and container).
    pub cgroup: Option<String>,
    pub socket_cookie: Option<u64>,
    /// A packet too big for its route: the route's MTU.
    pub mtu: Option<u32>,
}

/// A record as the datapath wrote it; `None` for one of another size (another layout).
pub fn decode(bytes: &[u8]) -> Option<MonitorEvent> {
    if bytes.len() != size_of::<MonitorEvent>() {
        return None;
    }
    // SAFETY: the length was checked, MonitorEvent is plain data (aya::Pod) valid for every
    // bit pattern, and the read is unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<MonitorEvent>()) })
}

fn endpoint(addr: &Addr, port_be: u16) -> String {
    std::net::SocketAddr::new(addr_to_ip(addr), u16::from_be(port_be)).to_string()
}

/// Names of what an event refers to by number.
pub trait Names {
    fn service(&self, id: u32) -> Option<String>;
    fn device(&self, ifindex: u32) -> Option<String>;
    /// A cgroup's path under the cgroup v2 mount (`/` for its root).
    fn cgroup(&self, id: u64) -> Option<String>;
}

/// How an event reads. `wall_offset_ns`: the wall clock minus the datapath's clock.
pub fn view(e: &MonitorEvent, names: &impl Names, wall_offset_ns: i128) -> EventView {
    let socket = matches!(e.hook, HOOK_SOCK_CONNECT | HOOK_SOCK_SENDMSG);
    let translated = matches!(e.kind, EVENT_NEW_FLOW | EVENT_SOCK_TRANSLATED);
    let wall = e.time_ns as i128 + wall_offset_ns;
    let time = jiff::Timestamp::from_nanosecond(wall)
        .map(|t| format!("{:.3}", t))
        .unwrap_or_else(|_| format!("{} ns", e.time_ns));
    let comm = e.comm.split(|&b| b == 0).next().unwrap_or(&[]);
    EventView {
        time,
        kind: match e.kind {
            EVENT_DROP => "drop",
            EVENT_REJECT => "reject",
            EVENT_NEW_FLOW => "flow",
            EVENT_SOCK_REFUSED => "refused",
            EVENT_SOCK_TRANSLATED => "connect",
            _ => "?",
        },
        hook: match e.hook {
            HOOK_TC_INGRESS => "tc-ingress",
            HOOK_TC_EGRESS => "tc-egress",
            HOOK_XDP => "xdp",
            HOOK_SOCK_CONNECT => "connect",
            HOOK_SOCK_SENDMSG => "sendmsg",
            HOOK_TC_FROM_POD => "from-pod",
            HOOK_TC_TO_POD => "to-pod",
            _ => "?",
        },
        device: (!socket).then(|| names.device(e.ifindex).unwrap_or(format!("if{}", e.ifindex))),
        protocol: proto_name(e.proto),
        from: (!socket).then(|| endpoint(&e.saddr, e.sport_be)),
        to: endpoint(&e.daddr, e.dport_be),
        new_from: (translated && !socket).then(|| endpoint(&e.new_saddr, e.new_sport_be)),
        new_to: translated.then(|| endpoint(&e.new_daddr, e.new_dport_be)),
        snat: e.flags & EVENT_F_SNAT != 0,
        service: (e.service_id != EVENT_NO_SERVICE)
            .then(|| names.service(e.service_id).unwrap_or(format!("service {}", e.service_id))),
        reason: counter_name(e.reason),
        why: why(e.reason),
        bytes: (!socket).then_some(e.len),
        pid: socket.then_some(e.pid),
        command: socket.then(|| String::from_utf8_lossy(comm).into_owned()),
        cgroup: if socket { names.cgroup(e.cgroup_id) } else { None },
        socket_cookie: socket.then_some(e.cookie),
        mtu: (e.reason == STAT_TOO_BIG).then_some(e.mtu),
    }
}

impl std::fmt::Display for EventView {
    /// One line: time, kind, where, tuple (=> translation), service, why, who.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let clock = self.time.split('T').nth(1).unwrap_or(&self.time).trim_end_matches('Z');
        write!(f, "{clock} {:<7} {:<10}", self.kind, self.hook)?;
        if let Some(d) = &self.device {
            write!(f, " {d}")?;
        }
        match &self.from {
            Some(from) => write!(f, "  {} {from} -> {}", self.protocol, self.to)?,
            None => write!(f, "  {} -> {}", self.protocol, self.to)?,
        }
        match (&self.new_from, &self.new_to) {
            (Some(s), Some(d)) => write!(f, " => {s} -> {d}")?,
            (None, Some(d)) => write!(f, " => {d}")?,
            _ => {}
        }
        if self.snat {
            write!(f, " (snat)")?;
        }
        write!(f, "  {}", self.service.as_deref().unwrap_or("(no service port)"))?;
        if !matches!(self.kind, "flow" | "connect") {
            write!(f, ": {}", self.why)?;
        }
        if let (Some(mtu), Some(bytes)) = (self.mtu, self.bytes) {
            write!(f, " (route MTU {mtu}, packet {bytes} bytes)")?;
        }
        if let (Some(pid), Some(cmd)) = (self.pid, &self.command) {
            write!(f, "  pid {pid} ({cmd})")?;
        }
        if let Some(cg) = &self.cgroup {
            write!(f, " in {cg}")?;
        }
        Ok(())
    }
}

/// Service names from the pinned `LB_NAMES`, devices from this network namespace, cgroups
/// from the cgroup v2 mount.
struct PinnedNames {
    names: HashMap<MapData, u32, ServiceName>,
    cgroups: std::cell::RefCell<std::collections::HashMap<u64, Option<String>>>,
    cgroup_root: std::path::PathBuf,
}

/// Where cgroup v2 is mounted, else /sys/fs/cgroup (where the DaemonSet mounts the host's).
pub fn cgroup_root() -> std::path::PathBuf {
    crate::dataplane::attach::cgroup2_mount().unwrap_or_else(|| "/sys/fs/cgroup".into())
}
/// A walk gives up after this many directories (a node has a few thousand).
const CGROUP_WALK_LIMIT: usize = 200_000;

/// The path of the cgroup whose id (its directory's inode number) is `id`, found by walking
/// `root` breadth first.
pub fn find_cgroup(root: &Path, id: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mut queue = std::collections::VecDeque::from([root.to_path_buf()]);
    let mut seen = 0;
    while let Some(dir) = queue.pop_front() {
        if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            let rel = dir.strip_prefix(root).ok()?;
            return Some(format!("/{}", rel.display()));
        }
        seen += 1;
        if seen > CGROUP_WALK_LIMIT {
            return None;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(e.path());
            }
        }
    }
    None
}

impl Names for PinnedNames {
    fn service(&self, id: u32) -> Option<String> {
        self.names.get(&id, 0).ok().map(|n| n.as_str().to_string())
    }

    fn device(&self, ifindex: u32) -> Option<String> {
        let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
        // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
        let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
        if p.is_null() {
            return None;
        }
        // SAFETY: on success the buffer holds a NUL-terminated name.
        Some(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
    }

    /// Cached: a cgroup's id is never reused while the node runs.
    fn cgroup(&self, id: u64) -> Option<String> {
        self.cgroups
            .borrow_mut()
            .entry(id)
            .or_insert_with(|| find_cgroup(&self.cgroup_root, id))
            .clone()
    }
}

/// What to watch for and how long.
#[derive(Clone, Debug)]
pub struct Watch {
    pub kinds: Vec<Kind>,
    /// Only events whose service name contains this.
    pub service: Option<String>,
    /// Only events with an address (either side, before or after translation) containing this.
    pub address: Option<String>,
    /// Stop after this many events.
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    /// Take over another monitor's lease.
    pub force: bool,
}

impl Watch {
    /// Whether an event passes the `service` and `address` filters.
    pub fn keeps(&self, v: &EventView) -> bool {
        let service = self
            .service
            .as_ref()
            .is_none_or(|s| v.service.as_deref().is_some_and(|name| name.contains(s.as_str())));
        let address = self.address.as_ref().is_none_or(|a| {
            [v.from.as_deref(), Some(v.to.as_str()), v.new_from.as_deref(), v.new_to.as_deref()]
                .into_iter()
                .flatten()
                .any(|x| x.contains(a.as_str()))
        });
        service && address
    }
}

/// Runs a monitor until Ctrl-C / SIGTERM, `count` events or `duration`; `emit` gets each event
/// (an error from it, such as a closed pipe, stops the monitor). Returns how many events the
/// ring buffer had no room for meanwhile.
pub fn run(bpffs: &Path, watch: &Watch, emit: impl FnMut(&EventView) -> Result<()>) -> Result<u64> {
    let open = |name: &str| crate::inspect::open_pinned(bpffs, name);
    let mut ring = RingBuf::try_from(Map::RingBuf(open(MAP_EVENTS)?))?;
    let names = PinnedNames {
        names: HashMap::try_from(Map::HashMap(open(MAP_NAMES)?))?,
        cgroups: Default::default(),
        cgroup_root: cgroup_root(),
    };
    let stats: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(MAP_STATS)?))?;
    let lost = || stats.get(&STAT_MONITOR_LOST, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
    let lost_before = lost();
    let lease = Lease::take(bpffs, mask(&watch.kinds), watch.force)?;
    // Left by an earlier monitor (sent before it let go, never read): not this one's to show.
    while ring.next().is_some() {}
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    runtime.block_on(watch_events(ring, lease, &names, watch, emit))?;
    Ok(lost().saturating_sub(lost_before))
}

async fn watch_events(
    ring: RingBuf<MapData>,
    mut lease: Lease,
    names: &PinnedNames,
    watch: &Watch,
    mut emit: impl FnMut(&EventView) -> Result<()>,
) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let wall_offset = wall_clock_offset_ns();
    // SAFETY: the ring buffer owns its map's fd, which stays open as long as it lives, and it
    // lives inside the AsyncFd.
    let mut ring = unsafe { tokio::io::unix::AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("watching the ring buffer: {e}"))?;
    let mut renew = tokio::time::interval(Duration::from_secs(1));
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let deadline = watch.duration.map(|d| Instant::now() + d);
    let until = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until);
    let mut seen = 0u64;
    loop {
        tokio::select! {
            ready = ring.readable_mut() => {
                let mut guard = ready?;
                let mut read = 0;
                while let Some(item) = guard.get_inner_mut().next() {
                    read += 1;
                    let Some(event) = decode(&item) else { continue };
                    let v = view(&event, names, wall_offset);
                    if !watch.keeps(&v) {
                        continue;
                    }
                    emit(&v)?;
                    seen += 1;
                    if watch.count.is_some_and(|c| seen >= c) {
                        return Ok(());
                    }
                    if read >= MAX_READ_AT_ONCE {
                        // Still ready: back after the other branches (the lease's renewal
                        // must not wait for a flood to end).
                        break;
                    }
                }
                if read < MAX_READ_AT_ONCE {
                    guard.clear_ready();
                }
            }
            _ = renew.tick() => lease.renew()?,
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            _ = &mut until => return Ok(()),
        }
    }
}

/// The wall clock minus the datapath's clock (CLOCK_MONOTONIC_COARSE), in ns.
fn wall_clock_offset_ns() -> i128 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    wall - datapath_now_ns() as i128
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl Names for Fixed {
        fn service(&self, id: u32) -> Option<String> {
            (id == 7).then(|| "default/web:http/TCP/IPv4".to_string())
        }
        fn device(&self, ifindex: u32) -> Option<String> {
            (ifindex == 2).then(|| "eth0".to_string())
        }
        fn cgroup(&self, id: u64) -> Option<String> {
            (id == 5).then(|| "/kubepods.slice/pod1".to_string())
        }
    }

    fn v4(a: [u8; 4]) -> Addr {
        addr_from_v4_raw(u32::from_ne_bytes(a))
    }

    #[test]
    fn kinds_select_their_bits_and_all_selects_every_kind() {
        assert_eq!(mask(&[Kind::Drop]), 1);
        assert_eq!(mask(&[Kind::Reject, Kind::Refused]), 0b1010);
        assert_eq!(mask(&[Kind::All]), 0b11111);
        assert_eq!(mask(&[Kind::Flow, Kind::All]), mask(&[Kind::All]));
        assert_eq!(mask(&[]), 0);
    }

    #[test]
    fn a_new_snat_flow_reads_with_its_translation_and_service() {
        let e = MonitorEvent {
            time_ns: 5_000_000_000,
            saddr: v4([203, 0, 113, 7]),
            daddr: v4([10, 230, 0, 10]),
            sport_be: 40000u16.to_be(),
            dport_be: 30080u16.to_be(),
            new_saddr: v4([10, 230, 0, 10]),
            new_daddr: v4([10, 231, 1, 2]),
            new_sport_be: 61000u16.to_be(),
            new_dport_be: 8080u16.to_be(),
            service_id: 7,
            reason: STAT_CT_NEW,
            ifindex: 2,
            len: 60,
            kind: EVENT_NEW_FLOW,
            hook: HOOK_TC_INGRESS,
            proto: PROTO_TCP,
            flags: EVENT_F_SNAT,
            ..Default::default()
        };
        // Datapath clock 5 s = 2026-12-06T00:00:05Z.
        let offset = 1_796_515_200_000_000_000i128;
        let v = view(&e, &Fixed, offset);
        assert_eq!(v.time, "2026-12-06T00:00:05.000Z");
        assert_eq!(
            v.to_string(),
            "00:00:05.000 flow    tc-ingress eth0  TCP 203.0.113.7:40000 -> 10.230.0.10:30080 \
             => 10.230.0.10:61000 -> 10.231.1.2:8080 (snat)  default/web:http/TCP/IPv4"
        );
        assert_eq!((v.reason, v.bytes, v.pid, v.command), ("ct_new", Some(60), None, None));
    }

    #[test]
    fn a_refused_call_reads_with_its_process_and_an_unknown_port_without_service() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let e = MonitorEvent {
            daddr: v4([10, 96, 0, 12]),
            dport_be: 81u16.to_be(),
            service_id: EVENT_NO_SERVICE,
            reason: STAT_SOCK_UNKNOWN_PORT,
            pid: 4242,
            comm,
            cookie: 99,
            cgroup_id: 5,
            kind: EVENT_SOCK_REFUSED,
            hook: HOOK_SOCK_CONNECT,
            proto: PROTO_TCP,
            ..Default::default()
        };
        let v = view(&e, &Fixed, 0);
        assert_eq!(
            (v.device.as_deref(), v.from.as_deref(), v.new_to.as_deref()),
            (None, None, None)
        );
        assert_eq!(
            (v.pid, v.command.as_deref(), v.socket_cookie),
            (Some(4242), Some("curl"), Some(99))
        );
        let line = v.to_string();
        assert!(
            line.ends_with(
                "refused connect     TCP -> 10.96.0.12:81  (no service port): no such port on this \
                 ClusterIP: ECONNREFUSED  pid 4242 (curl) in /kubepods.slice/pod1"
            ),
            "{line}"
        );
    }

    #[test]
    fn a_cgroup_is_found_by_its_directory_inode_and_an_unknown_one_is_not() {
        use std::os::unix::fs::MetadataExt;
        let root = std::env::temp_dir().join(format!("lb-cgroup-walk-{}", std::process::id()));
        let deep = root.join("kubepods.slice/pod-a/ctr");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::create_dir_all(root.join("system.slice/x")).unwrap();
        let id = std::fs::metadata(&deep).unwrap().ino();
        let found = find_cgroup(&root, id);
        let root_id = std::fs::metadata(&root).unwrap().ino();
        let at_root = find_cgroup(&root, root_id);
        let unknown = find_cgroup(&root, 1);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found.as_deref(), Some("/kubepods.slice/pod-a/ctr"));
        assert_eq!(at_root.as_deref(), Some("/"));
        assert_eq!(unknown, None);
    }

    #[test]
    fn a_packet_too_big_for_its_route_reads_with_the_mtu() {
        let e = MonitorEvent {
            saddr: v4([203, 0, 113, 7]),
            daddr: v4([10, 231, 1, 2]),
            sport_be: 40000u16.to_be(),
            dport_be: 8080u16.to_be(),
            service_id: 7,
            reason: STAT_TOO_BIG,
            ifindex: 2,
            len: 4054,
            mtu: 1400,
            kind: EVENT_DROP,
            hook: HOOK_TC_INGRESS,
            proto: PROTO_TCP,
            ..Default::default()
        };
        let v = view(&e, &Fixed, 0);
        assert_eq!((v.mtu, v.reason), (Some(1400), "too_big"));
        assert!(
            v.to_string().ends_with(
                "default/web:http/TCP/IPv4: too big for the route to the backend: fragmentation \
                 needed / packet too big sent back (route MTU 1400, packet 4054 bytes)"
            ),
            "{v}"
        );
    }

    #[test]
    fn filters_keep_events_of_the_service_and_address_asked_for() {
        let e = MonitorEvent {
            saddr: v4([203, 0, 113, 7]),
            daddr: v4([10, 230, 0, 10]),
            sport_be: 40000u16.to_be(),
            dport_be: 30080u16.to_be(),
            new_saddr: v4([203, 0, 113, 7]),
            new_daddr: v4([10, 231, 1, 2]),
            service_id: 7,
            kind: EVENT_NEW_FLOW,
            proto: PROTO_TCP,
            ..Default::default()
        };
        let v = view(&e, &Fixed, 0);
        let watch = |service: Option<&str>, address: Option<&str>| Watch {
            kinds: vec![Kind::All],
            service: service.map(Into::into),
            address: address.map(Into::into),
            count: None,
            duration: None,
            force: false,
        };
        assert!(watch(None, None).keeps(&v));
        assert!(watch(Some("web"), None).keeps(&v));
        assert!(!watch(Some("shop"), None).keeps(&v));
        for a in ["203.0.113.7", "10.230.0.10:30080", "10.231.1.2"] {
            assert!(watch(Some("default/web"), Some(a)).keeps(&v), "{a}");
        }
        assert!(!watch(None, Some("10.231.1.3")).keeps(&v));
        // An unknown ClusterIP port has no service: a service filter leaves it out.
        let unknown = view(&MonitorEvent { service_id: EVENT_NO_SERVICE, ..e }, &Fixed, 0);
        assert!(!watch(Some("web"), None).keeps(&unknown));
        assert!(watch(None, Some("203.0.113")).keeps(&unknown));
    }

    #[test]
    fn records_of_another_size_are_skipped_and_unknown_numbers_do_not_break_the_view() {
        assert!(decode(&[0u8; 143]).is_none());
        assert!(decode(&[0u8; 128]).is_none(), "the first layout");
        let mut bytes = [0xffu8; 144];
        bytes[0] = 1;
        let e = decode(&bytes).unwrap();
        let v = view(&e, &Fixed, 0);
        assert_eq!((v.kind, v.hook, v.protocol, v.reason, v.why), ("?", "?", "?", "?", ""));
        assert_eq!(v.device.as_deref(), Some("if4294967295"));
        // Unprintable command bytes are shown, not trusted.
        let _ = v.to_string();
    }
}
