//! The filesystems the agent's paths must be on, checked before anything is created or loaded:
//! pins only work on a bpf filesystem, and the socket hooks only attach to a cgroup v2
//! directory. Without these checks the kernel's answers (EPERM from a pin, EBADF from a link)
//! said nothing of the cause, and pin directories were left behind on the wrong filesystem.

use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path};

use anyhow::{Result, bail};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The filesystem type (`statfs`'s f_type) of `path`, or of its nearest existing ancestor (a
/// pin directory the agent will create).
fn fs_type(path: &Path) -> Option<(i64, &Path)> {
    let existing = path.ancestors().find(|p| !p.as_os_str().is_empty() && p.exists())?;
    let c = CString::new(existing.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_type as i64, existing))
}

/// Refuses a `--bpffs` that is not (to be) on a bpf filesystem.
pub fn require_bpffs(path: &Path) -> Result<()> {
    match fs_type(path) {
        Some((BPF_FS_MAGIC, _)) => Ok(()),
        Some((_, on)) => bail!(
            "--bpffs {}: {} is not on a bpf filesystem, where maps and links can be pinned \
             (mount one: mount -t bpf bpf /sys/fs/bpf)",
            path.display(),
            on.display()
        ),
        None => bail!("--bpffs {}: cannot read its filesystem", path.display()),
    }
}

/// Refuses a `--cgroup` that is not a cgroup v2 directory.
pub fn require_cgroup2(path: &Path) -> Result<()> {
    if !path.is_dir() {
        bail!("--cgroup {}: not a directory", path.display());
    }
    match fs_type(path) {
        Some((CGROUP2_SUPER_MAGIC, _)) => Ok(()),
        Some(_) => bail!(
            "--cgroup {}: not a cgroup v2 directory (the socket hooks need the unified \
             hierarchy, usually /sys/fs/cgroup)",
            path.display()
        ),
        None => bail!("--cgroup {}: cannot read its filesystem", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_off_the_right_filesystem_are_refused_with_the_reason() {
        let tmp = std::env::temp_dir();
        let e = require_bpffs(&tmp.join("lb-not-yet-there")).unwrap_err().to_string();
        assert!(e.contains("is not on a bpf filesystem") && e.contains("mount -t bpf"), "{e}");
        let e = require_cgroup2(&tmp).unwrap_err().to_string();
        assert!(e.contains("not a cgroup v2 directory"), "{e}");
        let e = require_cgroup2(&tmp.join("lb-no-such-dir")).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
    }
}
