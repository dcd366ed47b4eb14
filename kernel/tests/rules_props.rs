//! Property tests of the safety rules: first-match semantics against a reference matcher,
//! soundness of the shadow warnings, and versioned replacement.

use calm_kernel::rules::{ProblemKind, Rule, RuleSet, RulesError};
use calm_kernel::value::Mode;
use proptest::prelude::*;

/// Reference glob matcher for patterns made of literal bytes and `*` only: `*` matches any
/// run of bytes. Written independently of `globset`.
fn reference_match(pattern: &[u8], key: &[u8]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((b'*', rest)) => (0..=key.len()).any(|skip| reference_match(rest, &key[skip..])),
        Some((&c, rest)) => key.first() == Some(&c) && reference_match(rest, &key[1..]),
    }
}

/// First rule matching `key` by the reference matcher.
fn reference_resolve(rules: &[Rule], key: &[u8]) -> Option<usize> {
    rules
        .iter()
        .position(|r| reference_match(r.pattern.as_bytes(), key))
}

/// Bytes keys are made of: pattern characters, a separator, a newline and a non-UTF-8 byte.
const KEY_BYTES: [u8; 6] = [b'a', b'b', b':', b'/', b'\n', 0xFF];

/// Every key of up to `max_len` bytes over `alphabet`.
fn all_keys(alphabet: &[u8], max_len: usize) -> Vec<Vec<u8>> {
    let mut keys = vec![Vec::new()];
    let mut layer = vec![Vec::new()];
    for _ in 0..max_len {
        layer = layer
            .iter()
            .flat_map(|k: &Vec<u8>| {
                alphabet.iter().map(move |&b| {
                    let mut k = k.clone();
                    k.push(b);
                    k
                })
            })
            .collect();
        keys.extend(layer.iter().cloned());
    }
    keys
}

fn mode() -> impl Strategy<Value = Mode> {
    prop::sample::select(Mode::ALL.to_vec())
}

/// Patterns of literals and `*` over a small alphabet, so rules overlap and shadow each other
/// often. (`/` is left out: next to `**` it has path meaning, which the reference ignores.)
fn simple_pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("*".to_owned()),
        8 => prop::collection::vec(prop::sample::select(vec!["a", "b", ":", "ab", "*"]), 1..=4)
            .prop_map(|parts| parts.concat()),
    ]
}

/// Richer globs (classes, alternations, `?`, `**` around `/`, escapes), checked against
/// globset itself rather than the reference.
fn rich_pattern() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "a", "b", ":", "/", "ab", "*", "**", "?", "[ab]", "{a,b:}", "\\*",
        ]),
        1..=4,
    )
    .prop_map(|parts| parts.concat())
}

fn rules_of(pattern: impl Strategy<Value = String>) -> impl Strategy<Value = Vec<Rule>> {
    prop::collection::vec((pattern, mode()).prop_map(|(p, m)| Rule::new(p, m)), 0..=7)
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(KEY_BYTES.to_vec()), 0..=7)
}

/// Keys a `*`-pattern certainly matches: each `*` replaced by one of a few fillers.
fn witnesses(pattern: &str) -> Vec<Vec<u8>> {
    let fillers: [&[u8]; 4] = [b"", b"a", b":/\xff", b"b\nab"];
    fillers
        .iter()
        .map(|fill| {
            let mut key = Vec::new();
            for &b in pattern.as_bytes() {
                if b == b'*' {
                    key.extend_from_slice(fill);
                } else {
                    key.push(b);
                }
            }
            key
        })
        .collect()
}

fn shadowed_rules(set: &RuleSet) -> Vec<usize> {
    set.validate()
        .into_iter()
        .map(|p| match p.kind {
            ProblemKind::Shadowed { by, .. } => {
                assert!(by < p.rule_index);
                p.rule_index
            }
            other => panic!("generated rules must be valid, got {other:?}"),
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// `resolve` picks the first matching rule, exactly as the reference does, for keys
    /// including separators, newlines and non-UTF-8 bytes.
    #[test]
    fn resolve_is_first_match(
        rules in rules_of(simple_pattern()),
        default in mode(),
        keys in prop::collection::vec(key(), 1..32),
    ) {
        let set = RuleSet { version: 3, rules, default_mode: default };
        let compiled = set.compile().unwrap();
        let witness_keys: Vec<Vec<u8>> =
            set.rules.iter().flat_map(|r| witnesses(&r.pattern)).collect();
        for key in keys.iter().chain(&witness_keys) {
            let got = compiled.resolve(key);
            let want = reference_resolve(&set.rules, key);
            prop_assert_eq!(got.rule_index, want, "key {:?}", key);
            match want {
                Some(i) => prop_assert_eq!(got.mode, set.rules[i].mode),
                None => prop_assert_eq!(got.mode, default),
            }
        }
    }

    /// A shadow warning is never wrong: no key the reference says the rule matches reaches it,
    /// because an earlier rule matches first.
    #[test]
    fn shadow_warnings_are_sound(rules in rules_of(simple_pattern()), keys in prop::collection::vec(key(), 1..32)) {
        let set = RuleSet { version: 1, rules, default_mode: Mode::Hybrid };
        let compiled = set.compile().unwrap();
        for j in shadowed_rules(&set) {
            for key in keys.iter().chain(&witnesses(&set.rules[j].pattern)) {
                let first = reference_resolve(&set.rules, key);
                prop_assert!(first.is_none_or(|i| i != j), "rule {} reached by {:?}", j, key);
                prop_assert_ne!(compiled.resolve(key).rule_index, Some(j));
                if reference_match(set.rules[j].pattern.as_bytes(), key) {
                    prop_assert!(first.is_some_and(|i| i < j));
                }
            }
        }
    }

    /// The same for the full glob syntax, with globset (through `resolve`) as the oracle and
    /// every short key over the alphabet as input.
    #[test]
    fn shadow_warnings_are_sound_for_rich_globs(rules in rules_of(rich_pattern())) {
        let set = RuleSet { version: 1, rules, default_mode: Mode::Hybrid };
        let compiled = match set.compile() {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let shadowed = shadowed_rules(&set);
        if !shadowed.is_empty() {
            for key in all_keys(b"ab:/*", 4) {
                let got = compiled.resolve(&key).rule_index;
                prop_assert!(got.is_none_or(|i| !shadowed.contains(&i)), "key {:?} reached a shadowed rule", key);
            }
        }
    }

    /// An update must name the current version; it then yields exactly version + 1.
    #[test]
    fn replace_bumps_the_version_or_refuses(
        version in 0u64..u64::MAX,
        expected in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
        rules in rules_of(simple_pattern()),
        default in mode(),
    ) {
        let current = RuleSet { version, rules: vec![], default_mode: Mode::Hybrid };
        let expected = expected.unwrap_or(version);
        match current.replace(expected, rules.clone(), default) {
            Ok(next) => {
                prop_assert_eq!(expected, version);
                prop_assert_eq!(next.version, version + 1);
                prop_assert_eq!(next.rules, rules);
                prop_assert_eq!(next.default_mode, default);
            }
            Err(err) => {
                prop_assert_ne!(expected, version);
                prop_assert_eq!(err, RulesError::VersionMismatch { current: version, expected });
            }
        }
    }
}

#[test]
fn reference_matcher_sanity() {
    assert!(reference_match(b"a*b", b"a:/\nb"));
    assert!(reference_match(b"*", b""));
    assert!(reference_match(b"**", b"\xff"));
    assert!(!reference_match(b"a*b", b"ba"));
    assert!(!reference_match(b"ab", b"abc"));
    assert_eq!(all_keys(b"ab", 2).len(), 7);
}
