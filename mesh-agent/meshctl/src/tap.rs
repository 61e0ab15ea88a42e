//! `meshctl tap`: the live stream of one node agent's requests and
//! connections (`GET /tap` on its admin socket), as lines that line up or
//! as JSON (one event per line), until interrupted or `--count` events.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{Context, bail};
use mesh_api::tap::{ConnectionEvent, RequestEvent, TapEvent, TapFilter};

/// Columns of the table, as wide as their usual content.
const COLUMNS: [(&str, usize); 9] = [
    ("DIR", 3),
    ("SOURCE", 28),
    ("DESTINATION", 28),
    ("REQUEST", 30),
    ("STATUS", 6),
    ("MS", 8),
    ("FLAGS", 6),
    ("ROUTE", 18),
    ("VERDICT", 0),
];

/// Streams events from the agent at `socket` to `out`; stops after `count`
/// events (drop notices included) if given.
pub fn run(
    socket: &Path,
    filter: &TapFilter,
    json: bool,
    count: Option<u64>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut events = Events::open(socket, filter)?;
    if !json {
        writeln!(out, "{}", row(COLUMNS.map(|(h, _)| h.to_owned())))?;
        out.flush()?;
    }
    let mut seen = 0u64;
    while count.is_none_or(|c| seen < c) {
        if json {
            // The agent's JSON as it is (one event per line): a busy tap
            // costs this process a copy, not a parse and a print.
            let Some(line) = events.next_line()? else {
                break;
            };
            writeln!(out, "{line}")?;
        } else {
            let Some(event) = events.next_event()? else {
                break;
            };
            writeln!(out, "{}", render(&event))?;
        }
        seen += 1;
        // A burst is written at once; a quiet stream shows each event.
        if events.caught_up() || count.is_some_and(|c| seen >= c) {
            out.flush()?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The agent's tap stream, event by event.
pub struct Events {
    reader: BufReader<UnixStream>,
    line: String,
}

impl Events {
    /// Subscribes to the agent at `socket`; its answer is checked.
    pub fn open(socket: &Path, filter: &TapFilter) -> anyhow::Result<Events> {
        let mut stream = UnixStream::connect(socket).with_context(|| {
            format!(
                "no agent answers on {} (is mesh-agent running on this node? pass --admin)",
                socket.display()
            )
        })?;
        // HTTP/1.0: the body runs until the agent closes, line by line.
        let query = filter.to_query();
        write!(
            stream,
            "GET /tap{}{query} HTTP/1.0\r\nHost: agent\r\n\r\n",
            if query.is_empty() { "" } else { "?" }
        )?;
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status)?;
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("{}: not an HTTP answer: {status:?}", socket.display()))?;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
        }
        if code != 200 {
            let mut body = String::new();
            std::io::Read::read_to_string(&mut reader, &mut body)?;
            let error =
                serde_json::from_str::<mesh_api::admin::ErrorBody>(&body).map_or(body, |e| e.error);
            bail!("the agent refused the tap: {error}");
        }
        Ok(Events { reader, line })
    }

    /// The next event; `None` when the agent closed the stream.
    pub fn next_event(&mut self) -> anyhow::Result<Option<TapEvent>> {
        let Some(line) = self.next_line()? else {
            return Ok(None);
        };
        let event = serde_json::from_str(line)
            .with_context(|| format!("the agent sent an unreadable event: {line:?}"))?;
        Ok(Some(event))
    }

    /// The next event's JSON line as the agent sent it (heartbeats
    /// skipped); `None` when the agent closed the stream.
    pub fn next_line(&mut self) -> anyhow::Result<Option<&str>> {
        loop {
            self.line.clear();
            if self.reader.read_line(&mut self.line)? == 0 {
                return Ok(None);
            }
            if !self.line.trim().is_empty() {
                return Ok(Some(self.line.trim()));
            }
            // The agent's heartbeat.
        }
    }

    /// Whether every line the agent sent so far has been read: the moment
    /// to flush what was written of them.
    pub fn caught_up(&self) -> bool {
        self.reader.buffer().is_empty()
    }
}

/// One event as a table row.
pub fn render(event: &TapEvent) -> String {
    match event {
        TapEvent::Request(r) => row(request_cells(r)),
        TapEvent::Connection(c) => row(connection_cells(c)),
        TapEvent::Dropped { dropped } => {
            format!("-- {dropped} events dropped: this tap fell behind")
        }
    }
}

fn request_cells(r: &RequestEvent) -> [String; 9] {
    let dir = match r.direction {
        Some(mesh_api::tap::Direction::Inbound) => "in",
        _ => "out",
    };
    let source = r
        .source_workload
        .clone()
        .or_else(|| r.source_ip.map(|ip| ip.to_string()))
        .unwrap_or_else(|| "-".into());
    let destination = r
        .destination_service
        .clone()
        .or_else(|| r.destination_workload.clone())
        .unwrap_or_else(|| "-".into());
    let status = match &r.grpc_status {
        Some(g) => format!("{} g{g}", r.code),
        None => r.code.to_string(),
    };
    [
        dir.into(),
        source,
        destination,
        format!("{} {}", r.method, r.path),
        status,
        format!("{:.1}", r.duration_ms),
        if r.flags.is_empty() {
            "-".into()
        } else {
            r.flags.clone()
        },
        r.route.clone().unwrap_or_else(|| "-".into()),
        r.verdict.clone().unwrap_or_else(|| "-".into()),
    ]
}

fn connection_cells(c: &ConnectionEvent) -> [String; 9] {
    let v = &c.connection;
    let destination = v
        .service
        .clone()
        .or_else(|| c.destination_workload.clone())
        .unwrap_or_else(|| v.orig_dst.to_string());
    let source = v
        .src_pod
        .clone()
        .or_else(|| c.source_workload.clone())
        .or_else(|| c.source_identity.clone())
        .unwrap_or_else(|| v.peer.to_string());
    [
        "tcp".into(),
        source,
        destination,
        format!("{} B out, {} B in", v.bytes_sent, v.bytes_received),
        format!("{:?}", v.state).to_lowercase(),
        v.duration_ms.to_string(),
        "-".into(),
        "-".into(),
        v.error.clone().unwrap_or_else(|| "-".into()),
    ]
}

/// Cells padded to the column widths (a longer cell pushes the rest right
/// by its excess, never truncated: nothing is hidden).
fn row(cells: [String; 9]) -> String {
    let mut out = String::new();
    for (cell, (_, width)) in cells.iter().zip(COLUMNS) {
        out += &format!("{cell:<width$}  ");
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_line_up_under_their_headers() {
        let header = row(COLUMNS.map(|(h, _)| h.to_owned()));
        let r = RequestEvent {
            direction: Some(mesh_api::tap::Direction::Inbound),
            method: "GET".into(),
            path: "/items".into(),
            code: 403,
            duration_ms: 1.25,
            flags: "AD".into(),
            source_workload: Some("default/web".into()),
            destination_service: Some("shop/cart".into()),
            verdict: Some("deny (shop/cart rule 0)".into()),
            ..Default::default()
        };
        let line = render(&TapEvent::Request(r));
        for (name, cell) in [
            ("SOURCE", "default/web"),
            ("DESTINATION", "shop/cart"),
            ("REQUEST", "GET /items"),
            ("STATUS", "403"),
            ("MS", "1.2"),
            ("FLAGS", "AD"),
            ("VERDICT", "deny (shop/cart rule 0)"),
        ] {
            assert_eq!(
                header.find(name),
                line.find(cell),
                "{name} lines up:\n{header}\n{line}"
            );
        }
    }
}
