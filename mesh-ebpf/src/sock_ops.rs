//! `sockops`: when a redirected socket starts its handshake (its source port
//! is bound by then), move the original destination from the cookie-keyed map
//! to one keyed by the 4-tuple the agent will see on accept. A dual-stack
//! (AF_INET6) socket redirected to `::ffff:<agent>` speaks IPv4 on the wire,
//! so its tuple is recorded in IPv4 form too.
use aya_ebpf::{
    EbpfContext, bindings::BPF_SOCK_OPS_TCP_CONNECT_CB, helpers::bpf_get_socket_cookie,
    macros::sock_ops, programs::SockOpsContext,
};
use aya_log_ebpf::warn;
use core::ptr::read_volatile;
use mesh_common::{Decision, TupleKey, v4_mapped};

use crate::maps::{self, ORIG_BY_COOKIE, ORIG_BY_TUPLE};

/// sock_ops programs return 1 for success; the value is otherwise unused.
pub const DONE: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// The connection's local and remote IPv4 addresses (network order): of an
/// AF_INET socket, or of an AF_INET6 socket connected IPv4-mapped.
///
/// Every field is read up front, each with its own volatile load: the
/// verifier allows only constant offsets from the context pointer, and
/// loads made in two branches get merged into one load through a computed
/// pointer, which it refuses.
#[inline(always)]
pub fn ipv4_addresses(ctx: &SockOpsContext) -> Option<(u32, u32)> {
    let ops = ctx.ops;
    // SAFETY: the context pointer is the kernel's, valid for the whole run;
    // these fields are readable whatever the socket's family.
    let (family, local4, remote4, local6, remote6) = unsafe {
        (
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).local_ip4),
            read_volatile(&raw const (*ops).remote_ip4),
            [
                read_volatile(&raw const (*ops).local_ip6[0]),
                read_volatile(&raw const (*ops).local_ip6[1]),
                read_volatile(&raw const (*ops).local_ip6[2]),
                read_volatile(&raw const (*ops).local_ip6[3]),
            ],
            [
                read_volatile(&raw const (*ops).remote_ip6[0]),
                read_volatile(&raw const (*ops).remote_ip6[1]),
                read_volatile(&raw const (*ops).remote_ip6[2]),
                read_volatile(&raw const (*ops).remote_ip6[3]),
            ],
        )
    };
    match family {
        AF_INET => Some((local4, remote4)),
        AF_INET6 => Some((v4_mapped(local6)?, v4_mapped(remote6)?)),
        _ => None,
    }
}

/// The remote port, host order.
#[inline(always)]
pub fn remote_port(ctx: &SockOpsContext) -> u16 {
    // remote_port holds the network-order port in its upper 16 bits.
    u16::from_be((ctx.remote_port() >> 16) as u16)
}

#[sock_ops]
pub fn mesh_sock_ops(ctx: SockOpsContext) -> u32 {
    match try_sock_ops(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<u32, u32> {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return Ok(DONE);
    }
    let Some((local_ip4, remote_ip4)) = ipv4_addresses(ctx) else {
        return Ok(DONE);
    };
    let cfg = maps::config().ok_or(DONE)?;
    let remote_port = remote_port(ctx);
    let agent_port = u16::from_be(cfg.outbound_port as u16);
    if remote_ip4 != cfg.agent_ip4 || remote_port != agent_port {
        return Ok(DONE);
    }
    // SAFETY: the context pointer is the one the kernel handed this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once; the entry is only removed below, by us.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }).copied() else {
        maps::count(Decision::TupleMissingOrig);
        return Ok(DONE);
    };
    let key = TupleKey {
        src_ip4: local_ip4,
        dst_ip4: remote_ip4,
        src_port: ctx.local_port(),
        dst_port: u32::from(remote_port),
    };
    if ORIG_BY_TUPLE.insert(key, orig, 0).is_err() {
        warn!(ctx, "mesh: could not record redirected 4-tuple");
        maps::count(Decision::MapUpdateFailed);
        return Ok(DONE);
    }
    let _ = ORIG_BY_COOKIE.remove(cookie);
    maps::count(Decision::TupleRecorded);
    Ok(DONE)
}
