//! `calm`: the node binary and its command-line interface.
//!
//! Today it carries the operator commands that need no running cluster: checking a rules file
//! before it is deployed and explaining which rule, mode and type a key gets. The node
//! (`calm serve`, `calm dev`) and the client commands arrive with the gRPC API (issue 5) and
//! will live beside these as further subcommands.

use anyhow::{Context, Result, bail};
use calm_kernel::rules::{CompiledRules, RuleSet, Severity};
use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use std::path::{Path, PathBuf};

/// The rules `calm` uses when none are given: also the starting rules of `calm dev`.
const DEFAULT_RULES: &str = include_str!("default-rules.toml");

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

#[derive(Subcommand)]
enum Command {
    /// Safety rules: which keys are strict, hybrid or available, and their types.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
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
    /// Explain which rule each key matches, with its mode, type and bounds.
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
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> Result<()> {
    match Cli::parse().command {
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
        },
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
