//! Kernel programs of the mesh: one module per attach point.
//!
//! `connect4` and `connect6` send enrolled pods' TCP connects (IPv4, and
//! IPv4-mapped from dual-stack sockets) to the node agent and record where
//! they were going (`capture` holds what they share); `sock_ops` ties the
//! redirected connection's 4-tuple to that record so the agent can find it on
//! accept; `inbound` (sk_lookup, in each pod's namespace) refuses or hands
//! to the agent every connection into a pod that its agent did not open,
//! which `agent_ops` (on the agent's cgroup) records; `strict` drops native
//! IPv6 into pods.
// Built for the kernel (bpfel-unknown-none) by `cargo xtask build-ebpf`; on
// the host the same code is only type-checked (clippy), as a std binary.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod agent_ops;
mod capture;
mod connect4;
mod connect6;
mod inbound;
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
