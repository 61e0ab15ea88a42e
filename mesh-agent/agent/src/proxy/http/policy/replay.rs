//! A request body that a retry can send again: each try reads it through a
//! [`Replay::body`]; what the first try read is kept (up to a bound) and
//! replayed, then reading goes on from the client. A body longer than the
//! bound is streamed through and the request is no longer retried.
//!
//! Only one try reads at a time: making a new reader retires the older
//! ones (their next poll ends in an error), so a connection task still
//! holding a failed try's body cannot take frames the next try needs.
use std::{
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body as _, Frame, SizeHint};

use crate::proxy::http::{Body, BoxError};

struct Shared {
    source: Body,
    /// Data frames read from the source, in order, while under the bound.
    kept: Vec<Bytes>,
    kept_bytes: u64,
    trailers: Option<HeaderMap>,
    /// The source ended.
    done: bool,
    /// More than the bound was read: nothing is kept any more.
    overflow: bool,
    generation: u64,
}

#[derive(Clone)]
pub struct Replay {
    shared: Arc<Mutex<Shared>>,
    limit: u64,
    hint: SizeHint,
}

impl Replay {
    pub fn new(source: Body, limit: u64) -> Replay {
        let hint = source.size_hint();
        // A body known to be longer than the bound is never replayable.
        let overflow = hint.lower() > limit;
        Replay {
            shared: Arc::new(Mutex::new(Shared {
                source,
                kept: Vec::new(),
                kept_bytes: 0,
                trailers: None,
                done: false,
                overflow,
                generation: 0,
            })),
            limit,
            hint,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a new try could send the whole body again.
    pub fn replayable(&self) -> bool {
        !self.lock().overflow
    }

    /// A reader from the start, retiring every earlier reader.
    pub fn body(&self) -> ReplayBody {
        let mut s = self.lock();
        s.generation += 1;
        ReplayBody {
            shared: self.shared.clone(),
            generation: s.generation,
            next: 0,
            trailers_sent: false,
            limit: self.limit,
            hint: self.hint,
        }
    }
}

pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    generation: u64,
    /// Index in `kept` of the next frame to replay.
    next: usize,
    trailers_sent: bool,
    limit: u64,
    hint: SizeHint,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body is being sent again by a retry")]
struct Retired;

impl hyper::body::Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut s = this.shared.lock().unwrap_or_else(PoisonError::into_inner);
        if s.generation != this.generation {
            return Poll::Ready(Some(Err(Box::new(Retired))));
        }
        if !s.overflow && this.next < s.kept.len() {
            let data = s.kept[this.next].clone();
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if s.done {
            if !this.trailers_sent
                && let Some(t) = &s.trailers
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
            return Poll::Ready(None);
        }
        match Pin::new(&mut s.source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    if !s.overflow {
                        s.kept_bytes += data.len() as u64;
                        if s.kept_bytes > this.limit {
                            s.overflow = true;
                            s.kept = Vec::new();
                        } else {
                            s.kept.push(data.clone());
                            this.next += 1;
                        }
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(t) => {
                        s.trailers = Some(t.clone());
                        this.trailers_sent = true;
                        Poll::Ready(Some(Ok(Frame::trailers(t))))
                    }
                    Err(_) => Poll::Pending,
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.hint.upper() == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::proxy::http::boxed;

    fn chunks(parts: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        boxed(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )))
    }

    async fn read(b: ReplayBody) -> Result<Bytes, BoxError> {
        Ok(b.collect().await?.to_bytes())
    }

    #[tokio::test]
    async fn a_second_try_gets_the_whole_body_again() {
        let r = Replay::new(chunks(&["ab", "cd", "ef"]), 100);
        let mut first = r.body();
        // The first try read one frame, then failed.
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        drop(first);
        assert!(r.replayable());
        assert_eq!(read(r.body()).await.unwrap(), "abcdef");
        assert_eq!(read(r.body()).await.unwrap(), "abcdef");
    }

    #[tokio::test]
    async fn beyond_the_bound_it_streams_but_cannot_be_replayed() {
        let r = Replay::new(chunks(&["abc", "def", "ghi"]), 5);
        assert_eq!(read(r.body()).await.unwrap(), "abcdefghi");
        assert!(!r.replayable());
    }

    #[tokio::test]
    async fn a_new_reader_retires_the_old_one() {
        let r = Replay::new(chunks(&["ab", "cd"]), 100);
        let mut old = r.body();
        let _new = r.body();
        assert!(old.frame().await.unwrap().is_err());
    }

    #[tokio::test]
    async fn trailers_are_replayed() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"x"))),
            Ok(Frame::trailers({
                let mut h = HeaderMap::new();
                h.insert("grpc-status", "0".parse().unwrap());
                h
            })),
        ];
        let r = Replay::new(
            boxed(http_body_util::StreamBody::new(futures::stream::iter(
                frames,
            ))),
            100,
        );
        let a = r.body().collect().await.unwrap();
        assert_eq!(a.trailers().unwrap()["grpc-status"], "0");
        let b = r.body().collect().await.unwrap();
        assert_eq!(b.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(b.to_bytes(), "x");
    }
}
