//! Credentials: per-node bootstrap tokens for agents, and the admin token
//! that guards the operator API on the network listener.
use std::{collections::HashMap, fs, path::Path};

use tonic::{Request, Status, metadata::MetadataMap};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("token file {path}: {reason}")]
    TokenFile { path: String, reason: String },
}

/// Node name -> bootstrap token.
#[derive(Clone, Debug, Default)]
pub struct Tokens(HashMap<String, String>);

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
            serde_yaml::from_str(&text)
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
        Ok(Tokens(map))
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
}

/// Reads a token file: its content, trimmed.
pub fn read_token(path: &Path) -> Result<String, Error> {
    let bad = |reason: String| Error::TokenFile {
        path: path.display().to_string(),
        reason,
    };
    let token = fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(bad("empty".into()));
    }
    Ok(token.to_owned())
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
