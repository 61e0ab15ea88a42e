//! A tiny client for the agent's admin API: HTTP/1.1 over a unix socket, JSON bodies,
//! one request per connection.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A non-2xx answer. Reach it with `err.downcast_ref::<HttpError>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub body: String,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} answered {}: {}",
            self.method,
            self.path,
            self.status,
            self.body.trim()
        )
    }
}

impl std::error::Error for HttpError {}

/// A raw answer: status and decoded body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

pub fn get(socket: &Path, path: &str) -> Result<Value> {
    request(socket, "GET", path, None)
}

pub fn post(socket: &Path, path: &str, body: &Value) -> Result<Value> {
    request(socket, "POST", path, Some(body))
}

/// Sends one request; a 2xx body is parsed as JSON (an empty body is `Null`, a body
/// that is not JSON comes back as a string), anything else is an [`HttpError`].
pub fn request(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let body = body.map(serde_json::to_vec).transpose()?;
    let response = send(socket, method, path, body.as_deref(), TIMEOUT)?;
    let text = String::from_utf8_lossy(&response.body);
    if !(200..300).contains(&response.status) {
        return Err(HttpError {
            method: method.to_string(),
            path: path.to_string(),
            status: response.status,
            body: text.into_owned(),
        }
        .into());
    }
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    Ok(serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.into_owned())))
}

/// Sends one request with a JSON body (if any) and reads the answer to EOF, waiting at
/// most `timeout` for each read or write.
pub fn send(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Response> {
    let what = || format!("{method} {path} on {}", socket.display());
    let mut stream =
        UnixStream::connect(socket).with_context(|| format!("connecting for {}", what()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;

    let body = body.unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str("\r\n");
    let mut raw = Vec::new();
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body))
        .and_then(|()| stream.read_to_end(&mut raw))
        .with_context(what)?;
    parse_response(&raw).with_context(what)
}

fn parse_response(raw: &[u8]) -> Result<Response> {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!(
            "malformed HTTP answer (no end of headers): {:?}",
            String::from_utf8_lossy(raw)
        );
    };
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .filter(|_| status_line.starts_with("HTTP/1."))
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("malformed status line {status_line:?}"))?;

    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse::<usize>().context("bad Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }

    let rest = &raw[head_end + 4..];
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(len) = content_length {
        anyhow::ensure!(
            rest.len() >= len,
            "answer cut short: {} of {len} body bytes",
            rest.len()
        );
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunked body cut short")?;
        let size_field = String::from_utf8_lossy(&rest[..line_end]);
        let size_hex = size_field.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_hex:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        anyhow::ensure!(rest.len() >= size + 2, "chunked body cut short");
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::BufRead;
    use std::io::BufReader;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::thread;

    /// A one-connection-at-a-time fake agent: answers `handler(method, path, body)`.
    fn fake_server(
        name: &str,
        handler: fn(&str, &str, &[u8]) -> String,
    ) -> (PathBuf, thread::JoinHandle<()>) {
        let path =
            std::env::temp_dir().join(format!("xtask-admin-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut parts = request_line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap().to_string(),
                parts.next().unwrap().to_string(),
            );
            let mut length = 0;
            let mut close = false;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
                let (name, value) = line.split_once(':').unwrap();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
                if name.eq_ignore_ascii_case("connection") {
                    close = value.trim() == "close";
                }
            }
            assert!(close, "the client must ask for Connection: close");
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let answer = handler(&method, &path, &body);
            reader.get_mut().write_all(answer.as_bytes()).unwrap();
        });
        (path, handle)
    }

    fn json_answer(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn get_parses_json() {
        let (sock, server) = fake_server("get", |method, path, body| {
            assert_eq!((method, path, body), ("GET", "/status", &b""[..]));
            json_answer("200 OK", r#"{"node":"node1","ready":true}"#)
        });
        let value = get(&sock, "/status").unwrap();
        server.join().unwrap();
        std::fs::remove_file(&sock).unwrap();
        assert_eq!(value, json!({"node": "node1", "ready": true}));
    }

    #[test]
    fn post_sends_the_body() {
        let (sock, server) = fake_server("post", |method, path, body| {
            assert_eq!((method, path), ("POST", "/enroll"));
            let body: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(body, json!({"pod": "node1-pod1", "cgroup": "/cg/pod1"}));
            "HTTP/1.1 204 No Content\r\n\r\n".to_string()
        });
        let value = post(
            &sock,
            "/enroll",
            &json!({"pod": "node1-pod1", "cgroup": "/cg/pod1"}),
        )
        .unwrap();
        server.join().unwrap();
        std::fs::remove_file(&sock).unwrap();
        assert_eq!(value, Value::Null);
    }

    #[test]
    fn non_2xx_is_an_http_error() {
        let (sock, server) = fake_server("err", |_, _, _| {
            json_answer("404 Not Found", r#"{"error":"no pod node9-pod9"}"#)
        });
        let err = post(&sock, "/unenroll", &json!({"pod": "node9-pod9"})).unwrap_err();
        server.join().unwrap();
        std::fs::remove_file(&sock).unwrap();
        let http = err.downcast_ref::<HttpError>().expect("an HttpError");
        assert_eq!(http.status, 404);
        assert!(http.body.contains("no pod node9-pod9"));
        assert!(err.to_string().contains("POST /unenroll answered 404"));
    }

    #[test]
    fn chunked_and_unframed_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3;x=y\r\n:1}\r\n0\r\n\r\n";
        let response = parse_response(raw).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body, b"{\"a\":1}");

        let response = parse_response(b"HTTP/1.0 500 Oops\r\n\r\nboom").unwrap();
        assert_eq!((response.status, &response.body[..]), (500, &b"boom"[..]));

        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort").is_err());
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn connecting_to_a_missing_socket_fails_with_the_path() {
        let err = get(Path::new("/nonexistent/xtask.sock"), "/status").unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/xtask.sock"));
    }
}
