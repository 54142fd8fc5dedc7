//! Label selectors (`matchLabels` and `matchExpressions`), validated and compiled.

use super::bitset::Bitset;
use super::error::InvalidReason;
use ahash::AHashMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::BTreeMap;

pub(crate) type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A compiled label selector: the AND of its requirements (`matchLabels` entries become `In` with
/// one value). No requirement selects everything.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub(crate) struct Selector {
    reqs: Vec<Requirement>,
}

impl Selector {
    /// Validates and compiles `sel`; errors carry the field path below `path`.
    pub(crate) fn compile(
        sel: &LabelSelector,
        path: &str,
    ) -> Result<Self, (String, InvalidReason)> {
        let mut reqs = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            let field = format!("{path}.matchLabels[{k:?}]");
            check_key(k).map_err(|r| (field.clone(), r))?;
            check_value(v).map_err(|r| (field.clone(), r))?;
            reqs.push(Requirement {
                key: k.clone(),
                op: Op::In(vec![v.clone()]),
            });
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let field = format!("{path}.matchExpressions[{i}]");
            check_key(&e.key).map_err(|r| (format!("{field}.key"), r))?;
            let values = e.values.clone().unwrap_or_default();
            let op = match e.operator.as_str() {
                "In" | "NotIn" => {
                    if values.is_empty() {
                        return Err((format!("{field}.values"), InvalidReason::ValuesRequired));
                    }
                    for (j, v) in values.iter().enumerate() {
                        check_value(v).map_err(|r| (format!("{field}.values[{j}]"), r))?;
                    }
                    if e.operator == "In" {
                        Op::In(values)
                    } else {
                        Op::NotIn(values)
                    }
                }
                "Exists" | "DoesNotExist" => {
                    if !values.is_empty() {
                        return Err((format!("{field}.values"), InvalidReason::ValuesForbidden));
                    }
                    if e.operator == "Exists" {
                        Op::Exists
                    } else {
                        Op::DoesNotExist
                    }
                }
                other => {
                    return Err((
                        format!("{field}.operator"),
                        InvalidReason::BadOperator(other.to_owned()),
                    ));
                }
            };
            reqs.push(Requirement {
                key: e.key.clone(),
                op,
            });
        }
        Ok(Self { reqs })
    }

    /// Whether the selector selects everything (`{}`).
    pub(crate) fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// What a label change must touch to possibly change this selector's result: `(key,
    /// Some(value))` for each value an `In`/`NotIn` requirement lists (the result can change only
    /// when a pod's value for `key` becomes or stops being `value`), `(key, None)` for
    /// `Exists`/`DoesNotExist` (only when the key appears or disappears).
    pub(crate) fn triggers(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.reqs.iter().flat_map(|r| {
            let vals: Vec<Option<&str>> = match &r.op {
                Op::In(v) | Op::NotIn(v) => v.iter().map(|s| Some(s.as_str())).collect(),
                Op::Exists | Op::DoesNotExist => vec![None],
            };
            vals.into_iter().map(move |v| (r.key.as_str(), v))
        })
    }

    pub(crate) fn matches(&self, labels: &Labels) -> bool {
        self.reqs.iter().all(|r| {
            let v = labels.get(&r.key);
            match &r.op {
                Op::In(vals) => v.is_some_and(|v| vals.contains(v)),
                Op::NotIn(vals) => v.is_none_or(|v| !vals.contains(v)),
                Op::Exists => v.is_some(),
                Op::DoesNotExist => v.is_none(),
            }
        })
    }

    /// The members of `universe` whose labels match, using the inverted index.
    pub(crate) fn eval(&self, index: &LabelIndex, universe: &Bitset) -> Bitset {
        let mut out = universe.clone();
        let empty = Bitset::default();
        for r in &self.reqs {
            let entry = index.keys.get(&r.key);
            let values_union = |vals: &Vec<String>| {
                let mut u = Bitset::default();
                if let Some((_, by_value)) = entry {
                    for v in vals {
                        if let Some(b) = by_value.get(v) {
                            u.union_with(b);
                        }
                    }
                }
                u
            };
            match &r.op {
                Op::In(vals) => out.intersect_with(&values_union(vals)),
                Op::NotIn(vals) => out.subtract(&values_union(vals)),
                Op::Exists => out.intersect_with(entry.map_or(&empty, |e| &e.0)),
                Op::DoesNotExist => out.subtract(entry.map_or(&empty, |e| &e.0)),
            }
        }
        out
    }
}

/// Inverted index from labels to the pod slots carrying them.
#[derive(Clone, Debug, Default)]
pub(crate) struct LabelIndex {
    /// key -> (slots having the key, value -> slots having key=value)
    keys: AHashMap<String, (Bitset, AHashMap<String, Bitset>)>,
}

impl LabelIndex {
    pub(crate) fn insert(&mut self, slot: u32, labels: &Labels) {
        for (k, v) in labels {
            let e = self.keys.entry(k.clone()).or_default();
            e.0.set(slot, true);
            e.1.entry(v.clone()).or_default().set(slot, true);
        }
    }

    pub(crate) fn remove(&mut self, slot: u32, labels: &Labels) {
        for (k, v) in labels {
            if let Some(e) = self.keys.get_mut(k) {
                e.0.set(slot, false);
                if let Some(b) = e.1.get_mut(v) {
                    b.set(slot, false);
                }
            }
        }
    }
}

fn is_alnum(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

/// A label name part: at most 63 characters, alphanumeric at both ends, `-_.` inside.
fn check_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(is_alnum)
        && s.ends_with(is_alnum)
        && s.chars().all(|c| is_alnum(c) || "-_.".contains(c))
}

fn check_key(k: &str) -> Result<(), InvalidReason> {
    let ok = match k.split_once('/') {
        Some((prefix, name)) => {
            !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                        && l.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                        && l.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                })
                && check_name(name)
        }
        None => check_name(k),
    };
    if ok {
        Ok(())
    } else {
        Err(InvalidReason::BadLabel(k.to_owned()))
    }
}

fn check_value(v: &str) -> Result<(), InvalidReason> {
    if v.is_empty() || check_name(v) {
        Ok(())
    } else {
        Err(InvalidReason::BadLabel(v.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|s| s.to_string()).collect())
            },
        }
    }

    #[test]
    fn operators_match_and_index_agree() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                expr("tier", "NotIn", &["db"]),
                expr("env", "Exists", &[]),
                expr("legacy", "DoesNotExist", &[]),
                expr("zone", "In", &["a", "b"]),
            ]),
        };
        let s = Selector::compile(&sel, "spec.podSelector").unwrap();
        let pods = [
            labels(&[("app", "web"), ("env", "p"), ("zone", "a")]),
            labels(&[("app", "web"), ("env", "p"), ("zone", "a"), ("tier", "db")]),
            labels(&[("app", "web"), ("env", "p"), ("zone", "c")]),
            labels(&[("app", "web"), ("zone", "b")]),
            labels(&[("app", "web"), ("env", "p"), ("zone", "b"), ("legacy", "")]),
            labels(&[("app", "web"), ("env", "p"), ("zone", "b"), ("tier", "fe")]),
        ];
        let want = [true, false, false, false, false, true];
        let mut idx = LabelIndex::default();
        for (i, l) in pods.iter().enumerate() {
            idx.insert(i as u32, l);
            assert_eq!(s.matches(l), want[i], "pod {i}");
        }
        let got = s.eval(&idx, &Bitset::full(pods.len()));
        assert_eq!(got.iter().collect::<Vec<_>>(), vec![0, 5]);
    }

    #[test]
    fn rejects_bad_operator_and_values() {
        let bad = |e| LabelSelector {
            match_expressions: Some(vec![e]),
            ..Default::default()
        };
        let err = Selector::compile(&bad(expr("a", "Equals", &["x"])), "p").unwrap_err();
        assert_eq!(err.0, "p.matchExpressions[0].operator");
        assert!(matches!(err.1, InvalidReason::BadOperator(_)));
        let err = Selector::compile(&bad(expr("a", "In", &[])), "p").unwrap_err();
        assert_eq!(err.1, InvalidReason::ValuesRequired);
        let err = Selector::compile(&bad(expr("a", "Exists", &["x"])), "p").unwrap_err();
        assert_eq!(err.1, InvalidReason::ValuesForbidden);
        let err = Selector::compile(&bad(expr("-a", "Exists", &[])), "p").unwrap_err();
        assert!(matches!(err.1, InvalidReason::BadLabel(_)));
        assert!(Selector::compile(&bad(expr("example.com/a", "Exists", &[])), "p").is_ok());
        assert!(
            Selector::compile(&LabelSelector::default(), "p")
                .unwrap()
                .is_empty()
        );
    }
}
