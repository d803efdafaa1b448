//! XDP on the node's external devices (`--xdp`): the same decisions as tc ingress, taken before
//! the kernel allocates an skb. A flow with SNAT (a remote backend, and its replies) is sent
//! straight back out of the device with XDP_TX when the route leaves by that device and the
//! next hop's MAC is known; otherwise tc handles it.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{STAT_DROP_REWRITE, STAT_XDP_PACKETS, STAT_XDP_TX};

use crate::{
    device::{self, Action, Hook},
    fib, rewrite, stats,
};

#[xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    stats::count(STAT_XDP_PACKETS);
    let len = (ctx.data_end() - ctx.data()) as u32;
    match device::handle(&mut rewrite::Xdp(&ctx), len, Hook::Xdp) {
        Action::Pass | Action::Reject => XDP_PASS,
        Action::Drop => XDP_DROP,
        Action::Redirect => {
            if !fib::xdp_set_macs(&ctx) {
                // Rewritten already: the stack must not see it.
                stats::count(STAT_DROP_REWRITE);
                return XDP_DROP;
            }
            stats::count(STAT_XDP_TX);
            XDP_TX
        }
    }
}
