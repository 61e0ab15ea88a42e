//! The byte pump every proxied connection runs: both directions, with
//! half-close, counting bytes as they pass.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Per-direction buffer. Small enough that thousands of idle connections stay
/// cheap, large enough for bulk transfers to keep up with a veth.
const COPY_BUF: usize = 32 * 1024;

/// Copies both directions until each has seen EOF, propagating half-close:
/// when one side stops sending, the other side's write half is shut down and
/// the opposite direction keeps flowing. An error in either direction ends
/// both (the sockets are dropped, so peers see a reset or EOF).
pub async fn copy_bidirectional<A, B>(
    a: &mut A,
    b: &mut B,
    a_to_b: &AtomicU64,
    b_to_a: &AtomicU64,
) -> std::io::Result<()>
where
    A: Splittable,
    B: Splittable,
{
    let (mut ar, mut aw) = a.halves();
    let (mut br, mut bw) = b.halves();
    tokio::try_join!(
        copy_one_way(&mut ar, &mut bw, a_to_b),
        copy_one_way(&mut br, &mut aw, b_to_a)
    )?;
    Ok(())
}

async fn copy_one_way<R, W>(r: &mut R, w: &mut W, counter: &AtomicU64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Read and write halves of a duplex stream, usable at the same time.
pub trait Splittable {
    type Read<'a>: AsyncRead + Unpin
    where
        Self: 'a;
    type Write<'a>: AsyncWrite + Unpin
    where
        Self: 'a;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
}

impl Splittable for tokio::net::TcpStream {
    type Read<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Write<'a> = tokio::net::tcp::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.split()
    }
}

/// Any other stream (a tunnel's CONNECT stream): split through a lock.
pub struct Locked<S>(pub S);

impl<S: AsyncRead + AsyncWrite + Unpin> Splittable for Locked<S> {
    type Read<'a>
        = tokio::io::ReadHalf<&'a mut S>
    where
        S: 'a;
    type Write<'a>
        = tokio::io::WriteHalf<&'a mut S>
    where
        S: 'a;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        tokio::io::split(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    /// A pump between two real socket pairs carries bytes exactly and
    /// propagates half-close in both directions.
    #[tokio::test]
    async fn pump_half_close_and_counts() {
        let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l1.local_addr().unwrap()).await.unwrap();
        let (mut front, _) = l1.accept().await.unwrap();
        let mut back = TcpStream::connect(l2.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = l2.accept().await.unwrap();
        let (sent, recv) = (AtomicU64::new(0), AtomicU64::new(0));

        let pump = async { copy_bidirectional(&mut front, &mut back, &sent, &recv).await };
        let peers = async {
            let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
            client.write_all(&payload).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, payload, "server must see the client's bytes, then EOF");
            // The server can still answer after the client half-closed.
            server.write_all(b"reply after half-close").await.unwrap();
            server.shutdown().await.unwrap();
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            assert_eq!(reply, b"reply after half-close");
        };
        let (res, ()) = tokio::join!(pump, peers);
        res.unwrap();
        assert_eq!(sent.load(Ordering::Relaxed), 200_000);
        assert_eq!(recv.load(Ordering::Relaxed), 22);
    }
}
