//! Connection tracking for device-hook flows. Each flow has two entries in `LB_CT`: the
//! original direction (client -> frontend) and the reply as it arrives (backend -> client or
//! node). Each entry holds the rewrite for its direction, so a packet needs one lookup.
//! Entries age by protocol and TCP state (lifetimes from `LB_OPTIONS` where the agent set
//! them); the agent sweeps out ended flows, and the LRU map evicts the oldest when full.

use lb_common::*;

use crate::{
    clock::{self, age_ns},
    maps::{CONNTRACK, OPTIONS},
    packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

const NS: u64 = 1_000_000_000;
/// last_seen is refreshed at most this often, to keep hot entries' cache lines quiet.
const REFRESH_NS: u64 = NS;

/// Writes a key in place, field by field (a struct literal would be built on the stack first).
#[inline(always)]
pub fn fill_key(k: &mut CtKey, saddr: &Addr, daddr: &Addr, ports_be: (u16, u16), proto: u8) {
    k.saddr = *saddr;
    k.daddr = *daddr;
    (k.sport_be, k.dport_be) = ports_be;
    k.proto = proto;
    k._pad8 = 0;
    k._pad16 = 0;
}

/// The live entry for a packet's tuple, after advancing its TCP state. An expired entry is
/// removed with its pair and reported as absent.
#[inline(always)]
pub fn lookup(key: &CtKey, tcp_flags: u8) -> Option<&'static CtValue> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a live map value; concurrent updates by another CPU touch only last_seen/state,
    // whose torn reads are harmless.
    let e = unsafe { &mut *entry };
    let now = clock::now_ns();
    if remove_if_expired(key, e, now) {
        return None;
    }
    let mut state = e.state;
    if key.proto == PROTO_TCP {
        let syn_only = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if tcp_flags & TCP_RST != 0 {
            state = CT_STATE_RESET;
        } else if tcp_flags & TCP_FIN != 0 && !ct_state_ended(state) {
            // A node of a DSR flow sees one direction only: any FIN closes it there.
            state =
                if e.flags & CT_F_DSR != 0 { CT_STATE_CLOSING } else { after_fin(state, e.flags) };
        } else if syn_only && ct_state_ended(state) {
            // The client opens a new connection on the tuple of one that ended.
            state = CT_STATE_NEW;
        } else if state == CT_STATE_NEW && tcp_flags & TCP_ACK != 0 && tcp_flags & TCP_SYN == 0 {
            state = CT_STATE_ESTABLISHED;
        }
    } else if key.proto == PROTO_SCTP {
        state = sctp_state(state, tcp_flags, e.flags);
    } else if state == CT_STATE_NEW && e.flags & CT_F_REPLY != 0 {
        // A UDP flow answered: a stream (its own lifetime, --conntrack-udp-timeout-stream).
        state = CT_STATE_ESTABLISHED;
    }
    if state != e.state || age_ns(now, e.last_seen_ns) > REFRESH_NS {
        // Closing (half or whole), reset and reopening concern both directions; establishing
        // does not, but for UDP, where the forward entry must live as long.
        let both = state != e.state && (state != CT_STATE_ESTABLISHED || key.proto != PROTO_TCP);
        e.state = state;
        e.last_seen_ns = now;
        if both {
            sync_pair(e, key.proto);
        }
    }
    Some(e)
}

/// The state an SCTP packet moves its association to, by what its first chunk stands for
/// (`packet::sctp_flags`): ABORT resets it, SHUTDOWN COMPLETE ends it, an INIT on an ended
/// one's tuple opens a new one, and any packet from the backend establishes it.
#[inline(always)]
fn sctp_state(state: u8, flags: u8, entry_flags: u8) -> u8 {
    if flags & TCP_RST != 0 {
        CT_STATE_RESET
    } else if flags & TCP_FIN != 0 {
        CT_STATE_CLOSING
    } else if flags & TCP_SYN != 0 && ct_state_ended(state) {
        CT_STATE_NEW
    } else if state == CT_STATE_NEW && entry_flags & CT_F_REPLY != 0 {
        CT_STATE_ESTABLISHED
    } else {
        state
    }
}

/// The state a FIN moves a flow to, arriving on the entry with `flags` (a reply entry's
/// packets come from the backend): the first FIN half-closes the flow, which lives on like an
/// open one (the other side may go on sending); the other side's FIN closes it.
#[inline(always)]
fn after_fin(state: u8, flags: u8) -> u8 {
    let from_backend = flags & CT_F_REPLY != 0;
    match state {
        CT_STATE_FIN_CLIENT if from_backend => CT_STATE_CLOSING,
        // Closed first by a backend this node SNATs for: it holds the tuple (node address,
        // SNAT port) in TIME_WAIT, and with it this flow's SNAT port.
        CT_STATE_FIN_BACKEND if !from_backend && flags & CT_F_SNAT != 0 => CT_STATE_TIME_WAIT,
        CT_STATE_FIN_BACKEND if !from_backend => CT_STATE_CLOSING,
        // The same side's FIN again.
        CT_STATE_FIN_CLIENT | CT_STATE_FIN_BACKEND => state,
        _ if from_backend => CT_STATE_FIN_BACKEND,
        _ => CT_STATE_FIN_CLIENT,
    }
}

/// Gives the opposite direction's entry the state `e` just took. Half-closed: the other
/// side's FIN arrives on that entry and must find it so. Closing or reset: a flow
/// ended by one side's RST sees no packet the other way, and the reply entry holds the SNAT
/// port, which would stay taken for the established timeout. New (a connection reopened on
/// the tuple of one that ended): its reply entry must not expire under it. A subprogram: the
/// pair's key stays off the caller's stack.
#[inline(never)]
fn sync_pair(e: &CtValue, proto: u8) {
    let pair = e.pair_key(proto);
    if let Some(p) = CONNTRACK.get_ptr_mut(pair) {
        // SAFETY: a live map value; a racing update of the same bytes is harmless.
        unsafe {
            if ct_state_progress((*p).state) < ct_state_progress(e.state) || e.state == CT_STATE_NEW
            {
                (*p).state = e.state;
                (*p).last_seen_ns = e.last_seen_ns;
            }
        }
    }
}

/// Removes `e` (the entry of `key`) and its pair when its flow has been silent longer than its
/// state allows. Entries expire lazily: a flow never seen again keeps its entries (and a SNAT
/// port) until this runs on them, the agent's sweep removes them, or the LRU evicts them.
#[inline(always)]
fn remove_if_expired(key: &CtKey, e: &CtValue, now: u64) -> bool {
    let age = age_ns(now, e.last_seen_ns);
    // An active flow's entries are refreshed every second: no need to read the lifetimes.
    if age <= CT_MIN_LIFETIME_S * NS || !timeouts().expired(key.proto, e.state, age) {
        return false;
    }
    let pair = e.pair_key(key.proto);
    let _ = CONNTRACK.remove(key);
    let _ = CONNTRACK.remove(pair);
    stats::count(STAT_CT_EXPIRED);
    true
}

/// The lifetimes the agent configured (`LB_OPTIONS`).
#[inline(always)]
fn timeouts() -> CtTimeouts {
    let opt = |i| OPTIONS.get(i).copied().unwrap_or(0);
    CtTimeouts {
        tcp_established_s: opt(OPT_CT_TCP_ESTABLISHED_S),
        udp_s: opt(OPT_CT_UDP_S),
        tcp_close_wait_s: opt(OPT_CT_TCP_CLOSE_WAIT_S),
        udp_stream_s: opt(OPT_CT_UDP_STREAM_S),
    }
}

/// Frees `key` if the entry holding it is expired (a SNAT port of a flow that ended). `copy`
/// is scratch space: removing the entry frees the memory it lives in.
#[inline(always)]
pub fn reclaim_if_expired(key: &CtKey, copy: &mut CtValue) -> bool {
    let Some(e) = get(key) else { return false };
    // Not `*copy = *e`: that compiled to a call of `memmove`, a subprogram whose frame, on
    // the tc -> new_flow -> nat::create chain, took 6.1's verifier (frames rounded up to 32
    // bytes) over its 512-byte stack limit; a non-overlapping copy is inlined.
    // SAFETY: a live map value and this CPU's scratch slot: two valid, distinct places.
    unsafe { core::ptr::copy_nonoverlapping(e, copy, 1) };
    remove_if_expired(key, copy, clock::now_ns())
}

pub const BPF_ANY: u64 = 0;
pub const BPF_NOEXIST: u64 = 1;

/// Inserts an entry; `exclusive` fails if the key exists (claiming a SNAT port).
#[inline(always)]
pub fn insert(key: &CtKey, value: &CtValue, exclusive: bool) -> Result<(), ()> {
    CONNTRACK.insert(key, value, if exclusive { BPF_NOEXIST } else { BPF_ANY }).map_err(|_| ())
}

#[inline(always)]
pub fn remove(key: &CtKey) {
    let _ = CONNTRACK.remove(key);
}

/// The entry for `key` as stored (no ageing).
#[inline(always)]
pub fn get(key: &CtKey) -> Option<&'static CtValue> {
    // SAFETY: a live map value.
    CONNTRACK.get_ptr(key).map(|p| unsafe { &*p })
}
