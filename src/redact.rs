//! Log output that never carries credentials: Pingora logs the raw bytes of a request it cannot
//! parse (`InvalidHTTPHeader context: buf: "... Authorization: Bearer ..."`), so every log line
//! passes through [`redact_credentials`] on its way to stderr; a Redis URL is logged through
//! [`url_without_password`].

use std::borrow::Cow;
use std::io::Write;

/// Header names (matched case-insensitively, as a suffix of the name) whose values are
/// credentials.
const SECRET_HEADERS: [&[u8]; 5] = [b"authorization", b"cookie", b"api-key", b"token", b"secret"];

const REDACTED: &[u8] = b" [redacted]";

/// Where the value of a header named at `after_name` starts: past blanks (spaces, tabs, a
/// logged `\t`), a colon, and nothing else; `None` when no colon follows.
fn value_start(line: &[u8], after_name: usize) -> Option<usize> {
    let mut i = after_name;
    loop {
        match line.get(i..) {
            Some([b' ' | b'\t', ..]) => i += 1,
            Some([b'\\', b't', ..]) => i += 2,
            Some([b':', ..]) => return Some(i + 1),
            _ => return None,
        }
    }
}

/// Where a value ends: a line break, a quote, or a logged `\r` / `\n`.
fn value_end(line: &[u8], start: usize) -> usize {
    let mut i = start;
    while i < line.len() {
        match &line[i..] {
            [b'\r' | b'\n' | b'"', ..] => return i,
            [b'\\', b'r' | b'n', ..] => return i,
            _ => i += 1,
        }
    }
    line.len()
}

/// `line` with the value of every credential header replaced by `[redacted]`.
pub fn redact_credentials(line: &[u8]) -> Cow<'_, [u8]> {
    let lower = line.to_ascii_lowercase();
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    for name in SECRET_HEADERS {
        let mut from = 0;
        while let Some(at) = find(&lower[from..], name) {
            let after_name = from + at + name.len();
            if let Some(start) = value_start(line, after_name) {
                let end = value_end(line, start);
                if end > start {
                    cuts.push((start, end));
                }
            }
            from = after_name;
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
        for spaced in [
            &br#"buf: "Authorization:\tBearer s3cret\r\nX: 1""#[..],
            br#"buf: "Authorization : Bearer s3cret\r\n""#,
            br#"buf: "authorization:\t Bearer\ts3cret\r\n""#,
        ] {
            let out = redact_credentials(spaced);
            assert!(
                !String::from_utf8_lossy(&out).contains("s3cret"),
                "{}",
                String::from_utf8_lossy(&out)
            );
        }
        let raw = b"authorization: Bearer x\nnext";
        assert_eq!(
            &*redact_credentials(raw),
            b"authorization: [redacted]\nnext"
        );
    }
}

/// A URL as it may be logged: the password of `scheme://user:password@host...` replaced by
/// `***` (the user name kept); a URL without one unchanged.
pub fn url_without_password(url: &str) -> Cow<'_, str> {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return Cow::Borrowed(url);
    };
    let authority_end = url[scheme_end..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| scheme_end + i);
    let Some(at) = url[scheme_end..authority_end]
        .rfind('@')
        .map(|i| scheme_end + i)
    else {
        return Cow::Borrowed(url);
    };
    let userinfo = &url[scheme_end..at];
    let user = userinfo.split_once(':').map_or("", |(user, _)| user);
    Cow::Owned(format!("{}{user}:***{}", &url[..scheme_end], &url[at..]))
}

#[cfg(test)]
mod url_tests {
    use super::url_without_password;

    #[test]
    fn passwords_in_urls_are_hidden() {
        for (url, shown) in [
            (
                "redis://bob:s3cret@10.0.0.1:6379/2",
                "redis://bob:***@10.0.0.1:6379/2",
            ),
            ("rediss://:p%40ss@h:1", "rediss://:***@h:1"),
            ("redis://token@h:1", "redis://:***@h:1"),
            ("redis://h:1/0?x=a@b", "redis://h:1/0?x=a@b"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(url_without_password(url), shown, "{url}");
        }
    }
}
