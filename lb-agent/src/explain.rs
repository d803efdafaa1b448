//! `lbctl explain`: what the datapath does with one packet, and why.
//!
//! From outside (device hooks) the answer is not simulated: the packet is built and run through
//! the real tc ingress program (BPF_PROG_TEST_RUN) in a private copy of the object that shares
//! the live read-only maps (frontends, backend sets, Maglev, backends, ...) and has private
//! stateful ones, pre-filled with the live conntrack and affinity entries of this flow. Live
//! maps are left exactly as they were. From a pod or the host (socket hooks, which cannot be
//! test-run) the same maps are read to say what connect() will do; from a pod whose socket
//! the hooks leave alone (`--socket-lb-host-namespace-only`), the packet is run through the
//! pod devices' program (`tc_from_pod`) the same way as from outside.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};
use aya::{
    maps::{HashMap, Map, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use lb_common::*;
use serde::Serialize;

use crate::{
    dataplane::{
        attach::TcRole,
        links::{links_pin_dir, pinned_targets},
        loader::{load_shadow, maps_pin_dir},
    },
    inspect::{BackendView, Inspection},
};

/// Whether the agent let XDP send packets out of device `ifindex` (LB_XDP_TX).
fn xdp_tx_allowed(bpffs: &std::path::Path, ifindex: u32) -> bool {
    let path = maps_pin_dir(bpffs).join(MAP_XDP_TX);
    MapData::from_pin(&path)
        .ok()
        .and_then(|m| HashMap::<_, u32, u32>::try_from(Map::HashMap(m)).ok())
        .is_some_and(|m| m.get(&ifindex, 0).is_ok())
}

/// The devices the agent attached its device programs to (from the pinned links), with whether
/// XDP is attached there too.
pub fn attached_devices(bpffs: &std::path::Path) -> Vec<(String, bool)> {
    let xdp = pinned_targets(bpffs, "xdp");
    pinned_targets(bpffs, TcRole::External.labels()[0])
        .into_iter()
        .map(|d| {
            let with_xdp = xdp.contains(&d);
            (d, with_xdp)
        })
        .collect()
}

/// Pods' devices carrying the pod hooks (`--pod-devices`), from the pinned links, sorted.
pub fn pod_devices(bpffs: &std::path::Path) -> Vec<String> {
    pinned_targets(bpffs, TcRole::Pod.labels()[0])
}

/// The device a packet from outside arrives on: `requested` if the agent attached to it, else
/// the only device it attached to. `None` when it attached to none (maps only).
fn pick_device(
    bpffs: &std::path::Path,
    requested: Option<&str>,
    node: &NodeConfig,
) -> Result<Option<(String, u32, bool)>> {
    let devices = attached_devices(bpffs);
    let names = || devices.iter().map(|(d, _)| d.as_str()).collect::<Vec<_>>().join(", ");
    let (name, xdp) = match requested {
        Some(r) => match devices.iter().find(|(d, _)| d == r) {
            Some((d, x)) => (d.clone(), *x),
            None if devices.is_empty() => bail!("--device {r}: the agent attached to no device"),
            None => bail!("--device {r}: the agent attached to {} only", names()),
        },
        None => match devices.as_slice() {
            [] => return Ok(None),
            [(d, x)] => (d.clone(), *x),
            _ => bail!("the agent attached to {}: say which with --device", names()),
        },
    };
    let Ok(ifindex) = crate::dataplane::netdev::ifindex(&name) else {
        bail!(
            "device {name} is not in this network namespace: run lbctl in the agent's (the node's) network namespace"
        );
    };
    // A device of the same name in another namespace would give a wrong answer silently:
    // interface numbers repeat across namespaces, the node's own address does not.
    let link = links_pin_dir(bpffs).join(format!("tc-ingress@{name}"));
    let attached = crate::dataplane::links::pinned_link_ifindex(&link)
        .with_context(|| format!("reading {}", link.display()))?;
    let node: Vec<IpAddr> = [node.addr4, node.addr6]
        .iter()
        .map(addr_to_ip)
        .filter(|ip| !ip.is_unspecified() && *ip != IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED))
        .map(|ip| ip.to_canonical())
        .collect();
    let here: Vec<IpAddr> =
        crate::dataplane::netdev::addresses().into_iter().map(|(_, ip)| ip).collect();
    if attached != ifindex || (!node.is_empty() && !node.iter().any(|ip| here.contains(ip))) {
        bail!(
            "this is not the agent's network namespace (the agent's {name} is interface {attached} on a node with address {}): run lbctl in the node's network namespace",
            node.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(Some((name, ifindex, xdp)))
}

/// A `struct __sk_buff` for BPF_PROG_TEST_RUN that says the packet arrived on `ifindex` (the
/// kernel accepts only a few fields; the rest must be zero).
pub fn skb_ctx(ifindex: u32) -> [u8; SKB_CTX_SIZE] {
    let mut ctx = [0u8; SKB_CTX_SIZE];
    ctx[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}
// uapi/linux/bpf.h: sizeof(struct __sk_buff) and the offsets of ingress_ifindex and ifindex.
pub const SKB_CTX_SIZE: usize = 192;
const SKB_INGRESS_IFINDEX: usize = 36;
const SKB_IFINDEX: usize = 40;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum From {
    /// A client outside the node, arriving on a device (tc/XDP).
    Outside,
    /// A pod of this node (socket hooks).
    Pod,
    /// A host process of this node (socket hooks).
    Host,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub packet: String,
    pub hook: &'static str,
    /// The device the packet was run as arriving on (from outside).
    pub device: Option<String>,
    pub notes: Vec<String>,
    pub service: Option<String>,
    pub frontend: Option<String>,
    pub flags: Vec<&'static str>,
    pub candidates: Vec<BackendView>,
    /// What chose the backend (conntrack entry, affinity entry, Maglev slot, random slot).
    pub decided_by: Option<String>,
    pub backend: Option<String>,
    /// The packet's tuple after translation.
    pub rewritten: Option<String>,
    pub snat: bool,
    /// By direct server return (`--lb-mode hybrid`): the backend's node answers the client.
    pub dsr: bool,
    pub verdict: String,
    pub drop_reason: Option<&'static str>,
}

fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_ICMP => "ICMP echo request",
        p => lb_common::proto_name(p),
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame with a TCP SYN, a small UDP datagram, an SCTP INIT or (`PROTO_ICMP`) an
/// echo request from `src` to `dst`.
pub fn build_packet(src: SocketAddr, dst: SocketAddr, proto: u8) -> Result<Vec<u8>> {
    // `PROTO_ICMP`: an echo request (a ping), ICMPv6's for IPv6 addresses.
    let (proto, csum_at) = match (proto, src.is_ipv6()) {
        (PROTO_ICMP, false) => (PROTO_ICMP, 2),
        (PROTO_ICMP, true) => (PROTO_ICMPV6, 2),
        (PROTO_TCP, _) => (PROTO_TCP, 16),
        _ => (proto, 6),
    };
    let l4: Vec<u8> = if proto == PROTO_ICMP || proto == PROTO_ICMPV6 {
        let request = if proto == PROTO_ICMP { ICMP_ECHO_REQUEST } else { ICMPV6_ECHO_REQUEST };
        let mut i = vec![request, 0, 0, 0, 0x4c, 0x42, 0, 1];
        i.extend_from_slice(b"lbctl explain");
        i
    } else if proto == PROTO_SCTP {
        // Common header (verification tag 0, as an INIT's), then the INIT chunk: initiate tag,
        // receive window, stream counts, initial TSN.
        let mut s = vec![0u8; 12];
        s[0..2].copy_from_slice(&src.port().to_be_bytes());
        s[2..4].copy_from_slice(&dst.port().to_be_bytes());
        s.extend_from_slice(&[1, 0, 0, 20, 0x4c, 0x42, 0, 1, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1]);
        let crc = lb_common::crc32c::checksum(&s);
        s[8..12].copy_from_slice(&crc.to_le_bytes());
        s
    } else if proto == PROTO_TCP {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&src.port().to_be_bytes());
        t[2..4].copy_from_slice(&dst.port().to_be_bytes());
        t[4..8].copy_from_slice(&1u32.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = 0x02; // SYN
        t[14..16].copy_from_slice(&64240u16.to_be_bytes());
        t
    } else {
        let mut u = vec![0u8; 8];
        u.extend_from_slice(b"lbctl explain");
        u[0..2].copy_from_slice(&src.port().to_be_bytes());
        u[2..4].copy_from_slice(&dst.port().to_be_bytes());
        let len = u.len() as u16;
        u[4..6].copy_from_slice(&len.to_be_bytes());
        u
    };
    let mut pseudo = Vec::new();
    let mut p = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&[0x08, 0x00]);
            let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
            ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            p.extend_from_slice(&ip);
            // (ICMP's checksum covers the message alone.)
            if proto != PROTO_ICMP {
                pseudo.extend_from_slice(&s.octets());
                pseudo.extend_from_slice(&d.octets());
                pseudo.extend_from_slice(&[0, proto]);
                pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            }
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&[0x86, 0xdd]);
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            ip.extend_from_slice(&[proto, 64]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            p.extend_from_slice(&ip);
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => bail!("source and destination are of different IP families"),
    }
    let mut l4 = l4;
    // SCTP's CRC, above, covers no pseudo-header.
    if proto != PROTO_SCTP {
        pseudo.extend_from_slice(&l4);
        let c = checksum(&pseudo);
        l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    }
    p.extend_from_slice(&l4);
    Ok(p)
}

/// What became of a ping to `dst` (`moved`: whether a counter moved).
fn ping_verdict(dst: IpAddr, moved: &dyn Fn(u32) -> bool) -> String {
    if moved(STAT_ECHO_REPLY) {
        format!(
            "answered: an echo reply from {dst}, sent back out by the node (a service address \
             clients outside reach; --answer-service-pings)"
        )
    } else if moved(STAT_ICMP_RATE_LIMITED) {
        "drop: a service address, but over the node's ICMP allowance (icmp_rate_limited)".into()
    } else if moved(STAT_DROP_UNKNOWN_PORT) {
        "drop: a service address clients outside reach, whose pings are not answered \
         (--answer-service-pings=false)"
            .into()
    } else {
        "pass to the stack: no service address clients outside reach (or the node's own, or \
         a node that does not forward)"
            .into()
    }
}

/// (src, dst) of a frame built by [`build_packet`] or rewritten by the datapath.
fn tuple(p: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let (src, dst, l4): (IpAddr, IpAddr, usize) = match p.get(12..14)? {
        [0x08, 0x00] => {
            let ihl = (p.get(14)? & 0x0f) as usize * 4;
            let s: [u8; 4] = p.get(26..30)?.try_into().ok()?;
            let d: [u8; 4] = p.get(30..34)?.try_into().ok()?;
            (s.into(), d.into(), 14 + ihl)
        }
        [0x86, 0xdd] => {
            let s: [u8; 16] = p.get(22..38)?.try_into().ok()?;
            let d: [u8; 16] = p.get(38..54)?.try_into().ok()?;
            (s.into(), d.into(), 54)
        }
        _ => return None,
    };
    let ports = p.get(l4..l4 + 4)?;
    Some((
        SocketAddr::new(src, u16::from_be_bytes([ports[0], ports[1]])),
        SocketAddr::new(dst, u16::from_be_bytes([ports[2], ports[3]])),
    ))
}

fn flags_of(v: &ServiceValue) -> Vec<&'static str> {
    let mut f = Vec::new();
    for (bit, name) in [
        (SVC_F_AFFINITY, "affinity"),
        (SVC_F_LOCAL_ONLY, "local-only (traffic policy Local)"),
        (SVC_F_SOURCE_RANGES, "source-ranges"),
        (SVC_F_NO_ENDPOINT_DROP, "drop when no endpoint"),
    ] {
        if v.flags & bit != 0 {
            f.push(name);
        }
    }
    f
}

pub fn explain(
    bpffs: &std::path::Path,
    src: SocketAddr,
    dst: SocketAddr,
    proto: u8,
    from: From,
    device: Option<&str>,
) -> Result<Explanation> {
    if device.is_some() && from != From::Outside {
        bail!("--device is for packets from outside (--from outside)");
    }
    if proto == PROTO_ICMP && from != From::Outside {
        bail!(
            "pings are explained as they arrive from outside (--from outside): inside, nothing translates them"
        );
    }
    let ins = Inspection::open(bpffs)?;
    let scope = if from == From::Outside { SCOPE_EXTERNAL } else { SCOPE_INTERNAL };
    let key = ServiceKey::new(dst.ip(), dst.port(), proto, scope);
    let svc = ins.snapshot.services.get(&key).copied();
    let view = ins.services();
    let frontend_view = svc.and_then(|v| {
        view.iter()
            .find(|s| s.service_id == v.service_id)
            .and_then(|s| {
                s.frontends.iter().find(|f| {
                    f.address == dst.to_string()
                        && f.scope == if scope == SCOPE_INTERNAL { "internal" } else { "external" }
                })
            })
            .cloned()
    });
    let mut e = Explanation {
        packet: match proto {
            PROTO_ICMP => format!("{} -> {} {}", src.ip(), dst.ip(), proto_name(proto)),
            _ => format!("{src} -> {dst} {}", proto_name(proto)),
        },
        hook: if from == From::Outside { "tc ingress" } else { "cgroup connect/sendmsg (socket)" },
        device: None,
        notes: Vec::new(),
        service: svc.map(|v| ins.name(v.service_id)),
        frontend: frontend_view.as_ref().map(|f| format!("{} {} ({})", f.kind, f.address, f.scope)),
        flags: svc.as_ref().map(flags_of).unwrap_or_default(),
        candidates: frontend_view.map(|f| f.backends).unwrap_or_default(),
        decided_by: None,
        backend: None,
        rewritten: None,
        snat: false,
        dsr: false,
        verdict: String::new(),
        drop_reason: None,
    };
    if from == From::Pod && ins.sock_host_netns_only()? {
        e.hook = "tc ingress of the pod's device";
        e.notes.push(
            "the socket hooks leave pods' sockets alone (--socket-lb-host-namespace-only): the pod's packets are translated where they leave it (--pod-devices)".into(),
        );
        explain_device(&ins, src, dst, proto, svc, (PROG_TC_FROM_POD, None), &mut e)?;
        return Ok(e);
    }
    if from != From::Outside {
        return Ok(explain_socket(&ins, e, &key, svc));
    }
    let dev = pick_device(bpffs, device, &ins.snapshot.node)?;
    match &dev {
        Some((name, ifindex, true)) => {
            let tx = if xdp_tx_allowed(bpffs, *ifindex) {
                "XDP_TX on: it sends flows to other nodes' backends (and their replies) back out itself when it knows the next hop"
            } else {
                "XDP_TX off (--xdp-tx): it leaves flows to other nodes' backends to tc ingress"
            };
            e.notes.push(format!(
                "XDP is attached on {name} too and makes the same choice; {tx}. Shown here as tc does it"
            ))
        }
        Some(_) => {}
        None => e.notes.push(
            "the agent attached to no device: run as if the packet arrived on loopback".into(),
        ),
    }
    e.device = dev.as_ref().map(|(n, _, _)| n.clone());
    explain_device(&ins, src, dst, proto, svc, (PROG_TC_INGRESS, dev.map(|(_, i, _)| i)), &mut e)?;
    Ok(e)
}

fn explain_socket(
    ins: &Inspection,
    mut e: Explanation,
    key: &ServiceKey,
    svc: Option<ServiceValue>,
) -> Explanation {
    let Some(v) = svc else {
        let marker = ServiceKey::new(key.ip(), 0, 0, SCOPE_INTERNAL);
        e.verdict = if ins.snapshot.services.contains_key(&marker) {
            "connect() refused (ECONNREFUSED): a ClusterIP, but no such port".into()
        } else {
            "not a service: untouched".into()
        };
        return e;
    };
    if e.candidates.is_empty() {
        e.verdict = "connect() refused (ECONNREFUSED): the service has no usable endpoint".into();
        return e;
    }
    e.decided_by = Some(if v.flags & SVC_F_AFFINITY != 0 {
        format!(
            "sessionAffinity per pod network namespace ({} s), else a random Maglev slot per connection",
            v.affinity_timeout_s
        )
    } else {
        "a random Maglev slot per connection: backends in proportion to their slots".into()
    });
    e.verdict =
        "connect() goes straight to the chosen backend; getpeername() shows the service".into();
    e
}

fn explain_device(
    ins: &Inspection,
    src: SocketAddr,
    dst: SocketAddr,
    proto: u8,
    svc: Option<ServiceValue>,
    (program, ifindex): (&str, Option<u32>),
    e: &mut Explanation,
) -> Result<()> {
    let packet = build_packet(src, dst, proto)?;
    let ctx = ifindex.map(skb_ctx);
    let bpffs = ins.bpffs();
    let mut shadow = load_shadow(bpffs)?;
    let dir = maps_pin_dir(bpffs);
    // This flow's live state, copied into the private maps.
    let ct_key = CtKey {
        saddr: addr_from_ip(src.ip()),
        daddr: addr_from_ip(dst.ip()),
        sport_be: src.port().to_be(),
        dport_be: dst.port().to_be(),
        proto,
        _pad8: 0,
        _pad16: 0,
    };
    let live_ct: HashMap<MapData, CtKey, CtValue> =
        HashMap::try_from(Map::LruHashMap(MapData::from_pin(dir.join(MAP_CONNTRACK))?))?;
    let live_entry = live_ct.get(&ct_key, 0).ok();
    {
        let mut ct: HashMap<&mut MapData, CtKey, CtValue> =
            HashMap::try_from(shadow.map_mut(MAP_CONNTRACK).context("no LB_CT")?)?;
        if let Some(v) = live_entry {
            ct.insert(ct_key, v, 0)?;
            let pair = v.pair_key(proto);
            if let Ok(pv) = live_ct.get(&pair, 0) {
                ct.insert(pair, pv, 0)?;
            }
        }
    }
    let mut affinity_note = None;
    if let Some(v) = svc.filter(|v| v.flags & SVC_F_AFFINITY != 0) {
        let live_aff: HashMap<MapData, AffinityKey, AffinityValue> =
            HashMap::try_from(Map::LruHashMap(MapData::from_pin(dir.join(MAP_AFFINITY))?))?;
        let akey = AffinityKey {
            client: addr_from_ip(src.ip()),
            service_id: v.service_id,
            kind: AFFINITY_BY_ADDR,
            _pad8: 0,
            _pad16: 0,
        };
        if let Ok(av) = live_aff.get(&akey, 0) {
            let mut aff: HashMap<&mut MapData, AffinityKey, AffinityValue> =
                HashMap::try_from(shadow.map_mut(MAP_AFFINITY).context("no LB_AFFINITY")?)?;
            aff.insert(akey, av, 0)?;
            affinity_note = Some(format!(
                "sessionAffinity entry of client {} (backend {})",
                src.ip(),
                av.backend_id
            ));
        }
    }
    let prog: &mut SchedClassifier =
        shadow.program_mut(program).with_context(|| format!("no {program}"))?.try_into()?;
    prog.load().with_context(|| format!("loading {program} (root needed)"))?;
    let mut out = vec![0u8; packet.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(&packet),
            data_out: Some(&mut out),
            ctx_in: ctx.as_ref().map(|c| c.as_slice()),
            ..Default::default()
        })
        .with_context(|| format!("running {program} on the packet"))?;
    out.truncate(result.data_size_out as usize);

    let stats: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(shadow.map(MAP_STATS).context("no LB_STATS")?)?;
    let moved = |i: u32| stats.get(&i, 0).map(|v| v.iter().sum::<u64>() > 0).unwrap_or(false);
    e.verdict = match result.return_value {
        0 => "pass to the stack",
        2 => "drop",
        7 => "redirect out of the routed device",
        _ => "other",
    }
    .into();
    if proto == PROTO_ICMP {
        e.verdict = ping_verdict(dst.ip(), &moved);
        return Ok(());
    }
    if moved(STAT_SERVICE_MISS) {
        e.verdict = "not for a frontend: passed untouched".into();
        return Ok(());
    }
    for idx in [
        STAT_DROP_NO_BACKEND,
        STAT_DROP_SOURCE_RANGE,
        STAT_DROP_NAT_EXHAUSTED,
        STAT_DROP_CT_FULL,
        STAT_DROP_NO_NODE_ADDR,
        STAT_DROP_REWRITE,
    ] {
        if moved(idx) {
            e.drop_reason = Some(crate::monitor::why(idx));
        }
    }
    if moved(STAT_REJECT_NO_BACKEND) {
        e.verdict =
            "reject: ICMP port unreachable back to the client (no endpoint anywhere)".into();
        return Ok(());
    }
    if moved(STAT_REJECT_UNKNOWN_PORT) {
        e.verdict =
            "reject: ICMP port unreachable back to the pod (a ClusterIP, but no such port)".into();
        return Ok(());
    }
    if moved(STAT_DROP_UNKNOWN_PORT) {
        e.verdict = "drop: a service address clients outside reach, but no such port (not the \
                     node's own address: the stack would send it back out by its routes)"
            .into();
        e.drop_reason = Some(crate::monitor::why(STAT_DROP_UNKNOWN_PORT));
        return Ok(());
    }
    let private_ct: HashMap<&MapData, CtKey, CtValue> =
        HashMap::try_from(shadow.map(MAP_CONNTRACK).context("no LB_CT")?)?;
    if let Ok(v) = private_ct.get(&ct_key, 0) {
        let b = ins.snapshot.backends.get(&v.backend_id).copied().unwrap_or_default();
        e.backend = Some(SocketAddr::new(b.ip(), b.port()).to_string());
        e.snat = v.flags & CT_F_SNAT != 0;
        e.dsr = v.flags & CT_F_DSR != 0;
        e.decided_by = Some(if moved(STAT_CT_HIT) {
            "existing conntrack entry (an established flow keeps its backend)".into()
        } else if moved(STAT_AFFINITY_HIT) {
            affinity_note.unwrap_or_else(|| "sessionAffinity entry".into())
        } else {
            let table =
                svc.and_then(|s| ins.snapshot.tables.get(&s.table_id).copied()).unwrap_or_default();
            let hash =
                flow_hash(&ct_key.saddr, &ct_key.daddr, ct_key.sport_be, ct_key.dport_be, proto);
            let slot = if table.maglev_size > 0 { hash % table.maglev_size } else { 0 };
            format!(
                "Maglev slot {slot} of {} (flow hash {hash:#010x}) -> backend {}",
                table.maglev_size, v.backend_id
            )
        });
    }
    if let Some((s, d)) = tuple(&out) {
        e.rewritten = Some(format!("{s} -> {d}"));
    }
    Ok(())
}
