//! `sk_lookup`, attached to each enrolled pod's network namespace: strict
//! inbound. Every TCP connection into a pod that its node agent did not open
//! (from a pod outside the mesh, from a process in the node's namespace that
//! is not the agent, from another node) is refused with a reset if the pod is
//! STRICT, or handed to the agent's inbound plaintext listener (`:15006`,
//! one per pod namespace) to be judged as a caller without identity.
//!
//! Why this hook:
//! - Every path into a pod ends in its namespace's socket lookup, whichever
//!   interface the SYN came through and whether it was routed or sent by a
//!   local process; TC on the node's interfaces sees routed packets only
//!   (a node process's SYN never crosses an ingress hook there), and would
//!   need NAT and a conntrack of our own to send a packet to the agent.
//! - `bpf_sk_assign` delivers the SYN to the agent's listener untouched: the
//!   accepted socket's local address is the original destination, so no
//!   record is needed to recover it.
//! - Failing the lookup (`SK_DROP`) makes TCP answer the SYN with a reset at
//!   once: the client sees "connection refused", not a timeout. When the
//!   agent is down its listeners close and leave `INBOUND_LISTENERS`, so the
//!   lookup fails the same way: closed, never open.
//! - It runs only for new connections (the listener lookup), so established
//!   traffic pays nothing.
//!
//! The agent's own connections are known by their 4-tuple, recorded by
//! `agent_ops` when the agent connects (from its cgroup, which no other
//! process shares): a source address alone would let any process of the
//! node's namespace pass as the agent.
use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use core::ptr::read_volatile;
use mesh_common::{Decision, TupleKey, VipPort, inbound};

use crate::maps::{self, AGENT_TUPLES, INBOUND_LISTENERS, INBOUND_PODS, PROBE_SOURCES};

/// Go on with the regular lookup (with the socket assigned, if any).
const SK_PASS: u32 = 1;
/// Fail the lookup: TCP answers with a reset.
const SK_DROP: u32 = 0;
const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn mesh_inbound(ctx: SkLookupContext) -> u32 {
    match try_inbound(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_inbound(ctx: &SkLookupContext) -> Result<u32, u32> {
    let l = ctx.lookup;
    // SAFETY: the context pointer is the kernel's, valid for the whole run;
    // each field is read once, at its own constant offset.
    let (family, protocol, remote_ip4, remote_port, local_ip4, local_port) = unsafe {
        (
            read_volatile(&raw const (*l).family),
            read_volatile(&raw const (*l).protocol),
            read_volatile(&raw const (*l).remote_ip4),
            read_volatile(&raw const (*l).remote_port),
            read_volatile(&raw const (*l).local_ip4),
            read_volatile(&raw const (*l).local_port),
        )
    };
    // The mesh carries TCP over IPv4; native IPv6 SYNs are refused by
    // `strict` (cgroup_skb) before they get here.
    if protocol != IPPROTO_TCP || family != AF_INET {
        return Ok(SK_PASS);
    }
    // The pod's own loopback, and the pod calling its own address: inside
    // the pod, never through a node.
    if local_ip4.to_ne_bytes()[0] == 127 || remote_ip4 == local_ip4 {
        return Ok(SK_PASS);
    }
    let tuple = TupleKey {
        src_ip4: remote_ip4,
        dst_ip4: local_ip4,
        src_port: u32::from(u16::from_be(remote_port)),
        dst_port: local_port,
    };
    // SAFETY: value is a u32 flag; only presence is read.
    if unsafe { AGENT_TUPLES.get(tuple) }.is_some() {
        maps::count(Decision::InboundFromAgent);
        return Ok(SK_PASS);
    }
    // SAFETY: copied out at once.
    let Some(mode) = (unsafe { INBOUND_PODS.get(local_ip4) }).copied() else {
        maps::count(Decision::InboundUnknownPod);
        return Ok(SK_DROP);
    };
    let probe = |port| VipPort {
        ip4: remote_ip4,
        port,
    };
    // SAFETY: values are u32 flags; only presence is read.
    if unsafe { PROBE_SOURCES.get(probe(local_port)) }.is_some()
        || unsafe { PROBE_SOURCES.get(probe(0)) }.is_some()
    {
        maps::count(Decision::ProbeAllowed);
        return Ok(SK_PASS);
    }
    if mode == inbound::STRICT {
        maps::count(Decision::StrictRefused);
        return Ok(SK_DROP);
    }
    match INBOUND_LISTENERS.redirect_sk_lookup(ctx, local_ip4, 0) {
        Ok(()) => {
            maps::count(Decision::InboundRedirected);
            Ok(SK_PASS)
        }
        Err(_) => {
            maps::count(Decision::InboundNoListener);
            Ok(SK_DROP)
        }
    }
}
