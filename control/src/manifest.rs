//! Reading Kubernetes manifests for `sluicectl apply`: multi-document YAML (`---`), JSON (one or
//! more values, arrays, or a `List`), from files, directories (`*.yaml`, `*.yml`, `*.json`, sorted)
//! or stdin. Objects are parsed with the k8s-openapi types (YAML through serde-saphyr), so a
//! manifest written for a real cluster reads the same. Every error names the source, the document
//! (1-based, with the line it starts on) and the field.

use std::path::Path;

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::model::{K8sObject, kind_name};

/// One object read from a manifest.
#[derive(Debug, Clone)]
pub struct Document {
    /// The file name, or "-" for stdin.
    pub file: String,
    /// 1-based position of the document in its source.
    pub index: usize,
    /// Line the document starts on (1-based).
    pub line: usize,
    pub object: K8sObject,
}

/// What is wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: document {index} (line {line}){what}: {message}")]
pub struct ManifestError {
    pub file: String,
    pub index: usize,
    pub line: usize,
    /// " (Service default/web)" when known.
    pub what: String,
    pub message: String,
}

#[derive(Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

fn what(o: &K8sObject) -> String {
    let m = o.metadata();
    match (&m.namespace, &m.name) {
        (Some(ns), Some(n)) => format!(" ({} {ns}/{n})", kind_name(o.kind())),
        (None, Some(n)) => format!(" ({} {n})", kind_name(o.kind())),
        _ => format!(" ({})", kind_name(o.kind())),
    }
}

/// Parse the text of one source.
pub fn parse_text(source: &str, text: &str) -> Result<Vec<Document>, ManifestError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        parse_json(source, text)
    } else {
        parse_yaml(source, text)
    }
}

fn parse_json(source: &str, text: &str) -> Result<Vec<Document>, ManifestError> {
    let mut docs = Vec::new();
    let err = |index: usize, what: String, message: String| ManifestError {
        file: source.into(),
        index,
        line: 1,
        what,
        message,
    };
    let mut values = Vec::new();
    for v in serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>() {
        let v = v.map_err(|e| err(values.len() + 1, String::new(), e.to_string()))?;
        match v {
            serde_json::Value::Array(items) => values.extend(items),
            v if v.get("kind").and_then(|k| k.as_str()) == Some("List") => {
                if let Some(serde_json::Value::Array(items)) = v.get("items") {
                    values.extend(items.iter().cloned());
                }
            }
            v => values.push(v),
        }
    }
    for (i, v) in values.into_iter().enumerate() {
        let label = match (
            v.get("kind").and_then(|k| k.as_str()),
            v.pointer("/metadata/name").and_then(|k| k.as_str()),
        ) {
            (Some(k), Some(n)) => format!(" ({k} {n})"),
            _ => String::new(),
        };
        let object = K8sObject::from_value(v).map_err(|e| err(i + 1, label, e.to_string()))?;
        docs.push(Document {
            file: source.into(),
            index: i + 1,
            line: 1,
            object,
        });
    }
    Ok(docs)
}

/// Split YAML text at `---` lines: (1-based start line, text) per document.
fn split_yaml(text: &str) -> Vec<(usize, String)> {
    let mut docs = vec![(1usize, String::new())];
    for (i, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") || line.starts_with("---\t") {
            docs.push((i + 2, String::new()));
            continue;
        }
        if line == "..." {
            continue;
        }
        if let Some((_, d)) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    docs
}

fn is_blank_yaml(doc: &str) -> bool {
    doc.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#')
    })
}

fn parse_yaml(source: &str, text: &str) -> Result<Vec<Document>, ManifestError> {
    let mut docs = Vec::new();
    let mut index = 0;
    for (line, doc) in split_yaml(text) {
        if is_blank_yaml(&doc) {
            continue;
        }
        index += 1;
        let err = |what: String, message: String| ManifestError {
            file: source.into(),
            index,
            line,
            what,
            message,
        };
        let meta: TypeMeta =
            serde_saphyr::from_str(&doc).map_err(|e| err(String::new(), e.to_string()))?;
        let kind = meta
            .kind
            .ok_or_else(|| err(String::new(), "kind: missing".into()))?;
        let api_version = meta
            .api_version
            .ok_or_else(|| err(String::new(), "apiVersion: missing".into()))?;
        // Check kind and apiVersion with the same rules as JSON, then parse typed from the text so
        // errors carry the YAML position.
        let probe = serde_json::json!({"kind": kind, "apiVersion": api_version, "metadata": {}});
        if let Err(e) = K8sObject::from_value(probe)
            && (e.field == "kind" || e.field == "apiVersion")
        {
            return Err(err(String::new(), e.to_string()));
        }
        fn typed<T: serde::de::DeserializeOwned>(doc: &str) -> Result<T, String> {
            serde_saphyr::from_str(doc).map_err(|e| e.to_string())
        }
        let label = format!(" ({kind})");
        let object = match kind.as_str() {
            "Namespace" => typed(&doc).map(K8sObject::Namespace),
            "Pod" => typed(&doc).map(|p| K8sObject::Pod(Box::new(p))),
            "Service" => typed(&doc).map(K8sObject::Service),
            "EndpointSlice" => typed(&doc).map(K8sObject::EndpointSlice),
            _ => typed(&doc).map(K8sObject::NetworkPolicy),
        }
        .map_err(|m| err(label, m))?;
        docs.push(Document {
            file: source.into(),
            index,
            line,
            object,
        });
    }
    Ok(docs)
}

/// Read a file, or every manifest in a directory (sorted, not recursive), or stdin for "-".
pub fn read_path(path: &str) -> Result<Vec<Document>, ManifestError> {
    let io_err = |p: &str, e: std::io::Error| ManifestError {
        file: p.into(),
        index: 0,
        line: 0,
        what: String::new(),
        message: format!("cannot read: {e}"),
    };
    if path == "-" {
        let text = std::io::read_to_string(std::io::stdin()).map_err(|e| io_err("-", e))?;
        return parse_text("-", &text);
    }
    let p = Path::new(path);
    if p.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(p)
            .map_err(|e| io_err(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| {
                f.extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| matches!(x, "yaml" | "yml" | "json"))
            })
            .collect();
        files.sort();
        let mut docs = Vec::new();
        for f in files {
            let name = f.display().to_string();
            let text = std::fs::read_to_string(&f).map_err(|e| io_err(&name, e))?;
            docs.extend(parse_text(&name, &text)?);
        }
        return Ok(docs);
    }
    let text = std::fs::read_to_string(p).map_err(|e| io_err(path, e))?;
    parse_text(path, &text)
}

/// Validate every document (filling defaults); the first error wins.
pub fn validate_all(
    docs: &mut [Document],
    service_cidr: Ipv4Net,
    node_ports: (u16, u16),
) -> Result<(), ManifestError> {
    let mut seen = std::collections::BTreeMap::new();
    for d in docs.iter_mut() {
        d.object
            .validate(service_cidr, node_ports)
            .map_err(|e| ManifestError {
                file: d.file.clone(),
                index: d.index,
                line: d.line,
                what: what(&d.object),
                message: e.to_string(),
            })?;
        let p = d.object.to_proto();
        let key = (p.kind, p.namespace, p.name);
        if let Some((src, idx)) = seen.insert(key, (d.file.clone(), d.index)) {
            return Err(ManifestError {
                file: d.file.clone(),
                index: d.index,
                line: d.line,
                what: what(&d.object),
                message: format!("the same object is also document {idx} of {src}"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MULTI: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
# the web service
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Ingress]
";

    #[test]
    fn yaml_multi_document() {
        let docs = parse_text("m.yaml", MULTI).unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[1].line, 6);
        let K8sObject::Service(s) = &docs[1].object else {
            panic!("not a service")
        };
        assert_eq!(s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port, 80);
        assert!(matches!(docs[2].object, K8sObject::NetworkPolicy(_)));
    }

    #[test]
    fn yaml_errors_name_document_and_field() {
        let bad = MULTI.replace("port: 80", "port: 80000");
        let mut docs = parse_text("m.yaml", &bad).unwrap();
        let e =
            validate_all(&mut docs, "10.96.0.0/12".parse().unwrap(), (30000, 32767)).unwrap_err();
        assert_eq!(e.index, 2);
        assert!(e.message.contains("spec.ports[0].port"), "{e}");
        assert!(
            e.to_string()
                .starts_with("m.yaml: document 2 (line 6) (Service shop/web)"),
            "{e}"
        );
        let typo = MULTI.replace("port: 80", "port: eighty");
        let e = parse_text("m.yaml", &typo).unwrap_err();
        assert_eq!(e.index, 2);
        let unknown = MULTI.replace("kind: Namespace", "kind: Deployment");
        let e = parse_text("m.yaml", &unknown).unwrap_err();
        assert!(e.message.contains("Deployment"), "{e}");
    }

    #[test]
    fn truncated_or_garbled_input_never_panics() {
        let json = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"w"},"spec":{"ports":[{"port":80}]}}"#;
        for text in [MULTI, json] {
            for cut in 0..text.len() {
                if let Ok(mut docs) = parse_text("t", &text[..cut]) {
                    let _ =
                        validate_all(&mut docs, "10.96.0.0/12".parse().unwrap(), (30000, 32767));
                }
                let mut garbled = text.as_bytes().to_vec();
                garbled[cut] = b"{}[]:-\"\n #"[cut % 10];
                if let Ok(t) = std::str::from_utf8(&garbled)
                    && let Ok(mut docs) = parse_text("t", t)
                {
                    let _ =
                        validate_all(&mut docs, "10.96.0.0/12".parse().unwrap(), (30000, 32767));
                }
            }
        }
        assert!(parse_text("t", "").unwrap().is_empty());
    }

    #[test]
    fn json_list_and_stream() {
        let text = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"a"}}]}
{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"b"}}"#;
        let docs = parse_text("x.json", text).unwrap();
        assert_eq!(docs.len(), 2);
    }
}
