//! The backends' URLs (`--database`, `--blobs`), parsed and checked before anything is opened.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where the job store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// A SQLite file (absolute, or made absolute under the data dir).
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL, as given.
    Postgres(String),
}

/// Where the blob store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobsUrl {
    /// A local directory (absolute, or made absolute under the data dir).
    File(PathBuf),
}

/// The scheme of `s` (`postgres` in `postgres://…`, `sqlite` in `sqlite:x.db`), if it has one.
/// A Windows-style drive letter or a path with a colon later on is not a scheme.
fn scheme(s: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = s.split_once(':')?;
    let valid = scheme.len() > 1
        && scheme.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some((scheme, rest))
}

fn local_path(rest: &str, data_dir: &Path) -> Result<PathBuf, String> {
    // `sqlite:x.db`, `sqlite:/abs/x.db`, `sqlite:///abs/x.db` and `sqlite://x.db` all name a file.
    let path = rest.strip_prefix("//").unwrap_or(rest);
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    let path = Path::new(path);
    Ok(if path.is_absolute() { path.to_path_buf() } else { data_dir.join(path) })
}

impl DatabaseUrl {
    pub fn parse(s: &str, data_dir: &Path) -> Result<DatabaseUrl, String> {
        let s = s.trim();
        match scheme(s) {
            None => local_path(s, data_dir).map(DatabaseUrl::Sqlite),
            Some(("sqlite", rest)) => local_path(rest, data_dir).map(DatabaseUrl::Sqlite),
            Some(("postgres" | "postgresql", rest)) => {
                let Some(authority) = rest.strip_prefix("//") else {
                    return Err(format!("{s:?} is not a PostgreSQL URL; write postgres://USER@HOST:PORT/DATABASE"));
                };
                let host = authority.split(['/', '?']).next().unwrap_or("");
                let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
                if host.is_empty() {
                    return Err(format!("{} names no host; write postgres://USER@HOST:PORT/DATABASE", redact(s)));
                }
                let port = host.rsplit_once(':').filter(|_| !host.ends_with(']')).map(|(_, p)| p);
                if let Some(port) = port
                    && port.parse::<u16>().is_err()
                {
                    return Err(format!("{}: the port {port:?} is not a number from 1 to 65535", redact(s)));
                }
                // The driver checks the rest (options, TLS modes) and says what is wrong.
                s.parse::<sqlx::postgres::PgConnectOptions>().map_err(|e| format!("{}: {e}", redact(s)))?;
                Ok(DatabaseUrl::Postgres(s.to_string()))
            }
            Some((other, _)) => {
                Err(format!("`{other}` is not a database pixmesh runs on; use sqlite:PATH or postgres://USER@HOST:PORT/DATABASE"))
            }
        }
    }
}

impl BlobsUrl {
    pub fn parse(s: &str, data_dir: &Path) -> Result<BlobsUrl, String> {
        let s = s.trim();
        match scheme(s) {
            None => local_path(s, data_dir).map(BlobsUrl::File),
            Some(("file", rest)) => local_path(rest, data_dir).map(BlobsUrl::File),
            Some((other, _)) => Err(format!("`{other}` is not a blob store this pixmesh runs on; use file:DIR")),
        }
    }
}

/// `s` with the password of its user part (if any) replaced by `***`: URLs end up in logs and
/// error messages.
pub fn redact(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else { return s.to_string() };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) if user.contains(':') => format!("{}:***@{host}", user.split(':').next().unwrap_or("")),
        _ => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_string(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            DatabaseUrl::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl fmt::Display for BlobsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobsUrl::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_name_sqlite_files_or_postgres_servers() {
        let data = Path::new("/srv/pixmesh");
        let sqlite = |s: &str| DatabaseUrl::parse(s, data).unwrap();
        assert_eq!(sqlite("sqlite:pixmesh.db"), DatabaseUrl::Sqlite("/srv/pixmesh/pixmesh.db".into()));
        assert_eq!(sqlite("pixmesh.db"), DatabaseUrl::Sqlite("/srv/pixmesh/pixmesh.db".into()), "a bare path, as older configs have");
        assert_eq!(sqlite("sqlite:/var/db/x.db"), DatabaseUrl::Sqlite("/var/db/x.db".into()));
        assert_eq!(sqlite("sqlite:///var/db/x.db"), DatabaseUrl::Sqlite("/var/db/x.db".into()));
        assert_eq!(sqlite("sqlite://x.db?mode=rwc"), DatabaseUrl::Sqlite("/srv/pixmesh/x.db".into()));
        let pg = "postgres://pixmesh:secret@db.internal:5432/pixmesh";
        assert_eq!(sqlite(pg), DatabaseUrl::Postgres(pg.into()));
        assert_eq!(DatabaseUrl::Postgres(pg.into()).to_string(), "postgres://pixmesh:***@db.internal:5432/pixmesh");
        assert!(matches!(sqlite("postgresql://u@h/d"), DatabaseUrl::Postgres(_)));
    }

    #[test]
    fn bad_database_urls_say_what_to_write() {
        let data = Path::new("/d");
        let err = |s: &str| DatabaseUrl::parse(s, data).unwrap_err();
        assert!(err("mysql://root@h/db").contains("`mysql` is not a database pixmesh runs on"));
        assert!(err("postgres:localhost").contains("postgres://USER@HOST:PORT/DATABASE"));
        assert!(err("postgres:///db").contains("names no host"));
        let e = err("postgres://u:hunter2@h:99999/db");
        assert!(e.contains("99999") && !e.contains("hunter2"), "passwords never reach messages: {e}");
        assert!(err("postgres://u@h:5432/db?sslmode=sometimes").contains("sslmode"));
        assert!(err("sqlite:").contains("empty"));
    }

    #[test]
    fn blob_urls_name_directories() {
        let data = Path::new("/d");
        assert_eq!(BlobsUrl::parse("file:blobs", data).unwrap(), BlobsUrl::File("/d/blobs".into()));
        assert_eq!(BlobsUrl::parse("blobs", data).unwrap(), BlobsUrl::File("/d/blobs".into()));
        assert_eq!(BlobsUrl::parse("file:///mnt/b", data).unwrap(), BlobsUrl::File("/mnt/b".into()));
        assert!(BlobsUrl::parse("gs://bucket", data).unwrap_err().contains("use file:DIR"));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://a:b@h/d"), "postgres://a:***@h/d");
        assert_eq!(redact("postgres://a@h/d"), "postgres://a@h/d");
        assert_eq!(redact("postgres://h/d?sslmode=require&password=x"), "postgres://h/d?sslmode=require&password=***");
        assert_eq!(redact("postgres://a:b:c@h"), "postgres://a:***@h");
    }
}
