//! `cgroup/connect4`: redirect enrolled pods' TCP connects to the agent.
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::warn;
use mesh_common::{Decision, OrigDst, VipPort};

use crate::maps::{self, ENROLLED, EXCLUDED_PORTS, ORIG_BY_COOKIE, SERVICE_PORTS, SERVICE_VIPS};

/// Let the connect proceed (possibly rewritten).
const ALLOW: i32 = 1;
/// Fail the connect with EPERM: better than an unrecorded redirect the agent
/// would have to refuse anyway.
const REJECT: i32 = 0;

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let decision = decide(ctx, sock_addr(ctx));
    maps::count(decision);
    match decision {
        Decision::MapUpdateFailed => Err(REJECT),
        _ => Ok(ALLOW),
    }
}

fn decide(ctx: &SockAddrContext, sa: &mut bpf_sock_addr) -> Decision {
    let Some(cfg) = maps::config() else {
        return Decision::NotConfigured;
    };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return Decision::NotTcp;
    }
    // SAFETY: a plain helper call, valid in cgroup/connect4.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if cgroup_id == cfg.agent_cgroup_id {
        return Decision::AgentSocket;
    }
    // SAFETY: value is a u32 flag; only presence is read.
    if unsafe { ENROLLED.get(cgroup_id) }.is_none() {
        return Decision::NotEnrolled;
    }
    let dst_ip = sa.user_ip4;
    // First octet 127, whatever the byte order of the host: the address is
    // in network order, so its first byte in memory is the first octet.
    if dst_ip.to_ne_bytes()[0] == 127 {
        return Decision::Loopback;
    }
    if dst_ip == cfg.agent_ip4 {
        return Decision::AgentDestination;
    }
    let dst_port = u32::from(u16::from_be(sa.user_port as u16));
    // SAFETY: value is a u32 flag; only presence is read.
    if unsafe { EXCLUDED_PORTS.get(dst_port) }.is_some() {
        return Decision::ExcludedPort;
    }
    // SAFETY: values are u32 flags; only presence is read.
    if unsafe { SERVICE_VIPS.get(dst_ip) }.is_some()
        && unsafe {
            SERVICE_PORTS.get(VipPort {
                ip4: dst_ip,
                port: dst_port,
            })
        }
        .is_none()
    {
        sa.user_ip4 = cfg.agent_ip4;
        sa.user_port = cfg.refusal_port;
        return Decision::NoServicePort;
    }
    // SAFETY: the context pointer is the one the kernel handed this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        ip4: dst_ip,
        port: sa.user_port,
        cgroup_id,
    };
    if ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        warn!(
            ctx,
            "mesh: could not record original destination, connect rejected"
        );
        return Decision::MapUpdateFailed;
    }
    sa.user_ip4 = cfg.agent_ip4;
    sa.user_port = cfg.outbound_port;
    Decision::Redirected
}

/// The one place that turns the context into a reference.
#[inline(always)]
#[allow(clippy::mut_from_ref)] // the kernel context is ours alone for the whole run
fn sock_addr(ctx: &SockAddrContext) -> &mut bpf_sock_addr {
    // SAFETY: the kernel guarantees the context pointer is valid and
    // exclusively ours for the duration of the program.
    unsafe { &mut *ctx.sock_addr }
}
