//! Graceful stop: the listeners stop accepting (the kernel then refuses
//! pods' redirected connects: fail closed), the connections already open
//! are counted down, and the agent waits for them up to a deadline.
use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;

/// Shared by the listeners, their connections and the shutdown.
#[derive(Clone, Debug)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    draining: watch::Sender<bool>,
    open: watch::Sender<usize>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                draining: watch::Sender::new(false),
                open: watch::Sender::new(0),
            }),
        }
    }
}

/// Held by one open connection; dropping it counts the connection closed.
#[must_use]
#[derive(Debug)]
pub struct Open {
    drain: Drain,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.drain.inner.open.send_modify(|n| *n -= 1);
    }
}

impl Drain {
    /// Counts a connection open until the returned guard is dropped.
    pub fn open(&self) -> Open {
        self.inner.open.send_modify(|n| *n += 1);
        Open {
            drain: self.clone(),
        }
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        *self.inner.open.borrow()
    }

    pub fn is_draining(&self) -> bool {
        *self.inner.draining.borrow()
    }

    /// Starts draining; the connections open at this moment.
    pub fn start(&self) -> usize {
        self.inner.draining.send_replace(true);
        self.open_connections()
    }

    /// Resolves once draining has started.
    pub async fn started(&self) {
        let mut rx = self.inner.draining.subscribe();
        // The sender lives in `self`: the wait ends only when draining starts.
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Runs `accept` (a listener's accept loop) until draining starts, then
    /// drops it, and with it the listener: new connects are refused.
    pub async fn until_draining(&self, accept: impl Future<Output = ()>) {
        tokio::select! {
            () = accept => {}
            () = self.started() => {}
        }
    }

    /// Waits until no connection is open or `deadline` passes; the
    /// connections still open then.
    pub async fn wait_closed(&self, deadline: Instant) -> usize {
        let mut rx = self.inner.open.subscribe();
        let left = tokio::time::timeout_at(deadline.into(), rx.wait_for(|n| *n == 0)).await;
        match left {
            Ok(_) => 0,
            Err(_) => self.open_connections(),
        }
    }
}

/// Drives `$conn` (a hyper server connection, by value) to its end; once
/// `$drain` starts, asks it to finish gracefully: an idle HTTP/1 keep-alive
/// connection closes at once and a busy one after its response; HTTP/2 gets
/// a GOAWAY and ends with its open streams. So idle clients do not hold the
/// drain to its deadline. (A macro: hyper's HTTP/1 connection with upgrades
/// and its HTTP/2 connection share no trait for `graceful_shutdown`.)
#[macro_export]
macro_rules! serve_draining {
    ($drain:expr, $conn:expr) => {{
        let mut conn = std::pin::pin!($conn);
        tokio::select! {
            served = conn.as_mut() => served,
            () = $drain.started() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}

/// `--drain-timeout`: `10s`, `500ms`, or plain seconds.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let (number, unit) = match s.strip_suffix("ms") {
        Some(n) => (n, 1e-3),
        None => (s.strip_suffix('s').unwrap_or(s), 1.0),
    };
    number
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n >= 0.0 && *n * unit <= 3600.0)
        .map(|n| Duration::from_secs_f64(n * unit))
        .ok_or_else(|| format!("{s:?} is not a duration such as 10s or 500ms (at most an hour)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn draining_stops_accepting_and_waits_for_open_connections() {
        let drain = Drain::default();
        let first = drain.open();
        let second = drain.open();
        let accepting = tokio::spawn({
            let drain = drain.clone();
            async move { drain.until_draining(std::future::pending()).await }
        });
        assert!(!drain.is_draining());
        assert_eq!(drain.start(), 2);
        accepting
            .await
            .expect("the accept loop ends when draining starts");
        drop(first);
        let soon = Instant::now() + Duration::from_millis(50);
        assert_eq!(
            drain.wait_closed(soon).await,
            1,
            "one still open at the deadline"
        );
        drop(second);
        let later = Instant::now() + Duration::from_secs(5);
        assert_eq!(drain.wait_closed(later).await, 0);
    }

    #[test]
    fn drain_timeouts_are_durations() {
        assert_eq!(parse_timeout("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_timeout("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "-1s", "ten", "2h", "99999"] {
            let e = parse_timeout(bad).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
