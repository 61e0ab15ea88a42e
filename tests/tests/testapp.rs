//! Runs every client mode of `mesh-testapp` against its own servers on 127.0.0.1.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-testapp");

/// A `mesh-testapp serve` with every server on a free port; killed on drop, so
/// a failing test leaves no process behind.
struct Server {
    child: Child,
    name: String,
    ports: Value,
    log: PathBuf,
}

impl Server {
    fn start(name: &str) -> Self {
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("testapp-{name}-{}.log", std::process::id()));
        // A log left by an earlier run would hold stale records.
        let _ = fs::remove_file(&log);
        let child = Command::new(BIN)
            .args(["serve", "--name", name])
            .args(["--tcp-echo", "0", "--sink", "0", "--http", "0"])
            .args(["--h2c", "0", "--grpc", "0", "--http-echo", "0", "--log"])
            .arg(&log)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning mesh-testapp serve");
        let mut server = Self {
            child,
            name: name.to_owned(),
            ports: Value::Null,
            log,
        };
        let stdout = server.child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the ready line");
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|err| panic!("ready line {line:?} is not JSON: {err}"));
        assert_eq!(ready["ready"], true, "{ready}");
        assert_eq!(ready["name"], name, "{ready}");
        server.ports = ready["ports"].clone();
        server
    }

    fn addr(&self, server: &str) -> String {
        let port = self.ports[server]
            .as_u64()
            .unwrap_or_else(|| panic!("no {server} port in {}", self.ports));
        format!("127.0.0.1:{port}")
    }

    /// Waits for the log record of the connection from `peer`: the server
    /// writes it only after the client has seen the connection close.
    fn record(&self, proto: &str, peer: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let found = log
                .lines()
                .map(|line| {
                    serde_json::from_str::<Value>(line)
                        .unwrap_or_else(|err| panic!("log line {line:?}: {err}"))
                })
                .find(|record| record["proto"] == proto && record["peer"] == peer);
            if let Some(record) = found {
                return record;
            }
            assert!(
                Instant::now() < deadline,
                "no {proto} record for {peer} in the log:\n{log}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("running mesh-testapp")
}

/// Runs a client mode that must pass and returns its report.
fn report(args: &[&str]) -> Value {
    let output = run(args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "mesh-testapp {args:?} failed ({}): {}{stdout}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|err| panic!("report {stdout:?}: {err}"))
}

/// Runs a client mode that must fail and returns its stderr.
fn failure(args: &[&str]) -> String {
    let output = run(args);
    assert!(
        !output.status.success(),
        "mesh-testapp {args:?} passed: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(output.stdout.is_empty(), "a failed client printed a report");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn tcp_echoes_10_mb_exactly_and_logs_the_connection() {
    let server = Server::start("tcp-a");
    let bytes = 10_000_000u64;
    let report = report(&[
        "tcp",
        "--addr",
        &server.addr("tcp_echo"),
        "--bytes",
        &bytes.to_string(),
    ]);
    assert_eq!(report["server"], "tcp-a", "{report}");
    assert_eq!(report["sent"], bytes, "{report}");
    assert_eq!(report["received"], bytes, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["secs"].as_f64().is_some_and(|secs| secs > 0.0));

    let local = report["local"].as_str().expect("local address");
    let record = server.record("tcp", local);
    assert_eq!(record["bytes_in"], bytes, "{record}");
    let greeting = server.name.len() as u64 + 1;
    assert_eq!(record["bytes_out"], bytes + greeting, "{record}");
    assert_eq!(record["local"], server.addr("tcp_echo"), "{record}");
}

#[test]
fn concurrent_connections_all_echo() {
    let server = Server::start("conc-a");
    let report = report(&[
        "concurrent",
        "--addr",
        &server.addr("tcp_echo"),
        "--conns",
        "200",
        "--bytes",
        "5000",
    ]);
    assert_eq!(
        report,
        json!({"ok": 200, "failed": 0, "servers": {"conc-a": 200}, "errors": []})
    );
}

#[test]
fn pingpong_reports_ordered_latencies() {
    let server = Server::start("ping-a");
    let report = report(&[
        "pingpong",
        "--addr",
        &server.addr("tcp_echo"),
        "--count",
        "2000",
        "--warmup",
        "100",
    ]);
    assert_eq!(report["count"], 2000, "{report}");
    let us = |key: &str| report[key].as_f64().expect(key);
    assert!(us("p50_us") > 0.0, "{report}");
    assert!(us("p50_us") <= us("p90_us"), "{report}");
    assert!(us("p90_us") <= us("p99_us"), "{report}");
    assert!(us("p99_us") <= us("max_us"), "{report}");
    assert!(us("mean_us") <= us("max_us"), "{report}");
}

#[test]
fn bulk_is_counted_by_the_sink() {
    let server = Server::start("sink-a");
    let report = report(&[
        "bulk",
        "--addr",
        &server.addr("sink"),
        "--bytes",
        "50000000",
    ]);
    assert_eq!(report["bytes"], 50_000_000, "{report}");
    assert_eq!(report["server"], "sink-a", "{report}");
    assert!(report["gbit_per_s"].as_f64().is_some_and(|rate| rate > 0.0));
}

#[test]
fn http1_and_h2c_answer_get_and_echo_post() {
    let server = Server::start("web-a");
    for (port, h2) in [("http", false), ("h2c", true)] {
        let url = format!("http://{}/some/path?q=1", server.addr(port));
        let mut get = vec!["http", "--url", &url, "--count", "3"];
        let mut post = vec![
            "http",
            "--url",
            &url,
            "--post-bytes",
            "100000",
            "--count",
            "2",
        ];
        if h2 {
            get.push("--h2");
            post.push("--h2");
        }
        assert_eq!(
            report(&get),
            json!({"status": 200, "server": "web-a", "count": 3, "ok": 3, "servers": {"web-a": 3}}),
            "{port}"
        );
        assert_eq!(
            report(&post),
            json!({"status": 200, "server": "web-a", "count": 2, "ok": 2, "servers": {"web-a": 2}}),
            "{port}"
        );
    }
}

#[test]
fn grpc_whoami_names_the_server() {
    let server = Server::start("grpc-a");
    let report = report(&["grpc", "--addr", &server.addr("grpc"), "--count", "3"]);
    assert_eq!(
        report,
        json!({"server": "grpc-a", "count": 3, "ok": 3, "servers": {"grpc-a": 3}})
    );
}

#[test]
fn clients_fail_instead_of_hanging() {
    let closed = TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let closed_addr = closed.local_addr().expect("local address").to_string();
    drop(closed);
    let stderr = failure(&["tcp", "--addr", &closed_addr]);
    assert!(stderr.contains("connecting"), "{stderr}");

    // The kernel completes the handshake, but no greeting ever comes.
    let silent = TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let silent_addr = silent.local_addr().expect("local address").to_string();
    let stderr = failure(&["tcp", "--addr", &silent_addr, "--timeout-secs", "1"]);
    assert!(stderr.contains("timed out"), "{stderr}");
}

#[test]
fn serve_exits_cleanly_on_sigterm() {
    let mut server = Server::start("term-a");
    let pid = libc::pid_t::try_from(server.child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) takes no pointers; `pid` is our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("waiting for serve") {
            break status;
        }
        assert!(Instant::now() < deadline, "serve ignored SIGTERM");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "serve exited with {status}");
}

/// How long one HTTP echo exchange may take before the test fails.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// RFC 6455's sample handshake (section 1.3).
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A request for the echo server at `addr`: origin form with a `Host` header
/// for HTTP/1.1, an absolute URI (`:scheme`, `:authority`) for HTTP/2.
fn echo_request(
    addr: &str,
    h2: bool,
    method: Method,
    path: &str,
    body: Bytes,
) -> Request<Full<Bytes>> {
    let builder = Request::builder().method(method);
    let builder = if h2 {
        builder.uri(format!("http://{addr}{path}"))
    } else {
        builder.uri(path).header(http::header::HOST, addr)
    };
    builder
        .header("x-test", "a")
        .header("x-test", "b")
        .body(Full::new(body))
        .expect("a valid request")
}

/// Sends one request on a new connection, HTTP/1.1 or h2c with prior knowledge.
async fn send(addr: &str, h2: bool, request: Request<Full<Bytes>>) -> Response<Incoming> {
    let version = if h2 { "HTTP/2" } else { "HTTP/1.1" };
    try_send(addr, h2, request)
        .await
        .unwrap_or_else(|err| panic!("{version} request: {err}"))
}

/// [`send`], but a request that got no response is an error, not a panic.
async fn try_send(
    addr: &str,
    h2: bool,
    request: Request<Full<Bytes>>,
) -> hyper::Result<Response<Incoming>> {
    let exchange = async {
        let io = TokioIo::new(
            tokio::net::TcpStream::connect(addr)
                .await
                .unwrap_or_else(|err| panic!("connecting to {addr}: {err}")),
        );
        if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("HTTP/2 handshake");
            tokio::spawn(conn);
            sender.send_request(request).await
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("HTTP/1.1 handshake");
            tokio::spawn(conn);
            sender.send_request(request).await
        }
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .expect("the echo server answered in time")
}

/// The JSON body of an echo response, after checking its headers.
async fn echo_json(response: Response<Incoming>, name: &str) -> Value {
    let headers = response.headers().clone();
    assert_eq!(headers["x-served-by"], name, "{headers:?}");
    assert_eq!(headers["content-type"], "application/json", "{headers:?}");
    let body = tokio::time::timeout(EXCHANGE_TIMEOUT, response.into_body().collect())
        .await
        .expect("the body arrived in time")
        .expect("reading the body")
        .to_bytes();
    serde_json::from_slice(&body)
        .unwrap_or_else(|err| panic!("body {:?}: {err}", String::from_utf8_lossy(&body)))
}

/// Sends `raw` on a new connection and reads until the server closes it.
fn raw_exchange(addr: &str, raw: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connecting");
    stream
        .set_read_timeout(Some(EXCHANGE_TIMEOUT))
        .expect("setting a read timeout");
    stream.write_all(raw.as_bytes()).expect("sending");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("reading the answer");
    answer
}

/// The JSON body of a raw HTTP/1 answer, after checking its status line.
fn raw_json(answer: &str, status_line: &str) -> Value {
    assert!(answer.starts_with(status_line), "{answer}");
    let (_, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    serde_json::from_str(body).unwrap_or_else(|err| panic!("body {body:?}: {err}"))
}

#[tokio::test]
async fn http_echo_describes_h1_and_h2c_requests() {
    let server = Server::start("echo-a");
    let addr = server.addr("http_echo");
    for (h2, version) in [(false, "HTTP/1.1"), (true, "HTTP/2.0")] {
        let request = echo_request(
            &addr,
            h2,
            Method::POST,
            "/some/path?q=1",
            Bytes::from_static(b"hello"),
        );
        let response = send(&addr, h2, request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let echo = echo_json(response, "echo-a").await;
        assert_eq!(echo["pod"], "echo-a", "{echo}");
        assert_eq!(echo["method"], "POST", "{echo}");
        assert_eq!(echo["path"], "/some/path?q=1", "{echo}");
        assert_eq!(echo["host"], addr, "{echo}");
        assert_eq!(echo["version"], version, "{echo}");
        assert_eq!(echo["body_bytes"], 5, "{echo}");
        let headers = echo["headers"].as_array().expect("headers");
        let x_test: Vec<&Value> = headers.iter().filter(|h| h[0] == "x-test").collect();
        assert_eq!(
            x_test,
            [&json!(["x-test", "a"]), &json!(["x-test", "b"])],
            "{echo}"
        );
    }
}

#[test]
fn http_echo_reports_absolute_form_and_http_1_0() {
    let server = Server::start("echo-b");
    let addr = server.addr("http_echo");
    let answer = raw_exchange(
        &addr,
        "GET http://example.test/abs?x=1 HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
    );
    let echo = raw_json(&answer, "HTTP/1.1 200 OK\r\n");
    assert_eq!(echo["path"], "http://example.test/abs?x=1", "{echo}");
    assert_eq!(echo["host"], "example.test", "{echo}");
    assert_eq!(echo["version"], "HTTP/1.1", "{echo}");

    let answer = raw_exchange(&addr, "GET /old?y=2 HTTP/1.0\r\n\r\n");
    let echo = raw_json(&answer, "HTTP/1.0 200 OK\r\n");
    assert!(answer.contains("\r\nx-served-by: echo-b\r\n"), "{answer}");
    assert_eq!(echo["path"], "/old?y=2", "{echo}");
    assert_eq!(echo["host"], Value::Null, "{echo}");
    assert_eq!(echo["version"], "HTTP/1.0", "{echo}");
    assert_eq!(echo["method"], "GET", "{echo}");
}

#[tokio::test]
async fn http_echo_status_and_delay_paths() {
    let server = Server::start("echo-c");
    let addr = server.addr("http_echo");
    for h2 in [false, true] {
        let request = echo_request(&addr, h2, Method::GET, "/_/status/418", Bytes::new());
        let response = send(&addr, h2, request).await;
        assert_eq!(response.status(), StatusCode::IM_A_TEAPOT);
        let echo = echo_json(response, "echo-c").await;
        assert_eq!(echo["path"], "/_/status/418", "{echo}");

        let request = echo_request(&addr, h2, Method::GET, "/_/status/bad", Bytes::new());
        let response = send(&addr, h2, request).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);

        let started = Instant::now();
        let request = echo_request(&addr, h2, Method::GET, "/_/delay/300", Bytes::new());
        let response = send(&addr, h2, request).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(started.elapsed() >= Duration::from_millis(300));
        let echo = echo_json(response, "echo-c").await;
        assert_eq!(echo["path"], "/_/delay/300", "{echo}");
    }
}

#[tokio::test]
async fn http_echo_counts_downloads_and_uploads() {
    let server = Server::start("echo-d");
    let addr = server.addr("http_echo");
    let bytes = 10_000_000u64;
    for h2 in [false, true] {
        let path = format!("/_/download/{bytes}");
        let request = echo_request(&addr, h2, Method::GET, &path, Bytes::new());
        let response = send(&addr, h2, request).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-length"], bytes.to_string());
        assert_eq!(response.headers()["x-served-by"], "echo-d");
        let mut body = response.into_body();
        let mut received = 0u64;
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.expect("a body frame").data_ref() {
                assert!(data.iter().all(|&b| b == b'x'));
                received += data.len() as u64;
            }
        }
        assert_eq!(received, bytes, "h2: {h2}");

        let upload = Bytes::from(vec![7u8; usize::try_from(bytes).expect("fits")]);
        let request = echo_request(&addr, h2, Method::PUT, "/_/upload", upload);
        let response = send(&addr, h2, request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let echo = echo_json(response, "echo-d").await;
        assert_eq!(
            echo,
            json!({"pod": "echo-d", "body_bytes": bytes}),
            "h2: {h2}"
        );
    }
}

#[tokio::test]
async fn http_echo_sends_trailers() {
    let server = Server::start("echo-e");
    let addr = server.addr("http_echo");
    for h2 in [true, false] {
        let mut request = echo_request(&addr, h2, Method::GET, "/_/trailers", Bytes::new());
        // HTTP/1.1 servers send trailers only to clients that accept them.
        request
            .headers_mut()
            .insert("te", http::HeaderValue::from_static("trailers"));
        let response = send(&addr, h2, request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let collected = response.into_body().collect().await.expect("the body");
        let trailers = collected.trailers().cloned().unwrap_or_else(HeaderMap::new);
        assert_eq!(collected.to_bytes(), "echo-e\n");
        assert_eq!(
            trailers.get("x-trailer").map(|v| v.as_bytes()),
            Some(&b"yes"[..]),
            "h2: {h2}: {trailers:?}"
        );
    }
}

#[test]
fn http_echo_upgrades_websocket_and_echoes_bytes() {
    let server = Server::start("echo-f");
    let addr = server.addr("http_echo");
    for path in ["/_/ws", "/any/route"] {
        let mut stream = TcpStream::connect(&addr).expect("connecting");
        stream
            .set_read_timeout(Some(EXCHANGE_TIMEOUT))
            .expect("setting a read timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .expect("sending the handshake");
        let mut head = Vec::new();
        let mut byte = [0u8];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).expect("reading the 101");
            head.push(byte[0]);
        }
        let head = String::from_utf8(head)
            .expect("an ASCII head")
            .to_lowercase();
        assert!(
            head.starts_with("http/1.1 101 switching protocols\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
        assert!(head.contains("\r\nx-served-by: echo-f\r\n"), "{head}");
        let accept = format!("\r\nsec-websocket-accept: {}\r\n", WS_ACCEPT.to_lowercase());
        assert!(head.contains(&accept), "{head}");

        // The masked text frame "Hello" of RFC 6455 (5.7): echoed verbatim.
        let frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        stream.write_all(&frame).expect("sending a frame");
        let mut echoed = [0u8; 11];
        stream.read_exact(&mut echoed).expect("reading the echo");
        assert_eq!(echoed, frame, "{path}");
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("half-closing");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).expect("reading to the end");
        assert!(rest.is_empty(), "{rest:?}");
    }
}

/// A GET of `/` carrying the fault headers `faults`.
fn faulty_request(addr: &str, h2: bool, faults: &[(&'static str, &str)]) -> Request<Full<Bytes>> {
    let mut request = echo_request(addr, h2, Method::GET, "/", Bytes::new());
    for (name, value) in faults {
        request.headers_mut().insert(
            *name,
            http::HeaderValue::from_str(value).expect("a header value"),
        );
    }
    request
}

#[tokio::test]
async fn http_echo_fault_headers_fail_and_delay_the_servers_they_name() {
    let servers = [Server::start("echo-h"), Server::start("echo-i")];
    let [named, other] = servers
        .each_ref()
        .map(|s| (s.addr("http_echo"), s.name.as_str()));
    for h2 in [false, true] {
        let fail = [("x-echo-fail", "503@echo-h")];
        let response = send(&named.0, h2, faulty_request(&named.0, h2, &fail)).await;
        assert_eq!(
            response.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "h2: {h2}"
        );
        let echo = echo_json(response, named.1).await;
        assert_eq!(echo["path"], "/", "{echo}");
        let response = send(&other.0, h2, faulty_request(&other.0, h2, &fail)).await;
        assert_eq!(response.status(), StatusCode::OK, "h2: {h2}");
        echo_json(response, other.1).await;

        let delay = [("x-echo-delay", "200@echo-h")];
        let started = Instant::now();
        let response = send(&named.0, h2, faulty_request(&named.0, h2, &delay)).await;
        assert_eq!(response.status(), StatusCode::OK, "h2: {h2}");
        assert!(started.elapsed() >= Duration::from_millis(200), "h2: {h2}");
        let response = send(&other.0, h2, faulty_request(&other.0, h2, &delay)).await;
        assert_eq!(response.status(), StatusCode::OK, "h2: {h2}");

        let both = [
            ("x-echo-delay", "200"),
            ("x-echo-fail", "502@echo-i,echo-h"),
        ];
        let started = Instant::now();
        let response = send(&other.0, h2, faulty_request(&other.0, h2, &both)).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "h2: {h2}");
        assert!(started.elapsed() >= Duration::from_millis(200), "h2: {h2}");

        let reset = [("x-echo-fail", "reset@echo-h")];
        let answer = try_send(&named.0, h2, faulty_request(&named.0, h2, &reset)).await;
        assert!(answer.is_err(), "h2: {h2}: {answer:?}");
        let response = send(&other.0, h2, faulty_request(&other.0, h2, &reset)).await;
        assert_eq!(response.status(), StatusCode::OK, "h2: {h2}");

        let malformed = [("x-echo-fail", "503/half")];
        let response = send(&named.0, h2, faulty_request(&named.0, h2, &malformed)).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "h2: {h2}");
        let refusal = echo_json(response, named.1).await;
        let error = refusal["error"].as_str().expect("an error");
        assert!(
            error.contains("x-echo-fail") && error.contains("503/half"),
            "{error}"
        );
    }

    // Half of 400 requests on one h2c connection: the stream's chance is
    // drawn per request, and a reset stream leaves the connection usable.
    let io = TokioIo::new(
        tokio::net::TcpStream::connect(&named.0)
            .await
            .expect("connecting"),
    );
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    let mut failed = 0;
    for _ in 0..400 {
        let request = faulty_request(&named.0, true, &[("x-echo-fail", "503/50")]);
        let response = tokio::time::timeout(EXCHANGE_TIMEOUT, sender.send_request(request))
            .await
            .expect("an answer in time")
            .expect("a response");
        match response.status() {
            StatusCode::OK => {}
            StatusCode::SERVICE_UNAVAILABLE => failed += 1,
            status => panic!("status {status}"),
        }
    }
    assert!((140..=260).contains(&failed), "{failed} of 400 failed");
    let request = faulty_request(&named.0, true, &[("x-echo-fail", "reset")]);
    let answer = sender.send_request(request).await;
    assert!(answer.is_err(), "{answer:?}");
    let request = faulty_request(&named.0, true, &[]);
    let response = sender.send_request(request).await.expect("a response");
    assert_eq!(response.status(), StatusCode::OK);
}

/// Runs curl with `args` and returns its stdout and stderr.
fn curl(args: &[&str]) -> (String, String) {
    let output = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "30"])
        .args(args)
        .output()
        .expect("running curl (Debian package curl)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "curl {args:?}: {stderr}{stdout}");
    (stdout, stderr)
}

#[test]
fn http_echo_answers_curl_h2c_and_100_continue() {
    let server = Server::start("echo-g");
    let addr = server.addr("http_echo");
    let (stdout, _) = curl(&[
        "--http2-prior-knowledge",
        &format!("http://{addr}/curl?h=2"),
    ]);
    let echo: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(echo["version"], "HTTP/2.0", "{echo}");
    assert_eq!(echo["path"], "/curl?h=2", "{echo}");
    assert_eq!(echo["host"], addr, "{echo}");

    let file = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("testapp-upload-{}", std::process::id()));
    fs::write(&file, vec![b'u'; 300_000]).expect("writing the upload");
    // curl waits this long for the 100 before sending anyway: the test
    // would notice a missing 100 as a slow upload, and curl's log says which.
    let started = Instant::now();
    let (stdout, stderr) = curl(&[
        "--verbose",
        "--expect100-timeout",
        "20",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("http://{addr}/_/upload"),
    ]);
    let _ = fs::remove_file(&file);
    assert!(stderr.contains("< HTTP/1.1 100 Continue"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10), "{stderr}");
    let echo: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(echo, json!({"pod": "echo-g", "body_bytes": 300_000}));
}
