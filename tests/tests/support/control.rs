//! The real `mesh-control` binary for integration tests: a temporary store,
//! node tokens for `n1` and `n2`, loopback TLS with the CA it generates, and
//! its operator unix socket. Killed on drop; its log is printed when the test
//! fails.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::SystemTime,
};

use mesh_api::{
    client::{self, Bearer, Target, Tls},
    identity::{CertStore, SpiffeId},
    names::DEFAULT_TRUST_DOMAIN,
    pb::{ApplyRequest, operator_client::OperatorClient},
};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

/// A release binary of the workspace, built next to this test (`cargo xtask
/// test` builds them all before any test runs).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask test`, or `cargo build --release --bins` first",
        path.display()
    );
    path
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("mesh-it-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `mesh-control` with its store, tokens and operator socket in `dir`,
/// listening on ephemeral loopback ports, plus `extra` flags.
pub fn command(dir: &Path, extra: &[&str]) -> Command {
    command_listening(dir, "127.0.0.1:0", extra)
}

/// [`command`] with the gRPC server on `listen` (a replica restarted on
/// the address its agents know).
pub fn command_listening(dir: &Path, listen: &str, extra: &[&str]) -> Command {
    std::fs::write(dir.join("tokens.yaml"), "n1: token-1\nn2: token-2\n").expect("tokens");
    let mut cmd = Command::new(bin("mesh-control"));
    cmd.args(["--listen", listen, "--metrics-addr", "127.0.0.1:0"])
        .arg("--operator-socket")
        .arg(dir.join("operator.sock"))
        .arg("--store-dir")
        .arg(dir.join("store"))
        .arg("--tokens")
        .arg(dir.join("tokens.yaml"))
        .args(extra);
    cmd
}

pub struct Server {
    pub child: Child,
    pub log: PathBuf,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub socket: PathBuf,
    /// The CA's root, which clients verify the server against.
    pub ca: PathBuf,
}

impl Server {
    /// Starts the server and waits for its ready line.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        Server::start_listening(dir, "127.0.0.1:0", extra)
    }

    /// [`start`](Server::start) with the gRPC server on `listen`.
    pub fn start_listening(dir: &Path, listen: &str, extra: &[&str]) -> Server {
        let log = dir.join("mesh-control.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut child = command_listening(dir, listen, extra)
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("start mesh-control");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        let field = |name: &str| -> String {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| {
                    let log = std::fs::read_to_string(&log).unwrap_or_default();
                    panic!("no {name} in ready line {line:?}; log:\n{log}")
                })
                .to_owned()
        };
        Server {
            grpc: field("grpc=").parse().expect("grpc address"),
            metrics: field("metrics=").parse().expect("metrics address"),
            ca: field("ca=").into(),
            socket: dir.join("operator.sock"),
            child,
            log,
        }
    }

    pub fn target(&self) -> Target {
        Target::Http(format!("https://{}", self.grpc))
    }

    /// TLS to the server, presenting `client` if given.
    pub fn tls(&self, client: Option<(CertStore, SpiffeId)>) -> Tls {
        let mut tls = Tls::from_bundle_file(&self.ca, DEFAULT_TRUST_DOMAIN).expect("trust bundle");
        tls.client = client;
        tls
    }

    /// The operator API on the unix socket (no token).
    pub async fn operator(&self) -> OperatorClient<InterceptedService<Channel, Bearer>> {
        client::operator(&Target::Unix(self.socket.clone()), None)
            .await
            .expect("operator socket")
    }

    /// Applies a YAML stream; the per-document results, or the refusal.
    pub async fn apply(&self, yaml: &str) -> Result<Vec<String>, tonic::Status> {
        self.operator()
            .await
            .apply(ApplyRequest {
                yaml: yaml.to_owned(),
                dry_run: false,
            })
            .await
            .map(|r| r.into_inner().results)
    }

    /// A sample of the Prometheus page (`name{labels}`), if present.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let mut stream = TcpStream::connect(self.metrics).expect("metrics");
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut body = String::new();
        stream.read_to_string(&mut body).expect("response");
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
    }

    /// SIGTERM, and the exit must be clean.
    pub fn stop(mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) with a pid of a child we own and have not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "mesh-control exited with {status}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- mesh-control log ---\n{log}");
        }
    }
}
