//! `cargo xtask vm-test 6.1|5.10 TEST [FILTER...]`: one kernel test binary of `lb-tests` (its
//! tests matching FILTER) in a VM booting that kernel, as `older_kernel` boots it (qemu
//! through virtme-ng, emulated). A minute or two, where the whole `older_kernel` run takes
//! five or more: for finding which change an older kernel's verifier runs differently (6.1
//! has dropped live branches of code 6.18 runs right).

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{setup, util::workspace_root};

/// What runs inside the VM: the test binary, its output and exit code into the shared
/// directory `$1`.
const SCRIPT: &str = r#"D=$1; shift
mount -t bpf bpf /sys/fs/bpf
modprobe sctp 2>/dev/null
LB_REQUIRE_ROOT_TESTS=1 $D/t --test-threads 1 "$@" > $D/log 2>&1
echo $? > $D/rc
"#;

pub fn run(kernel: &str, test: &str, filter: &[String]) -> Result<()> {
    let image = match kernel {
        "6.1" => setup::old_kernel(),
        "5.10" => setup::kernel_5_10(),
        other => bail!("kernel {other}: 6.1 or 5.10"),
    }
    .with_context(|| format!("no {kernel} kernel image (cargo xtask setup installs it)"))?;
    let vng = setup::tools_dir().join("venv/bin/vng");
    // The test binary, built now (cargo names it on stderr).
    let out = Command::new("cargo")
        .current_dir(workspace_root())
        .args(["test", "-p", "lb-tests", "--test", test, "--no-run"])
        .output()
        .context("cargo test --no-run")?;
    let said = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("building test {test}:\n{said}");
    }
    let bin = said
        .lines()
        .find_map(|l| l.trim().strip_prefix("Executable ")?.rsplit_once('(')?.1.strip_suffix(')'))
        .with_context(|| format!("no executable named in:\n{said}"))?;
    let dir = std::env::temp_dir().join(format!("lb-vm-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = boot(&dir, &workspace_root().join(bin), &image, &vng, filter);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn boot(
    dir: &std::path::Path,
    bin: &std::path::Path,
    image: &std::path::Path,
    vng: &std::path::Path,
    filter: &[String],
) -> Result<()> {
    std::fs::copy(bin, dir.join("t")).with_context(|| format!("copying {}", bin.display()))?;
    std::fs::write(dir.join("run.sh"), SCRIPT)?;
    let d = dir.to_str().context("temporary directory path")?;
    // vng runs its sibling virtme-run by name: the venv's bin directory first on PATH.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let venv = vng.parent().context("vng's directory")?.to_owned();
    let path = std::env::join_paths(std::iter::once(venv).chain(std::env::split_paths(&path)))?;
    let command = format!("sh {d}/run.sh {d} {}", filter.join(" "));
    println!("booting {} for {} {}", image.display(), bin.display(), filter.join(" "));
    let out = Command::new("timeout")
        .env("PATH", path)
        .arg("1200")
        .arg(vng)
        .arg("-r")
        .arg(image)
        .args(["--disable-kvm", "--user", "root", "--memory", "2G", "--cpus", "1"])
        .args(["--rwdir", d, "-e", &command])
        .output()
        .context("running virtme-ng")?;
    let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    print!("{log}");
    match std::fs::read_to_string(dir.join("rc")).map(|rc| rc.trim().to_owned()) {
        Ok(rc) if rc == "0" => Ok(()),
        Ok(rc) => bail!("the tests failed in the VM (exit {rc})"),
        Err(_) => bail!(
            "the VM ran no test (vng exited {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}
