//! Clocks: node ids, the hybrid logical clock, and the Bloom clock gossip summary.
//!
//! This module owns the three notions of time of DESIGN.md section 4 that are not exact
//! causality (exact causality is the version vector in `vv.rs`):
//!
//! - [`NodeId`], the name of an origin. A fact id is `(origin, seq)`.
//! - [`Hlc`], a thin wrapper around `uhlc`'s hybrid logical clock. It stamps every fact and
//!   Raft entry; the stamp orders last-writer-wins registers (ties break on the node id, which
//!   facts carry beside the stamp) and is what clients see as a timestamp. The physical clock
//!   is an injected `fn() -> NTP64`, so the kernel never reads the system clock behind a test's
//!   back: [`Hlc::new`] injects `uhlc::system_time_clock`, tests inject a fake.
//! - [`BloomClock`], a fixed-size Bloom filter of fact ids (as in Cuttlefish) that peers swap
//!   during anti-entropy to skip exchanges cheaply.
//!
//! # The Bloom clock never decides correctness
//!
//! A Bloom filter has false positives and no false negatives. For a summary that means:
//! `mine.dominates(&theirs) == false` proves the peer has a fact we lack, but `true` only says
//! we *probably* have everything it has. Gossip may therefore use "my clock dominates yours" to
//! answer "nothing to send" and skip a round, but a skipped round is never final: anti-entropy
//! confirms "nothing to send" against the exact version vectors periodically, and facts are
//! pulled by exact `(origin, sequence range)`. A false positive costs latency (one anti-entropy
//! period), never a lost or duplicated fact.
//!
//! The filter only ever fills up. Summarise a *window* of facts — e.g. those above the last
//! version vector both peers confirmed — rather than all history, and treat a clock whose
//! [`BloomClock::false_positive_rate_estimate`] is high (say above 1%) as "unknown": go straight
//! to the exact exchange.
//!
//! # Measured false-positive rates
//!
//! From `kernel/tests/bloom_fpr.rs` (4096 bits, k = 4; ids `(origin 1..=3, dense seq)`; membership:
//! 100 000 never-inserted ids queried; dominance: 10 000 trials of a clock asked whether it
//! dominates a copy of itself plus `d` ids it lacks):
//!
//! | ids n | fill  | theory (1-e^(-kn/m))^k | membership | estimate fill^k | dominance d=1 | d=4     |
//! |------:|------:|-----------------------:|-----------:|----------------:|--------------:|--------:|
//! |    64 | 0.061 |                0.00001 |    0.00002 |         0.00001 |       0.00000 | 0.00000 |
//! |   256 | 0.223 |                0.00239 |    0.00276 |         0.00249 |       0.00350 | 0.00000 |
//! |   512 | 0.398 |                0.02397 |    0.02476 |         0.02508 |       0.02610 | 0.00000 |
//! |  1024 | 0.642 |                0.15966 |    0.16785 |         0.16946 |       0.16790 | 0.00050 |
//! |  2048 | 0.871 |                0.55897 |    0.57299 |         0.57514 |       0.57700 | 0.09920 |
//! |  4096 | 0.983 |                0.92873 |    0.93308 |         0.93245 |       0.93170 | 0.75310 |
//!
//! Dominance with one missing id fails exactly like membership (the id's bits are all set
//! already); each further missing id multiplies the chance down, so real gossip gaps (batches
//! of facts) hide far less often than the d=1 column.
//!
//! So the default size is good for windows of a few hundred facts (under 1% up to ~390 ids),
//! and useless past a few thousand, which is exactly when the exact exchange must take over.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;
use thiserror::Error;
use uhlc::{HLC, HLCBuilder, ID, NTP64};

/// The id of a node, and of the origin of a fact. Node id 0 is reserved (never a real node).
pub type NodeId = u64;

/// Errors of this module. Each says what went wrong and what to do about it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ClockError {
    #[error(
        "a peer's timestamp {remote} is {ahead_ms} ms ahead of this node's clock {local}, more \
         than the {max_delta_ms} ms allowed; refusing it so one bad clock cannot drag every \
         node's time forward. Check NTP (chrony/timesyncd) on the node that sent it, and on this one"
    )]
    TooFarAhead {
        remote: HlcTimestamp,
        local: HlcTimestamp,
        ahead_ms: u64,
        max_delta_ms: u64,
    },
    #[error(
        "a Bloom clock must be exactly {expected} bytes but {got} arrived; the peer runs a calm \
         build with a different Bloom clock size: run one calm version across the cluster"
    )]
    BloomClockLength { expected: usize, got: usize },
}

// ---------------------------------------------------------------------------------------------
// Hybrid logical clock
// ---------------------------------------------------------------------------------------------

/// An HLC timestamp: the 64 NTP64 bits of a `uhlc` timestamp (32 bits of seconds since the Unix
/// epoch, 32 bits of fraction whose lowest `uhlc::CSIZE` bits are the logical counter).
///
/// The node id is deliberately not part of it: fact headers store the origin separately, so
/// the stamp stays one `u64` on the wire. Where a total order is needed (LWW), order by
/// `(HlcTimestamp, NodeId)`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct HlcTimestamp(pub u64);

impl HlcTimestamp {
    /// The earliest timestamp; also "never written".
    pub const ZERO: HlcTimestamp = HlcTimestamp(0);

    pub const fn from_ntp64(t: NTP64) -> HlcTimestamp {
        HlcTimestamp(t.0)
    }

    pub const fn as_ntp64(self) -> NTP64 {
        NTP64(self.0)
    }

    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// A timestamp at `since_epoch` after the Unix epoch, logical counter 0.
    ///
    /// # Panics
    /// If `since_epoch` does not fit in 32 bits of seconds (after the year 2106).
    pub fn from_unix_duration(since_epoch: Duration) -> HlcTimestamp {
        HlcTimestamp(NTP64::from(since_epoch).0)
    }

    /// Time since the Unix epoch (nanosecond precision; the logical counter is below it).
    pub fn to_unix_duration(self) -> Duration {
        self.as_ntp64().to_duration()
    }

    /// The logical counter: how many stamps this clock issued within one physical tick.
    pub const fn logical(self) -> u64 {
        self.0 & ((1 << uhlc::CSIZE) - 1)
    }
}

impl From<NTP64> for HlcTimestamp {
    fn from(t: NTP64) -> HlcTimestamp {
        HlcTimestamp::from_ntp64(t)
    }
}

impl From<HlcTimestamp> for NTP64 {
    fn from(t: HlcTimestamp) -> NTP64 {
        t.as_ntp64()
    }
}

impl fmt::Display for HlcTimestamp {
    /// `2024-07-01T15:32:06.860479000Z` (RFC 3339, nanoseconds, lossy: the logical counter is
    /// below a nanosecond). `{:#}` prints the exact 64-bit value instead.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{:#}", self.as_ntp64())
        }
    }
}

/// A hybrid logical clock for one node.
///
/// `now()` is strictly increasing on this node and greater than every timestamp passed to
/// `observe()`, so a fact stamped after receiving another is ordered after it.
pub struct Hlc {
    node: NodeId,
    clock: fn() -> NTP64,
    max_delta: Duration,
    inner: HLC,
}

impl Hlc {
    /// The most a peer's timestamp may be ahead of our physical clock before it is refused.
    /// uhlc's default, also CockroachDB's default maximum clock offset. Set explicitly so the
    /// `UHLC_MAX_DELTA_MS` environment variable uhlc reads does not change our behaviour.
    pub const DEFAULT_MAX_DELTA: Duration = Duration::from_millis(500);

    /// A clock reading the system time (`uhlc::system_time_clock`).
    pub fn new(node: NodeId) -> Hlc {
        Hlc::with_clock(node, uhlc::system_time_clock)
    }

    /// A clock reading time from `clock` (tests and simulations inject a fake).
    pub fn with_clock(node: NodeId, clock: fn() -> NTP64) -> Hlc {
        Hlc::with_config(node, clock, Hlc::DEFAULT_MAX_DELTA)
    }

    /// Full control: physical clock and maximum accepted drift of remote timestamps.
    pub fn with_config(node: NodeId, clock: fn() -> NTP64, max_delta: Duration) -> Hlc {
        let inner = HLCBuilder::new()
            .with_id(uhlc_id(node))
            .with_clock(clock)
            .with_max_delta(max_delta)
            .build();
        Hlc {
            node,
            clock,
            max_delta,
            inner,
        }
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn max_delta(&self) -> Duration {
        self.max_delta
    }

    /// A fresh timestamp, greater than every earlier `now()` and every observed timestamp.
    pub fn now(&self) -> HlcTimestamp {
        HlcTimestamp::from_ntp64(*self.inner.new_timestamp().get_time())
    }

    /// Fold in a timestamp received from a peer, so our next `now()` is after it.
    ///
    /// Refuses (and leaves the clock untouched) a timestamp more than `max_delta` ahead of our
    /// physical clock: accepting it would push every later stamp of this node into the future.
    pub fn observe(&self, remote: HlcTimestamp) -> Result<(), ClockError> {
        // uhlc wants a full timestamp; the id is not used for the update, only for its log line.
        let ts = uhlc::Timestamp::new(remote.as_ntp64(), *self.inner.get_id());
        self.inner.update_with_timestamp(&ts).map_err(|_| {
            // uhlc keeps its error's fields private; re-read the injected clock to report.
            let local = HlcTimestamp((self.clock)().0 & !((1 << uhlc::CSIZE) - 1));
            // Saturating: a fake or fast clock may have caught up since uhlc's own read.
            let ahead = NTP64(remote.0.saturating_sub(local.0));
            ClockError::TooFarAhead {
                remote,
                local,
                ahead_ms: ahead.to_duration().as_millis() as u64,
                max_delta_ms: self.max_delta.as_millis() as u64,
            }
        })
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hlc")
            .field("node", &self.node)
            .field("max_delta", &self.max_delta)
            .finish_non_exhaustive()
    }
}

/// uhlc ids must be non-zero; setting bit 64 keeps every `NodeId` (0 included) distinct and
/// valid without a fallible constructor.
fn uhlc_id(node: NodeId) -> ID {
    let raw = (1u128 << 64) | u128::from(node);
    ID::try_from(raw).expect("a u128 with bit 64 set is a valid, non-zero uhlc id")
}

// ---------------------------------------------------------------------------------------------
// Bloom clock
// ---------------------------------------------------------------------------------------------

/// Size of a Bloom clock in bits.
///
/// 4096 bits = 512 bytes: small enough to ride in every anti-entropy message beside the
/// version vector and well inside one Ethernet MTU, large enough that a window of a few hundred
/// facts keeps the false-positive rate under 1% (see the table in the module docs). A power of
/// two, so bit indexes are plain bit slices of one hash.
pub const BLOOM_CLOCK_BITS: usize = 4096;
/// Number of bit positions set per fact id.
///
/// The optimum is `(m/n)·ln 2`: 11 at 256 ids, 2.8 at 1024. Four is the optimum at ~700 ids
/// and costs little at smaller windows; with 12-bit indexes, four of them use 48 of the 64 bits
/// of one hash, so they are independent slices rather than derived from each other.
pub const BLOOM_CLOCK_HASHES: u32 = 4;
pub const BLOOM_CLOCK_WORDS: usize = BLOOM_CLOCK_BITS / 64;
/// Wire size of a Bloom clock: the words in little-endian order.
pub const BLOOM_CLOCK_BYTES: usize = BLOOM_CLOCK_BITS / 8;

const INDEX_BITS: u32 = BLOOM_CLOCK_BITS.trailing_zeros();
const INDEX_MASK: u64 = (BLOOM_CLOCK_BITS as u64) - 1;
const _: () = assert!(BLOOM_CLOCK_BITS.is_power_of_two() && BLOOM_CLOCK_BITS >= 64);
const _: () = assert!(INDEX_BITS * BLOOM_CLOCK_HASHES <= 64);

/// A fixed-size Bloom filter of fact ids `(origin, seq)`: a gossip summary, never the truth.
/// See the module docs for how (and how not) to use it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BloomClock {
    words: [u64; BLOOM_CLOCK_WORDS],
}

impl BloomClock {
    pub const fn new() -> BloomClock {
        BloomClock {
            words: [0; BLOOM_CLOCK_WORDS],
        }
    }

    /// Record the fact `(origin, seq)`.
    pub fn insert(&mut self, origin: NodeId, seq: u64) {
        let h = fact_hash(origin, seq);
        for i in 0..BLOOM_CLOCK_HASHES {
            let bit = (h >> (i * INDEX_BITS)) & INDEX_MASK;
            self.words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    /// `false`: the fact was certainly never inserted. `true`: it probably was.
    pub fn may_contain(&self, origin: NodeId, seq: u64) -> bool {
        let h = fact_hash(origin, seq);
        (0..BLOOM_CLOCK_HASHES).all(|i| {
            let bit = (h >> (i * INDEX_BITS)) & INDEX_MASK;
            self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
        })
    }

    /// Every bit set in `other` is set in `self`: `self` has probably seen every fact `other`
    /// has. `false` is certain (other has a fact we lack); `true` is only probable.
    pub fn dominates(&self, other: &BloomClock) -> bool {
        self.words
            .iter()
            .zip(&other.words)
            .all(|(mine, theirs)| theirs & !mine == 0)
    }

    /// Union: afterwards `self` summarises the facts of both.
    pub fn merge(&mut self, other: &BloomClock) {
        for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
            *mine |= theirs;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Forget everything (start a new window).
    pub fn clear(&mut self) {
        self.words = [0; BLOOM_CLOCK_WORDS];
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    /// Fraction of bits set, in [0, 1].
    pub fn fill_ratio(&self) -> f64 {
        f64::from(self.count_ones()) / BLOOM_CLOCK_BITS as f64
    }

    /// Estimated number of distinct ids inserted (Swamidass & Baldi: `-(m/k)·ln(1 - X/m)`).
    /// Infinite when every bit is set.
    pub fn estimated_items(&self) -> f64 {
        let m = BLOOM_CLOCK_BITS as f64;
        let k = f64::from(BLOOM_CLOCK_HASHES);
        -(m / k) * (1.0 - self.fill_ratio()).ln()
    }

    /// Probability that an id never inserted is reported present, from the current fill:
    /// `fill^k`. Also roughly the chance that `dominates` wrongly says yes when `other` has
    /// exactly one fact `self` lacks.
    pub fn false_positive_rate_estimate(&self) -> f64 {
        self.fill_ratio().powi(BLOOM_CLOCK_HASHES as i32)
    }

    /// Wire form: the words in order, each little-endian. Always `BLOOM_CLOCK_BYTES` long.
    pub fn as_bytes(&self) -> [u8; BLOOM_CLOCK_BYTES] {
        let mut out = [0u8; BLOOM_CLOCK_BYTES];
        for (chunk, word) in out.chunks_exact_mut(8).zip(&self.words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// Parse the wire form; refuses any length other than `BLOOM_CLOCK_BYTES`.
    pub fn from_bytes(bytes: &[u8]) -> Result<BloomClock, ClockError> {
        if bytes.len() != BLOOM_CLOCK_BYTES {
            return Err(ClockError::BloomClockLength {
                expected: BLOOM_CLOCK_BYTES,
                got: bytes.len(),
            });
        }
        let mut clock = BloomClock::new();
        for (word, chunk) in clock.words.iter_mut().zip(bytes.chunks_exact(8)) {
            *word = u64::from_le_bytes(chunk.try_into().expect("chunks_exact(8) yields 8 bytes"));
        }
        Ok(clock)
    }
}

impl Default for BloomClock {
    fn default() -> BloomClock {
        BloomClock::new()
    }
}

impl fmt::Debug for BloomClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // 64 words of hex help nobody; the fill says what matters.
        f.debug_struct("BloomClock")
            .field("ones", &self.count_ones())
            .field("bits", &BLOOM_CLOCK_BITS)
            .field("estimated_items", &self.estimated_items())
            .finish()
    }
}

/// splitmix64's finaliser (Steele, Lea & Flood): a bijection on u64 with full avalanche.
const fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One 64-bit hash of a fact id. For a fixed origin it is a bijection of `seq` (xor with a
/// constant, then a bijective mix), so one origin's ids never collide; across origins a
/// collision needs `mix(o1) ^ mix(o2) == s1 ^ s2`, which the first mix makes random-looking.
/// The result is stable across builds and platforms: peers must agree on it.
const fn fact_hash(origin: NodeId, seq: u64) -> u64 {
    splitmix64(splitmix64(origin) ^ seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    const BASE: u64 = 1_700_000_000 << 32; // 2023-11-14, in NTP64 bits

    fn frozen() -> NTP64 {
        NTP64(BASE)
    }

    #[test]
    fn now_is_strictly_increasing_even_when_time_stands_still() {
        let hlc = Hlc::with_clock(1, frozen);
        let a = hlc.now();
        let b = hlc.now();
        let c = hlc.now();
        assert!(a < b && b < c);
        assert_eq!(a.0, BASE);
        assert_eq!(b.logical(), 1);
        assert_eq!(c.logical(), 2);
    }

    #[test]
    fn observe_moves_the_clock_past_a_remote_stamp() {
        let hlc = Hlc::with_clock(1, frozen);
        let remote = HlcTimestamp(BASE + (100 << 16)); // ~1.5 ms ahead: within the delta
        hlc.observe(remote).unwrap();
        assert!(hlc.now() > remote);
        // An old remote stamp does not move it back.
        hlc.observe(HlcTimestamp(BASE - (1 << 32))).unwrap();
        assert!(hlc.now() > remote);
    }

    #[test]
    fn observe_refuses_stamps_too_far_ahead_and_says_why() {
        let hlc = Hlc::with_clock(1, frozen);
        let before = hlc.now();
        let remote = HlcTimestamp(BASE + (2 << 32)); // 2 s ahead, delta is 500 ms
        let err = hlc.observe(remote).unwrap_err();
        assert_eq!(
            err,
            ClockError::TooFarAhead {
                remote,
                local: HlcTimestamp(BASE),
                ahead_ms: 2000,
                max_delta_ms: 500
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("2000 ms ahead"), "{msg}");
        assert!(msg.contains("Check NTP"), "{msg}");
        // The clock was not dragged forward.
        let after = hlc.now();
        assert!(after > before && after < remote);
    }

    #[test]
    fn max_delta_is_configurable() {
        let hlc = Hlc::with_config(7, frozen, Duration::from_secs(5));
        hlc.observe(HlcTimestamp(BASE + (2 << 32))).unwrap();
        assert_eq!(hlc.node(), 7);
        assert_eq!(hlc.max_delta(), Duration::from_secs(5));
    }

    #[test]
    fn every_node_id_makes_a_valid_clock() {
        for node in [0, 1, u64::MAX] {
            let hlc = Hlc::with_clock(node, frozen);
            assert_eq!(hlc.now().0, BASE);
        }
    }

    #[test]
    fn injected_clock_drives_physical_time() {
        static T: AtomicU64 = AtomicU64::new(BASE);
        fn ticking() -> NTP64 {
            NTP64(T.fetch_add(1 << 20, Ordering::Relaxed))
        }
        let hlc = Hlc::with_clock(1, ticking);
        let a = hlc.now();
        let b = hlc.now();
        assert_eq!(a.logical(), 0);
        assert_eq!(b.logical(), 0);
        assert_eq!(b.0 - a.0, 1 << 20);
    }

    #[test]
    fn timestamps_convert_and_display() {
        let t = HlcTimestamp::from_unix_duration(Duration::new(1_700_000_000, 500_000_000));
        assert_eq!(t.to_string(), "2023-11-14T22:13:20.500000000Z");
        assert_eq!(format!("{t:#}"), t.0.to_string());
        assert_eq!(
            t.to_unix_duration(),
            Duration::new(1_700_000_000, 500_000_000)
        );
        assert_eq!(HlcTimestamp::from(t.as_ntp64()), t);
        assert_eq!(NTP64::from(t).as_u64(), t.as_u64());
        assert_eq!(
            HlcTimestamp::ZERO.to_string(),
            "1970-01-01T00:00:00.000000000Z"
        );
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<HlcTimestamp>(&json).unwrap(), t);
    }

    #[test]
    fn bloom_clock_has_no_false_negatives() {
        let mut clock = BloomClock::new();
        assert!(clock.is_empty());
        for seq in 1..=300 {
            clock.insert(seq % 3 + 1, seq);
        }
        for seq in 1..=300 {
            assert!(clock.may_contain(seq % 3 + 1, seq));
        }
        assert!(!clock.is_empty());
        let est = clock.estimated_items();
        assert!((270.0..330.0).contains(&est), "estimate {est}");
        clock.clear();
        assert!(clock.is_empty() && !clock.may_contain(1, 3));
    }

    #[test]
    fn dominance_and_merge() {
        let mut a = BloomClock::new();
        let mut b = BloomClock::new();
        for seq in 1..=50 {
            a.insert(1, seq);
            b.insert(1, seq);
        }
        assert!(a.dominates(&b) && b.dominates(&a));
        b.insert(2, 1);
        assert!(b.dominates(&a));
        assert!(
            !a.dominates(&b),
            "a lacks (2, 1), and dominance has no false negatives"
        );
        a.insert(3, 1);
        assert!(!a.dominates(&b) && !b.dominates(&a));
        let mut m = a.clone();
        m.merge(&b);
        assert!(m.dominates(&a) && m.dominates(&b));
        assert!(m.may_contain(2, 1) && m.may_contain(3, 1));
        assert!(BloomClock::new().dominates(&BloomClock::new()));
        assert!(a.dominates(&BloomClock::new()));
    }

    #[test]
    fn fpr_estimate_follows_fill() {
        let mut clock = BloomClock::new();
        assert_eq!(clock.false_positive_rate_estimate(), 0.0);
        assert_eq!(clock.estimated_items(), 0.0);
        clock.merge(&BloomClock::from_bytes(&[0xFF; BLOOM_CLOCK_BYTES]).unwrap());
        assert_eq!(clock.count_ones() as usize, BLOOM_CLOCK_BITS);
        assert_eq!(clock.false_positive_rate_estimate(), 1.0);
        assert!(clock.estimated_items().is_infinite());
    }

    #[test]
    fn wire_form_round_trips_and_is_little_endian() {
        let mut clock = BloomClock::new();
        for seq in 1..=40 {
            clock.insert(9, seq);
        }
        let bytes = clock.as_bytes();
        assert_eq!(bytes.len(), BLOOM_CLOCK_BYTES);
        assert_eq!(BloomClock::from_bytes(&bytes).unwrap(), clock);
        assert_eq!(
            u64::from_le_bytes(bytes[..8].try_into().unwrap()),
            clock.words[0]
        );
        let err = BloomClock::from_bytes(&bytes[1..]).unwrap_err();
        assert_eq!(
            err,
            ClockError::BloomClockLength {
                expected: 512,
                got: 511
            }
        );
        assert!(err.to_string().contains("exactly 512 bytes"));
    }

    #[test]
    fn fact_hash_is_stable() {
        // Peers must agree bit for bit: pin the hash so a change is a conscious wire break.
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(fact_hash(1, 1), 0xE9FD_6049_D65A_F21E);
        assert_eq!(fact_hash(7, 12345), 0x19BD_65D1_4C45_ECF7);
        let mut clock = BloomClock::new();
        clock.insert(1, 1);
        let h = fact_hash(1, 1);
        for i in 0..BLOOM_CLOCK_HASHES {
            let bit = (h >> (i * INDEX_BITS)) & INDEX_MASK;
            assert!(clock.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0);
        }
        assert!(clock.count_ones() <= BLOOM_CLOCK_HASHES);
    }
}
