//! The mesh's own identities (node agents, the control server), token files
//! and checks on issued certificates.
use std::{fs, path::Path, sync::Arc, time::SystemTime};

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, UnixTime, pem::PemObject},
    server::WebPkiClientVerifier,
};

use super::{SpiffeId, SpiffeIdError, tls::provider};
use crate::names::{CONTROL_SERVICE_ACCOUNT, NODE_SERVICE_ACCOUNT_PREFIX, SYSTEM_NAMESPACE};

#[derive(Debug, thiserror::Error)]
#[error("token file {path}: {reason}")]
pub struct TokenFileError {
    pub path: String,
    pub reason: String,
}

/// `spiffe://<trust domain>/ns/mesh-system/sa/node-<node>`: the identity of
/// a node's agent, which it proves to the control server.
pub fn node_identity(trust_domain: &str, node: &str) -> Result<SpiffeId, SpiffeIdError> {
    SpiffeId::new(
        trust_domain,
        SYSTEM_NAMESPACE,
        &format!("{NODE_SERVICE_ACCOUNT_PREFIX}{node}"),
    )
}

/// `spiffe://<trust domain>/ns/mesh-system/sa/mesh-control`: the identity the
/// control server proves to agents.
pub fn control_identity(trust_domain: &str) -> Result<SpiffeId, SpiffeIdError> {
    SpiffeId::new(trust_domain, SYSTEM_NAMESPACE, CONTROL_SERVICE_ACCOUNT)
}

/// The node whose agent `id` names, if it names one.
pub fn node_of_identity<'a>(id: &'a SpiffeId, trust_domain: &str) -> Option<&'a str> {
    if id.trust_domain() != trust_domain || id.namespace() != SYSTEM_NAMESPACE {
        return None;
    }
    id.service_account()
        .strip_prefix(NODE_SERVICE_ACCOUNT_PREFIX)
        .filter(|node| !node.is_empty())
}

/// Identities only the control server hands out, and never through `Sign`.
pub fn is_reserved(id: &SpiffeId) -> bool {
    id.namespace() == SYSTEM_NAMESPACE
        && (id
            .service_account()
            .starts_with(NODE_SERVICE_ACCOUNT_PREFIX)
            || id.service_account() == CONTROL_SERVICE_ACCOUNT)
}

/// Reads a token file: its content, trimmed.
pub fn read_token(path: &Path) -> Result<String, TokenFileError> {
    let bad = |reason: String| TokenFileError {
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

/// The validity of the first certificate (the leaf) of a PEM chain.
pub fn validity(cert_chain_pem: &str) -> Result<(SystemTime, SystemTime), String> {
    let leaf = CertificateDer::pem_slice_iter(cert_chain_pem.as_bytes())
        .next()
        .ok_or("no certificate in the chain")?
        .map_err(|e| e.to_string())?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).map_err(|e| e.to_string())?;
    let v = cert.validity();
    Ok((
        v.not_before.to_datetime().into(),
        v.not_after.to_datetime().into(),
    ))
}

/// Whether `chain_pem` (leaf first) chains to a root of `bundle_pem` and is
/// valid now.
pub fn chains_to(chain_pem: &str, bundle_pem: &str) -> bool {
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()).flatten() {
        let _ = roots.add(der);
    }
    let Ok(chain) =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()
    else {
        return false;
    };
    let (Some(leaf), Ok(verifier)) = (
        chain.first(),
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build(),
    ) else {
        return false;
    };
    verifier
        .verify_client_cert(leaf, &chain[1..], UnixTime::now())
        .is_ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::identity::generate_key_and_csr;

    #[test]
    fn node_identities_round_trip_and_are_reserved() {
        let id = node_identity("cluster.local", "node-1.a").expect("valid");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/mesh-system/sa/node-node-1.a"
        );
        assert_eq!(node_of_identity(&id, "cluster.local"), Some("node-1.a"));
        assert_eq!(node_of_identity(&id, "other.td"), None);
        assert!(is_reserved(&id));
        let control = control_identity("cluster.local").expect("valid");
        assert_eq!(node_of_identity(&control, "cluster.local"), None);
        assert!(is_reserved(&control));
        let workload: SpiffeId = "spiffe://cluster.local/ns/default/sa/node-x"
            .parse()
            .expect("valid");
        assert_eq!(node_of_identity(&workload, "cluster.local"), None);
        assert!(!is_reserved(&workload));
    }

    #[test]
    fn token_files_are_trimmed_and_must_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("mesh-token-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (good, empty) = (dir.join("good"), dir.join("empty"));
        fs::write(&good, " s3cret\n").unwrap();
        fs::write(&empty, "\n").unwrap();
        assert_eq!(read_token(&good).unwrap(), "s3cret");
        let err = read_token(&empty).unwrap_err().to_string();
        assert!(err.contains("empty") && err.contains("token file"), "{err}");
        assert!(read_token(&dir.join("missing")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(feature = "ca")]
    #[test]
    fn validity_reads_the_leaf() {
        let ca = crate::identity::Ca::generate("td").expect("CA");
        let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().expect("id");
        let (_, csr) = generate_key_and_csr(&id).expect("csr");
        let issued = ca
            .sign_csr(csr.as_bytes(), &id, Duration::from_secs(300))
            .expect("issued");
        let (nb, na) = validity(&issued.cert_chain_pem).expect("validity");
        assert_eq!(na, issued.not_after);
        assert!(nb < SystemTime::now() && na > SystemTime::now());
        assert!(validity("junk").is_err());
    }

    #[cfg(feature = "ca")]
    #[test]
    fn chains_are_checked_against_the_bundle() {
        let (ca, other) = (
            crate::identity::Ca::generate("td").expect("CA"),
            crate::identity::Ca::generate("td").expect("CA"),
        );
        let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().expect("id");
        let (_, csr) = generate_key_and_csr(&id).expect("csr");
        let issued = ca
            .sign_csr(csr.as_bytes(), &id, Duration::from_secs(300))
            .expect("issued");
        assert!(chains_to(&issued.cert_chain_pem, &ca.trust_bundle_pem()));
        assert!(!chains_to(
            &issued.cert_chain_pem,
            &other.trust_bundle_pem()
        ));
        assert!(!chains_to("junk", &ca.trust_bundle_pem()));
    }
}
