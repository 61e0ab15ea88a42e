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
//! Every response carries `x-served-by: NAME`. `Expect: 100-continue` is
//! answered by hyper when the handler first reads the body.

use std::{
    convert::Infallible,
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
/// Longest `/_/delay/MS`: tests are bounded, so is the server.
const MAX_DELAY: Duration = Duration::from_secs(600);
/// RFC 6455, section 1.3.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// What every response body is boxed as: none of them fails once started.
pub type EchoBody = BoxBody<Bytes, Infallible>;

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
                u16::try_from(code)
                    .ok()
                    .filter(|code| (200..=599).contains(code))
                    .and_then(|code| StatusCode::from_u16(code).ok())
                    .map(Special::Status)
                    .ok_or_else(|| {
                        Special::Bad(
                            StatusCode::BAD_REQUEST,
                            format!("{path}: a status must be 200..=599"),
                        )
                    })
            }),
            ("delay", arg) => number(arg).and_then(|ms| {
                let delay = Duration::from_millis(ms);
                if delay <= MAX_DELAY {
                    Ok(Special::Delay(delay))
                } else {
                    Err(Special::Bad(
                        StatusCode::BAD_REQUEST,
                        format!("{path}: at most {} ms", MAX_DELAY.as_millis()),
                    ))
                }
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
        mut request: Request<Incoming>,
    ) -> hyper::Result<Response<EchoBody>> {
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
        Ok(self.served(response))
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
