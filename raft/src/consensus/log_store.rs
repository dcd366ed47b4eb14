//! Every group's Raft log, kept in the node's one WAL.
//!
//! There is no second log file: a group's vote, entries, truncations, purges and committed
//! index are WAL records tagged with the group id, so one group commit (one fdatasync) makes
//! the fast path's facts and every group's entries durable together. The log *index* — which
//! entries a group currently has — lives in memory ([`GroupLog`]) and is rebuilt by replaying
//! those records on start ([`RaftLogs::replay`], [`RaftLogs::finish_recovery`]).
//!
//! Retention. A WAL segment may be deleted only when nothing below its LSN is still needed.
//! For Raft that means every entry a group still lists (index above its purge point), and
//! every entry above the applied index of the oldest kept checkpoint (falling back to that
//! checkpoint must be able to re-apply them). [`RaftLogs::retention_floor`] computes that LSN;
//! the latest vote, committed and purge records are re-appended before segments go
//! ([`RaftLogs::rewrite_records`]), since "latest wins" on replay.
//!
//! Durability contract with openraft: `append` returns once the entries are readable and calls
//! the flush callback when their WAL batch is durable; `save_vote` and `truncate_after` return
//! only once durable; purge records ride along with later batches and committed ids with the
//! node's periodic persist (losing one in a crash only makes replay keep or wait for more).

use super::types::{CalmRaft, Entry, GroupId, IoFlushed, LogId, Vote};
use crate::wal::{Wal, WalRecord, WalRecordKind};
use openraft::entry::RaftEntry;
use openraft::storage::{LogState, RaftLogReader, RaftLogStorage};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard};

/// Entries kept in memory per group at most; past it, appends fail (openraft then stops the
/// group) rather than exhausting memory. Snapshots purge long before this in practice.
pub const GROUP_LOG_ENTRIES_MAX: usize = 1 << 20;

/// One group's log as replay and the log store see it.
#[derive(Debug, Default)]
pub struct GroupLog {
    vote: Option<Vote>,
    committed: Option<LogId>,
    /// The committed id last handed out by `committed_records`.
    committed_written: Option<LogId>,
    last_purged: Option<LogId>,
    entries: BTreeMap<u64, Entry>,
    /// Index -> a lower bound of the LSN of the WAL batch holding that entry. Kept past purge,
    /// for the retention floor; trimmed when segments are deleted.
    lsns: BTreeMap<u64, u64>,
}

impl GroupLog {
    fn last_log_id(&self) -> Option<LogId> {
        self.entries
            .last_key_value()
            .map(|(_, e)| e.log_id())
            .or(self.last_purged)
    }

    fn insert(&mut self, entry: Entry, lsn: u64) {
        let index = entry.index();
        // An append at `index` replaces whatever followed (openraft truncates first; replay
        // of an old WAL without the truncate record must reach the same log).
        remove_from(&mut self.entries, index);
        remove_from(&mut self.lsns, index);
        self.entries.insert(index, entry);
        self.lsns.insert(index, lsn);
    }

    fn truncate_after(&mut self, last: Option<&LogId>) {
        let from = last.map_or(0, |l| l.index + 1);
        remove_from(&mut self.entries, from);
        remove_from(&mut self.lsns, from);
    }

    fn purge(&mut self, upto: &LogId) {
        let keep = self.entries.split_off(&(upto.index + 1));
        self.entries = keep;
        if self
            .last_purged
            .as_ref()
            .is_none_or(|p| p.index < upto.index)
        {
            self.last_purged = Some(*upto);
        }
    }
}

/// Removes the keys at or after `from`. `split_off` alone would allocate and free a node per
/// tree level even when no key is there, which is every append: 1–2% of a node's CPU under
/// put x64 (docs/benchmarks.md).
fn remove_from<V>(map: &mut BTreeMap<u64, V>, from: u64) {
    if map.last_key_value().is_some_and(|(&last, _)| last >= from) {
        map.split_off(&from);
    }
}

/// Every group's log on this node.
pub struct RaftLogs {
    wal: Arc<Wal>,
    groups: Mutex<BTreeMap<GroupId, Arc<Mutex<GroupLog>>>>,
    /// During replay: the highest purge point each group recorded, applied only in
    /// `finish_recovery` (a restored older checkpoint may need entries below it).
    replayed_purges: Mutex<BTreeMap<GroupId, LogId>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a log lock leaves no half-done update behind (every update is a
    // single map operation), so continuing with the data is sound.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, lsn: u64, bytes: &[u8]) -> io::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("WAL batch at LSN {lsn}: Raft {what} record does not decode ({e}); the WAL is corrupt or from another calm version"),
        )
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("encoding into a Vec cannot fail")
}

fn wal_io(e: crate::wal::WalError) -> io::Error {
    io::Error::other(e)
}

impl RaftLogs {
    pub fn new(wal: Arc<Wal>) -> RaftLogs {
        RaftLogs {
            wal,
            groups: Mutex::new(BTreeMap::new()),
            replayed_purges: Mutex::new(BTreeMap::new()),
        }
    }

    fn group(&self, group: GroupId) -> Arc<Mutex<GroupLog>> {
        lock(&self.groups).entry(group).or_default().clone()
    }

    /// Feed one Raft record found by WAL replay (records arrive in LSN order).
    pub fn replay(&self, kind: WalRecordKind, payload: &[u8], lsn: u64) -> io::Result<()> {
        let Some(group) = kind.group() else {
            return Ok(());
        };
        let log = self.group(group);
        let mut log = lock(&log);
        match kind {
            WalRecordKind::RaftVote { .. } => log.vote = Some(decode("vote", lsn, payload)?),
            WalRecordKind::RaftCommitted { .. } => {
                log.committed = decode("committed", lsn, payload)?
            }
            WalRecordKind::RaftEntries { .. } => {
                let entries: Vec<Entry> = decode("entries", lsn, payload)?;
                for entry in entries {
                    log.insert(entry, lsn);
                }
            }
            WalRecordKind::RaftTruncate { .. } => {
                let last: Option<LogId> = decode("truncate", lsn, payload)?;
                log.truncate_after(last.as_ref());
            }
            WalRecordKind::RaftPurge { .. } => {
                let upto: LogId = decode("purge", lsn, payload)?;
                let mut purges = lock(&self.replayed_purges);
                let slot = purges.entry(group).or_insert_with(|| upto);
                if slot.index < upto.index {
                    *slot = upto;
                }
            }
            WalRecordKind::Facts => unreachable!("facts records have no group"),
        }
        Ok(())
    }

    /// End of replay. `applied` is each group's last applied log id in the state store the
    /// node recovered: a group is purged up to the smaller of its recorded purge point and
    /// that, so entries a restored (older) checkpoint still needs stay in the log.
    pub fn finish_recovery(&self, applied: &BTreeMap<GroupId, Option<LogId>>) -> io::Result<()> {
        let purges = std::mem::take(&mut *lock(&self.replayed_purges));
        for (group, purged) in purges {
            let applied = applied.get(&group).cloned().flatten();
            let upto = match applied {
                Some(a) if a.index < purged.index => {
                    let log = self.group(group);
                    let log = lock(&log);
                    if log
                        .entries
                        .keys()
                        .next()
                        .is_none_or(|&first| first > a.index + 1)
                    {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "group {group}: the state store applied up to index {} but the log was purged up to {} and the entries between are gone; this replica cannot recover by itself: stop it, remove its data directory and let it rejoin (it will receive a snapshot)",
                                a.index, purged.index
                            ),
                        ));
                    }
                    a
                }
                _ => purged,
            };
            let log = self.group(group);
            lock(&log).purge(&upto);
        }
        Ok(())
    }

    /// The log store of `group`, for openraft.
    pub fn store(&self, group: GroupId) -> GroupLogStore {
        GroupLogStore {
            group,
            wal: self.wal.clone(),
            log: self.group(group),
        }
    }

    /// Groups that have any Raft record.
    pub fn groups(&self) -> Vec<GroupId> {
        lock(&self.groups).keys().copied().collect()
    }

    /// The lowest LSN still needed by some group's log, given each group's applied index in
    /// the oldest kept checkpoint (`None` when there is no Raft record at all).
    pub fn retention_floor(&self, oldest_applied: &BTreeMap<GroupId, u64>) -> Option<u64> {
        let groups = lock(&self.groups);
        let mut floor: Option<u64> = None;
        for (group, log) in groups.iter() {
            let log = lock(log);
            let purged = log.last_purged.as_ref().map_or(0, |p| p.index);
            let keep_above = purged.min(oldest_applied.get(group).copied().unwrap_or(0));
            if let Some(&lsn) = log.lsns.range(keep_above + 1..).map(|(_, l)| l).min() {
                floor = Some(floor.map_or(lsn, |f| f.min(lsn)));
            }
        }
        floor
    }

    /// Re-append every group's latest vote, committed and purge records and wait until they
    /// are durable, so deleting older segments keeps them.
    pub fn rewrite_records(&self) -> io::Result<()> {
        let mut records = Vec::new();
        for (group, log) in lock(&self.groups).iter() {
            let log = lock(log);
            if let Some(vote) = &log.vote {
                records.push(WalRecord::raft_vote(*group, encode(vote)));
            }
            if log.committed.is_some() {
                records.push(WalRecord::raft_committed(*group, encode(&log.committed)));
            }
            if let Some(purged) = &log.last_purged {
                records.push(WalRecord::raft_purge(*group, encode(purged)));
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        self.wal
            .append(&records)
            .and_then(|t| t.wait())
            .map_err(wal_io)?;
        Ok(())
    }

    /// A committed-id record per group whose committed id is newer than the last one
    /// returned here, for the node's persist barrier (see `save_committed`).
    pub fn committed_records(&self) -> Vec<WalRecord> {
        let mut records = Vec::new();
        for (group, log) in lock(&self.groups).iter() {
            let mut log = lock(log);
            if log.committed.is_some() && log.committed != log.committed_written {
                records.push(WalRecord::raft_committed(*group, encode(&log.committed)));
                log.committed_written = log.committed;
            }
        }
        records
    }

    /// Forget LSNs below `lsn` after the segments holding them were deleted.
    pub fn forget_below(&self, lsn: u64) {
        for log in lock(&self.groups).values() {
            lock(log).lsns.retain(|_, l| *l >= lsn);
        }
    }
}

/// One group's log, as openraft's storage. Cheap to clone: all handles share the index.
#[derive(Clone)]
pub struct GroupLogStore {
    group: GroupId,
    wal: Arc<Wal>,
    log: Arc<Mutex<GroupLog>>,
}

impl GroupLogStore {
    pub fn group(&self) -> GroupId {
        self.group
    }

    async fn append_durable(&self, record: WalRecord) -> io::Result<()> {
        let ticket = self.wal.append(&[record]).map_err(wal_io)?;
        ticket.await.map_err(wal_io)?;
        Ok(())
    }
}

impl RaftLogReader<CalmRaft> for GroupLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let log = lock(&self.log);
        let start = match range.start_bound() {
            Bound::Included(&s) => Bound::Included(s),
            Bound::Excluded(&s) => Bound::Excluded(s),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => Bound::Included(e),
            Bound::Excluded(&e) => Bound::Excluded(e),
            Bound::Unbounded => Bound::Unbounded,
        };
        Ok(log
            .entries
            .range((start, end))
            .map(|(_, e)| e.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(lock(&self.log).vote)
    }
}

impl RaftLogStorage<CalmRaft> for GroupLogStore {
    type LogReader = GroupLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<CalmRaft>, io::Error> {
        let log = lock(&self.log);
        Ok(LogState {
            last_purged_log_id: log.last_purged,
            last_log_id: log.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.append_durable(WalRecord::raft_vote(self.group, encode(vote)))
            .await?;
        lock(&self.log).vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Memory only: the node's periodic persist writes every group's committed id with
        // its WAL barrier ([`RaftLogs::committed_records`]). An older committed id after a
        // crash only makes the restart apply less before the leader says more; writing one
        // record per commit would cost a WAL batch per proposal on every replica.
        lock(&self.log).committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(lock(&self.log).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IoFlushed) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            callback.io_completed(Ok(()));
            return Ok(());
        }
        // Every batch appended from now on gets an LSN at least this: a safe lower bound for
        // retention, known before the writer assigns the real one.
        let lsn_floor = self.wal.durable_next_lsn();
        // Refuse before writing: an entry in the WAL but not in the index would come back on
        // replay though openraft was told the append failed.
        // (openraft appends to one group serially, so the count cannot change in between.)
        if lock(&self.log).entries.len() + entries.len() > GROUP_LOG_ENTRIES_MAX {
            return Err(io::Error::other(format!(
                "group {}: more than {GROUP_LOG_ENTRIES_MAX} log entries are not purged; snapshots are not keeping up",
                self.group
            )));
        }
        let ticket = self
            .wal
            .append(&[WalRecord::raft_entries(self.group, encode(&entries))])
            .map_err(wal_io)?;
        let mut log = lock(&self.log);
        for entry in entries {
            log.insert(entry, lsn_floor);
        }
        drop(log);
        // Called on the WAL's acker thread, which resolves batches in LSN order.
        ticket.on_durable(move |result| callback.io_completed(result.map(|_| ()).map_err(wal_io)));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        lock(&self.log).truncate_after(last_log_id.as_ref());
        self.append_durable(WalRecord::raft_truncate(self.group, encode(&last_log_id)))
            .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        lock(&self.log).purge(&log_id);
        // Not waited for: losing it in a crash only makes replay list more entries.
        drop(
            self.wal
                .append(&[WalRecord::raft_purge(self.group, encode(&log_id))])
                .map_err(wal_io)?,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::vote::RaftLeaderId;

    fn entry(term: u64, index: u64) -> Entry {
        let leader = openraft::impls::leader_id_adv::LeaderId::new(term, 1).to_committed();
        Entry::new_blank(LogId::new(leader, index))
    }

    fn terms(log: &GroupLog) -> Vec<(u64, u64)> {
        log.entries
            .values()
            .map(|e| (e.index(), e.log_id().committed_leader_id().term))
            .collect()
    }

    /// Appends at the end keep everything; an append at an index the log holds replaces that
    /// entry and drops every later one, with their LSNs (a replayed WAL written before
    /// truncations were logged).
    #[test]
    fn an_append_replaces_what_followed_its_index() {
        let mut log = GroupLog::default();
        for index in 1..=5 {
            log.insert(entry(1, index), 10 + index);
        }
        assert_eq!(terms(&log), [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);
        log.insert(entry(2, 3), 20);
        assert_eq!(terms(&log), [(1, 1), (2, 1), (3, 2)]);
        assert_eq!(
            log.lsns.iter().map(|(&i, &l)| (i, l)).collect::<Vec<_>>(),
            [(1, 11), (2, 12), (3, 20)]
        );
        log.insert(entry(2, 4), 21);
        assert_eq!(terms(&log), [(1, 1), (2, 1), (3, 2), (4, 2)]);
        assert_eq!(log.last_log_id().map(|l| l.index), Some(4));
    }
}
