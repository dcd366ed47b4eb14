//! `calm`: the node binary and its command-line interface.
//!
//! - `calm serve`: run one node (TOML config < `CALM_*` environment < flags);
//! - `calm dev`: a local cluster of `serve` processes with the embedded default rules;
//! - client commands (`put`, `get`, `del`, `cas`, `add`, `set`, `max`, `sadd`, `srem`,
//!   `smembers`, `status`, `explain`, `rules get`, `checkpoint`) against any node;
//! - offline rules tools (`rules check`, `rules explain --rules FILE`, `rules example`).

mod debug;

/// glibc's malloc took ~16% of a node's CPU under Batch load (fragmented free lists:
/// `malloc_consolidate`, `unlink_chunk`); every fact allocates a few short-lived buffers.
/// Built without transparent huge pages: with them, purged arena memory came back as 2 MiB
/// pages zeroed on each fault, a third of a receiving node's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result, bail};
use calm::api::pb;
use calm::client::{self, Output};
use calm::config::{Member, NodeConfig, Overrides};
use calm::node::DEFAULT_RULES;
use calm_kernel::rules::{CompiledRules, RuleSet, Severity};
use clap::{Args, Parser, Subcommand, ValueEnum};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use std::io::Write;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "calm",
    version,
    about = "A replicated key-value store that coordinates only when the algebra requires it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where client commands connect, and how they print.
#[derive(Args, Clone)]
struct ClientArgs {
    /// Nodes to try, in order (host:port of their client API).
    #[arg(long, env = "CALM_ENDPOINTS", value_delimiter = ',', default_value = client::DEFAULT_ENDPOINT, global = true)]
    endpoints: Vec<String>,
    #[arg(short = 'w', long = "write-out", value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
}

/// A write command's connection plus an optional session token.
#[derive(Args, Clone)]
struct WriteArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Session token (hex, from `-w json` output of an earlier read or write): the node
    /// applies what it names before taking this write, so e.g. `srem` removes an element
    /// added elsewhere moments ago.
    #[arg(long)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node.
    Serve(ServeArgs),
    /// Run a local cluster (default 3 nodes on 127.0.0.1, data under ./calm-data).
    Dev {
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[arg(long, default_value = "calm-data")]
        data_dir: PathBuf,
        /// Node i serves clients on base+i, peers on base+100+i, HTTP on base+200+i.
        #[arg(long, default_value_t = 7000)]
        base_port: u16,
        /// Rules the cluster starts with; the embedded example rules otherwise.
        #[arg(long)]
        rules: Option<PathBuf>,
    },
    /// Write a register.
    Put {
        key: String,
        value: String,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Read a key.
    Get {
        key: String,
        #[arg(long, value_enum, default_value_t = ConsistencyArg::Linearizable)]
        consistency: ConsistencyArg,
        /// Session token (hex, from `-w json` output) for --consistency causal.
        #[arg(long)]
        token: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a register.
    Del {
        key: String,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Compare-and-set a register: write VALUE (or delete) only if it matches the expectation.
    Cas {
        key: String,
        /// The new value (omit with --delete).
        value: Option<String>,
        /// Expect this version (0: the key does not exist).
        #[arg(long, conflicts_with_all = ["expect_value", "expect_absent"])]
        expect_version: Option<u64>,
        /// Expect this current value.
        #[arg(long, conflicts_with = "expect_absent")]
        expect_value: Option<String>,
        /// Expect the key not to exist.
        #[arg(long)]
        expect_absent: bool,
        #[arg(long)]
        delete: bool,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Add to a counter or bounded counter (negative to subtract).
    Add {
        key: String,
        #[arg(allow_hyphen_values = true)]
        delta: i64,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Set a counter or bounded counter (through Raft).
    Set {
        key: String,
        #[arg(allow_hyphen_values = true)]
        value: i64,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Raise a max register.
    Max {
        key: String,
        #[arg(allow_hyphen_values = true)]
        value: i64,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Add elements to a set.
    Sadd {
        key: String,
        #[arg(required = true)]
        elements: Vec<String>,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Remove elements from a set (through Raft).
    Srem {
        key: String,
        #[arg(required = true)]
        elements: Vec<String>,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// List a set's elements.
    Smembers {
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Members, groups, leaders and lag as a node sees them.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// How the cluster classifies keys: rule, mode, type, group and leader.
    Explain {
        #[arg(required = true)]
        keys: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Take a checkpoint on a node now.
    Checkpoint {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Load a running cluster and report throughput and latency percentiles; `calm bench
    /// compare` starts calm and etcd clusters itself and runs the same workloads on both.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Bench {
        #[command(subcommand)]
        compare: Option<BenchCommand>,
        #[arg(value_enum, required = true)]
        workload: Option<calm::bench::Workload>,
        /// Calls in all (each a batch for `batch`).
        #[arg(long, default_value_t = 10_000)]
        ops: u64,
        /// Clients in flight, spread over the endpoints.
        #[arg(long, default_value_t = 1)]
        concurrency: u64,
        /// Stop after this many seconds even if ops remain.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Distinct keys.
        #[arg(long, default_value_t = 1000)]
        keys: u64,
        /// Ops per call for `batch`.
        #[arg(long, default_value_t = 100)]
        batch: u64,
        /// Where each call goes: `leader` sends it to its key's group leader (calm's
        /// leader-aware client); `spread` to the client's own node, which forwards.
        #[arg(long, value_enum, default_value_t = calm::bench::Route::Leader)]
        route: calm::bench::Route,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Safety rules: which keys are strict, hybrid or available, and their types.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Look inside a stopped node's data directory (read-only): the store's position, key
    /// states, facts in the archive and the WAL, Raft entries.
    Debug {
        #[command(subcommand)]
        command: debug::DebugCommand,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file (flags and CALM_* variables override it).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    id: Option<u64>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    client_addr: Option<std::net::SocketAddr>,
    #[arg(long)]
    peer_addr: Option<std::net::SocketAddr>,
    #[arg(long)]
    http_addr: Option<std::net::SocketAddr>,
    /// A member as ID=PEER_ADDR,CLIENT_ADDR; repeat for each (this node included).
    #[arg(long = "member", value_parser = Member::parse)]
    members: Vec<Member>,
    /// Rules file the cluster starts with; the embedded example rules otherwise.
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Async worker threads (0: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Test-only: inject a bug the Jepsen harness must catch (see src/faults.rs).
    #[arg(long, hide = true)]
    fault: Vec<String>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Start a local 3-node calm cluster and a local 3-member etcd cluster (one after the
    /// other, on 127.X.Y.Z addresses, data in a temp dir), run the same workloads on both and
    /// print them side by side with ratios. Needs `etcd` on the PATH (scripts/bench installs
    /// it) and root for the partition workload (iptables).
    Compare {
        /// Systems to run, in this order.
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = [calm::bench::compare::System::Calm, calm::bench::compare::System::Etcd])]
        systems: Vec<calm::bench::compare::System>,
        /// Where calls go: `leader` to the member leading the key (calm's leader-aware
        /// client; etcd's leader), `spread` round-robin over the members, which forward.
        #[arg(long, value_enum, default_value_t = calm::bench::Route::Leader)]
        route: calm::bench::Route,
        /// Workloads to run, in this order (default: all).
        #[arg(long, value_enum, value_delimiter = ',')]
        workloads: Vec<calm::bench::compare::Workload>,
        /// Time bound of each workload.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Fraction of each workload's call count (e.g. 0.1 for a quick smoke run).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Increments during the partition, both sides together (also bounded by its length).
        #[arg(long, default_value_t = 100_000)]
        partition_facts: u64,
        /// How long node 3 stays cut off.
        #[arg(long, default_value_t = 10)]
        partition_seconds: u64,
        /// Seconds to wait after each cluster is ready before loading it (to attach perf to
        /// the PIDs printed on stderr).
        #[arg(long, default_value_t = 0)]
        wait_before_load: u64,
        /// Client connections per workload, shared by its tasks (task t uses set t mod N);
        /// 0: one per task, so 64 in flight means 64 connections. The same for both systems.
        #[arg(long, default_value_t = 0)]
        connections: u64,
        /// Print the table as Markdown.
        #[arg(long)]
        markdown: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ConsistencyArg {
    Linearizable,
    Serializable,
    Causal,
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Validate a rules file: errors (refused by the cluster) and warnings (rules that can
    /// never match). Exits non-zero on errors.
    Check {
        /// TOML rules file; the embedded example rules when omitted.
        file: Option<PathBuf>,
        #[arg(short = 'w', long = "write-out", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Explain which rule each key matches, with its mode, type and bounds (offline; use
    /// `calm explain` to ask the cluster).
    Explain {
        #[arg(required = true)]
        keys: Vec<String>,
        /// TOML rules file; the embedded example rules when omitted.
        #[arg(long)]
        rules: Option<PathBuf>,
        #[arg(short = 'w', long = "write-out", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print the embedded example rules (a starting point for your own file).
    Example,
    /// The rules in force on the cluster, with their version.
    Get {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Replace the cluster's rules with a file; refused unless the rules in force are still
    /// at --expected-version (see `calm rules get`), so no one else's change is undone.
    Set {
        file: PathBuf,
        #[arg(long)]
        expected_version: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Cancelled on Ctrl-C or SIGTERM.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        t.cancel();
    });
    token
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CALM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

/// `calm serve` builds its runtime from the configuration (the thread count is a setting).
fn serve(args: ServeArgs) -> Result<()> {
    init_tracing();
    calm::faults::install(&args.fault).map_err(anyhow::Error::msg)?;
    let overrides = Overrides {
        id: args.id,
        data_dir: args.data_dir,
        client_addr: args.client_addr,
        peer_addr: args.peer_addr,
        http_addr: args.http_addr,
        members: (!args.members.is_empty()).then_some(args.members),
        rules_file: args.rules,
        threads: args.threads,
    };
    let config = NodeConfig::load(args.config.as_deref(), overrides)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.threads > 0 {
        runtime.worker_threads(config.threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = shutdown_on_signals();
        let running = calm::node::Node::start(config, shutdown).await?;
        tracing::info!(
            node = running.node.id(),
            client = %running.node.config.client_addr,
            peer = %running.node.config.peer_addr,
            http = %running.node.config.http_addr,
            "serving"
        );
        running.wait().await;
        Ok(())
    })
}

fn bytes(s: String) -> Vec<u8> {
    s.into_bytes()
}

/// Client write commands: each op in turn, stopping at the first error.
async fn writes(
    args: WriteArgs,
    key: &str,
    ops: impl IntoIterator<Item = pb::op::Kind>,
) -> Result<()> {
    let token = args
        .token
        .as_deref()
        .map(client::parse_hex)
        .transpose()?
        .unwrap_or_default();
    for op in ops {
        client::write(&args.client.endpoints, key, op, &token, args.client.output).await?;
    }
    Ok(())
}

/// An error and its causes on one line, skipping a cause its wrapper already quotes.
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // `calm status | head` must end quietly when the pipe closes, like other CLI tools. Not
    // the server, the local cluster or the bench: a write to a socket its peer closed (a
    // node resumed after SIGSTOP) must be an error to handle, never the end of the process.
    if !matches!(
        cli.command,
        Command::Serve(_) | Command::Dev { .. } | Command::Bench { .. }
    ) {
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Debug { command } => debug::run(command),
        command => tokio::runtime::Runtime::new()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(run(command))),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain, without a backtrace: users need the reason, not our stack.
            // Not `eprintln!`, which panics when stderr cannot be written (a node's log on a
            // full disk): the exit code must still say "failed", not "panicked".
            let _ = writeln!(std::io::stderr(), "calm: error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<()> {
    use pb::op::Kind;
    match command {
        Command::Serve(_) => unreachable!("serve builds its own runtime"),
        Command::Debug { .. } => unreachable!("debug needs no runtime"),
        Command::Dev {
            nodes,
            data_dir,
            base_port,
            rules,
        } => {
            calm::dev::run(
                calm::dev::DevOptions {
                    nodes,
                    data_dir,
                    base_port,
                    rules,
                },
                shutdown_on_signals(),
            )
            .await
        }
        Command::Put { key, value, client } => {
            let value = bytes(value);
            writes(client, &key, [Kind::Put(pb::Put { value })]).await
        }
        Command::Get {
            key,
            consistency,
            token,
            client,
        } => {
            let consistency = match consistency {
                ConsistencyArg::Linearizable => pb::Consistency::Linearizable,
                ConsistencyArg::Serializable => pb::Consistency::Serializable,
                ConsistencyArg::Causal => pb::Consistency::Causal,
            };
            let token = token
                .as_deref()
                .map(client::parse_hex)
                .transpose()?
                .unwrap_or_default();
            client::get(&client.endpoints, &key, consistency, token, client.output).await
        }
        Command::Del { key, client } => writes(client, &key, [Kind::Delete(pb::Delete {})]).await,
        Command::Cas {
            key,
            value,
            expect_version,
            expect_value,
            expect_absent,
            delete,
            client,
        } => {
            use pb::cas::Expect;
            let expect = match (expect_version, expect_value, expect_absent) {
                (Some(v), None, false) => Expect::Version(v),
                (None, Some(v), false) => Expect::Value(bytes(v)),
                (None, None, true) => Expect::Absent(true),
                _ => bail!(
                    "say what to expect: --expect-version N, --expect-value V or --expect-absent"
                ),
            };
            if delete == value.is_some() {
                bail!("give either a new VALUE or --delete");
            }
            let op = pb::Cas {
                expect: Some(expect),
                new_value: value.map(bytes).unwrap_or_default(),
                delete,
            };
            writes(client, &key, [Kind::Cas(op)]).await
        }
        Command::Add { key, delta, client } => {
            writes(client, &key, [Kind::Add(pb::Add { delta })]).await
        }
        Command::Set { key, value, client } => {
            writes(client, &key, [Kind::SetValue(pb::SetValue { value })]).await
        }
        Command::Max { key, value, client } => {
            writes(client, &key, [Kind::Raise(pb::Raise { value })]).await
        }
        Command::Sadd {
            key,
            elements,
            client,
        } => {
            let ops = elements
                .into_iter()
                .map(|e| Kind::SetAdd(pb::SetAdd { element: bytes(e) }));
            writes(client, &key, ops).await
        }
        Command::Srem {
            key,
            elements,
            client,
        } => {
            let ops = elements
                .into_iter()
                .map(|e| Kind::SetRemove(pb::SetRemove { element: bytes(e) }));
            writes(client, &key, ops).await
        }
        Command::Smembers { key, client } => {
            client::get(
                &client.endpoints,
                &key,
                pb::Consistency::Linearizable,
                Vec::new(),
                client.output,
            )
            .await
        }
        Command::Status { client } => client::status(&client.endpoints, client.output).await,
        Command::Explain { keys, client } => {
            client::explain(&client.endpoints, &keys, client.output).await
        }
        Command::Checkpoint { client } => client::checkpoint(&client.endpoints).await,
        Command::Bench {
            compare: Some(compare),
            ..
        } => bench_compare(compare).await,
        Command::Bench {
            compare: None,
            workload,
            ops,
            concurrency,
            seconds,
            keys,
            batch,
            route,
            client,
        } => {
            let workload = workload.context("name a workload, or `compare`")?;
            let report = calm::bench::run(
                &client.endpoints,
                calm::bench::BenchOptions {
                    workload,
                    route,
                    ops,
                    concurrency,
                    duration: std::time::Duration::from_secs(seconds),
                    keys,
                    batch,
                },
            )
            .await?;
            calm::bench::print(
                workload,
                concurrency,
                &report,
                client.output == Output::Json,
            );
            Ok(())
        }
        Command::Rules { command } => match command {
            RulesCommand::Check { file, output } => rules_check(file.as_deref(), output),
            RulesCommand::Explain {
                keys,
                rules,
                output,
            } => rules_explain(&keys, rules.as_deref(), output),
            RulesCommand::Example => {
                print!("{DEFAULT_RULES}");
                Ok(())
            }
            RulesCommand::Get { client } => {
                client::rules_get(&client.endpoints, client.output).await
            }
            RulesCommand::Set {
                file,
                expected_version,
                client,
            } => client::rules_set(&client.endpoints, &file, expected_version, client.output).await,
        },
    }
}

/// `calm bench compare`, stopped early (every process it started stopped too: dropping the
/// future drops the clusters) on Ctrl-C or SIGTERM.
async fn bench_compare(command: BenchCommand) -> Result<()> {
    use calm::bench::compare;
    let BenchCommand::Compare {
        systems,
        route,
        workloads,
        seconds,
        scale,
        partition_facts,
        partition_seconds,
        wait_before_load,
        connections,
        markdown,
    } = command;
    if !(scale > 0.0 && scale <= 1.0) {
        bail!("--scale must be within (0, 1]");
    }
    if seconds == 0 || seconds > 600 || partition_seconds > 600 {
        bail!("--seconds and --partition-seconds must be within 1..=600");
    }
    if connections > calm::bench::CONCURRENCY_MAX {
        bail!(
            "--connections must be within 0..={} (0: one per task)",
            calm::bench::CONCURRENCY_MAX
        );
    }
    let options = compare::CompareOptions {
        systems,
        route,
        workloads: if workloads.is_empty() {
            compare::ALL_WORKLOADS.to_vec()
        } else {
            workloads
        },
        seconds,
        scale,
        partition_facts,
        partition_seconds,
        wait_before_load: std::time::Duration::from_secs(wait_before_load),
        connections,
        markdown,
    };
    let exe = std::env::current_exe().context("cannot find the calm binary itself")?;
    let shutdown = shutdown_on_signals();
    tokio::select! {
        r = compare::run(&exe, options) => r,
        _ = shutdown.cancelled() => bail!("interrupted; the clusters were stopped"),
    }
}

fn load_rules(file: Option<&Path>) -> Result<RuleSet> {
    let (text, origin) = match file {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read rules file {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (
            DEFAULT_RULES.to_string(),
            "the embedded example rules".to_string(),
        ),
    };
    toml::from_str(&text).with_context(|| {
        format!("{origin} is not a valid rules file; see `calm rules example` for the format")
    })
}

fn compile(rules: &RuleSet) -> Result<CompiledRules> {
    rules
        .compile()
        .context("the rules have errors; run `calm rules check` on the file to see them all")
}

fn rules_check(file: Option<&Path>, output: Output) -> Result<()> {
    let rules = load_rules(file)?;
    let problems = rules.validate();
    match output {
        Output::Json => {
            let rows: Vec<_> = problems
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "rule": p.rule_index + 1,
                        "pattern": p.pattern,
                        "severity": match p.severity() { Severity::Error => "error", Severity::Warning => "warning" },
                        "message": p.to_string(),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Output::Table => {
            if problems.is_empty() {
                println!(
                    "{} rules, default mode {}: no problems",
                    rules.rules.len(),
                    rules.default_mode
                );
            } else {
                let mut table = Table::new();
                table
                    .load_preset(UTF8_FULL_CONDENSED)
                    .set_content_arrangement(ContentArrangement::Dynamic)
                    .set_header(["rule", "severity", "problem"]);
                for p in &problems {
                    let severity = match p.severity() {
                        Severity::Error => "error",
                        Severity::Warning => "warning",
                    };
                    table.add_row([
                        format!("#{}", p.rule_index + 1),
                        severity.to_string(),
                        p.to_string(),
                    ]);
                }
                println!("{table}");
            }
        }
    }
    let errors = problems.iter().filter(|p| p.is_error()).count();
    if errors > 0 {
        bail!("{errors} error(s) in the rules; the cluster would refuse them");
    }
    Ok(())
}

fn rules_explain(keys: &[String], file: Option<&Path>, output: Output) -> Result<()> {
    let rules = compile(&load_rules(file)?)?;
    let explanations: Vec<_> = keys.iter().map(|k| rules.explain(k.as_bytes())).collect();
    match output {
        Output::Json => {
            let rows: Vec<_> = explanations
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "key": String::from_utf8_lossy(&e.key),
                        "rule": e.rule_index.map(|i| i + 1),
                        "pattern": e.pattern,
                        "mode": e.mode,
                        "type": e.value_type,
                        "bounds": e.bounds,
                        "rules_version": e.rules_version,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Output::Table => {
            let mut table = Table::new();
            table
                .load_preset(UTF8_FULL_CONDENSED)
                .set_header(["key", "rule", "mode", "type", "bounds"]);
            for e in &explanations {
                table.add_row([
                    String::from_utf8_lossy(&e.key).into_owned(),
                    match e.rule_index {
                        Some(i) => format!("#{} '{}'", i + 1, e.pattern),
                        None => "default".to_string(),
                    },
                    e.mode.to_string(),
                    e.value_type
                        .map_or("set by first write".to_string(), |t| t.to_string()),
                    e.bounds.map_or(String::new(), |b| b.to_string()),
                ]);
            }
            println!("{table}");
        }
    }
    Ok(())
}
