//! Kernel programs of the load balancer.
//!
//! Entry points are thin: each hook module has one `#[classifier]`/`#[xdp]`/... function that
//! calls a `try_*` function returning `Result`, and shares parsing (`packet`), map definitions
//! (`maps`), lookups (`lookup`) and counters (`stats`) with the others. Read a hook module top to
//! bottom as the packet's journey.
//!
//! On the host this crate only type-checks (so `cargo clippy --workspace` covers it); the real
//! object is built for `bpfel-unknown-none` by lb-agent's build script.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// An atomic OR into a map value (`nat::note_snat_source`): the BPF target's `core` has no
// atomic read-modify-write types, while the instruction set has it (BPF_ATOMIC, Linux 5.12;
// used only where `kernel::has(KF_ATOMICS)`).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod bench_noop;
#[cfg(target_arch = "bpf")]
mod bounds;
#[cfg(target_arch = "bpf")]
mod clock;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod device;
#[cfg(target_arch = "bpf")]
mod dsr;
#[cfg(target_arch = "bpf")]
mod echo;
#[cfg(target_arch = "bpf")]
mod fib;
#[cfg(target_arch = "bpf")]
mod filters;
#[cfg(target_arch = "bpf")]
mod fragment;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod kernel;
#[cfg(target_arch = "bpf")]
mod lookup;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod monitor;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod rewrite;
#[cfg(target_arch = "bpf")]
mod sctp;
#[cfg(target_arch = "bpf")]
mod select;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod stats;
#[cfg(target_arch = "bpf")]
mod tc_egress;
#[cfg(target_arch = "bpf")]
mod tc_ingress;
#[cfg(target_arch = "bpf")]
mod tc_pod;
#[cfg(target_arch = "bpf")]
mod words;
#[cfg(target_arch = "bpf")]
mod xdp_ingress;

/// The kernel requires a GPL-compatible license for several helpers used by the datapath.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
