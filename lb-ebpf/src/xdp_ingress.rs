//! XDP on the node's external devices (`--xdp`): the same decisions as tc ingress, taken before
//! the kernel allocates an skb. Flows that need SNAT are left to tc.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::STAT_XDP_PACKETS;

use crate::{
    device::{self, Action, Hook},
    rewrite, stats,
};

#[xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    stats::count(STAT_XDP_PACKETS);
    let len = (ctx.data_end() - ctx.data()) as u32;
    match device::handle(&mut rewrite::Xdp(&ctx), len, Hook::Xdp) {
        Action::Pass | Action::Redirect | Action::Reject => XDP_PASS,
        Action::Drop => XDP_DROP,
    }
}
