//! The agent's pipeline in one place: events from a source -> state -> plans of the affected
//! services (pure model) -> writer (maps). Used by the agent binary, the tests and benchmarks.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use tracing::{debug, info, warn};

use crate::{
    config::ModelConfig,
    dataplane::{
        store::{MapStore, WriteCounts},
        writer::Writer,
    },
    latency::TriggerTimes,
    model::{self, ServiceOutcome},
    serve::health_check::Health,
    sources::{Event, Object, ObjectRef},
    state::{Affected, ClusterState, ObjKey},
};

/// What one batch of events did.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    pub services_planned: usize,
    pub writes: WriteCounts,
    pub errors: Vec<String>,
    pub elapsed: Duration,
    /// Network programming latencies (seconds) of the EndpointSlice changes this sync wrote
    /// (`latency.rs`).
    pub programming_seconds: Vec<f64>,
    /// Service and EndpointSlice changes this sync took in (a re-list counts each object it
    /// delivered, as kube-proxy's informers hand each one over again).
    pub service_changes: u64,
    pub endpoint_changes: u64,
}

pub struct Syncer<S: MapStore> {
    pub state: ClusterState,
    pub cfg: ModelConfig,
    pub writer: Writer<S>,
    /// Last outcome per service that could not be programmed (to log changes only).
    problems: std::collections::BTreeMap<ObjKey, String>,
    /// healthCheckNodePorts of the services that have one: port -> health.
    health: std::collections::BTreeMap<ObjKey, Vec<(u16, Health)>>,
    /// Services whose maps could not be written (a map full, say), since when: retried by
    /// [`Self::retry_failed`]; the agent is unhealthy while one waits too long.
    failed: std::collections::BTreeMap<ObjKey, (Instant, String)>,
    /// Since when this node's addresses could not be written.
    node_failed: Option<Instant>,
    /// EndpointSlice changes' trigger times, for the network programming latency.
    triggers: TriggerTimes,
    /// Service ports (per family) with a Local traffic policy and no local endpoint here,
    /// though endpoints exist elsewhere: (internal, external), per service.
    no_local: std::collections::BTreeMap<ObjKey, (usize, usize)>,
}

impl<S: MapStore> Syncer<S> {
    pub fn new(cfg: ModelConfig, writer: Writer<S>) -> Self {
        Self {
            state: ClusterState::default(),
            cfg,
            writer,
            problems: Default::default(),
            health: Default::default(),
            failed: Default::default(),
            node_failed: None,
            triggers: TriggerTimes::new(jiff::Timestamp::now()),
            no_local: Default::default(),
        }
    }

    /// Service ports whose traffic this node drops for want of a local endpoint, by traffic
    /// policy (internal, external): kube-proxy's
    /// `sync_proxy_rules_no_local_endpoints_total`, for alerts.
    pub fn no_local_endpoints(&self) -> (usize, usize) {
        self.no_local.values().fold((0, 0), |(i, e), (a, b)| (i + a, e + b))
    }

    /// Since when a change has been waiting to reach the maps (none: they match the state).
    pub fn pending_since(&self) -> Option<Instant> {
        self.failed.values().map(|(t, _)| *t).chain(self.node_failed).min()
    }

    /// How many services could not be written.
    pub fn failed_count(&self) -> usize {
        self.failed.len()
    }

    /// Records the attached devices' addresses (NodePorts answer on them); when they changed,
    /// every service is reprogrammed and the report returned.
    pub fn set_device_addresses(&mut self, addresses: Vec<IpAddr>) -> Option<SyncReport> {
        let start = Instant::now();
        let affected = self.state.set_device_addresses(addresses);
        if affected.is_empty() {
            return None;
        }
        let mut report = self.reprogram(&affected);
        report.elapsed = start.elapsed();
        Some(report)
    }

    /// Tries again what could not be written. The report only when some of it got written
    /// (a retry that changes nothing is not a sync to log or count).
    pub fn retry_failed(&mut self) -> Option<SyncReport> {
        let waiting = self.failed.len() + usize::from(self.node_failed.is_some());
        if waiting == 0 {
            return None;
        }
        let start = Instant::now();
        let affected = Affected {
            services: self.failed.keys().cloned().collect(),
            all: self.node_failed.is_some(),
        };
        let mut report = self.reprogram(&affected);
        report.elapsed = start.elapsed();
        let still = self.failed.len() + usize::from(self.node_failed.is_some());
        (still < waiting).then_some(report)
    }

    /// Applies events and reprograms every service they affect.
    pub fn apply(&mut self, events: impl IntoIterator<Item = Event>) -> SyncReport {
        let start = Instant::now();
        let mut affected = Affected::default();
        let (mut service_changes, mut endpoint_changes) = (0, 0);
        for e in events {
            match &e {
                Event::Apply(Object::EndpointSlice(s)) => {
                    self.triggers.note(s);
                    endpoint_changes += 1;
                }
                Event::Delete(ObjectRef::EndpointSlice(k)) => {
                    self.triggers.forget(k);
                    endpoint_changes += 1;
                }
                Event::Apply(Object::Service(_)) | Event::Delete(ObjectRef::Service(_)) => {
                    service_changes += 1;
                }
                _ => {}
            }
            affected.merge(self.state.apply_event(e));
        }
        let mut report = self.reprogram(&affected);
        report.elapsed = start.elapsed();
        (report.service_changes, report.endpoint_changes) = (service_changes, endpoint_changes);
        report
    }

    /// Replaces every object of one kind (an API server re-list) and reprograms what changed.
    pub fn apply_relist(
        &mut self,
        kind: crate::sources::kube::Kind,
        objects: Vec<crate::sources::Object>,
    ) -> SyncReport {
        let start = Instant::now();
        if kind == crate::sources::kube::Kind::EndpointSlice {
            // Slices deleted while the watch was down are forgotten (no trigger time counts
            // from a re-list: its slices did not change now).
            self.triggers.keep_only(objects.iter().filter_map(|o| match o {
                Object::EndpointSlice(s) => Some(crate::state::key_of(&s.metadata)),
                _ => None,
            }));
        }
        let delivered = objects.len() as u64;
        let affected = self.state.replace_kind(kind, objects);
        let mut report = self.reprogram(&affected);
        report.elapsed = start.elapsed();
        match kind {
            crate::sources::kube::Kind::Service => report.service_changes = delivered,
            crate::sources::kube::Kind::EndpointSlice => report.endpoint_changes = delivered,
            crate::sources::kube::Kind::Node => {}
        }
        report
    }

    /// Reprograms the given services (all of them when a Node changed).
    pub fn reprogram(&mut self, affected: &Affected) -> SyncReport {
        let before = self.writer.counts();
        let mut report = SyncReport::default();
        let node = model::node_view(&self.state, &self.cfg);
        if affected.all {
            match self.writer.set_node_addresses(node.snat_address(false), node.snat_address(true))
            {
                Ok(()) => self.node_failed = None,
                Err(e) => {
                    if self.node_failed.is_none() {
                        warn!("writing this node's addresses failed (retried every 2 s): {e:#}");
                    }
                    report.errors.push(format!("writing this node's addresses: {e:#}"));
                    self.node_failed.get_or_insert_with(Instant::now);
                }
            }
        }
        let keys: Vec<ObjKey> = if affected.all {
            // Everything known now, plus whatever the writer still holds for vanished ones.
            let mut k: std::collections::BTreeSet<ObjKey> =
                self.state.services().map(|(k, _)| k.clone()).collect();
            k.extend(affected.services.iter().cloned());
            k.into_iter().collect()
        } else {
            affected.services.iter().cloned().collect()
        };
        // A frontend freed while another service wanted it (a renamed service written before
        // its old name's removal, a ClusterIP reused at once, a holder deleted in a later
        // batch) goes to the services that wanted it: they are written again. Those free none
        // in turn, so a second round ends it; the bound is a guard. Conflicts are reported as
        // they stand at the end.
        let mut keys = keys;
        let mut conflicts = std::collections::BTreeMap::new();
        for _round in 0..4 {
            for key in keys {
                let outcome = model::plan_service(&self.state, &key, &node, &self.cfg);
                let lost = self.program(key.clone(), &outcome, &mut report);
                conflicts.insert(key, lost);
            }
            keys = self.writer.take_unblocked().into_iter().collect();
            if keys.is_empty() {
                break;
            }
        }
        report.errors.extend(conflicts.into_values().flatten());
        let failed = &self.failed;
        report.programming_seconds =
            self.triggers.programmed(jiff::Timestamp::now(), |s| failed.contains_key(s));
        let after = self.writer.counts();
        report.writes = after.since(&before);
        debug!(planned = report.services_planned, writes = ?report.writes, "reprogrammed");
        report
    }

    /// Writes one service's outcome; returns the frontends it could not take (another
    /// service's), which the caller reports once the batch is done.
    fn program(
        &mut self,
        key: ObjKey,
        outcome: &ServiceOutcome,
        report: &mut SyncReport,
    ) -> Vec<String> {
        let problem = match outcome {
            ServiceOutcome::Invalid(e) => {
                Some(format!("service {key} is invalid and not programmed: {e}"))
            }
            ServiceOutcome::Planned { warnings, .. } if !warnings.is_empty() => {
                Some(format!("service {key}: {}", warnings.join("; ")))
            }
            _ => None,
        };
        self.note_problem(&key, problem, report);
        let health: Vec<(u16, Health)> = outcome
            .plans()
            .iter()
            .filter_map(|p| {
                let port = p.health_check_node_port?;
                let local = p.external_backends.iter().filter(|b| b.local).count();
                Some((
                    port,
                    Health {
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        local_endpoints: local,
                    },
                ))
            })
            .collect();
        if health.is_empty() {
            self.health.remove(&key);
        } else {
            self.health.insert(key.clone(), health);
        }
        let no_local = no_local_endpoints(outcome.plans());
        if no_local == (0, 0) {
            self.no_local.remove(&key);
        } else {
            self.no_local.insert(key.clone(), no_local);
        }
        report.services_planned += 1;
        match self.writer.apply_object(&key, outcome.plans()) {
            Ok(r) => {
                if self.failed.remove(&key).is_some() {
                    info!(service = %key, "maps written after failing before");
                }
                return r.conflicts;
            }
            Err(e) => {
                let e = format!("{e:#}");
                // Logged when it starts or changes, not at every retry.
                let since = match self.failed.get(&key) {
                    Some((since, last)) if *last == e => *since,
                    Some((since, _)) => {
                        warn!(service = %key, "programming failed (retried every 2 s): {e}");
                        *since
                    }
                    None => {
                        warn!(service = %key, "programming failed (retried every 2 s): {e}");
                        Instant::now()
                    }
                };
                self.failed.insert(key, (since, e.clone()));
                report.errors.push(e);
            }
        }
        Vec::new()
    }

    fn note_problem(&mut self, key: &ObjKey, problem: Option<String>, report: &mut SyncReport) {
        match problem {
            Some(p) => {
                if self.problems.get(key) != Some(&p) {
                    warn!("{p}");
                    self.problems.insert(key.clone(), p.clone());
                }
                report.errors.push(p);
            }
            None => {
                self.problems.remove(key);
            }
        }
    }

    /// Every healthCheckNodePort and what it should report (a port claimed twice: first
    /// service in name order; IPv4 and IPv6 plans of one service share it).
    pub fn health_ports(&self) -> std::collections::BTreeMap<u16, Health> {
        let mut out = std::collections::BTreeMap::new();
        for list in self.health.values() {
            for (port, h) in list {
                out.entry(*port).or_insert_with(|| h.clone());
            }
        }
        out
    }

    /// Ends the first full sync: entries of a previous agent that nothing claimed go away.
    pub fn finish_initial_sync(&mut self) -> Result<()> {
        self.writer.finish_initial_sync()
    }
}

/// Of `plans`, how many have internalTrafficPolicy Local and how many have
/// externalTrafficPolicy Local (with a frontend for outside traffic) and no local endpoint
/// for that traffic, while endpoints exist elsewhere.
fn no_local_endpoints(plans: &[model::plan::ServicePlan]) -> (usize, usize) {
    use model::plan::{Scope, TrafficPolicy};
    let (mut internal, mut external) = (0, 0);
    for p in plans.iter().filter(|p| p.has_any_endpoints) {
        if p.internal_traffic_policy == TrafficPolicy::Local && p.internal_backends.is_empty() {
            internal += 1;
        }
        let outside = p.frontends.iter().any(|f| f.scope == Scope::External);
        if outside
            && p.external_traffic_policy == TrafficPolicy::Local
            && p.external_backends.is_empty()
        {
            external += 1;
        }
    }
    (internal, external)
}
