//! The accept loop every listener of the agent and the control server runs:
//! one task per connection, and a back-off instead of a busy loop when the
//! process is out of file descriptors (EMFILE) or memory.
use std::{future::Future, io, time::Duration};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tracing::warn;

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

/// Accepts forever, spawning `handle(io, addr)` for each connection.
pub async fn accept_loop<L, F, Fut>(name: &'static str, listener: L, mut handle: F)
where
    L: Listener,
    F: FnMut(L::Io, L::Addr) -> Fut + Send,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut failures = 0u32;
    loop {
        match listener.accept().await {
            Ok((io, addr)) => {
                failures = 0;
                tokio::spawn(handle(io, addr));
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
    use super::*;

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
