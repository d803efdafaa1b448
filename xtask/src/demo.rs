//! `cargo xtask demo`: builds and runs the mini-cluster demo (tests/src/bin/lb-demo.rs).

use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{build_release_bins, is_root, run_cmd, workspace_root};

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("the demo loads BPF programs and creates network namespaces: run it as root");
    }
    build_release_bins()?;
    run_cmd(&mut Command::new(workspace_root().join("target/release/lb-demo")))
}
