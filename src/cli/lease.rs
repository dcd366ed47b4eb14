//! `calm lease grant|keepalive|revoke|ttl|list`: leases from the command line.
//!
//! Lease ids are printed and read in hex (as etcdctl does), with or without `0x`. TTLs are a
//! number with a unit (`500ms`, `10s`, `2m`, `1h`); a bare number is seconds.

use super::{CliError, Encoding, Exit, Output, channel, json_bytes, print_json};
use crate::api::pb;
use crate::api::pb::lease_client::LeaseClient;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::json;
use std::io::Write;
use std::time::Duration;

fn out(text: impl std::fmt::Display) {
    let _ = writeln!(std::io::stdout(), "{text}");
}

/// A lease id as the CLI takes it: hex, `0x` optional.
pub fn parse_id(text: &str) -> Result<u64, CliError> {
    let digits = text.strip_prefix("0x").unwrap_or(text);
    match u64::from_str_radix(digits, 16) {
        Ok(id) if id != 0 => Ok(id),
        _ => Err(CliError::usage(format!(
            "'{text}' is not a lease id; ids are hex, as `calm lease grant` and `calm lease list` print them"
        ))),
    }
}

/// A TTL: a number and a unit (`ms`, `s`, `m`, `h`); a bare number is seconds.
pub fn parse_ttl(text: &str) -> Result<Duration, CliError> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        CliError::usage(format!(
            "'{text}' is not a TTL; give a number and a unit, e.g. 500ms, 10s, 2m or 1h (a bare number is seconds)"
        ))
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(bad)?;
    Ok(Duration::from_millis(ms))
}

fn status(s: tonic::Status) -> CliError {
    CliError::from_status(&s)
}

pub async fn grant(
    endpoints: &[String],
    ttl: Duration,
    subject: Vec<u8>,
    key: Vec<u8>,
    output: Output,
) -> Result<Exit, CliError> {
    let mut client = LeaseClient::new(channel(endpoints).await?);
    let resp = client
        .grant(pb::LeaseGrantRequest {
            ttl_ms: ttl.as_millis() as u64,
            subject,
            key,
        })
        .await
        .map_err(status)?
        .into_inner();
    match output {
        Output::Json => {
            let mut doc = serde_json::Map::new();
            doc.insert("id".into(), json!(format!("{:x}", resp.id)));
            doc.insert("ttl_ms".into(), json!(resp.ttl_ms));
            json_bytes(&mut doc, "subject", &resp.subject);
            doc.insert("token".into(), json!(hex::encode(&resp.token)));
            print_json(&serde_json::Value::Object(doc));
        }
        Output::Table => out(format!(
            "lease {:x} granted with TTL {} ms for subject '{}'",
            resp.id,
            resp.ttl_ms,
            String::from_utf8_lossy(&resp.subject)
        )),
    }
    Ok(Exit::Done)
}

pub async fn revoke(endpoints: &[String], id: u64, output: Output) -> Result<Exit, CliError> {
    let mut client = LeaseClient::new(channel(endpoints).await?);
    let resp = client
        .revoke(pb::LeaseRevokeRequest { id })
        .await
        .map_err(status)?
        .into_inner();
    match output {
        Output::Json => print_json(&json!({
            "id": format!("{id:x}"),
            "found": resp.found,
            "keys_deleted": resp.keys_deleted,
            "token": hex::encode(&resp.token),
        })),
        Output::Table if resp.found => out(format!(
            "lease {id:x} revoked; {} keys deleted",
            resp.keys_deleted
        )),
        Output::Table => out(format!(
            "NOT FOUND: lease {id:x} did not exist (it expired or was revoked before)"
        )),
    }
    Ok(if resp.found { Exit::Done } else { Exit::No })
}

pub async fn time_to_live(
    endpoints: &[String],
    id: u64,
    keys: bool,
    enc: Encoding,
    output: Output,
) -> Result<Exit, CliError> {
    let mut client = LeaseClient::new(channel(endpoints).await?);
    let resp = client
        .time_to_live(pb::LeaseTimeToLiveRequest { id, keys })
        .await
        .map_err(status)?
        .into_inner();
    let Some(lease) = resp.lease.filter(|_| resp.found) else {
        return Err(CliError::not_found(format!(
            "lease {id:x} does not exist: it expired or was revoked"
        )));
    };
    match output {
        Output::Json => print_json(&info_json(&lease, enc)),
        Output::Table => {
            out(format!(
                "lease {:x}: TTL {} ms, {} ms remaining, subject '{}', {} keys",
                lease.id,
                lease.ttl_ms,
                lease.remaining_ms,
                enc.cell(&lease.subject),
                lease.key_count
            ));
            for key in &lease.keys {
                out(format!("  {}", enc.cell(key)));
            }
        }
    }
    Ok(Exit::Done)
}

fn info_json(lease: &pb::LeaseInfo, enc: Encoding) -> serde_json::Value {
    json!({
        "id": format!("{:x}", lease.id),
        "ttl_ms": lease.ttl_ms,
        "remaining_ms": lease.remaining_ms,
        "subject": enc.cell(&lease.subject),
        "key_count": lease.key_count,
        "keys": lease.keys.iter().map(|k| enc.cell(k)).collect::<Vec<_>>(),
    })
}

pub async fn list(endpoints: &[String], enc: Encoding, output: Output) -> Result<Exit, CliError> {
    let mut client = LeaseClient::new(channel(endpoints).await?);
    let resp = client
        .list(pb::LeaseListRequest {})
        .await
        .map_err(status)?
        .into_inner();
    match output {
        Output::Json => print_json(&json!({
            "leases": resp.leases.iter().map(|l| info_json(l, enc)).collect::<Vec<_>>(),
        })),
        Output::Table => {
            let mut table = Table::new();
            table.load_preset(UTF8_FULL_CONDENSED).set_header([
                "lease",
                "ttl ms",
                "remaining ms",
                "subject",
                "keys",
            ]);
            for l in &resp.leases {
                table.add_row([
                    format!("{:x}", l.id),
                    l.ttl_ms.to_string(),
                    l.remaining_ms.to_string(),
                    enc.cell(&l.subject),
                    l.key_count.to_string(),
                ]);
            }
            out(table);
        }
    }
    Ok(Exit::Done)
}

/// Keep lease `id` alive, renewing every third of its TTL, until `stop` or the lease is
/// gone (exit 1: it expired or was revoked); with `once`, renew one time.
pub async fn keep_alive(
    endpoints: &[String],
    id: u64,
    once: bool,
    output: Output,
    stop: tokio_util::sync::CancellationToken,
) -> Result<Exit, CliError> {
    let mut client = LeaseClient::new(channel(endpoints).await?);
    let (requests, rx) = tokio::sync::mpsc::channel(1);
    let mut answers = client
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(status)?
        .into_inner();
    loop {
        let _ = requests.send(pb::LeaseKeepAliveRequest { id }).await;
        let answer = tokio::select! {
            _ = stop.cancelled() => return Ok(Exit::Done),
            a = answers.message() => a.map_err(status)?,
        };
        let Some(answer) = answer else {
            return Err(CliError::from_status(&tonic::Status::unavailable(
                "the node ended the keep-alive stream (it is stopping); run the command again against another node",
            )));
        };
        if answer.ttl_ms == 0 {
            return Err(CliError::not_found(format!(
                "lease {id:x} does not exist any more: it expired or was revoked, and its keys are deleted"
            )));
        }
        match output {
            Output::Json => print_json(&json!({"id": format!("{id:x}"), "ttl_ms": answer.ttl_ms})),
            Output::Table => out(format!("lease {id:x} kept alive, TTL {} ms", answer.ttl_ms)),
        }
        if once {
            return Ok(Exit::Done);
        }
        let pause = Duration::from_millis((answer.ttl_ms / 3).max(1));
        tokio::select! {
            _ = stop.cancelled() => return Ok(Exit::Done),
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_ttls_parse_as_documented() {
        assert_eq!(parse_id("1a").unwrap(), 26);
        assert_eq!(parse_id("0x1a").unwrap(), 26);
        assert!(parse_id("0").is_err());
        assert!(parse_id("xyz").is_err());
        assert_eq!(parse_ttl("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_ttl("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_ttl("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_ttl("10 s").is_err());
        assert!(parse_ttl("s").is_err());
        assert!(parse_ttl("5d").is_err());
    }
}
