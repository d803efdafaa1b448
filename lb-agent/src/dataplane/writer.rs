//! Plans -> map entries, writing only what changed, in an order that never lets a packet see a
//! half-built service:
//!
//! 1. backends first (new ones, changed flags),
//! 2. then Maglev slots and backend sets (`LB_TABLES`): a set whose table size is unchanged
//!    gets only its changed slots rewritten in place (every slot always names a live backend);
//!    a resized set gets a new range, written whole, then its `TableValue` is replaced in one
//!    atomic hash-map update,
//! 3. then frontends (`LB_SERVICES`),
//! 4. and on the way out the reverse: frontends, then sets, then backends nobody uses.
//!
//! Ids are stable: a service port keeps its service id and sets, a backend (address, port) keeps
//! its id while any service uses it. At start the writer adopts what it finds in pinned maps
//! (same backend ids, same service ids, identical tables) so an agent restart rewrites almost
//! nothing, and [`Writer::finish_initial_sync`] removes whatever the first full sync did not
//! claim.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use anyhow::{Context, Result, anyhow, bail};
use lb_common::*;

use super::{
    ids::{IdAllocator, MaglevSpace},
    store::{MapStore, Snapshot, WriteCounts},
};
use crate::{
    model::{
        maglev,
        plan::{BackendSet, FrontendKind, PortKey, Protocol, Scope, ServicePlan, TrafficPolicy},
    },
    state::ObjKey,
};

/// A backend's identity: address and port (shared by every service and protocol using it).
type BackendAddr = (IpAddr, u16);

#[derive(Clone, Copy, Debug)]
pub struct WriterConfig {
    pub maglev_max_size: u32,
    /// Service ids available (`--max-services`).
    pub max_services: u32,
    /// Service addresses outside clients reach answer pings (`--answer-service-pings`).
    pub answer_service_pings: bool,
}

#[derive(Clone, Debug)]
struct BackendEntry {
    id: u32,
    /// What the map holds.
    value: BackendValue,
    /// The flags each service port (by service id) using this backend sees. The same endpoint normally looks
    /// the same to every service; when it does not, the map holds a combination that does not
    /// depend on the order of changes: local if any says so, terminating only if all do.
    users: BTreeMap<u32, u8>,
}

impl BackendEntry {
    fn combined(&self) -> BackendValue {
        let local = self.users.values().any(|f| f & BE_F_LOCAL != 0);
        let terminating = self.users.values().all(|f| f & BE_F_TERMINATING != 0);
        let flags =
            if local { BE_F_LOCAL } else { 0 } | if terminating { BE_F_TERMINATING } else { 0 };
        BackendValue { flags, ..self.value }
    }
}

#[derive(Clone, Debug)]
struct TableState {
    id: u32,
    members: Vec<BackendAddr>,
    value: TableValue,
}

#[derive(Clone, Debug)]
struct PortState {
    service_id: u32,
    /// Address markers of this port's frontends (see [`marker_keys`]), each holding a
    /// reference.
    markers: Vec<ServiceKey>,
    /// Backend ids registered in LB_AFF_MATCH for this port (sessionAffinity only).
    affinity_members: BTreeSet<u32>,
    /// loadBalancerSourceRanges programmed for this port.
    source_ranges: Vec<ipnet::IpNet>,
    tables: Vec<TableState>,
    /// Which set serves which role.
    role_table: HashMap<BackendSet, u32>,
    frontends: BTreeMap<ServiceKey, ServiceValue>,
    backends: BTreeSet<BackendAddr>,
}

/// Content found in pinned maps at start, not yet claimed by the first full sync.
#[derive(Debug, Default)]
struct Stale {
    snapshot: Snapshot,
    backend_by_addr: HashMap<BackendAddr, u32>,
    backends: BTreeSet<u32>,
    tables: BTreeSet<u32>,
    /// Sets whose Maglev range could not be claimed (overlapping another's, or past the map):
    /// never adopted, since writing one would change another's slots.
    untrusted_ranges: BTreeSet<u32>,
    /// Sets whose id is outside this agent's id space: removed by the first full sync.
    foreign_tables: Vec<u32>,
    service_ids: BTreeSet<u32>,
    frontends: BTreeSet<ServiceKey>,
    affinity_match: BTreeSet<AffinityMatchKey>,
    source_ranges: BTreeSet<(u32, ipnet::IpNet)>,
}

/// What one call changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub writes: WriteCounts,
    /// Frontends another service port already owns (first come keeps it).
    pub conflicts: Vec<String>,
}

pub struct Writer<S: MapStore> {
    store: S,
    cfg: WriterConfig,
    service_ids: IdAllocator,
    table_ids: IdAllocator,
    backend_ids: IdAllocator,
    maglev: MaglevSpace,
    backends: HashMap<BackendAddr, BackendEntry>,
    ports: HashMap<PortKey, PortState>,
    by_object: HashMap<ObjKey, BTreeSet<PortKey>>,
    /// Frontend -> service id of the port that owns it.
    frontend_owner: HashMap<ServiceKey, u32>,
    /// Frontend -> services that wanted it while another owned it: when it is freed they are
    /// handed to the caller to program again ([`Writer::take_unblocked`]), so the frontend
    /// does not stay unprogrammed until their next change.
    frontend_waiters: HashMap<ServiceKey, BTreeSet<ObjKey>>,
    /// Services a freed frontend was waited for by.
    unblocked: BTreeSet<ObjKey>,
    /// Address markers and how many service ports hold each.
    markers: HashMap<ServiceKey, u32>,
    node: NodeConfig,
    stale: Option<Stale>,
    /// UDP endpoints service ports stopped using since the last [`Writer::take_stale_udp`].
    stale_udp: Vec<UdpTarget>,
}

/// A UDP service port's endpoint, as conntrack entries name it (service id, backend address and
/// port). Those a port stopped using (gone, or no longer ready nor serving) have their flows'
/// conntrack entries flushed, so that a client that keeps sending from the same port moves to
/// a live endpoint instead of sending into the void: kube-proxy clears conntrack for deleted
/// UDP endpoints for the same reason. TCP flows keep their endpoint (they end by themselves,
/// or time out).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UdpTarget {
    pub service_id: u32,
    pub addr: IpAddr,
    pub port: u16,
}

fn frontend_flags(kind: FrontendKind) -> u32 {
    match kind {
        FrontendKind::ClusterIP => SVC_F_CLUSTER_IP,
        FrontendKind::NodePort => SVC_F_NODE_PORT,
        FrontendKind::ExternalIP => SVC_F_EXTERNAL_IP,
        FrontendKind::LoadBalancer => SVC_F_LOAD_BALANCER,
    }
}

fn backend_value(b: &crate::model::plan::Backend) -> BackendValue {
    let mut flags = 0;
    if b.local {
        flags |= BE_F_LOCAL;
    }
    if b.terminating {
        flags |= BE_F_TERMINATING;
    }
    BackendValue::new(b.addr, b.port, flags)
}

fn frontend_key(f: &crate::model::plan::Frontend, proto: u8) -> ServiceKey {
    let scope = match f.scope {
        Scope::Internal => SCOPE_INTERNAL,
        Scope::External => SCOPE_EXTERNAL,
    };
    ServiceKey::new(f.address, f.port, proto, scope)
}

/// The address markers (port 0, protocol 0) `frontends` need, each once: a ClusterIP's from
/// pods and the host (internal: its other ports are refused), and every address outside
/// clients reach but a NodePort's, which is the node's own (external: its other ports and
/// protocols are dropped where the stack would send them back out).
fn marker_keys<'a>(
    frontends: impl Iterator<Item = &'a crate::model::plan::Frontend>,
) -> Vec<ServiceKey> {
    let mut keys: Vec<ServiceKey> = frontends
        .filter_map(|f| {
            match (f.scope, f.kind) {
                (Scope::Internal, FrontendKind::ClusterIP) => Some(SCOPE_INTERNAL),
                (Scope::External, kind) if kind != FrontendKind::NodePort => Some(SCOPE_EXTERNAL),
                _ => None,
            }
            .map(|scope| ServiceKey::new(f.address, 0, 0, scope))
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

const ROLES: [BackendSet; 3] = [BackendSet::Internal, BackendSet::Cluster, BackendSet::External];

impl<S: MapStore> Writer<S> {
    /// A writer over `store`, adopting what the store already holds (pinned maps of a previous
    /// agent) until [`Writer::finish_initial_sync`].
    pub fn new(store: S, cfg: WriterConfig) -> Result<Self> {
        let snapshot = store.snapshot().context("reading the maps at start")?;
        let mut w = Writer {
            service_ids: IdAllocator::new(1, cfg.max_services),
            table_ids: IdAllocator::new(1, TABLES_PER_SERVICE.saturating_mul(cfg.max_services)),
            backend_ids: IdAllocator::new(1, store.capacity_backends()),
            maglev: MaglevSpace::new(store.capacity_maglev()),
            store,
            cfg,
            backends: HashMap::new(),
            ports: HashMap::new(),
            by_object: HashMap::new(),
            frontend_owner: HashMap::new(),
            frontend_waiters: HashMap::new(),
            unblocked: BTreeSet::new(),
            markers: HashMap::new(),
            node: snapshot.node,
            stale: None,
            stale_udp: Vec::new(),
        };
        let empty = snapshot.services.is_empty()
            && snapshot.source_ranges.is_empty()
            && snapshot.tables.is_empty()
            && snapshot.backends.is_empty()
            && snapshot.affinity_match.is_empty()
            && snapshot.names.is_empty();
        if !empty {
            let mut stale = Stale::default();
            for (&id, b) in &snapshot.backends {
                if w.backend_ids.claim(id) {
                    stale.backends.insert(id);
                    stale.backend_by_addr.insert((b.ip(), b.port()), id);
                }
            }
            for (&id, t) in &snapshot.tables {
                if !w.table_ids.claim(id) {
                    stale.foreign_tables.push(id);
                    continue;
                }
                stale.tables.insert(id);
                if t.maglev_size > 0 && !w.maglev.claim(t.maglev_offset, t.maglev_size) {
                    stale.untrusted_ranges.insert(id);
                }
            }
            for (k, v) in &snapshot.services {
                stale.frontends.insert(*k);
                if v.flags & SVC_F_ADDR_MARKER == 0 && w.service_ids.claim(v.service_id) {
                    stale.service_ids.insert(v.service_id);
                }
            }
            stale.affinity_match = snapshot.affinity_match.clone();
            stale.source_ranges = snapshot.source_ranges.clone();
            stale.snapshot = snapshot;
            w.stale = Some(stale);
        }
        Ok(w)
    }

    /// The UDP endpoints service ports stopped using since the last call, for the conntrack
    /// worker to flush their flows.
    pub fn take_stale_udp(&mut self) -> Vec<UdpTarget> {
        std::mem::take(&mut self.stale_udp)
    }

    /// Every endpoint UDP service ports use now (serving ones included): after a restart, UDP
    /// flows to any other were left by endpoints that went while no agent ran.
    pub fn udp_targets(&self) -> Vec<UdpTarget> {
        let udp = self.ports.iter().filter(|(k, _)| k.protocol == Protocol::Udp);
        udp.flat_map(|(_, p)| {
            p.backends.iter().map(|&(addr, port)| UdpTarget {
                service_id: p.service_id,
                addr,
                port,
            })
        })
        .collect()
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn counts(&self) -> WriteCounts {
        self.store.counts()
    }

    /// Entries this writer holds in each map it owns (for metrics).
    pub fn fill(&self) -> Vec<(&'static str, u64)> {
        vec![
            (MAP_SERVICES, (self.frontend_owner.len() + self.markers.len()) as u64),
            (MAP_TABLES, self.ports.values().map(|p| p.tables.len() as u64).sum()),
            (MAP_BACKENDS, self.backends.len() as u64),
            (MAP_MAGLEV, self.maglev.used()),
            (
                MAP_AFFINITY_MATCH,
                self.ports.values().map(|p| p.affinity_members.len() as u64).sum(),
            ),
            (MAP_NAMES, self.ports.len() as u64),
        ]
    }

    /// Service ports programmed.
    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    /// The service id of a service port, if programmed.
    pub fn service_id(&self, key: &PortKey) -> Option<u32> {
        self.ports.get(key).map(|p| p.service_id)
    }

    /// Every service port programmed, with its service id.
    pub fn service_ids(&self) -> impl Iterator<Item = (&PortKey, u32)> {
        self.ports.iter().map(|(k, p)| (k, p.service_id))
    }

    /// Programs everything a Service object plans (all its ports and families), replacing what
    /// was programmed for it before. An empty `plans` removes the service.
    pub fn apply_object(&mut self, obj: &ObjKey, plans: &[ServicePlan]) -> Result<ApplyReport> {
        let before = self.store.counts();
        self.maglev.flush();
        let mut report = ApplyReport::default();
        let new_keys: BTreeSet<PortKey> = plans.iter().map(|p| p.port_key()).collect();
        let old_keys = self.by_object.remove(obj).unwrap_or_default();
        let mut first_err = None;
        for plan in plans {
            if let Err(e) = self.apply_port(plan, &mut report) {
                first_err.get_or_insert(e.context(format!("programming {}", plan.port_key())));
            }
        }
        for key in old_keys.difference(&new_keys) {
            if let Err(e) = self.remove_port(key) {
                first_err.get_or_insert(e.context(format!("removing {key}")));
            }
        }
        let kept: BTreeSet<PortKey> =
            new_keys.into_iter().filter(|k| self.ports.contains_key(k)).collect();
        if !kept.is_empty() {
            self.by_object.insert(obj.clone(), kept);
        }
        let after = self.store.counts();
        report.writes = after.since(&before);
        match first_err {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Ends the initial full sync: removes every entry of the pinned maps that no service
    /// claimed (frontends first, then sets, then backends).
    pub fn finish_initial_sync(&mut self) -> Result<()> {
        let Some(stale) = self.stale.take() else { return Ok(()) };
        for e in self.backends.values_mut() {
            let combined = e.combined();
            if combined != e.value {
                self.store.set_backend(e.id, &combined)?;
                e.value = combined;
            }
        }
        for key in &stale.frontends {
            if !self.frontend_owner.contains_key(key) && !self.markers.contains_key(key) {
                self.store.delete_service(key)?;
            }
        }
        // A membership no port holds (of a port gone, or of a backend its port no longer has)
        // would let affinity keep sending a client to a backend its service dropped.
        for key in &stale.affinity_match {
            let held = self.ports.values().any(|p| {
                p.service_id == key.service_id && p.affinity_members.contains(&key.backend_id)
            });
            if !held {
                self.store.delete_affinity_match(key)?;
            }
        }
        for (id, net) in &stale.source_ranges {
            if !self.ports.values().any(|p| p.service_id == *id && p.source_ranges.contains(net)) {
                self.store.set_source_ranges(*id, &[*net], &[])?;
            }
        }
        for &id in &stale.tables {
            self.store.delete_table(id)?;
            self.table_ids.release(id);
            if let Some(t) = stale.snapshot.tables.get(&id)
                && t.maglev_size > 0
                && !stale.untrusted_ranges.contains(&id)
            {
                self.maglev.release(t.maglev_offset, t.maglev_size);
            }
        }
        for &id in &stale.foreign_tables {
            self.store.delete_table(id)?;
        }
        for &id in &stale.backends {
            self.store.set_backend(id, &BackendValue::default())?;
            self.backend_ids.release(id);
        }
        for &id in &stale.service_ids {
            self.service_ids.release(id);
        }
        for id in stale.snapshot.names.keys() {
            if !self.ports.values().any(|p| p.service_id == *id) {
                self.store.set_name(*id, None)?;
            }
        }
        Ok(())
    }

    fn apply_port(&mut self, plan: &ServicePlan, report: &mut ApplyReport) -> Result<()> {
        let key = plan.port_key();
        let proto = plan.protocol.number();
        let old = self.ports.remove(&key);

        let service_id = match &old {
            Some(o) => o.service_id,
            None => {
                let candidates: Vec<ServiceKey> =
                    plan.frontends.iter().map(|f| frontend_key(f, proto)).collect();
                self.adopt_service_id(candidates.iter())
                    .or_else(|| self.service_ids.alloc())
                    .ok_or_else(|| {
                        anyhow!(
                            "no service id left: raise --max-services (now {})",
                            self.cfg.max_services
                        )
                    })?
            }
        };

        if old.is_none() {
            let name = key.to_string();
            let known =
                self.stale.as_ref().and_then(|s| s.snapshot.names.get(&service_id)) == Some(&name);
            if !known {
                self.store.set_name(service_id, Some(&name))?;
            }
        }

        // Frontends this port can own (others' stay theirs).
        let mut frontends: Vec<(ServiceKey, &crate::model::plan::Frontend)> = Vec::new();
        for f in &plan.frontends {
            let sk = frontend_key(f, proto);
            match self.frontend_owner.get(&sk) {
                Some(&owner) if owner != service_id => {
                    let waiter =
                        ObjKey { namespace: key.namespace.clone(), name: key.name.clone() };
                    self.frontend_waiters.entry(sk).or_default().insert(waiter);
                    let owner = self
                        .ports
                        .iter()
                        .find(|(_, p)| p.service_id == owner)
                        .map(|(k, _)| k.to_string());
                    report.conflicts.push(format!(
                        "{:?} {}:{} ({:?}) of {key} is already {}'s; not programmed",
                        f.kind,
                        f.address,
                        f.port,
                        f.scope,
                        owner.unwrap_or_else(|| "another service".into())
                    ));
                }
                _ => frontends.push((sk, f)),
            }
        }

        // 1. Backends: everything any set uses, plus retained ones (open flows).
        let mut wanted: BTreeMap<BackendAddr, BackendValue> = BTreeMap::new();
        for b in ROLES.iter().flat_map(|&r| plan.backends(r)).chain(&plan.retained_backends) {
            wanted.entry((b.addr, b.port)).or_insert_with(|| backend_value(b));
        }
        let mut acquired = Vec::new();
        for (addr, value) in &wanted {
            match self.acquire_backend(*addr, service_id, *value) {
                Ok(()) => acquired.push(*addr),
                Err(e) => {
                    for a in acquired {
                        self.release_backend(a, service_id)?;
                    }
                    match old {
                        Some(o) => {
                            self.ports.insert(key, o);
                        }
                        None => self.service_ids.release(service_id),
                    }
                    return Err(e);
                }
            }
        }

        // 2. Backend sets: one per distinct backend list among the roles frontends use.
        let used_roles: BTreeSet<BackendSet> = frontends.iter().map(|(_, f)| f.backends).collect();
        let mut old_tables: Vec<TableState> =
            old.as_ref().map(|o| o.tables.clone()).unwrap_or_default();
        let old_role_table: HashMap<BackendSet, u32> =
            old.as_ref().map(|o| o.role_table.clone()).unwrap_or_default();
        let mut tables: Vec<TableState> = Vec::new();
        let mut role_table: HashMap<BackendSet, u32> = HashMap::new();
        for role in ROLES.iter().copied().filter(|r| used_roles.contains(r)) {
            let mut members: Vec<BackendAddr> =
                plan.backends(role).iter().map(|b| (b.addr, b.port)).collect();
            members.sort_by_key(|&(a, p)| maglev::identity(a, p));
            members.dedup();
            if let Some(t) = tables.iter().find(|t| t.members == members) {
                role_table.insert(role, t.id);
                continue;
            }
            // Reuse the old set with the same members, else the one that served this role.
            let candidate = old_tables
                .iter()
                .position(|t| t.members == members)
                .or_else(|| {
                    old_role_table
                        .get(&role)
                        .and_then(|id| old_tables.iter().position(|t| t.id == *id))
                })
                .map(|i| old_tables.swap_remove(i));
            let hint = frontends.iter().filter(|(_, f)| f.backends == role).find_map(|(k, _)| {
                self.stale.as_ref().and_then(|s| s.snapshot.services.get(k)).map(|v| v.table_id)
            });
            let table = self.build_table(members, candidate, hint)?;
            role_table.insert(role, table.id);
            tables.push(table);
        }

        // Source ranges the frontends will check: added before them, removed after.
        let source_ranges = plan.source_ranges.clone();
        let old_ranges = old.as_ref().map(|o| o.source_ranges.clone()).unwrap_or_default();
        let added: Vec<ipnet::IpNet> = source_ranges
            .iter()
            .copied()
            .filter(|n| !old_ranges.contains(n))
            .filter(|n| {
                !self.stale.as_mut().is_some_and(|s| s.source_ranges.remove(&(service_id, *n)))
            })
            .collect();
        let removed: Vec<ipnet::IpNet> =
            old_ranges.iter().copied().filter(|n| !source_ranges.contains(n)).collect();
        if !added.is_empty() {
            self.store.set_source_ranges(service_id, &[], &added)?;
        }

        // 3. Frontends.
        let mut new_frontends = BTreeMap::new();
        for (sk, f) in &frontends {
            let set = plan.backends(f.backends);
            let policy_local = match f.backends {
                BackendSet::Internal => plan.internal_traffic_policy == TrafficPolicy::Local,
                BackendSet::External => plan.external_traffic_policy == TrafficPolicy::Local,
                BackendSet::Cluster => false,
            };
            let mut flags = frontend_flags(f.kind);
            if plan.affinity_timeout_s.is_some() {
                flags |= SVC_F_AFFINITY;
            }
            if policy_local {
                flags |= SVC_F_LOCAL_ONLY;
            }
            if f.kind == FrontendKind::LoadBalancer
                && f.scope == Scope::External
                && !plan.source_ranges.is_empty()
            {
                flags |= SVC_F_SOURCE_RANGES;
            }
            if set.is_empty() && plan.has_any_endpoints {
                flags |= SVC_F_NO_ENDPOINT_DROP;
            }
            let value = ServiceValue {
                service_id,
                table_id: role_table[&f.backends],
                flags,
                affinity_timeout_s: plan.affinity_timeout_s.unwrap_or(0),
            };
            let unchanged = old.as_ref().and_then(|o| o.frontends.get(sk)) == Some(&value)
                || self.stale.as_ref().is_some_and(|s| s.snapshot.services.get(sk) == Some(&value));
            if !unchanged {
                self.store.set_service(sk, &value)?;
            }
            self.frontend_owner.insert(*sk, service_id);
            new_frontends.insert(*sk, value);
        }

        // Address markers (other ports of the address are not sent off the node) and affinity
        // memberships.
        let markers = marker_keys(frontends.iter().map(|(_, f)| *f));
        for key in &markers {
            self.acquire_marker(key)?;
        }
        let affinity_members: BTreeSet<u32> = if plan.affinity_timeout_s.is_some() {
            wanted.keys().map(|a| self.backends[a].id).collect()
        } else {
            BTreeSet::new()
        };
        let old_members = old.as_ref().map(|o| o.affinity_members.clone()).unwrap_or_default();
        for &backend_id in affinity_members.difference(&old_members) {
            let key = AffinityMatchKey { backend_id, service_id };
            let adopted = self.stale.as_mut().is_some_and(|s| s.affinity_match.remove(&key));
            if !adopted {
                self.store.set_affinity_match(&key)?;
            }
        }

        // 4. Out with the old: frontends, then ranges and sets, then backends.
        if !removed.is_empty() {
            self.store.set_source_ranges(service_id, &removed, &[])?;
        }
        if let Some(o) = &old {
            for sk in o.frontends.keys() {
                if !new_frontends.contains_key(sk) {
                    self.store.delete_service(sk)?;
                    self.free_frontend(sk);
                }
            }
            for &backend_id in o.affinity_members.difference(&affinity_members) {
                self.store.delete_affinity_match(&AffinityMatchKey { backend_id, service_id })?;
            }
            for key in &o.markers {
                self.release_marker(key)?;
            }
        }
        for t in old_tables {
            self.drop_table(t)?;
        }
        if let Some(o) = &old {
            for addr in o.backends.difference(&wanted.keys().copied().collect()) {
                self.release_backend(*addr, service_id)?;
                if plan.protocol == Protocol::Udp {
                    self.stale_udp.push(UdpTarget { service_id, addr: addr.0, port: addr.1 });
                }
            }
        }
        self.ports.insert(
            key,
            PortState {
                service_id,
                markers,
                affinity_members,
                source_ranges,
                tables,
                role_table,
                frontends: new_frontends,
                backends: wanted.keys().copied().collect(),
            },
        );
        Ok(())
    }

    /// A frontend no port owns any more: whoever waited for it gets another try.
    fn free_frontend(&mut self, sk: &ServiceKey) {
        self.frontend_owner.remove(sk);
        if let Some(waiters) = self.frontend_waiters.remove(sk) {
            self.unblocked.extend(waiters);
        }
    }

    /// The services to program again because a frontend they wanted was freed (see
    /// `frontend_waiters`).
    pub fn take_unblocked(&mut self) -> BTreeSet<ObjKey> {
        std::mem::take(&mut self.unblocked)
    }

    fn remove_port(&mut self, key: &PortKey) -> Result<()> {
        let Some(old) = self.ports.remove(key) else { return Ok(()) };
        for sk in old.frontends.keys() {
            self.store.delete_service(sk)?;
            self.free_frontend(sk);
        }
        for key in &old.markers {
            self.release_marker(key)?;
        }
        for &backend_id in &old.affinity_members {
            self.store.delete_affinity_match(&AffinityMatchKey {
                backend_id,
                service_id: old.service_id,
            })?;
        }
        for t in old.tables {
            self.drop_table(t)?;
        }
        for addr in &old.backends {
            self.release_backend(*addr, old.service_id)?;
            if key.protocol == Protocol::Udp {
                let service_id = old.service_id;
                self.stale_udp.push(UdpTarget { service_id, addr: addr.0, port: addr.1 });
            }
        }
        self.store.set_name(old.service_id, None)?;
        self.service_ids.release(old.service_id);
        Ok(())
    }

    /// Sets the addresses SNATed flows leave with (written only when they change).
    pub fn set_node_addresses(&mut self, v4: Option<IpAddr>, v6: Option<IpAddr>) -> Result<()> {
        let node = NodeConfig {
            addr4: v4.map(addr_from_ip).unwrap_or_default(),
            addr6: v6.map(addr_from_ip).unwrap_or_default(),
        };
        if node != self.node {
            self.store.set_node(&node)?;
            self.node = node;
        }
        Ok(())
    }

    /// The marker `key` holds: external ones answer pings if so configured.
    fn marker_value(&self, key: &ServiceKey) -> ServiceValue {
        let ping = key.scope == SCOPE_EXTERNAL && self.cfg.answer_service_pings;
        let flags = SVC_F_ADDR_MARKER | if ping { SVC_F_ANSWER_PING } else { 0 };
        ServiceValue { flags, ..Default::default() }
    }

    fn acquire_marker(&mut self, key: &ServiceKey) -> Result<()> {
        let count = self.markers.entry(*key).or_insert(0);
        *count += 1;
        if *count == 1 {
            let value = self.marker_value(key);
            let present =
                self.stale.as_ref().is_some_and(|s| s.snapshot.services.get(key) == Some(&value));
            if !present {
                self.store.set_service(key, &value)?;
            }
        }
        Ok(())
    }

    fn release_marker(&mut self, key: &ServiceKey) -> Result<()> {
        if let Some(count) = self.markers.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                self.markers.remove(key);
                self.store.delete_service(key)?;
            }
        }
        Ok(())
    }

    fn adopt_service_id<'a>(&mut self, keys: impl Iterator<Item = &'a ServiceKey>) -> Option<u32> {
        let stale = self.stale.as_mut()?;
        for k in keys {
            if let Some(v) = stale.snapshot.services.get(k)
                && stale.service_ids.remove(&v.service_id)
            {
                return Some(v.service_id);
            }
        }
        None
    }

    fn acquire_backend(&mut self, addr: BackendAddr, user: u32, value: BackendValue) -> Result<()> {
        let initial_sync = self.stale.is_some();
        if let Some(e) = self.backends.get_mut(&addr) {
            e.users.insert(user, value.flags);
            let combined = e.combined();
            // During the initial sync the flags settle as users are added one by one; the
            // final combination is written once, in finish_initial_sync.
            if combined != e.value && !initial_sync {
                self.store.set_backend(e.id, &combined)?;
                e.value = combined;
            }
            return Ok(());
        }
        let adopted = self.stale.as_mut().and_then(|s| {
            let id = s.backend_by_addr.remove(&addr)?;
            s.backends.remove(&id);
            Some((id, s.snapshot.backends.get(&id).copied()))
        });
        let (id, current) = match adopted {
            Some(found) => found,
            None => {
                let id = self.backend_ids.alloc().ok_or_else(|| {
                    anyhow!(
                        "no backend id left: raise --max-backends (now {})",
                        self.store.capacity_backends()
                    )
                })?;
                (id, None)
            }
        };
        let written = match current {
            // Adopted: the map already holds this backend; flags are settled at the end.
            Some(cur) => cur,
            None => {
                self.store.set_backend(id, &value)?;
                value
            }
        };
        self.backends
            .insert(addr, BackendEntry { id, value: written, users: [(user, value.flags)].into() });
        Ok(())
    }

    fn release_backend(&mut self, addr: BackendAddr, user: u32) -> Result<()> {
        let Some(e) = self.backends.get_mut(&addr) else { return Ok(()) };
        e.users.remove(&user);
        if e.users.is_empty() {
            let id = e.id;
            self.backends.remove(&addr);
            self.store.set_backend(id, &BackendValue::default())?;
            self.backend_ids.release(id);
        } else {
            let combined = e.combined();
            if combined != e.value {
                self.store.set_backend(e.id, &combined)?;
                e.value = combined;
            }
        }
        Ok(())
    }

    fn drop_table(&mut self, t: TableState) -> Result<()> {
        self.store.delete_table(t.id)?;
        self.table_ids.release(t.id);
        if t.value.maglev_size > 0 {
            self.maglev.release(t.value.maglev_offset, t.value.maglev_size);
        }
        Ok(())
    }

    /// Builds (or updates in place) the set for `members`, which are sorted by identity.
    fn build_table(
        &mut self,
        members: Vec<BackendAddr>,
        candidate: Option<TableState>,
        hint: Option<u32>,
    ) -> Result<TableState> {
        let n = members.len();
        let m = maglev::table_size(n, self.cfg.maglev_max_size);
        let ids: Vec<u32> = members.iter().map(|a| self.backends[a].id).collect();
        let slots: Vec<u32> = if n == 0 {
            Vec::new()
        } else {
            let identities: Vec<[u8; 18]> =
                members.iter().map(|&(a, p)| maglev::identity(a, p)).collect();
            maglev::build(&identities, m).into_iter().map(|i| ids[i as usize]).collect()
        };
        let count = n as u32;

        // Same size: rewrite changed slots in place (the map itself holds the old ones).
        if let Some(c) = &candidate
            && c.value.maglev_size == m
        {
            let current =
                if m == 0 { Vec::new() } else { self.store.maglev_read(c.value.maglev_offset, m) };
            let changed: Vec<(u32, u32)> = slots
                .iter()
                .zip(&current)
                .enumerate()
                .filter(|(_, (new, old))| new != old)
                .map(|(i, (new, _))| (c.value.maglev_offset + i as u32, *new))
                .collect();
            if !changed.is_empty() {
                self.store.set_maglev_slots(&changed)?;
            }
            let value = TableValue { backend_count: count, ..c.value };
            if value != c.value {
                self.store.set_table(c.id, &value)?;
            }
            return Ok(TableState { id: c.id, members, value });
        }

        // Adopt an identical table left by the previous agent.
        if candidate.is_none()
            && let Some(id) = hint
            && let Some(stale) = self.stale.as_mut()
            && stale.tables.contains(&id)
            && !stale.untrusted_ranges.contains(&id)
            && let Some(t) = stale.snapshot.tables.get(&id).copied()
            && t.maglev_size == m
            && stale.snapshot.table_slots(id) == slots.as_slice()
        {
            stale.tables.remove(&id);
            let value = TableValue {
                maglev_offset: t.maglev_offset,
                maglev_size: m,
                backend_count: count,
                _pad: 0,
            };
            if value != t {
                self.store.set_table(id, &value)?;
            }
            return Ok(TableState { id, members, value });
        }

        // New range (or none for an empty set), written whole, then the set flips to it.
        let offset = if m == 0 {
            0
        } else {
            let off = self.maglev.alloc(m).ok_or_else(|| {
                anyhow!(
                    "LB_MAGLEV is full ({} of {} slots used): raise --maglev-slots or lower --maglev-max-size",
                    self.maglev.used(),
                    self.maglev.capacity()
                )
            })?;
            self.store.set_maglev_range(off, &slots)?;
            off
        };
        let id = match &candidate {
            Some(c) => c.id,
            None => self
                .table_ids
                .alloc()
                .ok_or_else(|| anyhow!("no backend-set id left: raise --max-services"))?,
        };
        let value =
            TableValue { maglev_offset: offset, maglev_size: m, backend_count: count, _pad: 0 };
        self.store.set_table(id, &value)?;
        if let Some(c) = candidate
            && c.value.maglev_size > 0
        {
            self.maglev.release(c.value.maglev_offset, c.value.maglev_size);
        }
        Ok(TableState { id, members, value })
    }
}

/// What the maps mean, independent of ids: every frontend with its flags and the backends of its
/// Maglev table slot by slot, plus every live backend. Two writers that programmed the same plans
/// in any order, with any ids, have equal canonical dumps.
pub fn canonical(s: &Snapshot) -> Result<CanonicalDump> {
    let mut frontends = BTreeMap::new();
    let mut referenced_tables = BTreeSet::new();
    let mut markers = BTreeSet::new();
    for (k, v) in &s.services {
        if v.flags & SVC_F_ADDR_MARKER != 0 {
            markers.insert((k.ip(), k.scope, v.flags));
            continue;
        }
        let t = s
            .tables
            .get(&v.table_id)
            .ok_or_else(|| anyhow!("frontend {k:?} points at missing set {}", v.table_id))?;
        referenced_tables.insert(v.table_id);
        let mut slots = Vec::with_capacity(t.maglev_size as usize);
        for &b in s.table_slots(v.table_id) {
            let be = s
                .backends
                .get(&b)
                .ok_or_else(|| anyhow!("set {} names missing backend {b}", v.table_id))?;
            slots.push((be.ip(), be.port()));
        }
        if slots.len() != t.maglev_size as usize {
            bail!("set {} lies outside LB_MAGLEV", v.table_id);
        }
        frontends.insert(*k, (v.flags, v.affinity_timeout_s, t.backend_count, slots));
    }
    let unreferenced_tables = s.tables.keys().filter(|id| !referenced_tables.contains(id)).count();
    let backends = s.backends.values().map(|b| (b.ip(), b.port(), b.flags)).collect();
    let affinity = s
        .affinity_match
        .iter()
        .filter_map(|k| {
            let b = s.backends.get(&k.backend_id)?;
            let svc = s
                .services
                .values()
                .find(|v| v.service_id == k.service_id && v.flags & SVC_F_ADDR_MARKER == 0)?;
            let first = s.services.iter().find(|(_, v)| *v == svc).map(|(k, _)| *k)?;
            Some((first, b.ip(), b.port()))
        })
        .collect();
    Ok(CanonicalDump {
        frontends,
        backends,
        unreferenced_tables,
        markers,
        affinity,
        affinity_entries: s.affinity_match.len(),
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonicalDump {
    /// frontend -> (flags, affinity timeout, backend count, backend of each slot)
    pub frontends: BTreeMap<ServiceKey, (u32, u32, u32, Vec<BackendAddr>)>,
    pub backends: BTreeSet<(IpAddr, u16, u8)>,
    pub unreferenced_tables: usize,
    /// Address markers: (address, scope, flags).
    pub markers: BTreeSet<(IpAddr, u8, u32)>,
    /// Affinity memberships as (a frontend of the service, backend address, port).
    pub affinity: BTreeSet<(ServiceKey, IpAddr, u16)>,
    pub affinity_entries: usize,
}
