//! Pinned BPF links: the programs stay attached when the agent stops (traffic keeps flowing
//! through an agent restart or upgrade), and a new agent swaps its programs into the same links
//! atomically (BPF_LINK_UPDATE) instead of detaching and re-attaching. `lb-agent --cleanup`
//! removes them.
//!
//! Without TCX (kernels before 6.6, or `--enable-tcx=false`) the tc programs are filters of a
//! clsact qdisc instead (`attach::tc_filter`), which stay attached by themselves; each is
//! recorded by pinning its program under the name its link would have, so that `lbctl`, the
//! removal of hooks no longer configured and `--cleanup` find them as they find links.

use std::{
    collections::{BTreeSet, HashMap},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::programs::links::FdLink;
use tracing::{debug, info, warn};

use super::{
    loader::maps_pin_dir,
    sys_bpf::{BPF_LINK_UPDATE, BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD, BPF_OBJ_PIN, bpf},
};

/// BPF_OBJ_GET or BPF_OBJ_PIN (`cmd`) at `path` (the `obj` member of `union bpf_attr`; `fd`
/// is the object to pin, 0 to get): the syscall's result.
fn obj(cmd: libc::c_long, path: &Path, fd: u32) -> std::io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        // Explicit: the kernel rejects (EINVAL) an attribute whose unused bytes are not zero,
        // and implicit padding is left uninitialized.
        _pad: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut attr =
        Attr { pathname: c.as_ptr() as u64, bpf_fd: fd, file_flags: 0, path_fd: 0, _pad: 0 };
    // SAFETY: a valid obj attribute, no byte unset; `c` outlives the call.
    unsafe { bpf(cmd, &mut attr) }
}

/// Opens a pinned BPF object.
fn obj_get(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let fd = obj(BPF_OBJ_GET, path, 0)?;
    // SAFETY: the kernel returned a new descriptor we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the BPF object `fd` at `path`.
fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    obj(BPF_OBJ_PIN, path, fd.as_raw_fd() as u32).map(drop)
}

/// Whether the object pinned at `path` is a program (a clsact filter's record), not a link.
pub fn is_filter_record(path: &Path) -> bool {
    let Ok(fd) = obj_get(path) else { return false };
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()));
    info.is_ok_and(|i| i.lines().any(|l| l.starts_with("prog_type:")))
}

/// Unpins `path`; a clsact filter's record takes its filter along (an unpinned link detaches
/// by itself).
fn unpin(path: &Path) -> std::io::Result<()> {
    let record = is_filter_record(path);
    std::fs::remove_file(path)?;
    if record && let Some(name) = path.file_name() {
        super::attach::detach_tc_filter(&name.to_string_lossy());
    }
    Ok(())
}

/// Where links are pinned. Not versioned: a new agent, whatever its map layout, swaps its
/// programs into the links the old one left, so a hook never has two programs.
pub fn links_pin_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("links")
}

/// The targets (devices, cgroups) of the links pinned under `bpffs` as `<label>@<target>`,
/// sorted.
pub fn pinned_targets(bpffs: &Path, label: &str) -> Vec<String> {
    let mut targets: Vec<String> = std::fs::read_dir(links_pin_dir(bpffs))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            Some(name.strip_prefix(label)?.strip_prefix('@')?.to_owned())
        })
        .collect();
    targets.sort();
    targets
}

/// Removes maps pinned by agents of another map layout version (after this agent's programs
/// replaced theirs): established flows tracked in them are re-balanced, as they must be when
/// the layout changes.
pub fn remove_other_versions(bpffs: &Path) -> Result<Vec<PathBuf>> {
    let mine = maps_pin_dir(bpffs).parent().map(Path::to_owned).context("pin layout")?;
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(bpffs)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let versioned = name
            .strip_prefix('v')
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if versioned && path != mine {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// The interface a pinned tcx or XDP link is attached to (`ifindex`, the first field of both
/// members of `bpf_link_info`'s union, which starts at byte 16).
pub fn pinned_link_ifindex(path: &Path) -> std::io::Result<u32> {
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let link = obj_get(path)?;
    let mut info = [0u64; 8];
    let mut attr = Attr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: an obj_get_info_by_fd attribute pointing at a buffer of info_len bytes.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    Ok(info[2] as u32)
}

/// Replaces the program of a link (`link_update` member of `union bpf_attr`).
fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: a valid link_update attribute, no byte unset.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

pub struct LinkPins {
    dir: PathBuf,
    wanted: BTreeSet<String>,
    /// The tc programs are clsact filters, not TCX links (see the module's comment).
    tc_filters: bool,
    /// The interface index each filter this agent attached is on, by hook name: a device
    /// re-created under the same name has lost its filters.
    filters_at: HashMap<String, u32>,
}

impl LinkPins {
    pub fn new(bpffs: &Path) -> Result<Self> {
        let dir = links_pin_dir(bpffs);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir, wanted: BTreeSet::new(), tc_filters: false, filters_at: HashMap::new() })
    }

    /// Attach tc programs as clsact filters (`attach::tc_filter`) instead of TCX links.
    pub fn with_tc_filters(mut self, on: bool) -> Self {
        self.tc_filters = on;
        self
    }

    pub fn tc_filters(&self) -> bool {
        self.tc_filters
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records the filter at hook `name` (on interface `ifindex`) that now runs `prog`: its
    /// program pinned under that name, replacing what was pinned there (a previous agent's
    /// record, or a link of a TCX-mode agent, which unpinned detaches).
    pub fn record_filter(&mut self, name: &str, prog: BorrowedFd<'_>, ifindex: u32) -> Result<()> {
        self.wanted.insert(name.to_owned());
        let path = self.dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        obj_pin(prog, &path).with_context(|| format!("pinning {}", path.display()))?;
        self.filters_at.insert(name.to_owned(), ifindex);
        Ok(())
    }

    /// Forgets hook `name`, whose device is gone (its pin already removed).
    pub fn forget(&mut self, name: &str) {
        self.wanted.remove(name);
        self.filters_at.remove(name);
    }

    /// The interface index the filter at hook `name` was attached at by this agent.
    pub fn filter_ifindex(&self, name: &str) -> Option<u32> {
        self.filters_at.get(name).copied()
    }

    /// Puts `prog` at the hook `name`: into the pinned link of that name when there is one
    /// (atomically, no packet sees no program), else through `attach_new`, whose link is then
    /// pinned. Returns whether an existing link was reused.
    pub fn attach(
        &mut self,
        name: &str,
        prog: BorrowedFd<'_>,
        attach_new: impl FnOnce() -> Result<FdLink>,
    ) -> Result<bool> {
        self.wanted.insert(name.to_owned());
        let path = self.dir.join(name);
        // A clsact filter's record (an agent without TCX): its filter goes once the link is in.
        let record = path.exists() && is_filter_record(&path);
        if path.exists() && !record {
            match obj_get(&path) {
                Ok(link) => match link_update(link.as_fd(), prog) {
                    Ok(()) => {
                        // Pods' devices are many (hundreds a node): their summary is logged
                        // by `pod_devices::log_refresh`.
                        if super::attach::TcRole::Pod.labels().iter().any(|l| name.starts_with(l)) {
                            debug!(hook = name, "program replaced in the pinned link");
                        } else {
                            info!(hook = name, "program replaced in the pinned link");
                        }
                        return Ok(true);
                    }
                    Err(e) => {
                        warn!(hook = name, error = %e, "pinned link unusable; attaching anew")
                    }
                },
                Err(e) => warn!(hook = name, error = %e, "pinned link unreadable; attaching anew"),
            }
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        let link = attach_new()?;
        if record {
            unpin(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        link.pin(&path).with_context(|| format!("pinning link {}", path.display()))?;
        Ok(false)
    }

    /// Unpins links of hooks this agent no longer uses (a device or cgroup dropped from its
    /// flags), detaching their programs.
    pub fn remove_unwanted(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !self.wanted.contains(&name) {
                unpin(&entry.path())?;
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

/// Removes every link and map an agent pinned under `bpffs` (uninstall): the programs detach
/// and the maps go once nothing else holds them.
pub fn cleanup(bpffs: &Path) -> Result<()> {
    let links = links_pin_dir(bpffs);
    let version_dir = maps_pin_dir(bpffs).parent().map(Path::to_owned).context("pin layout")?;
    if !links.exists() && !version_dir.exists() {
        bail!("nothing pinned under {}", bpffs.display());
    }
    if links.exists() {
        for entry in std::fs::read_dir(&links)?.flatten() {
            unpin(&entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
        }
        std::fs::remove_dir_all(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    remove_other_versions(bpffs)?;
    if version_dir.exists() {
        std::fs::remove_dir_all(&version_dir)
            .with_context(|| format!("removing {}", version_dir.display()))?;
    }
    // The directory too, which the agent created, unless something else lives in it.
    let _ = std::fs::remove_dir(bpffs);
    info!(dir = %bpffs.display(), "removed pinned links and maps");
    Ok(())
}
