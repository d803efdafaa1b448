//! Everything that touches the kernel: loading the object, attaching programs, and reading and
//! writing maps.

pub mod attach;
pub mod counters;
pub mod loader;
pub mod programs;
