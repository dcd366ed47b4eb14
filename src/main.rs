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
use calm::cli::{self, CliError, Exit};
use calm::client::{self, Output};
use calm::config::{Member, NodeConfig, Overrides};
use calm::node::DEFAULT_RULES;
use calm_kernel::rules::{CompiledRules, RuleSet, Severity};
use clap::{Args, Parser, Subcommand, ValueEnum};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
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
    /// table (for people) or json (one document on stdout, errors included).
    #[arg(short = 'w', long = "write-out", value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    /// Keys, values and elements are hex, on the command line and in the output.
    #[arg(long, global = true)]
    hex: bool,
}

impl ClientArgs {
    fn encoding(&self) -> cli::Encoding {
        cli::Encoding { hex: self.hex }
    }
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

/// The limits `--help` names: those of `calm_kernel::fact` (tests/cli.rs compares them).
const LIMITS: &str =
    "Keys are 1 to 4096 bytes; a value or set element is at most 1 MiB (1048576 bytes).";

/// The exit codes of client commands (`calm::cli`).
const EXIT_CODES: &str = "Exit codes: 0 done; 1 refused, missing or not applied; 2 bad command line or input; 3 no answer (unreachable, or UNAVAILABLE / DEADLINE_EXCEEDED: a write's outcome is unknown).";

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
    /// Write a register: VALUE, or - to read it from stdin, or --file.
    #[command(after_help = format!("{LIMITS}\n{EXIT_CODES}"))]
    Put {
        key: String,
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Attach the key to this lease (hex id from `calm lease grant`): it is deleted when
        /// the lease ends.
        #[arg(long)]
        lease: Option<String>,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Read a key (exit 1 when it does not exist).
    #[command(after_help = format!("{LIMITS}\n{EXIT_CODES}"))]
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
    /// Delete a key of any type, through its Raft group (a register in available mode:
    /// last-writer-wins). Exit 1, NOT FOUND, when there was nothing to delete. A deleted key
    /// can be written again with any type.
    ///
    /// With --prefix: delete every key starting with it (one Raft delete per key, not
    /// atomic), and print how many existed; exit 1 when none did.
    #[command(after_help = EXIT_CODES)]
    Del {
        #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
        key: Option<String>,
        /// Delete every key starting with this.
        #[arg(long)]
        prefix: Option<String>,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Keys starting with PREFIX (every key for ""), or in [PREFIX, --range-end), in key
    /// order with their values, one per line (-w json: one JSON document per line). Exit 1
    /// when there is none.
    #[command(after_help = EXIT_CODES)]
    Scan {
        #[arg(default_value = "")]
        prefix: String,
        /// Scan [PREFIX, RANGE_END) instead: PREFIX is then the first key.
        #[arg(long)]
        range_end: Option<String>,
        /// Print at most this many keys (0: all).
        #[arg(long, default_value_t = 0)]
        limit: u64,
        /// Keys only, without values.
        #[arg(long)]
        keys_only: bool,
        /// Print how many keys there are instead.
        #[arg(long)]
        count: bool,
        #[arg(long, value_enum, default_value_t = ConsistencyArg::Linearizable)]
        consistency: ConsistencyArg,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow changes of KEY (or with --prefix, of every key starting with it) as the node
    /// applies them, one line per event (-w json: one JSON document per line). The last
    /// token goes to stderr on exit; --from resumes after it on any node, with no event
    /// missed or repeated.
    #[command(after_help = EXIT_CODES)]
    Watch {
        #[arg(default_value = "")]
        key: String,
        /// Watch every key starting with KEY ("" with --prefix: every key).
        #[arg(long)]
        prefix: bool,
        /// Resume after this token (hex, from an earlier watch).
        #[arg(long)]
        from: Option<String>,
        /// Print each event's previous value too.
        #[arg(long)]
        prev: bool,
        /// Stop once this many events were printed (the rest of their response too); 0: never.
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Ask for a progress response after this many idle milliseconds (0: none).
        #[arg(long, default_value_t = 0)]
        progress_ms: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Leases: grant one, keep it alive, revoke it, see what remains of it, list them.
    /// Keys written with `--lease` are deleted when their lease ends (docs/leases.md).
    #[command(after_help = EXIT_CODES)]
    Lease {
        #[command(subcommand)]
        command: LeaseCommand,
    },
    /// Hold KEY as a lock while CMD runs (`calm lock jobs/nightly -- ./run.sh`): a lease and
    /// a compare-and-set; waits while another holder has it. CMD gets the lock's fencing
    /// token in CALM_LOCK_FENCING_TOKEN (it grows with every holder) and is stopped if the
    /// lease is lost. Exit: CMD's exit code, or 1 when the lock was lost (docs/leases.md).
    Lock {
        key: String,
        /// The lease's TTL: how long a crashed holder keeps the lock.
        #[arg(long, default_value = "10s")]
        ttl: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Campaign to lead KEY with VALUE: waits until elected, prints it, and leads until
    /// Ctrl-C (resigning) or until its lease is lost (exit 1). With --listen: print the
    /// leader now and at every change.
    Elect {
        key: String,
        #[arg(required_unless_present = "listen", conflicts_with = "listen")]
        value: Option<String>,
        #[arg(long)]
        listen: bool,
        /// The lease's TTL: how long a crashed leader keeps leading.
        #[arg(long, default_value = "10s")]
        ttl: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run a transaction read from FILE (or stdin, for - or no FILE): comparisons on keys of
    /// one subject, then the success ops if they all hold, else the failure ops, atomically
    /// (exit 1 when the failure branch ran). The syntax:
    ///
    ///   compare:                   # all must hold (exists, missing, type, version, value, counter)
    ///     value {u:7}:name = "ann"
    ///     counter {u:7}:credit 10..
    ///   success:                   # put, del, add, set, bounds, max, setmax, sadd, srem
    ///     add {u:7}:credit -10
    ///     sadd {u:7}:orders o-1
    ///   failure:
    ///     put {u:7}:note "no credit"
    ///
    /// See docs/txn.md for every clause and what a comparison observes.
    #[command(verbatim_doc_comment, after_help = format!("{LIMITS}\n{EXIT_CODES}"))]
    Txn {
        /// The transaction's text; - or nothing reads stdin.
        file: Option<PathBuf>,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Compare-and-set a register: write VALUE (or delete) only if it matches the expectation
    /// (exit 1 when it did not).
    #[command(after_help = format!("{LIMITS}\n{EXIT_CODES}"))]
    Cas {
        key: String,
        /// The new value, or - to read it from stdin (omit with --delete or --file).
        value: Option<String>,
        /// Read the new value from this file.
        #[arg(long)]
        file: Option<PathBuf>,
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
        /// Attach the key to this lease (hex id) when the new value is written.
        #[arg(long, conflicts_with = "delete")]
        lease: Option<String>,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Add to a counter or bounded counter (negative to subtract).
    #[command(after_help = EXIT_CODES)]
    Add {
        key: String,
        #[arg(allow_hyphen_values = true)]
        delta: i64,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Set a counter or bounded counter (through Raft).
    #[command(after_help = EXIT_CODES)]
    Set {
        key: String,
        #[arg(allow_hyphen_values = true)]
        value: i64,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Change a bounded counter's bounds [MIN, MAX] (through Raft; refused while the value or
    /// the nodes' escrow quota would not fit); `calm explain` shows them.
    #[command(after_help = EXIT_CODES)]
    Bounds {
        key: String,
        #[arg(allow_hyphen_values = true)]
        min: i64,
        #[arg(allow_hyphen_values = true)]
        max: i64,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Raise a max register.
    #[command(after_help = EXIT_CODES)]
    Max {
        key: String,
        #[arg(allow_hyphen_values = true)]
        value: i64,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Add elements to a set.
    #[command(after_help = format!("{LIMITS}\n{EXIT_CODES}"))]
    Sadd {
        key: String,
        #[arg(required = true)]
        elements: Vec<String>,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// Remove elements from a set (through Raft).
    #[command(after_help = format!("{LIMITS}\n{EXIT_CODES}"))]
    Srem {
        key: String,
        #[arg(required = true)]
        elements: Vec<String>,
        #[command(flatten)]
        client: WriteArgs,
    },
    /// List a set's elements.
    #[command(after_help = EXIT_CODES)]
    Smembers {
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Members, groups, leaders and lag as a node sees them; --cluster: one row per member.
    Status {
        /// Ask every member for its own status (id, addresses, version, keys, disk, leaders
        /// held, last contact, lag of each follower), like `etcdctl endpoint status --cluster`.
        #[arg(long)]
        cluster: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Whether every member is reachable and ready, with its lag; exit 1 when one is not
    /// (like `etcdctl endpoint health --cluster`).
    Health {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// How the cluster classifies keys: rule, mode, type, bounds, group and leader.
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
        /// Watch streams for `watch`.
        #[arg(long, default_value_t = 1000)]
        watchers: u64,
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
enum LeaseCommand {
    /// Grant a lease of TTL (500ms, 10s, 2m; a bare number is seconds) for the keys of one
    /// subject, given as --subject or as one of its keys (--key). Prints its hex id.
    Grant {
        ttl: String,
        #[arg(long, required_unless_present = "key", conflicts_with = "key")]
        subject: Option<String>,
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Keep a lease alive (renewing every third of its TTL) until interrupted; exit 1 once
    /// it no longer exists.
    Keepalive {
        id: String,
        /// Renew once and exit.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// End a lease now and delete its keys (exit 1 when it did not exist).
    Revoke {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A lease's TTL and what remains of it, linearizably (exit 1 when it does not exist).
    Ttl {
        id: String,
        /// List its keys too.
        #[arg(long)]
        keys: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Every lease, with its subject and key count.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
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
    // Colours only for a person at a terminal: a node's log file must hold plain text.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
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

/// Client write commands: each op in turn, stopping at the first not done.
async fn writes(
    args: &WriteArgs,
    key: &str,
    lease: Option<&str>,
    ops: impl FnOnce(cli::Encoding) -> Result<Vec<pb::op::Kind>, CliError>,
) -> Result<Exit> {
    let lease = lease.map(cli::lease::parse_id).transpose()?.unwrap_or(0);
    let enc = args.client.encoding();
    let key = enc.decode("key", key)?;
    let token = args
        .token
        .as_deref()
        .map(cli::parse_token)
        .transpose()?
        .unwrap_or_default();
    let ops = ops(enc)?;
    Ok(cli::kv::write(
        &args.client.endpoints,
        &key,
        ops,
        &token,
        lease,
        args.client.output,
        enc,
    )
    .await?)
}

async fn lease(command: LeaseCommand) -> Result<Exit> {
    use cli::lease;
    Ok(match command {
        LeaseCommand::Grant {
            ttl,
            subject,
            key,
            client,
        } => {
            let enc = client.encoding();
            let ttl = lease::parse_ttl(&ttl)?;
            let subject = subject.map(|s| enc.decode("subject", &s)).transpose()?;
            let key = key.map(|k| enc.decode("key", &k)).transpose()?;
            lease::grant(
                &client.endpoints,
                ttl,
                subject.unwrap_or_default(),
                key.unwrap_or_default(),
                client.output,
            )
            .await?
        }
        LeaseCommand::Keepalive { id, once, client } => {
            let id = lease::parse_id(&id)?;
            let stop = shutdown_on_signals();
            lease::keep_alive(&client.endpoints, id, once, client.output, stop).await?
        }
        LeaseCommand::Revoke { id, client } => {
            lease::revoke(&client.endpoints, lease::parse_id(&id)?, client.output).await?
        }
        LeaseCommand::Ttl { id, keys, client } => {
            let id = lease::parse_id(&id)?;
            lease::time_to_live(
                &client.endpoints,
                id,
                keys,
                client.encoding(),
                client.output,
            )
            .await?
        }
        LeaseCommand::List { client } => {
            lease::list(&client.endpoints, client.encoding(), client.output).await?
        }
    })
}

impl Command {
    /// How the command prints, errors included.
    fn output(&self) -> Output {
        use Command::*;
        let client = match self {
            Put { client, .. }
            | Del { client, .. }
            | Cas { client, .. }
            | Add { client, .. }
            | Set { client, .. }
            | Bounds { client, .. }
            | Max { client, .. }
            | Sadd { client, .. }
            | Srem { client, .. }
            | Txn { client, .. } => &client.client,
            Get { client, .. }
            | Scan { client, .. }
            | Watch { client, .. }
            | Smembers { client, .. }
            | Status { client, .. }
            | Health { client }
            | Explain { client, .. }
            | Checkpoint { client }
            | Bench { client, .. } => client,
            Rules {
                command: RulesCommand::Get { client } | RulesCommand::Set { client, .. },
            } => client,
            Lock { client, .. } | Elect { client, .. } => client,
            Lease {
                command:
                    LeaseCommand::Grant { client, .. }
                    | LeaseCommand::Keepalive { client, .. }
                    | LeaseCommand::Revoke { client, .. }
                    | LeaseCommand::Ttl { client, .. }
                    | LeaseCommand::List { client },
            } => client,
            Rules {
                command: RulesCommand::Check { output, .. } | RulesCommand::Explain { output, .. },
            } => return *output,
            _ => return Output::Table,
        };
        client.output
    }
}

fn init_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("cannot start the async runtime")
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
    let output = cli.command.output();
    let result = match cli.command {
        Command::Serve(args) => serve(args).map(|()| Exit::Done),
        Command::Debug { command } => debug::run(command).map(|()| Exit::Done),
        command => init_runtime().and_then(|rt| rt.block_on(run(command))),
    };
    match result {
        Ok(exit) => std::process::ExitCode::from(exit as u8),
        Err(e) => {
            // The whole chain, without a backtrace: users need the reason, not our stack.
            let e = CliError::of(&e);
            e.print(output);
            std::process::ExitCode::from(e.exit as u8)
        }
    }
}

fn consistency(arg: ConsistencyArg) -> pb::Consistency {
    match arg {
        ConsistencyArg::Linearizable => pb::Consistency::Linearizable,
        ConsistencyArg::Serializable => pb::Consistency::Serializable,
        ConsistencyArg::Causal => pb::Consistency::Causal,
    }
}

async fn run(command: Command) -> Result<Exit> {
    use pb::op::Kind;
    let done = |r: Result<()>| r.map(|()| Exit::Done);
    match command {
        Command::Serve(_) => unreachable!("serve builds its own runtime"),
        Command::Debug { .. } => unreachable!("debug needs no runtime"),
        Command::Dev {
            nodes,
            data_dir,
            base_port,
            rules,
        } => done(
            calm::dev::run(
                calm::dev::DevOptions {
                    nodes,
                    data_dir,
                    base_port,
                    rules,
                },
                shutdown_on_signals(),
            )
            .await,
        ),
        Command::Put {
            key,
            value,
            file,
            lease,
            client,
        } => {
            writes(&client, &key, lease.as_deref(), |enc| {
                let value = enc.value(value.as_deref(), file.as_deref())?;
                Ok(vec![Kind::Put(pb::Put { value })])
            })
            .await
        }
        Command::Get {
            key,
            consistency: c,
            token,
            client,
        } => {
            let enc = client.encoding();
            let key = enc.decode("key", &key)?;
            let token = token
                .as_deref()
                .map(cli::parse_token)
                .transpose()?
                .unwrap_or_default();
            let exit = cli::kv::get(
                &client.endpoints,
                &key,
                consistency(c),
                token,
                client.output,
                enc,
            )
            .await?;
            Ok(exit)
        }
        Command::Del {
            key: Some(key),
            client,
            ..
        } => {
            writes(&client, &key, None, |_| {
                Ok(vec![Kind::Delete(pb::Delete {})])
            })
            .await
        }
        Command::Del { prefix, client, .. } => {
            let enc = client.client.encoding();
            let prefix = enc.decode("prefix", prefix.as_deref().unwrap_or_default())?;
            if prefix.is_empty() {
                return Err(CliError::usage(
                    "--prefix is empty, which would delete every key; give the prefix of the keys to delete",
                )
                .into());
            }
            let range = cli::scan::Range {
                key: prefix,
                range_end: None,
            };
            Ok(
                cli::scan::delete_range(&client.client.endpoints, range, client.client.output)
                    .await?,
            )
        }
        Command::Scan {
            prefix,
            range_end,
            limit,
            keys_only,
            count,
            consistency: c,
            client,
        } => {
            let enc = client.encoding();
            let args = cli::scan::ScanArgs {
                range: cli::scan::Range {
                    key: enc.decode("key", &prefix)?,
                    range_end: range_end
                        .as_deref()
                        .map(|end| enc.decode("range end", end))
                        .transpose()?,
                },
                limit,
                keys_only,
                count,
                consistency: consistency(c),
            };
            Ok(cli::scan::scan(&client.endpoints, args, client.output, enc).await?)
        }
        Command::Watch {
            key,
            prefix,
            from,
            prev,
            count,
            progress_ms,
            client,
        } => {
            let enc = client.encoding();
            if key.is_empty() && !prefix {
                return Err(cli::CliError::usage(
                    "name a KEY to watch, or --prefix (with KEY \"\" for every key)",
                )
                .into());
            }
            let args = cli::watch::WatchArgs {
                key: enc.decode("key", &key)?,
                prefix,
                from,
                prev,
                count,
                progress_ms,
            };
            Ok(cli::watch::watch(&client.endpoints, args, client.output, enc).await?)
        }
        Command::Cas {
            key,
            value,
            file,
            expect_version,
            expect_value,
            expect_absent,
            delete,
            lease,
            client,
        } => {
            use pb::cas::Expect;
            writes(&client, &key, lease.as_deref(), |enc| {
                let expect = match (expect_version, expect_value, expect_absent) {
                    (Some(v), None, false) => Expect::Version(v),
                    (None, Some(v), false) => Expect::Value(enc.decode("expected value", &v)?),
                    (None, None, true) => Expect::Absent(true),
                    _ => {
                        return Err(CliError::usage(
                            "say what to expect: --expect-version N, --expect-value V or --expect-absent",
                        ));
                    }
                };
                let new_value = if delete {
                    if value.is_some() || file.is_some() {
                        return Err(CliError::usage(
                            "--delete takes no new value; give either a new value or --delete",
                        ));
                    }
                    Vec::new()
                } else {
                    enc.value(value.as_deref(), file.as_deref())?
                };
                Ok(vec![Kind::Cas(pb::Cas {
                    expect: Some(expect),
                    new_value,
                    delete,
                })])
            })
            .await
        }
        Command::Add { key, delta, client } => {
            writes(&client, &key, None, |_| {
                Ok(vec![Kind::Add(pb::Add { delta })])
            })
            .await
        }
        Command::Set { key, value, client } => {
            writes(&client, &key, None, |_| {
                Ok(vec![Kind::SetValue(pb::SetValue { value })])
            })
            .await
        }
        Command::Bounds {
            key,
            min,
            max,
            client,
        } => {
            writes(&client, &key, None, |_| {
                Ok(vec![Kind::SetBounds(pb::SetBounds { min, max })])
            })
            .await
        }
        Command::Max { key, value, client } => {
            writes(&client, &key, None, |_| {
                Ok(vec![Kind::Raise(pb::Raise { value })])
            })
            .await
        }
        Command::Lease { command } => lease(command).await,
        Command::Lock {
            key,
            ttl,
            command,
            client,
        } => {
            let key = client.encoding().decode("key", &key)?;
            let ttl = cli::lease::parse_ttl(&ttl)?;
            let stop = shutdown_on_signals();
            Ok(cli::lock::lock(&client.endpoints, key, ttl, command, client.output, stop).await?)
        }
        Command::Elect {
            key,
            value,
            listen,
            ttl,
            client,
        } => {
            let enc = client.encoding();
            let key = enc.decode("key", &key)?;
            let stop = shutdown_on_signals();
            Ok(match value {
                Some(value) if !listen => {
                    let value = enc.decode("value", &value)?;
                    let ttl = cli::lease::parse_ttl(&ttl)?;
                    cli::lock::elect(&client.endpoints, key, value, ttl, client.output, stop)
                        .await?
                }
                _ => cli::lock::listen(&client.endpoints, key, client.output, stop).await?,
            })
        }
        Command::Txn { file, client } => {
            let text = match file.as_deref() {
                Some(path) if path != std::path::Path::new("-") => std::fs::read_to_string(path)
                    .map_err(|e| {
                        CliError::usage(format!(
                            "cannot read the transaction from {}: {e}",
                            path.display()
                        ))
                    })?,
                _ => {
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(
                        |e| CliError::usage(format!("cannot read the transaction from stdin: {e}")),
                    )?;
                    text
                }
            };
            let enc = client.client.encoding();
            let mut req = cli::txn::parse(&text, enc)?;
            req.token = client
                .token
                .as_deref()
                .map(cli::parse_token)
                .transpose()?
                .unwrap_or_default();
            Ok(cli::txn::run(&client.client.endpoints, req, client.client.output, enc).await?)
        }
        Command::Sadd {
            key,
            elements,
            client,
        } => {
            writes(&client, &key, None, |enc| {
                elements
                    .iter()
                    .map(|e| {
                        Ok(Kind::SetAdd(pb::SetAdd {
                            element: enc.decode("element", e)?,
                        }))
                    })
                    .collect()
            })
            .await
        }
        Command::Srem {
            key,
            elements,
            client,
        } => {
            writes(&client, &key, None, |enc| {
                elements
                    .iter()
                    .map(|e| {
                        Ok(Kind::SetRemove(pb::SetRemove {
                            element: enc.decode("element", e)?,
                        }))
                    })
                    .collect()
            })
            .await
        }
        Command::Smembers { key, client } => {
            let enc = client.encoding();
            let key = enc.decode("key", &key)?;
            Ok(cli::kv::get(
                &client.endpoints,
                &key,
                pb::Consistency::Linearizable,
                Vec::new(),
                client.output,
                enc,
            )
            .await?)
        }
        Command::Status {
            cluster: false,
            client,
        } => Ok(cli::admin::status(&client.endpoints, client.output).await?),
        Command::Status {
            cluster: true,
            client,
        } => Ok(cli::cluster::status(&client.endpoints, client.output).await?),
        Command::Health { client } => {
            Ok(cli::cluster::health(&client.endpoints, client.output).await?)
        }
        Command::Explain { keys, client } => {
            let enc = client.encoding();
            let keys = keys
                .iter()
                .map(|k| enc.decode("key", k))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(cli::admin::explain(&client.endpoints, &keys, client.output, enc).await?)
        }
        Command::Checkpoint { client } => {
            Ok(cli::admin::checkpoint(&client.endpoints, client.output).await?)
        }
        Command::Bench {
            compare: Some(compare),
            ..
        } => done(bench_compare(compare).await),
        Command::Bench {
            compare: None,
            workload,
            ops,
            concurrency,
            seconds,
            keys,
            batch,
            route,
            watchers,
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
                    watchers,
                },
            )
            .await?;
            calm::bench::print(
                workload,
                concurrency,
                &report,
                client.output == Output::Json,
            );
            Ok(Exit::Done)
        }
        Command::Rules { command } => match command {
            RulesCommand::Check { file, output } => done(rules_check(file.as_deref(), output)),
            RulesCommand::Explain {
                keys,
                rules,
                output,
            } => done(rules_explain(&keys, rules.as_deref(), output)),
            RulesCommand::Example => {
                print!("{DEFAULT_RULES}");
                Ok(Exit::Done)
            }
            RulesCommand::Get { client } => {
                Ok(cli::admin::rules_get(&client.endpoints, client.output).await?)
            }
            RulesCommand::Set {
                file,
                expected_version,
                client,
            } => Ok(cli::admin::rules_set(
                &client.endpoints,
                &file,
                expected_version,
                client.output,
            )
            .await?),
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
