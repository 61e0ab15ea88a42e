//! What `connect4` and `connect6` share: who is connecting (an enrolled pod,
//! found through the cgroup hierarchy, so every process in a pod's subtree
//! is captured) and what to do with an IPv4 destination.
use aya_ebpf::helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id};
use mesh_common::{AgentConfig, Decision, MAX_POD_DEPTH, OrigDst, VipPort};

use crate::maps::{ENROLLED, EXCLUDED_PORTS, ORIG_BY_COOKIE, SERVICE_PORTS, SERVICE_VIPS};

/// Where an allowed connect goes.
pub enum Verdict {
    /// Untouched: to its own destination.
    Pass(Decision),
    /// Rewritten to the agent's `ip4:port` (network order).
    Rewrite {
        decision: Decision,
        ip4: u32,
        port: u32,
    },
    /// Failed with EPERM.
    Reject(Decision),
}

/// The enrolled pod the current process belongs to: the cgroup id of its
/// enrolled ancestor (or its own cgroup), else why it is not captured.
#[inline(always)]
pub fn enrolled_pod(cfg: &AgentConfig) -> Result<u64, Decision> {
    // SAFETY: a plain helper call, valid in cgroup/connect4 and connect6.
    let own = unsafe { bpf_get_current_cgroup_id() };
    if own == cfg.agent_cgroup_id {
        return Err(Decision::AgentSocket);
    }
    let depth = if cfg.max_pod_depth < MAX_POD_DEPTH {
        cfg.max_pod_depth
    } else {
        MAX_POD_DEPTH
    };
    // Pods are children of the pod root; their own children (containers,
    // helper processes) must be captured as the pod.
    for below in 1..=MAX_POD_DEPTH {
        if below > depth {
            break;
        }
        let level = (cfg.pod_root_level + below) as i32;
        // SAFETY: a plain helper call; a level deeper than the process's
        // own cgroup yields 0.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        // SAFETY: value is a u32 flag; only presence is read.
        if unsafe { ENROLLED.get(id) }.is_some() {
            return Ok(id);
        }
    }
    Err(Decision::NotEnrolled)
}

/// The decision for an enrolled pod's connect to `dst_ip:port` (network
/// order), recording the original destination under `cookie` when it is
/// redirected.
#[inline(always)]
pub fn plan_v4(cfg: &AgentConfig, pod: u64, cookie: u64, dst_ip: u32, port: u32) -> Verdict {
    let first_octet = dst_ip.to_ne_bytes()[0];
    // 127/8 is the pod's own loopback; 0/8 (0.0.0.0) is treated by Linux as
    // this host: both stay inside the pod and never reach the agent, which
    // must not connect there on the pod's behalf.
    if first_octet == 127 || first_octet == 0 {
        return Verdict::Pass(Decision::Loopback);
    }
    if dst_ip == cfg.agent_ip4 {
        return Verdict::Pass(Decision::AgentDestination);
    }
    let dst_port = u32::from(u16::from_be(port as u16));
    // SAFETY: value is a u32 flag; only presence is read.
    if unsafe { EXCLUDED_PORTS.get(dst_port) }.is_some() {
        return Verdict::Pass(Decision::ExcludedPort);
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
        return Verdict::Rewrite {
            decision: Decision::NoServicePort,
            ip4: cfg.agent_ip4,
            port: cfg.refusal_port,
        };
    }
    let orig = OrigDst {
        ip4: dst_ip,
        port,
        cgroup_id: pod,
    };
    if ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        return Verdict::Reject(Decision::MapUpdateFailed);
    }
    Verdict::Rewrite {
        decision: Decision::Redirected,
        ip4: cfg.agent_ip4,
        port: cfg.outbound_port,
    }
}
