//! `pixmesh up`: the whole system on one machine, as supervised child processes on loopback.
//!
//! Start order follows dependencies: registry → upload, status → workers → distributor →
//! gateway. Each child binds its ports (port 0 unless configured) and announces them on stdout
//! ([`pixmesh_chassis::announce`]); `up` passes those addresses to the roles that need them.
//! A child that dies is restarted with exponential backoff on the same addresses, and a crash
//! loop is reported loudly. On SIGINT/SIGTERM children are stopped in reverse order, each with
//! SIGTERM and a grace period, then SIGKILL.
//!
//! Children watch their stdin: when `up` dies, the pipe closes and they shut down, so a killed
//! supervisor leaves no orphans.
//!
//! With `--tls` every hop between roles is mTLS (gateway → upload and status, distributor →
//! workers, workers and distributor → registry) and the gateway serves HTTPS, each role with a
//! certificate of its own from a development CA in the data dir ([`certs`]).

mod certs;
mod child;
mod keys;

use child::{ChildSpec, Supervised};
use pixmesh_chassis::Shutdown;
use pixmesh_chassis::announce::Announcement;
use std::path::PathBuf;
use std::time::Duration;

/// Environment variable that tells a role it runs under `pixmesh up` (and should exit when its
/// stdin closes).
pub const SUPERVISED_ENV: &str = "PIXMESH_SUPERVISED";

#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The `pixmesh` binary to run the roles with.
    pub exe: PathBuf,
    pub config_file: Option<PathBuf>,
    /// `key=value` overrides given to `up`, passed on to every child.
    pub sets: Vec<String>,
    pub data_dir: PathBuf,
    /// Gateway listen address.
    pub listen: String,
    pub workers: usize,
    /// A registry that is not pixmesh's own (`nats://…`): the registry role is not started, and
    /// workers and the distributor use this one.
    pub external_registry: Option<String>,
    /// Time each child gets to stop after SIGTERM.
    pub grace: Duration,
    /// mTLS on every hop between roles, and TLS on the gateway, with certificates from a
    /// development CA in the data dir (see [`certs`]).
    pub tls: bool,
}

fn set(key: &str, value: &str) -> [String; 2] {
    ["--set".to_string(), format!("{key}={}", toml_string(value))]
}

fn toml_string(s: &str) -> String {
    let escaped = s.replace('\\', "\\\\").replace('"', "\\\"");
    format!("\"{escaped}\"")
}

fn addr<'a>(a: &'a Announcement, name: &str) -> anyhow::Result<&'a str> {
    a.get(name).ok_or_else(|| anyhow::anyhow!("{} did not announce its {name} address", a.role))
}

/// The children's admin ports as an inline TOML table, `{"worker-1" = "http://127.0.0.1:…", …}`.
fn admin_sources<'a>(children: impl Iterator<Item = (&'a str, &'a Announcement)>) -> String {
    let entries: Vec<String> = children
        .filter_map(|(name, announcement)| {
            Some(format!("{} = {}", toml_string(name), toml_string(&format!("http://{}", announcement.get("admin")?))))
        })
        .collect();
    format!("{{{}}}", entries.join(", "))
}

/// The settings that give child `name` its certificate: `server` (a `[section.tls]`, with
/// `Some(callers)`: requiring a certificate from the CA that names one of those children; with
/// `None`, for the public gateway, asking for none) and `client` (a `[section.client_tls]` to
/// call the others with).
fn tls_sets(
    pki: Option<&certs::DevPki>,
    name: &str,
    server: Option<(&str, Option<&[String]>)>,
    client: Option<&str>,
) -> anyhow::Result<Vec<[String; 2]>> {
    let Some(pki) = pki else { return Ok(Vec::new()) };
    let files = pki.issue(name)?;
    let ca = pki.ca_file();
    let mut sets = Vec::new();
    if let Some((section, callers)) = server {
        sets.push(set(&format!("{section}.tls.cert"), &files.cert));
        sets.push(set(&format!("{section}.tls.key"), &files.key));
        if let Some(callers) = callers {
            sets.push(set(&format!("{section}.tls.client_ca"), &ca));
            sets.push(set(&format!("{section}.tls.client_auth"), "required"));
            let names: Vec<String> = callers.iter().map(|c| toml_string(&certs::identity(c))).collect();
            sets.push(["--set".to_string(), format!("{section}.tls.allowed_names=[{}]", names.join(","))]);
        }
    }
    if let Some(section) = client {
        sets.push(set(&format!("{section}.client_tls.ca"), &ca));
        sets.push(set(&format!("{section}.client_tls.cert"), &files.cert));
        sets.push(set(&format!("{section}.client_tls.key"), &files.key));
    }
    Ok(sets)
}

/// Runs the system until `shutdown`.
pub async fn run(options: UpOptions, shutdown: Shutdown) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.data_dir)?;
    let data_dir = std::fs::canonicalize(&options.data_dir)?;
    let key = keys::ensure_dev_key(&data_dir)?;
    let data = data_dir.display().to_string();
    let pki = if options.tls {
        let (pki, origin) = certs::DevPki::ensure(&data_dir)?;
        match origin {
            certs::Origin::Created => println!("Created a development CA: {} (clients trust it)", pki.ca_file()),
            certs::Origin::Renewed => println!("The development CA was about to expire; made a new one: {}", pki.ca_file()),
            certs::Origin::Existing => println!("Development CA: {}", pki.ca_file()),
        }
        Some(pki)
    } else {
        None
    };
    let pki = pki.as_ref();
    let scheme = if options.tls { "https" } else { "http" };

    let mut common: Vec<String> = Vec::new();
    if let Some(file) = &options.config_file {
        common.push("--config".into());
        common.push(file.display().to_string());
    }
    for s in &options.sets {
        common.push("--set".into());
        common.push(s.clone());
    }
    common.extend(set("store.data_dir", &data));
    let spec = |name: &str, role: &str, extra: Vec<[String; 2]>| ChildSpec {
        name: name.to_string(),
        role: role.to_string(),
        exe: options.exe.clone(),
        args: common.iter().cloned().chain(extra.into_iter().flatten()).collect(),
        grace: options.grace,
    };

    println!("pixmesh up: data in {data}");
    let mut groups: Vec<Vec<Supervised>> = Vec::new();
    // Who may call whom under `--tls`, by child name.
    let worker_names: Vec<String> = (1..=options.workers).map(|i| format!("worker-{i}")).collect();
    let distributor = ["distributor".to_string()];
    let result = async {
        let registry_addr = match &options.external_registry {
            Some(url) => url.clone(),
            None => {
                let callers: Vec<String> = std::iter::once("distributor".to_string()).chain(worker_names.iter().cloned()).collect();
                let extra = tls_sets(pki, "registry", Some(("registry", Some(&callers))), None)?;
                let registry = Supervised::start(spec("registry", "registry", extra)).await?;
                let registry_addr = addr(registry.announcement(), "grpc")?.to_string();
                groups.push(vec![registry]);
                registry_addr
            }
        };

        let mut workers = Vec::new();
        for name in &worker_names {
            let mut extra = vec![set("worker.registry", &registry_addr), set("worker.id", name)];
            extra.extend(tls_sets(pki, name, Some(("worker", Some(&distributor))), Some("worker"))?);
            workers.push(Supervised::start(spec(name, "worker", extra)).await?);
        }
        groups.push(workers);

        let mut extra = vec![set("distributor.registry", &registry_addr)];
        extra.extend(tls_sets(pki, "distributor", None, Some("distributor"))?);
        let distributor = Supervised::start(spec("distributor", "distributor", extra)).await?;
        groups.push(vec![distributor]);

        let gateway_only = ["gateway".to_string()];
        let upload = Supervised::start(spec("upload", "upload", tls_sets(pki, "upload", Some(("upload", Some(&gateway_only))), None)?)).await?;
        let status = Supervised::start(spec("status", "status", tls_sets(pki, "status", Some(("status", Some(&gateway_only))), None)?)).await?;
        let upload_url = format!("{scheme}://{}", addr(upload.announcement(), "http")?);
        let status_url = format!("{scheme}://{}", addr(status.announcement(), "http")?);
        groups.push(vec![upload, status]);

        // The gateway's `/api/cluster` reads every role's admin port.
        let sources = admin_sources(groups.iter().flatten().map(|child| (child.name(), child.announcement())));
        let keys_file = data_dir.join(keys::KEYS_FILE).display().to_string();
        let mut extra = vec![
            set("gateway.listen", &options.listen),
            set("gateway.upstreams.upload", &upload_url),
            set("gateway.upstreams.status", &status_url),
            set("gateway.api_keys_file", &keys_file),
            ["--set".to_string(), format!("gateway.cluster.sources={sources}")],
        ];
        // Its public listener serves the CA's certificate too; callers bring API keys.
        extra.extend(tls_sets(pki, "gateway", Some(("gateway", None)), Some("gateway"))?);
        let gateway = Supervised::start(spec("gateway", "gateway", extra)).await?;
        let gateway_addr = addr(gateway.announcement(), "http")?.to_string();
        groups.push(vec![gateway]);

        match &key {
            keys::DevKey::Created(k) => println!("Created a development API key (saved in {}): {k}", data_dir.join(keys::DEV_KEY_FILE).display()),
            keys::DevKey::Existing(k) => println!("Development API key: {k}"),
            keys::DevKey::Unknown => println!("API keys: see {}", data_dir.join(keys::KEYS_FILE).display()),
        }
        let mut ready =
            Announcement::new("up").with("gateway", &gateway_addr).with("url", format!("{scheme}://{gateway_addr}")).with("data_dir", &data);
        ready.pixmesh = "ready".into();
        if let Some(k) = key.plain() {
            ready = ready.with("api_key", k);
        }
        let cacert = match pki {
            Some(pki) => {
                ready = ready.with("ca", pki.ca_file());
                format!("--cacert {} ", pki.ca_file())
            }
            None => String::new(),
        };
        ready.print();
        println!("pixmesh is ready on {scheme}://{gateway_addr}  (Ctrl-C to stop)");
        println!(
            "  try: curl {cacert}-H 'X-API-KEY: {}' -H 'Content-Type: image/jpeg' --data-binary @photo.jpg '{scheme}://{gateway_addr}/api/upload?width=800&format=webp'",
            key.plain().unwrap_or("<your key>")
        );
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = &result {
        eprintln!("pixmesh up: start failed: {e:#}");
    } else {
        shutdown.wait().await;
        println!("pixmesh up: stopping");
    }
    // Stop in reverse start order: the gateway first (no new work), the registry last.
    for group in groups.into_iter().rev() {
        let stops: Vec<_> = group.into_iter().map(|s| s.stop()).collect();
        for stop in stops {
            stop.await;
        }
    }
    println!("pixmesh up: stopped");
    result
}
