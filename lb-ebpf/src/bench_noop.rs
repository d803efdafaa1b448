//! Programs that do nothing, so benchmarks can measure the cost of running any program at all
//! (the floor) the same way they measure the datapath. Never attached by the agent.

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action::XDP_PASS},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn bench_xdp_noop(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[classifier]
pub fn bench_tc_noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}
