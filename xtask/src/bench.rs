//! `cargo xtask bench [control-plane|datapath]`: release builds, figures printed, nothing
//! asserted.

use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{is_root, run_cmd, workspace_root};

pub const KINDS: &[&str] = &["control-plane", "datapath"];

pub fn run(which: Option<&str>) -> Result<()> {
    if !is_root() {
        bail!("benchmarks load BPF programs and maps: run them as root");
    }
    let kinds: Vec<&str> = match which {
        Some(k) if KINDS.contains(&k) => vec![k],
        Some(k) => bail!("unknown benchmark {k:?}; one of {KINDS:?}"),
        None => KINDS.to_vec(),
    };
    let root = workspace_root();
    run_cmd(Command::new("cargo").current_dir(&root).args([
        "build",
        "--quiet",
        "--release",
        "--locked",
        "-p",
        "lb-tests",
        "--bin",
        "lb-bench",
    ]))?;
    for k in kinds {
        println!("== bench {k} ==");
        run_cmd(Command::new(root.join("target/release/lb-bench")).arg(k))?;
    }
    Ok(())
}
