//! Datapath events for `lbctl monitor`: what happened to one packet or socket call (a drop, a
//! refusal, a new translated flow), sent through a ring buffer only while a monitor runs.
//!
//! The datapath sends nothing unless `OPT_MONITOR_KINDS` selects the event's kind and
//! `OPT_MONITOR_UNTIL_S` lies ahead: the monitor renews that lease every second, so a monitor
//! killed without cleaning up stops the events within seconds.

use crate::Addr;

/// Events (ring buffer of [`MonitorEvent`] records).
pub const MAP_EVENTS: &str = "LB_EVENTS";
/// Its size in bytes (a power of two, a multiple of the page size): about 3,400 events (144
/// bytes and an 8-byte header each).
pub const EVENTS_BYTES: u32 = 512 * 1024;

/// Which kinds of event to send, a bit each (`1 << EVENT_*`; 0: none).
pub const OPT_MONITOR_KINDS: u32 = 9;
/// Until when, in whole seconds of CLOCK_MONOTONIC_COARSE (the datapath's clock).
pub const OPT_MONITOR_UNTIL_S: u32 = 10;
/// Which monitor holds the lease (a token it chose): one that was taken over (`--force`)
/// notices, and leaves the new holder's lease alone when it stops. Not read by the datapath.
pub const OPT_MONITOR_OWNER: u32 = 11;

/// A device hook dropped a packet (`reason`: the `STAT_DROP_*` counter it also counted, or
/// `STAT_TOO_BIG`: too big for its route, answered with fragmentation needed / packet too big).
pub const EVENT_DROP: u8 = 0;
/// A device hook refused a new connection to a service without endpoints (ICMP port
/// unreachable or TCP reset).
pub const EVENT_REJECT: u8 = 1;
/// A device hook translated the first packet of a new flow (the `new_*` fields).
pub const EVENT_NEW_FLOW: u8 = 2;
/// A socket hook failed a connect() or sendmsg() (ECONNREFUSED).
pub const EVENT_SOCK_REFUSED: u8 = 3;
/// A socket hook sent a connect() or sendmsg() to a backend (the `new_*` fields).
pub const EVENT_SOCK_TRANSLATED: u8 = 4;
/// Number of kinds.
pub const EVENT_KINDS: u8 = 5;

/// Where an event happened.
pub const HOOK_TC_INGRESS: u8 = 0;
pub const HOOK_TC_EGRESS: u8 = 1;
pub const HOOK_XDP: u8 = 2;
pub const HOOK_SOCK_CONNECT: u8 = 3;
pub const HOOK_SOCK_SENDMSG: u8 = 4;
/// tc on a pod's device (`--pod-devices`): packets from the pod, packets to it.
pub const HOOK_TC_FROM_POD: u8 = 5;
pub const HOOK_TC_TO_POD: u8 = 6;

/// No service port (an unknown port on a ClusterIP).
pub const EVENT_NO_SERVICE: u32 = u32::MAX;

/// One event. Device hooks fill the packet's tuple as it arrived and, for a new flow, as it
/// left; socket hooks fill the destination the application asked for (`daddr`), the backend
/// (`new_daddr`) and the calling process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorEvent {
    /// CLOCK_MONOTONIC_COARSE, ns.
    pub time_ns: u64,
    /// Socket hooks: the socket's cookie (0 from device hooks).
    pub cookie: u64,
    /// Socket hooks: the calling process's cgroup (v2 id: the inode of its directory).
    pub cgroup_id: u64,
    pub saddr: Addr,
    pub daddr: Addr,
    pub new_saddr: Addr,
    pub new_daddr: Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    pub new_sport_be: u16,
    pub new_dport_be: u16,
    /// [`EVENT_NO_SERVICE`] when no service port is known.
    pub service_id: u32,
    /// The `STAT_*` counter the datapath counted for it (why it happened).
    pub reason: u32,
    /// Device hooks: the device the packet arrived on (or leaves by, tc egress).
    pub ifindex: u32,
    /// Device hooks: the packet's length.
    pub len: u32,
    /// Socket hooks: the calling process (thread group id, as the host numbers it) and its
    /// command name; its cgroup is `cgroup_id`.
    pub pid: u32,
    /// A packet too big for its route (`STAT_TOO_BIG`): the route's MTU.
    pub mtu: u32,
    pub comm: [u8; 16],
    /// `EVENT_*`.
    pub kind: u8,
    /// `HOOK_*`.
    pub hook: u8,
    pub proto: u8,
    /// `EVENT_F_*`.
    pub flags: u8,
    pub _pad: u32,
}

/// The packet (or socket) is IPv6.
pub const EVENT_F_V6: u8 = 1;
/// The new flow is SNATed to this node (its backend is on another node).
pub const EVENT_F_SNAT: u8 = 2;

const _: () = {
    assert!(core::mem::size_of::<MonitorEvent>() == 144);
    assert!(core::mem::align_of::<MonitorEvent>() == 8);
    assert!(OPT_MONITOR_OWNER < crate::OPT_COUNT && OPT_MONITOR_KINDS < crate::OPT_COUNT);
    assert!(OPT_MONITOR_KINDS > crate::OPT_HOST_NETNS_COOKIE_HI);
};

#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no implicit padding (size checked above).
unsafe impl aya::Pod for MonitorEvent {}
