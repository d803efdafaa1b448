//! One agent per pin directory. Two agents on the same `--bpffs` (a debugging run on a node, a
//! stray second DaemonSet) would each write their own view of the cluster into the same maps,
//! undoing the other's writes and handing out the ids the other gave: every service could end
//! up on the wrong backends. The agent (and `--cleanup`, which would detach a running agent's
//! programs) takes an exclusive `flock` on the directory first and holds it while it runs; the
//! kernel drops it when the process exits, however it exits, so a crash never leaves it held.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tracing::warn;

/// How long a starting agent waits for the previous one to finish exiting (a restart whose old
/// process is still shutting down) before giving up.
pub const WAIT: Duration = Duration::from_secs(5);

/// The held lock: released when dropped, or when the process exits.
#[derive(Debug)]
pub struct PinDirLock {
    _dir: File,
}

/// Takes the lock of `dir` (created if missing), waiting up to `wait` for its holder to exit.
/// Fails naming the holder's pid when it does not.
pub fn acquire(dir: &Path, wait: Duration) -> Result<PinDirLock> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!("creating pin directory {} (is a bpffs mounted there?)", dir.display())
    })?;
    let file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let deadline = Instant::now() + wait;
    let mut said = false;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(PinDirLock { _dir: file });
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err).with_context(|| format!("locking {}", dir.display()));
        }
        // Read from /proc/locks only when said (twice at most), not on every retry.
        let holder =
            || holder(&file).map_or_else(|| "another process".into(), |p| format!("pid {p}"));
        if Instant::now() >= deadline {
            let holder = holder();
            bail!(
                "--bpffs {} is in use by a running lb-agent ({holder}): a second agent would \
                 overwrite its maps, --cleanup would detach its programs. Stop it first (or give \
                 a second agent its own --bpffs)",
                dir.display()
            );
        }
        if !said {
            let holder = holder();
            warn!(dir = %dir.display(), %holder, "pin directory in use; waiting for its agent to exit");
            said = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pid of the agent running on the pin directory `dir`, if one is (`lbctl status`).
pub fn holder_of(dir: &Path) -> Option<u32> {
    holder(&File::open(dir).ok()?)
}

/// The pid holding a `flock` on `file`, from /proc/locks (`1: FLOCK ADVISORY WRITE 1234
/// 00:1c:5678 0 EOF`: pid, then device as hex major:minor and inode).
fn holder(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let dev =
        format!("{:02x}:{:02x}:{}", libc::major(meta.dev()), libc::minor(meta.dev()), meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, &dev)
}

fn holder_in(locks: &str, dev_ino: &str) -> Option<u32> {
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // A waiter's line reads "1: -> FLOCK ..."; only the holder's starts with the kind.
        (f.len() >= 6 && f[1] == "FLOCK" && f[5] == dev_ino).then(|| f[4].parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 900 00:1c:77 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 00:1c:5678 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4321 00:1c:5678 0 EOF\n";
        assert_eq!(holder_in(locks, "00:1c:5678"), Some(1234));
        assert_eq!(holder_in(locks, "00:1c:77"), None, "a POSIX lock is not ours");
        assert_eq!(holder_in(locks, "00:1c:9"), None);
        assert_eq!(holder_in("garbage\n\n1: FLOCK", "00:1c:5678"), None);
    }
}
