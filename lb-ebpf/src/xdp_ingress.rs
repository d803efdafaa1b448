//! XDP on the node's external devices (`--xdp`): the same decisions as tc ingress, taken before
//! the kernel allocates an skb. A flow with SNAT (a remote backend, and its replies) is sent
//! on by XDP itself when the next hop's MAC is known: back out of the device (XDP_TX) or to
//! the route's device if XDP runs there too (XDP_REDIRECT); otherwise tc handles it.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{STAT_DROP_REWRITE, STAT_XDP_PACKETS};

use crate::{
    device::{self, Action, Hook},
    fib, rewrite, stats,
};

#[xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    stats::count(STAT_XDP_PACKETS);
    let len = (ctx.data_end() - ctx.data()) as u32;
    match device::handle(&mut rewrite::Xdp(&ctx), len, Hook::Xdp) {
        // (`RedirectDsr`: tc ingress only.)
        Action::Pass | Action::Reject | Action::Icmp | Action::Echo | Action::RedirectDsr => {
            XDP_PASS
        }
        Action::Drop => XDP_DROP,
        Action::Redirect => fib::xdp_forward(&ctx).unwrap_or_else(|| {
            // Rewritten already: the stack must not see it.
            stats::count(STAT_DROP_REWRITE);
            XDP_DROP
        }),
    }
}
