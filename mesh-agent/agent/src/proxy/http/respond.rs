//! Pure pieces of request handling: the mesh's own answers (errors, gRPC
//! trailers-only responses, redirects), `grpc-timeout`, and the rewriting of
//! a request for the HTTP version of the next hop.
use std::time::Duration;

use http::{
    HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version,
    header::{self, HeaderName},
    request::Parts,
    uri::{Authority, PathAndQuery, Scheme},
};
use mesh_api::gateway::RequestRedirect;

use super::{Body, FLAGS_HEADER, Flag, empty, full, routes::rewrite_path};

/// Whether a request is a gRPC call.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The mesh's own answer for `flag`: a plain-text error with the flag
/// header, or for a gRPC call a trailers-only response (HTTP 200 with
/// `grpc-status` and `grpc-message` in the headers), as gRPC clients expect.
pub fn local_reply(flag: Flag, grpc: bool, detail: &str) -> Response<Body> {
    let mut resp = if grpc {
        let mut r = Response::new(empty());
        let headers = r.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(flag.grpc_status()));
        if let Ok(v) = HeaderValue::from_str(&grpc_message(detail)) {
            headers.insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(full(format!("{detail}\n")));
        *r.status_mut() = flag.status();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    resp.headers_mut()
        .insert(FLAGS_HEADER, HeaderValue::from_static(flag.as_str()));
    resp
}

/// gRPC's percent-encoding of `grpc-message`.
fn grpc_message(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The deadline a gRPC caller set (`grpc-timeout: 100m`), if any.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The authority a request is for: the URI's (HTTP/2, absolute form), else
/// the Host header.
pub fn authority<'a>(uri: &'a http::Uri, headers: &'a http::HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

/// The host a request is for, without a port (see [`authority`]).
pub fn request_host(parts: &Parts) -> Option<String> {
    let authority = authority(&parts.uri, &parts.headers)?;
    let host = match authority.split_once(']') {
        // [v6]:port
        Some((v6, _)) if authority.starts_with('[') => format!("{v6}]"),
        _ => authority.split(':').next().unwrap_or_default().to_owned(),
    };
    Some(host)
}

/// The answer of a RequestRedirect filter: `Location` built from the
/// request and the filter (Gateway API rules: the scheme's well-known port
/// is left out; without a scheme or port the Service port is kept).
pub fn redirect(
    r: &RequestRedirect,
    parts: &Parts,
    prefix: Option<&str>,
    service_port: u16,
) -> Response<Body> {
    let scheme = r.scheme.clone().unwrap_or_else(|| "http".into());
    let host = r
        .hostname
        .clone()
        .or_else(|| request_host(parts))
        .unwrap_or_default();
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => Some(service_port),
    };
    let port =
        port.filter(|&p| !((scheme == "http" && p == 80) || (scheme == "https" && p == 443)));
    let path = match &r.path {
        Some(m) => rewrite_path(m, parts.uri.path(), prefix),
        None => parts.uri.path().to_owned(),
    };
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = match port {
        Some(p) => format!("{scheme}://{host}:{p}{path}{query}"),
        None => format!("{scheme}://{host}{path}{query}"),
    };
    let status = StatusCode::from_u16(r.status_code.unwrap_or(302)).unwrap_or(StatusCode::FOUND);
    let mut resp = Response::new(empty());
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut().insert(
        FLAGS_HEADER,
        HeaderValue::from_static(Flag::Redirect.as_str()),
    );
    resp
}

/// Connection-specific headers, which a proxy never forwards (RFC 9110
/// 7.6.1), and which HTTP/2 forbids.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
    if headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

/// How the client wrote its HTTP/1 request: what the destination agent
/// needs to write it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H1Form {
    pub version: Version,
    pub absolute: bool,
}

impl H1Form {
    pub fn encode(self) -> HeaderValue {
        let v = if self.version == Version::HTTP_10 {
            "1.0"
        } else {
            "1.1"
        };
        HeaderValue::from_static(match (v, self.absolute) {
            ("1.0", true) => "1.0;absolute",
            ("1.0", false) => "1.0",
            (_, true) => "1.1;absolute",
            _ => "1.1",
        })
    }

    pub fn decode(v: &HeaderValue) -> Option<H1Form> {
        let s = v.to_str().ok()?;
        let (version, absolute) = match s.split_once(';') {
            Some((v, "absolute")) => (v, true),
            None => (s, false),
            _ => return None,
        };
        let version = match version {
            "1.0" => Version::HTTP_10,
            "1.1" => Version::HTTP_11,
            _ => return None,
        };
        Some(H1Form { version, absolute })
    }
}

/// Makes `req` an HTTP/2 request: an absolute URI (`:scheme`, `:authority`
/// from the Host header when the client wrote origin form).
pub fn to_h2<B>(req: &mut Request<B>) {
    *req.version_mut() = Version::HTTP_2;
    strip_hop_by_hop(req.headers_mut());
    if req.uri().authority().is_none() {
        let authority = req
            .headers()
            .get(header::HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .unwrap_or_else(|| Authority::from_static("unknown"));
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

/// Makes `req` an HTTP/1 request as `form` says the client wrote it: its
/// version, and origin form unless it sent absolute form; a Host header
/// from the authority when the client (HTTP/2) sent none.
pub fn to_h1<B>(req: &mut Request<B>, form: H1Form) {
    *req.version_mut() = form.version;
    if let Some(authority) = req.uri().authority().cloned()
        && !req.headers().contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    if !form.absolute
        && let Some(pq) = req.uri().path_and_query().cloned()
        && let Ok(uri) =
            Uri::from_maybe_shared(bytes::Bytes::copy_from_slice(pq.as_str().as_bytes()))
    {
        *req.uri_mut() = uri;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::gateway::{PathModifier, PathModifierType};

    fn parts(uri: &str, host: Option<&str>) -> Parts {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn grpc_timeouts() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("grpc-timeout", HeaderValue::from_str(v).unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(h("100m"), Some(Duration::from_millis(100)));
        assert_eq!(h("2S"), Some(Duration::from_secs(2)));
        assert_eq!(h("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(h("5x"), None);
        assert_eq!(h("m"), None);
        assert_eq!(h("123456789m"), None, "at most 8 digits");
    }

    #[test]
    fn grpc_errors_are_trailers_only() {
        let r = local_reply(Flag::NoRoute, true, "no route for /a.B/C");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "12");
        assert_eq!(r.headers()["grpc-message"], "no route for /a.B/C");
        assert_eq!(r.headers()[FLAGS_HEADER], "NR");
        let r = local_reply(Flag::UpstreamTimeout, false, "timed out");
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(r.headers()[FLAGS_HEADER], "UT");
        assert_eq!(
            local_reply(Flag::UpstreamTimeout, true, "").headers()["grpc-status"],
            "4"
        );
        assert_eq!(
            local_reply(Flag::NoHealthyUpstream, true, "").headers()["grpc-status"],
            "14"
        );
    }

    fn location(r: RequestRedirect, uri: &str, host: &str, prefix: Option<&str>) -> (u16, String) {
        let resp = redirect(&r, &parts(uri, Some(host)), prefix, 80);
        (
            resp.status().as_u16(),
            resp.headers()[header::LOCATION]
                .to_str()
                .unwrap()
                .to_owned(),
        )
    }

    #[test]
    fn redirects_follow_the_gateway_api() {
        let r = |f: fn(&mut RequestRedirect)| {
            let mut r = RequestRedirect::default();
            f(&mut r);
            r
        };
        assert_eq!(
            location(
                r(|r| r.hostname = Some("example.org".into())),
                "/a?x=1",
                "echo:80",
                None
            ),
            (302, "http://example.org/a?x=1".into())
        );
        assert_eq!(
            location(
                r(|r| {
                    r.scheme = Some("https".into());
                    r.status_code = Some(301)
                }),
                "/a",
                "echo",
                None
            ),
            (301, "https://echo/a".into())
        );
        assert_eq!(
            location(r(|r| r.port = Some(8083)), "/a", "echo", None),
            (302, "http://echo:8083/a".into())
        );
        assert_eq!(
            location(
                r(|r| {
                    r.path = Some(PathModifier {
                        kind: PathModifierType::ReplacePrefixMatch,
                        replace_full_path: None,
                        replace_prefix_match: Some("/replacement-prefix".into()),
                    })
                }),
                "/original-prefix/path",
                "echo",
                Some("/original-prefix")
            ),
            (302, "http://echo/replacement-prefix/path".into())
        );
        for code in [303, 307, 308] {
            let rr = RequestRedirect {
                status_code: Some(code),
                ..Default::default()
            };
            assert_eq!(location(rr, "/", "echo", None).0, code);
        }
    }

    #[test]
    fn hosts() {
        assert_eq!(
            request_host(&parts("/", Some("echo:8080"))),
            Some("echo".into())
        );
        assert_eq!(request_host(&parts("/", Some("echo"))), Some("echo".into()));
        assert_eq!(
            request_host(&parts("http://a.b:9/x", Some("other"))),
            Some("a.b".into())
        );
    }

    #[test]
    fn version_changes_keep_the_request() {
        let mut req = Request::builder()
            .uri("/p?q=1")
            .header("host", "echo.mesh")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("x-keep", "2")
            .body(())
            .unwrap();
        to_h2(&mut req);
        assert_eq!(req.uri().to_string(), "http://echo.mesh/p?q=1");
        assert!(!req.headers().contains_key("connection"));
        assert!(!req.headers().contains_key("x-hop"));
        assert_eq!(req.headers()["x-keep"], "2");
        let form = H1Form {
            version: Version::HTTP_10,
            absolute: false,
        };
        assert_eq!(H1Form::decode(&form.encode()), Some(form));
        to_h1(&mut req, form);
        assert_eq!(req.uri().to_string(), "/p?q=1");
        assert_eq!(req.version(), Version::HTTP_10);
        let mut abs = Request::builder()
            .uri("http://echo.mesh/p")
            .body(())
            .unwrap();
        to_h1(
            &mut abs,
            H1Form {
                version: Version::HTTP_11,
                absolute: true,
            },
        );
        assert_eq!(abs.uri().to_string(), "http://echo.mesh/p");
        assert_eq!(
            abs.headers()["host"],
            "echo.mesh",
            "a Host header is added from the authority"
        );
    }
}
