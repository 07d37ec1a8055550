//! Caps checked before the YAML parser sees a file, so a hostile or broken file costs a cheap
//! linear scan, not the parser's worst case: its size ([`MAX_CONFIG_BYTES`]), its nesting
//! depth ([`MAX_DEPTH`]: block indentation levels plus open flow `[`/`{`; libyaml's scanner
//! is quadratic in flow nesting — 80 KB of `[` took seconds), and how far aliases expand
//! ([`MAX_ALIAS_NODES`]: a 15 KB "billion laughs" file made serde_yaml_ng build gigabytes).

use super::Problem;
use std::collections::HashMap;
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Scanner, Token, TokenType};

/// Largest config file accepted, in bytes.
pub const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;

/// Deepest nesting accepted (a real config needs about 6).
pub const MAX_DEPTH: usize = 64;

/// Most nodes that aliases (`*name`) may add to the document once expanded.
pub const MAX_ALIAS_NODES: usize = 100_000;

/// The message for a file over [`MAX_CONFIG_BYTES`].
pub fn too_large(bytes: u64) -> Problem {
    Problem::at(
        "",
        format!("the file is {bytes} bytes; the limit is {MAX_CONFIG_BYTES} bytes"),
    )
}

/// Checks size, nesting and alias expansion; the first cap exceeded is the problem.
pub fn check(text: &str) -> Result<(), Problem> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(too_large(text.len() as u64));
    }
    check_token_depth(text)?;
    if text.contains('*') {
        check_aliases(text)?;
    }
    Ok(())
}

fn too_deep(line: usize, column: usize) -> Problem {
    Problem {
        path: String::new(),
        message: format!("nested deeper than {MAX_DEPTH} levels (the limit)"),
        location: Some((line, column)),
    }
}

/// Nesting as the YAML scanner sees it: block and flow collections opened and not yet closed,
/// counted from yaml_rust2's tokens and abandoned past [`MAX_DEPTH`], which keeps the scan
/// linear (its per-token cost grows with the open flow levels; past 256 it stops with an error
/// of its own). libyaml reads YAML 1.1 and also
/// breaks lines at U+0085, U+2028 and U+2029, so those are read as `\n` here. Where
/// yaml_rust2 stops at a syntax error, the rest is judged by the line scan of [`check_depth`]
/// (libyaml may read further).
fn check_token_depth(text: &str) -> Result<(), Problem> {
    let normalised;
    let text = if text.contains(['\u{85}', '\u{2028}', '\u{2029}']) {
        normalised = text.replace(['\u{85}', '\u{2028}', '\u{2029}'], "\n");
        normalised.as_str()
    } else {
        text
    };
    let mut depth = 0usize;
    let mut scanner = Scanner::new(text.chars());
    for Token(mark, token) in &mut scanner {
        match token {
            TokenType::BlockSequenceStart
            | TokenType::BlockMappingStart
            | TokenType::FlowSequenceStart
            | TokenType::FlowMappingStart => {
                depth += 1;
                if depth > MAX_DEPTH {
                    // A block mapping's start is marked at its first `:`; its key says where
                    // the mapping starts.
                    let at = match token {
                        TokenType::BlockMappingStart => scanner.next().map_or(mark, |t| t.0),
                        _ => mark,
                    };
                    return Err(too_deep(at.line(), at.col() + 1));
                }
            }
            TokenType::BlockEnd | TokenType::FlowSequenceEnd | TokenType::FlowMappingEnd => {
                depth = depth.saturating_sub(1)
            }
            _ => {}
        }
    }
    match scanner.get_error() {
        None => Ok(()),
        // yaml_rust2 refuses flow nesting past its own limit (256) before it yields the tokens:
        // the line scan usually finds where the 65th level opened (a better place to point
        // at); where it is misled, the scanner's own place.
        Some(e) if e.info() == "recursion limit exceeded" => {
            check_depth(text)?;
            Err(too_deep(e.marker().line(), e.marker().col() + 1))
        }
        Some(_) => check_depth(text),
    }
}

/// A linear scan: block depth is the number of open indentation levels (plus compact `- - -`
/// sequences), flow depth the number of open `[`/`{` outside quotes and comments.
fn check_depth(text: &str) -> Result<(), Problem> {
    let mut indents: Vec<usize> = Vec::new();
    let mut block_depth = 0usize;
    let mut flow = 0usize;
    let mut quote: Option<char> = None;
    // Indentation of the line that opened a block scalar (`|`, `>`): its content is text.
    let mut block_scalar: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let indent = line.len() - line.trim_start_matches(' ').len();
        let body = &line[indent..];
        if let Some(opened) = block_scalar {
            if body.trim().is_empty() || indent > opened {
                continue;
            }
            block_scalar = None;
        }
        if quote.is_none() && flow == 0 {
            if body.trim().is_empty() || body.starts_with('#') {
                continue;
            }
            while indents.last().is_some_and(|&top| top >= indent) {
                indents.pop();
            }
            indents.push(indent);
            let mut rest = body;
            let mut dashes: usize = 0;
            while rest == "-" || rest.starts_with("- ") {
                dashes += 1;
                rest = rest.get(1..).unwrap_or("").trim_start();
            }
            block_depth = indents.len() + dashes.saturating_sub(1);
            if block_depth > MAX_DEPTH {
                return Err(too_deep(line_no, indent + 1));
            }
        }
        let mut prev: Option<char> = None;
        // The last non-blank character before this one on the line.
        let mut token_before: Option<char> = None;
        let mut escaped = false;
        let mut content_end = body.len();
        for (i, c) in body.char_indices() {
            match quote {
                Some('"') if escaped => escaped = false,
                Some('"') if c == '\\' => escaped = true,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => match c {
                    // A quote opens a scalar only where one can start (`a: x 'y` is plain).
                    '"' | '\''
                        if token_before
                            .is_none_or(|p| matches!(p, ':' | '-' | '?' | '[' | '{' | ',')) =>
                    {
                        quote = Some(c)
                    }
                    '#' if prev.is_none_or(char::is_whitespace) => {
                        content_end = i;
                        break;
                    }
                    '[' | '{' => {
                        flow += 1;
                        if block_depth + flow > MAX_DEPTH {
                            return Err(too_deep(line_no, indent + body[..i].chars().count() + 1));
                        }
                    }
                    ']' | '}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            prev = Some(c);
            if !c.is_whitespace() {
                token_before = Some(c);
            }
        }
        if quote.is_none() && flow == 0 {
            let content = body[..content_end].trim_end();
            let indicator =
                content.trim_end_matches(|c: char| c == '+' || c == '-' || c.is_ascii_digit());
            if indicator.ends_with('|') || indicator.ends_with('>') {
                block_scalar = Some(indent);
            }
        }
    }
    Ok(())
}

/// Counts the nodes the document has once every alias is expanded, from the parser's events
/// (no tree is built). Syntax errors are left to the real parser, which reports them better.
fn check_aliases(text: &str) -> Result<(), Problem> {
    let mut parser = Parser::new_from_str(text);
    let mut own = 0usize;
    let mut expanded = 0usize;
    let mut sizes: HashMap<usize, usize> = HashMap::new();
    let mut open: Vec<(usize, usize)> = Vec::new();
    loop {
        let Ok((event, mark)) = parser.next_token() else {
            return Ok(());
        };
        match event {
            Event::StreamEnd => return Ok(()),
            Event::Scalar(_, _, anchor, _) => {
                own += 1;
                expanded = expanded.saturating_add(1);
                if anchor > 0 {
                    sizes.insert(anchor, 1);
                }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                own += 1;
                expanded = expanded.saturating_add(1);
                open.push((anchor, expanded - 1));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((anchor, start)) = open.pop() {
                    if anchor > 0 {
                        sizes.insert(anchor, expanded - start);
                    }
                }
            }
            Event::Alias(anchor) => {
                expanded = expanded.saturating_add(sizes.get(&anchor).copied().unwrap_or(1));
                if expanded - own > MAX_ALIAS_NODES {
                    return Err(Problem {
                        path: String::new(),
                        message: format!(
                            "aliases expand to more than {MAX_ALIAS_NODES} nodes (the limit)"
                        ),
                        location: Some((mark.line(), mark.col() + 1)),
                    });
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_configs_pass() {
        let text = "a:\n  b:\n    - { c: [1, 2], d: \"x [ y\" }  # [[[ comment\n    - 'it''s'\n  e: |\n      [[[[[[\n";
        assert_eq!(check(text), Ok(()));
    }

    #[test]
    fn deep_flow_nesting_is_refused_with_its_line() {
        let text = format!("a: 1\nb: {}{}\n", "[".repeat(100), "]".repeat(100));
        let p = check(&text).unwrap_err();
        assert_eq!(p.location, Some((2, 4 + MAX_DEPTH - 1)));
        assert!(p.message.contains("nested deeper than 64"), "{p}");
        let ok = format!("b: {}{}\n", "[".repeat(60), "]".repeat(60));
        assert_eq!(check(&ok), Ok(()));
    }

    #[test]
    fn a_quote_inside_a_plain_scalar_does_not_hide_nesting() {
        let text = format!("a: x 'y\nb: {}{}\n", "[".repeat(100), "]".repeat(100));
        assert!(check(&text).is_err());
        let text = format!("a: \"x [ y\"\nb: {}{}\n", "[".repeat(100), "]".repeat(100));
        assert!(check(&text).is_err());
    }

    #[test]
    fn deep_block_nesting_is_refused() {
        let mut text = String::new();
        for i in 0..70 {
            text.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
        }
        assert_eq!(check(&text).unwrap_err().location, Some((65, 65)));
        let dashes = format!("{}1\n", "- ".repeat(70));
        assert!(check(&dashes).is_err());
    }

    #[test]
    fn alias_bombs_are_refused_small_reuse_is_not() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..7 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let p = check(&text).unwrap_err();
        assert!(p.message.contains("aliases expand"), "{p}");
        assert_eq!(check("a: &x {b: 1}\nc: *x\nd: *x\n"), Ok(()));
    }

    #[test]
    fn size_cap() {
        let text = "#".repeat(MAX_CONFIG_BYTES + 1);
        assert!(check(&text)
            .unwrap_err()
            .message
            .contains("the limit is 4194304 bytes"));
    }
}
