//! The CA rotation and revocation, wired to the rest of the server: the
//! distributed trust bundle follows the [`Authority`]; a driver task moves
//! the rotation on as agents acknowledge bundles and certificates roll
//! over; the operator API's `CaRotate`, `CaAction`, `CaStatus` and `Revoke`.
use std::{sync::Arc, time::Duration};

use tonic::{Response, Status};
use tracing::warn;

use super::{
    ControlPlane,
    certs::{Authority, RotateError},
};
use mesh_api::pb;

/// How often the driver looks at acknowledgements and the ledger.
const TICK: Duration = Duration::from_secs(1);

impl ControlPlane {
    /// Puts the authority's current trust material into the view and tells
    /// every agent stream to send it.
    pub(crate) fn publish_trust(&self) {
        let Some(authority) = self.authority.as_deref() else {
            return;
        };
        let (bundle, roots) = authority.trust_material();
        let version = self
            .view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .set_trust_bundle(bundle);
        authority.note_bundle(version, roots);
        self.trust_pushes.send_modify(|n| *n += 1);
        self.ca_gauges(authority);
    }

    fn ca_gauges(&self, authority: &Authority) {
        let m = &self.metrics;
        m.ca_rotation_phase.set(authority.phase().number());
        let (current, next) = authority.live_by_slot();
        m.ca_live_certificates
            .get_or_create(&super::SlotLabels { slot: "current" })
            .set(i64::try_from(current).unwrap_or(i64::MAX));
        m.ca_live_certificates
            .get_or_create(&super::SlotLabels { slot: "next" })
            .set(i64::try_from(next).unwrap_or(i64::MAX));
        let expiry = authority
            .ca_not_after()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        m.ca_expiry.set(i64::try_from(expiry).unwrap_or(i64::MAX));
        // Every tick, not only when an operator asks for `ca status`: a
        // dashboard watches the bundle roll out.
        let current = self.view().trust_bundle_version().unwrap_or("").to_owned();
        let acked = self
            .agents
            .bundles()
            .iter()
            .filter(|a| a.connected && a.version == current)
            .count();
        m.ca_agents_on_bundle
            .set(i64::try_from(acked).unwrap_or(i64::MAX));
    }

    fn ca_status(&self, authority: &Authority) -> pb::CaStatusResponse {
        let current = self.view().trust_bundle_version().unwrap_or("").to_owned();
        let mut status = authority.status(&self.agents.bundles(), &current);
        status.bundles.sort_by_key(|b| !b.current);
        status
    }
}

/// Moves the rotation on, and republishes the bundle whenever the
/// authority changes; runs until the server stops.
pub async fn drive(plane: Arc<ControlPlane>) {
    let Some(authority) = plane.authority.clone() else {
        return;
    };
    let mut changes = authority.changes();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                authority.tick(&plane.agents.bundles());
                plane.ca_gauges(&authority);
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                plane.publish_trust();
            }
        }
    }
}

fn authority(plane: &ControlPlane) -> Result<Arc<Authority>, Status> {
    plane.authority.clone().ok_or_else(|| {
        Status::failed_precondition("this control server has no certificate authority")
    })
}

fn refused(e: RotateError) -> Status {
    match e {
        RotateError::Store { .. } => Status::internal(e.to_string()),
        RotateError::NoDirectory => Status::failed_precondition(e.to_string()),
        RotateError::Refused(_) => Status::failed_precondition(e.to_string()),
        RotateError::BadCa(_) | RotateError::SameRoot | RotateError::BadRequest(_) => {
            Status::invalid_argument(e.to_string())
        }
    }
}

/// Runs `op` off the runtime (it writes files), then answers the status.
async fn then_status(
    plane: &Arc<ControlPlane>,
    op: impl FnOnce(&Authority, &ControlPlane) -> Result<(), RotateError> + Send + 'static,
) -> Result<Response<pb::CaStatusResponse>, Status> {
    let authority = authority(plane)?;
    let p = plane.clone();
    let a = authority.clone();
    tokio::task::spawn_blocking(move || op(&a, &p))
        .await
        .map_err(|e| Status::internal(format!("operation failed: {e}")))?
        .map_err(|e| {
            warn!(error = %e, "CA operation refused");
            refused(e)
        })?;
    plane.publish_trust();
    Ok(Response::new(plane.ca_status(&authority)))
}

pub async fn rotate(
    plane: &Arc<ControlPlane>,
    request: pb::CaRotateRequest,
) -> Result<Response<pb::CaStatusResponse>, Status> {
    then_status(plane, move |authority, _| {
        authority.rotate(&request.cert_pem, &request.key_pem, request.force_renew)
    })
    .await
}

pub async fn action(
    plane: &Arc<ControlPlane>,
    request: pb::CaActionRequest,
) -> Result<Response<pb::CaStatusResponse>, Status> {
    then_status(plane, move |authority, plane| {
        authority.act(&request.action, &plane.agents.bundles())
    })
    .await
}

pub async fn status(plane: &Arc<ControlPlane>) -> Result<Response<pb::CaStatusResponse>, Status> {
    let authority = authority(plane)?;
    Ok(Response::new(plane.ca_status(&authority)))
}

pub async fn revoke(
    plane: &Arc<ControlPlane>,
    request: pb::RevokeRequest,
) -> Result<Response<pb::RevokeResponse>, Status> {
    let authority = authority(plane)?;
    let a = authority.clone();
    let list = tokio::task::spawn_blocking(move || {
        a.revoke(&request.kind, &request.name, request.unrevoke)
    })
    .await
    .map_err(|e| Status::internal(format!("operation failed: {e}")))?
    .map_err(refused)?;
    plane.publish_trust();
    plane
        .metrics
        .revocations
        .set(i64::try_from(list.identities.len() + list.nodes.len()).unwrap_or(i64::MAX));
    Ok(Response::new(pb::RevokeResponse {
        revoked_identities: list.identities.into_iter().collect(),
        revoked_nodes: list.nodes.into_iter().collect(),
    }))
}
