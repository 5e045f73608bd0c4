//! `multipart/form-data`: the one rule for which part of an upload is the image, and the one
//! parser that finds the parts. The gateway (which sizes the image from its header bytes as they
//! stream past) and the upload service (which stores it) both use exactly this code, so they
//! cannot disagree on where the image is: a guard that sized one part while the service stored
//! another would be no guard.
//!
//! Why not `multer` (what axum's `Multipart` uses) for both: the gateway needs a push parser that
//! is fed chunks as they arrive and holds nothing but the current part's headers, and multer's
//! framing has corners a second parser would have to copy exactly (it reads part headers up to
//! the first CRLF CRLF, so a header block with bare LF line ends swallows the next part). One small
//! parser that refuses what is ambiguous is simpler to keep in agreement with itself.
//!
//! The rule:
//! - A part is the **image** when it carries a filename (`filename=` or `filename*=`), or when its
//!   name is `file` or `image` (ASCII case-insensitive). Every other part is a **field**: named
//!   form text that the upload service ignores.
//! - A body must have exactly one image part: none, or more than one, is refused.
//! - Refused as malformed (never guessed at): a boundary that is missing or not RFC 2046, part
//!   header lines not ended by CRLF (bare CR or LF), folded header lines, a part without exactly
//!   one `Content-Disposition: form-data` header with a `name`, a parameter given twice, an
//!   unterminated quoted string, part headers over [`MAX_PART_HEADER_BYTES`], text after a
//!   boundary other than the line break (or `--` for the last one), and a body that ends before
//!   its closing boundary. A preamble before the first boundary and an epilogue after the last
//!   are allowed and ignored (RFC 2046).
//!
//! Memory: the parser holds one part's header block (at most [`MAX_PART_HEADER_BYTES`]) and a
//! count of how much of a boundary it has seen at the end of the last chunk; part bodies are
//! passed through, never held.

use std::ops::Range;

/// The longest header block of one part.
pub const MAX_PART_HEADER_BYTES: usize = 16 * 1024;

/// Why a multipart body is refused. Every variant is the client's mistake (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    #[error("bad multipart body: {0}")]
    Malformed(&'static str),
    #[error(
        "the multipart body has no image part; send the image in a field named `file` (a field with a filename, or named `image`, works too)"
    )]
    NoImagePart,
    #[error("the multipart body has more than one image part ({first} and {second}); send exactly one image, in a field named `file`")]
    SeveralImageParts { first: String, second: String },
    #[error("the multipart body has {count} parts named `{name}`; send one")]
    SeveralFields { name: String, count: usize },
}

fn malformed(why: &'static str) -> MultipartError {
    MultipartError::Malformed(why)
}

/// What a part is, by [the rule](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKind {
    Image,
    Field,
}

/// The parameters of a `Content-Disposition: form-data` header that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disposition {
    pub name: String,
    /// From `filename=`, or else `filename*=` (RFC 5987, percent-decoded when it can be).
    pub filename: Option<String>,
}

impl Disposition {
    /// The one rule: a part with a filename, or named `file` or `image`, is the image.
    pub fn kind(&self) -> PartKind {
        let image_name = self.name.eq_ignore_ascii_case("file") || self.name.eq_ignore_ascii_case("image");
        if self.filename.is_some() || image_name { PartKind::Image } else { PartKind::Field }
    }

    /// How the part is named in messages: `` `file` (a.jpg) ``.
    fn describe(&self) -> String {
        let clip = |s: &str| s.chars().take(64).collect::<String>();
        match &self.filename {
            Some(f) => format!("`{}` ({})", clip(&self.name), clip(f)),
            None => format!("`{}`", clip(&self.name)),
        }
    }
}

/// The kind of a part from its raw `Content-Disposition` header value.
pub fn part_kind(content_disposition: &str) -> Result<PartKind, MultipartError> {
    parse_disposition(content_disposition).map(|d| d.kind())
}

/// The boundary of a `multipart/form-data` content type: `Ok(None)` when the content type is
/// something else, an error when it is `multipart/form-data` without a valid boundary.
pub fn boundary(content_type: &str) -> Result<Option<String>, MultipartError> {
    let (mime, rest) = content_type.split_once(';').unwrap_or((content_type, ""));
    if !mime.trim_matches(is_ows).eq_ignore_ascii_case("multipart/form-data") {
        return Ok(None);
    }
    let params = parse_params(rest)?;
    let value = params
        .into_iter()
        .find_map(|(k, v)| (k == "boundary").then_some(v))
        .ok_or_else(|| malformed("the multipart/form-data content type has no boundary"))?;
    // RFC 2046 §5.1.1: 1 to 70 characters from a small set, not ending with a space. This also
    // guarantees the boundary holds no CR, which the body scanner relies on.
    let bchar = |c: char| c.is_ascii_alphanumeric() || "'()+_,-./:=? ".contains(c);
    if value.is_empty() || value.len() > 70 || !value.chars().all(bchar) || value.ends_with(' ') {
        return Err(malformed("the multipart boundary must be 1 to 70 letters, digits or '()+_,-./:=? (not ending in a space)"));
    }
    Ok(Some(value))
}

fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// `; key=value; key="quoted; value"` → lowercased keys with their values. A key given twice is
/// refused: which of the two a reader would take is exactly the kind of disagreement to avoid.
fn parse_params(text: &str) -> Result<Vec<(String, String)>, MultipartError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(is_ows);
        if rest.is_empty() {
            return Ok(out);
        }
        if let Some(r) = rest.strip_prefix(';') {
            // Empty parameters (`a=1;; b=2`, a trailing `;`) are harmless.
            rest = r;
            continue;
        }
        let key_len = rest.find(|c: char| !is_tchar(c)).unwrap_or(rest.len());
        if key_len == 0 {
            return Err(malformed("a header parameter has no name"));
        }
        let key = rest[..key_len].to_ascii_lowercase();
        rest = rest[key_len..].trim_start_matches(is_ows);
        rest = rest.strip_prefix('=').ok_or_else(|| malformed("a header parameter has no `=`"))?;
        rest = rest.trim_start_matches(is_ows);
        let value = if let Some(quoted) = rest.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, c)) => value.push(c),
                        None => return Err(malformed("a quoted header parameter is not closed")),
                    },
                    Some((_, c)) => value.push(c),
                    None => return Err(malformed("a quoted header parameter is not closed")),
                }
            };
            rest = &quoted[end + 1..];
            value
        } else {
            // Unquoted: up to the next `;` or white space (old clients do not quote).
            let len = rest.find(|c: char| c == ';' || is_ows(c)).unwrap_or(rest.len());
            if rest[..len].contains('"') {
                return Err(malformed("a header parameter has a stray quote"));
            }
            let value = rest[..len].to_string();
            rest = &rest[len..];
            value
        };
        rest = rest.trim_start_matches(is_ows);
        if !rest.is_empty() && !rest.starts_with(';') {
            return Err(malformed("a header parameter is followed by text that is not `;`"));
        }
        if out.iter().any(|(k, _)| *k == key) {
            return Err(malformed("a header parameter is given twice"));
        }
        out.push((key, value));
    }
}

/// Parses a part's `Content-Disposition` value: `form-data; name="…"[; filename="…"]`.
pub fn parse_disposition(value: &str) -> Result<Disposition, MultipartError> {
    let (kind, rest) = value.split_once(';').unwrap_or((value, ""));
    if !kind.trim_matches(is_ows).eq_ignore_ascii_case("form-data") {
        return Err(malformed("a part's Content-Disposition is not `form-data`"));
    }
    let mut name = None;
    let mut filename = None;
    let mut filename_ext = None;
    for (key, value) in parse_params(rest)? {
        match key.as_str() {
            "name" => name = Some(value),
            "filename" => filename = Some(value),
            "filename*" => filename_ext = Some(decode_ext_value(&value)),
            _ => {}
        }
    }
    let name = name.ok_or_else(|| malformed("a part's Content-Disposition has no name"))?;
    Ok(Disposition { name, filename: filename.or(filename_ext) })
}

/// RFC 5987 `charset'language'percent-encoded`; the raw text when it is not that.
fn decode_ext_value(value: &str) -> String {
    let mut pieces = value.splitn(3, '\'');
    let (Some(_charset), Some(_language), Some(encoded)) = (pieces.next(), pieces.next(), pieces.next()) else {
        return value.to_string();
    };
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| value.to_string())
}

/// Parses one part's header block (without the blank line that ends it).
fn parse_part_headers(block: &[u8]) -> Result<Disposition, MultipartError> {
    let mut disposition = None;
    if block.is_empty() {
        return Err(malformed("a part has no Content-Disposition header"));
    }
    for line in split_crlf(block) {
        if line.iter().any(|&b| b == b'\r' || b == b'\n') {
            return Err(malformed("part header lines must end with CRLF (a bare CR or LF was found)"));
        }
        if matches!(line.first(), Some(b' ' | b'\t')) {
            return Err(malformed("folded part header lines are not accepted"));
        }
        let line = std::str::from_utf8(line).map_err(|_| malformed("a part header is not UTF-8"))?;
        let (name, value) = line.split_once(':').ok_or_else(|| malformed("a part header line has no `:`"))?;
        if name.is_empty() || !name.chars().all(is_tchar) {
            return Err(malformed("a part header name is not a token"));
        }
        if name.eq_ignore_ascii_case("content-disposition") {
            if disposition.is_some() {
                return Err(malformed("a part has two Content-Disposition headers"));
            }
            disposition = Some(parse_disposition(value.trim_matches(is_ows))?);
        }
    }
    disposition.ok_or_else(|| malformed("a part has no Content-Disposition header"))
}

fn split_crlf(block: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(block);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.windows(2).position(|w| w == b"\r\n") {
            Some(p) => {
                rest = Some(&r[p + 2..]);
                Some(&r[..p])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// What the parser reports as it goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A part's headers were read; its body follows.
    Part(&'a Disposition),
    /// Bytes of the current part's body, starting at offset `at` of the whole body.
    Data { at: u64, bytes: &'a [u8] },
    /// The current part's body ended at offset `at` (exclusive).
    PartEnd { at: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first boundary (anything here is ignored).
    Preamble,
    /// Just after a boundary: `--`, transport padding, or CRLF.
    AfterBoundary,
    Dash,
    Padding,
    Cr,
    Headers,
    Body,
    /// After the closing boundary (ignored).
    Epilogue,
}

/// A push parser: [`Parser::feed`] takes the body in chunks of any size (the events do not
/// depend on where the chunks are cut), [`Parser::finish`] says whether it ended properly.
#[derive(Debug)]
pub struct Parser {
    /// `CRLF--boundary`; the first boundary may stand at the very start without its CRLF.
    delimiter: Vec<u8>,
    state: State,
    /// How many bytes of `delimiter` ended the previous chunk (held back, not yet reported).
    matched: usize,
    headers: Vec<u8>,
    part: Option<Disposition>,
    /// Offset in the whole body of the next byte fed.
    offset: u64,
    failed: Option<MultipartError>,
}

impl Parser {
    /// A parser for `boundary` (as returned by [`boundary`]).
    pub fn new(boundary: &str) -> Parser {
        let delimiter = [b"\r\n--".as_slice(), boundary.as_bytes()].concat();
        // The body start counts as a line start: the implied CRLF is already "matched".
        Parser { delimiter, state: State::Preamble, matched: 2, headers: Vec::new(), part: None, offset: 0, failed: None }
    }

    /// True once the closing boundary was read.
    pub fn is_complete(&self) -> bool {
        self.state == State::Epilogue
    }

    /// Feeds the next chunk of the body, reporting what it holds to `on`. After an error every
    /// later call returns the same error.
    pub fn feed(&mut self, chunk: &[u8], on: &mut dyn FnMut(Event<'_>)) -> Result<(), MultipartError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.feed_inner(chunk, on);
        self.offset += chunk.len() as u64;
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// Whether the body, now ended, was a complete multipart body.
    pub fn finish(&self) -> Result<(), MultipartError> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None if self.is_complete() => Ok(()),
            None => Err(malformed("the body ends before its closing boundary")),
        }
    }

    fn feed_inner(&mut self, chunk: &[u8], on: &mut dyn FnMut(Event<'_>)) -> Result<(), MultipartError> {
        let base = self.offset;
        let mut i = 0;
        while i < chunk.len() {
            match self.state {
                State::Preamble | State::Body => {
                    let in_body = self.state == State::Body;
                    let found = scan(&self.delimiter, &mut self.matched, chunk, i, base, &mut |at, bytes| {
                        if in_body && !bytes.is_empty() {
                            on(Event::Data { at, bytes });
                        }
                    });
                    let Some(end) = found else { return Ok(()) };
                    if in_body {
                        let at = (base + end as u64).saturating_sub(self.delimiter.len() as u64);
                        on(Event::PartEnd { at });
                        self.part = None;
                    }
                    self.state = State::AfterBoundary;
                    i = end;
                }
                State::AfterBoundary | State::Dash | State::Padding | State::Cr => {
                    let b = chunk[i];
                    i += 1;
                    self.state = match (self.state, b) {
                        (State::AfterBoundary, b'-') => State::Dash,
                        (State::Dash, b'-') => State::Epilogue,
                        (State::AfterBoundary | State::Padding, b' ' | b'\t') => State::Padding,
                        (State::AfterBoundary | State::Padding, b'\r') => State::Cr,
                        (State::Cr, b'\n') => {
                            self.headers.clear();
                            State::Headers
                        }
                        _ => return Err(malformed("a boundary is followed by something other than a line break")),
                    };
                }
                State::Headers => {
                    let b = chunk[i];
                    i += 1;
                    self.headers.push(b);
                    let h = &self.headers;
                    let end = if h.as_slice() == b"\r\n" {
                        Some(0)
                    } else if h.ends_with(b"\r\n\r\n") {
                        Some(h.len() - 4)
                    } else {
                        None
                    };
                    match end {
                        Some(len) => {
                            let part = parse_part_headers(&self.headers[..len])?;
                            self.headers = Vec::new();
                            on(Event::Part(self.part.insert(part)));
                            self.state = State::Body;
                            self.matched = 0;
                        }
                        None if self.headers.len() > MAX_PART_HEADER_BYTES => {
                            return Err(malformed("a part's headers are longer than 16 KiB"));
                        }
                        None => {}
                    }
                }
                State::Epilogue => return Ok(()),
            }
        }
        Ok(())
    }
}

/// Looks for `delimiter` in `chunk[start..]`, reporting the bytes before it to `data` (with their
/// offset in the whole body). `matched` carries a delimiter prefix over chunk ends; it is
/// reported as data when the next chunk shows it was not one. Returns the index just past the
/// delimiter when found.
///
/// A held-back prefix never hides the start of another delimiter: the delimiter's only CR is its
/// first byte (boundaries hold no CR), so a delimiter can start only at a CR.
fn scan(delimiter: &[u8], matched: &mut usize, chunk: &[u8], start: usize, base: u64, data: &mut dyn FnMut(u64, &[u8])) -> Option<usize> {
    let mut i = start;
    if *matched > 0 {
        let need = delimiter.len() - *matched;
        let n = need.min(chunk.len() - i);
        if chunk[i..i + n] == delimiter[*matched..*matched + n] {
            if n == need {
                *matched = 0;
                return Some(i + n);
            }
            *matched += n;
            return None;
        }
        data((base + i as u64).saturating_sub(*matched as u64), &delimiter[..*matched]);
        *matched = 0;
    }
    let from = i;
    loop {
        let Some(p) = chunk[i..].iter().position(|&b| b == b'\r') else {
            data(base + from as u64, &chunk[from..]);
            return None;
        };
        let j = i + p;
        let n = (chunk.len() - j).min(delimiter.len());
        if chunk[j..j + n] == delimiter[..n] {
            data(base + from as u64, &chunk[from..j]);
            if n == delimiter.len() {
                return Some(j + n);
            }
            *matched = n;
            return None;
        }
        i = j + 1;
    }
}

/// What [`ImageForm`] reports about the image part.
#[derive(Debug, PartialEq, Eq)]
pub enum ImageEvent<'a> {
    /// Bytes of the image, starting at offset `at` of the whole body.
    Data { at: u64, bytes: &'a [u8] },
    /// The image part ended at offset `at` (exclusive).
    End { at: u64 },
}

/// [`Parser`] with [the rule](self) applied: reports the bytes of the one image part, and
/// refuses a second image part as soon as its headers are read.
#[derive(Debug)]
pub struct ImageForm {
    parser: Parser,
    /// The image part seen so far, if any.
    image: Option<Disposition>,
    in_image: bool,
}

impl ImageForm {
    pub fn new(boundary: &str) -> ImageForm {
        ImageForm { parser: Parser::new(boundary), image: None, in_image: false }
    }

    /// True once the closing boundary was read (nothing more can change the verdict).
    pub fn is_complete(&self) -> bool {
        self.parser.is_complete()
    }

    pub fn feed(&mut self, chunk: &[u8], on: &mut dyn FnMut(ImageEvent<'_>)) -> Result<(), MultipartError> {
        let mut second = None;
        let (image, in_image) = (&mut self.image, &mut self.in_image);
        let result = self.parser.feed(chunk, &mut |event| match event {
            Event::Part(part) if part.kind() == PartKind::Image => {
                if let Some(first) = image.as_ref() {
                    if second.is_none() {
                        second = Some(MultipartError::SeveralImageParts { first: first.describe(), second: part.describe() });
                    }
                } else {
                    *image = Some(part.clone());
                    *in_image = true;
                }
            }
            Event::Part(_) => {}
            Event::Data { at, bytes } if *in_image && second.is_none() => on(ImageEvent::Data { at, bytes }),
            Event::Data { .. } => {}
            Event::PartEnd { at } if *in_image => {
                *in_image = false;
                on(ImageEvent::End { at });
            }
            Event::PartEnd { .. } => {}
        });
        if let Some(e) = second {
            self.parser.failed = Some(e.clone());
            return Err(e);
        }
        result
    }

    /// Whether the ended body was complete, with exactly one image part.
    pub fn finish(&self) -> Result<(), MultipartError> {
        self.parser.finish()?;
        match self.image {
            Some(_) => Ok(()),
            None => Err(MultipartError::NoImagePart),
        }
    }
}

/// Where the image is in a whole multipart body.
pub fn image_part(body: &[u8], boundary: &str) -> Result<Range<usize>, MultipartError> {
    let mut form = ImageForm::new(boundary);
    let mut range: Option<Range<usize>> = None;
    form.feed(body, &mut |event| {
        if let ImageEvent::End { at } = event {
            let end = usize::try_from(at).unwrap_or(usize::MAX);
            let start = range.as_ref().map_or(end, |r| r.start);
            range = Some(start..end);
        } else if let ImageEvent::Data { at, .. } = event
            && range.is_none()
        {
            let start = usize::try_from(at).unwrap_or(usize::MAX);
            range = Some(start..start);
        }
    })?;
    form.finish()?;
    range.ok_or(MultipartError::NoImagePart)
}

/// Where the field part named `name` (ASCII case-insensitive) is in a whole multipart body:
/// `None` when there is none, an error when there are several or the body is malformed. Image
/// parts are never fields, whatever their name (see [the rule](self)).
pub fn field_part(body: &[u8], boundary: &str, name: &str) -> Result<Option<Range<usize>>, MultipartError> {
    let mut parser = Parser::new(boundary);
    let mut found: Vec<Range<usize>> = Vec::new();
    let mut inside = false;
    let offset = |at: u64| usize::try_from(at).unwrap_or(usize::MAX);
    parser.feed(body, &mut |event| match event {
        Event::Part(part) => {
            inside = part.kind() == PartKind::Field && part.name.eq_ignore_ascii_case(name);
            if inside {
                found.push(usize::MAX..usize::MAX);
            }
        }
        Event::Data { at, bytes } if inside => {
            if let Some(range) = found.last_mut() {
                let end = offset(at).saturating_add(bytes.len());
                if range.start == usize::MAX {
                    range.start = offset(at);
                }
                range.end = end;
            }
        }
        Event::PartEnd { at } if inside => {
            inside = false;
            if let Some(range) = found.last_mut() {
                if range.start == usize::MAX {
                    range.start = offset(at);
                }
                range.end = offset(at);
            }
        }
        Event::Data { .. } | Event::PartEnd { .. } => {}
    })?;
    parser.finish()?;
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        count => Err(MultipartError::SeveralFields { name: name.to_string(), count }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_part_is_found_by_name_once_and_never_in_an_image_part() {
        let body = b"--b\r\nContent-Disposition: form-data; name=\"Outputs\"\r\n\r\n[1,2]\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"outputs\"\r\n\r\nIMG\r\n--b--\r\n";
        let range = field_part(body, "b", "outputs").unwrap().unwrap();
        assert_eq!(&body[range], b"[1,2]");
        assert_eq!(field_part(body, "b", "note").unwrap(), None);
        let empty = b"--b\r\nContent-Disposition: form-data; name=\"outputs\"\r\n\r\n\r\n--b--\r\n";
        assert_eq!(field_part(empty, "b", "outputs").unwrap().map(|r| r.len()), Some(0));
        let twice = b"--b\r\nContent-Disposition: form-data; name=\"outputs\"\r\n\r\n[]\r\n--b\r\nContent-Disposition: form-data; name=\"outputs\"\r\n\r\n[]\r\n--b--\r\n";
        assert!(matches!(field_part(twice, "b", "outputs"), Err(MultipartError::SeveralFields { count: 2, .. })));
        let cut = b"--b\r\nContent-Disposition: form-data; name=\"outputs\"\r\n\r\n[]";
        assert!(field_part(cut, "b", "outputs").is_err());
    }

    fn disposition(v: &str) -> Result<(String, Option<String>, PartKind), MultipartError> {
        parse_disposition(v).map(|d| (d.name.clone(), d.filename.clone(), d.kind()))
    }

    #[test]
    fn the_rule_on_content_disposition_values() {
        let ok = |v: &str, name: &str, filename: Option<&str>, kind: PartKind| {
            assert_eq!(disposition(v), Ok((name.to_string(), filename.map(String::from), kind)), "{v}");
        };
        ok("form-data; name=\"file\"; filename=\"a.jpg\"", "file", Some("a.jpg"), PartKind::Image);
        ok("form-data; name=file", "file", None, PartKind::Image);
        ok("form-data; name=\"image\"", "image", None, PartKind::Image);
        ok("Form-Data ;NAME = \"FILE\" ", "FILE", None, PartKind::Image);
        ok("form-data;\tname=\"Image\"", "Image", None, PartKind::Image);
        ok("form-data; name=\"x\"; filename=\"huge.png\"", "x", Some("huge.png"), PartKind::Image);
        ok("form-data; name=\"x\"; FileName=\"\"", "x", Some(""), PartKind::Image);
        ok("form-data; name=\"x\"; filename*=UTF-8''na%C3%AFve.jpg", "x", Some("naïve.jpg"), PartKind::Image);
        ok("form-data; name=\"x\"; filename*=garbage", "x", Some("garbage"), PartKind::Image);
        ok("form-data; name=\"note\"", "note", None, PartKind::Field);
        ok("form-data; name=\"files\"", "files", None, PartKind::Field);
        ok("form-data; name=\"a;filename=b\"", "a;filename=b", None, PartKind::Field);
        ok("form-data; name=\"say \\\"hi\\\"\"", "say \"hi\"", None, PartKind::Field);
        ok("form-data; name=\"note\";", "note", None, PartKind::Field);
        ok("form-data; name=\"note\"; size=12", "note", None, PartKind::Field);
        let bad = |v: &str| assert!(matches!(parse_disposition(v), Err(MultipartError::Malformed(_))), "{v}");
        bad("attachment; name=\"file\"");
        bad("form-data");
        bad("form-data; filename=\"a.jpg\"");
        bad("form-data; name=\"note\"; name=\"file\"");
        bad("form-data; name=\"note\"; NAME=file");
        bad("form-data; name=\"file");
        bad("form-data; name=\"a\" b");
        bad("form-data; name=a\"b\"");
        bad("form-data; name");
        bad("form-data; =x");
        assert_eq!(part_kind("form-data; name=\"image\""), Ok(PartKind::Image));
    }

    #[test]
    fn boundary_from_the_content_type() {
        let check = |ct: &str, expected: Result<Option<&str>, ()>| {
            assert_eq!(boundary(ct).map_err(|_| ()), expected.map(|b| b.map(String::from)), "{ct}");
        };
        check("multipart/form-data; boundary=XyZ", Ok(Some("XyZ")));
        check("Multipart/Form-Data; BOUNDARY=\"a b:c\"", Ok(Some("a b:c")));
        check(
            "multipart/form-data;boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW;charset=utf-8",
            Ok(Some("----WebKitFormBoundary7MA4YWxkTrZu0gW")),
        );
        check("image/jpeg", Ok(None));
        check("multipart/mixed; boundary=x", Ok(None));
        check("", Ok(None));
        check("multipart/form-data", Err(()));
        check("multipart/form-data; boundary=", Err(()));
        check("multipart/form-data; boundary=\"\"", Err(()));
        check("multipart/form-data; boundary=\"a\rb\"", Err(()));
        check("multipart/form-data; boundary=\"ends \"", Err(()));
        check(&format!("multipart/form-data; boundary={}", "x".repeat(71)), Err(()));
        check("multipart/form-data; boundary=a; boundary=b", Err(()));
    }

    /// Every event of a parse, with data glued per part, for chunkings to be compared.
    fn parse_in(body: &[u8], boundary: &str, chunks: &[usize]) -> (Vec<String>, Result<(), MultipartError>) {
        let mut parser = Parser::new(boundary);
        let mut log: Vec<String> = Vec::new();
        let mut data: Vec<u8> = Vec::new();
        let mut start = None;
        let mut at = 0;
        let mut result = Ok(());
        let mut sizes = chunks.iter().copied().cycle();
        while at < body.len() && result.is_ok() {
            let n = sizes.next().unwrap_or(body.len()).max(1).min(body.len() - at);
            result = parser.feed(&body[at..at + n], &mut |e| match e {
                Event::Part(d) => log.push(format!("part {} {:?}", d.name, d.filename)),
                Event::Data { at, bytes } => {
                    let s = *start.get_or_insert(at);
                    assert_eq!(s + data.len() as u64, at, "data is contiguous");
                    data.extend_from_slice(bytes);
                }
                Event::PartEnd { at } => {
                    let s = start.take().unwrap_or(at);
                    assert_eq!(s + data.len() as u64, at);
                    assert_eq!(&body[s as usize..at as usize], data.as_slice(), "offsets point at the data");
                    log.push(format!("data {}", data.escape_ascii()));
                    data.clear();
                }
            });
            at += n;
        }
        (log, result.and_then(|()| parser.finish()))
    }

    /// The same events whatever the chunking: whole, byte by byte, and a few odd sizes.
    fn parse(body: &[u8], boundary: &str) -> (Vec<String>, Result<(), MultipartError>) {
        let whole = parse_in(body, boundary, &[body.len()]);
        for chunks in [&[1][..], &[2], &[3, 1], &[5, 7, 1], &[13]] {
            assert_eq!(parse_in(body, boundary, chunks), whole, "chunks {chunks:?}");
        }
        whole
    }

    #[test]
    fn parts_and_their_data_whatever_the_chunking() {
        let body = b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--Xy\r\n--XyZ \t\r\n\
content-disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n\xFF\xD8\xFF\r\r\n-\r\n--XyZ--\r\nepilogue";
        let (log, result) = parse(body, "XyZ");
        assert_eq!(result, Ok(()));
        assert_eq!(log[0], "part note None");
        assert_eq!(log[1], "data hi\\r\\n--Xy");
        assert_eq!(log[2], "part file Some(\"a.jpg\")");
        assert_eq!(log[3], "data \\xff\\xd8\\xff\\r\\r\\n-");
        // An empty part, a part without headers' values, the boundary at the very start.
        let (log, result) = parse(b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n\r\n--b--", "b");
        assert_eq!((log, result), (vec!["part a None".to_string(), "data ".to_string()], Ok(())));
    }

    #[test]
    fn malformed_bodies_are_refused_whatever_the_chunking() {
        let bad = |body: &[u8]| {
            let (_, result) = parse(body, "B");
            assert!(matches!(result, Err(MultipartError::Malformed(_))), "{:?}: {result:?}", String::from_utf8_lossy(body));
        };
        let cd = "Content-Disposition: form-data; name=\"file\"";
        // LF-only line ends in the part headers, a bare CR, folding.
        bad(format!("--B\n{cd}\n\nxx\n--B--").as_bytes());
        bad(format!("--B\r\n{cd}\n\r\nxx\r\n--B--").as_bytes());
        bad(format!("--B\r\n{cd}\nContent-Type: image/png\r\n\r\nxx\r\n--B--").as_bytes());
        bad(format!("--B\r\n{cd}\rX: y\r\n\r\nxx\r\n--B--").as_bytes());
        bad(b"--B\r\nContent-Disposition: form-data;\r\n name=\"file\"\r\n\r\nxx\r\n--B--");
        // Headers: none, no disposition, two, a space before the colon.
        bad(b"--B\r\n\r\nxx\r\n--B--");
        bad(b"--B\r\nContent-Type: image/png\r\n\r\nxx\r\n--B--");
        bad(format!("--B\r\n{cd}\r\n{cd}\r\n\r\nxx\r\n--B--").as_bytes());
        bad(b"--B\r\nContent-Disposition : form-data; name=file\r\n\r\nxx\r\n--B--");
        // Boundary lines: a longer boundary, text after it; no closing boundary; none at all.
        bad(format!("--B\r\n{cd}\r\n\r\nxx\r\n--Bx\r\n\r\n--B--").as_bytes());
        bad(format!("--BB\r\n{cd}\r\n\r\nxx\r\n--B--").as_bytes());
        bad(format!("--B\r\n{cd}\r\n\r\nxx\r\n--B").as_bytes());
        bad(format!("--B\r\n{cd}\r\n\r\nxx").as_bytes());
        bad(b"no boundary here");
        bad(b"");
        // Headers too long.
        bad(format!("--B\r\n{cd}\r\nX: {}\r\n\r\nxx\r\n--B--", "a".repeat(MAX_PART_HEADER_BYTES)).as_bytes());
    }

    fn form(parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (disposition, data) in parts {
            body.extend_from_slice(format!("--B\r\nContent-Disposition: form-data; {disposition}\r\n\r\n").as_bytes());
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"--B--\r\n");
        body
    }

    #[test]
    fn exactly_one_image_part() {
        let one = form(&[("name=\"note\"", b"hi"), ("name=\"file\"; filename=\"a.jpg\"", b"JPEG"), ("name=\"n2\"", b"x")]);
        let r = image_part(&one, "B").unwrap();
        assert_eq!(&one[r], b"JPEG");
        let r = image_part(&form(&[("name=\"image\"", b"PNG!")]), "B").unwrap();
        assert_eq!(r.len(), 4);
        let empty = form(&[("name=\"file\"; filename=\"\"", b"")]);
        assert!(image_part(&empty, "B").unwrap().is_empty());
        assert_eq!(image_part(&form(&[("name=\"note\"", b"hi")]), "B"), Err(MultipartError::NoImagePart));
        assert_eq!(image_part(b"--B--", "B"), Err(MultipartError::NoImagePart));
        let two = form(&[("name=\"x\"; filename=\"huge.png\"", b"PNG"), ("name=\"file\"; filename=\"small.jpg\"", b"JPG")]);
        let err = image_part(&two, "B").unwrap_err();
        assert!(matches!(err, MultipartError::SeveralImageParts { .. }), "{err}");
        assert!(err.to_string().contains("huge.png") && err.to_string().contains("small.jpg"), "{err}");
        assert!(matches!(
            image_part(&form(&[("name=\"FILE\"", b"a"), ("name=\"Image\"", b"b")]), "B"),
            Err(MultipartError::SeveralImageParts { .. })
        ));
        // The second image part is refused as soon as its headers are in, chunk by chunk too.
        let mut f = ImageForm::new("B");
        let cut = two.windows(9).position(|w| w == b"small.jpg").unwrap() + 20;
        let mut images = Vec::new();
        for b in &two[..cut] {
            if f.feed(std::slice::from_ref(b), &mut |e| images.push(format!("{e:?}"))).is_err() {
                break;
            }
        }
        assert!(matches!(f.finish(), Err(MultipartError::SeveralImageParts { .. })));
        assert_eq!(images.len(), 4, "three data bytes and the end of the first image: {images:?}");
    }
}
