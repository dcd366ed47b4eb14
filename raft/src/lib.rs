//! calm-raft: the durable and ordered path of a calm node.
pub mod wal;
