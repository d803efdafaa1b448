//! Node-wide datapath switches (`LB_OPTIONS`), written by the agent at start from its flags.

use anyhow::{Context, Result};
use aya::{Ebpf, maps::Array};
use lb_common::{
    MAP_OPTIONS, NAT_PORT_MAX, NAT_PORT_MIN, OPT_NAT_PORT_MAX, OPT_NAT_PORT_MIN,
    OPT_REJECT_TCP_WITH_RESET,
};

/// How a TCP connection to a service without endpoints is refused (`--reject-tcp-with`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RejectTcpWith {
    /// ICMP port unreachable, as kube-proxy's REJECT rule.
    #[default]
    Icmp,
    /// A TCP reset, as a closed port answers (gets through firewalls that drop ICMP).
    Reset,
}

/// SNAT source ports for flows to other nodes' backends (`--nat-port-range FIRST-LAST`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        Self { first: NAT_PORT_MIN, last: NAT_PORT_MAX }
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Fewer ports than this would cap SNATed flows per backend at a toy level.
pub const MIN_NAT_PORTS: u16 = 256;

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s.split_once('-').ok_or("expected FIRST-LAST, e.g. 61000-65535")?;
        let port = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("{p:?}: {e}"));
        let r = PortRange { first: port(a)?, last: port(b)? };
        if r.first < 1024 {
            return Err(format!("{r}: ports below 1024 are for services"));
        }
        if r.last < r.first || r.last - r.first + 1 < MIN_NAT_PORTS {
            return Err(format!("{r}: want at least {MIN_NAT_PORTS} ports, first <= last"));
        }
        Ok(r)
    }
}

impl PortRange {
    /// Refuses a range that overlaps `ephemeral` (the node's `net.ipv4.ip_local_port_range`):
    /// the reply to a connection the node opened from such a port would be taken for a SNATed
    /// flow's.
    pub fn check_against(&self, ephemeral: PortRange) -> Result<()> {
        if self.first <= ephemeral.last && ephemeral.first <= self.last {
            anyhow::bail!(
                "--nat-port-range {self} overlaps the node's ephemeral ports {ephemeral} \
                 (net.ipv4.ip_local_port_range): replies to the node's own connections would be \
                 taken for SNATed flows. Choose ports outside it, or narrow it."
            );
        }
        Ok(())
    }
}

/// The node's ephemeral port range (`net.ipv4.ip_local_port_range` of this network namespace).
pub fn ephemeral_ports() -> Result<PortRange> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(first)), Some(Ok(last))) => Ok(PortRange { first, last }),
        _ => anyhow::bail!("{path}: unexpected content {text:?}"),
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub reject_tcp_with: RejectTcpWith,
    pub nat_ports: PortRange,
}

/// Writes every option, so a restart with other flags replaces the previous agent's.
pub fn write(ebpf: &mut Ebpf, opts: &Options) -> Result<()> {
    let mut map: Array<_, u32> =
        Array::try_from(ebpf.map_mut(MAP_OPTIONS).context("no LB_OPTIONS map")?)?;
    let reset = u32::from(opts.reject_tcp_with == RejectTcpWith::Reset);
    for (i, v) in [
        (OPT_REJECT_TCP_WITH_RESET, reset),
        (OPT_NAT_PORT_MIN, opts.nat_ports.first.into()),
        (OPT_NAT_PORT_MAX, opts.nat_ports.last.into()),
    ] {
        map.set(i, v, 0).context("writing LB_OPTIONS")?;
    }
    // Replies to SNATed flows arrive on these ports from now on.
    super::port_filters::note_nat_range(ebpf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_refuse_what_would_break() {
        let r: PortRange = "20000-29999".parse().unwrap();
        assert_eq!((r.first, r.last), (20000, 29999));
        for bad in ["20000", "x-y", "500-2000", "30000-20000", "20000-20010", "1-99999"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        let ephemeral = PortRange { first: 32768, last: 60999 };
        assert!(PortRange::default().check_against(ephemeral).is_ok());
        assert!(r.check_against(ephemeral).is_ok());
        let e = PortRange { first: 40000, last: 62000 }.check_against(ephemeral).unwrap_err();
        assert!(
            e.to_string().contains("40000-62000 overlaps the node's ephemeral ports 32768-60999"),
            "{e}"
        );
    }
}
