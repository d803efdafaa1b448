//! Creating the conntrack entries of a new device flow, with SNAT to a node address and a
//! source port chosen in BPF when the backend is on another node (so that its replies come
//! back through this node).

use lb_common::*;

use crate::{
    conntrack,
    maps::{NODE, SCRATCH},
    packet::Flow,
};

#[derive(Clone, Copy)]
pub enum NatError {
    NoNodeAddr,
    PortsExhausted,
    CtFull,
}

/// This node's address of the flow's family, for SNAT.
#[inline(always)]
pub fn node_addr(v6: bool) -> Option<Addr> {
    let node = NODE.get(0)?;
    let a = if v6 { node.addr6 } else { node.addr4 };
    if a == [0; 4] || (!v6 && a[3] == 0) { None } else { Some(a) }
}

/// Records the flow `flow` -> `backend` (both directions) and returns the forward entry as
/// stored in the map. Keys and values are built in per-CPU scratch space, not on the stack.
#[inline(never)]
pub fn create(
    flow: &Flow,
    backend: &BackendValue,
    ids: &Ids,
) -> Result<&'static CtValue, NatError> {
    let s = SCRATCH.get_ptr_mut(0).ok_or(NatError::CtFull)?;
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    let s = unsafe { &mut *s };
    let flags = if ids.snat { CT_F_SNAT } else { 0 };
    s.forward_key = CtKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport_be: flow.sport_be,
        dport_be: flow.dport_be,
        proto: flow.proto,
        _pad: [0; 3],
    };
    // First the reply (restores frontend as source, client as destination), then the same
    // value turned into the forward entry.
    s.value = CtValue {
        last_seen_ns: conntrack::now_ns(),
        new_saddr: flow.daddr,
        new_daddr: flow.saddr,
        new_sport_be: flow.dport_be,
        new_dport_be: flow.sport_be,
        backend_id: ids.backend_id,
        service_id: ids.service_id,
        flags: flags | CT_F_REPLY,
        state: CT_STATE_NEW,
        _pad: [0; 2],
    };
    // The reply arrives from the backend to the (possibly SNATed) client side.
    s.reply_key = CtKey {
        saddr: backend.addr,
        daddr: flow.saddr,
        sport_be: backend.port_be,
        dport_be: flow.sport_be,
        proto: flow.proto,
        _pad: [0; 3],
    };
    let mut sport_be = flow.sport_be;
    if !ids.snat {
        conntrack::insert(&s.reply_key, &s.value, false).map_err(|_| NatError::CtFull)?;
    } else {
        s.reply_key.daddr = node_addr(flow.is_v6).ok_or(NatError::NoNodeAddr)?;
        let range = (NAT_PORT_MAX - NAT_PORT_MIN) as u32 + 1;
        let start = ids.hash % range;
        // A stride from the hash too, so that flows starting at nearby ports do not walk the
        // same sequence; odd, so it visits distinct ports before wrapping (range is even).
        let stride = ((ids.hash >> 16) % range) | 1;
        let mut claimed = false;
        for i in 0..NAT_PORT_TRIES {
            let port = NAT_PORT_MIN + ((start + i * stride) % range) as u16;
            s.reply_key.dport_be = port.to_be();
            // Claim the port: the reply tuple must be unique. A port still held by a flow that
            // ended long ago (expired, never looked up since) is taken over.
            if conntrack::insert(&s.reply_key, &s.value, true).is_ok()
                || (conntrack::reclaim_if_expired(&s.reply_key)
                    && conntrack::insert(&s.reply_key, &s.value, true).is_ok())
            {
                claimed = true;
                sport_be = port.to_be();
                break;
            }
        }
        if !claimed {
            return Err(NatError::PortsExhausted);
        }
    }
    s.value.new_saddr = s.reply_key.daddr;
    s.value.new_daddr = backend.addr;
    s.value.new_sport_be = sport_be;
    s.value.new_dport_be = backend.port_be;
    s.value.flags = flags;
    if conntrack::insert(&s.forward_key, &s.value, false).is_err() {
        conntrack::remove(&s.reply_key);
        return Err(NatError::CtFull);
    }
    conntrack::get(&s.forward_key).ok_or(NatError::CtFull)
}

/// Who the new flow belongs to (bundled: BPF functions take at most five arguments).
pub struct Ids {
    pub backend_id: u32,
    pub service_id: u32,
    pub snat: bool,
    pub hash: u32,
}
