//! The tap: what this agent carries, as [`TapEvent`]s for `meshctl tap`.
//!
//! It costs nothing when nobody taps: every hook first asks [`Tap::active`]
//! (one atomic load) and builds no event otherwise. A slow tapper
//! never slows traffic: events go through a bounded broadcast ring that the
//! data path writes without waiting; a tapper that falls behind loses the
//! oldest events, is told how many ([`TapEvent::Dropped`]), and they are
//! counted (`mesh_agent_tap_dropped_events_total`).
use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use mesh_api::tap::{Direction, RequestEvent, TapEvent, TapFilter};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::sync::broadcast::{self, error::RecvError};

/// Events held for tappers that are behind, at most.
pub const BUFFER: usize = 4096;
/// A quiet stream sends an empty line this often.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a tapper lets events gather after the first before it takes
/// them all in one batch: short for a human, long for a busy data path.
const LINGER: std::time::Duration = std::time::Duration::from_millis(20);

pub struct Tap {
    tx: broadcast::Sender<Arc<TapEvent>>,
    /// Tappers now (`mesh_agent_tap_tappers`).
    pub tappers: Gauge,
    /// Events tappers fell too far behind to receive.
    pub dropped: Counter,
}

impl Default for Tap {
    fn default() -> Self {
        Tap::new(BUFFER)
    }
}

impl Tap {
    pub fn new(capacity: usize) -> Tap {
        Tap {
            tx: broadcast::channel(capacity).0,
            tappers: Gauge::default(),
            dropped: Counter::default(),
        }
    }

    /// Whether anyone taps: hooks build events only then.
    #[inline]
    pub fn active(&self) -> bool {
        self.tappers.get() > 0
    }

    /// Sends the event `make` builds, if anyone taps; never waits.
    #[inline]
    pub fn publish(&self, make: impl FnOnce() -> TapEvent) {
        if self.active() {
            let _ = self.tx.send(Arc::new(make()));
        }
    }

    pub fn subscribe(self: &Arc<Self>, filter: TapFilter) -> Tapper {
        // Counted before the receiver exists, so no event is built for a
        // tapper that is gone; at worst one is built for none.
        self.tappers.inc();
        Tapper {
            rx: self.tx.subscribe(),
            filter,
            tap: self.clone(),
        }
    }
}

/// One tapper's view of the stream; leaving drops it.
pub struct Tapper {
    rx: broadcast::Receiver<Arc<TapEvent>>,
    filter: TapFilter,
    tap: Arc<Tap>,
}

impl Drop for Tapper {
    fn drop(&mut self) {
        self.tap.tappers.dec();
    }
}

impl Tapper {
    /// The next event the filter lets through, or what was missed.
    pub async fn next(&mut self) -> Option<TapEvent> {
        loop {
            let got = self.rx.recv().await;
            match self.accept(got) {
                Got::End => return None,
                Got::Skip => {}
                Got::Event(event) => return Some((*event).clone()),
                Got::Dropped(dropped) => return Some(TapEvent::Dropped { dropped }),
            }
        }
    }

    /// What a tapper is given of one receipt.
    fn accept(&self, got: Result<Arc<TapEvent>, RecvError>) -> Got {
        match got {
            Ok(event) if self.filter.matches(&event) => Got::Event(event),
            Ok(_) => Got::Skip,
            Err(RecvError::Lagged(n)) => {
                self.tap.dropped.inc_by(n);
                Got::Dropped(n)
            }
            Err(RecvError::Closed) => Got::End,
        }
    }

    /// Appends, as JSON lines, the next event the filter lets through and
    /// then, after [`LINGER`], every event that came meanwhile (at most a
    /// ring's worth): one write and one wake-up per batch, not per event,
    /// which is what keeps a busy tap cheap for the agent. `false` when the
    /// stream ended.
    async fn next_batch(&mut self, out: &mut Vec<u8>) -> bool {
        loop {
            let got = self.rx.recv().await;
            match self.accept(got) {
                Got::End => return false,
                Got::Skip => {}
                got => {
                    got.write(out);
                    break;
                }
            }
        }
        tokio::time::sleep(LINGER).await;
        for _ in 0..BUFFER {
            let got = match self.rx.try_recv() {
                Ok(event) => Ok(event),
                Err(broadcast::error::TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(broadcast::error::TryRecvError::Closed) => Err(RecvError::Closed),
            };
            match self.accept(got) {
                Got::End => break,
                got => got.write(out),
            }
        }
        true
    }

    /// The stream as an HTTP body: one JSON event per line.
    pub fn into_body(
        self,
    ) -> StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send> {
        StreamBody::new(futures::stream::unfold(self, |mut tapper| async move {
            let mut out = Vec::new();
            // An empty line when nothing happened for a while: writing it is
            // how a tapper that left is noticed (and stops costing).
            match tokio::time::timeout(HEARTBEAT, tapper.next_batch(&mut out)).await {
                Ok(true) => {}
                Ok(false) => return None,
                Err(_) => out.push(b'\n'),
            }
            Some((Ok(Frame::data(Bytes::from(out))), tapper))
        }))
    }
}

/// One receipt from the ring, as a tapper sees it.
enum Got {
    End,
    /// The filter drops it.
    Skip,
    /// Serialized straight from the ring's copy, which all tappers share.
    Event(Arc<TapEvent>),
    Dropped(u64),
}

impl Got {
    /// Appends the receipt as a JSON line (nothing for a skipped one).
    fn write(self, out: &mut Vec<u8>) {
        let written = match self {
            Got::End | Got::Skip => return,
            Got::Event(event) => serde_json::to_writer(&mut *out, &*event),
            Got::Dropped(dropped) => {
                serde_json::to_writer(&mut *out, &TapEvent::Dropped { dropped })
            }
        };
        if written.is_ok() {
            out.push(b'\n');
        }
    }
}

/// A request's event as far as its arrival tells: the answer's fields are
/// filled in when it is sent.
pub fn request_event<B>(
    req: &http::Request<B>,
    direction: Direction,
    source_workload: Option<String>,
    source_identity: Option<String>,
    destination_service: Option<String>,
) -> RequestEvent {
    let authority = crate::proxy::http::respond::authority(req.uri(), req.headers())
        .unwrap_or_default()
        .to_owned();
    RequestEvent {
        start_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        direction: Some(direction),
        method: req.method().as_str().to_owned(),
        authority,
        path: req.uri().path().to_owned(),
        protocol: format!("{:?}", req.version()),
        request_bytes: content_length(req.headers()),
        source_workload,
        source_identity,
        destination_service,
        trace_id: trace_id(req.headers()),
        ..Default::default()
    }
}

/// A connection into a workload of this node, carried as bytes, as it
/// closed: from the tunnel (with the caller's identity) or from outside the
/// mesh (`:15006`).
pub struct InboundConnection {
    pub source_identity: Option<String>,
    pub source_workload: Option<String>,
    pub destination_workload: Option<String>,
    pub peer: std::net::SocketAddr,
    pub target: std::net::SocketAddrV4,
    pub started: std::time::SystemTime,
    pub start: std::time::Instant,
}

impl InboundConnection {
    pub fn event(self, sent: u64, received: u64, error: Option<String>) -> TapEvent {
        use mesh_api::admin::{ConnectionState, ConnectionView};
        TapEvent::Connection(mesh_api::tap::ConnectionEvent {
            direction: Direction::Inbound,
            source_identity: self.source_identity,
            source_workload: self.source_workload,
            destination_workload: self.destination_workload,
            connection: ConnectionView {
                id: 0,
                src_pod: None,
                src_cgroup_id: 0,
                peer: self.peer,
                orig_dst: std::net::SocketAddr::V4(self.target),
                service: None,
                upstream: Some(std::net::SocketAddr::V4(self.target)),
                started_unix_ms: self
                    .started
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                duration_ms: self.start.elapsed().as_millis() as u64,
                bytes_sent: sent,
                bytes_received: received,
                state: if error.is_some() {
                    ConnectionState::Failed
                } else {
                    ConnectionState::Closed
                },
                error,
            },
        })
    }
}

/// The declared body length.
pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`),
/// else of B3 (`x-b3-traceid`).
pub fn trace_id(headers: &http::HeaderMap) -> Option<String> {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        let mut parts = tp.split('-');
        if let (Some(_version), Some(id), Some(_span)) = (parts.next(), parts.next(), parts.next())
            && hex(id, 32)
        {
            return Some(id.to_ascii_lowercase());
        }
    }
    headers
        .get("x-b3-traceid")
        .and_then(|v| v.to_str().ok())
        .filter(|id| hex(id, 32) || hex(id, 16))
        .map(str::to_ascii_lowercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop_event(n: u64) -> TapEvent {
        TapEvent::Dropped { dropped: n }
    }

    #[tokio::test]
    async fn nothing_is_built_without_a_tapper_and_a_slow_one_is_told_what_it_missed() {
        let tap = Arc::new(Tap::new(4));
        let mut built = 0;
        tap.publish(|| {
            built += 1;
            drop_event(0)
        });
        assert_eq!(built, 0, "no tapper, no event");
        assert!(!tap.active());

        let mut tapper = tap.subscribe(TapFilter::default());
        assert!(tap.active());
        // Ten events into a ring of four, without waiting for the tapper.
        for i in 1..=10 {
            tap.publish(|| drop_event(100 + i));
        }
        assert_eq!(tapper.next().await, Some(drop_event(6)), "six were lost");
        assert_eq!(tap.dropped.get(), 6);
        for i in 7..=10 {
            assert_eq!(tapper.next().await, Some(drop_event(100 + i)));
        }
        drop(tapper);
        assert!(!tap.active(), "a tapper that leaves stops the events");
    }

    #[test]
    fn trace_ids_come_from_traceparent_then_b3() {
        let mut h = http::HeaderMap::new();
        assert_eq!(trace_id(&h), None);
        h.insert(
            "x-b3-traceid",
            "80F198EE56343BA864FE8B2A57D3EFF7".parse().unwrap(),
        );
        assert_eq!(
            trace_id(&h).as_deref(),
            Some("80f198ee56343ba864fe8b2a57d3eff7")
        );
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            trace_id(&h).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        h.insert(
            "traceparent",
            "00-nothex-00f067aa0ba902b7-01".parse().unwrap(),
        );
        assert_eq!(
            trace_id(&h).as_deref(),
            Some("80f198ee56343ba864fe8b2a57d3eff7"),
            "a malformed traceparent falls back to B3"
        );
    }

    #[tokio::test]
    async fn the_filter_is_applied_before_the_tapper_sees_an_event() {
        let tap = Arc::new(Tap::new(16));
        let mut tapper = tap.subscribe(TapFilter {
            status: Some(500),
            ..Default::default()
        });
        for code in [200, 500, 404] {
            tap.publish(|| {
                TapEvent::Request(RequestEvent {
                    code,
                    ..Default::default()
                })
            });
        }
        match tapper.next().await {
            Some(TapEvent::Request(r)) => assert_eq!(r.code, 500),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_busy_stream_is_written_in_batches_not_an_event_at_a_time() {
        use http_body_util::BodyExt;
        let tap = Arc::new(Tap::new(1024));
        let mut body = Box::pin(tap.subscribe(TapFilter::default()).into_body());
        let publisher = {
            let tap = tap.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    tap.publish(|| drop_event(i));
                }
            })
        };
        publisher.await.unwrap();
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let lines: Vec<serde_json::Value> = std::str::from_utf8(&frame)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 100, "one frame carries the whole burst");
        assert_eq!(lines[99]["dropped"], 99);
        assert_eq!(tap.dropped.get(), 0);
    }
}
