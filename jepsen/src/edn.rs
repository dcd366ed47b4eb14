//! EDN export of a history, so Jepsen-side tools (Knossos, Elle, jepsen.checker) and people
//! used to reading Jepsen's `history.edn` can consume a calm run.
//!
//! One op map per line, no enclosing vector, like Jepsen's own `history.edn`:
//! `{:type :invoke, :f :write, :value 3, :process 0, :time 123, :index 0, :key "x"}`.
//! Function names become kebab-case keywords (`set_add` → `:set-add`), `final` becomes
//! `:final? true`, and JSON values map to EDN (null → `nil`, arrays → vectors, objects → maps
//! with keyword keys where the key is a valid keyword). With [`KeyStyle::IndependentTuple`]
//! the key moves into the value as `[key value]`, the shape `jepsen.independent` expects.
//!
//! JSON lines stay the primary format: this is an export, there is no EDN reader.

use std::fmt::Write as _;
use std::io::{self, Write};

use crate::history::{History, Op, OpType, Process, Value};

/// Where the key of an op goes in the exported map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyStyle {
    /// A separate `:key` entry.
    #[default]
    Field,
    /// `:value [key value]`, as written by `jepsen.independent`.
    IndependentTuple,
}

/// Writes the whole history, one EDN map per line.
pub fn write_edn<W: Write>(history: &History, writer: W, style: KeyStyle) -> io::Result<()> {
    let mut w = io::BufWriter::new(writer);
    for op in history.ops() {
        w.write_all(op_to_edn(op, style).as_bytes())?;
        w.write_all(b"\n")?;
    }
    w.flush()
}

/// One op as an EDN map (no trailing newline).
pub fn op_to_edn(op: &Op, style: KeyStyle) -> String {
    let mut s = String::with_capacity(96);
    s.push_str("{:type :");
    s.push_str(match op.kind {
        OpType::Invoke => "invoke",
        OpType::Ok => "ok",
        OpType::Fail => "fail",
        OpType::Info => "info",
    });
    s.push_str(", :f ");
    push_name(&mut s, op.f.as_str());
    s.push_str(", :value ");
    match (style, &op.key) {
        (KeyStyle::IndependentTuple, Some(key)) => {
            s.push('[');
            push_string(&mut s, key);
            s.push(' ');
            push_value(&mut s, &op.value);
            s.push(']');
        }
        _ => push_value(&mut s, &op.value),
    }
    s.push_str(", :process ");
    match op.process {
        Process::Client(p) => {
            let _ = write!(s, "{p}");
        }
        Process::Nemesis => s.push_str(":nemesis"),
    }
    let _ = write!(s, ", :time {}, :index {}", op.time_ns, op.index);
    if style == KeyStyle::Field
        && let Some(key) = &op.key
    {
        s.push_str(", :key ");
        push_string(&mut s, key);
    }
    if let Some(node) = &op.node {
        s.push_str(", :node ");
        push_string(&mut s, node);
    }
    if let Some(error) = &op.error {
        s.push_str(", :error ");
        push_string(&mut s, error);
    }
    if op.is_final {
        s.push_str(", :final? true");
    }
    s.push('}');
    s
}

/// A name as a keyword when it can be one (snake_case turned kebab-case), else a string.
fn push_name(s: &mut String, name: &str) {
    let kebab = name.replace('_', "-");
    if is_keyword_name(&kebab) {
        s.push(':');
        s.push_str(&kebab);
    } else {
        push_string(s, name);
    }
}

/// Conservative subset of EDN's symbol rules: enough for op names and map keys, and never
/// produces something a reader would misparse.
fn is_keyword_name(name: &str) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    // No leading '-', '+' or digit: "-1" or "1a" would not read back as keywords.
    (first.is_ascii_alphabetic() || "*!_?<>=".contains(first))
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "*!_?-+<>=.".contains(c))
}

fn push_string(s: &mut String, text: &str) {
    s.push('"');
    for c in text.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

fn push_value(s: &mut String, v: &Value) {
    match v {
        Value::Null => s.push_str("nil"),
        Value::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if n.is_i64() || n.is_u64() {
                let _ = write!(s, "{n}");
            } else if let Some(f) = n.as_f64() {
                let text = format!("{f:?}");
                s.push_str(&text);
                // `{:?}` prints 1e20 as "1e20" and 3.0 as "3.0": both read back as doubles.
                if !text.contains(['.', 'e', 'E']) {
                    s.push_str(".0");
                }
            }
        }
        Value::String(text) => push_string(s, text),
        Value::Array(items) => {
            s.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    s.push(' ');
                }
                push_value(s, item);
            }
            s.push(']');
        }
        Value::Object(map) => {
            s.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                if is_keyword_name(k) {
                    s.push(':');
                    s.push_str(k);
                } else {
                    push_string(s, k);
                }
                s.push(' ');
                push_value(s, item);
            }
            s.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::F;
    use serde_json::json;

    #[test]
    fn invoke_write_matches_jepsen_shape() {
        let op = Op::new(0, 123, Process::Client(0), OpType::Invoke, F::Write).with_value(3);
        assert_eq!(
            op_to_edn(&op, KeyStyle::Field),
            "{:type :invoke, :f :write, :value 3, :process 0, :time 123, :index 0}"
        );
    }

    #[test]
    fn keys_names_strings_and_nested_values() {
        let op = Op::new(
            7,
            9,
            Process::Nemesis,
            OpType::Info,
            F::Other("start_partition".into()),
        )
        .with_value(json!({"halves": [["n1"], ["n2", "n3"]], "odd key": null}))
        .with_error("a \"quoted\"\nline");
        assert_eq!(
            op_to_edn(&op, KeyStyle::Field),
            "{:type :info, :f :start-partition, :value {:halves [[\"n1\"] [\"n2\" \"n3\"]], \
             \"odd key\" nil}, :process :nemesis, :time 9, :index 7, \
             :error \"a \\\"quoted\\\"\\nline\"}"
        );
    }

    #[test]
    fn independent_tuple_and_final_flag() {
        let op = Op::new(3, 5, Process::Client(2), OpType::Ok, F::ReadSet)
            .with_key("s1")
            .with_value(json!([1, 2]))
            .with_node("n1")
            .with_final(true);
        assert_eq!(
            op_to_edn(&op, KeyStyle::IndependentTuple),
            "{:type :ok, :f :read-set, :value [\"s1\" [1 2]], :process 2, :time 5, :index 3, \
             :node \"n1\", :final? true}"
        );
        assert_eq!(
            op_to_edn(&op, KeyStyle::Field),
            "{:type :ok, :f :read-set, :value [1 2], :process 2, :time 5, :index 3, \
             :key \"s1\", :node \"n1\", :final? true}"
        );
    }

    #[test]
    fn floats_stay_floats() {
        let mut s = String::new();
        push_value(&mut s, &json!(3.0));
        s.push(' ');
        push_value(&mut s, &json!(1e20));
        s.push(' ');
        push_value(&mut s, &json!(-2.5));
        assert_eq!(s, "3.0 1e20 -2.5");
    }
}
