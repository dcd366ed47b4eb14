//! The `calm` binary as a user runs it: real processes, real files, exit codes and messages.

use std::process::Command;

fn calm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_calm"))
        .args(args)
        .output()
        .expect("calm binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn embedded_rules_are_valid_and_explain_keys() {
    let (ok, out, err) = calm(&["rules", "check"]);
    assert!(ok, "{err}");
    assert!(out.contains("no problems"), "{out}");
    let (ok, out, err) = calm(&["rules", "explain", "-w", "json", "stock:42", "other"]);
    assert!(ok, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("json output");
    assert_eq!(rows[0]["mode"], "hybrid");
    assert_eq!(rows[0]["type"], "bounded_counter");
    assert_eq!(rows[0]["bounds"]["min"], 0);
    assert_eq!(rows[1]["rule"], serde_json::Value::Null);
}

#[test]
fn a_rules_file_with_errors_is_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    std::fs::write(
        &path,
        r#"
default_mode = "hybrid"
[[rules]]
pattern = "stock:*"
mode = "hybrid"
[[rules]]
pattern = "stock:42"
mode = "strict"
[[rules]]
pattern = "qty:*"
mode = "hybrid"
type = "counter"
bounds = { min = 0, max = 10 }
"#,
    )
    .unwrap();
    let (ok, out, err) = calm(&["rules", "check", path.to_str().unwrap()]);
    assert!(!ok, "a file with errors must fail the check");
    assert!(
        out.contains("can never match"),
        "shadowed rule reported: {out}"
    );
    assert!(out.contains("#3"), "the bad bounds rule is named: {out}");
    assert!(err.contains("error(s) in the rules"), "{err}");

    std::fs::write(&path, "default_mode = \"sometimes\"\n").unwrap();
    let (ok, _, err) = calm(&["rules", "check", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("not a valid rules file"), "{err}");
}
