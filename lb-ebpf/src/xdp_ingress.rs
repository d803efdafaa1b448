//! XDP on the node's external devices (`--xdp`): the same decisions as tc ingress, taken before
//! the kernel allocates an skb.

use aya_ebpf::{bindings::xdp_action::XDP_PASS, macros::xdp, programs::XdpContext};
use lb_common::STAT_XDP_PACKETS;

use crate::{
    device::{self, Action},
    packet::Bounds,
    stats,
};

#[xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    stats::count(STAT_XDP_PACKETS);
    let bounds = Bounds { start: ctx.data(), end: ctx.data_end() };
    let len = (ctx.data_end() - ctx.data()) as u32;
    match device::handle(&bounds, len) {
        Action::Pass => XDP_PASS,
    }
}
