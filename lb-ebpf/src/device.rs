//! What both device hooks (tc ingress and XDP) do with a packet from outside the node.
//!
//! Today: parse, find the frontend, count. Conntrack, Maglev selection and NAT are added here,
//! so that tc and XDP can never disagree about a packet.

use lb_common::{SCOPE_EXTERNAL, STAT_SERVICE_HIT, STAT_SERVICE_MISS};

use crate::{
    lookup,
    packet::{self, Bounds, Skip},
    stats,
};

/// What the hook should do with the packet.
pub enum Action {
    /// Hand it to the kernel stack unchanged.
    Pass,
}

/// Handles one packet; `len` is its full length (for byte counters).
#[inline(always)]
pub fn handle(bounds: &Bounds, len: u32) -> Action {
    match try_handle(bounds, len) {
        Ok(action) => action,
        Err(skip) => {
            stats::count(skip.stat());
            Action::Pass
        }
    }
}

#[inline(always)]
fn try_handle(bounds: &Bounds, len: u32) -> Result<Action, Skip> {
    let flow = packet::parse(bounds)?;
    match lookup::service(flow.daddr, flow.dport_be, flow.proto, SCOPE_EXTERNAL) {
        Some(svc) => {
            stats::count(STAT_SERVICE_HIT);
            stats::count_service(svc.service_id, len);
        }
        None => stats::count(STAT_SERVICE_MISS),
    }
    Ok(Action::Pass)
}
