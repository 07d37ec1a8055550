//! RESP2, the Redis wire protocol, as much as the lanes' own connections need: commands
//! written as arrays of bulk strings straight into one buffer, and replies read back
//! incrementally from the bytes received so far.

use bytes::{BufMut, Bytes, BytesMut};

/// A command being written: its arguments go into one buffer as they come (numbers formatted
/// in place), and [`Command::finish`] puts the array header in front.
pub struct Command {
    body: BytesMut,
    args: usize,
}

impl Command {
    /// A command with room for about `capacity` bytes of arguments.
    pub fn with_capacity(capacity: usize) -> Command {
        Command {
            body: BytesMut::with_capacity(capacity),
            args: 0,
        }
    }

    /// Appends one argument.
    pub fn arg(&mut self, value: &[u8]) -> &mut Command {
        let mut digits = itoa::Buffer::new();
        let len = digits.format(value.len());
        self.body.reserve(value.len() + len.len() + 5);
        self.body.put_u8(b'$');
        self.body.put_slice(len.as_bytes());
        self.body.put_slice(b"\r\n");
        self.body.put_slice(value);
        self.body.put_slice(b"\r\n");
        self.args += 1;
        self
    }

    /// Appends an integer argument, in decimal.
    pub fn int(&mut self, value: i64) -> &mut Command {
        let mut digits = itoa::Buffer::new();
        let text = digits.format(value);
        self.arg(text.as_bytes())
    }

    /// Appends `prefix` followed by `rest` as one argument (a key and its prefix).
    pub fn joined(&mut self, prefix: &[u8], rest: &[u8]) -> &mut Command {
        let mut digits = itoa::Buffer::new();
        let len = digits.format(prefix.len() + rest.len());
        self.body.reserve(prefix.len() + rest.len() + len.len() + 5);
        self.body.put_u8(b'$');
        self.body.put_slice(len.as_bytes());
        self.body.put_slice(b"\r\n");
        self.body.put_slice(prefix);
        self.body.put_slice(rest);
        self.body.put_slice(b"\r\n");
        self.args += 1;
        self
    }

    /// The whole command, ready to write.
    pub fn finish(&self) -> Bytes {
        let mut digits = itoa::Buffer::new();
        let count = digits.format(self.args);
        let mut out = BytesMut::with_capacity(self.body.len() + count.len() + 3);
        out.put_u8(b'*');
        out.put_slice(count.as_bytes());
        out.put_slice(b"\r\n");
        out.put_slice(&self.body);
        out.freeze()
    }
}

/// A command of plain arguments, written at once.
pub fn command(args: &[&[u8]]) -> Bytes {
    let mut c = Command::with_capacity(args.iter().map(|a| a.len() + 16).sum());
    for a in args {
        c.arg(a);
    }
    c.finish()
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Status(String),
    /// `-ERR ...`: the server refused the command (the whole line after `-`).
    Error(String),
    Integer(i64),
    /// A bulk string; `None` is the null bulk string.
    Bulk(Option<Bytes>),
    /// An array; `None` is the null array.
    Array(Option<Vec<Reply>>),
}

/// Bytes that are not a RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed reply from Redis: {0}")]
pub struct Malformed(pub &'static str);

/// Longest array or bulk string accepted; anything longer is treated as a broken stream.
const MOST: i64 = 64 * 1024 * 1024;
/// Deepest nesting of arrays accepted.
const DEEPEST: usize = 8;

/// Reads one reply from the front of `buf`: the reply and the bytes it took, or `None` when
/// `buf` does not hold a whole reply yet.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, Malformed> {
    parse_at(buf, 0, 0)
}

fn parse_at(buf: &[u8], at: usize, depth: usize) -> Result<Option<(Reply, usize)>, Malformed> {
    if depth > DEEPEST {
        return Err(Malformed("arrays nested too deep"));
    }
    let Some(rest) = buf.get(at..) else {
        return Ok(None);
    };
    let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let Some((&kind, line)) = rest[..end].split_first() else {
        return Err(Malformed("empty line"));
    };
    let next = at + end + 2;
    let text = || String::from_utf8_lossy(line).into_owned();
    match kind {
        b'+' => Ok(Some((Reply::Status(text()), next))),
        b'-' => Ok(Some((Reply::Error(text()), next))),
        b':' => Ok(Some((Reply::Integer(number(line)?), next))),
        b'$' => {
            let len = number(line)?;
            if len < 0 {
                return Ok(Some((Reply::Bulk(None), next)));
            }
            if len > MOST {
                return Err(Malformed("bulk string too long"));
            }
            let len = len as usize;
            let Some(data) = buf.get(next..next + len + 2) else {
                return Ok(None);
            };
            if &data[len..] != b"\r\n" {
                return Err(Malformed("bulk string without its CRLF"));
            }
            Ok(Some((
                Reply::Bulk(Some(Bytes::copy_from_slice(&data[..len]))),
                next + len + 2,
            )))
        }
        b'*' => {
            let len = number(line)?;
            if len < 0 {
                return Ok(Some((Reply::Array(None), next)));
            }
            if len > MOST {
                return Err(Malformed("array too long"));
            }
            let mut items = Vec::with_capacity((len as usize).min(4096));
            let mut at = next;
            for _ in 0..len {
                match parse_at(buf, at, depth + 1)? {
                    Some((item, after)) => {
                        items.push(item);
                        at = after;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), at)))
        }
        _ => Err(Malformed("unknown reply type")),
    }
}

/// A signed decimal integer line.
fn number(line: &[u8]) -> Result<i64, Malformed> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Malformed("not an integer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut c = Command::with_capacity(64);
        c.arg(b"EVALSHA").int(-12).joined(b"pre:", b"key").arg(b"");
        assert_eq!(
            &c.finish()[..],
            b"*4\r\n$7\r\nEVALSHA\r\n$3\r\n-12\r\n$7\r\npre:key\r\n$0\r\n\r\n"
        );
        assert_eq!(&command(&[b"PING"])[..], b"*1\r\n$4\r\nPING\r\n");
    }

    #[test]
    fn every_reply_type_is_read() {
        let wire = b"+OK\r\n-NOSCRIPT No matching script\r\n:-7\r\n$3\r\nab\r\r\n$-1\r\n*2\r\n:1\r\n*1\r\n$0\r\n\r\n*-1\r\n";
        let mut at = 0;
        let mut replies = Vec::new();
        while at < wire.len() {
            let (reply, used) = parse(&wire[at..]).expect("valid").expect("whole");
            replies.push(reply);
            at += used;
        }
        assert_eq!(
            replies,
            vec![
                Reply::Status("OK".into()),
                Reply::Error("NOSCRIPT No matching script".into()),
                Reply::Integer(-7),
                Reply::Bulk(Some(Bytes::from_static(b"ab\r"))),
                Reply::Bulk(None),
                Reply::Array(Some(vec![
                    Reply::Integer(1),
                    Reply::Array(Some(vec![Reply::Bulk(Some(Bytes::new()))])),
                ])),
                Reply::Array(None),
            ]
        );
    }

    #[test]
    fn a_reply_cut_anywhere_waits_for_the_rest() {
        let wire = b"*3\r\n:1764000000\r\n$5\r\nhello\r\n:42\r\n";
        for cut in 0..wire.len() {
            assert_eq!(parse(&wire[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(matches!(parse(wire), Ok(Some((_, n))) if n == wire.len()));
    }

    #[test]
    fn broken_streams_are_errors_not_panics() {
        for wire in [
            &b"?x\r\n"[..],
            b"\r\n",
            b":12a\r\n",
            b"$3\r\nabcd\r\n",
            b"$99999999999\r\n",
            b"*99999999999\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(parse(wire).is_err(), "{:?}", String::from_utf8_lossy(wire));
        }
    }
}
