//! The `bank` workload: money moved between accounts by transactions, and snapshots of every
//! account that must always add up.
//!
//! - Accounts are counters `{jbank}:acct-0..4`: one hash tag, so they share one subject and
//!   one Raft group, which is what lets a transaction name them all (docs/txn.md).
//! - [`setup`], before any client or fault: one transaction adding [`INITIAL_BALANCE`] to
//!   every account, guarded by "account 0 is missing" so that a retry after an attempt that
//!   did apply takes the (empty) failure branch; then a linearizable, atomic scan at every
//!   node must show every account at its opening balance.
//! - Clients ([`client`]) transfer 1..=[`AMOUNT_MAX`] from one account to another with one
//!   transaction: compare `counter from in [amount, ∞)`, success `add from -amount,
//!   add to +amount`, failure empty. Both branches are `ok` completions (`succeeded` says
//!   which ran); a definite refusal is `fail` and an unknown outcome `info`
//!   ([`crate::client::write_error`]).
//! - Reads are LINEARIZABLE scans of the accounts' prefix, recorded `ok` only when the node
//!   says the page is `atomic` (one cut of every group; docs/scan.md). A page that is not is
//!   asked again, up to [`READ_ATTEMPTS_MAX`] times, then the read is a `fail`: reads change
//!   nothing, and a page read key by key is no snapshot to check a total on.
//! - [`final_phase`], after heal: linearizable atomic scans at every node until all agree
//!   (bounded), then one final SERIALIZABLE scan per node, each one state of that node's
//!   replica, recorded `final`.
//!
//! `checker::bank` documents the property.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::{Clients, Completion, read_error, txn_completion};
use crate::history::F;
use crate::pb;
use crate::recorder::Recorder;
use crate::rng::Rng;
use crate::workload::Ctx;

/// What every account's key starts with (the hash tag `jbank` is the subject).
pub const PREFIX: &str = "{jbank}:acct-";
/// The rule pattern of the accounts: `{` and `}` are glob alternation, so as classes.
pub const PATTERN: &str = "[{]jbank[}]:acct-*";
pub const ACCOUNTS: u64 = 5;
pub const INITIAL_BALANCE: i64 = 100;
/// Largest amount one transfer moves.
pub const AMOUNT_MAX: u64 = 5;
/// Scans per read before it gives up on an atomic page.
pub const READ_ATTEMPTS_MAX: u32 = 3;
/// Pause between setup attempts.
const SETUP_RETRY: Duration = Duration::from_millis(200);

/// Every account's key, in order.
pub fn accounts() -> Vec<String> {
    account_keys(ACCOUNTS)
}

/// The keys of `n` accounts named as the workload names them.
pub fn account_keys(n: u64) -> Vec<String> {
    (0..n).map(account).collect()
}

fn account(i: u64) -> String {
    format!("{PREFIX}{i}")
}

fn add(key: &str, delta: i64) -> pb::TxnOp {
    pb::TxnOp {
        key: key.as_bytes().to_vec(),
        op: Some(pb::Op {
            kind: Some(pb::op::Kind::Add(pb::Add { delta })),
        }),
        lease: 0,
    }
}

/// The page as balances by key; `Err` if it cannot be one (a value that is not a counter).
fn balances(resp: &pb::ScanResponse) -> Result<BTreeMap<String, i64>, String> {
    use pb::value::Kind;
    resp.entries
        .iter()
        .map(|e| {
            let key = String::from_utf8_lossy(&e.key).into_owned();
            match e.value.as_ref().and_then(|v| v.kind.as_ref()) {
                Some(Kind::Counter(c)) => Ok((key, *c)),
                other => Err(format!("{key} holds {other:?}, not a counter")),
            }
        })
        .collect()
}

/// One scan of the accounts at `node`: the balances, whether the page was one cut, or the
/// error. A page with a continuation is refused: five keys always fit one page, so the
/// snapshot would have to be assembled from several reads.
async fn scan(
    clients: &Clients,
    node: usize,
    consistency: pb::Consistency,
) -> Result<(BTreeMap<String, i64>, bool), Completion> {
    let req = pb::ScanRequest {
        prefix: PREFIX.as_bytes().to_vec(),
        consistency: consistency as i32,
        ..Default::default()
    };
    let resp = clients.scan(node, req).await.map_err(|e| read_error(&e))?;
    if !resp.next_page_token.is_empty() {
        return Err(Completion::Fail(format!(
            "the scan of {ACCOUNTS} accounts did not fit one page"
        )));
    }
    let b = balances(&resp).map_err(|e| Completion::Info(format!("unreadable response: {e}")))?;
    Ok((b, resp.atomic))
}

/// A read of every account as one snapshot: LINEARIZABLE pages must be atomic (asked again
/// otherwise); a SERIALIZABLE page is one state of the node's replica already.
async fn read(clients: &Clients, node: usize, consistency: pb::Consistency) -> Completion {
    for _ in 0..READ_ATTEMPTS_MAX {
        match scan(clients, node, consistency).await {
            Err(c) => return c,
            Ok((b, atomic)) if atomic || consistency != pb::Consistency::Linearizable => {
                return Completion::Ok(json!(b));
            }
            Ok(_) => {}
        }
    }
    Completion::Fail(format!(
        "no atomic page in {READ_ATTEMPTS_MAX} linearizable scans: not a snapshot"
    ))
}

/// Open the accounts (module docs) and wait until every node reads the opening balances,
/// within `limit`; records a `bank_setup` event. Returns how long it took.
pub async fn setup(clients: &Clients, rec: &Recorder, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let keys = accounts();
    let req = pb::TxnRequest {
        compare: vec![pb::Compare {
            key: keys[0].as_bytes().to_vec(),
            test: Some(pb::compare::Test::Exists(false)),
        }],
        success: keys.iter().map(|k| add(k, INITIAL_BALANCE)).collect(),
        failure: Vec::new(),
        token: Vec::new(),
    };
    let mut attempts = 0u64;
    let mut last = String::new();
    let created = loop {
        if started.elapsed() > limit {
            return Err(format!(
                "no transaction creating the accounts answered within {limit:?}: {last}"
            ));
        }
        let node = attempts as usize % clients.len() + 1;
        attempts += 1;
        match clients.txn(node, req.clone()).await {
            Ok(r) => break r.succeeded,
            Err(e) => last = format!("{:?}: {}", e.code(), e.message()),
        }
        tokio::time::sleep(SETUP_RETRY).await;
    };
    let want: BTreeMap<String, i64> = keys.iter().map(|k| (k.clone(), INITIAL_BALANCE)).collect();
    for node in 1..=clients.len() {
        loop {
            match read(clients, node, pb::Consistency::Linearizable).await {
                Completion::Ok(v) if v == json!(want) => break,
                Completion::Ok(v) => {
                    return Err(format!(
                        "n{node} read {v} after the accounts were opened, not {}",
                        json!(want)
                    ));
                }
                Completion::Fail(e) | Completion::Info(e) => last = e,
            }
            if started.elapsed() > limit {
                return Err(format!(
                    "n{node} did not read the opening balances within {limit:?}: {last}"
                ));
            }
            tokio::time::sleep(SETUP_RETRY).await;
        }
    }
    rec.nemesis(
        "bank_setup",
        json!({"accounts": keys, "balance": INITIAL_BALANCE, "attempts": attempts,
               "created_by_last_attempt": created}),
    );
    Ok(started.elapsed())
}

/// One client: 80 % transfers, 20 % reads, at random nodes.
pub async fn client(ctx: &Ctx, mut rng: Rng) {
    let mut process = ctx.rec.fresh_process();
    let mut ops = 0;
    while !ctx.done(ops) {
        ops += 1;
        let node = ctx.node(&mut rng);
        if rng.below(10) < 8 {
            let from = rng.below(ACCOUNTS);
            let to = (from + rng.range(1, ACCOUNTS - 1)) % ACCOUNTS;
            let amount = rng.range(1, AMOUNT_MAX) as i64;
            let (from, to) = (account(from), account(to));
            let arg = json!({"from": from, "to": to, "amount": amount});
            ctx.op(&mut process, F::Transfer, PREFIX, arg, node, false, async {
                let req = pb::TxnRequest {
                    compare: vec![pb::Compare {
                        key: from.as_bytes().to_vec(),
                        test: Some(pb::compare::Test::Counter(pb::CounterRange {
                            min: Some(amount),
                            max: None,
                        })),
                    }],
                    success: vec![add(&from, -amount), add(&to, amount)],
                    failure: Vec::new(),
                    token: Vec::new(),
                };
                txn_completion(ctx.clients.txn(node, req).await)
            })
            .await;
        } else {
            ctx.op(
                &mut process,
                F::ReadAll,
                PREFIX,
                Value::Null,
                node,
                false,
                read(&ctx.clients, node, pb::Consistency::Linearizable),
            )
            .await;
        }
        tokio::time::sleep(ctx.think).await;
    }
}

/// After heal: wait (at most `limit`) until a linearizable atomic read at every node shows
/// the same balances, then record one final serializable read per node. Returns how long
/// agreement took, or what the nodes read at the limit.
pub async fn final_phase(ctx: &Ctx, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut outcome = Err("no round of reads completed".to_owned());
    while started.elapsed() < limit {
        let mut views = Vec::new();
        for node in 1..=ctx.nodes {
            views.push(read(&ctx.clients, node, pb::Consistency::Linearizable).await);
        }
        let first = match &views[0] {
            Completion::Ok(v) => Some(v),
            _ => None,
        };
        let agree = first.is_some()
            && views
                .iter()
                .all(|c| matches!(c, Completion::Ok(v) if Some(v) == first));
        if agree {
            outcome = Ok(started.elapsed());
            break;
        }
        let shown: Vec<String> = views
            .iter()
            .enumerate()
            .map(|(i, c)| match c {
                Completion::Ok(v) => format!("n{} {v}", i + 1),
                Completion::Fail(e) | Completion::Info(e) => format!("n{} unreadable ({e})", i + 1),
            })
            .collect();
        outcome = Err(format!("{PREFIX}*: {}", shown.join(", ")));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for node in 1..=ctx.nodes {
        let mut process = ctx.rec.fresh_process();
        ctx.op(
            &mut process,
            F::ReadAll,
            PREFIX,
            Value::Null,
            node,
            true,
            read(&ctx.clients, node, pb::Consistency::Serializable),
        )
        .await;
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accounts_share_one_hash_tag_and_match_their_rule() {
        let keys = accounts();
        assert_eq!(keys.len(), ACCOUNTS as usize);
        assert!(keys.iter().all(|k| k.starts_with("{jbank}:")));
        assert_eq!(keys[4], "{jbank}:acct-4");
        // The rule's glob, minus the classes the braces need, is the prefix.
        assert_eq!(
            PATTERN.replace("[{]", "{").replace("[}]", "}"),
            format!("{PREFIX}*")
        );
    }
}
