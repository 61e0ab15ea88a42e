//! `meshctl`: the operator's view of a node's live traffic.
use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(name = "meshctl", about = "Operate the mesh", version)]
pub struct Args {
    /// Admin socket of the node agent to talk to.
    #[arg(
        long,
        global = true,
        env = "MESH_ADMIN_SOCKET",
        default_value = "/run/mesh/admin.sock"
    )]
    pub admin: PathBuf,
    /// Print raw JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Agent status: enrolled pods and the kernel's redirect decisions.
    Status,
    /// Open and recently closed connections carried by the agent.
    Connections {
        /// Only this many rows.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Enroll a pod: its next connections go through the agent.
    Enroll {
        pod: String,
        /// The pod's cgroup v2 directory.
        #[arg(long)]
        cgroup: PathBuf,
    },
    /// Stop redirecting a pod's connections.
    Unenroll { pod: String },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let out = match &args.command {
        Command::Status => {
            let v = request(&args.admin, "GET", "/status", None)?;
            if args.json {
                v.to_string()
            } else {
                render_status(&v)
            }
        }
        Command::Connections { limit } => {
            let v = request(&args.admin, "GET", "/connections", None)?;
            let rows: Vec<Value> = v.as_array().cloned().unwrap_or_default();
            let rows: Vec<Value> = rows.into_iter().take(*limit).collect();
            if args.json {
                Value::Array(rows).to_string()
            } else {
                render_connections(&rows)
            }
        }
        Command::Enroll { pod, cgroup } => request(
            &args.admin,
            "POST",
            "/enroll",
            Some(&serde_json::json!({ "pod": pod, "cgroup": cgroup })),
        )?
        .to_string(),
        Command::Unenroll { pod } => request(
            &args.admin,
            "POST",
            "/unenroll",
            Some(&serde_json::json!({ "pod": pod })),
        )?
        .to_string(),
    };
    println!("{out}");
    Ok(())
}

/// One HTTP/1.1 request over the agent's unix socket.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to agent admin socket {}", socket.display()))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .context("malformed response from agent")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("malformed status line from agent")?;
    let value: Value = serde_json::from_str(body).unwrap_or(Value::String(body.to_owned()));
    if !(200..300).contains(&status) {
        let msg = value
            .get("error")
            .and_then(Value::as_str)
            .map_or_else(|| value.to_string(), str::to_owned);
        bail!("agent answered {status}: {msg}");
    }
    Ok(value)
}

fn render_status(v: &Value) -> String {
    let mut out = format!(
        "node {}  up {}s  open connections {}\n\nenrolled pods:\n",
        v["node"].as_str().unwrap_or("?"),
        v["uptime_secs"],
        v["open_connections"]
    );
    for p in v["enrolled"].as_array().into_iter().flatten() {
        out += &format!(
            "  {:<24} cgroup {}\n",
            p["name"].as_str().unwrap_or("?"),
            p["cgroup_id"]
        );
    }
    out += "\nkernel decisions:\n";
    if let Some(d) = v["decisions"].as_object() {
        for (k, n) in d {
            out += &format!("  {k:<22} {n}\n");
        }
    }
    out
}

fn render_connections(rows: &[Value]) -> String {
    let mut out = format!(
        "{:<6} {:<8} {:<20} {:<22} {:<22} {:>12} {:>12} {:>8}\n",
        "ID", "STATE", "SOURCE POD", "PEER", "ORIGINAL DST", "SENT", "RECEIVED", "MS"
    );
    for c in rows {
        out += &format!(
            "{:<6} {:<8} {:<20} {:<22} {:<22} {:>12} {:>12} {:>8}\n",
            c["id"],
            c["state"].as_str().unwrap_or("?"),
            c["src_pod"].as_str().unwrap_or("-"),
            c["peer"].as_str().unwrap_or("?"),
            c["orig_dst"].as_str().unwrap_or("?"),
            c["bytes_sent"],
            c["bytes_received"],
            c["duration_ms"],
        );
    }
    out
}
