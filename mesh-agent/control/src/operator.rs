//! The `Operator` service behind `meshctl`: apply, get, delete, agents.
use std::sync::Arc;

use tonic::{Code, Request, Response, Status, metadata::MetadataMap};

use mesh_api::names::{DEFAULT_NAMESPACE, DOCUMENT_INDEX_METADATA};

use super::{
    ControlPlane, Error,
    resources::{Kind, ResourceId},
};
use mesh_api::pb::{
    AgentsRequest, AgentsResponse, ApplyRequest, ApplyResponse, CaActionRequest, CaRotateRequest,
    CaStatusRequest, CaStatusResponse, DeleteRequest, DeleteResponse, GetRequest, GetResponse,
    RevokeRequest, RevokeResponse, operator_server::Operator,
};

pub struct OperatorService {
    plane: Arc<ControlPlane>,
    /// Kinds that come from Kubernetes: not applied or deleted here.
    from_kubernetes: Vec<Kind>,
}

impl OperatorService {
    pub fn new(plane: Arc<ControlPlane>) -> OperatorService {
        OperatorService {
            plane,
            from_kubernetes: Vec::new(),
        }
    }

    /// Refuses to apply or delete `kinds` (Kubernetes mode: they come from
    /// the API server).
    pub fn refusing(mut self, kinds: Vec<Kind>) -> OperatorService {
        self.from_kubernetes = kinds;
        self
    }

    fn refuse_kubernetes_kind(&self, kind: Kind) -> Result<(), Status> {
        if self.from_kubernetes.contains(&kind) {
            return Err(Status::failed_precondition(format!(
                "{kind} comes from Kubernetes on this control server (--kubernetes): change it with kubectl"
            )));
        }
        Ok(())
    }

    /// Runs a store operation off the async runtime (it fsyncs).
    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&ControlPlane) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        let plane = self.plane.clone();
        tokio::task::spawn_blocking(move || op(&plane))
            .await
            .map_err(|e| Status::internal(format!("operation failed: {e}")))?
            .map_err(status)
    }
}

fn status(e: Error) -> Status {
    let message = e.to_string();
    match &e {
        Error::Rejected(rejected) => {
            let mut metadata = MetadataMap::new();
            if let Some(index) = rejected.document_index() {
                metadata.insert(
                    DOCUMENT_INDEX_METADATA,
                    index.to_string().parse().expect("digits are ASCII"),
                );
            }
            Status::with_metadata(Code::InvalidArgument, message, metadata)
        }
        Error::NotFound(_) => Status::not_found(message),
        // Lost races to other replicas (etcd store): retrying is the fix.
        Error::Contended { .. } | Error::Behind { .. } => Status::aborted(message),
        Error::Store(_)
        | Error::Serve { .. }
        | Error::Stopped(_)
        | Error::Tls(_)
        | Error::Authority(_) => Status::internal(message),
    }
}

fn kind(text: &str) -> Result<Kind, Status> {
    Kind::from_loose(text).ok_or_else(|| {
        Status::invalid_argument(format!(
            "unknown kind {text:?} (expected Workload, Service, Node, MtlsPolicy, HTTPRoute, GRPCRoute, TrafficPolicy or AuthorizationPolicy)"
        ))
    })
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let ApplyRequest { yaml, dry_run } = request.into_inner();
        if !self.from_kubernetes.is_empty()
            && let Ok(resources) = super::resources::parse_documents(&yaml)
        {
            for resource in &resources {
                self.refuse_kubernetes_kind(resource.id().kind)?;
            }
        }
        let applied = self
            .blocking(move |plane| plane.apply(&yaml, dry_run))
            .await?;
        Ok(Response::new(ApplyResponse {
            results: applied
                .outcomes
                .iter()
                .map(|(id, outcome)| format!("{id} {outcome}"))
                .collect(),
            revision: applied.revision,
        }))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let GetRequest {
            kind: kind_text,
            namespace,
            name,
        } = request.into_inner();
        let kind = kind(&kind_text)?;
        let documents = self
            .blocking(move |plane| {
                plane.get(
                    kind,
                    // Cluster-scoped kinds ignore a namespace, as kubectl does.
                    Some(namespace.as_str()).filter(|n| !n.is_empty() && !kind.is_cluster_scoped()),
                    Some(name.as_str()).filter(|n| !n.is_empty()),
                )
            })
            .await?;
        Ok(Response::new(GetResponse {
            documents_json: documents.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let DeleteRequest {
            kind: kind_text,
            namespace,
            name,
        } = request.into_inner();
        let kind = kind(&kind_text)?;
        self.refuse_kubernetes_kind(kind)?;
        if name.is_empty() {
            return Err(Status::invalid_argument("delete needs a name"));
        }
        let id = ResourceId {
            kind,
            namespace: if kind.is_cluster_scoped() {
                String::new()
            } else if namespace.is_empty() {
                DEFAULT_NAMESPACE.to_owned()
            } else {
                namespace
            },
            name,
        };
        let revision = self.blocking(move |plane| plane.delete(&id)).await?;
        Ok(Response::new(DeleteResponse { revision }))
    }

    async fn agents(
        &self,
        _request: Request<AgentsRequest>,
    ) -> Result<Response<AgentsResponse>, Status> {
        Ok(Response::new(AgentsResponse {
            agents: self.plane.agents.snapshot(),
        }))
    }

    // CA rotation and revocation: see `ca_api`.
    async fn ca_rotate(
        &self,
        request: Request<CaRotateRequest>,
    ) -> Result<Response<CaStatusResponse>, Status> {
        super::ca_api::rotate(&self.plane, request.into_inner()).await
    }

    async fn ca_action(
        &self,
        request: Request<CaActionRequest>,
    ) -> Result<Response<CaStatusResponse>, Status> {
        super::ca_api::action(&self.plane, request.into_inner()).await
    }

    async fn ca_status(
        &self,
        _request: Request<CaStatusRequest>,
    ) -> Result<Response<CaStatusResponse>, Status> {
        super::ca_api::status(&self.plane).await
    }

    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        super::ca_api::revoke(&self.plane, request.into_inner()).await
    }
}
