//! `sockops` on the agent's own cgroup: records the 4-tuple of every
//! connection the agent opens into one of this node's pods, from its connect
//! until the socket closes, so that the pod's `inbound` program lets it in
//! and nothing else. Removing the record at close keeps a later connection
//! from another process that happens to reuse the same ports out.
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::{Decision, TupleKey};

use crate::{
    maps::{self, AGENT_TUPLES, INBOUND_PODS},
    sock_ops::{DONE, ipv4_addresses, remote_port},
};

#[sock_ops]
pub fn mesh_agent_sock_ops(ctx: SockOpsContext) -> u32 {
    match try_agent_sock_ops(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

fn try_agent_sock_ops(ctx: &SockOpsContext) -> Result<u32, u32> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB {
        return Ok(DONE);
    }
    let (local_ip4, remote_ip4) = ipv4_addresses(ctx).ok_or(DONE)?;
    let key = TupleKey {
        src_ip4: local_ip4,
        dst_ip4: remote_ip4,
        src_port: ctx.local_port(),
        dst_port: u32::from(remote_port(ctx)),
    };
    if op == BPF_SOCK_OPS_STATE_CB {
        // args: old state, new state.
        if ctx.arg(1) == BPF_TCP_CLOSE {
            let _ = AGENT_TUPLES.remove(key);
        }
        return Ok(DONE);
    }
    // SAFETY: value is a u32 mode; only presence is read.
    if unsafe { INBOUND_PODS.get(remote_ip4) }.is_none() {
        return Ok(DONE);
    }
    if AGENT_TUPLES.insert(key, 1, 0).is_err() {
        maps::count(Decision::MapUpdateFailed);
        return Ok(DONE);
    }
    // Told of state changes from here on, to forget the tuple at close.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    maps::count(Decision::AgentTupleRecorded);
    Ok(DONE)
}
