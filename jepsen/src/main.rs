//! `calm-jepsen`: the harness's command line.
//!
//! - `calm-jepsen [test] --workload W --nemesis partition,kill --time 60`: one live run
//!   (needs root) writing a report directory; `--suite quick` runs every workload briefly;
//! - `calm-jepsen check`: check a recorded history with one of the checkers;
//! - `calm-jepsen edn`: export a history to EDN.
//!
//! Exit codes: 0 valid (for `--expect-invalid`: invalid), 1 invalid (or the unexpected
//! verdict), 3 unknown (a limit was hit); 2 is an error (unreadable history, bad arguments,
//! a run that could not happen), as for clap's usage errors.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use calm_jepsen::checker::bank::BankChecker;
use calm_jepsen::checker::bounded::BoundedChecker;
use calm_jepsen::checker::counter::{CounterChecker, ReadBound};
use calm_jepsen::checker::linearizable::{LinearizableChecker, SearchLimits};
use calm_jepsen::checker::lock::LockChecker;
use calm_jepsen::checker::session::SessionChecker;
use calm_jepsen::checker::set::SetChecker;
use calm_jepsen::checker::watch::WatchChecker;
use calm_jepsen::edn::{KeyStyle, write_edn};
use calm_jepsen::nemesis::{NemesisKind, Schedule};
use calm_jepsen::runner::{TestOptions, run_test};
use calm_jepsen::workload::Workload;
use calm_jepsen::{Checker, History, Validity};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "calm-jepsen",
    version,
    about = "Jepsen-style harness for calm",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand: a test run.
    #[command(flatten)]
    test: TestArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run a live test (needs root): nodes in network namespaces, a workload, a nemesis.
    Test(TestArgs),
    /// Check a history (JSON lines) and print the verdict.
    Check(CheckArgs),
    /// Export a history (JSON lines) as Jepsen EDN, one op map per line.
    Edn {
        history: PathBuf,
        /// Output file (default: stdout).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Put the key into the value as `[key value]`, as jepsen.independent does.
        #[arg(long)]
        independent: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CheckerName {
    /// Registers (read/write/cas/delete) are linearizable, per key.
    Linearizable,
    /// Counter adds and reads; final reads converge and conserve.
    Counter,
    /// Set adds, removes, reads: nothing lost, phantom or resurrected.
    Set,
    /// Bounded counter (escrow): never outside [min, max], conserving.
    Bounded,
    /// Session tokens: causal reads see the write whose token they pass.
    Session,
    /// Watch streams: every acknowledged write once, in order, across reconnects.
    Watch,
    /// Bank transfers: every snapshot of the accounts sums to the opening total, none
    /// negative, none missing; final balances conserve.
    Bank,
    /// A lease-based lock: fencing tokens increase, no two holders at once, fenced writes
    /// only for the current holder.
    Lock,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Suite {
    /// Every workload for 15 s with every nemesis (CI).
    Quick,
    /// Every workload for --time with the chosen nemeses (long runs).
    Full,
    /// The injected node bugs, each of which its checker must catch (--expect-invalid).
    Faults,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Strict,
    Hybrid,
}

#[derive(clap::Args, Clone)]
struct TestArgs {
    /// The workload (required unless --suite).
    #[arg(long, value_enum, required_unless_present = "suite")]
    workload: Option<Workload>,
    /// Several workloads in a row.
    #[arg(long, value_enum, conflicts_with = "workload")]
    suite: Option<Suite>,
    /// Faults: partition, kill, pause, clock, rules (comma-separated), all or none.
    #[arg(long, default_value = "all")]
    nemesis: String,
    /// Seconds of load and faults (a quick suite uses 15 per workload).
    #[arg(long, default_value_t = 60)]
    time: u64,
    /// Nodes (3 to 9).
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Concurrent client workers (keep it <= 10: one key's linearizability search grows
    /// with its concurrent clients).
    #[arg(long, default_value_t = 10)]
    concurrency: usize,
    /// Seed of every random choice; printed at start (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Safety mode the workload's keys start in.
    #[arg(long, value_enum, default_value = "hybrid")]
    mode: ModeArg,
    /// Test-only node bug (`stale-reads`, `drop-acked-writes[=F]`, `drop-watch-event[=N]`,
    /// `txn-drop-op[=N]`, `lease-early-expiry[=FACTOR]`); repeatable.
    #[arg(long)]
    fault: Vec<String>,
    /// Pass (exit 0) only if the checker finds the history invalid.
    #[arg(long)]
    expect_invalid: bool,
    /// The calm binary (default: next to this one, else target/release/calm).
    #[arg(long, env = "CALM_BIN")]
    binary: Option<PathBuf>,
    /// Where report directories go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/store"))]
    store: PathBuf,
    /// Deadline of every client call, ms.
    #[arg(long, default_value_t = 2000)]
    op_timeout_ms: u64,
    /// Most ops per worker.
    #[arg(long, default_value_t = 100_000)]
    max_ops: u64,
    /// Pause between one worker's ops, ms.
    #[arg(long, default_value_t = 10)]
    think_ms: u64,
    /// Keep the nodes' data directories in the report.
    #[arg(long)]
    keep_data: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReadBoundArg {
    /// Reads may miss any add not yet acknowledged to them (fast-path counters).
    Eventual,
    /// Reads include every add acknowledged before they began (strict keys).
    Linearizable,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// History file, one JSON op per line.
    history: PathBuf,
    #[arg(long, value_enum)]
    checker: CheckerName,
    /// Print the verdict as JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Initial value of counters and bounded counters (default 0), or each bank account's
    /// opening balance (default 100, as the bank workload opens them).
    #[arg(long, allow_negative_numbers = true)]
    initial: Option<i64>,
    /// Bank: the number of accounts, `{jbank}:acct-0` on (the bank workload's keys).
    #[arg(long, default_value_t = calm_jepsen::bank::ACCOUNTS)]
    accounts: u64,
    /// Lower bound (bounded checker).
    #[arg(
        long,
        allow_negative_numbers = true,
        required_if_eq("checker", "bounded")
    )]
    min: Option<i64>,
    /// Upper bound (bounded checker).
    #[arg(
        long,
        allow_negative_numbers = true,
        required_if_eq("checker", "bounded")
    )]
    max: Option<i64>,
    /// What intermediate counter reads must reflect.
    #[arg(long, value_enum, default_value = "eventual")]
    reads: ReadBoundArg,
    /// Linearizability: wall-clock budget for the whole search, in seconds.
    #[arg(long, default_value_t = 300)]
    time_limit: u64,
    /// Linearizability: keys with more ops are not searched (unknown).
    #[arg(long, default_value_t = SearchLimits::default().max_ops_per_key)]
    max_ops_per_key: usize,
    /// Linearizability: search steps per key.
    #[arg(long, default_value_t = SearchLimits::default().max_steps_per_key)]
    max_steps_per_key: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CALM_JEPSEN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        None => test(cli.test),
        Some(Command::Test(args)) => test(args),
        Some(Command::Check(args)) => check(args),
        Some(Command::Edn {
            history,
            output,
            independent,
        }) => {
            let h = History::load(&history)?;
            let style = if independent {
                KeyStyle::IndependentTuple
            } else {
                KeyStyle::Field
            };
            match output {
                Some(path) => {
                    let file = File::create(&path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    write_edn(&h, file, style)
                }
                None => write_edn(&h, io::stdout().lock(), style),
            }
            .context("writing EDN")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check(args: CheckArgs) -> Result<ExitCode> {
    let history = History::load(&args.history)?;
    let reads = match args.reads {
        ReadBoundArg::Eventual => ReadBound::Eventual,
        ReadBoundArg::Linearizable => ReadBound::Linearizable,
    };
    let checker: Box<dyn Checker> = match args.checker {
        CheckerName::Linearizable => Box::new(LinearizableChecker {
            limits: SearchLimits {
                max_ops_per_key: args.max_ops_per_key,
                max_steps_per_key: args.max_steps_per_key,
                time_limit: Some(Duration::from_secs(args.time_limit)),
                ..SearchLimits::default()
            },
            ..LinearizableChecker::default()
        }),
        CheckerName::Counter => Box::new(CounterChecker {
            initial: args.initial.unwrap_or(0),
            reads,
            ..CounterChecker::default()
        }),
        CheckerName::Set => Box::new(SetChecker),
        CheckerName::Session => Box::new(SessionChecker),
        CheckerName::Watch => Box::new(WatchChecker),
        CheckerName::Lock => Box::new(LockChecker),
        CheckerName::Bank => Box::new(BankChecker::new(
            calm_jepsen::bank::account_keys(args.accounts),
            args.initial.unwrap_or(calm_jepsen::bank::INITIAL_BALANCE),
        )),
        CheckerName::Bounded => {
            let (Some(min), Some(max)) = (args.min, args.max) else {
                anyhow::bail!("--checker bounded needs --min and --max");
            };
            let mut c = BoundedChecker::new(min, max, args.initial.unwrap_or(0));
            c.reads = reads;
            Box::new(c)
        }
    };
    let verdict = checker
        .check(&history)
        .with_context(|| format!("checking {}", args.history.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&verdict)?);
    } else {
        print!("{verdict}");
    }
    Ok(match verdict.valid {
        Validity::Valid => ExitCode::SUCCESS,
        Validity::Invalid => ExitCode::from(1),
        Validity::Unknown => ExitCode::from(3),
    })
}

/// The node binary: --binary / CALM_BIN, else `calm` next to this executable (both in
/// target/release under `cargo run --release`), else the workspace's target/release/calm.
fn node_binary(arg: Option<PathBuf>) -> PathBuf {
    if let Some(b) = arg {
        return b;
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(sibling) = exe.parent().map(|d| d.join("calm"))
        && sibling.exists()
    {
        return sibling;
    }
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/release/calm"
    ))
}

fn options(args: &TestArgs, workload: Workload, seed: u64) -> Result<TestOptions> {
    let nemesis = NemesisKind::parse_list(&args.nemesis).map_err(anyhow::Error::msg)?;
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    Ok(TestOptions {
        workload,
        nemesis,
        time: Duration::from_secs(args.time),
        nodes: args.nodes,
        concurrency: args.concurrency,
        seed,
        mode: match args.mode {
            ModeArg::Strict => "strict",
            ModeArg::Hybrid => "hybrid",
        },
        faults: args.fault.clone(),
        expect_invalid: args.expect_invalid,
        binary: node_binary(args.binary.clone()),
        store: args.store.clone(),
        op_timeout: Duration::from_millis(args.op_timeout_ms),
        max_ops_per_worker: args.max_ops,
        think: Duration::from_millis(args.think_ms),
        schedule: Schedule::default(),
        keep_data: args.keep_data,
        converge_limit: Duration::from_secs(60),
    })
}

/// The runs of a suite (or the one run of --workload).
fn plan(args: &TestArgs, seed: u64) -> Result<Vec<TestOptions>> {
    let Some(suite) = args.suite else {
        let workload = args.workload.context("--workload or --suite is required")?;
        return Ok(vec![options(args, workload, seed)?]);
    };
    let mut runs = Vec::new();
    match suite {
        Suite::Quick | Suite::Full => {
            for (i, w) in Workload::ALL.into_iter().enumerate() {
                let mut o = options(args, w, seed.wrapping_add(i as u64))?;
                if suite == Suite::Quick {
                    o.time = Duration::from_secs(15);
                    o.converge_limit = Duration::from_secs(30);
                }
                runs.push(o);
            }
        }
        Suite::Faults => {
            // Stale reads show once a deposed or partitioned node serves reads; lost writes
            // show in the final reads.
            let mut stale = options(args, Workload::Register, seed)?;
            stale.nemesis = vec![NemesisKind::Partition];
            stale.faults = vec!["stale-reads".into()];
            let mut dropped = options(args, Workload::Counter, seed.wrapping_add(1))?;
            dropped.nemesis = Vec::new();
            dropped.faults = vec!["drop-acked-writes=0.05".into()];
            let mut dropped_set = options(args, Workload::Set, seed.wrapping_add(2))?;
            dropped_set.nemesis = Vec::new();
            dropped_set.faults = vec!["drop-acked-writes=0.05".into()];
            // One event left out of one stream: a gap every reconnect keeps.
            let mut dropped_event = options(args, Workload::Watch, seed.wrapping_add(3))?;
            dropped_event.nemesis = Vec::new();
            dropped_event.faults = vec!["drop-watch-event=50".into()];
            // A transfer that debits and never credits: the next snapshot is short.
            let mut dropped_op = options(args, Workload::Bank, seed.wrapping_add(4))?;
            dropped_op.nemesis = Vec::new();
            dropped_op.faults = vec!["txn-drop-op=10".into()];
            // A lease clock 8 times too fast: leases end 0.5-1 s after their last renewal
            // instead of 3 s, and the next client takes the lock while its holder still
            // counts itself the holder. (At the default 4 they last 1-1.5 s, and renewals
            // every third of the TTL hide it: rarely caught without a nemesis.)
            let mut early_expiry = options(args, Workload::Lock, seed.wrapping_add(5))?;
            early_expiry.nemesis = Vec::new();
            early_expiry.faults = vec!["lease-early-expiry=8".into()];
            for o in [
                &mut stale,
                &mut dropped,
                &mut dropped_set,
                &mut dropped_event,
                &mut dropped_op,
                &mut early_expiry,
            ] {
                o.expect_invalid = true;
                o.time = Duration::from_secs(args.time.min(20));
                o.converge_limit = Duration::from_secs(20);
            }
            runs.extend([
                stale,
                dropped,
                dropped_set,
                dropped_event,
                dropped_op,
                early_expiry,
            ]);
        }
    }
    Ok(runs)
}

fn test(args: TestArgs) -> Result<ExitCode> {
    if let Some(reason) = calm_jepsen::cluster::unsupported() {
        bail!("{reason}");
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!("calm-jepsen seed {seed} (replay with --seed {seed})");
    let runs = plan(&args, seed)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let stop = Arc::new(AtomicBool::new(false));
    runtime.block_on(async {
        let s = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: stopping the run and cleaning up");
                s.store(true, Ordering::Relaxed);
            }
        });
        let started = std::time::Instant::now();
        let mut worst = ExitCode::SUCCESS;
        let mut lines = Vec::new();
        for o in &runs {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let line = match run_test(o, stop.clone()).await {
                Ok(outcome) => {
                    if !outcome.passed {
                        worst = match outcome.valid {
                            Validity::Unknown if !o.expect_invalid => ExitCode::from(3),
                            _ => ExitCode::from(1),
                        };
                    }
                    format!(
                        "{:<9} {:<8} {:<5} {:>6.1} s  {}",
                        o.workload,
                        outcome.valid.to_string(),
                        if outcome.passed { "PASS" } else { "FAIL" },
                        outcome.duration.as_secs_f64(),
                        outcome.dir.display()
                    )
                }
                Err(e) => {
                    worst = ExitCode::from(2);
                    format!("{:<9} ERROR    {e:#}", o.workload)
                }
            };
            println!("{line}");
            lines.push(line);
        }
        if runs.len() > 1 {
            println!(
                "\nsuite (seed {seed}) took {:.1} s:",
                started.elapsed().as_secs_f64()
            );
            for l in &lines {
                println!("  {l}");
            }
        }
        Ok(worst)
    })
}
