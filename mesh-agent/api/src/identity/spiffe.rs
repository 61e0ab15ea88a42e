//! SPIFFE IDs of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! The mesh names a workload by its namespace and service account, as Istio and
//! Linkerd do, so the only IDs we accept are of that shape. Characters follow the
//! SPIFFE ID specification, which go-spiffe enforces too: a peer that sends an ID
//! we would print differently than it does is refused rather than normalised.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

const SCHEME: &str = "spiffe://";
/// The SPIFFE specification's limits, in bytes.
const MAX_ID_LEN: usize = 2048;
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a workload's SPIFFE ID; each variant names the bad part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("`{0}` is not a SPIFFE ID: it must start with `spiffe://`")]
    NotSpiffe(String),
    #[error("SPIFFE ID is {0} bytes long, more than the 2048 allowed")]
    TooLong(usize),
    #[error("trust domain `{trust_domain}` is invalid: {why}")]
    BadTrustDomain {
        trust_domain: String,
        why: &'static str,
    },
    #[error(
        "`{0}` does not name a workload: the path must be /ns/<namespace>/sa/<service-account>"
    )]
    NotAWorkload(String),
    #[error("namespace `{namespace}` is invalid: {why}")]
    BadNamespace {
        namespace: String,
        why: &'static str,
    },
    #[error("service account `{service_account}` is invalid: {why}")]
    BadServiceAccount {
        service_account: String,
        why: &'static str,
    },
}

/// The identity of a workload: who it is, independent of where it runs.
///
/// Every value has been validated. It is kept as its canonical URI in an
/// `Arc`, so the copies that follow each connection are cheap, and is
/// compared, hashed and printed as that URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    uri: Arc<str>,
    /// Offsets into `uri` of the namespace and the service account; they fit
    /// in `u16` because an ID is at most 2048 bytes.
    namespace_at: u16,
    service_account_at: u16,
}

impl SpiffeId {
    /// Builds the ID of `service_account` in `namespace`, checking each part.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        check_trust_domain(trust_domain)?;
        check_segment(namespace).map_err(|why| SpiffeIdError::BadNamespace {
            namespace: namespace.to_owned(),
            why,
        })?;
        check_segment(service_account).map_err(|why| SpiffeIdError::BadServiceAccount {
            service_account: service_account.to_owned(),
            why,
        })?;
        let uri = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        if uri.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(uri.len()));
        }
        let namespace_at = SCHEME.len() + trust_domain.len() + "/ns/".len();
        let service_account_at = namespace_at + namespace.len() + "/sa/".len();
        Ok(Self {
            uri: uri.into(),
            // Both are below MAX_ID_LEN, checked above.
            namespace_at: namespace_at as u16,
            service_account_at: service_account_at as u16,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..usize::from(self.namespace_at) - "/ns/".len()]
    }

    pub fn namespace(&self) -> &str {
        &self.uri
            [usize::from(self.namespace_at)..usize::from(self.service_account_at) - "/sa/".len()]
    }

    pub fn service_account(&self) -> &str {
        &self.uri[usize::from(self.service_account_at)..]
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::NotSpiffe(s.to_owned()))?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        check_trust_domain(trust_domain)?;
        match path.split('/').collect::<Vec<_>>()[..] {
            ["ns", namespace, "sa", service_account] => {
                Self::new(trust_domain, namespace, service_account)
            }
            _ => Err(SpiffeIdError::NotAWorkload(s.to_owned())),
        }
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.to_string()
    }
}

/// Checks a trust domain name against the SPIFFE specification.
pub(crate) fn check_trust_domain(trust_domain: &str) -> Result<(), SpiffeIdError> {
    let bad = |why| {
        Err(SpiffeIdError::BadTrustDomain {
            trust_domain: trust_domain.to_owned(),
            why,
        })
    };
    if trust_domain.is_empty() {
        return bad("it is empty");
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return bad("it is longer than 255 bytes");
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c);
    if !trust_domain.chars().all(allowed) {
        return bad(
            "only lowercase letters, digits, '-', '.' and '_' are allowed (no port, user or query)",
        );
    }
    Ok(())
}

fn check_segment(segment: &str) -> Result<(), &'static str> {
    if segment.is_empty() {
        return Err("it is empty");
    }
    if segment == "." || segment == ".." {
        return Err("`.` and `..` are not allowed");
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._".contains(c);
    if !segment.chars().all(allowed) {
        return Err("only letters, digits, '-', '.' and '_' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        s.parse()
    }

    #[test]
    fn round_trips_through_its_uri() {
        let id = parse("spiffe://cluster.local/ns/shop/sa/cart-v2").expect("valid ID");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "cart-v2");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart-v2");
        assert_eq!(
            SpiffeId::new("cluster.local", "shop", "cart-v2").expect("valid parts"),
            id
        );
    }

    #[test]
    fn serde_uses_the_uri_string() {
        let id = SpiffeId::new("td", "ns1", "sa1").expect("valid parts");
        let json = serde_json::to_string(&id).expect("serializes");
        assert_eq!(json, r#""spiffe://td/ns/ns1/sa/sa1""#);
        assert_eq!(
            serde_json::from_str::<SpiffeId>(&json).expect("deserializes"),
            id
        );
        let err = serde_json::from_str::<SpiffeId>(r#""spiffe://td/ns/a""#)
            .expect_err("a partial path is refused");
        assert!(
            err.to_string().contains("does not name a workload"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_bad_part() {
        assert!(matches!(
            parse("https://cluster.local/ns/a/sa/b"),
            Err(SpiffeIdError::NotSpiffe(_))
        ));
        assert!(matches!(
            parse("SPIFFE://cluster.local/ns/a/sa/b"),
            Err(SpiffeIdError::NotSpiffe(_))
        ));
        for td in [
            "spiffe:///ns/a/sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local:8443/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
        ] {
            assert!(
                matches!(parse(td), Err(SpiffeIdError::BadTrustDomain { .. })),
                "{td}: {:?}",
                parse(td)
            );
        }
        for path in [
            "spiffe://td",
            "spiffe://td/",
            "spiffe://td/ns/a",
            "spiffe://td/ns/a/sa/b/",
            "spiffe://td/ns/a/sa/b/c",
            "spiffe://td/sa/b/ns/a",
            "spiffe://td/ns/a/sa/b?x=1#frag",
        ] {
            assert!(
                matches!(
                    parse(path),
                    Err(SpiffeIdError::NotAWorkload(_) | SpiffeIdError::BadServiceAccount { .. })
                ),
                "{path}: {:?}",
                parse(path)
            );
        }
        assert!(matches!(
            parse("spiffe://td/ns//sa/b"),
            Err(SpiffeIdError::BadNamespace {
                why: "it is empty",
                ..
            })
        ));
        assert!(matches!(
            parse("spiffe://td/ns/../sa/b"),
            Err(SpiffeIdError::BadNamespace { .. })
        ));
        assert!(matches!(
            parse("spiffe://td/ns/a/sa/b%20c"),
            Err(SpiffeIdError::BadServiceAccount { .. })
        ));
        let long = format!("spiffe://td/ns/a/sa/{}", "x".repeat(2048));
        assert!(matches!(parse(&long), Err(SpiffeIdError::TooLong(_))));
        let err = parse("spiffe://td/ns/a b/sa/c").expect_err("space is refused");
        assert!(err.to_string().contains("namespace `a b`"), "{err}");
    }
}
