//! `meshctl ca ...` and `meshctl revoke|unrevoke ...`: the CA rotation and
//! the revocation list, through the control server's operator API.
use std::{fs, path::PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::{Value, json};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

use mesh_api::pb::{
    CaActionRequest, CaRotateRequest, CaStatusRequest, CaStatusResponse, RevokeRequest,
    operator_client::OperatorClient,
};

type Client = OperatorClient<InterceptedService<Channel, mesh_api::client::Bearer>>;

use crate::cli::{server_error, table};

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Start a rotation to a new root: generated, or the operator's CA
    /// (its certificate with the chain up to its root, and its key).
    Rotate {
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// Once signing switches, agents renew every certificate at once
        /// instead of at half-life.
        #[arg(long)]
        force_renew: bool,
    },
    /// Phase, roots, agents by acknowledged bundle, live certificates by
    /// root, time left on roots, intermediates and workload certificates.
    Status {
        /// `json` for the whole answer.
        #[arg(short = 'o', long = "output")]
        output: Option<String>,
    },
    /// Stop the rotation where it is (nothing moves on by itself).
    Pause,
    /// Let a paused rotation move on again.
    Resume,
    /// Go back to the old CA (until the old root is retired).
    Rollback,
    /// Retire the old root now; refused while it still signs live certificates.
    Retire,
}

#[derive(Debug, Subcommand)]
pub enum RevokeTarget {
    /// A workload identity: spiffe://<td>/ns/<namespace>/sa/<account>.
    Identity { spiffe_id: String },
    /// A node: its agent gets no certificate and no tunnel.
    Node { name: String },
}

pub async fn ca(
    client: &mut Client,
    command: &CaCommand,
    json_out: bool,
) -> anyhow::Result<String> {
    let status = match command {
        CaCommand::Rotate {
            cert,
            key,
            force_renew,
        } => {
            let read = |p: &Option<PathBuf>| -> anyhow::Result<String> {
                match p {
                    Some(p) => {
                        fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
                    }
                    None => Ok(String::new()),
                }
            };
            client
                .ca_rotate(CaRotateRequest {
                    cert_pem: read(cert)?,
                    key_pem: read(key)?,
                    force_renew: *force_renew,
                })
                .await
        }
        CaCommand::Status { output } => {
            if let Some(o) = output.as_deref()
                && o != "json"
            {
                bail!("unknown output {o:?} (expected json)");
            }
            client.ca_status(CaStatusRequest {}).await
        }
        CaCommand::Pause => action(client, "pause").await,
        CaCommand::Resume => action(client, "resume").await,
        CaCommand::Rollback => action(client, "rollback").await,
        CaCommand::Retire => action(client, "retire").await,
    }
    .map_err(server_error)?
    .into_inner();
    let as_json = json_out || matches!(command, CaCommand::Status { output: Some(_) });
    Ok(if as_json {
        status_json(&status).to_string()
    } else {
        render(&status)
    })
}

async fn action(
    client: &mut Client,
    action: &str,
) -> Result<tonic::Response<CaStatusResponse>, tonic::Status> {
    client
        .ca_action(CaActionRequest {
            action: action.to_owned(),
        })
        .await
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Seconds from now to `t`, negative when past.
fn left(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX) - i64::try_from(now()).unwrap_or(0)
}

fn human(secs: i64) -> String {
    let (sign, s) = if secs < 0 { ("-", -secs) } else { ("", secs) };
    match s {
        0..=119 => format!("{sign}{s}s"),
        120..=7199 => format!("{sign}{}m", s / 60),
        7200..=172_799 => format!("{sign}{}h", s / 3600),
        _ => format!("{sign}{}d", s / 86400),
    }
}

pub fn status_json(s: &CaStatusResponse) -> Value {
    json!({
        "phase": s.phase,
        "paused": s.paused,
        "force_renew": s.force_renew,
        "phase_since_unix": s.phase_since_unix,
        "waiting_for": s.waiting_for,
        "connected_agents": s.connected_agents,
        "roots": s.roots.iter().map(|r| json!({
            "id": r.id,
            "slot": r.slot,
            "subject": r.subject,
            "not_after_unix": r.not_after_unix,
            "seconds_left": left(r.not_after_unix),
            "signing": r.signing,
            "live_certificates": r.live_certificates,
            "intermediates": r.intermediates.iter().map(|i| json!({
                "subject": i.subject,
                "not_after_unix": i.not_after_unix,
                "seconds_left": left(i.not_after_unix),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "bundles": s.bundles.iter().map(|b| json!({
            "version": b.bundle_version,
            "roots": b.roots,
            "agents": b.agents,
            "current": b.current,
        })).collect::<Vec<_>>(),
        "oldest_workload_not_after_unix": s.oldest_workload_not_after_unix,
        "oldest_workload_seconds_left": (s.oldest_workload_not_after_unix > 0)
            .then(|| left(s.oldest_workload_not_after_unix)),
        "revoked_identities": s.revoked_identities,
        "revoked_nodes": s.revoked_nodes,
        "pending": s.pending.iter().map(|p| json!({
            "node": p.node,
            "connected": p.connected,
            "bundle_version": p.bundle_version,
            "live_certificates": p.live_certificates,
            "reason": p.reason,
        })).collect::<Vec<_>>(),
    })
}

fn render(s: &CaStatusResponse) -> String {
    let mut out = format!(
        "Phase: {}{} (since {} ago)\nWaiting for: {}\n",
        s.phase,
        if s.paused { " (paused)" } else { "" },
        human(-left(s.phase_since_unix)),
        s.waiting_for
    );
    let rows = s
        .roots
        .iter()
        .map(|r| {
            vec![
                r.slot.clone(),
                r.id.chars().take(16).collect(),
                if r.signing { "yes" } else { "no" }.to_owned(),
                r.live_certificates.to_string(),
                human(left(r.not_after_unix)),
                r.intermediates
                    .iter()
                    .map(|i| format!("{} ({})", i.subject, human(left(i.not_after_unix))))
                    .collect::<Vec<_>>()
                    .join(", "),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "ROOT",
            "ID",
            "SIGNING",
            "LIVE CERTS",
            "EXPIRES IN",
            "INTERMEDIATES",
        ],
        rows,
    ));
    out.push('\n');
    let rows = s
        .bundles
        .iter()
        .map(|b| {
            vec![
                b.bundle_version.clone(),
                b.roots
                    .iter()
                    .map(|r| r.chars().take(16).collect::<String>())
                    .collect::<Vec<_>>()
                    .join(","),
                b.agents.to_string(),
                if b.current { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    if !s.pending.is_empty() {
        let rows = s
            .pending
            .iter()
            .map(|p| {
                vec![
                    p.node.clone(),
                    if p.connected { "yes" } else { "no" }.to_owned(),
                    p.bundle_version.clone(),
                    p.live_certificates.to_string(),
                    p.reason.clone(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["WAITING ON", "CONNECTED", "BUNDLE", "LIVE CERTS", "WHY"],
            rows,
        ));
        out.push('\n');
    }
    out.push_str(&format!("Connected agents: {}\n", s.connected_agents));
    out.push_str(&table(&["BUNDLE", "ROOTS", "AGENTS", "CURRENT"], rows));
    out.push('\n');
    if s.oldest_workload_not_after_unix > 0 {
        out.push_str(&format!(
            "Oldest workload certificate expires in {}\n",
            human(left(s.oldest_workload_not_after_unix))
        ));
    }
    if !s.revoked_identities.is_empty() || !s.revoked_nodes.is_empty() {
        out.push_str(&format!(
            "Revoked: identities [{}], nodes [{}]\n",
            s.revoked_identities.join(", "),
            s.revoked_nodes.join(", ")
        ));
    }
    out.trim_end().to_owned()
}

pub async fn revoke(
    client: &mut Client,
    target: &RevokeTarget,
    unrevoke: bool,
    json_out: bool,
) -> anyhow::Result<String> {
    let (kind, name) = match target {
        RevokeTarget::Identity { spiffe_id } => ("identity", spiffe_id),
        RevokeTarget::Node { name } => ("node", name),
    };
    let list = client
        .revoke(RevokeRequest {
            kind: kind.to_owned(),
            name: name.clone(),
            unrevoke,
        })
        .await
        .map_err(server_error)?
        .into_inner();
    if json_out {
        return Ok(json!({
            "revoked_identities": list.revoked_identities,
            "revoked_nodes": list.revoked_nodes,
        })
        .to_string());
    }
    Ok(format!(
        "{kind} {name} {}\nrevoked identities: [{}]\nrevoked nodes: [{}]",
        if unrevoke { "unrevoked" } else { "revoked" },
        list.revoked_identities.join(", "),
        list.revoked_nodes.join(", ")
    ))
}
