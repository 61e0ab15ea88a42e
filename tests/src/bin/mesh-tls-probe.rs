//! `mesh-tls-probe`: a deliberately misbehaving peer for the tunnel's
//! end-to-end tests. `connect` offers a given certificate to an agent's
//! :15008; `serve` listens with a given certificate, standing in for a peer
//! agent. Either prints one JSON line with the outcome.
use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_api::identity::{self, CertStore, SpiffeId};
use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Material {
    /// Certificate chain (PEM) to present.
    #[arg(long)]
    cert: PathBuf,
    /// Its private key (PKCS#8 PEM).
    #[arg(long)]
    key: PathBuf,
    /// Trust bundle (PEM) to verify the peer against.
    #[arg(long)]
    bundle: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Handshake with an agent's tunnel listener, expecting `expect` as the server.
    Connect {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        expect: SpiffeId,
        #[command(flatten)]
        material: Material,
    },
    /// Accept handshakes (and nothing more) until killed; prints a ready line.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[command(flatten)]
        material: Material,
    },
}

fn load(m: &Material) -> anyhow::Result<(CertStore, SpiffeId, String)> {
    let chain = std::fs::read_to_string(&m.cert).context("reading --cert")?;
    let key = PrivateKeyDer::from_pem_file(&m.key).context("reading --key")?;
    let bundle = std::fs::read_to_string(&m.bundle).context("reading --bundle")?;
    let store = CertStore::new();
    let id = store.insert(&chain, key).context("certificate and key")?;
    Ok((store, id, bundle))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Connect {
            addr,
            expect,
            material,
        } => {
            let (store, id, bundle) = load(&material)?;
            let config = identity::client_config(&store, &id, &bundle, expect.clone())?;
            let tcp = TcpStream::connect(addr).await.context("connecting")?;
            let outcome = tokio_rustls::TlsConnector::from(config)
                .connect(identity::sni_for(&expect), tcp)
                .await;
            // TLS 1.3: the server judges our certificate after the client
            // finishes, so a refusal shows on the first read.
            let outcome = match outcome {
                Ok(mut tls) => {
                    use tokio::io::AsyncReadExt;
                    let mut buf = [0u8; 1];
                    match tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        tls.read(&mut buf),
                    )
                    .await
                    {
                        Ok(Err(e)) => Err(e),
                        _ => Ok(()),
                    }
                }
                Err(e) => Err(e),
            };
            let report = match &outcome {
                Ok(()) => serde_json::json!({ "ok": true }),
                Err(e) => serde_json::json!({ "ok": false, "error": e.to_string() }),
            };
            println!("{report}");
        }
        Command::Serve { listen, material } => {
            let (store, id, bundle) = load(&material)?;
            let config = identity::server_config(&store, &id, &bundle)?;
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&config));
            let listener = TcpListener::bind(listen).await.context("binding")?;
            println!(
                "{}",
                serde_json::json!({ "ready": true, "identity": id.to_string() })
            );
            loop {
                let (tcp, _) = listener.accept().await?;
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        // Hold the connection open until the peer leaves.
                        let (mut r, _w) = tokio::io::split(tls);
                        let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
                    }
                });
            }
        }
    }
    Ok(())
}
