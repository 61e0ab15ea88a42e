//! `--http-echo`: HTTP/1.1 and h2c (prior knowledge) on one port, answering
//! like the Gateway API conformance echo server: a JSON description of the
//! request as it arrived. Paths under `/_/` do special things, so that route
//! tests with arbitrary paths never reach them by accident:
//!
//! | path | answer |
//! | --- | --- |
//! | `/_/status/NNN` | status NNN (200..=599), the usual JSON |
//! | `/_/delay/MS` | the usual JSON after MS milliseconds |
//! | `/_/upload` | `{"pod", "body_bytes"}`; the body is counted, never held |
//! | `/_/download/N` | N bytes, `content-length: N`, sent in 64 KiB chunks of one static buffer |
//! | `/_/trailers` | a body, then the trailer `x-trailer: yes` (HTTP/1.1: chunked, when the request says `TE: trailers`) |
//! | `/_/ws`, or any `Upgrade: websocket` | 101 with `Sec-WebSocket-Accept`, then the raw bytes echoed back (frames verbatim) |
//!
//! Two request headers make chosen servers misbehave on any path, so that one
//! client command (`curl`, `wrk`, `h2load` with `-H`) sent through a load
//! balancer fails or slows down only some of the pods behind it:
//!
//! | header | answer |
//! | --- | --- |
//! | `x-echo-delay: MS[/PERCENT][@NAMES]` | after MS more milliseconds (at most 600000) |
//! | `x-echo-fail: STATUS[/PERCENT][@NAMES]` | status STATUS (200..=599), the usual JSON, whatever the path |
//! | `x-echo-fail: reset[/PERCENT][@NAMES]` | none: HTTP/1 drops the connection, h2 resets the stream (`INTERNAL_ERROR`) |
//!
//! NAMES is `NAME[,NAME...]`: only servers started with one of these names
//! (exactly, case-sensitive) take part; without `@NAMES`, every server does.
//! A server that takes part acts on PERCENT percent of requests (0..=100,
//! default 100), drawn at random per request and per header. MS, STATUS and
//! PERCENT are plain decimal digits, `reset` is lower case; spaces around
//! each part are ignored.
//! With both headers the delay comes first, then the failure; neither
//! replaces the path's own effect (`/_/delay/MS` adds its delay). Each header
//! may appear once; a repeated or malformed one is answered 400 by every
//! server, with the header and its value in `error`.
//!
//! Every response carries `x-served-by: NAME`. `Expect: 100-continue` is
//! answered by hyper when the handler first reads the body.

use std::{
    convert::Infallible,
    error::Error,
    fmt,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Request, Response, StatusCode, Version,
    header::{CONNECTION, CONTENT_TYPE, HOST, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE},
};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use super::SERVED_BY_HEADER;

/// One chunk of a download; every chunk is a slice of this one buffer.
const DOWNLOAD_CHUNK: usize = 64 * 1024;
static DOWNLOAD_BYTES: [u8; DOWNLOAD_CHUNK] = [b'x'; DOWNLOAD_CHUNK];
/// Longest `/_/delay/MS` or `x-echo-delay`: tests are bounded, so is the server.
const MAX_DELAY: Duration = Duration::from_secs(600);
/// Request header: answer with a status, or not at all, on the servers it names.
const FAIL_HEADER: &str = "x-echo-fail";
/// Request header: answer late on the servers it names.
const DELAY_HEADER: &str = "x-echo-delay";
/// RFC 6455, section 1.3.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// What every response body is boxed as: none of them fails once started.
pub type EchoBody = BoxBody<Bytes, Infallible>;

/// Why a request got no response. Hyper answers a service error by closing
/// the HTTP/1 connection or resetting the h2 stream.
#[derive(Debug)]
pub enum EchoError {
    /// Reading the request failed.
    Request(hyper::Error),
    /// `x-echo-fail` chose `reset` for this request.
    Reset,
}

impl fmt::Display for EchoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EchoError::Request(_) => f.write_str("reading the request"),
            EchoError::Reset => write!(f, "reset as {FAIL_HEADER} asked"),
        }
    }
}

impl Error for EchoError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            EchoError::Request(err) => Some(err),
            EchoError::Reset => None,
        }
    }
}

impl From<hyper::Error> for EchoError {
    fn from(err: hyper::Error) -> Self {
        EchoError::Request(err)
    }
}

/// What a request under `/_/` asks for.
#[derive(Debug, PartialEq, Eq)]
enum Special {
    /// Not a special path: describe the request.
    Echo,
    Status(StatusCode),
    Delay(Duration),
    Upload,
    Download(u64),
    Trailers,
    WebSocket,
    /// A special path that cannot be served: its status and why.
    Bad(StatusCode, String),
}

impl Special {
    fn of(path: &str) -> Special {
        let Some(rest) = path.strip_prefix("/_/") else {
            return Special::Echo;
        };
        let (what, arg) = match rest.split_once('/') {
            Some((what, arg)) => (what, Some(arg)),
            None => (rest, None),
        };
        let number = |arg: Option<&str>| -> Result<u64, Special> {
            arg.and_then(|a| a.parse().ok()).ok_or_else(|| {
                Special::Bad(
                    StatusCode::BAD_REQUEST,
                    format!("{path}: /_/{what}/ takes a non-negative integer"),
                )
            })
        };
        let special = match (what, arg) {
            ("status", arg) => number(arg).and_then(|code| {
                status(code).map(Special::Status).ok_or_else(|| {
                    Special::Bad(
                        StatusCode::BAD_REQUEST,
                        format!("{path}: a status must be 200..=599"),
                    )
                })
            }),
            ("delay", arg) => number(arg).and_then(|ms| {
                delay(ms).map(Special::Delay).ok_or_else(|| {
                    Special::Bad(
                        StatusCode::BAD_REQUEST,
                        format!("{path}: at most {} ms", MAX_DELAY.as_millis()),
                    )
                })
            }),
            ("download", arg) => number(arg).map(Special::Download),
            ("upload", None) => Ok(Special::Upload),
            ("trailers", None) => Ok(Special::Trailers),
            ("ws", None) => Ok(Special::WebSocket),
            _ => Err(Special::Bad(
                StatusCode::NOT_FOUND,
                format!("{path}: no such special path"),
            )),
        };
        special.unwrap_or_else(|bad| bad)
    }
}

/// A status a test may ask for: 200..=599.
fn status(code: u64) -> Option<StatusCode> {
    u16::try_from(code)
        .ok()
        .filter(|code| (200..=599).contains(code))
        .and_then(|code| StatusCode::from_u16(code).ok())
}

/// A delay a test may ask for: at most [`MAX_DELAY`].
fn delay(ms: u64) -> Option<Duration> {
    Some(Duration::from_millis(ms)).filter(|delay| *delay <= MAX_DELAY)
}

/// Decimal digits only: `str::parse` would also take a sign.
fn decimal(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// How `x-echo-fail` fails a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Status(StatusCode),
    /// No response at all.
    Reset,
}

/// One `x-echo-fail` or `x-echo-delay` value: what to do, how often, and
/// on which servers.
#[derive(Debug, PartialEq, Eq)]
struct Fault<A> {
    action: A,
    /// The chance, 0..=100, that a chosen server acts on a request.
    percent: u8,
    /// The servers chosen; `None`: every server.
    names: Option<Vec<String>>,
}

impl<A: Copy> Fault<A> {
    /// Parses `ACTION[/PERCENT][@NAME[,NAME...]]`; `action` parses ACTION.
    fn parse(value: &str, action: impl FnOnce(&str) -> Option<A>) -> Option<Self> {
        let (head, names) = match value.split_once('@') {
            Some((head, names)) => {
                let names: Vec<String> = names.split(',').map(|n| n.trim().to_owned()).collect();
                if names.iter().any(String::is_empty) {
                    return None;
                }
                (head, Some(names))
            }
            None => (value, None),
        };
        let (act, percent) = match head.split_once('/') {
            Some((act, percent)) => {
                let percent = decimal(percent.trim()).filter(|p| *p <= 100)?;
                (act, u8::try_from(percent).ok()?)
            }
            None => (head, 100),
        };
        Some(Fault {
            action: action(act.trim())?,
            percent,
            names,
        })
    }

    /// The action server `name` takes, if any, given `roll`, uniform in 0..100.
    fn taken(&self, name: &str, roll: u8) -> Option<A> {
        let chosen = self
            .names
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name));
        (chosen && roll < self.percent).then_some(self.action)
    }
}

/// The fault headers of one request.
#[derive(Debug, Default, PartialEq, Eq)]
struct Faults {
    delay: Option<Fault<Duration>>,
    fail: Option<Fault<Failure>>,
}

impl Faults {
    /// Reads both headers; `Err` says which header and value are wrong.
    fn of(headers: &HeaderMap) -> Result<Faults, String> {
        let delay = fault_header(
            headers,
            DELAY_HEADER,
            &format!(
                "MS[/PERCENT][@NAME[,NAME...]], MS at most {}",
                MAX_DELAY.as_millis()
            ),
            |ms| decimal(ms).and_then(delay),
        )?;
        let fail = fault_header(
            headers,
            FAIL_HEADER,
            "STATUS[/PERCENT][@NAME[,NAME...]] or reset[/PERCENT][@NAME[,NAME...]], \
             STATUS 200..=599",
            |act| match act {
                "reset" => Some(Failure::Reset),
                code => decimal(code).and_then(status).map(Failure::Status),
            },
        )?;
        Ok(Faults { delay, fail })
    }

    /// What server `name` does: wait, then fail. `roll` draws a number in
    /// 0..100 per header.
    fn taken(
        &self,
        name: &str,
        mut roll: impl FnMut() -> u8,
    ) -> (Option<Duration>, Option<Failure>) {
        let delay = self.delay.as_ref().and_then(|f| f.taken(name, roll()));
        let failure = self.fail.as_ref().and_then(|f| f.taken(name, roll()));
        (delay, failure)
    }
}

/// The one value of header `name`, parsed as a [`Fault`] by `action`.
fn fault_header<A: Copy>(
    headers: &HeaderMap,
    name: &str,
    grammar: &str,
    action: impl FnOnce(&str) -> Option<A>,
) -> Result<Option<Fault<A>>, String> {
    let values: Vec<_> = headers
        .get_all(name)
        .iter()
        .map(|value| String::from_utf8_lossy(value.as_bytes()))
        .collect();
    match values.as_slice() {
        [] => Ok(None),
        [value] => Fault::parse(value, action)
            .map(Some)
            .ok_or_else(|| format!("{name}: {value:?}: expected {grammar}")),
        _ => Err(format!("{name}: {values:?}: at most one value")),
    }
}

/// Draws the roll for [`Fault::taken`].
fn roll() -> u8 {
    rand::random_range(0..100)
}

/// The usual answer: the request as the server received it.
#[derive(Serialize)]
struct Echo<'a> {
    pod: &'a str,
    method: &'a str,
    /// The request target: path and query, or the absolute form if the client sent it.
    path: String,
    /// `Host`, else the authority of the target (`:authority` in HTTP/2).
    host: Option<String>,
    version: &'static str,
    /// In the order hyper's header map keeps them: first appearance of each
    /// name, then each name's values in the order received.
    headers: Vec<(String, String)>,
    body_bytes: u64,
}

#[derive(Serialize)]
struct Upload<'a> {
    pod: &'a str,
    body_bytes: u64,
}

#[derive(Serialize)]
struct Refusal<'a> {
    pod: &'a str,
    error: &'a str,
}

pub struct HttpEcho {
    name: String,
    served_by: HeaderValue,
}

impl HttpEcho {
    pub fn new(name: String, served_by: HeaderValue) -> Self {
        Self { name, served_by }
    }

    pub async fn respond(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<EchoBody>, EchoError> {
        let response = match Faults::of(request.headers()) {
            Err(why) => self.refuse(StatusCode::BAD_REQUEST, &why),
            Ok(faults) => {
                let (delay, failure) = faults.taken(&self.name, roll);
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
                match failure {
                    Some(Failure::Reset) => return Err(EchoError::Reset),
                    Some(Failure::Status(status)) => self.echo(request, status).await?,
                    None => self.special(request).await?,
                }
            }
        };
        Ok(self.served(response))
    }

    /// Answers what the path (or `Upgrade`) asks for.
    async fn special(&self, mut request: Request<Incoming>) -> hyper::Result<Response<EchoBody>> {
        let upgrade = wants_websocket(request.headers());
        let special = match Special::of(request.uri().path()) {
            Special::Echo if upgrade => Special::WebSocket,
            special => special,
        };
        let response = match special {
            Special::Echo => self.echo(request, StatusCode::OK).await?,
            Special::Status(status) => self.echo(request, status).await?,
            Special::Delay(delay) => {
                tokio::time::sleep(delay).await;
                self.echo(request, StatusCode::OK).await?
            }
            Special::Upload => {
                let body_bytes = count_body(request.into_body()).await?;
                let upload = Upload {
                    pod: &self.name,
                    body_bytes,
                };
                self.json(StatusCode::OK, &upload)
            }
            Special::Download(bytes) => {
                let mut response = Response::new(Download { remaining: bytes }.boxed());
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                response
            }
            Special::Trailers => {
                let mut trailers = HeaderMap::new();
                trailers.insert("x-trailer", HeaderValue::from_static("yes"));
                let frames = [
                    Ok(Frame::data(Bytes::from(format!("{}\n", self.name)))),
                    Ok(Frame::trailers(trailers)),
                ];
                let mut response =
                    Response::new(StreamBody::new(futures::stream::iter(frames)).boxed());
                // HTTP/1.1 sends only the trailer fields this header announces.
                response
                    .headers_mut()
                    .insert("trailer", HeaderValue::from_static("x-trailer"));
                response
            }
            Special::WebSocket => self.websocket(&mut request),
            Special::Bad(status, why) => self.refuse(status, &why),
        };
        Ok(response)
    }

    async fn echo(
        &self,
        request: Request<Incoming>,
        status: StatusCode,
    ) -> hyper::Result<Response<EchoBody>> {
        let (head, body) = request.into_parts();
        // HTTP/2 requests carry the scheme and authority in the URI; only
        // `:path` is their target.
        let path = match head.version {
            Version::HTTP_2 | Version::HTTP_3 => head
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), ToString::to_string),
            _ => head.uri.to_string(),
        };
        let host = head
            .headers
            .get(HOST)
            .map(|host| String::from_utf8_lossy(host.as_bytes()).into_owned())
            .or_else(|| head.uri.authority().map(ToString::to_string));
        let headers = head
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        let echo = Echo {
            pod: &self.name,
            method: head.method.as_str(),
            path,
            host,
            version: version_name(head.version),
            headers,
            body_bytes: count_body(body).await?,
        };
        Ok(self.json(status, &echo))
    }

    /// Answers 101 and echoes the upgraded connection's bytes on a task of
    /// its own (hyper hands the connection over once the 101 is written).
    fn websocket(&self, request: &mut Request<Incoming>) -> Response<EchoBody> {
        if request.version() >= Version::HTTP_2 {
            return self.refuse(
                StatusCode::BAD_REQUEST,
                "WebSocket needs HTTP/1.1 (no extended CONNECT here)",
            );
        }
        if !wants_websocket(request.headers()) {
            return self.refuse(StatusCode::BAD_REQUEST, "/_/ws needs `Upgrade: websocket`");
        }
        let Some(key) = request.headers().get(SEC_WEBSOCKET_KEY) else {
            return self.refuse(StatusCode::BAD_REQUEST, "no Sec-WebSocket-Key");
        };
        let accept = websocket_accept(key.as_bytes());
        let on_upgrade = hyper::upgrade::on(request);
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(err) => {
                    eprintln!("WebSocket upgrade: {err}");
                    return;
                }
            };
            let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
            if let Err(err) = tokio::io::copy(&mut reader, &mut writer).await {
                eprintln!("WebSocket echo: {err}");
            }
            let _ = writer.shutdown().await;
        });
        let mut response = Response::new(empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(
            SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
        );
        response
    }

    fn refuse(&self, status: StatusCode, why: &str) -> Response<EchoBody> {
        let refusal = Refusal {
            pod: &self.name,
            error: why,
        };
        self.json(status, &refusal)
    }

    fn json(&self, status: StatusCode, value: &impl Serialize) -> Response<EchoBody> {
        let mut body = serde_json::to_vec(value).expect("serializing plain structs");
        body.push(b'\n');
        let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }

    fn served(&self, mut response: Response<EchoBody>) -> Response<EchoBody> {
        response
            .headers_mut()
            .insert(SERVED_BY_HEADER, self.served_by.clone());
        response
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64(SHA-1(key + GUID)).
fn websocket_accept(key: &[u8]) -> String {
    let mut sha1 = sha1_smol::Sha1::new();
    sha1.update(key);
    sha1.update(WEBSOCKET_GUID.as_bytes());
    BASE64.encode(sha1.digest().bytes())
}

fn wants_websocket(headers: &HeaderMap) -> bool {
    headers.get_all(UPGRADE).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
        })
    })
}

fn version_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

/// Reads the whole body, keeping only its length.
async fn count_body(mut body: Incoming) -> hyper::Result<u64> {
    let mut bytes = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            bytes += data.len() as u64;
        }
    }
    Ok(bytes)
}

fn empty() -> EchoBody {
    Full::new(Bytes::new()).boxed()
}

/// `remaining` bytes of [`DOWNLOAD_BYTES`], an exact size so that hyper
/// sends `content-length`.
struct Download {
    remaining: u64,
}

impl Body for Download {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = usize::try_from(self.remaining).map_or(DOWNLOAD_CHUNK, |r| r.min(DOWNLOAD_CHUNK));
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &DOWNLOAD_BYTES[..n],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_paths_are_parsed() {
        assert_eq!(Special::of("/"), Special::Echo);
        assert_eq!(Special::of("/status/500"), Special::Echo);
        assert_eq!(
            Special::of("/_/status/503"),
            Special::Status(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(
            Special::of("/_/delay/250"),
            Special::Delay(Duration::from_millis(250))
        );
        assert_eq!(Special::of("/_/download/0"), Special::Download(0));
        assert_eq!(Special::of("/_/upload"), Special::Upload);
        assert_eq!(Special::of("/_/trailers"), Special::Trailers);
        assert_eq!(Special::of("/_/ws"), Special::WebSocket);
        for (path, status) in [
            ("/_/status/99", StatusCode::BAD_REQUEST),
            ("/_/status/600", StatusCode::BAD_REQUEST),
            ("/_/status/70000", StatusCode::BAD_REQUEST),
            ("/_/status/", StatusCode::BAD_REQUEST),
            ("/_/delay/-1", StatusCode::BAD_REQUEST),
            ("/_/delay/600001", StatusCode::BAD_REQUEST),
            ("/_/download/ten", StatusCode::BAD_REQUEST),
            ("/_/nothing", StatusCode::NOT_FOUND),
            ("/_/upload/more", StatusCode::NOT_FOUND),
        ] {
            assert!(
                matches!(Special::of(path), Special::Bad(s, _) if s == status),
                "{path}: {:?}",
                Special::of(path)
            );
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    fn fail(value: &str) -> Option<Fault<Failure>> {
        let mut headers = HeaderMap::new();
        headers.insert(FAIL_HEADER, HeaderValue::from_str(value).expect("a value"));
        Faults::of(&headers).expect("a valid x-echo-fail").fail
    }

    fn names(names: &[&str]) -> Option<Vec<String>> {
        Some(names.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn fault_headers_are_parsed_with_defaults() {
        assert_eq!(Faults::of(&HeaderMap::new()), Ok(Faults::default()));
        assert_eq!(
            fail("503"),
            Some(Fault {
                action: Failure::Status(StatusCode::SERVICE_UNAVAILABLE),
                percent: 100,
                names: None,
            })
        );
        assert_eq!(
            fail("reset/25@echo-a"),
            Some(Fault {
                action: Failure::Reset,
                percent: 25,
                names: names(&["echo-a"]),
            })
        );
        assert_eq!(
            fail("200/0@a, b,c"),
            Some(Fault {
                action: Failure::Status(StatusCode::OK),
                percent: 0,
                names: names(&["a", "b", "c"]),
            })
        );
        let faults = Faults::of(&headers(&[
            (DELAY_HEADER, "250@echo-b"),
            (FAIL_HEADER, "599/100"),
        ]))
        .expect("valid headers");
        assert_eq!(
            faults.delay,
            Some(Fault {
                action: Duration::from_millis(250),
                percent: 100,
                names: names(&["echo-b"]),
            })
        );
        assert_eq!(
            faults.fail.map(|f| f.action),
            Some(Failure::Status(
                StatusCode::from_u16(599).expect("a status")
            ))
        );
    }

    #[test]
    fn faults_choose_servers_by_name_and_percent() {
        let fault = fail("503/30@echo-a,echo-b").expect("a fault");
        let unavailable = Some(Failure::Status(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(fault.taken("echo-a", 0), unavailable);
        assert_eq!(fault.taken("echo-b", 29), unavailable);
        assert_eq!(fault.taken("echo-b", 30), None);
        assert_eq!(fault.taken("echo-c", 0), None);
        assert_eq!(fault.taken("echo", 0), None, "names match whole");
        assert_eq!(fault.taken("ECHO-A", 0), None, "names match case");

        let everyone = fail("reset").expect("a fault");
        assert_eq!(everyone.taken("anyone", 99), Some(Failure::Reset));
        let never = fail("reset/0").expect("a fault");
        assert_eq!(never.taken("anyone", 0), None);

        // Delay and failure roll separately, delay first.
        let faults = Faults::of(&headers(&[
            (DELAY_HEADER, "100/50@echo-a"),
            (FAIL_HEADER, "500/50"),
        ]))
        .expect("valid headers");
        let mut rolls = [10, 90].into_iter();
        assert_eq!(
            faults.taken("echo-a", || rolls.next().expect("two rolls")),
            (Some(Duration::from_millis(100)), None)
        );
        let mut rolls = [90, 10].into_iter();
        assert_eq!(
            faults.taken("echo-a", || rolls.next().expect("two rolls")),
            (
                None,
                Some(Failure::Status(StatusCode::INTERNAL_SERVER_ERROR))
            )
        );
        assert_eq!(
            faults.taken("echo-b", || 0),
            (
                None,
                Some(Failure::Status(StatusCode::INTERNAL_SERVER_ERROR))
            )
        );
    }

    #[test]
    fn malformed_fault_headers_name_the_header_and_value() {
        for (name, value) in [
            (FAIL_HEADER, ""),
            (FAIL_HEADER, "199"),
            (FAIL_HEADER, "600"),
            (FAIL_HEADER, "+503"),
            (FAIL_HEADER, "RESET"),
            (FAIL_HEADER, "resets"),
            (FAIL_HEADER, "503/"),
            (FAIL_HEADER, "503/101"),
            (FAIL_HEADER, "503/-1"),
            (FAIL_HEADER, "503/50%"),
            (FAIL_HEADER, "503@"),
            (FAIL_HEADER, "503@a,,b"),
            (FAIL_HEADER, "503@a,"),
            (FAIL_HEADER, "/50@a"),
            (DELAY_HEADER, "ten"),
            (DELAY_HEADER, "600001"),
            (DELAY_HEADER, "100/50/50"),
            (DELAY_HEADER, "reset"),
        ] {
            let err = Faults::of(&headers(&[(name, value)]))
                .expect_err(&format!("{name}: {value:?} is malformed"));
            assert!(
                err.starts_with(&format!("{name}: {value:?}: expected ")),
                "{err}"
            );
        }
        let err = Faults::of(&headers(&[(FAIL_HEADER, "503"), (FAIL_HEADER, "reset")]))
            .expect_err("a repeated header");
        assert!(err.contains(FAIL_HEADER) && err.contains("reset"), "{err}");
    }

    #[test]
    fn websocket_accept_matches_rfc_6455() {
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn upgrade_tokens_are_case_insensitive() {
        let mut headers = HeaderMap::new();
        assert!(!wants_websocket(&headers));
        headers.insert(UPGRADE, HeaderValue::from_static("h2c, WebSocket"));
        assert!(wants_websocket(&headers));
    }
}
