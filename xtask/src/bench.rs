//! `cargo xtask bench [control-plane|datapath|e2e]`: release builds, figures printed, nothing
//! asserted. `datapath --against REV` also measures the kernel programs built at REV, packet
//! by packet alternating with this build's, and prints their ratios. `e2e` compares with kube-proxy's iptables and nftables rules over real
//! connections (about 4 minutes) and writes its plot to `target/bench/e2e.svg`.

use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{build_release_bins, is_root, run_cmd, workspace_root};

pub const KINDS: &[&str] = &["control-plane", "datapath", "e2e"];

pub fn run(which: Option<&str>, against: Option<&str>) -> Result<()> {
    if !is_root() {
        bail!("benchmarks load BPF programs and maps: run them as root");
    }
    if against.is_some() && which != Some("datapath") {
        bail!("--against compares kernel programs: use it with `bench datapath`");
    }
    // Built first: a bad revision fails before the release build.
    let baseline = against.map(crate::history::ebpf_object_at).transpose()?;
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
        if let Some(object) = &baseline {
            cmd.arg("--baseline").arg(object);
        }
        if k == "e2e" {
            let dir = root.join("target/bench");
            std::fs::create_dir_all(&dir)?;
            cmd.arg("--svg").arg(dir.join("e2e.svg"));
        }
        run_cmd(&mut cmd)?;
    }
    Ok(())
}
