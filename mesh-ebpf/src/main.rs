//! Kernel programs of the mesh: one module per attach point.
//!
//! `connect4` sends enrolled pods' TCP connects to the node agent and records
//! where they were going; `sock_ops` ties the redirected connection's 4-tuple
//! to that record so the agent can find it on accept.
#![no_std]
#![no_main]

mod connect4;
mod maps;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
