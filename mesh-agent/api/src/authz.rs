//! `AuthorizationPolicy` (`mesh.dev/v1alpha1`), with Istio's meaning: who
//! may call which workloads, judged by the destination's agent with the
//! caller's identity proven by mTLS (or, on one node, by the kernel's cgroup
//! record).
//!
//! - A policy in the root namespace ([`ROOT_NAMESPACE`]) applies to the
//!   whole mesh; elsewhere to its namespace; `selector.matchLabels` narrows
//!   it to workloads with those labels.
//! - Evaluation, as Istio users know it: a matching DENY denies; else, if
//!   any ALLOW policy applies to the workload, a request must match one of
//!   them; else it is allowed. AUDIT policies never change the verdict; a
//!   match is logged and counted.
//! - A policy without rules matches nothing: an ALLOW policy without rules
//!   denies every request to what it selects (default deny); a rule `{}`
//!   matches everything.
//!
//! The control server parses a document's `spec` into
//! [`AuthorizationPolicySpec`] (unknown fields refused), runs
//! [`AuthorizationPolicySpec::validate`], and distributes it as JSON in a
//! `Policy` resource.
use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::gateway::{Invalid, invalid};

pub const AUTHORIZATION_POLICY_KIND: &str = "AuthorizationPolicy";
/// Policies here apply to every workload of the mesh (Istio's
/// `istio-system`).
pub const ROOT_NAMESPACE: &str = "mesh-system";
pub const MAX_RULES: usize = 64;
pub const MAX_VALUES: usize = 256;

#[cfg_attr(feature = "crd", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "crd",
    kube(
        group = "mesh.dev",
        version = "v1alpha1",
        kind = "AuthorizationPolicy",
        doc = "Who may call the workloads it selects (Istio's AuthorizationPolicy).",
        plural = "authorizationpolicies",
        shortname = "ap",
        namespaced,
        category = "mesh"
    )
)]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
}

/// Matches when every part given matches: any of `from`, any of `to`, and
/// all of `when`.
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// `<trust-domain>/ns/<namespace>/sa/<service-account>` (a SPIFFE ID
    /// without `spiffe://`), with one `*` at the start or the end; `*`
    /// alone: any caller with an identity.
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// IPv4 addresses or CIDR blocks of the caller.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
}

#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

/// `ports` and `notPorts` apply to every connection; the others are HTTP
/// only (a policy with them turns on HTTP handling of the ports it covers).
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Exact, `prefix*`, `*suffix` or `*`.
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
}

/// Istio's `when`: `key` is `request.headers[<name>]`, `source.ip`,
/// `source.namespace`, `source.principal` or `destination.port`.
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// What a `when` key reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConditionKey {
    /// Lower case.
    Header(String),
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
}

impl ConditionKey {
    pub fn parse(key: &str) -> Result<ConditionKey, String> {
        if let Some(rest) = key.strip_prefix("request.headers[")
            && let Some(name) = rest.strip_suffix(']')
        {
            if !crate::gateway::is_header_name(name) {
                return Err(format!("{name:?} is not a header name"));
            }
            return Ok(ConditionKey::Header(name.to_ascii_lowercase()));
        }
        Ok(match key {
            "source.ip" => ConditionKey::SourceIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "destination.port" => ConditionKey::DestinationPort,
            other => {
                return Err(format!(
                    "{other:?} is not a supported key (request.headers[NAME], source.ip, source.namespace, source.principal, destination.port)"
                ));
            }
        })
    }

    pub fn is_http(&self) -> bool {
        matches!(self, ConditionKey::Header(_))
    }
}

/// An IPv4 block: address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let bad = || format!("{s:?} is not an IPv4 address or CIDR block");
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, len.parse::<u8>().map_err(|_| bad())?),
            None => (s, 32),
        };
        let addr: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        if len > 32 {
            return Err(bad());
        }
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        if u32::from(addr) & !mask != 0 {
            return Err(format!(
                "{s:?} has host bits set (did you mean {}/{len}?)",
                Ipv4Addr::from(u32::from(addr) & mask)
            ));
        }
        Ok(Cidr { addr, len })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` (anything
/// present).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, String> {
        if s.is_empty() {
            return Err("an empty value matches nothing".into());
        }
        if s == "*" {
            return Ok(Pattern::Any);
        }
        let stars = s.matches('*').count();
        if stars == 1
            && let Some(p) = s.strip_suffix('*')
        {
            return Ok(Pattern::Prefix(p.to_owned()));
        }
        if stars == 1
            && let Some(p) = s.strip_prefix('*')
        {
            return Ok(Pattern::Suffix(p.to_owned()));
        }
        if stars > 0 {
            return Err(format!(
                "{s:?}: `*` may only be the first or the last character, once"
            ));
        }
        Ok(Pattern::Exact(s.to_owned()))
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => v == e,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(p) => v.ends_with(p.as_str()),
        }
    }
}

fn patterns(field: &str, list: &[String]) -> Result<(), Invalid> {
    if list.len() > MAX_VALUES {
        return invalid(field, format!("at most {MAX_VALUES} values"));
    }
    for (i, v) in list.iter().enumerate() {
        Pattern::parse(v).or_else(|e| invalid(format!("{field}[{i}]"), e))?;
    }
    Ok(())
}

fn principals(field: &str, list: &[String]) -> Result<(), Invalid> {
    patterns(field, list)?;
    for (i, v) in list.iter().enumerate() {
        if let Some(rest) = v.strip_prefix("spiffe://") {
            return invalid(
                format!("{field}[{i}]"),
                format!(
                    "{v:?}: principals leave out `spiffe://` (Istio never matches it): write {rest:?}"
                ),
            );
        }
        if !matches!(Pattern::parse(v), Ok(Pattern::Any | Pattern::Suffix(_)))
            && !v.contains("/ns/")
        {
            return invalid(
                format!("{field}[{i}]"),
                format!(
                    "{v:?} is not a principal (TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT, or one with a leading or trailing `*`)"
                ),
            );
        }
    }
    Ok(())
}

fn ports(field: &str, list: &[String]) -> Result<(), Invalid> {
    for (i, p) in list.iter().enumerate() {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => {}
            _ => {
                return invalid(
                    format!("{field}[{i}]"),
                    format!("{p:?} is not a port (1-65535)"),
                );
            }
        }
    }
    Ok(())
}

impl AuthorizationPolicySpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(sel) = &self.selector {
            for (k, v) in &sel.match_labels {
                if k.is_empty() {
                    return invalid("spec.selector.matchLabels", "a label name is empty");
                }
                if v.contains('*') {
                    return invalid(
                        format!("spec.selector.matchLabels.{k}"),
                        "label values are matched exactly: `*` is not a wildcard here",
                    );
                }
            }
        }
        if self.rules.len() > MAX_RULES {
            return invalid("spec.rules", format!("at most {MAX_RULES} rules"));
        }
        for (r, rule) in self.rules.iter().enumerate() {
            let at = format!("spec.rules[{r}]");
            for (i, f) in rule.from.iter().enumerate() {
                let at = format!("{at}.from[{i}].source");
                let s = &f.source;
                // Istio refuses an empty source: it would match every caller,
                // which a `from` is there to narrow.
                if s == &Source::default() {
                    return invalid(
                        &at,
                        "an empty source would match every caller: name principals, namespaces or ipBlocks (or drop `from` if every caller is meant)",
                    );
                }
                principals(&format!("{at}.principals"), &s.principals)?;
                principals(&format!("{at}.notPrincipals"), &s.not_principals)?;
                patterns(&format!("{at}.namespaces"), &s.namespaces)?;
                patterns(&format!("{at}.notNamespaces"), &s.not_namespaces)?;
                for (field, list) in [
                    ("ipBlocks", &s.ip_blocks),
                    ("notIpBlocks", &s.not_ip_blocks),
                ] {
                    for (j, b) in list.iter().enumerate() {
                        Cidr::parse(b).or_else(|e| invalid(format!("{at}.{field}[{j}]"), e))?;
                    }
                }
            }
            for (i, t) in rule.to.iter().enumerate() {
                let at = format!("{at}.to[{i}].operation");
                let o = &t.operation;
                if o == &Operation::default() {
                    return invalid(
                        &at,
                        "an empty operation would match every request: name ports, methods, paths or hosts (or drop `to` if every request is meant)",
                    );
                }
                ports(&format!("{at}.ports"), &o.ports)?;
                ports(&format!("{at}.notPorts"), &o.not_ports)?;
                for (field, list) in [("methods", &o.methods), ("notMethods", &o.not_methods)] {
                    for (j, m) in list.iter().enumerate() {
                        if m != "*" && (m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
                        {
                            return invalid(
                                format!("{at}.{field}[{j}]"),
                                format!(
                                    "{m:?} is not an HTTP method in upper case (GET, POST, ...)"
                                ),
                            );
                        }
                    }
                }
                for (field, list) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
                    patterns(&format!("{at}.{field}"), list)?;
                    for (j, p) in list.iter().enumerate() {
                        if !(p.starts_with('/') || p.starts_with('*')) {
                            return invalid(
                                format!("{at}.{field}[{j}]"),
                                format!("{p:?}: a path starts with `/` (or `*`)"),
                            );
                        }
                    }
                }
                patterns(&format!("{at}.hosts"), &o.hosts)?;
                patterns(&format!("{at}.notHosts"), &o.not_hosts)?;
            }
            for (i, c) in rule.when.iter().enumerate() {
                let at = format!("{at}.when[{i}]");
                let key =
                    ConditionKey::parse(&c.key).or_else(|e| invalid(format!("{at}.key"), e))?;
                if c.values.is_empty() && c.not_values.is_empty() {
                    return invalid(
                        &at,
                        "needs values or notValues (Istio refuses a condition with neither)",
                    );
                }
                for (field, list) in [("values", &c.values), ("notValues", &c.not_values)] {
                    for (j, v) in list.iter().enumerate() {
                        let f = format!("{at}.{field}[{j}]");
                        match key {
                            ConditionKey::SourceIp => {
                                Cidr::parse(v).or_else(|e| invalid(&f, e))?;
                            }
                            ConditionKey::DestinationPort => ports(&f, std::slice::from_ref(v))?,
                            _ => {
                                Pattern::parse(v).or_else(|e| invalid(&f, e))?;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether a rule needs HTTP to be judged.
    pub fn has_http_rules(&self) -> bool {
        self.rules.iter().any(|r| {
            r.to.iter().any(|t| {
                let o = &t.operation;
                !(o.methods.is_empty()
                    && o.not_methods.is_empty()
                    && o.paths.is_empty()
                    && o.not_paths.is_empty()
                    && o.hosts.is_empty()
                    && o.not_hosts.is_empty())
            }) || r
                .when
                .iter()
                .any(|c| ConditionKey::parse(&c.key).is_ok_and(|k| k.is_http()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> AuthorizationPolicySpec {
        serde_yaml_ng::from_str(yaml).expect(yaml)
    }

    #[test]
    fn an_istio_policy_is_valid() {
        let s = spec(
            r#"
selector: {matchLabels: {app: web}}
action: ALLOW
rules:
- from:
  - source: {principals: ["cluster.local/ns/default/sa/client", "*/sa/admin"], notNamespaces: [kube-system]}
  - source: {ipBlocks: ["198.18.0.0/15"]}
  to:
  - operation: {ports: ["8080"], methods: [GET, POST], paths: ["/api/*", "/health"]}
  when:
  - key: request.headers[x-tenant]
    values: ["a*"]
  - key: source.ip
    notValues: ["198.18.9.0/24"]
"#,
        );
        s.validate().unwrap();
        assert!(s.has_http_rules());
        assert!(!spec("{rules: [{to: [{operation: {ports: ['80']}}]}]}").has_http_rules());
    }

    #[test]
    fn bad_values_name_their_field() {
        for (yaml, field) in [
            (
                "{rules: [{from: [{source: {}}]}]}",
                "spec.rules[0].from[0].source",
            ),
            (
                "{rules: [{to: [{operation: {}}]}]}",
                "spec.rules[0].to[0].operation",
            ),
            (
                "{rules: [{from: [{source: {principals: ['spiffe://cluster.local/ns/a/sa/b']}}]}]}",
                "spec.rules[0].from[0].source.principals[0]",
            ),
            (
                "{rules: [{from: [{source: {principals: ['cluster.local/*/sa/b']}}]}]}",
                "spec.rules[0].from[0].source.principals[0]",
            ),
            (
                "{rules: [{from: [{source: {principals: ['*a*']}}]}]}",
                "spec.rules[0].from[0].source.principals[0]",
            ),
            (
                "{rules: [{from: [{source: {ipBlocks: ['198.18.0.1/15']}}]}]}",
                "spec.rules[0].from[0].source.ipBlocks[0]",
            ),
            (
                "{rules: [{to: [{operation: {ports: ['http']}}]}]}",
                "spec.rules[0].to[0].operation.ports[0]",
            ),
            (
                "{rules: [{to: [{operation: {methods: ['get']}}]}]}",
                "spec.rules[0].to[0].operation.methods[0]",
            ),
            (
                "{rules: [{to: [{operation: {paths: ['api']}}]}]}",
                "spec.rules[0].to[0].operation.paths[0]",
            ),
            (
                "{rules: [{when: [{key: source.ip}]}]}",
                "spec.rules[0].when[0]",
            ),
            (
                "{rules: [{when: [{key: 'request.auth.claims[iss]', values: [a]}]}]}",
                "spec.rules[0].when[0].key",
            ),
            (
                "{selector: {matchLabels: {app: 'web*'}}}",
                "spec.selector.matchLabels.app",
            ),
        ] {
            let err = spec(yaml).validate().expect_err(yaml);
            assert_eq!(err.field, field, "{yaml}: {err}");
        }
        assert!(serde_yaml_ng::from_str::<AuthorizationPolicySpec>("{action: REJECT}").is_err());
        assert!(serde_yaml_ng::from_str::<AuthorizationPolicySpec>("{rule: []}").is_err());
    }

    #[test]
    fn patterns_and_blocks_match_as_istio_does() {
        assert!(Pattern::parse("/api/*").unwrap().matches("/api/x"));
        assert!(Pattern::parse("*.local").unwrap().matches("a.local"));
        assert!(Pattern::parse("*").unwrap().matches(""));
        assert!(!Pattern::parse("/a").unwrap().matches("/ab"));
        let b = Cidr::parse("198.18.0.0/15").unwrap();
        assert!(b.contains("198.19.255.1".parse().unwrap()));
        assert!(!b.contains("198.20.0.1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
        assert_eq!(Cidr::parse("10.0.0.1").unwrap().len, 32);
    }
}
