//! The route table: the distributed HTTPRoutes and GRPCRoutes compiled once
//! per state (regexes built, durations parsed), indexed by the Service they
//! attach to, and [`RouteTable::select`], the pure choice of the rule that
//! serves a request, with the Gateway API's precedence:
//!
//! - HTTPRoute, across every match of every applicable route: exact path, then
//!   regular expression, then the longest path prefix; then a method match;
//!   then the most header matches; then the most query-parameter matches.
//!   (The Gateway API leaves regular expressions' place to implementations:
//!   here they rank between exact and prefix, so a regex route is not
//!   shadowed by another route's catch-all `/`.)
//! - GRPCRoute: the longest matching service, then the longest method, then
//!   the most header matches.
//! - Ties: the oldest route (creation revision), then `namespace/name`, then
//!   the first matching rule of the route.
//!
//! GAMMA: a route in the Service's own namespace (a producer route) applies
//! to every caller; one in another namespace (a consumer route) only to
//! callers in that namespace, and for them it replaces the producer routes.
use std::{collections::HashMap, sync::Arc, time::Duration};

use http::{HeaderName, Method, request::Parts};
use mesh_api::{
    gateway::{
        self, GrpcRouteSpec, HeaderMatch, HeaderModifier, HttpRouteFilter, HttpRouteSpec,
        PathMatchType, PathModifier, PathModifierType, ValueMatchType,
    },
    pb,
};
use regex::Regex;

/// Why a distributed route could not be compiled (the control server checks
/// the same, so this means a control server of another version).
#[derive(Debug, thiserror::Error)]
#[error("{kind} {namespace}/{name}: {reason}")]
pub struct Error {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    Http,
    Grpc,
}

/// A Service and one of its ports, as routes name backends and parents.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServicePort {
    /// `namespace/name`
    pub service: String,
    pub port: u16,
}

#[derive(Debug)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == value,
            ValueMatch::Regex(r) => r.is_match(value),
        }
    }
}

#[derive(Debug)]
pub enum PathMatch {
    Exact(String),
    /// Segment-aware: `/v2` matches `/v2` and `/v2/x`, not `/v2example`.
    Prefix(String),
    Regex(Regex),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => prefix_matches(p, path),
            PathMatch::Regex(r) => r.is_match(path),
        }
    }

    /// (kind rank, length): exact > regex > prefix, longer first.
    fn rank(&self) -> (u8, usize) {
        match self {
            PathMatch::Exact(p) => (3, p.len()),
            PathMatch::Regex(r) => (2, r.as_str().len()),
            PathMatch::Prefix(p) => (1, p.trim_end_matches('/').len()),
        }
    }
}

/// Gateway API prefix semantics: whole path segments, a trailing `/` in the
/// prefix ignored.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[derive(Debug)]
pub struct HttpMatch {
    pub path: PathMatch,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
    pub method: Option<Method>,
}

#[derive(Debug)]
pub struct GrpcMatch {
    pub service: Option<ValueMatch>,
    pub method: Option<ValueMatch>,
    pub headers: Vec<(HeaderName, ValueMatch)>,
}

#[derive(Debug)]
pub enum Match {
    Http(HttpMatch),
    Grpc(GrpcMatch),
}

/// How a match ranks against others; larger wins.
type Rank = (u8, usize, bool, usize, usize);

impl Match {
    fn rank(&self) -> Rank {
        match self {
            Match::Http(m) => {
                let (kind, len) = m.path.rank();
                (
                    kind,
                    len,
                    m.method.is_some(),
                    m.headers.len(),
                    m.query.len(),
                )
            }
            Match::Grpc(m) => {
                let len = |v: &Option<ValueMatch>| match v {
                    Some(ValueMatch::Exact(s)) => s.len() + 1,
                    Some(ValueMatch::Regex(_)) => 1,
                    None => 0,
                };
                (
                    0,
                    len(&m.service),
                    len(&m.method) > 0,
                    len(&m.method),
                    m.headers.len(),
                )
            }
        }
    }
}

/// What the request looks like to the matcher.
pub struct RequestView<'a> {
    pub parts: &'a Parts,
    /// The path without the query.
    pub path: &'a str,
    pub query: Vec<(String, String)>,
    /// `(service, method)` when the request is gRPC.
    pub grpc: Option<(&'a str, &'a str)>,
}

impl<'a> RequestView<'a> {
    pub fn new(parts: &'a Parts) -> RequestView<'a> {
        let path = parts.uri.path();
        let query = parts
            .uri
            .query()
            .map(|q| {
                q.split('&')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once('=').unwrap_or((p, ""));
                        (percent_decode(k), percent_decode(v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let is_grpc = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        let grpc = is_grpc
            .then(|| path.strip_prefix('/')?.split_once('/'))
            .flatten();
        RequestView {
            parts,
            path,
            query,
            grpc,
        }
    }

    fn header_matches(&self, headers: &[(HeaderName, ValueMatch)]) -> bool {
        headers.iter().all(|(name, m)| {
            // Several values of one header compare as one, comma-joined.
            let values: Vec<&str> = self
                .parts
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            !values.is_empty() && m.matches(&values.join(","))
        })
    }

    fn matches(&self, m: &Match) -> bool {
        match m {
            Match::Http(m) => {
                m.path.matches(self.path)
                    && m.method.as_ref().is_none_or(|x| x == self.parts.method)
                    && self.header_matches(&m.headers)
                    && m.query.iter().all(|(name, v)| {
                        // The first value of a repeated parameter counts.
                        self.query
                            .iter()
                            .find(|(k, _)| k == name)
                            .is_some_and(|(_, value)| v.matches(value))
                    })
            }
            Match::Grpc(m) => {
                let Some((service, method)) = self.grpc else {
                    return false;
                };
                m.service.as_ref().is_none_or(|s| s.matches(service))
                    && m.method.as_ref().is_none_or(|x| x.matches(method))
                    && self.header_matches(&m.headers)
            }
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
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
    String::from_utf8_lossy(&out).into_owned()
}

/// A header modifier, names parsed.
#[derive(Debug, Default)]
pub struct HeaderEdit {
    pub set: Vec<(HeaderName, http::HeaderValue)>,
    pub add: Vec<(HeaderName, http::HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderEdit {
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

#[derive(Debug)]
pub struct Mirror {
    pub backend: ServicePort,
    /// Share of requests mirrored.
    pub numerator: u32,
    pub denominator: u32,
}

/// A rule's (or a backend's) filters, compiled.
#[derive(Debug, Default)]
pub struct Filters {
    pub request_headers: Option<HeaderEdit>,
    pub response_headers: Option<HeaderEdit>,
    pub redirect: Option<gateway::RequestRedirect>,
    pub rewrite: Option<gateway::UrlRewrite>,
    pub mirrors: Vec<Mirror>,
}

#[derive(Debug)]
pub struct WeightedBackend {
    pub backend: ServicePort,
    pub weight: u32,
    pub filters: Filters,
}

#[derive(Debug)]
pub struct Rule {
    pub index: usize,
    pub matches: Vec<Match>,
    pub filters: Filters,
    pub backends: Vec<WeightedBackend>,
    /// Whole exchange; `None`: no limit.
    pub request_timeout: Option<Duration>,
    /// Each attempt.
    pub backend_timeout: Option<Duration>,
    /// GEP-1731 retries of this rule.
    pub retry: Option<gateway::HttpRouteRetry>,
}

impl Rule {
    /// The backend for a draw `r` in `0..u64::MAX`, by weight; `None` when
    /// the rule has no backend with weight.
    pub fn pick_backend(&self, r: u64) -> Option<&WeightedBackend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut at = r % total;
        for b in &self.backends {
            let w = u64::from(b.weight);
            if at < w {
                return Some(b);
            }
            at -= w;
        }
        None
    }
}

#[derive(Debug)]
pub struct Route {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    pub created: u64,
    pub rules: Vec<Rule>,
    /// `namespace/name`, the `route` label of request metrics.
    pub id: String,
}

/// The rule chosen for a request.
#[derive(Clone, Copy, Debug)]
pub struct Selected<'a> {
    pub route: &'a Route,
    pub rule: &'a Rule,
    /// The path prefix that matched (for ReplacePrefixMatch), if a prefix did.
    pub prefix: Option<&'a str>,
}

/// The outcome of [`RouteTable::select`].
#[derive(Debug)]
pub enum Selection<'a> {
    /// No route attaches to the Service (or its port): send to the Service
    /// itself.
    Unrouted,
    Rule(Selected<'a>),
    /// Routes attach, but none of their rules matches: 404 (gRPC:
    /// UNIMPLEMENTED).
    NoMatch,
}

/// A route attached to a Service, for one port or all.
#[derive(Debug)]
struct Attachment {
    port: Option<u16>,
    route: Arc<Route>,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    /// Service `namespace/name` -> the routes attached to it.
    by_service: HashMap<String, Vec<Attachment>>,
    len: usize,
}

impl RouteTable {
    /// Compiles every distributed route. A route that does not compile is
    /// returned as an error beside the table, which leaves it out.
    pub fn build<'a>(routes: impl IntoIterator<Item = &'a pb::Route>) -> (RouteTable, Vec<Error>) {
        let mut table = RouteTable::default();
        let mut errors = Vec::new();
        for r in routes {
            match compile(r) {
                Ok((route, parents)) => {
                    let route = Arc::new(route);
                    table.len += 1;
                    for parent in parents {
                        table
                            .by_service
                            .entry(parent.0)
                            .or_default()
                            .push(Attachment {
                                port: parent.1,
                                route: route.clone(),
                            });
                    }
                }
                Err(reason) => errors.push(Error {
                    kind: r.kind.clone(),
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    reason,
                }),
            }
        }
        for list in table.by_service.values_mut() {
            list.sort_by(|a, b| {
                (a.route.created, &a.route.namespace, &a.route.name).cmp(&(
                    b.route.created,
                    &b.route.namespace,
                    &b.route.name,
                ))
            });
        }
        (table, errors)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The rule that serves `req`, sent by a caller in `caller_namespace`
    /// to port `port` of Service `service` (`namespace/name`).
    pub fn select<'a>(
        &'a self,
        service: &str,
        port: u16,
        caller_namespace: Option<&str>,
        req: &RequestView<'_>,
    ) -> Selection<'a> {
        let Some(attached) = self.by_service.get(service) else {
            return Selection::Unrouted;
        };
        let service_ns = service.split_once('/').map_or("", |(ns, _)| ns);
        let on_port = |a: &&Attachment| a.port.is_none_or(|p| p == port);
        let kind_applies = |a: &&Attachment| match a.route.kind {
            RouteKind::Grpc => req.grpc.is_some(),
            RouteKind::Http => true,
        };
        let consumer: Vec<&Attachment> = attached
            .iter()
            .filter(on_port)
            .filter(|a| a.route.namespace != service_ns)
            .filter(|a| caller_namespace == Some(a.route.namespace.as_str()))
            .collect();
        let applicable: Vec<&Attachment> = if consumer.is_empty() {
            attached
                .iter()
                .filter(on_port)
                .filter(|a| a.route.namespace == service_ns)
                .collect()
        } else {
            consumer
        };
        if applicable.is_empty() {
            return Selection::Unrouted;
        }
        // gRPC requests are served by GRPCRoutes when any applies, else by
        // HTTPRoutes.
        let grpc: Vec<&Attachment> = applicable
            .iter()
            .copied()
            .filter(kind_applies)
            .filter(|a| a.route.kind == RouteKind::Grpc)
            .collect();
        let candidates: Vec<&Attachment> = if grpc.is_empty() {
            applicable
                .into_iter()
                .filter(|a| a.route.kind == RouteKind::Http)
                .collect()
        } else {
            grpc
        };
        if candidates.is_empty() {
            return Selection::Unrouted;
        }
        // Attachments are sorted oldest first, then by namespace/name, and
        // rules in list order: the first of equal rank wins.
        let mut best: Option<(Rank, Selected<'a>)> = None;
        for a in candidates {
            for rule in &a.route.rules {
                for m in &rule.matches {
                    if !req.matches(m) {
                        continue;
                    }
                    let rank = m.rank();
                    if best.as_ref().is_none_or(|(r, _)| rank > *r) {
                        let prefix = match m {
                            Match::Http(HttpMatch {
                                path: PathMatch::Prefix(p),
                                ..
                            }) => Some(p.as_str()),
                            _ => None,
                        };
                        best = Some((
                            rank,
                            Selected {
                                route: &a.route,
                                rule,
                                prefix,
                            },
                        ));
                    }
                }
            }
        }
        match best {
            Some((_, s)) => Selection::Rule(s),
            None => Selection::NoMatch,
        }
    }
}

fn service_ref(
    default_ns: &str,
    namespace: &Option<String>,
    name: &str,
    port: Option<u16>,
) -> Result<ServicePort, String> {
    Ok(ServicePort {
        service: format!("{}/{name}", namespace.as_deref().unwrap_or(default_ns)),
        port: port.ok_or_else(|| format!("backend {name} has no port"))?,
    })
}

fn value_match(kind: ValueMatchType, value: &str) -> Result<ValueMatch, String> {
    Ok(match kind {
        ValueMatchType::Exact => ValueMatch::Exact(value.to_owned()),
        ValueMatchType::RegularExpression => ValueMatch::Regex(gateway::compile_regex(value)?),
    })
}

/// Compiles Gateway API header matches (also a fault's, in a
/// TrafficPolicy).
pub(crate) fn header_matches(
    list: &[HeaderMatch],
) -> Result<Vec<(HeaderName, ValueMatch)>, String> {
    list.iter()
        .map(|h| {
            let name = HeaderName::try_from(h.name.as_str())
                .map_err(|_| format!("{:?} is not a header name", h.name))?;
            Ok((name, value_match(h.kind, &h.value)?))
        })
        .collect()
}

fn header_edit(m: &HeaderModifier) -> Result<HeaderEdit, String> {
    let pair = |h: &gateway::HttpHeader| -> Result<_, String> {
        Ok((
            HeaderName::try_from(h.name.as_str())
                .map_err(|_| format!("{:?} is not a header name", h.name))?,
            http::HeaderValue::try_from(h.value.as_str())
                .map_err(|_| format!("{:?} is not a header value", h.value))?,
        ))
    };
    Ok(HeaderEdit {
        set: m.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: m.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: m
            .remove
            .iter()
            .map(|n| {
                HeaderName::try_from(n.as_str()).map_err(|_| format!("{n:?} is not a header name"))
            })
            .collect::<Result<_, _>>()?,
    })
}

fn filters(ns: &str, list: &[HttpRouteFilter]) -> Result<Filters, String> {
    let mut out = Filters::default();
    for f in list {
        match f {
            HttpRouteFilter::RequestHeaderModifier {
                request_header_modifier: m,
            } => out.request_headers = Some(header_edit(m)?),
            HttpRouteFilter::ResponseHeaderModifier {
                response_header_modifier: m,
            } => out.response_headers = Some(header_edit(m)?),
            HttpRouteFilter::RequestRedirect { request_redirect } => {
                out.redirect = Some(request_redirect.clone())
            }
            HttpRouteFilter::UrlRewrite { url_rewrite } => out.rewrite = Some(url_rewrite.clone()),
            HttpRouteFilter::RequestMirror { request_mirror: m } => {
                let (numerator, denominator) = m.share();
                let b = &m.backend_ref;
                out.mirrors.push(Mirror {
                    backend: service_ref(ns, &b.namespace, &b.name, b.port)?,
                    numerator,
                    denominator,
                });
            }
        }
    }
    Ok(out)
}

fn backends(ns: &str, refs: &[gateway::HttpBackendRef]) -> Result<Vec<WeightedBackend>, String> {
    refs.iter()
        .map(|b| {
            Ok(WeightedBackend {
                backend: service_ref(ns, &b.namespace, &b.name, b.port)?,
                weight: b.weight,
                filters: filters(ns, &b.filters)?,
            })
        })
        .collect()
}

type Parents = Vec<(String, Option<u16>)>;

fn parents(ns: &str, refs: &[gateway::ParentRef]) -> Parents {
    refs.iter()
        .map(|p| {
            (
                format!("{}/{}", p.namespace.as_deref().unwrap_or(ns), p.name),
                p.port,
            )
        })
        .collect()
}

fn compile(r: &pb::Route) -> Result<(Route, Parents), String> {
    let ns = r.namespace.as_str();
    let (kind, rules, parents) = match r.kind.as_str() {
        "HTTPRoute" => {
            let spec: HttpRouteSpec =
                serde_json::from_str(&r.spec_json).map_err(|e| format!("spec: {e}"))?;
            spec.validate().map_err(|e| e.to_string())?;
            let mut rules = Vec::new();
            for (index, rule) in spec.rules.iter().enumerate() {
                let mut matches = Vec::new();
                let defaults = [gateway::HttpRouteMatch::default()];
                let list = if rule.matches.is_empty() {
                    &defaults[..]
                } else {
                    &rule.matches[..]
                };
                for m in list {
                    let path = match &m.path {
                        None => PathMatch::Prefix("/".into()),
                        Some(p) => match p.kind {
                            PathMatchType::Exact => PathMatch::Exact(p.value.clone()),
                            PathMatchType::PathPrefix => PathMatch::Prefix(p.value.clone()),
                            PathMatchType::RegularExpression => {
                                PathMatch::Regex(gateway::compile_regex(&p.value)?)
                            }
                        },
                    };
                    matches.push(Match::Http(HttpMatch {
                        path,
                        headers: header_matches(&m.headers)?,
                        query: m
                            .query_params
                            .iter()
                            .map(|q| Ok((q.name.clone(), value_match(q.kind, &q.value)?)))
                            .collect::<Result<_, String>>()?,
                        method: m
                            .method
                            .as_deref()
                            .map(|s| Method::from_bytes(s.as_bytes()).map_err(|e| e.to_string()))
                            .transpose()?,
                    }));
                }
                let timeouts = rule.timeouts.clone().unwrap_or_default();
                let duration = |t: &Option<String>| -> Result<Option<Duration>, String> {
                    Ok(t.as_deref()
                        .map(gateway::parse_duration)
                        .transpose()?
                        .filter(|d| !d.is_zero()))
                };
                rules.push(Rule {
                    index,
                    matches,
                    filters: filters(ns, &rule.filters)?,
                    backends: backends(ns, &rule.backend_refs)?,
                    request_timeout: duration(&timeouts.request)?,
                    backend_timeout: duration(&timeouts.backend_request)?,
                    retry: rule.retry.clone(),
                });
            }
            (RouteKind::Http, rules, parents(ns, &spec.parent_refs))
        }
        "GRPCRoute" => {
            let spec: GrpcRouteSpec =
                serde_json::from_str(&r.spec_json).map_err(|e| format!("spec: {e}"))?;
            spec.validate().map_err(|e| e.to_string())?;
            let mut rules = Vec::new();
            for (index, rule) in spec.rules.iter().enumerate() {
                let defaults = [gateway::GrpcRouteMatch::default()];
                let list = if rule.matches.is_empty() {
                    &defaults[..]
                } else {
                    &rule.matches[..]
                };
                let mut matches = Vec::new();
                for m in list {
                    let (service, method) = match &m.method {
                        None => (None, None),
                        Some(mm) => (
                            mm.service
                                .as_deref()
                                .map(|s| value_match(mm.kind, s))
                                .transpose()?,
                            mm.method
                                .as_deref()
                                .map(|s| value_match(mm.kind, s))
                                .transpose()?,
                        ),
                    };
                    matches.push(Match::Grpc(GrpcMatch {
                        service,
                        method,
                        headers: header_matches(&m.headers)?,
                    }));
                }
                rules.push(Rule {
                    index,
                    matches,
                    filters: filters(ns, &rule.filters)?,
                    backends: backends(ns, &rule.backend_refs)?,
                    request_timeout: None,
                    backend_timeout: None,
                    retry: None,
                });
            }
            (RouteKind::Grpc, rules, parents(ns, &spec.parent_refs))
        }
        other => return Err(format!("unknown route kind {other:?}")),
    };
    Ok((
        Route {
            kind,
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            created: r.created_revision,
            rules,
            id: format!("{}/{}", r.namespace, r.name),
        },
        parents,
    ))
}

/// The path a URLRewrite or redirect path modifier makes of `path`, given
/// the prefix that matched.
pub fn rewrite_path(m: &PathModifier, path: &str, matched_prefix: Option<&str>) -> String {
    match m.kind {
        PathModifierType::ReplaceFullPath => m.replace_full_path.clone().unwrap_or_default(),
        PathModifierType::ReplacePrefixMatch => {
            let replacement = m.replace_prefix_match.as_deref().unwrap_or("/");
            let prefix = matched_prefix.unwrap_or("/").trim_end_matches('/');
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            // Gateway API: "/foo" replacing "/" on "/foo/bar" gives "/bar"
            // ... and a replacement "/" never leaves a double slash.
            let replacement = replacement.trim_end_matches('/');
            match (replacement.is_empty(), rest.is_empty()) {
                (true, true) => "/".to_owned(),
                (true, false) => rest.to_owned(),
                (false, _) => format!("{replacement}{rest}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(kind: &str, ns: &str, name: &str, created: u64, spec: &str) -> pb::Route {
        let json: serde_json::Value = serde_yaml_ng::from_str(spec).unwrap();
        pb::Route {
            kind: kind.into(),
            namespace: ns.into(),
            name: name.into(),
            created_revision: created,
            spec_json: json.to_string(),
        }
    }

    fn http(ns: &str, name: &str, created: u64, spec: &str) -> pb::Route {
        route("HTTPRoute", ns, name, created, spec)
    }

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    /// Which route/rule serves the request, as "ns/name#rule", or "404" or
    /// "unrouted".
    fn pick(
        t: &RouteTable,
        caller: &str,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> String {
        let p = parts(method, uri, headers);
        let view = RequestView::new(&p);
        match t.select("mesh/echo", 80, Some(caller), &view) {
            Selection::Rule(s) => format!("{}#{}", s.route.id, s.rule.index),
            Selection::NoMatch => "404".into(),
            Selection::Unrouted => "unrouted".into(),
        }
    }

    fn table(routes: &[pb::Route]) -> RouteTable {
        let (t, errors) = RouteTable::build(routes);
        assert!(errors.is_empty(), "{errors:?}");
        t
    }

    const PARENT: &str = "parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]\n";

    #[test]
    fn prefix_is_segment_aware() {
        assert!(prefix_matches("/v2", "/v2"));
        assert!(prefix_matches("/v2", "/v2/"));
        assert!(prefix_matches("/v2", "/v2/x"));
        assert!(prefix_matches("/v2/", "/v2"));
        assert!(!prefix_matches("/v2", "/v2example"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn precedence_follows_the_gateway_api() {
        let t = table(&[http(
            "mesh",
            "matching",
            1,
            &format!(
                "{PARENT}rules:
- matches: [{{path: {{type: PathPrefix, value: /}}}}]
  backendRefs: [{{name: v1, port: 8080}}]
- matches: [{{path: {{type: PathPrefix, value: /v2}}}}]
  backendRefs: [{{name: v2, port: 8080}}]
- matches: [{{path: {{type: Exact, value: /v2/exact}}}}]
  backendRefs: [{{name: v3, port: 8080}}]
- matches: [{{path: {{type: PathPrefix, value: /v2}}, method: POST}}]
  backendRefs: [{{name: v3, port: 8080}}]
- matches: [{{path: {{type: PathPrefix, value: /v2}}, headers: [{{name: version, value: two}}]}}]
  backendRefs: [{{name: v3, port: 8080}}]
- matches: [{{path: {{type: PathPrefix, value: /v2}}, queryParams: [{{name: animal, value: whale}}]}}]
  backendRefs: [{{name: v3, port: 8080}}]
- matches: [{{path: {{type: RegularExpression, value: '/re/[0-9]+'}}}}]
  backendRefs: [{{name: v3, port: 8080}}]
"
            ),
        )]);
        let p = |m, u, h: &[(&str, &str)]| pick(&t, "mesh", m, u, h);
        assert_eq!(p("GET", "/", &[]), "mesh/matching#0");
        assert_eq!(p("GET", "/v2example", &[]), "mesh/matching#0");
        assert_eq!(p("GET", "/v2", &[]), "mesh/matching#1");
        assert_eq!(p("GET", "/v2/x", &[]), "mesh/matching#1");
        assert_eq!(
            p("GET", "/v2/exact", &[("version", "two")]),
            "mesh/matching#2"
        );
        assert_eq!(
            p("POST", "/v2/x", &[("version", "two")]),
            "mesh/matching#3",
            "method beats headers"
        );
        assert_eq!(p("GET", "/v2/x", &[("version", "two")]), "mesh/matching#4");
        assert_eq!(p("GET", "/v2/x?animal=whale", &[]), "mesh/matching#5");
        assert_eq!(
            p("GET", "/v2/x?animal=whale", &[("version", "two")]),
            "mesh/matching#4",
            "headers beat query parameters"
        );
        assert_eq!(
            p("GET", "/re/42", &[]),
            "mesh/matching#6",
            "regex beats prefix /"
        );
        assert_eq!(p("GET", "/re/x", &[]), "mesh/matching#0");
    }

    #[test]
    fn ties_go_to_the_oldest_route_then_by_name_then_first_rule() {
        let spec = format!(
            "{PARENT}rules: [{{backendRefs: [{{name: a, port: 80}}]}}, {{backendRefs: [{{name: b, port: 80}}]}}]"
        );
        let t = table(&[
            http("mesh", "young", 9, &spec),
            http("mesh", "old", 3, &spec),
        ]);
        assert_eq!(pick(&t, "mesh", "GET", "/", &[]), "mesh/old#0");
        let t = table(&[http("mesh", "bbb", 3, &spec), http("mesh", "aaa", 3, &spec)]);
        assert_eq!(pick(&t, "mesh", "GET", "/", &[]), "mesh/aaa#0");
    }

    #[test]
    fn no_matching_rule_is_404_and_no_route_is_unrouted() {
        let t = table(&[http(
            "mesh",
            "only-v2",
            1,
            &format!(
                "{PARENT}rules: [{{matches: [{{path: {{type: PathPrefix, value: /v2}}}}], backendRefs: [{{name: a, port: 80}}]}}]"
            ),
        )]);
        assert_eq!(pick(&t, "mesh", "GET", "/v1", &[]), "404");
        let p = parts("GET", "/v2", &[]);
        assert!(matches!(
            t.select("mesh/other", 80, Some("mesh"), &RequestView::new(&p)),
            Selection::Unrouted
        ));
        assert!(
            matches!(
                t.select("mesh/echo", 81, Some("mesh"), &RequestView::new(&p)),
                Selection::Unrouted
            ),
            "the route attaches to port 80 only"
        );
    }

    #[test]
    fn consumer_routes_apply_to_their_namespace_only_and_replace_producer_routes() {
        let producer = http(
            "mesh",
            "producer",
            1,
            &format!("{PARENT}rules: [{{backendRefs: [{{name: a, port: 80}}]}}]"),
        );
        let consumer = http(
            "client-ns",
            "consumer",
            2,
            "parentRefs: [{group: \"\", kind: Service, name: echo, namespace: mesh}]\nrules: [{backendRefs: [{name: echo, namespace: mesh, port: 80}]}]",
        );
        let t = table(&[producer, consumer]);
        assert_eq!(
            pick(&t, "client-ns", "GET", "/", &[]),
            "client-ns/consumer#0"
        );
        assert_eq!(pick(&t, "mesh", "GET", "/", &[]), "mesh/producer#0");
        assert_eq!(pick(&t, "elsewhere", "GET", "/", &[]), "mesh/producer#0");
    }

    #[test]
    fn grpc_routes_match_service_and_method() {
        let t = table(&[
            route(
                "GRPCRoute",
                "mesh",
                "grpc",
                1,
                &format!(
                    "{PARENT}rules:
- matches: [{{method: {{service: mesh.test.Echo}}}}]
  backendRefs: [{{name: a, port: 80}}]
- matches: [{{method: {{service: mesh.test.Echo, method: Stream}}}}]
  backendRefs: [{{name: b, port: 80}}]
"
                ),
            ),
            http(
                "mesh",
                "web",
                2,
                &format!("{PARENT}rules: [{{backendRefs: [{{name: c, port: 80}}]}}]"),
            ),
        ]);
        let grpc = [("content-type", "application/grpc")];
        assert_eq!(
            pick(&t, "mesh", "POST", "/mesh.test.Echo/Unary", &grpc),
            "mesh/grpc#0"
        );
        assert_eq!(
            pick(&t, "mesh", "POST", "/mesh.test.Echo/Stream", &grpc),
            "mesh/grpc#1"
        );
        assert_eq!(pick(&t, "mesh", "POST", "/other.Svc/Unary", &grpc), "404");
        assert_eq!(
            pick(&t, "mesh", "GET", "/index.html", &[]),
            "mesh/web#0",
            "plain HTTP takes the HTTPRoute"
        );
    }

    #[test]
    fn weighted_pick_follows_weights() {
        let t = table(&[http(
            "mesh",
            "split",
            1,
            &format!(
                "{PARENT}rules: [{{backendRefs: [{{name: a, port: 80, weight: 90}}, {{name: b, port: 80, weight: 10}}, {{name: c, port: 80, weight: 0}}]}}]"
            ),
        )]);
        let p = parts("GET", "/", &[]);
        let Selection::Rule(s) = t.select("mesh/echo", 80, Some("mesh"), &RequestView::new(&p))
        else {
            panic!()
        };
        let mut counts = HashMap::new();
        for r in 0..1000u64 {
            *counts
                .entry(s.rule.pick_backend(r).unwrap().backend.service.clone())
                .or_insert(0) += 1;
        }
        assert_eq!(counts["mesh/a"], 900);
        assert_eq!(counts["mesh/b"], 100);
        assert!(!counts.contains_key("mesh/c"));
    }

    #[test]
    fn rewrites() {
        let full = PathModifier {
            kind: PathModifierType::ReplaceFullPath,
            replace_full_path: Some("/one".into()),
            replace_prefix_match: None,
        };
        assert_eq!(rewrite_path(&full, "/a/b", Some("/a")), "/one");
        let prefix = |to: &str| PathModifier {
            kind: PathModifierType::ReplacePrefixMatch,
            replace_full_path: None,
            replace_prefix_match: Some(to.into()),
        };
        assert_eq!(
            rewrite_path(&prefix("/one"), "/prefix/two", Some("/prefix")),
            "/one/two"
        );
        assert_eq!(
            rewrite_path(&prefix("/"), "/strip-prefix/three", Some("/strip-prefix")),
            "/three"
        );
        assert_eq!(
            rewrite_path(&prefix("/"), "/strip-prefix", Some("/strip-prefix")),
            "/"
        );
        assert_eq!(
            rewrite_path(&prefix("/one"), "/prefix/", Some("/prefix/")),
            "/one/"
        );
        assert_eq!(rewrite_path(&prefix("/new"), "/a", Some("/")), "/new/a");
    }

    #[test]
    fn query_parameters_are_decoded() {
        let p = parts("GET", "/?animal=wh%61le&color=blue+green&x", &[]);
        let v = RequestView::new(&p);
        assert_eq!(
            v.query,
            [
                ("animal".to_owned(), "whale".to_owned()),
                ("color".to_owned(), "blue green".to_owned()),
                ("x".to_owned(), String::new())
            ]
        );
    }
}
