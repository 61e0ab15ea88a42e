//! `meshctl tap`: the live stream of what one node agent carries, as the
//! agent's admin socket sends it (`GET /tap?<filter>`, one JSON [`TapEvent`]
//! per line) and `meshctl` reads it.
//!
//! The filter is applied by the agent, so a narrow tap costs the agent only
//! the events it matches; [`TapFilter::matches`] is the one definition.
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::admin::ConnectionView;

/// One line of the stream.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TapEvent {
    /// An HTTP request or gRPC call, when its response headers were sent.
    Request(RequestEvent),
    /// A TCP connection, when it closed.
    Connection(ConnectionEvent),
    /// The tapper fell behind and this many events were not sent to it
    /// (traffic is never slowed for a tapper).
    Dropped { dropped: u64 },
}

/// Which side of the mesh saw a request or connection.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The caller's agent: the request left a pod of this node.
    Outbound,
    /// The destination's agent: the request is for a pod of this node.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// The fields Envoy's access log users look for.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RequestEvent {
    pub start_unix_ms: u64,
    /// Until the response's headers.
    pub duration_ms: f64,
    pub direction: Option<Direction>,
    pub method: String,
    pub authority: String,
    /// Without the query.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: String,
    pub code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    /// Response flags, comma-separated; empty when none.
    pub flags: String,
    /// The request body's declared length (`content-length`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_bytes: Option<u64>,
    /// The endpoint the request went to, when one was picked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<SocketAddr>,
    /// `namespace/name` of the calling pod, when the mesh knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<std::net::Ipv4Addr>,
    /// `namespace/name` of the Service the caller dialled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_identity: Option<String>,
    /// `namespace/name` of the route that applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The authorization verdict at the destination: `allow`, `deny`, or
    /// `allow (policy)` / `deny (policy)` when a policy decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// W3C trace id of the request, when it carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// A closed connection: the table row `meshctl connections` shows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConnectionEvent {
    pub direction: Direction,
    /// The caller's SPIFFE ID, when it proved one (inbound, through the
    /// tunnel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<String>,
    /// `namespace/name` of the caller's Workload, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_workload: Option<String>,
    /// `namespace/name` of the destination's Workload, when it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_workload: Option<String>,
    #[serde(flatten)]
    pub connection: ConnectionView,
}

/// What a tapper asked for; every field set must match.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TapFilter {
    /// A pod's name (or `namespace/name`): the source or the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The namespace of the source or destination workload or Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// A Service (`name` or `namespace/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// A path prefix (requests only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A response code (requests only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// A SPIFFE ID (with or without `spiffe://`): the source or destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

impl TapFilter {
    /// The query string of `GET /tap` (no leading `?`).
    pub fn to_query(&self) -> String {
        let mut q = Vec::new();
        let mut push = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                q.push(format!("{k}={}", encode(&v)));
            }
        };
        push("pod", self.pod.clone());
        push("namespace", self.namespace.clone());
        push("service", self.service.clone());
        push("path", self.path.clone());
        push("status", self.status.map(|s| s.to_string()));
        push("identity", self.identity.clone());
        q.join("&")
    }

    /// Reads a query string; an unknown key or a bad value is an error
    /// naming it.
    pub fn from_query(query: &str) -> Result<TapFilter, String> {
        let mut f = TapFilter::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v).ok_or_else(|| format!("filter `{k}`: bad percent-encoding"))?;
            match k {
                "pod" => f.pod = Some(v),
                "namespace" => f.namespace = Some(v),
                "service" => f.service = Some(v),
                "path" => f.path = Some(v),
                "status" => {
                    f.status = Some(
                        v.parse()
                            .map_err(|_| format!("filter `status`: {v:?} is not a status code"))?,
                    )
                }
                "identity" => f.identity = Some(v),
                _ => return Err(format!("unknown filter `{k}`")),
            }
        }
        Ok(f)
    }

    pub fn matches(&self, event: &TapEvent) -> bool {
        match event {
            TapEvent::Dropped { .. } => true,
            TapEvent::Request(r) => self.matches_request(r),
            TapEvent::Connection(c) => self.matches_connection(c),
        }
    }

    fn matches_request(&self, r: &RequestEvent) -> bool {
        let workloads = [
            r.source_workload.as_deref(),
            r.destination_workload.as_deref(),
        ];
        self.pod
            .as_deref()
            .is_none_or(|p| workloads.iter().any(|w| w.is_some_and(|w| names_pod(w, p))))
            && self.namespace.as_deref().is_none_or(|ns| {
                workloads
                    .iter()
                    .chain([&r.destination_service.as_deref()])
                    .any(|w| w.is_some_and(|w| namespace_of(w) == Some(ns)))
            })
            && self.service.as_deref().is_none_or(|s| {
                r.destination_service
                    .as_deref()
                    .is_some_and(|d| names_pod(d, s))
            })
            && self.path.as_deref().is_none_or(|p| r.path.starts_with(p))
            && self.status.is_none_or(|s| r.code == s)
            && self.identity.as_deref().is_none_or(|id| {
                [&r.source_identity, &r.destination_identity]
                    .iter()
                    .any(|i| i.as_deref().is_some_and(|i| same_identity(i, id)))
            })
    }

    fn matches_connection(&self, c: &ConnectionEvent) -> bool {
        let v = &c.connection;
        let workloads = [
            c.source_workload.as_deref(),
            c.destination_workload.as_deref(),
        ];
        // Connections have no path or status: a filter on them excludes them.
        self.path.is_none()
            && self.status.is_none()
            && self.identity.as_deref().is_none_or(|id| {
                c.source_identity
                    .as_deref()
                    .is_some_and(|i| same_identity(i, id))
            })
            && self.pod.as_deref().is_none_or(|p| {
                v.src_pod
                    .as_deref()
                    .is_some_and(|w| w == p || p.rsplit('/').next() == Some(w))
                    || workloads.iter().any(|w| w.is_some_and(|w| names_pod(w, p)))
            })
            && self.namespace.as_deref().is_none_or(|ns| {
                workloads
                    .iter()
                    .chain([&v.service.as_deref()])
                    .any(|w| w.is_some_and(|w| namespace_of(w) == Some(ns)))
            })
            && self
                .service
                .as_deref()
                .is_none_or(|s| v.service.as_deref().is_some_and(|d| names_pod(d, s)))
    }
}

/// Whether `full` (`namespace/name`) is what the user wrote: `name`, or
/// `namespace/name`.
fn names_pod(full: &str, wanted: &str) -> bool {
    full == wanted
        || full
            .rsplit_once('/')
            .is_some_and(|(_, name)| name == wanted)
}

fn namespace_of(full: &str) -> Option<&str> {
    full.split_once('/').map(|(ns, _)| ns)
}

fn same_identity(a: &str, b: &str) -> bool {
    let strip = |s: &'_ str| s.strip_prefix("spiffe://").unwrap_or(s).to_owned();
    strip(a) == strip(b)
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RequestEvent {
        RequestEvent {
            method: "GET".into(),
            path: "/api/items".into(),
            code: 503,
            source_workload: Some("default/web".into()),
            source_identity: Some("spiffe://cluster.local/ns/default/sa/web".into()),
            destination_service: Some("shop/cart".into()),
            destination_workload: Some("shop/cart-1".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_filter_survives_its_query_string() {
        let f = TapFilter {
            pod: Some("default/web".into()),
            path: Some("/a b&c".into()),
            status: Some(503),
            identity: Some("spiffe://cluster.local/ns/default/sa/web".into()),
            ..Default::default()
        };
        assert_eq!(TapFilter::from_query(&f.to_query()), Ok(f));
        assert_eq!(TapFilter::from_query(""), Ok(TapFilter::default()));
        assert_eq!(
            TapFilter::from_query("statu=5"),
            Err("unknown filter `statu`".into())
        );
        assert_eq!(
            TapFilter::from_query("status=ok"),
            Err("filter `status`: \"ok\" is not a status code".into())
        );
    }

    #[test]
    fn every_field_set_must_match() {
        let ev = TapEvent::Request(request());
        let yes = [
            TapFilter::default(),
            TapFilter {
                pod: Some("web".into()),
                ..Default::default()
            },
            TapFilter {
                pod: Some("shop/cart-1".into()),
                ..Default::default()
            },
            TapFilter {
                namespace: Some("shop".into()),
                service: Some("cart".into()),
                ..Default::default()
            },
            TapFilter {
                path: Some("/api".into()),
                status: Some(503),
                ..Default::default()
            },
            TapFilter {
                identity: Some("cluster.local/ns/default/sa/web".into()),
                ..Default::default()
            },
        ];
        for f in yes {
            assert!(f.matches(&ev), "{f:?}");
        }
        let no = [
            TapFilter {
                pod: Some("cart".into()),
                ..Default::default()
            },
            TapFilter {
                namespace: Some("other".into()),
                ..Default::default()
            },
            TapFilter {
                service: Some("default/cart".into()),
                ..Default::default()
            },
            TapFilter {
                path: Some("/apix".into()),
                ..Default::default()
            },
            TapFilter {
                status: Some(200),
                pod: Some("web".into()),
                ..Default::default()
            },
            TapFilter {
                identity: Some("cluster.local/ns/default/sa/other".into()),
                ..Default::default()
            },
        ];
        for f in no {
            assert!(!f.matches(&ev), "{f:?}");
        }
        // Drops are always shown: the tapper must know what it missed.
        assert!(
            TapFilter {
                status: Some(1),
                ..Default::default()
            }
            .matches(&TapEvent::Dropped { dropped: 3 })
        );
    }

    #[test]
    fn inbound_connections_match_by_their_workloads_and_the_callers_identity() {
        let event = TapEvent::Connection(ConnectionEvent {
            direction: Direction::Inbound,
            source_identity: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
            source_workload: Some("shop/web-1".into()),
            destination_workload: Some("shop/db-0".into()),
            connection: crate::admin::ConnectionView {
                id: 0,
                src_pod: None,
                src_cgroup_id: 0,
                peer: "198.18.0.1:0".parse().unwrap(),
                orig_dst: "198.19.1.2:5432".parse().unwrap(),
                service: None,
                upstream: None,
                started_unix_ms: 0,
                duration_ms: 0,
                bytes_sent: 0,
                bytes_received: 0,
                state: crate::admin::ConnectionState::Closed,
                error: None,
            },
        });
        let f = |q: &str| TapFilter::from_query(q).unwrap().matches(&event);
        assert!(f(""));
        assert!(f("pod=db-0") && f("pod=shop/web-1") && !f("pod=other"));
        assert!(f("namespace=shop") && !f("namespace=default"));
        assert!(f("identity=spiffe://cluster.local/ns/shop/sa/web"));
        assert!(!f("identity=spiffe://cluster.local/ns/shop/sa/db"));
        assert!(
            !f("path=/") && !f("status=200"),
            "no path or status on a connection"
        );
    }
}
