//! The `Certificates` service: the mesh CA signs agents' requests, each for
//! an identity the calling node is entitled to.
//!
//! The caller's node comes from its credentials (its node certificate, or the
//! bootstrap token before it has one), never from the request. `Sign` issues
//! a workload identity only if a Workload on that node runs as it; `SignNode`
//! only the caller's own node identity. Every refusal is logged with the
//! identity and node and counted by reason.
use std::{sync::Arc, time::Duration, time::UNIX_EPOCH};

use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{
    ControlPlane, ReasonLabels,
    auth::{self, Caller, Tokens},
    tls::PeerInfo,
};
use mesh_api::{
    identity::{Ca, CaError, Issued, SpiffeId},
    pb::{SignNodeRequest, SignRequest, SignResponse, certificates_server::Certificates},
};

/// Shortest certificate lifetime the server accepts: renewal at half-life
/// needs some room, and certificates are backdated a minute for clock skew.
pub const MIN_CERT_TTL: Duration = Duration::from_secs(60);

/// Parses a lifetime such as `24h`, `5m`, `90s`, `1h30m` or `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (e.g. 24h, 5m, 90s, 1h30m)");
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        digits.clear();
    }
    if !digits.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// The CA with the policy the server applies to it.
#[derive(Debug)]
pub struct Authority {
    ca: Ca,
    ttl: Duration,
    bundle_pem: String,
}

impl Authority {
    /// Issues certificates from `ca`, each valid for `ttl` (cut to the CA's
    /// own expiry).
    pub fn new(ca: Ca, ttl: Duration) -> Authority {
        let bundle_pem = ca.trust_bundle_pem();
        Authority {
            ca,
            ttl,
            bundle_pem,
        }
    }

    /// When the signing CA's certificate expires.
    pub fn ca_not_after(&self) -> std::time::SystemTime {
        self.ca.not_after()
    }

    pub fn trust_domain(&self) -> &str {
        self.ca.trust_domain()
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// What every agent trusts: the top of the CA's chain.
    pub fn trust_bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// The identity the control server proves to agents.
    pub fn control_identity(&self) -> SpiffeId {
        mesh_api::identity::control_identity(self.trust_domain())
            .expect("the CA checked its trust domain")
    }

    /// Signs `csr` for `id`, which the caller was found entitled to.
    pub fn sign(&self, csr: &[u8], id: &SpiffeId) -> Result<Issued, CaError> {
        self.ca.sign_csr(csr, id, self.ttl)
    }
}

pub struct CertificatesService {
    plane: Arc<ControlPlane>,
    tokens: Tokens,
}

impl CertificatesService {
    pub fn new(plane: Arc<ControlPlane>, tokens: Tokens) -> CertificatesService {
        CertificatesService { plane, tokens }
    }

    fn authority(&self) -> Result<&Authority, Status> {
        self.plane
            .authority()
            .ok_or_else(|| Status::unavailable("this control server has no certificate authority"))
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let td = self.plane.authority().map(Authority::trust_domain);
        auth::caller(request, &self.tokens, td).map_err(|why| {
            self.refused("unauthenticated");
            warn!(peer = ?peer(request), reason = %why, "refused a signing request without valid credentials");
            Status::unauthenticated(why)
        })
    }

    fn refused(&self, reason: &'static str) {
        self.plane
            .metrics
            .sign_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Refuses, logs and counts.
    fn refuse(
        &self,
        caller: &Caller,
        identity: &str,
        reason: &'static str,
        status: Status,
    ) -> Status {
        self.refused(reason);
        warn!(
            node = %caller.node,
            via = %caller.via,
            identity,
            reason,
            message = status.message(),
            "refused a signing request"
        );
        status
    }

    fn issue(
        &self,
        caller: &Caller,
        id: &SpiffeId,
        csr_pem: &str,
        kind: &'static str,
    ) -> Result<Response<SignResponse>, Status> {
        let authority = self.authority()?;
        let identity = id.to_string();
        let issued = authority
            .sign(csr_pem.as_bytes(), id)
            .map_err(|e| match e {
                CaError::CsrIdentityMismatch { .. } | CaError::CsrRequestsCa(_) => self.refuse(
                    caller,
                    &identity,
                    "csr_mismatch",
                    Status::permission_denied(e.to_string()),
                ),
                CaError::BadCsr(_) => self.refuse(
                    caller,
                    &identity,
                    "bad_csr",
                    Status::invalid_argument(e.to_string()),
                ),
                other => {
                    warn!(error = %other, identity, "signing failed");
                    Status::internal(other.to_string())
                }
            })?;
        self.plane
            .metrics
            .certificates_issued
            .get_or_create(&super::KindLabels { kind })
            .inc();
        let not_after_unix = issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        info!(node = %caller.node, via = %caller.via, identity, not_after_unix, "issued a certificate");
        Ok(Response::new(SignResponse {
            cert_chain_pem: issued.cert_chain_pem,
            not_after_unix,
        }))
    }
}

fn peer<T>(request: &Request<T>) -> Option<std::net::SocketAddr> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.remote)
        .or_else(|| request.remote_addr())
}

#[tonic::async_trait]
impl Certificates for CertificatesService {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let caller = self.caller(&request)?;
        let SignRequest { csr_pem, identity } = request.into_inner();
        let authority = self.authority()?;
        let id: SpiffeId = identity.parse().map_err(|e| {
            self.refuse(
                &caller,
                &identity,
                "invalid_identity",
                Status::invalid_argument(format!("identity: {e}")),
            )
        })?;
        if id.trust_domain() != authority.trust_domain() {
            return Err(self.refuse(
                &caller,
                &identity,
                "foreign_trust_domain",
                Status::permission_denied(format!(
                    "{id} is outside this mesh's trust domain {}",
                    authority.trust_domain()
                )),
            ));
        }
        if mesh_api::identity::is_reserved(&id) {
            return Err(self.refuse(
                &caller,
                &identity,
                "reserved_identity",
                Status::permission_denied(format!(
                    "{id} is reserved for node agents and the control server; node {} may not obtain it",
                    caller.node
                )),
            ));
        }
        let entitled =
            self.plane
                .view()
                .runs_on(&caller.node, id.namespace(), id.service_account());
        if !entitled {
            return Err(self.refuse(
                &caller,
                &identity,
                "not_on_node",
                Status::permission_denied(format!(
                    "node {node} may not obtain {id}: no Workload on node {node} runs as it",
                    node = caller.node
                )),
            ));
        }
        self.issue(&caller, &id, &csr_pem, "workload")
    }

    async fn sign_node(
        &self,
        request: Request<SignNodeRequest>,
    ) -> Result<Response<SignResponse>, Status> {
        let caller = self.caller(&request)?;
        let SignNodeRequest { node, csr_pem } = request.into_inner();
        let authority = self.authority()?;
        let id =
            mesh_api::identity::node_identity(authority.trust_domain(), &node).map_err(|e| {
                self.refuse(
                    &caller,
                    &node,
                    "invalid_identity",
                    Status::invalid_argument(format!("node: {e}")),
                )
            })?;
        if node != caller.node {
            return Err(self.refuse(
                &caller,
                &id.to_string(),
                "other_node",
                Status::permission_denied(format!(
                    "node {} may not obtain {id}, the identity of node {node}",
                    caller.node
                )),
            ));
        }
        self.issue(&caller, &id, &csr_pem, "node")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        for bad in ["", "5", "m", "5x", "-5m", "0s", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
