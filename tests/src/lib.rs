//! Test harness shared by the kernel tests, the end-to-end scenarios and the demo.
//!
//! - [`kernel`]: load the real eBPF object, fill maps, run programs with BPF_PROG_TEST_RUN.
//! - [`netns`]: network namespaces and veth pairs that are always removed.
//! - [`packets`]: crafted packets (valid and malformed) for the datapath.
//! - [`routed`]: a namespace with routes and neighbours for XDP/tc forwarding decisions.

pub mod addrs;
pub mod agent;
pub mod bench;
pub mod bench_e2e;
pub mod bench_sock;
pub mod cgroup;
pub mod cluster;
pub mod kernel;
pub mod kubeproxy;
pub mod manifests;
pub mod netns;
pub mod numbered;
pub mod packets;
pub mod plans;
pub mod proc;
pub mod prog_lines;
pub mod routed;

/// True when the process may load BPF programs and create namespaces.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Returns early from a test that needs root, saying so; with `LB_REQUIRE_ROOT_TESTS=1` (set by
/// `cargo xtask test` when it runs as root, as in CI) a skip is a failure instead, so that the
/// kernel tests can never silently not run.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            if std::env::var_os("LB_REQUIRE_ROOT_TESTS").is_some_and(|v| v == "1") {
                panic!("this test needs root, and LB_REQUIRE_ROOT_TESTS=1 forbids skipping it");
            }
            eprintln!("SKIPPED: {} needs root (BPF and network namespaces)", module_path!());
            return;
        }
    };
}

/// Polls `done` every 20 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: std::time::Duration, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A tool `cargo xtask setup` installed into its Python environment
/// (`~/.local/share/lb-tools/venv/bin/<name>`), if it is there.
pub fn setup_tool(name: &str) -> Option<std::path::PathBuf> {
    let home = std::path::PathBuf::from(std::env::var_os("HOME")?);
    let bin = home.join(".local/share/lb-tools/venv/bin").join(name);
    bin.exists().then_some(bin)
}

/// Whether a test whose tools are missing must fail rather than skip (`cargo xtask test` as
/// root, after its setup installed them).
pub fn tools_required() -> bool {
    std::env::var_os("LB_REQUIRE_TOOLS").is_some_and(|v| v == "1")
}

/// A binary of the workspace built next to the running program (`target/<profile>/<name>`; tests
/// run from `target/<profile>/deps`).
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe in a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` (cargo xtask test and demo do)",
        path.display()
    );
    path
}
