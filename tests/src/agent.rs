//! Running the real `lb-agent` binary as a child process, with its log captured.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// A running agent; killed (SIGKILL) on drop if still running.
pub struct Agent {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// A stand-in for a stopped agent: a process that exits at once.
    pub fn idle() -> Self {
        let child = std::process::Command::new("true").spawn().expect("spawn true");
        Self { child, log: Arc::new(Mutex::new(Vec::new())) }
    }
}

impl Agent {
    /// Starts `lb-agent` with `args`, optionally inside network namespace `netns` and cgroup
    /// `cgroup` (a cgroup v2 directory the process joins before exec).
    pub fn start(args: &[&str], netns: Option<&str>, cgroup: Option<&Path>) -> Self {
        Self::start_bin(&crate::workspace_bin("lb-agent"), args, netns, cgroup)
    }

    /// [`Agent::start`] with another build of the agent (the upgrade test's previous release).
    pub fn start_bin(
        bin: &Path,
        args: &[&str],
        netns: Option<&str>,
        cgroup: Option<&Path>,
    ) -> Self {
        let mut cmd = crate::proc::command_in(bin, netns, cgroup);
        cmd.args(args)
            // LB_TEST_AGENT_LOG=debug shows the agents' debug logs in test failures.
            .env("RUST_LOG", std::env::var("LB_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let log = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        Self { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the agent to exit by itself; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a log line contains `needle`; panics with the log after `timeout`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "lb-agent exited ({status}) before logging {needle:?}:\n{}",
                    self.log().join("\n")
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "lb-agent did not log {needle:?} within {timeout:?}:\n{}",
                    self.log().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Number of log lines containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log().iter().filter(|l| l.contains(needle)).count()
    }

    /// SIGKILL: the agent dies without any chance to clean up.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "lb-agent ignored SIGTERM:\n{}",
                self.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
