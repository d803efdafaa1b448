//! The kernel programs, embedded at build time (see build.rs).

/// The eBPF object (ELF) built from `lb-ebpf`, 8-byte aligned as the ELF parser expects.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb.bpf.o"));

/// The embedded object, or a clear error when the agent was built with `LB_SKIP_EBPF_BUILD=1`.
pub fn ebpf_object() -> anyhow::Result<&'static [u8]> {
    if EBPF_OBJECT.is_empty() {
        anyhow::bail!(
            "this binary was built with LB_SKIP_EBPF_BUILD=1 and carries no eBPF object; \
             rebuild without it (after `cargo xtask setup`)"
        );
    }
    Ok(EBPF_OBJECT)
}
