//! Builds the kernel programs (`lb-ebpf`) for the BPF target and leaves the object in OUT_DIR,
//! where `src/ebpf_object.rs` embeds it: one `cargo build` gives a self-contained agent.
//!
//! The eBPF crate needs the nightly toolchain (`-Z build-std=core`) and `bpf-linker`; both come
//! from `cargo xtask setup`. `LB_SKIP_EBPF_BUILD=1` skips this step (for doc or lint jobs without
//! that toolchain); such an agent then refuses to start with a message saying why.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const OBJECT: &str = "lb.bpf.o";

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let workspace = manifest_dir.parent().expect("lb-agent lives in the workspace").to_owned();
    for path in ["lb-ebpf/src", "lb-ebpf/Cargo.toml", "lb-common/src", "lb-common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=LB_SKIP_EBPF_BUILD");

    let dst = out_dir.join(OBJECT);
    if env::var_os("LB_SKIP_EBPF_BUILD").is_some_and(|v| v == "1") {
        std::fs::write(&dst, []).expect("write placeholder object");
        return;
    }
    let built = build_ebpf(&workspace);
    std::fs::copy(&built, &dst)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", built.display(), dst.display()));
}

fn build_ebpf(workspace: &Path) -> PathBuf {
    // A separate target directory: the outer cargo holds the lock on its own.
    let target_dir = workspace.join("target").join("bpf");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace).args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        "lb-ebpf",
        "--bin",
        "lb",
        "--release",
        "--locked",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ]);
    cmd.arg("--target-dir").arg(&target_dir);
    // The outer cargo's settings (toolchain, wrappers such as clippy-driver, flags for the host
    // target) must not leak into the BPF build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        let cargo_setting = key.starts_with("CARGO_") && key != "CARGO_HOME";
        if cargo_setting
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTUP_TOOLCHAIN")
            || key == "RUSTFLAGS"
            || key == "RUSTDOC"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    // Packet fields are byte arrays (alignment 1): without this LLVM splits every multi-byte
    // read or write of one into byte loads, shifts and ors. The verifier takes misaligned
    // packet and map-value accesses where the CPU does (x86_64, arm64); stack accesses must
    // stay aligned (see `maps::Aligned`). Set here, not in .cargo/config.toml: worktrees of
    // older commits under target/ would inherit it from there.
    cmd.env("RUSTFLAGS", "-C target-feature=+allows-misaligned-mem-access -C link-arg=--btf");
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "cannot run `rustup run nightly cargo` to build lb-ebpf: {e}. Run `cargo xtask setup`."
        )
    });
    if !status.success() {
        panic!(
            "building lb-ebpf for bpfel-unknown-none failed ({status}). If the error above names \
             bpf-linker, rust-src or the nightly toolchain, run `cargo xtask setup`."
        );
    }
    target_dir.join("bpfel-unknown-none/release/lb")
}
