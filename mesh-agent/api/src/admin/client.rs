//! A blocking client for the agent's admin API: HTTP/1.1 over a unix
//! socket, JSON bodies, one request per connection. Blocking on purpose:
//! `meshctl` and xtask are one-shot tools and must not need a runtime.
use std::{
    fmt,
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::{
    BpfView, ConfigView, ConnectionView, EnrollRequest, EnrolledPod, ErrorBody, Status,
    UnenrollRequest, paths,
};

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("connecting to the agent's admin socket {socket} for {what}: {source}")]
    Connect {
        socket: PathBuf,
        what: String,
        source: std::io::Error,
    },
    #[error("{what} on {socket}: {source}")]
    Io {
        socket: PathBuf,
        what: String,
        source: std::io::Error,
    },
    #[error("{what} on {socket}: {reason}")]
    Malformed {
        socket: PathBuf,
        what: String,
        reason: String,
    },
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("{what}: the answer is not what the admin API serves: {source}")]
    Decode {
        what: String,
        source: serde_json::Error,
    },
}

/// A non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct HttpError {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// The agent's `error` message, or the raw body.
    pub message: String,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} answered {}: {}",
            self.method,
            self.path,
            self.status,
            self.message.trim()
        )
    }
}

/// A raw answer: status and decoded body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The admin API of one agent.
#[derive(Debug, Clone)]
pub struct AdminClient {
    socket: PathBuf,
    timeout: Duration,
}

impl AdminClient {
    pub fn new(socket: impl Into<PathBuf>) -> AdminClient {
        AdminClient {
            socket: socket.into(),
            timeout: TIMEOUT,
        }
    }

    /// Waits at most `timeout` for each read or write.
    pub fn with_timeout(mut self, timeout: Duration) -> AdminClient {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn status(&self) -> Result<Status, AdminError> {
        self.typed("GET", paths::STATUS, None::<&()>)
    }

    pub fn config(&self) -> Result<ConfigView, AdminError> {
        self.typed("GET", paths::CONFIG, None::<&()>)
    }

    pub fn bpf(&self) -> Result<BpfView, AdminError> {
        self.typed("GET", paths::BPF, None::<&()>)
    }

    pub fn connections(&self) -> Result<Vec<ConnectionView>, AdminError> {
        self.typed("GET", paths::CONNECTIONS, None::<&()>)
    }

    pub fn enroll(
        &self,
        namespace: &str,
        pod: &str,
        cgroup: &Path,
        netns: Option<&Path>,
    ) -> Result<EnrolledPod, AdminError> {
        let req = EnrollRequest {
            pod: pod.to_owned(),
            namespace: namespace.to_owned(),
            cgroup: cgroup.to_owned(),
            netns: netns.map(Path::to_owned),
        };
        self.typed("POST", paths::ENROLL, Some(&req))
    }

    pub fn unenroll(&self, namespace: &str, pod: &str) -> Result<EnrolledPod, AdminError> {
        let req = UnenrollRequest {
            pod: pod.to_owned(),
            namespace: namespace.to_owned(),
        };
        self.typed("POST", paths::UNENROLL, Some(&req))
    }

    fn typed<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, AdminError> {
        let body = body.map(|b| serde_json::to_value(b).expect("admin requests serialize"));
        let value = self.request(method, path, body.as_ref())?;
        serde_json::from_value(value).map_err(|source| AdminError::Decode {
            what: format!("{method} {path}"),
            source,
        })
    }

    /// Sends one request; a 2xx body is parsed as JSON (an empty body is
    /// `Null`, a body that is not JSON comes back as a string), anything else
    /// is an [`HttpError`].
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, AdminError> {
        let body = body.map(|b| b.to_string().into_bytes());
        let response = self.send(method, path, body.as_deref())?;
        let text = String::from_utf8_lossy(&response.body);
        if !(200..300).contains(&response.status) {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map_or_else(|_| text.clone().into_owned(), |e| e.error);
            return Err(HttpError {
                method: method.to_string(),
                path: path.to_string(),
                status: response.status,
                message,
            }
            .into());
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.into_owned())))
    }

    pub fn get(&self, path: &str) -> Result<Value, AdminError> {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, AdminError> {
        self.request("POST", path, Some(body))
    }

    /// Sends one request with a JSON body (if any) and reads the answer to EOF.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, AdminError> {
        let what = format!("{method} {path}");
        let socket = &self.socket;
        let mut stream = UnixStream::connect(socket).map_err(|source| AdminError::Connect {
            socket: socket.clone(),
            what: what.clone(),
            source,
        })?;
        let io = |source| AdminError::Io {
            socket: socket.clone(),
            what: what.clone(),
            source,
        };
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
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
            .map_err(io)?;
        parse_response(&raw).map_err(|reason| AdminError::Malformed {
            socket: socket.clone(),
            what: what.clone(),
            reason,
        })
    }
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(format!(
            "malformed HTTP answer (no end of headers): {:?}",
            String::from_utf8_lossy(raw)
        ));
    };
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .filter(|_| status_line.starts_with("HTTP/1."))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("malformed status line {status_line:?}"))?;

    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }

    let rest = &raw[head_end + 4..];
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(len) = content_length {
        if rest.len() < len {
            return Err(format!(
                "answer cut short: {} of {len} body bytes",
                rest.len()
            ));
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunked body cut short")?;
        let size_field = String::from_utf8_lossy(&rest[..line_end]);
        let size_hex = size_field.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_hex:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err("chunked body cut short".into());
        }
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
            std::env::temp_dir().join(format!("mesh-admin-{}-{name}.sock", std::process::id()));
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
        let value = AdminClient::new(&sock).get("/status").unwrap();
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
        let value = AdminClient::new(&sock)
            .post(
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
        let err = AdminClient::new(&sock)
            .unenroll("default", "node9-pod9")
            .unwrap_err();
        server.join().unwrap();
        std::fs::remove_file(&sock).unwrap();
        let AdminError::Http(http) = &err else {
            panic!("not an HttpError: {err:?}");
        };
        assert_eq!(http.status, 404);
        assert_eq!(http.message, "no pod node9-pod9");
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
        let err = AdminClient::new("/nonexistent/xtask.sock")
            .status()
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/xtask.sock"), "{err}");
    }
}
