//! A vocabulary: one string per token id, for labels of token rows.
//! Read from a text file (line i is the string of id i, taken as it is) or a
//! `.json` file (a list of strings, or a `{token: id}` object as Hugging
//! Face's `vocab.json`).

use crate::error::user;
use crate::{bail_user, Result};
use std::path::Path;

pub struct Vocab {
    pub tokens: Vec<String>,
}

/// Tokens of context before and after the active one in a label.
pub const LABEL_BEFORE: usize = 8;
pub const LABEL_AFTER: usize = 3;

impl Vocab {
    pub fn read(path: &Path) -> Result<Vocab> {
        let origin = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| user(format!("--vocab: {origin}: cannot read: {e}")))?;
        let tokens = if path.extension().is_some_and(|e| e == "json") {
            from_json(&text).map_err(|e| user(format!("--vocab: {origin}: {e}")))?
        } else {
            let t = text.strip_suffix('\n').unwrap_or(&text);
            t.split('\n')
                .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
                .collect()
        };
        if tokens.is_empty() {
            bail_user!("--vocab: {origin}: empty");
        }
        Ok(Vocab { tokens })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The string of `id`, on one line (newlines and tabs made visible).
    pub fn show(&self, id: i64) -> String {
        let s = self
            .tokens
            .get(id as usize)
            .map(String::as_str)
            .unwrap_or("<?>");
        s.replace('\n', "↵").replace('\t', "→").replace('\r', "")
    }

    /// The label of position `p` of `ids`: a few tokens of context with the
    /// active token between ⟦ and ⟧ (the form `sae latents --labels` marks).
    pub fn label(&self, ids: &[i64], p: usize) -> String {
        let lo = p.saturating_sub(LABEL_BEFORE);
        let hi = (p + 1 + LABEL_AFTER).min(ids.len());
        let mut s = String::new();
        for &i in &ids[lo..p] {
            s.push_str(&self.show(i));
        }
        s.push('⟦');
        s.push_str(&self.show(ids[p]));
        s.push('⟧');
        for &i in &ids[p + 1..hi] {
            s.push_str(&self.show(i));
        }
        s
    }
}

fn from_json(text: &str) -> std::result::Result<Vec<String>, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    match v {
        serde_json::Value::Array(a) => a
            .into_iter()
            .enumerate()
            .map(|(i, t)| match t {
                serde_json::Value::String(s) => Ok(s),
                other => Err(format!("entry {i} is {other}, not a string")),
            })
            .collect(),
        serde_json::Value::Object(o) => {
            let mut out = vec![None; o.len()];
            for (tok, id) in o {
                let i = id
                    .as_u64()
                    .filter(|&i| (i as usize) < out.len())
                    .ok_or_else(|| format!("\"{tok}\": id {id} is not in 0..{}", out.len()))?;
                out[i as usize] = Some(tok);
            }
            out.into_iter()
                .enumerate()
                .map(|(i, t)| t.ok_or_else(|| format!("no token has id {i}")))
                .collect()
        }
        _ => Err("expected a list of strings or a {token: id} object".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_mark_the_active_token_in_context() {
        let v = Vocab {
            tokens: ["<bos>", " the", " cat", "\n", " sat"]
                .map(String::from)
                .to_vec(),
        };
        assert_eq!(v.label(&[0, 1, 2, 3, 4], 2), "<bos> the⟦ cat⟧↵ sat");
        assert_eq!(v.label(&[1, 2], 0), "⟦ the⟧ cat");
        let json = from_json(r#"{"b": 1, "a": 0}"#).unwrap();
        assert_eq!(json, ["a", "b"]);
        assert!(from_json(r#"{"a": 3}"#).is_err());
    }
}
