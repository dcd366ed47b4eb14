//! Safety rules: which mode, type and bounds apply to a key (DESIGN.md section 3).
//!
//! Operators choose per key how much coordination they pay for. They do it with an ordered
//! list of rules `(pattern, mode, optional type and bounds)`; the first rule whose pattern
//! matches a key wins, and a required default mode covers keys no rule matches. The list is a
//! [`RuleSet`]: plain data, serde-serialisable so it can be read from TOML/JSON and stored in the
//! metadata Raft group (group 0) with a version number. An update names the version it replaces
//! ([`RuleSet::replace`]), so two operators editing at once cannot silently overwrite each other.
//!
//! This module owns:
//! - validation ([`RuleSet::validate`]): errors that make a rule set unusable (a bad glob, bounds
//!   on a type that has none, ...) and warnings for rules an earlier rule makes unreachable;
//! - compilation into [`CompiledRules`], whose [`CompiledRules::resolve`] is on every op's hot
//!   path and therefore allocation-free and deterministic;
//! - [`CompiledRules::explain`], the text behind `calm rules explain KEY`. The node adds the
//!   key's Raft group and leader to that answer; the kernel knows neither.
//!
//! # Pattern syntax
//!
//! Globs (the `globset` crate) matched against the key's raw bytes, with `*` crossing every
//! character, `:` and `/` included (`literal_separator(false)`):
//!
//! - `*` matches any run of bytes, including bytes that are not UTF-8 and newlines; `*` and `**`
//!   alone match every key, binary keys included.
//! - `?` matches exactly one *byte* (one ASCII character; a multi-byte UTF-8 character needs
//!   `*` or one `?` per byte).
//! - `[abc]`, `[a-z]`, `[!a]`, `{stock,cart}:*` and `\*` (a literal star) work as usual.
//! - `**` next to a `/` keeps its gitignore meaning (`a/**/b` matches `a/b` and `a/x/y/b`).
//!
//! Matching the bytes (rather than only UTF-8 keys) means a binary key `stock:\xff` follows the
//! `stock:*` rule like any other stock key, which is what an operator writing that rule means.

use crate::value::{Bounds, Mode, ValueType};
use globset::{Candidate, GlobBuilder, GlobMatcher};
use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// One rule: keys matching `pattern` get `mode`, and (optionally) a fixed type and bounds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub pattern: String,
    pub mode: Mode,
    /// Fixes the type of matching keys; `None` lets the key's first write decide.
    #[serde(
        rename = "type",
        alias = "value_type",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub value_type: Option<ValueType>,
    /// Required for, and only allowed with, `type = "bounded_counter"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounds: Option<Bounds>,
}

impl Rule {
    pub fn new(pattern: impl Into<String>, mode: Mode) -> Rule {
        Rule {
            pattern: pattern.into(),
            mode,
            value_type: None,
            bounds: None,
        }
    }

    pub fn with_type(mut self, value_type: ValueType) -> Rule {
        self.value_type = Some(value_type);
        self
    }

    /// Makes matching keys bounded counters within `bounds`.
    pub fn bounded(mut self, bounds: Bounds) -> Rule {
        self.value_type = Some(ValueType::BoundedCounter);
        self.bounds = Some(bounds);
        self
    }
}

/// The ordered rules plus the default, at a version. Version 0 is the built-in initial set
/// (no rules); every accepted update adds one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Mode of keys no rule matches. Required in files: the operator must say it.
    pub default_mode: Mode,
}

impl Default for RuleSet {
    fn default() -> RuleSet {
        RuleSet::new(Mode::default())
    }
}

impl RuleSet {
    /// Version 0, no rules.
    pub fn new(default_mode: Mode) -> RuleSet {
        RuleSet {
            version: 0,
            rules: Vec::new(),
            default_mode,
        }
    }

    /// Every problem of the rule set, errors first per rule, in rule order. Errors make
    /// [`RuleSet::compile`] refuse; warnings do not.
    pub fn validate(&self) -> Vec<RuleProblem> {
        self.analyse().1
    }

    /// Compile for matching. Refuses a rule set with errors; warnings are kept in
    /// [`CompiledRules::warnings`].
    pub fn compile(&self) -> Result<CompiledRules, RulesError> {
        let (globs, problems) = self.analyse();
        if problems.iter().any(RuleProblem::is_error) {
            return Err(RulesError::Invalid {
                problems: problems.into_iter().filter(RuleProblem::is_error).collect(),
            });
        }
        let matchers = self
            .rules
            .iter()
            .zip(globs)
            .map(|(rule, glob)| {
                Matcher::new(
                    &rule.pattern,
                    glob.expect("a rule set without errors has a glob per rule"),
                )
            })
            .collect();
        Ok(CompiledRules {
            set: self.clone(),
            matchers,
            warnings: problems,
        })
    }

    /// The rule set that replaces this one: `new_rules` and `new_default` at `version + 1`.
    ///
    /// `expected_version` is the version the author read before editing; if the rules moved
    /// on since, the update is refused rather than silently undoing someone else's change.
    /// The new rules must be free of errors (warnings are fine), so group 0 never stores a
    /// rule set that nodes cannot compile.
    pub fn replace(
        &self,
        expected_version: u64,
        new_rules: Vec<Rule>,
        new_default: Mode,
    ) -> Result<RuleSet, RulesError> {
        if expected_version != self.version {
            return Err(RulesError::VersionMismatch {
                current: self.version,
                expected: expected_version,
            });
        }
        let version = self
            .version
            .checked_add(1)
            .ok_or(RulesError::VersionExhausted)?;
        let next = RuleSet {
            version,
            rules: new_rules,
            default_mode: new_default,
        };
        let errors: Vec<RuleProblem> = next
            .validate()
            .into_iter()
            .filter(RuleProblem::is_error)
            .collect();
        if !errors.is_empty() {
            return Err(RulesError::Invalid { problems: errors });
        }
        Ok(next)
    }

    /// Compile every glob and collect problems. The glob of a rule with an error is `None`.
    fn analyse(&self) -> (Vec<Option<GlobMatcher>>, Vec<RuleProblem>) {
        let mut globs: Vec<Option<GlobMatcher>> = Vec::with_capacity(self.rules.len());
        let mut problems = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            let problem = |kind| RuleProblem {
                rule_index: index,
                pattern: rule.pattern.clone(),
                kind,
            };
            let glob = if rule.pattern.is_empty() {
                problems.push(problem(ProblemKind::EmptyPattern));
                None
            } else {
                match build_glob(&rule.pattern) {
                    Ok(glob) => Some(glob),
                    Err(err) => {
                        problems.push(problem(ProblemKind::InvalidGlob {
                            reason: err.kind().to_string(),
                        }));
                        None
                    }
                }
            };
            match (rule.value_type, rule.bounds) {
                (Some(ValueType::BoundedCounter), None) => {
                    problems.push(problem(ProblemKind::BoundedCounterWithoutBounds));
                }
                (Some(ValueType::BoundedCounter), Some(bounds)) if bounds.min > bounds.max => {
                    problems.push(problem(ProblemKind::InvertedBounds { bounds }));
                }
                (Some(ValueType::BoundedCounter), Some(_)) | (_, None) => {}
                (value_type, Some(bounds)) => {
                    problems.push(problem(ProblemKind::BoundsWithoutBoundedCounter {
                        value_type,
                        bounds,
                    }));
                }
            }
            if glob.is_some() {
                let shadow = (0..index).find_map(|earlier| {
                    let by = globs[earlier].as_ref()?;
                    let reason = shadows(&self.rules[earlier].pattern, by, &rule.pattern)?;
                    Some((earlier, reason))
                });
                if let Some((by, reason)) = shadow {
                    problems.push(problem(ProblemKind::Shadowed {
                        by,
                        by_pattern: self.rules[by].pattern.clone(),
                        identical: reason == Shadow::Identical,
                    }));
                }
            }
            globs.push(glob);
        }
        (globs, problems)
    }
}

fn build_glob(pattern: &str) -> Result<GlobMatcher, globset::Error> {
    // Every option spelled out: the defaults of some differ by platform (backslash escapes
    // are off on Windows), and all nodes must agree on what a pattern means.
    GlobBuilder::new(pattern)
        .literal_separator(false)
        .backslash_escape(true)
        .case_insensitive(false)
        .empty_alternates(false)
        .build()
        .map(|glob| glob.compile_matcher())
}

/// Characters that may make a pattern more than a literal. Some (`]`, `}`, `,`) are literal
/// outside a class or alternation; counting them anyway only makes the shadow analysis
/// (and the fast paths) more conservative, never wrong.
const GLOB_META: &[char] = &['*', '?', '[', ']', '{', '}', '\\', ','];

fn is_literal(pattern: &str) -> bool {
    !pattern.contains(GLOB_META)
}

/// The characters before the first metacharacter: every key the pattern matches starts with
/// these bytes.
fn literal_prefix(pattern: &str) -> &str {
    pattern.find(GLOB_META).map_or(pattern, |at| &pattern[..at])
}

fn is_catch_all(pattern: &str) -> bool {
    pattern == "*" || pattern == "**"
}

/// `P*` with `P` literal: matches exactly the keys starting with `P`.
fn prefix_star(pattern: &str) -> Option<&str> {
    pattern.strip_suffix('*').filter(|p| is_literal(p))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shadow {
    Identical,
    Covers,
}

/// Whether the earlier pattern matches every key the later one matches. Sound, not complete:
/// only cases provable from the pattern text are reported (a false warning would send an
/// operator to delete a live rule).
fn shadows(earlier: &str, earlier_glob: &GlobMatcher, later: &str) -> Option<Shadow> {
    if earlier == later {
        return Some(Shadow::Identical);
    }
    if is_catch_all(earlier) {
        return Some(Shadow::Covers);
    }
    if let Some(prefix) = prefix_star(earlier)
        && literal_prefix(later).starts_with(prefix)
    {
        return Some(Shadow::Covers);
    }
    if is_literal(later) && earlier_glob.is_match_candidate(&Candidate::from_bytes(later)) {
        return Some(Shadow::Covers);
    }
    None
}

/// How one compiled pattern is matched. The common shapes skip the regex engine; they are
/// exactly equivalent to the glob (see `fast_paths_agree_with_globset`).
#[derive(Clone, Debug)]
enum Matcher {
    /// `*` or `**`.
    Any,
    /// No metacharacters: the key equals the pattern.
    Exact(Box<[u8]>),
    /// Literal then one trailing `*`.
    Prefix(Box<[u8]>),
    Glob(GlobMatcher),
}

impl Matcher {
    fn new(pattern: &str, glob: GlobMatcher) -> Matcher {
        if is_catch_all(pattern) {
            Matcher::Any
        } else if is_literal(pattern) {
            Matcher::Exact(pattern.as_bytes().into())
        } else if let Some(prefix) = prefix_star(pattern) {
            Matcher::Prefix(prefix.as_bytes().into())
        } else {
            Matcher::Glob(glob)
        }
    }

    fn is_match(&self, key: &[u8]) -> bool {
        match self {
            Matcher::Any => true,
            Matcher::Exact(literal) => key == &literal[..],
            Matcher::Prefix(prefix) => key.starts_with(prefix),
            // `from_bytes` borrows the key: no allocation, no UTF-8 requirement.
            Matcher::Glob(glob) => glob.is_match_candidate(&Candidate::from_bytes(key)),
        }
    }
}

/// A validated rule set ready for matching. Cheap to clone relative to how rarely rules change.
#[derive(Clone, Debug)]
pub struct CompiledRules {
    set: RuleSet,
    matchers: Vec<Matcher>,
    warnings: Vec<RuleProblem>,
}

impl Default for CompiledRules {
    /// The initial rules: version 0, no rules, default mode hybrid.
    fn default() -> CompiledRules {
        RuleSet::default()
            .compile()
            .expect("an empty rule set has no errors")
    }
}

/// What applies to one key. `rule_index` is 0-based; `None` means the default applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Resolved {
    pub rule_index: Option<usize>,
    pub mode: Mode,
    pub value_type: Option<ValueType>,
    pub bounds: Option<Bounds>,
}

impl CompiledRules {
    /// The first rule matching `key`, or the default. Allocation-free: rules are tried in
    /// order; literal, prefix and catch-all patterns are byte comparisons, others one regex
    /// search over the borrowed key.
    pub fn resolve(&self, key: &[u8]) -> Resolved {
        for (index, (rule, matcher)) in self.set.rules.iter().zip(&self.matchers).enumerate() {
            if matcher.is_match(key) {
                return Resolved {
                    rule_index: Some(index),
                    mode: rule.mode,
                    value_type: rule.value_type,
                    bounds: rule.bounds,
                };
            }
        }
        Resolved {
            rule_index: None,
            mode: self.set.default_mode,
            value_type: None,
            bounds: None,
        }
    }

    /// `resolve` with the reasons spelled out, for `calm rules explain KEY`.
    pub fn explain(&self, key: &[u8]) -> Explanation {
        let resolved = self.resolve(key);
        Explanation {
            key: key.to_vec(),
            rules_version: self.set.version,
            rule_index: resolved.rule_index,
            pattern: resolved.rule_index.map_or_else(
                || "default".to_owned(),
                |i| self.set.rules[i].pattern.clone(),
            ),
            mode: resolved.mode,
            value_type: resolved.value_type,
            bounds: resolved.bounds,
        }
    }

    /// The source rules.
    pub fn rule_set(&self) -> &RuleSet {
        &self.set
    }

    pub fn version(&self) -> u64 {
        self.set.version
    }

    pub fn default_mode(&self) -> Mode {
        self.set.default_mode
    }

    /// Validation warnings (shadowed rules) found at compile time.
    pub fn warnings(&self) -> &[RuleProblem] {
        &self.warnings
    }
}

/// Why a key gets its mode, type and bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub key: Vec<u8>,
    pub rules_version: u64,
    /// 0-based index of the matching rule; `None` when the default applied.
    pub rule_index: Option<usize>,
    /// The matching rule's pattern, or `"default"`.
    pub pattern: String,
    pub mode: Mode,
    pub value_type: Option<ValueType>,
    pub bounds: Option<Bounds>,
}

impl fmt::Display for Explanation {
    /// `key 'stock:42' matches rule #2 'stock:*': mode hybrid, type bounded counter, bounds [0, 100]`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = KeyText(&self.key);
        match self.rule_index {
            Some(i) => write!(
                f,
                "key '{key}' matches rule #{} '{}': ",
                i + 1,
                self.pattern
            )?,
            None => write!(f, "key '{key}' matches no rule, so the default applies: ")?,
        }
        write!(f, "mode {}, ", self.mode)?;
        match self.value_type {
            Some(ty) => write!(f, "type {ty}")?,
            None => f.write_str("type set by the key's first write")?,
        }
        if let Some(bounds) = self.bounds {
            write!(f, ", bounds {bounds}")?;
        }
        Ok(())
    }
}

/// Keys are bytes: printable UTF-8 as is, anything else byte-escaped.
struct KeyText<'a>(&'a [u8]);

impl fmt::Display for KeyText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(self.0) {
            Ok(s) if !s.chars().any(char::is_control) => f.write_str(s),
            _ => write!(f, "{}", self.0.escape_ascii()),
        }
    }
}

/// One problem found by [`RuleSet::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleProblem {
    /// 0-based; messages say `#(index + 1)`, as users count.
    pub rule_index: usize,
    pub pattern: String,
    pub kind: ProblemKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Severity {
    /// The rule set cannot be used.
    Error,
    /// Usable, but probably not what the operator meant.
    Warning,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    EmptyPattern,
    InvalidGlob {
        reason: String,
    },
    /// Bounds on a rule whose type is not bounded counter (or has no type).
    BoundsWithoutBoundedCounter {
        value_type: Option<ValueType>,
        bounds: Bounds,
    },
    BoundedCounterWithoutBounds,
    /// `min > max` (possible only in deserialised bounds; `Bounds::new` refuses it).
    InvertedBounds {
        bounds: Bounds,
    },
    /// An earlier rule (`by`, 0-based) matches every key this one matches.
    Shadowed {
        by: usize,
        by_pattern: String,
        identical: bool,
    },
}

impl RuleProblem {
    pub fn severity(&self) -> Severity {
        match self.kind {
            ProblemKind::Shadowed { .. } => Severity::Warning,
            _ => Severity::Error,
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity() == Severity::Error
    }
}

impl fmt::Display for RuleProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.rule_index + 1;
        let pattern = &self.pattern;
        match &self.kind {
            ProblemKind::EmptyPattern => write!(
                f,
                "rule #{n} has an empty pattern, which matches no key; write a glob such as \
                 'stock:*', or '*' for every key"
            ),
            ProblemKind::InvalidGlob { reason } => write!(
                f,
                "rule #{n} '{pattern}' is not a valid glob: {reason}; fix the pattern (a \
                 backslash makes a metacharacter literal, e.g. '\\*')"
            ),
            ProblemKind::BoundsWithoutBoundedCounter { value_type, bounds } => {
                write!(f, "rule #{n} '{pattern}' gives bounds {bounds} but ")?;
                match value_type {
                    Some(ty) => write!(f, "makes keys {}", ty.with_article())?,
                    None => f.write_str("fixes no type")?,
                }
                f.write_str(
                    "; only bounded counters have bounds: set type = \"bounded_counter\" or \
                     remove the bounds",
                )
            }
            ProblemKind::BoundedCounterWithoutBounds => write!(
                f,
                "rule #{n} '{pattern}' makes keys bounded counters but gives no bounds; add \
                 bounds = {{ min = ..., max = ... }}"
            ),
            ProblemKind::InvertedBounds { bounds } => write!(
                f,
                "rule #{n} '{pattern}' has bounds with min {} greater than max {}; swap them",
                bounds.min, bounds.max
            ),
            ProblemKind::Shadowed {
                by,
                by_pattern,
                identical,
            } => {
                let m = by + 1;
                if *identical {
                    write!(
                        f,
                        "rule #{n} '{pattern}' can never match: rule #{m} has the same pattern \
                         and comes first; remove one of them"
                    )
                } else {
                    write!(
                        f,
                        "rule #{n} '{pattern}' can never match: rule #{m} '{by_pattern}' matches \
                         every key it matches; move it above rule #{m} or remove it"
                    )
                }
            }
        }
    }
}

/// Why a rule set or an update was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RulesError {
    /// `problems` holds the errors only (no warnings).
    #[error("{}", invalid_message(.problems))]
    Invalid { problems: Vec<RuleProblem> },
    #[error(
        "rules are at version {current}, the update expected {expected}; re-read the rules and \
         retry"
    )]
    VersionMismatch { current: u64, expected: u64 },
    #[error("rules version is at its maximum (u64::MAX); no further update can be versioned")]
    VersionExhausted,
}

fn invalid_message(problems: &[RuleProblem]) -> String {
    let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
    format!(
        "the rules were not accepted: {} {}: {}. Fix them and submit the rules again",
        problems.len(),
        if problems.len() == 1 {
            "error"
        } else {
            "errors"
        },
        list.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(min: i64, max: i64) -> Bounds {
        Bounds { min, max }
    }

    fn set(rules: Vec<Rule>) -> RuleSet {
        RuleSet {
            version: 1,
            rules,
            default_mode: Mode::Hybrid,
        }
    }

    fn messages(rules: Vec<Rule>) -> Vec<String> {
        set(rules)
            .validate()
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn first_match_wins_and_default_covers_the_rest() {
        let rules = set(vec![
            Rule::new("stock:vip:*", Mode::Strict),
            Rule::new("stock:*", Mode::Hybrid).bounded(bounds(0, 100)),
            Rule::new("cache:*", Mode::Available).with_type(ValueType::Register),
        ])
        .compile()
        .unwrap();
        let r = rules.resolve(b"stock:vip:1");
        assert_eq!(
            (r.rule_index, r.mode, r.value_type),
            (Some(0), Mode::Strict, None)
        );
        let r = rules.resolve(b"stock:42");
        assert_eq!(
            r,
            Resolved {
                rule_index: Some(1),
                mode: Mode::Hybrid,
                value_type: Some(ValueType::BoundedCounter),
                bounds: Some(bounds(0, 100)),
            }
        );
        assert_eq!(rules.resolve(b"cache:a/b").mode, Mode::Available);
        let r = rules.resolve(b"users:1");
        assert_eq!(r.rule_index, None);
        assert_eq!(r.mode, Mode::Hybrid);
        assert!(rules.warnings().is_empty());
    }

    #[test]
    fn star_crosses_separators_and_binary_bytes() {
        let rules = set(vec![
            Rule::new("a*z", Mode::Strict),
            Rule::new("b?", Mode::Strict),
            Rule::new("{x,y}:[0-9]*", Mode::Strict),
            Rule::new("lit\\*", Mode::Strict),
        ])
        .compile()
        .unwrap();
        assert_eq!(rules.resolve(b"a:/\n\xffz").rule_index, Some(0));
        assert_eq!(rules.resolve(b"b\xff").rule_index, Some(1));
        assert_eq!(
            rules.resolve(b"b\xc3\xa9").rule_index,
            None,
            "? is one byte"
        );
        assert_eq!(rules.resolve(b"y:7abc").rule_index, Some(2));
        assert_eq!(rules.resolve(b"z:7").rule_index, None);
        assert_eq!(rules.resolve(b"lit*").rule_index, Some(3));
        assert_eq!(rules.resolve(b"litx").rule_index, None);
    }

    #[test]
    fn fast_paths_agree_with_globset() {
        let patterns = ["*", "**", "abc", "ab*", "", "a:b/c*", "caf\u{e9}*", "x,y"];
        let keys: [&[u8]; 10] = [
            b"",
            b"a",
            b"ab",
            b"abc",
            b"abcd",
            b"ab\n\xff",
            b"a:b/c",
            b"a:b/c/d",
            "caf\u{e9}!".as_bytes(),
            b"x,y",
        ];
        for pattern in patterns {
            let glob = build_glob(pattern).unwrap();
            let matcher = Matcher::new(pattern, glob.clone());
            for key in keys {
                assert_eq!(
                    matcher.is_match(key),
                    glob.is_match_candidate(&Candidate::from_bytes(key)),
                    "pattern {pattern:?} key {key:?}"
                );
            }
        }
    }

    #[test]
    fn explain_names_the_rule_and_what_it_sets() {
        let rules = set(vec![
            Rule::new("cache:*", Mode::Available),
            Rule::new("stock:*", Mode::Hybrid).bounded(bounds(0, 100)),
        ])
        .compile()
        .unwrap();
        let e = rules.explain(b"stock:42");
        assert_eq!(e.rule_index, Some(1));
        assert_eq!(e.pattern, "stock:*");
        assert_eq!(e.rules_version, 1);
        assert_eq!(
            e.to_string(),
            "key 'stock:42' matches rule #2 'stock:*': mode hybrid, type bounded counter, \
             bounds [0, 100]"
        );
        assert_eq!(
            rules.explain(b"cache:x").to_string(),
            "key 'cache:x' matches rule #1 'cache:*': mode available, type set by the key's \
             first write"
        );
        let e = rules.explain(b"user\x00\xff");
        assert_eq!(e.pattern, "default");
        assert_eq!(
            e.to_string(),
            "key 'user\\x00\\xff' matches no rule, so the default applies: mode hybrid, type set \
             by the key's first write"
        );
    }

    #[test]
    fn empty_pattern_is_an_error() {
        let problems = set(vec![Rule::new("", Mode::Strict)]).validate();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].kind, ProblemKind::EmptyPattern);
        assert!(problems[0].is_error());
        assert!(
            problems[0]
                .to_string()
                .starts_with("rule #1 has an empty pattern")
        );
    }

    #[test]
    fn invalid_glob_is_an_error_that_names_the_rule() {
        let msgs = messages(vec![
            Rule::new("ok:*", Mode::Strict),
            Rule::new("stock:{a,b", Mode::Strict),
        ]);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(
            msgs[0].starts_with("rule #2 'stock:{a,b' is not a valid glob: "),
            "{}",
            msgs[0]
        );
        assert!(msgs[0].contains("unclosed alternate"), "{}", msgs[0]);
        let msgs = messages(vec![Rule::new("dangling\\", Mode::Strict)]);
        assert!(msgs[0].contains("dangling"), "{}", msgs[0]);
    }

    #[test]
    fn bounds_only_with_bounded_counters() {
        let problems = set(vec![
            Rule::new("a:*", Mode::Hybrid).with_type(ValueType::Counter),
            Rule::new("b:*", Mode::Hybrid),
        ])
        .validate();
        assert!(problems.is_empty());

        let mut counter = Rule::new("a:*", Mode::Hybrid).with_type(ValueType::Counter);
        counter.bounds = Some(bounds(0, 10));
        let mut untyped = Rule::new("b:*", Mode::Hybrid);
        untyped.bounds = Some(bounds(0, 10));
        let msgs = messages(vec![counter, untyped]);
        assert_eq!(
            msgs,
            vec![
                "rule #1 'a:*' gives bounds [0, 10] but makes keys a counter; only bounded \
                 counters have bounds: set type = \"bounded_counter\" or remove the bounds",
                "rule #2 'b:*' gives bounds [0, 10] but fixes no type; only bounded counters \
                 have bounds: set type = \"bounded_counter\" or remove the bounds",
            ]
        );
    }

    #[test]
    fn bounded_counter_needs_bounds() {
        let msgs = messages(vec![
            Rule::new("stock:*", Mode::Hybrid).with_type(ValueType::BoundedCounter),
        ]);
        assert_eq!(
            msgs,
            vec![
                "rule #1 'stock:*' makes keys bounded counters but gives no bounds; add bounds = \
                 { min = ..., max = ... }"
            ]
        );
    }

    #[test]
    fn inverted_bounds_from_a_file_are_caught() {
        let json = r#"{"default_mode":"hybrid","rules":[
            {"pattern":"stock:*","mode":"hybrid","type":"bounded_counter","bounds":{"min":10,"max":0}}]}"#;
        let rules: RuleSet = serde_json::from_str(json).unwrap();
        let problems = rules.validate();
        assert_eq!(
            problems[0].kind,
            ProblemKind::InvertedBounds {
                bounds: bounds(10, 0)
            }
        );
        assert_eq!(
            problems[0].to_string(),
            "rule #1 'stock:*' has bounds with min 10 greater than max 0; swap them"
        );
        let err = rules.compile().unwrap_err();
        assert_eq!(
            err.to_string(),
            "the rules were not accepted: 1 error: rule #1 'stock:*' has bounds with min 10 \
             greater than max 0; swap them. Fix them and submit the rules again"
        );
    }

    #[test]
    fn shadowing_is_a_warning_with_the_way_out() {
        let rules = set(vec![
            Rule::new("stock:*", Mode::Hybrid),     // #1
            Rule::new("cart:*", Mode::Hybrid),      // #2
            Rule::new("stock:42", Mode::Strict),    // #3 (d) and (c)
            Rule::new("stock:vip:?", Mode::Strict), // #4 (c)
            Rule::new("cart:*", Mode::Strict),      // #5 (a)
            Rule::new("c?rt:1", Mode::Strict),      // #6 not shadowed: prefix 'c'
            Rule::new("user:1", Mode::Strict),      // #7
            Rule::new("u*:1", Mode::Strict),        // #8 not shadowed
            Rule::new("user:[12]", Mode::Strict),   // #9 not shadowed (class, not literal)
            Rule::new("**", Mode::Strict),          // #10
            Rule::new("anything", Mode::Strict),    // #11 (b)
        ]);
        let problems = rules.validate();
        assert!(problems.iter().all(|p| p.severity() == Severity::Warning));
        let shadowed: Vec<(usize, usize)> = problems
            .iter()
            .map(|p| match p.kind {
                ProblemKind::Shadowed { by, .. } => (p.rule_index + 1, by + 1),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(shadowed, vec![(3, 1), (4, 1), (5, 2), (11, 10)]);
        assert_eq!(
            problems[0].to_string(),
            "rule #3 'stock:42' can never match: rule #1 'stock:*' matches every key it \
             matches; move it above rule #1 or remove it"
        );
        assert_eq!(
            problems[2].to_string(),
            "rule #5 'cart:*' can never match: rule #2 has the same pattern and comes first; \
             remove one of them"
        );
        // Warnings do not stop compilation, and are kept.
        let compiled = rules.compile().unwrap();
        assert_eq!(compiled.warnings().len(), 4);
    }

    #[test]
    fn literal_matched_by_an_earlier_glob_is_shadowed() {
        let problems = set(vec![
            Rule::new("{a,b}:[0-9]", Mode::Strict),
            Rule::new("b:7", Mode::Strict),
            Rule::new("b:x", Mode::Strict),
        ])
        .validate();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].rule_index, 1);
    }

    #[test]
    fn compile_refuses_errors_and_lists_them_all() {
        let err = set(vec![
            Rule::new("", Mode::Strict),
            Rule::new("a:*", Mode::Strict),
            Rule::new("a:1", Mode::Strict), // only a warning
            Rule::new("s:*", Mode::Strict).with_type(ValueType::BoundedCounter),
        ])
        .compile()
        .unwrap_err();
        match &err {
            RulesError::Invalid { problems } => {
                assert_eq!(problems.len(), 2);
                assert!(problems.iter().all(RuleProblem::is_error));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with("the rules were not accepted: 2 errors: rule #1")
        );
    }

    #[test]
    fn replace_names_the_version_it_replaces() {
        let v0 = RuleSet::default();
        assert_eq!(v0.version, 0);
        let v1 = v0
            .replace(0, vec![Rule::new("a:*", Mode::Strict)], Mode::Available)
            .unwrap();
        assert_eq!(v1.version, 1);
        assert_eq!(v1.default_mode, Mode::Available);
        let err = v1.replace(0, vec![], Mode::Hybrid).unwrap_err();
        assert_eq!(
            err,
            RulesError::VersionMismatch {
                current: 1,
                expected: 0
            }
        );
        let v7 = RuleSet {
            version: 7,
            ..v1.clone()
        };
        assert_eq!(
            v7.replace(6, vec![], Mode::Hybrid).unwrap_err().to_string(),
            "rules are at version 7, the update expected 6; re-read the rules and retry"
        );
        // An update with errors is refused even at the right version.
        let err = v1
            .replace(1, vec![Rule::new("", Mode::Strict)], Mode::Hybrid)
            .unwrap_err();
        assert!(matches!(err, RulesError::Invalid { .. }));
        let max = RuleSet {
            version: u64::MAX,
            ..v1
        };
        assert_eq!(
            max.replace(u64::MAX, vec![], Mode::Hybrid),
            Err(RulesError::VersionExhausted)
        );
    }

    #[test]
    fn serde_uses_type_and_refuses_unknown_fields() {
        let rules = set(vec![
            Rule::new("stock:*", Mode::Hybrid).bounded(bounds(0, 5)),
            Rule::new("*", Mode::Available),
        ]);
        let json = serde_json::to_string(&rules).unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"rules":[{"pattern":"stock:*","mode":"hybrid","type":"bounded_counter","bounds":{"min":0,"max":5}},{"pattern":"*","mode":"available"}],"default_mode":"hybrid"}"#
        );
        assert_eq!(serde_json::from_str::<RuleSet>(&json).unwrap(), rules);
        let typo = r#"{"default_mode":"hybrid","rules":[{"pattern":"a","mode":"strict","typ":"counter"}]}"#;
        assert!(serde_json::from_str::<RuleSet>(typo).is_err());
        let no_default = r#"{"rules":[]}"#;
        let err = serde_json::from_str::<RuleSet>(no_default).unwrap_err();
        assert!(err.to_string().contains("default_mode"), "{err}");
        let alias = r#"{"default_mode":"strict","rules":[{"pattern":"a","mode":"strict","value_type":"set"}]}"#;
        let parsed: RuleSet = serde_json::from_str(alias).unwrap();
        assert_eq!(parsed.version, 0);
        assert_eq!(parsed.rules[0].value_type, Some(ValueType::Set));
    }

    #[test]
    fn default_compiled_rules_are_the_initial_set() {
        let rules = CompiledRules::default();
        assert_eq!(rules.version(), 0);
        assert_eq!(rules.default_mode(), Mode::Hybrid);
        assert_eq!(rules.resolve(b"anything").rule_index, None);
        assert_eq!(rules.rule_set(), &RuleSet::default());
    }
}
