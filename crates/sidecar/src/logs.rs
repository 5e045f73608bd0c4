//! `pixmesh sidecar logs`: follows an application's log file and writes each line to stdout as
//! one JSON object, the shape a log pipeline reads from a container.
//!
//! - **Formats.** `nginx` (the `combined` format: address, user, time, request, status, bytes,
//!   referer, user agent, as typed fields), `json` (an object per line, kept as it is), `plain`
//!   (`{"message": …}`), or `auto` (JSON when a line is an object, else nginx when it parses,
//!   else plain). A line that does not parse as its format is kept, with `parse_error`.
//! - **Following.** The file is polled every `poll_ms` (polling works on every filesystem a
//!   container mounts, where change notification does not). A rotation by rename is seen by the
//!   path naming another file: the new one is read from its start, and the old one is read on
//!   for 5 s (a writer writes to it until it reopens its log). A truncation (`copytruncate`) is
//!   seen by the file being shorter than what was read: it is read again from the start (lines
//!   written and truncated between two polls are lost, as with any copytruncate reader). A line
//!   is written once it is whole (ends in a newline), or when its rotated file is let go.
//! - Every object gets `observed_time` and the configured `fields` (`{ app = "web" }`).

use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};

/// `[sidecar.logs]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LogsAdapterConfig {
    /// The file to follow.
    pub path: PathBuf,
    /// `auto`, `nginx`, `json` or `plain`.
    pub format: String,
    /// Read what the file holds already (else start at its end).
    pub from_start: bool,
    pub poll_ms: u64,
    /// Fields added to every line (`{ app = "web" }`).
    pub fields: BTreeMap<String, String>,
    /// The longest line kept whole; a longer one is cut there (and marked `truncated`).
    pub max_line_bytes: usize,
}

impl Default for LogsAdapterConfig {
    fn default() -> Self {
        LogsAdapterConfig {
            path: PathBuf::new(),
            format: "auto".into(),
            from_start: false,
            poll_ms: 250,
            fields: BTreeMap::new(),
            max_line_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Auto,
    Nginx,
    Json,
    Plain,
}

impl LogsAdapterConfig {
    pub fn format(&self) -> Result<Format, String> {
        match self.format.as_str() {
            "auto" => Ok(Format::Auto),
            "nginx" => Ok(Format::Nginx),
            "json" => Ok(Format::Json),
            "plain" => Ok(Format::Plain),
            other => Err(format!("sidecar.logs.format {other:?}: use auto, nginx, json or plain")),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        self.format()?;
        if !(10..=60_000).contains(&self.poll_ms) {
            return Err("sidecar.logs.poll_ms must be between 10 and 60000".into());
        }
        if self.max_line_bytes < 256 {
            return Err("sidecar.logs.max_line_bytes must be at least 256".into());
        }
        Ok(())
    }
}

/// One line as a JSON object.
pub fn parse_line(line: &str, format: Format) -> Map<String, Value> {
    let as_json = || match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err("not a JSON object"),
    };
    let parsed = match format {
        Format::Json => as_json(),
        Format::Nginx => nginx_combined(line).ok_or("not nginx's combined format"),
        Format::Plain => return plain(line),
        Format::Auto => {
            if line.starts_with('{')
                && let Ok(map) = as_json()
            {
                return map;
            }
            return nginx_combined(line).unwrap_or_else(|| plain(line));
        }
    };
    parsed.unwrap_or_else(|why| {
        let mut map = plain(line);
        map.insert("parse_error".into(), json!(why));
        map
    })
}

fn plain(line: &str) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert("message".into(), json!(line));
    map
}

/// `$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent
/// "$http_referer" "$http_user_agent"`, and anything after it ignored.
fn nginx_combined(line: &str) -> Option<Map<String, Value>> {
    let (addr, rest) = line.split_once(' ')?;
    let rest = rest.strip_prefix("- ")?;
    let (user, rest) = rest.split_once(" [")?;
    let (time, rest) = rest.split_once("] \"")?;
    let (request, rest) = quoted_end(rest)?;
    let mut fields = rest.trim_start().splitn(3, ' ');
    let status: u16 = fields.next()?.parse().ok()?;
    let bytes: u64 = fields.next()?.parse().ok()?;
    let rest = fields.next().unwrap_or_default().trim_start();
    let (referer, rest) = rest.strip_prefix('"').and_then(quoted_end).unwrap_or(("-", rest));
    let user_agent = rest.trim_start().strip_prefix('"').and_then(quoted_end).map(|(ua, _)| ua).unwrap_or("-");
    let dash = |v: &str| if v == "-" { Value::Null } else { json!(v) };
    let mut map = Map::new();
    map.insert("remote_addr".into(), json!(addr));
    map.insert("remote_user".into(), dash(user));
    map.insert("time".into(), json!(nginx_time(time).unwrap_or_else(|| time.to_string())));
    let mut parts = request.splitn(3, ' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(path), protocol) => {
            map.insert("method".into(), json!(method));
            map.insert("path".into(), json!(path));
            map.insert("protocol".into(), protocol.map_or(Value::Null, |p| json!(p)));
        }
        _ => {
            map.insert("request".into(), json!(request));
        }
    }
    map.insert("status".into(), json!(status));
    map.insert("body_bytes_sent".into(), json!(bytes));
    map.insert("referer".into(), dash(referer));
    map.insert("user_agent".into(), dash(user_agent));
    Some(map)
}

/// The text up to the closing quote (nginx escapes quotes inside as `\x22`), and what follows.
fn quoted_end(s: &str) -> Option<(&str, &str)> {
    let end = s.find('"')?;
    Some((&s[..end], &s[end + 1..]))
}

/// `10/Oct/2000:13:55:36 -0700` as RFC 3339.
fn nginx_time(t: &str) -> Option<String> {
    chrono::DateTime::parse_from_str(t, "%d/%b/%Y:%H:%M:%S %z").ok().map(|d| d.to_rfc3339())
}

/// Follows `config.path`, writing JSON lines to `out`, until `stop` fires.
pub async fn follow(
    config: LogsAdapterConfig,
    out: &mut (impl AsyncWrite + Unpin),
    stop: pixmesh_chassis::Shutdown,
) -> std::io::Result<()> {
    let format = config.format().map_err(std::io::Error::other)?;
    let mut follower = Follower::new(config.path.clone(), config.max_line_bytes);
    if !config.from_start {
        follower.skip_to_end().await;
    }
    let poll = Duration::from_millis(config.poll_ms);
    let observed = |map: &mut Map<String, Value>| {
        map.insert("observed_time".into(), json!(chrono::Utc::now().to_rfc3339()));
        for (k, v) in &config.fields {
            map.entry(k.clone()).or_insert_with(|| json!(v));
        }
    };
    loop {
        let lines = follower.poll().await;
        if !lines.is_empty() {
            let mut text = Vec::new();
            for (line, truncated) in lines {
                let mut map = parse_line(&line, format);
                if truncated {
                    map.insert("truncated".into(), json!(true));
                }
                observed(&mut map);
                serde_json::to_writer(&mut text, &map).map_err(std::io::Error::other)?;
                text.push(b'\n');
            }
            out.write_all(&text).await?;
            out.flush().await?;
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = stop.wait() => return Ok(()),
        }
    }
}

/// How long a rotated-away file is still read: a writer may write to it until it reopens its
/// log (nginx on `USR1`, after the rename).
const DRAIN_ROTATED: Duration = Duration::from_secs(5);

/// The file being followed, and the one rotated away while it is drained.
struct Follower {
    path: PathBuf,
    current: Option<Reader>,
    rotated: Option<(Reader, tokio::time::Instant)>,
    max_line: usize,
}

/// One open file: its inode, how far it has been read, and the start of a line not yet whole.
struct Reader {
    file: tokio::fs::File,
    ino: u64,
    offset: u64,
    partial: Vec<u8>,
    /// A line longer than the limit is being skipped to its end.
    skipping: bool,
}

impl Follower {
    fn new(path: PathBuf, max_line: usize) -> Follower {
        Follower { path, current: None, rotated: None, max_line }
    }

    async fn open(&self) -> Option<Reader> {
        let file = tokio::fs::File::open(&self.path).await.ok()?;
        let ino = file.metadata().await.ok()?.ino();
        Some(Reader { file, ino, offset: 0, partial: Vec::new(), skipping: false })
    }

    async fn skip_to_end(&mut self) {
        self.current = self.open().await;
        if let Some(r) = &mut self.current
            && let Ok(end) = r.file.seek(std::io::SeekFrom::End(0)).await
        {
            r.offset = end;
        }
    }

    /// The whole lines written since the last poll (and whether each was cut at `max_line`).
    async fn poll(&mut self) -> Vec<(String, bool)> {
        let mut lines = Vec::new();
        if let Some((old, until)) = &mut self.rotated {
            old.read_to_end(self.max_line, &mut lines).await;
            if tokio::time::Instant::now() >= *until {
                old.flush_partial(&mut lines);
                self.rotated = None;
            }
        }
        if self.current.is_none() {
            self.current = self.open().await;
        }
        let Some(current) = &mut self.current else { return lines };
        // Truncated in place (copytruncate): read it again from the start.
        if let Ok(meta) = current.file.metadata().await
            && meta.len() < current.offset
            && current.file.seek(std::io::SeekFrom::Start(0)).await.is_ok()
        {
            current.offset = 0;
            current.partial.clear();
            current.skipping = false;
        }
        current.read_to_end(self.max_line, &mut lines).await;
        // Rotated: the path names another file now. The old one is read on for a while.
        let now = tokio::fs::metadata(&self.path).await.ok().map(|m| m.ino());
        if now.is_some_and(|ino| ino != current.ino)
            && let Some(mut new) = self.open().await
        {
            if let Some((mut older, _)) = self.rotated.take() {
                older.flush_partial(&mut lines);
            }
            new.read_to_end(self.max_line, &mut lines).await;
            if let Some(old) = self.current.replace(new) {
                self.rotated = Some((old, tokio::time::Instant::now() + DRAIN_ROTATED));
            }
        }
        lines
    }
}

impl Reader {
    async fn read_to_end(&mut self, max_line: usize, lines: &mut Vec<(String, bool)>) {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match self.file.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            self.offset += n as u64;
            let mut rest = &chunk[..n];
            while let Some(nl) = memchr::memchr(b'\n', rest) {
                if self.skipping {
                    self.skipping = false;
                } else {
                    self.partial.extend_from_slice(&rest[..nl]);
                    let line = std::mem::take(&mut self.partial);
                    lines.push((text(&line), false));
                }
                rest = &rest[nl + 1..];
            }
            if !self.skipping {
                self.partial.extend_from_slice(rest);
                if self.partial.len() > max_line {
                    // Too long: what fits goes out now, marked; the rest of the line is skipped.
                    self.partial.truncate(max_line);
                    let line = std::mem::take(&mut self.partial);
                    lines.push((text(&line), true));
                    self.skipping = true;
                }
            }
        }
    }

    fn flush_partial(&mut self, lines: &mut Vec<(String, bool)>) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            lines.push((text(&line), false));
        }
    }
}

fn text(line: &[u8]) -> String {
    String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(line)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_combined_lines_become_typed_fields() {
        let line =
            r#"203.0.113.7 - alice [10/Oct/2000:13:55:36 -0700] "GET /a?b=1 HTTP/1.1" 404 153 "https://ex.com/" "curl/8.0 (x86_64)""#;
        let map = parse_line(line, Format::Nginx);
        assert_eq!(map["remote_addr"], "203.0.113.7");
        assert_eq!(map["remote_user"], "alice");
        assert_eq!(map["time"], "2000-10-10T13:55:36-07:00");
        assert_eq!(
            (map["method"].as_str(), map["path"].as_str(), map["protocol"].as_str()),
            (Some("GET"), Some("/a?b=1"), Some("HTTP/1.1"))
        );
        assert_eq!((map["status"].as_u64(), map["body_bytes_sent"].as_u64()), (Some(404), Some(153)));
        assert_eq!((map["referer"].as_str(), map["user_agent"].as_str()), (Some("https://ex.com/"), Some("curl/8.0 (x86_64)")));
        let common = parse_line(r#"::1 - - [01/Jan/2024:00:00:00 +0000] "-" 400 0 "-" "-""#, Format::Nginx);
        assert_eq!(
            (common["remote_user"].clone(), common["request"].as_str(), common["user_agent"].clone()),
            (Value::Null, Some("-"), Value::Null)
        );
    }

    #[test]
    fn every_format_keeps_a_line_it_cannot_parse() {
        assert_eq!(parse_line("{\"level\":\"warn\",\"n\":1}", Format::Json)["level"], "warn");
        let bad = parse_line("not json", Format::Json);
        assert_eq!((bad["message"].as_str(), bad["parse_error"].as_str()), (Some("not json"), Some("not a JSON object")));
        assert_eq!(parse_line("GET / 200", Format::Nginx)["parse_error"], "not nginx's combined format");
        assert_eq!(parse_line("hello \"world\"", Format::Plain)["message"], "hello \"world\"");
        assert_eq!(parse_line("{\"a\":1}", Format::Auto)["a"], 1);
        assert_eq!(parse_line("[1,2]", Format::Auto)["message"], "[1,2]");
        assert!(
            parse_line(r#"1.2.3.4 - - [10/Oct/2000:13:55:36 -0700] "GET / HTTP/1.0" 200 2 "-" "-""#, Format::Auto).contains_key("status")
        );
    }
}
