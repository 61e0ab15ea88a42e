//! Access logs: one JSON line per request and per connection of the
//! Services whose TrafficPolicy asks for it (`accessLog.sampling`), written
//! by the caller's agent to `--access-log` (a file, or `-` for stdout).
//!
//! A line has the fields of a tap event ([`mesh_api::tap::TapEvent`]:
//! start, duration, method, authority, path, code, flags, bytes, upstream,
//! source and destination identity, route, trace id). The data path never
//! waits on the disk: lines go through a bounded queue to a writer task,
//! and when it is full a line is dropped and counted
//! (`mesh_agent_access_log_dropped_lines_total`).
use std::{path::PathBuf, sync::OnceLock};

use mesh_api::tap::TapEvent;
use prometheus_client::metrics::counter::Counter;
use tokio::{io::AsyncWriteExt, sync::mpsc};
use tracing::warn;

/// Lines queued for the writer, at most.
const QUEUE: usize = 16384;
/// How long the writer lets lines gather after the first.
const LINGER: std::time::Duration = std::time::Duration::from_millis(20);

#[derive(Default)]
pub struct AccessLog {
    tx: OnceLock<mpsc::Sender<Vec<u8>>>,
    pub written: Counter,
    pub dropped: Counter,
}

impl AccessLog {
    /// Whether a sink is configured: without one nothing is sampled.
    #[inline]
    pub fn enabled(&self) -> bool {
        self.tx.get().is_some()
    }

    /// Whether this request or connection, of a Service logging `share`
    /// (0..=1) of them, is logged.
    #[inline]
    pub fn sample(&self, share: f64) -> bool {
        self.enabled() && share > 0.0 && (share >= 1.0 || rand::random::<f64>() < share)
    }

    /// Queues one line; never waits.
    pub fn write(&self, event: &TapEvent) {
        let Some(tx) = self.tx.get() else { return };
        let mut line = serde_json::to_vec(event).unwrap_or_default();
        line.push(b'\n');
        let counter = match tx.try_send(line) {
            Ok(()) => &self.written,
            Err(_) => &self.dropped,
        };
        counter.inc();
    }

    /// Starts the writer to `path` (`-`: stdout). Call once, in the runtime.
    pub fn start(&self, path: PathBuf) -> std::io::Result<()> {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if path.as_os_str() == "-" {
            Box::new(tokio::io::stdout())
        } else {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            Box::new(tokio::fs::File::from_std(file))
        };
        if self.tx.set(tx).is_err() {
            return Err(std::io::Error::other("the access log is already started"));
        }
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(256 << 10);
            while let Some(line) = rx.recv().await {
                batch.extend_from_slice(&line);
                // Lines gather for a moment, then go in one write: one
                // wake-up and one write per batch, not per request.
                tokio::time::sleep(LINGER).await;
                while batch.len() < (1 << 20)
                    && let Ok(more) = rx.try_recv()
                {
                    batch.extend_from_slice(&more);
                }
                if let Err(e) = out.write_all(&batch).await {
                    warn!(path = %path.display(), error = %e, "cannot write the access log");
                }
                let _ = out.flush().await;
                batch.clear();
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_reach_the_file_and_nothing_is_sampled_without_a_sink() {
        let log = AccessLog::default();
        assert!(!log.sample(1.0), "no sink, no sampling");
        let dir = std::env::temp_dir().join(format!("mesh-access-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        log.start(path.clone()).unwrap();
        assert!(log.sample(1.0));
        assert!(!log.sample(0.0));
        let sampled = (0..10_000).filter(|_| log.sample(0.25)).count();
        assert!((2000..3000).contains(&sampled), "{sampled} of 10000 at 25%");
        for n in 0..3 {
            log.write(&TapEvent::Dropped { dropped: n });
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 3 {
                let first: serde_json::Value =
                    serde_json::from_str(text.lines().next().unwrap()).unwrap();
                assert_eq!(first["type"], "dropped");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{text:?}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(log.written.get(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
