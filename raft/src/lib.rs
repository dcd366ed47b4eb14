//! calm-raft: the durable and ordered path of a calm node.
pub mod channel;
pub mod checkpoint;
pub mod consensus;
pub mod dir_lock;
pub mod durable_file;
pub mod events;
pub mod inspect;
pub mod local;
pub mod scan;
pub mod store;
pub mod wal;
