//! `meshctl top`: a live table of request rate, success rate and latency
//! percentiles per route, Service or pod, from one agent's tap stream
//! (the requests its pods make, or with `--inbound` the ones they receive,
//! so each request is counted once, as `mesh_agent_http_requests_total`
//! counts it). In a terminal it refreshes in place (ratatui, `q` or Ctrl-C
//! to leave); piped, it prints a plain table at each refresh.
use std::{
    collections::{BTreeMap, VecDeque},
    io::{IsTerminal, Write},
    path::Path,
    sync::mpsc,
    time::{Duration, Instant},
};

use clap::ValueEnum;
use mesh_api::tap::{Direction, RequestEvent, TapEvent, TapFilter};

use crate::tap::Events;

/// What a row is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum By {
    #[default]
    Route,
    Service,
    /// The pod of this node: the caller (outbound) or the callee (inbound).
    Pod,
}

/// Rate and latency are over this much of the recent past.
const WINDOW: Duration = Duration::from_secs(10);
/// Latencies kept per row, at most (the newest).
const SAMPLES: usize = 8192;

pub const HEADERS: [&str; 8] = [
    "NAME", "REQUESTS", "RPS", "SUCCESS", "P50 MS", "P95 MS", "P99 MS", "DROPPED",
];

#[derive(Default)]
struct Stat {
    requests: u64,
    successes: u64,
    /// (when, latency ms) of recent requests.
    recent: VecDeque<(Instant, f64)>,
}

/// The aggregation: pure, fed events with the time they arrived.
pub struct Top {
    by: By,
    direction: Direction,
    stats: BTreeMap<String, Stat>,
    started: Instant,
    dropped: u64,
}

/// One row, ready to print.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub name: String,
    pub requests: u64,
    pub rps: f64,
    /// Percent of all requests that succeeded (no 5xx, gRPC OK).
    pub success: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Top {
    pub fn new(by: By, direction: Direction, now: Instant) -> Top {
        Top {
            by,
            direction,
            stats: BTreeMap::new(),
            started: now,
            dropped: 0,
        }
    }

    pub fn record(&mut self, event: &TapEvent, now: Instant) {
        let r = match event {
            TapEvent::Request(r) if r.direction == Some(self.direction) => r,
            TapEvent::Dropped { dropped } => {
                self.dropped += dropped;
                return;
            }
            _ => return,
        };
        let stat = self.stats.entry(self.key(r)).or_default();
        stat.requests += 1;
        let ok = r.code < 500 && r.grpc_status.as_deref().is_none_or(|g| g == "0");
        stat.successes += u64::from(ok);
        stat.recent.push_back((now, r.duration_ms));
        if stat.recent.len() > SAMPLES {
            stat.recent.pop_front();
        }
    }

    fn key(&self, r: &RequestEvent) -> String {
        let or = |v: &Option<String>, what: &str| v.clone().unwrap_or_else(|| what.to_owned());
        match self.by {
            By::Route => match &r.route {
                Some(route) => route.clone(),
                None => format!("(no route) {}", or(&r.destination_service, "-")),
            },
            By::Service => or(&r.destination_service, "(no Service)"),
            By::Pod => match self.direction {
                Direction::Outbound => or(&r.source_workload, "(unknown pod)"),
                Direction::Inbound => or(&r.destination_workload, "(unknown pod)"),
            },
        }
    }

    /// The rows, busiest first.
    pub fn rows(&mut self, now: Instant) -> Vec<Row> {
        let window = WINDOW
            .min(now.duration_since(self.started))
            .max(Duration::from_secs(1));
        let mut rows: Vec<Row> = self
            .stats
            .iter_mut()
            .map(|(name, s)| {
                while s
                    .recent
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > WINDOW)
                {
                    s.recent.pop_front();
                }
                let mut ms: Vec<f64> = s.recent.iter().map(|(_, l)| *l).collect();
                ms.sort_by(f64::total_cmp);
                let pct = |p: f64| {
                    if ms.is_empty() {
                        f64::NAN
                    } else {
                        ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1]
                    }
                };
                Row {
                    name: name.clone(),
                    requests: s.requests,
                    rps: s.recent.len() as f64 / window.as_secs_f64(),
                    success: 100.0 * s.successes as f64 / s.requests.max(1) as f64,
                    p50: pct(0.50),
                    p95: pct(0.95),
                    p99: pct(0.99),
                }
            })
            .collect();
        rows.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.name.cmp(&b.name)));
        rows
    }

    pub fn cells(&mut self, now: Instant) -> Vec<[String; 8]> {
        let ms = |v: f64| {
            if v.is_nan() {
                "-".to_owned()
            } else {
                format!("{v:.2}")
            }
        };
        let dropped = self.dropped.to_string();
        self.rows(now)
            .into_iter()
            .map(|r| {
                [
                    r.name,
                    r.requests.to_string(),
                    format!("{:.1}", r.rps),
                    format!("{:.1}%", r.success),
                    ms(r.p50),
                    ms(r.p95),
                    ms(r.p99),
                    dropped.clone(),
                ]
            })
            .collect()
    }
}

/// Plain text: columns as wide as their widest cell.
pub fn plain(rows: &[[String; 8]]) -> String {
    let mut widths = HEADERS.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(&HEADERS.map(str::to_owned));
    for r in rows {
        out.push('\n');
        out += &line(r);
    }
    out
}

/// Runs until interrupted (or `refreshes` tables were shown).
pub fn run(
    socket: &Path,
    filter: &TapFilter,
    by: By,
    inbound: bool,
    interval: Duration,
    refreshes: Option<u64>,
) -> anyhow::Result<()> {
    let mut events = Events::open(socket, filter)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(Some(event)) = events.next_event() {
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    let direction = if inbound {
        Direction::Inbound
    } else {
        Direction::Outbound
    };
    let mut top = Top::new(by, direction, Instant::now());
    if std::io::stdout().is_terminal() {
        live(&mut top, &rx, interval, refreshes)
    } else {
        let mut out = std::io::stdout();
        let mut shown = 0;
        while refreshes.is_none_or(|n| shown < n) {
            drain(&mut top, &rx, interval)?;
            writeln!(out, "{}\n", plain(&top.cells(Instant::now())))?;
            out.flush()?;
            shown += 1;
        }
        Ok(())
    }
}

/// Feeds `top` what arrives for `interval`; an error if the agent left.
fn drain(top: &mut Top, rx: &mpsc::Receiver<TapEvent>, interval: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + interval;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(event) => top.record(&event, Instant::now()),
            Err(mpsc::RecvTimeoutError::Timeout) => return Ok(()),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("the agent closed the tap stream")
            }
        }
    }
}

/// The table in place, in the terminal's alternate screen.
fn live(
    top: &mut Top,
    rx: &mpsc::Receiver<TapEvent>,
    interval: Duration,
    refreshes: Option<u64>,
) -> anyhow::Result<()> {
    use ratatui::{
        crossterm::event::{self, Event, KeyCode, KeyModifiers},
        layout::Constraint,
        style::{Modifier, Style},
        widgets::{Block, Row as TableRow, Table},
    };
    let mut terminal = ratatui::try_init()?;
    let started = Instant::now();
    let mut shown = 0;
    let result = (|| -> anyhow::Result<()> {
        while refreshes.is_none_or(|n| shown < n) {
            drain(top, rx, interval)?;
            let cells = top.cells(Instant::now());
            terminal.draw(|frame| {
                let widths = [
                    Constraint::Min(30),
                    Constraint::Length(9),
                    Constraint::Length(8),
                    Constraint::Length(8),
                    Constraint::Length(8),
                    Constraint::Length(8),
                    Constraint::Length(8),
                    Constraint::Length(8),
                ];
                let table = Table::new(cells.iter().map(|c| TableRow::new(c.clone())), widths)
                    .header(
                        TableRow::new(HEADERS).style(Style::default().add_modifier(Modifier::BOLD)),
                    )
                    .block(Block::bordered().title(format!(
                        " meshctl top: {}s, q to quit ",
                        started.elapsed().as_secs()
                    )));
                frame.render_widget(table, frame.area());
            })?;
            shown += 1;
            while event::poll(Duration::ZERO)? {
                if let Event::Key(k) = event::read()?
                    && (k.code == KeyCode::Char('q')
                        || (k.code == KeyCode::Char('c')
                            && k.modifiers.contains(KeyModifiers::CONTROL)))
                {
                    return Ok(());
                }
            }
        }
        Ok(())
    })();
    ratatui::try_restore()?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(route: &str, code: u16, ms: f64) -> TapEvent {
        TapEvent::Request(RequestEvent {
            direction: Some(Direction::Outbound),
            route: Some(route.into()),
            destination_service: Some("default/web".into()),
            source_workload: Some("default/client".into()),
            code,
            duration_ms: ms,
            ..Default::default()
        })
    }

    #[test]
    fn rows_count_rate_success_and_percentiles() {
        let t0 = Instant::now();
        let mut top = Top::new(By::Route, Direction::Outbound, t0);
        for i in 1..=100 {
            top.record(
                &req("default/a", if i <= 10 { 503 } else { 200 }, i as f64),
                t0,
            );
        }
        top.record(&req("default/b", 200, 5.0), t0);
        // Inbound events are another agent's count of the same requests.
        let mut inbound = req("default/a", 200, 1.0);
        if let TapEvent::Request(r) = &mut inbound {
            r.direction = Some(Direction::Inbound);
        }
        top.record(&inbound, t0);
        let rows = top.rows(t0 + Duration::from_secs(10));
        assert_eq!(rows.len(), 2);
        let a = &rows[0];
        assert_eq!((a.name.as_str(), a.requests), ("default/a", 100));
        assert!((a.rps - 10.0).abs() < 1e-9, "{}", a.rps);
        assert!((a.success - 90.0).abs() < 1e-9);
        assert_eq!((a.p50, a.p95, a.p99), (50.0, 95.0, 99.0));
        // Outside the window: counts stay, rate and latency go.
        let later = top.rows(t0 + Duration::from_secs(30));
        assert_eq!(later[0].requests, 100);
        assert_eq!(later[0].rps, 0.0);
        assert!(later[0].p50.is_nan());
    }

    #[test]
    fn rows_by_service_and_pod_and_plain_text_lines_up() {
        let t0 = Instant::now();
        for (by, name) in [(By::Service, "default/web"), (By::Pod, "default/client")] {
            let mut top = Top::new(by, Direction::Outbound, t0);
            top.record(&req("default/a", 200, 1.0), t0);
            top.record(&req("default/b", 200, 1.0), t0);
            assert_eq!(top.rows(t0)[0].name, name);
            assert_eq!(top.rows(t0)[0].requests, 2);
        }
        let mut top = Top::new(By::Route, Direction::Outbound, t0);
        top.record(&req("default/a-long-route-name", 200, 1.5), t0);
        top.record(&TapEvent::Dropped { dropped: 3 }, t0);
        let text = plain(&top.cells(t0));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].find("REQUESTS"),
            lines[1].find(" 1 ").map(|i| i + 1)
        );
        assert!(lines[1].ends_with(" 3"), "drops shown: {text}");
    }
}
