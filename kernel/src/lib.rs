//! calm-kernel: the pure, deterministic core of calm.
//!
//! calm coordinates only when the algebra requires it. This crate is that algebra, with no
//! I/O, no threads, no async runtime and no clock reads of its own, so that every decision it
//! makes can be replayed, property-tested and trusted to be identical on every node.
//!
//! # The pieces, in the order a write meets them
//!
//! 1. [`rules`]: operators map key patterns to a safety mode (`strict`, `hybrid`,
//!    `available`), optionally a type and bounds; first match wins, a default is required.
//! 2. [`admission`]: `classify(mode, type, op, local escrow)` picks the path: fast path,
//!    escrow-local, consensus, or refused with a reason a user can act on ([`refusal`]).
//! 3. [`fact`]: a fast-path write becomes a *fact* `(origin, seq)` with a fixed little-endian
//!    header (zerocopy); sequences have no gaps, so facts are idempotent by id.
//! 4. [`replica`]: applies facts per origin in order (buffering gaps and unfunded escrow
//!    spends), applies Raft [`command`]s only after the facts they observed, and installs a
//!    Raft group snapshot by joining a peer's key states into its own.
//! 5. [`state`]: the per-type state and its laws: convergence of commutative ops under any
//!    delivery order, observed-reset for ordered writes, escrow conservation for bounded
//!    counters.
//! 6. [`vv`] and [`clock`]: exact version vectors, hybrid logical clocks and the Bloom clock
//!    used only as a cheap gossip summary.
//!
//! # Why facts of one origin apply in order
//!
//! A node's applied facts are then exactly a version vector: deduplication is one
//! comparison, the frontier a Raft command records is one number per origin, and a command's
//! effect ("absorb what I observed, keep the rest on top") can be computed from running sums
//! instead of logs. Anti-entropy pulls missing facts by `(origin, sequence range)`, so a gap
//! never lasts. The cost is head-of-line waiting behind a missing fact, bounded by gossip.
//!
//! # Why a key's type is fixed by Raft
//!
//! If two nodes could each type a new key by its first fast-path write, a counter add on one
//! and a set add on the other would give replicas different keys. The first write to a key
//! therefore goes through its Raft group (`ConsensusReason::KeyCreation`); after that, the
//! fast path applies. Facts that reach a replica before the key's creation wait for it.

pub mod admission;
pub mod clock;
pub mod command;
pub mod fact;
pub mod lease;
pub mod refusal;
pub mod replica;
pub mod rules;
pub mod state;
pub mod txn;
pub mod value;
pub mod vv;

pub use admission::{Admission, ConsensusReason, EscrowView, classify};
pub use clock::{HlcTimestamp, NodeId};
pub use command::{Command, CommandBody, FrontierEntry, KeyFrontier, LwwWrite};
pub use fact::{Fact, FactError, FactId, FactKind, FactRef};
pub use lease::{Lease, LeaseCommand, LeaseId, LeaseOutcome, LeaseRefusal, Leases};
pub use refusal::{Refusal, StatusCode};
pub use replica::{Admitted, Change, ChangeCause, Delivered, RefusedOp, Replica, ReplicaError};
pub use state::{KeyRecord, KeyState, Outcome, Value};
pub use txn::{Cmp, Compare, Test, Txn, TxnOutcome, TxnPart};
pub use value::{Bounds, CasExpect, Mode, Op, OpKind, ValueType};
pub use vv::VersionVector;
