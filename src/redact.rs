//! Log output that never carries credentials: Pingora logs the raw bytes of a request it cannot
//! parse (`InvalidHTTPHeader context: buf: "... Authorization: Bearer ..."`), so every log line
//! passes through [`redact_credentials`] on its way to stderr.

use std::borrow::Cow;
use std::io::Write;

/// Header names (matched case-insensitively, as a suffix of the name) whose values are
/// credentials.
const SECRET_HEADERS: [&[u8]; 5] = [
    b"authorization:",
    b"cookie:",
    b"api-key:",
    b"token:",
    b"secret:",
];

const REDACTED: &[u8] = b" [redacted]";

/// `line` with the value of every credential header replaced by `[redacted]`. A value ends at a
/// line break, a backslash (an escaped `\r` in a logged buffer) or a quote.
pub fn redact_credentials(line: &[u8]) -> Cow<'_, [u8]> {
    let lower = line.to_ascii_lowercase();
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    for name in SECRET_HEADERS {
        let mut from = 0;
        while let Some(at) = find(&lower[from..], name) {
            let start = from + at + name.len();
            let end = line[start..]
                .iter()
                .position(|b| matches!(b, b'\r' | b'\n' | b'\\' | b'"'))
                .map_or(line.len(), |p| start + p);
            if end > start {
                cuts.push((start, end));
            }
            from = start;
        }
    }
    if cuts.is_empty() {
        return Cow::Borrowed(line);
    }
    cuts.sort_unstable();
    let mut out = Vec::with_capacity(line.len());
    let mut at = 0;
    for (start, end) in cuts {
        if start < at {
            continue;
        }
        out.extend_from_slice(&line[at..start]);
        out.extend_from_slice(REDACTED);
        at = end;
    }
    out.extend_from_slice(&line[at..]);
    Cow::Owned(out)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A `tracing_subscriber` writer to stderr that redacts credentials.
#[derive(Debug, Default, Clone, Copy)]
pub struct RedactingStderr;

/// One event's output on its way to stderr.
pub struct RedactingWriter(std::io::Stderr);

impl Write for RedactingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(&redact_credentials(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactingStderr {
    type Writer = RedactingWriter;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter(std::io::stderr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_a_logged_buffer_are_redacted() {
        let line = br#"ERROR InvalidHTTPHeader context: buf: "DELETE /v1/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer s3cret\r\nCookie: sid=abc\r\nX-Api-Key: k1\r\nX Bad: 1\r\n""#;
        let out = redact_credentials(line);
        let text = String::from_utf8_lossy(&out);
        for secret in ["s3cret", "sid=abc", "k1"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("Host: a"), "{text}");
        assert!(text.contains("X Bad: 1"), "{text}");
        assert!(text.contains("Authorization: [redacted]"), "{text}");
    }

    #[test]
    fn ordinary_lines_pass_unchanged() {
        let line = b"INFO request path=/a status=200";
        assert!(matches!(redact_credentials(line), Cow::Borrowed(_)));
        let raw = b"authorization: Bearer x\nnext";
        assert_eq!(
            &*redact_credentials(raw),
            b"authorization: [redacted]\nnext"
        );
    }
}
