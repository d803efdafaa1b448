//! Bad manifests never break the agent. A valid file of services of every kind, one document at
//! a time mutated at random (a byte changed, a line dropped, doubled or swapped, the document cut
//! short, a value replaced by a hostile one), read by the real manifests source into the real
//! sync (state, model, writer on an in-memory store). Asserted each time: nothing panics; each
//! error names the file; every service the mutated document does not belong to keeps exactly
//! its plan; and once the file is whole again, the maps equal those of a fresh build.
//!
//! Beside it, random sequences of valid changes (renames, an address taken over by another
//! service at once, endpoints moving between slices) keep the maps equal to a fresh build's.
//!
//! `LB_MUTATION_SEED` and `LB_MUTATIONS` pick another seed and count (a failure prints both).

use std::{
    collections::BTreeMap,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

mod common;

use lb_agent::{
    config::ModelConfig,
    dataplane::{
        store::{MapStore, MemoryStore},
        writer::{CanonicalDump, canonical},
    },
    model::{ServiceOutcome, plan_all},
    sources::manifests::ManifestsDir,
    state::ObjKey,
    sync::Syncer,
};

const NODE: &str = "apiVersion: v1
kind: Node
metadata: {name: node-1, labels: {topology.kubernetes.io/zone: zone-a}}
status:
  addresses:
  - {type: InternalIP, address: 192.168.1.11}
  - {type: InternalIP, address: \"fd00:1::11\"}
";

/// (owning service, document). Addresses, names and node ports differ from each other in at
/// least two characters, so no single mutation turns one service's into another's.
const DOCS: &[(&str, &str)] = &[
    (
        "web",
        "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.1.10
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: 8080}
",
    ),
    (
        "web",
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.2]
  nodeName: node-1
  conditions: {ready: true, serving: true, terminating: false}
- addresses: [10.244.2.3]
  nodeName: node-2
  conditions: {ready: true}
- addresses: [10.244.2.4]
  nodeName: node-2
  conditions: {ready: false, serving: true, terminating: true}
",
    ),
    (
        "nodeport",
        "apiVersion: v1
kind: Service
metadata: {name: nodeport, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.2.20
  externalTrafficPolicy: Local
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: http, nodePort: 30100}
",
    ),
    (
        "nodeport",
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: nodeport-a, namespace: default, labels: {kubernetes.io/service-name: nodeport}}
addressType: IPv4
ports: [{name: http, port: 9090, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.5], nodeName: node-1, conditions: {ready: true}}
- {addresses: [10.244.2.6], nodeName: node-2, conditions: {ready: true}}
",
    ),
    (
        "balancer",
        "apiVersion: v1
kind: Service
metadata: {name: balancer, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.3.30
  externalTrafficPolicy: Local
  healthCheckNodePort: 31200
  loadBalancerSourceRanges: [10.0.0.0/8, 192.0.2.0/24]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}
  ports:
  - {name: https, port: 443, protocol: TCP, targetPort: 8443, nodePort: 32300}
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.20}]
",
    ),
    (
        "balancer",
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: balancer-a, namespace: default, labels: {kubernetes.io/service-name: balancer}}
addressType: IPv4
ports: [{name: https, port: 8443, protocol: TCP}]
endpoints:
- addresses: [10.244.1.7]
  nodeName: node-1
  zone: zone-a
  hints: {forZones: [{name: zone-a}]}
  conditions: {ready: true}
- addresses: [10.244.3.8]
  nodeName: node-3
  zone: zone-b
  hints: {forZones: [{name: zone-b}]}
  conditions: {ready: true}
",
    ),
    (
        "dns",
        "apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 10.96.4.40
  clusterIPs: [10.96.4.40, \"fd00:96::4:40\"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  externalIPs: [203.0.113.60]
  internalTrafficPolicy: Local
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 5353}
",
    ),
    (
        "dns",
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-v4, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5353, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.9], nodeName: node-1, conditions: {ready: true}}
",
    ),
    (
        "dns",
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-v6, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv6
ports: [{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5353, protocol: TCP}]
endpoints:
- {addresses: [\"fd00:244:1::9\"], nodeName: node-1, conditions: {ready: true}}
",
    ),
];

/// Values a hostile or careless writer might put anywhere.
const HOSTILE: &[&str] = &[
    "-1",
    "0",
    "65536",
    "4294967296",
    "99999999999999999999999",
    "1e309",
    "NaN",
    "\"\"",
    "null",
    "~",
    "[]",
    "{}",
    "[[[[[[[[]]]]]]]]",
    "\"::\"",
    "\"1.2.3.4.5\"",
    "\"10.96.999.1\"",
    "\"0.0.0.0/0\"",
    "\"fe80::1%eth0\"",
    "\"ℌ𝔢𝔩𝔩𝔬\"",
    "!!binary aGVsbG8=",
    "&a [*a]",
    "*undefined",
    "'unterminated",
    "\"\\u0000\"",
    "true",
    "ExternalName",
    "SCTP",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One random mutation of `doc`, and what it was.
fn mutate(doc: &str, rng: &mut Rng) -> (String, String) {
    let mut lines: Vec<String> = doc.lines().map(str::to_owned).collect();
    let l = rng.below(lines.len());
    let what = match rng.below(7) {
        0 => {
            let line = &lines[l];
            let chars: Vec<char> = line.chars().collect();
            let at = rng.below(chars.len() + 1);
            let c = (b' ' + rng.below(95) as u8) as char;
            let mut out: String = chars[..at.min(chars.len())].iter().collect();
            out.push(c);
            out.extend(chars.iter().skip(at + 1));
            lines[l] = out;
            format!("line {l}: char {at} -> {c:?}")
        }
        1 => {
            lines.remove(l);
            format!("line {l} dropped")
        }
        2 => {
            lines.insert(l, lines[l].clone());
            format!("line {l} doubled")
        }
        3 => {
            let m = rng.below(lines.len());
            lines.swap(l, m);
            format!("lines {l} and {m} swapped")
        }
        4 => {
            let cut = rng.below(doc.len());
            let cut = (0..=cut).rev().find(|&i| doc.is_char_boundary(i)).unwrap_or(0);
            return (doc[..cut].to_owned(), format!("cut at byte {cut}"));
        }
        5 => {
            // A value (after a key's colon, or a list item) replaced by a hostile one.
            let value = HOSTILE[rng.below(HOSTILE.len())];
            let line = &lines[l];
            let at = line.rfind(": ").map(|i| i + 2).or_else(|| line.find("- ").map(|i| i + 2));
            match at {
                Some(at) => lines[l] = format!("{}{value}", &line[..at]),
                None => lines[l] = value.to_owned(),
            }
            format!("line {l}: value -> {value}")
        }
        _ => {
            let value = HOSTILE[rng.below(HOSTILE.len())];
            let indent = " ".repeat(rng.below(5));
            let key = ["port", "addresses", "clusterIP", "type", "ports", "nodeName", "zone"]
                [rng.below(7)];
            lines.insert(l, format!("{indent}{key}: {value}"));
            format!("line {l}: inserted {indent}{key}: {value}")
        }
    };
    (lines.join("\n") + "\n", what)
}

struct Agent {
    source: ManifestsDir,
    syncer: Syncer<MemoryStore>,
    cfg: ModelConfig,
}

impl Agent {
    fn new(dir: &Path) -> Self {
        let cfg = ModelConfig::new("node-1");
        let source = ManifestsDir::new(dir, cfg.clone()).with_settle(Duration::ZERO);
        Self { source, syncer: common::memory_syncer(cfg.clone()), cfg }
    }

    /// Polls the folder and applies what changed; the errors' texts.
    fn poll(&mut self) -> Vec<String> {
        let poll = self.source.poll().unwrap();
        self.syncer.apply(poll.events);
        poll.errors.iter().map(|e| e.to_string()).collect()
    }

    fn plans(&self) -> BTreeMap<ObjKey, ServiceOutcome> {
        plan_all(&self.syncer.state, &self.cfg).into_iter().collect()
    }

    fn maps(&self) -> CanonicalDump {
        canonical(&self.syncer.writer.store().snapshot().unwrap()).unwrap()
    }
}

/// Writes `docs` as one file (each on lines of its own: a document cut mid-line must not
/// swallow the next one's separator), with a modification time of its own (`version` seconds
/// after a fixed past instant): two writes of the same length within one clock tick must
/// still differ.
fn write(path: &Path, docs: &[String], version: u64) {
    let text: Vec<String> =
        docs.iter().map(|d| if d.ends_with('\n') { d.clone() } else { format!("{d}\n") }).collect();
    std::fs::write(path, text.join("---\n")).unwrap();
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + version))
        .unwrap();
}

#[test]
fn mutated_manifests_never_panic_never_touch_other_services_and_leave_nothing_behind() {
    let seed: u64 =
        std::env::var("LB_MUTATION_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_1b0a);
    let count: usize =
        std::env::var("LB_MUTATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let (dir, _cleanup) = folder("random");
    let file = dir.join("services.yaml");
    let valid: Vec<String> = DOCS.iter().map(|(_, d)| d.to_string()).collect();
    write(&file, &valid, 0);

    let mut agent = Agent::new(&dir);
    let errors = agent.poll();
    assert!(errors.is_empty(), "the fixture is valid: {errors:?}");
    let baseline = agent.plans();
    let baseline_maps = agent.maps();
    let planned = baseline.values().filter(|o| !o.plans().is_empty()).count();
    assert_eq!(planned, 4, "every fixture service is planned: {baseline:?}");

    let mut rng = Rng(seed | 1);
    let (mut rejected, mut changed) = (0, 0);
    for n in 0..count {
        let d = rng.below(DOCS.len());
        let (text, what) = mutate(DOCS[d].1, &mut rng);
        let context = format!("seed {seed}, mutation {n}: document {d} ({what}):\n{text}");
        let mut docs = valid.clone();
        docs[d] = text;
        write(&file, &docs, 2 * n as u64 + 1);
        let errors = catch_unwind(AssertUnwindSafe(|| agent.poll()))
            .unwrap_or_else(|_| panic!("the agent panicked on {context}"));
        for e in &errors {
            assert!(e.contains("services.yaml"), "an error without its file: {e}\n{context}");
        }
        rejected += usize::from(!errors.is_empty());
        let plans = agent.plans();
        changed += usize::from(plans != baseline);
        // The maps say what a fresh agent reading the same files would write.
        let mut fresh = Agent::new(&dir);
        fresh.poll();
        assert!(agent.maps() == fresh.maps(), "maps differ from a fresh build's after {context}");
        // Every other service keeps its plan exactly.
        let owner = DOCS[d].0;
        for (key, outcome) in &baseline {
            if key.name != owner {
                assert_eq!(plans.get(key), Some(outcome), "{} changed by {context}", key.name);
            }
        }
        // The file whole again: the maps are a fresh build's.
        write(&file, &valid, 2 * n as u64 + 2);
        let errors = catch_unwind(AssertUnwindSafe(|| agent.poll()))
            .unwrap_or_else(|_| panic!("the agent panicked restoring after {context}"));
        assert!(errors.is_empty(), "{errors:?} after {context}");
        assert_eq!(agent.plans(), baseline, "plans after restoring from {context}");
        assert!(agent.maps() == baseline_maps, "maps differ after restoring from {context}");
    }
    // The mutations were not all harmless: many were refused, many changed their own service.
    assert!(
        rejected > count / 10 && changed > count / 10,
        "{rejected} refused, {changed} changed of {count}"
    );
}

/// A folder of its own for one test, removed at the end.
fn folder(tag: &str) -> (PathBuf, Cleanup) {
    let dir = std::env::temp_dir().join(format!("lb-mutations-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("node.yaml"), NODE).unwrap();
    (dir.clone(), Cleanup(dir))
}

/// A Service of one TCP port 80 at `ip`, with one ready endpoint.
fn service(name: &str, ip: &str, endpoint: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-a, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n- {{addresses: [{endpoint}], nodeName: node-1, conditions: {{ready: true}}}}\n"
    )
}

/// The backends of the frontend `ip:80` in the maps.
fn backends_of(agent: &Agent, ip: &str) -> Vec<String> {
    let maps = agent.maps();
    let ip: std::net::IpAddr = ip.parse().unwrap();
    let mut found: Vec<String> = maps
        .frontends
        .iter()
        .filter(|(k, _)| k.ip() == ip && k.port() == 80)
        .flat_map(|(_, v)| v.3.iter().map(|(addr, port)| format!("{addr}:{port}")))
        .collect();
    found.sort();
    found.dedup();
    found
}

/// A service renamed in place (one edit: the old name's deletion and the new one's creation
/// in one batch) keeps its ClusterIP served. Before, the new name was written first, found
/// the address still the old name's, and was left without it until its next change.
#[test]
fn a_renamed_service_keeps_its_cluster_ip_served() {
    let (dir, _cleanup) = folder("rename");
    let file = dir.join("svc.yaml");
    let mut agent = Agent::new(&dir);
    for (n, name) in ["web-b", "web-a", "web-b"].into_iter().enumerate() {
        write(&file, &[service(name, "10.96.9.9", "10.244.1.2")], n as u64);
        let errors = agent.poll();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(backends_of(&agent, "10.96.9.9"), ["10.244.1.2:8080"], "as {name}");
        let mut fresh = Agent::new(&dir);
        fresh.poll();
        assert!(agent.maps() == fresh.maps(), "as {name}: not a fresh build's maps");
    }
}

/// Two services claiming one ClusterIP (a copy-paste slip; the API server would refuse the
/// second): the first keeps it, and when it goes the other takes it over at once, without a
/// change of its own. Before, the address stayed unserved until the other changed.
#[test]
fn a_cluster_ip_two_services_claim_passes_to_the_other_when_its_holder_goes() {
    let (dir, _cleanup) = folder("claim");
    let mut agent = Agent::new(&dir);
    write(&dir.join("a.yaml"), &[service("a", "10.96.9.9", "10.244.1.2")], 0);
    write(&dir.join("b.yaml"), &[service("b", "10.96.9.9", "10.244.1.3")], 0);
    let errors = agent.poll();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(backends_of(&agent, "10.96.9.9"), ["10.244.1.2:8080"], "a's, the first read");
    std::fs::remove_file(dir.join("a.yaml")).unwrap();
    agent.poll();
    assert_eq!(backends_of(&agent, "10.96.9.9"), ["10.244.1.3:8080"], "b's once a is gone");
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One service of the random world below: its name, ClusterIP and node port come from small
/// pools, so renames and addresses reused by another service happen often.
#[derive(Clone, Debug)]
struct WorldService {
    name: usize,
    ip: usize,
    node_port: Option<usize>,
    udp: bool,
    target: u16,
    /// Slices, each a list of (endpoint, ready).
    slices: Vec<Vec<(usize, bool)>>,
}

const NAMES: usize = 10;
const IPS: usize = 6;
const NODE_PORTS: usize = 4;

impl WorldService {
    fn yaml(&self) -> String {
        let (proto, name) = (if self.udp { "UDP" } else { "TCP" }, self.name);
        let (typ, np) = match self.node_port {
            Some(n) => ("NodePort", format!(", nodePort: {}", 30100 + 500 * n)),
            None => ("ClusterIP", String::new()),
        };
        let mut docs = vec![format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{name}, namespace: default}}\nspec:\n  type: {typ}\n  clusterIP: 10.96.{}.10\n  ports: [{{name: p, port: 80, protocol: {proto}, targetPort: {}{np}}}]\n",
            self.ip * 11,
            self.target
        )];
        for (i, eps) in self.slices.iter().enumerate() {
            let mut d = format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{name}-{i}, namespace: default, labels: {{kubernetes.io/service-name: s{name}}}}}\naddressType: IPv4\nports: [{{name: p, port: {}, protocol: {proto}}}]\nendpoints:{}\n",
                self.target,
                if eps.is_empty() { " []" } else { "" }
            );
            for (e, ready) in eps {
                d += &format!(
                    "- {{addresses: [10.244.{}.{}], nodeName: node-{}, conditions: {{ready: {ready}}}}}\n",
                    e % 3,
                    10 + e,
                    1 + e % 2
                );
            }
            docs.push(d);
        }
        docs.join("---\n")
    }
}

/// The random world: services by file, never two holding one name, address or node port at
/// once (the API server's rule), so a fresh build has one right answer.
struct World(Vec<WorldService>);

impl World {
    fn free(
        &self,
        taken: impl Fn(&WorldService) -> Option<usize>,
        pool: usize,
        rng: &mut Rng,
    ) -> Option<usize> {
        let free: Vec<usize> =
            (0..pool).filter(|i| self.0.iter().all(|s| taken(s) != Some(*i))).collect();
        (!free.is_empty()).then(|| free[rng.below(free.len())])
    }

    fn endpoints(rng: &mut Rng) -> Vec<(usize, bool)> {
        (0..rng.below(4)).map(|_| (rng.below(8), rng.below(5) != 0)).collect()
    }

    /// One random change; what it was.
    fn change(&mut self, rng: &mut Rng) -> String {
        let pick = rng.below(self.0.len().max(1));
        match rng.below(8) {
            0 | 1 => {
                let (Some(name), Some(ip)) =
                    (self.free(|s| Some(s.name), NAMES, rng), self.free(|s| Some(s.ip), IPS, rng))
                else {
                    return "nothing (pools used up)".into();
                };
                let node_port = if rng.below(2) == 0 {
                    self.free(|s| s.node_port, NODE_PORTS, rng)
                } else {
                    None
                };
                let slices = (0..1 + rng.below(2)).map(|_| Self::endpoints(rng)).collect();
                let s = WorldService {
                    name,
                    ip,
                    node_port,
                    udp: rng.below(3) == 0,
                    target: 8080,
                    slices,
                };
                self.0.push(s);
                format!("s{name} added at address {ip}")
            }
            _ if self.0.is_empty() => "nothing (no service)".into(),
            2 => format!("s{} removed", self.0.remove(pick).name),
            3 => {
                let Some(name) = self.free(|s| Some(s.name), NAMES, rng) else {
                    return "nothing".into();
                };
                let old = std::mem::replace(&mut self.0[pick].name, name);
                format!("s{old} renamed s{name}")
            }
            4 => {
                // Another service takes this one's address at once (deleted and re-created).
                let old = self.0.remove(pick);
                let Some(name) = self.free(|s| Some(s.name), NAMES, rng).filter(|n| *n != old.name)
                else {
                    self.0.push(old);
                    return "nothing".into();
                };
                let slices = vec![Self::endpoints(rng)];
                self.0.push(WorldService {
                    name,
                    node_port: None,
                    udp: !old.udp,
                    target: 9090,
                    slices,
                    ..old
                });
                format!("s{} replaced by s{name} at its address", old.name)
            }
            5 => {
                let s = &mut self.0[pick];
                let k = rng.below(s.slices.len().max(1));
                match s.slices.get_mut(k) {
                    Some(eps) => *eps = Self::endpoints(rng),
                    None => s.slices.push(Self::endpoints(rng)),
                }
                format!("s{}: slice {k} changed", s.name)
            }
            6 => {
                let s = &mut self.0[pick];
                // Endpoints move between slices: merged into one, or split in two.
                let all: Vec<(usize, bool)> = s.slices.drain(..).flatten().collect();
                let cut = rng.below(all.len() + 1);
                s.slices = if rng.below(2) == 0 {
                    vec![all]
                } else {
                    vec![all[..cut].to_vec(), all[cut..].to_vec()]
                };
                format!("s{}: slices reshaped", s.name)
            }
            _ => {
                let node_port = self.free(|s| s.node_port, NODE_PORTS, rng);
                let s = &mut self.0[pick];
                s.node_port = if s.node_port.is_some() { None } else { node_port };
                s.target = if s.target == 8080 { 9090 } else { 8080 };
                format!("s{}: node port {:?}, target port {}", s.name, s.node_port, s.target)
            }
        }
    }
}

/// Random sequences of valid changes (services added, removed, renamed, an address taken over
/// by another service at once, endpoints moved between slices, types and ports changed), a few
/// files at a time: after each poll the maps equal a fresh agent's build of the same files.
#[test]
fn random_valid_changes_keep_the_maps_equal_to_a_fresh_build() {
    let seed: u64 =
        std::env::var("LB_MUTATION_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x0bad_cafe);
    let steps: usize =
        std::env::var("LB_MUTATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000) / 2;
    let (dir, _cleanup) = folder("world");
    let mut agent = Agent::new(&dir);
    let mut world = World(Vec::new());
    let mut rng = Rng(seed | 1);
    let mut version = 0;
    let mut history = Vec::new();
    for step in 0..steps {
        // One to three changes land in one poll.
        for _ in 0..1 + rng.below(3) {
            history.push(world.change(&mut rng));
        }
        let files: BTreeMap<String, String> =
            world.0.iter().map(|s| (format!("s{}.yaml", s.name), s.yaml())).collect();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name != "node.yaml" && !files.contains_key(&name) {
                std::fs::remove_file(dir.join(&name)).unwrap();
            }
        }
        for (name, text) in &files {
            let path = dir.join(name);
            if std::fs::read_to_string(&path).ok().as_ref() != Some(text) {
                version += 1;
                write(&path, std::slice::from_ref(text), version);
            }
        }
        let errors = agent.poll();
        let context = format!("seed {seed}, step {step}, after: {}", history.join("; "));
        assert!(errors.is_empty(), "{errors:?}\n{context}");
        let mut fresh = Agent::new(&dir);
        fresh.poll();
        assert_eq!(agent.plans(), fresh.plans(), "{context}");
        assert!(agent.maps() == fresh.maps(), "maps differ from a fresh build's: {context}");
    }
}
