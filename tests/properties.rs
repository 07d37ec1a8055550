//! Property-based tests: fuzzing on stable Rust with `proptest`, against the public API of the
//! code that reads what clients and operators write.
//!
//! - Config: arbitrary bytes, YAML-ish token soup, random configs and mutations of the shipped
//!   `config/*.yaml` (truncations, byte flips, deep nesting, huge numbers, anchors) are parsed
//!   and validated without a panic; every failure is an error with problems. The nesting cap
//!   sees every flow collection the YAML scanner sees (it did not: see `depth_cap_regressions`).
//! - Paths: [`normalize::path`] never panics, its output is a normal form (idempotent, no `//`,
//!   no dot segments, no escaped unreserved character, upper-case hex), and two spellings of
//!   one resource give one normal form, one route and one bucket key.
//! - Keys: [`keys::derive`] never panics, never writes a raw client byte that is not printable
//!   ASCII or is a brace, keeps sources apart (`header:x-api-key|ip`, the anonymous mark), and
//!   refuses a repeated source with different values.
//! - X-Forwarded-For: [`keys::client_ip`] never panics, ignores the header from an untrusted
//!   peer and never takes an address left of an untrusted hop.
//! - Responses: the rate-limit headers and the 429 body are valid for any decision.
//!
//! Each property runs 256 cases (the whole file takes a few seconds); `PROPTEST_CASES` sets
//! another count: `PROPTEST_CASES=100000 cargo test --release --test properties`. Failures are
//! not written to `proptest-regressions/`: a bug found is kept as a plain `#[test]` next to the
//! property that found it.

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use tollgate::config;
use tollgate::keys::{self, Derived, KeySource, KeySpec, RequestView};
use tollgate::limiter::plan::{self, Decision, LimitStatus};
use tollgate::limiter::{BucketOutcome, CapacityExceeded, Policy, Rate};
use tollgate::normalize::{self, EscapedSlashes};
use tollgate::proxy::response;
use tollgate::routes::HeaderFlags;

/// 256 cases, or `PROPTEST_CASES`; no failure files.
fn cases() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Deterministic choices from a byte string that proptest generates and shrinks: an exhausted
/// (or shrunk to zero) string means "change nothing", so a failure shrinks to few changes.
struct Dice<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Dice<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Dice { bytes, at: 0 }
    }

    fn next(&mut self) -> u8 {
        let b = self.bytes.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    /// A number below `n` (0 when the dice are used up).
    fn below(&mut self, n: usize) -> usize {
        usize::from(self.next()) % n.max(1)
    }

    /// True one time in `n`, never when the dice are used up.
    fn one_in(&mut self, n: u8) -> bool {
        let b = self.next();
        b != 0 && b % n.max(1) == 0
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Config parsing and validation
// ---------------------------------------------------------------------------------------------

const SHIPPED: [(&str, &str); 3] = [
    ("gateway.yaml", include_str!("../config/gateway.yaml")),
    ("demo.yaml", include_str!("../config/demo.yaml")),
    ("compose.yaml", include_str!("../config/compose.yaml")),
];

/// Whether `ToSocketAddrs` would ask the resolver for this address: not a literal socket
/// address, but `HOST:PORT` with a valid port and no NUL.
fn needs_lookup(text: &str) -> bool {
    text.parse::<SocketAddr>().is_err()
        && !text.contains('\0')
        && text
            .rsplit_once(':')
            .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
}

/// Parses and validates `text` as `tollgate validate` does, and checks that a failure is an
/// error with problems. Validation resolves host names in listen addresses; a mutated file
/// that names a host there (`127.0.0.x:9901`) is validated with that address replaced by a
/// literal one, so that a fuzz run sends no DNS queries. The rest of `config::parse` (caps,
/// YAML, model, locations) runs as it is.
fn parse_checked(text: &str) -> Result<(), TestCaseError> {
    use tollgate::config::{limits, locate, model, raw::RawConfig};
    if limits::check(text).is_ok() {
        if let Ok(mut raw) = serde_yaml_ng::from_str::<RawConfig>(text) {
            let mut rewritten = false;
            let admin_listen = raw.admin.as_mut().and_then(|a| a.listen.as_mut());
            let listen = raw.listen.iter_mut().flatten().map(|l| match l {
                tollgate::config::raw::RawListen::Plain(text) => text,
                tollgate::config::raw::RawListen::Full(full) => &mut full.address,
            });
            for addr in listen.chain(admin_listen) {
                if needs_lookup(addr) {
                    *addr = "127.0.0.1:1".to_string();
                    rewritten = true;
                }
            }
            if rewritten {
                if let Err(problems) = model::build(raw) {
                    prop_assert!(!problems.is_empty());
                    let found = locate::locate(text);
                    for p in &problems {
                        prop_assert!(!p.message.is_empty(), "{p:?}");
                        let _ = locate::lookup(&found, &p.path);
                    }
                }
                return Ok(());
            }
        }
    }
    match config::parse(text, "fuzz.yaml") {
        Ok(_) => Ok(()),
        Err(config::ConfigError::Invalid { file, problems }) => {
            prop_assert_eq!(file, "fuzz.yaml");
            prop_assert!(!problems.is_empty(), "an invalid config names its problems");
            for p in &problems {
                prop_assert!(!p.message.is_empty(), "{p:?}");
                prop_assert!(!p.to_string().is_empty());
            }
            Ok(())
        }
        Err(e) => Err(TestCaseError::fail(format!(
            "parse from text cannot fail so: {e}"
        ))),
    }
}

/// JSON string syntax is valid YAML double-quoted syntax.
fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|e| panic!("{e}"))
}

/// Any text, up to 32 characters of the whole Unicode range (`any::<String>()` is ten times
/// slower to generate in a debug build).
fn any_text() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..32).prop_map(String::from_iter)
}

/// Like [`any_text`], up to 400 characters.
fn any_long_text() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..400).prop_map(String::from_iter)
}

/// A YAML-ish line: indentation, maybe a sequence dash, a key from the config's vocabulary (or
/// not) and a value that is often odd (huge numbers, anchors, aliases, tags, flow openers).
fn yamlish_line() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "listen",
        "admin",
        "store",
        "redis",
        "urls",
        "routes",
        "name",
        "match",
        "path",
        "path_prefix",
        "path_regex",
        "upstream",
        "upstreams",
        "targets",
        "limits",
        "key",
        "rate",
        "burst",
        "cost",
        "overrides",
        "client_ip",
        "trusted_proxies",
        "ipv6_prefix",
        "server",
        "escaped_slashes",
        "<<",
        "? x",
        "",
        "\"q\"",
    ]);
    let odd = prop::sample::select(vec![
        "",
        "18446744073709551615",
        "18446744073709551616",
        "-1",
        "1e400",
        ".nan",
        "0x7fffffffffffffff",
        "99999999999999999999999999999999999999",
        "&a [x, *a]",
        "&a",
        "*a",
        "*missing",
        "!!binary aGk=",
        "!tag x",
        "|",
        ">-",
        "[",
        "{",
        "]",
        "[[[[[[[[[[[[[[[[[[[[",
        "{a: {b: {c: [1, 2, {d: e}]}}}",
        "\"unterminated",
        "'it''s'",
        "# comment",
        "---",
        "...",
        "\"10/s\"",
        "\"0.0.0.0:8080\"",
        "[\"ip\", \"header:x-api-key|ip\"]",
    ])
    .prop_map(str::to_string);
    let value = prop_oneof![
        6 => odd,
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any_text().prop_map(|s| quoted(&s)),
        1 => "[ -~]{0,20}",
    ];
    (0usize..12, any::<bool>(), key, value).prop_map(|(indent, dash, key, value)| {
        let dash = if dash { "- " } else { "" };
        if key.is_empty() {
            format!("{}{dash}{value}", " ".repeat(indent))
        } else {
            format!("{}{dash}{key}: {value}", " ".repeat(indent))
        }
    })
}

fn yamlish() -> impl Strategy<Value = String> {
    let newline = prop::sample::select(vec!["\n", "\r\n", "\r"]);
    (prop::collection::vec(yamlish_line(), 0..40), newline)
        .prop_map(|(lines, newline)| lines.join(newline))
}

/// A whole config, well-formed YAML whose values are random: reaches validation (key parts,
/// rates, overrides, regexes, addresses) rather than stopping at the YAML parser.
fn random_config() -> impl Strategy<Value = String> {
    let text = || {
        let known = prop::sample::select(vec![
            "ip",
            "header:x-api-key|ip",
            "path_param:id",
            "query:user",
            "literal:{x}",
            "#anonymous",
            "ip=1.2.3.4",
            "header:X-Api-Key=k",
            "10/s",
            "1000000/s",
            "1000001/s",
            "18446744073709551615/s",
            "1/d",
            "/a/%2e%2E/b",
            "^/r/(?P<id>[^/]+)$",
            "(",
            "a{99999}{99999}",
            "10.0.0.0/8",
            "::ffff:10.0.0.0/104",
            "127.0.0.1:8080",
        ])
        .prop_map(str::to_string);
        prop_oneof![4 => known, 2 => any_text(), 1 => "[ -~]{0,24}"].prop_map(|s| quoted(&s))
    };
    let number = || {
        prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            (0u64..300).prop_map(|n| n.to_string()),
            prop::sample::select(vec!["-1", "18446744073709551616", "1e400", "\"5\""])
                .prop_map(str::to_string),
        ]
    };
    let limit = (
        text(),
        prop::collection::vec(text(), 0..3),
        text(),
        number(),
        number(),
        prop::option::of(text()),
        prop::option::of(prop::sample::select(vec!["skip", "deny", "anonymous", "bogus"])),
        prop::collection::vec((text(), text(), number()), 0..3),
    )
        .prop_map(
            |(name, key, rate, burst, cost, cost_header, on_missing, overrides)| {
                let mut out = format!(
                    "      - name: {name}\n        key: [{}]\n        rate: {rate}\n        burst: {burst}\n        cost: {cost}\n",
                    key.join(", ")
                );
                if let Some(h) = cost_header {
                    out.push_str(&format!("        cost_header: {h}\n"));
                }
                if let Some(m) = on_missing {
                    out.push_str(&format!("        on_missing_key: {m}\n"));
                }
                if !overrides.is_empty() {
                    out.push_str("        overrides:\n");
                    for (value, rate, burst) in overrides {
                        out.push_str(&format!(
                            "          {value}: {{ rate: {rate}, burst: {burst} }}\n"
                        ));
                    }
                }
                out
            },
        );
    let route = (
        text(),
        prop::sample::select(vec!["path", "path_prefix", "path_regex"]),
        text(),
        prop::option::of(text()),
        prop::collection::vec(limit, 0..3),
    )
        .prop_map(|(name, kind, path, host, limits)| {
            let host = host.map(|h| format!(", host: {h}")).unwrap_or_default();
            format!(
                "  - name: {name}\n    match: {{ {kind}: {path}{host} }}\n    upstream: app\n    limits:\n{}",
                if limits.is_empty() { "      []\n".to_string() } else { limits.concat() }
            )
        });
    (
        prop::collection::vec(text(), 0..3),
        prop::collection::vec(text(), 0..3),
        number(),
        prop::option::of(text()),
        prop::collection::vec(route, 0..4),
    )
        .prop_map(|(targets, trusted, prefix, slashes, routes)| {
            let slashes = slashes
                .map(|s| format!("server: {{ escaped_slashes: {s} }}\n"))
                .unwrap_or_default();
            format!(
                "upstreams:\n  app: {{ targets: [{}] }}\nclient_ip: {{ trusted_proxies: [{}], ipv6_prefix: {prefix} }}\n{slashes}routes:\n{}",
                targets.join(", "),
                trusted.join(", "),
                if routes.is_empty() { "  []\n".to_string() } else { routes.concat() }
            )
        })
}

/// One change to a file's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Flip(usize, u8),
    Delete(usize, usize),
    DuplicateLine(usize),
    Nest(usize, u8, usize),
    HugeNumber(usize, u8),
    Anchor(usize, usize),
    AliasBomb(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Flip(at, b)),
        (any::<usize>(), 1usize..40).prop_map(|(at, n)| Mutation::Delete(at, n)),
        any::<usize>().prop_map(Mutation::DuplicateLine),
        (any::<usize>(), any::<u8>(), 1usize..200).prop_map(|(at, k, n)| Mutation::Nest(at, k, n)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, k)| Mutation::HugeNumber(at, k)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Anchor(a, b)),
        (1usize..12).prop_map(Mutation::AliasBomb),
    ]
}

const HUGE: [&str; 6] = [
    "18446744073709551615",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "-9223372036854775809",
    "1e400",
    "0",
];

/// Start offsets of the matches of `needle` in `text`.
fn positions(text: &[u8], needle: &[u8]) -> Vec<usize> {
    text.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

fn mutate(text: &mut Vec<u8>, m: &Mutation) {
    let len = text.len().max(1);
    match *m {
        Mutation::Truncate(at) => text.truncate(at % len),
        Mutation::Flip(at, b) => {
            if let Some(byte) = text.get_mut(at % len) {
                *byte = b;
            }
        }
        Mutation::Delete(at, n) => {
            let start = (at % len).min(text.len());
            let end = (start + n).min(text.len());
            text.drain(start..end);
        }
        Mutation::DuplicateLine(at) => {
            let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
            let line = lines[at % lines.len()].to_vec();
            let start = (at % len).min(text.len());
            text.splice(start..start, line.into_iter().chain([b'\n']));
        }
        Mutation::Nest(at, kind, n) => {
            let nested: String = match kind % 4 {
                0 => format!("{}{}", "[".repeat(n), "]".repeat(n)),
                1 => format!("{}x{}", "{a: ".repeat(n), "}".repeat(n)),
                2 => format!("\n{}x\n", "- ".repeat(n)),
                _ => (0..n)
                    .map(|i| format!("\n{}k{i}:", " ".repeat(i)))
                    .collect(),
            };
            let start = (at % len).min(text.len());
            text.splice(start..start, nested.into_bytes());
        }
        Mutation::HugeNumber(at, k) => {
            let digits: Vec<usize> = (0..text.len())
                .filter(|&i| text[i].is_ascii_digit() && (i == 0 || !text[i - 1].is_ascii_digit()))
                .collect();
            if let Some(&start) = digits.get(at % digits.len().max(1)) {
                let end = (start..text.len())
                    .find(|&i| !text[i].is_ascii_digit())
                    .unwrap_or(text.len());
                let huge = HUGE[usize::from(k) % HUGE.len()];
                text.splice(start..end, huge.bytes());
            }
        }
        Mutation::Anchor(a, b) => {
            // `key: &x value` somewhere, `key: *x` somewhere else.
            let colons = positions(text, b": ");
            if colons.is_empty() {
                return;
            }
            let (first, second) = (colons[a % colons.len()], colons[b % colons.len()]);
            let (lo, lo_ins, hi, hi_ins) = if first <= second {
                (first, "&x ", second, "*x #")
            } else {
                (second, "*x #", first, "&x ")
            };
            text.splice(hi + 2..hi + 2, hi_ins.bytes());
            text.splice(lo + 2..lo + 2, lo_ins.bytes());
        }
        Mutation::AliasBomb(levels) => {
            let mut bomb = String::from("\nb0: &b0 [x, x, x, x, x, x, x, x, x, x]\n");
            for i in 1..levels {
                let refs = vec![format!("*b{}", i - 1); 10].join(", ");
                bomb.push_str(&format!("b{i}: &b{i} [{refs}]\n"));
            }
            text.extend_from_slice(bomb.as_bytes());
        }
    }
}

/// The mutations start from well-formed files, so that most mutants reach validation
/// (`tests/validate.rs` checks that the shipped files are valid).
#[test]
fn shipped_configs_are_well_formed_yaml_before_mutation() {
    for (name, text) in SHIPPED {
        if let Err(e) = serde_yaml_ng::from_str::<config::raw::RawConfig>(text) {
            panic!("{name}: {e}");
        }
    }
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn config_from_arbitrary_bytes_is_an_error_not_a_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        parse_checked(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn config_from_arbitrary_text_is_an_error_not_a_panic(text in any_long_text()) {
        parse_checked(&text)?;
    }

    #[test]
    fn config_from_yamlish_text_is_an_error_not_a_panic(text in yamlish()) {
        parse_checked(&text)?;
    }

    #[test]
    fn config_with_random_values_is_validated_not_a_panic(text in random_config()) {
        parse_checked(&text)?;
    }

    #[test]
    fn mutated_shipped_configs_are_errors_not_panics(
        which in 0..SHIPPED.len(),
        mutations in prop::collection::vec(mutation(), 1..5),
    ) {
        let mut bytes = SHIPPED[which].1.as_bytes().to_vec();
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        parse_checked(&String::from_utf8_lossy(&bytes))?;
    }

    /// The nesting cap is checked by a linear scan, not the parser; whatever comes before a
    /// collection nested deeper than the cap, the scan must not miss what the scanner sees.
    #[test]
    fn the_depth_cap_sees_every_flow_collection_the_yaml_scanner_sees(
        (before, depth) in before_deep_nesting(),
        after in prop::sample::select(vec!["", "\n", "]", " # x"]),
    ) {
        let text = format!("{before}k: {}{}{after}\n", "[".repeat(depth), "]".repeat(depth));
        if scanner_flow_depth(&text) > config::limits::MAX_DEPTH {
            prop_assert!(
                config::limits::check(&text).is_err(),
                "{text:?} passed the depth cap"
            );
        }
    }
}

/// Found by `the_depth_cap_sees_every_flow_collection_the_yaml_scanner_sees` and by hand: the
/// cap's former line scan misread YAML, and what it misreads hides the rest of the file from it while
/// libyaml still parses that rest (40 KB of `[` after any of these took 1.2 s in a release
/// build, 160 KB took 18 s: the cost the cap exists to prevent). It splits lines at `\n` only
/// (libyaml also breaks at a lone `\r`, U+0085, U+2028, U+2029), so a comment runs to the end
/// of the file; it takes `#` after any Unicode space for a comment (YAML: after a space or a
/// tab only); it measures a block scalar's indentation from the line, not from the key after
/// `- `; and it opens a quote after `-`, `:` or `,` inside a plain scalar (`a-'b`). Each text
/// here must be refused by the cap.
#[test]
fn depth_cap_regressions() {
    let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
    for text in [
        format!("a: 1 #c\rb: {deep}\r"),
        format!("a: 1 #c\u{85}b: {deep}\n"),
        format!("a: 1 #c\u{2028}b: {deep}\n"),
        format!("a: 1 #c\u{2029}b: {deep}\n"),
        format!("b: [x\u{a0}#, {deep}]\n"),
        format!("b: [x\u{3000}#, {deep}]\n"),
        format!("- k: |\n  k: {deep}\n"),
        format!("k: a-'b\nc: {deep}\n"),
        format!("k: a:'b\nc: {deep}\n"),
        format!("k: a,'b\nc: {deep}\n"),
    ] {
        assert!(
            config::limits::check(&text).is_err(),
            "{text:?} passed the depth cap"
        );
    }
}

/// The deepest nesting of flow collections (`[`, `{`) the YAML scanner sees, up to its first
/// error: what makes libyaml's scanner quadratic, and what the depth cap must see. yaml_rust2
/// reads YAML 1.2; libyaml (serde_yaml_ng's parser) reads 1.1, where U+0085, U+2028 and U+2029
/// also break lines, so they are read as `\n` here.
fn scanner_flow_depth(text: &str) -> usize {
    use yaml_rust2::scanner::{Scanner, TokenType};
    let text = text.replace(['\u{85}', '\u{2028}', '\u{2029}'], "\n");
    let (mut depth, mut deepest) = (0usize, 0usize);
    for token in Scanner::new(text.chars()) {
        match token.1 {
            TokenType::FlowSequenceStart | TokenType::FlowMappingStart => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            TokenType::FlowSequenceEnd | TokenType::FlowMappingEnd => {
                depth = depth.saturating_sub(1)
            }
            _ => {}
        }
    }
    deepest
}

/// Text before a deep flow collection: lines of pieces that hide or seem to hide what follows
/// (comments after various blanks, quotes, block scalars), joined by any YAML line break.
fn before_deep_nesting() -> impl Strategy<Value = (String, usize)> {
    let piece = prop::sample::select(vec![
        "a: 1 #c{BR}",
        "# comment{BR}",
        "k: [x\u{a0}#, ",
        "k: [x\u{3000}#, ",
        "k: [x\t#, ",
        "k: x #",
        "k: 'q{BR}",
        "k: \"q{BR}",
        "k: |{BR}  ",
        "- k: |{BR}  ",
        "- |{BR}  ",
        "k: a-'b{BR}",
        "k: a:'b{BR}",
        "k: a,'b{BR}",
        "k: a['b{BR}",
        "k: \u{85}",
        "#\u{2028}",
        "- ",
        "  ",
        "x",
        ", ",
        "]",
        "}",
        "{BR}",
    ]);
    let line_break = prop::sample::select(vec!["\n", "\r", "\r\n"]);
    (
        prop::collection::vec(piece, 0..6),
        line_break,
        (config::limits::MAX_DEPTH + 1)..(config::limits::MAX_DEPTH + 30),
    )
        .prop_map(|(pieces, line_break, depth)| {
            (pieces.concat().replace("{BR}", line_break), depth)
        })
}

// ---------------------------------------------------------------------------------------------
// 2. Path normalisation, routing and bucket keys
// ---------------------------------------------------------------------------------------------

fn policy() -> impl Strategy<Value = EscapedSlashes> {
    prop::sample::select(vec![
        EscapedSlashes::Reject,
        EscapedSlashes::Keep,
        EscapedSlashes::Decode,
    ])
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Strings built from the pieces normalisation cares about, so that odd combinations
/// (`%2e%2E`, `..%2f`, `\`, a lone `%`) come up far more often than in random text.
fn path_like() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "/", "/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\", "%", "%4", "%zz",
        "%41", "%7e", "%7E", "%3f", "%c3%a9", "%00", "%25", "é", "a", "B", "~", "*", " ",
    ]);
    (any::<bool>(), prop::collection::vec(piece, 0..24)).prop_map(|(absolute, pieces)| {
        let body = pieces.concat();
        if absolute {
            format!("/{body}")
        } else {
            body
        }
    })
}

/// Checks that `normal` is a normal form under `slashes` and a fixed point of normalisation.
fn check_normal_form(normal: &str, slashes: EscapedSlashes) -> Result<(), TestCaseError> {
    let again = normalize::path(normal, slashes).map(|p| p.into_owned());
    prop_assert_eq!(again.as_deref(), Ok(normal), "idempotent");
    if normal == "*" {
        return Ok(());
    }
    prop_assert!(normal.starts_with('/'), "{normal:?} starts with '/'");
    prop_assert!(!normal.contains("//"), "{normal:?} holds '//'");
    for segment in normal.split('/') {
        prop_assert!(
            segment != "." && segment != "..",
            "{normal:?} holds a dot segment"
        );
    }
    let bytes = normal.as_bytes();
    for (i, _) in normal.match_indices('%') {
        let (h, l) = (bytes.get(i + 1).copied(), bytes.get(i + 2).copied());
        let upper_hex = |b: Option<u8>| b.is_some_and(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F'));
        prop_assert!(
            upper_hex(h) && upper_hex(l),
            "{normal:?}: escape at {i} is not two upper-case hex digits"
        );
        let text = &normal[i + 1..i + 3];
        let value = u8::from_str_radix(text, 16).unwrap_or_else(|e| panic!("{text}: {e}"));
        prop_assert!(
            !unreserved(value),
            "{normal:?}: %{text} escapes an unreserved character"
        );
        if slashes != EscapedSlashes::Keep {
            prop_assert!(
                value != b'/' && value != b'\\',
                "{normal:?}: an escaped slash under {slashes:?}"
            );
        }
    }
    prop_assert!(!normal.contains('\\'), "{normal:?} holds a raw '\\'");
    Ok(())
}

/// A path in normal form, as segments (each already normal) and whether it ends with '/'.
#[derive(Debug, Clone)]
struct Resource {
    segments: Vec<String>,
    trailing_slash: bool,
}

impl Resource {
    fn normal(&self) -> String {
        let mut out = String::new();
        for s in &self.segments {
            out.push('/');
            out.push_str(s);
        }
        if self.segments.is_empty() || self.trailing_slash {
            out.push('/');
        }
        out
    }
}

/// One segment in normal form: unreserved characters, sub-delimiters, upper-case escapes of
/// reserved and non-ASCII bytes (raw non-ASCII is escaped: `é` is `%C3%A9`); under `keep`,
/// escaped slashes too.
fn segment(slashes: EscapedSlashes) -> impl Strategy<Value = String> {
    let mut pieces: Vec<&'static str> = vec![
        "a",
        "b",
        "z",
        "A",
        "Q",
        "0",
        "9",
        "-",
        ".",
        "_",
        "~",
        "!",
        "$",
        "&",
        "'",
        "(",
        ")",
        "*",
        "+",
        ",",
        ";",
        "=",
        ":",
        "@",
        "%20",
        "%3F",
        "%23",
        "%25",
        "%C3%A9",
        "%00",
        "%FF",
        "%E6%97%A5",
    ];
    if slashes == EscapedSlashes::Keep {
        pieces.extend(["%2F", "%5C"]);
    }
    prop::collection::vec(prop::sample::select(pieces), 1..6)
        .prop_map(|p| p.concat())
        .prop_filter("a dot segment names no resource", |s| s != "." && s != "..")
}

fn resource(slashes: EscapedSlashes) -> impl Strategy<Value = Resource> {
    (prop::collection::vec(segment(slashes), 0..5), any::<bool>()).prop_map(
        |(segments, trailing_slash)| Resource {
            segments,
            trailing_slash,
        },
    )
}

const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";
const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn escape(b: u8, lower: bool) -> String {
    let hex = if lower { HEX_LOWER } else { HEX_UPPER };
    format!(
        "%{}{}",
        hex[usize::from(b >> 4)] as char,
        hex[usize::from(b & 15)] as char
    )
}

/// Spells one normal segment another way: unreserved characters percent-encoded (either hex
/// case), escapes in lower case, and under `keep` a `%5C` as a raw `\`.
fn spell_segment(segment: &str, slashes: EscapedSlashes, dice: &mut Dice) -> String {
    // Raw UTF-8 is another spelling of its escapes.
    let raw;
    let segment = if dice.one_in(2) {
        raw = segment.replace("%C3%A9", "é").replace("%E6%97%A5", "日");
        raw.as_str()
    } else {
        segment
    };
    let bytes = segment.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let escaped = &segment[i..i + 3];
            if slashes == EscapedSlashes::Keep && escaped == "%5C" && dice.one_in(3) {
                out.push('\\');
            } else {
                for c in escaped.chars() {
                    out.push(if dice.one_in(2) {
                        c.to_ascii_lowercase()
                    } else {
                        c
                    });
                }
            }
            i += 3;
            continue;
        }
        let c = segment[i..].chars().next().unwrap_or('?');
        if c.is_ascii() && unreserved(c as u8) && dice.one_in(3) {
            out.push_str(&escape(c as u8, dice.one_in(2)));
        } else {
            out.push(c);
        }
        i += c.len_utf8();
    }
    out
}

/// Another spelling of `r`: `//`, `/./`, `x/../` (dots maybe encoded), `/../` above the root,
/// encoded unreserved characters, lower-case escapes; under `decode`, separators written
/// `%2F`, `%2f`, `%5C`, `%5c` or `\`.
fn spell(r: &Resource, slashes: EscapedSlashes, dice: &mut Dice) -> String {
    const DETOURS: [&[&str]; 9] = [
        &[""],
        &["."],
        &["%2E"],
        &["%2e"],
        &["x", ".."],
        &["y", "%2E%2E"],
        &["zz", ".%2e"],
        &["%78", "%2e."],
        &["x", "y", "..", ".."],
    ];
    let mut out = String::new();
    let sep = |out: &mut String, dice: &mut Dice| {
        if !out.is_empty() && slashes == EscapedSlashes::Decode && dice.one_in(3) {
            out.push_str(["%2F", "%2f", "%5C", "%5c", "\\"][dice.below(5)]);
        } else {
            out.push('/');
        }
    };
    let detours = |out: &mut String, dice: &mut Dice, at_root: bool| {
        for _ in 0..dice.below(3) {
            let detour: &[&str] = if at_root && dice.one_in(4) {
                &[".."]
            } else {
                DETOURS[dice.below(DETOURS.len())]
            };
            for s in detour {
                sep(out, dice);
                out.push_str(s);
            }
        }
    };
    for (i, s) in r.segments.iter().enumerate() {
        detours(&mut out, dice, i == 0);
        sep(&mut out, dice);
        out.push_str(&spell_segment(s, slashes, dice));
    }
    if r.segments.is_empty() || r.trailing_slash {
        detours(&mut out, dice, r.segments.is_empty());
        sep(&mut out, dice);
    }
    out
}

/// Routes for `exact` (written in `exact_spelling`), a prefix of it (`prefix_spelling`), a
/// regex with a `path_param`, and a catch-all; every one keyed on the path.
fn router_yaml(exact_spelling: &str, prefix_spelling: &str) -> String {
    format!(
        r#"upstreams: {{ app: {{ targets: ["127.0.0.1:9"] }} }}
routes:
  - name: exact
    match: {{ path: {} }}
    upstream: app
    limits:
      - {{ name: by-path, key: ["path", "header:x-api-key|ip"], rate: "10/s" }}
  - name: prefix
    match: {{ path_prefix: {} }}
    upstream: app
    limits:
      - {{ name: by-path, key: ["path"], rate: "10/s" }}
      - {{ name: by-key, key: ["header:x-api-key"], rate: "10/s", on_missing_key: anonymous }}
  - name: regex
    match: {{ path_regex: "^/r/(?P<id>[^/]+)" }}
    upstream: app
    limits:
      - {{ name: by-id, key: ["path_param:id", "method"], rate: "10/s" }}
      - {{ name: by-path, key: ["path"], rate: "10/s" }}
  - name: any
    upstream: app
    limits:
      - {{ name: by-path, key: ["path"], rate: "10/s" }}
"#,
        quoted(exact_spelling),
        quoted(prefix_spelling),
    )
}

/// The route a request for `raw` takes and the bucket keys it is counted in.
fn route_and_buckets(
    cfg: &config::Config,
    raw: &str,
    slashes: EscapedSlashes,
    headers: &http::HeaderMap,
) -> Result<(String, Vec<String>), TestCaseError> {
    let path = normalize::path(raw, slashes)
        .map_err(|e| TestCaseError::fail(format!("{raw:?} has no normal form: {e}")))?;
    let route = cfg
        .router
        .find(&http::Method::GET, None, &path)
        .ok_or_else(|| TestCaseError::fail(format!("{path:?}: no route")))?;
    let captures = route.captures(&path);
    let view = RequestView {
        method: "GET",
        host: None,
        path: &path,
        query: None,
        headers,
        client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        peer_trusted: false,
        path_params: captures.as_ref(),
    };
    let planned = plan::plan(
        &route.name,
        &route.limits,
        &view,
        64,
        &tollgate::limiter::overrides::OverrideTable::EMPTY,
    );
    prop_assert!(planned.ambiguous.is_none());
    let keys = planned.requests.into_iter().map(|r| r.key).collect();
    Ok((route.name.to_string(), keys))
}

/// The resource, a prefix length, and dice for four spellings.
fn spelled_case() -> impl Strategy<
    Value = (
        EscapedSlashes,
        Resource,
        usize,
        [Vec<u8>; 4],
        Option<String>,
    ),
> {
    policy().prop_flat_map(|slashes| {
        (
            Just(slashes),
            resource(slashes),
            any::<usize>(),
            [
                prop::collection::vec(any::<u8>(), 0..64),
                prop::collection::vec(any::<u8>(), 0..64),
                prop::collection::vec(any::<u8>(), 0..64),
                prop::collection::vec(any::<u8>(), 0..64),
            ],
            prop::option::of("[!-~]{1,20}"),
        )
    })
}

/// No policy writes escaped slashes in a config path except `keep`.
fn config_policy(slashes: EscapedSlashes) -> EscapedSlashes {
    match slashes {
        EscapedSlashes::Decode => EscapedSlashes::Reject,
        other => other,
    }
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn any_string_normalises_to_a_normal_form_or_an_error(
        raw in prop_oneof![any_long_text(), path_like()],
        slashes in policy(),
    ) {
        if let Ok(normal) = normalize::path(&raw, slashes) {
            check_normal_form(&normal, slashes)?;
        }
    }

    #[test]
    fn spellings_of_one_resource_have_one_normal_form(
        (slashes, resource, _, dice, _) in spelled_case(),
    ) {
        let normal = resource.normal();
        check_normal_form(&normal, slashes)?;
        for d in &dice {
            let spelling = spell(&resource, slashes, &mut Dice::new(d));
            let got = normalize::path(&spelling, slashes).map(|p| p.into_owned());
            prop_assert_eq!(got.as_deref(), Ok(normal.as_str()), "spelling {:?}", spelling);
        }
    }

    #[test]
    fn spellings_of_one_resource_take_one_route_and_one_bucket(
        (slashes, resource, prefix_len, dice, api_key) in spelled_case(),
    ) {
        let [exact_dice, prefix_dice, a, b] = &dice;
        let in_config = config_policy(slashes);
        let prefix = Resource {
            segments: resource.segments[..prefix_len % (resource.segments.len() + 1)].to_vec(),
            trailing_slash: true,
        };
        let yaml = router_yaml(
            &spell(&resource, in_config, &mut Dice::new(exact_dice)),
            &spell(&prefix, in_config, &mut Dice::new(prefix_dice)),
        );
        let cfg = config::parse(&yaml, "router.yaml")
            .map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
        let mut headers = http::HeaderMap::new();
        if let Some(key) = &api_key {
            headers.insert(
                "x-api-key",
                http::HeaderValue::from_str(key).map_err(|e| TestCaseError::fail(e.to_string()))?,
            );
        }
        // The resource itself (the exact route), a path under the prefix, and one the regex
        // takes (unless a route before it does).
        let mut under = resource.clone();
        under.segments.push("tail".to_string());
        under.trailing_slash = false;
        let mut by_id = resource.clone();
        by_id.segments.insert(0, "r".to_string());
        for (target, want) in [(&resource, Some("exact")), (&under, Some("prefix")), (&by_id, None)] {
            let one = spell(target, slashes, &mut Dice::new(a));
            let other = spell(target, slashes, &mut Dice::new(b));
            let first = route_and_buckets(&cfg, &one, slashes, &headers)?;
            let second = route_and_buckets(&cfg, &other, slashes, &headers)?;
            prop_assert_eq!(&first, &second, "{:?} and {:?}", one, other);
            if let Some(want) = want {
                prop_assert_eq!(first.0.as_str(), want, "{:?}", one);
            }
            prop_assert!(!first.1.is_empty());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Key derivation
// ---------------------------------------------------------------------------------------------

fn spec(parts: &[&str]) -> KeySpec {
    KeySpec {
        parts: parts
            .iter()
            .map(|p| keys::parse_part(p).unwrap_or_else(|e| panic!("{p}: {e}")))
            .collect(),
    }
}

/// IPv4, IPv6, IPv4-mapped IPv6, 10.0.0.0/8, 2001:db8::/64 or 1.2.3.4.
fn any_ip() -> impl Strategy<Value = IpAddr> {
    (0u8..6, any::<u128>()).prop_map(|(kind, bits)| match kind {
        0 => IpAddr::V4(Ipv4Addr::from(bits as u32)),
        1 => IpAddr::V6(Ipv6Addr::from(bits)),
        2 => IpAddr::V6(Ipv4Addr::from(bits as u32).to_ipv6_mapped()),
        3 => IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (bits as u32 & 0x00ff_ffff))),
        4 => IpAddr::V6(Ipv6Addr::from(
            (0x2001_0db8_u128 << 96) | (bits & u128::from(u64::MAX)),
        )),
        _ => IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4)),
    })
}

/// A header value: any text without the bytes `HeaderValue` refuses.
fn header_text() -> impl Strategy<Value = String> {
    let known = prop::sample::select(vec![
        keys::ANONYMOUS_MARK,
        "ip",
        "header:x-api-key=k",
        "a|b",
        "{tag}",
    ])
    .prop_map(str::to_string);
    prop_oneof![
        any_text(),
        "[ -~]{0,80}",
        any_ip().prop_map(|ip| ip.to_string()),
        (
            any_ip(),
            prop::sample::select(vec!["ip=", ""]),
            prop::sample::select(vec!["", "/64"])
        )
            .prop_map(|(ip, tag, len)| format!("{tag}{ip}{len}")),
        known,
        "[a-z0-9]{60,70}",
    ]
    .prop_map(|s| {
        s.chars()
            .filter(|&c| (c >= ' ' || c == '\t') && c != '\u{7f}')
            .collect()
    })
}

fn non_empty_header_text() -> impl Strategy<Value = String> {
    header_text().prop_filter("an empty header is no header", |s| !s.is_empty())
}

fn header_value(text: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

const SOURCES: [&str; 10] = [
    "ip",
    "header:x-api-key",
    "header:x-user",
    "query:user",
    "query:id",
    "path",
    "path_param:id",
    "method",
    "host",
    "literal:fixed",
];

fn key_spec() -> impl Strategy<Value = KeySpec> {
    prop::collection::vec(
        prop::collection::vec(prop::sample::select(&SOURCES[..]), 1..4),
        1..4,
    )
    .prop_map(|parts| {
        let texts: Vec<String> = parts.iter().map(|alts| alts.join("|")).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        spec(&refs)
    })
}

/// Derives `spec`'s key for a request with these headers from `ip`.
fn derive_with(
    spec: &KeySpec,
    headers: &http::HeaderMap,
    query: Option<&str>,
    ip: IpAddr,
    ipv6_prefix: u8,
    anonymous: bool,
) -> (Derived, String) {
    let view = RequestView {
        method: "GET",
        host: Some("api.example.com"),
        path: "/a",
        query,
        headers,
        client_ip: ip,
        peer_trusted: false,
        path_params: None,
    };
    let mut out = String::new();
    let derived = keys::derive(spec, &view, ipv6_prefix, anonymous, &mut out);
    (derived, out)
}

/// A query string with `name=value` for each value, every byte percent-encoded or not at
/// random (hex in either case, a space maybe as `+`), the name too.
fn query_spelling(name: &str, values: &[Vec<u8>], dice: &mut Dice) -> String {
    let encode = |bytes: &[u8], dice: &mut Dice| -> String {
        let mut out = String::new();
        for &b in bytes {
            if b == b' ' && dice.one_in(2) {
                out.push('+');
            } else if b.is_ascii_alphanumeric() && !dice.one_in(3) {
                out.push(b as char);
            } else {
                out.push_str(&escape(b, dice.one_in(2)));
            }
        }
        out
    };
    values
        .iter()
        .map(|v| format!("{}={}", encode(name.as_bytes(), dice), encode(v, dice)))
        .collect::<Vec<_>>()
        .join("&")
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn derived_keys_hold_no_raw_client_bytes(
        spec in key_spec(),
        headers in prop::collection::vec(
            (prop::sample::select(&["x-api-key", "x-user", "x-other"][..]),
             prop_oneof![
                 prop::collection::vec(any::<u8>(), 0..80),
                 "[ -~]{0,70}".prop_map(String::into_bytes),
                 header_text().prop_map(String::into_bytes),
             ]),
            0..6,
        ),
        query in prop::option::of(prop_oneof![any_text(), "([a-z%+=&{}#|]|%[0-9a-fA-F]{2}){0,40}"]),
        path in prop_oneof![any_text(), any_text().prop_map(|t| format!("/r/{t}"))],
        method in any_text(),
        host in prop::option::of(any_text()),
        ip in any_ip(),
        ipv6_prefix in any::<u8>(),
        anonymous in any::<bool>(),
    ) {
        let mut map = http::HeaderMap::new();
        for (name, bytes) in &headers {
            if let Ok(value) = http::HeaderValue::from_bytes(bytes) {
                map.append(*name, value);
            }
        }
        let re = regex::Regex::new("^/r/(?P<id>[^/]*)").unwrap_or_else(|e| panic!("{e}"));
        let captures = re.captures(&path);
        let view = RequestView {
            method: &method,
            host: host.as_deref(),
            path: &path,
            query: query.as_deref(),
            headers: &map,
            client_ip: ip,
            peer_trusted: false,
            path_params: captures.as_ref(),
        };
        let mut out = String::new();
        if keys::derive(&spec, &view, ipv6_prefix, anonymous, &mut out) == Derived::Present {
            for b in out.bytes() {
                prop_assert!(
                    (0x21..=0x7e).contains(&b) && b != b'{' && b != b'}',
                    "{out:?} holds byte {b:#x}"
                );
            }
            prop_assert_eq!(out.matches(keys::PART_SEPARATOR).count() + 1, spec.parts.len());
        }
    }

    #[test]
    fn a_header_value_never_names_an_ip_bucket_or_the_anonymous_one(
        value in header_text(),
        ip in any_ip(),
        other_ip in any_ip(),
        ipv6_prefix in 1u8..=128,
    ) {
        let no_headers = http::HeaderMap::new();
        let either = spec(&["header:x-api-key|ip"]);
        let only_header = spec(&["header:x-api-key"]);
        let (_, ip_bucket) = derive_with(&either, &no_headers, None, other_ip, ipv6_prefix, true);
        let (_, anonymous_bucket) =
            derive_with(&only_header, &no_headers, None, ip, ipv6_prefix, true);
        prop_assert_eq!(anonymous_bucket.as_str(), keys::ANONYMOUS_MARK);
        // Values written as the IP bucket is, with or without its tag, as well as the value.
        let mut candidates = vec![value.clone(), ip_bucket.clone()];
        if let Some(untagged) = ip_bucket.strip_prefix("ip=") {
            candidates.push(untagged.to_string());
        }
        for text in candidates {
            let mut headers = http::HeaderMap::new();
            headers.insert("x-api-key", header_value(&text));
            let (derived, with_header) =
                derive_with(&either, &headers, None, ip, ipv6_prefix, true);
            prop_assert_eq!(derived, Derived::Present);
            let (_, header_only) =
                derive_with(&only_header, &headers, None, ip, ipv6_prefix, true);
            if text.trim_matches([' ', '\t']).is_empty() {
                // An empty header (or one of only spaces and tabs, trimmed as HTTP parsers
                // trim) is no header: the IP (or anonymous) bucket, as documented.
                let (_, own_ip) = derive_with(&either, &no_headers, None, ip, ipv6_prefix, true);
                prop_assert_eq!(with_header, own_ip);
                prop_assert_eq!(header_only.as_str(), keys::ANONYMOUS_MARK);
                continue;
            }
            prop_assert_ne!(&with_header, &ip_bucket, "header {:?}", text);
            prop_assert_ne!(with_header.as_str(), keys::ANONYMOUS_MARK);
            prop_assert_ne!(header_only.as_str(), keys::ANONYMOUS_MARK, "header {:?}", text);
        }
    }

    #[test]
    fn distinct_values_of_two_parts_give_distinct_keys(
        a in (non_empty_header_text(), non_empty_header_text()),
        b in (non_empty_header_text(), non_empty_header_text()),
    ) {
        let two = spec(&["header:x-api-key", "header:x-user"]);
        let key = |(k, u): &(String, String)| {
            let mut headers = http::HeaderMap::new();
            headers.insert("x-api-key", header_value(k));
            headers.insert("x-user", header_value(u));
            derive_with(&two, &headers, None, IpAddr::V4(Ipv4Addr::LOCALHOST), 64, false).1
        };
        prop_assert_eq!(a == b, key(&a) == key(&b), "{:?} and {:?}", a, b);
    }

    #[test]
    fn a_repeated_header_is_ambiguous_unless_every_copy_agrees(
        first in header_text(),
        second in header_text(),
        copies in 2usize..5,
        alternatives in any::<bool>(),
        ip in any_ip(),
    ) {
        let spec = spec(&[if alternatives { "header:x-api-key|ip" } else { "header:x-api-key" }]);
        let headers = |values: &[&str]| {
            let mut map = http::HeaderMap::new();
            for v in values {
                map.append("x-api-key", header_value(v));
            }
            map
        };
        let single = derive_with(&spec, &headers(&[&first]), None, ip, 64, true);
        let repeated = derive_with(&spec, &headers(&vec![first.as_str(); copies]), None, ip, 64, true);
        prop_assert_eq!(&repeated, &single);
        prop_assert_eq!(&single.0, &Derived::Present);
        let differing = derive_with(&spec, &headers(&[&first, &second]), None, ip, 64, true);
        if first == second {
            prop_assert_eq!(differing, single);
        } else {
            let name = http::HeaderName::from_static("x-api-key");
            prop_assert_eq!(differing.0, Derived::Ambiguous(KeySource::Header(name)));
        }
    }

    #[test]
    fn a_repeated_query_parameter_is_ambiguous_unless_every_copy_decodes_alike(
        first in prop::collection::vec(any::<u8>(), 1..12),
        second in prop::collection::vec(any::<u8>(), 1..12),
        dice in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let spec = spec(&["query:user"]);
        let headers = http::HeaderMap::new();
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut dice = Dice::new(&dice);
        let once = query_spelling("user", std::slice::from_ref(&first), &mut dice);
        let twice = query_spelling("user", &[first.clone(), first.clone()], &mut dice);
        let both = query_spelling("user", &[first.clone(), second.clone()], &mut dice);
        let single = derive_with(&spec, &headers, Some(&once), ip, 64, false);
        prop_assert_eq!(&single.0, &Derived::Present);
        let mut want = String::new();
        keys::append_normalized(&first, &mut want);
        prop_assert_eq!(&single.1, &want, "query {:?}", once);
        prop_assert_eq!(derive_with(&spec, &headers, Some(&twice), ip, 64, false), single.clone());
        let differing = derive_with(&spec, &headers, Some(&both), ip, 64, false);
        if first == second {
            prop_assert_eq!(differing, single);
        } else {
            prop_assert_eq!(differing.0, Derived::Ambiguous(KeySource::Query("user".into())));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. X-Forwarded-For
// ---------------------------------------------------------------------------------------------

fn trusted_nets() -> impl Strategy<Value = Vec<ipnet::IpNet>> {
    let net = prop::sample::select(vec![
        "10.0.0.0/8",
        "192.168.0.0/16",
        "2001:db8::/32",
        "::ffff:10.0.0.0/104",
        "1.2.3.4/32",
        "0.0.0.0/0",
    ])
    .prop_map(|s| {
        s.parse::<ipnet::IpNet>()
            .unwrap_or_else(|e| panic!("{s}: {e}"))
    });
    let random = (any_ip(), any::<u8>()).prop_map(|(ip, len)| {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        ipnet::IpNet::new(ip, len % (max + 1))
            .unwrap_or_else(|e| panic!("{ip}/{len}: {e}"))
            .trunc()
    });
    prop::collection::vec(prop_oneof![net, random], 0..4)
}

/// Trusted nets and a peer inside one of them.
fn trusted_peer() -> impl Strategy<Value = (Vec<ipnet::IpNet>, IpAddr)> {
    (
        trusted_nets(),
        trusted_nets(),
        any::<usize>(),
        any::<u128>(),
    )
        .prop_map(|(mut nets, more, which, bits)| {
            nets.extend(more);
            if nets.is_empty() {
                nets.push(ipnet::IpNet::from(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
            }
            let peer = match nets[which % nets.len()] {
                ipnet::IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(
                    u32::from(n.network()) | (bits as u32 & u32::from(n.hostmask())),
                )),
                ipnet::IpNet::V6(n) => IpAddr::V6(Ipv6Addr::from(
                    u128::from(n.network()) | (bits & u128::from(n.hostmask())),
                )),
            };
            (nets, peer)
        })
}

/// One hop as a proxy might write it: an address (maybe with a port, maybe IPv4-mapped), or
/// something that is none.
fn hop() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any_ip().prop_map(|ip| ip.to_string()),
        1 => (any_ip(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port).to_string()),
        2 => prop::sample::select(vec!["", "unknown", "1.2.3.4.5", "[::1]", "::ffff:10.1.2.3"])
            .prop_map(str::to_string),
        1 => "[ -~]{0,12}",
    ]
}

fn xff_headers() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let line = (
        prop::collection::vec(hop(), 1..5),
        prop::sample::select(vec![",", ", ", " , "]),
    )
        .prop_map(|(hops, sep)| hops.join(sep).into_bytes());
    prop::collection::vec(
        prop_oneof![8 => line, 1 => prop::collection::vec(any::<u8>(), 0..30)],
        0..4,
    )
}

/// Each hop of the headers, left to right: its address when it parses (as `client_ip` reads
/// one). A header that is not UTF-8 counts as one unreadable hop.
fn hops(headers: &[Vec<u8>]) -> Vec<Option<IpAddr>> {
    let mut out = Vec::new();
    for h in headers {
        match std::str::from_utf8(h) {
            Ok(text) => out.extend(text.split(',').map(|hop| {
                let hop = hop.trim();
                hop.parse::<IpAddr>()
                    .ok()
                    .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
                    .map(keys::canonical)
            })),
            Err(_) => out.push(None),
        }
    }
    out
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn forwarded_for_from_arbitrary_bytes_never_panics(
        peer in any_ip(),
        headers in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..60), 0..4),
        trusted in trusted_nets(),
    ) {
        let got = keys::client_ip(peer, headers.iter().map(Vec::as_slice), &trusted);
        let appears = hops(&headers).contains(&Some(got));
        prop_assert!(got == keys::canonical(peer) || appears);
    }

    #[test]
    fn an_untrusted_peer_is_the_client(
        peer in any_ip(),
        headers in xff_headers(),
        trusted in trusted_nets(),
    ) {
        let mut trusted = trusted;
        trusted.retain(|n| !n.contains(&keys::canonical(peer)));
        let got = keys::client_ip(peer, headers.iter().map(Vec::as_slice), &trusted);
        prop_assert_eq!(got, keys::canonical(peer));
    }

    #[test]
    fn behind_trusted_proxies_no_address_left_of_an_untrusted_hop_is_taken(
        (trusted, peer) in trusted_peer(),
        headers in xff_headers(),
    ) {
        let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
        let peer = keys::canonical(peer);
        if !is_trusted(&peer) {
            // An IPv4-mapped peer in an IPv6 net: read as IPv4, it is not in that net.
            let got = keys::client_ip(peer, headers.iter().map(Vec::as_slice), &trusted);
            prop_assert_eq!(got, peer);
            return Ok(());
        }
        let got = keys::client_ip(peer, headers.iter().map(Vec::as_slice), &trusted);
        let hops = hops(&headers);
        let positions: Vec<usize> =
            (0..hops.len()).filter(|&i| hops[i] == Some(got)).collect();
        prop_assert!(
            got == peer || !positions.is_empty(),
            "{got} is neither the peer nor in {hops:?}"
        );
        // The rightmost untrusted hop: nothing left of it may be the client.
        let untrusted = hops
            .iter()
            .rposition(|h| h.is_some_and(|ip| !is_trusted(&ip)));
        if let Some(u) = untrusted {
            prop_assert!(
                got == peer || positions.iter().any(|&p| p >= u),
                "{got} was taken from left of the untrusted hop {u} in {hops:?}"
            );
            // When every hop reads, the client is exactly that hop.
            if hops.iter().all(Option::is_some) {
                prop_assert_eq!(Some(got), hops[u]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Rate-limit headers and the 429 body
// ---------------------------------------------------------------------------------------------

/// Names as validation allows them (`[A-Za-z0-9._-]{1,64}`).
fn limit_name() -> impl Strategy<Value = Arc<str>> {
    "[A-Za-z0-9._-]{1,64}".prop_map(|s| Arc::from(s.as_str()))
}

/// Any u64, often a small one or 0 (edges such as "no wait at all" come up).
fn count() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => any::<u64>(),
        1 => 0u64..3_000_000_000,
        1 => 0u64..2,
    ]
}

fn limit_status() -> impl Strategy<Value = LimitStatus> {
    let period = prop_oneof![
        prop::sample::select(vec![1u64, 60, 3600, 86_400]),
        any::<u64>()
    ];
    (
        limit_name(),
        count(),
        period,
        count(),
        (any::<bool>(), count(), count(), count(), count()),
    )
        .prop_map(
            |(
                name,
                count,
                secs,
                burst,
                (allowed, remaining, reset_ns, retry_ns, next_token_ns),
            )| {
                LimitStatus {
                    name,
                    algorithm: tollgate::limiter::Algorithm::TokenBucket,
                    policy: Policy {
                        rate: Rate {
                            count,
                            period: std::time::Duration::from_secs(secs),
                        },
                        burst,
                    },
                    outcome: BucketOutcome {
                        allowed,
                        remaining,
                        reset_ns,
                        retry_ns,
                        next_token_ns,
                    },
                }
            },
        )
}

fn decision() -> impl Strategy<Value = Decision> {
    (
        any::<bool>(),
        prop::collection::vec(limit_status(), 0..12),
        prop::collection::vec(limit_name(), 0..4),
        count(),
        prop::collection::vec((limit_name(), count(), count()), 0..3),
    )
        .prop_map(
            |(allowed, statuses, extra_violated, retry_after_ns, exceeds)| {
                let mut violated: Vec<Arc<str>> = statuses
                    .iter()
                    .filter(|s| !s.outcome.allowed)
                    .map(|s| s.name.clone())
                    .collect();
                violated.extend(extra_violated);
                Decision {
                    allowed,
                    statuses,
                    violated,
                    retry_after_ns,
                    exceeds_capacity: exceeds
                        .into_iter()
                        .map(|(limit, cost, capacity)| CapacityExceeded {
                            limit,
                            cost,
                            capacity,
                        })
                        .collect(),
                    blocked: vec![],
                }
            },
        )
}

fn flags() -> impl Strategy<Value = HeaderFlags> {
    (any::<bool>(), any::<bool>()).prop_map(|(legacy, ietf)| HeaderFlags { legacy, ietf })
}

/// A header value's text, which must be visible ASCII and spaces, without spaces at its ends.
fn header_text_of(name: &str, value: &http::HeaderValue) -> Result<String, TestCaseError> {
    let bytes = value.as_bytes();
    prop_assert!(!bytes.is_empty(), "{name} is empty");
    prop_assert!(
        bytes.iter().all(|&b| (0x20..=0x7e).contains(&b)),
        "{name}: {bytes:?} is not visible ASCII"
    );
    prop_assert!(
        bytes[0] != b' ' && bytes[bytes.len() - 1] != b' ',
        "{name}: spaces at the ends"
    );
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

fn integer(name: &str, text: &str) -> Result<u64, TestCaseError> {
    text.parse::<u64>()
        .map_err(|e| TestCaseError::fail(format!("{name}: {text:?} is not an integer: {e}")))
}

/// Parses an IETF list (`"name";a=1;b=2, ...`) into (name, a, b) and checks it against the
/// statuses, in order.
fn ietf_items(
    name: &str,
    text: &str,
    fields: (&str, &str),
) -> Result<Vec<(String, u64, u64)>, TestCaseError> {
    let mut items = Vec::new();
    for item in text.split(", ") {
        let mut params = item.split(';');
        let label = params.next().unwrap_or("");
        prop_assert!(
            label.len() >= 3 && label.starts_with('"') && label.ends_with('"'),
            "{name}: {label:?} is not a quoted name"
        );
        let mut value = |key: &str| -> Result<u64, TestCaseError> {
            let param = params.next().unwrap_or("");
            let number = param.strip_prefix(key).and_then(|p| p.strip_prefix('='));
            let number = number.ok_or_else(|| {
                TestCaseError::fail(format!("{name}: {param:?} is not {key}=N in {text:?}"))
            })?;
            integer(name, number)
        };
        let a = value(fields.0)?;
        let b = value(fields.1)?;
        prop_assert!(
            params.next().is_none(),
            "{name}: extra parameters in {item:?}"
        );
        items.push((label[1..label.len() - 1].to_string(), a, b));
    }
    Ok(items)
}

fn check_headers(
    resp: &pingora::http::ResponseHeader,
    decision: &Decision,
    flags: HeaderFlags,
) -> Result<(), TestCaseError> {
    for (name, value) in resp.headers.iter() {
        let text = header_text_of(name.as_str(), value)?;
        match name.as_str() {
            "x-ratelimit-limit"
            | "x-ratelimit-remaining"
            | "x-ratelimit-reset"
            | "retry-after"
            | "content-length" => {
                integer(name.as_str(), &text)?;
            }
            _ => {}
        }
    }
    let written = |name: &str| resp.headers.get(name).is_some();
    let any_status = !decision.statuses.is_empty();
    prop_assert_eq!(written("ratelimit-policy"), any_status && flags.ietf);
    prop_assert_eq!(written("ratelimit"), any_status && flags.ietf);
    if let Some(s) = decision.most_restrictive().filter(|_| flags.legacy) {
        let get = |name: &str| {
            resp.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        prop_assert_eq!(get("x-ratelimit-limit"), Some(s.policy.burst));
        prop_assert_eq!(get("x-ratelimit-remaining"), Some(s.outcome.remaining));
    }
    if any_status && flags.ietf {
        let text = |name: &str| {
            resp.headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default()
        };
        let policy = ietf_items("RateLimit-Policy", &text("ratelimit-policy"), ("q", "w"))?;
        let state = ietf_items("RateLimit", &text("ratelimit"), ("r", "t"))?;
        prop_assert_eq!(policy.len(), decision.statuses.len());
        prop_assert_eq!(state.len(), decision.statuses.len());
        for ((p, r), s) in policy.iter().zip(&state).zip(&decision.statuses) {
            prop_assert_eq!(p.0.as_str(), &*s.name);
            prop_assert_eq!(p.1, s.policy.burst);
            prop_assert_eq!(r.0.as_str(), &*s.name);
            prop_assert_eq!(r.1, s.outcome.remaining);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn rate_limit_headers_are_valid_for_any_decision(
        decision in decision(),
        flags in flags(),
    ) {
        let mut resp = pingora::http::ResponseHeader::build(200, None)
            .unwrap_or_else(|e| panic!("{e}"));
        response::add_rate_limit_headers(&mut resp, &decision, flags)
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        check_headers(&resp, &decision, flags)?;
        // The functions the headers are made of, on their own.
        let _ = response::ietf_policy(&decision);
        let _ = response::ietf_state(&decision);
    }

    #[test]
    fn a_429_is_valid_for_any_decision(
        decision in decision(),
        flags in flags(),
        route in prop_oneof![limit_name().prop_map(|n| n.to_string()), any_text()],
    ) {
        let (resp, body) = response::too_many_requests(&route, &decision, flags)
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(resp.status.as_u16(), 429);
        check_headers(&resp, &decision, flags)?;
        let length = resp.headers.get("content-length").and_then(|v| v.to_str().ok());
        let want = body.len().to_string();
        prop_assert_eq!(length, Some(want.as_str()));
        let retry_after = resp
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(|v| integer("Retry-After", v))
            .transpose()?;
        if decision.exceeds_capacity.is_empty() || decision.allowed {
            prop_assert!(retry_after.is_some_and(|s| s >= 1), "{retry_after:?}");
        } else {
            prop_assert_eq!(retry_after, None);
        }
        for bytes in [body.clone(), response::problem_body(&route, &decision)] {
            let json: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| TestCaseError::fail(format!("body is not JSON: {e}")))?;
            prop_assert_eq!(&json["status"], &serde_json::json!(429));
            prop_assert_eq!(&json["route"], &serde_json::json!(route));
            let violated: Vec<&str> = decision.violated.iter().map(|n| &**n).collect();
            prop_assert_eq!(&json["violated-policies"], &serde_json::json!(violated));
            let retry = &json["retry_after_ms"];
            prop_assert!(retry.is_null() || retry.is_u64(), "{retry}");
        }
    }
}
