//! The node agent's views, as tables: `status`, `connections`, `config`,
//! `bpf`, `certs`, `enroll` and `unenroll`. Each renders one typed answer of
//! the admin API (`-o json` prints that answer itself).
use std::path::{Path, PathBuf};

use mesh_api::admin::{
    AdminError, AttachTarget, BpfView, CertStatus, ConfigView, ConnectionState, ConnectionView,
    EnrolledPod, Holder, IdentityStatus, Source, SpecView, Status, SyncState,
};
use serde_json::{Value, json};

use crate::cli::{authorization_policy_row, route_parents, table, traffic_policy_row};

/// What a failed admin call means to an operator: above all, which socket
/// nobody answers on.
pub fn explain(e: AdminError) -> anyhow::Error {
    match e {
        AdminError::Connect { socket, source, .. } => {
            let why = match source.kind() {
                std::io::ErrorKind::NotFound => "no such socket".to_owned(),
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
                std::io::ErrorKind::PermissionDenied => {
                    "permission denied (the socket is root's)".to_owned()
                }
                _ => source.to_string(),
            };
            anyhow::anyhow!(
                "no agent answers on {}: {why} (is mesh-agent running on this node? pass --admin)",
                socket.display()
            )
        }
        AdminError::Io { socket, source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            anyhow::anyhow!(
                "the agent on {} accepted but did not answer in time",
                socket.display()
            )
        }
        other => other.into(),
    }
}

fn source(s: Source) -> &'static str {
    match s {
        Source::Control => "control server",
        Source::Cache => "disk cache",
        Source::None => "none",
    }
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// `1h02m`, `3m20s`, `45s`; whole seconds.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// `in 3m20s`, or `5s ago`.
fn relative(t: u64, now: u64) -> String {
    if t >= now {
        format!("in {}", duration(t - now))
    } else {
        format!("{} ago", duration(now - t))
    }
}

/// Seconds since the epoch as `2026-12-01T10:00:00Z`.
pub fn utc(t: u64) -> String {
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A section: its title and count, then its table (or `none`).
fn section(title: &str, headers: &[&str], rows: Vec<Vec<String>>) -> String {
    if rows.is_empty() {
        return format!("{title}: none");
    }
    format!("{title} ({}):\n{}", rows.len(), table(headers, rows))
}

fn sync_line(sync: Option<&SyncState>, now_ms: u64) -> String {
    let Some(s) = sync else {
        return "configuration: local (no control server)".to_owned();
    };
    let updated = if s.last_update_unix_ms == 0 {
        "never".to_owned()
    } else {
        format!(
            "{} ago",
            duration(now_ms.saturating_sub(s.last_update_unix_ms) / 1000)
        )
    };
    let mut line = format!(
        "configuration: version {} from {}, {} resources, updated {updated}, control server {}, acks {} nacks {}",
        dash(&s.version),
        source(s.source),
        s.resources,
        if s.connected {
            "connected"
        } else {
            "disconnected"
        },
        s.acks,
        s.nacks,
    );
    if let Some(e) = &s.last_error {
        line += &format!("\nlast rejection: {e}");
    }
    line
}

fn decisions_table(decisions: &std::collections::BTreeMap<String, u64>) -> String {
    section(
        "kernel decisions",
        &["REASON", "COUNT"],
        decisions
            .iter()
            .map(|(k, n)| vec![k.clone(), n.to_string()])
            .collect(),
    )
}

fn pod_row(p: &EnrolledPod) -> Vec<String> {
    let addresses: Vec<String> = p.addresses.iter().map(ToString::to_string).collect();
    vec![
        format!("{}/{}", p.namespace, p.name),
        p.cgroup_id.to_string(),
        p.netns.as_deref().map_or_else(|| "-".to_owned(), path),
        dash(&addresses.join(",")),
        path(&p.cgroup),
    ]
}

const POD_HEADERS: [&str; 5] = ["POD", "CGROUP ID", "NETNS", "ADDRESSES", "CGROUP"];

pub fn status(s: &Status, now_ms: u64) -> String {
    let mut out = vec![
        format!(
            "node {}   up {}   open connections {}",
            s.node,
            duration(s.uptime_secs),
            s.open_connections
        ),
        sync_line(s.sync.as_ref(), now_ms),
        section(
            "enrolled pods",
            &POD_HEADERS,
            s.enrolled.iter().map(pod_row).collect(),
        ),
        decisions_table(&s.decisions),
    ];
    if let Some(identity) = &s.identity {
        out.push(certs(Some(identity), now_ms / 1000));
    }
    out.join("\n\n")
}

/// `meshctl enroll` and `unenroll`: the pod, as the agent now holds it (or
/// no longer does).
pub fn pod(p: &EnrolledPod, what: &str) -> String {
    format!("{what}:\n{}", table(&POD_HEADERS, vec![pod_row(p)]))
}

pub fn connections(rows: &[ConnectionView]) -> String {
    table(
        &[
            "ID",
            "STATE",
            "SOURCE POD",
            "PEER",
            "ORIGINAL DST",
            "SERVICE",
            "UPSTREAM",
            "SENT",
            "RECEIVED",
            "MS",
            "ERROR",
        ],
        rows.iter()
            .map(|c| {
                vec![
                    c.id.to_string(),
                    match c.state {
                        ConnectionState::Open => "open",
                        ConnectionState::Closed => "closed",
                        ConnectionState::Failed => "failed",
                    }
                    .to_owned(),
                    c.src_pod.as_deref().map_or_else(|| "-".to_owned(), dash),
                    c.peer.to_string(),
                    c.orig_dst.to_string(),
                    c.service.as_deref().map_or_else(|| "-".to_owned(), dash),
                    c.upstream.map_or_else(|| "-".to_owned(), |u| u.to_string()),
                    c.bytes_sent.to_string(),
                    c.bytes_received.to_string(),
                    c.duration_ms.to_string(),
                    c.error.as_deref().map_or_else(|| "-".to_owned(), dash),
                ]
            })
            .collect(),
    )
}

/// A route's or policy's spec as the document `meshctl get` renders.
fn document(v: &SpecView) -> Value {
    json!({
        "metadata": {"name": v.name, "namespace": v.namespace},
        "spec": v.spec,
    })
}

pub fn config(c: &ConfigView, now_ms: u64) -> String {
    let workloads = c
        .workloads
        .iter()
        .map(|w| {
            vec![
                w.namespace.clone(),
                w.name.clone(),
                dash(&w.node),
                dash(&w.ip),
                dash(&w.mtls_mode),
                yes(w.ready),
                dash(&w.service_account),
                dash(&w.version),
            ]
        })
        .collect();
    let services = c
        .services
        .iter()
        .map(|s| {
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|p| {
                    let target = if p.target_port == p.port || p.target_port == 0 {
                        String::new()
                    } else {
                        format!(":{}", p.target_port)
                    };
                    let proto = if p.app_protocol.is_empty() {
                        "auto"
                    } else {
                        &p.app_protocol
                    };
                    format!("{}{target}/{proto}", p.port)
                })
                .collect();
            vec![
                s.namespace.clone(),
                s.name.clone(),
                dash(&s.vips.join(",")),
                dash(&ports.join(",")),
                format!("{}/{}", s.ready_endpoints, s.endpoints.len()),
                dash(&s.version),
            ]
        })
        .collect();
    let routes = c
        .routes
        .iter()
        .map(|r| {
            vec![
                r.kind.clone(),
                r.namespace.clone(),
                r.name.clone(),
                route_parents(&r.spec),
                r.spec["rules"].as_array().map_or(0, Vec::len).to_string(),
                dash(&r.version),
            ]
        })
        .collect();
    let policies = c
        .policies
        .iter()
        .map(|p| {
            let (target, summary) = match p.kind.as_str() {
                "TrafficPolicy" => {
                    let mut row = traffic_policy_row(&document(p)).into_iter().skip(1);
                    (row.next(), row.next())
                }
                "AuthorizationPolicy" => {
                    let row = authorization_policy_row(&document(p));
                    (
                        row.get(2).cloned(),
                        Some(format!("{}, {} rules", row[1], row[3])),
                    )
                }
                _ => (None, None),
            };
            vec![
                p.kind.clone(),
                p.namespace.clone(),
                p.name.clone(),
                target.unwrap_or_else(|| "-".to_owned()),
                summary.unwrap_or_else(|| "-".to_owned()),
                dash(&p.version),
            ]
        })
        .collect();
    [
        format!(
            "version {}, {} resources",
            dash(&c.version),
            c.resources.len()
        ),
        sync_line(c.sync.as_ref(), now_ms),
        section(
            "workloads",
            &[
                "NAMESPACE",
                "NAME",
                "NODE",
                "IP",
                "MTLS",
                "READY",
                "SERVICE ACCOUNT",
                "VERSION",
            ],
            workloads,
        ),
        section(
            "services",
            &["NAMESPACE", "NAME", "VIPS", "PORTS", "READY", "VERSION"],
            services,
        ),
        section(
            "routes",
            &["KIND", "NAMESPACE", "NAME", "PARENTS", "RULES", "VERSION"],
            routes,
        ),
        section(
            "policies",
            &["KIND", "NAMESPACE", "NAME", "TARGET", "SUMMARY", "VERSION"],
            policies,
        ),
    ]
    .join("\n\n")
}

fn pin_name(pin: Option<&PathBuf>) -> String {
    pin.and_then(|p| p.file_name())
        .map_or_else(|| "-".to_owned(), |n| n.to_string_lossy().into_owned())
}

pub fn bpf(b: &BpfView) -> String {
    let programs = b
        .programs
        .iter()
        .map(|p| {
            let target = match &p.target {
                AttachTarget::PodCgroupRoot { path: p } => format!("pod cgroup root {}", path(p)),
                AttachTarget::AgentCgroup { path: p } => format!("agent cgroup {}", path(p)),
                AttachTarget::PodNetns {
                    cgroup_id,
                    pod,
                    netns,
                } => {
                    let ns = netns.as_deref().map_or_else(String::new, |n| path(n) + " ");
                    match pod {
                        Some(pod) => format!("netns {ns}of {pod}"),
                        None => format!("netns {ns}of cgroup {cgroup_id} (not enrolled)"),
                    }
                }
            };
            vec![
                p.program.clone(),
                p.attach_type.clone(),
                target,
                match p.held {
                    Holder::Pinned => "pinned",
                    Holder::Agent => "held by the agent",
                }
                .to_owned(),
                pin_name(p.pin.as_ref()),
                yes(p.attached),
                p.link_id.map_or_else(|| "-".to_owned(), |i| i.to_string()),
                p.program_id
                    .map_or_else(|| "-".to_owned(), |i| i.to_string()),
            ]
        })
        .collect();
    let enrolled = b
        .enrolled
        .iter()
        .map(|e| {
            vec![
                e.cgroup_id.to_string(),
                e.pod
                    .clone()
                    .unwrap_or_else(|| "(unknown to the agent)".to_owned()),
                yes(e.in_kernel),
                e.cgroup.as_deref().map_or_else(|| "-".to_owned(), path),
            ]
        })
        .collect();
    let maps = b
        .maps
        .iter()
        .map(|m| {
            let used = if m.max_entries == 0 {
                "-".to_owned()
            } else {
                format!(
                    "{:.1}%",
                    m.entries as f64 * 100.0 / f64::from(m.max_entries)
                )
            };
            vec![
                m.name.clone(),
                dash(&m.map_type),
                m.entries.to_string(),
                m.max_entries.to_string(),
                used,
                m.error.as_deref().map_or_else(|| "-".to_owned(), dash),
            ]
        })
        .collect();
    [
        format!("pin directory {}", path(&b.pin_dir)),
        section(
            "programs",
            &[
                "PROGRAM", "HOOK", "TARGET", "HELD", "PIN", "ATTACHED", "LINK", "PROG",
            ],
            programs,
        ),
        section(
            "enrolled cgroups",
            &["CGROUP ID", "POD", "IN KERNEL", "CGROUP"],
            enrolled,
        ),
        section(
            "maps",
            &["MAP", "TYPE", "ENTRIES", "MAX", "USED", "ERROR"],
            maps,
        ),
        decisions_table(&b.decisions),
    ]
    .join("\n\n")
}

fn cert_row(kind: &str, c: &CertStatus, now: u64) -> Vec<String> {
    let opt = |t: Option<u64>, f: &dyn Fn(u64) -> String| t.map_or_else(|| "-".to_owned(), f);
    vec![
        kind.to_owned(),
        c.identity.clone(),
        opt(c.not_after_unix, &utc),
        opt(c.not_after_unix, &|t| {
            if t > now {
                duration(t - now)
            } else {
                "expired".to_owned()
            }
        }),
        opt(c.next_renewal_unix, &|t| relative(t, now)),
        opt(c.last_renewal_unix, &|t| relative(t, now)),
        c.renewals.to_string(),
        c.failures.to_string(),
        source(c.source).to_owned(),
        c.last_error.as_deref().map_or_else(|| "-".to_owned(), dash),
    ]
}

/// `meshctl certs`: `identity` is the `identity` block of `/status`.
pub fn certs(identity: Option<&IdentityStatus>, now: u64) -> String {
    let Some(identity) = identity else {
        return "this agent holds no certificates: it has no control server with a CA".to_owned();
    };
    let rows = std::iter::once(cert_row("node", &identity.node, now))
        .chain(
            identity
                .certificates
                .iter()
                .map(|c| cert_row("workload", c, now)),
        )
        .collect();
    format!(
        "certificates (trust domain {}, trust bundle {}):\n{}",
        identity.trust_domain,
        if identity.trust_bundle {
            "held"
        } else {
            "missing"
        },
        table(
            &[
                "KIND",
                "IDENTITY",
                "NOT AFTER",
                "TIME LEFT",
                "RENEWAL",
                "LAST RENEWED",
                "RENEWALS",
                "FAILURES",
                "SOURCE",
                "LAST ERROR",
            ],
            rows,
        )
    )
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        net::{Ipv4Addr, SocketAddr},
    };

    use mesh_api::admin::{
        AdminClient, EnrolledCgroup, MapView, ProgramView, ResourceVersion, ServicePortView,
        ServiceView, WorkloadView,
    };

    use super::*;

    const NOW: u64 = 1_780_000_000;

    /// Every table in `out` (a block whose second line is an all-caps
    /// header): each row's cells start where the header's do.
    fn assert_aligned(out: &str) -> usize {
        let mut tables = 0;
        for block in out.split("\n\n") {
            let lines: Vec<&str> = block.lines().collect();
            let Some(start) = lines.iter().position(|l| {
                !l.is_empty() && !l.chars().any(|c| c.is_lowercase()) && l.contains("   ")
            }) else {
                continue;
            };
            tables += 1;
            let header = lines[start];
            // Header cells are separated by three spaces or more; a header
            // has single spaces only inside a name (CGROUP ID).
            let offsets: Vec<usize> = (0..header.len())
                .filter(|&i| {
                    i == 0 || (header.as_bytes()[i] != b' ' && header[..i].ends_with("  "))
                })
                .collect();
            assert!(offsets.len() > 1, "one column only? {header:?}");
            for row in &lines[start + 1..] {
                for &k in &offsets[1..] {
                    assert!(
                        row.len() > k && &row[k - 3..k] == "   " && row.as_bytes()[k] != b' ',
                        "a cell does not start at offset {k}:\n{header}\n{row}\nin\n{out}"
                    );
                }
            }
        }
        tables
    }

    /// The cells of the first line of `out` that starts with `first`.
    fn row(out: &str, first: &str) -> Vec<String> {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{first} ")))
            .unwrap_or_else(|| panic!("no row {first:?} in\n{out}"));
        line.split("   ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn pods() -> Vec<EnrolledPod> {
        vec![
            EnrolledPod {
                namespace: "default".into(),
                name: "node1-pod1".into(),
                cgroup: "/sys/fs/cgroup/unified/x/node1/pods/pod1".into(),
                cgroup_id: 7,
                netns: Some("/run/netns/x-node1-pod1".into()),
                addresses: vec![Ipv4Addr::new(198, 19, 1, 11)],
            },
            EnrolledPod {
                namespace: "a-much-longer-namespace".into(),
                name: "p".into(),
                cgroup: "/c".into(),
                cgroup_id: 123_456_789,
                netns: None,
                addresses: vec![],
            },
        ]
    }

    fn identity() -> IdentityStatus {
        IdentityStatus {
            trust_domain: "cluster.local".into(),
            trust_bundle: true,
            node: CertStatus {
                identity: "spiffe://cluster.local/ns/mesh-system/sa/node-node1".into(),
                not_after_unix: Some(NOW + 3600),
                next_renewal_unix: Some(NOW + 1800),
                last_renewal_unix: Some(NOW - 1800),
                renewals: 1,
                source: Source::Control,
                ..CertStatus::default()
            },
            certificates: vec![CertStatus {
                identity: "spiffe://cluster.local/ns/default/sa/a".into(),
                not_after_unix: Some(NOW - 5),
                failures: 3,
                last_error: Some("control server unavailable".into()),
                ..CertStatus::default()
            }],
        }
    }

    #[test]
    fn status_tables_line_up() {
        let answer = Status {
            node: "node1".into(),
            uptime_secs: 3725,
            enrolled: pods(),
            decisions: BTreeMap::from([
                ("redirected".to_owned(), 12),
                ("ipv6_refused".to_owned(), 1_000_000),
            ]),
            open_connections: 2,
            sync: Some(SyncState {
                connected: true,
                version: "42".into(),
                source: Source::Control,
                resources: 9,
                last_update_unix_ms: NOW * 1000 - 3000,
                ..SyncState::default()
            }),
            identity: Some(identity()),
        };
        let out = status(&answer, NOW * 1000);
        assert_eq!(assert_aligned(&out), 3, "{out}");
        assert!(out.contains("node node1   up 1h02m"), "{out}");
        assert!(out.contains("version 42 from control server"), "{out}");
        assert!(out.contains("updated 3s ago"), "{out}");
        assert_eq!(
            row(&out, "default/node1-pod1"),
            [
                "default/node1-pod1",
                "7",
                "/run/netns/x-node1-pod1",
                "198.19.1.11",
                "/sys/fs/cgroup/unified/x/node1/pods/pod1"
            ]
        );
        assert_eq!(row(&out, "a-much-longer-namespace/p")[2..4], ["-", "-"]);
        assert_eq!(row(&out, "ipv6_refused"), ["ipv6_refused", "1000000"]);
    }

    #[test]
    fn certs_show_expiry_time_left_renewal_and_errors() {
        let out = certs(Some(&identity()), NOW);
        assert_eq!(assert_aligned(&out), 1, "{out}");
        assert_eq!(
            row(&out, "node")[2..],
            [
                "2026-05-28T21:26:40Z",
                "1h00m",
                "in 30m00s",
                "30m00s ago",
                "1",
                "0",
                "control server",
                "-"
            ]
        );
        assert_eq!(
            row(&out, "workload")[3..],
            [
                "expired",
                "-",
                "-",
                "0",
                "3",
                "none",
                "control server unavailable"
            ]
        );
        assert!(certs(None, NOW).contains("no certificates"));
    }

    #[test]
    fn connections_line_up() {
        let peer: SocketAddr = "198.19.1.11:40000".parse().unwrap();
        let rows = vec![
            ConnectionView {
                id: 1,
                src_pod: Some("default/node1-pod1".into()),
                src_cgroup_id: 7,
                peer,
                orig_dst: "198.18.100.1:80".parse().unwrap(),
                service: Some("default/echo".into()),
                upstream: Some("198.19.2.11:8080".parse().unwrap()),
                started_unix_ms: 0,
                duration_ms: 12,
                bytes_sent: 4096,
                bytes_received: 123_456_789,
                state: ConnectionState::Open,
                error: None,
            },
            ConnectionView {
                id: 123_456,
                src_pod: None,
                src_cgroup_id: 0,
                peer,
                orig_dst: "10.0.0.1:5432".parse().unwrap(),
                service: None,
                upstream: None,
                started_unix_ms: 0,
                duration_ms: 5000,
                bytes_sent: 0,
                bytes_received: 0,
                state: ConnectionState::Failed,
                error: Some("connect timeout".into()),
            },
        ];
        let out = connections(&rows);
        assert_eq!(assert_aligned(&out), 1, "{out}");
        assert!(out.lines().nth(2).unwrap().ends_with("connect timeout"));
    }

    #[test]
    fn config_lists_each_kind_with_versions_and_summaries() {
        let view = ConfigView {
            version: "17".into(),
            resources: vec![ResourceVersion {
                key: "Workload/default/node1-pod1".into(),
                version: "3".into(),
            }],
            sync: None,
            workloads: vec![
                WorkloadView {
                    namespace: "default".into(),
                    name: "node1-pod1".into(),
                    version: "3".into(),
                    node: "node1".into(),
                    ip: "198.19.1.11".into(),
                    service_account: "default".into(),
                    mtls_mode: "STRICT".into(),
                    ready: true,
                    labels: BTreeMap::new(),
                },
                WorkloadView {
                    namespace: "shop".into(),
                    name: "a-long-workload-name".into(),
                    version: "12345".into(),
                    node: "node2".into(),
                    ip: "198.19.2.11".into(),
                    service_account: "web".into(),
                    mtls_mode: "PERMISSIVE".into(),
                    ready: false,
                    labels: BTreeMap::new(),
                },
            ],
            services: vec![ServiceView {
                namespace: "default".into(),
                name: "echo".into(),
                version: "5".into(),
                vips: vec!["198.18.100.1".into()],
                ports: vec![
                    ServicePortView {
                        port: 80,
                        target_port: 8080,
                        app_protocol: "http".into(),
                    },
                    ServicePortView {
                        port: 7000,
                        target_port: 7000,
                        app_protocol: String::new(),
                    },
                ],
                endpoints: vec!["node1-pod1".into(), "node2-pod1".into()],
                ready_endpoints: 1,
            }],
            routes: vec![SpecView {
                kind: "HTTPRoute".into(),
                namespace: "default".into(),
                name: "split".into(),
                version: "8".into(),
                spec: json!({"parentRefs": [{"name": "echo", "port": 80}], "rules": [{}, {}]}),
            }],
            policies: vec![
                SpecView {
                    kind: "TrafficPolicy".into(),
                    namespace: "default".into(),
                    name: "retry".into(),
                    version: "9".into(),
                    spec: json!({"targetRef": {"name": "echo"}, "retries": {"attempts": 3}}),
                },
                SpecView {
                    kind: "AuthorizationPolicy".into(),
                    namespace: "default".into(),
                    name: "deny-all".into(),
                    version: "10".into(),
                    spec: json!({"action": "DENY", "rules": [{}]}),
                },
            ],
        };
        let out = config(&view, NOW * 1000);
        assert_eq!(assert_aligned(&out), 4, "{out}");
        assert!(out.contains("configuration: local"), "{out}");
        assert_eq!(
            row(&out, "default     echo"),
            [
                "default",
                "echo",
                "198.18.100.1",
                "80:8080/http,7000/auto",
                "1/2",
                "5"
            ]
        );
        assert_eq!(row(&out, "HTTPRoute")[3..], ["echo:80", "2", "8"]);
        assert_eq!(row(&out, "TrafficPolicy")[3..], ["echo", "retries=3", "9"]);
        assert_eq!(
            row(&out, "AuthorizationPolicy")[3..],
            ["*", "DENY, 1 rules", "10"]
        );
        assert_eq!(row(&out, "shop")[4..6], ["PERMISSIVE", "no"]);
        let empty = config(&ConfigView::default(), NOW * 1000);
        assert!(empty.contains("workloads: none"), "{empty}");
    }

    #[test]
    fn bpf_shows_programs_targets_enrolment_and_occupancy() {
        let pin = |n: &str| Some(PathBuf::from("/sys/fs/bpf/mesh").join(n));
        let view = BpfView {
            pin_dir: "/sys/fs/bpf/mesh".into(),
            programs: vec![
                ProgramView {
                    program: "mesh_connect4".into(),
                    attach_type: "cgroup/connect4".into(),
                    target: AttachTarget::PodCgroupRoot {
                        path: "/sys/fs/cgroup/unified/x/pods".into(),
                    },
                    held: Holder::Pinned,
                    pin: pin("connect4_link"),
                    attached: true,
                    link_id: Some(3),
                    program_id: Some(101),
                },
                ProgramView {
                    program: "mesh_agent_sock_ops".into(),
                    attach_type: "sockops".into(),
                    target: AttachTarget::AgentCgroup {
                        path: "/sys/fs/cgroup/unified/x/agent".into(),
                    },
                    held: Holder::Agent,
                    pin: None,
                    attached: true,
                    link_id: None,
                    program_id: Some(1234),
                },
                ProgramView {
                    program: "mesh_inbound".into(),
                    attach_type: "sk_lookup".into(),
                    target: AttachTarget::PodNetns {
                        cgroup_id: 7,
                        pod: Some("default/node1-pod1".into()),
                        netns: Some("/run/netns/x".into()),
                    },
                    held: Holder::Pinned,
                    pin: pin("inbound_7"),
                    attached: false,
                    link_id: None,
                    program_id: None,
                },
                ProgramView {
                    program: "mesh_inbound".into(),
                    attach_type: "sk_lookup".into(),
                    target: AttachTarget::PodNetns {
                        cgroup_id: 99,
                        pod: None,
                        netns: None,
                    },
                    held: Holder::Pinned,
                    pin: pin("inbound_99"),
                    attached: true,
                    link_id: Some(40),
                    program_id: Some(102),
                },
            ],
            enrolled: vec![
                EnrolledCgroup {
                    cgroup_id: 7,
                    pod: Some("default/node1-pod1".into()),
                    cgroup: Some("/sys/fs/cgroup/unified/x/pods/pod1".into()),
                    in_kernel: true,
                },
                EnrolledCgroup {
                    cgroup_id: 99,
                    pod: None,
                    cgroup: None,
                    in_kernel: true,
                },
            ],
            maps: vec![
                MapView {
                    name: "ENROLLED".into(),
                    map_type: "hash".into(),
                    entries: 2,
                    max_entries: 4096,
                    error: None,
                },
                MapView {
                    name: "ORIG_BY_TUPLE".into(),
                    map_type: "lru_hash".into(),
                    entries: 65536,
                    max_entries: 65536,
                    error: None,
                },
                MapView {
                    name: "PROBE_SOURCES".into(),
                    map_type: String::new(),
                    entries: 0,
                    max_entries: 0,
                    error: Some("map PROBE_SOURCES: not pinned".into()),
                },
            ],
            decisions: BTreeMap::from([("redirected".to_owned(), 5)]),
        };
        let out = bpf(&view);
        assert_eq!(assert_aligned(&out), 4, "{out}");
        assert_eq!(
            row(&out, "mesh_connect4")[1..],
            [
                "cgroup/connect4",
                "pod cgroup root /sys/fs/cgroup/unified/x/pods",
                "pinned",
                "connect4_link",
                "yes",
                "3",
                "101"
            ]
        );
        assert_eq!(
            row(&out, "mesh_agent_sock_ops")[2..],
            [
                "agent cgroup /sys/fs/cgroup/unified/x/agent",
                "held by the agent",
                "-",
                "yes",
                "-",
                "1234"
            ]
        );
        assert!(
            out.contains("netns /run/netns/x of default/node1-pod1   "),
            "{out}"
        );
        assert!(out.contains("netns of cgroup 99 (not enrolled)"), "{out}");
        assert_eq!(
            row(&out, "99"),
            ["99", "(unknown to the agent)", "yes", "-"]
        );
        assert_eq!(
            row(&out, "ORIG_BY_TUPLE"),
            ["ORIG_BY_TUPLE", "lru_hash", "65536", "65536", "100.0%", "-"]
        );
        assert_eq!(row(&out, "ENROLLED")[4], "0.0%");
        assert_eq!(
            row(&out, "PROBE_SOURCES")[4..],
            ["-", "map PROBE_SOURCES: not pinned"]
        );
    }

    #[test]
    fn enroll_answers_as_a_one_row_table() {
        let out = pod(&pods()[0], "enrolled");
        assert_eq!(assert_aligned(&out), 1, "{out}");
        assert!(out.starts_with("enrolled:\nPOD "), "{out}");
    }

    #[test]
    fn times_and_durations() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(NOW), "2026-05-28T20:26:40Z");
        assert_eq!(utc(951_782_400 + 86_399), "2000-02-29T23:59:59Z");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(61), "1m01s");
        assert_eq!(duration(3 * 86_400 + 7200), "3d02h");
        assert_eq!(relative(NOW - 5, NOW), "5s ago");
    }

    #[test]
    fn no_agent_names_the_socket() {
        let missing =
            std::env::temp_dir().join(format!("meshctl-{}-none.sock", std::process::id()));
        let err = explain(AdminClient::new(&missing).status().unwrap_err()).to_string();
        assert_eq!(
            err,
            format!(
                "no agent answers on {}: no such socket (is mesh-agent running on this node? pass --admin)",
                missing.display()
            )
        );
        // A socket file nobody listens on any more.
        let stale = std::env::temp_dir().join(format!("meshctl-{}-stale.sock", std::process::id()));
        let _ = std::fs::remove_file(&stale);
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let err = explain(AdminClient::new(&stale).bpf().unwrap_err()).to_string();
        std::fs::remove_file(&stale).unwrap();
        assert_eq!(
            err,
            format!(
                "no agent answers on {}: connection refused (is mesh-agent running on this node? pass --admin)",
                stale.display()
            )
        );
    }
}
