//! The node agent: sources (Kubernetes API or a manifests folder) -> state -> model (pure) ->
//! dataplane (BPF maps). The binaries are `lb-agent` (src/main.rs) and `lbctl` (src/bin/lbctl.rs).

pub mod config;
pub mod dataplane;
pub mod ebpf_object;
pub mod explain;
pub mod inspect;
pub mod kube_proxy_config;
pub mod latency;
pub mod memory;
pub mod model;
pub mod monitor;
pub mod serve;
pub mod sources;
pub mod state;
pub mod status;
pub mod sync;

pub use ebpf_object::{EBPF_OBJECT, ebpf_object};
