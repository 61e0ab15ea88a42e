//! A body that counts the bytes it carries and records them in a histogram
//! when it is dropped: request and response sizes as sent, not as declared
//! (streamed and chunked bodies have no `content-length`).
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use prometheus_client::metrics::histogram::Histogram;

use super::{Body, BoxError};

pub struct Counted {
    inner: Body,
    bytes: u64,
    sizes: Histogram,
}

impl Counted {
    pub fn new(inner: Body, sizes: Histogram) -> Counted {
        Counted {
            inner,
            bytes: 0,
            sizes,
        }
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes += data.len() as u64;
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

impl Drop for Counted {
    /// However the body ends (read whole, abandoned, reset), what went
    /// through is its size.
    fn drop(&mut self) {
        self.sizes.observe(self.bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn the_bytes_that_went_through_are_recorded_once_when_it_ends() {
        let sizes = Histogram::new([10.0, 100.0, 1000.0]);
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello "))),
            Ok(Frame::data(Bytes::from_static(b"world, 17 bytes"))),
            Ok(Frame::trailers(http::HeaderMap::new())),
        ];
        let body = super::super::boxed(http_body_util::StreamBody::new(futures::stream::iter(
            chunks,
        )));
        let collected = Counted::new(body, sizes.clone()).collect().await.unwrap();
        assert_eq!(collected.to_bytes().len(), 21);
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("size", "", sizes);
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("size_sum 21.0"), "{text}");
        assert!(text.contains("size_count 1"), "{text}");
        assert!(text.contains("size_bucket{le=\"100.0\"} 1"), "{text}");
        assert!(text.contains("size_bucket{le=\"10.0\"} 0"), "{text}");
    }
}
