//! Everything that touches the kernel: loading the object, attaching programs, and reading and
//! writing maps.

pub mod attach;
pub mod batch;
pub mod conntrack_gc;
pub mod counters;
pub mod ids;
pub mod kernel_features;
pub mod links;
pub mod loader;
pub mod maglev_map;
pub mod mapped;
pub mod mounts;
pub mod netdev;
pub mod options;
pub mod pin_lock;
pub mod pod_devices;
pub mod port_filters;
pub mod programs;
pub mod sock_destroy;
pub mod store;
pub mod sys_bpf;
pub mod tc_query;
pub mod writer;
