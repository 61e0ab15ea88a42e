//! Authorization: the AuthorizationPolicies as the destination's agent
//! judges them. Pure: policies are compiled once per configuration
//! ([`Policy::compile`]), the ones that apply to each local workload are
//! found at state build ([`applies_to`]), and [`evaluate`] decides one
//! connection or request from its attributes ([`Attributes`]).
//!
//! Istio's semantics:
//! - any matching DENY denies; else, if an ALLOW policy applies to the
//!   workload, one of them must match; else the request is allowed; AUDIT
//!   policies never change the verdict (their matches are reported);
//! - a policy without rules matches nothing; a rule matches when any of its
//!   `from`, any of its `to` and all of its `when` match (an empty list
//!   matches);
//! - a positive list (`principals`, `paths`, ...) needs a value that one of
//!   its patterns matches, so a caller without an identity matches no
//!   principal, not even `*`; a `not` list needs that none does;
//! - judging a connection (no HTTP request): a DENY rule ignores its HTTP
//!   conditions (so it denies more, never less), an ALLOW or AUDIT rule with
//!   an HTTP condition anywhere is skipped whole (Istio's rule).
use std::{collections::BTreeMap, net::Ipv4Addr};

use http::HeaderMap;
use mesh_api::{
    authz::{
        Action, AuthorizationPolicySpec, Cidr, ConditionKey, Operation, Pattern, ROOT_NAMESPACE,
        Source,
    },
    pb,
};

/// One compiled AuthorizationPolicy.
#[derive(Debug)]
pub struct Policy {
    /// `namespace/name`.
    pub id: String,
    pub namespace: String,
    /// `None`: every workload of its namespace (or of the mesh).
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// A rule reads HTTP: the ports it covers are served as HTTP.
    pub http: bool,
}

#[derive(Debug, Default)]
pub struct Rule {
    pub from: Vec<From>,
    pub to: Vec<To>,
    pub when: Vec<When>,
}

#[derive(Debug, Default)]
pub struct From {
    principals: Vec<Pattern>,
    not_principals: Vec<Pattern>,
    namespaces: Vec<Pattern>,
    not_namespaces: Vec<Pattern>,
    ip_blocks: Vec<Cidr>,
    not_ip_blocks: Vec<Cidr>,
}

#[derive(Debug, Default)]
pub struct To {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    methods: Vec<String>,
    not_methods: Vec<String>,
    paths: Vec<Pattern>,
    not_paths: Vec<Pattern>,
    hosts: Vec<Pattern>,
    not_hosts: Vec<Pattern>,
}

#[derive(Debug)]
pub struct When {
    key: ConditionKey,
    values: Vec<Value>,
    not_values: Vec<Value>,
}

#[derive(Debug)]
enum Value {
    Text(Pattern),
    Block(Cidr),
    Port(u16),
}

/// What is known of a connection or request being judged.
#[derive(Clone, Copy, Debug)]
pub struct Attributes<'a> {
    /// The caller's SPIFFE ID without `spiffe://`; `None`: no identity
    /// (plaintext).
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub source_ip: Ipv4Addr,
    /// The destination workload's port.
    pub port: u16,
    /// `None` when judging a connection.
    pub http: Option<HttpAttributes<'a>>,
}

#[derive(Clone, Copy, Debug)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

/// The verdict, with what produced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The deciding policy (`namespace/name`) and rule index: the DENY or
    /// ALLOW that matched. `None` with `allowed`: no ALLOW policy applies;
    /// `None` without: ALLOW policies apply and none matched.
    pub by: Option<(String, usize)>,
    /// AUDIT policies that matched.
    pub audited: Vec<(String, usize)>,
}

impl Decision {
    /// `allow` or `deny`, with the deciding policy and rule when one did.
    pub fn describe(&self) -> String {
        let verb = if self.allowed { "allow" } else { "deny" };
        match &self.by {
            Some((policy, rule)) => format!("{verb} ({policy} rule {rule})"),
            None if self.allowed => verb.to_owned(),
            None => format!("{verb} (no ALLOW policy matches)"),
        }
    }
}

fn patterns(list: &[String]) -> Result<Vec<Pattern>, String> {
    list.iter().map(|s| Pattern::parse(s)).collect()
}

fn ports(list: &[String]) -> Result<Vec<u16>, String> {
    list.iter()
        .map(|p| p.parse().map_err(|_| format!("{p:?} is not a port")))
        .collect()
}

fn blocks(list: &[String]) -> Result<Vec<Cidr>, String> {
    list.iter().map(|s| Cidr::parse(s)).collect()
}

impl From {
    fn compile(s: &Source) -> Result<From, String> {
        Ok(From {
            principals: patterns(&s.principals)?,
            not_principals: patterns(&s.not_principals)?,
            namespaces: patterns(&s.namespaces)?,
            not_namespaces: patterns(&s.not_namespaces)?,
            ip_blocks: blocks(&s.ip_blocks)?,
            not_ip_blocks: blocks(&s.not_ip_blocks)?,
        })
    }

    fn matches(&self, a: &Attributes) -> bool {
        text(&self.principals, &self.not_principals, a.principal)
            && text(&self.namespaces, &self.not_namespaces, a.namespace)
            && (self.ip_blocks.is_empty() || self.ip_blocks.iter().any(|b| b.contains(a.source_ip)))
            && !self.not_ip_blocks.iter().any(|b| b.contains(a.source_ip))
    }
}

impl To {
    fn compile(o: &Operation) -> Result<To, String> {
        Ok(To {
            ports: ports(&o.ports)?,
            not_ports: ports(&o.not_ports)?,
            methods: o.methods.clone(),
            not_methods: o.not_methods.clone(),
            paths: patterns(&o.paths)?,
            not_paths: patterns(&o.not_paths)?,
            hosts: patterns(&o.hosts)?,
            not_hosts: patterns(&o.not_hosts)?,
        })
    }

    fn has_http(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty())
    }

    fn matches(&self, a: &Attributes, ignore_http: bool) -> bool {
        let port_ok = (self.ports.is_empty() || self.ports.contains(&a.port))
            && !self.not_ports.contains(&a.port);
        if !port_ok {
            return false;
        }
        let Some(h) = &a.http else {
            return ignore_http || !self.has_http();
        };
        let method = |list: &[String]| list.iter().any(|m| m == "*" || m == h.method);
        (self.methods.is_empty() || method(&self.methods))
            && !method(&self.not_methods)
            && text(&self.paths, &self.not_paths, Some(h.path))
            && text(&self.hosts, &self.not_hosts, Some(host_only(h.host)))
    }
}

/// Istio matches hosts with or without the port.
fn host_only(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// A positive and a negative pattern list over a value that may be absent.
fn text(yes: &[Pattern], no: &[Pattern], v: Option<&str>) -> bool {
    let hit = |list: &[Pattern]| v.is_some_and(|v| list.iter().any(|p| p.matches(v)));
    (yes.is_empty() || hit(yes)) && !hit(no)
}

impl When {
    fn compile(c: &mesh_api::authz::Condition) -> Result<When, String> {
        let key = ConditionKey::parse(&c.key)?;
        let value = |s: &String| -> Result<Value, String> {
            Ok(match key {
                ConditionKey::SourceIp => Value::Block(Cidr::parse(s)?),
                ConditionKey::DestinationPort => {
                    Value::Port(s.parse().map_err(|_| format!("{s:?} is not a port"))?)
                }
                _ => Value::Text(Pattern::parse(s)?),
            })
        };
        Ok(When {
            values: c.values.iter().map(value).collect::<Result<_, _>>()?,
            not_values: c.not_values.iter().map(value).collect::<Result<_, _>>()?,
            key,
        })
    }

    fn matches(&self, a: &Attributes, ignore_http: bool) -> bool {
        let hit = |list: &[Value]| -> bool {
            list.iter().any(|v| match (&self.key, v) {
                (ConditionKey::SourceIp, Value::Block(b)) => b.contains(a.source_ip),
                (ConditionKey::DestinationPort, Value::Port(p)) => *p == a.port,
                (ConditionKey::SourceNamespace, Value::Text(p)) => {
                    a.namespace.is_some_and(|n| p.matches(n))
                }
                (ConditionKey::SourcePrincipal, Value::Text(p)) => {
                    a.principal.is_some_and(|n| p.matches(n))
                }
                (ConditionKey::Header(name), Value::Text(p)) => a.http.is_some_and(|h| {
                    h.headers
                        .get_all(name.as_str())
                        .iter()
                        .any(|v| v.to_str().is_ok_and(|v| p.matches(v)))
                }),
                _ => false,
            })
        };
        if self.key.is_http() && a.http.is_none() {
            return ignore_http;
        }
        (self.values.is_empty() || hit(&self.values)) && !hit(&self.not_values)
    }
}

impl Rule {
    fn has_http(&self) -> bool {
        self.to.iter().any(To::has_http) || self.when.iter().any(|w| w.key.is_http())
    }

    /// Whether the rule matches; `ignore_http`: HTTP conditions count as
    /// met when there is no HTTP request (a DENY rule judging a
    /// connection).
    fn matches(&self, a: &Attributes, ignore_http: bool) -> bool {
        if a.http.is_none() && !ignore_http && self.has_http() {
            return false;
        }
        (self.from.is_empty() || self.from.iter().any(|f| f.matches(a)))
            && (self.to.is_empty() || self.to.iter().any(|t| t.matches(a, ignore_http)))
            && self.when.iter().all(|w| w.matches(a, ignore_http))
    }
}

impl Policy {
    pub fn compile(p: &pb::Policy) -> Result<Policy, String> {
        let spec: AuthorizationPolicySpec =
            serde_json::from_str(&p.spec_json).map_err(|e| format!("spec: {e}"))?;
        spec.validate().map_err(|e| e.to_string())?;
        Policy::from_spec(&p.namespace, &p.name, &spec)
    }

    /// What stands in for a policy this agent cannot read (only a control
    /// server of another version could send one): DENY everything for the
    /// workloads its selector names, if that much can be read, else for its
    /// whole namespace. Failing closed.
    pub fn unreadable(p: &pb::Policy) -> Policy {
        let selector = serde_json::from_str::<serde_json::Value>(&p.spec_json)
            .ok()
            .and_then(|v| {
                let labels = v.get("selector")?.get("matchLabels")?.as_object()?.clone();
                labels
                    .into_iter()
                    .map(|(k, v)| Some((k, v.as_str()?.to_owned())))
                    .collect::<Option<BTreeMap<_, _>>>()
            });
        Policy {
            id: format!("{}/{}", p.namespace, p.name),
            namespace: p.namespace.clone(),
            selector,
            action: Action::Deny,
            rules: vec![Rule::default()],
            http: false,
        }
    }

    pub fn from_spec(
        namespace: &str,
        name: &str,
        spec: &AuthorizationPolicySpec,
    ) -> Result<Policy, String> {
        let rules = spec
            .rules
            .iter()
            .map(|r| -> Result<Rule, String> {
                Ok(Rule {
                    from: r
                        .from
                        .iter()
                        .map(|f| From::compile(&f.source))
                        .collect::<Result<_, _>>()?,
                    to: r
                        .to
                        .iter()
                        .map(|t| To::compile(&t.operation))
                        .collect::<Result<_, _>>()?,
                    when: r.when.iter().map(When::compile).collect::<Result<_, _>>()?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy {
            id: format!("{namespace}/{name}"),
            namespace: namespace.to_owned(),
            selector: spec.selector.as_ref().map(|s| s.match_labels.clone()),
            action: spec.action,
            http: rules.iter().any(Rule::has_http),
            rules,
        })
    }

    fn first_match(&self, a: &Attributes, ignore_http: bool) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(a, ignore_http))
    }
}

/// The verdict on a connection or request to the local workload at `dst`
/// by the policies of `state`; nothing logged or counted.
pub fn verdict(
    state: &crate::state::State,
    dst: std::net::SocketAddrV4,
    source: Option<&mesh_api::identity::SpiffeId>,
    source_ip: Ipv4Addr,
    http: Option<HttpAttributes>,
) -> Decision {
    let principal = principal_of(source);
    decide(state, dst, source, principal.as_deref(), source_ip, http)
}

/// A SPIFFE ID as principals are written: without `spiffe://`.
fn principal_of(source: Option<&mesh_api::identity::SpiffeId>) -> Option<String> {
    source.map(|s| {
        let id = s.to_string();
        id.strip_prefix("spiffe://").unwrap_or(&id).to_owned()
    })
}

fn decide(
    state: &crate::state::State,
    dst: std::net::SocketAddrV4,
    source: Option<&mesh_api::identity::SpiffeId>,
    principal: Option<&str>,
    source_ip: Ipv4Addr,
    http: Option<HttpAttributes>,
) -> Decision {
    let policies = state.authz_for(*dst.ip());
    if policies.is_empty() {
        return Decision {
            allowed: true,
            by: None,
            audited: Vec::new(),
        };
    }
    let a = Attributes {
        principal,
        namespace: source.map(|s| s.namespace()),
        source_ip,
        port: dst.port(),
        http,
    };
    evaluate(policies.iter().map(|p| &**p), &a)
}

/// Resolves when a new configuration denies a connection that was allowed
/// (the caller then closes it); never, while it stays allowed.
pub async fn revoked(
    mut state: crate::state::StateRx,
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
    dst: std::net::SocketAddrV4,
    source: Option<mesh_api::identity::SpiffeId>,
    source_ip: Ipv4Addr,
) {
    loop {
        if state.changed().await.is_err() {
            return std::future::pending().await;
        }
        let s = state.borrow_and_update().clone();
        if !verdict(&s, dst, source.as_ref(), source_ip, None).allowed {
            // Counted and logged as the decision it is.
            judge(&s, &metrics, dst, source.as_ref(), source_ip, None);
            tracing::info!(%dst, %source_ip, "closing a connection a new policy denies");
            return;
        }
    }
}

/// Judges a connection or request to the local workload at `dst` with the
/// policies of `state`, logging what decided and counting it.
pub fn judge(
    state: &crate::state::State,
    metrics: &crate::telemetry::Metrics,
    dst: std::net::SocketAddrV4,
    source: Option<&mesh_api::identity::SpiffeId>,
    source_ip: Ipv4Addr,
    http: Option<HttpAttributes>,
) -> Decision {
    if state.authz_for(*dst.ip()).is_empty() {
        return decide(state, dst, source, None, source_ip, http);
    }
    let principal = principal_of(source);
    let principal = principal.as_deref();
    let d = decide(state, dst, source, principal, source_ip, http);
    for (policy, rule) in &d.audited {
        tracing::info!(%dst, source = principal.unwrap_or("-"), %source_ip, policy, rule, http = http.is_some(), "authorization audit");
        metrics.authz(policy, "audit");
    }
    match (&d.by, d.allowed) {
        (Some((policy, rule)), false) => {
            tracing::info!(%dst, source = principal.unwrap_or("-"), %source_ip, policy, rule, "denied by policy");
            metrics.authz(policy, "deny");
        }
        (None, false) => {
            tracing::info!(%dst, source = principal.unwrap_or("-"), %source_ip, "denied: no ALLOW policy matches");
            metrics.authz("-", "deny");
        }
        (Some((policy, _)), true) => metrics.authz(policy, "allow"),
        (None, true) => {}
    }
    d
}

/// The caller's pod IP a peer agent names in [`crate::proxy::http::SOURCE_HEADER`],
/// if that IP is a workload with the tunnel's identity; else unspecified
/// (no `ipBlocks` match it, every `notIpBlocks` does not).
pub fn claimed_source(
    headers: &HeaderMap,
    state: &crate::state::State,
    source: &mesh_api::identity::SpiffeId,
) -> Ipv4Addr {
    headers
        .get(crate::proxy::http::SOURCE_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<Ipv4Addr>().ok())
        .filter(|ip| {
            state
                .workload_by_ip(*ip)
                .is_some_and(|w| w.identity.as_ref() == Some(source))
        })
        .unwrap_or(Ipv4Addr::UNSPECIFIED)
}

/// Whether `policy` applies to a workload of `namespace` with `labels`.
pub fn applies_to(policy: &Policy, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
    (policy.namespace == namespace || policy.namespace == ROOT_NAMESPACE)
        && policy
            .selector
            .as_ref()
            .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Judges one connection or request by the policies that apply to its
/// destination workload.
pub fn evaluate<'p>(
    policies: impl IntoIterator<Item = &'p Policy> + Clone,
    a: &Attributes,
) -> Decision {
    let audited = policies
        .clone()
        .into_iter()
        .filter(|p| p.action == Action::Audit)
        .filter_map(|p| Some((p.id.clone(), p.first_match(a, false)?)))
        .collect();
    for p in policies.clone() {
        if p.action == Action::Deny
            && let Some(rule) = p.first_match(a, true)
        {
            return Decision {
                allowed: false,
                by: Some((p.id.clone(), rule)),
                audited,
            };
        }
    }
    let mut any_allow = false;
    for p in policies {
        if p.action == Action::Allow {
            any_allow = true;
            if let Some(rule) = p.first_match(a, false) {
                return Decision {
                    allowed: true,
                    by: Some((p.id.clone(), rule)),
                    audited,
                };
            }
        }
    }
    Decision {
        allowed: !any_allow,
        by: None,
        audited,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn policy(ns: &str, name: &str, yaml: &str) -> Policy {
        let spec: AuthorizationPolicySpec = serde_yaml_ng::from_str(yaml).expect(yaml);
        spec.validate().expect(yaml);
        Policy::from_spec(ns, name, &spec).unwrap()
    }

    fn attrs<'a>(principal: Option<&'a str>, http: Option<HttpAttributes<'a>>) -> Attributes<'a> {
        Attributes {
            principal,
            namespace: principal.and_then(|p| p.split("/ns/").nth(1)?.split('/').next()),
            source_ip: Ipv4Addr::new(198, 18, 1, 10),
            port: 8080,
            http,
        }
    }

    const CLIENT: &str = "cluster.local/ns/default/sa/client";
    const OTHER: &str = "cluster.local/ns/other/sa/client";

    #[test]
    fn deny_overrides_allow_and_no_allow_means_allowed() {
        let allow = policy(
            "default",
            "allow",
            "{rules: [{from: [{source: {namespaces: [default]}}]}]}",
        );
        let deny = policy(
            "default",
            "deny",
            "{action: DENY, rules: [{from: [{source: {principals: ['*/sa/client']}}], to: [{operation: {ports: ['8080']}}]}]}",
        );
        let a = attrs(Some(CLIENT), None);
        assert!(evaluate([&allow], &a).allowed);
        let d = evaluate([&allow, &deny], &a);
        assert!(!d.allowed);
        assert_eq!(d.by, Some(("default/deny".into(), 0)));
        assert!(!evaluate([&allow], &attrs(Some(OTHER), None)).allowed);
        assert!(evaluate(std::iter::empty::<&Policy>(), &attrs(None, None)).allowed);
    }

    #[test]
    fn an_allow_without_rules_denies_everything_and_audit_only_reports() {
        let deny_all = policy("default", "none", "{}");
        assert!(!evaluate([&deny_all], &attrs(Some(CLIENT), None)).allowed);
        let audit = policy("default", "audit", "{action: AUDIT, rules: [{}]}");
        let d = evaluate([&audit], &attrs(None, None));
        assert!(d.allowed);
        assert_eq!(d.audited, vec![("default/audit".to_string(), 0)]);
    }

    #[test]
    fn http_rules_on_a_connection_deny_more_and_allow_less() {
        let headers = HeaderMap::new();
        let get = HttpAttributes {
            method: "GET",
            path: "/admin/x",
            host: "web:80",
            headers: &headers,
        };
        let deny = policy(
            "default",
            "d",
            "{action: DENY, rules: [{to: [{operation: {paths: ['/admin/*']}}]}]}",
        );
        let allow = policy(
            "default",
            "a",
            "{rules: [{to: [{operation: {methods: [GET], hosts: [web]}}]}]}",
        );
        // A connection: the DENY's path is ignored, so it denies.
        assert!(!evaluate([&deny], &attrs(Some(CLIENT), None)).allowed);
        assert!(!evaluate([&deny], &attrs(Some(CLIENT), Some(get))).allowed);
        let ok = HttpAttributes { path: "/ok", ..get };
        assert!(evaluate([&deny], &attrs(Some(CLIENT), Some(ok))).allowed);
        // The ALLOW with HTTP conditions never matches a connection.
        assert!(!evaluate([&allow], &attrs(Some(CLIENT), None)).allowed);
        assert!(evaluate([&allow], &attrs(Some(CLIENT), Some(ok))).allowed);
        assert!(allow.http && deny.http);
    }

    #[test]
    fn no_identity_matches_no_principal_but_every_not_principal() {
        let p = policy(
            "default",
            "p",
            "{rules: [{from: [{source: {principals: ['*']}}]}]}",
        );
        assert!(!evaluate([&p], &attrs(None, None)).allowed);
        assert!(evaluate([&p], &attrs(Some(CLIENT), None)).allowed);
        let n = policy(
            "default",
            "n",
            "{rules: [{from: [{source: {notPrincipals: ['*']}}]}]}",
        );
        assert!(evaluate([&n], &attrs(None, None)).allowed);
        assert!(!evaluate([&n], &attrs(Some(CLIENT), None)).allowed);
    }

    #[test]
    fn a_policy_that_cannot_be_read_denies_what_it_selects() {
        let p = Policy::unreadable(&pb::Policy {
            kind: "AuthorizationPolicy".into(),
            namespace: "default".into(),
            name: "future".into(),
            created_revision: 1,
            spec_json: r#"{"selector": {"matchLabels": {"app": "web"}}, "action": "CUSTOM"}"#
                .into(),
        });
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        assert!(applies_to(&p, "default", &labels));
        assert!(!applies_to(&p, "default", &BTreeMap::new()));
        assert!(!evaluate([&p], &attrs(Some(CLIENT), None)).allowed);
    }

    #[test]
    fn selectors_and_the_root_namespace() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        let sel = policy("default", "s", "{selector: {matchLabels: {app: web}}}");
        assert!(applies_to(&sel, "default", &labels));
        assert!(!applies_to(&sel, "default", &BTreeMap::new()));
        assert!(!applies_to(&sel, "other", &labels));
        let mesh = policy(ROOT_NAMESPACE, "m", "{}");
        assert!(applies_to(&mesh, "anything", &BTreeMap::new()));
    }

    #[test]
    fn when_headers_source_ip_and_ports() {
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant", "acme-1".parse().unwrap());
        let h = HttpAttributes {
            method: "POST",
            path: "/",
            host: "h",
            headers: &headers,
        };
        let p = policy(
            "default",
            "w",
            "{rules: [{when: [{key: 'request.headers[X-Tenant]', values: ['acme-*']}, {key: source.ip, notValues: ['198.18.9.0/24']}, {key: destination.port, values: ['8080']}]}]}",
        );
        assert!(evaluate([&p], &attrs(None, Some(h))).allowed);
        let mut far = attrs(None, Some(h));
        far.source_ip = Ipv4Addr::new(198, 18, 9, 1);
        assert!(!evaluate([&p], &far).allowed);
        let empty = HeaderMap::new();
        let bare = HttpAttributes {
            headers: &empty,
            ..h
        };
        assert!(!evaluate([&p], &attrs(None, Some(bare))).allowed);
    }

    // ---- Property test against a deliberately simple reference evaluator
    // over the uncompiled spec, on a small universe of values.

    const PRINCIPALS: [&str; 3] = [
        "cluster.local/ns/a/sa/x",
        "cluster.local/ns/b/sa/x",
        "cluster.local/ns/a/sa/y",
    ];
    const PRINCIPAL_PATTERNS: [&str; 5] = [
        "cluster.local/ns/a/sa/x",
        "*/sa/x",
        "cluster.local/ns/a/*",
        "*",
        "cluster.local/ns/b/sa/x",
    ];
    const NAMESPACES: [&str; 3] = ["a", "b", "*"];
    const PATHS: [&str; 4] = ["/", "/api/v1", "/admin", "/api/v2"];
    const PATH_PATTERNS: [&str; 4] = ["/api/*", "/admin", "*", "*/v1"];
    const METHODS: [&str; 3] = ["GET", "POST", "DELETE"];
    const BLOCKS: [&str; 3] = ["198.18.1.0/24", "198.18.0.0/15", "198.18.2.7"];
    const IPS: [[u8; 4]; 3] = [[198, 18, 1, 10], [198, 18, 2, 7], [198, 19, 0, 1]];
    const PORTS: [u16; 2] = [8080, 9090];

    fn pick<T: Clone>(all: &[T], bits: u8) -> Vec<T> {
        all.iter()
            .enumerate()
            .filter(|(i, _)| bits & (1 << i) != 0)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn strings(all: &[&str], bits: u8) -> Vec<String> {
        pick(all, bits).into_iter().map(str::to_owned).collect()
    }

    fn arb_source() -> impl Strategy<Value = Source> {
        (any::<[u8; 6]>()).prop_map(|b| Source {
            principals: strings(&PRINCIPAL_PATTERNS, b[0] & 0x1f),
            not_principals: strings(&PRINCIPAL_PATTERNS, b[1] & b[2] & 0x1f),
            namespaces: strings(&NAMESPACES, b[3] & 0x7),
            not_namespaces: strings(&NAMESPACES, b[3] & b[4] & 0x3),
            ip_blocks: strings(&BLOCKS, b[5] & 0x7),
            not_ip_blocks: strings(&BLOCKS, b[5] >> 5),
        })
    }

    fn arb_operation() -> impl Strategy<Value = Operation> {
        (any::<[u8; 5]>()).prop_map(|b| Operation {
            ports: pick(&PORTS, b[0] & 3).iter().map(u16::to_string).collect(),
            not_ports: pick(&PORTS, b[0] >> 6).iter().map(u16::to_string).collect(),
            methods: strings(&METHODS, b[1] & 7),
            not_methods: strings(&METHODS, b[1] & b[2] & 7),
            paths: strings(&PATH_PATTERNS, b[3] & 0xf),
            not_paths: strings(&PATH_PATTERNS, b[3] & b[4] & 0xf),
            ..Operation::default()
        })
    }

    fn arb_rule() -> impl Strategy<Value = mesh_api::authz::Rule> {
        (
            proptest::collection::vec(arb_source(), 0..3),
            proptest::collection::vec(arb_operation(), 0..3),
        )
            .prop_map(|(from, to)| mesh_api::authz::Rule {
                from: from
                    .into_iter()
                    .filter(|s| s != &Source::default())
                    .map(|source| mesh_api::authz::From { source })
                    .collect(),
                to: to
                    .into_iter()
                    .filter(|o| o != &Operation::default())
                    .map(|operation| mesh_api::authz::To { operation })
                    .collect(),
                when: Vec::new(),
            })
    }

    fn arb_spec() -> impl Strategy<Value = AuthorizationPolicySpec> {
        (0..3u8, proptest::collection::vec(arb_rule(), 0..3)).prop_map(|(a, rules)| {
            AuthorizationPolicySpec {
                selector: None,
                action: [Action::Allow, Action::Deny, Action::Audit][a as usize],
                rules,
            }
        })
    }

    /// Istio's rules, written out plainly over the spec.
    mod reference {
        use super::super::*;

        fn glob(p: &str, v: &str) -> bool {
            if p == "*" {
                true
            } else if let Some(pre) = p.strip_suffix('*') {
                v.starts_with(pre)
            } else if let Some(suf) = p.strip_prefix('*') {
                v.ends_with(suf)
            } else {
                p == v
            }
        }

        fn any_of(list: &[String], v: Option<&str>) -> bool {
            match v {
                None => false,
                Some(v) => list.iter().any(|p| glob(p, v)),
            }
        }

        fn field(yes: &[String], no: &[String], v: Option<&str>) -> bool {
            if !yes.is_empty() && !any_of(yes, v) {
                return false;
            }
            !any_of(no, v)
        }

        fn in_block(b: &str, ip: Ipv4Addr) -> bool {
            let c = Cidr::parse(b).unwrap();
            let bits = 32 - u32::from(c.len);
            if bits == 32 {
                return true;
            }
            (u32::from(ip) >> bits) == (u32::from(c.addr) >> bits)
        }

        pub fn rule_matches(r: &mesh_api::authz::Rule, a: &Attributes, is_deny: bool) -> bool {
            // Istio: an ALLOW (or AUDIT) rule with HTTP-only fields is
            // skipped whole for TCP traffic.
            let rule_has_http = r.to.iter().any(|t| {
                let o = &t.operation;
                !o.methods.is_empty()
                    || !o.not_methods.is_empty()
                    || !o.paths.is_empty()
                    || !o.not_paths.is_empty()
            });
            if a.http.is_none() && !is_deny && rule_has_http {
                return false;
            }
            let mut from_ok = r.from.is_empty();
            for f in &r.from {
                let s = &f.source;
                let mut ok = field(&s.principals, &s.not_principals, a.principal);
                ok = ok && field(&s.namespaces, &s.not_namespaces, a.namespace);
                if !s.ip_blocks.is_empty() && !s.ip_blocks.iter().any(|b| in_block(b, a.source_ip))
                {
                    ok = false;
                }
                if s.not_ip_blocks.iter().any(|b| in_block(b, a.source_ip)) {
                    ok = false;
                }
                if ok {
                    from_ok = true;
                }
            }
            let mut to_ok = r.to.is_empty();
            for t in &r.to {
                let o = &t.operation;
                let port = a.port.to_string();
                let mut ok = o.ports.is_empty() || o.ports.contains(&port);
                ok = ok && !o.not_ports.contains(&port);
                let http_fields = !o.methods.is_empty()
                    || !o.not_methods.is_empty()
                    || !o.paths.is_empty()
                    || !o.not_paths.is_empty();
                match &a.http {
                    None => {
                        if http_fields && !is_deny {
                            ok = false;
                        }
                    }
                    Some(h) => {
                        let m = |l: &[String]| l.iter().any(|x| x == "*" || x == h.method);
                        if !o.methods.is_empty() && !m(&o.methods) {
                            ok = false;
                        }
                        if m(&o.not_methods) {
                            ok = false;
                        }
                        ok = ok && field(&o.paths, &o.not_paths, Some(h.path));
                    }
                }
                if ok {
                    to_ok = true;
                }
            }
            from_ok && to_ok
        }

        /// (allowed, deciding policy index)
        pub fn evaluate(specs: &[AuthorizationPolicySpec], a: &Attributes) -> bool {
            for s in specs {
                if s.action == Action::Deny && s.rules.iter().any(|r| rule_matches(r, a, true)) {
                    return false;
                }
            }
            let allows: Vec<_> = specs.iter().filter(|s| s.action == Action::Allow).collect();
            if allows.is_empty() {
                return true;
            }
            allows
                .iter()
                .any(|s| s.rules.iter().any(|r| rule_matches(r, a, false)))
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn the_matcher_agrees_with_the_reference(
            specs in proptest::collection::vec(arb_spec(), 0..4),
            who in 0usize..4,
            ip in 0usize..3,
            port in 0usize..2,
            request in proptest::option::of((0usize..3, 0usize..4)),
        ) {
            let headers = HeaderMap::new();
            let principal = PRINCIPALS.get(who).copied();
            let a = Attributes {
                principal,
                namespace: principal.and_then(|p| p.split("/ns/").nth(1)?.split('/').next()),
                source_ip: IPS[ip].into(),
                port: PORTS[port],
                http: request.map(|(m, p)| HttpAttributes {
                    method: METHODS[m],
                    path: PATHS[p],
                    host: "web",
                    headers: &headers,
                }),
            };
            for s in &specs {
                prop_assume!(s.validate().is_ok());
            }
            let compiled: Vec<Policy> = specs
                .iter()
                .enumerate()
                .map(|(i, s)| Policy::from_spec("default", &format!("p{i}"), s).unwrap())
                .collect();
            let got = evaluate(compiled.iter(), &a).allowed;
            prop_assert_eq!(got, reference::evaluate(&specs, &a), "{:?} {:?}", specs, a);
        }
    }
}
