//! Prometheus metrics: the agent's own (syncs and their latency, objects, map fill, programs
//! attached), and the datapath's, read from the per-CPU counters at each scrape (packets and
//! bytes per service port, events and drops by reason).

use std::{path::Path, sync::Mutex};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use lb_common::*;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::dataplane::{conntrack_gc::GcMetrics, loader::maps_pin_dir};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabel {
    pub program: String,
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    /// `internal` or `external`.
    pub traffic_policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub syncs: Counter,
    pub sync_errors: Counter,
    pub sync_seconds: Histogram,
    pub objects: Family<KindLabel, Gauge>,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_capacity: Family<MapLabel, Gauge>,
    pub attached: Family<ProgramLabel, Gauge>,
    /// Pods' devices carrying the pod hooks (`--pod-devices`).
    pub pod_devices: Gauge,
    /// Devices whose programs went missing and were attached again.
    pub hooks_restored: Counter,
    /// Services whose maps could not be written (retried).
    pub unprogrammed: Gauge,
    /// Service ports with a Local policy and no local endpoint, by policy.
    pub no_local_endpoints: Family<PolicyLabel, Gauge>,
    /// kube-proxy's network programming latency (`latency.rs`).
    pub programming_seconds: Histogram,
    /// When the maps last matched the cluster state (Unix seconds).
    pub last_synced: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub conntrack_gc: GcMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lb");
        let map_entries = Family::<MapLabel, Gauge>::default();
        // The sweep counts conntrack's entries (the sync loop counts the other maps').
        let entries = map_entries.get_or_create(&MapLabel { map: MAP_CONNTRACK.into() }).clone();
        let conntrack_gc = GcMetrics { entries, ..Default::default() };
        let m = Self {
            registry: Mutex::new(Registry::default()),
            syncs: Counter::default(),
            sync_errors: Counter::default(),
            // 50 us .. 1.6 s
            sync_seconds: Histogram::new([
                0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.4, 1.6,
            ]),
            objects: Family::default(),
            map_entries,
            map_capacity: Family::default(),
            attached: Family::default(),
            pod_devices: Gauge::default(),
            hooks_restored: Counter::default(),
            unprogrammed: Gauge::default(),
            no_local_endpoints: Family::default(),
            // 10 ms .. 10 min: the time includes the EndpointSlice controller's and the watch's.
            programming_seconds: Histogram::new([
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            ]),
            last_synced: Gauge::default(),
            conntrack_gc,
        };
        registry.register("syncs", "Changes applied to the maps", m.syncs.clone());
        registry.register(
            "sync_errors",
            "Changes that could not be fully applied",
            m.sync_errors.clone(),
        );
        registry.register(
            "sync_duration_seconds",
            "From a change's arrival to its maps written",
            m.sync_seconds.clone(),
        );
        registry.register(
            "services_unprogrammed",
            "Services whose maps could not be written (a map full, say); retried every 2 s",
            m.unprogrammed.clone(),
        );
        registry.register(
            "services_no_local_endpoints",
            "Service ports with internal or externalTrafficPolicy Local and no local endpoint on \
             this node (their traffic here is dropped), as kube-proxy's \
             sync_proxy_rules_no_local_endpoints_total",
            m.no_local_endpoints.clone(),
        );
        registry.register(
            "network_programming_duration_seconds",
            "From a pod change (the EndpointSlice's last-change-trigger-time) to this node's maps \
             reflecting it, as kube-proxy's metric of that name",
            m.programming_seconds.clone(),
        );
        registry.register(
            "sync_last_timestamp_seconds",
            "When the maps last matched every object (Unix time)",
            m.last_synced.clone(),
        );
        registry.register(
            "pod_devices_attached",
            "Pods' devices carrying the pod hooks (--pod-devices)",
            m.pod_devices.clone(),
        );
        registry.register(
            "hooks_restored",
            "Devices (the node's or pods') whose programs this agent had attached went missing \
             (a device re-created, a clsact qdisc deleted) and were attached again",
            m.hooks_restored.clone(),
        );
        registry.register("objects", "Kubernetes objects known, by kind", m.objects.clone());
        registry.register("map_entries", "Entries in each BPF map", m.map_entries.clone());
        registry.register("map_capacity", "Capacity of each BPF map", m.map_capacity.clone());
        registry.register(
            "program_attached",
            "1 for each program attached, by hook target (0: a device named but absent, attached when it appears)",
            m.attached.clone(),
        );
        let gc = &m.conntrack_gc;
        registry.register("conntrack_gc_runs", "Conntrack sweeps done", gc.runs.clone());
        registry.register(
            "conntrack_gc_removed_entries",
            "Conntrack entries of ended flows removed by the sweeps",
            gc.removed.clone(),
        );
        registry.register(
            "conntrack_udp_flushed_entries",
            "Conntrack entries of UDP flows to endpoints their service stopped using, flushed",
            gc.udp_flushed.clone(),
        );
        registry.register(
            "udp_sockets_destroyed",
            "Connected UDP sockets to endpoints their service stopped using, destroyed",
            gc.udp_sockets_destroyed.clone(),
        );
        registry.register(
            "conntrack_gc_last_duration_seconds",
            "How long the last conntrack sweep took",
            gc.last_seconds.clone(),
        );
        *m.registry.lock().unwrap() = registry;
        m
    }

    /// The text exposition: the agent's metrics, then the datapath's from the pinned maps.
    pub fn encode(&self, bpffs: &Path) -> Result<String> {
        let mut out = String::new();
        encode(&mut out, &self.registry.lock().unwrap())?;
        // `encode` ends with "# EOF"; the datapath families follow, then one final EOF.
        if let Some(i) = out.rfind("# EOF") {
            out.truncate(i);
        }
        let mut dp = Registry::with_prefix("lb_datapath");
        let dir = maps_pin_dir(bpffs);
        let open = |name: &str| {
            MapData::from_pin(dir.join(name)).with_context(|| format!("opening {name}"))
        };
        let stats: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(Map::PerCpuArray(open(MAP_STATS)?))?;
        let events: Family<EventLabel, Counter> = Family::default();
        for &(index, name) in STAT_NAMES {
            let v: u64 = stats.get(&index, 0)?.iter().sum();
            events.get_or_create(&EventLabel { event: name.into() }).inc_by(v);
        }
        dp.register(
            "events",
            "Datapath events by kind: packets seen, hits, translations, drops and their reasons",
            events,
        );
        let names: HashMap<MapData, u32, ServiceName> =
            HashMap::try_from(Map::HashMap(open(MAP_NAMES)?))?;
        let svc: PerCpuArray<MapData, ServiceStats> =
            PerCpuArray::try_from(Map::PerCpuArray(open(MAP_SERVICE_STATS)?))?;
        let packets: Family<ServiceLabel, Counter> = Family::default();
        let bytes: Family<ServiceLabel, Counter> = Family::default();
        for kv in names.iter() {
            let (id, name) = kv?;
            let Ok(per_cpu) = svc.get(&id, 0) else { continue };
            let label = ServiceLabel { service: name.as_str().to_owned() };
            packets.get_or_create(&label).inc_by(per_cpu.iter().map(|s| s.packets).sum());
            bytes.get_or_create(&label).inc_by(per_cpu.iter().map(|s| s.bytes).sum());
        }
        dp.register(
            "service_packets",
            "Packets (device hooks) or connections (socket hooks) per service port",
            packets,
        );
        dp.register("service_bytes", "Bytes through the device hooks per service port", bytes);
        let mut more = String::new();
        encode(&mut more, &dp)?;
        out.push_str(&more);
        Ok(out)
    }
}
