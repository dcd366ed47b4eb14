//! The node's change log: every key change this node applied, in its apply order, kept for
//! a bounded while so watchers can follow it and resume anywhere without a gap.
//!
//! # What an event is
//!
//! One change of one key (the kernel's [`Change`]) with its **source**: the fast-path fact
//! `(origin, seq)` that caused it, or the Raft entry `(group, index)`. Both are applied in
//! order on every node (an origin's facts in sequence order, a group's entries in log
//! order), though different origins and groups interleave differently on different nodes.
//! So a [`Position`] — per origin the highest fact sequence, per group the highest entry
//! index — names exactly which events a watcher has seen, on any node: a watcher that
//! carries the position after its last event to another node is given every event that
//! position does not cover, and none it does. That is the resume token (the same shape as
//! a session token, and usable as one).
//!
//! # What is held back
//!
//! Events of this node's own facts are published when applied but readers see them only
//! once their WAL batch is durable (`durable_after`): a fact lost in a crash before its
//! fsync is issued again under the same sequence number as another fact, and a watcher
//! told of the first would skip the second. Readers stop at the first event not durable
//! yet, so nothing is reordered. Delivered facts and Raft entries are durable elsewhere
//! already (a crash re-applies the same ones).
//!
//! # Bounds
//!
//! The log holds at most `events_max` events and about `bytes_max` bytes; the oldest
//! leave first and the **horizon** (the position covering every event that left, or that
//! was never here: the state the node recovered from) advances past them. A resume token
//! below the horizon, or a reader whose cursor fell behind the log's start, gets
//! [`ReadError::Behind`]. Readers hold a cursor and a position, never the log's lock
//! across an await, and never the node's state lock (catching up never blocks applies).
//!
//! A Raft snapshot install stands for entries this node never applied: it is logged as a
//! [`Slot::Reset`] of its group, and a reader whose position is below the snapshot's index
//! gets [`ReadError::Gap`] (resume on another node with the same token).

use calm_kernel::{Change, ChangeCause, FactId, HlcTimestamp, Value, VersionVector};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use thiserror::Error;

/// Default bound on events kept (see [`EventLimits`]).
pub const EVENTS_MAX_DEFAULT: usize = 100_000;
/// Default bound on the bytes of events kept.
pub const EVENT_BYTES_MAX_DEFAULT: usize = 64 << 20;
/// Fixed cost counted per event besides its key and values (the `Arc`, the slot, the tags).
const EVENT_OVERHEAD_BYTES: usize = 96;

/// How much of the change log a node keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventLimits {
    pub events_max: usize,
    pub bytes_max: usize,
}

impl Default for EventLimits {
    fn default() -> EventLimits {
        EventLimits {
            events_max: EVENTS_MAX_DEFAULT,
            bytes_max: EVENT_BYTES_MAX_DEFAULT,
        }
    }
}

/// What caused an event; applied in order per origin and per group on every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventSource {
    Fact(FactId),
    Entry { group: u64, index: u64 },
}

/// Which events a watcher has seen: per origin a fact sequence, per group an entry index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub vv: VersionVector,
    pub groups: BTreeMap<u64, u64>,
}

impl Position {
    pub fn covers(&self, source: EventSource) -> bool {
        match source {
            EventSource::Fact(id) => self.vv.get(id.origin) >= id.seq,
            EventSource::Entry { group, index } => {
                self.groups.get(&group).is_some_and(|&i| i >= index)
            }
        }
    }

    pub fn advance(&mut self, source: EventSource) {
        match source {
            EventSource::Fact(id) => self.vv.raise(id.origin, id.seq),
            EventSource::Entry { group, index } => {
                let slot = self.groups.entry(group).or_default();
                *slot = (*slot).max(index);
            }
        }
    }

    /// The first origin or group where `self` is below `floor`, described for an error.
    fn below(&self, floor: &Position) -> Option<String> {
        for (origin, seq) in floor.vv.iter() {
            if self.vv.get(origin) < seq {
                return Some(format!(
                    "facts of node {origin} through {seq} (the token names {})",
                    self.vv.get(origin)
                ));
            }
        }
        for (&group, &index) in &floor.groups {
            let have = self.groups.get(&group).copied().unwrap_or(0);
            if have < index {
                return Some(format!(
                    "entries of group {group} through index {index} (the token names {have})"
                ));
            }
        }
        None
    }
}

/// One key change as watchers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Its place in this node's log (1 for the first since the node started).
    pub number: u64,
    pub key: Box<[u8]>,
    pub source: EventSource,
    pub hlc: HlcTimestamp,
    /// The key's value before and after (`None`: absent or deleted).
    pub prev: Option<Value>,
    pub value: Option<Value>,
    /// Readers see it only once WAL append number `durable_after` is durable (0: at once).
    durable_after: u64,
}

/// A place in the log.
#[derive(Clone, Debug)]
enum Slot {
    Event(Arc<Event>),
    /// A snapshot of `group` at `index` was installed here (see the module docs).
    Reset {
        group: u64,
        index: u64,
    },
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ReadError {
    #[error(
        "this node no longer holds the events after the watch's token: it keeps the last {events_max} events, and the token misses {missing}; resume on a node that kept them, or read the current state again and watch from its token"
    )]
    Behind { missing: String, events_max: usize },
    #[error(
        "this node installed a Raft snapshot of group {group} at index {index} and never applied the entries between the watch's token ({have}) and it, so it cannot list their events; resume with the same token on another node"
    )]
    Gap { group: u64, index: u64, have: u64 },
}

struct Inner {
    slots: VecDeque<Slot>,
    /// Number of `slots[0]`.
    first_number: u64,
    bytes: usize,
    /// Covers every event no longer (or never) in `slots`.
    horizon: Position,
    /// Covers every event published (the horizon and everything in `slots`).
    head: Position,
    /// Own-fact events not known durable yet: `(number, own seq, durable_after)`, in order.
    hidden: VecDeque<(u64, u64, u64)>,
}

impl Inner {
    /// The number the next slot gets.
    fn end(&self) -> u64 {
        self.first_number + self.slots.len() as u64
    }

    /// Stop holding back own events whose WAL append is durable by `durable`.
    fn forget_durable(&mut self, durable: u64) {
        while self.hidden.front().is_some_and(|h| h.2 <= durable) {
            self.hidden.pop_front();
        }
    }
}

/// The change log (see the module docs). Shared by the node's state (which publishes under
/// its lock, keeping apply order) and every watch stream.
pub struct EventLog {
    inner: Mutex<Inner>,
    limits: EventLimits,
    /// The number of the next event (changes after every publish).
    published: tokio::sync::watch::Sender<u64>,
    /// The WAL's durable append watermark.
    durable: tokio::sync::watch::Receiver<u64>,
    node: calm_kernel::NodeId,
}

impl EventLog {
    /// An empty log whose horizon is `recovered` (the state the node started from: events
    /// before it were never here).
    pub fn new(
        node: calm_kernel::NodeId,
        limits: EventLimits,
        recovered: Position,
        durable: tokio::sync::watch::Receiver<u64>,
    ) -> EventLog {
        assert!(limits.events_max > 0 && limits.bytes_max > 0);
        EventLog {
            inner: Mutex::new(Inner {
                slots: VecDeque::new(),
                first_number: 1,
                bytes: 0,
                head: recovered.clone(),
                horizon: recovered,
                hidden: VecDeque::new(),
            }),
            limits,
            published: tokio::sync::watch::Sender::new(1),
            durable,
            node,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update below leaves the log whole before it can panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Log `changes`, applied in this order. `entry`: the Raft entry whose apply made the
    /// `Command` changes (facts it released keep their own source); without one they are
    /// not logged (see below). `own_append`: the WAL append holding this node's own facts
    /// among them (0: they are durable already).
    pub fn publish(&self, changes: Vec<Change>, entry: Option<(u64, u64)>, own_append: u64) {
        if changes.is_empty() {
            return;
        }
        let mut inner = self.lock();
        inner.forget_durable(*self.durable.borrow());
        for change in changes {
            let source = match change.cause {
                ChangeCause::Fact(id) => EventSource::Fact(id),
                ChangeCause::Command => match entry {
                    Some((group, index)) => EventSource::Entry { group, index },
                    // A command applied outside any Raft entry: only tools and tests that
                    // stand in for a group do that (the state machine publishes each entry
                    // it applies). It has no source a token could name: not logged.
                    None => {
                        tracing::warn!(
                            key = %calm_kernel::refusal::DisplayKey(&change.key),
                            "a command applied outside a Raft entry is not in the change log"
                        );
                        continue;
                    }
                },
            };
            let number = inner.end();
            let durable_after = match source {
                EventSource::Fact(id) if id.origin == self.node && own_append > 0 => {
                    debug_assert!(inner.hidden.back().is_none_or(|h| h.1 < id.seq));
                    inner.hidden.push_back((number, id.seq, own_append));
                    own_append
                }
                _ => 0,
            };
            let event = Event {
                number,
                key: change.key,
                source,
                hlc: change.hlc,
                prev: change.prev,
                value: change.value,
                durable_after,
            };
            inner.bytes += event_bytes(&event);
            inner.head.advance(source);
            inner.slots.push_back(Slot::Event(Arc::new(event)));
        }
        self.evict_and_announce(inner);
    }

    /// `group` applied its entry `index`, with or without changes (a leader's blank entry,
    /// a membership change, a failed compare-and-set): a reader caught up with the log
    /// covers it from now on. Without this, positions would name only entries that had
    /// events, and a node whose horizon is its recovered applied index (which counts every
    /// entry) would refuse them as behind.
    pub fn applied(&self, group: u64, index: u64) {
        self.lock()
            .head
            .advance(EventSource::Entry { group, index });
    }

    /// A snapshot of `group` at `index` was installed (see [`Slot::Reset`]).
    pub fn snapshot_installed(&self, group: u64, index: u64) {
        let mut inner = self.lock();
        let source = EventSource::Entry { group, index };
        inner.head.advance(source);
        inner.slots.push_back(Slot::Reset { group, index });
        inner.bytes += EVENT_OVERHEAD_BYTES;
        self.evict_and_announce(inner);
    }

    /// After slots were added: drop the oldest beyond the limits, release the lock, and
    /// wake readers.
    fn evict_and_announce(&self, mut inner: MutexGuard<'_, Inner>) {
        while inner.slots.len() > self.limits.events_max
            || (inner.bytes > self.limits.bytes_max && inner.slots.len() > 1)
        {
            let slot = inner.slots.pop_front().expect("not empty");
            inner.first_number += 1;
            match slot {
                Slot::Event(event) => {
                    inner.bytes -= event_bytes(&event);
                    inner.horizon.advance(event.source);
                }
                Slot::Reset { group, index } => {
                    inner.bytes -= EVENT_OVERHEAD_BYTES;
                    inner.horizon.advance(EventSource::Entry { group, index });
                }
            }
            while inner
                .hidden
                .front()
                .is_some_and(|&(n, _, _)| n < inner.first_number)
            {
                inner.hidden.pop_front();
            }
        }
        let next = inner.end();
        drop(inner);
        self.published.send_replace(next);
    }

    fn is_durable(&self, append_no: u64) -> bool {
        append_no == 0 || *self.durable.borrow() >= append_no
    }

    /// A reader from `start` (a resume token), or, with `None`, from now: its position
    /// then covers everything published, except own facts not durable yet.
    pub fn reader(&self, start: Option<Position>) -> Result<Reader, ReadError> {
        let mut inner = self.lock();
        inner.forget_durable(*self.durable.borrow());
        let (cursor, position) = match start {
            Some(position) => {
                if let Some(missing) = position.below(&inner.horizon) {
                    return Err(ReadError::Behind {
                        missing,
                        events_max: self.limits.events_max,
                    });
                }
                (inner.first_number, position)
            }
            None => {
                let mut position = inner.head.clone();
                if let Some(&(_, seq, _)) = inner.hidden.front() {
                    // Not durable: maybe never to be (see the module docs). A later own
                    // event raises the position past it; it was admitted before this
                    // watch began.
                    let mut vv = VersionVector::new();
                    for (origin, s) in position.vv.iter() {
                        vv.raise(origin, if origin == self.node { seq - 1 } else { s });
                    }
                    position.vv = vv;
                }
                (inner.end(), position)
            }
        };
        Ok(Reader { cursor, position })
    }

    /// Changes after every publish (the next event's number): wait on it when a read came
    /// back empty.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// The WAL's durable watermark: wait on it too (held-back own events appear with it).
    pub fn subscribe_durable(&self) -> tokio::sync::watch::Receiver<u64> {
        self.durable.clone()
    }

    /// The events after `reader`'s place that `wanted` selects, at most about `max_events`
    /// (never splitting one Raft entry's events), advancing the reader past every event
    /// looked at. Empty when nothing new is readable yet.
    pub fn read(
        &self,
        reader: &mut Reader,
        max_events: usize,
        mut wanted: impl FnMut(&Event) -> bool,
    ) -> Result<Vec<Arc<Event>>, ReadError> {
        assert!(max_events > 0);
        let inner = self.lock();
        if reader.cursor < inner.first_number {
            let mut missing = String::from("events this node dropped since");
            if let Some(Slot::Event(e)) = inner.slots.front() {
                missing = format!("events before this node's oldest kept one ({})", e.number);
            }
            return Err(ReadError::Behind {
                missing,
                events_max: self.limits.events_max,
            });
        }
        let mut caught_up = true;
        let mut out = Vec::new();
        // The source of the last event taken: the rest of its entry (contiguous, one
        // source) is taken too, though the position covers that source by then.
        let mut last: Option<EventSource> = None;
        let start = (reader.cursor - inner.first_number) as usize;
        for slot in inner.slots.range(start..) {
            match slot {
                Slot::Reset { group, index } => {
                    let have = reader.position.groups.get(group).copied().unwrap_or(0);
                    if have < *index {
                        return Err(ReadError::Gap {
                            group: *group,
                            index: *index,
                            have,
                        });
                    }
                }
                Slot::Event(event) => {
                    let same_entry =
                        matches!(last, Some(s @ EventSource::Entry { .. }) if s == event.source);
                    if out.len() >= max_events && !same_entry
                        || !self.is_durable(event.durable_after)
                    {
                        caught_up = false;
                        break;
                    }
                    if same_entry || !reader.position.covers(event.source) {
                        reader.position.advance(event.source);
                        last = Some(event.source);
                        if wanted(event) {
                            out.push(event.clone());
                        }
                    } else {
                        last = None;
                    }
                }
            }
            reader.cursor += 1;
        }
        if caught_up {
            // Every published event was looked at (all durable): the reader covers all the
            // log's head names, entries without changes included.
            reader.position.vv.merge(&inner.head.vv);
            for (&group, &index) in &inner.head.groups {
                reader.position.advance(EventSource::Entry { group, index });
            }
        }
        Ok(out)
    }
}

fn value_bytes(value: &Option<Value>) -> usize {
    match value {
        Some(Value::Register { value: Some(v), .. }) => v.len(),
        Some(Value::Set(elements)) => elements.iter().map(|e| e.len() + 24).sum(),
        _ => 0,
    }
}

fn event_bytes(event: &Event) -> usize {
    EVENT_OVERHEAD_BYTES + event.key.len() + value_bytes(&event.prev) + value_bytes(&event.value)
}

/// A watcher's place in an [`EventLog`]: the next slot to look at, and the position
/// covering every event it was given (its resume token).
#[derive(Clone, Debug)]
pub struct Reader {
    cursor: u64,
    position: Position,
}

impl Reader {
    pub fn position(&self) -> &Position {
        &self.position
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: &str, origin: u64, seq: u64, value: i64) -> Change {
        Change {
            key: key.as_bytes().into(),
            cause: ChangeCause::Fact(FactId { origin, seq }),
            hlc: HlcTimestamp::ZERO,
            prev: None,
            value: Some(Value::Counter(value)),
        }
    }

    fn command(key: &str, value: i64) -> Change {
        Change {
            key: key.as_bytes().into(),
            cause: ChangeCause::Command,
            hlc: HlcTimestamp::ZERO,
            prev: None,
            value: Some(Value::Counter(value)),
        }
    }

    fn log(events_max: usize) -> (EventLog, tokio::sync::watch::Sender<u64>) {
        let durable = tokio::sync::watch::Sender::new(0);
        let limits = EventLimits {
            events_max,
            bytes_max: 1 << 20,
        };
        (
            EventLog::new(1, limits, Position::default(), durable.subscribe()),
            durable,
        )
    }

    fn keys(events: &[Arc<Event>]) -> Vec<String> {
        events
            .iter()
            .map(|e| String::from_utf8_lossy(&e.key).into_owned())
            .collect()
    }

    #[test]
    fn a_token_resumes_on_another_log_without_gap_or_duplicate() {
        // Two nodes apply the same facts and entries in different interleavings.
        let (a, _da) = log(100);
        let (b, _db) = log(100);
        a.publish(vec![change("x", 2, 1, 1)], None, 0);
        a.publish(vec![command("y", 5)], Some((1, 7)), 0);
        a.publish(vec![change("z", 3, 1, 1)], None, 0);
        b.publish(vec![change("z", 3, 1, 1)], None, 0);
        b.publish(vec![change("x", 2, 1, 1)], None, 0);
        b.publish(vec![command("y", 5)], Some((1, 7)), 0);
        b.publish(vec![change("w", 2, 2, 2)], None, 0);

        let mut on_a = a.reader(Some(Position::default())).unwrap();
        let first = a.read(&mut on_a, 2, |_| true).unwrap();
        assert_eq!(keys(&first), ["x", "y"]);
        // Resume on b with a's token: z and w only, though b applied z first.
        let mut on_b = b.reader(Some(on_a.position().clone())).unwrap();
        let rest = b.read(&mut on_b, 100, |_| true).unwrap();
        assert_eq!(keys(&rest), ["z", "w"]);
        assert!(b.read(&mut on_b, 100, |_| true).unwrap().is_empty());
    }

    #[test]
    fn a_caught_up_reader_covers_entries_without_changes() {
        let (a, _d) = log(100);
        let mut reader = a.reader(Some(Position::default())).unwrap();
        a.publish(vec![command("k", 1)], Some((1, 3)), 0);
        a.applied(1, 3);
        a.applied(1, 4);
        a.read(&mut reader, 10, |_| true).unwrap();
        assert_eq!(reader.position().groups[&1], 4);
        // A fresh reader starts there too.
        assert_eq!(a.reader(None).unwrap().position().groups[&1], 4);
    }

    #[test]
    fn a_command_outside_an_entry_is_not_logged() {
        let (a, _d) = log(100);
        let mut reader = a.reader(Some(Position::default())).unwrap();
        a.publish(vec![command("k", 1), change("f", 2, 1, 1)], None, 0);
        assert_eq!(keys(&a.read(&mut reader, 10, |_| true).unwrap()), ["f"]);
    }

    #[test]
    fn one_entrys_events_are_never_split() {
        let (a, _d) = log(100);
        a.publish(vec![command("p", 1), command("q", 2)], Some((1, 3)), 0);
        a.publish(vec![command("r", 3)], Some((1, 4)), 0);
        let mut reader = a.reader(Some(Position::default())).unwrap();
        assert_eq!(keys(&a.read(&mut reader, 1, |_| true).unwrap()), ["p", "q"]);
        assert_eq!(keys(&a.read(&mut reader, 1, |_| true).unwrap()), ["r"]);
    }

    #[test]
    fn own_events_wait_for_durability_and_filtered_ones_still_advance() {
        let (a, durable) = log(100);
        let mut reader = a.reader(None).unwrap();
        a.publish(vec![change("mine", 1, 1, 1)], None, 5);
        a.publish(vec![change("theirs", 2, 1, 1)], None, 0);
        // Held back, and nothing after it is reordered ahead of it.
        assert!(a.read(&mut reader, 10, |_| true).unwrap().is_empty());
        durable.send_replace(5);
        let got = a.read(&mut reader, 10, |e| &*e.key == b"theirs").unwrap();
        assert_eq!(keys(&got), ["theirs"]);
        // The filtered event is covered too.
        assert!(
            reader
                .position()
                .covers(EventSource::Fact(FactId { origin: 1, seq: 1 }))
        );
    }

    #[test]
    fn a_fresh_reader_does_not_claim_own_facts_not_yet_durable() {
        let (a, _d) = log(100);
        a.publish(vec![change("mine", 1, 1, 1)], None, 9);
        let reader = a.reader(None).unwrap();
        assert_eq!(reader.position().vv.get(1), 0);
    }

    #[test]
    fn eviction_moves_the_horizon_and_old_tokens_are_refused() {
        let (a, _d) = log(2);
        let mut slow = a.reader(Some(Position::default())).unwrap();
        for seq in 1..=3 {
            a.publish(vec![change("k", 2, seq, seq as i64)], None, 0);
        }
        assert!(matches!(
            a.read(&mut slow, 10, |_| true),
            Err(ReadError::Behind { .. })
        ));
        assert!(matches!(
            a.reader(Some(Position::default())),
            Err(ReadError::Behind { .. })
        ));
        let mut at_one = Position::default();
        at_one.vv.raise(2, 1);
        let mut reader = a.reader(Some(at_one)).unwrap();
        let got = a.read(&mut reader, 10, |_| true).unwrap();
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn a_snapshot_install_is_a_gap_for_readers_below_it() {
        let (a, _d) = log(100);
        let mut below = a.reader(Some(Position::default())).unwrap();
        let mut at = Position::default();
        at.groups.insert(1, 10);
        let mut above = a.reader(Some(at)).unwrap();
        a.snapshot_installed(1, 10);
        a.publish(vec![command("k", 1)], Some((1, 11)), 0);
        assert!(matches!(
            a.read(&mut below, 10, |_| true),
            Err(ReadError::Gap {
                group: 1,
                index: 10,
                have: 0
            })
        ));
        assert_eq!(keys(&a.read(&mut above, 10, |_| true).unwrap()), ["k"]);
    }
}
