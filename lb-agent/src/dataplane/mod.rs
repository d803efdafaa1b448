//! Everything that touches the kernel: loading the object, attaching programs, and reading and
//! writing maps.

pub mod attach;
pub mod batch;
pub mod counters;
pub mod ids;
pub mod loader;
pub mod programs;
pub mod store;
pub mod writer;
