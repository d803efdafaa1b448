//! Test cgroups (cgroup v2), standing for a node's root cgroup. Removed on drop.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);
static STALE_SWEEP: std::sync::Once = std::sync::Once::new();

/// Removes `lbt-<pid>-...` entries under `dir` whose creating process is gone (a killed run).
pub fn remove_stale_in(dir: &std::path::Path, remove: impl Fn(&std::path::Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("lbt-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove(&e.path());
        }
    }
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on
/// pure v2 ones).
pub fn cgroup2_root() -> PathBuf {
    lb_agent::dataplane::attach::cgroup2_mount()
        .expect("no cgroup2 mount found (socket hooks need cgroup v2)")
}

pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Self {
        STALE_SWEEP.call_once(|| {
            remove_stale_in(&cgroup2_root(), |p| {
                let _ = std::fs::remove_dir(p);
            })
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = cgroup2_root().join(format!("lbt-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes that were in it have exited (children are killed or waited for first);
        // move any straggler to the parent so the directory can go.
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            let parent = self.path.parent().unwrap().join("cgroup.procs");
            for pid in procs.lines() {
                let _ = std::fs::write(&parent, pid);
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}
