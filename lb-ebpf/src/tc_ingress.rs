//! tc ingress on the node's external devices: outside clients' packets to frontends, and the
//! replies of remote backends to SNATed flows.

use aya_ebpf::{
    bindings::{BPF_CSUM_LEVEL_INC, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_csum_level,
    macros::classifier,
    programs::TcContext,
};
use lb_common::{STAT_DROP_REWRITE, STAT_TC_INGRESS_PACKETS};

use crate::{
    device::{self, Action, Hook},
    dsr, echo,
    fib::{self, Redirect},
    icmp, reject, rewrite, stats,
};

/// Headers we may need in the linear part of the skb: Ethernet, IPv6 with a few extension
/// headers, TCP with options.
pub const PULL_LEN: u32 = 128;

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    stats::count(STAT_TC_INGRESS_PACKETS);
    run(&ctx, Hook::TcIngress)
}

/// tc ingress as it runs on a packet its device verified (CHECKSUM_UNNECESSARY, as most NICs
/// hand packets over), for tests and the bench only (never attached): BPF_PROG_TEST_RUN makes
/// CHECKSUM_NONE skbs, which this marks verified first (as the stack does once it has checked
/// a sum). The in-place checksum update (`rewrite::csum_in_place`) serves both states alike.
#[classifier]
pub fn bench_tc_ingress_verified(ctx: TcContext) -> i32 {
    // SAFETY: the context's skb. On a CHECKSUM_NONE skb: CHECKSUM_UNNECESSARY, level 0.
    unsafe { bpf_csum_level(ctx.skb.skb, BPF_CSUM_LEVEL_INC as u64) };
    run(&ctx, Hook::TcIngress)
}

/// The tc side of both directions.
#[inline(always)]
pub fn run(ctx: &TcContext, hook: Hook) -> i32 {
    pull_headers(ctx);
    match device::handle(&mut rewrite::Tc(ctx), ctx.len(), hook) {
        Action::Pass => TC_ACT_OK,
        Action::Drop => TC_ACT_SHOT,
        Action::Redirect => send_on(ctx),
        Action::RedirectDsr => match dsr::add_option(ctx) {
            Ok(()) => send_on(ctx),
            // Sent on without its frontend, the backend's answers would reach the client from
            // the pod's address: dropped, the client retransmits.
            Err(()) => {
                stats::count(STAT_DROP_REWRITE);
                TC_ACT_SHOT
            }
        },
        Action::Reject => reject::reject(ctx),
        // Called here, not from icmp.rs: its frame and the redirect's do not fit nested.
        Action::Icmp => match icmp::translate_error(ctx, hook) {
            Action::Redirect => send_on(ctx),
            Action::Icmp => match device::other_icmp(&rewrite::Tc(ctx), ctx.len(), hook) {
                Action::Drop => TC_ACT_SHOT,
                Action::Echo => echo::reply(ctx),
                _ => TC_ACT_OK,
            },
            _ => TC_ACT_OK,
        },
        // Only an ICMP message is answered (above).
        Action::Echo => TC_ACT_OK,
    }
}

/// Sends a translated packet towards its new destination (`Action::Redirect`).
#[inline(always)]
fn send_on(ctx: &TcContext) -> i32 {
    match fib::redirect(ctx) {
        Redirect::Sent(verdict) => verdict,
        // No route: let the stack decide (and count it there).
        Redirect::NoRoute => TC_ACT_OK,
        Redirect::TooBig(mtu) => reject::too_big(ctx, mtu),
    }
}

/// Makes the headers directly readable (and writable) when the driver left them in paged data.
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
