//! Pods' devices (`--pod-devices`): the node's side of each pod's veth carries `tc_from_pod`
//! (ingress: the pod's packets) and `tc_to_pod` (egress: packets to the pod), as pods come and
//! go. The agent hears of new links through netlink (`netdev::NetWatch`), so a pod's device
//! gets its hooks within milliseconds of the CNI creating it; a periodic check catches anything
//! missed. The links are pinned like the other hooks' (traffic flows through an agent restart);
//! those of devices that are gone are unpinned.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use aya::Ebpf;
use tracing::{debug, info, warn};

use super::{
    attach::{self, TcRole},
    links::{LinkPins, links_pin_dir, pinned_targets},
    netdev,
};

/// The pod devices the patterns match, and the hooks attached to them.
pub struct PodDevices {
    patterns: Vec<String>,
    bpffs: PathBuf,
    /// Devices carrying the pod hooks now.
    attached: BTreeSet<String>,
    /// Devices the hooks could not be attached to, by interface index: tried again only once
    /// the device is re-created (else every refresh would try and warn again).
    failed: BTreeMap<String, u32>,
}

/// What one [`PodDevices::refresh`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Refresh {
    pub attached: Vec<String>,
    /// Of those, devices hooked before whose programs went (a clsact qdisc deleted).
    pub restored: Vec<String>,
    pub gone: Vec<String>,
    pub failed: Vec<(String, String)>,
}

impl PodDevices {
    pub fn new(patterns: &[String], bpffs: &Path) -> Self {
        Self {
            patterns: patterns.to_vec(),
            bpffs: bpffs.to_owned(),
            attached: BTreeSet::new(),
            failed: BTreeMap::new(),
        }
    }

    /// How many devices carry the pod hooks.
    pub fn count(&self) -> usize {
        self.attached.len()
    }

    /// Attaches the pod hooks to every matching device that lacks them (new, or re-created),
    /// and unpins the links of pod devices that are gone. A device also in `external` (the
    /// `--devices` ones) is left to that role. The first call goes through every device: a
    /// previous agent's links get this agent's programs (and count as wanted, see
    /// `LinkPins::remove_unwanted`).
    pub fn refresh(
        &mut self,
        ebpf: &mut Ebpf,
        pins: &mut LinkPins,
        external: &[String],
    ) -> Refresh {
        let mut out = Refresh::default();
        let mut present = netdev::matching_present(&self.patterns);
        present.retain(|d| !external.contains(d));
        for dev in &present {
            if self.attached.contains(dev) && !attach::tc_missing(pins, dev, TcRole::Pod) {
                continue;
            }
            let ifindex = netdev::ifindex(dev).unwrap_or(0);
            if self.failed.get(dev) == Some(&ifindex) {
                continue;
            }
            match attach::tc_as(ebpf, dev, TcRole::Pod, Some(pins)) {
                Ok(()) => {
                    if !self.attached.insert(dev.clone()) {
                        out.restored.push(dev.clone());
                    }
                    self.failed.remove(dev);
                    out.attached.push(dev.clone());
                }
                // Gone again already (a pod that failed to start), or refused: said once.
                Err(e) => {
                    self.failed.insert(dev.clone(), ifindex);
                    out.failed.push((dev.clone(), format!("{e:#}")));
                }
            }
        }
        self.attached.retain(|d| present.contains(d));
        self.failed.retain(|d, _| present.contains(d));
        out.gone = self.unpin_gone(&present);
        // Pods come and go all day: what the agent remembers of their hooks goes with them.
        for dev in &out.gone {
            for label in TcRole::Pod.labels() {
                pins.forget(&attach::link_name(label, dev));
            }
        }
        out
    }

    /// Removes the pinned pod links of devices not in `present`: a deleted device's links
    /// are already detached, the pins would only pile up.
    fn unpin_gone(&self, present: &[String]) -> Vec<String> {
        let mut gone = BTreeSet::new();
        for label in TcRole::Pod.labels() {
            for dev in pinned_targets(&self.bpffs, label) {
                if present.contains(&dev) || netdev::ifindex(&dev).is_ok() {
                    continue;
                }
                let pin = links_pin_dir(&self.bpffs).join(attach::link_name(label, &dev));
                match std::fs::remove_file(&pin) {
                    Ok(()) => {
                        gone.insert(dev);
                    }
                    Err(e) => warn!(pin = %pin.display(), "removing a gone pod device's link: {e}"),
                }
            }
        }
        gone.into_iter().collect()
    }
}

/// Logs what a refresh did (one line per device: pods come and go all day, so at debug level
/// for the routine part).
pub fn log_refresh(r: &Refresh, total: usize) {
    for dev in &r.attached {
        debug!(device = dev, "pod device: hooks attached");
    }
    for dev in &r.gone {
        debug!(device = dev, "pod device gone: its links unpinned");
    }
    for (dev, e) in &r.failed {
        warn!(device = dev, "attaching to a pod device: {e}");
    }
    for dev in &r.restored {
        warn!(device = dev, "pod device: its hooks were missing (qdisc deleted?): attached again");
    }
    if !r.attached.is_empty() || !r.gone.is_empty() {
        info!(
            attached = r.attached.len(),
            gone = r.gone.len(),
            pod_devices = total,
            "pod devices changed"
        );
    }
}
