//! Attaching the device programs to network interfaces.
//!
//! tc uses TCX links on kernels that have them (6.6+; aya falls back to a clsact qdisc and
//! netlink elsewhere). XDP tries native (driver) mode first and falls back to generic mode,
//! saying so, because a device whose driver lacks XDP still needs the service datapath.

use anyhow::{Context, Result};
use std::path::Path;

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode, tc},
};
use lb_common::{PROG_SOCK, PROG_TC_EGRESS, PROG_TC_INGRESS, PROG_XDP_INGRESS};
use tracing::{info, warn};

/// How XDP ended up attached to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    Native,
    Generic,
}

/// Attaches tc ingress and egress to `ifname` (in the calling thread's network namespace).
pub fn tc(ebpf: &mut Ebpf, ifname: &str) -> Result<()> {
    for (name, dir) in
        [(PROG_TC_INGRESS, TcAttachType::Ingress), (PROG_TC_EGRESS, TcAttachType::Egress)]
    {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("object has no {name} program"))?
            .try_into()?;
        if let Err(first) = prog.attach(ifname, dir) {
            // Without TCX, classifiers hang off a clsact qdisc; add it and try once more.
            tc::qdisc_add_clsact(ifname)
                .or_else(|e| if e.to_string().contains("exists") { Ok(()) } else { Err(e) })
                .with_context(|| format!("adding clsact qdisc to {ifname} after: {first}"))?;
            prog.attach(ifname, dir).with_context(|| format!("attaching {name} to {ifname}"))?;
        }
    }
    info!(device = ifname, "tc ingress and egress attached");
    Ok(())
}

/// Attaches XDP to `ifname`, natively when the driver supports it, else in generic mode.
pub fn xdp_ingress(ebpf: &mut Ebpf, ifname: &str) -> Result<XdpAttachMode> {
    let prog: &mut Xdp = ebpf
        .program_mut(PROG_XDP_INGRESS)
        .context("object has no xdp_ingress program")?
        .try_into()?;
    match prog.attach(ifname, XdpMode::Driver) {
        Ok(_) => {
            info!(device = ifname, "XDP attached in native mode");
            Ok(XdpAttachMode::Native)
        }
        Err(native) => {
            prog.attach(ifname, XdpMode::Skb).with_context(|| {
                format!("attaching XDP to {ifname} (native mode failed: {native})")
            })?;
            warn!(device = ifname, error = %native, "native XDP unavailable; attached in generic mode");
            Ok(XdpAttachMode::Generic)
        }
    }
}

/// Attaches every socket hook to the cgroup v2 directory `cgroup` (the node's root cgroup in
/// production): processes in it and below reach services through the hooks. BPF links on a
/// cgroup always coexist with other programs (the kernel rejects flags on link creation, so the
/// mode passed is the default), so other tools' hooks on the same cgroup keep working.
pub fn cgroup(ebpf: &mut Ebpf, cgroup: &Path) -> Result<()> {
    let dir = std::fs::File::open(cgroup)
        .with_context(|| format!("opening cgroup {} (a cgroup v2 directory)", cgroup.display()))?;
    for (name, hook) in PROG_SOCK {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("object has no program {name}"))?
            .try_into()?;
        prog.attach(&dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {hook} to cgroup {}", cgroup.display()))?;
    }
    info!(cgroup = %cgroup.display(), "socket hooks attached");
    Ok(())
}
