//! A PostgreSQL database of a test's own, on the machine's server.
//!
//! The server is `$PIXMESH_TEST_POSTGRES` (a URL of a database to connect to for `CREATE
//! DATABASE`), by default `postgres://postgres@127.0.0.1:5432/postgres`. Each
//! [`TestDatabase`] is a fresh database with a unique name, dropped when the value is dropped.
//! A server that cannot be reached fails the test with what to do: these tests are part of the
//! suite, not optional.

use sqlx::Connection;
use sqlx::postgres::PgConnection;

pub const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The admin URL of the test server.
pub fn server_url() -> String {
    std::env::var("PIXMESH_TEST_POSTGRES").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| DEFAULT_SERVER.to_string())
}

pub struct TestDatabase {
    /// Connection URL of the new database.
    pub url: String,
    name: String,
    server: String,
}

impl TestDatabase {
    /// Creates `pixmesh_test_<tag>_<random>`.
    pub async fn create(tag: &str) -> TestDatabase {
        let server = server_url();
        let name = format!("pixmesh_test_{}_{:016x}", tag.replace(|c: char| !c.is_ascii_alphanumeric(), "_"), rand_u64());
        let mut conn = PgConnection::connect(&server).await.unwrap_or_else(|e| {
            panic!(
                "cannot reach the test PostgreSQL at {server}: {e}. Start it (see the README, \"Running the tests\") or point PIXMESH_TEST_POSTGRES at one"
            )
        });
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let _ = conn.close().await;
        let url = match server.rsplit_once('/') {
            Some((base, _)) if base.contains("://") && base.len() > "postgres://".len() => format!("{base}/{name}"),
            _ => format!("{server}/{name}"),
        };
        TestDatabase { url, name, server }
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.write_u32(std::process::id());
    h.finish()
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs inside or outside a runtime; a thread of its own with its own runtime works
        // in both. FORCE ends the connections a test's pool still holds.
        let (server, name) = (self.server.clone(), self.name.clone());
        let done = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&server).await {
                    if let Err(e) = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await {
                        eprintln!("could not drop the test database {name}: {e}");
                    }
                    let _ = conn.close().await;
                }
            });
        });
        let _ = done.join();
    }
}

/// A PostgreSQL server of a test's own (`initdb` into a temp dir, on an ephemeral port), for
/// tests that stop, kill or restart the database. Stopped (immediately) when dropped.
pub struct PgCluster {
    dir: tempfile::TempDir,
    pub port: u16,
    bin: std::path::PathBuf,
}

impl PgCluster {
    /// Creates and starts the cluster (trust auth, user `postgres`).
    pub fn start() -> PgCluster {
        let bin = pg_bindir();
        let dir = tempfile::Builder::new().prefix("pixmesh-pg-").tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        if is_root() {
            // PostgreSQL refuses to run as root: the cluster belongs to the postgres user.
            let status = std::process::Command::new("chown").arg("postgres:").arg(dir.path()).status();
            assert!(status.is_ok_and(|s| s.success()), "chown postgres {}", dir.path().display());
        }
        let data = dir.path().join("data");
        run_pg(&bin, "initdb", &["-D", &data.display().to_string(), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"]);
        let port = free_port();
        let cluster = PgCluster { dir, port, bin };
        cluster.start_again();
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Starts the (stopped) server again on the same port and data.
    pub fn start_again(&self) {
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.path().display());
        let log = self.dir.path().join("log").display().to_string();
        run_pg(&self.bin, "pg_ctl", &["-D", &self.data(), "-o", &options, "-l", &log, "-w", "-t", "60", "start"]);
    }

    /// Stops the server the way a crash would (`immediate`: no checkpoint, connections cut).
    pub fn kill(&self) {
        run_pg(&self.bin, "pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "stop"]);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = pg_command(&self.bin, "pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "stop"]).output();
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn pg_bindir() -> std::path::PathBuf {
    if let Ok(out) = std::process::Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| panic!("no PostgreSQL server binaries (initdb, pg_ctl) found; install PostgreSQL"))
}

fn pg_command(bin: &std::path::Path, tool: &str, args: &[&str]) -> std::process::Command {
    let exe = bin.join(tool);
    let mut cmd = if is_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(exe);
        c
    } else {
        std::process::Command::new(exe)
    };
    cmd.args(args);
    cmd
}

fn run_pg(bin: &std::path::Path, tool: &str, args: &[&str]) {
    let out = pg_command(bin, tool, args).output().unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(54329)
}

/// The job store profile end-to-end tests run on: `PIXMESH_E2E_DATABASE=postgres` runs every
/// system on PostgreSQL (a database of its own on the test server); unset or `sqlite`, on the
/// embedded SQLite file.
pub fn e2e_on_postgres() -> bool {
    match std::env::var("PIXMESH_E2E_DATABASE").unwrap_or_default().as_str() {
        "" | "sqlite" => false,
        "postgres" => true,
        other => panic!("PIXMESH_E2E_DATABASE={other:?}: use sqlite or postgres"),
    }
}

/// The database of the system on `data_dir`: one per data dir, kept for the life of the test
/// process, so a system restarted on the same data dir finds its jobs. Databases are named after
/// the process that made them; each test process drops, when it makes its first, those whose
/// process is gone (and `.ci/run` drops what the last one leaves).
pub async fn database_for(data_dir: &std::path::Path) -> String {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    static DATABASES: OnceLock<tokio::sync::Mutex<HashMap<std::path::PathBuf, String>>> = OnceLock::new();
    let mut databases = DATABASES.get_or_init(Default::default).lock().await;
    if let Some(url) = databases.get(data_dir) {
        return url.clone();
    }
    let server = server_url();
    let mut conn = PgConnection::connect(&server)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL at {server}: {e}. Start it or point PIXMESH_TEST_POSTGRES at one"));
    if databases.is_empty() {
        drop_stale(&mut conn).await;
    }
    let name = format!("pixmesh_e2e_{}_{}", std::process::id(), databases.len());
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await.unwrap_or_else(|e| panic!("{e}"));
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    let _ = conn.close().await;
    let url = match server.rsplit_once('/') {
        Some((base, _)) if base.len() > "postgres://".len() => format!("{base}/{name}"),
        _ => format!("{server}/{name}"),
    };
    databases.insert(data_dir.to_path_buf(), url.clone());
    url
}

/// Drops the e2e databases of test processes that are no longer running.
async fn drop_stale(conn: &mut PgConnection) {
    let names: Vec<(String,)> = sqlx::query_as("SELECT datname FROM pg_database WHERE datname LIKE 'pixmesh\\_e2e\\_%'")
        .fetch_all(&mut *conn)
        .await
        .unwrap_or_default();
    for (name,) in names {
        let pid = name.trim_start_matches("pixmesh_e2e_").split('_').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut *conn).await;
        }
    }
}
