//! Builds from git history: the agent an upgrade starts from (the upgrade test runs it, then
//! replaces it with the current one under traffic) and the kernel programs the datapath bench
//! compares against. Each is built in a worktree under `target/` with its own target
//! directory: two copies of one workspace must not share one, their artifacts carry the same
//! names.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::util::{run_cmd, succeeds, workspace_root};

/// The release upgraded from: the last commit of the previous working session. Move it forward
/// when a release is cut.
pub const UPGRADE_FROM: &str = "cb05378a2a53bcfba57a5a534b40868c3fb4d56b";

fn git(args: &[&str]) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(workspace_root()).args(args);
    cmd
}

fn have_commit(rev: &str) -> bool {
    git(&["cat-file", "-e", &format!("{rev}^{{commit}}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The full hash of a revision (a tag, branch, `HEAD~1`, a short hash), if this checkout has it.
pub fn resolve(rev: &str) -> Option<String> {
    let out =
        git(&["rev-parse", "--verify", "--quiet", &format!("{rev}^{{commit}}")]).output().ok()?;
    let hash = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !hash.is_empty()).then_some(hash)
}

/// Checks out `commit` in a worktree at `dir/src` and runs `cargo build ARGS` there with the
/// target directory `dir/target`. `Ok(false)`, saying why, when git or the commit is missing
/// (a shallow clone).
pub fn build_at(commit: &str, dir: &Path, what: &str, args: &[&str]) -> Result<bool> {
    if !succeeds("git", &["--version"]) {
        eprintln!("{what}: git is missing, so {commit:.12} cannot be built");
        return Ok(false);
    }
    if !have_commit(commit) {
        let _ = git(&["fetch", "--quiet", "origin", commit]).status();
    }
    if !have_commit(commit) {
        eprintln!("{what}: commit {commit} is not in this checkout (shallow clone?)");
        return Ok(false);
    }
    let src = dir.join("src");
    if src.exists() {
        std::fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
    }
    run_cmd(&mut git(&["worktree", "prune"]))?;
    let src_arg = src.to_str().context("non-UTF-8 path")?;
    run_cmd(&mut git(&["worktree", "add", "--quiet", "--detach", src_arg, commit]))?;
    eprintln!("{what}: building {:.12}", commit);
    run_cmd(
        Command::new("cargo")
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .args(["build", "--quiet", "--locked"])
            .args(args),
    )?;
    Ok(true)
}

/// Builds `lb-agent` at [`UPGRADE_FROM`] (once; later runs reuse it) and returns its path, or
/// `None`, saying why, when this checkout does not hold that commit (a shallow clone).
pub fn previous_agent() -> Result<Option<PathBuf>> {
    let dir = workspace_root().join("target/upgrade-from");
    let bin = dir.join(format!("lb-agent-{}", &UPGRADE_FROM[..12]));
    if bin.exists() {
        return Ok(Some(bin));
    }
    let what = "upgrade test (skips without it)";
    if !build_at(UPGRADE_FROM, &dir, what, &["-p", "lb-agent", "--bin", "lb-agent"])? {
        return Ok(None);
    }
    std::fs::copy(dir.join("target/debug/lb-agent"), &bin)
        .with_context(|| format!("copying the previous agent to {}", bin.display()))?;
    Ok(Some(bin))
}

/// The kernel programs' object (`lb.bpf.o`) as built at `rev`, for the datapath bench to
/// compare against (built once per commit under `target/bench-against/`).
pub fn ebpf_object_at(rev: &str) -> Result<PathBuf> {
    let Some(commit) = resolve(rev) else {
        anyhow::bail!("{rev:?} is not a commit of this checkout");
    };
    let dir = workspace_root().join("target/bench-against");
    let object = dir.join(format!("lb-{}.bpf.o", &commit[..12]));
    if object.exists() {
        return Ok(object);
    }
    if !build_at(&commit, &dir, "bench baseline", &["-p", "lb-agent", "--lib"])? {
        anyhow::bail!("cannot build the baseline {rev}");
    }
    let build = dir.join("target/debug/build");
    let newest = std::fs::read_dir(&build)
        .with_context(|| format!("reading {}", build.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("out/lb.bpf.o"))
        .filter(|p| p.exists())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .context("the baseline build left no lb.bpf.o")?;
    std::fs::copy(&newest, &object)
        .with_context(|| format!("copying the baseline object to {}", object.display()))?;
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::resolve;

    #[test]
    fn revisions_resolve_to_full_hashes_and_anything_else_to_none() {
        if !super::git(&["rev-parse", "--git-dir"]).output().is_ok_and(|o| o.status.success()) {
            eprintln!("SKIPPED: not a git checkout (or no git)");
            return;
        }
        let head = resolve("HEAD").expect("HEAD resolves in a git checkout");
        assert_eq!(head.len(), 40, "{head}");
        assert!(head.chars().all(|c| c.is_ascii_hexdigit()), "{head}");
        assert_eq!(resolve(&head[..12]).as_deref(), Some(head.as_str()));
        assert_eq!(resolve("no-such-revision-anywhere"), None);
        assert_eq!(resolve("HEAD; echo oops"), None);
    }
}
