//! Clients of the request/response servers: HTTP/1.1, h2c and gRPC.

use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use clap::Args;
use http::{Method, Request, Response, StatusCode, Uri, header::HOST};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, client::conn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpStream;
use tonic::transport::Endpoint;

use super::Report;
use crate::testapp::{
    pattern::Pattern,
    proto::{WhoamiRequest, test_app_client::TestAppClient},
    server::SERVED_BY_HEADER,
};

#[derive(Args, Debug)]
pub struct HttpArgs {
    /// `http://IP:PORT/PATH` of an http or h2c port.
    #[arg(long)]
    pub url: Uri,
    /// Speak HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    #[arg(long)]
    pub h2: bool,
    /// Requests to send one after another on one connection.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// POST this many bytes and check the echo, instead of a GET.
    #[arg(long, value_name = "N")]
    pub post_bytes: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct HttpReport {
    /// Status of the last response.
    pub status: u16,
    /// `x-served-by` of the first passing response.
    pub server: Option<String>,
    pub count: usize,
    pub ok: usize,
    /// Passing responses per server, which differ when the mesh balances requests.
    pub servers: BTreeMap<String, usize>,
    #[serde(skip)]
    first_error: Option<String>,
}

impl Report for HttpReport {
    fn failure(&self) -> Option<String> {
        failure(self.count, self.ok, self.first_error.as_deref())
    }
}

enum Sender {
    Http1(conn::http1::SendRequest<Full<Bytes>>),
    Http2(conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn send(&mut self, request: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        match self {
            Self::Http1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
            Self::Http2(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
        }
    }
}

/// Sends `count` requests on one connection; each passes with status 200, an
/// `x-served-by` header, and a body of `NAME\n` (GET) or the posted bytes (POST).
pub async fn http(args: HttpArgs) -> anyhow::Result<HttpReport> {
    ensure!(
        args.url.scheme_str() == Some("http"),
        "--url must start with http://"
    );
    let authority = args.url.authority().context("--url has no host")?.clone();
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let stream = TcpStream::connect(&addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let io = TokioIo::new(stream);
    let mut sender = if args.h2 {
        let (sender, connection) = conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .context("HTTP/2 handshake")?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                eprintln!("HTTP/2 connection: {err}");
            }
        });
        Sender::Http2(sender)
    } else {
        let (sender, connection) = conn::http1::handshake(io)
            .await
            .context("HTTP/1.1 handshake")?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                eprintln!("HTTP/1.1 connection: {err}");
            }
        });
        Sender::Http1(sender)
    };
    // HTTP/2 carries scheme and authority as pseudo-headers; HTTP/1.1 wants the
    // origin form plus a Host header.
    let target = if args.h2 {
        args.url.clone()
    } else {
        args.url
            .path_and_query()
            .map_or("/", |path| path.as_str())
            .parse()?
    };
    let payload = args.post_bytes.map(|len| {
        let mut payload = vec![0; len];
        Pattern::new(len as u64).fill(&mut payload);
        Bytes::from(payload)
    });

    let mut report = HttpReport {
        status: 0,
        server: None,
        count: args.count,
        ok: 0,
        servers: BTreeMap::new(),
        first_error: None,
    };
    for _ in 0..args.count {
        let mut request = Request::builder()
            .method(if payload.is_some() {
                Method::POST
            } else {
                Method::GET
            })
            .uri(target.clone());
        if !args.h2 {
            request = request.header(HOST, authority.as_str());
        }
        let request = request.body(Full::new(payload.clone().unwrap_or_default()))?;
        let response = sender.send(request).await.context("sending a request")?;
        let status = response.status();
        report.status = status.as_u16();
        let server = response
            .headers()
            .get(SERVED_BY_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading a response body")?
            .to_bytes();
        match check_response(status, server, &body, payload.as_ref()) {
            Ok(server) => {
                report.ok += 1;
                report.server.get_or_insert_with(|| server.clone());
                *report.servers.entry(server).or_default() += 1;
            }
            Err(err) => {
                report.first_error.get_or_insert(err.to_string());
            }
        }
    }
    Ok(report)
}

fn check_response(
    status: StatusCode,
    server: Option<String>,
    body: &Bytes,
    posted: Option<&Bytes>,
) -> anyhow::Result<String> {
    ensure!(status == StatusCode::OK, "status {status}");
    let Some(server) = server else {
        bail!("no {SERVED_BY_HEADER} header");
    };
    match posted {
        Some(posted) if body != posted => bail!(
            "posted {} bytes, the echo is {} bytes and differs",
            posted.len(),
            body.len()
        ),
        None if *body != format!("{server}\n") => {
            bail!("{SERVED_BY_HEADER} is {server:?} but the body is {body:?}")
        }
        _ => Ok(server),
    }
}

#[derive(Args, Debug)]
pub struct GrpcArgs {
    /// A grpc port.
    #[arg(long)]
    pub addr: SocketAddr,
    /// Whoami calls to make over one channel.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
}

#[derive(Debug, Serialize)]
pub struct GrpcReport {
    /// Name in the first successful reply.
    pub server: Option<String>,
    pub count: usize,
    pub ok: usize,
    pub servers: BTreeMap<String, usize>,
    #[serde(skip)]
    first_error: Option<String>,
}

impl Report for GrpcReport {
    fn failure(&self) -> Option<String> {
        failure(self.count, self.ok, self.first_error.as_deref())
    }
}

/// Calls `Whoami` `count` times over one channel.
pub async fn grpc(args: GrpcArgs) -> anyhow::Result<GrpcReport> {
    let channel = Endpoint::from_shared(format!("http://{}", args.addr))?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    let mut client = TestAppClient::new(channel);
    let mut report = GrpcReport {
        server: None,
        count: args.count,
        ok: 0,
        servers: BTreeMap::new(),
        first_error: None,
    };
    for _ in 0..args.count {
        match client.whoami(WhoamiRequest {}).await {
            Ok(reply) => {
                let server = reply.into_inner().name;
                report.ok += 1;
                report.server.get_or_insert_with(|| server.clone());
                *report.servers.entry(server).or_default() += 1;
            }
            Err(status) => {
                report.first_error.get_or_insert(status.to_string());
            }
        }
    }
    Ok(report)
}

fn failure(count: usize, ok: usize, first_error: Option<&str>) -> Option<String> {
    (ok < count).then(|| {
        format!(
            "{} of {count} requests failed, the first with: {}",
            count - ok,
            first_error.unwrap_or("unknown error")
        )
    })
}
