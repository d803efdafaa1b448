//! The agent an upgrade starts from: the upgrade test runs this build, then replaces it with
//! the current one under traffic. Built from git history (a worktree under
//! `target/upgrade-from/`, with its own target directory: two copies of one workspace must not
//! share one, their artifacts carry the same names).

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::util::{run_cmd, succeeds, workspace_root};

/// The release upgraded from: the last commit of the previous working session. Move it forward
/// when a release is cut.
pub const UPGRADE_FROM: &str = "851a10a59935d18c3d833489c5b820434492087f";

fn git(args: &[&str]) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(workspace_root()).args(args);
    cmd
}

fn have_commit() -> bool {
    git(&["cat-file", "-e", &format!("{UPGRADE_FROM}^{{commit}}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Builds `lb-agent` at [`UPGRADE_FROM`] (once; later runs reuse it) and returns its path, or
/// `None`, saying why, when this checkout does not hold that commit (a shallow clone).
pub fn previous_agent() -> Result<Option<PathBuf>> {
    let dir = workspace_root().join("target/upgrade-from");
    let bin = dir.join(format!("lb-agent-{}", &UPGRADE_FROM[..12]));
    if bin.exists() {
        return Ok(Some(bin));
    }
    if !succeeds("git", &["--version"]) {
        eprintln!(
            "upgrade test: git is missing, so the previous agent cannot be built: it will skip"
        );
        return Ok(None);
    }
    if !have_commit() {
        let _ = git(&["fetch", "--quiet", "origin", UPGRADE_FROM]).status();
    }
    if !have_commit() {
        eprintln!(
            "upgrade test: commit {UPGRADE_FROM} is not in this checkout (shallow clone?): the upgrade test will skip"
        );
        return Ok(None);
    }
    let src = dir.join("src");
    if src.exists() {
        std::fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
    }
    run_cmd(&mut git(&["worktree", "prune"]))?;
    let src_arg = src.to_str().context("non-UTF-8 path")?;
    run_cmd(&mut git(&["worktree", "add", "--quiet", "--detach", src_arg, UPGRADE_FROM]))?;
    eprintln!("test: building the agent to upgrade from ({})", &UPGRADE_FROM[..12]);
    run_cmd(
        Command::new("cargo")
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .args(["build", "--quiet", "--locked", "-p", "lb-agent", "--bin", "lb-agent"]),
    )?;
    std::fs::copy(dir.join("target/debug/lb-agent"), &bin)
        .with_context(|| format!("copying the previous agent to {}", bin.display()))?;
    Ok(Some(bin))
}
