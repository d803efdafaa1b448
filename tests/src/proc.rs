//! Child processes placed in a network namespace and a cgroup before they start.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
};

/// A command for `program` that runs inside network namespace `netns` (if any) and joins cgroup
/// v2 directory `cgroup` (if any) before exec. The namespace is entered with setns(2) only, not
/// `ip netns exec`, which would also give the child a fresh /sys without the bpffs mount.
pub fn command_in(program: &Path, netns: Option<&str>, cgroup: Option<&Path>) -> Command {
    let mut cmd = Command::new(program);
    if let Some(ns) = netns {
        let path = format!("/run/netns/{ns}");
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: runs in the forked child before exec; setns is async-signal-safe. The file is
        // moved into the closure so its descriptor stays open until then.
        unsafe {
            use std::os::{fd::AsRawFd, unix::process::CommandExt};
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    if let Some(cg) = cgroup {
        let procs = std::ffi::CString::new(cg.join("cgroup.procs").to_string_lossy().as_bytes())
            .expect("cgroup path without NUL");
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (open, write, close) on a path prepared before the fork.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let rc = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                libc::close(fd);
                if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
            });
        }
    }
    cmd
}

/// Runs `lb-probe` with `args` in `netns`/`cgroup` and returns its output lines.
pub fn probe(netns: Option<&str>, cgroup: Option<&Path>, args: &[&str]) -> Vec<String> {
    let out: Output = command_in(&crate::workspace_bin("lb-probe"), netns, cgroup)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run lb-probe");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

/// A background `lb-probe serve`, killed on drop.
pub struct Server {
    child: std::process::Child,
}

impl Server {
    pub fn start(netns: &str, name: &str, tcp: &[&str], udp: &[&str]) -> Self {
        let mut cmd = command_in(&crate::workspace_bin("lb-probe"), Some(netns), None);
        cmd.args(["serve", "--name", name]);
        for a in tcp {
            cmd.args(["--tcp", a]);
        }
        for a in udp {
            cmd.args(["--udp", a]);
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("start lb-probe serve");
        // Wait until it is listening.
        let mut line = [0u8; 8];
        let _ = std::io::Read::read(child.stdout.as_mut().unwrap(), &mut line);
        Self { child }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `lb-probe` client running in the background (for sessions that span a change).
pub struct Background {
    child: std::process::Child,
}

impl Background {
    pub fn start(netns: Option<&str>, cgroup: Option<&Path>, args: &[&str]) -> Self {
        let child = command_in(&crate::workspace_bin("lb-probe"), netns, cgroup)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start lb-probe");
        Self { child }
    }

    /// Waits for the client to finish and returns its output lines.
    pub fn finish(self) -> Vec<String> {
        let out = self.child.wait_with_output().expect("wait for lb-probe");
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
    }
}
