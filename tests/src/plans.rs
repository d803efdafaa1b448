//! Service plans built by hand or at random, for writer and datapath tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_agent::model::plan::*;

/// A small deterministic PRNG (xorshift64*), so a failing sequence can be replayed by seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// The kernel tests' mutation of a frame: cut short one time in four (its Ethernet header
    /// kept), else one to three bytes overwritten from the ethertype on, within `reach` bytes.
    pub fn mutate(&mut self, p: &mut Vec<u8>, reach: u64) {
        if self.chance(25) {
            p.truncate(14 + self.below(p.len() as u64 - 14) as usize);
        } else {
            for _ in 0..1 + self.below(3) {
                let at = 12 + self.below((p.len() as u64 - 12).min(reach)) as usize;
                p[at] = self.next_u64() as u8;
            }
        }
    }
}

/// A random test's seed and run count: `LB_MUTATION_SEED` and `LB_MUTATIONS` pick others than
/// the test's own (printed, so that a failure's output says how to run it again).
pub fn mutation_seed_and_runs(seed: u64, runs: u64) -> (u64, u64) {
    let var = |name: &str| std::env::var(name).ok().and_then(|s| s.parse().ok());
    let (seed, runs) =
        (var("LB_MUTATION_SEED").unwrap_or(seed), var("LB_MUTATIONS").unwrap_or(runs));
    eprintln!("LB_MUTATION_SEED={seed} LB_MUTATIONS={runs}");
    (seed, runs)
}

pub fn backend(addr: IpAddr, port: u16, local: bool) -> Backend {
    Backend { addr, port, local, terminating: false }
}

/// A ClusterIP + NodePort service port with the same backends for every set.
pub fn simple_plan(
    name: &str,
    cluster_ip: IpAddr,
    node_ip: IpAddr,
    node_port: u16,
    backends: Vec<Backend>,
) -> ServicePlan {
    let f =
        |kind, address, port, scope, backends| Frontend { kind, address, port, scope, backends };
    ServicePlan {
        namespace: "default".into(),
        name: name.into(),
        port_name: String::new(),
        protocol: Protocol::Tcp,
        family: Family::of(&cluster_ip),
        frontends: vec![
            f(FrontendKind::ClusterIP, cluster_ip, 80, Scope::Internal, BackendSet::Internal),
            f(FrontendKind::NodePort, node_ip, node_port, Scope::Internal, BackendSet::Cluster),
            f(FrontendKind::NodePort, node_ip, node_port, Scope::External, BackendSet::External),
        ],
        internal_backends: backends.clone(),
        external_backends: backends.clone(),
        cluster_backends: backends,
        retained_backends: vec![],
        internal_traffic_policy: TrafficPolicy::Cluster,
        external_traffic_policy: TrafficPolicy::Cluster,
        has_any_endpoints: true,
        affinity_timeout_s: None,
        source_ranges: vec![],
        health_check_node_port: None,
    }
}

/// A ClusterIP service: one internal frontend, `backends` for every traffic kind, policies
/// Cluster, sessionAffinity ClientIP when `affinity` (seconds) is given.
pub fn cluster_ip_plan(
    name: &str,
    vip: &str,
    port: u16,
    protocol: Protocol,
    backends: Vec<Backend>,
    affinity: Option<u32>,
) -> ServicePlan {
    let vip: IpAddr = vip.parse().unwrap();
    // An LB plan's backends and policies, with a ClusterIP's one frontend instead.
    let mut plan = lb_plan(name, vip, port, protocol, backends);
    plan.frontends = vec![Frontend {
        kind: FrontendKind::ClusterIP,
        address: vip,
        port,
        scope: Scope::Internal,
        backends: BackendSet::Internal,
    }];
    plan.affinity_timeout_s = affinity;
    plan
}

/// The random world the writer property test mutates: services with endpoints and policies,
/// turned into plans the way the model would.
#[derive(Clone, Debug)]
pub struct World {
    pub services: Vec<Option<WorldService>>,
}

#[derive(Clone, Debug)]
pub struct WorldService {
    pub v6: bool,
    /// (endpoint index, local, ready)
    pub endpoints: Vec<(u32, bool, bool)>,
    pub etp_local: bool,
    pub itp_local: bool,
    pub affinity: Option<u32>,
    pub node_port: Option<u16>,
    pub external_ip: bool,
    pub udp_port: bool,
}

impl World {
    pub fn new(services: usize) -> Self {
        Self { services: vec![None; services] }
    }

    fn endpoint_addr(v6: bool, i: u32) -> IpAddr {
        // A small pool shared between services, so backends are shared too.
        if v6 {
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1 + (i % 40) as u16))
        } else {
            IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1 + (i % 40) as u8))
        }
    }

    /// One random change; returns the index of the service it touched.
    pub fn mutate(&mut self, rng: &mut Rng) -> usize {
        let i = rng.below(self.services.len() as u64) as usize;
        let svc = &mut self.services[i];
        match svc {
            None => {
                let n = rng.below(6) as usize;
                *svc = Some(WorldService {
                    v6: rng.chance(30),
                    endpoints: (0..n)
                        .map(|_| (rng.below(60) as u32, rng.chance(40), rng.chance(85)))
                        .collect(),
                    etp_local: rng.chance(30),
                    itp_local: rng.chance(15),
                    affinity: rng.chance(20).then_some(10800),
                    node_port: rng.chance(50).then(|| 30000 + i as u16),
                    external_ip: rng.chance(25),
                    udp_port: rng.chance(30),
                });
            }
            Some(s) => match rng.below(10) {
                0 => *svc = None,
                1..=3 => s.endpoints.push((rng.below(60) as u32, rng.chance(40), rng.chance(85))),
                4..=5 if !s.endpoints.is_empty() => {
                    let k = rng.below(s.endpoints.len() as u64) as usize;
                    s.endpoints.remove(k);
                }
                6 if !s.endpoints.is_empty() => {
                    let k = rng.below(s.endpoints.len() as u64) as usize;
                    s.endpoints[k].2 = !s.endpoints[k].2;
                }
                7 => s.etp_local = !s.etp_local,
                8 => s.itp_local = !s.itp_local,
                _ => {
                    s.node_port = if s.node_port.is_some() { None } else { Some(30000 + i as u16) }
                }
            },
        }
        i
    }

    /// The plans of service `i` (empty when it does not exist).
    pub fn plans(&self, i: usize) -> Vec<ServicePlan> {
        let Some(s) = &self.services[i] else { return vec![] };
        let cluster_ip = if s.v6 {
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 1 + i as u16))
        } else {
            IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1 + i as u8))
        };
        let node_ip: IpAddr =
            if s.v6 { "fd00:1::11".parse().unwrap() } else { "192.168.1.11".parse().unwrap() };
        let mut eps: Vec<(Backend, bool)> = s
            .endpoints
            .iter()
            .map(|&(e, local, ready)| {
                (
                    Backend {
                        addr: Self::endpoint_addr(s.v6, e),
                        port: 8080,
                        local,
                        terminating: !ready,
                    },
                    ready,
                )
            })
            .collect();
        eps.sort_by_key(|(b, _)| (b.addr, b.port));
        eps.dedup_by_key(|(b, _)| (b.addr, b.port));
        let ready: Vec<Backend> = eps.iter().filter(|(_, r)| *r).map(|(b, _)| b.clone()).collect();
        let terminating: Vec<Backend> =
            eps.iter().filter(|(_, r)| !*r).map(|(b, _)| b.clone()).collect();
        let cluster = if ready.is_empty() { terminating.clone() } else { ready.clone() };
        let local: Vec<Backend> = {
            let l: Vec<Backend> = ready.iter().filter(|b| b.local).cloned().collect();
            if l.is_empty() { terminating.iter().filter(|b| b.local).cloned().collect() } else { l }
        };
        let internal = if s.itp_local { local.clone() } else { cluster.clone() };
        let external = if s.etp_local { local.clone() } else { cluster.clone() };
        let retained: Vec<Backend> = eps
            .iter()
            .map(|(b, _)| b.clone())
            .filter(|b| !internal.contains(b) && !external.contains(b) && !cluster.contains(b))
            .collect();
        let mut ports = vec![(String::from("http"), Protocol::Tcp, 80u16)];
        if s.udp_port {
            ports.push(("dns".into(), Protocol::Udp, 53));
        }
        ports
            .into_iter()
            .map(|(port_name, protocol, port)| {
                let f = |kind, address, port, scope, backends| Frontend {
                    kind,
                    address,
                    port,
                    scope,
                    backends,
                };
                let mut frontends = vec![f(
                    FrontendKind::ClusterIP,
                    cluster_ip,
                    port,
                    Scope::Internal,
                    BackendSet::Internal,
                )];
                if let Some(np) = s.node_port {
                    frontends.push(f(
                        FrontendKind::NodePort,
                        node_ip,
                        np,
                        Scope::Internal,
                        BackendSet::Cluster,
                    ));
                    frontends.push(f(
                        FrontendKind::NodePort,
                        node_ip,
                        np,
                        Scope::External,
                        BackendSet::External,
                    ));
                }
                if s.external_ip {
                    let ext: IpAddr = if s.v6 {
                        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1 + i as u16))
                    } else {
                        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1 + i as u8))
                    };
                    frontends.push(f(
                        FrontendKind::ExternalIP,
                        ext,
                        port,
                        Scope::Internal,
                        BackendSet::Cluster,
                    ));
                    frontends.push(f(
                        FrontendKind::ExternalIP,
                        ext,
                        port,
                        Scope::External,
                        BackendSet::External,
                    ));
                }
                ServicePlan {
                    namespace: "default".into(),
                    name: format!("svc-{i}"),
                    port_name,
                    protocol,
                    family: Family::of(&cluster_ip),
                    frontends,
                    internal_backends: internal.clone(),
                    external_backends: external.clone(),
                    cluster_backends: cluster.clone(),
                    retained_backends: retained.clone(),
                    internal_traffic_policy: if s.itp_local {
                        TrafficPolicy::Local
                    } else {
                        TrafficPolicy::Cluster
                    },
                    external_traffic_policy: if s.etp_local {
                        TrafficPolicy::Local
                    } else {
                        TrafficPolicy::Cluster
                    },
                    has_any_endpoints: !eps.is_empty(),
                    affinity_timeout_s: s.affinity,
                    source_ranges: vec![],
                    health_check_node_port: None,
                }
            })
            .collect()
    }
}

/// A LoadBalancer-IP service port: the VIP from outside (external scope) and from the node
/// (internal scope), both over `backends`.
pub fn lb_plan(
    name: &str,
    vip: IpAddr,
    port: u16,
    protocol: Protocol,
    backends: Vec<Backend>,
) -> ServicePlan {
    let f = |scope, backends| Frontend {
        kind: FrontendKind::LoadBalancer,
        address: vip,
        port,
        scope,
        backends,
    };
    ServicePlan {
        namespace: "default".into(),
        name: name.into(),
        port_name: String::new(),
        protocol,
        family: Family::of(&vip),
        frontends: vec![
            f(Scope::Internal, BackendSet::Cluster),
            f(Scope::External, BackendSet::External),
        ],
        internal_backends: backends.clone(),
        external_backends: backends.clone(),
        cluster_backends: backends.clone(),
        retained_backends: vec![],
        internal_traffic_policy: TrafficPolicy::Cluster,
        external_traffic_policy: TrafficPolicy::Cluster,
        has_any_endpoints: !backends.is_empty(),
        affinity_timeout_s: None,
        source_ranges: vec![],
        health_check_node_port: None,
    }
}
