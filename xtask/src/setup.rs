//! Toolchain bootstrap. Each step checks before it acts, so a second run takes seconds; a failing
//! step says which, why, and what to do.

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Context, Result, bail};

use crate::util::{is_root, output, run_cmd, succeeds};

/// bpf-linker release known to build against the nightly's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
/// Validates the deploy manifests against the Kubernetes schemas (pinned).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// Boots another kernel over the host's filesystem, for the older-kernel test (pinned).
const VIRTME_NG: &str = "virtme-ng==1.42";
/// What the older-kernel test boots: Debian 12's kernel (6.1 LTS), qemu (emulated: nested
/// KVM is not to be relied on) and the static busybox virtme-ng's init needs.
const OLD_KERNEL_PACKAGES: &[&str] = &["linux-image-amd64", "qemu-system-x86", "busybox-static"];
/// Where the older-kernel test's 5.10 comes from: Debian 11's security suite, fetched by apt
/// (which checks Debian's signatures) into a list of its own, never the machine's sources.
const KERNEL_5_10_SOURCE: &str = "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
     http://deb.debian.org/debian-security bullseye-security main";
/// Debian packages the tests and demo use: (command that proves it is there, package).
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("sysctl", "procps"),
    ("bpftool", "bpftool"),
    ("iptables-restore", "iptables"),
    ("nft", "nftables"),
    ("ethtool", "ethtool"),
];

struct Step {
    name: &'static str,
    done: fn() -> bool,
    install: fn() -> Result<()>,
    hint: &'static str,
}

const STEPS: &[Step] = &[
    Step {
        name: "nightly toolchain",
        done: || succeeds("rustup", &["run", "nightly", "rustc", "--version"]),
        install: || {
            run_cmd(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))
        },
        hint: "the eBPF crate needs nightly for -Z build-std; check network access to static.rust-lang.org",
    },
    Step {
        name: "rust-src for nightly",
        done: || {
            output("rustup", &["component", "list", "--toolchain", "nightly", "--installed"])
                .is_ok_and(|s| s.lines().any(|l| l.starts_with("rust-src")))
        },
        install: || {
            run_cmd(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))
        },
        hint: "needed to build `core` for bpfel-unknown-none",
    },
    Step {
        name: "bpf-linker",
        done: bpf_linker_works,
        install: install_bpf_linker,
        hint: "bpf-linker is built from crates.io against the LLVM inside the nightly toolchain",
    },
    Step {
        name: "bpffs at /sys/fs/bpf",
        done: || skip("LB_SETUP_SKIP_BPFFS") || bpffs_mounted(),
        install: || {
            if !is_root() {
                bail!("mounting bpffs needs root");
            }
            run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        },
        hint: "the agent pins maps there; as root: mount -t bpf bpf /sys/fs/bpf",
    },
    Step {
        name: "Debian packages",
        done: || skip("LB_SETUP_SKIP_PACKAGES") || missing_packages().is_empty(),
        install: install_packages,
        hint: "as root: apt-get install iproute2 procps bpftool iptables nftables ethtool",
    },
    Step {
        name: "kubernetes-validate (Python, for the deploy manifests)",
        done: || skip("LB_SETUP_SKIP_PACKAGES") || kubernetes_validate_works(),
        install: install_kubernetes_validate,
        hint: "needs python3 with venv and access to PyPI",
    },
    Step {
        name: "kernel 6.1 in qemu (virtme-ng), for the older-kernel test",
        done: || skip("LB_SETUP_SKIP_PACKAGES") || old_kernel_ready(),
        install: install_old_kernel,
        hint: "as root on Debian 12: apt-get install linux-image-amd64 qemu-system-x86 busybox-static, and virtme-ng from PyPI",
    },
    Step {
        name: "kernel 5.10 (Debian 11's), for the older-kernel test",
        done: || skip("LB_SETUP_SKIP_PACKAGES") || kernel_5_10().is_some(),
        install: install_kernel_5_10,
        hint: "as root, with deb.debian.org reachable: Debian 11's linux-image-5.10.*-amd64 unpacked, its image in ~/.local/share/lb-tools/kernels, its modules in /lib/modules",
    },
];

/// Set to 1 to skip a step (container image builds need neither packages nor bpffs).
fn skip(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| v == "1")
}

/// Where tools of the test suite are installed (stable across `cargo clean`).
pub fn tools_dir() -> PathBuf {
    llvm_prefix().with_file_name("lb-tools")
}

fn kubernetes_validate_works() -> bool {
    let bin = tools_dir().join("venv/bin/kubernetes-validate");
    output(bin.to_str().unwrap_or(""), &["--version"])
        .is_ok_and(|v| KUBERNETES_VALIDATE.ends_with(v.trim()))
}

/// The newest 6.1 kernel image under /boot (the older-kernel test's).
pub fn old_kernel() -> Option<PathBuf> {
    newest_kernel(std::path::Path::new("/boot"), "6.1.")
}

/// The newest 5.10 kernel image setup unpacked, whose modules are in place (the older-kernel
/// test's other kernel).
pub fn kernel_5_10() -> Option<PathBuf> {
    newest_kernel(&tools_dir().join("kernels"), "5.10.")
}

/// The newest `vmlinuz-<version>` in `dir` whose version starts with `series` and whose
/// modules are installed (the VM loads them from the host's /lib/modules).
fn newest_kernel(dir: &std::path::Path, series: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.strip_prefix("vmlinuz-").is_some_and(|version| {
                version.starts_with(series)
                    && PathBuf::from("/lib/modules").join(version).join("modules.dep").exists()
            })
        })
        .collect();
    // Newest by its numbers: 6.1.0-57 after 6.1.0-9.
    found.sort_by_key(|p| numbers(&p.to_string_lossy()));
    found.pop()
}

/// Fetches Debian 11's newest 5.10 kernel package with apt (lists and downloads of its own,
/// under the tools directory), then unpacks it by hand rather than installing it: its image
/// goes beside the other tools (not /boot, where a boot loader would find it), its modules to
/// /lib/modules (where the VM's initramfs builder and the guest look), indexed by depmod.
fn install_kernel_5_10() -> Result<()> {
    if !is_root() {
        bail!("unpacking kernel modules into /lib/modules needs root");
    }
    let dir = tools_dir().join("apt-bullseye");
    for sub in ["lists/partial", "archives/partial", "cache"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::write(dir.join("sources.list"), format!("{KERNEL_5_10_SOURCE}\n"))?;
    let d = dir.display();
    let opts: Vec<String> = [
        format!("Dir::Etc::SourceList={d}/sources.list"),
        "Dir::Etc::SourceParts=/dev/null".to_owned(),
        format!("Dir::State::Lists={d}/lists"),
        format!("Dir::Cache={d}/cache"),
        format!("Dir::Cache::Archives={d}/archives"),
        // Root downloads into root's directory (apt's own user could not write there).
        "APT::Sandbox::User=root".to_owned(),
    ]
    .into_iter()
    .flat_map(|o| ["-o".to_owned(), o])
    .collect();
    run_cmd(Command::new("apt-get").args(&opts).arg("update"))?;
    let mut args: Vec<&str> = opts.iter().map(String::as_str).collect();
    args.extend(["pkgnames", "linux-image-5.10."]);
    let names = output("apt-cache", &args)?;
    let package = newest_5_10_image(&names).context("no linux-image-5.10.*-amd64 in the index")?;
    let deb_dir = dir.join("deb");
    let _ = std::fs::remove_dir_all(&deb_dir);
    std::fs::create_dir_all(&deb_dir)?;
    run_cmd(
        Command::new("apt-get").current_dir(&deb_dir).args(&opts).args(["download", &package]),
    )?;
    let deb = std::fs::read_dir(&deb_dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let unpacked = dir.join("unpacked");
    let _ = std::fs::remove_dir_all(&unpacked);
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let version = package.trim_start_matches("linux-image-");
    let modules = PathBuf::from("/lib/modules").join(version);
    if !modules.exists() {
        let from = unpacked.join("lib/modules").join(version);
        run_cmd(Command::new("cp").arg("-a").arg(from).arg(&modules))?;
    }
    run_cmd(Command::new("depmod").arg(version))?;
    let kernels = tools_dir().join("kernels");
    std::fs::create_dir_all(&kernels)?;
    let image = format!("vmlinuz-{version}");
    std::fs::copy(unpacked.join("boot").join(&image), kernels.join(&image))?;
    std::fs::remove_dir_all(&unpacked)?;
    std::fs::remove_dir_all(&deb_dir)?;
    Ok(())
}

/// The newest `linux-image-5.10.<abi>-amd64` (the generic flavour: not cloud, rt, or debug)
/// of an `apt-cache pkgnames` listing.
fn newest_5_10_image(names: &str) -> Option<String> {
    names
        .lines()
        .map(str::trim)
        .filter(|n| {
            n.strip_prefix("linux-image-5.10.")
                .and_then(|rest| rest.strip_suffix("-amd64"))
                .is_some_and(|abi| {
                    let mut parts = abi.split('-');
                    let all_digits =
                        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
                    parts.next().is_some_and(all_digits)
                        && parts.next().is_some_and(all_digits)
                        && parts.next().is_none()
                })
        })
        .max_by_key(|n| numbers(n))
        .map(str::to_owned)
}

/// The runs of digits in `s`, as numbers.
fn numbers(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect()
}

fn old_kernel_ready() -> bool {
    old_kernel().is_some()
        && succeeds("dpkg", &["-s", "qemu-system-x86", "busybox-static"])
        && output(tools_dir().join("venv/bin/vng").to_str().unwrap_or(""), &["--version"])
            .is_ok_and(|v| VIRTME_NG.ends_with(v.split_whitespace().last().unwrap_or("")))
}

fn install_old_kernel() -> Result<()> {
    if !is_root() {
        bail!("installing a kernel package and qemu needs root");
    }
    let install = || {
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y"])
                .args(OLD_KERNEL_PACKAGES)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install().is_err() {
        run_cmd(Command::new("apt-get").arg("update"))?;
        install()?;
    }
    let venv = tools_dir().join("venv");
    if !venv.join("bin/pip").exists() {
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run_cmd(Command::new(venv.join("bin/pip")).args(["install", "--quiet", VIRTME_NG]))
}

fn install_kubernetes_validate() -> Result<()> {
    let venv = tools_dir().join("venv");
    run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run_cmd(Command::new(venv.join("bin/pip")).args(["install", "--quiet", KUBERNETES_VALIDATE]))
}

pub fn run() -> Result<()> {
    let start = Instant::now();
    for step in STEPS {
        let t = Instant::now();
        if (step.done)() {
            continue;
        }
        eprintln!("setup: {} ...", step.name);
        (step.install)()
            .and_then(|()| {
                if (step.done)() { Ok(()) } else { bail!("installed, but the check still fails") }
            })
            .with_context(|| format!("setup step `{}` failed ({})", step.name, step.hint))?;
        eprintln!("setup: {} done in {:.1}s", step.name, t.elapsed().as_secs_f64());
    }
    eprintln!("setup: ready ({:.1}s)", start.elapsed().as_secs_f64());
    Ok(())
}

/// Where the nightly's libLLVM is linked for bpf-linker. Stable across `cargo clean` and
/// reboots: the installed binary's rpath points here.
fn llvm_prefix() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/root".into());
    home.join(".local/share/lb-llvm")
}

fn bpf_linker_works() -> bool {
    output("bpf-linker", &["--version"]).is_ok_and(|v| v.contains(BPF_LINKER_VERSION))
}

fn install_bpf_linker() -> Result<()> {
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let llvm_so = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let prefix = llvm_prefix();
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for link in ["libLLVM.so", llvm_so.as_str()] {
        let path = prefix_lib.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(lib.join(&llvm_so), &path)
            .with_context(|| format!("linking {}", path.display()))?;
    }
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
            ])
            .args(["--features", BPF_LINKER_LLVM_FEATURE, "--locked", "--force"])
            .env("LLVM_PREFIX", &prefix),
    )
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
                && l.split_whitespace().nth(2) == Some("bpf")
        })
    })
}

fn missing_packages() -> Vec<&'static str> {
    DEBIAN_PACKAGES
        .iter()
        .filter(|(cmd, _)| {
            !succeeds("sh", &["-c", &format!("command -v {cmd} || test -x /usr/sbin/{cmd}")])
        })
        .map(|(_, pkg)| *pkg)
        .collect()
}

fn install_packages() -> Result<()> {
    let missing = missing_packages();
    if !is_root() {
        bail!("missing Debian packages {missing:?}, and installing them needs root");
    }
    let install = |pkgs: &[&str]| {
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(pkgs)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    // Only refresh the package index when the cached one cannot satisfy the install.
    if install(&missing).is_err() {
        run_cmd(Command::new("apt-get").arg("update"))?;
        install(&missing)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{newest_5_10_image, numbers};

    /// Kernel images compare by their numbers, not their text.
    #[test]
    fn kernel_versions_compare_by_number() {
        let mut names =
            ["vmlinuz-6.1.0-57-amd64", "vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-10-amd64"];
        names.sort_by_key(|n| numbers(n));
        assert_eq!(names.last(), Some(&"vmlinuz-6.1.0-57-amd64"));
        assert_eq!(numbers("vmlinuz-6.1.0-9-amd64"), [6, 1, 0, 9, 64]);
    }

    /// Of Debian 11's kernel packages, the newest generic amd64 image.
    #[test]
    fn the_newest_generic_5_10_image_is_chosen() {
        let names = "linux-image-5.10.0-9-amd64\nlinux-image-5.10.0-46-cloud-amd64\n\
                     linux-image-5.10.0-46-rt-amd64\nlinux-image-5.10.0-45-amd64\n\
                     linux-image-5.10.0-46-amd64-dbg\nlinux-image-5.10.0-46-amd64-unsigned\n";
        assert_eq!(newest_5_10_image(names).as_deref(), Some("linux-image-5.10.0-45-amd64"));
        assert_eq!(newest_5_10_image("linux-image-5.10.0-cloud-amd64\n"), None);
    }
}
