//! `calm bench` as an operator runs it against a real 3-node cluster: every workload
//! completes every call it was asked for, without errors, routed and spread. Only counts are
//! checked here; what the numbers are goes in docs/benchmarks.md.

mod support;

use std::process::Command;
use support::Cluster;

/// The JSON line `calm bench -w json WORKLOAD ...` prints.
fn bench(endpoints: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_calm"))
        .arg("bench")
        .args(args)
        .args(["--endpoints", endpoints, "-w", "json"])
        .args(["--keys", "20", "--seconds", "60"])
        .output()
        .expect("calm binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "calm bench {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_runs_every_call_without_errors() {
    let cluster = Cluster::start(3, &[]).await;
    let endpoints = cluster
        .nodes
        .iter()
        .map(|n| n.client.to_string())
        .collect::<Vec<_>>()
        .join(",");
    for workload in ["put", "get", "get-local", "cas", "add", "ping"] {
        for route in ["leader", "spread"] {
            let args = [
                workload,
                "--ops",
                "60",
                "--concurrency",
                "4",
                "--route",
                route,
            ];
            let report = bench(&endpoints, &args);
            assert_eq!(report["errors"], 0, "{args:?}: {report}");
            assert_eq!(report["ops"], 60, "{args:?}: {report}");
            assert_eq!(report["workload"], workload.replace('-', ""), "{report}");
        }
    }
    for (workload, ops) in [("batch", "adds"), ("batch-put", "puts")] {
        let report = bench(
            &endpoints,
            &[
                workload,
                "--ops",
                "8",
                "--concurrency",
                "2",
                "--batch",
                "10",
            ],
        );
        assert_eq!(report["errors"], 0, "{workload}: {report}");
        assert_eq!(report["ops"], 80, "8 calls of 10 {ops}: {report}");
    }
    // Watch fan-out: every put reaches every watcher, once.
    let args = [
        "watch",
        "--ops",
        "60",
        "--concurrency",
        "4",
        "--watchers",
        "7",
    ];
    let report = bench(&endpoints, &args);
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["ops"], 7 * 60, "60 puts to 7 watchers: {report}");
}
