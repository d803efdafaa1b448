//! `cargo xtask test`: the one command CI and developers run.

use std::process::Command;

use anyhow::Result;

use crate::util::{is_root, run_cmd, succeeds, workspace_root};

pub fn run(args: &[String]) -> Result<()> {
    let root = workspace_root();
    eprintln!("test: cargo fmt --check");
    run_cmd(Command::new("cargo").current_dir(&root).args(["fmt", "--all", "--check"]))?;

    eprintln!("test: clippy (host)");
    run_cmd(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;

    eprintln!("test: clippy (kernel programs, bpfel-unknown-none)");
    run_cmd(
        Command::new("rustup")
            .current_dir(&root)
            .args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "--package",
                "lb-ebpf",
                "--release",
                "--locked",
            ])
            .args([
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--target-dir",
                "target/bpf",
            ])
            .args(["--", "-D", "warnings"])
            // The flags lb-agent/build.rs builds the object with: the same fingerprint, so
            // clippy and the build do not rebuild `core` for each other.
            .env("RUSTFLAGS", "-C target-feature=+allows-misaligned-mem-access"),
    )?;

    let previous_agent = crate::history::previous_agent()?;

    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root);
    if let Some(bin) = previous_agent {
        cmd.env("LB_UPGRADE_FROM_AGENT", bin);
    }
    // The older-kernel tests boot them (setup installed them).
    if let Some(kernel) = crate::setup::old_kernel() {
        cmd.env("LB_OLD_KERNEL", kernel);
    }
    if let Some(kernel) = crate::setup::kernel_5_10() {
        cmd.env("LB_KERNEL_5_10", kernel);
    }
    if succeeds("cargo", &["nextest", "--version"]) {
        cmd.args(["nextest", "run", "--workspace", "--locked", "--no-fail-fast"]);
    } else {
        cmd.args(["test", "--workspace", "--locked", "--no-fail-fast"]);
    }
    cmd.args(args);
    if is_root() {
        // Root-only tests must run, not skip, wherever they can.
        cmd.env("LB_REQUIRE_ROOT_TESTS", "1");
        cmd.env("LB_REQUIRE_TOOLS", "1");
    } else {
        eprintln!("test: not root: kernel and network-namespace tests will say SKIPPED");
    }
    eprintln!("test: {cmd:?}");
    run_cmd(&mut cmd)
}
