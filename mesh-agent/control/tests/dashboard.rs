//! The Grafana dashboard (`deploy/grafana/mesh-dashboard.json`) and the
//! README's Metrics table against the metrics the programs register, so
//! neither can drift: every metric a PromQL expression names is documented
//! and exported under that exact name (a counter's `_total`, a histogram's
//! `_bucket`, `_sum` and `_count`), and the table lists every metric the
//! control server and the agent register.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use prometheus_client::registry::Registry;
use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The README's Metrics table: each metric name, and whether its row says
/// it is a histogram.
fn documented() -> BTreeMap<String, bool> {
    let readme = read(&workspace().join("README.md"));
    let section = readme
        .split("\n## Metrics\n")
        .nth(1)
        .expect("README.md has a Metrics section");
    let section = section.split("\n## ").next().expect("split yields one");
    let mut metrics = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        // "| metric | labels | meaning |"
        let cells: Vec<&str> = row.split('|').collect();
        assert!(cells.len() >= 5, "README: a short row: {row}");
        let histogram = cells[cells.len() - 2].trim().starts_with("histogram");
        for name in cells[1].split('`').skip(1).step_by(2) {
            let name = name.trim();
            assert!(name.starts_with("mesh_"), "README: {name} lacks the prefix");
            let again = metrics.insert(name.to_owned(), histogram);
            assert!(again.is_none(), "README lists {name} twice");
        }
    }
    assert!(
        !metrics.is_empty(),
        "no rows found in README's Metrics table"
    );
    metrics
}

/// The sample names a documented metric is scraped as.
fn samples(documented: &BTreeMap<String, bool>) -> BTreeSet<String> {
    let mut samples = BTreeSet::new();
    for (name, histogram) in documented {
        if *histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                samples.insert(format!("{name}{suffix}"));
            }
        } else {
            samples.insert(name.clone());
        }
    }
    samples
}

/// What the control server exports: each metric's name as README writes it
/// (a counter with its `_total`), and whether it is a histogram.
fn control_registered() -> BTreeMap<String, bool> {
    let metrics = mesh_control::Metrics::default();
    // A family is exported once it has a series.
    let reason = mesh_control::ReasonLabels { reason: "any" };
    metrics.sign_refused.get_or_create(&reason).inc();
    metrics.apply_rejected.get_or_create(&reason).inc();
    metrics
        .certificates_issued
        .get_or_create(&mesh_control::KindLabels { kind: "any" })
        .inc();
    metrics
        .tls_handshakes
        .get_or_create(&mesh_control::ResultLabels { result: "any" })
        .inc();
    metrics
        .ca_live_certificates
        .get_or_create(&mesh_control::SlotLabels { slot: "current" })
        .set(1);
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').expect("# TYPE name type");
            match kind {
                "counter" => (format!("{name}_total"), false),
                "histogram" => (name.to_owned(), true),
                _ => (name.to_owned(), false),
            }
        })
        .collect()
}

/// Names the agent registers under `mesh_agent_` (the literals passed to
/// `register` in modules that open that prefix), without a counter's
/// `_total`: the agent's crate is not a dependency of this one.
fn agent_registered() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut dirs = vec![workspace().join("mesh-agent/agent/src")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let source = read(&path);
            if !source.contains("sub_registry_with_prefix(\"mesh_agent\")") {
                continue;
            }
            for call in source.split(".register(").skip(1) {
                let call = call.trim_start();
                if let Some(literal) = call.strip_prefix('"') {
                    let name = literal.split('"').next().expect("split yields one");
                    names.insert(format!("mesh_agent_{name}"));
                }
            }
        }
    }
    assert!(!names.is_empty(), "found no agent metrics to compare");
    names
}

#[test]
fn the_readme_lists_every_metric_the_control_server_registers_and_no_other() {
    let documented: BTreeMap<String, bool> = documented()
        .into_iter()
        .filter(|(name, _)| name.starts_with("mesh_control_"))
        .collect();
    let registered = control_registered();
    assert_same(
        &documented.keys().collect(),
        &registered.keys().collect(),
        "mesh-control",
    );
    assert_eq!(documented, registered, "README: which are histograms");
}

fn assert_same<T: Ord + std::fmt::Debug>(
    documented: &BTreeSet<T>,
    registered: &BTreeSet<T>,
    program: &str,
) {
    let missing: Vec<&T> = registered.difference(documented).collect();
    let extra: Vec<&T> = documented.difference(registered).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "README.md's Metrics table and {program} disagree: registered but not documented {missing:?}, documented but not registered {extra:?}"
    );
}

#[test]
fn the_readme_lists_every_metric_the_agent_registers_and_no_other() {
    let documented: BTreeSet<String> = documented()
        .into_keys()
        .filter(|name| name.starts_with("mesh_agent_"))
        .map(|name| {
            name.strip_suffix("_total")
                .map_or(name.clone(), str::to_owned)
        })
        .collect();
    assert_same(&documented, &agent_registered(), "mesh-agent");
}

/// `text` without its quoted strings (label values, regexes).
fn unquoted(text: &str) -> String {
    text.split('"').step_by(2).collect::<Vec<_>>().join(" ")
}

/// Metric names a PromQL expression uses: identifiers with our prefix.
fn metric_names(expr: &str) -> Vec<String> {
    unquoted(expr)
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| token.starts_with("mesh_"))
        .map(str::to_owned)
        .collect()
}

/// Every PromQL expression of the dashboard: panel targets (rows may nest
/// panels) and template variable queries, each with where it is.
fn expressions(dashboard: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            assert_eq!(
                panel["datasource"]["uid"]
                    .as_str()
                    .unwrap_or("${DS_PROMETHEUS}"),
                "${DS_PROMETHEUS}",
                "panel {title:?}"
            );
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
                assert_eq!(
                    target["datasource"]["uid"].as_str(),
                    Some("${DS_PROMETHEUS}"),
                    "panel {title:?}"
                );
                out.push((format!("panel {title:?}"), expr.to_owned()));
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
    {
        if variable["type"] == "query" {
            let name = variable["name"].as_str().unwrap_or("?");
            let query = variable["query"]["query"]
                .as_str()
                .or_else(|| variable["query"].as_str())
                .unwrap_or_else(|| panic!("variable {name}: no query"));
            out.push((format!("variable {name}"), query.to_owned()));
        }
    }
    out
}

#[test]
fn the_dashboard_uses_only_documented_metrics_by_their_exported_names() {
    let path = workspace().join("deploy/grafana/mesh-dashboard.json");
    let dashboard: Value =
        serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let datasource = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .find(|v| v["name"] == "DS_PROMETHEUS")
        .expect("a DS_PROMETHEUS variable");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");

    let known = samples(&documented());
    let expressions = expressions(&dashboard);
    assert!(expressions.len() > 20, "{} expressions", expressions.len());
    let mut used = BTreeSet::new();
    for (place, expr) in &expressions {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{place}: {expr} names no mesh metric");
        for name in names {
            assert!(
                known.contains(&name),
                "{place}: {name} is not a documented metric's sample name (in {expr})"
            );
            used.insert(name);
        }
    }
    for name in [
        "mesh_agent_http_request_duration_seconds_bucket",
        "mesh_control_push_latency_seconds_bucket",
        "mesh_control_apply_rejected_total",
        "mesh_control_connected_agents",
        "mesh_agent_redirect_decisions_total",
    ] {
        assert!(used.contains(name), "the dashboard does not show {name}");
    }

    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let id = panel["id"].as_u64().expect("a numeric panel id");
        assert!(ids.insert(id), "panel id {id} is used twice");
    }
}

#[test]
fn metric_names_are_found_outside_quotes_with_their_suffixes() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(mesh_agent_http_request_duration_seconds_bucket{route=~"mesh_x"}[$__rate_interval])))"#
        ),
        ["mesh_agent_http_request_duration_seconds_bucket"]
    );
    let known = samples(&BTreeMap::from([
        ("mesh_control_push_latency_seconds".to_owned(), true),
        ("mesh_control_acks_total".to_owned(), false),
    ]));
    assert!(known.contains("mesh_control_push_latency_seconds_count"));
    assert!(!known.contains("mesh_control_push_latency_seconds"));
    assert!(!known.contains("mesh_control_acks_count"));
}
