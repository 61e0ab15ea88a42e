//! Clients of the raw TCP servers: echo checks, concurrency, latency, throughput.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    num::NonZeroUsize,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, ensure};
use clap::Args;
use futures::future::join_all;
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use super::{Report, read_greeting};
use crate::testapp::pattern::Pattern;

/// Reads of the echo are at least this large, however small the writes.
const MIN_READ: usize = 16 * 1024;
const DEFAULT_CHUNK: NonZeroUsize = NonZeroUsize::new(64 * 1024).unwrap();
const BULK_BUF: usize = 1024 * 1024;
/// Error strings kept in a concurrent report; the rest are only counted.
const MAX_ERRORS: usize = 5;

#[derive(Args, Debug)]
pub struct TcpArgs {
    /// A tcp-echo port.
    #[arg(long)]
    pub addr: SocketAddr,
    /// Bytes to send and expect back.
    #[arg(long, default_value_t = 1024)]
    pub bytes: u64,
    /// Size of each write.
    #[arg(long, default_value_t = DEFAULT_CHUNK)]
    pub chunk: NonZeroUsize,
}

#[derive(Debug, Serialize)]
pub struct TcpReport {
    pub server: String,
    pub sent: u64,
    pub received: u64,
    pub ok: bool,
    pub secs: f64,
    pub local: SocketAddr,
    #[serde(skip)]
    mismatch: Option<u64>,
}

impl Report for TcpReport {
    fn failure(&self) -> Option<String> {
        (!self.ok).then(|| echo_failure(self.sent, self.received, self.mismatch))
    }
}

/// Sends a pattern through a tcp-echo port, half-closes, and checks the echo byte for byte.
pub async fn tcp(args: TcpArgs) -> anyhow::Result<TcpReport> {
    let start = Instant::now();
    let mut conn = Conn::open(args.addr).await?;
    let echoed = conn.echo(args.bytes, args.chunk.get(), 0).await?;
    Ok(TcpReport {
        ok: echoed.is_exact(args.bytes),
        server: conn.server,
        sent: args.bytes,
        received: echoed.received,
        secs: start.elapsed().as_secs_f64(),
        local: conn.local,
        mismatch: echoed.mismatch,
    })
}

#[derive(Args, Debug)]
pub struct ConcurrentArgs {
    /// A tcp-echo port.
    #[arg(long)]
    pub addr: SocketAddr,
    /// Connections held open at once.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Bytes echoed on each connection.
    #[arg(long, default_value_t = 1000)]
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ConcurrentReport {
    pub ok: usize,
    pub failed: usize,
    /// Passing connections per server that greeted them.
    pub servers: BTreeMap<String, usize>,
    pub errors: Vec<String>,
}

impl Report for ConcurrentReport {
    fn failure(&self) -> Option<String> {
        (self.failed > 0).then(|| {
            format!(
                "{} of {} connections failed",
                self.failed,
                self.ok + self.failed
            )
        })
    }
}

/// Opens and greets all connections first, so that the path holds every one of
/// them at once, then runs an echo check on all of them concurrently.
pub async fn concurrent(args: ConcurrentArgs) -> anyhow::Result<ConcurrentReport> {
    let bytes = args.bytes;
    let opened = join_all((0..args.conns).map(|_| Conn::open(args.addr))).await;
    let checks = opened.into_iter().enumerate().map(|(index, conn)| {
        tokio::spawn(async move {
            let mut conn = conn?;
            let echoed = conn.echo(bytes, DEFAULT_CHUNK.get(), index).await?;
            if echoed.is_exact(bytes) {
                Ok(conn.server)
            } else {
                Err(anyhow!(echo_failure(
                    bytes,
                    echoed.received,
                    echoed.mismatch
                )))
            }
        })
    });
    let mut report = ConcurrentReport {
        ok: 0,
        failed: 0,
        servers: BTreeMap::new(),
        errors: Vec::new(),
    };
    for (index, result) in join_all(checks).await.into_iter().enumerate() {
        match result.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(server) => {
                report.ok += 1;
                *report.servers.entry(server).or_default() += 1;
            }
            Err(err) => {
                report.failed += 1;
                if report.errors.len() < MAX_ERRORS {
                    report.errors.push(format!("connection {index}: {err:#}"));
                }
            }
        }
    }
    Ok(report)
}

#[derive(Args, Debug)]
pub struct PingpongArgs {
    /// A tcp-echo port.
    #[arg(long)]
    pub addr: SocketAddr,
    /// Timed round trips.
    #[arg(long, default_value_t = NonZeroUsize::new(10_000).unwrap())]
    pub count: NonZeroUsize,
    /// Untimed round trips first, to warm caches and connection state.
    #[arg(long, default_value_t = 1000)]
    pub warmup: usize,
}

#[derive(Debug, Serialize)]
pub struct PingpongReport {
    pub count: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub max_us: f64,
}

impl Report for PingpongReport {
    fn failure(&self) -> Option<String> {
        None
    }
}

/// Measures one-byte round trips through a tcp-echo port.
pub async fn pingpong(args: PingpongArgs) -> anyhow::Result<PingpongReport> {
    let count = args.count.get();
    let mut conn = Conn::open(args.addr).await?;
    let mut samples = Vec::with_capacity(count);
    let mut echoed = [0u8; 1];
    for round in 0..args.warmup + count {
        let sent = [round as u8];
        let start = Instant::now();
        conn.writer.write_all(&sent).await.context("sending")?;
        conn.reader
            .read_exact(&mut echoed)
            .await
            .context("reading the echo")?;
        let rtt = start.elapsed();
        ensure!(
            echoed == sent,
            "round {round}: sent {sent:?}, got {echoed:?}"
        );
        if round >= args.warmup {
            samples.push(rtt);
        }
    }
    samples.sort_unstable();
    let total: Duration = samples.iter().sum();
    Ok(PingpongReport {
        count,
        p50_us: percentile_us(&samples, 0.50),
        p90_us: percentile_us(&samples, 0.90),
        p99_us: percentile_us(&samples, 0.99),
        mean_us: micros(total) / count as f64,
        max_us: micros(samples[count - 1]),
    })
}

/// Nearest-rank percentile of non-empty sorted samples.
fn percentile_us(sorted: &[Duration], quantile: f64) -> f64 {
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    micros(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

#[derive(Args, Debug)]
pub struct BulkArgs {
    /// A sink port.
    #[arg(long)]
    pub addr: SocketAddr,
    /// Bytes to send.
    #[arg(long)]
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct BulkReport {
    pub bytes: u64,
    /// From the first byte sent to the sink's count arriving.
    pub secs: f64,
    pub gbit_per_s: f64,
    pub server: String,
}

impl Report for BulkReport {
    fn failure(&self) -> Option<String> {
        None
    }
}

/// Sends bytes to a sink port as fast as possible and checks the count it replies.
pub async fn bulk(args: BulkArgs) -> anyhow::Result<BulkReport> {
    let mut conn = Conn::open(args.addr).await?;
    let mut buf = vec![0; BULK_BUF];
    Pattern::new(0).fill(&mut buf);
    let start = Instant::now();
    let mut left = args.bytes;
    while left > 0 {
        let n = BULK_BUF.min(usize::try_from(left).unwrap_or(usize::MAX));
        conn.writer.write_all(&buf[..n]).await.context("sending")?;
        left -= n as u64;
    }
    conn.writer.shutdown().await.context("half-closing")?;
    let mut line = String::new();
    conn.reader
        .read_line(&mut line)
        .await
        .context("reading the sink's count")?;
    let secs = start.elapsed().as_secs_f64();
    let counted: u64 = line
        .trim_end()
        .parse()
        .with_context(|| format!("the sink replied {line:?}, not a byte count"))?;
    ensure!(
        counted == args.bytes,
        "the sink counted {counted} bytes, {} were sent",
        args.bytes
    );
    Ok(BulkReport {
        bytes: args.bytes,
        secs,
        gbit_per_s: args.bytes as f64 * 8.0 / secs / 1e9,
        server: conn.server,
    })
}

fn echo_failure(sent: u64, received: u64, mismatch: Option<u64>) -> String {
    match mismatch {
        Some(at) => format!("sent {sent} bytes, the echo differs from byte {at} on"),
        None => format!("sent {sent} bytes, {received} came back"),
    }
}

/// A connection to a stream server whose greeting has been read.
struct Conn {
    server: String,
    local: SocketAddr,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

struct Echoed {
    received: u64,
    /// Offset of the first byte that differs from what was sent.
    mismatch: Option<u64>,
}

impl Echoed {
    fn is_exact(&self, sent: u64) -> bool {
        self.mismatch.is_none() && self.received == sent
    }
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        let (reader, writer) = stream.into_split();
        let mut reader = BufReader::new(reader);
        let server = read_greeting(&mut reader).await?;
        Ok(Self {
            server,
            local,
            reader,
            writer,
        })
    }

    /// Writes `bytes` of a pattern while reading the echo, half-closes, and
    /// checks the echo up to EOF without keeping either side in memory.
    async fn echo(&mut self, bytes: u64, chunk: usize, index: usize) -> anyhow::Result<Echoed> {
        // Distinct per connection, so a mesh that mixes up streams fails the check.
        let seed = u64::from(self.local.port()) << 32 | index as u64;
        let chunk = chunk
            .min(usize::try_from(bytes).unwrap_or(usize::MAX))
            .max(1);
        let Self { reader, writer, .. } = self;
        let send = async {
            let mut pattern = Pattern::new(seed);
            let mut buf = vec![0; chunk];
            let mut left = bytes;
            while left > 0 {
                let n = chunk.min(usize::try_from(left).unwrap_or(usize::MAX));
                pattern.fill(&mut buf[..n]);
                writer.write_all(&buf[..n]).await.context("sending")?;
                left -= n as u64;
            }
            writer.shutdown().await.context("half-closing")
        };
        let check = async {
            let mut pattern = Pattern::new(seed);
            let mut buf = vec![0; chunk.max(MIN_READ)];
            let mut expected = vec![0; buf.len()];
            let mut echoed = Echoed {
                received: 0,
                mismatch: None,
            };
            loop {
                let n = reader.read(&mut buf).await.context("reading the echo")?;
                if n == 0 {
                    return anyhow::Ok(echoed);
                }
                if echoed.mismatch.is_none() {
                    // Anything past what was sent is a mismatch too.
                    let due = usize::try_from(bytes - echoed.received.min(bytes))
                        .map_or(n, |due| due.min(n));
                    pattern.fill(&mut expected[..due]);
                    let at = if buf[..due] == expected[..due] {
                        (due < n).then_some(due)
                    } else {
                        buf.iter()
                            .zip(&expected[..due])
                            .position(|(got, want)| got != want)
                    };
                    echoed.mismatch = at.map(|at| echoed.received + at as u64);
                }
                echoed.received += n as u64;
            }
        };
        let ((), echoed) = tokio::try_join!(send, check)?;
        Ok(echoed)
    }
}
