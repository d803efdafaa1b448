//! Every map the kernel programs use, with its default size. Names come from lb-common so user
//! space opens exactly these. Sizes are defaults: the agent overrides them at load time.
//! Maps are not pinned by the object itself: the agent pins them under `--bpffs`, and tests load
//! private, unpinned copies.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::*;

#[map(name = "LB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_MAX_FRONTENDS, 0);

// A hash map, not an array: user space replaces a whole value atomically when a table moves,
// so a packet never sees a new offset with an old size.
#[map(name = "LB_TABLES")]
pub static TABLES: HashMap<u32, TableValue> =
    HashMap::with_max_entries(TABLES_PER_SERVICE * DEFAULT_MAX_SERVICES, 0);

#[map(name = "LB_BACKENDS")]
pub static BACKENDS: Array<BackendValue> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

// Two slots per element (see MAGLEV_SLOTS_PER_ENTRY); mmapable so the agent writes tables with
// plain stores instead of one syscall per slot.
#[map(name = "LB_MAGLEV")]
pub static MAGLEV: Array<[u32; 2]> =
    Array::with_max_entries(DEFAULT_MAGLEV_SLOTS / MAGLEV_SLOTS_PER_ENTRY, BPF_F_MMAPABLE);

#[map(name = "LB_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

#[map(name = "LB_SVC_STATS")]
pub static SERVICE_STATS: PerCpuArray<ServiceStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "LB_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_AFFINITY, 0);

#[map(name = "LB_AFF_MATCH")]
// Sized like LB_BACKENDS by the agent: one entry per (affinity service, backend).
pub static AFFINITY_MATCH: HashMap<AffinityMatchKey, u32> =
    HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "LB_SOCK_RNAT")]
pub static SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOCK_REVNAT, 0);

#[map(name = "LB_CT")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_CONNTRACK, 0);

// Written by the agent, read by lbctl; never by the datapath.
#[map(name = "LB_NAMES")]
pub static NAMES: HashMap<u32, ServiceName> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 1);

#[map(name = "LB_NODE")]
pub static NODE: Array<NodeConfig> = Array::with_max_entries(1, 0);

/// Node-wide options (`OPT_*`), written by the agent at start.
#[map(name = "LB_OPTIONS")]
pub static OPTIONS: Array<u32> = Array::with_max_entries(OPT_COUNT, 0);

/// Source ports of local backends, a bit each (see `MAP_REPLY_PORTS`; written by the agent).
#[map(name = "LB_REPLY_PORTS")]
pub static REPLY_PORTS: Array<u64> = Array::with_max_entries(PORT_SET_WORDS, 0);

/// Destination ports tc ingress and XDP may translate, a bit each (see `MAP_INGRESS_PORTS`;
/// written by the agent).
#[map(name = "LB_INGRESS_PORTS")]
pub static INGRESS_PORTS: Array<u64> = Array::with_max_entries(PORT_SET_WORDS, 0);

/// Destination ports of pods' packets `tc_from_pod` may translate, a bit each (see
/// `MAP_POD_PORTS`; written by the agent).
#[map(name = "LB_POD_PORTS")]
pub static POD_PORTS: Array<u64> = Array::with_max_entries(PORT_SET_WORDS, 0);

/// ClusterIPs, a bit per address hash (see `MAP_CLUSTER_IPS`; written by the agent).
#[map(name = "LB_CLUSTER_SET")]
pub static CLUSTER_IPS: Array<u64> = Array::with_max_entries(ADDR_SET_WORDS, 0);

/// Addresses with frontends from outside other than NodePorts, a bit per address hash (see
/// `MAP_EXTERNAL_IPS`; written by the agent).
#[map(name = "LB_EXTERNAL_SET")]
pub static EXTERNAL_IPS: Array<u64> = Array::with_max_entries(ADDR_SET_WORDS, 0);

/// Destination addresses the device hooks may translate, a bit per address hash (see
/// `MAP_FRONTEND_ADDRS`; written by the agent, and by `nat::create` for SNAT sources).
/// Mmapable: the agent adds bits with atomic ORs, as `nat::create` does.
#[map(name = "LB_FRONTEND_SET")]
pub static FRONTEND_ADDRS: Array<u64> = Array::with_max_entries(ADDR_SET_WORDS, BPF_F_MMAPABLE);

/// Source ports of packets to pods `tc_to_pod` may translate, a bit each (see
/// `MAP_POD_REPLY_PORTS`; written by the agent).
#[map(name = "LB_POD_REPLY_PORTS")]
pub static POD_REPLY_PORTS: Array<u64> = Array::with_max_entries(PORT_SET_WORDS, 0);

/// Devices where XDP may answer with XDP_TX (the agent decides per device: see `--xdp-tx`).
#[map(name = "LB_XDP_TX")]
pub static XDP_TX_DEVICES: HashMap<u32, u32> = HashMap::with_max_entries(MAX_XDP_DEVICES, 0);

/// Devices the device hooks are on, for SNAT sources (see `MAP_SNAT_DEVICES`; written by the
/// agent).
#[map(name = "LB_SNAT_DEVICES")]
pub static SNAT_DEVICES: HashMap<u32, u32> = HashMap::with_max_entries(MAX_XDP_DEVICES, 0);

/// Whether SNAT sources are chosen by route (see `MAP_SNAT_BY_ROUTE`; written by the agent).
#[map(name = "LB_SNAT_BY_ROUTE")]
pub static SNAT_BY_ROUTE: Array<u32> = Array::with_max_entries(1, 0);

/// Events for `lbctl monitor` (see monitor.rs). Pinned, so lbctl can read them.
#[map(name = "LB_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// A value built on the stack for a map update, 8-byte aligned. Misaligned accesses are allowed
/// in this build (`lb-agent/build.rs`), so LLVM may merge neighbouring 4-byte stores into one
/// 8-byte store, which the verifier refuses on the stack unless it is aligned.
#[repr(C, align(8))]
pub struct Aligned<T>(pub T);

/// LPM tries must be created without preallocation.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "LB_SRC_RANGES")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u32> =
    LpmTrie::with_max_entries(DEFAULT_MAX_SOURCE_RANGES, BPF_F_NO_PREALLOC);

/// Per-CPU scratch space for values too big for the 512-byte BPF stack. Device hooks run with
/// bottom halves off and do not nest on a CPU, so one slot per CPU is enough (socket hooks,
/// which may be preempted, do not use it). Never pinned: it holds no state between packets.
#[repr(C)]
pub struct Scratch {
    pub forward_key: CtKey,
    pub reply_key: CtKey,
    pub value: CtValue,
    /// A copy of an expired entry being removed (conntrack::reclaim_if_expired).
    pub expired: CtValue,
    /// Where a packet XDP sends back out goes (fib.rs).
    pub next_hop: NextHop,
    /// A new flow's client, for session affinity (device.rs: off the stack of a call chain
    /// that ends in `nat::create`).
    pub client: AffinityKey,
    /// A new flow's SNAT source (`fib::snat_source`, read by `nat::create`).
    pub snat_src: Addr,
    /// The route lookup's parameters (`fib::next_hop`): 64 bytes off the stack of the
    /// deepest call chain (tc -> new_flow -> snat_source), which older verifiers (6.1, stack
    /// frames rounded up to 32 bytes) found over 512 bytes.
    pub fib: aya_ebpf::bindings::bpf_fib_lookup,
}

/// A route's egress device and the MACs of its next hop (destination then source, as they
/// start an Ethernet header).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NextHop {
    pub ifindex: u32,
    pub macs: [u8; 12],
    /// The route's MTU (0: not known, not checked).
    pub mtu: u32,
    /// The source address the kernel prefers for the route (all zero: not known), in the
    /// family's own form (an IPv4 address in the last word).
    pub src: Addr,
}

// fib.rs copies it as words.
const _: () = assert!(size_of::<NextHop>() == 36 && align_of::<NextHop>() == 4);

#[repr(C)]
pub struct NextHopKey {
    /// The device the packet arrived on: routing decides as if it came in there.
    pub ifindex: u32,
    pub family: u32,
    pub dst: Addr,
}

#[repr(C)]
pub struct NextHopEntry {
    pub hop: NextHop,
    pub looked_up_ns: u64,
}

/// Next hops found by bpf_fib_lookup, reused for a second (see fib.rs). Not pinned: a cache.
#[map(name = "LB_NEXT_HOPS")]
pub static NEXT_HOPS: LruHashMap<NextHopKey, NextHopEntry> = LruHashMap::with_max_entries(4096, 0);

#[map(name = "LB_SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Where a rejected packet is rebuilt into an ICMP error or TCP reset (same rules as `SCRATCH`).
#[map(name = "LB_REJECT_BUF")]
pub static REJECT_BUF: PerCpuArray<[u8; 512]> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's ICMP error allowance (see reject.rs). Not pinned: a restart refills it.
#[map(name = "LB_ICMP_RATE")]
pub static ICMP_RATE: PerCpuArray<crate::reject::IcmpBucket> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's last clock reading (see clock.rs). Not pinned: a cache.
#[map(name = "LB_CLOCK")]
pub static CLOCK: PerCpuArray<crate::clock::ClockCache> = PerCpuArray::with_max_entries(1, 0);

/// The ports of datagrams whose first fragment was translated, for their later fragments
/// (see fragment.rs). Not pinned: fragments of one datagram arrive within moments.
#[map(name = "LB_FRAGS")]
pub static FRAGMENTS: LruHashMap<crate::fragment::FragKey, crate::fragment::FragPorts> =
    LruHashMap::with_max_entries(crate::fragment::MAX_DATAGRAMS, 0);

/// The packet being handled by a device hook (same rules as `SCRATCH`).
#[map(name = "LB_FLOW")]
pub static FLOW: PerCpuArray<crate::packet::Flow> = PerCpuArray::with_max_entries(1, 0);
