//! `cargo xtask bench [control-plane|datapath|e2e]`: release builds, figures printed, nothing
//! asserted. `e2e` compares with kube-proxy's iptables and nftables rules over real
//! connections (about 4 minutes) and writes its plot to `target/bench/e2e.svg`.

use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{build_release_bins, is_root, run_cmd, workspace_root};

pub const KINDS: &[&str] = &["control-plane", "datapath", "e2e"];

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
    build_release_bins()?;
    for k in kinds {
        println!("== bench {k} ==");
        let mut cmd = Command::new(root.join("target/release/lb-bench"));
        cmd.arg(k);
        if k == "e2e" {
            let dir = root.join("target/bench");
            std::fs::create_dir_all(&dir)?;
            cmd.arg("--svg").arg(dir.join("e2e.svg"));
        }
        run_cmd(&mut cmd)?;
    }
    Ok(())
}
