//! The host side: `ip`, network namespaces, cgroup v2, bpffs, and moving a child
//! process into a netns and a cgroup before it execs.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::plan;

pub const NETNS_DIR: &str = "/run/netns";
pub const BPFFS: &str = "/sys/fs/bpf";

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `ip <args>`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip -n <netns> <args>`.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

pub fn netns_add(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])
}

/// Every named netns (`ip netns list` without the ids).
pub fn netns_list() -> Result<Vec<String>> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(NETNS_DIR),
    };
    let mut names = Vec::new();
    for entry in entries {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// The processes living in a named netns.
pub fn netns_pids(name: &str) -> Result<Vec<u32>> {
    let out = Command::new("ip")
        .args(["netns", "pids", name])
        .stdin(Stdio::null())
        .output()
        .context("running ip netns pids")?;
    if !out.status.success() {
        bail!(
            "`ip netns pids {name}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

pub fn netns_delete(name: &str) -> Result<()> {
    ip(&["netns", "delete", name])
}

/// Runs a command inside a netns with `ip netns exec`, for tools like sysctl that
/// need the netns's view of /proc/sys.
pub fn netns_exec(name: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", name])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip netns exec")?;
    if !out.status.success() {
        bail!(
            "`ip netns exec {name} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn mounts() -> Result<String> {
    fs::read_to_string("/proc/mounts").context("reading /proc/mounts")
}

pub fn cgroup2_mount() -> Result<PathBuf> {
    plan::cgroup2_mount(&mounts()?).context("no cgroup2 mount in /proc/mounts")
}

/// Mounts bpffs at /sys/fs/bpf unless something of type bpf is there already.
pub fn ensure_bpffs() -> Result<PathBuf> {
    let path = Path::new(BPFFS);
    if plan::is_mounted(&mounts()?, "bpf", path) {
        return Ok(path.to_path_buf());
    }
    fs::create_dir_all(path).with_context(|| format!("creating {BPFFS}"))?;
    let target = CString::new(BPFFS).expect("no NUL in a constant path");
    let fstype = CString::new("bpf").expect("no NUL in a constant");
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; no data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context(format!("mounting bpffs at {BPFFS}"));
    }
    Ok(path.to_path_buf())
}

/// The pids in one cgroup (not its descendants).
pub fn cgroup_pids(cgroup: &Path) -> Vec<u32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether the cgroup or any descendant has a live process (zombies do not count).
pub fn cgroup_populated(cgroup: &Path) -> bool {
    fs::read_to_string(cgroup.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

/// SIGKILLs every process in the cgroup subtree and waits until none is left.
pub fn cgroup_kill(cgroup: &Path, timeout: Duration) -> Result<()> {
    if !cgroup.exists() {
        return Ok(());
    }
    let kill_file = cgroup.join("cgroup.kill");
    if kill_file.exists() {
        fs::write(&kill_file, "1").with_context(|| format!("writing {}", kill_file.display()))?;
    } else {
        for dir in cgroup_tree(cgroup) {
            for pid in cgroup_pids(&dir) {
                signal(pid, libc::SIGKILL);
            }
        }
    }
    let deadline = Instant::now() + timeout;
    while cgroup_populated(cgroup) {
        if Instant::now() > deadline {
            bail!(
                "processes still alive in {} after SIGKILL",
                cgroup.display()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The cgroup and all its descendants, deepest first.
fn cgroup_tree(cgroup: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(cgroup) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(cgroup_tree(&entry.path()));
            }
        }
    }
    out.push(cgroup.to_path_buf());
    out
}

/// Removes a cgroup and its descendants, deepest first. They must be empty.
pub fn cgroup_remove_tree(cgroup: &Path) -> Result<()> {
    if !cgroup.exists() {
        return Ok(());
    }
    let mut errors = Vec::new();
    for dir in cgroup_tree(cgroup) {
        if let Err(e) = fs::remove_dir(&dir) {
            errors.push(format!("rmdir {}: {e}", dir.display()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!(errors.join("; "))
    }
}

pub fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers; a vanished pid yields ESRCH, which is fine here.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The last `n` lines of a log file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Where a child goes between fork and exec: a netns, a cgroup, a new session.
pub struct Placement<'a> {
    pub netns: Option<&'a str>,
    pub cgroup: Option<&'a Path>,
    pub new_session: bool,
}

/// Configures `cmd` so that the child joins the placement before it execs.
///
/// The netns and `cgroup.procs` are opened here, before fork, so that the child only
/// makes async-signal-safe calls. If opening fails, spawning the command fails with
/// that error.
pub fn place(cmd: &mut Command, placement: &Placement<'_>) {
    let opened = open_placement(placement);
    let new_session = placement.new_session;
    let pre_exec = move || -> io::Result<()> {
        let (netns, cgroup_procs) = match &opened {
            Ok(files) => files,
            Err(errno) => return Err(io::Error::from_raw_os_error(*errno)),
        };
        // SAFETY: setsid, write and setns are async-signal-safe syscalls on fds this
        // closure owns; nothing here allocates or takes a lock.
        unsafe {
            if new_session && libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            if let Some(procs) = cgroup_procs
                && libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
            {
                return Err(io::Error::last_os_error());
            }
            if let Some(ns) = netns
                && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe calls (see above).
    unsafe {
        cmd.pre_exec(pre_exec);
    }
}

type PlacementFiles = (Option<File>, Option<File>);

fn open_placement(placement: &Placement<'_>) -> Result<PlacementFiles, i32> {
    let errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::EINVAL);
    let netns = placement
        .netns
        .map(|name| File::open(netns_path(name)))
        .transpose()
        .map_err(errno)?;
    let cgroup_procs = placement
        .cgroup
        .map(|cg| OpenOptions::new().write(true).open(cg.join("cgroup.procs")))
        .transpose()
        .map_err(errno)?;
    Ok((netns, cgroup_procs))
}

/// Whether a path exists without following a final symlink (for sockets and pins).
pub fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}
