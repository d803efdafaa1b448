//! `cargo xtask demo`: builds and runs the mini-cluster demo (tests/src/bin/lb-demo.rs).

use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{is_root, run_cmd, workspace_root};

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("the demo loads BPF programs and creates network namespaces: run it as root");
    }
    run_cmd(Command::new("cargo").current_dir(workspace_root()).args([
        "run",
        "--quiet",
        "--release",
        "--locked",
        "--package",
        "lb-tests",
        "--bin",
        "lb-demo",
    ]))
}
