//! `calm lock KEY -- CMD` and `calm elect KEY VALUE` / `calm elect --listen KEY`: a lock and
//! a leader election, as recipes on a lease and a compare-and-set (docs/leases.md, "Locks
//! and elections").
//!
//! Both take KEY the same way: grant a lease for KEY's subject, then write KEY with a
//! compare-and-set expecting it absent, attached to the lease. Whoever's write takes effect
//! holds KEY until its lease ends (revoked on release, or expired when the holder stops
//! renewing); the others wait for KEY's delete (a watch from their failed write's token, so
//! no delete is missed) and try again. The register version of the winning write is the
//! **fencing token**: KEY's version grows by every write and every delete, so each holder's
//! token is larger than every earlier holder's. Pass it to whatever the lock protects and
//! have that refuse smaller tokens than it has seen: a holder that stalled past its lease
//! is then refused, not obeyed.
//!
//! Before reporting the lock held, the holder checks, linearizably, that its lease still
//! exists with KEY attached and that KEY still holds its value (Jepsen's etcd 3.4.3 analysis
//! found a lock recipe that reported a lock whose lease had already expired). While held,
//! the lease is renewed every third of its TTL; the holder counts itself the holder only
//! until its last acknowledged renewal's send time plus the TTL, and stops CMD (SIGTERM) if
//! that passes without a renewal.

use super::{CliError, Exit, Output, channel, print_json};
use crate::api::pb;
use crate::api::pb::kv_client::KvClient;
use crate::api::pb::lease_client::LeaseClient;
use calm_raft::channel::H2Channel;
use serde_json::json;
use std::io::Write;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn out(text: impl std::fmt::Display) {
    let _ = writeln!(std::io::stdout(), "{text}");
}

fn status(s: tonic::Status) -> CliError {
    CliError::from_status(&s)
}

/// How long a waiter watches KEY before it tries its compare-and-set again anyway (a watch
/// on a node that stalls must not stall the waiter).
const WAIT_ROUND: Duration = Duration::from_secs(2);
/// How long CMD has to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// A lease held and renewed in the background.
struct Held {
    id: u64,
    ttl: Duration,
    /// Until when this process may count itself the holder (monotonic).
    valid_until: watch::Receiver<Instant>,
    stop: CancellationToken,
}

impl Held {
    /// Grant a lease for `key`'s subject and renew it every third of its TTL.
    async fn grant(
        channel: &H2Channel,
        key: &[u8],
        ttl: Duration,
    ) -> Result<(Held, Vec<u8>), CliError> {
        let mut leases = LeaseClient::new(channel.clone());
        let sent = Instant::now();
        let g = leases
            .grant(pb::LeaseGrantRequest {
                ttl_ms: ttl.as_millis() as u64,
                subject: Vec::new(),
                key: key.to_vec(),
            })
            .await
            .map_err(status)?
            .into_inner();
        let ttl = Duration::from_millis(g.ttl_ms);
        let (tx, valid_until) = watch::channel(sent + ttl);
        let stop = CancellationToken::new();
        tokio::spawn(renew(leases, g.id, ttl, tx, stop.clone()));
        Ok((
            Held {
                id: g.id,
                ttl,
                valid_until,
                stop,
            },
            g.token,
        ))
    }

    fn valid(&self) -> bool {
        Instant::now() < *self.valid_until.borrow()
    }

    /// Resolves once the hold has run out (no renewal acknowledged in time).
    async fn lost(&mut self) {
        loop {
            let until = *self.valid_until.borrow_and_update();
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {
                    if *self.valid_until.borrow() <= Instant::now() {
                        return;
                    }
                }
                changed = self.valid_until.changed() => {
                    if changed.is_err() {
                        // The renewer ended: the hold lasts only until its last deadline.
                        tokio::time::sleep_until(*self.valid_until.borrow()).await;
                        return;
                    }
                }
            }
        }
    }

    /// Stop renewing and revoke the lease (deleting KEY if it is attached).
    async fn release(self, channel: &H2Channel) {
        self.stop.cancel();
        let _ = LeaseClient::new(channel.clone())
            .revoke(pb::LeaseRevokeRequest { id: self.id })
            .await;
    }
}

/// Renew lease `id` every third of `ttl` until `stop`; each acknowledged renewal moves the
/// deadline to its send time plus `ttl`. Ends when the lease is gone.
async fn renew(
    mut leases: LeaseClient<H2Channel>,
    id: u64,
    ttl: Duration,
    valid_until: watch::Sender<Instant>,
    stop: CancellationToken,
) {
    let every = ttl / 3;
    while !stop.is_cancelled() {
        let (requests, rx) = tokio::sync::mpsc::channel(1);
        let Ok(answers) = leases
            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut answers = answers.into_inner();
        loop {
            let sent = Instant::now();
            if requests
                .send(pb::LeaseKeepAliveRequest { id })
                .await
                .is_err()
            {
                break;
            }
            let answer = tokio::select! {
                _ = stop.cancelled() => return,
                a = tokio::time::timeout(every, answers.message()) => a,
            };
            match answer {
                Ok(Ok(Some(a))) if a.ttl_ms > 0 => {
                    let _ = valid_until.send(sent + ttl);
                }
                // Gone: expired or revoked.
                Ok(Ok(Some(_))) => return,
                // The stream broke or stalled: open another at once.
                _ => break,
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every.saturating_sub(sent.elapsed())) => {}
            }
        }
    }
}

/// Take `key` for `held`: a leased compare-and-set expecting it absent, until it takes effect
/// (waiting for the current holder's delete in between) or `stop`. Returns the fencing
/// token.
async fn acquire(
    channel: &H2Channel,
    key: &[u8],
    value: &[u8],
    held: &Held,
    mut token: Vec<u8>,
    stop: &CancellationToken,
) -> Result<Option<u64>, CliError> {
    let mut kv = KvClient::new(channel.clone());
    loop {
        if !held.valid() {
            return Err(CliError::not_found(
                "the lease ran out while waiting (no renewal was acknowledged within its TTL); try again",
            ));
        }
        let w = kv
            .write(pb::WriteRequest {
                key: key.to_vec(),
                op: Some(pb::Op {
                    kind: Some(pb::op::Kind::Cas(pb::Cas {
                        expect: Some(pb::cas::Expect::Absent(true)),
                        new_value: value.to_vec(),
                        delete: false,
                    })),
                }),
                token: token.clone(),
                lease: held.id,
            })
            .await;
        match w {
            Ok(w) if w.get_ref().succeeded => return Ok(Some(w.into_inner().version)),
            Ok(w) => token = w.into_inner().token,
            // Unknown outcome: if it took effect, KEY holds our value and the next attempt
            // fails; the check before reporting sees it. Try again shortly.
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(s) => return Err(status(s)),
        }
        if mine(channel, key, value).await? {
            // An earlier attempt with an unknown outcome took it.
            return current_version(channel, key).await.map(Some);
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = await_delete(channel, key, &token) => {}
        }
    }
}

/// Wait (at most [`WAIT_ROUND`]) for `key` to be deleted after `token`.
async fn await_delete(channel: &H2Channel, key: &[u8], token: &[u8]) {
    let mut kv = KvClient::new(channel.clone());
    let watching = async {
        let Ok(stream) = kv
            .watch(pb::WatchRequest {
                key: key.to_vec(),
                start_token: token.to_vec(),
                ..Default::default()
            })
            .await
        else {
            return;
        };
        let mut stream = stream.into_inner();
        while let Ok(Some(r)) = stream.message().await {
            if r.events
                .iter()
                .any(|e| e.kind == pb::EventKind::Delete as i32)
            {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(WAIT_ROUND, watching).await;
}

async fn read(channel: &H2Channel, key: &[u8]) -> Result<pb::GetResponse, CliError> {
    KvClient::new(channel.clone())
        .get(pb::GetRequest {
            key: key.to_vec(),
            consistency: pb::Consistency::Linearizable as i32,
            token: Vec::new(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(status)
}

/// Whether `key` holds `value` now (linearizably).
async fn mine(channel: &H2Channel, key: &[u8], value: &[u8]) -> Result<bool, CliError> {
    let r = read(channel, key).await?;
    Ok(matches!(
        r.value.and_then(|v| v.kind),
        Some(pb::value::Kind::Register(reg)) if reg.value == value
    ))
}

async fn current_version(channel: &H2Channel, key: &[u8]) -> Result<u64, CliError> {
    match read(channel, key).await?.value.and_then(|v| v.kind) {
        Some(pb::value::Kind::Register(r)) => Ok(r.version),
        _ => Err(CliError::not_found(
            "the key vanished right after it was taken (its lease ended); try again",
        )),
    }
}

/// Check, linearizably, that `held` still holds `key` with `value`: the lease exists with
/// the key attached, and the key holds the value.
async fn confirm(
    channel: &H2Channel,
    key: &[u8],
    value: &[u8],
    held: &Held,
) -> Result<(), CliError> {
    let t = LeaseClient::new(channel.clone())
        .time_to_live(pb::LeaseTimeToLiveRequest {
            id: held.id,
            keys: true,
        })
        .await
        .map_err(status)?
        .into_inner();
    let attached = t.found && t.lease.is_some_and(|l| l.keys.iter().any(|k| k == key));
    if !attached || !mine(channel, key, value).await? || !held.valid() {
        return Err(CliError::not_found(
            "the lock was lost before it could be reported held (its lease ended or the key was taken over); try again",
        ));
    }
    Ok(())
}

/// Grant a lease for `key` and take `key` with `value` (waiting for other holders), checked
/// before it is reported: the hold and its fencing token, or `None` when `stop` came first.
/// Whatever fails or stops releases the lease.
async fn take(
    channel: &H2Channel,
    key: &[u8],
    value: &[u8],
    ttl: Duration,
    stop: &CancellationToken,
) -> Result<Option<(Held, u64)>, CliError> {
    let (held, token) = Held::grant(channel, key, ttl).await?;
    let taken = match acquire(channel, key, value, &held, token, stop).await {
        Ok(Some(fence)) => confirm(channel, key, value, &held)
            .await
            .map(|()| Some(fence)),
        other => other,
    };
    match taken {
        Ok(Some(fence)) => Ok(Some((held, fence))),
        other => {
            held.release(channel).await;
            other.map(|_| None)
        }
    }
}

/// This process's identity as a holder: host and pid.
fn holder_id() -> Vec<u8> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}:{}", host.trim(), std::process::id()).into_bytes()
}

/// `calm lock KEY -- CMD`: hold `key` while `command` runs; its exit code is the command's.
pub async fn lock(
    endpoints: &[String],
    key: Vec<u8>,
    ttl: Duration,
    command: Vec<String>,
    output: Output,
    stop: CancellationToken,
) -> Result<Exit, CliError> {
    let Some((program, args)) = command.split_first() else {
        return Err(CliError::usage("give the command to run after `--`"));
    };
    let channel = channel(endpoints).await?;
    let value = holder_id();
    let Some((mut held, fence)) = take(&channel, &key, &value, ttl, &stop).await? else {
        return Ok(Exit::No);
    };
    let shown = String::from_utf8_lossy(&key).into_owned();
    match output {
        Output::Json => print_json(&json!({
            "key": shown, "fencing_token": fence, "lease": format!("{:x}", held.id),
            "ttl_ms": held.ttl.as_millis() as u64,
        })),
        Output::Table => {
            let _ = writeln!(
                std::io::stderr(),
                "calm: locked '{shown}' with fencing token {fence} (lease {:x}); running {program}",
                held.id
            );
        }
    }
    let child = match std::process::Command::new(program)
        .args(args)
        .env("CALM_LOCK_KEY", &shown)
        .env("CALM_LOCK_FENCING_TOKEN", fence.to_string())
        .env("CALM_LOCK_LEASE", format!("{:x}", held.id))
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            held.release(&channel).await;
            return Err(CliError::usage(format!("cannot run {program}: {e}")));
        }
    };
    // Waited for on a thread of its own (the runtime has no process driver).
    let pid = child.id();
    let (exited, mut exit) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut child = child;
        let _ = exited.send(child.wait());
    });
    let outcome = tokio::select! {
        status = &mut exit => Ok(status.unwrap_or_else(|_| Err(std::io::Error::other("the waiting thread ended")))),
        () = held.lost() => Err("lost"),
        () = stop.cancelled() => Err("interrupted"),
    };
    let code = match outcome {
        Ok(Ok(exit)) => exit.code().unwrap_or(1),
        Ok(Err(e)) => {
            held.release(&channel).await;
            return Err(CliError::usage(format!(
                "waiting for {program} failed: {e}"
            )));
        }
        Err(why) => {
            terminate(pid, &mut exit).await;
            held.release(&channel).await;
            if why == "interrupted" {
                return Ok(Exit::No);
            }
            return Err(CliError::not_found(format!(
                "lost the lock on '{shown}' (no lease renewal was acknowledged within its TTL); {program} was stopped"
            )));
        }
    };
    held.release(&channel).await;
    Ok(match code {
        0 => Exit::Done,
        code => {
            // The command's own exit code, as `flock` and `etcdctl lock` pass it on.
            let _ = std::io::stdout().flush();
            std::process::exit(code);
        }
    })
}

/// SIGTERM our child `pid`, then SIGKILL after [`TERM_GRACE`]; returns once it exited
/// (`exit` resolves when it has, so the pid is not reused before).
async fn terminate(
    pid: u32,
    exit: &mut tokio::sync::oneshot::Receiver<std::io::Result<std::process::ExitStatus>>,
) {
    if exit.try_recv().is_ok() {
        // It exited on its own meanwhile (and its pid may be another process's now).
        return;
    }
    // SAFETY: signalling our own child, which has not been reaped yet (the waiting thread
    // reaps it and then resolves `exit`).
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    if tokio::time::timeout(TERM_GRACE, &mut *exit).await.is_err() {
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let _ = exit.await;
    }
}

/// `calm elect KEY VALUE`: campaign for `key`; once elected, print it and stay leader until
/// interrupted (then resign: the key is deleted) or until the lease is lost (exit 1).
pub async fn elect(
    endpoints: &[String],
    key: Vec<u8>,
    value: Vec<u8>,
    ttl: Duration,
    output: Output,
    stop: CancellationToken,
) -> Result<Exit, CliError> {
    let channel = channel(endpoints).await?;
    let Some((mut held, term)) = take(&channel, &key, &value, ttl, &stop).await? else {
        return Ok(Exit::Done);
    };
    let (key_s, value_s) = (
        String::from_utf8_lossy(&key),
        String::from_utf8_lossy(&value),
    );
    match output {
        Output::Json => print_json(&json!({
            "key": key_s, "leader": value_s, "fencing_token": term,
            "lease": format!("{:x}", held.id),
        })),
        Output::Table => out(format!(
            "elected: '{key_s}' = '{value_s}' (fencing token {term}); Ctrl-C resigns"
        )),
    }
    let lost = tokio::select! {
        () = held.lost() => true,
        () = stop.cancelled() => false,
    };
    held.release(&channel).await;
    if lost {
        return Err(CliError::not_found(format!(
            "lost the leadership of '{key_s}' (no lease renewal was acknowledged within its TTL)"
        )));
    }
    Ok(Exit::Done)
}

/// `calm elect --listen KEY`: print the leader now and at every change, until interrupted.
pub async fn listen(
    endpoints: &[String],
    key: Vec<u8>,
    output: Output,
    stop: CancellationToken,
) -> Result<Exit, CliError> {
    let channel = channel(endpoints).await?;
    let show = |leader: Option<&[u8]>| match output {
        Output::Json => print_json(&json!({
            "key": String::from_utf8_lossy(&key),
            "leader": leader.map(|l| String::from_utf8_lossy(l).into_owned()),
        })),
        Output::Table => match leader {
            Some(l) => out(format!("leader: {}", String::from_utf8_lossy(l))),
            None => out("no leader"),
        },
    };
    let register = |v: Option<pb::Value>| match v.and_then(|v| v.kind) {
        Some(pb::value::Kind::Register(r)) => Some(r.value),
        _ => None,
    };
    let mut kv = KvClient::new(channel.clone());
    loop {
        // A read, then a watch from its token: every change after the read is seen.
        let now = read(&channel, &key).await?;
        let mut last = register(now.value);
        show(last.as_deref());
        let mut stream = kv
            .watch(pb::WatchRequest {
                key: key.clone(),
                start_token: now.token,
                ..Default::default()
            })
            .await
            .map_err(status)?
            .into_inner();
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return Ok(Exit::Done),
                m = stream.message() => m,
            };
            let Ok(Some(r)) = message else {
                // The node ended the stream (it stopped, or the watch fell behind): read
                // and watch again.
                break;
            };
            for e in r.events {
                let leader = if e.kind == pb::EventKind::Delete as i32 {
                    None
                } else {
                    register(e.value)
                };
                if leader != last {
                    show(leader.as_deref());
                    last = leader;
                }
            }
        }
    }
}
