//! Prometheus metrics: the agent's own (syncs and their latency, objects, map fill, programs
//! attached), and the datapath's, read from the per-CPU counters at each scrape (packets and
//! bytes per service port, events and drops by reason).
//!
//! Monitoring built for kube-proxy finds what it reads under kube-proxy's names too (the
//! kubernetes-mixin dashboard, metricbeat's and netdata's kube-proxy modules): the sync and
//! network programming histograms, the last sync's time and the Local-policy gauge are the
//! same metrics registered under both names (recorded once); the change counters, the health
//! port's answers (`kubeproxy_*`), the API requests (`rest_client_*`,
//! `sources/api_metrics.rs`) and the process figures (`process_*`, `process_metrics.rs`)
//! exist under kube-proxy's names only.

use std::{path::Path, sync::Mutex};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use lb_common::*;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use super::process_metrics::ProcessCollector;
use crate::{
    dataplane::{conntrack_gc::GcMetrics, loader::maps_pin_dir},
    sources::api_metrics::ApiMetrics,
};

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

/// An HTTP status code (kube-proxy's health port counters).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
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
    /// Service and EndpointSlice changes taken in (kube-proxy's
    /// `sync_proxy_rules_{service,endpoint}_changes_total`).
    pub service_changes: Counter,
    pub endpoint_changes: Counter,
    /// `/healthz` and `/livez` answers by status code (kube-proxy's `proxy_healthz_total`,
    /// `proxy_livez_total`).
    pub healthz: Family<CodeLabel, Counter>,
    pub livez: Family<CodeLabel, Counter>,
    /// The agent's requests to the API server (the kube client's layer).
    pub api: ApiMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
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
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            healthz: Family::default(),
            livez: Family::default(),
            api: ApiMetrics::default(),
        };
        let registry = root.sub_registry_with_prefix("lb");
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
        m.register_kube_proxy_names(&mut root);
        *m.registry.lock().unwrap() = root;
        m
    }

    /// kube-proxy's names (see the module's doc), on the root registry (no prefix).
    fn register_kube_proxy_names(&self, root: &mut Registry) {
        root.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds: a change's arrival to its maps written (lb_sync_duration_seconds)",
            self.sync_seconds.clone(),
        );
        root.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced (lb_sync_last_timestamp_seconds)",
            self.last_synced.clone(),
        );
        root.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds (lb_network_programming_duration_seconds)",
            self.programming_seconds.clone(),
        );
        root.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints (lb_services_no_local_endpoints)",
            self.no_local_endpoints.clone(),
        );
        root.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            self.service_changes.clone(),
        );
        root.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            self.endpoint_changes.clone(),
        );
        root.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            self.healthz.clone(),
        );
        root.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            self.livez.clone(),
        );
        self.api.register(root);
        root.register_collector(Box::new(ProcessCollector));
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
