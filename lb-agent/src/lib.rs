//! The node agent: sources (Kubernetes API or a manifests folder) -> model (pure) -> dataplane
//! (BPF maps). The binaries are `lb-agent` (src/main.rs) and `lbctl` (src/bin/lbctl.rs).

pub mod dataplane;
pub mod ebpf_object;

pub use ebpf_object::{EBPF_OBJECT, ebpf_object};
