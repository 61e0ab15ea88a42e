//! Protocol detection on a captured connection: one bounded read of what
//! the client sends first, without consuming it (`peek`). The HTTP/2
//! prior-knowledge preface, an HTTP/1.x request line, a TLS ClientHello
//! (carried as opaque TCP: the mesh cannot read it), else opaque TCP.
//!
//! A client that waits for the server to speak first (SMTP, MySQL, some
//! PostgreSQL drivers) sends nothing: after the detection timeout the
//! connection is carried as opaque TCP, so such a client loses that long
//! once per connection. The default, [`DEFAULT_TIMEOUT`], is short because
//! that cost is paid on every connection of a server-first protocol on a
//! port without `appProtocol`; a client that connects and only later sends
//! its first request (a pre-connecting pool) is then carried as TCP, without
//! L7 routing: declare `appProtocol: http` on such a port.
use std::time::Duration;

use tokio::{net::TcpStream, time::Instant};

/// How long detection waits for the client's first bytes.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(200);
/// The largest first read: an HTTP/1 request line longer than this is
/// HTTP if it starts with a known method.
const PEEK: usize = 512;
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Anything else, carried byte for byte.
    Opaque(Why),
}

/// Why a connection is carried as opaque TCP (a metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    Tls,
    Unknown,
    /// The client sent nothing within the timeout (server-first protocol).
    Timeout,
    /// The client closed before sending anything.
    Closed,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Tls => "tls",
            Why::Unknown => "unknown",
            Why::Timeout => "timeout",
            Why::Closed => "closed",
        }
    }
}

/// What the first bytes say: a protocol, or that more bytes are needed.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    if bytes.is_empty() {
        return None;
    }
    if bytes.len() >= H2_PREFACE.len() {
        if bytes.starts_with(H2_PREFACE) {
            return Some(Protocol::Http2);
        }
    } else if H2_PREFACE.starts_with(bytes) {
        return None;
    }
    // A TLS record of type handshake, version 3.x.
    if bytes[0] == 0x16 {
        return match bytes.get(1) {
            None => None,
            Some(3) => Some(Protocol::Opaque(Why::Tls)),
            Some(_) => Some(Protocol::Opaque(Why::Unknown)),
        };
    }
    // An HTTP/1 request line: a method token, a space, a target, a space
    // and the version. A text protocol whose commands look like a token
    // and a space (Redis' inline `SET k v`) has no version at the end.
    let token = bytes
        .iter()
        .take_while(|b| b.is_ascii_uppercase() || **b == b'-' || **b == b'_')
        .count();
    match bytes.get(token) {
        Some(b' ') if (1..=20).contains(&token) => {}
        None if token < 20 => return None,
        _ => return Some(Protocol::Opaque(Why::Unknown)),
    }
    match bytes.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let line = &bytes[..end];
            if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
                Some(Protocol::Http1)
            } else {
                Some(Protocol::Opaque(Why::Unknown))
            }
        }
        // A request line longer than the read: a known method decides.
        None if bytes.len() >= PEEK => {
            let method = &bytes[..token];
            if KNOWN_METHODS.contains(&method) {
                Some(Protocol::Http1)
            } else {
                Some(Protocol::Opaque(Why::Unknown))
            }
        }
        None => None,
    }
}

const KNOWN_METHODS: [&[u8]; 9] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// Peeks at `stream` until [`classify`] decides or `timeout` passes.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Protocol {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; PEEK];
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Err(_) => return Protocol::Opaque(Why::Timeout),
            Ok(Err(_)) | Ok(Ok(0)) => return Protocol::Opaque(Why::Closed),
            Ok(Ok(n)) => n,
        };
        if let Some(p) = classify(&buf[..n]) {
            return p;
        }
        if n == PEEK {
            return Protocol::Opaque(Why::Unknown);
        }
        // More bytes are needed, and peek returns at once while some are
        // buffered: wait a little for the rest of the first segment.
        if n == seen {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen = n;
        if Instant::now() >= deadline {
            return Protocol::Opaque(Why::Timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes() {
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None, "a partial preface waits");
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"GET http://a/b HTTP/1.0\r\nHost: a\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"GET /long-path"),
            None,
            "the line is not complete"
        );
        let mut long = b"GET /".to_vec();
        long.resize(PEEK, b'a');
        assert_eq!(classify(&long), Some(Protocol::Http1));
        assert_eq!(
            classify(b"SET key value\r\n"),
            Some(Protocol::Opaque(Why::Unknown))
        );
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"get / HTTP/1.1"),
            Some(Protocol::Opaque(Why::Unknown))
        );
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            Some(Protocol::Opaque(Why::Tls))
        );
        assert_eq!(classify(&[0x16]), None);
        // PostgreSQL's startup message, Redis' RESP.
        assert_eq!(
            classify(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f]),
            Some(Protocol::Opaque(Why::Unknown))
        );
        assert_eq!(
            classify(b"*1\r\n$4\r\nPING\r\n"),
            Some(Protocol::Opaque(Why::Unknown))
        );
        assert_eq!(classify(b"PING\r\n"), Some(Protocol::Opaque(Why::Unknown)));
    }
}
