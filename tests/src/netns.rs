//! Network namespaces and veth pairs for tests, removed when dropped.
//!
//! Everything is created inside namespaces named `lbt-<pid>-<n>-<tag>`: the machine's own
//! interfaces and routes are never touched. Namespaces left by a process that died before it
//! could clean up (killed test run) are removed by [`remove_stale`], which every constructor
//! calls first.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
};

static COUNTER: AtomicU32 = AtomicU32::new(0);
static STALE_SWEEP: Once = Once::new();
const PREFIX: &str = "lbt-";

/// A named network namespace (`ip netns`), deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// A fresh namespace with loopback up. `tag` (a few letters) only helps reading `ip netns`.
    pub fn new(tag: &str) -> Self {
        STALE_SWEEP.call_once(remove_stale);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{tag}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // IPv6 duplicate address detection would delay the first packets by seconds.
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args));
    }

    /// Runs a command inside the namespace and returns its output (success not required).
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {program} in {}: {e}", self.name))
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        let out = self.exec("sysctl", &["-qw", &format!("{key}={value}")]);
        assert!(out.status.success(), "sysctl {key}={value} in {}: {out:?}", self.name);
    }

    /// Counter `name` of protocol `proto` ("Ip", "Tcp", "Udp"...) in the namespace's
    /// /proc/net/snmp (per protocol, a line of names, then one of values), or of
    /// /proc/net/snmp6 (`proto` "6": lines of name and value, e.g. `Udp6InCsumErrors`).
    pub fn snmp(&self, proto: &str, name: &str) -> u64 {
        let file = if proto == "6" { "/proc/net/snmp6" } else { "/proc/net/snmp" };
        let out = self.exec("cat", &[file]);
        assert!(out.status.success(), "{file} in {}: {out:?}", self.name);
        let text = String::from_utf8_lossy(&out.stdout);
        let value = if proto == "6" {
            let line = text.lines().find(|l| l.split_whitespace().next() == Some(name));
            line.and_then(|l| l.split_whitespace().nth(1))
        } else {
            let head = format!("{proto}:");
            let mut lines = text.lines().filter(|l| l.split_whitespace().next() == Some(&head));
            let (names, values) = (lines.next(), lines.next());
            let at = names.and_then(|n| n.split_whitespace().position(|n| n == name));
            at.and_then(|at| values?.split_whitespace().nth(at))
        };
        let value = value.unwrap_or_else(|| panic!("no {proto} {name} in {file} of {}", self.name));
        value.parse().unwrap_or_else(|_| panic!("{proto} {name}: {value}"))
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it creates, interfaces it
    /// looks up and programs it attaches by name all belong to the namespace.
    pub fn run<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: setns on a valid namespace fd affects only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace removes its interfaces (and their veth peers elsewhere).
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A veth pair `a_if` (in `a`) <-> `b_if` (in `b`), both up, with the given addresses
/// (`"10.200.0.1/24"`, `"fd00:200::1/64"`, ...).
pub fn veth(a: &NetNs, a_if: &str, a_addrs: &[&str], b: &NetNs, b_if: &str, b_addrs: &[&str]) {
    a.ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name()]);
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            let mut args = vec!["addr", "add", addr, "dev", ifname];
            if addr.contains(':') {
                args.push("nodad");
            }
            ns.ip(&args);
        }
        ns.ip(&["link", "set", ifname, "up"]);
    }
}

/// Removes `lbt-<pid>-...` namespaces whose creating process no longer exists.
pub fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

/// A plain HTTP/1.1 GET from inside `ns`: (status code, body).
pub fn http_get(ns: &NetNs, addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let (addr, path) = (addr.to_owned(), path.to_owned());
    ns.run(move || http_get_here(&addr, &path))
}

/// [`http_get`] in the calling thread's network namespace (3 s to answer).
pub fn http_get_here(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}
