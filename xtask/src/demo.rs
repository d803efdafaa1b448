//! `cargo xtask demo`: builds and runs the mini-cluster demo (tests/src/bin/lb-demo.rs).

use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{is_root, run_cmd, workspace_root};

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("the demo loads BPF programs and creates network namespaces: run it as root");
    }
    let root = workspace_root();
    // Every binary the demo starts (lb-agent, lbctl, lb-probe), not only lb-demo: stale or
    // missing ones next to it would be used otherwise.
    run_cmd(Command::new("cargo").current_dir(&root).args([
        "build",
        "--quiet",
        "--release",
        "--locked",
        "--workspace",
        "--bins",
    ]))?;
    run_cmd(&mut Command::new(root.join("target/release/lb-demo")))
}
