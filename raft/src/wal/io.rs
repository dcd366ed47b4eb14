//! The durable-write step of the WAL, behind a small trait.
//!
//! The writer thread needs exactly one I/O primitive: "these bytes at this offset, durably,
//! and tell me when that is done". Keeping it that small lets the io_uring
//! backend submit the write and the fdatasync as one linked chain (one syscall), lets the
//! pwrite backend serve where io_uring is forbidden (seccomp), and lets tests inject faults
//! without mocking anything else of the WAL.
//!
//! # Direct, synchronous writes (the io_uring backend's default)
//!
//! An fdatasync cannot complete asynchronously on ext4: io_uring hands every fsync SQE to an
//! io-wq worker thread of the process, one more thread wake-up per group commit on each node.
//! A write to a file opened with O_DIRECT and flagged RWF_DSYNC, into blocks that already hold
//! data, is durable when it completes, needs no journal commit, and is not handed to a worker
//! (on a device without FUA, as here, the kernel sends the cache flush from its own
//! workqueue). Measured here, 4 KiB per sync on ext4 over virtio: ~80 µs p50 and one context
//! switch per write, against ~95 µs and an io-wq round trip for a linked write + fdatasync;
//! the WAL bench went from 140 to 121 µs p50 for one writer and from ~110k to ~171k records/s
//! for 64 (docs/benchmarks.md). So where the WAL directory accepts O_DIRECT, [`UringIo`] opens
//! segments with it ([`WalIo::segment_open_flags`]) and the WAL zero-fills new segments so
//! that appends land in initialized blocks (see `segment::zero_fill`).
//!
//! O_DIRECT needs block-aligned buffers, offsets and lengths, while WAL frames are not
//! block-sized. A write therefore covers whole blocks: the already durable bytes of its first
//! block (kept from the previous write, or read back after a restart), then the new bytes,
//! then zeros to the block's end, which is what the file holds past the WAL's end anyway.
//! Rewriting durable bytes with identical bytes is safe as long as sector writes are atomic
//! (the assumption every WAL makes): each sector ends up old or new, and both are the same.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use io_uring::{IoUring, opcode, squeue, types};

use super::error::{WalIoError, WalIoOp};

/// A backend that makes bytes durable in a file.
///
/// Contract: `write_durable` returns `Ok` only after all of `bytes` are durable at
/// `offset_bytes`: written and then synced by an fdatasync that started after the write
/// completed, or written by a synchronous (RWF_DSYNC) direct write that completed.
/// Any `Err` is treated as fatal by the WAL (it poisons itself): after a failed fdatasync the
/// kernel may have dropped the dirty pages, so retrying could report durability that is not
/// there.
pub trait WalIo: Send {
    /// A short name for logs and diagnostics, e.g. "io_uring".
    fn name(&self) -> &'static str;

    fn write_durable(
        &mut self,
        file: &File,
        offset_bytes: u64,
        bytes: &[u8],
    ) -> Result<(), WalIoError>;

    /// Extra `open(2)` flags the WAL must open the files it passes to `write_durable` with
    /// (`O_DIRECT` for the direct mode of [`UringIo`]). No flags by default.
    fn segment_open_flags(&self) -> i32 {
        0
    }
}

/// pwrite(2) + fdatasync(2): the portable fallback.
#[derive(Debug, Default)]
pub struct PwriteIo;

impl WalIo for PwriteIo {
    fn name(&self) -> &'static str {
        "pwrite"
    }

    fn write_durable(
        &mut self,
        file: &File,
        offset_bytes: u64,
        bytes: &[u8],
    ) -> Result<(), WalIoError> {
        file.write_all_at(bytes, offset_bytes)
            .map_err(|source| WalIoError {
                op: WalIoOp::Write,
                source,
            })?;
        // std's sync_data is fdatasync(2) on Linux.
        file.sync_data().map_err(|source| WalIoError {
            op: WalIoOp::Fdatasync,
            source,
        })
    }
}

/// io_uring: either direct writes flagged RWF_DSYNC (see the module docs), or a write SQE
/// linked (IOSQE_IO_LINK) to an fdatasync SQE, submitted together.
pub struct UringIo {
    ring: IoUring,
    /// Set in direct mode: the block-aligned staging buffer and the last block written.
    direct: Option<Direct>,
}

/// Block size direct writes are aligned to: the largest logical block size of common
/// devices, and a multiple of all smaller ones.
pub const DIRECT_BLOCK_BYTES: usize = 4096;

/// Direct mode's state.
struct Direct {
    staging: AlignedBuffer,
    /// The last block this backend wrote, as it is on disk: which file (device and inode),
    /// where, and its bytes. The next append usually starts inside it.
    tail: Option<TailBlock>,
}

struct TailBlock {
    file_id: (u64, u64),
    offset_bytes: u64,
    bytes: Box<[u8; DIRECT_BLOCK_BYTES]>,
}

/// A heap buffer aligned to [`DIRECT_BLOCK_BYTES`], grown by whole blocks, never shrunk.
struct AlignedBuffer {
    ptr: std::ptr::NonNull<u8>,
    capacity_bytes: usize,
}

// SAFETY: the buffer is plain owned memory; only its owner touches it.
unsafe impl Send for AlignedBuffer {}

impl AlignedBuffer {
    fn new() -> AlignedBuffer {
        AlignedBuffer {
            ptr: std::ptr::NonNull::dangling(),
            capacity_bytes: 0,
        }
    }

    fn layout(capacity_bytes: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(capacity_bytes, DIRECT_BLOCK_BYTES)
            .expect("capacity is a multiple of the block size, far below isize::MAX")
    }

    /// The first `len_bytes` (a multiple of the block size), holding whatever the last use
    /// left there (zeros when newly grown): the caller writes every byte it sends.
    fn blocks(&mut self, len_bytes: usize) -> &mut [u8] {
        assert!(len_bytes.is_multiple_of(DIRECT_BLOCK_BYTES) && len_bytes > 0);
        if len_bytes > self.capacity_bytes {
            let old = std::mem::replace(self, AlignedBuffer::new());
            drop(old);
            // SAFETY: the layout has a non-zero size. Zeroed, so every byte of the buffer is
            // initialized from here on and slices of it may be handed out.
            let ptr = unsafe { std::alloc::alloc_zeroed(Self::layout(len_bytes)) };
            let Some(ptr) = std::ptr::NonNull::new(ptr) else {
                std::alloc::handle_alloc_error(Self::layout(len_bytes));
            };
            *self = AlignedBuffer {
                ptr,
                capacity_bytes: len_bytes,
            };
        }
        // SAFETY: `ptr` owns `capacity_bytes >= len_bytes` initialized bytes (allocated
        // zeroed), borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len_bytes) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        if self.capacity_bytes > 0 {
            // SAFETY: allocated in `blocks` with this very layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity_bytes)) };
        }
    }
}

/// The device and inode of `file`: which file a cached tail block belongs to (file
/// descriptor numbers are reused, inodes of open files are not).
fn file_id(file: &File) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

/// Whether files in `dir` can be opened with O_DIRECT (tmpfs, for one, refuses it).
fn direct_supported(dir: &Path) -> io::Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join(DIRECT_PROBE_FILE);
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe);
    let supported = match opened {
        Ok(_) => true,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => false,
        Err(e) => return Err(e),
    };
    match std::fs::remove_file(&probe) {
        // Another process probing the same directory may have removed it first.
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    Ok(supported)
}

/// The file [`direct_supported`] creates and removes (not a segment name: listing skips it).
const DIRECT_PROBE_FILE: &str = "direct-io-probe";

/// Ring size. The writer has at most one linked pair in flight, so a small ring suffices.
const URING_ENTRIES: u32 = 8;
/// Bytes submitted in one write SQE (its length field is 32 bits).
const URING_WRITE_BYTES_MAX: usize = 1 << 30;
const USER_DATA_WRITE: u64 = 1;
const USER_DATA_SYNC: u64 = 2;

impl UringIo {
    /// Sets up a ring for linked write + fdatasync pairs; fails where io_uring is missing or
    /// forbidden.
    pub fn new() -> io::Result<UringIo> {
        Ok(UringIo {
            ring: IoUring::new(URING_ENTRIES)?,
            direct: None,
        })
    }

    /// Like [`new`](Self::new), in direct mode if `dir`'s filesystem accepts O_DIRECT (see
    /// the module docs); `dir` must exist.
    pub fn for_dir(dir: &Path) -> io::Result<UringIo> {
        let mut io = UringIo::new()?;
        if direct_supported(dir)? {
            io.direct = Some(Direct {
                staging: AlignedBuffer::new(),
                tail: None,
            });
        }
        Ok(io)
    }

    /// Whether writes are direct (O_DIRECT + RWF_DSYNC) rather than write + fdatasync.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }
}

impl std::fmt::Debug for UringIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringIo").finish_non_exhaustive()
    }
}

impl WalIo for UringIo {
    fn name(&self) -> &'static str {
        if self.direct.is_some() {
            "io_uring+direct"
        } else {
            "io_uring"
        }
    }

    fn segment_open_flags(&self) -> i32 {
        if self.direct.is_some() {
            libc::O_DIRECT
        } else {
            0
        }
    }

    fn write_durable(
        &mut self,
        file: &File,
        offset_bytes: u64,
        bytes: &[u8],
    ) -> Result<(), WalIoError> {
        if self.direct.is_some() {
            return self.write_direct(file, offset_bytes, bytes);
        }
        let fd = types::Fd(file.as_raw_fd());
        let mut written_bytes = 0usize;
        // Each round submits the unwritten rest linked to an fdatasync. A short write breaks
        // the link (the fdatasync completes with ECANCELED), so the loop writes the rest and
        // syncs again; it ends when one round writes everything and its fdatasync succeeds.
        loop {
            assert!(written_bytes <= bytes.len());
            let rest = &bytes[written_bytes..];
            let chunk_bytes = rest.len().min(URING_WRITE_BYTES_MAX);
            let write = opcode::Write::new(fd, rest.as_ptr(), chunk_bytes as u32)
                .offset(offset_bytes + written_bytes as u64)
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(USER_DATA_WRITE);
            let sync = opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(USER_DATA_SYNC);
            // SAFETY: the buffer `rest` and the file outlive both operations, because this
            // function waits for both completions below before returning or looping.
            unsafe {
                let mut queue = self.ring.submission();
                queue
                    .push(&write)
                    .expect("ring has room: the writer keeps at most two SQEs in flight");
                queue
                    .push(&sync)
                    .expect("ring has room: the writer keeps at most two SQEs in flight");
            }
            let (write_result, sync_result) = self.reap_pair()?;
            if write_result < 0 {
                return Err(WalIoError {
                    op: WalIoOp::Write,
                    source: io::Error::from_raw_os_error(-write_result),
                });
            }
            if write_result == 0 && chunk_bytes > 0 {
                return Err(WalIoError {
                    op: WalIoOp::Write,
                    source: io::Error::from(io::ErrorKind::WriteZero),
                });
            }
            written_bytes += write_result as usize;
            let complete = written_bytes == bytes.len();
            if sync_result < 0
                && !(sync_result == -libc::ECANCELED && write_result as usize != chunk_bytes)
            {
                // An fdatasync failure (not a cancellation caused by a short write) is fatal.
                return Err(WalIoError {
                    op: WalIoOp::Fdatasync,
                    source: io::Error::from_raw_os_error(-sync_result),
                });
            }
            if complete && sync_result >= 0 {
                return Ok(());
            }
            if complete {
                // Everything is written but the sync was cancelled by the short write of this
                // round's chunk; sync on its own.
                return self.sync_only(fd);
            }
        }
    }
}

impl UringIo {
    /// Direct mode's `write_durable`: whole blocks from the one holding `offset_bytes`, each
    /// write flagged RWF_DSYNC (durable on completion, no fdatasync).
    fn write_direct(
        &mut self,
        file: &File,
        offset_bytes: u64,
        bytes: &[u8],
    ) -> Result<(), WalIoError> {
        let direct = self.direct.as_mut().expect("direct mode");
        // Taken out while the write is in flight (the ring is borrowed meanwhile); put back
        // below, also on failure (which poisons the WAL anyway).
        let mut buffer = std::mem::replace(&mut direct.staging, AlignedBuffer::new());
        let tail = direct.tail.take();
        let result = self.stage_and_write(file, &mut buffer, tail, offset_bytes, bytes);
        let direct = self.direct.as_mut().expect("direct mode");
        direct.staging = buffer;
        direct.tail = Some(result?);
        Ok(())
    }

    /// Fills `buffer` with whole blocks from the one holding `offset_bytes` (the durable
    /// prefix of that block, `bytes`, zeros) and writes them; returns the last block as
    /// written.
    fn stage_and_write(
        &mut self,
        file: &File,
        buffer: &mut AlignedBuffer,
        tail: Option<TailBlock>,
        offset_bytes: u64,
        bytes: &[u8],
    ) -> Result<TailBlock, WalIoError> {
        const BLOCK: u64 = DIRECT_BLOCK_BYTES as u64;
        let write_error = |source| WalIoError {
            op: WalIoOp::Write,
            source,
        };
        let id = file_id(file).map_err(write_error)?;
        let start_bytes = offset_bytes - offset_bytes % BLOCK;
        let end_bytes = offset_bytes + bytes.len() as u64;
        let aligned_end_bytes = end_bytes.div_ceil(BLOCK) * BLOCK;
        let prefix_bytes = (offset_bytes - start_bytes) as usize;
        let total_bytes = (aligned_end_bytes - start_bytes) as usize;
        let staging = buffer.blocks(total_bytes);
        if prefix_bytes > 0 {
            // The durable bytes before `offset_bytes` in its block: from the last write, or
            // (first write after a restart, or into another file) read back.
            match &tail {
                Some(tail) if tail.file_id == id && tail.offset_bytes == start_bytes => {
                    staging[..prefix_bytes].copy_from_slice(&tail.bytes[..prefix_bytes]);
                }
                _ => {
                    let block = &mut staging[..DIRECT_BLOCK_BYTES];
                    let read = file.read_at(block, start_bytes).map_err(write_error)?;
                    if read < prefix_bytes {
                        return Err(write_error(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "the WAL's durable bytes before offset {offset_bytes} are missing (the file ends {read} bytes into the block at {start_bytes})"
                            ),
                        )));
                    }
                    // What the read brought past the prefix is overwritten below.
                }
            }
        }
        let end_in_staging = prefix_bytes + bytes.len();
        staging[prefix_bytes..end_in_staging].copy_from_slice(bytes);
        // Past the WAL's end the file holds zeros.
        staging[end_in_staging..].fill(0);
        // The previous tail block's allocation is reused for the new one.
        let mut last = tail.map_or_else(|| Box::new([0u8; DIRECT_BLOCK_BYTES]), |t| t.bytes);
        last.copy_from_slice(&staging[total_bytes - DIRECT_BLOCK_BYTES..]);
        let fd = types::Fd(file.as_raw_fd());
        let mut written_bytes = 0usize;
        while written_bytes < total_bytes {
            let rest = &staging[written_bytes..];
            let chunk_bytes = rest.len().min(URING_WRITE_BYTES_MAX);
            let write = opcode::Write::new(fd, rest.as_ptr(), chunk_bytes as u32)
                .offset(start_bytes + written_bytes as u64)
                .rw_flags(libc::RWF_DSYNC)
                .build()
                .user_data(USER_DATA_WRITE);
            // SAFETY: `staging` and the file outlive the operation: `reap_one` waits for its
            // completion before this function returns or loops.
            unsafe {
                self.ring
                    .submission()
                    .push(&write)
                    .expect("ring has room: direct mode keeps one SQE in flight");
            }
            let result = self.reap_one()?;
            if result < 0 {
                return Err(write_error(io::Error::from_raw_os_error(-result)));
            }
            let done = result as usize;
            if done == 0 || !done.is_multiple_of(DIRECT_BLOCK_BYTES) {
                // A direct write moves whole blocks or fails; anything else leaves the
                // rest's alignment unknown, so it cannot be continued safely.
                return Err(write_error(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("a direct write of {chunk_bytes} bytes wrote {done}"),
                )));
            }
            written_bytes += done;
        }
        Ok(TailBlock {
            file_id: id,
            offset_bytes: aligned_end_bytes - BLOCK,
            bytes: last,
        })
    }

    /// Submits what is queued and waits for at least one completion; `submitted` records
    /// whether anything is in flight yet. A retryable error returns `Ok` (the caller checks
    /// the completion queue and calls again).
    fn submit_and_wait(&mut self, submitted: &mut bool) -> Result<(), WalIoError> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {
                *submitted = true;
                Ok(())
            }
            Err(error) if retryable(&error) => Ok(()),
            // io_uring_enter reports an error only if it submitted nothing, so before the
            // first successful call nothing is in flight and the caller may free its buffer.
            Err(source) if !*submitted => Err(WalIoError {
                op: WalIoOp::Write,
                source,
            }),
            // Once submitted, the kernel may still read the caller's buffer: returning would
            // let it be freed under the kernel. Waiting only fails with the retryable errors,
            // so this is a broken kernel contract; stop the process.
            Err(error) => {
                tracing::error!(%error, "io_uring wait failed with operations in flight; aborting");
                std::process::abort();
            }
        }
    }

    /// Submits what is queued and waits for one completion: the direct write's.
    fn reap_one(&mut self) -> Result<i32, WalIoError> {
        let mut submitted = false;
        loop {
            self.submit_and_wait(&mut submitted)?;
            if let Some(completion) = self.ring.completion().next() {
                assert_eq!(completion.user_data(), USER_DATA_WRITE);
                return Ok(completion.result());
            }
        }
    }

    /// Submits what is queued and waits for the write and the sync completions.
    fn reap_pair(&mut self) -> Result<(i32, i32), WalIoError> {
        let mut write_result = None;
        let mut sync_result = None;
        let mut submitted = false;
        while write_result.is_none() || sync_result.is_none() {
            self.submit_and_wait(&mut submitted)?;
            for completion in self.ring.completion() {
                match completion.user_data() {
                    USER_DATA_WRITE => write_result = Some(completion.result()),
                    USER_DATA_SYNC => sync_result = Some(completion.result()),
                    other => unreachable!("unexpected io_uring completion user_data {other}"),
                }
            }
        }
        Ok((
            write_result.expect("loop ends with both"),
            sync_result.expect("loop ends with both"),
        ))
    }

    fn sync_only(&mut self, fd: types::Fd) -> Result<(), WalIoError> {
        let sync = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(USER_DATA_SYNC);
        // SAFETY: an fsync SQE references no memory.
        unsafe {
            self.ring
                .submission()
                .push(&sync)
                .expect("ring is empty here");
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(error) if retryable(&error) => continue,
                Err(source) => {
                    return Err(WalIoError {
                        op: WalIoOp::Fdatasync,
                        source,
                    });
                }
            }
            if let Some(completion) = self.ring.completion().next() {
                assert_eq!(completion.user_data(), USER_DATA_SYNC);
                let result = completion.result();
                if result < 0 {
                    return Err(WalIoError {
                        op: WalIoOp::Fdatasync,
                        source: io::Error::from_raw_os_error(-result),
                    });
                }
                return Ok(());
            }
        }
    }
}

/// io_uring_enter errors that mean "try again": a signal, or the kernel briefly short of
/// resources for completions.
fn retryable(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}
