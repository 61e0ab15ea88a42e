//! The agent's side of issuance: a fresh key per certificate and a signing
//! request that names the identity it wants. The private key never leaves the
//! agent; only the request goes to the control server.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("generating a workload key or its signing request failed")]
    GenerateFailed(#[from] rcgen::Error),
}

/// Generates an ECDSA P-256 key and a PEM signing request carrying `id` as its
/// only URI SAN, for the CA's `sign_csr`.
///
/// The key is returned in PKCS#8 DER, ready for [`CertStore::insert`](super::CertStore::insert).
pub fn generate_key_and_csr(id: &SpiffeId) -> Result<(PrivateKeyDer<'static>, String), CsrError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    let csr_pem = params.serialize_request(&key)?.pem()?;
    let key_der = PrivatePkcs8KeyDer::from(key.serialize_der()).into();
    Ok((key_der, csr_pem))
}
