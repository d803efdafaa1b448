//! Reading what an agent programmed, from its pinned maps: the data behind `lbctl`. Works while
//! the agent runs or after it died. Field names of these types are the stable JSON of
//! `lbctl -o json`.

use std::{collections::BTreeMap, net::SocketAddr, path::Path};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::*;
use serde::Serialize;

use crate::dataplane::{
    batch,
    conntrack_gc::datapath_now_ns,
    loader::maps_pin_dir,
    store::{KernelStore, MapStore, Snapshot},
};

#[derive(Clone, Debug, Serialize)]
pub struct BackendView {
    pub id: u32,
    pub address: String,
    pub local: bool,
    pub terminating: bool,
    /// Maglev slots this backend owns in the set.
    pub slots: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct FrontendView {
    pub kind: &'static str,
    pub address: String,
    pub protocol: &'static str,
    /// `internal` (socket hooks) or `external` (device hooks).
    pub scope: &'static str,
    pub flags: Vec<&'static str>,
    /// With no backend: `reject` or `drop`.
    pub no_endpoint: Option<&'static str>,
    pub backend_set: u32,
    pub maglev_size: u32,
    pub backends: Vec<BackendView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceView {
    pub service_id: u32,
    /// `namespace/name:port/PROTO/Family`.
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
    pub frontends: Vec<FrontendView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MaglevView {
    /// Service port, frontend address and scope.
    pub frontend: String,
    pub size: u32,
    pub backends: Vec<BackendView>,
    /// Backend id of every slot (only when asked for).
    pub slots: Option<Vec<u32>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    pub local: bool,
    pub terminating: bool,
    pub services: Vec<String>,
    /// Device-hook flows (outside clients) on it that have not ended or expired, from
    /// conntrack: what a terminating backend still serves. Socket-hook connections (pods, the
    /// node) go to the backend directly and are not tracked. Filled by
    /// [`Inspection::backends_with_flows`].
    pub open_flows: u64,
    /// Flows on it that are closing (FIN or RST seen, or in TIME_WAIT) and not yet expired.
    pub closing_flows: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConntrackRow {
    /// `reply` for the backend-to-client direction.
    pub direction: &'static str,
    pub protocol: &'static str,
    /// The tuple as packets carry it.
    pub from: String,
    pub to: String,
    /// What they are rewritten to.
    pub new_from: String,
    pub new_to: String,
    pub snat: bool,
    /// Direct server return (`--lb-mode hybrid`): on the node that chose the backend, a flow
    /// it sends on with the client's address; on the backend's node, its answers' entry.
    pub dsr: bool,
    pub service: String,
    pub backend_id: u32,
    pub state: &'static str,
    pub idle_s: u64,
    /// Seconds until the entry expires unless a packet comes (by the lifetimes configured for
    /// the datapath); 0 once expired.
    pub expires_in_s: u64,
}

/// SNAT source ports towards one backend from one node address: what `lbctl nat --ports`
/// shows, to see port exhaustion coming (`drop_nat_exhausted` counts it once it is there).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SnatPortsRow {
    /// The backend (address:port) and the node address its flows are SNATed to.
    pub backend: String,
    pub protocol: &'static str,
    pub node: String,
    /// Ports held by live entries: `open` (new or established), `closing` (FIN),
    /// `time_wait` (the backend closed first and keeps the tuple), `reset` (RST, for a second).
    pub held: u32,
    pub open: u32,
    pub closing: u32,
    pub time_wait: u32,
    pub reset: u32,
    /// Ports whose flow expired but which no new flow has taken over yet: free to reuse.
    pub expired: u32,
    /// Ports the range offers (`--nat-port-range`).
    pub capacity: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct StatsView {
    pub counters: BTreeMap<&'static str, u64>,
    pub maps: Vec<MapFill>,
}

fn sock(addr: &Addr, port_be: u16) -> String {
    SocketAddr::new(addr_to_ip(addr), u16::from_be(port_be)).to_string()
}

fn kind_name(flags: u32) -> &'static str {
    if flags & SVC_F_CLUSTER_IP != 0 {
        "ClusterIP"
    } else if flags & SVC_F_NODE_PORT != 0 {
        "NodePort"
    } else if flags & SVC_F_EXTERNAL_IP != 0 {
        "ExternalIP"
    } else if flags & SVC_F_LOAD_BALANCER != 0 {
        "LoadBalancer"
    } else {
        "?"
    }
}

/// A map pinned by the agent under `bpffs`, or why it cannot be opened.
pub fn open_pinned(bpffs: &Path, name: &str) -> Result<MapData> {
    let path = maps_pin_dir(bpffs).join(name);
    if !path.exists() {
        bail!(
            "no pinned map at {} (is an agent running with --bpffs {}?)",
            path.display(),
            bpffs.display()
        );
    }
    MapData::from_pin(&path).with_context(|| format!("opening {} (root needed)", path.display()))
}

/// Everything `lbctl` shows, read once.
pub struct Inspection {
    pub snapshot: Snapshot,
    service_stats: BTreeMap<u32, ServiceStats>,
    bpffs: std::path::PathBuf,
}

impl Inspection {
    /// The bpffs folder the maps were read from.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    pub fn open(bpffs: &Path) -> Result<Self> {
        let store = KernelStore::open_pinned(bpffs)?;
        let snapshot = store.snapshot()?;
        let stats: PerCpuArray<MapData, ServiceStats> =
            PerCpuArray::try_from(Map::PerCpuArray(open_pinned(bpffs, MAP_SERVICE_STATS)?))?;
        let mut service_stats = BTreeMap::new();
        for id in snapshot.services.values().map(|v| v.service_id).filter(|id| *id != 0) {
            if let Ok(per_cpu) = stats.get(&id, 0) {
                let s = per_cpu.iter().fold(ServiceStats::default(), |a, s| ServiceStats {
                    packets: a.packets + s.packets,
                    bytes: a.bytes + s.bytes,
                });
                service_stats.insert(id, s);
            }
        }
        Ok(Self { snapshot, service_stats, bpffs: bpffs.to_owned() })
    }

    pub fn name(&self, service_id: u32) -> String {
        self.snapshot
            .names
            .get(&service_id)
            .cloned()
            .unwrap_or_else(|| format!("service {service_id}"))
    }

    fn backends_of(&self, table_id: u32) -> (u32, Vec<BackendView>) {
        let Some(t) = self.snapshot.tables.get(&table_id) else { return (0, Vec::new()) };
        let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
        for &b in self.snapshot.table_slots(table_id) {
            *slots.entry(b).or_default() += 1;
        }
        let views = slots
            .into_iter()
            .map(|(id, n)| {
                let b = self.snapshot.backends.get(&id).copied().unwrap_or_default();
                BackendView {
                    id,
                    address: sock(&b.addr, b.port_be),
                    local: b.flags & BE_F_LOCAL != 0,
                    terminating: b.flags & BE_F_TERMINATING != 0,
                    slots: n,
                }
            })
            .collect();
        (t.maglev_size, views)
    }

    pub fn services(&self) -> Vec<ServiceView> {
        let mut by_id: BTreeMap<u32, ServiceView> = BTreeMap::new();
        for (k, v) in &self.snapshot.services {
            if v.flags & SVC_F_ADDR_MARKER != 0 {
                continue;
            }
            let (maglev_size, backends) = self.backends_of(v.table_id);
            let mut flags = Vec::new();
            for (bit, name) in [
                (SVC_F_AFFINITY, "affinity"),
                (SVC_F_LOCAL_ONLY, "local-only"),
                (SVC_F_SOURCE_RANGES, "source-ranges"),
            ] {
                if v.flags & bit != 0 {
                    flags.push(name);
                }
            }
            let no_endpoint = backends
                .is_empty()
                .then_some(if v.flags & SVC_F_NO_ENDPOINT_DROP != 0 { "drop" } else { "reject" });
            let stats = self.service_stats.get(&v.service_id).copied().unwrap_or_default();
            let entry = by_id.entry(v.service_id).or_insert_with(|| ServiceView {
                service_id: v.service_id,
                name: self.name(v.service_id),
                packets: stats.packets,
                bytes: stats.bytes,
                frontends: Vec::new(),
            });
            entry.frontends.push(FrontendView {
                kind: kind_name(v.flags),
                address: sock(&k.addr, k.port_be),
                protocol: proto_name(k.proto),
                scope: if k.scope == SCOPE_INTERNAL { "internal" } else { "external" },
                flags,
                no_endpoint,
                backend_set: v.table_id,
                maglev_size,
                backends,
            });
        }
        by_id.into_values().collect()
    }

    pub fn backends(&self) -> Vec<BackendRow> {
        let mut users: BTreeMap<u32, std::collections::BTreeSet<String>> = BTreeMap::new();
        for v in self.snapshot.services.values() {
            for &b in self.snapshot.table_slots(v.table_id) {
                users.entry(b).or_default().insert(self.name(v.service_id));
            }
        }
        self.snapshot
            .backends
            .iter()
            .map(|(&id, b)| BackendRow {
                id,
                address: sock(&b.addr, b.port_be),
                local: b.flags & BE_F_LOCAL != 0,
                terminating: b.flags & BE_F_TERMINATING != 0,
                services: users.remove(&id).unwrap_or_default().into_iter().collect(),
                open_flows: 0,
                closing_flows: 0,
            })
            .collect()
    }

    /// [`Self::backends`] with their live flows counted from conntrack (one read of the map).
    pub fn backends_with_flows(&self) -> Result<Vec<BackendRow>> {
        let map = open_pinned(&self.bpffs, MAP_CONNTRACK)?;
        let timeouts = self.ct_timeouts()?;
        let now = datapath_now_ns();
        let mut flows: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        batch::for_each_chunk::<CtKey, CtValue>(&map, |keys, values| {
            for (k, v) in keys.iter().zip(values) {
                // One entry per flow: the original direction's.
                if v.flags & CT_F_REPLY != 0
                    || timeouts.expired(k.proto, v.state, now.saturating_sub(v.last_seen_ns))
                {
                    continue;
                }
                let counts = flows.entry(v.backend_id).or_default();
                if ct_state_ended(v.state) {
                    counts.1 += 1;
                } else {
                    counts.0 += 1;
                }
            }
            Ok(())
        })?;
        let mut rows = self.backends();
        for r in &mut rows {
            (r.open_flows, r.closing_flows) = flows.get(&r.id).copied().unwrap_or_default();
        }
        Ok(rows)
    }

    /// The Maglev table of a service port (by id or name substring): frontend, size, slots.
    pub fn maglev(&self, service: &str, with_slots: bool) -> Result<Vec<MaglevView>> {
        let ids: Vec<u32> = self
            .snapshot
            .names
            .iter()
            .filter(|(id, n)| n.contains(service) || id.to_string() == service)
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            bail!("no service port matches {service:?} (see `lbctl services`)");
        }
        let mut out = Vec::new();
        for (k, v) in &self.snapshot.services {
            if ids.contains(&v.service_id) && v.flags & SVC_F_ADDR_MARKER == 0 {
                let (size, backends) = self.backends_of(v.table_id);
                let label = format!(
                    "{} {} {}",
                    self.name(v.service_id),
                    sock(&k.addr, k.port_be),
                    if k.scope == SCOPE_INTERNAL { "internal" } else { "external" }
                );
                let slots = with_slots.then(|| self.snapshot.table_slots(v.table_id).to_vec());
                out.push(MaglevView { frontend: label, size, backends, slots });
            }
        }
        Ok(out)
    }

    pub fn conntrack(&self) -> Result<Vec<ConntrackRow>> {
        let map = open_pinned(&self.bpffs, MAP_CONNTRACK)?;
        let timeouts = self.ct_timeouts()?;
        let now = datapath_now_ns();
        let mut rows = Vec::new();
        batch::for_each_chunk::<CtKey, CtValue>(&map, |keys, values| {
            rows.extend(keys.iter().zip(values).map(|(k, v)| {
                ConntrackRow {
                    direction: if v.flags & CT_F_REPLY != 0 { "reply" } else { "original" },
                    protocol: proto_name(k.proto),
                    from: sock(&k.saddr, k.sport_be),
                    to: sock(&k.daddr, k.dport_be),
                    new_from: sock(&v.new_saddr, v.new_sport_be),
                    new_to: sock(&v.new_daddr, v.new_dport_be),
                    snat: v.flags & CT_F_SNAT != 0,
                    dsr: v.flags & CT_F_DSR != 0,
                    service: self.name(v.service_id),
                    backend_id: v.backend_id,
                    state: match v.state {
                        CT_STATE_ESTABLISHED => "established",
                        CT_STATE_FIN_CLIENT => "half-closed (client)",
                        CT_STATE_FIN_BACKEND => "half-closed (backend)",
                        CT_STATE_CLOSING => "closing",
                        CT_STATE_RESET => "reset",
                        CT_STATE_TIME_WAIT => "time-wait",
                        _ => "new",
                    },
                    idle_s: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
                    expires_in_s: (timeouts.lifetime_s(k.proto, v.state) * 1_000_000_000)
                        .saturating_sub(now.saturating_sub(v.last_seen_ns))
                        / 1_000_000_000,
                }
            }));
            Ok(())
        })?;
        rows.sort_by(|a, b| {
            (&a.service, &a.from, a.direction).cmp(&(&b.service, &b.from, b.direction))
        });
        Ok(rows)
    }

    /// SNAT port use per backend and node address, from the reply entries (each holds one port).
    pub fn snat_ports(&self) -> Result<Vec<SnatPortsRow>> {
        let map = open_pinned(&self.bpffs, MAP_CONNTRACK)?;
        let capacity = self.nat_port_range()?;
        let timeouts = self.ct_timeouts()?;
        let now = datapath_now_ns();
        // Keyed by the reply entry's backend address, port, protocol and node address.
        let mut by_backend: BTreeMap<(Addr, u16, u8, Addr), SnatPortsRow> = BTreeMap::new();
        let mut count = |k: &CtKey, v: &CtValue| {
            let snat_reply = CT_F_REPLY | CT_F_SNAT;
            if v.flags & snat_reply != snat_reply {
                return;
            }
            let row =
                by_backend.entry((k.saddr, k.sport_be, k.proto, k.daddr)).or_insert_with(|| {
                    SnatPortsRow {
                        backend: sock(&k.saddr, k.sport_be),
                        protocol: proto_name(k.proto),
                        node: addr_to_ip(&k.daddr).to_string(),
                        capacity,
                        ..Default::default()
                    }
                });
            if timeouts.expired(k.proto, v.state, now.saturating_sub(v.last_seen_ns)) {
                row.expired += 1;
                return;
            }
            row.held += 1;
            *match v.state {
                CT_STATE_CLOSING => &mut row.closing,
                CT_STATE_TIME_WAIT => &mut row.time_wait,
                CT_STATE_RESET => &mut row.reset,
                _ => &mut row.open,
            } += 1;
        };
        batch::for_each_chunk::<CtKey, CtValue>(&map, |keys, values| {
            keys.iter().zip(values).for_each(|(k, v)| count(k, v));
            Ok(())
        })?;
        Ok(by_backend.into_values().collect())
    }

    /// The conntrack lifetimes the agent configured (`LB_OPTIONS`).
    fn ct_timeouts(&self) -> Result<CtTimeouts> {
        let options = Map::Array(open_pinned(&self.bpffs, MAP_OPTIONS)?);
        crate::dataplane::options::ct_timeouts(&options)
    }

    /// One of the agent's `LB_OPTIONS`.
    fn option(&self, index: u32) -> Result<u32> {
        let map: Array<MapData, u32> =
            Array::try_from(Map::Array(open_pinned(&self.bpffs, MAP_OPTIONS)?))?;
        Ok(map.get(&index, 0)?)
    }

    /// How many SNAT source ports the datapath uses (LB_OPTIONS, else the default range).
    fn nat_port_range(&self) -> Result<u32> {
        let (min, max) = (self.option(OPT_NAT_PORT_MIN)?, self.option(OPT_NAT_PORT_MAX)?);
        Ok(nat_ports(min, max).1)
    }

    /// Whether the socket hooks leave pods' sockets alone (`--socket-lb-host-namespace-only`):
    /// pods' packets are translated on their devices.
    pub fn sock_host_netns_only(&self) -> Result<bool> {
        Ok(self.option(OPT_SOCK_HOST_NETNS_ONLY)? != 0)
    }

    pub fn stats(&self) -> Result<StatsView> {
        let counters =
            crate::dataplane::counters::global_pinned(&self.bpffs)?.into_iter().collect();
        let mut maps = Vec::new();
        let cap = |name: &str| -> Result<u32> {
            Ok(open_pinned(&self.bpffs, name)?.info()?.max_entries())
        };
        let used_slots: u64 = self.snapshot.tables.values().map(|t| t.maglev_size as u64).sum();
        for (name, entries) in [
            (MAP_SERVICES, self.snapshot.services.len() as u64),
            (MAP_TABLES, self.snapshot.tables.len() as u64),
            (MAP_BACKENDS, self.snapshot.backends.len() as u64),
            (MAP_AFFINITY_MATCH, self.snapshot.affinity_match.len() as u64),
            (MAP_SOURCE_RANGES, self.snapshot.source_ranges.len() as u64),
            (MAP_NAMES, self.snapshot.names.len() as u64),
        ] {
            maps.push(MapFill { map: name, entries, capacity: cap(name)? });
        }
        let maglev_entries = cap(MAP_MAGLEV)?;
        maps.push(MapFill {
            map: MAP_MAGLEV,
            entries: used_slots,
            capacity: maglev_entries * MAGLEV_SLOTS_PER_ENTRY,
        });
        for name in [MAP_CONNTRACK, MAP_AFFINITY, MAP_SOCK_REVNAT] {
            let data = open_pinned(&self.bpffs, name)?;
            let capacity = data.info()?.max_entries();
            let entries = count_keys(data, name)?;
            maps.push(MapFill { map: name, entries, capacity });
        }
        Ok(StatsView { counters, maps })
    }
}

fn count_keys(data: MapData, name: &str) -> Result<u64> {
    Ok(match name {
        MAP_CONNTRACK => batch::for_each_chunk::<CtKey, CtValue>(&data, |_, _| Ok(()))?,
        MAP_AFFINITY => HashMap::<_, AffinityKey, AffinityValue>::try_from(Map::LruHashMap(data))?
            .keys()
            .count() as u64,
        _ => HashMap::<_, SockRevNatKey, SockRevNatValue>::try_from(Map::LruHashMap(data))?
            .keys()
            .count() as u64,
    })
}

/// CLOCK_MONOTONIC_COARSE, the clock bpf_ktime_get_coarse_ns reads.
#[derive(Clone, Debug, Serialize)]
pub struct AffinityRow {
    pub service: String,
    /// A client address, or `netns:<cookie>` for pods of this node (socket hooks).
    pub client: String,
    pub backend_id: u32,
    pub backend: String,
    pub idle_s: u64,
}

impl Inspection {
    pub fn affinity(&self) -> Result<Vec<AffinityRow>> {
        let map: HashMap<MapData, AffinityKey, AffinityValue> =
            HashMap::try_from(Map::LruHashMap(open_pinned(&self.bpffs, MAP_AFFINITY)?))?;
        let now = datapath_now_ns();
        let mut rows = Vec::new();
        for kv in map.iter() {
            let (k, v) = kv?;
            let client = if k.kind == AFFINITY_BY_NETNS {
                format!("netns:{}", (k.client[0] as u64) | ((k.client[1] as u64) << 32))
            } else {
                addr_to_ip(&k.client).to_string()
            };
            let b = self.snapshot.backends.get(&v.backend_id).copied().unwrap_or_default();
            rows.push(AffinityRow {
                service: self.name(k.service_id),
                client,
                backend_id: v.backend_id,
                backend: sock(&b.addr, b.port_be),
                idle_s: now.saturating_sub(v.last_used_ns) / 1_000_000_000,
            });
        }
        rows.sort_by(|a, b| (&a.service, &a.client).cmp(&(&b.service, &b.client)));
        Ok(rows)
    }
}
