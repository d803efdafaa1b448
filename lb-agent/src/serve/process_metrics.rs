//! The standard Prometheus process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, ...), as every Go exporter and kube-proxy serve them, read
//! from `/proc/self` at each scrape. Dashboards and alerts built for kube-proxy chart its memory
//! and CPU through these names. Hand-written: the crates that provide them serve the `metrics`
//! or `prometheus` libraries, not `prometheus-client`, and this is four small files.

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

/// What `/proc/self` says about this process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    /// Start time, Unix seconds.
    pub start_time_seconds: f64,
    pub threads: u64,
    pub open_fds: u64,
    /// The soft limit on open files (`ulimit -n`).
    pub max_fds: u64,
}

impl ProcessStats {
    /// Reads this process's figures; `None` where `/proc` is not there or not as Linux has it.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = boot_time(&std::fs::read_to_string("/proc/stat").ok()?)?;
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        // SAFETY: sysconf only reads configuration values.
        let (ticks, page) =
            unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        if ticks <= 0 || page <= 0 {
            return None;
        }
        let mut s = parse_stat(&stat, ticks as u64, page as u64, boot)?;
        s.open_fds = open_fds;
        s.max_fds = max_open_files(&limits)?;
        Some(s)
    }
}

/// `/proc/<pid>/stat`: the fields after the command name (which may hold spaces and
/// parentheses, hence the last `)`), counted from field 3 (state) on, as proc(5) numbers them.
fn parse_stat(stat: &str, ticks: u64, page: u64, boot_time: u64) -> Option<ProcessStats> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // proc(5) field n is fields[n - 3].
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let (utime, stime) = (field(14)?, field(15)?);
    Some(ProcessStats {
        cpu_seconds: (utime + stime) as f64 / ticks as f64,
        threads: field(20)?,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks as f64,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(page),
        ..Default::default()
    })
}

/// The boot time (`btime`, Unix seconds) from `/proc/stat`.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

/// The soft limit of "Max open files" from `/proc/<pid>/limits` ("unlimited": `u64::MAX`).
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" { Some(u64::MAX) } else { soft.parse().ok() }
}

/// Registered once; reads `/proc/self` at every scrape (a scrape that cannot read it shows
/// none of these families rather than zeros).
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some(s) = ProcessStats::read() else { return Ok(()) };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges: [(&str, &str, f64); 6] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                s.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                s.virtual_bytes as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                s.start_time_seconds,
            ),
            ("process_threads", "Number of OS threads in the process.", s.threads as f64),
            ("process_open_fds", "Number of open file descriptors.", s.open_fds as f64),
            ("process_max_fds", "Maximum number of open file descriptors.", s.max_fds as f64),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_past_a_command_name_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime priority nice threads itrealvalue starttime vsize rss ...
        let stat = "42 (lb agent) (x)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 \
                    123456789 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        let s = parse_stat(stat, 100, 4096, 1_700_000_000).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_time_seconds, 1_700_000_010.0);
        assert_eq!(s.virtual_bytes, 123_456_789);
        assert_eq!(s.resident_bytes, 300 * 4096);
    }

    #[test]
    fn truncated_or_garbled_proc_files_give_none_not_a_panic() {
        for stat in [
            "",
            "42 (x",
            "42 (x) S 1 2",
            "42 (x) S 1 2 3 4 5 6 7 8 9 10 11 x 13 14 15 16 17 18 19 20 21",
        ] {
            assert_eq!(parse_stat(stat, 100, 4096, 0), None, "{stat:?}");
        }
        assert_eq!(boot_time("cpu 1 2 3\nbtime x\n"), None);
        assert_eq!(boot_time("cpu 1 2 3\nbtime 1700000000\n"), Some(1_700_000_000));
        assert_eq!(
            max_open_files("Max open files            1024                 4096      files\n"),
            Some(1024)
        );
        assert_eq!(
            max_open_files("Max open files            unlimited  unlimited  files\n"),
            Some(u64::MAX)
        );
        assert_eq!(max_open_files("Max processes 10 10 processes\n"), None);
    }

    #[test]
    fn this_process_reads_as_running_with_memory_and_open_files() {
        let s = ProcessStats::read().expect("/proc/self on Linux");
        assert!(s.resident_bytes > 1 << 20, "{s:?}");
        assert!(s.virtual_bytes >= s.resident_bytes, "{s:?}");
        assert!(s.threads >= 1 && s.open_fds >= 3 && s.max_fds >= s.open_fds, "{s:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        // Started before now and (a test binary) within the last hour.
        let age = now.as_secs_f64() - s.start_time_seconds;
        assert!((-1.0..3600.0).contains(&age), "{s:?}, now {now:?}");
    }
}
