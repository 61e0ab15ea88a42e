//! Credentials: agents' node certificates (on the TLS connection), per-node
//! bootstrap tokens for an agent's first certificate (or, in a cluster, its
//! projected service-account token, verified with a TokenReview), and the
//! admin token that guards the operator API on the network listener.
use std::{collections::HashMap, fmt, fs, future::Future, path::Path, sync::Arc};

use tonic::{Request, Status, metadata::MetadataMap};

use mesh_api::identity::node_of_identity;

use super::{kubernetes::review::Reviewer, tls::PeerInfo};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("token file {path}: {reason}")]
    TokenFile { path: String, reason: String },
}

/// Node name -> bootstrap token; and, in Kubernetes mode, the TokenReview
/// that judges a token that is none of them.
#[derive(Clone, Debug, Default)]
pub struct Tokens(HashMap<String, String>, Option<Arc<Reviewer>>);

impl Tokens {
    /// Reads a YAML map `node: token`.
    pub fn load(path: &Path) -> Result<Tokens, Error> {
        let bad = |reason: String| Error::TokenFile {
            path: path.display().to_string(),
            reason,
        };
        let text = fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let map: HashMap<String, String> = if text.trim().is_empty() {
            HashMap::new()
        } else {
            serde_yaml_ng::from_str(&text)
                .map_err(|e| bad(format!("expected a map node: token ({e})")))?
        };
        Tokens::new(map).map_err(bad)
    }

    pub fn new(map: HashMap<String, String>) -> Result<Tokens, String> {
        if let Some(node) = map
            .iter()
            .find_map(|(n, t)| t.trim().is_empty().then_some(n))
        {
            return Err(format!("node {node:?} has an empty token"));
        }
        Ok(Tokens(map, None))
    }

    /// Tokens that are no node's are reviewed by `reviewer`.
    pub fn with_review(self, reviewer: Arc<Reviewer>) -> Tokens {
        Tokens(self.0, Some(reviewer))
    }

    /// Nodes that have a token.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// Whether `token` belongs to any node (checked before a stream says
    /// which node it is, so strangers are refused at once).
    pub fn is_known(&self, token: &str) -> bool {
        self.0
            .values()
            .fold(false, |any, t| any | same_secret(t, token))
    }

    pub fn verify(&self, node: &str, token: &str) -> bool {
        self.0.get(node).is_some_and(|t| same_secret(t, token))
    }

    /// The node `token` belongs to. Every token is compared, so the time
    /// taken does not tell which one matched.
    pub fn node_of(&self, token: &str) -> Option<&str> {
        self.0.iter().fold(None, |found, (node, t)| {
            if same_secret(t, token) {
                Some(node.as_str())
            } else {
                found
            }
        })
    }
}

/// How a caller proved which node it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Its node certificate, verified in the TLS handshake.
    Certificate,
    /// Its bootstrap token.
    Token,
    /// Its projected service-account token, which a TokenReview bound to
    /// the node.
    ServiceAccountToken,
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Via::Certificate => "node certificate",
            Via::Token => "bootstrap token",
            Via::ServiceAccountToken => "service-account token (TokenReview)",
        })
    }
}

/// An authenticated agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub node: String,
    pub via: Via,
}

/// The node a request comes from. A client certificate, when the connection
/// presented one, decides: it must name a node of `trust_domain` (a token
/// beside it is ignored). Without one, the bearer token must be a node's,
/// or (in Kubernetes mode) an agent's service-account token for a node.
///
/// The error is the message for an `Unauthenticated` status. The future
/// holds nothing of `request`.
pub fn caller<T>(
    request: &Request<T>,
    tokens: &Tokens,
    trust_domain: Option<&str>,
) -> impl Future<Output = Result<Caller, String>> + Send + 'static {
    let decided = static_caller(request, tokens, trust_domain);
    let review = match (&decided, bearer(request.metadata()), &tokens.1) {
        (Err(_), Some(token), Some(reviewer)) if !has_certificate(request) => {
            Some((token.to_owned(), reviewer.clone()))
        }
        _ => None,
    };
    async move {
        match review {
            None => decided,
            Some((token, reviewer)) => reviewer.node_of(&token).await.map(|node| Caller {
                node,
                via: Via::ServiceAccountToken,
            }),
        }
    }
}

fn has_certificate<T>(request: &Request<T>) -> bool {
    request
        .extensions()
        .get::<PeerInfo>()
        .is_some_and(|p| p.identity.is_some())
}

/// [`caller`] by the certificate and the static tokens alone.
fn static_caller<T>(
    request: &Request<T>,
    tokens: &Tokens,
    trust_domain: Option<&str>,
) -> Result<Caller, String> {
    let peer = request.extensions().get::<PeerInfo>();
    if let Some(id) = peer.and_then(|p| p.identity.as_ref()) {
        return match trust_domain.and_then(|td| node_of_identity(id, td)) {
            Some(node) => Ok(Caller {
                node: node.to_owned(),
                via: Via::Certificate,
            }),
            None => Err(format!(
                "the client certificate names {id}, which is not a node agent of this mesh"
            )),
        };
    }
    match bearer(request.metadata()) {
        Some(token) => tokens
            .node_of(token)
            .map(|node| Caller {
                node: node.to_owned(),
                via: Via::Token,
            })
            .ok_or_else(|| "the bearer token is not a node's".to_owned()),
        None => Err(
            "no credentials: present the node certificate, or \"authorization: Bearer <node token>\""
                .to_owned(),
        ),
    }
}

/// The token of an `authorization: Bearer <token>` header.
pub fn bearer(metadata: &MetadataMap) -> Option<&str> {
    metadata
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Interceptor for the operator API on the network listener: without an
/// admin token configured, it is closed there (the unix socket stays open).
pub fn admin_only(
    admin_token: Option<String>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| match &admin_token {
        None => Err(Status::unauthenticated(
            "the operator API is served on the network only with --admin-token-file; use the unix socket",
        )),
        Some(expected) => match bearer(request.metadata()) {
            Some(token) if same_secret(expected, token) => Ok(request),
            Some(_) => Err(Status::unauthenticated("admin token is not valid")),
            None => Err(Status::unauthenticated(
                "missing \"authorization: Bearer <admin token>\"",
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_per_node() {
        let tokens = Tokens::new([("n1".into(), "s1".into()), ("n2".into(), "s2".into())].into())
            .expect("valid");
        assert!(tokens.verify("n1", "s1"));
        assert!(!tokens.verify("n1", "s2"));
        assert!(!tokens.verify("n3", "s1"));
        assert!(tokens.is_known("s2"));
        assert!(!tokens.is_known("s"));
        assert_eq!(tokens.node_of("s2"), Some("n2"));
        assert_eq!(tokens.node_of("s"), None);
        assert!(Tokens::new([("n1".into(), " ".into())].into()).is_err());
    }

    #[test]
    fn the_admin_interceptor_wants_the_admin_token() {
        let mut check = admin_only(Some("root".into()));
        let mut request = Request::new(());
        assert_eq!(
            check(Request::new(())).expect_err("no token").code(),
            tonic::Code::Unauthenticated
        );
        request
            .metadata_mut()
            .insert("authorization", "Bearer root".parse().expect("ascii"));
        assert!(check(request).is_ok());
        let mut closed = admin_only(None);
        assert!(closed(Request::new(())).is_err());
    }
}
