//! The `lock` workload: clients compete for one lease-based lock and write through a
//! register fenced by the lock's token (docs/leases.md; the recipe of `calm lock`).
//!
//! - The lock is the register [`LOCK`], the data it protects the register [`DATA`]: one hash
//!   tag, so one subject, so a transaction can compare the one and write the other
//!   (docs/txn.md), and a lease granted for the lock's subject can hold the lock key.
//! - **acquire** ([`acquire`]): grant a lease for the lock key's subject asking for
//!   [`TTL_ASKED_MS`] (the cluster raises it to its minimum, 1.5x the election timeout, and
//!   answers the TTL granted), then a compare-and-set of [`LOCK`] expecting it absent, with
//!   the lease and the holder's name as value. Written: `ok`, and the register version it
//!   wrote is the **fencing token** (every write and every delete of a register is a new
//!   version, so each holder's token exceeds every earlier holder's). The key existed: `fail`,
//!   nothing held, and the unused lease is revoked. Unknown (timeout, UNAVAILABLE): `info`,
//!   and the lease is revoked all the same, which deletes the key if the write did apply. A
//!   refused grant is a `fail` (nothing was written).
//! - **hold**: a holder counts itself the holder until its **deadline**, the time it sent
//!   its last acknowledged renewal (at first, the time it began the acquisition) plus the
//!   TTL, by its own monotonic clock, and stops acting [`MARGIN`] before it. A renewer runs
//!   beside it ([`renewer`]): one KeepAlive stream, a renewal every third of the TTL, each
//!   recorded as a `renew` op (the invocation is recorded before the request is sent, so
//!   its time is no later than the send). An answer with TTL 0 says the lease is gone: the
//!   holder stops at once. A failed renewal is tried again sooner, on a new stream at
//!   another node.
//! - **write**, a few times per hold ([`WRITES_PER_HOLD`]): one transaction comparing
//!   `version {jlock}:lock == token` that on success puts `{jlock}:data = "token:seq"`,
//!   recorded `fenced_write` with `{"succeeded": bool}`.
//! - **release**: the renewer is stopped, then the lease revoked (which deletes the lock
//!   key), recorded `release`. Holds last [`HOLD_SHORT_MS`] most of the time and, one in
//!   [`LONG_HOLD_ONE_IN`], from a third of the TTL to one and a half TTLs, so that renewals
//!   are exercised too (a short hold ends before its first renewal).
//!
//! Losers retry after a short random pause. `checker::lock` documents the property.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::client::{Completion, txn_completion, write_error};
use crate::history::F;
use crate::pb;
use crate::rng::Rng;
use crate::workload::Ctx;

/// The lock's key; its hash tag `jlock` is the subject.
pub const LOCK: &str = "{jlock}:lock";
/// The register the lock protects (same subject, so a transaction names both).
pub const DATA: &str = "{jlock}:data";
/// The rule pattern of both keys: `{` and `}` are glob alternation, so as classes.
pub const PATTERN: &str = "[{]jlock[}]:*";
/// The TTL asked for: less than any cluster's minimum, so every grant gets the minimum.
pub const TTL_ASKED_MS: u64 = 1;
/// How long a short hold lasts, ms (inclusive).
pub const HOLD_SHORT_MS: (u64, u64) = (100, 800);
/// One hold in this many is long: from a third of the TTL to one and a half TTLs.
pub const LONG_HOLD_ONE_IN: u64 = 4;
/// Fenced writes per hold, spread over it.
pub const WRITES_PER_HOLD: u32 = 3;
/// How long before its deadline a holder stops acting: time for scheduling slack.
pub const MARGIN: Duration = Duration::from_millis(100);
/// Pause of a loser before it tries again, ms (inclusive).
const RETRY_MS: (u64, u64) = (20, 200);
/// How often a holder looks at its deadline while it waits.
const POLL: Duration = Duration::from_millis(20);

/// What a holder and its renewer share.
struct Hold {
    lease: u64,
    token: u64,
    ttl: Duration,
    /// Until when the holder may act: its last acknowledged renewal's send time (or its
    /// acquisition's start) plus the TTL.
    deadline: Mutex<Instant>,
    /// A renewal said the lease no longer exists.
    lost: AtomicBool,
    /// The holder is done: the renewer stops.
    done: tokio::sync::watch::Sender<bool>,
}

impl Hold {
    fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the holder may still act at `now` (before its deadline, less the margin).
    fn valid_at(&self, now: Instant) -> bool {
        !self.lost.load(Ordering::Relaxed) && now + MARGIN < self.deadline()
    }

    fn extend(&self, sent: Instant, ttl: Duration) {
        let mut d = self.deadline.lock().unwrap_or_else(|e| e.into_inner());
        *d = (*d).max(sent + ttl);
    }
}

/// Revoke `lease` once, at `node` (a lease left behind only expires later): what happened,
/// for the op's message.
async fn revoke_unused(ctx: &Ctx, node: usize, lease: u64) -> String {
    match ctx.clients.revoke(node, lease).await {
        Ok(r) => format!("lease {lease:x} revoked (found: {})", r.found),
        Err(e) => format!(
            "lease {lease:x} not revoked ({:?}: {}); it expires",
            e.code(),
            e.message()
        ),
    }
}

/// One acquisition attempt (module docs): the `ok` value `{"token", "lease", "ttl_ms"}`.
async fn acquire(ctx: &Ctx, node: usize, holder: &str) -> Completion {
    let grant = match ctx.clients.grant(node, LOCK, TTL_ASKED_MS).await {
        Ok(g) => g,
        Err(e) => {
            return Completion::Fail(format!(
                "no lease granted, so nothing written: {:?}: {}",
                e.code(),
                e.message()
            ));
        }
    };
    let cas = pb::op::Kind::Cas(pb::Cas {
        expect: Some(pb::cas::Expect::Absent(true)),
        new_value: holder.as_bytes().to_vec(),
        delete: false,
    });
    match ctx
        .clients
        .write_leased(node, LOCK, cas, grant.token.clone(), grant.id)
        .await
    {
        Ok(r) if r.succeeded => Completion::Ok(json!({
            "token": r.version,
            "lease": grant.id,
            "ttl_ms": grant.ttl_ms,
        })),
        Ok(_) => {
            let revoked = revoke_unused(ctx, node, grant.id).await;
            Completion::Fail(format!("the lock is held (its key exists); {revoked}"))
        }
        Err(e) => {
            let revoked = revoke_unused(ctx, node, grant.id).await;
            match write_error(&e) {
                Completion::Fail(m) => Completion::Fail(format!("{m}; {revoked}")),
                Completion::Info(m) => Completion::Info(format!("{m}; {revoked}")),
                ok => ok,
            }
        }
    }
}

/// A KeepAlive stream to one node: requests go in through `requests`, answers come back in
/// order on `answers`.
struct KeepAlive {
    node: usize,
    requests: futures::channel::mpsc::Sender<pb::LeaseKeepAliveRequest>,
    answers: tonic::Streaming<pb::LeaseKeepAliveResponse>,
}

/// One renewal of `lease` on `stream` (opened at `node` first if there is none); the `ok`
/// value `{"ttl_ms": n}`. Any failure drops the stream: an error ends a gRPC stream, and an
/// answer that did not come may still be on its way, out of step with the next request.
async fn renew_once(
    ctx: &Ctx,
    stream: &mut Option<KeepAlive>,
    node: usize,
    lease: u64,
) -> Completion {
    if stream.is_none() {
        let (requests, rx) = futures::channel::mpsc::channel(1);
        match ctx.clients.keep_alive(node, rx).await {
            Ok(answers) => {
                *stream = Some(KeepAlive {
                    node,
                    requests,
                    answers,
                })
            }
            // Nothing was sent on a stream that did not open.
            Err(e) => {
                return Completion::Fail(format!(
                    "no keep-alive stream: {:?}: {}",
                    e.code(),
                    e.message()
                ));
            }
        }
    }
    let Some(ka) = stream.as_mut() else {
        unreachable!("opened above");
    };
    if let Err(e) = ka
        .requests
        .try_send(pb::LeaseKeepAliveRequest { id: lease })
    {
        *stream = None;
        return Completion::Fail(format!("the keep-alive stream is closed: {e}"));
    }
    let answer = tokio::time::timeout(ctx.clients.timeout, ka.answers.message()).await;
    let completion = match answer {
        Ok(Ok(Some(r))) if r.id == lease => return Completion::Ok(json!({"ttl_ms": r.ttl_ms})),
        Ok(Ok(Some(r))) => Completion::Info(format!(
            "the keep-alive answered for lease {:x}, not {lease:x}",
            r.id
        )),
        Ok(Ok(None)) => Completion::Info("the keep-alive stream ended unanswered".into()),
        Ok(Err(status)) => write_error(&status),
        Err(_) => Completion::Info(format!(
            "no keep-alive answer from n{} within {:?}",
            ka.node, ctx.clients.timeout
        )),
    };
    *stream = None;
    completion
}

/// Renew `hold` every third of its TTL until the holder is done, its deadline passes or a
/// renewal says the lease is gone; failed renewals are tried again after a tenth of the TTL
/// at another node.
async fn renewer(ctx: &Ctx, hold: &Hold, started: Instant, mut rng: Rng) {
    let mut process = ctx.rec.fresh_process();
    let mut done = hold.done.subscribe();
    let mut stream: Option<KeepAlive> = None;
    let mut node = ctx.node(&mut rng);
    let mut next = started + hold.ttl / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = done.changed() => return,
        }
        if *done.borrow() || !hold.valid_at(Instant::now()) {
            return;
        }
        let sent = Instant::now();
        let arg = json!({"lease": hold.lease, "token": hold.token});
        let (_, c) = ctx
            .op(&mut process, F::Renew, LOCK, arg, node, false, async {
                renew_once(ctx, &mut stream, node, hold.lease).await
            })
            .await;
        match c {
            Completion::Ok(v) if v["ttl_ms"].as_u64().unwrap_or(0) > 0 => {
                let ttl = Duration::from_millis(v["ttl_ms"].as_u64().unwrap_or(0));
                hold.extend(sent, ttl);
                next = sent + hold.ttl / 3;
            }
            Completion::Ok(_) => {
                hold.lost.store(true, Ordering::Relaxed);
                return;
            }
            Completion::Fail(_) | Completion::Info(_) => {
                node = ctx.node(&mut rng);
                next = Instant::now() + hold.ttl / 10;
            }
        }
    }
}

/// How long to hold (module docs).
fn hold_for(rng: &mut Rng, ttl: Duration) -> Duration {
    let ttl_ms = ttl.as_millis() as u64;
    let ms = if rng.below(LONG_HOLD_ONE_IN) == 0 {
        rng.range(ttl_ms / 3, ttl_ms * 3 / 2)
    } else {
        rng.range(HOLD_SHORT_MS.0, HOLD_SHORT_MS.1)
    };
    Duration::from_millis(ms)
}

/// Sleep until `until`, or until the holder may no longer act; whether it still may.
async fn wait_holding(hold: &Hold, until: Instant) -> bool {
    loop {
        let now = Instant::now();
        if !hold.valid_at(now) {
            return false;
        }
        if now >= until {
            return true;
        }
        tokio::time::sleep_until(until.min(now + POLL)).await;
    }
}

/// The holder's part of a hold: fenced writes spread over it while it may act; then it
/// stops the renewer.
async fn hold_and_write(
    ctx: &Ctx,
    hold: &Hold,
    process: &mut u64,
    rng: &mut Rng,
    held_from: Instant,
    until: Instant,
) -> u64 {
    let mut ops = 0;
    let step = (until.saturating_duration_since(held_from)) / (WRITES_PER_HOLD + 1);
    for seq in 1..=WRITES_PER_HOLD {
        if !wait_holding(hold, held_from + step * seq).await {
            break;
        }
        ops += 1;
        let node = ctx.node(rng);
        let value = format!("{}:{seq}", hold.token);
        let arg = json!({"token": hold.token, "value": value});
        ctx.op(process, F::FencedWrite, DATA, arg, node, false, async {
            let req = pb::TxnRequest {
                compare: vec![pb::Compare {
                    key: LOCK.as_bytes().to_vec(),
                    test: Some(pb::compare::Test::Version(pb::VersionTest {
                        op: pb::CompareOp::Equal as i32,
                        version: hold.token,
                    })),
                }],
                success: vec![pb::TxnOp {
                    key: DATA.as_bytes().to_vec(),
                    op: Some(pb::Op {
                        kind: Some(pb::op::Kind::Put(pb::Put {
                            value: value.clone().into_bytes(),
                        })),
                    }),
                    lease: 0,
                }],
                failure: Vec::new(),
                token: Vec::new(),
            };
            txn_completion(ctx.clients.txn(node, req).await)
        })
        .await;
    }
    wait_holding(hold, until).await;
    let _ = hold.done.send(true);
    ops
}

/// One client: acquire, hold (renewing, writing), release; losers retry.
pub async fn client(ctx: &Ctx, worker: u64, mut rng: Rng) {
    let mut process = ctx.rec.fresh_process();
    let mut ops = 0;
    let mut round = 0u64;
    while !ctx.done(ops) {
        ops += 1;
        round += 1;
        let node = ctx.node(&mut rng);
        let holder = format!("w{worker}-{round}");
        // Taken before the invocation is recorded: the deadline never outruns the lease.
        let started = Instant::now();
        let (_, c) = ctx
            .op(
                &mut process,
                F::Acquire,
                LOCK,
                json!({ "holder": holder }),
                node,
                false,
                acquire(ctx, node, &holder),
            )
            .await;
        let Completion::Ok(v) = c else {
            let (lo, hi) = RETRY_MS;
            tokio::time::sleep(ctx.think + Duration::from_millis(rng.range(lo, hi))).await;
            continue;
        };
        let (Some(token), Some(lease), Some(ttl_ms)) = (
            v["token"].as_u64(),
            v["lease"].as_u64(),
            v["ttl_ms"].as_u64(),
        ) else {
            unreachable!("acquire answers token, lease and ttl_ms");
        };
        let ttl = Duration::from_millis(ttl_ms);
        let (done, _) = tokio::sync::watch::channel(false);
        let hold = Hold {
            lease,
            token,
            ttl,
            deadline: Mutex::new(started + ttl),
            lost: AtomicBool::new(false),
            done,
        };
        let held_from = Instant::now();
        // The run's end cuts a hold short: the heal waits for every worker.
        let until = (held_from + hold_for(&mut rng, ttl)).min(Instant::from_std(ctx.deadline));
        let renewer_rng = rng.fork(round);
        let ((), writes) = tokio::join!(
            renewer(ctx, &hold, started, renewer_rng),
            hold_and_write(ctx, &hold, &mut process, &mut rng, held_from, until),
        );
        ops += writes;
        let node = ctx.node(&mut rng);
        ctx.op(
            &mut process,
            F::Release,
            LOCK,
            json!({"lease": lease, "token": token}),
            node,
            false,
            async {
                match ctx.clients.revoke(node, lease).await {
                    Ok(r) => {
                        Completion::Ok(json!({"found": r.found, "keys_deleted": r.keys_deleted}))
                    }
                    Err(e) => write_error(&e),
                }
            },
        )
        .await;
        ops += 1;
        tokio::time::sleep(ctx.think).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_and_its_data_share_one_hash_tag_and_match_their_rule() {
        for key in [LOCK, DATA] {
            assert!(key.starts_with("{jlock}:"));
            let glob = PATTERN.replace("[{]", "{").replace("[}]", "}");
            assert!(key.starts_with(glob.trim_end_matches('*')), "{key}");
        }
    }

    #[test]
    fn holds_are_short_or_span_renewals() {
        let mut rng = Rng::new(3);
        let ttl = Duration::from_secs(3);
        let holds: Vec<Duration> = (0..400).map(|_| hold_for(&mut rng, ttl)).collect();
        assert!(holds.iter().all(|h| *h >= Duration::from_millis(100)));
        assert!(holds.iter().all(|h| *h <= ttl * 3 / 2));
        // Some holds outlast a third of the TTL, so they renew.
        assert!(
            holds
                .iter()
                .any(|h| *h > ttl / 3 + Duration::from_millis(100))
        );
    }
}
