//! Runs every client mode of `mesh-testapp` against its own servers on 127.0.0.1.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

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
            .args(["--h2c", "0", "--grpc", "0", "--log"])
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
