//! Kernel programs of the mesh: one module per attach point.
//!
//! `connect4` sends enrolled pods' TCP connects to the node agent and records
//! where they were going; `sock_ops` ties the redirected connection's 4-tuple
//! to that record so the agent can find it on accept.
// Built for the kernel (bpfel-unknown-none) by `cargo xtask build-ebpf`; on
// the host the same code is only type-checked (clippy), as a std binary.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod connect4;
mod maps;
mod sock_ops;
mod strict;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
