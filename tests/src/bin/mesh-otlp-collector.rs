//! `mesh-otlp-collector`: a stand-in for an OpenTelemetry Collector in the
//! tracing tests. It serves the OTLP gRPC trace service (`Export`) and writes
//! every span it receives as one JSON line (`--out`, `-` for stdout): trace,
//! span and parent span ids in hex, name, kind, status, attributes and the
//! resource's attributes. Prints `{"ready":true,"addr":...}` once it listens.
use std::{
    collections::BTreeMap,
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Context;
use clap::Parser;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value as Any},
    trace::v1::{span::SpanKind, status::StatusCode},
};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "OTLP gRPC trace receiver that records the spans it gets as JSON lines")]
struct Cli {
    /// Address to serve OTLP gRPC on (the collector's usual port is 4317).
    #[arg(long, default_value = "127.0.0.1:4317")]
    listen: SocketAddr,
    /// Where span lines go (appended); `-` for stdout.
    #[arg(long, default_value = "-")]
    out: PathBuf,
}

struct Recorder {
    out: Mutex<Box<dyn Write + Send>>,
}

fn value(v: &Option<AnyValue>) -> Value {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => json!(s),
        Some(Any::BoolValue(b)) => json!(b),
        Some(Any::IntValue(i)) => json!(i),
        Some(Any::DoubleValue(d)) => json!(d),
        Some(Any::ArrayValue(a)) => a.values.iter().map(|v| value(&Some(v.clone()))).collect(),
        Some(Any::KvlistValue(kv)) => attributes(&kv.values),
        Some(Any::BytesValue(b)) => json!(hex(b)),
        Some(Any::StringValueStrindex(i)) => json!(i),
        None => Value::Null,
    }
}

fn attributes(kvs: &[KeyValue]) -> Value {
    let map: BTreeMap<&str, Value> = kvs
        .iter()
        .map(|kv| (kv.key.as_str(), value(&kv.value)))
        .collect();
    json!(map)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Recorder {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut lines = Vec::new();
        for rs in &request.get_ref().resource_spans {
            let resource = attributes(
                rs.resource
                    .as_ref()
                    .map(|r| r.attributes.as_slice())
                    .unwrap_or_default(),
            );
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    let kind = SpanKind::try_from(s.kind)
                        .map_or("SPAN_KIND_UNSPECIFIED", |k| k.as_str_name());
                    let status = s
                        .status
                        .as_ref()
                        .and_then(|st| StatusCode::try_from(st.code).ok())
                        .map_or("STATUS_CODE_UNSET", |c| c.as_str_name());
                    let line = json!({
                        "trace_id": hex(&s.trace_id),
                        "span_id": hex(&s.span_id),
                        "parent_span_id": hex(&s.parent_span_id),
                        "name": s.name,
                        "kind": kind.trim_start_matches("SPAN_KIND_"),
                        "status": status.trim_start_matches("STATUS_CODE_"),
                        "start_unix_nano": s.start_time_unix_nano,
                        "end_unix_nano": s.end_time_unix_nano,
                        "attributes": attributes(&s.attributes),
                        "resource": resource,
                    });
                    lines.push(line.to_string());
                }
            }
        }
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        for line in lines {
            writeln!(out, "{line}").map_err(|e| tonic::Status::internal(e.to_string()))?;
        }
        out.flush()
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let out: Box<dyn Write + Send> = if cli.out.as_os_str() == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&cli.out)
                .with_context(|| format!("opening --out {}", cli.out.display()))?,
        )
    };
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding --listen {}", cli.listen))?;
    let addr = listener.local_addr()?;
    println!("{}", json!({"ready": true, "addr": addr.to_string()}));
    std::io::stdout().flush()?;
    let recorder = Arc::new(Recorder {
        out: Mutex::new(out),
    });
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::from_arc(recorder))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .context("serving OTLP")?;
    Ok(())
}
