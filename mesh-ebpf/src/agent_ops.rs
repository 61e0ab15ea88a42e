//! `sockops` on the agent's own cgroup, for the connections the agent opens:
//!
//! - it records the 4-tuple of every connection into one of this node's
//!   pods, from its connect until the socket closes, so that the pod's
//!   `inbound` program lets it in and nothing else. Removing the record at
//!   close keeps a later connection from another process that happens to
//!   reuse the same ports out;
//! - it adds each connection's TCP statistics to its remote address's entry
//!   of `TCP_STATS`: established at ESTABLISHED, and at close the smoothed
//!   RTT (one histogram bucket and a sum), the retransmits and the bytes.
//!   These connections carry the pods' traffic off the node (to a peer
//!   agent's tunnel) or into a pod of this node, so per remote address they
//!   are the mesh's per-destination TCP health.
//!
//! Why at close and not on `RTT_CB`: that callback runs on every ACK that
//! yields an RTT sample, on every connection the agent holds, in the data
//! path; the state callback runs a handful of times per connection. The
//! price is that a long-lived connection (the tunnel pool to a peer node)
//! reports its RTT, retransmits and bytes when it closes; its
//! establishment is counted at once. `total_retrans` at close, rather than
//! `RETRANS_CB`, for the same reason.
use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use core::ptr::read_volatile;
use mesh_common::{Decision, TcpStats, TupleKey, srtt_bucket};

use crate::{
    maps::{self, AGENT_TUPLES, INBOUND_PODS, TCP_STATS},
    sock_ops::{DONE, ipv4_addresses, remote_port},
};

#[sock_ops]
pub fn mesh_agent_sock_ops(ctx: SockOpsContext) -> u32 {
    match try_agent_sock_ops(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

fn try_agent_sock_ops(ctx: &SockOpsContext) -> Result<u32, u32> {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let (_, remote_ip4) = ipv4_addresses(ctx).ok_or(DONE)?;
            let stats = stats_of(remote_ip4).ok_or(DONE)?;
            // SAFETY: this CPU's copy of a map value; programs do not
            // migrate CPUs mid-run, so nothing else writes it concurrently.
            unsafe { (*stats).established += 1 };
            Ok(DONE)
        }
        // args: old state, new state.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(ctx),
        _ => Ok(DONE),
    }
}

fn tuple(ctx: &SockOpsContext) -> Option<TupleKey> {
    let (local_ip4, remote_ip4) = ipv4_addresses(ctx)?;
    Some(TupleKey {
        src_ip4: local_ip4,
        dst_ip4: remote_ip4,
        src_port: ctx.local_port(),
        dst_port: u32::from(remote_port(ctx)),
    })
}

fn on_connect(ctx: &SockOpsContext) -> Result<u32, u32> {
    let key = tuple(ctx).ok_or(DONE)?;
    // Told of state changes from here on: to forget the tuple and to
    // account the connection at close.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    // SAFETY: value is a u32 mode; only presence is read.
    if unsafe { INBOUND_PODS.get(key.dst_ip4) }.is_none() {
        return Ok(DONE);
    }
    if AGENT_TUPLES.insert(key, 1, 0).is_err() {
        maps::count(Decision::MapUpdateFailed);
        return Ok(DONE);
    }
    maps::count(Decision::AgentTupleRecorded);
    Ok(DONE)
}

fn on_close(ctx: &SockOpsContext) -> Result<u32, u32> {
    let key = tuple(ctx).ok_or(DONE)?;
    let _ = AGENT_TUPLES.remove(key);
    let ops = ctx.ops;
    // SAFETY: the context pointer is the kernel's, valid for the whole run;
    // the state callback runs on a full socket, whose TCP fields these are.
    let (srtt8, retrans, acked, received) = unsafe {
        (
            read_volatile(&raw const (*ops).srtt_us),
            read_volatile(&raw const (*ops).total_retrans),
            read_volatile(&raw const (*ops).bytes_acked),
            read_volatile(&raw const (*ops).bytes_received),
        )
    };
    let stats = stats_of(key.dst_ip4).ok_or(DONE)?;
    // SAFETY: as in the established callback: this CPU's copy, written
    // only by this run.
    let stats = unsafe { &mut *stats };
    stats.closed += 1;
    stats.retransmits += u64::from(retrans);
    stats.bytes_acked += acked;
    stats.bytes_received += received;
    if ctx.arg(0) == BPF_TCP_SYN_SENT {
        stats.failed += 1;
        return Ok(DONE);
    }
    // The kernel keeps the smoothed RTT times 8.
    let srtt_us = srtt8 >> 3;
    if srtt_us > 0 {
        stats.srtt_sum_us += u64::from(srtt_us);
        if let Some(bucket) = stats.srtt_buckets.get_mut(srtt_bucket(srtt_us)) {
            *bucket += 1;
        }
    }
    Ok(DONE)
}

/// This CPU's statistics of `remote_ip4`, created zeroed if absent.
#[inline(always)]
fn stats_of(remote_ip4: u32) -> Option<*mut TcpStats> {
    if let Some(stats) = TCP_STATS.get_ptr_mut(remote_ip4) {
        return Some(stats);
    }
    // Another CPU may create it first: then ours fails and the lookup
    // below finds theirs.
    if TCP_STATS
        .insert(remote_ip4, TcpStats::default(), u64::from(BPF_NOEXIST))
        .is_err()
        && TCP_STATS.get_ptr_mut(remote_ip4).is_none()
    {
        maps::count(Decision::MapUpdateFailed);
        return None;
    }
    TCP_STATS.get_ptr_mut(remote_ip4)
}
