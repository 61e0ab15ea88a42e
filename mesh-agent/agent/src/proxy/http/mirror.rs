//! Request mirroring, fire and forget: the primary request's body is teed
//! into a bounded channel for the mirror. When the mirror falls behind, the
//! channel is full and the mirror is abandoned (its request fails), never
//! the primary slowed.
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::sync::mpsc;

use super::{Body, BoxError, boxed};

/// Data frames a mirror may lag behind its primary.
const LAG: usize = 32;

/// The primary's body, copying each data frame to the mirror.
pub struct Tee {
    inner: Body,
    tx: Option<mpsc::Sender<Bytes>>,
    abandoned: Arc<AtomicBool>,
}

/// Splits `body` into the primary's (the same bytes, at the same pace) and
/// the mirror's.
pub fn tee(body: Body) -> (Body, Body) {
    let (tx, rx) = mpsc::channel(LAG);
    let abandoned = Arc::new(AtomicBool::new(false));
    let primary = Tee {
        inner: body,
        tx: Some(tx),
        abandoned: abandoned.clone(),
    };
    let mirror = MirrorBody { rx, abandoned };
    (boxed(primary), boxed(mirror))
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(tx)) = (frame.data_ref(), &self.tx)
                    && tx.try_send(data.clone()).is_err()
                {
                    self.abandoned.store(true, Ordering::Relaxed);
                    self.tx = None;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                self.abandoned.store(true, Ordering::Relaxed);
                self.tx = None;
            }
            Poll::Ready(None) => self.tx = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

struct MirrorBody {
    rx: mpsc::Receiver<Bytes>,
    abandoned: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("the mirrored request fell behind its primary and was abandoned")]
struct Abandoned;

impl hyper::body::Body for MirrorBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Poll::Ready(None) if self.abandoned.load(Ordering::Relaxed) => {
                Poll::Ready(Some(Err(Abandoned.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    fn stream(chunks: usize) -> Body {
        let frames =
            (0..chunks).map(|i| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![i as u8; 10]))));
        boxed(StreamBody::new(futures::stream::iter(frames)))
    }

    #[tokio::test]
    async fn mirror_gets_the_same_bytes() {
        let (primary, mirror) = tee(stream(5));
        let reader =
            tokio::spawn(async move { mirror.collect().await.map(|c| c.to_bytes().len()) });
        assert_eq!(primary.collect().await.unwrap().to_bytes().len(), 50);
        assert_eq!(reader.await.unwrap().unwrap(), 50);
    }

    #[tokio::test]
    async fn a_slow_mirror_is_abandoned_and_the_primary_is_not_slowed() {
        let (primary, mirror) = tee(stream(LAG * 4));
        // Nobody reads the mirror while the primary is read in full.
        assert_eq!(primary.collect().await.unwrap().to_bytes().len(), LAG * 40);
        let err = mirror
            .collect()
            .await
            .expect_err("the mirror must fail, not end short");
        assert!(err.to_string().contains("abandoned"), "{err}");
    }
}
