//! deploy/crds is what the Rust types give, the schemas are structural (as
//! the API server requires of a CRD), and the documents README shows pass
//! them. There is no API server on these machines: the schemas are checked
//! here with a JSON Schema validator, strictly (an unknown field fails, as
//! `kubectl apply --validate=strict` makes it).
use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use mesh_api::kinds::Kind;
use serde::Deserialize;
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace")
}

fn crd_dir() -> PathBuf {
    root().join("deploy/crds")
}

#[test]
fn deploy_crds_are_what_the_types_give() {
    let differences = mesh_crds::differences(&crd_dir()).expect("comparing deploy/crds");
    assert!(
        differences.is_empty(),
        "deploy/crds is out of date with the Rust types:\n{}\nrun `cargo xtask crds` and commit the result",
        differences.join("\n")
    );
}

/// The committed files, as the API server would read them.
fn committed() -> Vec<CustomResourceDefinition> {
    mesh_crds::crds()
        .iter()
        .map(|crd| {
            let path = crd_dir().join(mesh_crds::file_name(crd));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            serde_yaml_ng::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not a CRD: {e}", path.display()))
        })
        .collect()
}

#[test]
fn one_crd_per_kind_of_ours_with_its_scope() {
    let crds = committed();
    let ours: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| k.api_version() == mesh_api::names::API_VERSION)
        .collect();
    assert_eq!(crds.len(), ours.len());
    for (kind, crd) in ours.into_iter().zip(&crds) {
        let spec = &crd.spec;
        assert_eq!(spec.names.kind, kind.as_str());
        assert_eq!(
            format!("{}/{}", spec.group, spec.versions[0].name),
            kind.api_version()
        );
        let expected = if kind.is_cluster_scoped() {
            "Cluster"
        } else {
            "Namespaced"
        };
        assert_eq!(spec.scope, expected, "{kind}");
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{}.{}", spec.names.plural, spec.group).as_str())
        );
        // What `meshctl get` and the control server take, kubectl takes too.
        assert_eq!(Kind::from_loose(&spec.names.plural), Some(kind), "{kind}");
        assert_eq!(
            Kind::from_loose(spec.names.singular.as_deref().unwrap_or_default()),
            Some(kind)
        );
        assert_eq!(spec.versions.len(), 1);
        assert!(spec.versions[0].served && spec.versions[0].storage);
    }
}

fn schema_of(crd: &CustomResourceDefinition) -> Value {
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .unwrap_or_else(|| panic!("{:?} has no schema", crd.metadata.name));
    serde_json::to_value(schema).expect("a schema serializes")
}

/// The rules of a structural schema the API server enforces that a schema
/// generator can break: every node has a type (or says it holds anything),
/// no references, no `additionalProperties` beside `properties`, no null
/// among enum values, no `uniqueItems`.
fn structural_problems(path: &str, node: &Value, out: &mut Vec<String>) {
    let Value::Object(map) = node else { return };
    let anything = map.contains_key("x-kubernetes-preserve-unknown-fields")
        || map.contains_key("x-kubernetes-int-or-string");
    if !map.contains_key("type") && !anything {
        out.push(format!("{path}: no type"));
    }
    for forbidden in ["$ref", "$schema", "definitions", "$defs", "uniqueItems"] {
        if map.contains_key(forbidden) {
            out.push(format!("{path}: {forbidden}"));
        }
    }
    if map.contains_key("properties") && map.contains_key("additionalProperties") {
        out.push(format!("{path}: properties and additionalProperties"));
    }
    if let Some(Value::Array(values)) = map.get("enum")
        && values.iter().any(Value::is_null)
    {
        out.push(format!("{path}: null among enum values"));
    }
    if let Some(Value::Object(props)) = map.get("properties") {
        for (name, child) in props {
            structural_problems(&format!("{path}.{name}"), child, out);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = map.get(key) {
            structural_problems(&format!("{path}.{key}"), child, out);
        }
    }
}

#[test]
fn schemas_are_structural() {
    let mut problems = Vec::new();
    for crd in committed() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        structural_problems(&name, &schema_of(&crd), &mut problems);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The schema with every object closed to fields it does not name.
fn strict(node: &mut Value) {
    let Value::Object(map) = node else { return };
    if map.contains_key("properties") && !map.contains_key("additionalProperties") {
        map.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (_, child) in map.iter_mut() {
        strict(child);
    }
}

/// Every document of `kind` checked against its CRD; the errors, if any.
fn validate(crds: &[CustomResourceDefinition], document: &Value) -> Vec<String> {
    let kind = document["kind"].as_str().expect("a kind");
    let crd = crds
        .iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"));
    let mut schema = schema_of(crd);
    strict(&mut schema);
    // The API server adds and checks metadata itself.
    schema["properties"]["metadata"] = json!({"type": "object"});
    schema["properties"]["apiVersion"] = json!({"type": "string"});
    schema["properties"]["kind"] = json!({"type": "string"});
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("the schema of {kind} does not compile: {e}"));
    validator
        .iter_errors(document)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// The YAML documents of README's ```yaml blocks that are of our API group.
fn readme_documents() -> Vec<Value> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("reading README.md");
    let mut documents = Vec::new();
    let mut block: Option<String> = None;
    for line in readme.lines() {
        match (&mut block, line.trim_end()) {
            (None, "```yaml") => block = Some(String::new()),
            (Some(text), "```") => {
                for doc in serde_yaml_ng::Deserializer::from_str(text) {
                    let value = Value::deserialize(doc).expect("README's YAML parses");
                    if value["apiVersion"] == mesh_api::names::API_VERSION {
                        documents.push(value);
                    }
                }
                block = None;
            }
            (Some(text), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    documents
}

#[test]
fn readme_documents_pass_the_schemas() {
    let crds = committed();
    let documents = readme_documents();
    let kinds: std::collections::BTreeSet<&str> = documents
        .iter()
        .filter_map(|d| d["kind"].as_str())
        .collect();
    for kind in [
        "Service",
        "Workload",
        "TrafficPolicy",
        "AuthorizationPolicy",
        "MtlsPolicy",
    ] {
        assert!(
            kinds.contains(kind),
            "README shows no {kind} any more: {kinds:?}"
        );
    }
    for document in &documents {
        let errors = validate(&crds, document);
        assert!(
            errors.is_empty(),
            "README's {} {} fails its CRD:\n{}",
            document["kind"],
            document["metadata"]["name"],
            errors.join("\n")
        );
    }
}

#[test]
fn the_schemas_refuse_what_the_control_server_refuses() {
    let crds = committed();
    let workload = |spec: Value| json!({"apiVersion": "mesh.dev/v1alpha1", "kind": "Workload", "metadata": {"name": "a"}, "spec": spec});
    let good = workload(json!({"node": "node1", "ip": "198.19.1.10", "ports": [{"port": 80}]}));
    assert_eq!(validate(&crds, &good), Vec::<String>::new());
    for (spec, at) in [
        (json!({"ip": "198.19.1.10"}), ""),
        (json!({"node": "n", "ip": "198.19.1"}), "/ip"),
        (
            json!({"node": "n", "ip": "198.19.1.10", "ports": [{"port": 0}]}),
            "/ports/0/port",
        ),
        (
            json!({"node": "n", "ip": "198.19.1.10", "ports": [{"port": 70000}]}),
            "/ports/0/port",
        ),
        (
            json!({"node": "n", "ip": "198.19.1.10", "mtlsMode": "SOMETIMES"}),
            "/mtlsMode",
        ),
        (
            json!({"node": "n", "ip": "198.19.1.10", "serviceAcount": "x"}),
            "",
        ),
    ] {
        let errors = validate(&crds, &workload(spec.clone()));
        assert!(
            errors.iter().any(|e| e.starts_with(&format!("/spec{at}"))),
            "{spec}: expected an error at /spec{at}, got {errors:?}"
        );
    }
    let service = json!({"apiVersion": "mesh.dev/v1alpha1", "kind": "Service", "metadata": {"name": "s"},
        "spec": {"vips": [], "ports": [{"port": 80, "appProtocol": "smtp"}]}});
    let errors = validate(&crds, &service);
    assert!(
        errors.iter().any(|e| e.starts_with("/spec/vips")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("/spec/ports/0/appProtocol")),
        "{errors:?}"
    );
    let policy = json!({"apiVersion": "mesh.dev/v1alpha1", "kind": "TrafficPolicy", "metadata": {"name": "p"},
        "spec": {"targetRef": {"name": "echo"}, "retries": {"attempts": 2, "tries": 3}}});
    assert!(
        validate(&crds, &policy)
            .iter()
            .any(|e| e.starts_with("/spec/retries")),
        "an unknown field of a TrafficPolicy passes"
    );
}

/// The paths of every property a schema names (`ports[].port`).
fn schema_paths(prefix: &str, node: &Value, out: &mut std::collections::BTreeSet<String>) {
    if let Some(Value::Object(props)) = node.get("properties") {
        for (name, child) in props {
            let path = format!("{prefix}.{name}");
            out.insert(path.clone());
            schema_paths(&path, child, out);
        }
    }
    if let Some(items) = node.get("items") {
        schema_paths(&format!("{prefix}[]"), items, out);
    }
}

/// The paths a document sets, in the same form.
fn document_paths(prefix: &str, node: &Value, out: &mut std::collections::BTreeSet<String>) {
    match node {
        Value::Object(map) => {
            for (name, child) in map {
                let path = format!("{prefix}.{name}");
                out.insert(path.clone());
                document_paths(&path, child, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                document_paths(&format!("{prefix}[]"), item, out);
            }
        }
        _ => {}
    }
}

fn control_reads(document: &Value) -> Result<(), String> {
    let yaml = serde_yaml_ng::to_string(document).expect("a document renders as YAML");
    mesh_control::resources::parse_documents(&yaml)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The kinds whose schemas are written beside the control server's parser
/// (mesh_crds::kinds) agree with it: a document that sets every field of
/// the schema is read by both, and what one refuses the other refuses.
#[test]
fn the_control_server_reads_what_the_schemas_accept() {
    let crds = committed();
    let doc = |kind: &str, metadata: Value, spec: Value| json!({"apiVersion": "mesh.dev/v1alpha1", "kind": kind, "metadata": metadata, "spec": spec});
    let named = json!({"name": "a", "namespace": "shop", "labels": {"app": "a"}});
    let full = [
        doc(
            "Workload",
            named.clone(),
            json!({"serviceAccount": "web", "node": "node1", "ip": "198.19.1.10",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}],
                "ready": false, "mtlsMode": "PERMISSIVE"}),
        ),
        doc(
            "Service",
            named.clone(),
            json!({"vips": ["198.18.100.1", "198.18.100.2"],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http", "detectTimeout": "50ms"}],
                "selector": {"app": "a"}}),
        ),
        doc(
            "Node",
            json!({"name": "node1", "labels": {"zone": "a"}}),
            json!({"address": "198.18.0.11", "tunnelPort": 15008}),
        ),
        doc("MtlsPolicy", named.clone(), json!({"mode": "DISABLE"})),
    ];
    for document in full.iter().chain(&readme_documents()) {
        let kind = document["kind"].as_str().expect("a kind");
        assert_eq!(
            validate(&crds, document),
            Vec::<String>::new(),
            "{document}"
        );
        control_reads(document)
            .unwrap_or_else(|e| panic!("{kind}: mesh-control refuses {document}: {e}"));
    }
    // Every field the schema names is among those read above.
    for document in &full {
        let kind = document["kind"].as_str().expect("a kind");
        let crd = crds
            .iter()
            .find(|c| c.spec.names.kind == kind)
            .expect("its CRD");
        let mut named = std::collections::BTreeSet::new();
        schema_paths("", &schema_of(crd)["properties"]["spec"], &mut named);
        let mut set = std::collections::BTreeSet::new();
        document_paths("", &document["spec"], &mut set);
        let untried: Vec<&String> = named.difference(&set).collect();
        assert!(
            untried.is_empty(),
            "{kind}: no document here sets {untried:?}"
        );
    }

    let workload = |spec: Value| doc("Workload", named.clone(), spec);
    let service = |spec: Value| doc("Service", named.clone(), spec);
    for bad in [
        workload(json!({"ip": "198.19.1.10"})),
        workload(json!({"node": "n", "ip": "198.19.1"})),
        workload(json!({"node": "n", "ip": "198.19.1.10", "ports": [{"port": 0}]})),
        workload(json!({"node": "n", "ip": "198.19.1.10", "ports": [{"port": 70000}]})),
        workload(
            json!({"node": "n", "ip": "198.19.1.10", "ports": [{"port": 1, "protocol": "SCTP"}]}),
        ),
        workload(json!({"node": "n", "ip": "198.19.1.10", "mtlsMode": "SOMETIMES"})),
        workload(json!({"node": "n", "ip": "198.19.1.10", "ready": "yes"})),
        workload(json!({"node": "n", "ip": "198.19.1.10", "serviceAcount": "x"})),
        service(json!({"vips": [], "ports": [{"port": 80}]})),
        service(json!({"vips": ["198.18.100.1"]})),
        service(json!({"vips": ["198.18.100.1"], "ports": [{"port": 80, "appProtocol": "smtp"}]})),
        service(json!({"vips": ["198.18.100.1"], "ports": [{"port": 80, "targetPort": 0}]})),
        doc("Node", json!({"name": "n"}), json!({"address": "198.18.0"})),
        doc(
            "Node",
            json!({"name": "n"}),
            json!({"address": "198.18.0.11", "tunnelPort": 0}),
        ),
        doc("MtlsPolicy", named.clone(), json!({})),
        doc("MtlsPolicy", named.clone(), json!({"mode": "SOMETIMES"})),
    ] {
        assert!(!validate(&crds, &bad).is_empty(), "the schema takes {bad}");
        assert!(control_reads(&bad).is_err(), "mesh-control takes {bad}");
    }
}
