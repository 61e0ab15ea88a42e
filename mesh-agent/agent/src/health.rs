//! The agent's health as Prometheus gauges, prefix `mesh_agent_`: the
//! configuration it serves (version, when it was applied, whether the
//! control server stream is up), the expiry of every certificate it holds,
//! and how many attachments of each kernel program are in place.
//!
//! Every gauge is computed afresh at each scrape from what the admin API
//! reports (`/status`, `/bpf`), so it cannot drift from it: after a
//! reconnect, a renewal, or a Workload leaving (its identity's series is
//! removed, not left at its last value).
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
};

use mesh_api::admin::{IdentityStatus, SyncState};
use mesh_common::names;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::redirect::Attachment;

/// The kernel programs the agent attaches, each exported even when it has
/// no attachment (`mesh_inbound` before any pod is enrolled).
pub const PROGRAMS: [&str; 6] = [
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
    names::PROG_SOCK_OPS,
    names::PROG_STRICT_INGRESS,
    names::PROG_AGENT_SOCK_OPS,
    names::PROG_INBOUND,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

/// What the gauges show, from the admin API's views.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The revision served (0 when none, or not a number).
    pub config_version: i64,
    /// When a configuration from the control server was last applied, Unix
    /// seconds; 0 until one is (a cached one served at start is not).
    pub config_applied_unix: i64,
    pub control_connected: bool,
    /// Identity -> its certificate's notAfter, Unix seconds: the node's
    /// and every workload identity's that holds one.
    pub certificates: BTreeMap<String, i64>,
    /// Program -> attachments in place.
    pub programs: BTreeMap<String, i64>,
}

impl Snapshot {
    pub fn of(
        sync: Option<&SyncState>,
        identity: Option<&IdentityStatus>,
        attachments: &[Attachment],
    ) -> Snapshot {
        let mut programs: BTreeMap<String, i64> =
            PROGRAMS.iter().map(|p| ((*p).to_owned(), 0)).collect();
        for a in attachments.iter().filter(|a| a.attached) {
            *programs.entry(a.program.to_owned()).or_default() += 1;
        }
        let certificates = identity
            .into_iter()
            .flat_map(|i| std::iter::once(&i.node).chain(&i.certificates))
            .filter_map(|c| {
                let expiry = i64::try_from(c.not_after_unix?).ok()?;
                Some((c.identity.clone(), expiry))
            })
            .collect();
        Snapshot {
            config_version: sync.and_then(|s| s.version.parse().ok()).unwrap_or(0),
            config_applied_unix: sync.map_or(0, |s| {
                i64::try_from(s.last_update_unix_ms / 1000).unwrap_or(i64::MAX)
            }),
            control_connected: sync.is_some_and(|s| s.connected),
            certificates,
            programs,
        }
    }
}

#[derive(Debug, Default)]
pub struct Health {
    config_version: Gauge,
    config_applied: Gauge,
    control_connected: Gauge,
    certificate_expiry: Family<IdentityLabels, Gauge>,
    programs: Family<ProgramLabels, Gauge>,
    /// Identities that have a series now.
    identities: Mutex<BTreeSet<String>>,
}

impl Health {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("mesh_agent");
        r.register(
            "config_version",
            "Revision of the configuration the agent serves (0: none yet)",
            self.config_version.clone(),
        );
        r.register(
            "config_last_applied_timestamp_seconds",
            "When a configuration from the control server was last applied, Unix seconds (0: none since start)",
            self.config_applied.clone(),
        );
        r.register(
            "control_connected",
            "1 while the configuration stream to the control server is up",
            self.control_connected.clone(),
        );
        r.register(
            "certificate_expiry_timestamp_seconds",
            "notAfter of each certificate the agent holds (the node's and each workload identity's), Unix seconds",
            self.certificate_expiry.clone(),
        );
        r.register(
            "bpf_programs_attached",
            "Attachments in place of each kernel program (mesh_inbound: one per enrolled pod's network namespace)",
            self.programs.clone(),
        );
    }

    /// Sets every gauge to `now`; identities no longer held lose their series.
    pub fn set(&self, now: &Snapshot) {
        self.config_version.set(now.config_version);
        self.config_applied.set(now.config_applied_unix);
        self.control_connected.set(i64::from(now.control_connected));
        let mut held = self.identities.lock().unwrap_or_else(|e| e.into_inner());
        for gone in held.iter().filter(|i| !now.certificates.contains_key(*i)) {
            self.certificate_expiry.remove(&IdentityLabels {
                identity: gone.clone(),
            });
        }
        for (identity, expiry) in &now.certificates {
            self.certificate_expiry
                .get_or_create(&IdentityLabels {
                    identity: identity.clone(),
                })
                .set(*expiry);
        }
        *held = now.certificates.keys().cloned().collect();
        for (program, n) in &now.programs {
            self.programs
                .get_or_create(&ProgramLabels {
                    program: program.clone(),
                })
                .set(*n);
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_api::admin::{CertStatus, Source};

    use super::*;
    use crate::redirect::Target;

    fn cert(identity: &str, not_after: Option<u64>) -> CertStatus {
        CertStatus {
            identity: identity.into(),
            not_after_unix: not_after,
            ..CertStatus::default()
        }
    }

    fn attachment(program: &'static str, attached: bool) -> Attachment {
        Attachment {
            program,
            attach_type: "x",
            target: Target::PodNetns(1),
            pin: None,
            attached,
            link_id: None,
            program_id: None,
        }
    }

    const NODE: &str = "spiffe://cluster.local/ns/mesh-system/sa/node-node1";
    const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
    const DB: &str = "spiffe://cluster.local/ns/default/sa/db";

    fn identity(certificates: Vec<CertStatus>) -> IdentityStatus {
        IdentityStatus {
            node: cert(NODE, Some(2_000_000_000)),
            certificates,
            ..IdentityStatus::default()
        }
    }

    #[test]
    fn the_snapshot_follows_the_admin_views() {
        let sync = SyncState {
            connected: true,
            version: "42".into(),
            source: Source::Control,
            last_update_unix_ms: 1_700_000_000_999,
            ..SyncState::default()
        };
        let attachments = [
            attachment(names::PROG_CONNECT4, true),
            attachment(names::PROG_INBOUND, true),
            attachment(names::PROG_INBOUND, true),
            attachment(names::PROG_INBOUND, false),
        ];
        let s = Snapshot::of(
            Some(&sync),
            Some(&identity(vec![
                cert(WEB, Some(1_900_000_000)),
                cert(DB, None),
            ])),
            &attachments,
        );
        assert_eq!(s.config_version, 42);
        assert_eq!(s.config_applied_unix, 1_700_000_000);
        assert!(s.control_connected);
        assert_eq!(
            s.certificates,
            [
                (NODE.to_owned(), 2_000_000_000),
                (WEB.to_owned(), 1_900_000_000)
            ]
            .into(),
            "a certificate not yet obtained has no expiry"
        );
        assert_eq!(s.programs[names::PROG_CONNECT4], 1);
        assert_eq!(s.programs[names::PROG_INBOUND], 2, "detached not counted");
        assert_eq!(s.programs[names::PROG_SOCK_OPS], 0);
        assert_eq!(s.programs.len(), PROGRAMS.len());

        let none = Snapshot::of(None, None, &[]);
        assert_eq!(none.config_version, 0);
        assert!(!none.control_connected && none.certificates.is_empty());
    }

    #[test]
    fn identities_that_leave_lose_their_series() {
        let health = Health::default();
        let mut registry = Registry::default();
        health.register(&mut registry);
        let scrape = |registry: &Registry| {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
            out
        };
        let with = |certs| Snapshot::of(None, Some(&identity(certs)), &[]);
        health.set(&with(vec![
            cert(WEB, Some(1_900_000_000)),
            cert(DB, Some(1_800_000_000)),
        ]));
        let text = scrape(&registry);
        assert!(
            text.contains(&format!(
                "mesh_agent_certificate_expiry_timestamp_seconds{{identity=\"{WEB}\"}} 1900000000"
            )),
            "{text}"
        );
        assert!(text.contains(DB), "{text}");
        // db's Workload left; web's certificate was renewed.
        health.set(&with(vec![cert(WEB, Some(1_950_000_000))]));
        let text = scrape(&registry);
        assert!(!text.contains(DB), "{text}");
        assert!(
            text.contains(&format!("{{identity=\"{WEB}\"}} 1950000000")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{{identity=\"{NODE}\"}} 2000000000")),
            "{text}"
        );
        assert!(
            text.contains("mesh_agent_bpf_programs_attached{program=\"mesh_inbound\"} 0"),
            "{text}"
        );
    }
}
