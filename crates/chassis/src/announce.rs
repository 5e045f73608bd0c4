//! The "listening" announcement.
//!
//! A role that has bound its listeners prints one JSON line on stdout:
//! `{"pixmesh":"listening","role":"upload","http":"127.0.0.1:41234","admin":"127.0.0.1:41235"}`.
//! Logs go to stderr, so stdout carries only these lines. `pixmesh up` and the end-to-end tests
//! read them to learn the ports each child actually bound (children bind port 0).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;

pub const MARKER: &str = "listening";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub pixmesh: String,
    pub role: String,
    #[serde(flatten)]
    pub addresses: BTreeMap<String, String>,
}

impl Announcement {
    pub fn new(role: &str) -> Self {
        Announcement { pixmesh: MARKER.to_string(), role: role.to_string(), addresses: BTreeMap::new() }
    }

    pub fn with(mut self, name: &str, addr: impl std::fmt::Display) -> Self {
        self.addresses.insert(name.to_string(), addr.to_string());
        self
    }

    /// Parses a stdout line; `None` for anything that is not an announcement.
    pub fn parse(line: &str) -> Option<Announcement> {
        let parsed: Announcement = serde_json::from_str(line.trim()).ok()?;
        (parsed.pixmesh == MARKER).then_some(parsed)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.addresses.get(name).map(String::as_str)
    }

    /// Prints the line on stdout and flushes it.
    pub fn print(&self) {
        if let Ok(line) = serde_json::to_string(self) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_ignores_other_lines() {
        let a = Announcement::new("upload").with("http", "127.0.0.1:1").with("admin", "127.0.0.1:2");
        let line = serde_json::to_string(&a).unwrap();
        assert_eq!(Announcement::parse(&line), Some(a));
        assert_eq!(Announcement::parse("hello"), None);
        assert_eq!(Announcement::parse(r#"{"pixmesh":"other","role":"x"}"#), None);
    }
}
