//! `cargo xtask bench ...`: benchmarks of the data path (`l4`, on a local
//! cluster) and of the control plane (`control`, on loopback), and what they
//! share: processes stopped on drop, and a process's CPU time and memory
//! from /proc.
mod control;
mod l4;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use clap::Subcommand;

pub use control::ControlArgs;
pub use l4::L4Args;

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(100);
const LOG_TAIL_LINES: usize = 20;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Ping-pong latency, bulk throughput and HTTP/1.1 req/s: direct, via the node agent, via haproxy.
    L4(L4Args),
    /// mesh-control with many simulated agents: first full sync, endpoint change latency, bytes per change, server CPU and RSS.
    Control(ControlArgs),
}

impl BenchCmd {
    pub fn run(self) -> Result<()> {
        match self {
            BenchCmd::L4(args) => l4::run(&args),
            BenchCmd::Control(args) => control::run(&args),
        }
    }
}

/// A server this benchmark started: stopped on drop (SIGTERM, then SIGKILL).
struct Server {
    name: String,
    child: Child,
    /// Its stdout and stderr.
    log: PathBuf,
}

impl Server {
    fn start(name: String, mut cmd: Command, log: PathBuf) -> Result<Server> {
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Server { name, child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for `mesh-testapp serve`'s `{"ready":true,...}` line.
    fn wait_ready_line(&mut self) -> Result<()> {
        self.wait_line(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .is_ok_and(|line| line["ready"] == true)
                .then_some(())
        })
    }

    /// Waits for the first line of its log that `found` accepts.
    fn wait_line<T>(&mut self, found: impl Fn(&str) -> Option<T>) -> Result<T> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(found) = log.lines().find_map(&found) {
                return Ok(found);
            }
            self.ensure_running()?;
            ensure!(
                Instant::now() < deadline,
                "{} did not report ready within {} s; its log:\n{}",
                self.name,
                READY_TIMEOUT.as_secs(),
                self.log_tail()
            );
            thread::sleep(POLL);
        }
    }

    fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited ({status}); its log:\n{}",
                self.name,
                self.log_tail()
            ),
        }
    }

    /// SIGTERM, and the exit must be clean.
    fn stop(mut self, within: Duration) -> Result<()> {
        self.terminate();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(
                    status.success(),
                    "{} exited with {status} when stopped; its log:\n{}",
                    self.name,
                    self.log_tail()
                );
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{} did not stop within {} s of SIGTERM",
                self.name,
                within.as_secs()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill has no memory-safety preconditions; the pid is our
            // child and not yet reaped, so it cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        self.terminate();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/<pid>/stat).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("{path} reads {stat:?}"))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name, field 2, is in parentheses and may hold spaces; field 3 follows.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(field(14)? + field(15)?)
}

/// Clock ticks per second, the unit of [`cpu_ticks`].
fn ticks_per_s() -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(ticks > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(ticks as f64)
}

/// A `Key:   123 kB` line of /proc/<pid>/status.
fn status_kb(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// One `kB` figure of /proc/<pid>/status, e.g. `VmRSS`.
fn process_kb(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status_kb(&status, key).with_context(|| format!("no {key} in {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_figures() {
        let stat = "4242 (tokio (worker)) S 1 4242 4242 0 -1 4194560 900 0 0 0 17 5 0 0 20 0 4";
        assert_eq!(parse_cpu_ticks(stat), Some(22));
        let status = "Name:\thaproxy\nVmHWM:\t   10240 kB\nVmRSS:\t    8192 kB\n";
        assert_eq!(status_kb(status, "VmRSS"), Some(8192));
        assert_eq!(status_kb(status, "VmHWM"), Some(10240));
        assert_eq!(status_kb(status, "VmSwap"), None);
    }
}
