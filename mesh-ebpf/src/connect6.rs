//! `cgroup/connect6`: the same capture for AF_INET6 sockets. A dual-stack
//! socket connecting to an IPv4-mapped address (`::ffff:a.b.c.d`: gRPC's C
//! core, Java) is an IPv4 connection and is redirected exactly as one, to
//! `::ffff:<agent>`. Native IPv6 is refused by name: the mesh carries IPv4
//! only, and an unmediated path would bypass it.
use aya_ebpf::{
    EbpfContext, bindings::bpf_sock_addr, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::{Decision, V4_MAPPED_PREFIX, is_v6_loopback, v4_mapped};

use crate::{
    capture::{self, Verdict},
    connect4::{IPPROTO_TCP, SOCK_STREAM, apply, sock_addr},
    maps,
};

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = sock_addr(ctx);
    let verdict = decide(ctx, sa);
    Ok(apply(verdict, |ip4, port| {
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = V4_MAPPED_PREFIX;
        sa.user_ip6[3] = ip4;
        sa.user_port = port;
    }))
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
    let ip6 = sa.user_ip6;
    if let Some(ip4) = v4_mapped(ip6) {
        // SAFETY: the context pointer is the one the kernel handed this program.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        return capture::plan_v4(&cfg, pod, cookie, ip4, sa.user_port);
    }
    if is_v6_loopback(ip6) {
        return Verdict::Pass(Decision::Loopback);
    }
    Verdict::Reject(Decision::Ipv6Refused)
}
