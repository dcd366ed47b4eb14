//! The command line's contract against a real cluster: exit codes, `-w json` for every
//! outcome (errors included), gRPC codes as the README spells them, binary-safe values
//! (stdin, `--file`, `--hex`, base64 in JSON), and the cluster-wide views.

mod support;

use base64::Engine as _;
use serde_json::json;
use std::io::Write;
use std::process::{Command, Stdio};
use support::Cluster;

struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.out(), self.stderr))
    }
}

/// `calm ARGS` against `c`'s node 1, with `stdin` fed in.
fn calm(c: &Cluster, args: &[&str], stdin: &[u8]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_calm"))
        .args(args)
        .env("CALM_ENDPOINTS", c.nodes[0].client.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("calm runs");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().expect("exited"),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `calm ARGS` that must exit 0.
fn calm_ok(c: &Cluster, args: &[&str]) -> Run {
    let r = calm(c, args, b"");
    assert_eq!(r.code, 0, "calm {args:?}: {} {}", r.out(), r.stderr);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_json_errors_and_binary_values() {
    let c = Cluster::start(3, &[]).await;

    // Done: 0.
    let r = calm(&c, &["put", "greeting", "hello"], b"");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.out().starts_with("OK (consensus), version 1"),
        "{}",
        r.out()
    );

    // Missing: 1, in both outputs; JSON says found = false.
    let r = calm(&c, &["get", "nothing-here"], b"");
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("NOT_FOUND"), "{}", r.stderr);
    let r = calm(&c, &["get", "nothing-here", "-w", "json"], b"");
    assert_eq!(r.code, 1);
    assert_eq!(r.json()["found"], false);

    // Not applied: 1, with the current version.
    let r = calm(&c, &["cas", "greeting", "x", "--expect-version", "7"], b"");
    assert_eq!(r.code, 1);
    assert!(r.out().contains("NOT APPLIED"), "{}", r.out());
    let r = calm(
        &c,
        &[
            "cas",
            "greeting",
            "x",
            "--expect-version",
            "7",
            "-w",
            "json",
        ],
        b"",
    );
    assert_eq!((r.code, r.json()["succeeded"].clone()), (1, false.into()));

    // Refused: 1, the code spelt as gRPC spells it, in JSON too.
    let r = calm(&c, &["add", "greeting", "1"], b"");
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.starts_with("calm: error: FAILED_PRECONDITION: "),
        "{}",
        r.stderr
    );
    let r = calm(&c, &["add", "greeting", "1", "-w", "json"], b"");
    assert_eq!(r.code, 1);
    let doc = r.json();
    assert_eq!(doc["error"]["code"], "FAILED_PRECONDITION", "{doc}");
    assert!(
        doc["error"]["message"]
            .as_str()
            .unwrap()
            .contains("greeting")
    );
    assert!(
        r.stderr.is_empty(),
        "JSON errors go to stdout only: {}",
        r.stderr
    );

    // Bad input: 2, before anything is sent.
    let r = calm(&c, &["put", "k", "zz", "--hex", "-w", "json"], b"");
    assert_eq!(r.code, 2);
    assert_eq!(r.json()["error"]["code"], "INVALID_ARGUMENT");
    let r = calm(&c, &["put", "k", "--file", "/nonexistent/value"], b"");
    assert_eq!(r.code, 2, "{}", r.stderr);

    // No answer: 3.
    let mut unreachable = Command::new(env!("CARGO_BIN_EXE_calm"));
    let out = unreachable
        .args(["get", "k", "-w", "json", "--endpoints", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["error"]["code"], "UNAVAILABLE");

    // Binary-safe values: from stdin, from a file, in hex; back out raw, as hex, as base64.
    let binary: Vec<u8> = (0..=255u8).chain([0, b'\n', 0xff]).collect();
    let r = calm(&c, &["put", "bin", "-"], &binary);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = calm(&c, &["get", "bin"], b"");
    assert_eq!(r.code, 0);
    assert_eq!(
        &r.stdout[..r.stdout.len() - 1],
        &binary[..],
        "raw bytes, then a newline"
    );
    let r = calm(&c, &["get", "bin", "-w", "json"], b"");
    let doc = r.json();
    assert_eq!(doc["value"]["value"], serde_json::Value::Null, "not UTF-8");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(doc["value"]["value_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, binary);
    // --hex reads the key as hex too.
    let r = calm(&c, &["get", &hex::encode("bin"), "--hex"], b"");
    assert_eq!(r.out().trim(), hex::encode(&binary));
    let r = calm(&c, &["get", "bin", "--hex"], b"");
    assert_eq!(r.code, 2, "'bin' is no hex key");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("value");
    std::fs::write(&file, &binary[..10]).unwrap();
    let r = calm(
        &c,
        &["put", "from-file", "--file", file.to_str().unwrap()],
        b"",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = calm(&c, &["get", &hex::encode("from-file"), "--hex"], b"");
    assert_eq!(r.out().trim(), hex::encode(&binary[..10]));
    // A hex key and value, and a set element in hex.
    let r = calm(&c, &["put", "00ff", "0a0b", "--hex"], b"");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = calm(&c, &["get", "00ff", "--hex", "-w", "json"], b"");
    assert_eq!(r.json()["key_base64"], "AP8=");
    assert_eq!(r.json()["value"]["value_base64"], "Cgs=");
    let tags = hex::encode("tags");
    let r = calm(&c, &["sadd", &tags, "ff00", "--hex"], b"");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = calm(&c, &["smembers", &tags, "--hex"], b"");
    assert_eq!(r.out().trim(), "ff00");

    // Every admin command speaks JSON.
    for args in [
        &["status", "-w", "json"][..],
        &["status", "--cluster", "-w", "json"],
        &["health", "-w", "json"],
        &["explain", "greeting", "-w", "json"],
        &["rules", "get", "-w", "json"],
        &["checkpoint", "-w", "json"],
    ] {
        let r = calm(&c, args, b"");
        assert_eq!(r.code, 0, "{args:?}: {}{}", r.out(), r.stderr);
        r.json();
    }

    // Explain names a tagged key's subject, in JSON and in the table's group column.
    let e = calm(&c, &["explain", "{user:7}:balance", "-w", "json"], b"").json()[0].clone();
    assert_eq!(e["subject"], json!("user:7"), "{e}");
    let r = calm(&c, &["explain", "{user:7}:history"], b"");
    assert!(
        r.out()
            .contains(&format!("{} (subject user:7)", e["group"])),
        "{}",
        r.out()
    );

    // A key's own bounds, set from the CLI, are what explain shows (beside the rule's).
    let r = calm(&c, &["bounds", "stock:cli", "0", "10"], b"");
    assert_eq!(r.code, 0, "{}{}", r.out(), r.stderr);
    // Node 1 may apply the write a moment after the group's leader answered it.
    let mut e = serde_json::Value::Null;
    for _ in 0..50 {
        e = calm(&c, &["explain", "stock:cli", "-w", "json"], b"").json()[0].clone();
        if e["max"] == json!(10) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!((&e["min"], &e["max"]), (&json!(0), &json!(10)), "{e}");
    assert_eq!(e["rule_max"], json!(1_000_000), "{e}");
    let r = calm(&c, &["explain", "stock:cli"], b"");
    assert!(
        r.out().contains("[0, 10] (key's own; rule's [0, 1000000])"),
        "{}",
        r.out()
    );
    let r = calm(&c, &["bounds", "stock:cli", "5", "1", "-w", "json"], b"");
    assert_eq!(r.code, 1, "{}{}", r.out(), r.stderr);
    assert_eq!(
        r.json()["error"]["code"],
        json!("INVALID_ARGUMENT"),
        "{}",
        r.out()
    );
}

/// `calm status --cluster` has one row per member with its own answer; `calm health` says
/// each member is healthy and exits 0, and 1 once a member is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_views_cover_every_member() {
    let mut c = Cluster::start(3, &[]).await;
    let r = calm(&c, &["status", "--cluster", "-w", "json"], b"");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = r.json();
    let members = doc["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    let leaders: u64 = members
        .iter()
        .map(|m| {
            assert_eq!(m["reachable"], true, "{m}");
            assert!(m["status"]["disk_bytes"].as_u64().unwrap() > 0, "{m}");
            assert_eq!(m["status"]["version"], env!("CARGO_PKG_VERSION"));
            m["leaders_held"].as_u64().unwrap()
        })
        .sum();
    // Every group (4 data groups in the tests, plus the metadata group) has one leader.
    assert_eq!(leaders, 5, "{doc}");
    let r = calm(&c, &["status", "--cluster"], b"");
    assert_eq!(r.code, 0);
    for n in &c.nodes {
        assert!(r.out().contains(&n.client.to_string()), "{}", r.out());
    }

    let r = calm(&c, &["health"], b"");
    assert_eq!(r.code, 0, "{}{}", r.out(), r.stderr);
    assert_eq!(r.out().matches("is healthy").count(), 3, "{}", r.out());

    c.stop(3);
    let r = calm(&c, &["health", "-w", "json"], b"");
    assert_eq!(r.code, 1, "{}", r.out());
    let doc = r.json();
    assert_eq!(doc["healthy"], false);
    let third = &doc["members"][2];
    assert_eq!(
        (third["id"].clone(), third["reachable"].clone()),
        (3.into(), false.into())
    );
    let r = calm(&c, &["status", "--cluster"], b"");
    assert!(r.out().contains("node 3 is unreachable"), "{}", r.out());
    // The status page shows it down, links the others, and reloads itself.
    let (code, page) = support::http_get(c.nodes[0].http, "/").await.unwrap();
    assert_eq!(code, 200);
    assert!(page.contains("http-equiv=refresh"), "{page}");
    assert!(page.contains(">down<"), "{page}");
    assert!(
        page.contains(&format!("href=\"http://{}/\"", c.nodes[1].http)),
        "{page}"
    );
}

/// `calm del` deletes a key of every type through Raft, says NOT FOUND (exit 1, `"deleted":
/// false`) when there was nothing to delete, and a deleted key can be written again, with
/// another type too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_can_be_deleted_and_recreated() {
    let c = Cluster::start(3, &[]).await;
    let ok = |args: &[&str]| calm_ok(&c, args);
    let missing = |key: &str| {
        let r = calm(&c, &["get", key], b"");
        assert_eq!(r.code, 1, "{key} is still there: {}", r.out());
    };
    ok(&["put", "reg", "v"]);
    ok(&["add", "hits", "5"]);
    ok(&["max", "high", "7"]);
    ok(&["sadd", "tags", "a"]);
    ok(&["add", "stock:9", "5"]);
    for key in ["reg", "hits", "high", "tags", "stock:9"] {
        let r = ok(&["del", key, "-w", "json"]);
        let doc = r.json();
        assert_eq!(doc["deleted"], true, "{key}: {doc}");
        assert_eq!(doc["path"], "consensus", "{key}: {doc}");
        missing(key);
        // Deleting again: nothing to delete.
        let r = calm(&c, &["del", key], b"");
        assert_eq!(r.code, 1, "{key}: {}", r.out());
        assert!(r.out().starts_with("NOT FOUND"), "{key}: {}", r.out());
    }
    let r = calm(&c, &["del", "never-written", "-w", "json"], b"");
    assert_eq!((r.code, r.json()["deleted"].clone()), (1, false.into()));
    // With --hex the key is named as it was given: a binary key is not mangled.
    let r = calm(&c, &["del", "--hex", "00ff"], b"");
    assert_eq!(r.code, 1, "{}", r.out());
    assert!(r.out().contains("key '00ff'"), "{}", r.out());

    // Written again: the same type starts from nothing, another type is a new key.
    ok(&["add", "hits", "2"]);
    assert_eq!(ok(&["get", "hits"]).out().trim(), "2");
    ok(&["sadd", "high", "x"]);
    assert_eq!(
        ok(&["get", "high", "-w", "json"]).json()["value"]["type"],
        "set"
    );
    ok(&["put", "tags", "now a register"]);
    assert_eq!(ok(&["get", "tags"]).out().trim(), "now a register");
    // A bounded counter's new generation starts again at 0 (its bounds' value closest to 0).
    ok(&["add", "stock:9", "1"]);
    let doc = ok(&["get", "stock:9", "-w", "json"]).json();
    assert_eq!(doc["value"]["type"], "bounded_counter", "{doc}");
    assert_eq!(doc["value"]["value"], 1, "{doc}");
}

/// `calm scan` prints a range's keys in order, one per line (JSON lines with `-w json`), or
/// their count; `calm del --prefix` deletes every key of a prefix and prints how many
/// existed. An empty range is exit 1, as a missing key is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_and_prefix_delete_go_over_a_range() {
    let c = Cluster::start(3, &[]).await;
    let ok = |args: &[&str]| calm_ok(&c, args);
    for i in (0..1_205).step_by(400) {
        ok(&["put", &format!("app/{i:04}"), &format!("v{i}")]);
    }
    ok(&["add", "app/hits", "3"]);
    ok(&["sadd", "app/tags", "b", "a"]);
    ok(&["put", "other", "x"]);
    let r = ok(&["scan", "app/"]);
    assert_eq!(
        r.out(),
        "app/0000\tv0\napp/0400\tv400\napp/0800\tv800\napp/1200\tv1200\napp/hits\t3\napp/tags\t{a, b}\n"
    );
    assert_eq!(ok(&["scan", "app/", "--count"]).out().trim(), "6");
    assert_eq!(
        ok(&["scan", "app/0400", "--range-end", "app/1200", "--keys-only"]).out(),
        "app/0400\napp/0800\n"
    );
    let r = ok(&["scan", "app/", "--limit", "2", "-w", "json"]);
    let docs: Vec<serde_json::Value> = r
        .out()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(docs.len(), 2, "{}", r.out());
    assert_eq!(docs[1]["key"], "app/0400");
    assert_eq!(docs[1]["value"]["value"], "v400");
    let r = calm(&c, &["scan", "nothing/"], b"");
    assert_eq!((r.code, r.out()), (1, String::new()));

    // del --prefix: every key, through the Batch path, counted.
    assert_eq!(
        ok(&["del", "--prefix", "app/", "-w", "json"]).json(),
        json!({"deleted": 6})
    );
    assert_eq!(calm(&c, &["scan", "app/"], b"").code, 1);
    assert_eq!(ok(&["get", "other"]).out().trim(), "x");
    let r = calm(&c, &["del", "--prefix", "app/"], b"");
    assert_eq!((r.code, r.out().trim()), (1, "0"));
    let r = calm(&c, &["del", "--prefix", ""], b"");
    assert_eq!(
        r.code, 2,
        "an empty prefix would delete every key: {}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_events_and_resumes_from_its_token() {
    use std::io::{BufRead, BufReader, Read};
    let c = Cluster::start(3, &[]).await;
    let ok = |args: &[&str]| calm_ok(&c, args);
    let mut watcher = Command::new(env!("CARGO_BIN_EXE_calm"))
        .args(["watch", "cfg/", "--prefix", "--prev", "--count", "3"])
        .env("CALM_ENDPOINTS", c.nodes[0].client.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("calm runs");
    let mut stderr = BufReader::new(watcher.stderr.take().unwrap());
    let mut created = String::new();
    stderr.read_line(&mut created).unwrap();
    assert!(created.starts_with("watching; token: "), "{created}");
    ok(&["put", "cfg/a", "1"]);
    ok(&["put", "other", "not watched"]);
    ok(&["put", "cfg/a", "2"]);
    ok(&["del", "cfg/a"]);
    let status = watcher.wait().unwrap();
    let mut out = String::new();
    watcher
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "{out} {rest}");
    assert_eq!(
        out,
        "PUT\tcfg/a\t1\nPUT\tcfg/a\t2\t(was 1)\nDELETE\tcfg/a\t(was 2)\n"
    );
    let token = rest
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .expect("the last token on stderr")
        .to_string();

    // From that token, on another node: only what came after.
    ok(&["put", "cfg/b", "3"]);
    let r = calm(
        &c,
        &[
            "watch",
            "cfg/",
            "--prefix",
            "--from",
            &token,
            "--count",
            "1",
            "-w",
            "json",
            "--endpoints",
            &c.nodes[1].client.to_string(),
        ],
        b"",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc: serde_json::Value = serde_json::from_str(r.out().trim()).unwrap();
    assert_eq!(doc["kind"], "PUT");
    assert_eq!(doc["key"], "cfg/b");
    assert_eq!(doc["value"]["value"], "3");
    assert!(doc["token"].is_string(), "{doc}");
    let r = calm(&c, &["watch", "cfg/", "--prefix", "--from", "zz"], b"");
    assert_eq!(r.code, 2, "{}", r.stderr);
}
