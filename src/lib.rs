//! The calm node: gRPC services, gossip, routing, configuration and the CLI's client side.
//! The binary (`main.rs`) is a thin shell over this library, so tests and benches can start
//! nodes in-process too.

pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod cluster_record;
pub mod config;
pub mod dev;
pub mod escrow;
pub mod faults;
pub mod gossip;
pub mod http;
pub mod lease_keeper;
pub mod node;
pub mod route;
pub mod token;
