//! How the CLI and `calm bench` reach a cluster: the endpoints, the channel options and the
//! output formats. What each command sends and prints is in `crate::cli`.
//!
//! A command connects to the first endpoint that accepts a connection: any node serves any
//! key (it forwards to the leader).

use anyhow::{Result, anyhow};
use calm_raft::channel::{ChannelOptions, H2Channel};
use std::time::Duration;

/// Default endpoint: node 1 of `calm dev`.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7001";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// How the CLI's and the bench's channels connect and how long a call may take.
pub fn channel_options() -> ChannelOptions {
    ChannelOptions {
        connect_timeout: Duration::from_secs(2),
        call_timeout: Some(Duration::from_secs(30)),
        ..ChannelOptions::default()
    }
}

/// Connect to the first endpoint that answers.
pub async fn connect(endpoints: &[String]) -> Result<H2Channel> {
    let mut errors = Vec::new();
    for e in endpoints {
        let addr = e.strip_prefix("http://").unwrap_or(e).trim_end_matches('/');
        match H2Channel::connect(addr, channel_options()).await {
            Ok(c) => return Ok(c),
            Err(err) => errors.push(format!("{e}: {}", err.message())),
        }
    }
    Err(anyhow!(
        "no calm node answered ({}); start one with `calm dev` or pass --endpoints",
        errors.join("; ")
    ))
}
