//! Reaching mesh-control: over its local unix socket (`unix:///path`, the
//! operator API without credentials) or over the network (`http://host:port`,
//! with a bearer token). Used by `meshctl`; agents can use [`channel`] and
//! [`Bearer`] for the `Distribution` stream.
use std::{fmt, io, path::PathBuf, str::FromStr, time::Duration};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint, Uri},
};

use crate::api::operator_client::OperatorClient;

/// Largest response a client reads (a `get` of a large mesh).
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0:?} is not a control server address (unix:///path/to/socket or http://host:port)")]
    Address(String),
    #[error("connecting to the control server at {target}")]
    Connect {
        target: Target,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the token can't be sent in a header")]
    Token,
}

/// Where mesh-control is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    Http(String),
}

impl FromStr for Target {
    type Err = Error;

    fn from_str(s: &str) -> Result<Target, Error> {
        if let Some(path) = s.strip_prefix("unix://")
            && path.starts_with('/')
        {
            Ok(Target::Unix(PathBuf::from(path)))
        } else if s.starts_with("http://") || s.starts_with("https://") {
            Ok(Target::Http(s.to_owned()))
        } else {
            Err(Error::Address(s.to_owned()))
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Unix(path) => write!(f, "unix://{}", path.display()),
            Target::Http(uri) => f.write_str(uri),
        }
    }
}

/// Connects a channel to mesh-control.
pub async fn channel(target: &Target) -> Result<Channel, Error> {
    let connect_error = |source| Error::Connect {
        target: target.clone(),
        source,
    };
    match target {
        Target::Unix(path) => {
            let path = path.clone();
            // The URI only satisfies the HTTP/2 layer; the connector dials the socket.
            Endpoint::from_static("http://mesh-control.local")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
                }))
                .await
                .map_err(connect_error)
        }
        Target::Http(uri) => Endpoint::from_shared(uri.clone())
            .map_err(connect_error)?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(connect_error),
    }
}

/// Sends `authorization: Bearer <token>` with every request, if there is a token.
#[derive(Clone, Debug)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, Error> {
        token
            .map(|t| format!("Bearer {t}").parse().map_err(|_| Error::Token))
            .transpose()
            .map(Bearer)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// An operator API client.
pub async fn operator(
    target: &Target,
    token: Option<&str>,
) -> Result<OperatorClient<InterceptedService<Channel, Bearer>>, Error> {
    let channel = channel(target).await?;
    Ok(
        OperatorClient::with_interceptor(channel, Bearer::new(token)?)
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            "unix:///run/mesh/control.sock"
                .parse::<Target>()
                .expect("unix"),
            Target::Unix("/run/mesh/control.sock".into())
        );
        assert_eq!(
            "http://10.0.0.1:15012".parse::<Target>().expect("http"),
            Target::Http("http://10.0.0.1:15012".into())
        );
        assert!("10.0.0.1:15012".parse::<Target>().is_err());
        assert!("unix://relative".parse::<Target>().is_err());
    }
}
