//! The shared write-ahead log: one per node, used by the gossip path (facts) and by every
//! Raft group (votes, entries, truncations, purges, commit indexes).
//!
//! # What this module owns and why
//!
//! Both paths acknowledge a write only once it is durable, and an fdatasync costs ~100 µs on
//! this class of disk whatever the size of the write. One log shared by everything lets one
//! fdatasync cover the writes of all callers (group commit) and gives one total order, so a
//! Raft vote is durable before the entries appended after it, across groups and paths.
//! The module owns the segment files and their format (`format.rs`), the writer thread and
//! its I/O backend ([`WalIo`]: io_uring with direct synchronous writes, io_uring write +
//! fdatasync where the filesystem refuses O_DIRECT, or pwrite + fdatasync), recovery
//! (`recovery.rs`)
//! and replay ([`WalReader`]). It does not interpret payloads, and it does not decide what a
//! checkpoint covers: callers say which segments may go ([`Wal::remove_segments_before`]).
//!
//! # Guarantees
//!
//! - A ticket resolves `Ok` only after the batch's bytes are durable: written with O_DIRECT +
//!   RWF_DSYNC, or written and then synced by an fdatasync that followed them
//!   ("acknowledged = durable"; there is no weaker mode). Batches are atomic:
//!   after a crash a batch is replayed whole or not at all.
//! - Batches get dense LSNs (1, 2, ...) in append order; a batch appended before another is
//!   durable no later than it.
//! - A failed write or fdatasync poisons the WAL: the group's tickets fail, every later
//!   append fails with [`WalError::Poisoned`], nothing is acknowledged again until a restart.
//!   A failed batch was not acknowledged but may still be replayed after the restart.
//! - [`Wal::open`] validates every segment (checksums, LSNs, hash chain, segment
//!   continuity) and stops with [`WalError::Corrupt`], naming file and offset, on any damage
//!   except a provably torn tail of the last segment, which it cuts off.
//!
//! # On disk
//!
//! `wal-<id:020>.log` segments of at most `segment_bytes_max` bytes. Each starts with an
//! 80-byte header (magic, version, segment id, first LSN, the chain hash it continues from,
//! BLAKE3 checksum) followed by batch frames: a 72-byte header (magic, body length, record
//! count, LSN, chain hash = BLAKE3(previous chain hash, header fields, BLAKE3(body)),
//! 128-bit BLAKE3 checksum of header and body) and the records (kind, group id, length,
//! payload). A batch never spans segments. New segments are preallocated with fallocate(2)
//! and filled with zeros (unless `preallocate` is off): writes land in reserved, initialized
//! blocks, so a sync commits neither a size change nor an extent conversion, only data
//! (figures in `segment::zero_fill`), and the unwritten rest reads as zeros, the clean end.
//! The io_uring backend writes them with O_DIRECT + RWF_DSYNC where the filesystem allows
//! (see [`io`]). On open, appends continue after the last valid batch.
//!
//! # The torn-tail rule
//!
//! A crash can only damage bytes after the last durable batch of the **last** segment (the
//! writer syncs a segment completely before creating the next). Recovery therefore cuts off
//! bytes only if all of these hold, and refuses to open otherwise:
//! 1. the damage is in the last segment and everything before it verifies;
//! 2. no frame that verifies on its own starts anywhere after the damaged offset (a valid
//!    frame further on proves the damaged bytes were followed by durable, possibly
//!    acknowledged, data);
//! 3. the non-zero bytes from the damaged offset on span at most `group_bytes_max` (one
//!    interrupted group commit cannot leave more).
//!
//! All-zero bytes after the last batch are not damage. A last segment whose header does not
//! verify and that holds no valid frame is an interrupted segment creation and is removed.
//! What was repaired is in [`Wal::recovery_report`].
//!
//! One process at a time: `open` takes an exclusive flock(2) on `wal.lock` in the directory.

mod error;
mod format;
mod io;
mod metrics;
mod reader;
mod record;
mod recovery;
mod segment;
mod ticket;
mod writer;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use error::{WalError, WalIoError, WalIoOp};
pub use io::{PwriteIo, UringIo, WalIo};
pub use metrics::{
    GROUP_BATCHES_BUCKETS, METRIC_APPEND_SECONDS, METRIC_DURABLE_WRITE_SECONDS,
    METRIC_GROUP_BATCHES, SECONDS_BUCKETS, describe_metrics,
};
pub use reader::WalReader;
pub use record::{WalBatch, WalPosition, WalRecord, WalRecordKind};
pub use recovery::WalRecoveryReport;
pub use ticket::AppendTicket;

use format::{
    BATCH_HEADER_BYTES, BATCH_RECORDS_LIMIT, CHAIN_GENESIS, RECORD_HEADER_BYTES,
    SEGMENT_BYTES_LIMIT,
};
use format::{SEGMENT_HEADER_BYTES, SegmentHeader};
use segment::{SegmentIndex, SegmentMeta, create_segment, sync_dir};
pub use writer::LAZY_WRITE_AFTER;
use writer::{PendingBatch, Shared, Status, Writer, WriterLimits};

const LOCK_FILE_NAME: &str = "wal.lock";

/// Which I/O backend the writer thread uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WalBackend {
    /// io_uring; if the ring cannot be set up (old kernel, seccomp), pwrite + fdatasync,
    /// with a warning in the log.
    #[default]
    Auto,
    /// io_uring only: `open` fails if it is unavailable.
    IoUring,
    /// pwrite + fdatasync.
    Pwrite,
}

/// Limits and choices of a WAL. Every limit is checked by [`Wal::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalOptions {
    /// Largest segment file. A batch never spans segments.
    pub segment_bytes_max: u64,
    /// Largest batch frame (header + records), at most `segment_bytes_max` minus the
    /// segment header.
    pub batch_bytes_max: u32,
    /// Most records in one batch.
    pub batch_records_max: u32,
    /// Most bytes written by one group commit (one write + one fdatasync). At least
    /// `batch_bytes_max`. Also bounds how many damaged bytes recovery accepts as a torn tail,
    /// so do not lower it while a crashed WAL awaits recovery.
    pub group_bytes_max: u32,
    /// Most records queued and not yet durable; appends block (or `try_append` fails) beyond.
    pub queue_records_max: usize,
    /// Most frame bytes queued and not yet durable.
    pub queue_bytes_max: usize,
    pub backend: WalBackend,
    /// Reserve each new segment's full size up front (see the module docs).
    pub preallocate: bool,
}

impl Default for WalOptions {
    fn default() -> WalOptions {
        WalOptions {
            segment_bytes_max: 64 << 20,
            batch_bytes_max: 4 << 20,
            batch_records_max: 4096,
            group_bytes_max: 8 << 20,
            queue_records_max: 64 * 1024,
            queue_bytes_max: 64 << 20,
            backend: WalBackend::Auto,
            preallocate: true,
        }
    }
}

impl WalOptions {
    fn validate(&self) -> Result<(), WalError> {
        let invalid = |reason: String| Err(WalError::InvalidOptions { reason });
        let segment_bytes_min =
            (SEGMENT_HEADER_BYTES + BATCH_HEADER_BYTES + RECORD_HEADER_BYTES) as u64;
        if self.segment_bytes_max < segment_bytes_min
            || self.segment_bytes_max > SEGMENT_BYTES_LIMIT
        {
            return invalid(format!(
                "segment_bytes_max = {} must be within {segment_bytes_min}..={SEGMENT_BYTES_LIMIT}",
                self.segment_bytes_max
            ));
        }
        let batch_bytes_min = (BATCH_HEADER_BYTES + RECORD_HEADER_BYTES) as u64;
        let batch_bytes_limit = self.segment_bytes_max - SEGMENT_HEADER_BYTES as u64;
        if u64::from(self.batch_bytes_max) < batch_bytes_min
            || u64::from(self.batch_bytes_max) > batch_bytes_limit
        {
            return invalid(format!(
                "batch_bytes_max = {} must be within {batch_bytes_min}..={batch_bytes_limit} (segment_bytes_max minus the \
                 {SEGMENT_HEADER_BYTES}-byte segment header)",
                self.batch_bytes_max
            ));
        }
        if self.batch_records_max == 0 || self.batch_records_max > BATCH_RECORDS_LIMIT {
            return invalid(format!(
                "batch_records_max = {} must be within 1..={BATCH_RECORDS_LIMIT}",
                self.batch_records_max
            ));
        }
        if self.group_bytes_max < self.batch_bytes_max
            || u64::from(self.group_bytes_max) > SEGMENT_BYTES_LIMIT
        {
            return invalid(format!(
                "group_bytes_max = {} must be within batch_bytes_max ({})..={SEGMENT_BYTES_LIMIT}",
                self.group_bytes_max, self.batch_bytes_max
            ));
        }
        if self.queue_records_max < self.batch_records_max as usize {
            return invalid(format!(
                "queue_records_max = {} must be at least batch_records_max = {}",
                self.queue_records_max, self.batch_records_max
            ));
        }
        if self.queue_bytes_max < self.batch_bytes_max as usize {
            return invalid(format!(
                "queue_bytes_max = {} must be at least batch_bytes_max = {}",
                self.queue_bytes_max, self.batch_bytes_max
            ));
        }
        Ok(())
    }
}

/// The write-ahead log. `Sync`: share it (e.g. in an `Arc`) between all appenders.
/// Dropping it writes what is queued, then stops the writer thread.
pub struct Wal {
    shared: Arc<Shared>,
    options: WalOptions,
    dir: PathBuf,
    backend_name: &'static str,
    writer: Option<JoinHandle<()>>,
    acker: Option<JoinHandle<()>>,
    recovery_report: WalRecoveryReport,
    /// Holds the directory's flock for the WAL's lifetime.
    _lock_file: File,
}

impl Wal {
    /// Opens (or creates) the WAL in `dir`: validates every segment, cuts off a provably torn
    /// tail, and starts the writer thread with the backend `options.backend` selects.
    /// Read what was recovered with [`read_from`](Self::read_from).
    pub fn open(dir: impl AsRef<Path>, options: WalOptions) -> Result<Wal, WalError> {
        options.validate()?;
        let io: Box<dyn WalIo> = match options.backend {
            WalBackend::Pwrite => Box::new(PwriteIo),
            WalBackend::IoUring => {
                Box::new(
                    uring_for(dir.as_ref()).map_err(|e| WalError::IoUringUnavailable {
                        source: Arc::new(e),
                    })?,
                )
            }
            WalBackend::Auto => match uring_for(dir.as_ref()) {
                Ok(uring) => Box::new(uring),
                Err(error) => {
                    tracing::warn!(%error, "io_uring is unavailable; the WAL falls back to pwrite + fdatasync");
                    Box::new(PwriteIo)
                }
            },
        };
        Wal::open_with_io(dir, options, io)
    }

    /// Like [`open`](Self::open) with a caller-supplied I/O backend (`options.backend` is
    /// ignored). Used to inject faults in tests.
    pub fn open_with_io(
        dir: impl AsRef<Path>,
        options: WalOptions,
        mut io: Box<dyn WalIo>,
    ) -> Result<Wal, WalError> {
        options.validate()?;
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| WalError::io("create the WAL directory", &dir, e))?;
        let dir_file =
            File::open(&dir).map_err(|e| WalError::io("open the WAL directory", &dir, e))?;
        let lock_file = lock_dir(&dir)?;

        let preallocate_bytes = options.preallocate.then_some(options.segment_bytes_max);
        let (mut segments, recovery_report) = recovery::recover(
            &dir,
            &dir_file,
            options.group_bytes_max as usize,
            preallocate_bytes,
        )?;
        if segments.is_empty() {
            let header = SegmentHeader {
                segment_id: 1,
                first_lsn: 1,
                chain_start: CHAIN_GENESIS,
            };
            let (_, path) = create_segment(
                &dir,
                &dir_file,
                header,
                options.segment_bytes_max,
                options.preallocate,
                io.as_mut(),
            )?;
            segments.push(SegmentMeta::empty(header, path));
        }
        let index = SegmentIndex { segments };
        index.check_invariants();
        let active = index.active().clone();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(io.segment_open_flags())
            .open(&active.path)
            .map_err(|e| WalError::io("open segment", &active.path, e))?;
        tracing::info!(
            dir = %dir.display(), backend = io.name(), segments = index.segments.len(), next_lsn = active.next_lsn,
            "WAL opened"
        );

        let backend_name = io.name();
        let shared = Arc::new(Shared::new(index));
        let limits = WriterLimits {
            segment_bytes_max: options.segment_bytes_max,
            group_bytes_max: options.group_bytes_max as usize,
            preallocate: options.preallocate,
        };
        let (acks_tx, acks_rx) = std::sync::mpsc::channel();
        let acker = std::thread::Builder::new()
            .name("calm-wal-acker".to_string())
            .spawn({
                let shared = Arc::clone(&shared);
                move || writer::run_acker(shared, acks_rx)
            })
            .map_err(|e| WalError::io("spawn the acker thread for", &dir, e))?;
        let writer = Writer::new(
            Arc::clone(&shared),
            limits,
            &dir,
            dir_file,
            io,
            (file, &active),
            acks_tx,
        );
        let handle = std::thread::Builder::new()
            .name("calm-wal-writer".to_string())
            .spawn({
                let shared = Arc::clone(&shared);
                move || {
                    // A panic (a failed assertion) must still fail every waiting caller.
                    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run())) {
                        let message = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        tracing::error!(%message, "the WAL writer thread panicked; the WAL is poisoned");
                        writer::poison_queue(&shared, format!("the WAL writer thread panicked: {message}"));
                    }
                }
            })
            .map_err(|e| WalError::io("spawn the writer thread for", &dir, e))?;
        Ok(Wal {
            shared,
            options,
            dir,
            backend_name,
            writer: Some(handle),
            acker: Some(acker),
            recovery_report,
            _lock_file: lock_file,
        })
    }

    /// Queues `records` as one batch; blocks while the queue is full. The ticket resolves once
    /// the batch is durable.
    pub fn append(&self, records: &[WalRecord]) -> Result<AppendTicket, WalError> {
        self.enqueue(records, true, false)
    }

    /// Like [`append`](Self::append), for a batch nobody waits on: it does not start a group
    /// commit by itself, but joins the next group another append starts, or is written
    /// [`LAZY_WRITE_AFTER`] after it was queued at the latest. Its place in append order,
    /// and so in replay order, is where it was queued. Each durable write costs a cache
    /// flush of the disk, which the nodes of a machine share; facts delivered by gossip
    /// wrote one of their own on every receiver (docs/benchmarks.md, "Lazy appends").
    pub fn append_lazy(&self, records: &[WalRecord]) -> Result<AppendTicket, WalError> {
        self.enqueue(records, true, true)
    }

    /// Like [`append`](Self::append) but fails with [`WalError::QueueFull`] instead of
    /// blocking (for async callers that must not block their executor).
    pub fn try_append(&self, records: &[WalRecord]) -> Result<AppendTicket, WalError> {
        self.enqueue(records, false, false)
    }

    fn enqueue(
        &self,
        records: &[WalRecord],
        block: bool,
        lazy: bool,
    ) -> Result<AppendTicket, WalError> {
        if records.is_empty() {
            return Err(WalError::EmptyBatch);
        }
        if records.len() > self.options.batch_records_max as usize {
            return Err(WalError::TooManyRecords {
                records: records.len(),
                batch_records_max: self.options.batch_records_max,
            });
        }
        let frame_bytes = BATCH_HEADER_BYTES + format::body_bytes(records);
        if frame_bytes > self.options.batch_bytes_max as usize {
            return Err(WalError::BatchTooLarge {
                frame_bytes,
                batch_bytes_max: self.options.batch_bytes_max,
            });
        }
        // Encode and hash on the caller's thread: this is the expensive part of framing.
        let encoded = format::encode_body(records);
        assert_eq!(encoded.frame_bytes(), frame_bytes);
        let (mut ticket, resolver) = ticket::ticket();
        let mut queue = self.shared.lock_queue();
        loop {
            match &queue.status {
                Status::Open => {}
                Status::Closing => return Err(WalError::Closed),
                Status::Poisoned(cause) => {
                    return Err(WalError::Poisoned {
                        cause: cause.clone(),
                    });
                }
            }
            let fits = queue.queued_records + records.len() <= self.options.queue_records_max
                && queue.queued_bytes + frame_bytes <= self.options.queue_bytes_max;
            if fits {
                break;
            }
            if !block {
                return Err(WalError::QueueFull {
                    queued_records: queue.queued_records,
                    queued_bytes: queue.queued_bytes,
                    queue_records_max: self.options.queue_records_max,
                    queue_bytes_max: self.options.queue_bytes_max,
                });
            }
            queue.appenders_waiting += 1;
            queue = self
                .shared
                .space_ready
                .wait(queue)
                .expect("WAL queue lock poisoned");
            queue.appenders_waiting -= 1;
        }
        queue.queued_records += records.len();
        queue.queued_bytes += frame_bytes;
        queue.appended += 1;
        let append_no = queue.appended;
        // A waiting writer with batches queued is either waiting out a lazy batch's deadline
        // (which covers a new lazy batch too) or already woken by an eager one.
        let writer_idle = queue.writer_waiting && queue.pending.is_empty();
        queue.pending.push_back(PendingBatch {
            encoded,
            resolver,
            append_no,
            queued_at: std::time::Instant::now(),
            lazy,
        });
        if !lazy {
            queue.eager_pending += 1;
        }
        // A lazy batch wakes only an idle writer, so that it waits out the batch's deadline.
        let wake_writer = queue.writer_waiting && (!lazy || writer_idle);
        drop(queue);
        if wake_writer {
            self.shared.work_ready.notify_one();
        }
        ticket.append_no = append_no;
        Ok(ticket)
    }

    /// Reads the durable batches with `lsn >= from_lsn`, in order, as of now. For replay after
    /// a checkpoint that covers up to LSN `n`, use `read_from(n + 1)`; `read_from(1)` (or
    /// [`oldest_lsn`](Self::oldest_lsn)) reads everything kept.
    pub fn read_from(&self, from_lsn: u64) -> Result<WalReader, WalError> {
        let index = self.shared.lock_index();
        let oldest_lsn = index.segments[0].first_lsn;
        if from_lsn < oldest_lsn && oldest_lsn > 1 {
            return Err(WalError::LsnRemoved {
                requested_lsn: from_lsn,
                oldest_lsn,
            });
        }
        // Start at the last segment whose first LSN is at or before `from_lsn`.
        let start = index
            .segments
            .partition_point(|segment| segment.first_lsn <= from_lsn)
            .saturating_sub(1);
        Ok(WalReader::new(from_lsn, index.segments[start..].to_vec()))
    }

    /// Largest payload of a record appended alone (one record, one batch): callers that
    /// split a large payload over several appends cut it at this size.
    pub fn record_payload_bytes_max(&self) -> usize {
        self.options.batch_bytes_max as usize - BATCH_HEADER_BYTES - RECORD_HEADER_BYTES
    }

    /// LSN of the oldest batch still kept (or that the next batch will get, if none is).
    pub fn oldest_lsn(&self) -> u64 {
        self.shared.lock_index().segments[0].first_lsn
    }

    /// Whether the batch with append number `append_no` ([`AppendTicket::append_no`]) is
    /// durable, without waiting or holding its ticket.
    pub fn is_durable(&self, append_no: u64) -> bool {
        self.shared
            .durable_appends
            .load(std::sync::atomic::Ordering::Acquire)
            >= append_no
    }

    /// Follows the watermark of [`is_durable`](Self::is_durable): the receiver's value is
    /// the highest append number known durable, and it changes after every group commit.
    pub fn subscribe_durable(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.durable_watch.subscribe()
    }

    /// LSN the next durable batch will get: every batch below it is durable.
    pub fn durable_next_lsn(&self) -> u64 {
        self.shared.lock_index().active().next_lsn
    }

    /// Removes every segment that holds only batches with an LSN below `lsn` (what a
    /// checkpoint covering up to `lsn` makes redundant): all segments before the one holding
    /// `lsn`. Returns how many segments were removed.
    pub fn remove_segments_below_lsn(&self, lsn: u64) -> Result<usize, WalError> {
        let segment_id = {
            let index = self.shared.lock_index();
            let holding = index
                .segments
                .partition_point(|segment| segment.first_lsn <= lsn)
                .saturating_sub(1);
            index.segments[holding].segment_id
        };
        self.remove_segments_before(WalPosition {
            lsn,
            segment_id,
            offset_bytes: 0,
        })
    }

    /// Removes every segment that holds only batches before `position` (a checkpoint covers
    /// them): all segments with an id below `position.segment_id`. Never removes the active
    /// segment. Returns how many segments were removed.
    pub fn remove_segments_before(&self, position: WalPosition) -> Result<usize, WalError> {
        let removable: Vec<SegmentMeta> = {
            let index = self.shared.lock_index();
            let active_id = index.active().segment_id;
            index
                .segments
                .iter()
                .filter(|segment| {
                    segment.segment_id < position.segment_id && segment.segment_id < active_id
                })
                .cloned()
                .collect()
        };
        // Remove the oldest first, so that a crash midway still leaves consecutive segments.
        for segment in &removable {
            fs::remove_file(&segment.path)
                .map_err(|e| WalError::io("remove segment", &segment.path, e))?;
            let mut index = self.shared.lock_index();
            assert_eq!(index.segments[0].segment_id, segment.segment_id);
            index.segments.remove(0);
            index.check_invariants();
        }
        if !removable.is_empty() {
            let dir_file = File::open(&self.dir)
                .map_err(|e| WalError::io("open the WAL directory", &self.dir, e))?;
            sync_dir(&dir_file, &self.dir)?;
        }
        Ok(removable.len())
    }

    /// What `open` found and repaired.
    pub fn recovery_report(&self) -> &WalRecoveryReport {
        &self.recovery_report
    }

    /// The I/O backend in use: "io_uring+direct" (O_DIRECT + RWF_DSYNC writes), "io_uring"
    /// (write + fdatasync, where the filesystem refuses O_DIRECT), "pwrite", or an injected
    /// backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.backend_name
    }

    /// The directory this WAL lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        {
            let mut queue = self.shared.lock_queue();
            if matches!(queue.status, Status::Open) {
                queue.status = Status::Closing;
            }
        }
        self.shared.work_ready.notify_all();
        self.shared.space_ready.notify_all();
        // The writer catches its own panics, and the acker ends when the writer drops its
        // sender, so a join only fails if logging panicked.
        if let Some(handle) = self.writer.take() {
            let _ = handle.join();
        }
        if let Some(handle) = self.acker.take() {
            let _ = handle.join();
        }
    }
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("backend", &self.backend_name)
            .finish_non_exhaustive()
    }
}

// Appenders share one `Wal` across threads and move tickets between them.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Wal>();
    send_sync::<AppendTicket>();
};

/// Reads every durable batch of the WAL in `dir` without opening it: no lock, no repair,
/// nothing written, so it is safe on a copy or on a stopped node's directory (`calm debug`).
/// Segments are verified as [`Wal::open`] does; a torn tail of the last segment ends the read
/// instead of being cut off, and damage anywhere else is an error.
pub fn read_dir_readonly(
    dir: impl AsRef<Path>,
    options: &WalOptions,
) -> Result<WalReader, WalError> {
    let dir = dir.as_ref();
    let mut metas: Vec<segment::SegmentMeta> = Vec::new();
    let listed = segment::list_segments(dir)?;
    for (index, (segment_id, path)) in listed.iter().enumerate() {
        let is_last = index + 1 == listed.len();
        let bytes = recovery::read_segment(path)?;
        let expected = metas.last().map(|m| recovery::ChainPoint {
            next_lsn: m.next_lsn,
            chain: m.end_chain,
        });
        match recovery::scan_segment(
            path,
            *segment_id,
            &bytes,
            expected,
            is_last,
            options.group_bytes_max as usize,
        )? {
            recovery::SegmentScan::Valid { meta, .. } => metas.push(meta),
            recovery::SegmentScan::InterruptedCreation { .. } => break,
        }
    }
    let from_lsn = metas.first().map_or(1, |m| m.first_lsn);
    Ok(WalReader::new(from_lsn, metas))
}

/// The io_uring backend for a WAL in `dir` (created if missing: direct mode is probed there).
fn uring_for(dir: &Path) -> std::io::Result<UringIo> {
    fs::create_dir_all(dir)?;
    UringIo::for_dir(dir)
}

/// Takes an exclusive, non-blocking flock on the directory's lock file; the kernel drops it
/// when the process dies, so a crashed node never leaves a stale lock.
fn lock_dir(dir: &Path) -> Result<File, WalError> {
    let path = dir.join(LOCK_FILE_NAME);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| WalError::io("open the lock file", &path, e))?;
    // SAFETY: flock on an fd we own, with no pointers.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(WalError::Locked {
            dir: dir.to_path_buf(),
            source: Arc::new(std::io::Error::last_os_error()),
        });
    }
    Ok(file)
}
