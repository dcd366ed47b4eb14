//! `calm debug`: look inside a stopped node's data directory (part of the binary only).
//!
//! The questions a stuck or diverged replica raises — which facts of an origin a key holds,
//! whether a fact is in the WAL or only in the archive, what a Raft entry observed — are
//! answered by the data, not the logs. `calm_raft::inspect` reads it without writing; this
//! module prints it, one line per fact or entry, so the output greps and diffs well between
//! nodes.

use anyhow::{Context, Result};
use calm_kernel::fact::{Fact, FactKind};
use calm_raft::inspect::{DataDir, FactSource, INSPECT_ROWS_MAX};
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum DebugCommand {
    /// The store's position: version vector, WAL LSN, each group's applied index, key count.
    Meta { data_dir: PathBuf },
    /// A key's stored state, every per-origin part included.
    Key { data_dir: PathBuf, key: String },
    /// Facts of one origin in a sequence range, from the store's archive and from the WAL.
    Facts {
        data_dir: PathBuf,
        /// The node that issued them.
        #[arg(long)]
        origin: u64,
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[arg(long, default_value_t = u64::MAX)]
        to: u64,
        /// Only facts on this key.
        #[arg(long)]
        key: Option<String>,
    },
    /// Raft entries of one group in an index range, from the WAL, with their commands.
    Raft {
        data_dir: PathBuf,
        #[arg(long)]
        group: u64,
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long, default_value_t = u64::MAX)]
        to: u64,
    },
}

pub fn run(command: DebugCommand) -> Result<()> {
    match command {
        DebugCommand::Meta { data_dir } => {
            let data = open(&data_dir)?;
            let meta = data.meta()?;
            println!("wal_lsn {}", meta.wal_lsn);
            println!("vv {}", vv_text(&meta.vv));
            println!("keys {}", data.key_count()?);
            for (group, applied) in data.applied()? {
                match applied {
                    Some(id) => {
                        println!("group {group} applied {} (term {})", id.index, id.leader_id)
                    }
                    None => println!("group {group} applied nothing"),
                }
            }
        }
        DebugCommand::Key { data_dir, key } => {
            let data = open(&data_dir)?;
            match data.key(key.as_bytes())? {
                Some(state) => println!("{state:#?}"),
                None => println!("{key}: not in the store"),
            }
        }
        DebugCommand::Facts {
            data_dir,
            origin,
            from,
            to,
            key,
        } => {
            let data = open(&data_dir)?;
            let key = key.map(String::into_bytes);
            let on_key = |f: &Fact| key.as_ref().is_none_or(|k| *k == f.key);
            let archived = data.archived_facts(origin, from, to)?;
            for fact in archived.iter().filter(|f| on_key(f)) {
                println!("{}", fact_line(FactSource::Archive, fact));
            }
            let in_wal = data.wal_facts(|f| {
                f.id.origin == origin
                    && (from..=to).contains(&f.id.seq)
                    && key.as_ref().is_none_or(|k| k.as_slice() == f.key)
            })?;
            for (lsn, fact) in &in_wal {
                println!("{}", fact_line(FactSource::Wal { lsn: *lsn }, fact));
            }
            if archived.len() == INSPECT_ROWS_MAX || in_wal.len() == INSPECT_ROWS_MAX {
                eprintln!(
                    "calm: showing at most {INSPECT_ROWS_MAX} facts per source; narrow --from/--to"
                );
            }
        }
        DebugCommand::Raft {
            data_dir,
            group,
            from,
            to,
        } => {
            let data = open(&data_dir)?;
            for logged in data.wal_entries(group, from, to)? {
                let id = logged.log_id();
                let what = match logged.request() {
                    Some(request) => format!("{request:?}"),
                    None => format!("{:?}", logged.entry.payload),
                };
                println!(
                    "group {} index {} term {} lsn {} {what}",
                    logged.group, id.index, id.leader_id, logged.lsn
                );
            }
        }
    }
    Ok(())
}

fn open(dir: &Path) -> Result<DataDir> {
    DataDir::open(dir).with_context(|| {
        format!(
            "cannot read {} (stop the node first: a running node holds its store)",
            dir.display()
        )
    })
}

fn vv_text(vv: &calm_kernel::VersionVector) -> String {
    let parts: Vec<String> = vv.iter().map(|(o, s)| format!("{o}:{s}")).collect();
    parts.join(" ")
}

/// One fact on one line: where it was found, its id, kind, argument, key and stamp.
fn fact_line(source: FactSource, fact: &Fact) -> String {
    let source = match source {
        FactSource::Archive => "archive".to_string(),
        FactSource::Wal { lsn } => format!("wal@{lsn}"),
    };
    let detail = match fact.kind {
        FactKind::EscrowTransfer => format!("arg {} to n{}", fact.arg, fact.peer),
        FactKind::SetAdd | FactKind::RegisterLww => {
            format!("payload {}", String::from_utf8_lossy(&fact.payload))
        }
        _ => format!("arg {}", fact.arg),
    };
    format!(
        "{source} ({}, {}) {:?} key {} {detail} hlc {}",
        fact.id.origin,
        fact.id.seq,
        fact.kind,
        calm_kernel::refusal::DisplayKey(&fact.key),
        fact.hlc
    )
}
