//! The durable-write step of the WAL, behind a small trait.
//!
//! The writer thread needs exactly one I/O primitive: "these bytes at this offset, then
//! fdatasync, and tell me when both are done". Keeping it that small lets the io_uring
//! backend submit the write and the fdatasync as one linked chain (one syscall), lets the
//! pwrite backend serve where io_uring is forbidden (seccomp), and lets tests inject faults
//! without mocking anything else of the WAL.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use io_uring::{IoUring, opcode, squeue, types};

use super::error::{WalIoError, WalIoOp};

/// A backend that makes bytes durable in a file.
///
/// Contract: `write_durable` returns `Ok` only after all of `bytes` are written at
/// `offset_bytes` and an fdatasync that started after the write completed has succeeded.
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

/// io_uring: a write SQE linked (IOSQE_IO_LINK) to an fdatasync SQE, submitted together.
pub struct UringIo {
    ring: IoUring,
}

/// Ring size. The writer has at most one linked pair in flight, so a small ring suffices.
const URING_ENTRIES: u32 = 8;
/// Bytes submitted in one write SQE (its length field is 32 bits).
const URING_WRITE_BYTES_MAX: usize = 1 << 30;
const USER_DATA_WRITE: u64 = 1;
const USER_DATA_SYNC: u64 = 2;

impl UringIo {
    /// Sets up a ring; fails where io_uring is missing or forbidden.
    pub fn new() -> io::Result<UringIo> {
        Ok(UringIo {
            ring: IoUring::new(URING_ENTRIES)?,
        })
    }
}

impl std::fmt::Debug for UringIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringIo").finish_non_exhaustive()
    }
}

impl WalIo for UringIo {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn write_durable(
        &mut self,
        file: &File,
        offset_bytes: u64,
        bytes: &[u8],
    ) -> Result<(), WalIoError> {
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
    /// Submits what is queued and waits for the write and the sync completions.
    fn reap_pair(&mut self) -> Result<(i32, i32), WalIoError> {
        let mut write_result = None;
        let mut sync_result = None;
        let mut submitted = false;
        while write_result.is_none() || sync_result.is_none() {
            match self.ring.submit_and_wait(1) {
                Ok(_) => submitted = true,
                Err(error) if retryable(&error) => continue,
                // io_uring_enter reports an error only if it submitted nothing, so before the
                // first successful call nothing is in flight and the caller may free `bytes`.
                Err(source) if !submitted => {
                    return Err(WalIoError {
                        op: WalIoOp::Write,
                        source,
                    });
                }
                // Once submitted, the kernel may still read the caller's buffer: returning
                // would let it be freed under the kernel. Waiting only fails with the retryable
                // errors, so this is a broken kernel contract; stop the process.
                Err(error) => {
                    tracing::error!(%error, "io_uring wait failed with operations in flight; aborting");
                    std::process::abort();
                }
            }
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
