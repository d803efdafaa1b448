//! Conntrack garbage collection: the agent removes flows whose entries have all expired.
//!
//! The datapath expires an entry only when a packet looks it up, and a flow that has ended
//! sends none: without this sweep its two entries (and a SNAT port) stay until the LRU map
//! evicts them. Then a full map evicts by last use, not by lifetime, so a long idle but live
//! connection (6 h allowed) could lose its entries to the dead flows of the last minutes, and
//! every new flow pays an eviction. The sweep keeps dead flows out, so the map's fill is the
//! live flows.
//!
//! A flow is removed only when each of its entries has expired (or is gone): a one-way UDP
//! flow keeps its reply entry, which holds its SNAT port, as long as its forward entry lives.
//! The datapath may refresh or replace an entry between the batch read and the removal, so
//! both entries are read again just before (a gap of microseconds, not a whole sweep).
//!
//! The same worker flushes UDP flows to endpoints their service stopped using ([`flush_udp`]),
//! as kube-proxy flushes conntrack for deleted UDP endpoints: a client that keeps sending from
//! one port would otherwise keep its flow on an endpoint that is gone. Sockets the socket
//! hooks connected to such an endpoint are destroyed in the same pass ([`sock_destroy`]).

use std::{
    collections::HashSet,
    os::fd::AsFd,
    path::Path,
    sync::mpsc::{RecvTimeoutError, Sender},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    Addr, CT_F_REPLY, CtKey, CtTimeouts, CtValue, MAP_CONNTRACK, MAP_OPTIONS, MAP_SOCK_REVNAT,
    PROTO_UDP, addr_from_ip,
};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tracing::{debug, info, warn};

use super::{batch, loader::maps_pin_dir, options, sock_destroy, writer::UdpTarget};

/// The clock the datapath stamps entries with (`bpf_ktime_get_coarse_ns`).
pub fn datapath_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What one sweep found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Entries read (an ended flow's second entry is not, when removing the first took it).
    pub entries: u64,
    /// Entries read that had not expired.
    pub live: u64,
    /// Entries removed (both of a dead flow's, as a rule).
    pub removed: u64,
    /// Expired entries kept because the flow's other direction lives.
    pub kept_for_pair: u64,
}

fn expired(t: &CtTimeouts, key: &CtKey, value: &CtValue, now_ns: u64) -> bool {
    t.expired(key.proto, value.state, now_ns.saturating_sub(value.last_seen_ns))
}

/// A second handle on the conntrack map `map` (the sweep reads through one while it removes
/// through the other); fails unless `map` is an LRU hash map of conntrack entries.
pub fn handle(map: &MapData) -> Result<HashMap<MapData, CtKey, CtValue>> {
    let fd = map.fd().as_fd().try_clone_to_owned().context("duplicating the map's fd")?;
    Ok(HashMap::try_from(Map::LruHashMap(MapData::from_fd(fd)?))?)
}

/// One pass over the conntrack map: removes the flows whose entries have all expired (by the
/// lifetimes `t`, those configured in `LB_OPTIONS`).
pub fn sweep(map: &MapData, t: &CtTimeouts) -> Result<Sweep> {
    let mut ct = handle(map)?;
    let mut sweep = Sweep::default();
    let mut dead = Vec::new();
    sweep.entries = batch::for_each_chunk::<CtKey, CtValue>(map, |keys, values| {
        let now = datapath_now_ns();
        for (k, v) in keys.iter().zip(values) {
            if expired(t, k, v, now) {
                dead.push((*k, *v));
            } else {
                sweep.live += 1;
            }
        }
        // Removed chunk by chunk: a full map of dead flows is never copied whole.
        remove_dead(&mut ct, &dead, t, &mut sweep)?;
        dead.clear();
        Ok(())
    })?;
    Ok(sweep)
}

/// Removes each entry of `dead` (as read a moment ago) and its pair, if both are still expired
/// (or the pair is gone) now.
pub fn remove_dead(
    ct: &mut HashMap<MapData, CtKey, CtValue>,
    dead: &[(CtKey, CtValue)],
    t: &CtTimeouts,
    sweep: &mut Sweep,
) -> Result<()> {
    for (key, read) in dead {
        let now = datapath_now_ns();
        let pair_key = read.pair_key(key.proto);
        let pair = get(ct, &pair_key)?;
        if pair.is_some_and(|p| !expired(t, &pair_key, &p, now)) {
            sweep.kept_for_pair += 1;
            continue;
        }
        // Gone (its pair's removal took it) or refreshed since the batch read.
        match get(ct, key)? {
            Some(current) if expired(t, key, &current, now) => {}
            _ => continue,
        }
        sweep.removed += remove(ct, key)?;
        if pair.is_some() {
            sweep.removed += remove(ct, &pair_key)?;
        }
    }
    Ok(())
}

/// The entry of `key`, `None` when there is none (any other failure is an error: taking it
/// for a missing pair would remove a live flow's other half).
fn get(ct: &HashMap<MapData, CtKey, CtValue>, key: &CtKey) -> Result<Option<CtValue>> {
    match ct.get(key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e).context("reading a conntrack entry"),
    }
}

/// Deletes `key`: 1, or 0 when it was already gone.
fn remove(ct: &mut HashMap<MapData, CtKey, CtValue>, key: &CtKey) -> Result<u64> {
    match ct.remove(key) {
        Ok(()) => Ok(1),
        // aya reports a missing key on delete as the system call's ENOENT.
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(0)
        }
        Err(e) => Err(e).context("removing a conntrack entry"),
    }
}

/// Whether conntrack counts as full after a sweep found `live` entries: from 90% of capacity
/// (new flows then make the LRU evict live ones), until under 80% again, so that a fill near
/// one mark does not log at every sweep.
fn still_full(was_full: bool, live: u64, capacity: u64) -> bool {
    let mark = if was_full { 8 } else { 9 };
    live * 10 >= capacity * mark
}

/// Which UDP flows to flush.
#[derive(Clone, Debug)]
pub enum UdpFlush {
    /// Those to these endpoints, which their service ports stopped using (after a sync).
    To(Vec<UdpTarget>),
    /// Those to any endpoint but these, which UDP service ports use (after an agent start).
    AllBut(Vec<UdpTarget>),
}

impl UdpFlush {
    /// The test for "to a stale endpoint"; `None` when nothing can be (an empty list).
    pub fn stale(&self) -> Option<StaleUdp> {
        let (targets, keep) = match self {
            UdpFlush::To(t) if t.is_empty() => return None,
            UdpFlush::To(t) => (t, false),
            UdpFlush::AllBut(t) => (t, true),
        };
        let targets =
            targets.iter().map(|b| (b.service_id, addr_from_ip(b.addr), b.port.to_be())).collect();
        Some(StaleUdp { targets, keep })
    }
}

/// Which (service port, endpoint) pairs a [`UdpFlush`] names, as the maps hold them: the one
/// rule for conntrack flows and for connected sockets ([`super::sock_destroy`]).
pub struct StaleUdp {
    targets: HashSet<(u32, Addr, u16)>,
    /// The targets are the ones to keep (`AllBut`).
    keep: bool,
}

impl StaleUdp {
    pub fn contains(&self, service_id: u32, addr: Addr, port_be: u16) -> bool {
        self.targets.contains(&(service_id, addr, port_be)) != self.keep
    }
}

/// Removes the entries (both directions) of the UDP flows to endpoints `stale` names; returns
/// how many. New flows cannot pick an endpoint a service stopped using (it left the service's
/// sets before this runs), so every entry found is a stale one.
pub fn flush_udp(map: &MapData, stale: &StaleUdp) -> Result<u64> {
    let mut ct = handle(map)?;
    let mut doomed = Vec::new();
    let mut removed = 0;
    batch::for_each_chunk::<CtKey, CtValue>(map, |keys, values| {
        for (k, v) in keys.iter().zip(values) {
            // The backend is where a forward entry sends, and where a reply comes from.
            let backend = if v.flags & CT_F_REPLY != 0 {
                (k.saddr, k.sport_be)
            } else {
                (v.new_daddr, v.new_dport_be)
            };
            if k.proto == PROTO_UDP && stale.contains(v.service_id, backend.0, backend.1) {
                doomed.push((*k, v.pair_key(k.proto)));
            }
        }
        for (key, pair) in doomed.drain(..) {
            removed += remove(&mut ct, &key)? + remove(&mut ct, &pair)?;
        }
        Ok(())
    })?;
    Ok(removed)
}

/// Flushes the UDP flows `which` names, and destroys the connected UDP sockets the socket
/// hooks sent to the same endpoints ([`sock_destroy`]).
fn flush(map: &MapData, sock_revnat: &MapData, which: &UdpFlush, metrics: &GcMetrics) {
    let Some(stale) = which.stale() else { return };
    match flush_udp(map, &stale) {
        Ok(n) => {
            metrics.udp_flushed.inc_by(n);
            if n > 0 {
                info!(entries = n, "flushed the UDP flows of endpoints no longer in use");
            }
        }
        Err(e) => warn!("conntrack flush: {e:#}"),
    }
    match sock_destroy::destroy(sock_revnat, &stale) {
        Ok(d) => {
            metrics.udp_sockets_destroyed.inc_by(d.sockets);
            if let Some(e) = &d.first_error {
                warn!(
                    namespaces = d.failed,
                    "connected UDP sockets could not be searched in some network namespaces: {e}"
                );
            }
            if d.sockets > 0 {
                info!(
                    sockets = d.sockets,
                    namespaces = d.namespaces,
                    "destroyed connected UDP sockets of endpoints no longer in use"
                );
            }
        }
        Err(e) => warn!("destroying connected UDP sockets: {e:#}"),
    }
}

/// The metrics the conntrack worker updates.
#[derive(Clone, Default)]
pub struct GcMetrics {
    pub runs: Counter,
    pub removed: Counter,
    /// Entries of live flows at the last sweep (those kept for their pair included): the
    /// `lb_map_entries` of `LB_CT`.
    pub entries: Gauge,
    pub last_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Entries of UDP flows to endpoints their service stopped using, flushed.
    pub udp_flushed: Counter,
    /// Connected UDP sockets to such endpoints, destroyed.
    pub udp_sockets_destroyed: Counter,
}

/// Starts the conntrack worker on a thread of its own (a pass over a full map takes tens of
/// milliseconds, which the sync loop must not wait for): it sweeps the pinned map under
/// `bpffs` every `interval` (never if `None`), and flushes the UDP flows sent to it as soon as
/// they come.
pub fn spawn(
    bpffs: &Path,
    interval: Option<Duration>,
    metrics: GcMetrics,
) -> Result<Sender<UdpFlush>> {
    let open = |name: &str| {
        let path = maps_pin_dir(bpffs).join(name);
        MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
    };
    let map = open(MAP_CONNTRACK)?;
    let opts = Map::Array(open(MAP_OPTIONS)?);
    let revnat = open(MAP_SOCK_REVNAT)?;
    handle(&map).context("the pinned LB_CT is not a conntrack map")?;
    let capacity = map.info()?.max_entries() as u64;
    let (tx, rx) = std::sync::mpsc::channel::<UdpFlush>();
    let mut pressed = false;
    let mut next_sweep = interval.map(|i| Instant::now() + i);
    std::thread::Builder::new().name("conntrack".into()).spawn(move || {
        loop {
            let work = match next_sweep {
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match work {
                Ok(first) => {
                    // Endpoint lists queued meanwhile go in the same pass.
                    let mut queue = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        match (queue.last_mut(), more) {
                            (Some(UdpFlush::To(t)), UdpFlush::To(more)) => t.extend(more),
                            (_, more) => queue.push(more),
                        }
                    }
                    for which in &queue {
                        flush(&map, &revnat, which, &metrics);
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            next_sweep = interval.map(|i| Instant::now() + i);
            let start = Instant::now();
            // Read each time: the lifetimes are the datapath's, which the next agent may change.
            match options::ct_timeouts(&opts).and_then(|t| sweep(&map, &t)) {
                Ok(s) => {
                    let secs = start.elapsed().as_secs_f64();
                    metrics.runs.inc();
                    metrics.removed.inc_by(s.removed);
                    let live = s.live + s.kept_for_pair;
                    metrics.entries.set(live as i64);
                    metrics.last_seconds.set(secs);
                    let full = still_full(pressed, live, capacity);
                    if full && !pressed {
                        warn!(
                            live_entries = live,
                            capacity,
                            "conntrack is over 90% full of live flows: new flows evict the least \
                             recently used ones (raise --max-conntrack)"
                        );
                    } else if pressed && !full {
                        info!(live_entries = live, capacity, "conntrack back under 80% full");
                    }
                    pressed = full;
                    debug!(
                        entries = s.entries,
                        live = s.live,
                        removed = s.removed,
                        kept_for_pair = s.kept_for_pair,
                        elapsed_ms = (secs * 1e3) as u64,
                        "conntrack swept"
                    );
                }
                Err(e) => warn!("conntrack sweep: {e:#}"),
            }
        }
    })?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::still_full;

    #[test]
    fn full_from_90_percent_until_under_80() {
        let mut full = false;
        let mut seen = Vec::new();
        for live in [50, 89, 90, 95, 85, 80, 79, 85, 89, 90] {
            full = still_full(full, live, 100);
            seen.push(full);
        }
        let want = [false, false, true, true, true, true, false, false, false, true];
        assert_eq!(seen, want);
    }
}
