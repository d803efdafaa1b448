//! Types and constants shared by the kernel programs (`lb-ebpf`) and user space (`lb-agent`,
//! `lbctl`, tests).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and no `bool`, `Option` or enum
//! with a niche, so that both sides agree on every byte and a zeroed value is always valid.
//! Sizes are checked at compile time: changing a layout is a deliberate act that also bumps
//! [`MAP_ABI_VERSION`], so that an agent never reuses pinned maps of another layout.
#![no_std]

pub mod consts;
pub mod crc32c;
pub mod events;
pub mod hash;
pub mod maps;

pub use consts::*;
pub use events::*;
pub use hash::flow_hash;
pub use maps::*;
