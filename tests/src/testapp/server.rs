//! `mesh-testapp serve`: the servers a test pod runs.

mod http_echo;

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use http::{HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
    signal::unix::{SignalKind, signal},
};

use self::http_echo::HttpEcho;
use super::proto::{
    EchoReply, EchoRequest, WhoamiReply, WhoamiRequest,
    test_app_server::{TestApp, TestAppServer},
};

/// Response header naming the server that answered an HTTP request.
pub const SERVED_BY_HEADER: &str = "x-served-by";

/// Buffer of one echo connection: large enough for bulk transfers, small enough
/// for a thousand connections at once.
const ECHO_BUF: usize = 64 * 1024;
const SINK_BUF: usize = 256 * 1024;
/// Tests open 1,000+ connections at once; a short backlog would drop their SYNs.
const BACKLOG: u32 = 4096;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Name sent in greetings, `x-served-by` headers and gRPC replies.
    #[arg(long)]
    pub name: String,
    /// TCP echo: greets with `NAME\n`, then echoes until the client half-closes.
    #[arg(long, value_name = "PORT")]
    pub tcp_echo: Option<u16>,
    /// Sink: greets with `NAME\n`, discards until EOF, then replies with the byte count.
    #[arg(long, value_name = "PORT")]
    pub sink: Option<u16>,
    /// HTTP/1.1: GET returns `NAME\n`, POST echoes the body.
    #[arg(long, value_name = "PORT")]
    pub http: Option<u16>,
    /// HTTP/2 with prior knowledge (h2c), same answers as --http.
    #[arg(long, value_name = "PORT")]
    pub h2c: Option<u16>,
    /// gRPC service `mesh.testapp.TestApp`.
    #[arg(long, value_name = "PORT")]
    pub grpc: Option<u16>,
    /// HTTP/1.1 and h2c on one port, answering with a JSON description of the
    /// request; `/_/status/N`, `/_/delay/MS`, `/_/upload`, `/_/download/N`,
    /// `/_/trailers`, `/_/ws` (WebSocket, echoed).
    #[arg(long, value_name = "PORT")]
    pub http_echo: Option<u16>,
    /// Append one JSON line per finished connection to this file.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
enum Proto {
    Tcp,
    Sink,
    Http,
    H2c,
    Grpc,
    #[serde(rename = "http_echo")]
    HttpEcho,
}

/// The ports actually bound (a requested port 0 becomes a free one).
#[derive(Default, Serialize)]
struct Ports {
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp_echo: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sink: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    h2c: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_echo: Option<u16>,
}

#[derive(Serialize)]
struct Ready<'a> {
    ready: bool,
    name: &'a str,
    ports: Ports,
}

#[derive(Serialize)]
struct ConnRecord {
    proto: Proto,
    peer: SocketAddr,
    local: SocketAddr,
    bytes_in: u64,
    bytes_out: u64,
}

/// Binds every requested port, prints the ready line, and serves until SIGTERM or SIGINT.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let served_by = HeaderValue::from_str(&args.name)
        .context("--name must be usable as an HTTP header value")?;
    let log = match &args.log {
        Some(path) => Some(Mutex::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening the log {}", path.display()))?,
        )),
        None => None,
    };
    let server = Arc::new(Server {
        greeting: Bytes::from(format!("{}\n", args.name)),
        grpc: TestAppServer::new(Grpc {
            name: args.name.clone(),
        }),
        http_echo: HttpEcho::new(args.name.clone(), served_by.clone()),
        served_by,
        log,
    });

    let mut ports = Ports::default();
    let wanted = [
        (Proto::Tcp, args.tcp_echo, &mut ports.tcp_echo),
        (Proto::Sink, args.sink, &mut ports.sink),
        (Proto::Http, args.http, &mut ports.http),
        (Proto::H2c, args.h2c, &mut ports.h2c),
        (Proto::Grpc, args.grpc, &mut ports.grpc),
        (Proto::HttpEcho, args.http_echo, &mut ports.http_echo),
    ];
    for (proto, port, bound) in wanted {
        let Some(port) = port else { continue };
        let listener =
            listen(port).with_context(|| format!("listening on the {proto:?} port {port}"))?;
        *bound = Some(listener.local_addr()?.port());
        tokio::spawn(accept_loop(listener, proto, server.clone()));
    }

    // Handlers first: whoever reads the ready line may signal at once.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut stdout = io::stdout().lock();
    serde_json::to_writer(
        &mut stdout,
        &Ready {
            ready: true,
            name: &args.name,
            ports,
        },
    )?;
    writeln!(stdout)?;
    stdout.flush()?;
    drop(stdout);

    tokio::select! {
        _ = terminate.recv() => Ok(()),
        _ = interrupt.recv() => Ok(()),
    }
}

fn listen(port: u16) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([0, 0, 0, 0], port)))?;
    socket.listen(BACKLOG)
}

async fn accept_loop(listener: TcpListener, proto: Proto, server: Arc<Server>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(server.clone().handle(stream, peer, proto));
            }
            // Running out of descriptors or memory passes once connections close.
            Err(err) => {
                eprintln!("accepting on the {proto:?} port: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

struct Server {
    greeting: Bytes,
    served_by: HeaderValue,
    grpc: TestAppServer<Grpc>,
    http_echo: HttpEcho,
    log: Option<Mutex<File>>,
}

impl Server {
    async fn handle(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, proto: Proto) {
        let traffic = Arc::new(Traffic::default());
        let local = stream.local_addr();
        if let Err(err) = self.serve_conn(stream, proto, &traffic).await {
            eprintln!("{proto:?} connection from {peer}: {err:#}");
        }
        let record = local.map_err(anyhow::Error::from).and_then(|local| {
            self.record(&ConnRecord {
                proto,
                peer,
                local,
                bytes_in: traffic.bytes_in.load(Ordering::Relaxed),
                bytes_out: traffic.bytes_out.load(Ordering::Relaxed),
            })
        });
        if let Err(err) = record {
            eprintln!("logging the {proto:?} connection from {peer}: {err:#}");
        }
    }

    async fn serve_conn(
        self: &Arc<Self>,
        mut stream: TcpStream,
        proto: Proto,
        traffic: &Arc<Traffic>,
    ) -> anyhow::Result<()> {
        stream.set_nodelay(true)?;
        let server = self.clone();
        let http = service_fn(move |request| server.clone().respond(request));
        match proto {
            Proto::Tcp => {
                let (reader, writer) = stream.split();
                self.echo(
                    Counted::new(reader, traffic.clone()),
                    Counted::new(writer, traffic.clone()),
                )
                .await?;
            }
            Proto::Sink => self.sink(Counted::new(stream, traffic.clone())).await?,
            Proto::Http => {
                let io = TokioIo::new(Counted::new(stream, traffic.clone()));
                conn::http1::Builder::new()
                    .serve_connection(io, http)
                    .await?;
            }
            Proto::H2c => {
                let io = TokioIo::new(Counted::new(stream, traffic.clone()));
                conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, http)
                    .await?;
            }
            Proto::Grpc => {
                let io = TokioIo::new(Counted::new(stream, traffic.clone()));
                conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, TowerToHyperService::new(self.grpc.clone()))
                    .await?;
            }
            Proto::HttpEcho => {
                let io = TokioIo::new(Counted::new(stream, traffic.clone()));
                let server = self.clone();
                let echo = service_fn(move |request| {
                    let server = server.clone();
                    async move { server.http_echo.respond(request).await }
                });
                auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(io, echo)
                    .await
                    .map_err(|err| anyhow::anyhow!(err))?;
            }
        }
        Ok(())
    }

    /// Greets, then echoes until the client half-closes. `copy_buf` writes each
    /// chunk as soon as it is read, so 100 MB flow both ways at once.
    async fn echo(
        &self,
        reader: impl AsyncRead + Unpin,
        mut writer: impl AsyncWrite + Unpin,
    ) -> io::Result<()> {
        writer.write_all(&self.greeting).await?;
        let mut reader = BufReader::with_capacity(ECHO_BUF, reader);
        tokio::io::copy_buf(&mut reader, &mut writer).await?;
        writer.shutdown().await
    }

    async fn sink(&self, mut stream: impl AsyncRead + AsyncWrite + Unpin) -> io::Result<()> {
        stream.write_all(&self.greeting).await?;
        let mut buf = vec![0; SINK_BUF];
        let mut received = 0u64;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            received += n as u64;
        }
        stream.write_all(format!("{received}\n").as_bytes()).await?;
        stream.shutdown().await
    }

    async fn respond(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> hyper::Result<Response<Full<Bytes>>> {
        let body = if request.method() == Method::POST {
            request.into_body().collect().await?.to_bytes()
        } else {
            self.greeting.clone()
        };
        let mut response = Response::new(Full::new(body));
        response
            .headers_mut()
            .insert(SERVED_BY_HEADER, self.served_by.clone());
        Ok(response)
    }

    fn record(&self, record: &ConnRecord) -> anyhow::Result<()> {
        let Some(log) = &self.log else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        // One write per line, so readers never see half a record.
        log.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write_all(&line)?;
        Ok(())
    }
}

struct Grpc {
    name: String,
}

#[tonic::async_trait]
impl TestApp for Grpc {
    async fn whoami(
        &self,
        _request: tonic::Request<WhoamiRequest>,
    ) -> Result<tonic::Response<WhoamiReply>, tonic::Status> {
        Ok(tonic::Response::new(WhoamiReply {
            name: self.name.clone(),
        }))
    }

    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        Ok(tonic::Response::new(EchoReply {
            payload: request.into_inner().payload,
            name: self.name.clone(),
        }))
    }
}

/// Bytes moved on one connection, shared by the halves that move them.
#[derive(Default)]
struct Traffic {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// Counts the bytes read from and written to `inner` into a [`Traffic`].
struct Counted<T> {
    inner: T,
    traffic: Arc<Traffic>,
}

impl<T> Counted<T> {
    fn new(inner: T, traffic: Arc<Traffic>) -> Self {
        Self { inner, traffic }
    }

    fn count_written(&self, poll: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(written)) = poll {
            self.traffic
                .bytes_out
                .fetch_add(*written as u64, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        this.traffic
            .bytes_in
            .fetch_add(read as u64, Ordering::Relaxed);
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.count_written(&poll);
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.count_written(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
