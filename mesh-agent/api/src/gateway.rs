//! The Gateway API route kinds as the mesh reads them (GAMMA: routes attach
//! to a Service through `parentRefs`): `HTTPRoute` and `GRPCRoute` of
//! `gateway.networking.k8s.io/v1`, their specs as typed values, and the
//! checks a spec must pass on its own (those that need other resources, such
//! as "the parent Service exists", are the control server's).
//!
//! The control server parses a document's `spec` into [`HttpRouteSpec`] or
//! [`GrpcRouteSpec`] (unknown fields refused), runs [`HttpRouteSpec::validate`],
//! and distributes the spec as JSON; the agent reads it back into the same
//! type. Field names and meanings are the Gateway API's.
use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};

pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";
/// Largest compiled size of one regular expression (regex's own unit, bytes
/// of program): a hostile pattern is refused at apply, not at match time.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Gateway API limits.
pub const MAX_PARENT_REFS: usize = 32;
pub const MAX_RULES: usize = 16;
pub const MAX_MATCHES: usize = 64;
pub const MAX_HEADER_MATCHES: usize = 16;
pub const MAX_BACKEND_REFS: usize = 16;
pub const MAX_WEIGHT: u32 = 1_000_000;

/// A reference from a route to the Service it attaches to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    /// `""` (core) for a Service; GAMMA's only parent here.
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    /// Defaults to the route's own namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
    /// Ignored for Services (Gateway listeners only).
    #[serde(default)]
    pub section_name: Option<String>,
    /// One port of the Service; unset attaches to every port.
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// GAMMA: ignored for Service parents (the Service is the host).
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    /// None: one match of path prefix `/`.
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    /// GEP-1731 (experimental channel): retries of this rule's requests.
    #[serde(default)]
    pub retry: Option<HttpRouteRetry>,
}

/// GEP-1731 `retry`: retry on these status codes (and on connection
/// failures and resets), up to `attempts` times, waiting `backoff` (full
/// jitter) between tries. Overrides a TrafficPolicy's conditions, attempts
/// and backoff for the rule; the policy's budget still applies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRetry {
    #[serde(default)]
    pub codes: Vec<u16>,
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub backoff: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    #[serde(default)]
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
    #[serde(default)]
    pub query_params: Vec<HeaderMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default, rename = "type")]
    pub kind: PathMatchType,
    #[serde(default = "root")]
    pub value: String,
}

fn root() -> String {
    "/".into()
}

#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

/// A header or query-parameter match (the same shape in the Gateway API).
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    #[serde(default, rename = "type")]
    pub kind: ValueMatchType,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// Whole exchange, retries included; `0s` disables.
    #[serde(default)]
    pub request: Option<String>,
    /// Each attempt toward a backend.
    #[serde(default)]
    pub backend_request: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<HttpHeader>,
    #[serde(default)]
    pub add: Vec<HttpHeader>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: PathModifierType,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
    #[serde(default)]
    pub port: Option<u16>,
    /// 302 unless set.
    #[serde(default)]
    pub status_code: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fraction {
    pub numerator: u32,
    #[serde(default = "hundred")]
    pub denominator: u32,
}

fn hundred() -> u32 {
    100
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMirror {
    pub backend_ref: BackendObjectRef,
    #[serde(default)]
    pub percent: Option<u32>,
    #[serde(default)]
    pub fraction: Option<Fraction>,
}

impl RequestMirror {
    /// The share of requests mirrored, as numerator/denominator.
    pub fn share(&self) -> (u32, u32) {
        match (&self.fraction, self.percent) {
            (Some(f), _) => (f.numerator, f.denominator),
            (None, Some(p)) => (p, 100),
            (None, None) => (1, 1),
        }
    }
}

/// A Service and port, as filters and backends name them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendObjectRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpBackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "one")]
    pub weight: u32,
    /// Applied to requests sent to this backend only.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
}

fn one() -> u32 {
    1
}

impl HttpBackendRef {
    pub fn object(&self) -> BackendObjectRef {
        BackendObjectRef {
            group: self.group.clone(),
            kind: self.kind.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            port: self.port,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum HttpRouteFilter {
    RequestHeaderModifier {
        request_header_modifier: HeaderModifier,
    },
    ResponseHeaderModifier {
        response_header_modifier: HeaderModifier,
    },
    RequestRedirect {
        request_redirect: RequestRedirect,
    },
    #[serde(rename = "URLRewrite")]
    UrlRewrite {
        #[serde(rename = "urlRewrite")]
        url_rewrite: UrlRewrite,
    },
    RequestMirror {
        request_mirror: RequestMirror,
    },
}

impl HttpRouteFilter {
    pub fn type_name(&self) -> &'static str {
        match self {
            HttpRouteFilter::RequestHeaderModifier { .. } => "RequestHeaderModifier",
            HttpRouteFilter::ResponseHeaderModifier { .. } => "ResponseHeaderModifier",
            HttpRouteFilter::RequestRedirect { .. } => "RequestRedirect",
            HttpRouteFilter::UrlRewrite { .. } => "URLRewrite",
            HttpRouteFilter::RequestMirror { .. } => "RequestMirror",
        }
    }
}

// ---- GRPCRoute

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    /// RequestHeaderModifier, ResponseHeaderModifier and RequestMirror only.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    #[serde(default, rename = "type")]
    pub kind: ValueMatchType,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

// ---- Checks

/// A field of a spec that fails a check: its path from `spec`, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Invalid {
    /// E.g. `spec.rules[0].matches[1].path.value`.
    pub field: String,
    pub problem: String,
}

/// A check's failure at `field`.
pub(crate) fn invalid<T>(
    field: impl fmt::Display,
    problem: impl fmt::Display,
) -> Result<T, Invalid> {
    Err(Invalid {
        field: field.to_string(),
        problem: problem.to_string(),
    })
}

/// Compiles a Gateway API regular expression (RE2 syntax), bounded in size.
/// The whole value must match, so the pattern is anchored.
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("{pattern:?} is not a valid regular expression: {e}"))
}

/// A Gateway API duration (`1h`, `30s`, `500ms`, `1m30s`): up to four
/// number-unit pairs, numbers of at most 5 digits, units h, m, s, ms.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (like \"10s\", \"500ms\" or \"1m30s\")");
    let mut rest = text;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit * u32::try_from(n).map_err(|_| bad())?;
        parts += 1;
        if parts > 4 {
            return Err(bad());
        }
    }
    if parts == 0 {
        return Err(bad());
    }
    Ok(total)
}

pub(crate) fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_header_value(s: &str) -> bool {
    s.len() <= 4096
        && s.bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
}

fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn check_parent_refs(refs: &[ParentRef]) -> Result<(), Invalid> {
    if refs.is_empty() {
        return invalid(
            "spec.parentRefs",
            "at least one entry is required (a Service, for the mesh)",
        );
    }
    if refs.len() > MAX_PARENT_REFS {
        return invalid(
            "spec.parentRefs",
            format!("at most {MAX_PARENT_REFS} entries"),
        );
    }
    for (i, p) in refs.iter().enumerate() {
        let at = format!("spec.parentRefs[{i}]");
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
        if kind != "Service" || !(group.is_empty() || group == "core") {
            return invalid(
                format!("{at}.kind"),
                format!(
                    "{group:?}/{kind:?} is not supported: mesh routes attach to a Service (group \"\", kind \"Service\")"
                ),
            );
        }
        if p.port == Some(0) {
            return invalid(format!("{at}.port"), "port 0 is out of range (1-65535)");
        }
        if refs[..i].contains(p) {
            return invalid(&at, "the same parent is listed twice");
        }
    }
    Ok(())
}

fn check_backend(at: &str, b: &BackendObjectRef) -> Result<(), Invalid> {
    let kind = b.kind.as_deref().unwrap_or("Service");
    let group = b.group.as_deref().unwrap_or("");
    if kind != "Service" || !(group.is_empty() || group == "core") {
        return invalid(
            format!("{at}.kind"),
            format!("{group:?}/{kind:?} is not supported: backends are Services"),
        );
    }
    match b.port {
        None => invalid(
            format!("{at}.port"),
            "required field is missing (a Service backend needs a port)",
        ),
        Some(0) => invalid(format!("{at}.port"), "port 0 is out of range (1-65535)"),
        Some(_) => Ok(()),
    }
}

fn check_header_modifier(at: &str, m: &HeaderModifier) -> Result<(), Invalid> {
    let mut seen: Vec<String> = Vec::new();
    for (list, entries) in [("set", &m.set), ("add", &m.add)] {
        for (i, h) in entries.iter().enumerate() {
            let field = format!("{at}.{list}[{i}]");
            if !is_header_name(&h.name) {
                return invalid(
                    format!("{field}.name"),
                    format!("{:?} is not a header name", h.name),
                );
            }
            if !is_header_value(&h.value) {
                return invalid(
                    format!("{field}.value"),
                    format!("{:?} is not a header value", h.value),
                );
            }
            let lower = format!("{list}:{}", h.name.to_ascii_lowercase());
            if seen.contains(&lower) {
                return invalid(
                    format!("{field}.name"),
                    format!("{:?} is listed twice in {list}", h.name),
                );
            }
            seen.push(lower);
        }
    }
    for (i, name) in m.remove.iter().enumerate() {
        if !is_header_name(name) {
            return invalid(
                format!("{at}.remove[{i}]"),
                format!("{name:?} is not a header name"),
            );
        }
    }
    if m.set.is_empty() && m.add.is_empty() && m.remove.is_empty() {
        return invalid(
            at,
            "a header modifier needs at least one of set, add, remove",
        );
    }
    Ok(())
}

fn check_path_modifier(
    at: &str,
    p: &PathModifier,
    rule_has_prefix_match: bool,
) -> Result<(), Invalid> {
    let (value, field) = match p.kind {
        PathModifierType::ReplaceFullPath => (&p.replace_full_path, "replaceFullPath"),
        PathModifierType::ReplacePrefixMatch => {
            if !rule_has_prefix_match {
                return invalid(
                    format!("{at}.type"),
                    "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
                );
            }
            (&p.replace_prefix_match, "replacePrefixMatch")
        }
    };
    let Some(value) = value else {
        return invalid(
            format!("{at}.{field}"),
            format!("required field is missing for type {:?}", p.kind),
        );
    };
    if !value.starts_with('/') || value.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return invalid(
            format!("{at}.{field}"),
            format!("{value:?} is not an absolute path"),
        );
    }
    let other = match p.kind {
        PathModifierType::ReplaceFullPath => p.replace_prefix_match.is_some(),
        PathModifierType::ReplacePrefixMatch => p.replace_full_path.is_some(),
    };
    if other {
        return invalid(at, "set only the field of its type");
    }
    Ok(())
}

/// Checks a rule's filters: each kind at most once (mirrors excepted),
/// RequestRedirect never with URLRewrite, nor with backendRefs.
fn check_filters(
    at: &str,
    filters: &[HttpRouteFilter],
    allowed: &[&str],
    all_prefix_matches: bool,
    has_backends: bool,
) -> Result<(), Invalid> {
    let mut seen: Vec<&str> = Vec::new();
    for (i, f) in filters.iter().enumerate() {
        let field = format!("{at}[{i}]");
        let name = f.type_name();
        if !allowed.contains(&name) {
            return invalid(
                format!("{field}.type"),
                format!(
                    "{name} is not allowed here (allowed: {})",
                    allowed.join(", ")
                ),
            );
        }
        if name != "RequestMirror" && seen.contains(&name) {
            return invalid(
                format!("{field}.type"),
                format!("{name} may appear only once in a filter list"),
            );
        }
        seen.push(name);
        match f {
            HttpRouteFilter::RequestHeaderModifier {
                request_header_modifier: m,
            } => check_header_modifier(&format!("{field}.requestHeaderModifier"), m)?,
            HttpRouteFilter::ResponseHeaderModifier {
                response_header_modifier: m,
            } => check_header_modifier(&format!("{field}.responseHeaderModifier"), m)?,
            HttpRouteFilter::RequestRedirect {
                request_redirect: r,
            } => {
                let at = format!("{field}.requestRedirect");
                if let Some(s) = &r.scheme
                    && s != "http"
                    && s != "https"
                {
                    return invalid(
                        format!("{at}.scheme"),
                        format!("{s:?} is not \"http\" or \"https\""),
                    );
                }
                if let Some(h) = &r.hostname
                    && !is_hostname(h)
                {
                    return invalid(format!("{at}.hostname"), format!("{h:?} is not a hostname"));
                }
                if r.port == Some(0) {
                    return invalid(format!("{at}.port"), "port 0 is out of range (1-65535)");
                }
                if let Some(code) = r.status_code
                    && ![301, 302, 303, 307, 308].contains(&code)
                {
                    return invalid(
                        format!("{at}.statusCode"),
                        format!("{code} is not a redirect status (301, 302, 303, 307 or 308)"),
                    );
                }
                if let Some(p) = &r.path {
                    check_path_modifier(&format!("{at}.path"), p, all_prefix_matches)?;
                }
                if has_backends {
                    return invalid(
                        format!("{field}.type"),
                        "RequestRedirect answers the request itself: a rule with it has no backendRefs",
                    );
                }
            }
            HttpRouteFilter::UrlRewrite { url_rewrite: r } => {
                let at = format!("{field}.urlRewrite");
                if let Some(h) = &r.hostname
                    && !is_hostname(h)
                {
                    return invalid(format!("{at}.hostname"), format!("{h:?} is not a hostname"));
                }
                if let Some(p) = &r.path {
                    check_path_modifier(&format!("{at}.path"), p, all_prefix_matches)?;
                }
            }
            HttpRouteFilter::RequestMirror { request_mirror: m } => {
                let at = format!("{field}.requestMirror");
                check_backend(&format!("{at}.backendRef"), &m.backend_ref)?;
                if m.percent.is_some() && m.fraction.is_some() {
                    return invalid(&at, "set percent or fraction, not both");
                }
                if let Some(p) = m.percent
                    && p > 100
                {
                    return invalid(format!("{at}.percent"), format!("{p} is above 100"));
                }
                if let Some(f) = &m.fraction
                    && (f.denominator == 0 || f.numerator > f.denominator)
                {
                    return invalid(
                        format!("{at}.fraction"),
                        format!(
                            "{}/{} is not a fraction between 0 and 1",
                            f.numerator, f.denominator
                        ),
                    );
                }
            }
        }
    }
    if seen.contains(&"RequestRedirect") && seen.contains(&"URLRewrite") {
        return invalid(
            at,
            "RequestRedirect and URLRewrite cannot be used together in one rule",
        );
    }
    Ok(())
}

fn check_backends(
    at: &str,
    refs: &[HttpBackendRef],
    allowed_filters: &[&str],
) -> Result<(), Invalid> {
    if refs.len() > MAX_BACKEND_REFS {
        return invalid(at, format!("at most {MAX_BACKEND_REFS} entries"));
    }
    for (i, b) in refs.iter().enumerate() {
        let field = format!("{at}[{i}]");
        check_backend(&field, &b.object())?;
        if b.weight > MAX_WEIGHT {
            return invalid(
                format!("{field}.weight"),
                format!("{} is above the largest weight, {MAX_WEIGHT}", b.weight),
            );
        }
        let filters: Vec<&str> = allowed_filters
            .iter()
            .copied()
            .filter(|f| *f != "RequestRedirect" && *f != "URLRewrite")
            .collect();
        check_filters(
            &format!("{field}.filters"),
            &b.filters,
            &filters,
            false,
            true,
        )?;
    }
    if !refs.is_empty() && refs.iter().all(|b| b.weight == 0) {
        return invalid(
            at,
            "every backend has weight 0, so no request could be sent anywhere",
        );
    }
    Ok(())
}

fn check_header_matches(at: &str, headers: &[HeaderMatch], what: &str) -> Result<(), Invalid> {
    if headers.len() > MAX_HEADER_MATCHES {
        return invalid(at, format!("at most {MAX_HEADER_MATCHES} entries"));
    }
    for (i, h) in headers.iter().enumerate() {
        let field = format!("{at}[{i}]");
        if what == "header" && !is_header_name(&h.name) {
            return invalid(
                format!("{field}.name"),
                format!("{:?} is not a header name", h.name),
            );
        }
        if h.name.is_empty() {
            return invalid(format!("{field}.name"), "an empty name");
        }
        let same = |o: &HeaderMatch| {
            if what == "header" {
                o.name.eq_ignore_ascii_case(&h.name)
            } else {
                o.name == h.name
            }
        };
        if headers[..i].iter().any(same) {
            return invalid(
                format!("{field}.name"),
                format!("{what} {:?} is matched twice", h.name),
            );
        }
        if h.kind == ValueMatchType::RegularExpression {
            compile_regex(&h.value).or_else(|e| invalid(format!("{field}.value"), e))?;
        }
    }
    Ok(())
}

const HTTP_FILTERS: [&str; 5] = [
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
    "RequestMirror",
];
const GRPC_FILTERS: [&str; 3] = [
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
];

impl HttpRouteSpec {
    /// The checks a spec must pass on its own, each naming the field.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_parent_refs(&self.parent_refs)?;
        if self.rules.len() > MAX_RULES {
            return invalid("spec.rules", format!("at most {MAX_RULES} entries"));
        }
        for (r, rule) in self.rules.iter().enumerate() {
            let at = format!("spec.rules[{r}]");
            if rule.matches.len() > MAX_MATCHES {
                return invalid(
                    format!("{at}.matches"),
                    format!("at most {MAX_MATCHES} entries"),
                );
            }
            for (m, mat) in rule.matches.iter().enumerate() {
                let field = format!("{at}.matches[{m}]");
                if let Some(p) = &mat.path {
                    let f = format!("{field}.path.value");
                    match p.kind {
                        PathMatchType::Exact | PathMatchType::PathPrefix => {
                            if !p.value.starts_with('/') {
                                return invalid(
                                    f,
                                    format!("{:?} does not start with \"/\"", p.value),
                                );
                            }
                            if p.value.contains("//")
                                || p.value.contains("/./")
                                || p.value.contains("/../")
                                || p.value.contains('?')
                                || p.value.contains('#')
                            {
                                return invalid(
                                    f,
                                    format!(
                                        "{:?} is not a normalized path (no \"//\", \"/./\", \"/../\", '?' or '#')",
                                        p.value
                                    ),
                                );
                            }
                        }
                        PathMatchType::RegularExpression => {
                            compile_regex(&p.value).or_else(|e| invalid(f, e))?;
                        }
                    }
                }
                if let Some(method) = &mat.method
                    && !METHODS.contains(&method.as_str())
                {
                    return invalid(
                        format!("{field}.method"),
                        format!("{method:?} is not an HTTP method ({})", METHODS.join(", ")),
                    );
                }
                check_header_matches(&format!("{field}.headers"), &mat.headers, "header")?;
                check_header_matches(
                    &format!("{field}.queryParams"),
                    &mat.query_params,
                    "query parameter",
                )?;
            }
            let all_prefix = rule.matches.is_empty()
                || rule.matches.iter().all(|m| {
                    m.path
                        .as_ref()
                        .is_none_or(|p| p.kind == PathMatchType::PathPrefix)
                });
            check_filters(
                &format!("{at}.filters"),
                &rule.filters,
                &HTTP_FILTERS,
                all_prefix,
                !rule.backend_refs.is_empty(),
            )?;
            check_backends(
                &format!("{at}.backendRefs"),
                &rule.backend_refs,
                &HTTP_FILTERS,
            )?;
            if let Some(t) = &rule.timeouts {
                let field = format!("{at}.timeouts");
                let request = t
                    .request
                    .as_deref()
                    .map(parse_duration)
                    .transpose()
                    .or_else(|e| invalid(format!("{field}.request"), e))?;
                let backend = t
                    .backend_request
                    .as_deref()
                    .map(parse_duration)
                    .transpose()
                    .or_else(|e| invalid(format!("{field}.backendRequest"), e))?;
                if let (Some(req), Some(be)) = (request, backend)
                    && !req.is_zero()
                    && (be.is_zero() || be > req)
                {
                    return invalid(
                        format!("{field}.backendRequest"),
                        format!(
                            "{} is longer than the request timeout {}: an attempt cannot outlast the whole exchange",
                            t.backend_request.as_deref().unwrap_or_default(),
                            t.request.as_deref().unwrap_or_default()
                        ),
                    );
                }
            }
            if let Some(r) = &rule.retry {
                let field = format!("{at}.retry");
                for (i, c) in r.codes.iter().enumerate() {
                    if !(400..=599).contains(c) {
                        return invalid(
                            format!("{field}.codes[{i}]"),
                            format!("{c} is not an error status (400 to 599)"),
                        );
                    }
                }
                if let Some(n) = r.attempts
                    && n > crate::traffic::MAX_RETRY_ATTEMPTS
                {
                    return invalid(
                        format!("{field}.attempts"),
                        format!(
                            "{n} is more than the most, {}",
                            crate::traffic::MAX_RETRY_ATTEMPTS
                        ),
                    );
                }
                if let Some(b) = &r.backoff {
                    parse_duration(b).or_else(|e| invalid(format!("{field}.backoff"), e))?;
                }
            }
        }
        Ok(())
    }

    /// Every Service a rule sends to (backends and mirrors), with the field
    /// that names it: for the control server's existence checks.
    pub fn backend_refs(&self) -> Vec<(String, BackendObjectRef)> {
        let mut out = Vec::new();
        for (r, rule) in self.rules.iter().enumerate() {
            collect_refs(
                &mut out,
                &format!("spec.rules[{r}]"),
                &rule.filters,
                &rule.backend_refs,
            );
        }
        out
    }
}

fn collect_refs(
    out: &mut Vec<(String, BackendObjectRef)>,
    at: &str,
    filters: &[HttpRouteFilter],
    backends: &[HttpBackendRef],
) {
    let mirrors = |out: &mut Vec<_>, at: &str, filters: &[HttpRouteFilter]| {
        for (i, f) in filters.iter().enumerate() {
            if let HttpRouteFilter::RequestMirror { request_mirror } = f {
                out.push((
                    format!("{at}[{i}].requestMirror.backendRef"),
                    request_mirror.backend_ref.clone(),
                ));
            }
        }
    };
    mirrors(out, &format!("{at}.filters"), filters);
    for (b, backend) in backends.iter().enumerate() {
        out.push((format!("{at}.backendRefs[{b}]"), backend.object()));
        mirrors(
            out,
            &format!("{at}.backendRefs[{b}].filters"),
            &backend.filters,
        );
    }
}

impl GrpcRouteSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        check_parent_refs(&self.parent_refs)?;
        if self.rules.len() > MAX_RULES {
            return invalid("spec.rules", format!("at most {MAX_RULES} entries"));
        }
        for (r, rule) in self.rules.iter().enumerate() {
            let at = format!("spec.rules[{r}]");
            for (m, mat) in rule.matches.iter().enumerate() {
                let field = format!("{at}.matches[{m}]");
                if let Some(method) = &mat.method {
                    let f = format!("{field}.method");
                    if method.service.is_none() && method.method.is_none() {
                        return invalid(f, "set service, method or both");
                    }
                    for (name, value) in [("service", &method.service), ("method", &method.method)]
                    {
                        let Some(value) = value else { continue };
                        match method.kind {
                            ValueMatchType::Exact => {
                                let ok = !value.is_empty()
                                    && value.bytes().all(|b| {
                                        b.is_ascii_alphanumeric()
                                            || b == b'_'
                                            || (name == "service" && b == b'.')
                                    });
                                if !ok {
                                    return invalid(
                                        format!("{f}.{name}"),
                                        format!("{value:?} is not a gRPC {name} name"),
                                    );
                                }
                            }
                            ValueMatchType::RegularExpression => {
                                compile_regex(value)
                                    .or_else(|e| invalid(format!("{f}.{name}"), e))?;
                            }
                        }
                    }
                }
                check_header_matches(&format!("{field}.headers"), &mat.headers, "header")?;
            }
            check_filters(
                &format!("{at}.filters"),
                &rule.filters,
                &GRPC_FILTERS,
                false,
                !rule.backend_refs.is_empty(),
            )?;
            check_backends(
                &format!("{at}.backendRefs"),
                &rule.backend_refs,
                &GRPC_FILTERS,
            )?;
        }
        Ok(())
    }

    pub fn backend_refs(&self) -> Vec<(String, BackendObjectRef)> {
        let mut out = Vec::new();
        for (r, rule) in self.rules.iter().enumerate() {
            collect_refs(
                &mut out,
                &format!("spec.rules[{r}]"),
                &rule.filters,
                &rule.backend_refs,
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(yaml: &str) -> HttpRouteSpec {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    const PARENT: &str = "parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]\n";

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(
            parse_duration("1h1m1s1ms"),
            Ok(Duration::from_millis(3_661_001))
        );
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "10", "s", "1.5s", "123456s", "1h1m1s1ms1s", "-1s", "1d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_full_route_parses_and_passes() {
        let spec = http(&format!(
            "{PARENT}rules:
- matches:
  - path: {{type: PathPrefix, value: /v2}}
    headers: [{{name: version, value: two}}]
    queryParams: [{{type: RegularExpression, name: animal, value: 'wh.*'}}]
    method: GET
  filters:
  - type: RequestHeaderModifier
    requestHeaderModifier: {{set: [{{name: x-a, value: b}}], remove: [x-c]}}
  - type: URLRewrite
    urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /}}}}
  backendRefs:
  - {{name: v2, port: 8080, weight: 90}}
  - name: v1
    port: 8080
    weight: 10
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {{add: [{{name: x-backend, value: v1}}]}}
  timeouts: {{request: 10s, backendRequest: 2s}}
"
        ));
        spec.validate().unwrap();
        assert_eq!(spec.rules[0].backend_refs[1].weight, 10);
        assert_eq!(spec.backend_refs().len(), 2);
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<HttpRouteSpec>(&json).unwrap(), spec);
    }

    fn problem(yaml: &str) -> Invalid {
        http(&format!("{PARENT}{yaml}")).validate().unwrap_err()
    }

    #[test]
    fn bad_specs_name_the_field() {
        let cases = [
            (
                "rules: [{matches: [{path: {type: RegularExpression, value: '(['}}]}]",
                "spec.rules[0].matches[0].path.value",
            ),
            (
                "rules: [{backendRefs: [{name: a, port: 80, weight: 0}, {name: b, port: 80, weight: 0}]}]",
                "spec.rules[0].backendRefs",
            ),
            (
                "rules: [{backendRefs: [{name: a, port: 80}], timeouts: {request: 1s, backendRequest: 2s}}]",
                "spec.rules[0].timeouts.backendRequest",
            ),
            (
                "rules: [{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}, {type: URLRewrite, urlRewrite: {hostname: x}}]}]",
                "spec.rules[0].filters",
            ),
            (
                "rules: [{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 305}}]}]",
                "spec.rules[0].filters[0].requestRedirect.statusCode",
            ),
            (
                "rules: [{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]",
                "spec.rules[0].filters[0].urlRewrite.path.type",
            ),
            (
                "rules: [{backendRefs: [{name: a}]}]",
                "spec.rules[0].backendRefs[0].port",
            ),
            (
                "rules: [{matches: [{method: FETCH}]}]",
                "spec.rules[0].matches[0].method",
            ),
            (
                "rules: [{matches: [{path: {value: v2}}]}]",
                "spec.rules[0].matches[0].path.value",
            ),
            (
                "rules: [{filters: [{type: RequestRedirect, requestRedirect: {port: 8080}}], backendRefs: [{name: a, port: 80}]}]",
                "spec.rules[0].filters[0].type",
            ),
        ];
        for (yaml, field) in cases {
            let e = problem(yaml);
            assert_eq!(e.field, field, "{yaml}: {e}");
        }
        let e = http("parentRefs: [{name: gw}]").validate().unwrap_err();
        assert_eq!(e.field, "spec.parentRefs[0].kind");
    }

    #[test]
    fn unknown_fields_and_filter_types_are_refused_by_the_parser() {
        assert!(serde_yaml_ng::from_str::<HttpRouteSpec>(&format!("{PARENT}rulez: []")).is_err());
        assert!(
            serde_yaml_ng::from_str::<HttpRouteSpec>(&format!(
                "{PARENT}rules: [{{filters: [{{type: ExtensionRef}}]}}]"
            ))
            .is_err()
        );
    }

    #[test]
    fn grpc_route_checks() {
        let spec: GrpcRouteSpec = serde_yaml_ng::from_str(&format!(
            "{PARENT}rules: [{{matches: [{{method: {{service: mesh.test.Echo, method: Unary}}}}], backendRefs: [{{name: a, port: 50051}}]}}]"
        ))
        .unwrap();
        spec.validate().unwrap();
        let bad: GrpcRouteSpec =
            serde_yaml_ng::from_str(&format!("{PARENT}rules: [{{matches: [{{method: {{}}}}]}}]"))
                .unwrap();
        assert_eq!(
            bad.validate().unwrap_err().field,
            "spec.rules[0].matches[0].method"
        );
        let bad: GrpcRouteSpec = serde_yaml_ng::from_str(&format!(
            "{PARENT}rules: [{{filters: [{{type: URLRewrite, urlRewrite: {{hostname: x}}}}]}}]"
        ))
        .unwrap();
        assert_eq!(
            bad.validate().unwrap_err().field,
            "spec.rules[0].filters[0].type"
        );
    }
}
