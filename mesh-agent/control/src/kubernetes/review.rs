//! TokenReview: an agent in a cluster shows its projected service-account
//! token (audience [`DEFAULT_AUDIENCE`]) where a bootstrap token would go;
//! the API server says whose it is. Only the agents' service account, with
//! the node the token was bound to (`authentication.kubernetes.io/node-name`,
//! which the kubelet's projected tokens carry), is a node agent; that node
//! is the caller's.
use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};
use tracing::{info, warn};

/// The audience agents' tokens are projected for.
pub const DEFAULT_AUDIENCE: &str = "mesh-control";
/// Where the API server puts the node a projected token is bound to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// How long a verdict is reused: a token is shown on every reconnect and
/// signing request of an agent, but a revoked one must stop working soon.
const ACCEPTED_FOR: Duration = Duration::from_secs(30);
const REFUSED_FOR: Duration = Duration::from_secs(5);
/// Bound on remembered verdicts; past it, expired ones are dropped, then all.
const MAX_CACHED: usize = 4096;

/// A remembered review: until when, and the node or the refusal's reason.
type Verdict = (Instant, Result<String, String>);

pub struct Reviewer {
    api: Api<TokenReview>,
    audience: String,
    /// `system:serviceaccount:<namespace>:<name>` of the agents.
    agent_user: String,
    cache: Mutex<HashMap<String, Verdict>>,
}

impl std::fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reviewer")
            .field("audience", &self.audience)
            .field("agent_user", &self.agent_user)
            .finish_non_exhaustive()
    }
}

impl Reviewer {
    pub fn new(client: Client, audience: &str, namespace: &str, service_account: &str) -> Reviewer {
        Reviewer {
            api: Api::all(client),
            audience: audience.to_owned(),
            agent_user: format!("system:serviceaccount:{namespace}:{service_account}"),
            cache: Mutex::default(),
        }
    }

    /// The node whose agent holds `token`, or why it is not one.
    pub async fn node_of(&self, token: &str) -> Result<String, String> {
        let now = Instant::now();
        if let Some((expires, verdict)) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(token)
            && *expires > now
        {
            return verdict.clone();
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let verdict = match self.api.create(&PostParams::default(), &review).await {
            Ok(reviewed) => judge(reviewed.status.as_ref(), &self.audience, &self.agent_user),
            Err(e) => {
                // Not cached: the next attempt asks again.
                warn!(error = %e, "TokenReview failed");
                return Err(format!("the token could not be reviewed: {e}"));
            }
        };
        match &verdict {
            Ok(node) => info!(
                node,
                "TokenReview accepted an agent's service-account token"
            ),
            Err(why) => warn!(reason = %why, "TokenReview refused a token"),
        }
        let ttl = if verdict.is_ok() {
            ACCEPTED_FOR
        } else {
            REFUSED_FOR
        };
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (expires, _)| *expires > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(token.to_owned(), (now + ttl, verdict.clone()));
        verdict
    }
}

/// The node of a reviewed token, or why it is refused.
pub fn judge(
    status: Option<&TokenReviewStatus>,
    audience: &str,
    agent_user: &str,
) -> Result<String, String> {
    let Some(status) = status else {
        return Err("the TokenReview came back without a status".into());
    };
    if status.authenticated != Some(true) {
        return Err(match status.error.as_deref() {
            Some(e) if !e.is_empty() => {
                format!("the API server did not authenticate the token: {e}")
            }
            _ => "the API server did not authenticate the token".into(),
        });
    }
    if let Some(audiences) = &status.audiences
        && !audiences.iter().any(|a| a == audience)
    {
        return Err(format!(
            "the token is not for audience {audience:?} (it is for {audiences:?})"
        ));
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or_default();
    if username != agent_user {
        return Err(format!(
            "the token is {username:?}'s, not the agents' service account {agent_user:?}"
        ));
    }
    let nodes: Vec<&String> = user
        .and_then(|u| u.extra.as_ref())
        .and_then(|extra| extra.get(NODE_NAME_EXTRA))
        .into_iter()
        .flatten()
        .collect();
    match nodes.as_slice() {
        [node] if !node.is_empty() => Ok((*node).clone()),
        [] => Err(format!(
            "the token names no node ({NODE_NAME_EXTRA}): mount a projected service-account token in the agent's pod"
        )),
        _ => Err(format!("the token names {} nodes", nodes.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    const AGENT: &str = "system:serviceaccount:mesh-system:mesh-agent";

    fn status(authenticated: bool, user: &str, node: Option<&str>) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(vec![DEFAULT_AUDIENCE.into()]),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: node.map(|n| [(NODE_NAME_EXTRA.to_owned(), vec![n.to_owned()])].into()),
                ..UserInfo::default()
            }),
            error: (!authenticated).then(|| "token expired".into()),
        }
    }

    #[test]
    fn only_the_agents_account_with_a_node_is_a_node() {
        let judged = |s: TokenReviewStatus| judge(Some(&s), DEFAULT_AUDIENCE, AGENT);
        assert_eq!(judged(status(true, AGENT, Some("n1"))), Ok("n1".into()));
        let other = judged(status(true, "system:serviceaccount:shop:web", Some("n1")));
        assert!(other.expect_err("other account").contains("shop:web"));
        let no_node = judged(status(true, AGENT, None));
        assert!(no_node.expect_err("no node").contains(NODE_NAME_EXTRA));
        let refused = judged(status(false, AGENT, Some("n1")));
        assert!(
            refused
                .expect_err("unauthenticated")
                .contains("token expired")
        );
        let mut wrong_audience = status(true, AGENT, Some("n1"));
        wrong_audience.audiences = Some(vec!["https://kubernetes.default.svc".into()]);
        assert!(
            judged(wrong_audience)
                .expect_err("audience")
                .contains("audience")
        );
        assert!(judge(None, DEFAULT_AUDIENCE, AGENT).is_err());
    }
}
