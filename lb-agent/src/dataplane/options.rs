//! Node-wide datapath switches (`LB_OPTIONS`), written by the agent at start from its flags.

use anyhow::{Context, Result};
use aya::{Ebpf, maps::Array};
use lb_common::{MAP_OPTIONS, OPT_REJECT_TCP_WITH_RESET};

/// How a TCP connection to a service without endpoints is refused (`--reject-tcp-with`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RejectTcpWith {
    /// ICMP port unreachable, as kube-proxy's REJECT rule.
    #[default]
    Icmp,
    /// A TCP reset, as a closed port answers (gets through firewalls that drop ICMP).
    Reset,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub reject_tcp_with: RejectTcpWith,
}

/// Writes every option, so a restart with other flags replaces the previous agent's.
pub fn write(ebpf: &mut Ebpf, opts: &Options) -> Result<()> {
    let mut map: Array<_, u32> =
        Array::try_from(ebpf.map_mut(MAP_OPTIONS).context("no LB_OPTIONS map")?)?;
    let reset = u32::from(opts.reject_tcp_with == RejectTcpWith::Reset);
    map.set(OPT_REJECT_TCP_WITH_RESET, reset, 0).context("writing LB_OPTIONS")
}
