//! RESP2, as far as a proxy needs it: where a request ends and where its arguments are, and
//! where a reply ends, read in place in the connection's buffer.
//!
//! Why our own and not `redis-protocol`: its decoders build a frame per message (a `Vec` per
//! array, a `Bytes` per string) and this runs once per command and once per reply on the hot
//! path. A proxy forwards bytes as they came; it needs the extents only, which this finds in
//! one pass with no allocation (the argument offsets go into a vector the session reuses).

use std::ops::Range;

/// Why the bytes are not RESP: the connection cannot be read any further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("Protocol error: {0}")]
    Invalid(&'static str),
    #[error("Protocol error: a command of more than {limit} bytes")]
    TooLarge { limit: usize },
}

/// Longest header line (`*<n>\r\n`, `$<n>\r\n`) and longest inline command.
const MAX_LINE: usize = 64 * 1024;
/// Most arguments in one command (Redis's own limit).
const MAX_ARGS: usize = 1024 * 1024;

/// One request found at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Its bytes: `buf[..len]`.
    pub len: usize,
    /// Sent as an inline command (`PING\r\n`) rather than a RESP array: to forward it, it is
    /// written again as an array.
    pub inline: bool,
}

/// Finds the request at the start of `buf`. `Ok(None)`: not all of it has arrived. The
/// argument ranges (offsets into `buf`, the name first) are left in `args`.
pub fn parse_request(buf: &[u8], args: &mut Vec<Range<usize>>, max_bytes: usize) -> Result<Option<Request>, ProtocolError> {
    args.clear();
    let Some(&first) = buf.first() else { return Ok(None) };
    if first != b'*' {
        return parse_inline(buf, args, max_bytes);
    }
    let Some((count, mut pos)) = header(buf, 0)? else { return Ok(None) };
    if count <= 0 {
        // `*0` and `*-1` are no command; Redis skips them, and so does the proxy.
        return Ok(Some(Request { len: pos, inline: false }));
    }
    let count = usize::try_from(count).map_err(|_| ProtocolError::Invalid("invalid multibulk length"))?;
    if count > MAX_ARGS {
        return Err(ProtocolError::Invalid("invalid multibulk length"));
    }
    for _ in 0..count {
        if pos >= buf.len() {
            return Ok(None);
        }
        if buf[pos] != b'$' {
            return Err(ProtocolError::Invalid("expected '$'"));
        }
        let Some((len, start)) = header(buf, pos)? else { return Ok(None) };
        let len = usize::try_from(len).map_err(|_| ProtocolError::Invalid("invalid bulk length"))?;
        let end = start.checked_add(len).ok_or(ProtocolError::Invalid("invalid bulk length"))?;
        if end > max_bytes {
            return Err(ProtocolError::TooLarge { limit: max_bytes });
        }
        if end + 2 > buf.len() {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtocolError::Invalid("a bulk string not followed by CRLF"));
        }
        args.push(start..end);
        pos = end + 2;
    }
    Ok(Some(Request { len: pos, inline: false }))
}

/// An inline command: one line, arguments separated by spaces (`telnet`-style clients).
fn parse_inline(buf: &[u8], args: &mut Vec<Range<usize>>, max_bytes: usize) -> Result<Option<Request>, ProtocolError> {
    let Some(nl) = memchr::memchr(b'\n', buf) else {
        if buf.len() > MAX_LINE.min(max_bytes) {
            return Err(ProtocolError::Invalid("too big inline request"));
        }
        return Ok(None);
    };
    let line_end = if nl > 0 && buf[nl - 1] == b'\r' { nl - 1 } else { nl };
    let mut i = 0;
    while i < line_end {
        while i < line_end && buf[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while i < line_end && !buf[i].is_ascii_whitespace() {
            i += 1;
        }
        if i > start {
            args.push(start..i);
        }
    }
    Ok(Some(Request { len: nl + 1, inline: true }))
}

/// Reads `<type><integer>\r\n` at `pos`: the integer and where the line ends.
fn header(buf: &[u8], pos: usize) -> Result<Option<(i64, usize)>, ProtocolError> {
    let Some((line, next)) = line(buf, pos + 1)? else { return Ok(None) };
    Ok(Some((integer(line)?, next)))
}

/// The line that starts at `pos`, without its CRLF, and where the next one starts.
fn line(buf: &[u8], pos: usize) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let rest = buf.get(pos..).unwrap_or_default();
    match memchr::memchr(b'\r', rest) {
        Some(cr) if cr + 1 < rest.len() => {
            if rest[cr + 1] != b'\n' {
                return Err(ProtocolError::Invalid("a line not ended by CRLF"));
            }
            Ok(Some((&rest[..cr], pos + cr + 2)))
        }
        Some(_) => Ok(None),
        None if rest.len() > MAX_LINE => Err(ProtocolError::Invalid("a line too long")),
        None => Ok(None),
    }
}

fn integer(digits: &[u8]) -> Result<i64, ProtocolError> {
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 {
        return Err(ProtocolError::Invalid("a length that is not a number"));
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(ProtocolError::Invalid("a length that is not a number"));
        }
        n = n * 10 + i64::from(d - b'0');
    }
    Ok(if negative { -n } else { n })
}

/// The length of the whole reply at the start of `buf` (nested arrays included), or
/// `Ok(None)` when not all of it has arrived.
pub fn reply_len(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    let mut pos = 0;
    // Replies still to read: one, plus the elements of every array opened on the way.
    let mut pending: u64 = 1;
    while pending > 0 {
        pending -= 1;
        let Some(&kind) = buf.get(pos) else { return Ok(None) };
        match kind {
            b'+' | b'-' | b':' => {
                let Some((_, next)) = line(buf, pos + 1)? else { return Ok(None) };
                pos = next;
            }
            b'$' => {
                let Some((len, start)) = header(buf, pos)? else { return Ok(None) };
                if len < 0 {
                    pos = start;
                } else {
                    let end = start + len as usize + 2;
                    if end > buf.len() {
                        return Ok(None);
                    }
                    pos = end;
                }
            }
            b'*' => {
                let Some((count, next)) = header(buf, pos)? else { return Ok(None) };
                if count > 0 {
                    pending += count as u64;
                }
                pos = next;
            }
            _ => return Err(ProtocolError::Invalid("a reply of an unknown type")),
        }
    }
    Ok(Some(pos))
}

/// The elements of the array reply `reply` (a whole reply, as [`reply_len`] found it): their
/// ranges, or `None` when the reply is not an array (an error, say).
pub fn array_elements(reply: &[u8]) -> Option<Vec<Range<usize>>> {
    if reply.first() != Some(&b'*') {
        return None;
    }
    let (count, mut pos) = header(reply, 0).ok()??;
    let mut out = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count.max(0) {
        let len = reply_len(&reply[pos..]).ok()??;
        out.push(pos..pos + len);
        pos += len;
    }
    Some(out)
}

/// The value of an integer reply (`:12\r\n`).
pub fn integer_reply(reply: &[u8]) -> Option<i64> {
    let rest = reply.strip_prefix(b":")?.strip_suffix(b"\r\n")?;
    integer(rest).ok()
}

/// Writes a command as a RESP array of bulk strings.
pub fn write_command<'a>(out: &mut Vec<u8>, args: impl ExactSizeIterator<Item = &'a [u8]>) {
    write_header(out, b'*', args.len());
    for arg in args {
        write_bulk(out, arg);
    }
}

pub fn write_bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    write_header(out, b'$', bytes.len());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

pub fn write_header(out: &mut Vec<u8>, kind: u8, n: usize) {
    out.push(kind);
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub fn write_integer(out: &mut Vec<u8>, n: i64) {
    out.push(b':');
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// An error reply: `-ERR <message>\r\n` (CR and LF in the message become spaces).
pub fn write_error(out: &mut Vec<u8>, message: &str) {
    out.extend_from_slice(b"-");
    if !message.starts_with("ERR ") && !message.starts_with("NOAUTH ") && !message.starts_with("WRONGPASS ") {
        out.extend_from_slice(b"ERR ");
    }
    out.extend(message.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parsed = Option<(Request, Vec<Vec<u8>>)>;

    fn request(buf: &[u8]) -> Result<Parsed, ProtocolError> {
        let mut args = Vec::new();
        Ok(parse_request(buf, &mut args, 1 << 20)?.map(|r| (r, args.iter().map(|a| buf[a.clone()].to_vec()).collect())))
    }

    #[test]
    fn a_request_is_found_whole_and_never_before_its_last_byte() {
        let full = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nva\r\nl\r\n*1\r\n$4\r\nPING\r\n";
        let (req, args) = request(full).unwrap().unwrap();
        assert_eq!(req.len, 33);
        assert_eq!(args, vec![b"SET".to_vec(), b"key".to_vec(), b"va\r\nl".to_vec()], "a bulk may hold CRLF");
        for cut in 0..req.len {
            assert_eq!(request(&full[..cut]).unwrap(), None, "{cut} bytes are not a request yet");
        }
        let (next, args) = request(&full[req.len..]).unwrap().unwrap();
        assert_eq!((next.len, args), (14, vec![b"PING".to_vec()]));
    }

    #[test]
    fn inline_commands_are_read_as_arguments() {
        let (req, args) = request(b"  GET   foo \r\nrest").unwrap().unwrap();
        assert!(req.inline);
        assert_eq!(req.len, 14);
        assert_eq!(args, vec![b"GET".to_vec(), b"foo".to_vec()]);
        let (req, args) = request(b"PING\n").unwrap().unwrap();
        assert_eq!((req.len, args), (5, vec![b"PING".to_vec()]));
        assert_eq!(request(b"\r\n").unwrap().unwrap().1, Vec::<Vec<u8>>::new(), "an empty line is no command");
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        for (bad, why) in [
            (&b"*2\r\n:1\r\n"[..], "expected '$'"),
            (b"*x\r\n", "a length that is not a number"),
            (b"*1\r\n$3\r\nGETxx", "a bulk string not followed by CRLF"),
            (b"*1\r\n$-5\r\n", "invalid bulk length"),
            (b"*1\r$3", "a line not ended by CRLF"),
            (b"*99999999999\r\n", "invalid multibulk length"),
        ] {
            assert_eq!(request(bad).unwrap_err(), ProtocolError::Invalid(why), "{:?}", String::from_utf8_lossy(bad));
        }
        let huge = b"*1\r\n$2000000\r\n";
        assert_eq!(request(huge).unwrap_err(), ProtocolError::TooLarge { limit: 1 << 20 });
        assert!(request(&[b'G'; MAX_LINE + 1]).is_err(), "an endless inline line");
        assert_eq!(request(b"*0\r\n").unwrap().unwrap().0.len, 4);
    }

    #[test]
    fn replies_of_every_type_are_measured_whole() {
        for reply in [
            &b"+OK\r\n"[..],
            b"-ERR no\r\n",
            b":-42\r\n",
            b"$5\r\nhe\r\no\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*3\r\n$1\r\na\r\n*2\r\n:1\r\n$-1\r\n+x\r\n",
        ] {
            let mut buf = reply.to_vec();
            buf.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(reply_len(&buf).unwrap(), Some(reply.len()), "{:?}", String::from_utf8_lossy(reply));
            for cut in 0..reply.len() {
                assert_eq!(reply_len(&reply[..cut]).unwrap(), None);
            }
        }
        assert!(reply_len(b"?what\r\n").is_err());
    }

    #[test]
    fn array_elements_and_integers_are_read_back() {
        let reply = b"*3\r\n$1\r\na\r\n$-1\r\n*1\r\n:7\r\n";
        let parts: Vec<&[u8]> = array_elements(reply).unwrap().into_iter().map(|r| &reply[r]).collect();
        assert_eq!(parts, vec![&b"$1\r\na\r\n"[..], b"$-1\r\n", b"*1\r\n:7\r\n"]);
        assert_eq!(array_elements(b"-ERR x\r\n"), None);
        assert_eq!(integer_reply(b":12\r\n"), Some(12));
        assert_eq!(integer_reply(b"+12\r\n"), None);
        let mut out = Vec::new();
        write_command(&mut out, [&b"GET"[..], b"k"].into_iter());
        write_error(&mut out, "bad\r\nthing");
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n-ERR bad  thing\r\n");
    }
}
