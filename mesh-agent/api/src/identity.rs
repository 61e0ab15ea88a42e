//! Workload identity and mutual TLS between node agents.
//!
//! Every workload is named by a [`SpiffeId`]. The control server's [`Ca`] signs
//! the agents' requests ([`generate_key_and_csr`]) into short-lived
//! certificates; an agent keeps them in a [`CertStore`], from which the tunnel's
//! [`server_config`] and [`client_config`] present them, so renewals apply to
//! the next handshake. Each side verifies the other against the trust bundle
//! and by SPIFFE ID; a refused peer is reported as a [`Refusal`] with a reason
//! for metrics.
#[cfg(feature = "ca")]
mod ca;
mod csr;
mod mesh;
mod spiffe;
mod store;
mod tls;

#[cfg(feature = "ca")]
pub use ca::{Ca, CaError, DEFAULT_CERT_TTL, Issued};
pub use csr::{CsrError, generate_key_and_csr};
pub use mesh::{
    TokenFileError, chains_to, control_identity, is_reserved, node_identity, node_of_identity,
    read_token, validity,
};
pub use spiffe::{SpiffeId, SpiffeIdError};
pub use store::{CertStore, CertStoreError};
pub use tls::{
    Refusal, TlsError, client_config, not_after_der, peer_identity, peer_not_after, provider,
    refusal_reason, server_config, server_config_by_sni, sni_for, spiffe_id_of, tls_error,
};
