//! `calm txn`: a transaction written in a small text syntax, read from a file or stdin.
//!
//! ```text
//! # Move 10 from {acct}:a to {acct}:b if a holds at least 10.
//! compare:
//!   counter {acct}:a 10..        # counter in [10, +inf)
//!   exists {acct}:b
//! success:
//!   add {acct}:a -10
//!   add {acct}:b 10
//! failure:
//!   put {acct}:log "transfer refused"
//! ```
//!
//! One clause per line; `#` starts a comment outside quotes. Sections may be left out, in
//! this order. Words are separated by blanks; a word with blanks or `#` is quoted with
//! `"..."`, in which `\"`, `\\`, `\n` and `\t` are escapes. With `--hex`, keys, values and
//! elements are hex.
//!
//! Comparisons: `exists K`, `missing K`, `type K register|counter|bounded_counter|max|set`,
//! `version K OP N`, `value K OP V` (`OP` is `=`, `!=`, `<` or `>`), `counter K MIN..MAX`
//! (either bound may be left out). Ops: `put K V [lease=ID]` (attach K to a lease, hex id),
//! `del K`, `add K N`, `set K N`,
//! `bounds K MIN MAX`, `max K N` (raise), `setmax K N`, `sadd K E`, `srem K E`.

use super::{CliError, Encoding, Exit, Output, channel, json_bytes, print_json};
use crate::api::pb;
use crate::api::pb::kv_client::KvClient;
use serde_json::json;
use std::io::Write;

/// Lines a transaction text may have; more is refused before parsing.
const TXN_LINES_MAX: usize = 1 + 3 * 130;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Section {
    Compare,
    Success,
    Failure,
}

/// Parse a transaction text into the request (without its token).
pub fn parse(text: &str, enc: Encoding) -> Result<pb::TxnRequest, CliError> {
    let lines = text.lines().count();
    if lines > TXN_LINES_MAX {
        return Err(CliError::usage(format!(
            "the transaction has {lines} lines; at most {TXN_LINES_MAX}"
        )));
    }
    let mut req = pb::TxnRequest::default();
    let mut section = None;
    for (n, line) in text.lines().enumerate() {
        let at = |m: String| CliError::usage(format!("line {}: {m}", n + 1));
        let words = words(line).map_err(at)?;
        let Some(first) = words.first() else {
            continue;
        };
        let next = match first.as_str() {
            "compare:" => Some(Section::Compare),
            "success:" | "then:" => Some(Section::Success),
            "failure:" | "else:" => Some(Section::Failure),
            _ => None,
        };
        if let Some(next) = next {
            if words.len() > 1 {
                return Err(at(format!("'{first}' stands alone on its line")));
            }
            if section.is_some_and(|s| s >= next) {
                return Err(at(
                    "sections come once each, in the order compare:, success:, failure:".into(),
                ));
            }
            section = Some(next);
            continue;
        }
        match section {
            None => {
                return Err(at(
                    "a clause before any section; start with compare:, success: or failure:".into(),
                ));
            }
            Some(Section::Compare) => req.compare.push(compare(&words, enc).map_err(at)?),
            Some(Section::Success) => req.success.push(op(&words, enc).map_err(at)?),
            Some(Section::Failure) => req.failure.push(op(&words, enc).map_err(at)?),
        }
    }
    if req.compare.is_empty() && req.success.is_empty() && req.failure.is_empty() {
        return Err(CliError::usage(
            "the transaction is empty; write a compare:, success: or failure: section (see calm txn --help)",
        ));
    }
    Ok(req)
}

/// A line's words: blanks separate them, `"..."` quotes, `#` outside quotes ends the line.
fn words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.peek() {
            None | Some('#') => return Ok(words),
            Some('"') => {
                chars.next();
                let mut word = String::new();
                loop {
                    match chars.next() {
                        None => return Err("a quote is not closed".into()),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some('"') => word.push('"'),
                            Some('\\') => word.push('\\'),
                            Some('n') => word.push('\n'),
                            Some('t') => word.push('\t'),
                            other => {
                                return Err(format!(
                                    "unknown escape \\{}; use \\\", \\\\, \\n or \\t",
                                    other.map_or(String::new(), String::from)
                                ));
                            }
                        },
                        Some(c) => word.push(c),
                    }
                }
                words.push(word);
            }
            Some(_) => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || c == '#' {
                        break;
                    }
                    word.push(c);
                    chars.next();
                }
                words.push(word);
            }
        }
    }
}

fn arity(words: &[String], n: usize, usage: &str) -> Result<(), String> {
    if words.len() == n {
        Ok(())
    } else {
        Err(format!("expected '{usage}'"))
    }
}

fn int(word: &str) -> Result<i64, String> {
    word.parse()
        .map_err(|_| format!("'{word}' is not a signed 64-bit integer"))
}

fn compare_op(word: &str) -> Result<i32, String> {
    Ok(match word {
        "=" | "==" => pb::CompareOp::Equal,
        "!=" => pb::CompareOp::NotEqual,
        "<" => pb::CompareOp::Less,
        ">" => pb::CompareOp::Greater,
        other => return Err(format!("'{other}' is not an operator; use =, !=, < or >")),
    } as i32)
}

fn compare(words: &[String], enc: Encoding) -> Result<pb::Compare, String> {
    use pb::compare::Test;
    let key = |w: &String| enc.decode("key", w).map_err(|e| e.message);
    let test = match words[0].as_str() {
        "exists" | "missing" => {
            arity(words, 2, &format!("{} KEY", words[0]))?;
            Test::Exists(words[0] == "exists")
        }
        "type" => {
            arity(
                words,
                3,
                "type KEY register|counter|bounded_counter|max|set",
            )?;
            let t = match words[2].as_str() {
                "register" => pb::ValueType::Register,
                "counter" => pb::ValueType::Counter,
                "bounded_counter" => pb::ValueType::BoundedCounter,
                "max" => pb::ValueType::Max,
                "set" => pb::ValueType::Set,
                other => {
                    return Err(format!(
                        "'{other}' is not a type; use register, counter, bounded_counter, max or set"
                    ));
                }
            };
            Test::Type(t as i32)
        }
        "version" => {
            arity(words, 4, "version KEY =|!=|<|> N")?;
            Test::Version(pb::VersionTest {
                op: compare_op(&words[2])?,
                version: words[3]
                    .parse()
                    .map_err(|_| format!("'{}' is not a version (0 or more)", words[3]))?,
            })
        }
        "value" => {
            arity(words, 4, "value KEY =|!=|<|> VALUE")?;
            Test::Value(pb::ValueTest {
                op: compare_op(&words[2])?,
                value: enc.decode("value", &words[3]).map_err(|e| e.message)?,
            })
        }
        "counter" => {
            arity(words, 3, "counter KEY MIN..MAX")?;
            let (min, max) = words[2]
                .split_once("..")
                .ok_or_else(|| format!("'{}' is not a range MIN..MAX", words[2]))?;
            let bound = |b: &str| (!b.is_empty()).then(|| int(b)).transpose();
            Test::Counter(pb::CounterRange {
                min: bound(min)?,
                max: bound(max)?,
            })
        }
        other => {
            return Err(format!(
                "'{other}' is not a comparison; use exists, missing, type, version, value or counter"
            ));
        }
    };
    Ok(pb::Compare {
        key: key(&words[1])?,
        test: Some(test),
    })
}

fn op(words: &[String], enc: Encoding) -> Result<pb::TxnOp, String> {
    use pb::op::Kind;
    let bytes = |what: &str, w: &String| enc.decode(what, w).map_err(|e| e.message);
    let kind = match words[0].as_str() {
        "put" => {
            if words.len() != 4 {
                arity(words, 3, "put KEY VALUE [lease=ID]")?;
            }
            Kind::Put(pb::Put {
                value: bytes("value", &words[2])?,
            })
        }
        "del" => {
            arity(words, 2, "del KEY")?;
            Kind::Delete(pb::Delete {})
        }
        "add" => {
            arity(words, 3, "add KEY DELTA")?;
            Kind::Add(pb::Add {
                delta: int(&words[2])?,
            })
        }
        "set" => {
            arity(words, 3, "set KEY VALUE")?;
            Kind::SetValue(pb::SetValue {
                value: int(&words[2])?,
            })
        }
        "bounds" => {
            arity(words, 4, "bounds KEY MIN MAX")?;
            Kind::SetBounds(pb::SetBounds {
                min: int(&words[2])?,
                max: int(&words[3])?,
            })
        }
        "max" => {
            arity(words, 3, "max KEY VALUE")?;
            Kind::Raise(pb::Raise {
                value: int(&words[2])?,
            })
        }
        "setmax" => {
            arity(words, 3, "setmax KEY VALUE")?;
            Kind::SetMax(pb::SetMax {
                value: int(&words[2])?,
            })
        }
        "sadd" | "srem" => {
            arity(words, 3, &format!("{} KEY ELEMENT", words[0]))?;
            let element = bytes("element", &words[2])?;
            if words[0] == "sadd" {
                Kind::SetAdd(pb::SetAdd { element })
            } else {
                Kind::SetRemove(pb::SetRemove { element })
            }
        }
        other => {
            return Err(format!(
                "'{other}' is not an op; use put, del, add, set, bounds, max, setmax, sadd or srem"
            ));
        }
    };
    let lease = match words.get(3) {
        None => 0,
        Some(w) => match w.strip_prefix("lease=") {
            Some(id) => super::lease::parse_id(id).map_err(|e| e.message)?,
            None => return Err(format!("expected 'lease=ID' after the value, not '{w}'")),
        },
    };
    Ok(pb::TxnOp {
        key: bytes("key", &words[1])?,
        op: Some(pb::Op { kind: Some(kind) }),
        lease,
    })
}

/// Send `req` and print its answer: exit 0 when the success branch ran, 1 when the
/// failure branch did (like a compare-and-set whose condition did not hold).
pub async fn run(
    endpoints: &[String],
    req: pb::TxnRequest,
    output: Output,
    enc: Encoding,
) -> Result<Exit, CliError> {
    let mut kv = KvClient::new(channel(endpoints).await?);
    let branch = |succeeded: bool| {
        if succeeded {
            &req.success
        } else {
            &req.failure
        }
    };
    let resp = kv
        .txn(req.clone())
        .await
        .map_err(|s| CliError::from_status(&s))?
        .into_inner();
    let ops = branch(resp.succeeded);
    match output {
        Output::Json => {
            let results: Vec<serde_json::Value> = ops
                .iter()
                .zip(&resp.results)
                .map(|(op, r)| {
                    let mut doc = serde_json::Map::new();
                    json_bytes(&mut doc, "key", &op.key);
                    doc.insert("version".into(), json!(r.version));
                    if matches!(
                        op.op.as_ref().and_then(|o| o.kind.as_ref()),
                        Some(pb::op::Kind::Delete(_))
                    ) {
                        doc.insert("deleted".into(), json!(r.deleted));
                    }
                    serde_json::Value::Object(doc)
                })
                .collect();
            print_json(&json!({
                "succeeded": resp.succeeded,
                "results": results,
                "token": hex::encode(&resp.token),
            }));
        }
        Output::Table => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "{}",
                if resp.succeeded {
                    "SUCCESS: every comparison held; the success ops ran"
                } else {
                    "FAILURE: a comparison did not hold; the failure ops ran"
                }
            );
            for (op, r) in ops.iter().zip(&resp.results) {
                let mut line = format!("  {}", enc.cell(&op.key));
                if r.version > 0 {
                    line.push_str(&format!(": version {}", r.version));
                }
                if r.deleted {
                    line.push_str(" (deleted)");
                }
                let _ = writeln!(out, "{line}");
            }
        }
    }
    Ok(if resp.succeeded { Exit::Done } else { Exit::No })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let text = r#"
# Move 10 from {acct}:a to {acct}:b if a holds at least 10.
compare:
  counter {acct}:a 10..        # counter in [10, +inf)
  exists {acct}:b
success:
  add {acct}:a -10
  add {acct}:b 10
failure:
  put {acct}:log "transfer \"refused\" # not a comment"
"#;
        let req = parse(text, Encoding::default()).unwrap();
        assert_eq!(req.compare.len(), 2);
        assert_eq!(
            req.compare[0].test,
            Some(pb::compare::Test::Counter(pb::CounterRange {
                min: Some(10),
                max: None
            }))
        );
        assert_eq!(req.success.len(), 2);
        assert_eq!(req.failure[0].lease, 0);
        assert_eq!(
            req.failure[0].op.as_ref().unwrap().kind,
            Some(pb::op::Kind::Put(pb::Put {
                value: b"transfer \"refused\" # not a comment".to_vec()
            }))
        );
    }

    #[test]
    fn a_put_may_name_a_lease() {
        let req = parse("success:\n  put {s}:k v lease=1a\n", Encoding::default()).unwrap();
        assert_eq!(req.success[0].lease, 0x1a);
    }

    #[test]
    fn mistakes_name_their_line() {
        let bad = [
            ("put k v\n", "line 1: a clause before any section"),
            (
                "compare:\n  value k ~ 1\n",
                "line 2: '~' is not an operator",
            ),
            ("success:\ncompare:\n", "line 2: sections come once each"),
            (
                "success:\n  put k\n",
                "line 2: expected 'put KEY VALUE [lease=ID]'",
            ),
            ("success:\n  put k \"v\n", "line 2: a quote is not closed"),
            ("success:\n  put k v 1a\n", "line 2: expected 'lease=ID'"),
            (
                "success:\n  put k v lease=zz\n",
                "line 2: 'zz' is not a lease id",
            ),
            (
                "compare:\n  counter k 1-2\n",
                "line 2: '1-2' is not a range",
            ),
            ("\n# nothing\n", "the transaction is empty"),
        ];
        for (text, want) in bad {
            let e = parse(text, Encoding::default()).unwrap_err();
            assert_eq!(e.exit, Exit::Usage);
            assert!(e.message.starts_with(want), "{text:?}: {}", e.message);
        }
        let hex = Encoding { hex: true };
        assert!(
            parse("success:\n  put zz 00\n", hex)
                .unwrap_err()
                .message
                .contains("not hex")
        );
    }
}
