//! The tunnel between agents over real sockets on loopback: mutual TLS with
//! SPIFFE identities, HTTP/2 CONNECT streams, pooling and refusals.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use mesh_agent::proxy::http::upstream::Upstreams;
use mesh_agent::{
    proxy::{
        inbound::Inbound,
        tunnel::{Credentials, Error, PoolKey, TunnelClient},
    },
    state::{Context, State, StateRx},
    telemetry::{HandshakeLabels, Metrics, TunnelSide},
};
use mesh_api::{
    identity::{Ca, CertStore, SpiffeId, generate_key_and_csr},
    pb,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::watch,
};

const TD: &str = "cluster.local";

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).expect("valid identity")
}

fn store_with(ca: &Ca, ids: &[&SpiffeId]) -> CertStore {
    let store = CertStore::new();
    for id in ids {
        let (key, csr) = generate_key_and_csr(id).expect("csr");
        let issued = ca
            .sign_csr(csr.as_bytes(), id, Duration::from_secs(3600))
            .expect("sign");
        store.insert(&issued.cert_chain_pem, key).expect("insert");
    }
    store
}

fn creds(store: CertStore, bundle: &str) -> Credentials {
    let (_tx, bundle) = watch::channel(Some(Arc::from(bundle)));
    Credentials {
        store,
        bundle,
        trust_domain: TD.into(),
        revoked: mesh_agent::revocation::none(),
    }
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => panic!("IPv4 expected"),
    }
}

/// An echo server standing in for the destination workload.
async fn echo() -> SocketAddrV4 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = v4(l.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

struct Peer {
    addr: SocketAddrV4,
    metrics: Arc<Metrics>,
}

async fn inbound(store: CertStore, bundle: &str, local: SocketAddrV4) -> Peer {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = v4(l.local_addr().unwrap());
    let metrics = Arc::new(Metrics::default());
    let server = Arc::new(Inbound {
        creds: creds(store, bundle),
        metrics: metrics.clone(),
        state: local_state(local),
        connect_timeout: Duration::from_secs(2),
        max_connections: 1024,
        upstreams: Arc::new(Upstreams::new(Duration::from_secs(2))),
        drain: Default::default(),
    });
    tokio::spawn(server.run(l));
    Peer { addr, metrics }
}

/// A state in which `local` is the address of a Workload of this node.
fn local_state(local: SocketAddrV4) -> StateRx {
    let workload = pb::Resource {
        key: "Workload/default/echo".into(),
        version: "1".into(),
        body: Some(pb::resource::Body::Workload(pb::Workload {
            name: "echo".into(),
            namespace: "default".into(),
            service_account: "echo".into(),
            node: "local".into(),
            ip: local.ip().to_string(),
            ..pb::Workload::default()
        })),
    };
    let ctx = Context {
        node: "local".into(),
        agent_ip: Ipv4Addr::new(198, 19, 1, 1),
        trust_domain: TD.into(),
        node_addresses: Default::default(),
        registry: Default::default(),
    };
    let state = State::build(
        "1".into(),
        [(workload.key.clone(), workload)].into_iter().collect(),
        &ctx,
    )
    .expect("state");
    // A receiver keeps the last value after its sender is gone.
    watch::channel(Arc::new(state)).1
}

fn handshakes(m: &Metrics, direction: TunnelSide, result: &'static str) -> u64 {
    m.tunnel_handshakes
        .get_or_create(&HandshakeLabels { direction, result })
        .get()
}

#[tokio::test]
async fn streams_share_one_handshake_and_carry_bytes_exactly() {
    let ca = Ca::generate(TD).unwrap();
    let bundle = ca.trust_bundle_pem();
    let (client_id, server_id) = (id("default", "frontend"), id("default", "echo"));
    let target = echo().await;
    let peer = inbound(store_with(&ca, &[&server_id]), &bundle, target).await;
    let metrics = Arc::new(Metrics::default());
    let client = Arc::new(TunnelClient::new(
        creds(store_with(&ca, &[&client_id]), &bundle),
        metrics.clone(),
        Duration::from_secs(2),
    ));
    let key = PoolKey {
        src: client_id,
        peer: peer.addr,
        dst: server_id,
    };
    let mut tasks = Vec::new();
    for i in 0..50u32 {
        let (client, key) = (client.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = client.connect(&key, target).await.expect("stream");
            let payload: Vec<u8> = (0..100_000u32)
                .map(|b| (b.wrapping_mul(i + 7) % 251) as u8)
                .collect();
            s.write_all(&payload).await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, payload, "stream {i} echoed exactly, after half-close");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        handshakes(&metrics, TunnelSide::Outbound, "ok"),
        1,
        "one pooled connection"
    );
    assert_eq!(handshakes(&peer.metrics, TunnelSide::Inbound, "ok"), 1);
}

#[tokio::test]
async fn a_server_with_the_wrong_identity_is_refused() {
    let ca = Ca::generate(TD).unwrap();
    let bundle = ca.trust_bundle_pem();
    let client_id = id("default", "frontend");
    let target = echo().await;
    // The peer only holds "other"; the client expects "echo".
    let peer = inbound(store_with(&ca, &[&id("default", "other")]), &bundle, target).await;
    let metrics = Arc::new(Metrics::default());
    let client = TunnelClient::new(
        creds(store_with(&ca, &[&client_id]), &bundle),
        metrics.clone(),
        Duration::from_secs(2),
    );
    let key = PoolKey {
        src: client_id,
        peer: peer.addr,
        dst: id("default", "echo"),
    };
    match client
        .connect(&key, target)
        .await
        .as_ref()
        .map_err(Error::cause)
    {
        Err(Error::Handshake { .. }) => {}
        Err(e) => panic!("expected a refused handshake, got {e}"),
        Ok(_) => panic!("a server without the expected identity must be refused"),
    }
    // The server has no certificate for the requested SNI, so the handshake
    // fails before any identity is shown.
    assert_eq!(handshakes(&metrics, TunnelSide::Outbound, "ok"), 0);
}

#[tokio::test]
async fn a_client_from_another_ca_is_refused_and_counted() {
    let ca = Ca::generate(TD).unwrap();
    let rogue = Ca::generate(TD).unwrap();
    let server_id = id("default", "echo");
    let target = echo().await;
    let peer = inbound(
        store_with(&ca, &[&server_id]),
        &ca.trust_bundle_pem(),
        target,
    )
    .await;
    let client_id = id("default", "frontend");
    // The rogue client trusts the real CA (so it would accept the server) but
    // holds a certificate from its own CA.
    let client = TunnelClient::new(
        creds(store_with(&rogue, &[&client_id]), &ca.trust_bundle_pem()),
        Arc::new(Metrics::default()),
        Duration::from_secs(2),
    );
    let key = PoolKey {
        src: client_id,
        peer: peer.addr,
        dst: server_id,
    };
    assert!(client.connect(&key, target).await.is_err());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while handshakes(&peer.metrics, TunnelSide::Inbound, "unknown_ca") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refusal counted with its reason"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn connect_to_a_non_local_target_is_forbidden() {
    let ca = Ca::generate(TD).unwrap();
    let bundle = ca.trust_bundle_pem();
    let (client_id, server_id) = (id("default", "frontend"), id("default", "echo"));
    let target = echo().await;
    let peer = inbound(store_with(&ca, &[&server_id]), &bundle, target).await;
    let client = TunnelClient::new(
        creds(store_with(&ca, &[&client_id]), &bundle),
        Arc::new(Metrics::default()),
        Duration::from_secs(2),
    );
    let key = PoolKey {
        src: client_id,
        peer: peer.addr,
        dst: server_id,
    };
    // Not the address of a Workload of this node (the echo server's is).
    let elsewhere = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 9);
    match client.connect(&key, elsewhere).await {
        Err(Error::Refused { status, .. }) => assert_eq!(status, http::StatusCode::FORBIDDEN),
        Err(e) => panic!("expected 403, got {e}"),
        Ok(_) => panic!("a CONNECT to a non-local target must be refused"),
    }
}
