//! What the WAL reports to the process's `metrics` recorder (Prometheus on `/metrics`).
//!
//! The writer thread records one group commit and one durable write at a time, so operators
//! can see what etcd's `etcd_disk_wal_fsync_duration_seconds` shows them (how long the disk
//! takes to make a write durable), how well group commit is batching (appends per
//! durable write), and how long appenders wait in all (the disk plus the queue). Names and
//! bucket bounds are public so that the exporter can give the histograms Prometheus buckets.

use metrics::{Unit, describe_counter, describe_histogram};

/// Group commits made durable (each one or, at a segment's end, two durable writes).
pub(crate) const METRIC_GROUP_COMMITS: &str = "calm_wal_group_commits_total";
/// Appended batches per group commit.
pub const METRIC_GROUP_BATCHES: &str = "calm_wal_group_batches";
/// Seconds one durable write took: a direct RWF_DSYNC write, or a write and its fdatasync.
pub const METRIC_DURABLE_WRITE_SECONDS: &str = "calm_wal_durable_write_seconds";
/// Seconds from an (eager) append to its batch being durable: the wait for the writer, the
/// group's durable write, and any group ahead of it. Minus the durable write, what the
/// writer's queue and wake-up cost.
pub const METRIC_APPEND_SECONDS: &str = "calm_wal_append_seconds";
/// Bytes made durable (frames; direct writes also rewrite the partial first block).
pub(crate) const METRIC_WRITTEN_BYTES: &str = "calm_wal_written_bytes_total";

/// Bucket bounds of calm's latency histograms (every `calm_*_seconds`): 25 µs doubling up to
/// ~1.6 s. A healthy SSD answers a durable write in the first few buckets; etcd warns when
/// its WAL fsync passes 1 s.
pub const SECONDS_BUCKETS: [f64; 17] = {
    let mut bounds = [0.0; 17];
    let mut i = 0;
    let mut bound = 0.000_025;
    while i < bounds.len() {
        bounds[i] = bound;
        bound *= 2.0;
        i += 1;
    }
    bounds
};

/// Bucket bounds of [`METRIC_GROUP_BATCHES`]: 1, 2, 4, ... 4096 batches per group commit.
pub const GROUP_BATCHES_BUCKETS: [f64; 13] = {
    let mut bounds = [0.0; 13];
    let mut i = 0;
    while i < bounds.len() {
        bounds[i] = (1u64 << i) as f64;
        i += 1;
    }
    bounds
};

/// Describe the WAL's metrics to the installed recorder (call once it is installed).
pub fn describe_metrics() {
    describe_counter!(
        METRIC_GROUP_COMMITS,
        Unit::Count,
        "WAL group commits made durable"
    );
    describe_histogram!(
        METRIC_GROUP_BATCHES,
        Unit::Count,
        "Appended batches made durable by one WAL group commit"
    );
    describe_histogram!(
        METRIC_DURABLE_WRITE_SECONDS,
        Unit::Seconds,
        "Time one durable WAL write took (direct synchronous write, or write and fdatasync)"
    );
    describe_histogram!(
        METRIC_APPEND_SECONDS,
        Unit::Seconds,
        "Time from a WAL append to its batch being durable (queue, writer wake-up, durable write)"
    );
    describe_counter!(
        METRIC_WRITTEN_BYTES,
        Unit::Bytes,
        "Bytes the WAL made durable"
    );
}
