//! tc ingress on the node's external devices: the entry point for outside clients.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use lb_common::STAT_TC_INGRESS_PACKETS;

use crate::{
    device::{self, Action},
    packet::Bounds,
    stats,
};

/// Headers we may need in the linear part of the skb: Ethernet, IPv6 with a few extension
/// headers, TCP with options.
const PULL_LEN: u32 = 128;

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    stats::count(STAT_TC_INGRESS_PACKETS);
    pull_headers(&ctx);
    let bounds = Bounds { start: ctx.data(), end: ctx.data_end() };
    match device::handle(&bounds, ctx.len()) {
        Action::Pass => TC_ACT_OK,
    }
}

/// Makes the headers directly readable when the driver left them in paged data.
#[inline(always)]
fn pull_headers(ctx: &TcContext) {
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let len = ctx.len();
    if linear < PULL_LEN && len > linear {
        let want = if len < PULL_LEN { len } else { PULL_LEN };
        // Failure leaves the packet as it was; parsing then sees a short packet and passes it.
        let _ = ctx.pull_data(want);
    }
}
