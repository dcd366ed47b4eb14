//! `calm-jepsen`: the harness's command line. Today: check a recorded history with one of
//! the checkers, and export a history to EDN.
//!
//! Exit codes of `check`: 0 valid, 1 invalid, 3 unknown (a limit was hit); 2 is an error
//! (unreadable history, bad arguments), as for clap's usage errors.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use calm_jepsen::checker::bounded::BoundedChecker;
use calm_jepsen::checker::counter::{CounterChecker, ReadBound};
use calm_jepsen::checker::linearizable::{LinearizableChecker, SearchLimits};
use calm_jepsen::checker::set::SetChecker;
use calm_jepsen::edn::{KeyStyle, write_edn};
use calm_jepsen::{Checker, History, Validity};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "calm-jepsen", version, about = "Jepsen-style harness for calm")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Initial value of counters and bounded counters.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    initial: i64,
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
        Command::Check(args) => check(args),
        Command::Edn {
            history,
            output,
            independent,
        } => {
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
            initial: args.initial,
            reads,
            ..CounterChecker::default()
        }),
        CheckerName::Set => Box::new(SetChecker),
        CheckerName::Bounded => {
            let (Some(min), Some(max)) = (args.min, args.max) else {
                anyhow::bail!("--checker bounded needs --min and --max");
            };
            let mut c = BoundedChecker::new(min, max, args.initial);
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
