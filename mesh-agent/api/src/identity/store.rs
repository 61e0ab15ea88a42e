//! The certificates an agent currently holds, one per local workload identity.
//!
//! TLS configs read the store at every handshake, so a renewed certificate is
//! used by the next connection without rebuilding any config, while
//! established connections keep the certificate they were made with.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::tls::{not_after_der, provider, spiffe_id_of};
use super::{Refusal, SpiffeId};

#[derive(Debug, thiserror::Error)]
pub enum CertStoreError {
    #[error("certificate chain is unreadable: {0}")]
    BadChain(String),
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("certificate does not name one workload identity")]
    NoIdentity(#[source] Refusal),
    #[error("private key is unusable or does not belong to the certificate")]
    BadKey(#[source] rustls::Error),
}

/// Shared handle: clones see the same certificates.
#[derive(Debug, Clone, Default)]
pub struct CertStore {
    certs: Arc<RwLock<HashMap<SpiffeId, Arc<CertifiedKey>>>>,
}

impl CertStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs a certificate and its key for the identity named in the leaf,
    /// replacing the one held before; returns that identity.
    ///
    /// Everything is checked before the store is touched, so a bad renewal
    /// leaves the previous certificate in service.
    pub fn insert(
        &self,
        cert_chain_pem: &str,
        key: PrivateKeyDer<'static>,
    ) -> Result<SpiffeId, CertStoreError> {
        let chain = CertificateDer::pem_slice_iter(cert_chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertStoreError::BadChain(e.to_string()))?;
        let leaf = chain.first().ok_or(CertStoreError::EmptyChain)?;
        let id = spiffe_id_of(leaf).map_err(CertStoreError::NoIdentity)?;
        let certified =
            CertifiedKey::from_der(chain, key, &provider()).map_err(CertStoreError::BadKey)?;
        self.certs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), Arc::new(certified));
        Ok(id)
    }

    /// Forgets the certificate of an identity that no longer runs on this
    /// node; returns whether there was one.
    pub fn remove(&self, id: &SpiffeId) -> bool {
        self.certs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)
            .is_some()
    }

    /// When the certificate held for `id` stops being valid.
    pub fn not_after(&self, id: &SpiffeId) -> Option<std::time::SystemTime> {
        not_after_der(self.current(id)?.cert.first()?)
    }

    fn current(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        self.certs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// What a TLS config presents for `id`: whatever the store holds at the
    /// moment of each handshake.
    pub(super) fn resolver(&self, id: SpiffeId) -> Arc<IdentityResolver> {
        Arc::new(IdentityResolver {
            store: self.clone(),
            id,
        })
    }
}

/// Presents the certificate of the identity the client asked for by SNI
/// (see [`super::sni_for`]): one agent serves every workload of its node.
#[derive(Debug)]
pub(super) struct SniResolver {
    pub(super) store: CertStore,
    pub(super) trust_domain: String,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let id = super::tls::identity_of_sni(&self.trust_domain, client_hello.server_name()?)?;
        self.store.current(&id)
    }
}

#[derive(Debug)]
pub(super) struct IdentityResolver {
    store: CertStore,
    id: SpiffeId,
}

impl ResolvesServerCert for IdentityResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.current(&self.id)
    }
}

impl ResolvesClientCert for IdentityResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.store.current(&self.id)
    }

    fn has_certs(&self) -> bool {
        self.store.current(&self.id).is_some()
    }
}
