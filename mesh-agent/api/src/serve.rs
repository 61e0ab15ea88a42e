//! The accept loop every listener of the agent and the control server runs:
//! one task per connection, at most `max_connections` at once (more are
//! closed at once: a flood of idle connections costs a bounded amount), and a
//! back-off instead of a busy loop when the process is out of file
//! descriptors (EMFILE) or memory.
use std::{future::Future, io, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::Semaphore,
};
use tracing::warn;

/// Connections one listener serves at once unless told otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// How long a client may take to send its request headers (HTTP/1.1
/// listeners) or to finish a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Thousands of concurrent connections need two descriptors each: raise the
/// soft limit on open files to the hard one.
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A listening socket.
pub trait Listener: Send + 'static {
    type Io: Send + 'static;
    type Addr: Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send;
}

impl Listener for TcpListener {
    type Io = TcpStream;
    type Addr = std::net::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(TcpStream, Self::Addr)>> + Send {
        TcpListener::accept(self)
    }
}

impl Listener for UnixListener {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(UnixStream, Self::Addr)>> + Send {
        UnixListener::accept(self)
    }
}

/// What an accept error means for the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptError {
    /// The connection went away before we took it: take the next one.
    Transient,
    /// Out of descriptors or memory: wait before trying again, or the loop
    /// spins on the same error.
    Exhausted,
}

impl AcceptError {
    pub fn classify(e: &io::Error) -> AcceptError {
        const EXHAUSTED: [i32; 4] = [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM];
        match e.raw_os_error() {
            Some(code) if EXHAUSTED.contains(&code) => AcceptError::Exhausted,
            _ => AcceptError::Transient,
        }
    }
}

/// The wait after `failures` exhausted accepts in a row: doubling from 5 ms
/// to at most 1 s.
pub fn backoff(failures: u32) -> Duration {
    BACKOFF_MIN
        .saturating_mul(1u32 << failures.min(10))
        .min(BACKOFF_MAX)
}

/// Accepts forever, spawning `handle(io, addr)` for each connection while
/// fewer than `max_connections` handlers run.
pub async fn accept_loop<L, F, Fut>(
    name: &'static str,
    listener: L,
    max_connections: usize,
    mut handle: F,
) where
    L: Listener,
    F: FnMut(L::Io, L::Addr) -> Fut + Send,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut failures = 0u32;
    let mut refused = 0u64;
    loop {
        match listener.accept().await {
            Ok((io, addr)) => {
                failures = 0;
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    // Closed at once; warned at the first and every 1024th.
                    if refused.is_multiple_of(1024) {
                        warn!(
                            listener = name,
                            max_connections,
                            refused = refused + 1,
                            "connection limit reached; closing new connections"
                        );
                    }
                    refused += 1;
                    drop(io);
                    continue;
                };
                let served = handle(io, addr);
                tokio::spawn(async move {
                    served.await;
                    drop(permit);
                });
            }
            Err(e) => match AcceptError::classify(&e) {
                AcceptError::Transient => continue,
                AcceptError::Exhausted => {
                    let wait = backoff(failures);
                    if failures == 0 {
                        warn!(listener = name, error = %e, "accept failed: out of resources, backing off");
                    }
                    failures = failures.saturating_add(1);
                    tokio::time::sleep(wait).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_the_rest_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, released) = tokio::sync::watch::channel(false);
        // Each handler greets with one byte, then holds its connection (and
        // its permit) until released.
        tokio::spawn(accept_loop(
            "test",
            listener,
            2,
            move |mut io: TcpStream, _| {
                let mut released = released.clone();
                async move {
                    let _ = io.write_all(b"x").await;
                    let _ = released.wait_for(|r| *r).await;
                }
            },
        ));
        let greeting = |mut s: TcpStream| async move {
            let mut buf = [0u8; 1];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("an answer in time")
                .unwrap_or(0);
            (n, s)
        };
        let (a, _a) = greeting(TcpStream::connect(addr).await.unwrap()).await;
        let (b, _b) = greeting(TcpStream::connect(addr).await.unwrap()).await;
        assert_eq!((a, b), (1, 1), "two connections are served");
        let (c, _) = greeting(TcpStream::connect(addr).await.unwrap()).await;
        assert_eq!(c, 0, "the third is closed without a byte");
        release.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (d, _) = greeting(TcpStream::connect(addr).await.unwrap()).await;
        assert_eq!(d, 1, "permits come back when handlers end");
    }

    #[test]
    fn exhaustion_backs_off_and_other_errors_do_not() {
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(AcceptError::classify(&emfile), AcceptError::Exhausted);
        assert_eq!(AcceptError::classify(&aborted), AcceptError::Transient);
        assert_eq!(backoff(0), Duration::from_millis(5));
        assert_eq!(backoff(1), Duration::from_millis(10));
        assert_eq!(backoff(30), Duration::from_secs(1));
    }
}
