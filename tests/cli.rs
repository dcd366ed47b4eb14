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

#[test]
fn debug_reads_a_stopped_nodes_data_directory() {
    use calm_kernel::rules::RuleSet;
    use calm_kernel::{HlcTimestamp, Mode, Op};
    use calm_raft::local::{LocalOptions, LocalState};
    let dir = tempfile::tempdir().unwrap();
    {
        let rules = RuleSet::new(Mode::Hybrid).compile().unwrap();
        let (mut local, _) =
            LocalState::open(dir.path(), 7, rules, LocalOptions::default()).unwrap();
        let replica = local.replica_mut();
        let create = replica
            .prepare_command(b"hits", &Op::CounterAdd { delta: 0 }, HlcTimestamp(1))
            .unwrap();
        replica.apply_command(&create).unwrap();
        for delta in [5, 6] {
            let admit = local
                .admit(b"hits", &Op::CounterAdd { delta }, HlcTimestamp(10))
                .unwrap()
                .expect("admitted");
            admit.durable.unwrap().wait().unwrap();
        }
        local.persist_durable().unwrap();
    }
    let data = dir.path().to_str().unwrap();
    let (ok, out, err) = calm(&["debug", "meta", data]);
    assert!(ok, "{err}");
    assert!(out.contains("vv 7:2"), "{out}");
    assert!(out.contains("keys 1"), "{out}");
    let (ok, out, err) = calm(&["debug", "facts", data, "--origin", "7", "--from", "2"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "once from the archive, once from the WAL: {out}"
    );
    assert!(
        lines[0].starts_with("archive (7, 2) CounterAdd key hits arg 6"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("wal@") && lines[1].contains("(7, 2)"),
        "{out}"
    );
    let (ok, out, err) = calm(&["debug", "key", data, "hits"]);
    assert!(ok, "{err}");
    assert!(out.contains("Counter"), "{out}");
    let empty = tempfile::tempdir().unwrap();
    let (ok, _, err) = calm(&["debug", "meta", empty.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("not a calm data directory"), "{err}");
}

#[test]
fn a_misspelt_setting_in_the_environment_is_refused_and_other_tools_variables_are_not() {
    let dir = tempfile::tempdir().unwrap();
    // Under a regular file: were the configuration accepted, the node would still stop at
    // once (it cannot create its data directory) instead of serving.
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let data = file.join("data");
    let serve = |id: &str, env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_calm"))
            .args(["serve", "--id", id, "--data-dir", data.to_str().unwrap()])
            .args(["--client-addr", "127.0.0.1:1", "--peer-addr", "127.0.0.1:2"])
            .args(["--http-addr", "127.0.0.1:3"])
            .args(["--member", "1=127.0.0.1:2,127.0.0.1:1"])
            .envs(env.iter().copied())
            .output()
            .expect("calm binary runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = serve("1", &[("CALM_GOSSIP__PUSH_INTERVAL", "5")]);
    assert!(!ok, "a misspelt setting must stop the node");
    assert!(
        err.contains("unknown field") && err.contains("PUSH_INTERVAL"),
        "{err}"
    );
    // The CLI's CALM_ENDPOINTS and the logs' CALM_LOG are no settings of `calm serve`: the
    // configuration is read past them (and then refused for its id).
    let (ok, err) = serve(
        "0",
        &[("CALM_ENDPOINTS", "127.0.0.1:9"), ("CALM_LOG", "info")],
    );
    assert!(!ok);
    assert!(err.contains("id must be >= 1"), "{err}");
}

/// A command that fails while its stderr cannot be written (a node's log on a full disk;
/// here /dev/full, where every write fails with ENOSPC) still exits with 1, the failure code,
/// not with 101: `eprintln!` panics when its write fails, and a panic's exit code says "bug".
#[test]
fn a_failure_that_cannot_be_printed_still_exits_with_the_failure_code() {
    let full = match std::fs::OpenOptions::new().write(true).open("/dev/full") {
        Ok(f) => f,
        Err(e) => {
            eprintln!("skipped: this test writes stderr to /dev/full, which cannot be opened: {e}");
            return;
        }
    };
    let status = Command::new(env!("CARGO_BIN_EXE_calm"))
        .args(["serve", "--config", "/nonexistent/calm.toml"])
        .stdout(std::process::Stdio::null())
        .stderr(full)
        .status()
        .expect("calm binary runs");
    assert_eq!(status.code(), Some(1), "{status}");
}

/// A base port below the ephemeral range whose nine ports (three nodes) are free now: a
/// port the kernel hands out (to another test's outgoing connection, say) could otherwise
/// take one of them first.
fn free_dev_base(salt: u16) -> u16 {
    (10_000..30_000u16)
        .step_by(300)
        .map(|b| b + (std::process::id() % 9) as u16 * 30 + salt * 10)
        .find(|&base| {
            (1..=3u16)
                .flat_map(|i| [base + i, base + 100 + i, base + 200 + i])
                .all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        })
        .expect("a base port whose nine ports are free")
}

/// `calm dev` refuses ports that something else holds before it starts any node: nothing
/// else could stop a node, or answer its readiness checks in its place.
#[test]
fn calm_dev_refuses_ports_in_use_before_starting_anything() {
    let base = free_dev_base(0);
    let _taken = std::net::TcpListener::bind(("127.0.0.1", base + 202)).expect("take a port");
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let (ok, out, err) = calm(&[
        "dev",
        "--data-dir",
        data.to_str().expect("utf-8 path"),
        "--base-port",
        &base.to_string(),
    ]);
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains(&format!(
            "port 127.0.0.1:{} (node 2's HTTP) is not free",
            base + 202
        )) && err.contains("--base-port"),
        "{err}"
    );
    assert!(!data.join("node-1").exists(), "a node was started");
}

/// `calm dev` says why a node stopped while starting (the node's last log line of this run),
/// not only where its log is.
#[test]
fn calm_dev_says_why_a_node_did_not_start() {
    let base = free_dev_base(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Node 2's data directory is in use (this test holds its lock). An earlier run's log
    // line must not be quoted as this run's reason.
    std::fs::create_dir_all(data.join("node-2")).unwrap();
    let _held = calm_raft::dir_lock::DataDirLock::acquire(&data.join("node-2")).unwrap();
    std::fs::write(data.join("node-2.log"), "calm: error: an old reason\n").unwrap();
    let (ok, _, err) = calm(&[
        "dev",
        "--data-dir",
        data.to_str().expect("utf-8 path"),
        "--base-port",
        &base.to_string(),
    ]);
    assert!(!ok, "{err}");
    assert!(
        err.contains(&format!(
            "node 2 exited (exit status: 1) while starting: the data directory {} is in use by another calm process (PID {})",
            data.join("node-2").display(),
            std::process::id()
        )),
        "{err}"
    );
    assert!(!err.contains("an old reason"), "{err}");
    assert!(err.contains("node-2.log"), "{err}");
}

/// `calm dev` prints the endpoints to use, says when it continues an earlier run, refuses a
/// second `calm dev` on its directory (naming the PID, and leaving the running cluster's
/// logs alone) and a node count its directory was not created with.
#[test]
fn calm_dev_tells_the_truth_about_its_cluster() {
    use std::io::{BufRead, BufReader};
    let base = free_dev_base(2);
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf-8 path").to_string();
    let start = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_calm"))
            .args([
                "dev",
                "--data-dir",
                &data_arg,
                "--base-port",
                &base.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("calm dev starts")
    };
    // Reads calm dev's output (bounded) until it says ready.
    let await_ready = |dev: &mut std::process::Child| -> String {
        let stdout = dev.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut text = String::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !text.contains("Ctrl-C here stops the cluster") {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    text.push_str(&line);
                    text.push('\n');
                }
                Err(_) => {
                    let _ = dev.kill();
                    panic!("calm dev did not get ready: {text}");
                }
            }
        }
        // Keep draining so the pipe never fills.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        text
    };
    let stop = |dev: &mut std::process::Child| {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(dev.id() as i32, libc::SIGTERM) };
        let status = dev.wait().expect("calm dev stops");
        assert!(status.success(), "{status}");
    };
    /// Kills a `calm dev` left running by a failed assertion (its nodes follow it).
    struct KillOnDrop(Option<std::process::Child>);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if let Some(mut dev) = self.0.take() {
                let _ = dev.kill();
                let _ = dev.wait();
            }
        }
    }

    let mut guard = KillOnDrop(Some(start()));
    let dev = guard.0.as_mut().unwrap();
    let text = await_ready(dev);
    assert!(text.contains("a new 3-node cluster"), "{text}");
    let endpoints = format!(
        "export CALM_ENDPOINTS=127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}",
        base + 1,
        base + 2,
        base + 3
    );
    assert!(text.contains(&endpoints), "{text}");
    let log = data.join("node-1.log");
    let log_bytes = std::fs::metadata(&log).unwrap().len();
    let (ok, _, err) = calm(&[
        "dev",
        "--data-dir",
        &data_arg,
        "--base-port",
        &base.to_string(),
    ]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "is in use by another calm process (PID {})",
            dev.id()
        )),
        "{err}"
    );
    assert!(
        std::fs::metadata(&log).unwrap().len() >= log_bytes,
        "the running cluster's log was truncated"
    );
    let (ok, out, err) = calm(&[
        "put",
        "greeting",
        "hello",
        "--endpoints",
        &format!("127.0.0.1:{}", base + 2),
    ]);
    assert!(ok, "{out}{err}");
    stop(dev);
    guard.0 = None;

    let mut guard = KillOnDrop(Some(start()));
    let dev = guard.0.as_mut().unwrap();
    let text = await_ready(dev);
    assert!(
        text.contains("continuing the cluster") && text.contains("nodes 1, 2, 3"),
        "{text}"
    );
    assert!(
        std::fs::read_to_string(&log).unwrap().len() as u64 > log_bytes,
        "the log of the first run is gone"
    );
    stop(dev);
    guard.0 = None;

    let (ok, _, err) = calm(&[
        "dev",
        "--data-dir",
        &data_arg,
        "--base-port",
        &base.to_string(),
        "--nodes",
        "5",
    ]);
    assert!(!ok);
    assert!(
        err.contains("was created with the members") && err.contains("node 4 is not a member"),
        "{err}"
    );
    assert!(!data.join("node-4").exists(), "node 4 was started");
}

/// A data directory keeps the data group count it was created with: a node told another
/// count refuses to start and names both, instead of looking for its keys in other groups.
#[test]
fn a_node_refuses_a_data_group_count_its_directory_was_not_created_with() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("node-1");
    std::fs::create_dir(&data).expect("create the data directory");
    std::fs::write(
        data.join(calm::cluster_record::CLUSTER_RECORD_FILE),
        "data_groups = 5\n",
    )
    .expect("write the record");
    let log = dir.path().join("node-1.log");
    let mut node = Command::new(env!("CARGO_BIN_EXE_calm"))
        .args(["serve", "--id", "1", "--data-dir", data.to_str().unwrap()])
        .args(["--client-addr", "127.0.0.1:0", "--peer-addr", "127.0.0.1:0"])
        .args(["--http-addr", "127.0.0.1:0"])
        .args(["--member", "1=127.0.0.1:0,127.0.0.1:0"])
        .env("CALM_RAFT__DATA_GROUPS", "3")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create the log"))
        .spawn()
        .expect("calm binary runs");
    // Bounded: a node that wrongly accepted the count would serve until killed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = node.try_wait().expect("wait for the node") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            node.kill().expect("kill the node");
            node.wait().expect("reap the node");
            panic!(
                "the node started with another data group count: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(&log).expect("read the log");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("records 5 data groups") && err.contains("raft.data_groups = 3"),
        "{err}"
    );
    assert!(
        !data.join("wal").exists(),
        "the node stopped before opening its WAL"
    );
}

/// Without etcd, `calm bench compare` says so before it starts calm's half (minutes of work
/// that could not end in a comparison).
#[test]
fn bench_compare_without_etcd_stops_before_running_anything() {
    let out = Command::new(env!("CARGO_BIN_EXE_calm"))
        .args(["bench", "compare", "--seconds", "1"])
        .env("PATH", "")
        .output()
        .expect("calm binary runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("etcd is not installed") && err.contains("--systems calm"),
        "{err}"
    );
    assert!(
        !err.contains("cluster ready"),
        "calm was started first: {err}"
    );
}

/// `--help` names the limits the node enforces, and they are the kernel's.
#[test]
fn help_names_the_key_and_value_limits() {
    use calm_kernel::fact::{KEY_BYTES_MAX, PAYLOAD_BYTES_MAX};
    for command in ["put", "get", "cas", "sadd"] {
        let (ok, out, err) = calm(&[command, "--help"]);
        assert!(ok, "{err}");
        assert!(
            out.contains(&format!("Keys are 1 to {KEY_BYTES_MAX} bytes"))
                && out.contains(&format!("({PAYLOAD_BYTES_MAX} bytes)")),
            "{command}: {out}"
        );
        assert!(
            out.contains("Exit codes: 0 done; 1 refused"),
            "{command}: {out}"
        );
    }
}

/// A setting nobody gave is named by the flag that gives it.
#[test]
fn serve_names_the_flag_of_a_missing_setting() {
    let (ok, _, err) = calm(&["serve"]);
    assert!(!ok);
    assert!(err.contains("pass --id N"), "{err}");
    let (ok, _, err) = calm(&["serve", "--id", "1", "--data-dir", "/tmp/unused"]);
    assert!(!ok);
    assert!(err.contains("pass --client-addr"), "{err}");
    let (ok, _, err) = calm(&[
        "serve",
        "--id",
        "1",
        "--data-dir",
        "/tmp/unused",
        "--client-addr",
        "127.0.0.1:1",
        "--peer-addr",
        "127.0.0.1:2",
        "--http-addr",
        "127.0.0.1:3",
    ]);
    assert!(!ok);
    assert!(
        err.contains("pass --member ID=PEER_ADDR,CLIENT_ADDR"),
        "{err}"
    );
}
