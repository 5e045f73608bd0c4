//! A client of server-sent events as the HTML standard's `EventSource` reads them: lines ended
//! by LF, CRLF or CR; `field: value` (one space after the colon dropped); comment lines (`:`)
//! skipped; `data` lines joined with LF; a blank line dispatches the event; `id` is kept as the
//! last event id, which a reconnect sends as `Last-Event-ID`.

use anyhow::{Context, bail};
use std::time::Duration;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    /// `message` when the server named none.
    pub event: String,
    pub data: String,
}

/// An open stream.
pub struct SseStream {
    response: reqwest::Response,
    buffer: String,
    /// The last event id seen (what a reconnect sends).
    pub last_id: Option<String>,
    comments: usize,
}

impl SseStream {
    /// GETs `url` with `Accept: text/event-stream`, the API key, and `Last-Event-ID` when given.
    pub async fn open(client: &reqwest::Client, url: &str, key: &str, last_id: Option<&str>) -> anyhow::Result<SseStream> {
        let mut request = client.get(url).header("accept", "text/event-stream").header("x-api-key", key);
        if let Some(id) = last_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.with_context(|| format!("GET {url}"))?;
        if response.status() != 200 {
            let status = response.status();
            bail!("GET {url}: {status}: {}", response.text().await.unwrap_or_default());
        }
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
        if !content_type.starts_with("text/event-stream") {
            bail!("GET {url}: content-type {content_type:?}, not text/event-stream");
        }
        Ok(SseStream { response, buffer: String::new(), last_id: last_id.map(str::to_string), comments: 0 })
    }

    /// Comment lines (keep-alives) read so far.
    pub fn comments(&self) -> usize {
        self.comments
    }

    /// The next event; `None` once the server ended the stream. Fails when nothing at all
    /// (not even a comment) arrives within `quiet`.
    pub async fn next(&mut self, quiet: Duration) -> anyhow::Result<Option<SseEvent>> {
        let mut id = None;
        let mut event = String::new();
        let mut data: Option<String> = None;
        loop {
            while let Some(end) = self.buffer.find(['\n', '\r']) {
                let mut line: String = self.buffer.drain(..end).collect();
                // The line end: CRLF, LF or CR.
                if self.buffer.starts_with("\r\n") {
                    self.buffer.drain(..2);
                } else {
                    self.buffer.drain(..1);
                }
                if line.is_empty() {
                    if let Some(data) = data.take() {
                        if let Some(id) = id.take() {
                            self.last_id = Some(id);
                        }
                        let event = if event.is_empty() { "message".to_string() } else { std::mem::take(&mut event) };
                        return Ok(Some(SseEvent { id: self.last_id.clone(), event, data }));
                    }
                    continue;
                }
                if line.starts_with(':') {
                    self.comments += 1;
                    continue;
                }
                let (field, value) = match line.find(':') {
                    Some(colon) => {
                        let value = line.split_off(colon + 1);
                        line.truncate(colon);
                        (line, value.strip_prefix(' ').map(str::to_string).unwrap_or(value))
                    }
                    None => (line, String::new()),
                };
                match field.as_str() {
                    "id" => id = Some(value),
                    "event" => event = value,
                    "data" => {
                        let d = data.get_or_insert_with(String::new);
                        if !d.is_empty() {
                            d.push('\n');
                        }
                        d.push_str(&value);
                    }
                    _ => {}
                }
            }
            match tokio::time::timeout(quiet, self.response.chunk()).await {
                Err(_) => bail!("nothing arrived on the stream for {quiet:?}"),
                Ok(Err(e)) => bail!("the stream broke: {e}"),
                Ok(Ok(None)) => return Ok(None),
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
            }
        }
    }
}
