//! The writer thread: group commit.
//!
//! Appenders put encoded batches in one bounded FIFO queue. The writer thread takes
//! everything queued (up to `group_bytes_max`), gives the batches consecutive LSNs and chain
//! hashes, writes them as one contiguous durable write (one direct synchronous write, or one
//! write linked to one fdatasync; see [`super::io`]), and only then resolves
//! their tickets. While one group is being synced the next one accumulates, so the cost of an
//! fdatasync is shared by every batch that arrived during the previous one.
//!
//! Only one group is in flight at a time, and the queue is FIFO, so a batch appended before
//! another is durable no later than it (a Raft vote is durable before the entries appended
//! after it). Any I/O error poisons the WAL: after a failed fdatasync the kernel may have
//! dropped the dirty pages, so nothing later could be proven durable.
//!
//! Waking the callers of a durable group is handed to a second thread, the acker, so that
//! the writer can start the next write + fdatasync at once: on a machine with few cores the
//! dozens of wake-ups per group would otherwise sit between two syncs, idling the disk.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use super::error::WalError;
use super::format::{EncodedBody, SegmentHeader, encode_frame};
use super::io::WalIo;
use super::metrics::{
    METRIC_APPEND_SECONDS, METRIC_DURABLE_WRITE_SECONDS, METRIC_GROUP_BATCHES,
    METRIC_GROUP_COMMITS, METRIC_WRITTEN_BYTES,
};
use super::record::WalPosition;
use super::segment::{SegmentIndex, SegmentMeta, create_segment};
use super::ticket::Resolver;

/// Whether the WAL accepts appends.
#[derive(Debug, Clone)]
pub(crate) enum Status {
    Open,
    /// `Wal` dropped: queued batches are still written, new appends are refused.
    Closing,
    /// A fatal I/O error happened; the message is the cause.
    Poisoned(String),
}

pub(crate) struct PendingBatch {
    pub encoded: EncodedBody,
    pub resolver: Resolver,
    /// Its place in append order (see `Shared::durable_appends`).
    pub append_no: u64,
    /// When it was queued.
    pub queued_at: Instant,
    /// Queued by [`Wal::append_lazy`](super::Wal::append_lazy): it does not start a group
    /// commit by itself (see [`LAZY_WRITE_AFTER`]).
    pub lazy: bool,
}

/// How long a lazily appended batch may wait for another append to start a group commit
/// before the writer writes it anyway. Bounds what a crash can take of such batches.
pub const LAZY_WRITE_AFTER: Duration = Duration::from_millis(5);

pub(crate) struct Queue {
    pub pending: VecDeque<PendingBatch>,
    /// Batches ever queued: the next batch's `append_no` is this plus one.
    pub appended: u64,
    pub queued_records: usize,
    pub queued_bytes: usize,
    pub status: Status,
    /// The writer is blocked on `work_ready`; appenders notify only then (saves a futex
    /// syscall per append while the writer is busy).
    pub writer_waiting: bool,
    /// Appenders blocked on `space_ready`; the writer notifies only if there are any.
    pub appenders_waiting: usize,
    /// Batches in `pending` that were not appended lazily: any of them starts a group.
    pub eager_pending: usize,
}

impl Queue {
    /// Whether the writer should take a group now rather than wait.
    fn group_due(&self, now: Instant) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        self.eager_pending > 0
            || self.appenders_waiting > 0
            || !matches!(self.status, Status::Open)
            || self
                .oldest_lazy()
                .is_some_and(|t| now >= t + LAZY_WRITE_AFTER)
    }

    /// When the oldest lazy batch still queued was appended.
    fn oldest_lazy(&self) -> Option<Instant> {
        self.pending
            .iter()
            .find_map(|b| b.lazy.then_some(b.queued_at))
    }
}

/// State shared by `Wal` handles and the writer thread.
pub(crate) struct Shared {
    pub queue: Mutex<Queue>,
    /// Signalled when a batch is queued or the status changes.
    pub work_ready: Condvar,
    /// Signalled when queue space is freed or the status changes.
    pub space_ready: Condvar,
    pub index: Mutex<SegmentIndex>,
    /// Groups handed to the acker thread and not yet resolved.
    pub acks_in_flight: AtomicUsize,
    /// Every batch with `append_no` at or below this is durable. Batches are written in
    /// append order, so this is a watermark; it is set once a group's fdatasync returned,
    /// before its tickets resolve.
    pub durable_appends: AtomicU64,
    /// `durable_appends` for async waiters (watch streams hold events of own facts back
    /// until their batch is durable).
    pub durable_watch: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    pub(crate) fn new(index: SegmentIndex) -> Shared {
        Shared {
            queue: Mutex::new(Queue {
                pending: VecDeque::new(),
                appended: 0,
                queued_records: 0,
                queued_bytes: 0,
                status: Status::Open,
                writer_waiting: false,
                appenders_waiting: 0,
                eager_pending: 0,
            }),
            work_ready: Condvar::new(),
            space_ready: Condvar::new(),
            index: Mutex::new(index),
            acks_in_flight: AtomicUsize::new(0),
            durable_appends: AtomicU64::new(0),
            durable_watch: tokio::sync::watch::Sender::new(0),
        }
    }

    pub(crate) fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().expect("WAL queue lock poisoned")
    }

    pub(crate) fn lock_index(&self) -> MutexGuard<'_, SegmentIndex> {
        self.index.lock().expect("WAL index lock poisoned")
    }
}

/// Limits the writer needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriterLimits {
    pub segment_bytes_max: u64,
    pub group_bytes_max: usize,
    pub preallocate: bool,
}

/// The writer thread's state: the active segment and where the chain stands.
pub(crate) struct Writer {
    shared: Arc<Shared>,
    limits: WriterLimits,
    dir: PathBuf,
    dir_file: File,
    io: Box<dyn WalIo>,
    file: File,
    path: PathBuf,
    segment_id: u64,
    /// Where the next frame goes in the active segment.
    offset_bytes: u64,
    next_lsn: u64,
    chain: [u8; 32],
    /// Frames of the current group, written with one write + fdatasync.
    buffer: Vec<u8>,
    group: Vec<PendingBatch>,
    positions: Vec<WalPosition>,
    /// Durable groups go to the acker thread, in order.
    acks: mpsc::Sender<Vec<(Resolver, WalPosition)>>,
}

/// Durable groups, in commit order, whose callers the acker thread wakes.
pub(crate) type AckReceiver = mpsc::Receiver<Vec<(Resolver, WalPosition)>>;

/// A group this small is resolved by the writer itself when the acker is idle: handing one
/// or two wake-ups to another thread would only add a thread hop to a lone caller's latency.
const DIRECT_ACK_BATCHES_MAX: usize = 4;

/// The acker thread: resolves the tickets of durable groups, in order, until the writer stops.
pub(crate) fn run_acker(shared: Arc<Shared>, acks: AckReceiver) {
    for group in acks {
        for (resolver, position) in group {
            resolver.resolve(Ok(position));
        }
        shared.acks_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Writer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        limits: WriterLimits,
        dir: &Path,
        dir_file: File,
        io: Box<dyn WalIo>,
        (file, active): (File, &SegmentMeta),
        acks: mpsc::Sender<Vec<(Resolver, WalPosition)>>,
    ) -> Writer {
        Writer {
            shared,
            limits,
            dir: dir.to_path_buf(),
            dir_file,
            io,
            file,
            path: active.path.clone(),
            segment_id: active.segment_id,
            offset_bytes: active.end_offset_bytes,
            next_lsn: active.next_lsn,
            chain: active.end_chain,
            buffer: Vec::with_capacity(limits.group_bytes_max),
            group: Vec::new(),
            positions: Vec::new(),
            acks,
        }
    }

    pub(crate) fn run(mut self) {
        loop {
            if !self.take_group() {
                return;
            }
            match self.commit_group() {
                Ok(()) => {
                    assert_eq!(self.group.len(), self.positions.len());
                    let last = self.group.last().expect("a committed group is not empty");
                    let before = self.shared.durable_appends.load(Ordering::Acquire);
                    assert!(
                        last.append_no > before,
                        "WAL groups are durable in append order"
                    );
                    self.shared
                        .durable_appends
                        .store(last.append_no, Ordering::Release);
                    self.shared.durable_watch.send_replace(last.append_no);
                    metrics::counter!(METRIC_GROUP_COMMITS).increment(1);
                    metrics::histogram!(METRIC_GROUP_BATCHES).record(self.group.len() as f64);
                    let append_seconds = metrics::histogram!(METRIC_APPEND_SECONDS);
                    let now = Instant::now();
                    for batch in self.group.iter().filter(|b| !b.lazy) {
                        append_seconds.record(now.duration_since(batch.queued_at));
                    }
                    let durable: Vec<_> = self
                        .group
                        .drain(..)
                        .zip(self.positions.drain(..))
                        .map(|(batch, position)| (batch.resolver, position))
                        .collect();
                    self.acknowledge(durable);
                }
                Err(error) => {
                    self.poison(error);
                    return;
                }
            }
        }
    }

    /// Resolves a durable group's tickets: directly if it is small and the acker is idle,
    /// else through the acker so that the next write + fdatasync can start at once.
    fn acknowledge(&mut self, durable: Vec<(Resolver, WalPosition)>) {
        let direct = durable.len() <= DIRECT_ACK_BATCHES_MAX
            && self.shared.acks_in_flight.load(Ordering::Acquire) == 0;
        if !direct {
            self.shared.acks_in_flight.fetch_add(1, Ordering::AcqRel);
            match self.acks.send(durable) {
                Ok(()) => return,
                // The acker is gone only if it panicked; resolve here rather than leave
                // callers waiting.
                Err(mpsc::SendError(unsent)) => {
                    self.shared.acks_in_flight.fetch_sub(1, Ordering::AcqRel);
                    for (resolver, position) in unsent {
                        resolver.resolve(Ok(position));
                    }
                    return;
                }
            }
        }
        for (resolver, position) in durable {
            resolver.resolve(Ok(position));
        }
    }

    /// Waits for queued batches and moves up to `group_bytes_max` of them into `group`.
    /// Returns false when the WAL is closing and the queue is drained, or poisoned.
    fn take_group(&mut self) -> bool {
        assert!(self.group.is_empty());
        let shared = Arc::clone(&self.shared);
        let mut queue = shared.lock_queue();
        loop {
            let now = Instant::now();
            if queue.group_due(now) {
                break;
            }
            if !matches!(queue.status, Status::Open) {
                // Closing with nothing queued (a closing queue with batches is due), or
                // poisoned (which empties the queue).
                assert!(queue.pending.is_empty());
                return false;
            }
            queue.writer_waiting = true;
            match queue.oldest_lazy() {
                // Only lazy batches: wait for an eager one, or until the oldest is due.
                Some(since) => {
                    let due = since + LAZY_WRITE_AFTER;
                    queue = shared
                        .work_ready
                        .wait_timeout(queue, due.saturating_duration_since(now))
                        .expect("WAL queue lock poisoned")
                        .0;
                }
                None => {
                    queue = shared
                        .work_ready
                        .wait(queue)
                        .expect("WAL queue lock poisoned");
                }
            }
            queue.writer_waiting = false;
        }
        let mut group_bytes = 0usize;
        while let Some(front) = queue.pending.front() {
            let frame_bytes = front.encoded.frame_bytes();
            // The first batch always fits: batch_bytes_max <= group_bytes_max.
            if !self.group.is_empty() && group_bytes + frame_bytes > self.limits.group_bytes_max {
                break;
            }
            let batch = queue.pending.pop_front().expect("front exists");
            if !batch.lazy {
                queue.eager_pending -= 1;
            }
            group_bytes += frame_bytes;
            queue.queued_records -= batch.encoded.record_count as usize;
            queue.queued_bytes -= frame_bytes;
            self.group.push(batch);
        }
        assert!(queue.pending.is_empty() || queue.queued_records > 0);
        assert!(queue.eager_pending <= queue.pending.len());
        let wake_appenders = queue.appenders_waiting > 0;
        drop(queue);
        if wake_appenders {
            shared.space_ready.notify_all();
        }
        true
    }

    /// Frames the group and makes it durable, rolling over to new segments as needed.
    fn commit_group(&mut self) -> Result<(), WalError> {
        assert!(!self.group.is_empty());
        assert!(self.buffer.is_empty() && self.positions.is_empty());
        let mut buffer = std::mem::take(&mut self.buffer);
        let result = self.frame_and_write(&mut buffer);
        buffer.clear();
        self.buffer = buffer;
        result?;
        let mut index = self.shared.lock_index();
        let active = index.active_mut();
        assert_eq!(active.segment_id, self.segment_id);
        active.end_offset_bytes = self.offset_bytes;
        active.next_lsn = self.next_lsn;
        active.end_chain = self.chain;
        Ok(())
    }

    fn frame_and_write(&mut self, buffer: &mut Vec<u8>) -> Result<(), WalError> {
        for index in 0..self.group.len() {
            let frame_bytes = self.group[index].encoded.frame_bytes() as u64;
            if self.offset_bytes + buffer.len() as u64 + frame_bytes > self.limits.segment_bytes_max
            {
                self.write_buffer(buffer)?;
                self.roll_over()?;
                assert!(
                    self.offset_bytes + frame_bytes <= self.limits.segment_bytes_max,
                    "batch_bytes_max fits a segment"
                );
            }
            self.positions.push(WalPosition {
                lsn: self.next_lsn,
                segment_id: self.segment_id,
                offset_bytes: self.offset_bytes + buffer.len() as u64,
            });
            self.chain = encode_frame(
                buffer,
                &self.group[index].encoded,
                self.next_lsn,
                &self.chain,
            );
            self.next_lsn += 1;
        }
        self.write_buffer(buffer)
    }

    /// Writes `buffer` at the end of the active segment and fdatasyncs it.
    fn write_buffer(&mut self, buffer: &mut Vec<u8>) -> Result<(), WalError> {
        if buffer.is_empty() {
            return Ok(());
        }
        assert!(self.offset_bytes + buffer.len() as u64 <= self.limits.segment_bytes_max);
        let started = Instant::now();
        self.io
            .write_durable(&self.file, self.offset_bytes, buffer)
            .map_err(|e| WalError::WriteFailed {
                op: e.op,
                path: self.path.clone(),
                source: Arc::new(e.source),
            })?;
        metrics::histogram!(METRIC_DURABLE_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::counter!(METRIC_WRITTEN_BYTES).increment(buffer.len() as u64);
        self.offset_bytes += buffer.len() as u64;
        buffer.clear();
        Ok(())
    }

    /// Seals the active segment (all its frames are already durable) and creates the next.
    fn roll_over(&mut self) -> Result<(), WalError> {
        let header = SegmentHeader {
            segment_id: self.segment_id + 1,
            first_lsn: self.next_lsn,
            chain_start: self.chain,
        };
        let (file, path) = create_segment(
            &self.dir,
            &self.dir_file,
            header,
            self.limits.segment_bytes_max,
            self.limits.preallocate,
            self.io.as_mut(),
        )?;
        let mut index = self.shared.lock_index();
        let sealed = index.active_mut();
        assert_eq!(sealed.segment_id, self.segment_id);
        sealed.end_offset_bytes = self.offset_bytes;
        sealed.next_lsn = self.next_lsn;
        sealed.end_chain = self.chain;
        index
            .segments
            .push(SegmentMeta::empty(header, path.clone()));
        index.check_invariants();
        drop(index);
        tracing::debug!(
            segment_id = header.segment_id,
            first_lsn = header.first_lsn,
            "WAL rolled over to a new segment"
        );
        self.file = file;
        self.path = path;
        self.segment_id = header.segment_id;
        self.offset_bytes = super::format::SEGMENT_HEADER_BYTES as u64;
        Ok(())
    }

    /// Fails the current group with `error`, and everything queued or appended later with
    /// [`WalError::Poisoned`].
    fn poison(&mut self, error: WalError) {
        tracing::error!(%error, "WAL poisoned by a fatal I/O error");
        // Poison first: a caller who sees its batch fail must find later appends refused.
        poison_queue(&self.shared, error.to_string());
        for batch in self.group.drain(..) {
            batch.resolver.resolve(Err(error.clone()));
        }
        self.positions.clear();
    }
}

/// Refuses all later appends and fails everything queued with [`WalError::Poisoned`].
pub(crate) fn poison_queue(shared: &Shared, cause: String) {
    let pending: Vec<PendingBatch> = {
        let mut queue = shared.lock_queue();
        queue.status = Status::Poisoned(cause.clone());
        queue.queued_records = 0;
        queue.queued_bytes = 0;
        queue.eager_pending = 0;
        queue.pending.drain(..).collect()
    };
    shared.space_ready.notify_all();
    for batch in pending {
        batch.resolver.resolve(Err(WalError::Poisoned {
            cause: cause.clone(),
        }));
    }
}
