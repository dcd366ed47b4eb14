//! The `calm` command line's client side: what each client command sends and prints, and
//! the contract every command keeps.
//!
//! # The contract
//!
//! - **Exit codes** ([`Exit`]): 0 the command did what it says; 1 the cluster answered, and
//!   the answer is "no" (refused with a gRPC error, the key is missing, a compare-and-set's
//!   condition did not hold, nothing to delete, a member unhealthy); 2 the command line or
//!   its input is wrong (clap's usage errors, an unreadable `--file`, bad hex); 3 no answer:
//!   no node reachable, or UNAVAILABLE / DEADLINE_EXCEEDED, after which a write's outcome is
//!   unknown (it may or may not have been applied; read before retrying a non-idempotent op).
//! - **`-w json`** prints one JSON document on stdout for every outcome, errors included:
//!   `{"error":{"code":"FAILED_PRECONDITION","message":"..."}}`, the code spelled as gRPC
//!   names it (and as the README's table does).
//! - **Binary-safe values**: a value is given as an argument, as `-` (read stdin to its end),
//!   or with `--file`; `--hex` reads keys, values and elements as hex and prints them as hex.
//!   JSON carries every value as `value_base64`, plus `value` when it is UTF-8 text. Table
//!   output prints a value's bytes as they are.
//!
//! One file per group of commands: `kv.rs` (put, get, del, cas, add, set, max, sadd, srem,
//! smembers), `scan.rs` (scan, del --prefix: ranges, printed as JSON lines with `-w json`),
//! `watch.rs` (watch: a stream of events, JSON lines with `-w json`), `txn.rs` (txn: its
//! text syntax and answer),
//! `admin.rs` (status, explain, rules, checkpoint), `cluster.rs` (the views over
//! every member: `status --cluster`, `health`).

pub mod admin;
pub mod cluster;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod scan;
pub mod txn;
pub mod watch;

use crate::api::pb;
pub use crate::client::{DEFAULT_ENDPOINT, Output, connect};
use base64::Engine as _;
use serde_json::json;
use std::io::Write;
use std::path::Path;

/// Exit codes of client commands (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Done = 0,
    /// The cluster answered no: refused, missing, not applied.
    No = 1,
    /// The command line or its input is wrong.
    Usage = 2,
    /// No answer: unreachable, or an outcome that is unknown.
    NoAnswer = 3,
}

/// A command that did not do what it says: its gRPC-style code, message and exit code.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct CliError {
    pub code: &'static str,
    pub message: String,
    pub exit: Exit,
}

impl CliError {
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError {
            code: "INVALID_ARGUMENT",
            message: message.into(),
            exit: Exit::Usage,
        }
    }

    pub fn not_found(message: impl Into<String>) -> CliError {
        CliError {
            code: "NOT_FOUND",
            message: message.into(),
            exit: Exit::No,
        }
    }

    /// The cluster's answer `status`, with the leader hint when it carries one.
    pub fn from_status(status: &tonic::Status) -> CliError {
        let hint = status
            .metadata()
            .get(crate::api::LEADER_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(|a| format!(" (leader hint: {a})"))
            .unwrap_or_default();
        let exit = match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => Exit::NoAnswer,
            _ => Exit::No,
        };
        CliError {
            code: code_name(status.code()),
            message: format!("{}{hint}", status.message()),
            exit,
        }
    }

    /// What `error` means for the user: a [`CliError`] anywhere in its chain as it is,
    /// anything else (a local failure) exit 1 with the whole chain as the message.
    pub fn of(error: &anyhow::Error) -> CliError {
        for cause in error.chain() {
            if let Some(e) = cause.downcast_ref::<CliError>() {
                return CliError {
                    code: e.code,
                    message: e.message.clone(),
                    exit: e.exit,
                };
            }
            if let Some(s) = cause.downcast_ref::<tonic::Status>() {
                return CliError::from_status(s);
            }
        }
        CliError {
            code: "UNKNOWN",
            message: chain_text(error),
            exit: Exit::No,
        }
    }

    /// Print it as `output` asks: a JSON document on stdout, or a line on stderr.
    pub fn print(&self, output: Output) {
        // Not `println!`/`eprintln!`: they panic when the stream cannot be written (a full
        // disk, a closed pipe), and the exit code must still be this error's.
        match output {
            Output::Json => {
                let doc = json!({"error": {"code": self.code, "message": self.message}});
                let _ = writeln!(std::io::stdout(), "{doc}");
            }
            // Local failures (a node that cannot start, say) carry no code worth naming.
            Output::Table if self.code == "UNKNOWN" => {
                let _ = writeln!(std::io::stderr(), "calm: error: {}", self.message);
            }
            Output::Table => {
                let _ = writeln!(
                    std::io::stderr(),
                    "calm: error: {}: {}",
                    self.code,
                    self.message
                );
            }
        }
    }
}

/// An error and its causes on one line, skipping a cause its wrapper already quotes.
pub fn chain_text(e: &anyhow::Error) -> String {
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

/// A gRPC code as the gRPC spec spells it (`FAILED_PRECONDITION`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// How keys and values are written on the command line and printed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Encoding {
    /// Hex in, hex out.
    pub hex: bool,
}

impl Encoding {
    /// A key, element or value given as an argument.
    pub fn decode(&self, what: &str, text: &str) -> Result<Vec<u8>, CliError> {
        if self.hex {
            hex::decode(text)
                .map_err(|e| CliError::usage(format!("{what} '{text}' is not hex ({e})")))
        } else {
            Ok(text.as_bytes().to_vec())
        }
    }

    /// A value: `-` reads stdin to its end, `file` reads a file, else the argument.
    pub fn value(&self, arg: Option<&str>, file: Option<&Path>) -> Result<Vec<u8>, CliError> {
        match (arg, file) {
            (Some(_), Some(_)) => Err(CliError::usage(
                "give the value either as an argument or with --file, not both",
            )),
            (None, None) => Err(CliError::usage(
                "give a value: as an argument, as - to read it from stdin, or with --file",
            )),
            (None, Some(path)) => std::fs::read(path).map_err(|e| {
                CliError::usage(format!(
                    "cannot read the value from {}: {e}",
                    path.display()
                ))
            }),
            (Some("-"), None) => {
                let mut value = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut value).map_err(|e| {
                    CliError::usage(format!("cannot read the value from stdin: {e}"))
                })?;
                Ok(value)
            }
            (Some(text), None) => self.decode("value", text),
        }
    }

    /// Bytes for a table: as they are, or hex.
    pub fn show(&self, bytes: &[u8]) -> Vec<u8> {
        if self.hex {
            hex::encode(bytes).into_bytes()
        } else {
            bytes.to_vec()
        }
    }

    /// A key or element for a table cell (text cells: lossy unless hex).
    pub fn cell(&self, bytes: &[u8]) -> String {
        if self.hex {
            hex::encode(bytes)
        } else {
            String::from_utf8_lossy(bytes).into_owned()
        }
    }
}

/// Bytes in JSON: `{<name>: text or null, <name>_base64: ...}` merged into `doc`.
pub fn json_bytes(doc: &mut serde_json::Map<String, serde_json::Value>, name: &str, bytes: &[u8]) {
    doc.insert(
        name.to_string(),
        std::str::from_utf8(bytes).map_or(serde_json::Value::Null, |t| json!(t)),
    );
    doc.insert(format!("{name}_base64"), json!(base64_of(bytes)));
}

pub fn base64_of(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Parse a session token given in hex on the command line.
pub fn parse_token(text: &str) -> Result<Vec<u8>, CliError> {
    hex::decode(text).map_err(|e| {
        CliError::usage(format!(
            "token '{text}' is not hex ({e}); pass the token field of an earlier -w json answer"
        ))
    })
}

/// Connect, as a [`CliError`] (no node reachable: exit 3).
pub async fn channel(endpoints: &[String]) -> Result<calm_raft::channel::H2Channel, CliError> {
    connect(endpoints).await.map_err(|e| CliError {
        code: "UNAVAILABLE",
        message: e.to_string(),
        exit: Exit::NoAnswer,
    })
}

/// Print one JSON document on stdout.
pub fn print_json(doc: &serde_json::Value) {
    let _ = writeln!(std::io::stdout(), "{doc}");
}

/// The text of a path enum value.
pub fn path_name(path: i32) -> &'static str {
    match pb::Path::try_from(path) {
        Ok(pb::Path::Fast) => "fast",
        Ok(pb::Path::Escrow) => "escrow",
        Ok(pb::Path::Consensus) => "consensus",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_spelt_as_grpc_spells_them() {
        assert_eq!(
            code_name(tonic::Code::FailedPrecondition),
            "FAILED_PRECONDITION"
        );
        let e = CliError::from_status(&tonic::Status::unavailable("no quorum"));
        assert_eq!((e.code, e.exit), ("UNAVAILABLE", Exit::NoAnswer));
        let e = CliError::from_status(&tonic::Status::resource_exhausted("bound"));
        assert_eq!((e.code, e.exit), ("RESOURCE_EXHAUSTED", Exit::No));
        let wrapped = anyhow::Error::new(CliError::not_found("key 'k' not found")).context("get");
        let e = CliError::of(&wrapped);
        assert_eq!((e.code, e.exit), ("NOT_FOUND", Exit::No));
    }

    #[test]
    fn values_come_from_arguments_hex_or_files_and_print_back() {
        let text = Encoding::default();
        let hex = Encoding { hex: true };
        assert_eq!(text.value(Some("hi"), None).unwrap(), b"hi");
        assert_eq!(hex.value(Some("00ff"), None).unwrap(), vec![0, 255]);
        assert_eq!(hex.decode("key", "zz").unwrap_err().exit, Exit::Usage);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("v");
        std::fs::write(&file, [0u8, 1, 2, 10]).unwrap();
        assert_eq!(text.value(None, Some(&file)).unwrap(), vec![0, 1, 2, 10]);
        assert_eq!(
            text.value(Some("x"), Some(&file)).unwrap_err().exit,
            Exit::Usage
        );
        assert_eq!(text.value(None, None).unwrap_err().exit, Exit::Usage);
        assert_eq!(hex.show(&[0, 255]), b"00ff");
        let mut doc = serde_json::Map::new();
        json_bytes(&mut doc, "value", &[0xff, 0]);
        assert_eq!(doc["value"], serde_json::Value::Null);
        assert_eq!(doc["value_base64"], "/wA=");
        json_bytes(&mut doc, "value", b"text");
        assert_eq!(doc["value"], "text");
    }
}
