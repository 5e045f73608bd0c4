//! `pixmesh`: one binary, a subcommand per role. Parses flags and config, sets up telemetry,
//! binds listeners, and hands them to the role's `run`.

mod config;
mod health;
mod openapi;
mod submit;
mod thumbnail;

use anyhow::Context;
use clap::{Parser, Subcommand};
use config::Config;
use pixmesh_chassis::Shutdown;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::net::TcpListener;

/// Exit status for a bad configuration or command line (sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(name = "pixmesh", version, about = "A distributed image-processing service with its middleware built in")]
struct Cli {
    /// TOML configuration file (see pixmesh.example.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override one setting, e.g. --set worker.threads=4 (repeatable; later wins).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// The job store: sqlite:PATH or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE
    /// (the setting store.database; default sqlite:pixmesh.db under the data dir).
    #[arg(long, global = true, value_name = "URL", env = "PIXMESH_DATABASE")]
    database: Option<String>,
    /// The blob store: file:DIR or s3://BUCKET[/PREFIX]?endpoint=URL&region=R, with the keys in
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the setting store.blobs; default file:blobs
    /// under the data dir).
    #[arg(long, global = true, value_name = "URL", env = "PIXMESH_BLOBS")]
    blobs: Option<String>,
    /// The broker: nats://HOST:PORT (the setting queue.url; default none: distributors poll
    /// the database for work).
    #[arg(long, global = true, value_name = "URL", env = "PIXMESH_QUEUE")]
    queue: Option<String>,
    /// The worker registry: nats://HOST:PORT for NATS KV (the settings distributor.registry and
    /// worker.registry; default pixmesh's own registry role).
    #[arg(long, global = true, value_name = "URL", env = "PIXMESH_REGISTRY")]
    registry: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole system on this machine: every role as a supervised process.
    Up {
        /// Where jobs, events and images are kept.
        #[arg(long, default_value = "./pixmesh-data")]
        data_dir: PathBuf,
        /// Gateway address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Number of image workers.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Seconds each role gets to drain after SIGTERM.
        #[arg(long, default_value_t = 20)]
        grace_secs: u64,
        /// mTLS between every role and HTTPS on the gateway, with certificates from a
        /// development CA kept in DATA_DIR/tls (clients trust DATA_DIR/tls/ca.pem).
        #[arg(long)]
        tls: bool,
    },
    /// The public HTTP gateway.
    Gateway,
    /// The upload service.
    Upload,
    /// The status service.
    Status,
    /// The distributor.
    Distributor,
    /// An image worker (gRPC).
    Worker,
    /// The service registry (gRPC).
    Registry,
    /// Make thumbnails of local files (no server), like vipsthumbnail.
    Thumbnail(thumbnail::ThumbnailArgs),
    /// Maintenance of a deployment's stores (run beside it, on the same settings).
    #[command(subcommand)]
    Admin(Admin),
    /// Print the public API's OpenAPI 3.1 document (what `GET /api/openapi.json` serves).
    Openapi,
    /// Upload images through a gateway, follow their jobs and download the results (a client).
    Submit(submit::SubmitArgs),
    /// Check a role's admin endpoint: exit 0 on a 2xx (a container's health check).
    Health(health::HealthArgs),
    /// An ambassador beside an application (a proxy it talks to on localhost).
    #[command(subcommand)]
    Ambassador(Ambassador),
    /// An adapter beside an application: its metrics, logs or health in the platform's shape.
    #[command(subcommand)]
    Sidecar(Sidecar),
}

#[derive(Subcommand, Debug)]
enum Sidecar {
    /// In front of an application: TLS (certificates reloaded on change), callers' API keys or
    /// client certificates (mTLS), per-caller rate limits, body limits, access log and metrics,
    /// then plain HTTP to the application (the settings sidecar.inbound.*; keys as the
    /// gateway's, PIXMESH_API_KEY included).
    Inbound {
        /// Where callers connect (sidecar.inbound.listen).
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
        /// The application, http://127.0.0.1:PORT (sidecar.inbound.app).
        #[arg(long, value_name = "URL")]
        app: Option<String>,
        /// The certificate chain, PEM (sidecar.inbound.tls.cert).
        #[arg(long, value_name = "FILE")]
        tls_cert: Option<String>,
        /// Its private key, PEM (sidecar.inbound.tls.key).
        #[arg(long, value_name = "FILE")]
        tls_key: Option<String>,
        /// CA certificates for client certificates, PEM (sidecar.inbound.tls.client_ca).
        #[arg(long, value_name = "FILE")]
        client_ca: Option<String>,
        /// none, optional or required (sidecar.inbound.tls.client_auth).
        #[arg(long, value_name = "MODE")]
        client_auth: Option<String>,
    },
    /// The ambassador for an application's calls to remote services: one local port per
    /// service (sidecar.outbound.services), instances from a list, DNS or the registry,
    /// balanced with breakers, over TLS or mTLS, with deadlines and budgeted retries.
    Outbound,
    /// Scrape an application's own metrics (Redis INFO, nginx stub_status) and serve them as
    /// Prometheus text on /metrics (the settings sidecar.metrics.*).
    Metrics {
        /// Where /metrics is served (sidecar.metrics.listen).
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
        /// redis://HOST:PORT or nginx+http://HOST:PORT/PATH (sidecar.metrics.source).
        #[arg(long, value_name = "URL")]
        source: Option<String>,
    },
    /// Follow a log file through rotations and write each line to stdout as JSON
    /// (the settings sidecar.logs.*).
    Logs {
        /// The file (sidecar.logs.path).
        #[arg(long, value_name = "FILE")]
        path: Option<String>,
        /// auto, nginx, json or plain (sidecar.logs.format).
        #[arg(long)]
        format: Option<String>,
        /// Read the lines the file holds already (sidecar.logs.from_start).
        #[arg(long)]
        from_start: bool,
    },
    /// Run checks (tcp://, http://, redis://, postgres://, sqlite:, cmd:) and serve their
    /// outcome as /readyz and /healthz (the settings sidecar.health.*).
    Health {
        /// Where /readyz and /healthz are served (sidecar.health.listen).
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
        /// A readiness check, [NAME=]SPEC (repeatable; sidecar.health.checks).
        #[arg(long = "check", value_name = "SPEC")]
        checks: Vec<String>,
        /// A liveness check, [NAME=]SPEC (repeatable; sidecar.health.live_checks).
        #[arg(long = "live-check", value_name = "SPEC")]
        live_checks: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum Ambassador {
    /// One Redis address whose keys live on several Redis servers: consistent hashing
    /// (twemproxy's ketama placement), pipelining kept, shards that fail ejected
    /// (the settings ambassador.redis.*).
    Redis {
        /// Where applications connect (ambassador.redis.listen).
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
        /// The shards, comma-separated: [NAME=]HOST:PORT[:WEIGHT] (ambassador.redis.shards).
        #[arg(long, value_name = "LIST", value_delimiter = ',')]
        shards: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum Admin {
    /// Make the status read model (`job_views`) again from the job events: every view
    /// deleted, then every job's history folded and written. Safe while the system runs.
    RebuildViews,
}

impl Command {
    fn role(&self) -> &'static str {
        match self {
            Command::Up { .. } => "up",
            Command::Gateway => "gateway",
            Command::Upload => "upload",
            Command::Status => "status",
            Command::Distributor => "distributor",
            Command::Worker => "worker",
            Command::Registry => "registry",
            Command::Thumbnail(_) => "thumbnail",
            Command::Admin(_) => "admin",
            Command::Openapi => "openapi",
            Command::Submit(_) => "submit",
            Command::Health(_) => "health",
            Command::Ambassador(_) => "ambassador",
            Command::Sidecar(_) => "sidecar",
        }
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Command::Health(args) = &cli.command {
        let outcome = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(health::check(args)));
        return match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pixmesh health: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Submit(args) = cli.command {
        // A client: no configuration, no logs, a runtime of its own.
        let outcome = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(submit::run(args)));
        return match outcome {
            Ok(summary) if summary.failed.is_empty() => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("pixmesh submit: {e:#}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    // The backend flags are settings like any other: as `--set`s they reach every role that
    // `up` starts, and a gateway reload, the same way.
    let registry = cli.registry.take();
    // The flag is for a registry that is not pixmesh's own (pixmesh's own is a role, and `up`
    // starts it); anything else than NATS is a mistake, not something to ignore.
    if let Some(url) = &registry
        && let Err(e) = pixmesh_queue::nats_url("--registry", url)
    {
        eprintln!("pixmesh: {e} (pixmesh's own registry needs no flag: `up` starts it, and roles take --set worker.registry=HOST:PORT)");
        return ExitCode::from(EXIT_CONFIG);
    }
    for (key, value) in [
        ("store.database", cli.database.take()),
        ("store.blobs", cli.blobs.take()),
        ("queue.url", cli.queue.take()),
        ("distributor.registry", registry.clone()),
        ("worker.registry", registry),
    ] {
        if let Some(value) = value {
            cli.sets.push(format!("{key}={}", toml_string(&value)));
        }
    }
    if let Command::Ambassador(Ambassador::Redis { listen, shards }) = &cli.command {
        if let Some(listen) = listen {
            cli.sets.push(format!("ambassador.redis.listen={}", toml_string(listen)));
        }
        if !shards.is_empty() {
            let list: Vec<String> = shards.iter().map(|s| toml_string(s.trim())).collect();
            cli.sets.push(format!("ambassador.redis.shards=[{}]", list.join(",")));
        }
    }
    if let Command::Sidecar(sidecar) = &cli.command {
        let list = |items: &[String]| format!("[{}]", items.iter().map(|s| toml_string(s)).collect::<Vec<_>>().join(","));
        let sets: Vec<(&str, Option<String>)> = match sidecar {
            Sidecar::Inbound { listen, app, tls_cert, tls_key, client_ca, client_auth } => vec![
                ("sidecar.inbound.listen", listen.as_deref().map(toml_string)),
                ("sidecar.inbound.app", app.as_deref().map(toml_string)),
                ("sidecar.inbound.tls.cert", tls_cert.as_deref().map(toml_string)),
                ("sidecar.inbound.tls.key", tls_key.as_deref().map(toml_string)),
                ("sidecar.inbound.tls.client_ca", client_ca.as_deref().map(toml_string)),
                ("sidecar.inbound.tls.client_auth", client_auth.as_deref().map(toml_string)),
            ],
            Sidecar::Outbound => vec![],
            Sidecar::Metrics { listen, source } => {
                vec![
                    ("sidecar.metrics.listen", listen.as_deref().map(toml_string)),
                    ("sidecar.metrics.source", source.as_deref().map(toml_string)),
                ]
            }
            Sidecar::Logs { path, format, from_start } => vec![
                ("sidecar.logs.path", path.as_deref().map(toml_string)),
                ("sidecar.logs.format", format.as_deref().map(toml_string)),
                ("sidecar.logs.from_start", from_start.then(|| "true".to_string())),
            ],
            Sidecar::Health { listen, checks, live_checks } => vec![
                ("sidecar.health.listen", listen.as_deref().map(toml_string)),
                ("sidecar.health.checks", (!checks.is_empty()).then(|| list(checks))),
                ("sidecar.health.live_checks", (!live_checks.is_empty()).then(|| list(live_checks))),
            ],
        };
        for (key, value) in sets {
            if let Some(value) = value {
                cli.sets.push(format!("{key}={value}"));
            }
        }
    }
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match load_config(&cli, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pixmesh: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::Ambassador(Ambassador::Redis { .. }) = &cli.command
        && let Err(e) = config.ambassador.redis.shard_specs()
    {
        eprintln!("pixmesh: invalid configuration: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let missing = match &cli.command {
        Command::Sidecar(Sidecar::Metrics { .. }) => pixmesh_sidecar::metrics::Source::parse(&config.sidecar.metrics.source).err(),
        Command::Sidecar(Sidecar::Logs { .. }) if config.sidecar.logs.path.as_os_str().is_empty() => {
            Some("sidecar.logs.path is empty: give the log file to follow (--path FILE)".to_string())
        }
        Command::Sidecar(Sidecar::Outbound) if config.sidecar.outbound.services.is_empty() => {
            Some("sidecar.outbound.services is empty: give at least one remote service ([[sidecar.outbound.services]])".to_string())
        }
        Command::Sidecar(Sidecar::Health { .. })
            if config.sidecar.health.checks.is_empty() && config.sidecar.health.live_checks.is_empty() =>
        {
            Some("sidecar.health.checks is empty: give at least one check (--check tcp://HOST:PORT …)".to_string())
        }
        _ => None,
    };
    if let Some(e) = missing {
        eprintln!("pixmesh: invalid configuration: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    if let Command::Openapi = cli.command {
        return match openapi::json() {
            Ok(doc) => {
                println!("{doc}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pixmesh openapi: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Thumbnail(args) = cli.command {
        return match thumbnail::run(args) {
            Ok(0) => ExitCode::SUCCESS,
            Ok(failed) => {
                eprintln!("pixmesh thumbnail: {failed} file(s) failed");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("pixmesh thumbnail: {e:#}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    let role = cli.command.role();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pixmesh: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The trace exporter's gRPC channel lives on the runtime.
    let exporter = {
        let _runtime = runtime.enter();
        match pixmesh_chassis::telemetry::init(role, &config.log, &env) {
            Ok(exporter) => exporter,
            Err(e) => {
                eprintln!("pixmesh: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    };
    pixmesh_chassis::telemetry::init_metrics(role);
    describe_metrics(role);
    pixmesh_chassis::clock::init(&config.chassis);
    let outcome = runtime.block_on(run(cli.command, config, env, cli.config.clone(), cli.sets.clone()));
    if let Err(e) = &outcome {
        tracing::error!(error = format!("{e:#}"), "{role} stopped with an error");
    }
    if let Some(exporter) = exporter {
        // The last spans go out while the runtime still drives the channel.
        let flushed = runtime.spawn_blocking(move || exporter.shutdown());
        let _ = runtime.block_on(flushed);
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pixmesh {role}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The help text and unit of every metric the role records (each crate's `instruments`).
fn describe_metrics(role: &str) {
    pixmesh_chassis::instruments::describe();
    match role {
        // The sidecar's inbound side is the gateway's stack, with its metrics.
        "gateway" => pixmesh_gateway::instruments::describe(),
        "sidecar" => {
            pixmesh_gateway::instruments::describe();
            pixmesh_sidecar::instruments::describe();
        }
        "upload" => {
            pixmesh_upload::instruments::describe();
            pixmesh_store::instruments::describe();
        }
        "status" => {
            pixmesh_status::instruments::describe();
            pixmesh_store::instruments::describe();
        }
        "distributor" => {
            pixmesh_distributor::instruments::describe();
            pixmesh_store::instruments::describe();
            pixmesh_queue::instruments::describe();
        }
        "worker" => pixmesh_worker::instruments::describe(),
        "registry" => pixmesh_registry::instruments::describe(),
        "ambassador" => pixmesh_ambassador::instruments::describe(),
        _ => {}
    }
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Opens the stores before any port is bound: a bad URL or an unreachable engine stops the
/// role with a message that names the setting, and nothing ever listened.
async fn open_stores(store: &pixmesh_store::StoreConfig) -> anyhow::Result<pixmesh_store::Stores> {
    Ok(pixmesh_store::Stores::open(store).await?)
}

/// Connects to the broker (when `queue.url` is set) before any port is bound, for the same
/// reason.
async fn connect_queue(queue: &pixmesh_queue::QueueConfig, role: &str) -> anyhow::Result<Option<pixmesh_queue::Queue>> {
    if !queue.enabled() {
        return Ok(None);
    }
    Ok(Some(pixmesh_queue::Queue::connect(queue, role).await?))
}

/// A registry on NATS must answer before any port is bound.
async fn check_registry(url: &str, setting: &str) -> anyhow::Result<()> {
    if is_nats(url) {
        pixmesh_queue::connect_client(url, "check", std::time::Duration::from_secs(3), setting).await?;
    }
    Ok(())
}

fn is_nats(url: &str) -> bool {
    url.starts_with("nats://") || url.starts_with("tls://")
}

fn load_config(cli: &Cli, env: &HashMap<String, String>) -> anyhow::Result<Config> {
    load_config_from(cli.config.as_deref(), &cli.sets, env)
}

fn load_config_from(file: Option<&std::path::Path>, sets: &[String], env: &HashMap<String, String>) -> anyhow::Result<Config> {
    let mut overrides = Vec::new();
    for s in sets {
        let (key, value) = s.split_once('=').with_context(|| format!("--set {s:?} must look like key=value"))?;
        overrides.push((key.trim().to_string(), pixmesh_chassis::config::scalar(value.trim())));
    }
    Ok(pixmesh_chassis::config::load(file, env, &overrides)?)
}

async fn bind(what: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// Under `pixmesh up`, a closed stdin means the supervisor is gone: shut down.
/// A plain OS thread does the blocking read: a tokio blocking task would keep the runtime
/// from shutting down at exit, since the read only returns when the supervisor goes away.
fn exit_with_supervisor(env: &HashMap<String, String>, shutdown: &Shutdown) {
    if env.get(pixmesh_supervisor::SUPERVISED_ENV).map(String::as_str) != Some("1") {
        return;
    }
    let shutdown = shutdown.clone();
    let spawned = std::thread::Builder::new().name("supervisor-watch".into()).spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 64];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the supervisor through stdin");
                    return;
                }
            }
        }
        tracing::warn!("supervisor is gone; shutting down");
        shutdown.trigger();
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot watch the supervisor");
    }
}

/// Where the gateway's stack (the gateway, the sidecar's inbound side) reads its configuration,
/// at start and on every reload: the file, the environment and `--set`, through `section`; and
/// the keys of `PIXMESH_API_KEY` / `PIXMESH_ADMIN_API_KEY`.
fn gateway_source(
    env: &HashMap<String, String>,
    config_file: Option<PathBuf>,
    sets: Vec<String>,
    section: fn(Config) -> pixmesh_gateway::GatewayConfig,
) -> pixmesh_gateway::Source {
    let key = |name: &str, var: &str| env.get(var).filter(|k| !k.is_empty()).map(|k| (name.to_string(), k.clone())).into_iter().collect();
    let (plain_keys, admin_keys) = (key("env", "PIXMESH_API_KEY"), key("admin", "PIXMESH_ADMIN_API_KEY"));
    let (file, reload_env) = (config_file.clone(), env.clone());
    let load: pixmesh_gateway::reload::LoadConfig =
        std::sync::Arc::new(move || load_config_from(file.as_deref(), &sets, &reload_env).map(section).map_err(|e| format!("{e:#}")));
    pixmesh_gateway::Source { load, config_file, plain_keys, admin_keys }
}

async fn run(
    command: Command,
    config: Config,
    env: HashMap<String, String>,
    config_file: Option<PathBuf>,
    sets: Vec<String>,
) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    shutdown.on_signals()?;
    exit_with_supervisor(&env, &shutdown);
    let store = config.store.clone();
    match command {
        Command::Up { data_dir, listen, workers, grace_secs, tls } => {
            // The roles open the stores themselves; opening them here first refuses a bad
            // URL or an unreachable engine before anything starts, and applies migrations once.
            drop(open_stores(&store.clone().with_data_dir(&data_dir)).await?);
            drop(connect_queue(&config.queue, "up").await?);
            let external_registry = Some(config.distributor.registry.clone()).filter(|r| is_nats(r));
            if let Some(url) = &external_registry {
                check_registry(url, "distributor.registry").await?;
            }
            let exe = std::env::current_exe().context("cannot find the pixmesh binary")?;
            let options = pixmesh_supervisor::UpOptions {
                exe,
                config_file,
                sets,
                data_dir,
                listen,
                workers,
                external_registry,
                grace: std::time::Duration::from_secs(grace_secs),
                tls,
            };
            pixmesh_supervisor::run(options, shutdown).await
        }
        Command::Gateway => {
            let c = config.gateway;
            let source = gateway_source(&env, config_file, sets, |c| c.gateway);
            // The whole configuration, the keys file included, is checked before binding.
            let prepared = pixmesh_gateway::prepare(source).map_err(|e| anyhow::anyhow!("gateway configuration: {e}"))?;
            let http = bind("gateway", c.listen).await?;
            let admin = bind("gateway admin", c.admin_listen).await?;
            Ok(pixmesh_gateway::serve(prepared, http, admin, shutdown).await?)
        }
        Command::Sidecar(Sidecar::Inbound { .. }) => {
            let c = config.sidecar.inbound;
            let source = gateway_source(&env, config_file, sets, |c| c.sidecar.inbound.gateway());
            let prepared = pixmesh_gateway::prepare(source).map_err(|e| anyhow::anyhow!("sidecar configuration: {e}"))?;
            let http = bind("sidecar inbound", c.listen).await?;
            let admin = bind("sidecar admin", c.admin_listen).await?;
            let surface = pixmesh_gateway::Surface::Sidecar;
            Ok(pixmesh_gateway::serve_as(surface, "sidecar", prepared, http, admin, shutdown).await?)
        }
        Command::Upload => {
            let mut c = config.upload;
            c.signed_urls = config.gateway.signed_urls.clone();
            let mut stores = open_stores(&store).await?;
            if let Some(queue) = connect_queue(&config.queue, "upload").await? {
                stores = stores.with_notify(std::sync::Arc::new(queue));
            }
            let (http, admin) = (bind("upload", c.listen).await?, bind("upload admin", c.admin_listen).await?);
            Ok(pixmesh_upload::run(c, stores, http, admin, shutdown).await?)
        }
        Command::Status => {
            let mut c = config.status;
            c.signed_urls = config.gateway.signed_urls.clone();
            c.openapi = Some(std::sync::Arc::new(openapi::json()?));
            let stores = open_stores(&store).await?;
            let (http, admin) = (bind("status", c.listen).await?, bind("status admin", c.admin_listen).await?);
            Ok(pixmesh_status::run(c, stores, http, admin, shutdown).await?)
        }
        Command::Distributor => {
            let c = config.distributor;
            if c.registry.is_empty() && c.dns.is_empty() && c.workers.is_empty() {
                anyhow::bail!("the distributor needs distributor.registry, distributor.dns or distributor.workers");
            }
            let stores = open_stores(&store).await?;
            let queue = connect_queue(&config.queue, "distributor").await?;
            check_registry(&c.registry, "distributor.registry").await?;
            let admin = bind("distributor admin", c.admin_listen).await?;
            Ok(pixmesh_distributor::run(c, stores, queue, admin, shutdown).await?)
        }
        Command::Worker => {
            let c = config.worker;
            check_registry(&c.registry, "worker.registry").await?;
            let (grpc, admin) = (bind("worker", c.listen).await?, bind("worker admin", c.admin_listen).await?);
            Ok(pixmesh_worker::run(c, grpc, admin, shutdown).await?)
        }
        Command::Registry => {
            let c = config.registry;
            let (grpc, admin) = (bind("registry", c.listen).await?, bind("registry admin", c.admin_listen).await?);
            Ok(pixmesh_registry::run(c, grpc, admin, shutdown).await?)
        }
        Command::Ambassador(Ambassador::Redis { .. }) => {
            let c = config.ambassador.redis;
            let (redis, admin) = (bind("redis ambassador", c.listen).await?, bind("ambassador admin", c.admin_listen).await?);
            pixmesh_ambassador::redis::run(c, redis, admin, shutdown).await.map_err(anyhow::Error::msg)
        }
        Command::Sidecar(Sidecar::Outbound) => {
            let c = config.sidecar.outbound;
            let mut services = Vec::new();
            for service in &c.services {
                services.push((service.clone(), bind(&format!("sidecar outbound {}", service.name), service.listen).await?));
            }
            let admin = bind("sidecar admin", c.admin_listen).await?;
            let bound = pixmesh_sidecar::outbound::Bound { services };
            pixmesh_sidecar::outbound::run(c, bound, admin, shutdown).await.map_err(anyhow::Error::msg)
        }
        Command::Sidecar(Sidecar::Metrics { .. }) => {
            let c = config.sidecar.metrics;
            let http = bind("sidecar metrics", c.listen).await?;
            pixmesh_sidecar::run_metrics(c, http, shutdown).await.map_err(anyhow::Error::msg)
        }
        Command::Sidecar(Sidecar::Health { .. }) => {
            let c = config.sidecar.health;
            let http = bind("sidecar health", c.listen).await?;
            pixmesh_sidecar::run_health(c, http, shutdown).await.map_err(anyhow::Error::msg)
        }
        Command::Sidecar(Sidecar::Logs { .. }) => {
            pixmesh_sidecar::run_logs(config.sidecar.logs, shutdown).await.map_err(anyhow::Error::msg)
        }
        Command::Thumbnail(_) | Command::Openapi | Command::Submit(_) | Command::Health(_) => Ok(()),
        Command::Admin(Admin::RebuildViews) => {
            // The database alone: a rebuild needs no blob store (nor its credentials).
            let db = pixmesh_store::Stores::open_database(&store).await?;
            let started = std::time::Instant::now();
            let views =
                pixmesh_status::projection::rebuild(db.jobs.as_ref(), db.views.as_ref()).await.context("rebuilding the status views")?;
            println!("{}", serde_json::json!({ "pixmesh": "views_rebuilt", "views": views, "ms": started.elapsed().as_millis() as u64 }));
            Ok(())
        }
    }
}
