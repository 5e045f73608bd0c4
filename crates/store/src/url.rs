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
    /// An S3 bucket (AWS or any S3-compatible server).
    S3(S3Url),
}

/// `s3://BUCKET[/PREFIX]?endpoint=URL&region=R`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Key prefix without leading or trailing `/`; empty for the bucket's root.
    pub prefix: String,
    /// The server's base URL (`http://127.0.0.1:9000`); `None` for AWS itself.
    pub endpoint: Option<String>,
    /// `None`: from `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
}

const S3_FORM: &str = "write s3://BUCKET[/PREFIX]?endpoint=URL&region=R";

impl S3Url {
    fn parse(s: &str, rest: &str) -> Result<S3Url, String> {
        let Some(rest) = rest.strip_prefix("//") else { return Err(format!("{s:?} is not an S3 URL; {S3_FORM}")) };
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        // The bucket naming rules of S3 (3 to 63 lowercase letters, digits, dots and hyphens,
        // starting and ending with a letter or digit).
        let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !(3..=63).contains(&bucket.len())
            || !bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'))
            || !edge_ok(bucket.chars().next())
            || !edge_ok(bucket.chars().last())
        {
            return Err(format!("{bucket:?} is not an S3 bucket name (3 to 63 lowercase letters, digits, dots and hyphens); {S3_FORM}"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|part| matches!(part, "." | "..") || (part.is_empty() && !prefix.is_empty())) {
            return Err(format!("the key prefix {prefix:?} has an empty, `.` or `..` part"));
        }
        let (mut endpoint, mut region) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("endpoint", url)) => {
                    let url = url.trim_end_matches('/');
                    let host = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
                    if host.is_none_or(|h| h.is_empty() || h.contains(['/', '?', '#'])) {
                        return Err(format!("endpoint={url:?} is not a server URL; write endpoint=http://HOST:PORT or https://HOST"));
                    }
                    endpoint = Some(url.to_string());
                }
                Some(("region", r)) if !r.is_empty() && r.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => {
                    region = Some(r.to_string())
                }
                Some(("region", r)) => return Err(format!("region={r:?} is not a region name")),
                _ => {
                    return Err(format!(
                        "{pair:?}: S3 URLs take endpoint= and region= only (credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
                    ));
                }
            }
        }
        Ok(S3Url { bucket: bucket.to_string(), prefix: prefix.to_string(), endpoint, region })
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        let params: Vec<String> = [("endpoint", &self.endpoint), ("region", &self.region)]
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
            .collect();
        if !params.is_empty() {
            write!(f, "?{}", params.join("&"))?;
        }
        Ok(())
    }
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
            Some(("s3", rest)) => S3Url::parse(s, rest).map(BlobsUrl::S3),
            Some((other, _)) => Err(format!("`{other}` is not a blob store this pixmesh runs on; use file:DIR or s3://BUCKET[/PREFIX]")),
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
            BlobsUrl::S3(url) => url.fmt(f),
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
        assert!(BlobsUrl::parse("gs://bucket", data).unwrap_err().contains("use file:DIR or s3://"));
    }

    #[test]
    fn blob_urls_name_s3_buckets() {
        let data = Path::new("/d");
        let url = BlobsUrl::parse("s3://pix-mesh.1/a/b/?endpoint=http://127.0.0.1:9000/&region=eu-west-1", data).unwrap();
        let BlobsUrl::S3(s3) = &url else { panic!("{url:?}") };
        assert_eq!(s3.bucket, "pix-mesh.1");
        assert_eq!(s3.prefix, "a/b");
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.region.as_deref(), Some("eu-west-1"));
        assert_eq!(url.to_string(), "s3://pix-mesh.1/a/b?endpoint=http://127.0.0.1:9000&region=eu-west-1");
        assert_eq!(BlobsUrl::parse(&url.to_string(), data).unwrap(), url, "the display form parses back");
        let plain = BlobsUrl::parse("s3://bucket", data).unwrap();
        assert_eq!(plain, BlobsUrl::S3(S3Url { bucket: "bucket".into(), prefix: String::new(), endpoint: None, region: None }));
        for (bad, says) in [
            ("s3:bucket", "is not an S3 URL"),
            ("s3://", "is not an S3 bucket name"),
            ("s3://Bucket", "is not an S3 bucket name"),
            ("s3://ab", "is not an S3 bucket name"),
            ("s3://-bucket", "is not an S3 bucket name"),
            ("s3://bucket/a//b", "empty, `.` or `..` part"),
            ("s3://bucket/../x", "empty, `.` or `..` part"),
            ("s3://bucket?endpoint=localhost:9000", "is not a server URL"),
            ("s3://bucket?endpoint=http://", "is not a server URL"),
            ("s3://bucket?region=", "is not a region name"),
            ("s3://bucket?secret=x", "take endpoint= and region= only"),
        ] {
            let err = BlobsUrl::parse(bad, data).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://a:b@h/d"), "postgres://a:***@h/d");
        assert_eq!(redact("postgres://a@h/d"), "postgres://a@h/d");
        assert_eq!(redact("postgres://h/d?sslmode=require&password=x"), "postgres://h/d?sslmode=require&password=***");
        assert_eq!(redact("postgres://a:b:c@h"), "postgres://a:***@h");
    }
}
