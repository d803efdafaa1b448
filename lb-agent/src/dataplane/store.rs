//! Where the writer's entries go: the kernel maps ([`KernelStore`]) or an in-memory copy
//! ([`MemoryStore`], for unit tests and for measuring the writer without syscalls). Both count
//! what they write, so tests and benchmarks can assert "one endpoint change, N writes".

use std::collections::BTreeMap;

use super::maglev_map::MaglevMap;
use super::port_filters::PortFilters;
use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData},
};
use lb_common::*;

/// Map writes, by map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteCounts {
    pub services: u64,
    /// LB_AFF_MATCH entries (services with sessionAffinity only).
    pub affinity: u64,
    pub tables: u64,
    pub backends: u64,
    pub maglev_slots: u64,
    /// Syscalls spent on Maglev slots (batches count once).
    pub maglev_calls: u64,
}

impl WriteCounts {
    /// Writes excluding Maglev slots.
    pub fn entries(&self) -> u64 {
        self.services + self.tables + self.backends + self.affinity
    }

    /// `self - earlier`.
    pub fn since(&self, earlier: &WriteCounts) -> WriteCounts {
        WriteCounts {
            services: self.services - earlier.services,
            affinity: self.affinity - earlier.affinity,
            tables: self.tables - earlier.tables,
            backends: self.backends - earlier.backends,
            maglev_slots: self.maglev_slots - earlier.maglev_slots,
            maglev_calls: self.maglev_calls - earlier.maglev_calls,
        }
    }
}

/// The content of every map the writer owns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub tables: BTreeMap<u32, TableValue>,
    /// Non-empty backend slots only.
    pub backends: BTreeMap<u32, BackendValue>,
    /// The Maglev slots of each backend set (by table id); sets whose range lies outside the
    /// map have none.
    pub slots: BTreeMap<u32, Vec<u32>>,
    /// (backend, affinity service) memberships.
    pub affinity_match: std::collections::BTreeSet<AffinityMatchKey>,
    pub node: NodeConfig,
    /// Service port names by service id.
    pub names: BTreeMap<u32, String>,
    /// (service id, CIDR) of every source range entry.
    pub source_ranges: std::collections::BTreeSet<(u32, ipnet::IpNet)>,
}

impl Snapshot {
    /// The slots of a backend set.
    pub fn table_slots(&self, id: u32) -> &[u32] {
        self.slots.get(&id).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Reads the slots of every set from `maglev` (slot index -> value).
    fn fill_slots(&mut self, capacity: u32, read: impl Fn(u32, u32) -> Vec<u32>) {
        for (&id, t) in &self.tables {
            if t.maglev_size > 0
                && t.maglev_offset.checked_add(t.maglev_size).is_some_and(|end| end <= capacity)
            {
                self.slots.insert(id, read(t.maglev_offset, t.maglev_size));
            }
        }
    }
}

pub trait MapStore {
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<()>;
    fn set_table(&mut self, id: u32, value: &TableValue) -> Result<()>;
    fn delete_table(&mut self, id: u32) -> Result<()>;
    /// Writes a backend; an all-zero value clears the slot.
    fn set_backend(&mut self, id: u32, value: &BackendValue) -> Result<()>;
    /// Writes Maglev slots `start..start + values.len()`.
    fn set_maglev_range(&mut self, start: u32, values: &[u32]) -> Result<()>;
    /// Writes scattered Maglev slots.
    fn set_maglev_slots(&mut self, slots: &[(u32, u32)]) -> Result<()>;
    /// Reads Maglev slots `start..start + len`.
    fn maglev_read(&self, start: u32, len: u32) -> Vec<u32>;
    fn set_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<()>;
    /// This node's SNAT addresses.
    fn set_node(&mut self, node: &NodeConfig) -> Result<()>;
    /// A service port's name (for lbctl); `None` removes it.
    fn set_name(&mut self, service_id: u32, name: Option<&str>) -> Result<()>;
    /// Replaces the source ranges of one service port (LPM entries: CIDR -> allowed).
    fn set_source_ranges(
        &mut self,
        service_id: u32,
        old: &[ipnet::IpNet],
        new: &[ipnet::IpNet],
    ) -> Result<()>;
    fn delete_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<()>;
    fn snapshot(&self) -> Result<Snapshot>;
    fn counts(&self) -> WriteCounts;
    fn capacity_maglev(&self) -> u32;
    fn capacity_backends(&self) -> u32;
}

/// Maps held in memory.
#[derive(Clone, Debug)]
pub struct MemoryStore {
    data: Snapshot,
    maglev: Vec<u32>,
    counts: WriteCounts,
    max_backends: u32,
}

impl MemoryStore {
    pub fn new(maglev_slots: u32, max_backends: u32) -> Self {
        Self {
            data: Snapshot::default(),
            maglev: vec![0; maglev_slots as usize],
            counts: WriteCounts::default(),
            max_backends,
        }
    }
}

impl MapStore for MemoryStore {
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.counts.services += 1;
        self.data.services.insert(*key, *value);
        Ok(())
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.counts.services += 1;
        self.data.services.remove(key);
        Ok(())
    }
    fn set_table(&mut self, id: u32, value: &TableValue) -> Result<()> {
        self.counts.tables += 1;
        self.data.tables.insert(id, *value);
        Ok(())
    }
    fn delete_table(&mut self, id: u32) -> Result<()> {
        self.counts.tables += 1;
        self.data.tables.remove(&id);
        Ok(())
    }
    fn set_backend(&mut self, id: u32, value: &BackendValue) -> Result<()> {
        anyhow::ensure!(id < self.max_backends, "backend id {id} beyond capacity");
        self.counts.backends += 1;
        if *value == BackendValue::default() {
            self.data.backends.remove(&id);
        } else {
            self.data.backends.insert(id, *value);
        }
        Ok(())
    }
    fn set_maglev_range(&mut self, start: u32, values: &[u32]) -> Result<()> {
        let s = start as usize;
        let range = self.maglev.get_mut(s..s.saturating_add(values.len()));
        range.context("Maglev slots beyond the map")?.copy_from_slice(values);
        self.counts.maglev_slots += values.len() as u64;
        self.counts.maglev_calls += 1;
        Ok(())
    }
    fn set_maglev_slots(&mut self, slots: &[(u32, u32)]) -> Result<()> {
        for &(i, v) in slots {
            self.maglev[i as usize] = v;
        }
        self.counts.maglev_slots += slots.len() as u64;
        self.counts.maglev_calls += 1;
        Ok(())
    }
    fn maglev_read(&self, start: u32, len: u32) -> Vec<u32> {
        self.maglev[start as usize..(start + len) as usize].to_vec()
    }
    fn set_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<()> {
        self.counts.affinity += 1;
        self.data.affinity_match.insert(*key);
        Ok(())
    }
    fn delete_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<()> {
        self.counts.affinity += 1;
        self.data.affinity_match.remove(key);
        Ok(())
    }
    fn set_node(&mut self, node: &NodeConfig) -> Result<()> {
        self.data.node = *node;
        Ok(())
    }
    fn set_name(&mut self, service_id: u32, name: Option<&str>) -> Result<()> {
        match name {
            Some(n) => self.data.names.insert(service_id, n.to_owned()),
            None => self.data.names.remove(&service_id),
        };
        Ok(())
    }
    fn set_source_ranges(
        &mut self,
        service_id: u32,
        old: &[ipnet::IpNet],
        new: &[ipnet::IpNet],
    ) -> Result<()> {
        for n in old {
            self.data.source_ranges.remove(&(service_id, *n));
        }
        for n in new {
            self.data.source_ranges.insert((service_id, *n));
        }
        Ok(())
    }
    fn snapshot(&self) -> Result<Snapshot> {
        let mut snap = self.data.clone();
        snap.fill_slots(self.capacity_maglev(), |s, l| self.maglev_read(s, l));
        Ok(snap)
    }
    fn counts(&self) -> WriteCounts {
        self.counts
    }
    fn capacity_maglev(&self) -> u32 {
        self.maglev.len() as u32
    }
    fn capacity_backends(&self) -> u32 {
        self.max_backends
    }
}

/// The kernel maps, through duplicated file descriptors (independent of the `Ebpf` they came
/// from, pinned or not).
pub struct KernelStore {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    tables: HashMap<MapData, u32, TableValue>,
    backends: Array<MapData, BackendValue>,
    maglev: MaglevMap,
    affinity_match: HashMap<MapData, AffinityMatchKey, u32>,
    node: Array<MapData, NodeConfig>,
    names: HashMap<MapData, u32, ServiceName>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    /// Empty for pins opened to be read ([`KernelStore::open_pinned`]).
    port_filters: PortFilters,
    counts: WriteCounts,
}

fn lpm_key(service_id: u32, net: &ipnet::IpNet) -> aya::maps::lpm_trie::Key<SourceRangeKey> {
    let prefix = source_range_prefix(net.prefix_len(), net.addr().is_ipv4());
    aya::maps::lpm_trie::Key::new(
        prefix,
        SourceRangeKey { service_id, addr: addr_from_ip(net.network()) },
    )
}

/// An independent handle on one of the object's maps (a duplicated file descriptor).
pub(crate) fn dup_map(ebpf: &Ebpf, name: &str) -> Result<Map> {
    use std::os::fd::AsFd;
    let dup = |d: &MapData| -> Result<MapData> {
        let fd = d
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .with_context(|| format!("duplicating fd of {name}"))?;
        MapData::from_fd(fd).with_context(|| format!("reopening {name}"))
    };
    match ebpf.map(name).with_context(|| format!("object has no map {name}"))? {
        Map::HashMap(d) => Ok(Map::HashMap(dup(d)?)),
        Map::Array(d) => Ok(Map::Array(dup(d)?)),
        Map::LpmTrie(d) => Ok(Map::LpmTrie(dup(d)?)),
        _ => anyhow::bail!("map {name} has an unexpected type"),
    }
}

impl KernelStore {
    /// The maps pinned by an agent under `bpffs` (for lbctl and tests; works after the agent
    /// exited).
    pub fn open_pinned(bpffs: &std::path::Path) -> Result<Self> {
        let dir = super::loader::maps_pin_dir(bpffs);
        let open = |name: &str| -> Result<MapData> {
            let path = dir.join(name);
            MapData::from_pin(&path).with_context(|| {
                format!(
                    "opening {} (is an agent running with --bpffs {}?)",
                    path.display(),
                    bpffs.display()
                )
            })
        };
        Ok(Self {
            services: HashMap::try_from(Map::HashMap(open(MAP_SERVICES)?))?,
            tables: HashMap::try_from(Map::HashMap(open(MAP_TABLES)?))?,
            backends: Array::try_from(Map::Array(open(MAP_BACKENDS)?))?,
            maglev: MaglevMap::new(open(MAP_MAGLEV)?)?,
            affinity_match: HashMap::try_from(Map::HashMap(open(MAP_AFFINITY_MATCH)?))?,
            node: Array::try_from(Map::Array(open(MAP_NODE)?))?,
            names: HashMap::try_from(Map::HashMap(open(MAP_NAMES)?))?,
            source_ranges: LpmTrie::try_from(Map::LpmTrie(open(MAP_SOURCE_RANGES)?))?,
            port_filters: PortFilters::default(),
            counts: WriteCounts::default(),
        })
    }

    pub fn new(ebpf: &Ebpf) -> Result<Self> {
        Ok(Self {
            services: HashMap::try_from(dup_map(ebpf, MAP_SERVICES)?)?,
            tables: HashMap::try_from(dup_map(ebpf, MAP_TABLES)?)?,
            backends: Array::try_from(dup_map(ebpf, MAP_BACKENDS)?)?,
            maglev: match dup_map(ebpf, MAP_MAGLEV)? {
                Map::Array(d) => MaglevMap::new(d)?,
                _ => anyhow::bail!("LB_MAGLEV is not an array"),
            },
            affinity_match: HashMap::try_from(dup_map(ebpf, MAP_AFFINITY_MATCH)?)?,
            node: Array::try_from(dup_map(ebpf, MAP_NODE)?)?,
            names: HashMap::try_from(dup_map(ebpf, MAP_NAMES)?)?,
            source_ranges: LpmTrie::try_from(dup_map(ebpf, MAP_SOURCE_RANGES)?)?,
            port_filters: PortFilters::open(ebpf)?,
            counts: WriteCounts::default(),
        })
    }
}

impl MapStore for KernelStore {
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.counts.services += 1;
        // The port first: packets to the frontend are looked up once it is set.
        self.port_filters.note_frontend(key)?;
        self.services
            .insert(key, value, 0)
            .with_context(|| format!("writing frontend {key:?} (LB_SERVICES full?)"))
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.counts.services += 1;
        self.services.remove(key).with_context(|| format!("deleting frontend {key:?}"))
    }
    fn set_table(&mut self, id: u32, value: &TableValue) -> Result<()> {
        self.counts.tables += 1;
        self.tables
            .insert(id, value, 0)
            .with_context(|| format!("writing backend set {id} (LB_TABLES full?)"))
    }
    fn delete_table(&mut self, id: u32) -> Result<()> {
        self.counts.tables += 1;
        self.tables.remove(&id).with_context(|| format!("deleting backend set {id}"))
    }
    fn set_backend(&mut self, id: u32, value: &BackendValue) -> Result<()> {
        self.counts.backends += 1;
        // The port first: a flow to the backend can start as soon as it is written.
        self.port_filters.note_backend(value)?;
        self.backends.set(id, value, 0).with_context(|| format!("writing backend {id}"))
    }
    fn set_maglev_range(&mut self, start: u32, values: &[u32]) -> Result<()> {
        self.counts.maglev_slots += values.len() as u64;
        self.counts.maglev_calls += 1;
        self.maglev.write(start, values);
        Ok(())
    }
    fn set_maglev_slots(&mut self, slots: &[(u32, u32)]) -> Result<()> {
        self.counts.maglev_slots += slots.len() as u64;
        self.counts.maglev_calls += 1;
        self.maglev.write_scattered(slots);
        Ok(())
    }
    fn maglev_read(&self, start: u32, len: u32) -> Vec<u32> {
        self.maglev.read(start, len)
    }
    fn set_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<()> {
        self.counts.affinity += 1;
        self.affinity_match.insert(key, 1, 0).context("writing LB_AFF_MATCH (full?)")
    }
    fn delete_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<()> {
        self.counts.affinity += 1;
        self.affinity_match.remove(key).context("deleting from LB_AFF_MATCH")
    }
    fn set_node(&mut self, node: &NodeConfig) -> Result<()> {
        self.node.set(0, node, 0).context("writing LB_NODE")
    }
    fn set_name(&mut self, service_id: u32, name: Option<&str>) -> Result<()> {
        match name {
            Some(n) => {
                self.names.insert(service_id, ServiceName::new(n), 0).context("writing LB_NAMES")
            }
            None => {
                let _ = self.names.remove(&service_id);
                Ok(())
            }
        }
    }
    fn set_source_ranges(
        &mut self,
        service_id: u32,
        old: &[ipnet::IpNet],
        new: &[ipnet::IpNet],
    ) -> Result<()> {
        for n in new {
            self.source_ranges
                .insert(&lpm_key(service_id, n), 1, 0)
                .context("writing LB_SRC_RANGES (full?)")?;
        }
        for n in old {
            if !new.contains(n) {
                let _ = self.source_ranges.remove(&lpm_key(service_id, n));
            }
        }
        Ok(())
    }
    fn snapshot(&self) -> Result<Snapshot> {
        let mut snap = Snapshot::default();
        for kv in self.services.iter() {
            let (k, v) = kv?;
            snap.services.insert(k, v);
        }
        for kv in self.tables.iter() {
            let (k, v) = kv?;
            snap.tables.insert(k, v);
        }
        for (i, v) in self.backends.iter().enumerate() {
            let v = v?;
            if v != BackendValue::default() {
                snap.backends.insert(i as u32, v);
            }
        }
        snap.fill_slots(self.maglev.len(), |s, l| self.maglev.read(s, l));
        for k in self.affinity_match.keys() {
            snap.affinity_match.insert(k?);
        }
        snap.node = self.node.get(&0, 0)?;
        for kv in self.names.iter() {
            let (id, name) = kv?;
            snap.names.insert(id, name.as_str().to_owned());
        }
        for k in self.source_ranges.keys() {
            let k = k?;
            let data = k.data();
            let v4 = addr_is_v4(&data.addr);
            let len = k.prefix_len().saturating_sub(if v4 { 128 } else { 32 }) as u8;
            if let Ok(net) = ipnet::IpNet::new(addr_to_ip(&data.addr), len) {
                snap.source_ranges.insert((data.service_id, net));
            }
        }
        Ok(snap)
    }
    fn counts(&self) -> WriteCounts {
        self.counts
    }
    fn capacity_maglev(&self) -> u32 {
        self.maglev.len()
    }

    fn capacity_backends(&self) -> u32 {
        self.backends.len()
    }
}
