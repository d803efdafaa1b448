//! tc on the node's side of a pod's device (`--pod-devices`): service traffic of the pod,
//! translated per packet. With `--socket-lb-host-namespace-only` the socket hooks leave pods'
//! sockets alone, so a pod's connection to a ClusterIP leaves the pod still addressed to it
//! (what a service mesh's sidecar redirect needs to see), and is translated here instead:
//! - from the pod (tc ingress): internal frontends (ClusterIP, NodePort on a node address,
//!   ExternalIP, LB IP: as the socket hooks see them), DNAT to a backend chosen by the
//!   internal traffic policy; SNAT only when the backend is the pod itself (hairpin);
//! - to the pod (tc egress): replies get their frontend back as source.

use aya_ebpf::{macros::classifier, programs::TcContext};
use lb_common::{STAT_TC_FROM_POD_PACKETS, STAT_TC_TO_POD_PACKETS};

use crate::{device::Hook, stats, tc_ingress};

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    stats::count(STAT_TC_FROM_POD_PACKETS);
    tc_ingress::run(&ctx, Hook::FromPod)
}

#[classifier]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    stats::count(STAT_TC_TO_POD_PACKETS);
    tc_ingress::run(&ctx, Hook::ToPod)
}
