//! A real etcd cluster on loopback (Debian's `etcd-server`, 3.4): members
//! on free ports, data in a temporary directory, every member killed and
//! the directory removed on drop.
use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::control::TempDir;

const ETCD: &str = "etcd";
const READY: Duration = Duration::from_secs(30);

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

pub struct EtcdCluster {
    members: Vec<Member>,
    token: String,
    dir: TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster has a leader and
    /// serves a linearizable read. `None` (said loudly) when `etcd` is not
    /// installed and the run allows skipping; a panic when it does not.
    pub async fn start(size: usize) -> Option<EtcdCluster> {
        if Command::new(ETCD)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            assert!(
                !super::required(),
                "etcd is not installed (cargo xtask deps installs etcd-server)"
            );
            eprintln!("SKIPPED: etcd is not installed (cargo xtask deps installs etcd-server)");
            return None;
        }
        let dir = TempDir::new("etcd");
        let members = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster {
            members,
            token: format!("mesh-it-{}", std::process::id()),
            dir,
        };
        for i in 0..size {
            cluster.spawn(i, "new");
        }
        cluster.wait_ready().await;
        Some(cluster)
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect();
        let member = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.0.join(format!("{}.log", member.name)))
            .expect("etcd log");
        let client = format!("http://127.0.0.1:{}", member.client);
        let peer = format!("http://127.0.0.1:{}", member.peer);
        let child = Command::new(ETCD)
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(self.dir.0.join(&member.name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", state])
            // Fast failover on loopback; big applies in one transaction.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--max-txn-ops", "20000", "--max-request-bytes", "16777216"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + READY;
        loop {
            let ready = async {
                let mut client = etcd_client::Client::connect(self.live_endpoints(), None)
                    .await
                    .ok()?;
                client.get("/ready", None).await.ok()
            };
            if tokio::time::timeout(Duration::from_secs(2), ready)
                .await
                .ok()
                .flatten()
                .is_some()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become ready; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn live_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// `etcd://` URL of the members `which` (indexes), under `prefix`.
    pub fn url_of(&self, which: &[usize], prefix: &str) -> String {
        let hosts: Vec<String> = which
            .iter()
            .map(|&i| format!("127.0.0.1:{}", self.members[i].client))
            .collect();
        format!("etcd://{}{prefix}", hosts.join(","))
    }

    /// `etcd://` URL of every member, under `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.url_of(&all, prefix)
    }

    /// A client of the live members.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect(self.live_endpoints(), None)
            .await
            .expect("etcd client")
    }

    /// SIGKILL one member.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed member again on its data directory.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i, "existing");
        self.wait_ready().await;
    }

    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let log = std::fs::read_to_string(self.dir.0.join(format!("{}.log", m.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- etcd {} ---\n{}\n", m.name, tail.join("\n"))
            })
            .collect()
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.0.clone()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
