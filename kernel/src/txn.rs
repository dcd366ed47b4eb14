//! Transactions: comparisons on keys of one subject, then one list of commands or another,
//! applied atomically as one Raft entry.
//!
//! A transaction is proposed to the group of its subject (every key it names shares that
//! subject, so one group orders all of it) and applied in log order like any command. Its
//! comparisons are evaluated at apply time, on Raft-ordered state plus exactly the facts the
//! proposer had applied on each compared key (the key's frontier, as for every command:
//! `command.rs`), never on whatever facts the applying replica happens to hold beyond them.
//! That is what makes every replica choose the same branch. Facts the proposer had not seen
//! are concurrent with the transaction and ordered after it, as for a counter set.
//!
//! What each test reads, as the transaction observed the key:
//!
//! - `Exists`: the key exists (for a register: it has a value; for other types: it was
//!   created and is not deleted, or something its delete did not observe brought it back).
//! - `Type`: it exists with that type.
//! - `Version`: a register's version (0 when absent; never reused, so no ABA).
//! - `Value`: a register's bytes. A value test on an absent key is **false**, whatever the
//!   operator (`!=` included), as in etcd; test existence explicitly with `Exists`.
//! - `Counter`: a counter's or bounded counter's value lies in `[min, max]`; false when the
//!   key is absent. The value is the Raft-ordered base plus the observed facts' totals, which
//!   the frontier carries exactly. Max and set keys have no such test: their observed value
//!   is not a function of the frontier alone (a max keeps only each origin's right-to-left
//!   maxima), so it would differ between replicas.
//!
//! A test of the wrong type (a version test on a counter) refuses the whole transaction,
//! identically everywhere: the key's type is Raft-ordered.
//!
//! The chosen branch's commands are applied to copies of their keys first; only when every
//! one of them takes effect are the copies stored, so a refused command (a bounded counter
//! whose pool cannot cover an add, a type mismatch) leaves nothing of the transaction
//! behind. The branch's keys are distinct (the proposer checks it), so each command's effect
//! does not depend on the others.

use crate::clock::{HlcTimestamp, NodeId};
use crate::command::{Command, KeyFrontier, LwwWrite};
use crate::refusal::Refusal;
use crate::state::{KeyRecord, KeyState, Outcome};
use crate::value::ValueType;
use serde::{Deserialize, Serialize};

/// Most comparisons in one transaction.
pub const TXN_COMPARES_MAX: usize = 128;
/// Most ops in each branch of one transaction (etcd's default `--max-txn-ops`).
pub const TXN_OPS_MAX: usize = 128;

/// How a test relates the key's value to the operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Cmp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

impl Cmp {
    fn holds<T: Ord + ?Sized>(self, left: &T, right: &T) -> bool {
        match self {
            Cmp::Equal => left == right,
            Cmp::NotEqual => left != right,
            Cmp::Less => left < right,
            Cmp::Greater => left > right,
        }
    }
}

/// What a comparison tests (see the module docs for what each reads).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Test {
    Exists(bool),
    Type(ValueType),
    Version(Cmp, u64),
    Value(Cmp, Vec<u8>),
    /// Inclusive bounds.
    Counter {
        min: i64,
        max: i64,
    },
}

impl Test {
    /// The kind of test, for refusals.
    pub const fn kind(&self) -> TestKind {
        match self {
            Test::Exists(_) => TestKind::Exists,
            Test::Type(_) => TestKind::Type,
            Test::Version(..) => TestKind::Version,
            Test::Value(..) => TestKind::Value,
            Test::Counter { .. } => TestKind::Counter,
        }
    }
}

/// [`Test`] without its operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TestKind {
    Exists,
    Type,
    Version,
    Value,
    Counter,
}

impl TestKind {
    /// The types the test applies to, in words.
    pub const fn applies_to(self) -> &'static str {
        match self {
            TestKind::Exists | TestKind::Type => "any key",
            TestKind::Version | TestKind::Value => "registers",
            TestKind::Counter => "counters and bounded counters",
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            TestKind::Exists => "an existence test",
            TestKind::Type => "a type test",
            TestKind::Version => "a version test",
            TestKind::Value => "a value test",
            TestKind::Counter => "a counter range test",
        }
    }
}

/// One comparison, stamped (like a command) with what the proposer observed on its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub key: Vec<u8>,
    pub test: Test,
    /// Facts on `key` the proposer had applied, and the key's generation.
    pub frontier: KeyFrontier,
    /// The LWW register write the proposer saw winning among them, if any.
    pub absorb: Option<LwwWrite>,
}

/// A transaction as its group's log carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub hlc: HlcTimestamp,
    pub proposer: NodeId,
    pub compares: Vec<Compare>,
    /// Applied when every comparison holds, else `failure`.
    pub success: Vec<Command>,
    pub failure: Vec<Command>,
}

impl Txn {
    /// Every key the transaction names (comparisons first, then both branches).
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.compares.iter().map(|c| c.key.as_slice()).chain(
            self.success
                .iter()
                .chain(&self.failure)
                .map(|c| c.key.as_slice()),
        )
    }

    /// The branch whose keys repeat, and the first repeated key, if any.
    pub fn repeated_key(&self) -> Option<(&'static str, &[u8])> {
        for (name, branch) in [("success", &self.success), ("failure", &self.failure)] {
            for (i, cmd) in branch.iter().enumerate() {
                if branch[..i].iter().any(|c| c.key == cmd.key) {
                    return Some((name, &cmd.key));
                }
            }
        }
        None
    }
}

/// What applying a transaction did; identical on every replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// The branch `succeeded` chose was applied; one outcome per command, in order (each
    /// `Done` or `Deleted`).
    Applied {
        succeeded: bool,
        outcomes: Vec<Outcome>,
    },
    /// Nothing was applied: comparison `compare` could not be evaluated, or command `op` of
    /// the chosen branch was refused.
    Refused {
        at: TxnPart,
        key: Vec<u8>,
        refusal: Refusal,
    },
}

/// Which part of a transaction a refusal concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnPart {
    Compare(usize),
    /// An op of the branch that ran (`succeeded`), by index.
    Op {
        succeeded: bool,
        index: usize,
    },
}

impl std::fmt::Display for TxnPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxnPart::Compare(i) => write!(f, "comparison {i}"),
            TxnPart::Op {
                succeeded: true,
                index,
            } => write!(f, "success op {index}"),
            TxnPart::Op {
                succeeded: false,
                index,
            } => write!(f, "failure op {index}"),
        }
    }
}

/// Evaluate `compare` on its key's record (`None`: never created). The caller has applied
/// every fact inside the compare's frontier.
pub(crate) fn evaluate(record: Option<&KeyRecord>, compare: &Compare) -> Result<bool, Refusal> {
    let generation = compare.frontier.generation();
    let Some(record) = record else {
        // A generation is only ever taken from a key that exists.
        if generation != 0 {
            return Err(Refusal::KeyRecreated);
        }
        return Ok(match &compare.test {
            Test::Exists(exists) => !exists,
            Test::Version(cmp, v) => cmp.holds(&0, v),
            Test::Type(_) | Test::Value(..) | Test::Counter { .. } => false,
        });
    };
    if record.generation != generation {
        return Err(Refusal::KeyRecreated);
    }
    let facts = KeyFrontier {
        entries: compare.frontier.facts().to_vec(),
    };
    let value_type = record.state.value_type();
    let mismatch = || Refusal::CompareMismatch {
        key_type: value_type,
        test: compare.test.kind(),
    };
    if let KeyState::Register(r) = &record.state {
        let (value, version) = r.observed(&facts, compare.absorb.as_ref());
        return match &compare.test {
            Test::Exists(exists) => Ok(value.is_some() == *exists),
            Test::Type(t) => Ok(value.is_some() && *t == value_type),
            Test::Version(cmp, v) => Ok(cmp.holds(&version, v)),
            Test::Value(cmp, v) => {
                Ok(value.is_some_and(|value| cmp.holds(value.as_slice(), v.as_slice())))
            }
            Test::Counter { .. } => Err(mismatch()),
        };
    }
    let exists = record.observed_visible(&facts);
    match &compare.test {
        Test::Exists(want) => Ok(exists == *want),
        Test::Type(t) => Ok(exists && *t == value_type),
        Test::Version(..) | Test::Value(..) => Err(mismatch()),
        Test::Counter { min, max } => {
            let value = match &record.state {
                KeyState::Counter(n) => n.observed_value(&facts),
                KeyState::Bounded(b) => b.observed_value(&facts),
                _ => return Err(mismatch()),
            };
            Ok(exists && (*min..=*max).contains(&value))
        }
    }
}
