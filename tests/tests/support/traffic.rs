//! Traffic that runs through a test while the mesh changes under it: one
//! long-lived TCP connection, and a loop of HTTP requests on fresh
//! connections, both from a pod, both Python's socket clients.
use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Stdio},
};

use xtask::cluster::Cluster;

use super::python_in_pod;

/// One TCP connection from a pod to an echo server, kept open: each line
/// written comes back, or the connection is reported closed.
pub struct LongLived {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const LONG_LIVED_PY: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
f = s.makefile("rwb")
print("ready " + f.readline().decode().strip(), flush=True)
for line in sys.stdin:
    try:
        f.write(line.encode()); f.flush()
        got = f.readline().decode().strip()
        print(("echo " + got) if got else "closed", flush=True)
    except OSError as e:
        print("closed " + str(e), flush=True)
"#;

impl LongLived {
    pub fn open(cluster: &Cluster, pod: &str, dst: &str) -> LongLived {
        let (ip, port) = dst.split_once(':').expect("ip:port");
        let mut child = python_in_pod(cluster, pod)
            .args(["-c", LONG_LIVED_PY, ip, port])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the long-lived client");
        let stdin = child.stdin.take().expect("piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("ready line");
        assert!(line.starts_with("ready "), "long-lived client: {line:?}");
        LongLived {
            child,
            stdin,
            stdout,
        }
    }

    /// Sends `word` and returns what came back (`echo <word>` or `closed ...`).
    pub fn round_trip(&mut self, word: &str) -> String {
        writeln!(self.stdin, "{word}").expect("write to the long-lived client");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("long-lived client reply");
        line.trim().to_owned()
    }
}

impl Drop for LongLived {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HTTP GETs on fresh connections, one every 50 ms, until stdin closes;
/// then one line: `<ok> <failed> <first error>`.
const HTTP_LOOP_PY: &str = r#"
import sys, threading, time, urllib.request
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
ok = failed = 0
first = ""
while not stop.is_set():
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
            r.read()
            ok += 1
    except Exception as e:
        failed += 1
        first = first or repr(e)
    time.sleep(0.05)
print(ok, failed, first, flush=True)
"#;

pub struct HttpLoop(Child);

impl HttpLoop {
    pub fn start(cluster: &Cluster, pod: &str, url: &str) -> HttpLoop {
        let child = python_in_pod(cluster, pod)
            .args(["-c", HTTP_LOOP_PY, url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the HTTP loop");
        HttpLoop(child)
    }

    /// (succeeded, failed, first error).
    pub fn finish(mut self) -> (u64, u64, String) {
        drop(self.0.stdin.take());
        let mut line = String::new();
        BufReader::new(self.0.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the loop's report");
        let mut parts = line.trim().splitn(3, ' ');
        let n = |p: Option<&str>| p.and_then(|v| v.parse().ok()).expect("a count");
        (
            n(parts.next()),
            n(parts.next()),
            parts.next().unwrap_or("").to_owned(),
        )
    }
}

impl Drop for HttpLoop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
