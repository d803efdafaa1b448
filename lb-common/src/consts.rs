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
/// Connection tracking and NAT of device-hook flows (LRU): [`crate::CtKey`] -> [`crate::CtValue`].
/// Each flow has two entries: the original direction and the reply as it arrives.
pub const MAP_CONNTRACK: &str = "LB_CT";
/// loadBalancerSourceRanges (LPM trie): prefix of [`crate::SourceRangeKey`] -> `u32` (unused).
pub const MAP_SOURCE_RANGES: &str = "LB_SRC_RANGES";
/// Service port names for lbctl: service id -> [`crate::ServiceName`]. Kept in a map so they
/// live next to the other pinned maps and outlive the agent.
pub const MAP_NAMES: &str = "LB_NAMES";
/// This node's addresses for SNAT (array of one [`crate::NodeConfig`]).
pub const MAP_NODE: &str = "LB_NODE";
/// Devices (by interface index) XDP may send packets out of (XDP_TX, XDP_REDIRECT).
pub const MAP_XDP_TX: &str = "LB_XDP_TX";
/// Devices (by interface index) the device hooks are on: a SNATed flow whose route to its
/// backend leaves by one takes that route's source address (its replies come back through the
/// hooks there); by any other, the node's primary address. Used only while `MAP_SNAT_BY_ROUTE`
/// says so.
pub const MAP_SNAT_DEVICES: &str = "LB_SNAT_DEVICES";
/// One word, set when the hooks are on two devices or more: only then are SNAT sources chosen
/// by route (`MAP_SNAT_DEVICES`); with one device, flows take the node's primary address
/// without a route lookup. An array, read in a few instructions on every new SNATed flow.
pub const MAP_SNAT_BY_ROUTE: &str = "LB_SNAT_BY_ROUTE";
/// Capacity of LB_XDP_TX: devices one agent attaches to.
pub const MAX_XDP_DEVICES: u32 = 64;
/// Node-wide datapath options, indexed by the `OPT_*` constants (0 = off).
pub const MAP_OPTIONS: &str = "LB_OPTIONS";
pub const OPT_COUNT: u32 = 16;
/// Switches of the device hooks, one bit each (`MODE_*`). Was a single switch (a reset for
/// TCP), which older programs test as non-zero: `LB_OPTIONS` has no free slot.
pub const OPT_DEVICE_MODES: u32 = 0;
/// Answer a TCP packet to a service without endpoints with a TCP reset, not ICMP.
pub const MODE_TCP_RESET: u32 = 1;
/// Direct server return for TCP (`--lb-mode hybrid`, Cilium's name): a new flow from outside to
/// another node's backend is not SNATed; its SYN carries the frontend to the backend's node (an
/// IPv4 option, `DSR_OPTION_*`; an IPv6 destination options header, `DSR6_*`), which answers
/// the client directly from the frontend's address. UDP and SCTP flows are SNATed as before.
/// Every node answers such a SYN from the frontend it names, whatever its own mode.
pub const MODE_DSR: u32 = 2;
/// The IPv4 option a DSR flow's SYN carries to the backend's node: type, length 8, the
/// frontend's port and address (network order). 158: copied on fragmentation, control class,
/// number 30, one of the values RFC 4727 sets aside for experiments.
pub const DSR_OPTION_TYPE: u8 = 0x9e;
pub const DSR_OPTION_LEN: u8 = 8;
/// IPv6: a destination options header of 24 bytes (length field 2) holding one option: type,
/// length 18, the frontend's port and address, then a 2-byte PadN. 0x1e: skipped by nodes
/// that do not know it, not changed en route, one of RFC 4727's experimental values.
pub const DSR6_OPTION_TYPE: u8 = 0x1e;
pub const DSR6_OPTION_LEN: u8 = 18;
pub const DSR6_HEADER_LEN: u8 = 24;
/// SNAT source ports, first and last (0: NAT_PORT_MIN/NAT_PORT_MAX).
pub const OPT_NAT_PORT_MIN: u32 = 1;
pub const OPT_NAT_PORT_MAX: u32 = 2;
/// Set once `MAP_REPLY_PORTS` holds the port of every local backend that may have flows (the
/// agent seeds it at start): until then tc egress looks every packet up in conntrack.
pub const OPT_REPLY_PORTS_READY: u32 = 3;
/// Ports local backends answer from, one bit per port (64 per word): tc egress looks a packet
/// up in conntrack only when its source port is set. Bits are only ever added, so a flow of a
/// backend or service that is gone keeps its reverse translation.
pub const MAP_REPLY_PORTS: &str = "LB_REPLY_PORTS";
/// Set once `MAP_INGRESS_PORTS` holds every port a packet arriving on a device may need
/// translating for: until then tc ingress and XDP look every packet up.
pub const OPT_INGRESS_PORTS_READY: u32 = 4;
/// A second bit of `OPT_INGRESS_PORTS_READY` and `OPT_POD_PORTS_READY` (whose other readers
/// test for non-zero): set once `MAP_FRONTEND_ADDRS` is complete, after the agent's programs
/// are attached (before, an older build's made SNAT flows without setting their sources'
/// bits). `LB_OPTIONS` has no free slot, and its size is part of its pinned shape.
pub const READY_FRONTEND_ADDRS: u32 = 2;
/// Conntrack lifetimes in seconds the agent sets (`--conntrack-tcp-timeout-established`,
/// `--conntrack-udp-timeout`; 0: the default). Read through [`CtTimeouts`].
pub const OPT_CT_TCP_ESTABLISHED_S: u32 = 5;
pub const OPT_CT_UDP_S: u32 = 6;
/// The agent's (the host's) network namespace cookie, low and high 32 bits: socket hooks
/// translate a loopback NodePort (127.0.0.1) only there, as kube-proxy's rules live only there.
pub const OPT_HOST_NETNS_COOKIE_LO: u32 = 7;
pub const OPT_HOST_NETNS_COOKIE_HI: u32 = 8;
/// The host network namespace cookie's value when the kernel cannot tell the agent its own
/// namespace's (no `SO_NETNS_COOKIE` before Linux 5.14) and the agent runs in the initial
/// namespace: the socket hooks then ask `bpf_get_netns_cookie(NULL)`, the initial one's.
pub const HOST_NETNS_INITIAL: u64 = u64::MAX;

/// The `.rodata` constant that tells the programs which kernel features to use
/// ([`KF_COARSE_CLOCK`] and the rest; all by default). The agent probes the kernel and sets it
/// before loading; the verifier folds it, so a branch using what the kernel lacks is never
/// checked and is removed.
pub const GLOBAL_KERNEL_FEATURES: &str = "LB_KERNEL_FEATURES";
/// `bpf_ktime_get_coarse_ns` (Linux 5.11); without it, `bpf_ktime_get_ns`.
pub const KF_COARSE_CLOCK: u32 = 1;
/// `bpf_set_retval` in socket hooks (Linux 5.18); without it a refused connect() fails with
/// EPERM instead of ECONNREFUSED.
pub const KF_SET_RETVAL: u32 = 2;
/// Atomic OR on map values (BPF_ATOMIC, Linux 5.12); without it the datapath does not set SNAT
/// sources' bits in `MAP_FRONTEND_ADDRS`, and the agent leaves that filter off.
pub const KF_ATOMICS: u32 = 4;
pub const KF_ALL: u32 = KF_COARSE_CLOCK | KF_SET_RETVAL | KF_ATOMICS;
/// How long a half-closed TCP flow (one side sent FIN) lives idle, in seconds
/// (`--conntrack-tcp-timeout-close-wait`; 0: the default). Read through [`CtTimeouts`].
pub const OPT_CT_TCP_CLOSE_WAIT_S: u32 = 12;
/// How long a UDP flow that has seen a reply lives idle, in seconds
/// (`--conntrack-udp-timeout-stream`; 0: as `OPT_CT_UDP_S`). Read through [`CtTimeouts`].
pub const OPT_CT_UDP_STREAM_S: u32 = 13;
/// Set: the socket hooks translate only sockets of the host's network namespace
/// (`--socket-lb-host-namespace-only`); pods' service traffic is translated per packet on
/// their devices (`tc_from_pod`), where a service mesh's sidecar redirect still sees the
/// service address.
pub const OPT_SOCK_HOST_NETNS_ONLY: u32 = 14;
/// Set once `MAP_POD_PORTS` and `MAP_POD_REPLY_PORTS` are complete (as
/// `OPT_INGRESS_PORTS_READY`).
pub const OPT_POD_PORTS_READY: u32 = 15;
/// Destination ports of packets tc ingress and XDP may translate, one bit per port: external
/// frontends' ports (NodePort, ExternalIP, LoadBalancer) and the SNAT port range (replies of
/// remote backends). A packet to any other port skips both lookups. Only ever added to, as
/// `MAP_REPLY_PORTS`.
pub const MAP_INGRESS_PORTS: &str = "LB_INGRESS_PORTS";
/// Destination ports `tc_from_pod` may translate, one bit per port: internal frontends' ports
/// (what pods connect to) and the SNAT port range (answers of a pod that reached itself
/// through a service). Only ever added to, as `MAP_INGRESS_PORTS`.
pub const MAP_POD_PORTS: &str = "LB_POD_PORTS";
/// Source ports `tc_to_pod` may translate, one bit per port: every backend's, local or not
/// (replies to pods come from them). Only ever added to, as `MAP_REPLY_PORTS`.
pub const MAP_POD_REPLY_PORTS: &str = "LB_POD_REPLY_PORTS";
/// ClusterIPs, one bit per address hash ([`crate::addr_bit`]): `tc_from_pod` asks whether a
/// pod's packet to a port no pod frontend has is to a ClusterIP (which refuses it) only when
/// its destination's bit is set. Complete with `OPT_POD_PORTS_READY`; only ever added to, as
/// `MAP_POD_PORTS` (a stale bit costs a lookup, never a wrong answer).
pub const MAP_CLUSTER_IPS: &str = "LB_CLUSTER_SET";
/// Addresses with frontends from outside other than NodePorts (LoadBalancer IPs, ExternalIPs,
/// ClusterIPs with `--external-clusterip`), one bit per address hash: tc ingress and XDP ask
/// whether a packet to a port or protocol no frontend has is to such an address (which drops
/// it) only when its destination's bit is set. Complete with `OPT_INGRESS_PORTS_READY`; only
/// ever added to, as `MAP_CLUSTER_IPS`.
pub const MAP_EXTERNAL_IPS: &str = "LB_EXTERNAL_SET";
/// The address sets of builds before 2026-12-06 (`LB_CLUSTER_IPS`, `LB_EXTERNAL_IPS`): 65,536
/// bits, by a 16-bit fold of the address, which tens of thousands of addresses filled. An
/// agent removes their pins once its own programs are attached (new names: an agent rolled
/// back to an older build finds, or makes, its own set again).
pub const RETIRED_ADDRESS_SETS: [(&str, &str); 2] =
    [("LB_CLUSTER_IPS", MAP_CLUSTER_IPS), ("LB_EXTERNAL_IPS", MAP_EXTERNAL_IPS)];
/// Destination addresses of packets the device hooks (tc ingress, XDP, `tc_from_pod`) may
/// translate, one bit per address hash: every frontend's address (ClusterIPs, NodePorts' node
/// addresses, LoadBalancer IPs, ExternalIPs) and every SNAT source (replies to SNATed flows
/// come back to it; the datapath sets its bit when it makes such a flow). A packet to a
/// frontend's port but another address (pod to pod traffic to a port a service exposes too)
/// skips the lookups. Complete with [`READY_FRONTEND_ADDRS`]; only ever added to, as
/// `MAP_INGRESS_PORTS`.
pub const MAP_FRONTEND_ADDRS: &str = "LB_FRONTEND_SET";
/// Words of a port bit set (`MAP_REPLY_PORTS`, `MAP_INGRESS_PORTS`): a bit per port.
pub const PORT_SET_WORDS: u32 = 65_536 / 64;
/// Bits of an address bit set (`MAP_CLUSTER_IPS`, `MAP_EXTERNAL_IPS`; [`crate::addr_bit`]):
/// 100,000 addresses set under a tenth of them, so most other destinations pay no lookup.
/// 128 KiB a set.
pub const ADDR_SET_BITS: u32 = 1 << 20;
pub const ADDR_SET_WORDS: u32 = ADDR_SET_BITS / 64;
/// Per-CPU global counters, indexed by the `STAT_*` constants.
pub const MAP_STATS: &str = "LB_STATS";
/// Per-CPU per-service counters, indexed by service id: [`crate::ServiceStats`].
pub const MAP_SERVICE_STATS: &str = "LB_SVC_STATS";

// ---- program names (the Rust function names in lb-ebpf) ----
/// tc ingress on the node's external devices.
pub const PROG_TC_INGRESS: &str = "tc_ingress";
/// tc egress on the same devices: replies of local backends get the frontend address back.
pub const PROG_TC_EGRESS: &str = "tc_egress";
/// XDP on the node's external devices (acceleration of tc ingress).
pub const PROG_XDP_INGRESS: &str = "xdp_ingress";
/// tc ingress on the node's side of a pod's device (`--pod-devices`): the pod's packets to
/// ClusterIPs and other service addresses, translated per packet (the socket hooks leave pods'
/// sockets alone with `--socket-lb-host-namespace-only`).
pub const PROG_TC_FROM_POD: &str = "tc_from_pod";
/// tc egress on the same devices: replies to the pod get their frontend back as source.
pub const PROG_TC_TO_POD: &str = "tc_to_pod";
/// Programs that do nothing (benchmark floor; never attached).
pub const PROG_BENCH_XDP_NOOP: &str = "bench_xdp_noop";
pub const PROG_BENCH_TC_NOOP: &str = "bench_tc_noop";
/// Programs that do the least an established flow's packet needs (benchmark; never attached).
pub const PROG_BENCH_TC_LEAST_NAT: &str = "bench_tc_least_nat";
pub const PROG_BENCH_XDP_LEAST_NAT: &str = "bench_xdp_least_nat";
/// Programs that do the least a new flow's first packet needs (benchmark; never attached).
pub const PROG_BENCH_TC_LEAST_FIRST: &str = "bench_tc_least_first";
pub const PROG_BENCH_XDP_LEAST_FIRST: &str = "bench_xdp_least_first";
/// tc ingress on a skb marked verified (CHECKSUM_UNNECESSARY) first (tests, benchmark; never
/// attached).
pub const PROG_BENCH_TC_INGRESS_VERIFIED: &str = "bench_tc_ingress_verified";
/// The backend the least-first programs send every new flow to (choosing one is not part of
/// the least): an IPv4 address and a port.
pub const BENCH_LEAST_BACKEND4: [u8; 4] = [10, 1, 0, 5];
pub const BENCH_LEAST_BACKEND_PORT: u16 = 8080;
/// Every benchmark-only program of the object: the agent neither loads nor attaches them.
pub const PROG_BENCH: &[&str] = &[
    PROG_BENCH_XDP_NOOP,
    PROG_BENCH_TC_NOOP,
    PROG_BENCH_TC_LEAST_NAT,
    PROG_BENCH_XDP_LEAST_NAT,
    PROG_BENCH_TC_LEAST_FIRST,
    PROG_BENCH_XDP_LEAST_FIRST,
    PROG_BENCH_TC_INGRESS_VERIFIED,
];
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
/// loadBalancerSourceRanges entries (CIDR, service port).
pub const DEFAULT_MAX_SOURCE_RANGES: u32 = 16_384;
/// Conntrack entries (two per flow).
pub const DEFAULT_MAX_CONNTRACK: u32 = 524_288;
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
pub const PROTO_SCTP: u8 = 132;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
/// A transport protocol's name, as Kubernetes spells the ones services carry.
pub const fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        PROTO_SCTP => "SCTP",
        PROTO_ICMP => "ICMP",
        PROTO_ICMPV6 => "ICMPv6",
        _ => "?",
    }
}

/// ICMP and ICMPv6 echo request types.
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;

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
/// Not a frontend: marks a service address (key with port 0, protocol 0) so that packets to
/// its other ports are not sent off the node: internal scope, a ClusterIP (refused); external
/// scope, an address outside clients reach other than a NodePort's (dropped).
pub const SVC_F_ADDR_MARKER: u32 = 1 << 4;
/// An external marker's address answers ICMP echo requests (`--answer-service-pings`).
pub const SVC_F_ANSWER_PING: u32 = 1 << 5;
// Frontend kind, for counters, `lbctl explain` and kind-specific rules.
pub const SVC_F_CLUSTER_IP: u32 = 1 << 8;
pub const SVC_F_NODE_PORT: u32 = 1 << 9;
pub const SVC_F_EXTERNAL_IP: u32 = 1 << 10;
pub const SVC_F_LOAD_BALANCER: u32 = 1 << 11;

// ---- CtValue.flags ----
/// A reply-direction entry (its rewrite restores the frontend for the client).
pub const CT_F_REPLY: u8 = 1 << 0;
/// The flow's source was rewritten to a node address (remote backend, policy Cluster).
pub const CT_F_SNAT: u8 = 1 << 1;
/// Direct server return (`MODE_DSR`): on the node that chose the backend, the forward entry of
/// a flow sent on to another node with its client's address (no reply entry: replies go from
/// the backend's node to the client); on the backend's node, the reply entry its SYN's option
/// made, which gives the backend's answers the frontend's address. A FIN closes such a flow
/// (each node sees one direction only: half-closing cannot be told from closing).
pub const CT_F_DSR: u8 = 1 << 2;

// ---- CtValue.state ----
// Values are stored in pinned maps: new states take new numbers, and order comes from
// `ct_state_progress`, not from the numbers.
pub const CT_STATE_NEW: u8 = 0;
/// TCP: the handshake's ACK seen. UDP: a reply seen (a stream, netfilter's "assured").
pub const CT_STATE_ESTABLISHED: u8 = 1;
/// FIN seen both ways: kept briefly for the last packets.
pub const CT_STATE_CLOSING: u8 = 2;
/// RST seen: no TIME_WAIT follows a reset, so the flow's entries (and its SNAT port) go soon.
pub const CT_STATE_RESET: u8 = 3;
/// A SNATed flow whose backend sent the first FIN: the backend keeps the tuple (node address,
/// SNAT port) in TIME_WAIT, so the port must not serve another client meanwhile. Its SYN would
/// meet the old connection and get an ACK instead of a SYN-ACK (RFC 5961), and the client
/// would reset and retry a second later.
pub const CT_STATE_TIME_WAIT: u8 = 4;
/// Half-closed by the client (its FIN seen, none from the backend yet): the backend may go on
/// sending for as long as it likes (a response streamed after the request's end), so the
/// flow lives like an open one, as with kube-proxy (netfilter's CLOSE_WAIT, which kube-proxy
/// stretches to an hour) and Cilium (the regular lifetime until both sides closed).
pub const CT_STATE_FIN_CLIENT: u8 = 5;
/// Half-closed by the backend (its FIN seen, none from the client yet).
pub const CT_STATE_FIN_BACKEND: u8 = 6;

/// How far a TCP flow has come, to compare states: a flow's two entries only ever move
/// forward (a new SYN on an ended tuple aside).
#[inline(always)]
pub const fn ct_state_progress(state: u8) -> u8 {
    match state {
        CT_STATE_NEW => 0,
        CT_STATE_ESTABLISHED => 1,
        CT_STATE_FIN_CLIENT | CT_STATE_FIN_BACKEND => 2,
        CT_STATE_CLOSING => 3,
        CT_STATE_RESET => 4,
        _ => 5, // CT_STATE_TIME_WAIT
    }
}

/// Whether a TCP flow in this state has ended (both FINs, or a reset): what is left are its
/// last packets, and a new SYN on its tuple opens a new connection.
#[inline(always)]
pub const fn ct_state_ended(state: u8) -> bool {
    ct_state_progress(state) >= ct_state_progress(CT_STATE_CLOSING)
}

// ---- conntrack lifetimes (seconds without traffic) ----
pub const CT_TIMEOUT_TCP_SYN_S: u64 = 60;
pub const CT_TIMEOUT_TCP_ESTABLISHED_S: u64 = 6 * 3600;
pub const CT_TIMEOUT_TCP_CLOSING_S: u64 = 10;
/// Half-closed flows: kube-proxy's `--conntrack-tcp-timeout-close-wait` default.
pub const CT_TIMEOUT_TCP_CLOSE_WAIT_S: u64 = 3600;
pub const CT_TIMEOUT_TCP_RESET_S: u64 = 1;
/// Linux's TIME_WAIT (TCP_TIMEWAIT_LEN), which pods' kernels keep.
pub const CT_TIMEOUT_TCP_TIME_WAIT_S: u64 = 60;
pub const CT_TIMEOUT_UDP_S: u64 = 60;
/// SCTP, as netfilter times it (kube-proxy sets no SCTP lifetime): an association answered
/// lives 210 s without a packet (its heartbeats come every 30 s and more); one not yet
/// answered, retrying its INIT, 30 s; one ended (SHUTDOWN COMPLETE, ABORT) 10 s and 1 s,
/// TCP's closing and reset lifetimes.
pub const CT_TIMEOUT_SCTP_ESTABLISHED_S: u64 = 210;
pub const CT_TIMEOUT_SCTP_INIT_S: u64 = 30;

/// No lifetime is shorter (the reset's; the agent refuses shorter configured ones): an entry
/// seen this recently is live whatever its state, without reading the configuration.
pub const CT_MIN_LIFETIME_S: u64 = CT_TIMEOUT_TCP_RESET_S;

#[inline(always)]
const fn or_default(configured_s: u32, default_s: u64) -> u64 {
    if configured_s == 0 { default_s } else { configured_s as u64 }
}

/// The conntrack lifetimes an operator may change, as stored in `LB_OPTIONS` (seconds; 0
/// stands for the default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtTimeouts {
    pub tcp_established_s: u32,
    pub udp_s: u32,
    pub tcp_close_wait_s: u32,
    pub udp_stream_s: u32,
}

impl CtTimeouts {
    /// How long an entry of this protocol and state lives without traffic (see
    /// [`CtTimeouts::expired`]).
    #[inline(always)]
    pub const fn lifetime_s(&self, proto: u8, state: u8) -> u64 {
        if proto == PROTO_SCTP {
            return match state {
                CT_STATE_ESTABLISHED => CT_TIMEOUT_SCTP_ESTABLISHED_S,
                CT_STATE_CLOSING => CT_TIMEOUT_TCP_CLOSING_S,
                CT_STATE_RESET => CT_TIMEOUT_TCP_RESET_S,
                _ => CT_TIMEOUT_SCTP_INIT_S,
            };
        }
        if proto != PROTO_TCP {
            // A UDP flow is ESTABLISHED once a reply came back (netfilter's "assured").
            let udp = or_default(self.udp_s, CT_TIMEOUT_UDP_S);
            return if state == CT_STATE_ESTABLISHED {
                or_default(self.udp_stream_s, udp)
            } else {
                udp
            };
        }
        match state {
            CT_STATE_ESTABLISHED => {
                or_default(self.tcp_established_s, CT_TIMEOUT_TCP_ESTABLISHED_S)
            }
            CT_STATE_FIN_CLIENT | CT_STATE_FIN_BACKEND => {
                or_default(self.tcp_close_wait_s, CT_TIMEOUT_TCP_CLOSE_WAIT_S)
            }
            CT_STATE_CLOSING => CT_TIMEOUT_TCP_CLOSING_S,
            CT_STATE_RESET => CT_TIMEOUT_TCP_RESET_S,
            CT_STATE_TIME_WAIT => CT_TIMEOUT_TCP_TIME_WAIT_S,
            _ => CT_TIMEOUT_TCP_SYN_S,
        }
    }

    /// Whether an entry of this protocol and state has expired, `age_ns` after its last
    /// packet: the one rule of the datapath (an expired entry is a new flow), the agent's
    /// conntrack sweep and `lbctl` (held SNAT ports against reusable ones).
    #[inline(always)]
    pub const fn expired(&self, proto: u8, state: u8, age_ns: u64) -> bool {
        age_ns > self.lifetime_s(proto, state) * 1_000_000_000
    }
}

// ---- SNAT source ports ----
// The default range (`--nat-port-range` changes it, through OPT_NAT_PORT_MIN/MAX): outside the
// kernel's default ephemeral range (32768-60999), so a SNATed flow never takes the reply tuple
// of a connection the node itself opened. This bounds concurrent SNATed flows to one backend
// (address and port) from one node address to 4536.
pub const NAT_PORT_MIN: u16 = 61000;
pub const NAT_PORT_MAX: u16 = 65535;
/// Ports tried per new flow before giving up (counted as nat_exhausted).
pub const NAT_PORT_TRIES: u32 = 32;

/// The SNAT ports in use, as (first, how many; never 0), from OPT_NAT_PORT_MIN/MAX as stored:
/// the default range when they are unset or make no sense.
#[inline(always)]
pub const fn nat_ports(min: u32, max: u32) -> (u32, u32) {
    if min == 0 || max < min || max > 65535 {
        (NAT_PORT_MIN as u32, (NAT_PORT_MAX - NAT_PORT_MIN) as u32 + 1)
    } else {
        (min, max - min + 1)
    }
}

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
/// A non-first IP fragment passed untouched: not of a flow translated here (the node's own
/// traffic, or fragments tc egress sees again after tc ingress translated and sent them out),
/// or ahead of its first fragment (XDP: every one, handed to tc). Translated ones:
/// `STAT_FRAGMENT_TRANSLATED`.
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
/// A device packet translated through an existing conntrack entry (either direction).
pub const STAT_CT_HIT: u32 = 14;
/// A new device flow to a frontend: backend chosen, conntrack entries created.
pub const STAT_CT_NEW: u32 = 15;
/// Dropped: the frontend has no usable backend.
pub const STAT_DROP_NO_BACKEND: u32 = 16;
/// Dropped: the client is outside loadBalancerSourceRanges.
pub const STAT_DROP_SOURCE_RANGE: u32 = 17;
/// Dropped: no free SNAT port for a remote backend.
pub const STAT_DROP_NAT_EXHAUSTED: u32 = 18;
/// Dropped: conntrack entries could not be created (map full even after LRU eviction).
pub const STAT_DROP_CT_FULL: u32 = 19;
/// Dropped: a rewrite helper failed (checksum or store).
pub const STAT_DROP_REWRITE: u32 = 20;
/// Dropped: SNAT needed but the node has no address of the packet's family (LB_NODE).
pub const STAT_DROP_NO_NODE_ADDR: u32 = 21;
/// Packets seen by tc egress.
pub const STAT_TC_EGRESS_PACKETS: u32 = 22;
/// A conntrack entry found expired and replaced by a new flow.
pub const STAT_CT_EXPIRED: u32 = 23;
/// A new connection to a service without endpoints answered with ICMP port unreachable.
pub const STAT_REJECT_NO_BACKEND: u32 = 24;
/// XDP sent a translated packet straight back out of its device (XDP_TX).
pub const STAT_XDP_TX: u32 = 25;
/// XDP left a flow with SNAT to tc: no known next hop, or one on a device XDP may not use.
pub const STAT_XDP_TO_TC: u32 = 26;
/// XDP sent a translated packet to another device (XDP_REDIRECT).
pub const STAT_XDP_REDIRECT: u32 = 27;
/// An ICMP error about a tracked flow, given the flow's translation (tc).
pub const STAT_ICMP_ERROR_TRANSLATED: u32 = 28;
/// A packet of a translated flow too big for the route it would leave by: its sender was sent
/// ICMP fragmentation needed / packet too big (tc).
pub const STAT_TOO_BIG: u32 = 29;
/// An ICMP error not sent: this CPU's allowance was used up (the packet was dropped).
pub const STAT_ICMP_RATE_LIMITED: u32 = 30;
/// A monitor event not sent: the ring buffer was full (`lbctl monitor` reading too slowly).
pub const STAT_MONITOR_LOST: u32 = 31;
/// A fragment after the first given its datagram's translation (tc; see `STAT_FRAGMENT`).
pub const STAT_FRAGMENT_TRANSLATED: u32 = 32;
/// Packets seen by tc on pods' devices, from the pods and to them (`--pod-devices`).
pub const STAT_TC_FROM_POD_PACKETS: u32 = 33;
pub const STAT_TC_TO_POD_PACKETS: u32 = 34;
/// A pod's packet to a ClusterIP on a port no service has there, refused as a service without
/// endpoints is (`tc_from_pod`; the socket hooks count theirs as `STAT_SOCK_UNKNOWN_PORT`).
pub const STAT_REJECT_UNKNOWN_PORT: u32 = 35;
/// Dropped: a packet from outside to a LoadBalancer IP or ExternalIP (or a ClusterIP reachable
/// from outside) on a port or protocol no service has there, which the stack would have
/// forwarded back out: to the router that sent it, a loop until its TTL ran out (tc ingress,
/// XDP).
pub const STAT_DROP_UNKNOWN_PORT: u32 = 36;
/// An ICMP echo request to a service address from outside answered by the datapath, as the
/// address's own host would (tc ingress; `--answer-service-pings`).
pub const STAT_ECHO_REPLY: u32 = 37;
/// A DSR flow's SYN arrived with its frontend (`MODE_DSR`): the reply entry was made.
pub const STAT_DSR_LEARNED: u32 = 38;
/// A SYN naming a frontend (the DSR option) for the tuple of a live flow this node translates
/// otherwise: its reply entry kept, the option ignored (forged, or stray).
pub const STAT_DSR_REFUSED: u32 = 39;
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
    (STAT_CT_HIT, "ct_hit"),
    (STAT_CT_NEW, "ct_new"),
    (STAT_DROP_NO_BACKEND, "drop_no_backend"),
    (STAT_DROP_SOURCE_RANGE, "drop_source_range"),
    (STAT_DROP_NAT_EXHAUSTED, "drop_nat_exhausted"),
    (STAT_DROP_CT_FULL, "drop_ct_full"),
    (STAT_DROP_REWRITE, "drop_rewrite"),
    (STAT_DROP_NO_NODE_ADDR, "drop_no_node_addr"),
    (STAT_TC_EGRESS_PACKETS, "tc_egress_packets"),
    (STAT_CT_EXPIRED, "ct_expired"),
    (STAT_REJECT_NO_BACKEND, "reject_no_backend"),
    (STAT_XDP_TX, "xdp_tx"),
    (STAT_XDP_TO_TC, "xdp_to_tc"),
    (STAT_XDP_REDIRECT, "xdp_redirect"),
    (STAT_ICMP_ERROR_TRANSLATED, "icmp_error_translated"),
    (STAT_TOO_BIG, "too_big"),
    (STAT_ICMP_RATE_LIMITED, "icmp_rate_limited"),
    (STAT_MONITOR_LOST, "monitor_lost"),
    (STAT_FRAGMENT_TRANSLATED, "fragment_translated"),
    (STAT_TC_FROM_POD_PACKETS, "tc_from_pod_packets"),
    (STAT_TC_TO_POD_PACKETS, "tc_to_pod_packets"),
    (STAT_REJECT_UNKNOWN_PORT, "reject_unknown_port"),
    (STAT_DROP_UNKNOWN_PORT, "drop_unknown_port"),
    (STAT_ECHO_REPLY, "echo_reply"),
    (STAT_DSR_LEARNED, "dsr_learned"),
    (STAT_DSR_REFUSED, "dsr_refused"),
];
