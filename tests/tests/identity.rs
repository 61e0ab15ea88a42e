//! Workload identity and the agent-to-agent mTLS handshake: a real CA, real
//! keys and real TLS over loopback TCP sockets. Peers that must be refused are
//! built from our own configs with only the presented certificate swapped, so
//! each test changes exactly one thing.
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_api::identity::{
    Ca, CaError, CertStore, CertStoreError, DEFAULT_CERT_TTL, Issued, Refusal, SpiffeId,
    client_config, generate_key_and_csr, peer_identity, refusal_reason, server_config, tls_error,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName,
};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, HandshakeKind, ProtocolVersion, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector, client};

const TD: &str = "cluster.local";
const WAIT: Duration = Duration::from_secs(10);
const HOUR: Duration = Duration::from_secs(3600);

fn id(namespace: &str, service_account: &str) -> SpiffeId {
    SpiffeId::new(TD, namespace, service_account).expect("valid test identity")
}

fn server_id() -> SpiffeId {
    id("shop", "cart")
}

fn client_id() -> SpiffeId {
    id("web", "frontend")
}

/// A key and a certificate for `id` from `ca`, the way an agent gets them.
fn issue(ca: &Ca, id: &SpiffeId, ttl: Duration) -> (String, PrivateKeyDer<'static>) {
    let (key, csr) = generate_key_and_csr(id).expect("key and CSR");
    let issued = ca.sign_csr(csr.as_bytes(), id, ttl).expect("CA signs");
    (issued.cert_chain_pem, key)
}

fn store_with(ca: &Ca, id: &SpiffeId) -> CertStore {
    let store = CertStore::new();
    let (chain, key) = issue(ca, id, HOUR);
    assert_eq!(&store.insert(&chain, key).expect("store accepts"), id);
    store
}

fn certified(chain_pem: &str, key: PrivateKeyDer<'static>) -> CertifiedKey {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("chain PEM");
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .expect("key matches certificate")
}

fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivatePkcs8KeyDer::from(key.serialize_der()).into()
}

/// Leaf parameters as our CA would set them, for certificates the tests forge.
fn leaf_params(san: Option<&SpiffeId>) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = san
        .map(|id| SanType::URI(id.to_string().try_into().expect("IA5 URI")))
        .into_iter()
        .collect();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
}

/// A self-signed certificate that names `id` correctly: only its issuer is wrong.
fn self_signed(id: &SpiffeId) -> CertifiedKey {
    let key = KeyPair::generate().expect("key");
    let cert = leaf_params(Some(id))
        .self_signed(&key)
        .expect("self-signed");
    certified(&cert.pem(), key_der(&key))
}

/// A root whose key the test holds, so it can sign what our CA never would.
struct TestRoot {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

impl TestRoot {
    fn new() -> TestRoot {
        let key = KeyPair::generate().expect("root key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "operator root");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert_pem = params.self_signed(&key).expect("root").pem();
        TestRoot {
            params,
            key,
            cert_pem,
        }
    }

    fn ca(&self) -> Ca {
        Ca::from_pem(TD, &self.cert_pem, &self.key.serialize_pem()).expect("operator root as CA")
    }

    fn sign(&self, params: &CertificateParams) -> CertifiedKey {
        let key = KeyPair::generate().expect("leaf key");
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("signed leaf");
        certified(&cert.pem(), key_der(&key))
    }
}

/// A config of ours that presents `cert` instead of what its store holds.
fn server_presenting(config: &ServerConfig, cert: CertifiedKey) -> Arc<ServerConfig> {
    let mut config = config.clone();
    config.cert_resolver = Arc::new(SingleCertAndKey::from(cert));
    Arc::new(config)
}

fn client_presenting(config: &ClientConfig, cert: CertifiedKey) -> Arc<ClientConfig> {
    let mut config = config.clone();
    config.client_auth_cert_resolver = Arc::new(SingleCertAndKey::from(cert));
    Arc::new(config)
}

/// What the server saw of one connection.
#[derive(Debug)]
struct Accepted {
    peer: Result<SpiffeId, Refusal>,
    peer_serial: Vec<u8>,
    version: Option<ProtocolVersion>,
    alpn: Option<Vec<u8>>,
}

/// An echo server on loopback that reports every handshake's outcome.
async fn serve(
    config: Arc<ServerConfig>,
) -> (SocketAddr, mpsc::UnboundedReceiver<io::Result<Accepted>>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let (_, conn) = tls.get_ref();
                let accepted = Accepted {
                    peer: peer_identity(conn),
                    peer_serial: serial(&conn.peer_certificates().expect("client chain")[0]),
                    version: conn.protocol_version(),
                    alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                };
                let _ = tx.send(Ok(accepted));
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = tls.read(&mut buf).await {
                    if tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> io::Result<client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    timeout(WAIT, TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("handshake finishes in time")
}

/// Sends `msg` and reads the echo: the proof that bytes flow both ways.
async fn ping(tls: &mut client::TlsStream<TcpStream>, msg: &[u8]) -> io::Result<Vec<u8>> {
    tls.write_all(msg).await?;
    let mut echo = vec![0u8; msg.len()];
    timeout(WAIT, tls.read_exact(&mut echo))
        .await
        .expect("echo in time")?;
    Ok(echo)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<io::Result<Accepted>>) -> io::Result<Accepted> {
    timeout(WAIT, rx.recv())
        .await
        .expect("server reports in time")
        .expect("server still running")
}

fn refusal(err: &io::Error) -> Refusal {
    let tls = tls_error(err).unwrap_or_else(|| panic!("not a TLS error: {err:?}"));
    Refusal::of(tls).unwrap_or_else(|| panic!("not a refusal of the peer: {tls:?}"))
}

fn serial(cert: &[u8]) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).expect("X.509");
    cert.raw_serial().to_vec()
}

fn unix(t: SystemTime) -> i64 {
    i64::try_from(t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs()).expect("fits")
}

#[tokio::test]
async fn mutual_handshake_proves_both_identities_over_tls13_and_h2() {
    let ca = Ca::generate(TD).expect("root CA");
    let bundle = ca.trust_bundle_pem();
    let server = server_config(&store_with(&ca, &server_id()), &server_id(), &bundle)
        .expect("server config");
    let client = client_config(
        &store_with(&ca, &client_id()),
        &client_id(),
        &bundle,
        server_id(),
    )
    .expect("client config");
    let (addr, mut accepted) = serve(server).await;

    let mut tls = connect(addr, client).await.expect("handshake succeeds");
    assert_eq!(
        ping(&mut tls, b"marker-1234").await.expect("echo"),
        b"marker-1234"
    );

    let (_, conn) = tls.get_ref();
    assert_eq!(peer_identity(conn).expect("server identity"), server_id());
    assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
    let seen = next(&mut accepted).await.expect("server accepted");
    assert_eq!(seen.peer, Ok(client_id()));
    assert_eq!(seen.version, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(seen.alpn.as_deref(), Some(&b"h2"[..]));
}

#[tokio::test]
async fn server_refuses_client_certificates_it_cannot_trust() {
    let root = TestRoot::new();
    let ca = root.ca();
    let other_ca = Ca::generate(TD).expect("another CA");
    let bundle = ca.trust_bundle_pem();
    let server = server_config(&store_with(&ca, &server_id()), &server_id(), &bundle)
        .expect("server config");
    let honest = client_config(
        &store_with(&ca, &client_id()),
        &client_id(),
        &bundle,
        server_id(),
    )
    .expect("client config");

    let (expired_chain, expired_key) = {
        let (key, csr) = generate_key_and_csr(&client_id()).expect("CSR");
        let now = SystemTime::now();
        let issued = ca
            .sign_csr_with_validity(csr.as_bytes(), &client_id(), now - 2 * HOUR, now - HOUR)
            .expect("expired certificate issued");
        (issued.cert_chain_pem, key)
    };
    let (foreign_chain, foreign_key) = issue(&other_ca, &client_id(), HOUR);
    let anonymous = client_config(&CertStore::new(), &client_id(), &bundle, server_id())
        .expect("client config without a certificate");
    let cases = [
        (
            "self-signed",
            client_presenting(&honest, self_signed(&client_id())),
            "unknown_ca",
        ),
        (
            "another CA",
            client_presenting(&honest, certified(&foreign_chain, foreign_key)),
            "unknown_ca",
        ),
        (
            "expired",
            client_presenting(&honest, certified(&expired_chain, expired_key)),
            "expired",
        ),
        (
            "no URI SAN",
            client_presenting(&honest, root.sign(&leaf_params(None))),
            "no_identity",
        ),
        ("no certificate", anonymous, "no_identity"),
    ];

    let (addr, mut accepted) = serve(server).await;
    for (case, client, reason) in cases {
        // In TLS 1.3 the client may finish before the server has judged its
        // certificate, so the refusal can surface on the first read instead.
        let client_side = match connect(addr, client).await {
            Ok(mut tls) => ping(&mut tls, b"x").await.map(drop),
            Err(e) => Err(e),
        };
        assert!(client_side.is_err(), "{case}: client must not get through");
        let err = next(&mut accepted).await.expect_err(case);
        let tls = tls_error(&err).unwrap_or_else(|| panic!("{case}: {err:?}"));
        assert_eq!(refusal_reason(tls), reason, "{case}: {tls:?}");
    }
}

#[tokio::test]
async fn client_refuses_server_certificates_it_cannot_trust() {
    let root = TestRoot::new();
    let ca = root.ca();
    let other_ca = Ca::generate(TD).expect("another CA");
    let bundle = ca.trust_bundle_pem();
    let honest = server_config(&store_with(&ca, &server_id()), &server_id(), &bundle)
        .expect("server config");
    let client = client_config(
        &store_with(&ca, &client_id()),
        &client_id(),
        &bundle,
        server_id(),
    )
    .expect("client config");

    let now = SystemTime::now();
    let windowed = |not_before, not_after| {
        let (key, csr) = generate_key_and_csr(&server_id()).expect("CSR");
        let issued = ca
            .sign_csr_with_validity(csr.as_bytes(), &server_id(), not_before, not_after)
            .expect("certificate issued");
        certified(&issued.cert_chain_pem, key)
    };
    let (foreign_chain, foreign_key) = issue(&other_ca, &server_id(), HOUR);
    let impostor = id("shop", "payments");
    let (impostor_chain, impostor_key) = issue(&ca, &impostor, HOUR);
    let cases = [
        ("self-signed", self_signed(&server_id()), "unknown_ca"),
        (
            "another CA",
            certified(&foreign_chain, foreign_key),
            "unknown_ca",
        ),
        ("expired", windowed(now - 2 * HOUR, now - HOUR), "expired"),
        (
            "not yet valid",
            windowed(now + HOUR, now + 2 * HOUR),
            "expired",
        ),
        (
            "wrong identity",
            certified(&impostor_chain, impostor_key),
            "wrong_identity",
        ),
        ("no URI SAN", root.sign(&leaf_params(None)), "no_identity"),
    ];

    for (case, cert, reason) in cases {
        let (addr, mut accepted) = serve(server_presenting(&honest, cert)).await;
        let err = connect(addr, client.clone())
            .await
            .map(drop)
            .expect_err(case);
        let tls = tls_error(&err).unwrap_or_else(|| panic!("{case}: {err:?}"));
        assert_eq!(refusal_reason(tls), reason, "{case}: {tls:?}");
        let server_err = next(&mut accepted).await.expect_err(case);
        let server_tls = tls_error(&server_err).expect("server sees a TLS error");
        assert_eq!(
            refusal_reason(server_tls),
            "other",
            "{case}: the refused side did not refuse anything: {server_tls:?}"
        );
        if reason == "wrong_identity" {
            assert_eq!(
                refusal(&err),
                Refusal::WrongIdentity {
                    expected: server_id(),
                    got: impostor.clone()
                }
            );
        }
    }
}

#[tokio::test]
async fn tls12_only_peers_are_refused() {
    let ca = Ca::generate(TD).expect("root CA");
    let bundle = ca.trust_bundle_pem();
    let server = server_config(&store_with(&ca, &server_id()), &server_id(), &bundle)
        .expect("server config");
    // The server must refuse at the ClientHello, before any certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(bundle.as_bytes()).expect("bundle"))
        .expect("root");
    let tls12 =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("TLS 1.2 supported by the provider")
            .with_root_certificates(roots)
            .with_no_client_auth();

    let (addr, mut accepted) = serve(server).await;
    let result = connect(addr, Arc::new(tls12)).await;
    assert!(result.is_err(), "a TLS 1.2 handshake must fail");
    let err = next(&mut accepted)
        .await
        .expect_err("server refuses TLS 1.2");
    let tls = tls_error(&err).expect("TLS error");
    assert!(
        matches!(tls, rustls::Error::PeerIncompatible(_)),
        "unexpected error: {tls:?}"
    );
}

#[tokio::test]
async fn rotated_certificates_serve_new_handshakes_while_old_connections_live() {
    let ca = Ca::generate(TD).expect("root CA");
    let bundle = ca.trust_bundle_pem();
    let server_store = store_with(&ca, &server_id());
    let client_store = store_with(&ca, &client_id());
    let server = server_config(&server_store, &server_id(), &bundle).expect("server config");
    let client =
        client_config(&client_store, &client_id(), &bundle, server_id()).expect("client config");
    let (addr, mut accepted) = serve(server).await;

    let mut old = connect(addr, client.clone())
        .await
        .expect("first handshake");
    ping(&mut old, b"before")
        .await
        .expect("echo before rotation");
    let old_server_serial = serial(&old.get_ref().1.peer_certificates().expect("chain")[0]);
    let old_client_serial = next(&mut accepted).await.expect("accepted").peer_serial;

    let renew = |id: &SpiffeId, ttl| {
        let (key, csr) = generate_key_and_csr(id).expect("CSR");
        let issued: Issued = ca.sign_csr(csr.as_bytes(), id, ttl).expect("renewed");
        (issued.clone(), key)
    };
    let (server_cert, server_key) = renew(&server_id(), 2 * HOUR);
    let (client_cert, client_key) = renew(&client_id(), 2 * HOUR);
    server_store
        .insert(&server_cert.cert_chain_pem, server_key)
        .expect("server renewal stored");
    client_store
        .insert(&client_cert.cert_chain_pem, client_key)
        .expect("client renewal stored");

    assert_eq!(
        ping(&mut old, b"during")
            .await
            .expect("old connection lives"),
        b"during"
    );
    let mut new = connect(addr, client)
        .await
        .expect("handshake after rotation");
    ping(&mut new, b"after").await.expect("echo after rotation");
    assert_eq!(
        new.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Full),
        "no resumption: a resumed session would skip the certificates"
    );
    let new_leaf = new.get_ref().1.peer_certificates().expect("chain")[0].clone();
    assert_ne!(
        serial(&new_leaf),
        old_server_serial,
        "server presents the renewed certificate"
    );
    let (_, parsed) = x509_parser::parse_x509_certificate(&new_leaf).expect("X.509");
    assert_eq!(
        parsed.validity().not_after.timestamp(),
        unix(server_cert.not_after)
    );
    let new_client_serial = next(&mut accepted).await.expect("accepted").peer_serial;
    assert_ne!(
        new_client_serial, old_client_serial,
        "client presents the renewed certificate"
    );
    assert_eq!(
        ping(&mut old, b"still")
            .await
            .expect("old connection lives on"),
        b"still"
    );
}

#[tokio::test]
async fn operator_intermediate_chains_to_the_operator_root() {
    let root = TestRoot::new();
    let intermediate_key = KeyPair::generate().expect("intermediate key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mesh intermediate");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let issuer = Issuer::from_params(&root.params, &root.key);
    let intermediate_pem = params
        .signed_by(&intermediate_key, &issuer)
        .expect("intermediate")
        .pem();
    let ca = Ca::from_pem(
        TD,
        &format!("{intermediate_pem}{}", root.cert_pem),
        &intermediate_key.serialize_pem(),
    )
    .expect("operator intermediate");

    let bundle = ca.trust_bundle_pem();
    assert_eq!(
        CertificateDer::pem_slice_iter(bundle.as_bytes()).count(),
        1,
        "the bundle is the operator's root alone"
    );
    assert_eq!(
        CertificateDer::from_pem_slice(bundle.as_bytes()).expect("bundle"),
        CertificateDer::from_pem_slice(root.cert_pem.as_bytes()).expect("root")
    );
    let (chain, _) = issue(&ca, &server_id(), HOUR);
    assert_eq!(
        CertificateDer::pem_slice_iter(chain.as_bytes()).count(),
        2,
        "leaves travel with the intermediate"
    );

    let server = server_config(&store_with(&ca, &server_id()), &server_id(), &bundle)
        .expect("server config");
    let client = client_config(
        &store_with(&ca, &client_id()),
        &client_id(),
        &bundle,
        server_id(),
    )
    .expect("client config");
    let (addr, mut accepted) = serve(server).await;
    let mut tls = connect(addr, client)
        .await
        .expect("handshake through the intermediate");
    assert_eq!(ping(&mut tls, b"hi").await.expect("echo"), b"hi");
    assert_eq!(
        next(&mut accepted).await.expect("accepted").peer,
        Ok(client_id())
    );
}

#[test]
fn issued_leaf_carries_only_the_expected_identity() {
    let ca = Ca::generate(TD).expect("root CA");
    let (_, csr) = generate_key_and_csr(&server_id()).expect("CSR");
    let before = SystemTime::now();
    let ttl = Duration::from_secs(5 * 60);
    let issued = ca
        .sign_csr(csr.as_bytes(), &server_id(), ttl)
        .expect("issued");
    let chain: Vec<_> = CertificateDer::pem_slice_iter(issued.cert_chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("chain PEM");
    assert_eq!(chain.len(), 1, "a root CA sends the leaf alone");
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("X.509");

    let san = leaf
        .subject_alternative_name()
        .expect("SAN")
        .expect("present");
    assert_eq!(
        san.value.general_names,
        vec![x509_parser::extensions::GeneralName::URI(
            "spiffe://cluster.local/ns/shop/sa/cart"
        )]
    );
    assert!(!leaf.is_ca());
    let ku = leaf.key_usage().expect("KU").expect("present").value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = leaf
        .extended_key_usage()
        .expect("EKU")
        .expect("present")
        .value;
    assert!(eku.server_auth && eku.client_auth);

    let validity = leaf.validity();
    let skew = unix(before) - validity.not_before.timestamp();
    assert!(
        (59..=61).contains(&skew),
        "backdated by a minute, got {skew}s"
    );
    assert_eq!(validity.not_after.timestamp(), unix(issued.not_after));
    let lifetime = unix(issued.not_after) - unix(before);
    assert!(
        (299..=301).contains(&lifetime),
        "lives 5 minutes, got {lifetime}s"
    );
    assert_eq!(DEFAULT_CERT_TTL, Duration::from_secs(24 * 3600));

    let again = ca
        .sign_csr(csr.as_bytes(), &server_id(), ttl)
        .expect("issued again");
    let again = CertificateDer::from_pem_slice(again.cert_chain_pem.as_bytes()).expect("PEM");
    assert_ne!(serial(&again), serial(&chain[0]), "serials are unique");
}

#[test]
fn ca_refuses_requests_beyond_the_expected_identity() {
    let ca = Ca::generate(TD).expect("root CA");
    let expected = server_id();

    let (_, other) = generate_key_and_csr(&id("shop", "payments")).expect("CSR");
    match ca.sign_csr(other.as_bytes(), &expected, HOUR) {
        Err(CaError::CsrIdentityMismatch {
            expected: e,
            requested,
        }) => {
            assert_eq!(e, expected);
            assert_eq!(requested, "URI spiffe://cluster.local/ns/shop/sa/payments");
        }
        other => panic!("a CSR for another identity must be refused: {other:?}"),
    }

    let key = KeyPair::generate().expect("key");
    let mut ca_request = leaf_params(Some(&expected));
    ca_request.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr = ca_request
        .serialize_request(&key)
        .expect("CSR")
        .pem()
        .expect("PEM");
    assert!(matches!(
        ca.sign_csr(csr.as_bytes(), &expected, HOUR),
        Err(CaError::CsrRequestsCa(_))
    ));

    let mut extra_name = leaf_params(Some(&expected));
    extra_name
        .subject_alt_names
        .push(SanType::DnsName("cart.shop.svc".try_into().expect("IA5")));
    let csr = extra_name
        .serialize_request(&key)
        .expect("CSR")
        .pem()
        .expect("PEM");
    assert!(matches!(
        ca.sign_csr(csr.as_bytes(), &expected, HOUR),
        Err(CaError::CsrIdentityMismatch { requested, .. }) if requested == "DNS name cart.shop.svc"
    ));

    let foreign = SpiffeId::new("example.org", "shop", "cart").expect("ID");
    let (_, csr) = generate_key_and_csr(&foreign).expect("CSR");
    assert!(matches!(
        ca.sign_csr(csr.as_bytes(), &foreign, HOUR),
        Err(CaError::ForeignTrustDomain { .. })
    ));

    assert!(matches!(
        ca.sign_csr(b"not a CSR", &expected, HOUR),
        Err(CaError::BadCsr(_))
    ));
    let (_, good) = generate_key_and_csr(&expected).expect("CSR");
    let mut tampered = CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
        .expect("DER")
        .as_ref()
        .to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    assert!(
        matches!(
            ca.sign_csr(&tampered, &expected, HOUR),
            Err(CaError::BadCsr(_))
        ),
        "a CSR whose signature does not verify is refused"
    );
}

#[test]
fn ca_signs_der_requests_and_requests_without_names() {
    let ca = Ca::generate(TD).expect("root CA");
    let (_, pem) = generate_key_and_csr(&server_id()).expect("CSR");
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).expect("DER");
    ca.sign_csr(der.as_ref(), &server_id(), HOUR)
        .expect("DER CSR signed");

    let key = KeyPair::generate().expect("key");
    let anonymous = CertificateParams::default()
        .serialize_request(&key)
        .expect("CSR")
        .pem()
        .expect("PEM");
    let issued = ca
        .sign_csr(anonymous.as_bytes(), &server_id(), HOUR)
        .expect("a CSR naming nothing gets the expected identity");
    let store = CertStore::new();
    assert_eq!(
        store
            .insert(&issued.cert_chain_pem, key_der(&key))
            .expect("stored"),
        server_id()
    );
}

#[test]
fn ca_validity_is_capped_by_its_own() {
    let ca = Ca::generate(TD).expect("root CA");
    let (_, csr) = generate_key_and_csr(&server_id()).expect("CSR");
    let now = SystemTime::now();
    assert!(matches!(
        ca.sign_csr_with_validity(csr.as_bytes(), &server_id(), now, now),
        Err(CaError::EmptyValidity { .. })
    ));
    let eleven_years = Duration::from_secs(11 * 365 * 24 * 3600);
    for ttl in [Duration::from_secs(100 * 365 * 24 * 3600), Duration::MAX] {
        let issued = ca
            .sign_csr(csr.as_bytes(), &server_id(), ttl)
            .expect("issued");
        assert!(
            issued.not_after < now + eleven_years,
            "a leaf never outlives the CA"
        );
    }
}

#[test]
fn from_pem_refuses_what_cannot_be_a_ca() {
    let root = TestRoot::new();
    let other_key = KeyPair::generate().expect("key");
    assert!(matches!(
        Ca::from_pem(TD, &root.cert_pem, &other_key.serialize_pem()),
        Err(CaError::KeyMismatch)
    ));

    let leaf_key = KeyPair::generate().expect("key");
    let issuer = Issuer::from_params(&root.params, &root.key);
    let leaf = leaf_params(Some(&server_id()))
        .signed_by(&leaf_key, &issuer)
        .expect("leaf");
    assert!(matches!(
        Ca::from_pem(TD, &leaf.pem(), &leaf_key.serialize_pem()),
        Err(CaError::NotACa)
    ));
    assert!(matches!(
        Ca::from_pem(TD, "", &root.key.serialize_pem()),
        Err(CaError::BadCaCertificate(_))
    ));
    assert!(matches!(
        Ca::from_pem(TD, &root.cert_pem, "garbage"),
        Err(CaError::BadCaKey(_))
    ));
    assert!(matches!(
        Ca::from_pem("Bad.Domain", &root.cert_pem, &root.key.serialize_pem()),
        Err(CaError::BadTrustDomain(_))
    ));
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos();
        TempDir(std::env::temp_dir().join(format!(
            "mesh-identity-{name}-{}-{nanos}",
            std::process::id()
        )))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn ca_store_round_trips_with_owner_only_files() {
    let dir = TempDir::new("store");
    let store = dir.0.join("ca");
    let ca = Ca::generate(TD).expect("root CA");
    ca.save(&store).expect("saved");
    assert_eq!(mode(&store), 0o700);
    assert_eq!(mode(&store.join("ca.key")), 0o600);
    assert_eq!(mode(&store.join("ca.crt")), 0o600);
    let leftovers: Vec<_> = fs::read_dir(&store)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "only ca.crt and ca.key: {leftovers:?}");

    let loaded = Ca::load(&store, TD).expect("loaded");
    assert_eq!(loaded.trust_bundle_pem(), ca.trust_bundle_pem());
    let (chain, key) = issue(&loaded, &server_id(), HOUR);
    let bundle = CertificateDer::from_pem_slice(ca.trust_bundle_pem().as_bytes()).expect("bundle");
    let leaf = CertificateDer::from_pem_slice(chain.as_bytes()).expect("leaf");
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).expect("X.509");
    let (_, root) = x509_parser::parse_x509_certificate(&bundle).expect("X.509");
    leaf.verify_signature(Some(root.public_key()))
        .expect("the loaded CA signs with the saved key");
    CertStore::new().insert(&chain, key).expect("usable");

    ca.save(&store).expect("saving again replaces the files");
    fs::set_permissions(store.join("ca.key"), fs::Permissions::from_mode(0o644)).expect("chmod");
    assert!(matches!(
        Ca::load(&store, TD),
        Err(CaError::KeyFileTooOpen { mode: 0o644, .. })
    ));
    assert!(matches!(
        Ca::load(&dir.0.join("missing"), TD),
        Err(CaError::Store { .. })
    ));
}

#[test]
fn cert_store_checks_before_it_replaces() {
    let ca = Ca::generate(TD).expect("root CA");
    let store = CertStore::new();
    let (chain, _) = issue(&ca, &server_id(), HOUR);
    let (_, wrong_key) = issue(&ca, &server_id(), HOUR);
    assert!(matches!(
        store.insert(&chain, wrong_key),
        Err(CertStoreError::BadKey(_))
    ));
    assert!(matches!(
        store.insert("", KeyPair::generate().map(|k| key_der(&k)).expect("key")),
        Err(CertStoreError::EmptyChain)
    ));
    let root = TestRoot::new();
    let nameless = KeyPair::generate().expect("key");
    let issuer = Issuer::from_params(&root.params, &root.key);
    let cert = leaf_params(None)
        .signed_by(&nameless, &issuer)
        .expect("leaf");
    assert!(matches!(
        store.insert(&cert.pem(), key_der(&nameless)),
        Err(CertStoreError::NoIdentity(Refusal::NoIdentity))
    ));

    let (chain, key) = issue(&ca, &server_id(), HOUR);
    store.insert(&chain, key).expect("stored");
    assert!(store.remove(&server_id()));
    assert!(!store.remove(&server_id()));
}
