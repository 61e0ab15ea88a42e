//! `mesh-kube-standin`: a stand-in for the Kubernetes API server, because no
//! API server runs on our test machines. It speaks what `mesh-control
//! --kube-api` uses of the real one, over plain HTTP on loopback:
//!
//! - `GET /api/v1/<plural>` and `GET /apis/<group>/<version>/<plural>`: the
//!   list, with `metadata.resourceVersion`;
//! - the same with `?watch=true&resourceVersion=N`: newline-delimited watch
//!   events (`ADDED`, `MODIFIED`, `DELETED`) after N, then live ones, and
//!   `BOOKMARK`s every second when `allowWatchBookmarks=true`; when N is
//!   older than the compaction point, one `ERROR` event carrying a `Status`
//!   with code 410 (Gone), as the real server sends, and the end;
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`: the status set for
//!   that token (see below), or unauthenticated;
//! - with `--require-token T`, every API request must carry `Bearer T`.
//!
//! Objects live in memory with one resource version counter, as in etcd.
//! The test drives it through `/standin/...`:
//!
//! | request | does |
//! | --- | --- |
//! | `PUT /standin/objects` (an object) | creates or replaces it (`ADDED`/`MODIFIED`) |
//! | `DELETE /standin/objects` (an object naming kind, namespace, name) | deletes it (`DELETED`) |
//! | `POST /standin/pause` | ends every open watch and holds new watch requests |
//! | `POST /standin/resume` | lets held watch requests go on |
//! | `POST /standin/break` | ends every open watch |
//! | `POST /standin/compact` | forgets the history: resuming from an older version is 410 |
//! | `PUT /standin/tokens` `{"token", "status"}` | what a TokenReview of that token answers |
//! | `GET /standin/stats` | lists and watches served per plural, TokenReviews asked |
//!
//! It prints `mesh-kube-standin ready: addr=<addr>` once listening.
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{body::Frame, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc, watch},
};
use tokio_stream::wrappers::ReceiverStream;

/// Largest body the stand-in reads.
const MAX_BODY: usize = 4 * 1024 * 1024;
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);
/// Bound on open connections.
const MAX_CONNECTIONS: usize = 256;

#[derive(Debug, Parser)]
#[command(
    name = "mesh-kube-standin",
    about = "Stand-in Kubernetes API server for tests"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The bearer token API requests must carry.
    #[arg(long)]
    require_token: Option<String>,
}

type Body = BoxBody<Bytes, Infallible>;

#[derive(Clone, Debug)]
struct Event {
    plural: String,
    revision: u64,
    line: Bytes,
}

#[derive(Default)]
struct Objects {
    revision: u64,
    /// (plural, namespace, name) -> object.
    objects: BTreeMap<(String, String, String), Value>,
    /// Every event since `compacted`: (revision, plural, line).
    history: Vec<(u64, Event)>,
    /// Watching from a version older than this is 410 Gone.
    compacted: u64,
    tokens: HashMap<String, Value>,
    lists: BTreeMap<String, u64>,
    watches: BTreeMap<String, u64>,
    reviews: Vec<Value>,
    /// plural -> the kind of its objects.
    kinds: HashMap<String, String>,
}

struct Server {
    objects: Mutex<Objects>,
    events: broadcast::Sender<Event>,
    /// Bumped to end every open watch.
    breaks: watch::Sender<u64>,
    paused: watch::Sender<bool>,
    require_token: Option<String>,
}

fn lock(m: &Mutex<Objects>) -> std::sync::MutexGuard<'_, Objects> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `pods` for `Pod`, `mtlspolicies` for `MtlsPolicy`.
fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    match lower.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{lower}s"),
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("static response parts")
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    full(
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

impl Server {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let method = req.method().clone();
        if let Some(control) = path.strip_prefix("/standin/") {
            let control = control.to_owned();
            return match read_json(req).await {
                Ok(body) => self.control(&method, &control, body),
                Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", e),
            };
        }
        if let Some(expected) = &self.require_token {
            let shown = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if shown != Some(expected.as_str()) {
                return status(
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    "Unauthorized".into(),
                );
            }
        }
        if method == Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            return match read_json(req).await {
                Ok(review) => self.review(review),
                Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", e),
            };
        }
        let api = path.starts_with("/api/v1/") || path.starts_with("/apis/");
        let plural = path.rsplit('/').next().unwrap_or_default().to_owned();
        if method != Method::GET || !api || plural.is_empty() {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("the stand-in serves no {method} {path}"),
            );
        }
        if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
            let from = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let bookmarks = query
                .get("allowWatchBookmarks")
                .is_some_and(|b| b == "true");
            let timeout = query
                .get("timeoutSeconds")
                .and_then(|t| t.parse().ok())
                .map_or(Duration::from_secs(290), Duration::from_secs);
            // A bookmark carries the apiVersion and kind of the watched objects.
            let api_version = path
                .strip_prefix("/apis/")
                .and_then(|rest| rest.rsplit_once('/'))
                .map_or_else(
                    || "v1".to_owned(),
                    |(group_version, _)| group_version.to_owned(),
                );
            let kind = lock(&self.objects)
                .kinds
                .get(&plural)
                .cloned()
                .unwrap_or_else(|| plural.clone());
            let bookmark = (api_version, kind);
            return self
                .watch(plural, from, bookmarks.then_some(bookmark), timeout)
                .await;
        }
        self.list(&plural)
    }

    fn list(&self, plural: &str) -> Response<Body> {
        let mut objects = lock(&self.objects);
        *objects.lists.entry(plural.to_owned()).or_default() += 1;
        let items: Vec<&Value> = objects
            .objects
            .iter()
            .filter(|((p, _, _), _)| p == plural)
            .map(|(_, v)| v)
            .collect();
        full(
            StatusCode::OK,
            json!({
                "apiVersion": "v1",
                "kind": "List",
                "metadata": { "resourceVersion": objects.revision.to_string() },
                "items": items,
            }),
        )
    }

    async fn watch(
        self: Arc<Self>,
        plural: String,
        from: u64,
        bookmarks: Option<(String, String)>,
        timeout: Duration,
    ) -> Response<Body> {
        let mut paused = self.paused.subscribe();
        let _ = paused.wait_for(|p| !*p).await;
        let (lines, body) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
        let (backlog, mut seen, mut live, mut breaks) = {
            let mut objects = lock(&self.objects);
            *objects.watches.entry(plural.clone()).or_default() += 1;
            if from < objects.compacted {
                let gone = json!({
                    "type": "ERROR",
                    "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "reason": "Expired", "code": 410,
                        "message": format!("too old resource version: {from} ({})", objects.compacted),
                    },
                });
                return Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(format!("{gone}\n"))).boxed())
                    .expect("static response parts");
            }
            let backlog: Vec<Bytes> = objects
                .history
                .iter()
                .filter(|(revision, e)| *revision > from && e.plural == plural)
                .map(|(_, e)| e.line.clone())
                .collect();
            // Subscribed under the lock: no event falls between the two.
            (
                backlog,
                objects.revision,
                self.events.subscribe(),
                self.breaks.subscribe(),
            )
        };
        tokio::spawn(async move {
            for line in backlog {
                if lines.send(Ok(Frame::data(line))).await.is_err() {
                    return;
                }
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut bookmark = tokio::time::interval(BOOKMARK_EVERY);
            bookmark.tick().await;
            loop {
                let line = tokio::select! {
                    () = &mut deadline => return,
                    _ = breaks.changed() => return,
                    event = live.recv() => match event {
                        Ok(e) => {
                            seen = e.revision;
                            if e.plural != plural {
                                continue;
                            }
                            e.line
                        }
                        // A watcher this far behind is cut off, as a real
                        // server would; it resumes or relists.
                        Err(_) => return,
                    },
                    // Every event up to `seen` has been sent on this
                    // stream (events arrive in revision order).
                    _ = bookmark.tick(), if bookmarks.is_some() => {
                        let (api_version, kind) = bookmarks.as_ref().expect("bookmarks asked for");
                        Bytes::from(format!("{}\n", json!({
                            "type": "BOOKMARK",
                            "object": {
                                "apiVersion": api_version,
                                "kind": kind,
                                "metadata": { "resourceVersion": seen.to_string() },
                            },
                        })))
                    }
                };
                if lines.send(Ok(Frame::data(line))).await.is_err() {
                    return;
                }
            }
        });
        Response::builder()
            .header("content-type", "application/json")
            .body(StreamBody::new(ReceiverStream::new(body)).boxed())
            .expect("static response parts")
    }

    fn review(&self, review: Value) -> Response<Body> {
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let audiences: Vec<String> = review["spec"]["audiences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        let mut objects = lock(&self.objects);
        objects.reviews.push(json!({ "audiences": audiences }));
        let mut verdict = objects.tokens.get(token).cloned().unwrap_or_else(|| {
            json!({ "authenticated": false, "error": "[invalid bearer token, token not recognised]" })
        });
        // A token is for its audiences only, as the real server checks.
        if let Some(token_audiences) = verdict["audiences"].as_array().cloned() {
            let matching: Vec<Value> = token_audiences
                .into_iter()
                .filter(|a| a.as_str().is_some_and(|a| audiences.iter().any(|b| b == a)))
                .collect();
            if matching.is_empty() && !audiences.is_empty() {
                verdict = json!({
                    "authenticated": false,
                    "error": format!("token audiences {} is invalid for the target audiences {audiences:?}", verdict["audiences"]),
                });
            } else {
                verdict["audiences"] = json!(matching);
            }
        }
        full(
            StatusCode::CREATED,
            json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "metadata": {},
                "spec": review["spec"],
                "status": verdict,
            }),
        )
    }

    fn control(&self, method: &Method, what: &str, body: Value) -> Response<Body> {
        match (method.as_str(), what) {
            ("PUT", "objects") => self.change(body, false),
            ("DELETE", "objects") => self.change(body, true),
            ("POST", "pause") => {
                self.paused.send_replace(true);
                self.breaks.send_modify(|b| *b += 1);
                full(StatusCode::OK, json!({}))
            }
            ("POST", "resume") => {
                self.paused.send_replace(false);
                full(StatusCode::OK, json!({}))
            }
            ("POST", "break") => {
                self.breaks.send_modify(|b| *b += 1);
                full(StatusCode::OK, json!({}))
            }
            ("POST", "compact") => {
                let mut objects = lock(&self.objects);
                objects.compacted = objects.revision;
                objects.history.clear();
                full(StatusCode::OK, json!({ "compacted": objects.compacted }))
            }
            ("PUT", "tokens") => {
                let Some(token) = body["token"].as_str() else {
                    return status(StatusCode::BAD_REQUEST, "BadRequest", "no token".into());
                };
                lock(&self.objects)
                    .tokens
                    .insert(token.to_owned(), body["status"].clone());
                full(StatusCode::OK, json!({}))
            }
            ("GET", "stats") => {
                let objects = lock(&self.objects);
                full(
                    StatusCode::OK,
                    json!({
                        "revision": objects.revision,
                        "lists": objects.lists,
                        "watches": objects.watches,
                        "reviews": objects.reviews,
                    }),
                )
            }
            _ => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no {method} /standin/{what}"),
            ),
        }
    }

    /// Creates, replaces or deletes one object, as one new revision.
    fn change(&self, mut object: Value, delete: bool) -> Response<Body> {
        let Some(kind_name) = object["kind"].as_str().map(str::to_owned) else {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the object has no kind".into(),
            );
        };
        let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the object has no name".into(),
            );
        };
        let kind = plural(&kind_name);
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let key = (kind.clone(), namespace, name);
        let mut objects = lock(&self.objects);
        objects.kinds.insert(kind.clone(), kind_name);
        let existing = objects.objects.get(&key).cloned();
        let kind_of_event = match (delete, &existing) {
            (true, None) => {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{key:?} not found"),
                );
            }
            (true, Some(old)) => {
                object = old.clone();
                "DELETED"
            }
            (false, None) => "ADDED",
            (false, Some(_)) => "MODIFIED",
        };
        objects.revision += 1;
        let revision = objects.revision;
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{}-{}", key.0, revision));
        }
        if delete {
            objects.objects.remove(&key);
        } else {
            objects.objects.insert(key, object.clone());
        }
        let event = Event {
            plural: kind,
            revision,
            line: Bytes::from(format!(
                "{}\n",
                json!({ "type": kind_of_event, "object": object })
            )),
        };
        objects.history.push((revision, event.clone()));
        let _ = self.events.send(event);
        full(
            StatusCode::OK,
            json!({ "resourceVersion": revision.to_string() }),
        )
    }
}

async fn read_json(req: Request<Incoming>) -> Result<Value, String> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    if body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&body).map_err(|e| format!("the body is not JSON: {e}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    let server = Arc::new(Server {
        objects: Mutex::default(),
        events: broadcast::channel(4096).0,
        breaks: watch::Sender::new(0),
        paused: watch::Sender::new(false),
        require_token: args.require_token,
    });
    let mut stdout = std::io::stdout();
    writeln!(
        stdout,
        "mesh-kube-standin ready: addr={}",
        listener.local_addr()?
    )?;
    stdout.flush()?;
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = listener.accept().await?;
        let Ok(permit) = connections.clone().acquire_owned().await else {
            return Ok(());
        };
        let server = server.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}
