//! The dataplane writer: minimal writes, clean removal, restart adoption, and the property that
//! any sequence of changes leaves the maps equal to a fresh build of the final state, on an
//! in-memory store and on the real kernel maps.

use std::net::IpAddr;

use lb_agent::{
    dataplane::{
        store::{KernelStore, MapStore, MemoryStore},
        writer::{Writer, WriterConfig, canonical},
    },
    model::maglev,
    state::ObjKey,
};
use lb_tests::{
    kernel::{Datapath, TEST_MAP_SIZES},
    plans::{Rng, World, backend, simple_plan},
    require_root,
};

const CFG: WriterConfig = WriterConfig {
    maglev_max_size: maglev::DEFAULT_MAX_SIZE,
    max_services: 1024,
    answer_service_pings: true,
};

fn memory() -> MemoryStore {
    MemoryStore::new(1 << 18, 4096)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn backends(n: usize) -> Vec<lb_agent::model::plan::Backend> {
    (0..n).map(|i| backend(ip(&format!("10.1.0.{}", i + 1)), 8080, i % 2 == 0)).collect()
}

#[test]
fn one_endpoint_change_writes_one_backend_and_one_set_plus_moved_slots() {
    let mut w = Writer::new(memory(), CFG).unwrap();
    let obj = ObjKey::new("default", "web");
    let plan = |n| simple_plan("web", ip("10.96.0.10"), ip("192.168.1.11"), 30080, backends(n));
    let first = w.apply_object(&obj, &[plan(9)]).unwrap();
    // 9 backends, one shared set, 3 frontends + the ClusterIP's address marker, the table
    // written at once.
    assert_eq!((first.writes.backends, first.writes.tables, first.writes.services), (9, 1, 4));
    assert_eq!((first.writes.maglev_slots, first.writes.maglev_calls), (1021, 1));

    let added = w.apply_object(&obj, &[plan(10)]).unwrap();
    assert_eq!(added.writes.entries(), 2, "new backend + set count: {:?}", added.writes);
    let share = 1021 / 10;
    assert!(
        (share as u64..share as u64 * 2).contains(&added.writes.maglev_slots),
        "slots moved to the new backend: {}",
        added.writes.maglev_slots
    );
    eprintln!("add 10th endpoint: {:?}", added.writes);

    let removed = w.apply_object(&obj, &[plan(9)]).unwrap();
    assert_eq!(removed.writes.entries(), 2, "set count + cleared backend: {:?}", removed.writes);

    let unchanged = w.apply_object(&obj, &[plan(9)]).unwrap();
    assert_eq!(unchanged.writes, Default::default(), "no change, no write");
}

#[test]
fn removing_a_service_leaves_empty_maps() {
    let mut w = Writer::new(memory(), CFG).unwrap();
    let obj = ObjKey::new("default", "web");
    w.apply_object(
        &obj,
        &[simple_plan("web", ip("10.96.0.10"), ip("192.168.1.11"), 30080, backends(3))],
    )
    .unwrap();
    w.apply_object(&obj, &[]).unwrap();
    let s = w.store().snapshot().unwrap();
    assert!(s.services.is_empty() && s.tables.is_empty() && s.backends.is_empty(), "{s:?}");
    assert_eq!(w.port_count(), 0);
}

#[test]
fn a_frontend_claimed_by_two_services_stays_with_the_first() {
    let mut w = Writer::new(memory(), CFG).unwrap();
    let a = simple_plan("a", ip("10.96.0.10"), ip("192.168.1.11"), 30080, backends(2));
    let b = simple_plan("b", ip("10.96.0.10"), ip("192.168.1.11"), 30081, backends(3));
    w.apply_object(&ObjKey::new("default", "a"), &[a]).unwrap();
    let r = w.apply_object(&ObjKey::new("default", "b"), std::slice::from_ref(&b)).unwrap();
    assert_eq!(r.conflicts.len(), 1, "{:?}", r.conflicts);
    assert!(r.conflicts[0].contains("ClusterIP 10.96.0.10:80"), "{:?}", r.conflicts);
    let dump = canonical(&w.store().snapshot().unwrap()).unwrap();
    let cluster_ip = dump.frontends.iter().find(|(k, _)| k.port() == 80).unwrap().1;
    assert_eq!(cluster_ip.2, 2, "still service a's two backends");
    assert!(w.take_unblocked().is_empty(), "nothing freed yet");

    // a goes: the writer names b, which wanted the frontend, to be written again; then b has it.
    w.apply_object(&ObjKey::new("default", "a"), &[]).unwrap();
    assert_eq!(w.take_unblocked().into_iter().collect::<Vec<_>>(), [ObjKey::new("default", "b")]);
    let r = w.apply_object(&ObjKey::new("default", "b"), &[b]).unwrap();
    assert!(r.conflicts.is_empty(), "{:?}", r.conflicts);
    let dump = canonical(&w.store().snapshot().unwrap()).unwrap();
    let cluster_ip = dump.frontends.iter().find(|(k, _)| k.port() == 80).unwrap().1;
    assert_eq!(cluster_ip.2, 3, "service b's three backends");
}

#[test]
fn a_restarted_writer_adopts_identical_state_without_writing() {
    let mut w = Writer::new(memory(), CFG).unwrap();
    let mut world = World::new(20);
    let mut rng = Rng::new(7);
    for _ in 0..200 {
        world.mutate(&mut rng);
    }
    for i in 0..20 {
        w.apply_object(&ObjKey::new("default", format!("svc-{i}")), &world.plans(i)).unwrap();
    }
    let store = w.store().clone();
    let before = canonical(&store.snapshot().unwrap()).unwrap();

    // The next agent finds the maps as they were and programs the same plans.
    let mut w2 = Writer::new(store, CFG).unwrap();
    let start = w2.counts();
    for i in 0..20 {
        w2.apply_object(&ObjKey::new("default", format!("svc-{i}")), &world.plans(i)).unwrap();
    }
    w2.finish_initial_sync().unwrap();
    let writes = w2.counts();
    assert_eq!(writes, start, "a restart over identical state writes nothing");
    assert_eq!(canonical(&w2.store().snapshot().unwrap()).unwrap(), before);

    // A restart after changes (one service gone, one changed) fixes exactly those.
    let mut w3 = Writer::new(w2.store().clone(), CFG).unwrap();
    world.services[3] = None;
    world.mutate(&mut rng);
    for i in 0..20 {
        w3.apply_object(&ObjKey::new("default", format!("svc-{i}")), &world.plans(i)).unwrap();
    }
    w3.finish_initial_sync().unwrap();
    let mut fresh = Writer::new(memory(), CFG).unwrap();
    for i in 0..20 {
        fresh.apply_object(&ObjKey::new("default", format!("svc-{i}")), &world.plans(i)).unwrap();
    }
    assert_eq!(
        canonical(&w3.store().snapshot().unwrap()).unwrap(),
        canonical(&fresh.store().snapshot().unwrap()).unwrap()
    );
}

/// Applies `steps` random changes one by one, then checks the maps against a fresh build.
fn random_changes_match_a_fresh_build<S: MapStore>(
    store: S,
    fresh: impl Fn() -> S,
    seed: u64,
    steps: usize,
) {
    let services = 12;
    let mut rng = Rng::new(seed);
    let mut world = World::new(services);
    let mut w = Writer::new(store, CFG).unwrap();
    for step in 0..steps {
        let i = world.mutate(&mut rng);
        w.apply_object(&ObjKey::new("default", format!("svc-{i}")), &world.plans(i))
            .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e:#}"));
    }
    let mut f = Writer::new(fresh(), CFG).unwrap();
    for i in 0..services {
        f.apply_object(&ObjKey::new("default", format!("svc-{i}")), &world.plans(i)).unwrap();
    }
    let got =
        canonical(&w.store().snapshot().unwrap()).unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
    let want = canonical(&f.store().snapshot().unwrap()).unwrap();
    assert_eq!(got.unreferenced_tables, 0, "seed {seed}: leaked backend sets");
    assert_eq!(got.backends, want.backends, "seed {seed}: live backends differ");
    assert_eq!(got.frontends.len(), want.frontends.len(), "seed {seed}");
    for (k, v) in &want.frontends {
        assert_eq!(got.frontends.get(k), Some(v), "seed {seed}: frontend {k:?}");
    }
}

#[test]
fn random_change_sequences_equal_a_fresh_build_in_memory() {
    for seed in 0..40 {
        random_changes_match_a_fresh_build(memory(), memory, seed, 300);
    }
}

#[test]
fn random_change_sequences_equal_a_fresh_build_in_the_kernel() {
    require_root!();
    for seed in 100..106 {
        // Each run gets fresh private maps for both writers.
        let a = Datapath::load_with(TEST_MAP_SIZES);
        let b = Datapath::load_with(TEST_MAP_SIZES);
        random_changes_match_a_fresh_build(
            KernelStore::new(&a.ebpf).unwrap(),
            || KernelStore::new(&b.ebpf).unwrap(),
            seed,
            150,
        );
    }
}

/// The UDP endpoints a service port stops using are reported for the conntrack flush: gone
/// ones and the whole set of a removed service, but not those still serving while they
/// terminate (retained for open flows), and never a TCP service's.
#[test]
fn udp_endpoints_no_longer_in_use_are_reported_for_the_conntrack_flush() {
    use lb_agent::{dataplane::writer::UdpTarget, model::plan::Protocol};
    let mut w = Writer::new(memory(), CFG).unwrap();
    let (dns, web) = (ObjKey::new("default", "dns"), ObjKey::new("default", "web"));
    let plan = |name: &str, proto, bs: Vec<lb_agent::model::plan::Backend>, retained| {
        let mut p = simple_plan(name, ip("10.96.0.10"), ip("192.168.1.11"), 30053, bs);
        p.protocol = proto;
        p.retained_backends = retained;
        p
    };
    let (a, b, c) = (ip("10.1.0.1"), ip("10.1.0.2"), ip("10.1.0.3"));
    let be = |x| backend(x, 5353, true);
    w.apply_object(&dns, &[plan("dns", Protocol::Udp, vec![be(a), be(b), be(c)], vec![])]).unwrap();
    w.apply_object(&web, &[plan("web", Protocol::Tcp, vec![be(a), be(b)], vec![])]).unwrap();
    assert_eq!(w.take_stale_udp(), [], "nothing left yet");
    let id = |w: &Writer<MemoryStore>| w.service_ids().find(|(k, _)| k.name == "dns").unwrap().1;
    let dns_id = id(&w);

    // a is gone, b terminates but still serves: only a's flows are stale. The TCP service
    // losing a reports nothing.
    w.apply_object(&dns, &[plan("dns", Protocol::Udp, vec![be(c)], vec![be(b)])]).unwrap();
    w.apply_object(&web, &[plan("web", Protocol::Tcp, vec![be(b)], vec![])]).unwrap();
    let stale = |x| UdpTarget { service_id: dns_id, addr: x, port: 5353 };
    assert_eq!(w.take_stale_udp(), [stale(a)]);
    assert_eq!(w.take_stale_udp(), [], "taken once");

    // The service goes: every endpoint it still had.
    w.apply_object(&dns, &[]).unwrap();
    let mut gone = w.take_stale_udp();
    gone.sort();
    assert_eq!(gone, [stale(b), stale(c)]);
}

/// Address markers: a ClusterIP's (internal), and one for every address outside clients reach
/// but a NodePort's (external; answering pings as configured), held while any service port
/// uses the address, rewritten when a restarted agent answers pings otherwise.
#[test]
fn address_markers_follow_the_addresses_services_use() {
    use lb_agent::model::plan::Protocol;
    use lb_common::{SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_F_ADDR_MARKER, SVC_F_ANSWER_PING};
    use lb_tests::plans::lb_plan;
    let markers =
        |w: &Writer<MemoryStore>| canonical(&w.store().snapshot().unwrap()).unwrap().markers;
    let (internal, external) = (SVC_F_ADDR_MARKER, SVC_F_ADDR_MARKER | SVC_F_ANSWER_PING);
    let mut w = Writer::new(memory(), CFG).unwrap();
    let web = simple_plan("web", ip("10.96.0.10"), ip("192.168.1.11"), 30080, backends(2));
    w.apply_object(&ObjKey::new("default", "web"), &[web]).unwrap();
    assert_eq!(
        markers(&w).into_iter().collect::<Vec<_>>(),
        [(ip("10.96.0.10"), SCOPE_INTERNAL, internal)],
        "the ClusterIP's; none for the NodePort's node address"
    );
    // One LoadBalancer IP, two services on it (ports 80 and 443).
    let (a, b) = (ObjKey::new("default", "a"), ObjKey::new("default", "b"));
    let vip = ip("198.51.100.1");
    w.apply_object(&a, &[lb_plan("a", vip, 80, Protocol::Tcp, backends(1))]).unwrap();
    w.apply_object(&b, &[lb_plan("b", vip, 443, Protocol::Tcp, backends(1))]).unwrap();
    assert!(markers(&w).contains(&(vip, SCOPE_EXTERNAL, external)), "{:?}", markers(&w));
    assert!(!markers(&w).iter().any(|m| m.0 == vip && m.1 == SCOPE_INTERNAL));
    w.apply_object(&a, &[]).unwrap();
    assert!(markers(&w).contains(&(vip, SCOPE_EXTERNAL, external)), "b still uses it");

    // A restart with pings not answered: the same marker, rewritten without the flag.
    let quiet = WriterConfig { answer_service_pings: false, ..CFG };
    let mut w2 = Writer::new(w.store().clone(), quiet).unwrap();
    let web = simple_plan("web", ip("10.96.0.10"), ip("192.168.1.11"), 30080, backends(2));
    w2.apply_object(&ObjKey::new("default", "web"), &[web]).unwrap();
    w2.apply_object(&b, &[lb_plan("b", vip, 443, Protocol::Tcp, backends(1))]).unwrap();
    w2.finish_initial_sync().unwrap();
    assert!(markers(&w2).contains(&(vip, SCOPE_EXTERNAL, SVC_F_ADDR_MARKER)), "{:?}", markers(&w2));
    assert_eq!(markers(&w2).len(), 2);
    w2.apply_object(&b, &[]).unwrap();
    assert_eq!(markers(&w2).len(), 1, "only the ClusterIP's left: {:?}", markers(&w2));
}

/// Pinned maps a next agent finds damaged (a crashed older build, a hand edit with bpftool):
/// tables pointing past the Maglev array or overlapping others, slots naming backends that
/// do not exist, frontends naming unknown sets or ids, stray names, memberships and ranges.
/// The restarted writer must neither panic nor refuse to start, and once it has programmed
/// the same plans and finished its initial sync, the maps equal a fresh build's.
#[test]
fn a_restart_over_damaged_maps_repairs_them_to_a_fresh_build() {
    use lb_common::{AffinityMatchKey, BackendValue, ServiceKey, ServiceValue, TableValue};
    let mut world = World::new(16);
    let mut rng = Rng::new(11);
    for _ in 0..150 {
        world.mutate(&mut rng);
    }
    let program = |w: &mut Writer<MemoryStore>| {
        for i in 0..16 {
            w.apply_object(&ObjKey::new("default", format!("svc-{i}")), &world.plans(i)).unwrap();
        }
    };
    let mut fresh = Writer::new(memory(), CFG).unwrap();
    program(&mut fresh);
    // What the maps mean, ids aside: the canonical dump, the names, the source ranges.
    let meaning = |s: lb_agent::dataplane::store::Snapshot| {
        let ids: std::collections::BTreeMap<u32, String> = s.names.clone();
        let names: std::collections::BTreeSet<String> = ids.values().cloned().collect();
        let ranges: std::collections::BTreeSet<(String, ipnet::IpNet)> = s
            .source_ranges
            .iter()
            .map(|(id, net)| {
                (ids.get(id).cloned().unwrap_or_else(|| format!("unnamed {id}")), *net)
            })
            .collect();
        (canonical(&s).unwrap(), names, ranges)
    };
    let want = meaning(fresh.store().snapshot().unwrap());
    let maglev_slots = 1u32 << 18;

    for trial in 0..40 {
        let mut store = fresh.store().clone();
        let snapshot = store.snapshot().unwrap();
        let frontends: Vec<ServiceKey> = snapshot.services.keys().copied().collect();
        let tables: Vec<u32> = snapshot.tables.keys().copied().collect();
        // Mostly near the real ids and ranges, sometimes anywhere.
        let any = |rng: &mut Rng, near: u32| {
            if rng.chance(70) {
                rng.below(u64::from(near) + 8) as u32
            } else {
                rng.next_u64() as u32
            }
        };
        let mut what = Vec::new();
        for _ in 0..1 + rng.below(12) {
            // Writes the store refuses (an id past a map's size) are what the kernel would
            // refuse too: nothing was damaged.
            match rng.below(7) {
                0 => {
                    let id = if tables.is_empty() || rng.chance(30) {
                        any(&mut rng, 64)
                    } else {
                        tables[rng.below(tables.len() as u64) as usize]
                    };
                    let value = TableValue {
                        maglev_offset: any(&mut rng, maglev_slots),
                        maglev_size: [0, 1, 7, 251, 1021, 65537, u32::MAX][rng.below(7) as usize],
                        backend_count: any(&mut rng, 20),
                        _pad: 0,
                    };
                    let _ = store.set_table(id, &value);
                    what.push(format!("table {id} = {value:?}"));
                }
                1 => {
                    let start = any(&mut rng, maglev_slots);
                    let slots: Vec<u32> =
                        (0..1 + rng.below(300)).map(|_| any(&mut rng, 64)).collect();
                    let _ = store.set_maglev_range(start, &slots);
                    what.push(format!("{} slots at {start}", slots.len()));
                }
                2 => {
                    let id = any(&mut rng, 64);
                    let value = BackendValue::new(
                        ip(&format!("10.1.0.{}", rng.below(256))),
                        8080,
                        rng.below(256) as u8,
                    );
                    let _ = store.set_backend(id, &value);
                    what.push(format!("backend {id} = {value:?}"));
                }
                3 => {
                    let key = if frontends.is_empty() || rng.chance(30) {
                        ServiceKey::new(
                            ip(&format!("10.96.{}.{}", rng.below(4), rng.below(256))),
                            80,
                            6,
                            1,
                        )
                    } else {
                        frontends[rng.below(frontends.len() as u64) as usize]
                    };
                    let value = ServiceValue {
                        service_id: any(&mut rng, 64),
                        table_id: any(&mut rng, 64),
                        flags: rng.next_u64() as u32,
                        affinity_timeout_s: any(&mut rng, 100),
                    };
                    let _ = store.set_service(&key, &value);
                    what.push(format!("frontend {key:?} = {value:?}"));
                }
                4 => {
                    let key = AffinityMatchKey {
                        backend_id: any(&mut rng, 64),
                        service_id: any(&mut rng, 64),
                    };
                    let _ = store.set_affinity_match(&key);
                    what.push(format!("{key:?}"));
                }
                5 => {
                    let id = any(&mut rng, 64);
                    let _ = store.set_name(id, Some("ns/stray:p/TCP/IPv4"));
                    what.push(format!("name {id}"));
                }
                _ => {
                    let id = any(&mut rng, 64);
                    let net: ipnet::IpNet = "10.0.0.0/8".parse().unwrap();
                    let _ = store.set_source_ranges(id, &[], &[net]);
                    what.push(format!("source range of {id}"));
                }
            }
        }
        let context = format!("trial {trial}: {}", what.join("; "));
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut w =
                Writer::new(store, CFG).unwrap_or_else(|e| panic!("refused to start: {e:#}"));
            program(&mut w);
            w.finish_initial_sync().unwrap_or_else(|e| panic!("initial sync failed: {e:#}"));
            meaning(w.store().snapshot().unwrap())
        }));
        let got = run.unwrap_or_else(|_| panic!("the writer panicked after {context}"));
        assert!(got == want, "not repaired after {context}");
    }
}
