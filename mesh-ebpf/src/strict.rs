//! `cgroup_skb/ingress`: the mesh carries IPv4 only, so a native IPv6 TCP
//! SYN into any pod of the node, which no agent could have mediated, is
//! dropped (`ipv6_refused`), as is IPv6 with extension headers, which could
//! hide one. IPv4 connections into pods are judged by `inbound` (sk_lookup).
use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use mesh_common::Decision;

use crate::maps;

const PASS: i32 = 1;
const DROP: i32 = 0;

const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
const IPV6_HEADER_LEN: usize = 40;
/// IPv6 extension headers: hop-by-hop, routing, fragment, destination options.
const IPV6_EXTENSIONS: [u8; 4] = [0, 43, 44, 60];

#[cgroup_skb(ingress)]
pub fn mesh_strict(ctx: SkBuffContext) -> i32 {
    match try_strict_ingress(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_strict_ingress(ctx: &SkBuffContext) -> Result<i32, i32> {
    // cgroup_skb sees the packet from its IPv4 header on.
    let version_ihl: u8 = ctx.load(0).map_err(|_| PASS)?;
    if version_ihl >> 4 == 6 {
        return ipv6(ctx);
    }
    Ok(PASS)
}

fn ipv6(ctx: &SkBuffContext) -> Result<i32, i32> {
    let next: u8 = ctx.load(6).map_err(|_| PASS)?;
    if IPV6_EXTENSIONS.contains(&next) {
        maps::count(Decision::Ipv6Refused);
        return Ok(DROP);
    }
    if next != IPPROTO_TCP {
        return Ok(PASS);
    }
    let flags: u8 = ctx.load(IPV6_HEADER_LEN + 13).map_err(|_| PASS)?;
    if flags & TCP_FLAG_SYN == 0 || flags & TCP_FLAG_ACK != 0 {
        return Ok(PASS);
    }
    maps::count(Decision::Ipv6Refused);
    Ok(DROP)
}
