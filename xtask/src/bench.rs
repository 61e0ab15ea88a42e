//! `cargo xtask bench ...`: benchmarks of the data path (`l4` and `http`, on
//! a local cluster) and of the control plane (`control`, on loopback), and
//! what they share: processes stopped on drop, a process's CPU time and
//! memory from /proc, wrk's report, aims.
mod control;
mod http;
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
use serde::Serialize;

pub use control::ControlArgs;
pub use http::HttpArgs;
pub use l4::L4Args;

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(100);
const LOG_TAIL_LINES: usize = 20;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Ping-pong latency, bulk throughput and HTTP/1.1 req/s: direct, via the node agent, via haproxy.
    L4(L4Args),
    /// HTTP/1.1 and h2c req/s and latency at saturation and at 1,000 req/s: direct, through the mesh (both agents, mTLS), through nginx.
    Http(HttpArgs),
    /// mesh-control with many simulated agents: first full sync, endpoint change latency, bytes per change, server CPU and RSS.
    Control(ControlArgs),
}

impl BenchCmd {
    pub fn run(self) -> Result<()> {
        match self {
            BenchCmd::L4(args) => l4::run(&args),
            BenchCmd::Http(args) => http::run(&args),
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

/// A figure against the limit it aims for.
#[derive(Debug, Serialize)]
struct Aim {
    aim: String,
    measured: f64,
    /// What `measured` counts; a ratio unless said otherwise.
    unit: &'static str,
    met: bool,
}

impl Aim {
    fn at_most(aim: String, measured: f64, limit: f64) -> Aim {
        let met = measured <= limit;
        Aim {
            aim,
            measured,
            unit: "x",
            met,
        }
    }

    fn at_least(aim: String, measured: f64, limit: f64) -> Aim {
        let met = measured >= limit;
        Aim {
            aim,
            measured,
            unit: "x",
            met,
        }
    }

    fn in_unit(self, unit: &'static str) -> Aim {
        Aim { unit, ..self }
    }
}

/// What the bench needs from `wrk --latency`.
#[derive(Debug, PartialEq)]
struct WrkRun {
    requests_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    errors: u64,
}

fn parse_wrk(out: &str) -> Result<WrkRun> {
    let mut requests_per_s = None;
    let mut p50_us = None;
    let mut p99_us = None;
    let mut requests = None;
    let mut errors = 0;
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", value] => requests_per_s = value.parse().ok(),
            ["50%", value] => p50_us = wrk_duration_us(value),
            ["99%", value] => p99_us = wrk_duration_us(value),
            [count, "requests", "in", ..] => requests = count.parse().ok(),
            ["Non-2xx", "or", "3xx", "responses:", count] => errors += count.parse::<u64>()?,
            _ if line.starts_with("Socket errors:") => {
                // "Socket errors: connect 0, read 0, write 0, timeout 0"
                for count in words.iter().skip(3).step_by(2) {
                    errors += count.trim_end_matches(',').parse::<u64>()?;
                }
            }
            _ => {}
        }
    }
    Ok(WrkRun {
        requests_per_s: requests_per_s.context("no Requests/sec")?,
        p50_us: p50_us.context("no 50% latency")?,
        p99_us: p99_us.context("no 99% latency")?,
        requests: requests.context("no request count")?,
        errors,
    })
}

/// wrk's `215.00us`, `1.23ms`, `2.00s`, `1.50m` in microseconds.
fn wrk_duration_us(text: &str) -> Option<f64> {
    let units = [
        ("us", 1.0),
        ("ms", 1e3),
        ("s", 1e6),
        ("m", 60e6),
        ("h", 3600e6),
    ];
    units.iter().find_map(|(unit, us)| {
        let number: f64 = text.strip_suffix(unit)?.parse().ok()?;
        Some(number * us)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://198.19.2.12:80/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.62ms  310.44us   9.87ms   91.23%
    Req/Sec    39.61k     1.23k   41.02k    80.00%
  Latency Distribution
     50%    1.58ms
     75%    1.70ms
     90%    1.85ms
     99%    2.48ms
  394211 requests in 10.00s, 61.28MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  39420.06
Transfer/sec:      6.13MB
";

    #[test]
    fn reads_wrk_output() {
        assert_eq!(
            parse_wrk(WRK).unwrap(),
            WrkRun {
                requests_per_s: 39420.06,
                p50_us: 1580.0,
                p99_us: 2480.0,
                requests: 394211,
                errors: 7,
            }
        );
    }

    #[test]
    fn wrk_output_without_figures_is_an_error() {
        assert!(parse_wrk("unable to connect to 198.19.2.12:80").is_err());
    }

    #[test]
    fn reads_wrk_durations() {
        assert_eq!(wrk_duration_us("215.00us"), Some(215.0));
        assert_eq!(wrk_duration_us("2.00s"), Some(2e6));
        assert_eq!(wrk_duration_us("1.50m"), Some(90e6));
        assert_eq!(wrk_duration_us("fast"), None);
    }

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
