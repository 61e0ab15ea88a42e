//! `cgroup/connect4`: redirect enrolled pods' TCP connects to the agent.
use aya_ebpf::{
    EbpfContext, bindings::bpf_sock_addr, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::Decision;

use crate::{
    capture::{self, Verdict},
    maps,
};

/// Let the connect proceed (possibly rewritten).
pub const ALLOW: i32 = 1;
/// Fail the connect with EPERM: better than an unrecorded redirect the agent
/// would have to refuse anyway.
pub const REJECT: i32 = 0;

pub const SOCK_STREAM: u32 = 1;
pub const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = sock_addr(ctx);
    let verdict = decide(ctx, sa);
    Ok(apply(verdict, |ip4, port| {
        sa.user_ip4 = ip4;
        sa.user_port = port;
    }))
}

/// Counts the verdict and applies it with `rewrite`.
#[inline(always)]
pub fn apply(verdict: Verdict, rewrite: impl FnOnce(u32, u32)) -> i32 {
    match verdict {
        Verdict::Pass(d) => {
            maps::count(d);
            ALLOW
        }
        Verdict::Rewrite {
            decision,
            ip4,
            port,
        } => {
            rewrite(ip4, port);
            maps::count(decision);
            ALLOW
        }
        Verdict::Reject(d) => {
            maps::count(d);
            REJECT
        }
    }
}

fn decide(ctx: &SockAddrContext, sa: &bpf_sock_addr) -> Verdict {
    let Some(cfg) = maps::config() else {
        return Verdict::Pass(Decision::NotConfigured);
    };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return Verdict::Pass(Decision::NotTcp);
    }
    let pod = match capture::enrolled_pod(&cfg) {
        Ok(pod) => pod,
        Err(d) => return Verdict::Pass(d),
    };
    // SAFETY: the context pointer is the one the kernel handed this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    capture::plan_v4(&cfg, pod, cookie, sa.user_ip4, sa.user_port)
}

/// The one place that turns the context into a reference.
#[inline(always)]
#[allow(clippy::mut_from_ref)] // the kernel context is ours alone for the whole run
pub fn sock_addr(ctx: &SockAddrContext) -> &mut bpf_sock_addr {
    // SAFETY: the kernel guarantees the context pointer is valid and
    // exclusively ours for the duration of the program.
    unsafe { &mut *ctx.sock_addr }
}
