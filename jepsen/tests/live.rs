//! Live runs against real nodes (need root for network namespaces): the checkers must catch
//! the node's injected bugs, and find a healthy cluster's history valid. Skipped, with the
//! reason printed, where they cannot run.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// The harness allows one run at a time (it owns the calmj-* namespaces): tests take turns.
static ONE_RUN: Mutex<()> = Mutex::new(());

fn calm_binary() -> PathBuf {
    std::env::var_os("CALM_BIN").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/release/calm"
            ))
        },
        PathBuf::from,
    )
}

fn skip_reason() -> Option<String> {
    if let Some(r) = calm_jepsen::cluster::unsupported() {
        return Some(r);
    }
    // Probe (and release at once) the run lock: a run in progress owns the namespaces.
    if let Err(e) = calm_jepsen::cluster::RunLock::acquire() {
        return Some(e.to_string());
    }
    let bin = calm_binary();
    (!bin.exists()).then(|| {
        format!(
            "{} is missing: build it with `cargo build --release -p calm --bin calm` (or set CALM_BIN)",
            bin.display()
        )
    })
}

/// Run the harness with `args` (3 nodes, seed 11); its stdout if it passed (`None`: skipped).
fn run_passing(name: &str, args: &[&str], what: &str) -> Option<String> {
    let _turn = ONE_RUN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(reason) = skip_reason() {
        println!("SKIPPED {name}: {reason}");
        return None;
    }
    let store = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_calm-jepsen"))
        .arg("test")
        .args(args)
        .args(["--nodes", "3", "--seed", "11"])
        .arg("--binary")
        .arg(calm_binary())
        .arg("--store")
        .arg(store.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name}: {what} (exit {:?}):\n{stdout}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(stdout)
}

/// Run the harness with `args` and --expect-invalid; the run must pass (the bug was caught).
fn expect_caught(name: &str, args: &[&str]) {
    let args = [args, &["--expect-invalid"]].concat();
    let what = "the checker did not catch the injected bug";
    if let Some(stdout) = run_passing(name, &args, what) {
        assert!(
            stdout.contains("INVALID (invalid expected: PASS)"),
            "{stdout}"
        );
    }
}

/// Run the harness with `args` on healthy nodes; the history must be valid.
fn expect_valid(name: &str, args: &[&str]) {
    if let Some(stdout) = run_passing(name, args, "a healthy cluster's history is not valid") {
        assert!(stdout.contains(": valid\n"), "{stdout}");
    }
}

#[test]
fn stale_reads_make_the_register_history_non_linearizable() {
    expect_caught(
        "stale-reads",
        &[
            "--workload",
            "register",
            "--nemesis",
            "partition",
            "--fault",
            "stale-reads",
            "--time",
            "15",
        ],
    );
}

#[test]
fn dropped_acknowledged_adds_break_counter_conservation() {
    expect_caught(
        "drop-acked-writes",
        &[
            "--workload",
            "counter",
            "--nemesis",
            "none",
            "--fault",
            "drop-acked-writes=0.05",
            "--time",
            "8",
        ],
    );
}

#[test]
fn a_dropped_watch_event_is_a_gap_the_watch_checker_finds() {
    expect_caught(
        "drop-watch-event",
        &[
            "--workload",
            "watch",
            "--nemesis",
            "none",
            "--fault",
            "drop-watch-event=50",
            "--time",
            "8",
        ],
    );
}

#[test]
fn bank_transfers_under_every_nemesis_keep_the_total() {
    expect_valid(
        "bank",
        &["--workload", "bank", "--nemesis", "all", "--time", "15"],
    );
}

#[test]
fn a_transfer_that_loses_its_credit_breaks_the_bank_total() {
    expect_caught(
        "txn-drop-op",
        &[
            "--workload",
            "bank",
            "--nemesis",
            "none",
            "--fault",
            "txn-drop-op=10",
            "--time",
            "8",
        ],
    );
}

#[test]
fn lock_holders_under_every_nemesis_never_overlap() {
    expect_valid(
        "lock",
        &["--workload", "lock", "--nemesis", "all", "--time", "15"],
    );
}

#[test]
fn leases_that_expire_early_give_the_lock_two_holders() {
    expect_caught(
        "lease-early-expiry",
        &[
            "--workload",
            "lock",
            "--nemesis",
            "none",
            "--fault",
            "lease-early-expiry=8",
            "--time",
            "8",
        ],
    );
}
