//! Distributed tracing: a span per hop, exported over OTLP gRPC.
//!
//! The caller's agent starts a CLIENT span for each request a pod sends
//! (`outbound <service>`), the destination's agent a SERVER span for each
//! request it delivers (`inbound <service>`); each sends the request on with
//! a `traceparent` (and, when the request came with B3, B3 headers in the
//! form it came) whose parent is its own span, so the two agents' spans and
//! the workloads' join into one trace. A request without context starts a
//! trace at the caller's agent. Sampling is parent-based: an incoming
//! sampled flag is obeyed; a new trace is kept with `--trace-sampling`.
//!
//! Without `--otlp-endpoint` nothing here runs: every hook first asks
//! [`Tracing::enabled`] (one load). Ended spans go into a bounded queue the
//! data path never waits on; a task sends them in batches. Spans dropped
//! because the queue was full or the collector failed are counted
//! (`mesh_agent_trace_spans_dropped_total{reason}`).
//!
//! The SDK's own batch processor is not used because it does not tell how
//! many spans it dropped.
use std::{
    borrow::Cow,
    net::{Ipv4Addr, SocketAddrV4},
    sync::OnceLock,
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use mesh_api::identity::SpiffeId;
use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{
        Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
        TraceState, Tracer as _,
    },
};
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::{
    proxy::http::{FLAGS_HEADER, SERVICE_HEADER, TARGET_HEADER},
    state::{PodId, State, StateRx},
};

/// Ended spans waiting for the exporter, at most (the SDK's default).
pub const QUEUE: usize = 2048;
/// Spans sent in one export, at most.
const MAX_BATCH: usize = 512;
/// A batch is sent when full or this long after its first span.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// One export waits this long for the collector, at most.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

const B3_SINGLE: &str = "b3";
const B3_TRACE_ID: &str = "x-b3-traceid";
const B3_SPAN_ID: &str = "x-b3-spanid";
const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
const B3_SAMPLED: &str = "x-b3-sampled";
const B3_FLAGS: &str = "x-b3-flags";

/// How the agent exports: `--otlp-endpoint`, `--trace-sampling`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// OTLP gRPC endpoint, `http://host:port`.
    pub endpoint: String,
    /// Share of new traces kept, 0..=1.
    pub sampling: f64,
    /// This node's name: the `k8s.node.name` of every span's resource.
    pub node: String,
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--otlp-endpoint {0:?}: expected http://host:port (OTLP gRPC, plaintext)")]
    Endpoint(String),
    #[error("--trace-sampling {0}: expected a share between 0 and 1")]
    Sampling(f64),
    #[error("building the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("tracing is already started")]
    Started,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DroppedLabels {
    /// `queue_full` or `export_failed`.
    pub reason: &'static str,
}

/// The agent's tracing: off until [`Tracing::start`].
#[derive(Default)]
pub struct Tracing {
    exporting: OnceLock<Exporting>,
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Spans lost, by reason.
    pub dropped: Family<DroppedLabels, Counter>,
}

struct Exporting {
    /// Kept: dropping it would stop the tracer.
    _provider: SdkTracerProvider,
    tracer: SdkTracer,
    sampling: f64,
    /// Asks the sending task to send what is queued now.
    flush: mpsc::Sender<oneshot::Sender<()>>,
}

/// A `--trace-sampling` value.
pub fn parse_sampling(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number between 0 and 1"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} is not between 0 and 1"))
    }
}

/// A `--otlp-endpoint` value: `http://host:port`. TLS to the collector is
/// not offered: run one on the node or in its network.
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL ({e})"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(_)) => Ok(s.to_owned()),
        (Some("https"), _) => Err(format!(
            "{s:?}: TLS to the collector is not supported; use http:// to a collector on the node's network"
        )),
        _ => Err(format!("{s:?}: expected http://host:port")),
    }
}

impl Tracing {
    /// Whether spans are made: hooks do nothing otherwise.
    #[inline]
    pub fn enabled(&self) -> bool {
        self.exporting.get().is_some()
    }

    /// Sends the spans queued now, waiting at most `timeout` (a stopping
    /// agent's last spans).
    pub async fn flush(&self, timeout: Duration) {
        let Some(ex) = self.exporting.get() else {
            return;
        };
        let (done, answered) = oneshot::channel();
        let flushed = async {
            if ex.flush.send(done).await.is_ok() {
                let _ = answered.await;
            }
        };
        if tokio::time::timeout(timeout, flushed).await.is_err() {
            warn!(?timeout, "spans still queued at shutdown are lost");
        }
    }

    /// Starts exporting to `settings.endpoint`. Call once, in the runtime
    /// (the exporter's channel and the sending task live there).
    pub fn start(&self, settings: &Settings) -> Result<(), Error> {
        parse_endpoint(&settings.endpoint)
            .map_err(|_| Error::Endpoint(settings.endpoint.clone()))?;
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(&settings.endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|source| Error::Exporter {
                endpoint: settings.endpoint.clone(),
                source,
            })?;
        self.start_with(settings, exporter)?;
        info!(endpoint = %settings.endpoint, sampling = settings.sampling, "exporting spans over OTLP");
        Ok(())
    }

    fn start_with<E: SpanExporter + 'static>(
        &self,
        settings: &Settings,
        mut exporter: E,
    ) -> Result<(), Error> {
        if !(0.0..=1.0).contains(&settings.sampling) {
            return Err(Error::Sampling(settings.sampling));
        }
        if self.enabled() {
            return Err(Error::Started);
        }
        let resource = Resource::builder_empty()
            .with_service_name("mesh-agent")
            .with_attribute(KeyValue::new("k8s.node.name", settings.node.clone()))
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        exporter.set_resource(&resource);
        let (tx, rx) = mpsc::channel(QUEUE);
        let queue = Queue {
            tx,
            dropped: self.dropped.clone(),
        };
        let (flush, flushes) = mpsc::channel(1);
        let sender = Sender {
            exporter,
            exported: self.exported.clone(),
            dropped: self.dropped.clone(),
            failing: false,
        };
        tokio::spawn(send_batches(sender, rx, flushes));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(queue)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sampling,
            ))))
            .with_resource(resource)
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "mesh-agent");
        self.exporting
            .set(Exporting {
                _provider: provider,
                tracer,
                sampling: settings.sampling,
                flush,
            })
            .map_err(|_| Error::Started)
    }

    /// The CLIENT span of a request a pod of this node sent to `service`;
    /// its headers are pointed at the span. `None` when tracing is off.
    pub fn outbound<B>(
        &self,
        req: &mut Request<B>,
        state: &StateRx,
        src_pod: Option<&PodId>,
        service: &str,
    ) -> Option<HopSpan> {
        let ex = self.exporting.get()?;
        let mut span = ex.start(req, format!("outbound {service}"), SpanKind::Client);
        if span.span.is_recording() {
            span.span.set_attribute(KeyValue::new(
                "mesh.destination.service",
                service.to_owned(),
            ));
            if let Some(pod) = src_pod {
                span.span
                    .set_attribute(KeyValue::new("mesh.source.workload", pod.to_string()));
                let state = state.borrow();
                if let Some(id) = state.local_workload(pod).and_then(|w| w.identity.as_ref()) {
                    span.span
                        .set_attribute(KeyValue::new("mesh.source.identity", id.to_string()));
                }
            }
        }
        Some(span)
    }

    /// The SERVER span of a request another agent tunnelled here, from the
    /// agent whose identity is `source`.
    pub fn tunnelled<B>(
        &self,
        req: &mut Request<B>,
        state: &State,
        source: &SpiffeId,
    ) -> Option<HopSpan> {
        if !self.enabled() {
            return None;
        }
        let target = req
            .headers()
            .get(TARGET_HEADER)
            .and_then(|v| v.to_str().ok()?.parse::<SocketAddrV4>().ok());
        let source_ip = crate::authz::claimed_source(req.headers(), state, source);
        self.inbound(req, state, Some(source), target, source_ip)
    }

    /// The SERVER span of a request this agent delivers to the workload at
    /// `target`: tunnelled from `source`, or plaintext (`source` `None`).
    pub fn inbound<B>(
        &self,
        req: &mut Request<B>,
        state: &State,
        source: Option<&SpiffeId>,
        target: Option<SocketAddrV4>,
        source_ip: Ipv4Addr,
    ) -> Option<HopSpan> {
        let ex = self.exporting.get()?;
        // The caller's agent names the Service (`namespace/name:port`).
        let service = req
            .headers()
            .get(SERVICE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.rsplit_once(':').map_or(s, |(name, _)| name).to_owned());
        let name = match (&service, target) {
            (Some(s), _) => format!("inbound {s}"),
            (None, Some(t)) => format!("inbound {t}"),
            (None, None) => "inbound".to_owned(),
        };
        let mut span = ex.start(req, name, SpanKind::Server);
        if span.span.is_recording() {
            let s = &mut span.span;
            if let Some(service) = service {
                s.set_attribute(KeyValue::new("mesh.destination.service", service));
            }
            if let Some(id) = source {
                s.set_attribute(KeyValue::new("mesh.source.identity", id.to_string()));
            }
            if !source_ip.is_unspecified() {
                s.set_attribute(KeyValue::new("client.address", source_ip.to_string()));
                if let Some(w) = state.workload_by_ip(source_ip) {
                    s.set_attribute(KeyValue::new(
                        "mesh.source.workload",
                        format!("{}/{}", w.namespace, w.name),
                    ));
                }
            }
            if let Some(t) = target {
                peer_attributes(s, state, t);
            }
        }
        Some(span)
    }
}

impl Exporting {
    /// A span whose parent is the request's context, if it has one; the
    /// request's headers are rewritten to name the new span as the parent.
    fn start<B>(&self, req: &mut Request<B>, name: String, kind: SpanKind) -> HopSpan {
        let incoming = extract(req.headers(), self.sampling);
        let parent = match &incoming.parent {
            Some(sc) => Context::new().with_remote_span_context(sc.clone()),
            None => Context::new(),
        };
        let mut attributes = vec![
            KeyValue::new("http.request.method", req.method().as_str().to_owned()),
            KeyValue::new("url.path", req.uri().path().to_owned()),
        ];
        if let Some(a) = crate::proxy::http::respond::authority(req.uri(), req.headers()) {
            attributes.push(KeyValue::new("server.address", a.to_owned()));
        }
        let span = self
            .tracer
            .span_builder(Cow::Owned(name))
            .with_kind(kind.clone())
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        inject(
            req.headers_mut(),
            span.span_context(),
            incoming.parent.as_ref().map(SpanContext::span_id),
            incoming.b3,
        );
        HopSpan { span, kind }
    }
}

/// The destination of a hop: its address, workload and identity.
fn peer_attributes(s: &mut Span, state: &State, addr: SocketAddrV4) {
    s.set_attribute(KeyValue::new("network.peer.address", addr.ip().to_string()));
    s.set_attribute(KeyValue::new("network.peer.port", i64::from(addr.port())));
    if let Some(w) = state.workload_by_ip(*addr.ip()) {
        s.set_attribute(KeyValue::new(
            "mesh.destination.workload",
            format!("{}/{}", w.namespace, w.name),
        ));
        if let Some(id) = &w.identity {
            s.set_attribute(KeyValue::new("mesh.destination.identity", id.to_string()));
        }
    }
}

/// One hop's span; ended by [`HopSpan::end`] (or when dropped, as a request
/// whose client went away).
pub struct HopSpan {
    span: Span,
    kind: SpanKind,
}

impl HopSpan {
    /// The caller's side: the route that served the request, the endpoint of
    /// its last try, the mesh's flags (`-` or empty for none) and the answer.
    pub fn end_outbound<B>(
        mut self,
        state: &StateRx,
        route: &str,
        upstream: Option<SocketAddrV4>,
        flags: &str,
        resp: &Response<B>,
    ) {
        if self.span.is_recording() {
            if !route.is_empty() {
                self.span
                    .set_attribute(KeyValue::new("http.route", route.to_owned()));
            }
            if let Some(up) = upstream {
                peer_attributes(&mut self.span, &state.borrow(), up);
            }
        }
        self.end(flags, resp);
    }

    /// Ends the span with the answer's status, gRPC status and flags.
    pub fn end<B>(mut self, flags: &str, resp: &Response<B>) {
        if self.span.is_recording() {
            let s = &mut self.span;
            let code = resp.status().as_u16();
            s.set_attribute(KeyValue::new("http.response.status_code", i64::from(code)));
            let grpc: Option<i64> = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse().ok());
            if let Some(g) = grpc {
                s.set_attribute(KeyValue::new("rpc.grpc.status_code", g));
            }
            let flags = match flags {
                "" | "-" => resp
                    .headers()
                    .get(FLAGS_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default(),
                f => f,
            };
            if !flags.is_empty() {
                s.set_attribute(KeyValue::new("mesh.response_flags", flags.to_owned()));
            }
            // Semantic conventions: 4xx is a failure of a client span only.
            let failed = code >= 500
                || (code >= 400 && self.kind == SpanKind::Client)
                || grpc.is_some_and(|g| g != 0);
            if failed {
                s.set_status(Status::error(if flags.is_empty() {
                    format!("status {code}")
                } else {
                    format!("status {code}, flags {flags}")
                }));
            }
        }
        self.span.end();
    }
}

/// The trace context a request arrived with.
#[derive(Debug, Default, PartialEq)]
pub struct Incoming {
    /// The caller's span, if the request names a valid one.
    pub parent: Option<SpanContext>,
    /// B3 headers to send on, in the form they came.
    pub b3: B3,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum B3 {
    #[default]
    None,
    /// `X-B3-TraceId`, `X-B3-SpanId`, ...
    Multi,
    /// One `b3` header.
    Single,
}

/// The request's context: W3C `traceparent`/`tracestate`, else B3 (single
/// `b3`, else multi). Malformed headers count as absent. A B3 context that
/// leaves sampling to the receiver gets the decision for a new trace
/// (`sampling`).
pub fn extract(headers: &HeaderMap, sampling: f64) -> Incoming {
    let b3 = if headers.contains_key(B3_SINGLE) {
        B3::Single
    } else if headers.contains_key(B3_TRACE_ID) {
        B3::Multi
    } else {
        B3::None
    };
    let cx = TraceContextPropagator::new().extract(&Headers(headers));
    let w3c = cx.span().span_context().clone();
    let parent = if w3c.is_valid() {
        Some(w3c)
    } else {
        match b3 {
            B3::Single => b3_single(headers, sampling),
            B3::Multi => b3_multi(headers, sampling),
            B3::None => None,
        }
    };
    Incoming { parent, b3 }
}

/// A remote span context from B3 parts; `sampled` `None` is "deferred".
fn b3_context(
    trace: &str,
    span: &str,
    sampled: Option<bool>,
    sampling: f64,
) -> Option<SpanContext> {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !(hex(trace, 32) || hex(trace, 16)) || !hex(span, 16) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let sampled = sampled.unwrap_or_else(|| ratio_keeps(trace_id, sampling));
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let sc = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    sc.is_valid().then_some(sc)
}

/// B3's sampling state: `1`/`true`/`d` (debug) sampled, `0`/`false` not.
fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn b3_single(headers: &HeaderMap, sampling: f64) -> Option<SpanContext> {
    let v = headers.get(B3_SINGLE)?.to_str().ok()?.trim();
    // `{TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]`; a lone
    // sampling state carries no context.
    let mut parts = v.split('-');
    let (trace, span) = (parts.next()?, parts.next()?);
    let sampled = parts.next().and_then(b3_sampled);
    b3_context(trace, span, sampled, sampling)
}

fn b3_multi(headers: &HeaderMap, sampling: f64) -> Option<SpanContext> {
    let get = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let sampled = if get(B3_FLAGS) == Some("1") {
        Some(true)
    } else {
        get(B3_SAMPLED).and_then(b3_sampled)
    };
    b3_context(get(B3_TRACE_ID)?, get(B3_SPAN_ID)?, sampled, sampling)
}

/// The SDK's `TraceIdRatioBased` decision for a trace id, so that a
/// deferred B3 context is decided as a new trace would be.
fn ratio_keeps(trace_id: TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bytes = trace_id.to_bytes();
    let low = u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes")) >> 1;
    low < (ratio * (1u64 << 63) as f64) as u64
}

/// Points the request's context headers at `span`: `traceparent` (and
/// `tracestate`) always, B3 in the form the request brought (`parent`: the
/// span the request came from, B3's parent span id).
pub fn inject(headers: &mut HeaderMap, span: &SpanContext, parent: Option<SpanId>, b3: B3) {
    if !span.is_valid() {
        return;
    }
    let cx = Context::new().with_remote_span_context(span.clone());
    TraceContextPropagator::new().inject_context(&cx, &mut HeadersMut(headers));
    let sampled = if span.is_sampled() { "1" } else { "0" };
    match b3 {
        B3::None => {}
        B3::Single => {
            let mut v = format!("{}-{}-{sampled}", span.trace_id(), span.span_id());
            if let Some(p) = parent {
                v.push('-');
                v.push_str(&p.to_string());
            }
            set(headers, B3_SINGLE, v);
        }
        B3::Multi => {
            set(headers, B3_TRACE_ID, span.trace_id().to_string());
            set(headers, B3_SPAN_ID, span.span_id().to_string());
            match parent {
                Some(p) => set(headers, B3_PARENT_SPAN_ID, p.to_string()),
                None => {
                    headers.remove(B3_PARENT_SPAN_ID);
                }
            }
            if headers.get(B3_FLAGS).is_none_or(|f| f != "1") {
                set(headers, B3_SAMPLED, sampled.to_owned());
            }
        }
    }
}

/// Sets a header; an empty value removes it.
fn set(headers: &mut HeaderMap, name: &'static str, value: String) {
    let name = HeaderName::from_static(name);
    match HeaderValue::try_from(value) {
        Ok(v) if !v.is_empty() => {
            headers.insert(name, v);
        }
        _ => {
            headers.remove(name);
        }
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        let (Ok(name), Ok(v)) = (HeaderName::try_from(key), HeaderValue::try_from(value)) else {
            return;
        };
        if v.is_empty() {
            self.0.remove(name);
        } else {
            self.0.insert(name, v);
        }
    }
}

/// The span processor: ended spans into the bounded queue, never waiting.
#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<SpanData>,
    dropped: Family<DroppedLabels, Counter>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.dropped
                .get_or_create(&DroppedLabels {
                    reason: "queue_full",
                })
                .inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Hands spans to the collector, counting what it accepted and lost.
struct Sender<E> {
    exporter: E,
    exported: Counter,
    dropped: Family<DroppedLabels, Counter>,
    /// Whether the last export failed: a failing collector is logged once.
    failing: bool,
}

impl<E: SpanExporter> Sender<E> {
    async fn send(&mut self, batch: Vec<SpanData>) {
        let n = batch.len() as u64;
        let sent = tokio::time::timeout(EXPORT_TIMEOUT, self.exporter.export(batch))
            .await
            .unwrap_or(Err(OTelSdkError::Timeout(EXPORT_TIMEOUT)));
        match sent {
            Ok(()) => {
                self.exported.inc_by(n);
                if std::mem::replace(&mut self.failing, false) {
                    info!("the trace collector accepts spans again");
                }
            }
            Err(e) => {
                self.dropped
                    .get_or_create(&DroppedLabels {
                        reason: "export_failed",
                    })
                    .inc_by(n);
                if std::mem::replace(&mut self.failing, true) {
                    debug!(error = %e, spans = n, "span export failed");
                } else {
                    warn!(error = %e, spans = n, "span export failed; spans are dropped (and counted) until the collector answers");
                }
            }
        }
    }
}

/// Sends queued spans in batches (full, or [`BATCH_DELAY`] after the
/// first) until the queue closes; a flush sends whatever is queued, then
/// answers.
async fn send_batches<E: SpanExporter>(
    mut sender: Sender<E>,
    mut rx: mpsc::Receiver<SpanData>,
    mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        tokio::select! {
            first = rx.recv() => match first {
                Some(s) => batch.push(s),
                None => return,
            },
            Some(done) = flushes.recv() => {
                while let Ok(s) = rx.try_recv() {
                    batch.push(s);
                    if batch.len() == MAX_BATCH {
                        sender.send(std::mem::take(&mut batch)).await;
                    }
                }
                if !batch.is_empty() {
                    sender.send(std::mem::take(&mut batch)).await;
                }
                let _ = done.send(());
                continue;
            }
        }
        let deadline = tokio::time::sleep(BATCH_DELAY);
        tokio::pin!(deadline);
        while batch.len() < MAX_BATCH {
            tokio::select! {
                more = rx.recv() => match more {
                    Some(s) => batch.push(s),
                    None => break,
                },
                () = &mut deadline => break,
            }
        }
        sender.send(std::mem::take(&mut batch)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn a_valid_traceparent_is_the_parent_with_its_flag_and_tracestate() {
        let h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "vendor=abc,other=1"),
        ]);
        let p = extract(&h, 1.0).parent.expect("a parent");
        assert_eq!(p.trace_id().to_string(), TRACE);
        assert_eq!(p.span_id().to_string(), SPAN);
        assert!(p.is_sampled() && p.is_remote());
        assert_eq!(p.trace_state().header(), "vendor=abc,other=1");
        let h = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00"))]);
        assert!(!extract(&h, 1.0).parent.unwrap().is_sampled());
    }

    #[test]
    fn malformed_context_headers_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-nothex-00f067aa0ba902b7-01",
            &format!("00-{TRACE}-{SPAN}"),
            &format!("00-{}-{SPAN}-01", "0".repeat(32)),
            &format!("00-{TRACE}-{}-01", "0".repeat(16)),
            &format!("ff-{TRACE}-{SPAN}-01"),
            &format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            &format!("00-{TRACE}-{SPAN}-01-extra"),
            &format!("00-{TRACE}x-{SPAN}-01"),
        ] {
            let h = headers(&[("traceparent", bad)]);
            assert_eq!(extract(&h, 1.0), Incoming::default(), "{bad:?}");
        }
        for (name, bad) in [
            (B3_SINGLE, "0"),
            (B3_SINGLE, "1"),
            (B3_SINGLE, "nothex-00f067aa0ba902b7-1"),
            (B3_SINGLE, "4bf92f3577b34da6-short-1"),
            (B3_TRACE_ID, "xyz"),
        ] {
            let h = headers(&[(name, bad)]);
            assert_eq!(extract(&h, 1.0).parent, None, "{name}: {bad:?}");
        }
        // A non-UTF-8 value.
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_bytes(b"00-\xff").unwrap());
        assert_eq!(extract(&h, 1.0).parent, None);
    }

    #[test]
    fn b3_single_and_multi_are_read_with_their_sampling_state() {
        let h = headers(&[(B3_SINGLE, &format!("{TRACE}-{SPAN}-1-{}", "1".repeat(16)))]);
        let i = extract(&h, 1.0);
        assert_eq!(i.b3, B3::Single);
        let p = i.parent.unwrap();
        assert_eq!(
            (p.trace_id().to_string(), p.span_id().to_string()),
            (TRACE.into(), SPAN.into())
        );
        assert!(p.is_sampled());
        let h = headers(&[(B3_SINGLE, &format!("{TRACE}-{SPAN}-0"))]);
        assert!(!extract(&h, 1.0).parent.unwrap().is_sampled());

        // 64-bit trace ids are the low half of a 128-bit one.
        let h = headers(&[
            (B3_TRACE_ID, "a3ce929d0e0e4736"),
            (B3_SPAN_ID, SPAN),
            (B3_SAMPLED, "0"),
        ]);
        let i = extract(&h, 1.0);
        assert_eq!(i.b3, B3::Multi);
        let p = i.parent.unwrap();
        assert_eq!(
            p.trace_id().to_string(),
            format!("{}a3ce929d0e0e4736", "0".repeat(16))
        );
        assert!(!p.is_sampled());
        // Debug is sampled; a deferred decision is the new-trace ratio's.
        let h = headers(&[(B3_TRACE_ID, TRACE), (B3_SPAN_ID, SPAN), (B3_FLAGS, "1")]);
        assert!(extract(&h, 0.0).parent.unwrap().is_sampled());
        let h = headers(&[(B3_TRACE_ID, TRACE), (B3_SPAN_ID, SPAN)]);
        assert!(extract(&h, 1.0).parent.unwrap().is_sampled());
        assert!(!extract(&h, 0.0).parent.unwrap().is_sampled());
    }

    #[test]
    fn traceparent_wins_over_b3_but_b3_is_still_sent_on() {
        let other = "80f198ee56343ba864fe8b2a57d3eff7";
        let h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            (B3_TRACE_ID, other),
            (B3_SPAN_ID, SPAN),
        ]);
        let i = extract(&h, 1.0);
        assert_eq!(i.parent.unwrap().trace_id().to_string(), TRACE);
        assert_eq!(i.b3, B3::Multi);
    }

    fn context(trace: &str, span: &str, sampled: bool) -> SpanContext {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(
            TraceId::from_hex(trace).unwrap(),
            SpanId::from_hex(span).unwrap(),
            flags,
            false,
            TraceState::from_key_value([("vendor", "abc")]).unwrap(),
        )
    }

    #[test]
    fn injection_names_the_new_span_in_every_form_the_request_came_with() {
        let ours = "1111111111111111";
        let sc = context(TRACE, ours, true);
        let parent = Some(SpanId::from_hex(SPAN).unwrap());

        let mut h = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-01"))]);
        inject(&mut h, &sc, parent, B3::None);
        assert_eq!(
            get(&h, "traceparent"),
            Some(&*format!("00-{TRACE}-{ours}-01"))
        );
        assert_eq!(get(&h, "tracestate"), Some("vendor=abc"));
        assert!(get(&h, B3_TRACE_ID).is_none() && get(&h, B3_SINGLE).is_none());

        let mut h = headers(&[(B3_SINGLE, &format!("{TRACE}-{SPAN}-1"))]);
        inject(&mut h, &sc, parent, B3::Single);
        assert_eq!(
            get(&h, B3_SINGLE),
            Some(&*format!("{TRACE}-{ours}-1-{SPAN}"))
        );

        let mut h = headers(&[(B3_TRACE_ID, TRACE), (B3_SPAN_ID, SPAN), (B3_SAMPLED, "1")]);
        inject(&mut h, &context(TRACE, ours, false), parent, B3::Multi);
        assert_eq!(get(&h, B3_TRACE_ID), Some(TRACE));
        assert_eq!(get(&h, B3_SPAN_ID), Some(ours));
        assert_eq!(get(&h, B3_PARENT_SPAN_ID), Some(SPAN));
        assert_eq!(get(&h, B3_SAMPLED), Some("0"));
        assert_eq!(
            get(&h, "traceparent"),
            Some(&*format!("00-{TRACE}-{ours}-00"))
        );

        // An invalid context changes nothing.
        let mut h = headers(&[("traceparent", "kept")]);
        inject(&mut h, &SpanContext::empty_context(), None, B3::Multi);
        assert_eq!(get(&h, "traceparent"), Some("kept"));
    }

    #[test]
    fn settings_are_checked_naming_the_flag() {
        assert_eq!(parse_sampling("0.25"), Ok(0.25));
        assert_eq!(parse_sampling("1"), Ok(1.0));
        for bad in ["1.5", "-0.1", "half", "NaN"] {
            let e = parse_sampling(bad).expect_err(bad);
            assert!(e.contains("between 0 and 1"), "{e}");
        }
        assert!(parse_endpoint("http://198.18.0.2:4317").is_ok());
        for bad in [
            "198.18.0.2:4317",
            "https://collector:4317",
            "http://",
            "ftp://x:1",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    /// An exporter that hands batches to the test.
    #[derive(Debug)]
    struct Collect(mpsc::UnboundedSender<Vec<SpanData>>, bool);

    impl SpanExporter for Collect {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.1 {
                return Err(OTelSdkError::InternalFailure("collector down".into()));
            }
            let _ = self.0.send(batch);
            Ok(())
        }
    }

    fn started(sampling: f64, fail: bool) -> (Tracing, mpsc::UnboundedReceiver<Vec<SpanData>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let t = Tracing::default();
        let settings = Settings {
            endpoint: "http://127.0.0.1:4317".into(),
            sampling,
            node: "node1".into(),
        };
        t.start_with(&settings, Collect(tx, fail)).unwrap();
        (t, rx)
    }

    fn request(pairs: &[(&'static str, &str)]) -> Request<()> {
        let mut r = Request::builder()
            .method("POST")
            .uri("/orders")
            .header("host", "orders")
            .body(())
            .unwrap();
        r.headers_mut().extend(headers(pairs));
        r
    }

    fn state_rx() -> StateRx {
        let ctx = crate::state::Context {
            node: "node1".into(),
            agent_ip: Ipv4Addr::new(198, 19, 1, 1),
            trust_domain: "cluster.local".into(),
            node_addresses: Default::default(),
            registry: Default::default(),
        };
        let empty = State::build(String::new(), Default::default(), &ctx).unwrap();
        tokio::sync::watch::channel(Arc::new(empty)).1
    }

    #[tokio::test]
    async fn an_outbound_span_is_the_child_of_the_caller_and_the_parent_of_the_next_hop() {
        let (t, mut rx) = started(1.0, false);
        let state = state_rx();
        let mut req = request(&[("traceparent", &format!("00-{TRACE}-{SPAN}-01"))]);
        let span = t
            .outbound(&mut req, &state, None, "default/orders")
            .unwrap();
        let sent = get(req.headers(), "traceparent").unwrap().to_owned();
        let resp = Response::builder().status(503).body(()).unwrap();
        span.end_outbound(&state, "default/orders-route", None, "UH", &resp);
        let batch = rx.recv().await.unwrap();
        assert_eq!(batch.len(), 1);
        let s = &batch[0];
        assert_eq!(s.name, "outbound default/orders");
        assert_eq!(s.span_kind, SpanKind::Client);
        assert_eq!(s.span_context.trace_id().to_string(), TRACE);
        assert_eq!(s.parent_span_id.to_string(), SPAN);
        assert_eq!(sent, format!("00-{TRACE}-{}-01", s.span_context.span_id()));
        let attr = |k: &str| {
            s.attributes
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attr("http.request.method").as_deref(), Some("POST"));
        assert_eq!(attr("http.route").as_deref(), Some("default/orders-route"));
        assert_eq!(attr("http.response.status_code").as_deref(), Some("503"));
        assert_eq!(attr("mesh.response_flags").as_deref(), Some("UH"));
        assert!(matches!(s.status, Status::Error { .. }), "{:?}", s.status);
        // Counted once the export returned.
        for _ in 0..100 {
            if t.exported.get() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(t.exported.get(), 1);
    }

    #[tokio::test]
    async fn unsampled_parents_are_obeyed_and_new_traces_follow_the_ratio() {
        let (t, mut rx) = started(0.0, false);
        let state = state_rx();
        // The caller's sampled flag wins over the ratio of 0.
        let mut req = request(&[("traceparent", &format!("00-{TRACE}-{SPAN}-01"))]);
        drop(t.outbound(&mut req, &state, None, "s"));
        let kept = rx.recv().await.unwrap();
        assert_eq!(kept[0].parent_span_id.to_string(), SPAN);
        // Not sampled upstream: propagated as not sampled, not exported.
        let mut req = request(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00"))]);
        drop(t.outbound(&mut req, &state, None, "s"));
        let sent = get(req.headers(), "traceparent").unwrap();
        assert!(
            sent.starts_with(&format!("00-{TRACE}-")) && sent.ends_with("-00"),
            "{sent}"
        );
        assert!(!sent.contains(SPAN), "{sent}");
        // No context and a ratio of 0: a new trace id, not sampled.
        let mut req = request(&[]);
        drop(t.outbound(&mut req, &state, None, "s"));
        let sent = get(req.headers(), "traceparent").unwrap();
        assert!(sent.ends_with("-00") && !sent.contains(TRACE), "{sent}");
        tokio::time::sleep(BATCH_DELAY * 2).await;
        assert!(rx.try_recv().is_err(), "nothing unsampled is exported");
    }

    #[tokio::test]
    async fn a_flush_sends_what_is_queued() {
        let (t, mut rx) = started(1.0, false);
        let state = state_rx();
        for _ in 0..3 {
            drop(t.outbound(&mut request(&[]), &state, None, "s"));
        }
        t.flush(Duration::from_secs(5)).await;
        assert_eq!(t.exported.get(), 3);
        let mut got = 0;
        while let Ok(batch) = rx.try_recv() {
            got += batch.len();
        }
        assert_eq!(got, 3);
    }

    #[tokio::test]
    async fn a_failing_collector_loses_spans_counted_and_never_blocks() {
        let (t, _rx) = started(1.0, true);
        let state = state_rx();
        for _ in 0..3 {
            let mut req = request(&[]);
            drop(t.outbound(&mut req, &state, None, "s"));
        }
        let failed = || {
            t.dropped
                .get_or_create(&DroppedLabels {
                    reason: "export_failed",
                })
                .get()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while failed() < 3 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(failed(), 3);
        assert_eq!(t.exported.get(), 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (tx, _rx) = mpsc::channel(1);
        let q = Queue {
            tx,
            dropped: Family::default(),
        };
        let data = || SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "x".into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        };
        q.on_end(data());
        q.on_end(data());
        q.on_end(data());
        let dropped = q
            .dropped
            .get_or_create(&DroppedLabels {
                reason: "queue_full",
            })
            .get();
        assert_eq!(dropped, 2);
    }
}
