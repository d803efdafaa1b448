//! tc egress on the node's external devices: replies of local backends get their frontend
//! back as source before they leave the node.

use aya_ebpf::{macros::classifier, programs::TcContext};
use lb_common::STAT_TC_EGRESS_PACKETS;

use crate::{device::Hook, stats, tc_ingress};

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    stats::count(STAT_TC_EGRESS_PACKETS);
    tc_ingress::run(&ctx, Hook::TcEgress)
}
