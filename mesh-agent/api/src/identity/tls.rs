//! rustls configurations for the tunnel between node agents: TLS 1.3 only,
//! ALPN `h2`, both sides proving a SPIFFE identity issued by the mesh CA.
//!
//! The server accepts any client whose certificate chains to the trust bundle
//! and carries one SPIFFE ID (authorization happens later, on that ID). The
//! client accepts only the one server identity it expects for the destination,
//! since a certificate from our own CA for another workload is as bad as a
//! forged one. Refusals carry a [`Refusal`] so callers can count them by reason.

use std::io;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use x509_parser::extensions::GeneralName;

use super::{CertStore, SpiffeId};

/// The tunnel carries HTTP/2 CONNECT streams.
const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("trust bundle is unreadable: {0}")]
    BadTrustBundle(String),
    #[error("trust bundle holds no certificate")]
    EmptyTrustBundle,
    #[error("building the TLS configuration failed")]
    Config(#[source] rustls::Error),
    #[error("building the client certificate verifier failed")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// Why this side refused the peer's certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("peer certificate is self-signed or from a CA outside the trust bundle")]
    UnknownCa,
    #[error("peer certificate is expired or not yet valid")]
    Expired,
    #[error("peer presented {got}, but {expected} was expected")]
    WrongIdentity { expected: SpiffeId, got: SpiffeId },
    #[error("peer presented no certificate carrying a SPIFFE ID")]
    NoIdentity,
    #[error("peer certificate is malformed or not usable for the mesh")]
    BadCertificate,
}

impl Refusal {
    /// A stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::WrongIdentity { .. } => "wrong_identity",
            Self::NoIdentity => "no_identity",
            Self::BadCertificate => "bad_certificate",
        }
    }

    /// Classifies a handshake error as this side refusing the peer's
    /// certificate; `None` for anything else, including the peer refusing ours
    /// (which arrives as an alert).
    pub fn of(err: &rustls::Error) -> Option<Self> {
        use CertificateError as E;
        match err {
            rustls::Error::NoCertificatesPresented => Some(Self::NoIdentity),
            rustls::Error::InvalidCertificate(cert_err) => Some(match cert_err {
                // A bad signature on a chain that names our root: another
                // CA that happens to carry the same name.
                E::UnknownIssuer | E::BadSignature => Self::UnknownCa,
                E::Expired
                | E::ExpiredContext { .. }
                | E::NotValidYet
                | E::NotValidYetContext { .. } => Self::Expired,
                E::Other(OtherError(inner)) => inner
                    .downcast_ref::<Self>()
                    .cloned()
                    .unwrap_or(Self::BadCertificate),
                _ => Self::BadCertificate,
            }),
            _ => None,
        }
    }
}

/// Lets a verifier fail the handshake with the refusal itself, so that
/// [`Refusal::of`] finds it again in the error the connection reports.
impl From<Refusal> for rustls::Error {
    fn from(refusal: Refusal) -> Self {
        Self::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(refusal))))
    }
}

/// The metrics label of a failed handshake: one of `unknown_ca`, `expired`,
/// `wrong_identity`, `no_identity`, `bad_certificate`, or `other`.
pub fn refusal_reason(err: &rustls::Error) -> &'static str {
    Refusal::of(err).map_or("other", |refusal| refusal.reason())
}

/// tokio-rustls reports a failed handshake as an `io::Error` wrapping the
/// rustls error; this unwraps it for [`refusal_reason`].
pub fn tls_error(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref()
}

/// The server side of the tunnel: presents `local`'s current certificate from
/// `store` and requires a client certificate that chains to `trust_bundle_pem`
/// and carries a SPIFFE ID (read it with [`peer_identity`]).
pub fn server_config(
    store: &CertStore,
    local: &SpiffeId,
    trust_bundle_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(store.resolver(local.clone()), trust_bundle_pem)
}

/// The server side of a node agent's tunnel: like [`server_config`], but it
/// presents whichever local identity the client names by SNI ([`sni_for`]),
/// so the client can insist on the destination workload's own identity.
pub fn server_config_by_sni(
    store: &CertStore,
    trust_domain: &str,
    trust_bundle_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let resolver = Arc::new(super::store::SniResolver {
        store: store.clone(),
        trust_domain: trust_domain.to_owned(),
    });
    server_config_with(resolver, trust_bundle_pem)
}

fn server_config_with(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    trust_bundle_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(
        trust_anchors(trust_bundle_pem)?,
        provider.clone(),
    )
    .build()
    .map_err(TlsError::Verifier)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier { webpki }))
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // A resumed session skips certificate verification, so it would outlive a
    // certificate's expiry or rotation; pooled tunnels make full handshakes rare.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Suffix of the SNI names that carry a workload identity.
const SNI_SUFFIX: &str = "id.mesh.internal";

/// The SNI a client sends to ask a node agent for `id`'s certificate:
/// `<service account>.<namespace>.id.mesh.internal` (both parts are DNS
/// labels, so the name is always valid).
pub fn sni_for(id: &SpiffeId) -> ServerName<'static> {
    let name = format!("{}.{}.{SNI_SUFFIX}", id.service_account(), id.namespace());
    ServerName::try_from(name).expect("SPIFFE namespace and service account are DNS labels")
}

pub(super) fn identity_of_sni(trust_domain: &str, sni: &str) -> Option<SpiffeId> {
    let rest = sni.strip_suffix(SNI_SUFFIX)?.strip_suffix('.')?;
    let (sa, ns) = rest.split_once('.')?;
    SpiffeId::new(trust_domain, ns, sa).ok()
}

/// The client side of the tunnel: presents `local`'s current certificate from
/// `store` and accepts only a server that chains to `trust_bundle_pem` and
/// proves `expected_server`.
///
/// The `ServerName` given to the connector is not checked (SPIFFE certificates
/// name no host); pass the peer's IP address, for which no SNI is sent.
pub fn client_config(
    store: &CertStore,
    local: &SpiffeId,
    trust_bundle_pem: &str,
    expected_server: SpiffeId,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        roots: trust_anchors(trust_bundle_pem)?,
        expected: expected_server,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(store.resolver(local.clone()));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The SPIFFE ID of the peer of an established connection, from its verified
/// leaf certificate.
pub fn peer_identity(conn: &CommonState) -> Result<SpiffeId, Refusal> {
    let leaf = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(Refusal::NoIdentity)?;
    spiffe_id_of(leaf)
}

/// When a certificate (DER) stops being valid.
pub fn not_after_der(cert_der: &[u8]) -> Option<std::time::SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(cert.validity().not_after.to_datetime().into())
}

/// When the peer's certificate (the leaf it presented) stops being valid.
pub fn peer_not_after(conn: &CommonState) -> Option<std::time::SystemTime> {
    not_after_der(conn.peer_certificates()?.first()?)
}

/// The SPIFFE ID in a certificate, which must have exactly one URI SAN.
pub fn spiffe_id_of(cert_der: &[u8]) -> Result<SpiffeId, Refusal> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|_| Refusal::BadCertificate)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| Refusal::BadCertificate)?
        .ok_or(Refusal::NoIdentity)?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => uri.parse().map_err(|_| Refusal::NoIdentity),
        (None, _) => Err(Refusal::NoIdentity),
        (Some(_), Some(_)) => Err(Refusal::BadCertificate),
    }
}

/// The one crypto provider of the mesh: ring (aws-lc would need cmake).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn trust_anchors(trust_bundle_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(trust_bundle_pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsError::BadTrustBundle(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| TlsError::BadTrustBundle(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::EmptyTrustBundle);
    }
    Ok(Arc::new(roots))
}

/// rustls' WebPKI client verifier plus the requirement of one SPIFFE ID, so
/// that a certificate without an identity fails the handshake rather than
/// every later request.
#[derive(Debug)]
struct SpiffeClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.webpki.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.webpki.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        spiffe_id_of(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Verifies the server's chain like WebPKI does for a web server (trust
/// anchors, validity, serverAuth usage) but checks the SPIFFE ID instead of a
/// DNS name.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let got = spiffe_id_of(end_entity)?;
        if got != self.expected {
            return Err(Refusal::WrongIdentity {
                expected: self.expected.clone(),
                got,
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(all(test, feature = "ca"))]
mod tests {
    use rustls::{ClientConnection, ServerConnection};

    use super::*;
    use crate::identity::{Ca, generate_key_and_csr};

    const TD: &str = "cluster.local";

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new(TD, "default", sa).expect("valid")
    }

    /// A store holding `who`'s certificate from `ca`.
    fn holder(ca: &Ca, who: &SpiffeId) -> CertStore {
        let (key, csr) = generate_key_and_csr(who).expect("csr");
        let issued = ca
            .sign_csr(csr.as_bytes(), who, std::time::Duration::from_secs(600))
            .expect("signed");
        let store = CertStore::new();
        store
            .insert(&issued.cert_chain_pem, key)
            .expect("installed");
        store
    }

    /// A full TLS 1.3 handshake in memory; the error of the side that failed.
    fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> Result<(), rustls::Error> {
        let mut c = ClientConnection::new(client, sni_for(&id("server")))?;
        let mut s = ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).expect("in memory");
            if !buf.is_empty() {
                s.read_tls(&mut buf.as_slice()).expect("in memory");
                s.process_new_packets()?;
            }
            let mut buf = Vec::new();
            s.write_tls(&mut buf).expect("in memory");
            if !buf.is_empty() {
                c.read_tls(&mut buf.as_slice()).expect("in memory");
                c.process_new_packets()?;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn a_bundle_of_two_roots_accepts_peers_of_either_and_refuses_a_third() {
        let old = Ca::generate(TD).expect("root");
        let new = Ca::generate(TD).expect("root");
        let other = Ca::generate(TD).expect("root");
        let bundle = format!("{}{}", old.trust_bundle_pem(), new.trust_bundle_pem());
        let (client, server) = (id("client"), id("server"));
        for (client_ca, server_ca) in [(&old, &new), (&new, &old), (&new, &new), (&old, &old)] {
            let cs = holder(client_ca, &client);
            let ss = holder(server_ca, &server);
            let cc = client_config(&cs, &client, &bundle, server.clone()).expect("client");
            let sc = server_config_by_sni(&ss, TD, &bundle).expect("server");
            handshake(cc, sc).expect("a peer chained to either root is accepted");
        }
        // A client from a root outside the bundle: the server refuses it.
        let cs = holder(&other, &client);
        let ss = holder(&new, &server);
        let cc = client_config(&cs, &client, &bundle, server.clone()).expect("client");
        let sc = server_config_by_sni(&ss, TD, &bundle).expect("server");
        let err = handshake(cc, sc).expect_err("a client of a third root");
        assert_eq!(Refusal::of(&err), Some(Refusal::UnknownCa), "{err}");
        // A server from a root outside the bundle: the client refuses it.
        let cs = holder(&old, &client);
        let ss = holder(&other, &server);
        let cc = client_config(&cs, &client, &bundle, server.clone()).expect("client");
        let sc = server_config_by_sni(&ss, TD, &bundle).expect("server");
        let err = handshake(cc, sc).expect_err("a server of a third root");
        assert_eq!(Refusal::of(&err), Some(Refusal::UnknownCa), "{err}");
    }
}
