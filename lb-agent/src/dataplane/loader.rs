//! Loading the embedded eBPF object with this node's map sizes, and pinning its maps.
//!
//! With a pin directory, every map is pinned at `<bpffs>/v<ABI>/maps/<NAME>` and reused by the
//! next agent, so a restart or upgrade of the agent does not disturb traffic. A pinned map whose
//! shape differs from what this binary expects is refused with a clear error instead of being
//! misread.

use std::{
    collections::HashMap,
    mem::size_of,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{Ebpf, EbpfLoader, maps::MapData};
use lb_common::*;

use super::kernel_features;

/// Capacities of the maps that grow with the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Service ports (per family): service ids, counters, and `TABLES_PER_SERVICE` times as
    /// many backend sets.
    pub max_services: u32,
    /// Frontend entries (address, port, protocol, scope).
    pub max_frontends: u32,
    pub max_backends: u32,
    pub maglev_slots: u32,
    /// Conntrack entries of device-hook flows (two per flow).
    pub max_conntrack: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            max_services: DEFAULT_MAX_SERVICES,
            max_frontends: DEFAULT_MAX_FRONTENDS,
            max_backends: DEFAULT_MAX_BACKENDS,
            maglev_slots: DEFAULT_MAGLEV_SLOTS,
            max_conntrack: DEFAULT_MAX_CONNTRACK,
        }
    }
}

/// The shape of one map, as this binary expects it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// Every map of the object with its expected shape for the given sizes.
pub fn map_specs(sizes: &MapSizes) -> Vec<MapSpec> {
    fn spec<K, V>(name: &'static str, max_entries: u32) -> MapSpec {
        MapSpec {
            name,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries,
        }
    }
    vec![
        spec::<ServiceKey, ServiceValue>(MAP_SERVICES, sizes.max_frontends),
        spec::<u32, TableValue>(MAP_TABLES, TABLES_PER_SERVICE * sizes.max_services),
        spec::<u32, BackendValue>(MAP_BACKENDS, sizes.max_backends),
        spec::<u32, [u32; 2]>(MAP_MAGLEV, sizes.maglev_slots.div_ceil(MAGLEV_SLOTS_PER_ENTRY)),
        spec::<u32, u64>(MAP_STATS, STAT_COUNT),
        spec::<AffinityKey, AffinityValue>(MAP_AFFINITY, DEFAULT_MAX_AFFINITY),
        spec::<AffinityMatchKey, u32>(MAP_AFFINITY_MATCH, sizes.max_backends),
        spec::<SockRevNatKey, SockRevNatValue>(MAP_SOCK_REVNAT, DEFAULT_MAX_SOCK_REVNAT),
        spec::<CtKey, CtValue>(MAP_CONNTRACK, sizes.max_conntrack),
        spec::<u32, NodeConfig>(MAP_NODE, 1),
        spec::<u32, ServiceName>(MAP_NAMES, sizes.max_services),
        // LPM keys carry a 32-bit prefix length before the data.
        MapSpec {
            name: MAP_SOURCE_RANGES,
            key_size: 4 + size_of::<SourceRangeKey>() as u32,
            value_size: 4,
            max_entries: DEFAULT_MAX_SOURCE_RANGES,
        },
        spec::<u32, ServiceStats>(MAP_SERVICE_STATS, sizes.max_services),
        spec::<u32, u32>(MAP_XDP_TX, MAX_XDP_DEVICES),
        spec::<u32, u32>(MAP_SNAT_DEVICES, MAX_XDP_DEVICES),
        spec::<u32, u32>(MAP_SNAT_BY_ROUTE, 1),
        spec::<u32, u32>(MAP_OPTIONS, OPT_COUNT),
        spec::<u32, u64>(MAP_REPLY_PORTS, PORT_SET_WORDS),
        spec::<u32, u64>(MAP_INGRESS_PORTS, PORT_SET_WORDS),
        spec::<u32, u64>(MAP_POD_PORTS, PORT_SET_WORDS),
        spec::<u32, u64>(MAP_POD_REPLY_PORTS, PORT_SET_WORDS),
        spec::<u32, u64>(MAP_CLUSTER_IPS, ADDR_SET_WORDS),
        spec::<u32, u64>(MAP_EXTERNAL_IPS, ADDR_SET_WORDS),
        spec::<u32, u64>(MAP_FRONTEND_ADDRS, ADDR_SET_WORDS),
        // A ring buffer has no keys or values; its capacity is in bytes.
        MapSpec { name: MAP_EVENTS, key_size: 0, value_size: 0, max_entries: EVENTS_BYTES },
    ]
}

/// Where this ABI version's maps are pinned under a bpffs directory.
pub fn maps_pin_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(format!("v{MAP_ABI_VERSION}")).join("maps")
}

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// bpffs directory to pin maps under (`--bpffs`); `None` loads private, unpinned maps
    /// (tests, `lbctl explain` scratch copies).
    pub bpffs: Option<PathBuf>,
    pub sizes: MapSizes,
}

/// Loads the embedded object: creates (or reuses pinned) maps and loads nothing into hooks yet.
pub fn load(opts: &LoadOptions) -> Result<Ebpf> {
    load_object(opts, crate::ebpf_object()?)
}

/// [`load`] with another build of the kernel programs (the datapath bench compares against an
/// older one).
pub fn load_object(opts: &LoadOptions, object: &[u8]) -> Result<Ebpf> {
    let specs = map_specs(&opts.sizes);
    let mut loader = new_loader();
    // Developers: LB_VERIFIER_LOG=1 keeps the verifier's full log in load errors.
    if std::env::var_os("LB_VERIFIER_LOG").is_some() {
        loader.verifier_log_level(aya::VerifierLogLevel::VERBOSE | aya::VerifierLogLevel::STATS);
    }
    for spec in &specs {
        loader.map_max_entries(spec.name, spec.max_entries);
    }
    let pin_paths: HashMap<&str, PathBuf> = match &opts.bpffs {
        Some(bpffs) => {
            let dir = maps_pin_dir(bpffs);
            std::fs::create_dir_all(&dir).with_context(|| {
                format!("creating pin directory {} (is a bpffs mounted there?)", dir.display())
            })?;
            specs.iter().map(|s| (s.name, dir.join(s.name))).collect()
        }
        None => HashMap::new(),
    };
    for spec in &specs {
        if let Some(path) = pin_paths.get(spec.name) {
            check_pinned(spec, path)?;
            loader.map_pin_path(spec.name, path.clone());
        }
    }
    loader.load(&fitted(object)?).context("loading the eBPF object into the kernel")
}

/// A loader that tells the programs what this kernel offers (`kernel_features`; an object
/// without that constant, an older build's, is loaded as it is).
fn new_loader() -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    loader.override_global(GLOBAL_KERNEL_FEATURES, kernel_features::probed(), false);
    loader
}

/// The object as this kernel can parse it ([`kernel_features::fit_object`]).
fn fitted(object: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>> {
    kernel_features::fit_object(object, *kernel_features::probed())
}

/// Removes the pins of maps this build replaced ([`RETIRED_ADDRESS_SETS`]); run once this
/// agent's programs are attached (the ones that used them are gone then). Returns what went.
pub fn remove_retired_maps(bpffs: &Path) -> Result<Vec<PathBuf>> {
    let dir = maps_pin_dir(bpffs);
    let mut removed = Vec::new();
    for (old, _) in RETIRED_ADDRESS_SETS {
        let path = dir.join(old);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(removed)
}

/// Refuses a pinned map whose shape differs from `spec` (left by another version or other sizes).
fn check_pinned(spec: &MapSpec, path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let map = MapData::from_pin(path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    let info = map.info().with_context(|| format!("reading info of {}", path.display()))?;
    let found = (info.key_size(), info.value_size(), info.max_entries());
    let expected = (spec.key_size, spec.value_size, spec.max_entries);
    if found != expected {
        bail!(
            "pinned map {} has key/value size and capacity {found:?} but this agent expects \
             {expected:?} (map sizes changed, or another agent version). Start with the same map \
             sizes, or remove {} (this drops established flows).",
            path.display(),
            path.parent().unwrap_or(path).display()
        );
    }
    Ok(())
}

/// Maps the datapath only reads (`LB_FRONTEND_SET` aside: a first packet SNATed there sets its
/// source's bit, as that flow would): a private copy of the object may share the live, pinned ones
/// without ever changing them (`lbctl explain`).
pub const READ_ONLY_MAPS: &[&str] = &[
    MAP_SERVICES,
    MAP_TABLES,
    MAP_BACKENDS,
    MAP_MAGLEV,
    MAP_AFFINITY_MATCH,
    MAP_SOURCE_RANGES,
    MAP_NODE,
    MAP_NAMES,
    MAP_XDP_TX,
    MAP_SNAT_DEVICES,
    MAP_SNAT_BY_ROUTE,
    MAP_OPTIONS,
    MAP_REPLY_PORTS,
    MAP_INGRESS_PORTS,
    MAP_POD_PORTS,
    MAP_POD_REPLY_PORTS,
    MAP_CLUSTER_IPS,
    MAP_EXTERNAL_IPS,
    MAP_FRONTEND_ADDRS,
];

/// Loads a private copy of the object whose read-only maps are the live pinned ones under
/// `bpffs` and whose stateful maps (conntrack, affinity, counters, ...) are fresh and small, so
/// running a program on it answers "what would happen" without touching live state.
pub fn load_shadow(bpffs: &Path) -> Result<Ebpf> {
    let object = crate::ebpf_object()?;
    let dir = maps_pin_dir(bpffs);
    let mut loader = new_loader();
    let specs = map_specs(&MapSizes::default());
    for spec in &specs {
        let path = dir.join(spec.name);
        if READ_ONLY_MAPS.contains(&spec.name) {
            if !path.exists() {
                bail!(
                    "no pinned map at {} (is an agent running with --bpffs {}?)",
                    path.display(),
                    bpffs.display()
                );
            }
            let info = MapData::from_pin(&path)
                .with_context(|| format!("opening {}", path.display()))?
                .info()?;
            if (info.key_size(), info.value_size()) != (spec.key_size, spec.value_size) {
                bail!("pinned map {} is of another layout version than this lbctl", path.display());
            }
            loader.map_pin_path(spec.name, path);
        } else if spec.name == MAP_SERVICE_STATS {
            // Indexed by service id: as large as the live one.
            let live =
                MapData::from_pin(dir.join(spec.name)).map(|m| m.info().map(|i| i.max_entries()));
            loader.map_max_entries(
                spec.name,
                live.ok().and_then(|r| r.ok()).unwrap_or(spec.max_entries),
            );
        } else if spec.name != MAP_STATS && spec.name != MAP_EVENTS {
            // (A ring buffer's size must stay a multiple of the page size.)
            loader.map_max_entries(spec.name, 1024);
        }
    }
    loader.load(&fitted(object)?).context("loading a private copy of the datapath")
}
