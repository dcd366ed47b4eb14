//! Measures the Bloom clock's false-positive rates against theory.
//!
//! Run with `cargo test -p calm-kernel --test bloom_fpr -- --nocapture` to see the table (the
//! numbers in `clock.rs`'s module docs come from it). Ids are generated deterministically, so
//! the numbers are the same on every run and machine.

use calm_kernel::clock::{BLOOM_CLOCK_BITS, BLOOM_CLOCK_HASHES, BloomClock, NodeId};

/// Fact ids as a cluster produces them: a few origins, dense sequences. The three origins get
/// `n` ids round-robin, so origin `o` holds sequences `1..=n/3` (roughly).
fn ids(n: usize) -> impl Iterator<Item = (NodeId, u64)> {
    (0..n as u64).map(|i| (i % 3 + 1, i / 3 + 1))
}

/// Ids never produced by `ids(n)` for any n used here: sequences far beyond, other origins too.
fn absent(m: usize) -> impl Iterator<Item = (NodeId, u64)> {
    (0..m as u64).map(|i| (i % 5 + 1, 1_000_000 + i / 5))
}

fn theory(n: usize) -> f64 {
    let k = f64::from(BLOOM_CLOCK_HASHES);
    let m = BLOOM_CLOCK_BITS as f64;
    (1.0 - (-k * n as f64 / m).exp()).powf(k)
}

/// Fraction of `trials` in which a clock holding `n` ids claims to dominate a clock holding
/// those ids plus `d` more it lacks.
fn dominance_fpr(base: &BloomClock, d: usize, trials: usize) -> f64 {
    let mut extra = absent(trials * d);
    let mut wrong = 0;
    for _ in 0..trials {
        let mut other = base.clone();
        for _ in 0..d {
            let (origin, seq) = extra.next().unwrap();
            other.insert(origin, seq);
        }
        if base.dominates(&other) {
            wrong += 1;
        }
    }
    wrong as f64 / trials as f64
}

#[test]
fn false_positive_rates_match_theory() {
    const QUERIES: usize = 100_000;
    const TRIALS: usize = 10_000;
    println!(
        "Bloom clock: {BLOOM_CLOCK_BITS} bits, k = {BLOOM_CLOCK_HASHES}; {QUERIES} membership \
         queries, {TRIALS} dominance trials"
    );
    println!(
        "{:>6} {:>6} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "n", "fill", "theory", "member", "estimate", "est.items", "dom d=1", "dom d=4"
    );
    for n in [64, 256, 512, 1024, 2048, 4096] {
        let mut clock = BloomClock::new();
        for (origin, seq) in ids(n) {
            clock.insert(origin, seq);
        }
        // No false negatives, ever.
        assert!(ids(n).all(|(o, s)| clock.may_contain(o, s)));

        let hits = absent(QUERIES)
            .filter(|&(o, s)| clock.may_contain(o, s))
            .count();
        let measured = hits as f64 / QUERIES as f64;
        let expected = theory(n);
        let dom1 = dominance_fpr(&clock, 1, TRIALS);
        let dom4 = dominance_fpr(&clock, 4, TRIALS);
        println!(
            "{:>6} {:>6.3} {:>9.5} {:>10.5} {:>9.5} {:>9.0} {:>9.5} {:>9.5}",
            n,
            clock.fill_ratio(),
            expected,
            measured,
            clock.false_positive_rate_estimate(),
            clock.estimated_items(),
            dom1,
            dom4
        );

        assert!(
            measured <= 2.0 * expected + 0.01,
            "n = {n}: measured FPR {measured} vs theory {expected}"
        );
        assert!(
            measured >= expected / 2.0 - 0.01,
            "n = {n}: measured FPR {measured} suspiciously below theory {expected}"
        );
        // The fill-based estimate is what callers use to decide whether to trust the clock.
        let estimate = clock.false_positive_rate_estimate();
        assert!(
            (measured - estimate).abs() <= 0.5 * estimate + 0.01,
            "n = {n}: estimate {estimate} vs measured {measured}"
        );
        // One missing id hides exactly when its bits are all set already: membership FPR.
        assert!(dom1 <= 2.0 * expected + 0.01, "n = {n}: dominance {dom1}");
        // More missing ids hide less often.
        assert!(dom4 <= dom1 + 0.01, "n = {n}: d=4 {dom4} vs d=1 {dom1}");
        let est = clock.estimated_items();
        if n <= 1024 {
            assert!(
                (est - n as f64).abs() <= 0.1 * n as f64,
                "n = {n}: estimated {est}"
            );
        }
    }
}
