//! Every name, limit and flag that the kernel programs and user space must agree on, in one place.

/// Layout version of every pinned map. Bump it whenever a key or value layout or a map's meaning
/// changes: the agent pins under a directory named after it, so an upgraded agent never
/// misreads the maps of an older one.
pub const MAP_ABI_VERSION: u32 = 1;

// ---- map names (at most 15 bytes: the kernel's object-name limit) ----
/// Frontends: [`crate::ServiceKey`] -> [`crate::ServiceValue`].
pub const MAP_SERVICES: &str = "LB_SERVICES";
/// Backend sets: table id (`u32`) -> [`crate::TableValue`].
pub const MAP_TABLES: &str = "LB_TABLES";
/// Backends: backend id (`u32` index) -> [`crate::BackendValue`].
pub const MAP_BACKENDS: &str = "LB_BACKENDS";
/// Maglev lookup tables of every backend set, back to back: slot -> backend id (two slots per
/// element, memory-mapped by the agent).
pub const MAP_MAGLEV: &str = "LB_MAGLEV";
/// sessionAffinity state (LRU): [`crate::AffinityKey`] -> [`crate::AffinityValue`].
pub const MAP_AFFINITY: &str = "LB_AFFINITY";
/// Which backends belong to which affinity service: [`crate::AffinityMatchKey`] -> `u32`.
/// An affinity entry whose backend left the service is ignored.
pub const MAP_AFFINITY_MATCH: &str = "LB_AFF_MATCH";
/// Socket-level reverse translation (LRU): [`crate::SockRevNatKey`] -> [`crate::SockRevNatValue`],
/// so getpeername() and UDP recvmsg() show the service address, not the backend.
pub const MAP_SOCK_REVNAT: &str = "LB_SOCK_RNAT";
/// Per-CPU global counters, indexed by the `STAT_*` constants.
pub const MAP_STATS: &str = "LB_STATS";
/// Per-CPU per-service counters, indexed by service id: [`crate::ServiceStats`].
pub const MAP_SERVICE_STATS: &str = "LB_SVC_STATS";

// ---- program names (the Rust function names in lb-ebpf) ----
/// tc ingress on the node's external devices.
pub const PROG_TC_INGRESS: &str = "tc_ingress";
/// XDP on the node's external devices (acceleration of tc ingress).
pub const PROG_XDP_INGRESS: &str = "xdp_ingress";
/// cgroup socket hooks: (program name, attach point). Every process in the attached cgroup
/// reaches services through them.
pub const PROG_SOCK: &[(&str, &str)] = &[
    ("sock_connect4", "connect4"),
    ("sock_connect6", "connect6"),
    ("sock_sendmsg4", "sendmsg4"),
    ("sock_sendmsg6", "sendmsg6"),
    ("sock_recvmsg4", "recvmsg4"),
    ("sock_recvmsg6", "recvmsg6"),
    ("sock_getpeername4", "getpeername4"),
    ("sock_getpeername6", "getpeername6"),
];

// ---- default map sizes (the agent can override each with a flag) ----
/// Service ports (per IP family): service ids, per-service counters.
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
/// Frontend entries (a service port has one per address and scope it answers on).
pub const DEFAULT_MAX_FRONTENDS: u32 = 262_144;
pub const DEFAULT_MAX_BACKENDS: u32 = 131_072;
/// Backend sets per service port: internal, cluster, external (`LB_TABLES` holds this many times
/// the number of service ids).
pub const TABLES_PER_SERVICE: u32 = 3;
/// sessionAffinity entries (client, service).
pub const DEFAULT_MAX_AFFINITY: u32 = 65_536;
/// Socket reverse-translation entries (one per connected socket or UDP peer).
pub const DEFAULT_MAX_SOCK_REVNAT: u32 = 262_144;
/// Total Maglev slots shared by all backend sets (4 bytes each).
pub const DEFAULT_MAGLEV_SLOTS: u32 = 1 << 22;
/// `LB_MAGLEV` holds two slots per element: array elements are 8-byte strided, so the map's
/// memory is one dense array of u32 slots that the agent writes through a shared mapping.
pub const MAGLEV_SLOTS_PER_ENTRY: u32 = 2;
/// The kernel's `BPF_F_MMAPABLE` map flag.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

// ---- L4 protocols (IANA numbers, as in the IP header) ----
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

// ---- service scope: which traffic a frontend entry serves ----
/// Traffic arriving on a node device from outside (tc/XDP): externalTrafficPolicy applies.
pub const SCOPE_EXTERNAL: u8 = 0;
/// Traffic from processes of this node (socket hooks): internalTrafficPolicy applies.
pub const SCOPE_INTERNAL: u8 = 1;

// ---- ServiceValue.flags ----
/// sessionAffinity ClientIP.
pub const SVC_F_AFFINITY: u32 = 1 << 0;
/// Backends are this node's only (traffic policy Local): client address preserved.
pub const SVC_F_LOCAL_ONLY: u32 = 1 << 1;
/// loadBalancerSourceRanges are set for this frontend.
pub const SVC_F_SOURCE_RANGES: u32 = 1 << 2;
/// With no usable backend, drop silently (ETP Local without local endpoints) instead of rejecting.
pub const SVC_F_NO_ENDPOINT_DROP: u32 = 1 << 3;
/// Not a frontend: marks a ClusterIP (key with port 0, protocol 0) so that connections to its
/// other ports are refused rather than sent off the node.
pub const SVC_F_ADDR_MARKER: u32 = 1 << 4;
// Frontend kind, for counters, `lbctl explain` and kind-specific rules.
pub const SVC_F_CLUSTER_IP: u32 = 1 << 8;
pub const SVC_F_NODE_PORT: u32 = 1 << 9;
pub const SVC_F_EXTERNAL_IP: u32 = 1 << 10;
pub const SVC_F_LOAD_BALANCER: u32 = 1 << 11;

// ---- BackendValue.flags ----
/// The backend runs on this node.
pub const BE_F_LOCAL: u8 = 1 << 0;
/// The endpoint is terminating (serving, not ready): existing flows only.
pub const BE_F_TERMINATING: u8 = 1 << 1;

// ---- LB_STATS indices ----
/// Packets seen by tc ingress.
pub const STAT_TC_INGRESS_PACKETS: u32 = 0;
/// A packet whose destination is a frontend.
pub const STAT_SERVICE_HIT: u32 = 1;
/// An IPv4/IPv6 TCP/UDP packet whose destination is no frontend (passed untouched).
pub const STAT_SERVICE_MISS: u32 = 2;
/// Not IPv4/IPv6 (ARP, VLAN-tagged, ...): passed untouched.
pub const STAT_NOT_IP: u32 = 3;
/// IP, but neither TCP nor UDP (ICMP, ...): passed untouched.
pub const STAT_OTHER_L4: u32 = 4;
/// A non-first IP fragment: no ports to look up, passed untouched.
pub const STAT_FRAGMENT: u32 = 5;
/// Truncated or inconsistent headers: passed to the stack, which rejects them itself.
pub const STAT_MALFORMED: u32 = 6;
/// Packets seen by XDP.
pub const STAT_XDP_PACKETS: u32 = 7;
/// connect()/sendmsg() to a frontend translated to a backend.
pub const STAT_SOCK_TRANSLATED: u32 = 8;
/// connect()/sendmsg() refused: the service has no usable endpoint.
pub const STAT_SOCK_NO_BACKEND: u32 = 9;
/// connect()/sendmsg() refused: a ClusterIP, but no service port there.
pub const STAT_SOCK_UNKNOWN_PORT: u32 = 10;
/// A Maglev slot named a backend that is not in LB_BACKENDS (never expected: counted, refused).
pub const STAT_BACKEND_MISSING: u32 = 11;
/// The backend came from a live sessionAffinity entry.
pub const STAT_AFFINITY_HIT: u32 = 12;
/// getpeername()/recvmsg() address put back to the service address.
pub const STAT_SOCK_REVERSED: u32 = 13;
/// Number of slots in LB_STATS (room for the counters later programs add).
pub const STAT_COUNT: u32 = 64;

/// Human-readable names of the `STAT_*` indices, for lbctl and metrics.
pub const STAT_NAMES: &[(u32, &str)] = &[
    (STAT_TC_INGRESS_PACKETS, "tc_ingress_packets"),
    (STAT_SERVICE_HIT, "service_hit"),
    (STAT_SERVICE_MISS, "service_miss"),
    (STAT_NOT_IP, "not_ip"),
    (STAT_OTHER_L4, "other_l4"),
    (STAT_FRAGMENT, "fragment"),
    (STAT_MALFORMED, "malformed"),
    (STAT_XDP_PACKETS, "xdp_packets"),
    (STAT_SOCK_TRANSLATED, "sock_translated"),
    (STAT_SOCK_NO_BACKEND, "sock_no_backend"),
    (STAT_SOCK_UNKNOWN_PORT, "sock_unknown_port"),
    (STAT_BACKEND_MISSING, "backend_missing"),
    (STAT_AFFINITY_HIT, "affinity_hit"),
    (STAT_SOCK_REVERSED, "sock_reversed"),
];
