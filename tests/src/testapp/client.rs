//! The client modes of `mesh-testapp`. Each returns a report that the binary
//! prints as one JSON object; tests read it from the pod's stdout.

mod rpc;
mod stream;

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

pub use rpc::{GrpcArgs, GrpcReport, HttpArgs, HttpReport, grpc, http};
pub use stream::{
    BulkArgs, BulkReport, ConcurrentArgs, ConcurrentReport, PingpongArgs, PingpongReport, TcpArgs,
    TcpReport, bulk, concurrent, pingpong, tcp,
};

/// What a client mode prints; printed even when the run failed its checks.
pub trait Report: Serialize {
    /// Why the run failed although it completed, if it did.
    fn failure(&self) -> Option<String>;
}

/// Reads the `NAME\n` line that the stream servers send before anything else.
async fn read_greeting(reader: &mut (impl AsyncBufRead + Unpin)) -> anyhow::Result<String> {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .await
        .context("reading the greeting")?;
    match line.strip_suffix('\n') {
        Some(name) => Ok(name.to_owned()),
        None => bail!("the connection closed before a greeting line (got {line:?})"),
    }
}
