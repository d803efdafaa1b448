//! Attaching the programs: tc (TCX links on 6.6+; clsact filters over netlink on older kernels
//! or with `--enable-tcx=false`), XDP (native, else generic, saying so), and the cgroup socket
//! hooks. Every link is pinned, every filter recorded (see `links.rs`), so programs outlive the
//! agent.

use std::{os::fd::AsFd, os::unix::fs::MetadataExt, path::Path};

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::FdLink,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use lb_common::{
    MAP_SNAT_BY_ROUTE, MAP_SNAT_DEVICES, MAP_XDP_TX, PROG_SOCK, PROG_TC_EGRESS, PROG_TC_FROM_POD,
    PROG_TC_INGRESS, PROG_TC_TO_POD, PROG_XDP_INGRESS,
};
use tracing::{info, warn};

use super::links::LinkPins;

/// How XDP ended up attached to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    Native,
    Generic,
    /// A pinned link from a previous agent got the new program; its mode is whatever it was.
    Kept,
}

/// A device's role: which programs its tc hooks get, and the names their links are pinned under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcRole {
    /// A device outside clients reach the node by (`--devices`).
    External,
    /// The node's side of a pod's device (`--pod-devices`).
    Pod,
}

impl TcRole {
    /// (program, direction, link label) of each hook.
    fn hooks(self) -> [(&'static str, TcAttachType, &'static str); 2] {
        match self {
            TcRole::External => [
                (PROG_TC_INGRESS, TcAttachType::Ingress, "tc-ingress"),
                (PROG_TC_EGRESS, TcAttachType::Egress, "tc-egress"),
            ],
            TcRole::Pod => [
                (PROG_TC_FROM_POD, TcAttachType::Ingress, "pod-ingress"),
                (PROG_TC_TO_POD, TcAttachType::Egress, "pod-egress"),
            ],
        }
    }

    /// Link labels of this role (pinned as `<label>@<device>`).
    pub fn labels(self) -> [&'static str; 2] {
        self.hooks().map(|(_, _, label)| label)
    }
}

/// Attaches tc ingress and egress to `ifname` (in the calling thread's network namespace).
/// Without `pins` the links live as long as `ebpf` (tests).
pub fn tc(ebpf: &mut Ebpf, ifname: &str, pins: Option<&mut LinkPins>) -> Result<()> {
    tc_as(ebpf, ifname, TcRole::External, pins)?;
    info!(device = ifname, "tc ingress and egress attached");
    Ok(())
}

/// Whether this kernel has TCX (6.6+): tc programs as BPF links, which can be pinned.
pub fn kernel_has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Where the tc programs sit among a clsact qdisc's filters without TCX: first (priority 1),
/// under a handle of their own, where the next agent finds them to replace.
const FILTER_PRIORITY: u16 = 1;
const FILTER_HANDLE: TcHandle = TcHandle::new(0, 0x4c42);

/// Adds a clsact qdisc to `ifname` unless it has one.
fn ensure_clsact(ifname: &str) -> Result<()> {
    match tc::qdisc_add_clsact(ifname) {
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r.with_context(|| format!("adding a clsact qdisc to {ifname}")),
    }
}

/// Puts `prog` into `ifname`'s clsact filter at `dir` (no TCX): a previous agent's filter gets
/// it in place (cls_bpf swaps programs atomically: no packet sees none), else a new filter is
/// made. Either way it stays when this agent exits, as a pinned link does.
fn tc_filter(prog: &mut SchedClassifier, ifname: &str, dir: TcAttachType) -> Result<()> {
    let replaced = SchedClassifierLink::attached(ifname, dir, FILTER_PRIORITY, FILTER_HANDLE, None)
        .map_err(anyhow::Error::from)
        .and_then(|link| prog.attach_to_link(link).map_err(anyhow::Error::from));
    let id = match replaced {
        Ok(id) => id,
        Err(_) => {
            ensure_clsact(ifname)?;
            let opts =
                NlOptions { priority: FILTER_PRIORITY, handle: FILTER_HANDLE, classid: None };
            prog.attach_with_options(ifname, dir, TcAttachOptions::Netlink(opts))
                .with_context(|| format!("attaching a clsact filter to {ifname}"))?
        }
    };
    // Dropping the link would detach the filter.
    std::mem::forget(prog.take_link(id)?);
    Ok(())
}

/// Detaches the clsact filter a record pinned as `pin_name` (`<label>@<device>`) stands for,
/// if it is a tc hook's and the device has one (`links.rs`: removal, cleanup).
pub fn detach_tc_filter(pin_name: &str) {
    let Some((label, dev)) = pin_name.split_once('@') else { return };
    let hooks = [TcRole::External, TcRole::Pod].map(TcRole::hooks);
    let Some((prog, dir, _)) = hooks.iter().flatten().find(|(_, _, l)| *l == label) else {
        return;
    };
    if super::netdev::ifindex(dev).is_ok() {
        // NotFound: a filter already gone with its qdisc.
        let _ = tc::qdisc_detach_program(dev, *dir, prog);
    }
}

/// Attaches the tc programs of `role` to `ifname`'s ingress and egress.
pub fn tc_as(
    ebpf: &mut Ebpf,
    ifname: &str,
    role: TcRole,
    pins: Option<&mut LinkPins>,
) -> Result<()> {
    let mut pins = pins;
    for (name, dir, label) in role.hooks() {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("object has no {name} program"))?
            .try_into()?;
        let attach_new =
            |prog: &mut SchedClassifier| -> Result<aya::programs::tc::SchedClassifierLinkId> {
                match prog.attach(ifname, dir) {
                    Ok(id) => Ok(id),
                    Err(first) => {
                        // Without TCX, classifiers hang off a clsact qdisc; add it and try once more.
                        ensure_clsact(ifname).with_context(|| format!("after: {first}"))?;
                        prog.attach(ifname, dir)
                            .with_context(|| format!("attaching {name} to {ifname}"))
                    }
                }
            };
        match pins.as_deref_mut() {
            None => {
                attach_new(prog)?;
            }
            Some(pins) if pins.tc_filters() => {
                tc_filter(prog, ifname, dir)
                    .with_context(|| format!("attaching {name} to {ifname}"))?;
                let ifindex = super::netdev::ifindex(ifname)?;
                let fd = prog.fd()?.as_fd().try_clone_to_owned()?;
                pins.record_filter(&link_name(label, ifname), fd.as_fd(), ifindex)?;
            }
            Some(pins) => {
                let fd = prog.fd()?.as_fd().try_clone_to_owned()?;
                pins.attach(&link_name(label, ifname), fd.as_fd(), || {
                    let id = attach_new(prog)?;
                    let link = prog.take_link(id)?;
                    FdLink::try_from(link)
                        .context("tc link is not a BPF link (kernel without TCX?)")
                })?;
            }
        }
    }
    Ok(())
}

/// The name a device hook's link is pinned under (`<hook>@<device>`).
pub fn link_name(hook: &str, ifname: &str) -> String {
    format!("{hook}@{ifname}")
}

/// Whether `ifname` exists without this agent's tc programs (of `role`): re-created since they
/// were attached (its pinned link is defunct, or names another interface index; its filters
/// were on another interface index), or never attached. A device that does not exist has
/// nothing to attach to.
pub fn tc_missing(pins: &LinkPins, ifname: &str, role: TcRole) -> bool {
    let Ok(ifindex) = super::netdev::ifindex(ifname) else { return false };
    if pins.tc_filters() {
        // Recorded for this device, and still there (a deleted qdisc takes them along).
        let recorded = role
            .labels()
            .iter()
            .all(|l| pins.filter_ifindex(&link_name(l, ifname)) == Some(ifindex));
        return !recorded || !agent_filters_present(ifindex, role);
    }
    let name = link_name(role.labels()[0], ifname);
    super::links::pinned_link_ifindex(&pins.dir().join(name)).map_or(true, |at| at != ifindex)
}

/// Whether the agent's filters are on both of `ifindex`'s clsact hooks for `role`.
pub fn agent_filters_present(ifindex: u32, role: TcRole) -> bool {
    role.hooks().iter().all(|(_, dir, _)| agent_filter_present(ifindex, *dir))
}

/// Whether the agent's filter (its priority and handle) is on `ifindex`'s clsact hook `dir`.
/// When the kernel cannot be asked, says so (once a minute at most: the agent asks every 2 s,
/// and a kernel that would not answer will not answer the next time either) and answers yes:
/// attaching again would not help.
fn agent_filter_present(ifindex: u32, dir: TcAttachType) -> bool {
    static LAST_WARNING: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    match super::tc_query::bpf_filters(ifindex, dir) {
        Ok(filters) => filters
            .iter()
            .any(|f| f.priority == FILTER_PRIORITY && f.handle == u32::from(FILTER_HANDLE)),
        Err(e) => {
            let mut last = LAST_WARNING.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60)) {
                *last = Some(std::time::Instant::now());
                warn!(ifindex, "listing a device's tc filters (said once a minute): {e:#}");
            }
            true
        }
    }
}

/// Attaches XDP to `ifname`, natively when the driver supports it, else in generic mode.
pub fn xdp_ingress(
    ebpf: &mut Ebpf,
    ifname: &str,
    pins: Option<&mut LinkPins>,
) -> Result<XdpAttachMode> {
    let prog: &mut Xdp = ebpf
        .program_mut(PROG_XDP_INGRESS)
        .context("object has no xdp_ingress program")?
        .try_into()?;
    let mut mode = XdpAttachMode::Native;
    let mut attach_new = |prog: &mut Xdp| -> Result<aya::programs::xdp::XdpLinkId> {
        match prog.attach(ifname, XdpMode::Driver) {
            Ok(id) => {
                info!(device = ifname, "XDP attached in native mode");
                Ok(id)
            }
            Err(native) => {
                let id = prog.attach(ifname, XdpMode::Skb).with_context(|| {
                    format!("attaching XDP to {ifname} (native mode failed: {native})")
                })?;
                warn!(device = ifname, error = %native, "native XDP unavailable; attached in generic mode");
                mode = XdpAttachMode::Generic;
                Ok(id)
            }
        }
    };
    match pins {
        None => {
            attach_new(prog)?;
        }
        Some(pins) => {
            let fd = prog.fd()?.as_fd().try_clone_to_owned()?;
            let reused = pins.attach(&link_name("xdp", ifname), fd.as_fd(), || {
                let id = attach_new(prog)?;
                let link = prog.take_link(id)?;
                FdLink::try_from(link).context("XDP link is not a BPF link")
            })?;
            if reused {
                mode = XdpAttachMode::Kept;
            }
        }
    }
    Ok(mode)
}

/// Records the devices the device hooks are on (`LB_SNAT_DEVICES`): those of `devices` present
/// now, and whether there are two or more (`LB_SNAT_BY_ROUTE`). A SNATed flow whose route to
/// its backend leaves by one of them takes the route's source address, as MASQUERADE would
/// (the address of the device the route leaves by), and its replies come back through the
/// hooks there; by any other device, or when the hooks are on one device, the node's primary
/// address.
pub fn snat_devices(ebpf: &mut Ebpf, devices: &[String]) -> Result<()> {
    let want: std::collections::BTreeSet<u32> =
        devices.iter().filter_map(|d| super::netdev::ifindex(d).ok()).collect();
    let mut by_route: aya::maps::Array<_, u32> = aya::maps::Array::try_from(
        ebpf.map_mut(MAP_SNAT_BY_ROUTE).context("no LB_SNAT_BY_ROUTE map")?,
    )?;
    // Off first, on last: the set is complete whenever the datapath reads it.
    if want.len() < 2 {
        by_route.set(0, 0, 0).context("writing LB_SNAT_BY_ROUTE")?;
    }
    let mut map: aya::maps::HashMap<_, u32, u32> = aya::maps::HashMap::try_from(
        ebpf.map_mut(MAP_SNAT_DEVICES).context("no LB_SNAT_DEVICES map")?,
    )?;
    let have: Vec<u32> = map.keys().flatten().collect();
    for gone in have.iter().filter(|i| !want.contains(i)) {
        map.remove(gone).context("writing LB_SNAT_DEVICES")?;
    }
    for new in want.iter().filter(|i| !have.contains(i)) {
        map.insert(new, 1, 0).context("writing LB_SNAT_DEVICES")?;
    }
    if want.len() >= 2 {
        let mut by_route: aya::maps::Array<_, u32> = aya::maps::Array::try_from(
            ebpf.map_mut(MAP_SNAT_BY_ROUTE).context("no LB_SNAT_BY_ROUTE map")?,
        )?;
        by_route.set(0, 1, 0).context("writing LB_SNAT_BY_ROUTE")?;
    }
    Ok(())
}

/// Whether XDP may send translated packets straight back out of a device (`--xdp-tx`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpTx {
    /// On where XDP is attached natively and the driver is not veth.
    #[default]
    Auto,
    On,
    Off,
}

/// Decides whether XDP may use XDP_TX on `ifname` and records it in LB_XDP_TX; returns the
/// decision. Where it may not, XDP leaves flows with SNAT to tc, which always works.
///
/// `Auto` says no to generic XDP (no gain over tc) and to veth, where XDP_TX loses packets
/// silently: the frame reaches the peer only if the peer runs XDP itself, and packets from
/// senders on the same host carry partial checksums, which XDP cannot tell from finished ones
/// and sends out unfinished. A link kept from the previous agent keeps its previous decision.
pub fn xdp_tx(ebpf: &mut Ebpf, ifname: &str, mode: XdpAttachMode, setting: XdpTx) -> Result<bool> {
    let ifindex = super::netdev::ifindex(ifname)?;
    let mut map: aya::maps::HashMap<_, u32, u32> =
        aya::maps::HashMap::try_from(ebpf.map_mut(MAP_XDP_TX).context("no LB_XDP_TX map")?)?;
    let (on, why) = match (setting, mode) {
        (XdpTx::On, _) => (true, "--xdp-tx on".to_owned()),
        (XdpTx::Off, _) => (false, "--xdp-tx off".to_owned()),
        (XdpTx::Auto, XdpAttachMode::Kept) => {
            (map.get(&ifindex, 0).is_ok(), "as before (XDP link kept)".to_owned())
        }
        (XdpTx::Auto, XdpAttachMode::Generic) => (false, "generic XDP".to_owned()),
        (XdpTx::Auto, XdpAttachMode::Native) => match super::netdev::driver(ifname) {
            Ok(d) if d == "veth" => (
                false,
                "veth: frames sent back out need XDP on the peer and finished checksums".to_owned(),
            ),
            Ok(d) => (true, format!("native XDP, driver {d}")),
            Err(e) => (false, format!("driver unknown: {e:#}")),
        },
    };
    if on {
        map.insert(ifindex, 1, 0).context("writing LB_XDP_TX")?;
    } else if map.get(&ifindex, 0).is_ok() {
        map.remove(&ifindex).context("writing LB_XDP_TX")?;
    }
    let state = if on { "on" } else { "off: flows to other nodes go through tc" };
    info!(device = ifname, reason = %why, "XDP_TX {state}");
    Ok(on)
}

/// Attaches every socket hook to the cgroup v2 directory `cgroup` (the node's root cgroup in
/// production): processes in it and below reach services through the hooks. BPF links on a
/// cgroup always coexist with other programs (the kernel rejects flags on link creation, so the
/// mode passed is the default), so other tools' hooks on the same cgroup keep working.
pub fn cgroup(ebpf: &mut Ebpf, cgroup: &Path, pins: Option<&mut LinkPins>) -> Result<()> {
    let dir = std::fs::File::open(cgroup)
        .with_context(|| format!("opening cgroup {} (a cgroup v2 directory)", cgroup.display()))?;
    // Links are named after the cgroup's inode: another --cgroup means other links.
    let ino = dir.metadata()?.ino();
    let mut pins = pins;
    for (name, hook) in PROG_SOCK {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("object has no program {name}"))?
            .try_into()?;
        match pins.as_deref_mut() {
            None => {
                prog.attach(&dir, CgroupAttachMode::Single)
                    .with_context(|| format!("attaching {hook} to cgroup {}", cgroup.display()))?;
            }
            Some(pins) => {
                let fd = prog.fd()?.as_fd().try_clone_to_owned()?;
                pins.attach(&format!("{hook}@cgroup-{ino}"), fd.as_fd(), || {
                    let id = prog.attach(&dir, CgroupAttachMode::Single).with_context(|| {
                        format!("attaching {hook} to cgroup {}", cgroup.display())
                    })?;
                    let link = prog.take_link(id)?;
                    FdLink::try_from(link).context("cgroup link is not a BPF link")
                })?;
            }
        }
    }
    info!(cgroup = %cgroup.display(), "socket hooks attached");
    Ok(())
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` on pure v2 hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones), from /proc/self/mounts.
pub fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| f[1].into())
    })
}
